"""A test-only delivery agent that answers as each recipient's local part tells it.

master.cf names it `python:fake_agent` (tests put this folder on PYTHONPATH), typically as
`smtp unix - - n - - python:fake_agent`. It speaks lib/deliver.py exactly as a real agent
does, reads nothing but the request, and logs Postfix's `to=<>` line with a made-up relay.
What it does is chosen by the part of the first recipient's local part before `+`:

    defer+x@...     deferred 4.0.0
    dead+x@...      deferred 4.4.1 "connect to ...: Connection refused" (a site failure)
    bounce+x@...    bounced 5.1.1 with a remote server's reply
    slow+x@...      sent after 1.5 seconds
    hang+x@...      never answers (sleeps 30 s, then exits without a reply)
    garbage+x@...   answers with bytes that are not a frame
    badreply+x@...  answers with a well-formed frame that is not a delivery status
    crash+x@...     exits at once without answering
    anything else   sent 2.0.0

Each request is appended to the file named by $FAKE_AGENT_LOG (when set) as
`queue_id recipient` lines before the answer, so tests can count deliveries.
"""

import os
import time

from postfix_py.lib import attr, deliver, server

RELAY = "fake.example[192.0.2.1]:25"


def _mode(rcpt: str) -> str:
    local = rcpt.rpartition("@")[0] or rcpt
    return local.split("+", 1)[0].lower() if "+" in local else ""


def _result(rcpt: str) -> deliver.RcptResult:
    mode = _mode(rcpt)
    if mode == "defer":
        return deliver.RcptResult("deferred", "4.0.0", "fake: deferred as told")
    if mode == "dead":
        return deliver.RcptResult("deferred", "4.4.1",
                                  "connect to fake.example[192.0.2.1]:25: Connection refused")
    if mode == "bounce":
        return deliver.RcptResult(
            "bounced", "5.1.1", f"host fake.example[192.0.2.1] said: 550 5.1.1 <{rcpt}>: "
            "Recipient address rejected: User unknown (in reply to RCPT TO command)")
    return deliver.RcptResult("sent", "2.0.0", "250 2.0.0 Ok: queued as FAKE")


def service(conn, ctx):
    """One request, answered as the first recipient says."""
    try:
        request = deliver.decode_request(attr.read_frame(conn, 30))
    except (attr.PeerClosedError, attr.AttrError):
        return
    started = time.time()
    record = os.environ.get("FAKE_AGENT_LOG")
    if record:
        with open(record, "a") as f:
            f.writelines(f"{request.queue_id} {r}\n" for r in request.recipients)
    mode = _mode(request.recipients[0])
    if mode == "hang":
        time.sleep(30)
        return
    if mode == "crash":
        os._exit(1)
    if mode == "garbage":
        conn.sendall(b"\xff\xff\xff\xffnot a frame at all")
        return
    if mode == "badreply":
        conn.sendall(attr.encode({"status": "0", "relay": RELAY, "rcpt_count": 99}))
        return
    if mode == "slow":
        time.sleep(1.5)
    results = [_result(r) for r in request.recipients]
    for rcpt, r in zip(request.recipients, results):
        deliver.log_delivery(request.queue_id, rcpt, RELAY, request.arrival, started,
                             r.dsn, r.result, r.reason)
    conn.sendall(deliver.encode_reply(deliver.DeliveryStatus(relay=RELAY, results=results)))


def main(ctx):
    return server.single_server(ctx, service)
