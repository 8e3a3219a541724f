"""The client side of tlsmgr: seeds and TLS session cache requests for smtpd and smtp.

NAME
    tlsmgr_client - talk to tlsmgr over private/tlsmgr, never holding up mail

SYNOPSIS
    from postfix_py.lib import tlsmgr_client

    tlsmgr_client.configure(cfg=cfg)            # once per worker, after the chroot
    tlsmgr_client.mix_seed()                    # at start: extra entropy for OpenSSL
    session = tlsmgr_client.lookup("smtp", cache_id)
    tlsmgr_client.update("smtp", cache_id, session_bytes)

DESCRIPTION
    This module is postfix-py's tls_mgr.c. A worker keeps one connection to tlsmgr
    (lib/attr.AttrClient: opened on first use, a timeout on every step, one retry on a
    fresh connection, so a restarted tlsmgr is found again). tlsmgr is optional to its
    clients: every function returns a value and never raises into a mail session. When
    tlsmgr is down or slow, a call fails within 2 x timeout, one warning is logged for the
    outage, and for the next `backoff` seconds every call returns at once without trying;
    a TLS handshake is then full instead of resumed, and mail still flows. An info line
    says when tlsmgr answers again.

    The socket path defaults to "private/tlsmgr", relative to queue_directory, which is the
    working directory of every daemon (and the root of a chrooted one), as in Postfix.
    After fork, a child drops its parent's connection and opens its own.

FUNCTIONS
    configure(path=None, cfg=None, timeout=TIMEOUT, backoff=BACKOFF) -> TlsmgrClient
        Replace the process's client; cfg supplies tls_daemon_random_bytes.
    seed(size=None) -> bytes or None
        size (1..1024, default tls_daemon_random_bytes) random bytes from tlsmgr's pool.
    lookup(cache_type, cache_id) -> bytes or None
        The session cached under cache_id in cache smtpd, smtp or lmtp; None when there is
        none, the cache is not configured, or tlsmgr cannot be reached.
    update(cache_type, cache_id, session) -> bool
        True when tlsmgr stored the session.
    delete(cache_type, cache_id) -> bool
        True when the entry is gone (deleted now, or there was none).
    status() -> dict or None
        tlsmgr's status report (see tlsmgr/service.py), as `tlsmgr status --json` prints it.
    history_update(nexthop, record) -> list or None
        Add a TLS outcome (a JSON-able dict, lib/tls_history.py) to the next hop's TLS
        history; the history before it (oldest first), or None.
    history_lookup(nexthop=None) -> dict or None
        {next hop: [records]} for one next hop or all (tlsmgr/history.py).
    mix_seed(size=None) -> bool
        Ask for a seed and add it to OpenSSL's pool (openssl_rand_add); True when done.
    openssl_rand_add(data)
        RAND_add() into the OpenSSL that pyOpenSSL uses. pyOpenSSL's OpenSSL.rand is
        deprecated (and warns on import), so this takes RAND_add from cryptography's
        internal binding: the only internal use here, kept in this one function, with a
        canary test. OpenSSL 3 seeds itself; this is extra entropy. Raises AttributeError
        when the binding no longer offers RAND_add (mix_seed then warns and returns False).
    close()
        Drop the connection (the next call reconnects).
    cache_id may be str (UTF-8) or bytes; session is bytes.

    The same functions exist as methods of TlsmgrClient(path, timeout, backoff, seed_bytes,
    clock=time.monotonic), for callers that want their own connection.

SEE ALSO
    tlsmgr/service.py (the server and its statuses), lib/attr.py; Postfix tls_mgr(3).
"""

from __future__ import annotations

import json
import os
import threading
import time

from postfix_py.lib import attr, msg

DEFAULT_PATH = "private/tlsmgr"
TIMEOUT = 2.0               # seconds per connect, write and read
BACKOFF = 10.0              # seconds without trying after a failure
WARN_INTERVAL = 60.0        # at most one warning per interval about refused requests
DEFAULT_SEED_BYTES = 32     # tls_daemon_random_bytes' default


def openssl_rand_add(data: bytes) -> None:
    """Add data to the OpenSSL pool used by pyOpenSSL (RAND_add, internal binding)."""
    from cryptography.hazmat.bindings.openssl.binding import Binding

    Binding().lib.RAND_add(data, len(data), float(len(data)))


def _as_bytes(value) -> bytes:
    """Return a cache id as bytes (str is UTF-8)."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class TlsmgrClient:
    """A kept connection to tlsmgr whose calls return values and never raise."""

    def __init__(self, path: str = DEFAULT_PATH, timeout: float = TIMEOUT,
                 backoff: float = BACKOFF, seed_bytes: int = DEFAULT_SEED_BYTES,
                 clock=time.monotonic):
        """Remember where tlsmgr listens; connect on the first call."""
        self.path = path
        self.backoff = backoff
        self.seed_bytes = seed_bytes
        self.clock = clock
        self._clnt = attr.AttrClient(path, timeout)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._down_until: float | None = None     # while set and in the future: do not try
        self._outage = False                       # warned about the current outage
        self._refused_warned: float | None = None

    # --- the one place that talks ----------------------------------------------------------
    def _call(self, request: dict) -> tuple[str, dict] | None:
        """Send a request; return (status, reply), or None when tlsmgr is unavailable."""
        with self._lock:
            if self._pid != os.getpid():          # forked: the connection is the parent's
                self._pid = os.getpid()
                self._clnt = attr.AttrClient(self.path, self._clnt.timeout)
            now = self.clock()
            if self._down_until is not None and now < self._down_until:
                return None
            try:
                reply = self._clnt.request(request)
                status = attr.reply_status(reply)
            except Exception as exc:     # whatever it is, mail goes on without tlsmgr
                self._clnt.close()
                self._down_until = self.clock() + self.backoff
                if not self._outage:
                    self._outage = True
                    text = str(exc) if isinstance(exc, attr.AttrClientError) else \
                        f"problem talking to server {self.path}: {exc}"   # names the server once
                    msg.warn(f"{text} -- continuing without it, next try in {self.backoff:g}s")
                return None
            self._down_until = None
            if self._outage:
                self._outage = False
                msg.info(f"server {self.path} answers again")
            return status, reply

    def _refused(self, request: dict, reply: dict) -> None:
        """Log tlsmgr's refusal of a request (status 2 or 3), at most once a WARN_INTERVAL."""
        now = self.clock()
        if self._refused_warned is None or now - self._refused_warned >= WARN_INTERVAL:
            self._refused_warned = now
            reason = reply.get("reason", b"").decode("utf-8", "replace")
            msg.warn(f"tlsmgr refused {request['request']} request: status"
                     f" {reply.get('status', b'?').decode('ascii', 'replace')}: {reason}")

    # --- requests --------------------------------------------------------------------------
    def seed(self, size: int | None = None) -> bytes | None:
        """Return size random bytes from tlsmgr, or None."""
        size = self.seed_bytes if size is None else size
        request = {"request": attr.REQ_SEED, "size": size}
        result = self._call(request)
        if result is None:
            return None
        status, reply = result
        data = reply.get("seed")
        if status == attr.STATUS_OK and data is not None and len(data) == size:
            return data
        self._refused(request, reply)
        return None

    def lookup(self, cache_type: str, cache_id) -> bytes | None:
        """Return the cached session, or None."""
        request = {"request": attr.REQ_LOOKUP, "cache_type": cache_type, "cache_id": _as_bytes(cache_id)}
        result = self._call(request)
        if result is None:
            return None
        status, reply = result
        if status == attr.STATUS_OK and "session" in reply:
            return reply["session"]
        if status != attr.STATUS_NOTFOUND:
            self._refused(request, reply)
        return None

    def update(self, cache_type: str, cache_id, session: bytes) -> bool:
        """Store a session; True when tlsmgr stored it."""
        request = {"request": attr.REQ_UPDATE, "cache_type": cache_type,
                   "cache_id": _as_bytes(cache_id), "session": bytes(session)}
        result = self._call(request)
        if result is None:
            return False
        status, reply = result
        if status in (attr.STATUS_BAD, attr.STATUS_ERROR):
            self._refused(request, reply)
        return status == attr.STATUS_OK

    def delete(self, cache_type: str, cache_id) -> bool:
        """Remove a session; True when it is gone."""
        request = {"request": attr.REQ_DELETE, "cache_type": cache_type, "cache_id": _as_bytes(cache_id)}
        result = self._call(request)
        if result is None:
            return False
        status, reply = result
        if status in (attr.STATUS_BAD, attr.STATUS_ERROR):
            self._refused(request, reply)
            return False
        return True

    def status(self) -> dict | None:
        """Return tlsmgr's status report, or None."""
        request = {"request": attr.REQ_STATUS}
        result = self._call(request)
        if result is None:
            return None
        status, reply = result
        if status == attr.STATUS_OK and "status_json" in reply:
            try:
                report = json.loads(reply["status_json"])
            except ValueError:
                report = None
            if isinstance(report, dict):
                return report
        self._refused(request, reply)
        return None

    def history_update(self, nexthop: str, record: dict) -> list | None:
        """Add a TLS outcome to nexthop's history; the history before it, or None."""
        request = {"request": attr.REQ_HISTORY_UPDATE, "nexthop": _as_bytes(nexthop),
                   "record": json.dumps(record, separators=(",", ":")).encode()}
        value = self._history_call(request)
        return value if isinstance(value, list) else None

    def history_lookup(self, nexthop: str | None = None) -> dict | None:
        """{next hop: [records]} for nexthop or for all; None when there is no history
        or tlsmgr cannot be reached."""
        request = {"request": attr.REQ_HISTORY_LOOKUP}
        if nexthop is not None:
            request["nexthop"] = _as_bytes(nexthop)
        value = self._history_call(request)
        return value if isinstance(value, dict) else None

    def _history_call(self, request: dict):
        result = self._call(request)
        if result is None:
            return None
        status, reply = result
        if status == attr.STATUS_OK and "history_json" in reply:
            try:
                return json.loads(reply["history_json"])
            except ValueError:
                return None
        if status != attr.STATUS_NOTFOUND:
            self._refused(request, reply)
        return None

    def mix_seed(self, size: int | None = None) -> bool:
        """Add a seed from tlsmgr to OpenSSL's pool; True when done."""
        data = self.seed(size)
        if data is None:
            return False
        try:
            openssl_rand_add(data)
        except Exception as exc:     # a dependency upgrade removed RAND_add: go on without
            msg.warn(f"cannot add tlsmgr seed to the OpenSSL pool: {exc}")
            return False
        return True

    def close(self) -> None:
        """Drop the connection; the next call reconnects."""
        self._clnt.close()


# --- the process's client ----------------------------------------------------------------

_client: TlsmgrClient | None = None
_client_lock = threading.Lock()


def configure(path: str | None = None, cfg=None, timeout: float = TIMEOUT,
              backoff: float = BACKOFF) -> TlsmgrClient:
    """Set up this process's client (closing any previous one) and return it."""
    global _client
    seed_bytes = DEFAULT_SEED_BYTES
    if cfg is not None:
        try:
            seed_bytes = cfg["tls_daemon_random_bytes"]
        except Exception as exc:     # a bad value was reported by the program's own check
            msg.warn(f"tls_daemon_random_bytes: {exc}; using {DEFAULT_SEED_BYTES}")
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = TlsmgrClient(path or DEFAULT_PATH, timeout, backoff, seed_bytes)
        return _client


def client() -> TlsmgrClient:
    """Return this process's client, made with the defaults when not configured."""
    with _client_lock:
        current = _client
    return current if current is not None else configure()


def seed(size: int | None = None) -> bytes | None:
    """Return random bytes from tlsmgr, or None."""
    return client().seed(size)


def lookup(cache_type: str, cache_id) -> bytes | None:
    """Return a cached session, or None."""
    return client().lookup(cache_type, cache_id)


def update(cache_type: str, cache_id, session: bytes) -> bool:
    """Store a session; True when stored."""
    return client().update(cache_type, cache_id, session)


def delete(cache_type: str, cache_id) -> bool:
    """Remove a session; True when it is gone."""
    return client().delete(cache_type, cache_id)


def status() -> dict | None:
    """Return tlsmgr's status report, or None."""
    return client().status()


def history_update(nexthop: str, record: dict) -> list | None:
    """Add a TLS outcome to nexthop's history (tlsmgr/history.py); the one before."""
    return client().history_update(nexthop, record)


def history_lookup(nexthop: str | None = None) -> dict | None:
    """The TLS history of nexthop, or of every next hop; None without one."""
    return client().history_lookup(nexthop)


def mix_seed(size: int | None = None) -> bool:
    """Add a tlsmgr seed to OpenSSL's pool; True when done."""
    return client().mix_seed(size)


def close() -> None:
    """Drop this process's connection to tlsmgr."""
    with _client_lock:
        if _client is not None:
            _client.close()
