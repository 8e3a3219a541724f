"""The delivery-agent side of lib/deliver.py, shared by local, discard and error.

serve() handles one connection from qmgr: it reads exactly one request frame (within
ipc_timeout), decodes it, asks the agent's deliver function for one result per recipient,
applies soft_bounce, logs Postfix's per-recipient line (`ID: to=<r>, relay=R, delay=D,
delays=a/b/c/d, dsn=X, status=S (reason)`), and writes one reply frame. A request that
breaks the protocol gets a status 2 reply with the reason (lib/attr.py's rule: every
request is answered while the stream can still be read); a stream that cannot be read is
closed. The agent never writes the queue file: qmgr records the results.

FUNCTIONS
    serve(conn, ctx, deliver_fn): deliver_fn(request, ctx) -> (relay, [RcptResult]).
    soft(result) -> RcptResult: a bounce turned into a deferral (soft_bounce = yes).
    result(kind, dsn, reason) -> RcptResult.

CONFIGURATION PARAMETERS
    ipc_timeout (3600s): time limit for reading the request and writing the reply.
    soft_bounce (no): report permanent failures as temporary (dsn 5.x.x becomes 4.x.x).

SEE ALSO
    lib/deliver.py, Postfix deliver_request(3).
"""

from __future__ import annotations

import time

from ..lib import attr, deliver, msg

RcptResult = deliver.RcptResult


def result(kind: str, dsn: str, reason: str) -> RcptResult:
    """One recipient's outcome: kind is sent, deferred or bounced."""
    return RcptResult(kind, dsn, reason)


def soft(r: RcptResult) -> RcptResult:
    """soft_bounce: a permanent failure reported as a temporary one."""
    if r.result != "bounced":
        return r
    return RcptResult("deferred", "4" + r.dsn[1:] if r.dsn[:1] == "5" else r.dsn, r.reason)


def serve(conn, ctx, deliver_fn) -> None:
    """Answer one delivery request on conn."""
    timeout = ctx.cfg["ipc_timeout"]
    try:
        frame = attr.read_frame(conn, timeout)
    except attr.PeerClosedError:
        return
    except attr.AttrError as exc:
        if exc.recoverable:
            _answer(conn, attr.encode({"status": attr.STATUS_BAD, "reason": str(exc)}),
                    timeout)
        msg.warn(f"malformed delivery request: {exc}")
        return
    except (OSError, TimeoutError) as exc:
        msg.warn(f"read delivery request: {exc}")
        return
    try:
        request = deliver.decode_request(frame)
    except deliver.DeliverError as exc:
        msg.warn(f"bad delivery request: {exc}")
        _answer(conn, attr.encode({"status": attr.STATUS_BAD, "reason": str(exc)}), timeout)
        return
    started = time.time()
    relay, results = deliver_fn(request, ctx)
    if ctx.cfg["soft_bounce"]:
        results = [soft(r) for r in results]
    for rcpt, r in zip(request.recipients, results):
        deliver.log_delivery(request.queue_id, rcpt, relay, request.arrival, started,
                             r.dsn, r.result, r.reason)
    _answer(conn, deliver.encode_reply(deliver.Reply(relay=relay, results=results)), timeout)


def _answer(conn, frame: bytes, timeout: float) -> None:
    try:
        conn.settimeout(timeout)
        conn.sendall(frame)
    except OSError as exc:
        # qmgr went away; it will try these recipients again.
        msg.warn(f"send delivery status: {exc}")
