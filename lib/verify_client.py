"""verify_client - ask the address verification service, and tell it what probes found.

SYNOPSIS
    from postfix_py.lib import verify_client
    found = verify_client.client(cfg).query("user@example.com")   # (status, text) or None
    verify_client.client(cfg).update("user@example.com", verify_client.RCPT_OK, "250 Ok")

DESCRIPTION
    This module is postfix-py's verify_clnt.c: smtpd asks the verify service
    (verify/service.py) what it knows of an address (reject_unverified_recipient,
    reject_unverified_sender), and the delivery agents and qmgr report what a probe
    found (lib/delivery_agent.py, as Postfix's verify_append() in bounce, defer and
    sent). The service listens on private/$address_verify_service_name; a process keeps
    one connection to it (lib/attr.AttrClient: opened on first use, a timeout on every
    step, one retry on a fresh connection). Unlike anvil, the service is not optional to
    its users: a call that cannot be answered returns None (query) or False (update),
    with Postfix's warning `problem talking to service verify: REASON`, and the caller
    acts as Postfix does on VRFY_STAT_FAIL (smtpd: "address verification problem"; an
    agent: the probe is deferred with "verify service failure").

PROTOCOL (lib/attr.py frames)
    request=query   addr=ADDRESS
        -> status=0 addr_status=N why=TEXT      (status 2: a bad request)
    request=update  addr=ADDRESS addr_status=N why=TEXT
        -> status=0
    addr_status is Postfix's recipient status: RCPT_OK 0 (deliverable), RCPT_DEFER 1
    (undeliverable for now), RCPT_BOUNCE 2 (undeliverable), RCPT_TODO 3 (being probed,
    nothing known yet).

FUNCTIONS
    VerifyClient(path, timeout=TIMEOUT)
        query(addr) -> (addr_status, text) or None
        update(addr, addr_status, text) -> bool    True when the service took it
        close()
    client(cfg=None) -> this process's VerifyClient, on private/$address_verify_service_name
        (made on first use; after a fork, the child opens its own connection).
    trace_flags(value) -> the probe flags of a queue file's trace_flags attribute
        (TRACE_FLAGS_ATTR; TRACE_FLAG_VERIFY for the verify service's probes,
        TRACE_FLAG_REPORT for sendmail -bv's; ADDRESS_ATTR names the probed address);
        REQUEST_FLAG maps them to the delivery request's flags "verify" and "expand";
        trace_only(request flags) -> whether the agent must not deliver.
    status_name(addr_status) -> "deliverable" or "undeliverable", as Postfix logs them.
    report_probe(cfg, addresses, addr_status, text) -> (told, log status): a probe's
        result, as Postfix's verify_append() (lib/delivery_agent.py, qmgr).
    ProbeSender(cfg): the probes' envelope sender, as Postfix's verify_sender_addr.c;
        ProbeSender.error(cfg) -> what is wrong with address_verify_sender, or None.
        make(now) -> the sender of a probe sent now (make_verify_sender_addr): with
        address_verify_sender_ttl, the local part ends in a time stamp that changes
        every ttl seconds (base 31 in the letters 0-9B-Z, no vowels, no delimiter), so
        that a greylisting or block list at the far end does not hold probes forever.
        valid(addr, now) -> the time-independent sender when addr is a probe sender of
        this site within one ttl of now, else None (valid_verify_sender_addr: smtpd
        does not apply its restrictions to a probe of this site's MTAs).

SEE ALSO
    verify/service.py (the server), smtpd/check.py (the restrictions),
    lib/delivery_agent.py (probe results); Postfix verify_clnt(3), verify(8).
"""

from __future__ import annotations

import os
import threading

from . import attr, msg

TIMEOUT = 10.0              # seconds per connect, write and read (a local service)
DEFAULT_SERVICE = "verify"

RCPT_OK, RCPT_DEFER, RCPT_BOUNCE, RCPT_TODO = 0, 1, 2, 3
RCPT_STATUSES = (RCPT_OK, RCPT_DEFER, RCPT_BOUNCE, RCPT_TODO)
MAX_TEXT = 4000             # bytes of a reason text kept (the service truncates too)
# A probe's queue file: Postfix's trace_flags attribute with DEL_REQ_FLAG_MTA_VRFY (the
# verify service's probes) or DEL_REQ_FLAG_USR_VRFY (sendmail -bv: a report to the
# sender), and the address as the service was asked it (cleanup may rewrite the
# recipient).
TRACE_FLAGS_ATTR, ADDRESS_ATTR = "trace_flags", "verify_address"
TRACE_FLAG_VERIFY, TRACE_FLAG_REPORT = 256, 512
# the delivery request flags (lib/deliver.py) of the two kinds of probe
REQUEST_FLAG = {TRACE_FLAG_VERIFY: "verify", TRACE_FLAG_REPORT: "expand"}


def trace_flags(value: str) -> int:
    """The probe flags (TRACE_FLAG_VERIFY, TRACE_FLAG_REPORT) of a queue file's
    trace_flags value; 0 for anything else."""
    if not value.isdigit() or len(value) > 9:
        return 0
    return int(value) & (TRACE_FLAG_VERIFY | TRACE_FLAG_REPORT)


def trace_only(flags) -> bool:
    """Whether a delivery request's flags make it a probe: the agent finds out what
    would happen without delivering (Postfix's DEL_REQ_TRACE_ONLY)."""
    return "verify" in flags or "expand" in flags


def status_name(addr_status: int) -> str:
    """The name Postfix's verify(8) and log lines give a probe result."""
    return "deliverable" if addr_status == RCPT_OK else "undeliverable"


class VerifyClient:
    """A kept connection to the verify service whose calls never raise."""

    def __init__(self, path: str, timeout: float = TIMEOUT, service: str = DEFAULT_SERVICE):
        self.path = path
        self.service = service
        self._clnt = attr.AttrClient(path, timeout)
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _call(self, attrs: dict) -> dict | None:
        """One request; the reply when its status is 0, else None (warned)."""
        with self._lock:
            if self._pid != os.getpid():        # forked: the connection is the parent's
                self._pid = os.getpid()
                self._clnt = attr.AttrClient(self.path, self._clnt.timeout)
            try:
                reply = self._clnt.request(attrs)
                status = attr.reply_status(reply)
            except Exception as exc:     # noqa: BLE001 - whatever it is, the caller decides
                self._clnt.close()
                cause = exc.__cause__ if isinstance(exc, attr.AttrClientError) else exc
                text = getattr(cause, "strerror", None) or str(cause or exc)
                msg.warn(f"problem talking to service {self.service}: {text}")
                return None
        if status != attr.STATUS_OK:
            reason = reply.get("reason", b"").decode("utf-8", "replace")
            msg.warn(f"service {self.service} refused a {attrs['request']} request: "
                     f"status {status}{': ' + reason if reason else ''}")
            return None
        return reply

    def query(self, addr: str) -> tuple[int, str] | None:
        """What the service knows of addr: (addr_status, text), or None."""
        reply = self._call({"request": "query", "addr": addr})
        if reply is None:
            return None
        raw = reply.get("addr_status", b"")
        if not raw.isdigit() or int(raw) not in RCPT_STATUSES:
            msg.warn(f"service {self.service}: bad addr_status in reply: {raw[:20]!r}")
            return None
        return int(raw), reply.get("why", b"").decode("utf-8", "replace")

    def update(self, addr: str, addr_status: int, text: str) -> bool:
        """Report a probe's result for addr; True when the service took it."""
        return self._call({"request": "update", "addr": addr, "addr_status": addr_status,
                           "why": text[:MAX_TEXT]}) is not None

    def close(self) -> None:
        self._clnt.close()


_SAFE_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
VERIFY_BASE = 31            # the time stamp's digits: 0-9 and B-Z (Postfix's safe_ultostr)
_SAFE_VALUE = {c: i for i, c in enumerate(_SAFE_CHARS[:VERIFY_BASE])}


class ProbeSender:
    """address_verify_sender with address_verify_sender_ttl (see FUNCTIONS)."""

    def __init__(self, cfg):
        raw = (cfg.get("address_verify_sender") or "").strip()
        self.null = raw in ("", "<>")
        self.ttl = int(cfg["address_verify_sender_ttl"])
        local, at, domain = raw.partition("@")
        # the canonical form: a name without a domain gets @$myorigin, as
        # rewrite_clnt_internal("local") does
        self.local = local
        self.at_domain = at + domain if at else f"@{cfg.get('myorigin')}"
        self.base = "" if self.null else self.local + self.at_domain
        self._folded = (self.local.lower(), self.at_domain.lower())

    @staticmethod
    def error(cfg) -> str | None:
        """Postfix's fatal sanity checks of address_verify_sender."""
        raw = (cfg.get("address_verify_sender") or "").strip()
        if raw.startswith("@"):
            return f"parameter address_verify_sender: value \"{raw}\" must not start with '@'"
        if raw not in ("", "<>") and raw.endswith("@"):
            return f"parameter address_verify_sender: value \"{raw}\" must not end with '@'"
        return None

    def _epoch(self, now: float) -> int:
        return int(now) // self.ttl

    def make(self, now: float) -> str:
        """The envelope sender of a probe sent at now."""
        if self.null or self.ttl <= 0:
            return self.base
        n, digits = self._epoch(now), ""
        while n:
            n, d = divmod(n, VERIFY_BASE)
            digits = _SAFE_CHARS[d] + digits
        return self.local + digits + self.at_domain

    def valid(self, addr: str, now: float) -> str | None:
        """The time-independent sender when addr is one of our probe senders (within
        +/-1 ttl of now), else None."""
        if self.null:
            return None if addr else ""
        local, at_domain = self._folded
        n = len(local)
        if addr[:n].lower() != local:       # the common case: someone else
            return None
        rest = addr[n:]
        cut = rest.find("@")
        stamp, theirs_at = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
        if theirs_at.lower() != at_domain:
            return None
        if self.ttl > 0:
            if not stamp or len(stamp) > 20 or any(c not in _SAFE_VALUE for c in stamp):
                return None
            theirs = 0
            for c in stamp:
                theirs = theirs * VERIFY_BASE + _SAFE_VALUE[c]
            if abs(theirs - self._epoch(now)) > 1:
                return None
        elif stamp:
            return None
        return self.base


def report_probe(cfg, addresses, addr_status: int, text: str) -> tuple[bool, str]:
    """A probe's result for the verify service, as Postfix's verify_append(): each of
    addresses (the address the probe is for, then the recipient when cleanup rewrote
    it) is updated, unless the probe failed and address_verify_negative_cache is no.
    (True, the log status: deliverable, undeliverable, undeliverable-but-not-cached),
    or (False, "") when the service could not be told (warned)."""
    if addr_status != RCPT_OK and cfg is not None and \
            not cfg["address_verify_negative_cache"]:
        return True, "undeliverable-but-not-cached"
    clnt = client(cfg)
    for addr in dict.fromkeys(a for a in addresses if a):
        if not clnt.update(addr, addr_status, text):
            return False, ""
    return True, status_name(addr_status)


_client: VerifyClient | None = None
_client_lock = threading.Lock()


def client(cfg=None) -> VerifyClient:
    """This process's client, on private/$address_verify_service_name (relative to
    queue_directory, every daemon's working directory and a chrooted one's root)."""
    global _client
    with _client_lock:
        if _client is None:
            name = cfg.get("address_verify_service_name") if cfg is not None else \
                DEFAULT_SERVICE
            _client = VerifyClient(f"private/{name}", service=name)
        return _client


def configure(path: str, timeout: float = TIMEOUT,
              service: str = DEFAULT_SERVICE) -> VerifyClient:
    """Replace this process's client (tests; a program outside queue_directory)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = VerifyClient(path, timeout, service)
        return _client
