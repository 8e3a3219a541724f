"""conncache - the smtp/lmtp client's connection cache, kept in the delivery process.

NAME
    conncache - several messages to one destination over one (TLS) connection

DESCRIPTION
    After a delivery, a connection that is still in a known state may be kept open
    instead of ended with QUIT; the next delivery request to the same server, under the
    same TLS policy, checks it with an RSET probe and sends its MAIL FROM there, without
    a new TCP connection, greeting, EHLO or TLS handshake. The delivery log line then
    says how many times the connection has been used, as Postfix's:

        4C1A21F3E8B: to=<bob@example.com>, relay=mx.example.com[192.0.2.1]:25,
            conn_use=2, delay=0.05, delays=0/0/0/0.05, dsn=2.0.0, status=sent (250 Ok)

    When (Postfix's smtp_connect.c and qmgr_entry.c rules):
    * a connection is cached when its next hop is listed in
      smtp_connection_cache_destinations, or, with smtp_connection_cache_on_demand, when
      the queue manager says so: it marks a request "conn_store" once deliveries to its
      destination come back to back (one starting within a second of the last one's
      end), and "conn_load" (use what is cached) from then on (qmgr/manager.py);
    * a TLS connection only with smtp_tls_connection_reuse = yes, or the policy table's
      connection_reuse=yes for the destination (connection_reuse=no forbids it);
    * a connection is used again only for the same next hop, server address and port,
      TLS policy and SASL credentials (the key), for at most
      smtp_connection_reuse_time_limit after it was made and
      smtp_connection_reuse_count_limit uses (0: no limit);
    * an unused connection is ended (QUIT, whose reply is awaited at most 2s) after
      smtp_connection_cache_time_limit, when the worker retires, and when it stops;
    * the RSET probe has smtp_rset_timeout; a connection that fails it is dropped
      without a word, and the delivery makes a new one.

DESIGN
    Postfix keeps idle connections in the scache(8) service, which any smtp process can
    take them from (a socket passed over a UNIX-domain socket), and since Postfix 3.4
    TLS connections through tlsproxy(8), which holds the TLS state. postfix-py has no
    tlsproxy: a TLS connection's state lives in pyOpenSSL objects inside the process
    that made it and cannot be handed over. So the cache lives in the delivery process
    (the worker that made the connection keeps it), which suits postfix-py's agents:
    they are long-lived workers (max_idle, max_use) that the queue manager feeds one
    request at a time over private/smtp. Which idle worker accepts the next request is
    the kernel's choice; to make it the one that holds the connection, a worker with
    nothing cached waits a few milliseconds before it accepts while a sibling has
    connections cached (lib/server.py single_server's idle hook; the siblings see each
    other on a Board, a page of shared memory that smtp's prepare() maps in the master
    before the fork: a slot per worker, by pid, with the time until which it holds
    connections), so a worker with cached connections takes a new request first, and
    a single stream of back-to-back deliveries to one destination stays on
    one connection. Concurrent deliveries to one destination use one connection each,
    as in Postfix. What this does not do: share a connection between agent processes
    (a plain connection could be passed as a descriptor, as Postfix's scache does; a
    TLS one could not), or between the smtp and relay transports.

CONFIGURATION PARAMETERS
    smtp_connection_cache_on_demand (yes), smtp_connection_cache_destinations (empty:
    names compared without case and without brackets with the next hop's host),
    smtp_connection_cache_time_limit (2s), smtp_connection_reuse_time_limit (300s),
    smtp_connection_reuse_count_limit (0), smtp_rset_timeout (20s),
    smtp_tls_connection_reuse (no); the lmtp_ versions for lmtp.

SEE ALSO
    smtp/service.py, smtp/session.py (ClientSession.rset_probe, reuse), qmgr/manager.py
    (_conn_cache_flags), lib/server.py; Postfix smtp_reuse.c, smtp_connect.c, scache(8).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from ..lib import msg

# A worker with nothing cached lets one that has connections accept first.
ACCEPT_DELAY = 0.005
QUIT_TIMEOUT = 2.0      # an idle connection's QUIT must not hold up the next request
BOARD_SLOTS = 256


class Board:
    """Which workers of a service hold cached connections: shared memory mapped before
    the fork, one slot per worker (pid modulo the slots; a collision only costs a
    needless or missing accept delay), each the time.monotonic() until which its
    connections stay cached (0: none)."""

    def __init__(self):
        self.mem = mmap.mmap(-1, BOARD_SLOTS * 8)
        self.slot = 0

    def attach(self) -> None:
        """In the worker: take the slot of this process."""
        self.slot = os.getpid() % BOARD_SLOTS

    def publish(self, until: float) -> None:
        struct.pack_into("d", self.mem, self.slot * 8, until)

    def others_hold(self, now: float) -> bool:
        """Whether another worker holds connections now."""
        values = struct.unpack_from(f"{BOARD_SLOTS}d", self.mem)
        return any(v > now for i, v in enumerate(values) if i != self.slot)


@dataclass
class Entry:
    """One idle cached connection."""

    session: object             # smtp/session.py ClientSession
    made: float                 # time.monotonic() of the connect
    uses: int                   # deliveries made over it so far
    idle_since: float


class ConnectionCache:
    """The idle connections of this delivery process, by key."""

    def __init__(self, cfg, prefix: str = "smtp", board: Board | None = None):
        self.board = board
        if board is not None:
            board.attach()

        def p(name):
            return cfg[f"{prefix}_{name}"]
        self.on_demand = p("connection_cache_on_demand")
        self.destinations = {d.strip("[]").lower() for d in p("connection_cache_destinations")}
        self.cache_time = p("connection_cache_time_limit")
        self.reuse_time = p("connection_reuse_time_limit")
        self.reuse_count = p("connection_reuse_count_limit")
        self.tls_reuse = p("tls_connection_reuse")
        self.rset_timeout = p("rset_timeout")
        self.entries: dict[tuple, Entry] = {}

    # --- policy ------------------------------------------------------------------------
    def policy(self, flags, host: str) -> tuple[bool, bool]:
        """(load, store) for a request with these flags to next-hop host."""
        if host.lower() in self.destinations:
            return True, True
        if self.on_demand:
            return "conn_load" in flags, "conn_store" in flags
        return False, False

    def may_store_tls(self, policy) -> bool:
        """Whether a TLS connection under policy may be cached."""
        if policy.connection_reuse is not None:
            return policy.connection_reuse
        return self.tls_reuse

    @staticmethod
    def key(dest_text: str, addr, policy, sasl_user: str = "") -> tuple:
        """What must be the same for a connection to serve another delivery."""
        return (dest_text.lower(), addr.namaddrport, repr(policy), sasl_user)

    def expired(self, made: float, uses: int, now: float | None = None) -> bool:
        """Past smtp_connection_reuse_time_limit or _count_limit."""
        now = time.monotonic() if now is None else now
        if now - made >= self.reuse_time:
            return True
        return self.reuse_count > 0 and uses >= self.reuse_count

    # --- the cache ---------------------------------------------------------------------
    def take(self, key: tuple) -> Entry | None:
        """The idle connection under key, taken out of the cache, or None."""
        entry = self.entries.pop(key, None)
        self._publish()
        if entry is not None and self.expired(entry.made, entry.uses):
            self._end(entry)
            return None
        return entry

    def store(self, key: tuple, session, made: float, uses: int) -> None:
        """Keep session for the next delivery (one connection per key)."""
        old = self.entries.pop(key, None)
        if old is not None:
            self._end(old)
        self.entries[key] = Entry(session, made, uses, time.monotonic())
        self._publish()

    def _publish(self) -> None:
        if self.board is not None:
            self.board.publish(max((e.idle_since + self.cache_time
                                    for e in self.entries.values()), default=0.0))

    def due(self) -> float | None:
        """Seconds until the next idle connection is to end; None with nothing cached."""
        if not self.entries:
            return None
        oldest = min(e.idle_since for e in self.entries.values())
        return max(0.0, oldest + self.cache_time - time.monotonic())

    def expire(self) -> None:
        """End the connections unused for smtp_connection_cache_time_limit."""
        now = time.monotonic()
        for key, entry in list(self.entries.items()):
            if now - entry.idle_since >= self.cache_time:
                del self.entries[key]
                self._end(entry)
        self._publish()

    def accept_delay(self) -> float:
        """lib/server.py: a worker with connections to offer accepts first."""
        if self.entries or self.board is None:
            return 0.0
        return ACCEPT_DELAY if self.board.others_hold(time.monotonic()) else 0.0

    def close_all(self, ctx=None) -> None:
        """End every cached connection (the worker is leaving)."""
        entries, self.entries = list(self.entries.values()), {}
        self._publish()
        for entry in entries:
            self._end(entry)

    @staticmethod
    def _end(entry: Entry) -> None:
        sess = entry.session
        try:
            sess.quit(QUIT_TIMEOUT)
            sess.close()
        except Exception as exc:    # noqa: BLE001 - a dying connection must not kill us
            msg.verbose(1, f"closing cached connection to {sess.relay}: {exc}")
