"""The client side of anvil: connection and event counts for smtpd's client limits.

NAME
    anvil_client - talk to anvil over private/anvil, never holding up mail

SYNOPSIS
    from postfix_py.lib import anvil_client

    clnt = anvil_client.client()                # this process's client, made on first use
    counts = clnt.connect("smtp", "192.0.2.1")  # (count, rate) or None
    rate = clnt.message("smtp", "192.0.2.1")    # int or None
    clnt.disconnect("smtp", "192.0.2.1")

DESCRIPTION
    This module is postfix-py's anvil_clnt.c. A process keeps one connection to anvil
    (lib/attr.AttrClient: opened on first use, a timeout on every step, one retry on a
    fresh connection), and anvil ties the connection it registers to that connection, so
    a worker that dies takes its registered client connection with it.

    anvil is optional to its clients, as in Postfix: every function returns None instead
    of a number when anvil cannot be reached (not running, or not in master.cf), and
    never raises into a mail session; smtpd then applies no limit. The first failure of
    a process is logged once, as Postfix's auto_clnt words it (`connect to private/anvil:
    No such file or directory`); after a failure, calls return None at once for `backoff`
    seconds, so that a hung anvil costs a session at most 2 x timeout.

    The socket path "private/anvil" is relative to queue_directory, the working directory
    of every daemon (and the root of a chrooted one). After fork a child drops its
    parent's connection and opens its own.

FUNCTIONS
    ident(service, addr) -> str
        The (service, client) name anvil counts under: `service:addr`, as Postfix's
        ANVIL_IDENT (bytes outside printable ASCII become `?`).
    AnvilClient(path=DEFAULT_PATH, timeout=TIMEOUT, backoff=BACKOFF, clock=time.monotonic)
        connect(service, addr) -> (count, rate) or None
        disconnect(service, addr) -> bool        True when anvil answered
        message(service, addr) -> rate or None     a MAIL FROM request
        recipient(service, addr) -> rate or None   a RCPT TO request
        newtls(service, addr) -> rate or None      a new (not resumed) TLS session
        newtls_status(service, addr) -> rate or None   the same rate, not counting
        auth(service, addr) -> rate or None        an AUTH command
        lookup(service, addr) -> dict or None      count, rate, mail, rcpt, newtls, auth
        close()                                    drop the connection
    client() -> AnvilClient
        This process's client (made with the defaults on first use).
    configure(path=None, timeout=TIMEOUT, backoff=BACKOFF) -> AnvilClient
        Replace this process's client (tests; a daemon that wants another socket).

SEE ALSO
    anvil/service.py (the server and its replies), smtpd/limits.py (the limits),
    lib/attr.py; Postfix anvil_clnt(3).
"""

from __future__ import annotations

import os
import threading
import time

from postfix_py.lib import attr, msg

DEFAULT_PATH = "private/anvil"
TIMEOUT = 2.0               # seconds per connect, write and read
BACKOFF = 10.0              # seconds without trying after a failure

_FIELDS = ("count", "rate", "mail", "rcpt", "newtls", "auth")


def ident(service: str, addr: str) -> str:
    """Return anvil's name for a (service, client) pair: service:addr, printable."""
    text = f"{service}:{addr}"
    return "".join(c if "!" <= c <= "~" else "?" for c in text)


def _int(reply: dict, name: str) -> int | None:
    """Return a decimal attribute of a reply, or None when absent or malformed."""
    raw = reply.get(name)
    if raw is None or not raw.isdigit() or len(raw) > 10:
        return None
    return int(raw)


class AnvilClient:
    """A kept connection to anvil whose calls return values (or None) and never raise."""

    def __init__(self, path: str = DEFAULT_PATH, timeout: float = TIMEOUT,
                 backoff: float = BACKOFF, clock=time.monotonic):
        """Remember where anvil listens; connect on the first call."""
        self.path = path
        self.backoff = backoff
        self.clock = clock
        self._clnt = attr.AttrClient(path, timeout)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._down_until: float | None = None
        self._warned = False        # one warning per process, as Postfix's smtpd
        self._refused_warned = False

    def _call(self, request: str, service: str, addr: str) -> dict | None:
        """Send one request; return the reply when its status is 0, else None."""
        with self._lock:
            if self._pid != os.getpid():      # forked: the connection is the parent's
                self._pid = os.getpid()
                self._clnt = attr.AttrClient(self.path, self._clnt.timeout)
            if self._down_until is not None and self.clock() < self._down_until:
                return None
            try:
                reply = self._clnt.request({"request": request, "ident": ident(service, addr)})
                status = attr.reply_status(reply)
            except Exception as exc:     # whatever it is, mail goes on without anvil
                self._clnt.close()
                self._down_until = self.clock() + self.backoff
                if not self._warned:
                    self._warned = True
                    msg.warn(self._problem(exc))
                return None
            self._down_until = None
        if status != attr.STATUS_OK:
            if not self._refused_warned:
                self._refused_warned = True
                reason = reply.get("reason", b"").decode("utf-8", "replace")
                msg.warn(f"anvil refused {request} request: status {status}: {reason}")
            return None
        return reply

    def _problem(self, exc: Exception) -> str:
        """The warning for a failed request, in Postfix's words where it has them."""
        cause = exc.__cause__ if isinstance(exc, attr.AttrClientError) else exc
        if isinstance(cause, (FileNotFoundError, ConnectionRefusedError, PermissionError)):
            return f"connect to {self.path}: {cause.strerror}"
        if isinstance(exc, attr.AttrClientError):
            return str(exc)
        return f"problem talking to server {self.path}: {exc}"

    def _rate(self, request: str, service: str, addr: str) -> int | None:
        reply = self._call(request, service, addr)
        return None if reply is None else _int(reply, "rate")

    # --- requests --------------------------------------------------------------------
    def connect(self, service: str, addr: str) -> tuple[int, int] | None:
        """Register a connection; return (count, rate), or None."""
        reply = self._call("connect", service, addr)
        if reply is None:
            return None
        count, rate = _int(reply, "count"), _int(reply, "rate")
        return None if count is None or rate is None else (count, rate)

    def disconnect(self, service: str, addr: str) -> bool:
        """Register the end of the connection; True when anvil answered."""
        return self._call("disconnect", service, addr) is not None

    def message(self, service: str, addr: str) -> int | None:
        """Register a message delivery request; return the message rate, or None."""
        return self._rate("message", service, addr)

    def recipient(self, service: str, addr: str) -> int | None:
        """Register a recipient; return the recipient rate, or None."""
        return self._rate("recipient", service, addr)

    def newtls(self, service: str, addr: str) -> int | None:
        """Register a new TLS session; return the new TLS session rate, or None."""
        return self._rate("newtls", service, addr)

    def newtls_status(self, service: str, addr: str) -> int | None:
        """Return the new TLS session rate without counting, or None."""
        return self._rate("newtls_status", service, addr)

    def auth(self, service: str, addr: str) -> int | None:
        """Register an AUTH command; return the AUTH rate, or None."""
        return self._rate("auth", service, addr)

    def lookup(self, service: str, addr: str) -> dict | None:
        """Return every counter of the pair, or None."""
        reply = self._call("lookup", service, addr)
        if reply is None:
            return None
        values = {name: _int(reply, name) for name in _FIELDS}
        return None if None in values.values() else values

    def close(self) -> None:
        """Drop the connection; the next call reconnects."""
        self._clnt.close()


_client: AnvilClient | None = None
_client_lock = threading.Lock()


def configure(path: str | None = None, timeout: float = TIMEOUT,
              backoff: float = BACKOFF) -> AnvilClient:
    """Set up this process's client (closing any previous one) and return it."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = AnvilClient(path or DEFAULT_PATH, timeout, backoff)
        return _client


def client() -> AnvilClient:
    """Return this process's client, made with the defaults when not configured."""
    with _client_lock:
        current = _client
    return current if current is not None else configure()
