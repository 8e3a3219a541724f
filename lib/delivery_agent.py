"""The request loop of every delivery agent: smtp, lmtp, local, virtual, discard and error.

serve() handles one connection from qmgr (lib/deliver.py is the protocol): it reads
exactly one request frame within the time limit, validates it strictly, hands it to the
agent's deliver function with a Report, and writes one reply frame. A request that
breaks the protocol gets a status 2 reply with the reason wherever the stream can still
be read (lib/attr.py's rule: every request is answered); a stream that cannot be read is
closed, and qmgr defers the recipients. The agent never writes the queue file: qmgr
records the results.

A Report is where each recipient's outcome is decided for good, and the only place:
record() applies soft_bounce (a bounce becomes a deferral, dsn 5.x.x becomes 4.x.x, as
Postfix's bounce client does in every agent) and logs Postfix's line
`ID: to=<r>, [orig_to=<o>, ]relay=R, delay=D, delays=a/b/c/d, dsn=X, status=S (reason)`
(orig_to: the request's original address of the recipient, when it differs). The smtp
client records each recipient as its session decides it (with the connection set-up and
transmission delays); local records each recipient as it is delivered (with the DSN
action of an alias expansion); virtual, discard and error decide all recipients first and
let decided() record them.

PROBES
    A request with the flag "verify" is an address verification probe (verify/service.py):
    the agent finds out what would happen without delivering, and record() reports each
    recipient's outcome to the verify service (lib/verify_client.py report_probe, as
    Postfix's verify_append) under the address the probe is for (the queue file's
    verify_address) and the recipient, logs `status=deliverable` or `undeliverable`
    instead of sent, bounced or deferred, and tells qmgr the recipient is done, so that
    no bounce or defer log, and no notice, follows. When the service cannot be told,
    the recipient is deferred ("address verification service failure").
    A request with the flag "expand" (sendmail -bv) does not deliver either; its results
    go to qmgr as usual, logged as deliverable or undeliverable, and qmgr mails the
    sender a report (Report.trace_only is true for both).

FUNCTIONS
    serve(conn, ctx, deliver_fn, timeout=None): one request and its reply.
        deliver_fn(request, ctx, report) -> relay; timeout defaults to ipc_timeout.
    decided(fn) -> deliver_fn: for fn(request, ctx) -> (relay, [RcptResult]), one result
        per recipient in request order, recorded when fn returns.
    Report(request, soft_bounce): record(index, kind, dsn, reason, relay,
        conn_setup=0.0, transmit=0.0, conn_use=0, action="", passed=False, dsn_text="",
        to="", orig="")
        -> RcptResult (as decided: soft_bounce applied);
        reply(relay) -> lib.deliver.DeliveryStatus; .arrival (settable), .started, .soft_bounce.
    result(kind, dsn, reason) -> RcptResult.
    read_message(request, ctx) -> (envelope, content): the queue file's lib.queue
        QueueMessage and its message content (bytes), or None with a warning for a bad
        queue file name or an unreadable file (local and virtual then defer every
        recipient with 4.3.0 "queue file read error").

LOG LINES
    warning: malformed delivery request: REASON     (a frame that breaks lib/attr.py)
    warning: read delivery request: REASON          (the stream failed or timed out)
    warning: bad delivery request: REASON           (a frame that is not a request)
    warning: send delivery status: REASON           (qmgr went away; it tries again)

CONFIGURATION PARAMETERS
    ipc_timeout (3600s): time limit for reading the request and writing the reply.
    soft_bounce (no): report permanent failures as temporary (dsn 5.x.x becomes 4.x.x).

SEE ALSO
    lib/deliver.py, lib/attr.py, smtp/service.py, local/service.py, virtual/service.py,
    local/discard.py, local/error.py; Postfix deliver_request(3), bounce(3).
"""

from __future__ import annotations

import os
import re
import socket
import time

from . import attr, deliver, msg, verify_client
from . import queue as Q

RcptResult = deliver.RcptResult


# qmgr hands an agent a file of its active queue, never a path of the agent's choosing
QUEUE_FILE = re.compile(r"active/[A-Za-z0-9_]{1,64}")


def result(kind: str, dsn: str, reason: str) -> RcptResult:
    """One recipient's outcome: kind is sent, deferred or bounced."""
    return RcptResult(kind, dsn, reason)


def read_message(request, ctx) -> tuple[Q.QueueMessage, bytes] | None:
    """The request's queue file: (envelope, content); None (warned) when it cannot be had."""
    if not QUEUE_FILE.fullmatch(request.queue_file):
        msg.warn(f"{request.queue_id}: bad queue file name: {request.queue_file!r}")
        return None
    path = os.path.join(ctx.queue_root, request.queue_file)
    try:
        envelope = Q.read(path)
        return envelope, b"".join(envelope.content(path))
    except (OSError, Q.QueueFileError) as exc:
        msg.warn(f"{request.queue_id}: read queue file: {exc}")
        return None


class Report:
    """The outcomes of one request, each recorded once: soft_bounce, then the log line."""

    def __init__(self, request: deliver.Request, soft_bounce: bool):
        self.request = request
        self.soft_bounce = soft_bounce
        self.arrival = request.arrival
        self.started = time.time()
        self.results: list[RcptResult | None] = [None] * len(request.recipients)
        # an address verification probe (qmgr's "verify" flag: see _probe()), or
        # sendmail -bv's ("expand": the result goes to qmgr, logged as the probe's);
        # either way the agent does not deliver (trace_only)
        flags = request.flags
        self.verify = "verify" in flags if flags else False
        self.expand = "expand" in flags if flags else False
        self.trace_only = self.verify or self.expand
        self.verify_address = ""        # the address the probe is for (serve() reads it)
        self.verify_cfg = None

    def record(self, index: int, kind: str, dsn: str, reason: str, relay: str,
               conn_setup: float = 0.0, transmit: float = 0.0, conn_use: int = 0,
               action: str = "", passed: bool = False,
               dsn_text: str = "", to: str = "", orig: str = "") -> RcptResult:
        """Recipient index's final outcome, logged; soft_bounce applied here only.
        action and passed: a sent recipient's DSN action and hand-over (lib/deliver.py);
        dsn_text: a sent recipient's DSN text when it is not the logged reason (local's
        `alias expanded`: the deliveries of the expansion are logged with their own);
        to and orig: the address the line names and its original, when that is not the
        request's recipient (local logs the address an alias expanded to, as Postfix)."""
        if kind == "bounced" and self.soft_bounce:
            kind, dsn = "deferred", "4" + dsn[1:] if dsn[:1] == "5" else dsn
        if self.trace_only:
            if self.verify:
                return self._probe(index, kind, dsn, reason, relay, conn_setup, transmit,
                                   conn_use)
            logged = verify_client.status_name(
                verify_client.RCPT_OK if kind == "sent" else verify_client.RCPT_BOUNCE)
        else:
            logged = kind
        request = self.request
        if not to:
            to = request.recipients[index]
            orig = request.originals[index] if request.originals else ""
        deliver.log_delivery(request.queue_id, to, relay, self.arrival, self.started, dsn,
                             logged, reason, conn_setup, transmit, conn_use, orig)
        if kind != "sent":
            action, passed, dsn_text = "", False, ""
        r = self.results[index] = RcptResult(kind, dsn, dsn_text or reason, action, passed)
        return r

    def _probe(self, index: int, kind: str, dsn: str, reason: str, relay: str,
               conn_setup: float, transmit: float, conn_use: int) -> RcptResult:
        """A probe's result goes to the verify service instead of qmgr's logs, as
        Postfix's verify_append(): the address the probe is for, and the recipient
        too when cleanup rewrote it; logged `status=deliverable` or `undeliverable`
        (`undeliverable-but-not-cached` with address_verify_negative_cache = no). The
        recipient is then done ("sent": no bounce, no defer log, no notice); when the
        service cannot be told, it is deferred and the probe tries again later."""
        request = self.request
        rcpt = request.recipients[index]
        status = verify_client.RCPT_OK if kind == "sent" else \
            verify_client.RCPT_BOUNCE if kind == "bounced" else verify_client.RCPT_DEFER
        told, action = verify_client.report_probe(
            self.verify_cfg, (self.verify_address, rcpt), status, reason)
        if not told:
            msg.warn(f"{request.queue_id}: "
                     f"{verify_client.client(self.verify_cfg).service} service failure")
            kind, dsn, reason = "deferred", "4.3.0", "address verification service failure"
            action = kind
        deliver.log_delivery(request.queue_id, rcpt, relay, self.arrival, self.started,
                             dsn, action, reason, conn_setup, transmit, conn_use,
                             request.original(index))
        r = self.results[index] = RcptResult("sent" if told else kind, dsn, reason)
        return r

    def reply(self, relay: str) -> deliver.DeliveryStatus:
        """The reply frame's content; a recipient never recorded is deferred (4.3.0)."""
        return deliver.DeliveryStatus(relay=relay, results=[
            r if r is not None else RcptResult("deferred", "4.3.0",
                                               "mail system internal error")
            for r in self.results])


def decided(fn):
    """A deliver function for serve() from fn(request, ctx) -> (relay, results)."""

    def deliver_fn(request, ctx, report: Report) -> str:
        relay, results = fn(request, ctx)
        for i, r in enumerate(results):
            report.record(i, r.result, r.dsn, r.reason, relay)
        return relay
    return deliver_fn


def serve(conn, ctx, deliver_fn, timeout: float | None = None) -> None:
    """Answer one delivery request on conn."""
    if timeout is None:
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
    report = Report(request, ctx.cfg["soft_bounce"])
    if report.verify:
        _probe_request(report, request, ctx)
    relay = deliver_fn(request, ctx, report)
    _answer(conn, deliver.encode_reply(report.reply(relay)), timeout)


def _probe_request(report: Report, request, ctx) -> None:
    """A probe's address as the verify service was asked it (the queue file's
    verify_address, which cleanup's rewriting leaves alone), and the configuration."""
    report.verify_cfg = ctx.cfg
    if QUEUE_FILE.fullmatch(request.queue_file):
        try:
            envelope = Q.read(os.path.join(ctx.queue_root, request.queue_file))
            report.verify_address = envelope.attrs.get(verify_client.ADDRESS_ATTR, "")
        except (OSError, Q.QueueFileError) as exc:
            msg.warn(f"{request.queue_id}: read queue file: {exc}")


def _answer(conn, frame: bytes, timeout: float) -> None:
    try:
        sent = 0
        if conn.gettimeout() is None:
            # A reply fits a fresh connection's socket buffer: sent at once, without
            # the ioctl and the poll of a timed send; the time limit is for the rest.
            try:
                sent = conn.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        if sent < len(frame):
            conn.settimeout(timeout)
            conn.sendall(frame[sent:] if sent else frame)
    except OSError as exc:
        # qmgr went away; it will try these recipients again.
        msg.warn(f"send delivery status: {exc}")
