"""tlsmgr - TLS session cache and PRNG manager.

SYNOPSIS
    tlsmgr [generic Postfix daemon options]        (run by the master, from master.cf)
    python -m postfix_py.tlsmgr.service [-v] [-c config_dir] [--socket path]   (standalone)

DESCRIPTION
    The tlsmgr server maintains the pseudo-random number generator (PRNG) that seeds the
    TLS engines of smtpd and smtp, and the TLS session caches; it is postfix-py's
    counterpart of Postfix's tlsmgr(8). One process serves many long-lived client
    connections on private/tlsmgr from a single event loop: reads and writes are
    non-blocking and bounded per client, so a slow or hostile client never stalls the
    others. Every request gets a reply with a status (DESIGN.md, "tlsmgr protocol"):

    request=seed [size=N]
        N pseudo-random bytes (ASCII decimal 1..1024; default tls_daemon_random_bytes),
        in attribute `seed`.
    request=lookup cache_type=smtpd|smtp|lmtp cache_id=ID
        the session stored under ID, in attribute `session`; status 1 when there is none
        or it has expired.
    request=update cache_type=... cache_id=ID session=BYTES
        store a session (1..65536 bytes; ID is 1..511 bytes).
    request=delete cache_type=... cache_id=ID
        remove a session; status 1 when there was none.
    request=status
        counters and times as JSON text in `status_json` (what `tlsmgr status` prints).
    request=history_update nexthop=N record=JSON, request=history_lookup [nexthop=N]
        the smtp client's TLS history per next hop (history.py; postfix-py extension,
        with smtp_tls_history_database): the reply's `history_json` is N's history
        before the update, or the history of N or of every next hop.

    Status 0 is success, 1 not found, 2 bad request, 3 server error; `reason` explains
    every status other than 0. A request with a missing, repeated or unknown attribute gets
    status 2. A frame that cannot be parsed but keeps the stream in step (bad body) gets
    status 2; a bad length prefix gets status 2 and the connection is closed, since the
    stream can no longer be read. A cache type whose database parameter is empty (or whose
    cache could not be opened, or has a timeout of 0) answers every lookup, update and
    delete with status 1 and a reason: there is nothing to find and nothing to fix in the
    client, which carries on without the cache.

    Each client has at most one incomplete frame buffered (the frame limit, 1 MiB) and at
    most OUTPUT_HIGH bytes of replies queued: past that, tlsmgr stops reading from the
    client until the client reads its replies. A client that leaves replies unread, or a
    frame unfinished, for ipc_timeout seconds is disconnected with a warning.

    Server-side resumption uses session tickets shared by all smtpd workers (DESIGN.md);
    pyOpenSSL's bindings have no external session cache callbacks, so there is no
    resumption by session id: a client without ticket support is never resumed. The smtpd
    cache is accepted and works as a cache, but smtpd does not use it; the status report
    and `postfix-py check` say so.

PRNG AND CACHES
    See prng.py (HMAC_DRBG, entropy sources, exchange file) and scache.py (LMDB caches:
    emptied at every start, as Postfix's tlsmgr opens them with O_TRUNC; expiry by
    timestamp; a periodic sweep in bounded batches; full map and damage handling).

SECURITY
    tlsmgr talks only to local clients over private/tlsmgr and to the entropy source. Under
    the master it runs chrooted in queue_directory as mail_owner. Everything outside the
    jail is opened before the chroot, in pre_init: the entropy source (as root), the
    exchange file's directory and the LMDB environments (with mail_owner's effective
    uid and gid, so the files belong to mail_owner). A cache database or exchange file in a
    directory not owned by mail_owner is redirected to data_directory, with a warning.
    Client input is never logged beyond one warning per connection, and session and seed
    bytes never appear in logs.

CONFIGURATION PARAMETERS
    tls_daemon_random_bytes (32)       default size of a seed request
    tls_random_source (dev:/dev/urandom)  entropy source: dev:/path, egd:/path or a file
    tls_random_bytes (32)              bytes read from the source at each seeding
    tls_random_reseed_period (3600s)   longest time between reseeds (random, from the pool)
    tls_random_exchange_name (${data_directory}/prng_exch)  the PRNG exchange file
    tls_random_prng_update_period (3600s)  interval of exchange file updates
    smtpd_tls_session_cache_database (empty), smtpd_tls_session_cache_timeout (3600s)
    smtp_tls_session_cache_database (empty), smtp_tls_session_cache_timeout (3600s)
    lmtp_tls_session_cache_database (empty), lmtp_tls_session_cache_timeout (3600s)
                                       caches (lmdb:, btree: and hash: are all LMDB;
                                       memcache: and redis: a store that several hosts
                                       share, scache.StoreSessionCache) and entry
                                       lifetimes (0 disables a cache)
    smtp_tls_history_database (empty), smtp_tls_history_size (10)
                                       the TLS history per next hop (history.py), kept
                                       across restarts
    lmdb_map_size (16777216)           initial map size of each cache
    ipc_timeout (3600s)                how long a client may leave replies unread
    data_directory (/var/lib/postfix-py), mail_owner (postfix), queue_directory
    syslog_name, syslog_facility, maillog_file   where log lines go

FILES
    $queue_directory/private/tlsmgr    the service socket
    $tls_random_exchange_name          the PRNG exchange file (outside the jail)
    <cache path>.lmdb                  the session caches (no lock file: only tlsmgr opens them)

SEE ALSO
    prng.py, scache.py, lib/tlsmgr_client.py (the client side), cli.py (`tlsmgr status`),
    lib/attr.py (framing), lib/frame_server.py (the request loop); Postfix tlsmgr(8),
    TLS_README.

HOOKS
    Tlsmgr(cfg, clock=time.monotonic, wallclock=time.time) has the multi-client skeleton's
    hooks: pre_init(), post_init(loop), on_client(conn, loop), client_count(), on_exit().
    main(ctx) runs it under the master through lib/server.multi_server; standalone()
    runs it on its own socket, without chroot, until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import pwd
import signal
import socket
import sys
import time

from postfix_py.lib import attr, frame_server, maincf, msg, server, tables
from postfix_py.lib.events import EventLoop
from postfix_py.tlsmgr import history as tls_history
from postfix_py.tlsmgr import prng, scache

CACHE_TYPES = ("smtpd", "smtp", "lmtp")
MAX_SEED = 1024
MAX_SESSION = 65536
SWEEP_STEP_DELAY = 0.001    # between sweep batches, so clients are served in between
MAX_SWEEP_PERIOD = 3600.0   # a cache is swept at least this often
ACCEPT_BATCH = 64           # connections accepted per readiness event
ACCEPT_PAUSE = 1.0          # seconds without accepting after accept() fails (e.g. EMFILE)

SERVER_RESUMPTION_TICKETS = (
    "session tickets shared by all smtpd workers of a configuration generation"
    " (lifetime smtpd_tls_session_cache_timeout = {lifetime}s); no session-id resumption:"
    " clients without ticket support are not resumed, and the smtpd cache, if"
    " configured, is kept but smtpd does not use it")
SERVER_RESUMPTION_OFF = "off (smtpd_tls_session_cache_timeout = 0)"


# --- reply frames: encoded by lib/attr; the fixed ones once, at import ---------------------

_OK = attr.encode({"status": attr.STATUS_OK})
_NOT_FOUND = attr.encode({"status": attr.STATUS_NOTFOUND, "reason": "not found"})


def _reply(status: str, reason: str, **attrs: bytes) -> bytes:
    """Return a reply frame with status, reason and further attributes."""
    return attr.encode({"status": status,
                        "reason": reason.encode("utf-8", "backslashreplace"), **attrs})


def _show(value: bytes, limit: int = 40) -> str:
    """Return peer-supplied bytes as short, printable text for replies and logs."""
    return msg.printable(value, limit) + ("..." if len(value) > limit else "")


class Tlsmgr(frame_server.FrameServer):
    """The tlsmgr service, shaped for the multi-client skeleton's hooks."""

    RECV_SIZE = 65536           # bytes read from a client per readiness event
    OUTPUT_HIGH = 256 * 1024    # stop reading from a client with this much unsent
    OUTPUT_LOW = 64 * 1024      # ... and start again below this

    def __init__(self, cfg, clock=time.monotonic, wallclock=time.time):
        """Read the parameters; ConfigError (from cfg) when one is unusable."""
        super().__init__(cfg["ipc_timeout"], clock)
        self.cfg = cfg
        self.wallclock = wallclock
        self.seed_default = cfg["tls_daemon_random_bytes"]
        self.random_source = cfg["tls_random_source"]
        self.random_bytes = cfg["tls_random_bytes"]
        self.reseed_period = cfg["tls_random_reseed_period"]
        self.exchange_name = cfg["tls_random_exchange_name"]
        self.update_period = cfg["tls_random_prng_update_period"]
        self.map_size = cfg["lmdb_map_size"]
        self.data_directory = cfg["data_directory"]
        self.mail_owner = cfg["mail_owner"]
        self.ticket_lifetime = cfg["smtpd_tls_session_cache_timeout"]
        self.cache_params = {t: (cfg[f"{t}_tls_session_cache_database"],
                                 cfg[f"{t}_tls_session_cache_timeout"]) for t in CACHE_TYPES}
        self.owner_uid = None
        self.pool: prng.Pool | None = None
        self.exchange: prng.ExchangeFile | None = None
        self.caches: dict[str, scache.SessionCache | None] = dict.fromkeys(CACHE_TYPES)
        self.started = self.clock()
        self.started_wall = self.wallclock()
        self._by_type: dict[bytes, scache.SessionCache | None] = {}
        self._no_cache: dict[bytes, bytes] = {}
        self._handlers = {
            b"seed": self._seed,
            b"lookup": self._lookup,
            b"update": self._update,
            b"delete": self._delete,
            b"status": self._status,
            b"history_update": self._history_update,
            b"history_lookup": self._history_lookup,
        }
        # The smtp client's TLS history (tlsmgr/history.py): smtp's parameters, which
        # lmtp shares (one file, next hops as keys).
        self.history_spec = cfg.get("smtp_tls_history_database").strip()
        self.history_size = cfg["smtp_tls_history_size"]
        self.history: tls_history.History | None = None

    # --- hooks ---------------------------------------------------------------------------
    def pre_init(self) -> None:
        """Open, before the chroot: entropy source, exchange file, caches; seed the pool."""
        self.owner_uid = self._owner()[0]
        self.pool = prng.Pool(prng.open_source(self.random_source), self.random_bytes,
                              self.reseed_period, clock=self.clock, wallclock=self.wallclock)
        exchange = b""
        if self.exchange_name:
            path = prng.redirect_path(self.exchange_name, self.mail_owner, self.owner_uid,
                                      self.data_directory, "file")
            with server.as_mail_owner(self.cfg):
                try:
                    self.exchange = prng.ExchangeFile(path, wallclock=self.wallclock)
                except OSError as exc:
                    msg.warn(f"cannot open the directory of PRNG exchange file {path}:"
                             f" {exc.strerror or exc}")
                else:
                    try:
                        exchange = self.exchange.read()
                    except OSError as exc:     # still written later, which may repair it
                        msg.warn(f"cannot read PRNG exchange file {path}: {exc.strerror or exc}")
        self.pool.start(exchange)
        self._open_caches()
        self._open_history()

    def _open_history(self) -> None:
        """Open the TLS history (kept across restarts, unlike the caches)."""
        if not self.history_spec:
            return
        try:
            path = tls_history.file_path(self.history_spec)
        except ValueError as exc:
            msg.warn(f"smtp_tls_history_database: {exc} -- history disabled")
            return
        path = prng.redirect_path(path, self.mail_owner, self.owner_uid,
                                  self.data_directory, "table", self.history_spec)
        history = tls_history.History(self.history_spec, path, self.history_size,
                                      self.map_size)
        with server.as_mail_owner(self.cfg):
            if history.open():
                self.history = history

    def post_init(self, loop) -> None:
        """Arm the timers, after chroot and privilege drop: reseed, exchange, sweep, reaper."""
        self.loop = loop
        self.started = self.clock()
        self.pool.arm(loop)
        self._update_exchange()         # a crash must not hand the same bytes to the next start
        for cache in self._unique_caches():
            self._timers["sweep " + cache.file] = loop.call_later(
                self._sweep_period(cache), functools.partial(self._sweep, cache))
        self.arm_reaper(loop)

    def on_exit(self) -> None:
        """Write the exchange file, close the caches, the source and every client."""
        self.cancel_timers()
        if self.loop is not None and self.pool is not None:
            self.pool.disarm(self.loop)
        self.close_clients()
        if self.pool is not None and self.pool.drbg is not None:
            self._write_exchange()
        if self.exchange is not None:
            self.exchange.close()
            self.exchange = None
        for cache in self._unique_caches():
            cache.close()
        if self.history is not None:
            self.history.close()
        if self.pool is not None:
            self.pool.close()

    # --- privileged opening --------------------------------------------------------------
    def _owner(self) -> tuple[int, int]:
        """Return mail_owner's uid and gid (the current user's when not root)."""
        try:
            pw = pwd.getpwnam(self.mail_owner)
        except KeyError:
            if os.geteuid() == 0:
                msg.fatal(f"unknown mail_owner: {self.mail_owner}")
            return os.geteuid(), os.getegid()
        return pw.pw_uid, pw.pw_gid

    def _open_caches(self) -> None:
        """Open one LMDB environment per distinct cache database (shared when equal)."""
        by_file: dict[str, scache.SessionCache] = {}
        for kind in CACHE_TYPES:
            spec, timeout = self.cache_params[kind]
            param = f"{kind}_tls_session_cache_database"
            cache = None
            if spec and timeout > 0 and spec.partition(":")[0] in scache.STORE_TYPES:
                cache = self._store_cache(kind, spec, timeout)     # memcache:, redis:
            elif spec and timeout > 0:
                try:
                    _, path = scache.parse_database(spec)
                except scache.CacheError as exc:
                    msg.warn(f"{param}: {exc} -- cache disabled")
                else:
                    path = prng.redirect_path(path, self.mail_owner, self.owner_uid,
                                              self.data_directory, "table", spec)
                    cache = by_file.get(os.path.abspath(path) + scache.SUFFIX)
                    if cache is not None:
                        cache.name += "," + kind      # smtp and lmtp may share a file
                    else:
                        cache = scache.SessionCache(kind, spec, path, timeout, self.map_size,
                                                    clock=self.wallclock)
                        with server.as_mail_owner(self.cfg):
                            cache.open()
                        by_file[os.path.abspath(cache.file)] = cache
            self.caches[kind] = cache
            key = kind.encode()
            self._by_type[key] = cache
            if cache is None:
                why = (f"{param} is empty" if not spec else
                       f"{kind}_tls_session_cache_timeout is 0" if timeout <= 0 else
                       f"{param} is unusable, see tlsmgr's log")
                self._no_cache[key] = _reply(attr.STATUS_NOTFOUND, f"no {kind} session cache ({why})")
            else:
                self._no_cache[key] = _reply(attr.STATUS_NOTFOUND,
                                             f"{kind} session cache unavailable (see tlsmgr's log)")

    def _store_cache(self, kind: str, spec: str, timeout: float):
        """A session cache on a shared store, or None (warned) when it cannot be opened."""
        try:
            table = tables.open_table(spec, fold=False)
        except tables.TableError as exc:
            msg.warn(f"{kind}_tls_session_cache_database: {exc} -- cache disabled")
            return None
        return scache.StoreSessionCache(kind, spec, table, timeout, clock=self.wallclock)

    def _unique_caches(self) -> list[scache.SessionCache]:
        """Return each open cache once, even when cache types share it."""
        seen: dict[int, scache.SessionCache] = {}
        for cache in self.caches.values():
            if cache is not None:
                seen.setdefault(id(cache), cache)
        return list(seen.values())

    # --- timers --------------------------------------------------------------------------
    def _write_exchange(self) -> None:
        """Replace the exchange file with fresh pool output; warn when that fails."""
        if self.exchange is None:
            return
        try:
            self.exchange.write(self.pool.generate(prng.EXCH_SIZE))
        except OSError as exc:
            msg.warn(f"cannot update PRNG exchange file {self.exchange.path}: {exc.strerror or exc}")

    def _update_exchange(self) -> None:
        """Write the exchange file now and every tls_random_prng_update_period."""
        self._write_exchange()
        self._timers["exchange"] = self.loop.call_later(self.update_period, self._update_exchange)

    @staticmethod
    def _sweep_period(cache: scache.SessionCache) -> float:
        """Return the time between sweep passes: the timeout, at most MAX_SWEEP_PERIOD."""
        return max(1.0, min(float(cache.timeout), MAX_SWEEP_PERIOD))

    def _sweep(self, cache: scache.SessionCache) -> None:
        """Run one bounded sweep batch; schedule the next batch, or the next pass."""
        done = cache.sweep_step()
        delay = self._sweep_period(cache) if done else SWEEP_STEP_DELAY
        self._timers["sweep " + cache.file] = self.loop.call_later(
            delay, functools.partial(self._sweep, cache))

    # --- requests ------------------------------------------------------------------------
    def answer(self, client: frame_server.FrameClient, request: dict[str, bytes]) -> bytes:
        """Hand the request to its handler; status 2 for a missing or unknown name."""
        name = request.get("request")
        handler = self._handlers.get(name) if name is not None else None
        if handler is None:
            reason = ("missing attribute \"request\"" if name is None
                      else f"unknown request \"{_show(name)}\"")
            return self.bad(client, reason)
        return handler(client, request)

    def _check(self, client: frame_server.FrameClient, request: dict, required: frozenset,
               optional: frozenset = frozenset()) -> bytes | None:
        """Return a status 2 reply when attributes are missing or unknown, else None."""
        keys = request.keys()
        if keys == required:
            return None
        missing = required - keys
        unknown = keys - required - optional
        if not missing and not unknown:
            return None
        name = _show(request["request"])
        if missing:
            return self.bad(client, f"request \"{name}\": missing attribute \"{min(missing)}\"")
        return self.bad(client, f"request \"{name}\": unknown attribute \"{_show(min(unknown).encode())}\"")

    def _cache_for(self, client: frame_server.FrameClient, request: dict) -> tuple[scache.SessionCache | None, bytes | None]:
        """Return (cache, None), or (None, reply) for a bad or unusable cache type or id."""
        kind = request["cache_type"]
        if kind not in self._by_type:
            return None, self.bad(client, f"unknown cache_type \"{_show(kind)}\" (use smtpd, smtp or lmtp)")
        if not 1 <= len(request["cache_id"]) <= scache.MAX_KEY:
            return None, self.bad(client, f"cache_id of {len(request['cache_id'])} bytes"
                                           f" (must be 1..{scache.MAX_KEY})")
        cache = self._by_type[kind]
        if cache is None or not cache.enabled:
            return None, self._no_cache[kind]
        return cache, None

    _SEED_ATTRS = frozenset({"request"})
    _SEED_OPTIONAL = frozenset({"size"})

    def _seed(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `seed`: size bytes from the pool."""
        bad = self._check(client, request, self._SEED_ATTRS, self._SEED_OPTIONAL)
        if bad:
            return bad
        size = self.seed_default
        raw = request.get("size")
        if raw is not None:
            if not (raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= MAX_SEED):
                return self.bad(client, f"bad size \"{_show(raw)}\" (must be 1..{MAX_SEED})")
            size = int(raw)
        data = self.pool.random_bytes(size)
        return attr.encode({"status": attr.STATUS_OK, "seed": data})

    _CACHE_ATTRS = frozenset({"request", "cache_type", "cache_id"})
    _UPDATE_ATTRS = frozenset({"request", "cache_type", "cache_id", "session"})

    def _lookup(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `lookup`: the stored session, or status 1."""
        bad = self._check(client, request, self._CACHE_ATTRS)
        if bad:
            return bad
        cache, reply = self._cache_for(client, request)
        if cache is None:
            return reply
        session = cache.lookup(request["cache_id"])
        if session is None:
            return _NOT_FOUND
        return attr.encode({"status": attr.STATUS_OK, "session": session})

    def _update(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `update`: store the session; status 3 when the cache cannot."""
        bad = self._check(client, request, self._UPDATE_ATTRS)
        if bad:
            return bad
        session = request["session"]
        if not 1 <= len(session) <= MAX_SESSION:
            return self.bad(client, f"session of {len(session)} bytes (must be 1..{MAX_SESSION})")
        cache, reply = self._cache_for(client, request)
        if cache is None:
            return reply
        if cache.update(request["cache_id"], session):
            return _OK
        return _reply(attr.STATUS_ERROR, "cannot store session (see tlsmgr's log)")

    def _delete(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `delete`: remove the session, or status 1 when there was none."""
        bad = self._check(client, request, self._CACHE_ATTRS)
        if bad:
            return bad
        cache, reply = self._cache_for(client, request)
        if cache is None:
            return reply
        return _OK if cache.delete(request["cache_id"]) else _NOT_FOUND

    _HISTORY_UPDATE_ATTRS = frozenset({"request", "nexthop", "record"})
    _HISTORY_LOOKUP_ATTRS = frozenset({"request"})
    _HISTORY_LOOKUP_OPTIONAL = frozenset({"nexthop"})
    _NO_HISTORY = _reply(attr.STATUS_NOTFOUND, "no TLS history (smtp_tls_history_database "
                                               "is empty or unusable)")

    def _history_update(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `history_update`: append a record; the history before it."""
        bad = self._check(client, request, self._HISTORY_UPDATE_ATTRS)
        if bad:
            return bad
        nexthop = request["nexthop"]
        if not 1 <= len(nexthop) <= tls_history.MAX_KEY:
            return self.bad(client, f"nexthop of {len(nexthop)} bytes "
                                     f"(must be 1..{tls_history.MAX_KEY})")
        record = tls_history.parse_record(request["record"])
        if record is None:
            return self.bad(client, "record is not a JSON object of "
                                     f"1..{tls_history.MAX_RECORD} bytes")
        if self.history is None:
            return self._NO_HISTORY
        before = self.history.update(nexthop, record)
        if before is None:
            return _reply(attr.STATUS_ERROR, "cannot store TLS history (see tlsmgr's log)")
        return attr.encode({"status": attr.STATUS_OK,
                            "history_json": json.dumps(before, separators=(",", ":"))})

    def _history_lookup(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `history_lookup`: one next hop's history, or every one's."""
        bad = self._check(client, request, self._HISTORY_LOOKUP_ATTRS,
                          self._HISTORY_LOOKUP_OPTIONAL)
        if bad:
            return bad
        if self.history is None:
            return self._NO_HISTORY
        nexthop = request.get("nexthop")
        if nexthop is not None and not 1 <= len(nexthop) <= tls_history.MAX_KEY:
            return self.bad(client, f"nexthop of {len(nexthop)} bytes "
                                     f"(must be 1..{tls_history.MAX_KEY})")
        found, truncated = self.history.lookup(nexthop)
        reply = {"status": attr.STATUS_OK,
                 "history_json": json.dumps(found, separators=(",", ":"))}
        if truncated:
            reply["truncated"] = "1"
        return attr.encode(reply)

    _STATUS_ATTRS = frozenset({"request"})

    def _status(self, client: frame_server.FrameClient, request: dict) -> bytes:
        """Answer `status`: the report of status_report() as JSON."""
        bad = self._check(client, request, self._STATUS_ATTRS)
        if bad:
            return bad
        text = json.dumps(self.status_report(), separators=(",", ":"))
        return attr.encode({"status": attr.STATUS_OK, "status_json": text})

    def status_report(self) -> dict:
        """Return what `tlsmgr status` shows: process, PRNG, caches, server resumption."""
        prng_stats = self.pool.stats() if self.pool else {}
        prng_stats["exchange_file"] = self.exchange.path if self.exchange else ""
        prng_stats["last_exchange_write"] = self.exchange.last_write if self.exchange else None
        caches = {}
        for kind in CACHE_TYPES:
            spec, timeout = self.cache_params[kind]
            cache = self.caches[kind]
            if cache is None:
                caches[kind] = {"database": spec, "enabled": False, "timeout": timeout}
            else:
                caches[kind] = {**cache.stats(), "shared_by": cache.name}
        return {
            "pid": os.getpid(),
            "started": self.started_wall,
            "uptime": self.clock() - self.started,
            "clients": len(self.clients),
            "prng": prng_stats,
            "caches": caches,
            "server_resumption": (SERVER_RESUMPTION_TICKETS.format(lifetime=self.ticket_lifetime)
                                  if self.ticket_lifetime > 0 else SERVER_RESUMPTION_OFF),
        }


# --- running it -------------------------------------------------------------------------

def main(ctx) -> int:
    """Run as the master's tlsmgr service: one call to the multi-client skeleton."""
    try:
        mgr = Tlsmgr(ctx.cfg)
    except (maincf.ConfigError, ValueError) as exc:
        msg.fatal(str(exc))
    return server.multi_server(ctx, mgr.on_client,
                               pre_init=lambda _ctx: mgr.pre_init(),
                               post_init=lambda _ctx, loop: mgr.post_init(loop),
                               on_exit=lambda _ctx: mgr.on_exit(),
                               client_count=mgr.client_count,
                               long_running=True)     # state lives in memory: no max_idle/max_use


def _listen(path: str) -> socket.socket:
    """Bind and listen on a UNIX-domain socket at path, replacing a stale one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)       # as Postfix: access is controlled by the private/ directory
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def standalone(config_dir: str | None, socket_path: str | None, ready_cb=None, verbose: int = 0) -> None:
    """Run tlsmgr on its own socket, without chroot, until SIGTERM or SIGINT."""
    try:
        cfg = maincf.load(config_dir)
        msg.init("tlsmgr", syslog_name=cfg["syslog_name"], maillog_file=cfg["maillog_file"],
                 syslog_facility=cfg["syslog_facility"], verbose=verbose)
        mgr = Tlsmgr(cfg)
        socket_path = socket_path or os.path.join(cfg["queue_directory"], "private", "tlsmgr")
    except (maincf.ConfigError, ValueError) as exc:
        msg.fatal(str(exc))
    except OSError as exc:
        msg.fatal(f"open {exc.filename}: {exc.strerror}")
    mgr.pre_init()
    loop = EventLoop(clock=mgr.clock)
    stop: list[int] = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_handlers = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
    listener = None
    try:
        try:
            listener = _listen(socket_path)
        except OSError as exc:
            msg.fatal(f"bind {socket_path}: {exc.strerror or exc}")

        def accept() -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    # Out of descriptors, say: the listener stays readable, so pause it
                    # rather than spin and log on every pass.
                    msg.warn(f"accept on {socket_path}: {exc.strerror or exc}; pausing for"
                             f" {ACCEPT_PAUSE:g}s")
                    loop.remove_reader(listener)
                    loop.call_later(ACCEPT_PAUSE, lambda: loop.add_reader(listener, accept))
                    return
                mgr.on_client(conn, loop)

        def drain_wakeup() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 256):
                    pass

        loop.add_reader(listener, accept)
        loop.add_reader(wake_r, drain_wakeup)
        mgr.post_init(loop)
        if ready_cb is not None:
            ready_cb()
        loop.run(until=lambda: bool(stop))
    finally:
        mgr.on_exit()
        if listener is not None:
            loop.remove(listener)
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        loop.remove(wake_r)
        loop.close()
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


def cli(argv=None) -> int:
    """`python -m postfix_py.tlsmgr.service [-v] [-c config_dir] [--socket path]`."""
    parser = argparse.ArgumentParser(prog="tlsmgr", description="run tlsmgr standalone")
    parser.add_argument("-c", dest="config_dir", help="configuration directory")
    parser.add_argument("--socket", help="socket path (default: $queue_directory/private/tlsmgr)")
    parser.add_argument("-v", dest="verbose", action="count", default=0, help="more logging")
    args = parser.parse_args(argv)
    standalone(args.config_dir, args.socket, verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
