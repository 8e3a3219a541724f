"""The delivery request: how qmgr hands one message to a delivery agent, and hears back.

qmgr connects to the agent's socket (queue_directory/private/TRANSPORT: smtp, relay, lmtp,
local, discard, error), sends ONE request frame (lib/attr.py framing), and reads ONE reply
frame; then the connection is closed. The agent reads the message from the queue file
itself (read-only), delivers, logs Postfix's per-recipient line, and reports every
recipient's outcome; qmgr alone writes the queue file (marks recipients done, defers,
bounces), so a crashed agent never leaves a half-updated file.

REQUEST (attributes)
    request       "deliver"
    queue_id      the queue id
    queue_file    path of the queue file relative to queue_directory ("active/ID")
    transport     the master.cf service name the request went to (smtp, relay, ...)
    nexthop       the next-hop destination (domain, [host], host:port, [host]:port,
                  unix:/path for lmtp; for local, the local domain)
    sender        envelope sender ("" for <>)
    arrival       the message's arrival time (seconds since the epoch)
    rcpt_count    N
    rcpt.I        recipient I (0..N-1)
    offset.I      the offset of recipient I's record in the queue file (opaque to agents)
    orig.I        optional: recipient I's original address (Postfix's orig_rcpt: as given,
                  before canonical_maps, virtual_alias_maps and alias expansion), only
                  when it is not rcpt.I itself; absent, the original is rcpt.I
    flags         optional, comma-separated words (e.g. "bounce" for a bounce message;
                  "conn_load" and "conn_store": qmgr's on-demand connection caching for
                  this destination, Postfix's DEL_REQ_FLAG_CONN_LOAD/_STORE)

REPLY (attributes)
    status        "0" (the per-recipient results follow) or lib/attr's 2/3 with `reason`
    relay         "host[addr]:port" or "none", for logs
    rcpt_count    N, as requested
    result.I      "sent", "deferred" or "bounced"
    dsn.I         enhanced status code, e.g. "2.0.0", "4.4.1", "5.1.1"
    reason.I      the reason text (the remote reply, or what went wrong)
    action.I      optional, for a sent recipient: the DSN action, "relayed" (handed to a
                  next hop that announced no DSN) or "delivered" (the default)
    passed.I      optional, "1": the next hop announced DSN and got the recipient's NOTIFY,
                  so it sends any success notice (Postfix's smtp clears NOTIFY=SUCCESS)

FUNCTIONS
    encode_request(Request) -> bytes (a whole frame); decode_request(attrs) -> Request
    encode_reply(DeliveryStatus) -> bytes; decode_reply(attrs, rcpt_count) -> DeliveryStatus
    Both decoders raise DeliverError (a lib.attr.AttrError) for a frame that breaks the rules.
    Request.original(i) -> recipient i's original address (rcpt.I when none was sent).
    log_delivery(queue_id, rcpt, relay, arrival, started, dsn, status, reason, ...,
    orig="") logs Postfix's line: `ID: to=<r>, [orig_to=<o>, ]relay=R, [conn_use=N, ]
    delay=D, delays=a/b/c/d, dsn=X, status=S (reason)`; orig_to when orig is given and
    differs from r but for case (Postfix's log_adhoc).
    shown_original(rcpt, orig) -> orig when logs and notices show it beside rcpt (it
    differs but for case), else "": the one rule for orig_to= and "(expanded from <o>)".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import attr, metrics, msg

RESULTS = ("sent", "deferred", "bounced")


class DeliverError(attr.AttrError):
    """A delivery request or reply that breaks the rules above."""


@dataclass
class Request:
    queue_id: str
    queue_file: str
    transport: str
    nexthop: str
    sender: str
    arrival: float
    recipients: list[str]
    offsets: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    # the recipients' original addresses, one per recipient ("" for one that is its
    # own original), or none at all (empty, the common case: no list is made)
    originals: list[str] | tuple = ()

    def original(self, i: int) -> str:
        """Recipient i's original address: as given, before rewriting and expansion."""
        return (self.originals[i] if self.originals else "") or self.recipients[i]


@dataclass
class RcptResult:
    result: str          # sent, deferred, bounced
    dsn: str
    reason: str
    action: str = ""     # sent: the DSN action, "relayed", "expanded" or "" (delivered)
    passed: bool = False     # sent: the next hop took over DSN (RFC 3461 section 5.2)


@dataclass
class DeliveryStatus:
    """An agent's reply: the relay and one result per recipient, or status 2/3 and why."""

    relay: str
    results: list[RcptResult]
    status: str = attr.STATUS_OK
    reason: str = ""


def encode_request(req: Request) -> bytes:
    """The request as one frame."""
    # Numbers as their decimal text: the same bytes as lib/attr.py makes of an int.
    attrs = {"request": "deliver", "queue_id": req.queue_id, "queue_file": req.queue_file,
             "transport": req.transport, "nexthop": req.nexthop, "sender": req.sender,
             "arrival": f"{req.arrival:.6f}", "rcpt_count": str(len(req.recipients))}
    if req.flags:
        attrs["flags"] = ",".join(req.flags)
    offsets, originals = req.offsets, req.originals
    for i, rcpt in enumerate(req.recipients):
        attrs[f"rcpt.{i}"] = rcpt
        attrs[f"offset.{i}"] = str(int(offsets[i])) if i < len(offsets) else "0"
        if originals and originals[i] and originals[i] != rcpt:
            attrs[f"orig.{i}"] = originals[i]
    return attr.encode(attrs)


def _text(attrs: dict, name: str) -> str:
    try:
        return attrs[name].decode("utf-8", "surrogateescape")
    except KeyError:
        raise DeliverError(f"missing attribute: {name}") from None


def _count(attrs: dict) -> int:
    text = _text(attrs, "rcpt_count")
    if not text.isdigit() or not 0 < int(text) <= 100000:
        raise DeliverError(f"bad rcpt_count: {text[:20]!r}")
    return int(text)


def decode_request(attrs: dict) -> Request:
    """A Request from a decoded frame; DeliverError when it is not a valid one."""
    if attrs.get("request") != b"deliver":
        raise DeliverError("not a delivery request")
    n = _count(attrs)
    try:
        return _request(attrs, n)
    except (KeyError, ValueError):
        _refuse(attrs, n)
    raise DeliverError("bad delivery request")      # _refuse() names every case


def _refuse(attrs: dict, n: int) -> None:
    """Raise the DeliverError that says which rule a frame that _request() refused
    breaks, looking in the order of the REQUEST list."""
    try:
        float(_text(attrs, "arrival"))
        for i in range(n):
            int(_text(attrs, f"offset.{i}"))
    except ValueError:
        raise DeliverError("bad arrival time or recipient offset") from None
    for name in ("queue_id", "queue_file", "transport", "nexthop", "sender"):
        _text(attrs, name)
    for i in range(n):
        _text(attrs, f"rcpt.{i}")


def _request(attrs: dict, n: int) -> Request:
    """decode_request()'s work, in one go, without a call per attribute: KeyError or
    ValueError for a frame that breaks a rule (_refuse says which)."""
    text = bytes.decode
    arrival = float(text(attrs["arrival"], "utf-8", "surrogateescape"))
    if n == 1:                  # most requests (qmgr's recipient_limit per destination)
        offsets = [int(text(attrs["offset.0"], "utf-8", "surrogateescape"))]
        recipients = [text(attrs["rcpt.0"], "utf-8", "surrogateescape")]
        orig = attrs.get("orig.0")
        originals = () if orig is None else [text(orig, "utf-8", "surrogateescape")]
    else:
        offsets = [int(text(attrs[f"offset.{i}"], "utf-8", "surrogateescape"))
                   for i in range(n)]
        recipients = [text(attrs[f"rcpt.{i}"], "utf-8", "surrogateescape") for i in range(n)]
        originals = [text(attrs.get(f"orig.{i}", b""), "utf-8", "surrogateescape")
                     for i in range(n)]
        if not any(originals):
            originals = ()      # as qmgr sends none: the recipients are their originals
    flags = attrs.get("flags")
    return Request(text(attrs["queue_id"], "utf-8", "surrogateescape"),
                   text(attrs["queue_file"], "utf-8", "surrogateescape"),
                   text(attrs["transport"], "utf-8", "surrogateescape"),
                   text(attrs["nexthop"], "utf-8", "surrogateescape"),
                   text(attrs["sender"], "utf-8", "surrogateescape"), arrival, recipients,
                   offsets, [] if flags is None else
                   list(filter(None, text(flags, "utf-8", "surrogateescape").split(","))),
                   originals)


def encode_reply(reply: DeliveryStatus) -> bytes:
    """The reply as one frame."""
    attrs = {"status": reply.status, "relay": reply.relay,
             "rcpt_count": str(len(reply.results))}
    if reply.reason:
        attrs["reason"] = reply.reason
    for i, r in enumerate(reply.results):
        names = _RESULT_NAMES[i] if i < len(_RESULT_NAMES) else _result_names(i)
        attrs[names[0]] = r.result
        attrs[names[1]] = r.dsn
        attrs[names[2]] = r.reason[:4000]
        if r.action:
            attrs[names[3]] = r.action
        if r.passed:
            attrs[names[4]] = "1"
    return attr.encode(attrs)


def _result_names(i: int) -> tuple[str, ...]:
    return f"result.{i}", f"dsn.{i}", f"reason.{i}", f"action.{i}", f"passed.{i}"


# the reply's attribute names of the first recipients, made once
_RESULT_NAMES = [_result_names(i) for i in range(64)]


def decode_reply(attrs: dict, rcpt_count: int) -> DeliveryStatus:
    """The agent's answer from a decoded frame; DeliverError when it does not answer."""
    status = _text(attrs, "status")
    if status != attr.STATUS_OK:
        return DeliveryStatus(relay=attrs.get("relay", b"none").decode("utf-8", "replace"),
                              results=[], status=status,
                              reason=attrs.get("reason", b"").decode("utf-8", "replace"))
    if _count(attrs) != rcpt_count:
        raise DeliverError("reply does not match the request's recipients")
    results = []
    for i in range(rcpt_count):
        result = _text(attrs, f"result.{i}")
        if result not in RESULTS:
            raise DeliverError(f"bad result: {result[:20]!r}")
        action = attrs.get(f"action.{i}", b"").decode("ascii", "replace")
        if action not in ("", "delivered", "relayed", "expanded"):
            raise DeliverError(f"bad action: {action[:20]!r}")
        results.append(RcptResult(result, _text(attrs, f"dsn.{i}"), _text(attrs, f"reason.{i}"),
                                  action, attrs.get(f"passed.{i}") == b"1"))
    return DeliveryStatus(relay=_text(attrs, "relay"), results=results)


def log_delivery(queue_id: str, rcpt: str, relay: str, arrival: float, started: float,
                 dsn: str, status: str, reason: str, conn_setup: float = 0.0,
                 transmit: float = 0.0, conn_use: int = 0, orig: str = "") -> None:
    """Postfix's delivery log line, with its delay breakdown; orig_to=<orig> after the
    recipient when its original address differs but for case (log_adhoc.c); conn_use=N
    after the relay when the connection was used for the Nth time (N > 1: a cached
    connection)."""
    # x if x > 0.0 else 0.0 is max(0.0, x) (NaN included) without the call; a stage
    # under 4 ms is "0" without _fmt's (most of them)
    delay = time.time() - arrival
    delay = delay if delay > 0.0 else 0.0
    before = started - arrival
    before = before if before > 0.0 else 0.0
    setup = conn_setup if conn_setup > 0.0 else 0.0
    xmit = transmit if transmit > 0.0 else 0.0
    queue_mgr = delay - before - setup - xmit
    queue_mgr = queue_mgr if queue_mgr > 0.0 else 0.0
    delays = (f"{'0' if before < 0.004 else _fmt(before)}/"
              f"{'0' if queue_mgr < 0.004 else _fmt(queue_mgr)}/"
              f"{'0' if setup < 0.004 else _fmt(setup)}/{'0' if xmit < 0.004 else _fmt(xmit)}")
    use = f", conn_use={conn_use}" if conn_use > 1 else ""
    to = rcpt
    if orig and orig != rcpt and shown_original(rcpt, orig):
        to = f"{rcpt}>, orig_to=<{orig}"
    msg.info(f"{queue_id}: to=<{to}>, relay={relay}{use}, delay={_fmt(delay)}, "
             f"delays={delays}, dsn={dsn}, status={status} ({reason})")
    metrics.delivery(queue_id, rcpt, relay, status, dsn, delay, (before, queue_mgr, setup, xmit))


def shown_original(rcpt: str, orig: str) -> str:
    """orig, when it is to be shown beside rcpt: it differs from it but for case
    (Postfix compares with strcasecmp_utf8); "" otherwise."""
    return orig if orig and orig.lower() != rcpt.lower() else ""


def _fmt(seconds: float) -> str:
    """Postfix's delay format: two significant digits, at most two decimals."""
    if seconds < 0.004:         # what the rounding below makes of it (most stages)
        return "0"
    if seconds >= 10:
        return str(int(round(seconds)))
    digits = f"{seconds:.2g}"
    text = _FORMATTED.get(digits)
    if text is None:
        value = round(float(digits), 2)
        text = _FORMATTED[digits] = f"{value:.2f}".rstrip("0").rstrip(".") or "0"
    return text


# _fmt()'s text for each two-digit rounding of a time from 0.004 to 10 s: a function of
# that rounding alone, and there are 332 of them ("0.004" .. "9.9", "10", and "nan")
_FORMATTED: dict[str, str] = {}
