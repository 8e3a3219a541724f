"""tlsmgr's TLS session caches: one LMDB environment per configured cache database.

NAME
    scache - timestamped TLS session cache in LMDB, as Postfix's tls_scache.c

DESCRIPTION
    smtpd_tls_session_cache_database, smtp_tls_session_cache_database and
    lmtp_tls_session_cache_database name the caches (`type:path`). `lmdb:`, `btree:` and
    `hash:` are all served by LMDB, so a Postfix administrator's main.cf keeps working; a
    bare path means `lmdb:`. The file is `path.lmdb`, as Postfix names lmdb:
    tables. Only tlsmgr touches these files, so they have no lock file.

    Each value is an 8-byte big-endian IEEE double, the entry's creation time (wall clock,
    seconds), followed by the serialised session. An entry older than the cache's timeout
    is never returned: a lookup that meets one deletes it. sweep_step() walks the cache in
    bounded batches from where the previous batch stopped, deleting expired and malformed
    entries, so a sweep never holds the event loop for long. A timeout of 0 disables the
    cache, as in Postfix.

START: EMPTY CACHES
    open() deletes any old file and creates a new one, as Postfix's tlsmgr opens its caches
    with O_TRUNC. Sessions from a previous life are gone (each costs one full handshake),
    and so is a whole class of "damaged file after a crash" problems; it is also why the
    environment is opened without fsync (sync=False): nothing on disk needs to survive.

FULL MAP
    The map starts at lmdb_map_size. On MapFullError an update first removes expired
    entries; if that is not enough the map doubles (set_mapsize, with no transaction open),
    up to MAX_GROWTH times lmdb_map_size; beyond that the oldest tenth of the entries is
    evicted. (LMDB reuses pages freed by a transaction only after one more commit, so in a
    nearly full map the first retry after a purge or an eviction may fail again; the next
    step then makes the room.) Growth is logged each time; purges and evictions at most once a minute. A session that still does not fit is not stored and
    update() returns False; nothing is raised.

DAMAGE
    An LMDB error other than a full map (corrupt or truncated file, invalid meta pages,
    I/O error) makes the cache log a warning and recreate its file, empty. When it cannot
    (e.g. the file is outside a chroot jail), the cache is disabled, with a warning, until
    tlsmgr restarts.

SHARED STORES
    memcache:/path and redis:/path name a shared store (lib/table_store.py, the
    memcache_table(5) configuration file): StoreSessionCache serves them with the same
    interface, so that the hosts of a fleet resume each other's sessions. Nothing is
    truncated at open; entries expire in the store (ttl) and by the cache timeout.

CLASSES AND FUNCTIONS
    parse_database(spec) -> (type, path)
        Split `type:path`; CacheError for an unsupported type or an empty path.
    SessionCache(name, database, path, timeout, map_size, clock=time.time, warn=msg.warn)
        open() -> bool (True when the cache is usable); enabled (property).
        lookup(cache_id) -> bytes or None (not found, expired, malformed, or an error).
        update(cache_id, session) -> bool (False: not stored, already logged).
        delete(cache_id) -> bool (True when an entry was removed).
        sweep_step(limit=SWEEP_BATCH) -> bool (True when a pass over the cache is done).
        stats() -> dict of counters and sizes for `tlsmgr status`; close().
    cache_id must be 1..max_key_size() bytes (511 for LMDB); the caller checks.

SEE ALSO
    Postfix tls_scache.c, tlsmgr.c, slmdb.c; py-lmdb documentation.
"""

from __future__ import annotations

import heapq
import os
import stat
import struct
import time

import lmdb

from postfix_py.lib import msg

SUPPORTED_TYPES = frozenset({"lmdb", "btree", "hash"})
SUFFIX = ".lmdb"
SWEEP_BATCH = 256           # entries examined per sweep step
MAX_GROWTH = 8              # the map may grow to this many times lmdb_map_size
EVICT_FRACTION = 10         # when full at the largest size, evict 1/EVICT_FRACTION, oldest first
MAX_KEY = 511               # LMDB's default maximum key size
FULL_WARN_INTERVAL = 60.0   # seconds between map-full warnings of one cache

_STAMP = struct.Struct(">d")


def expired(value: bytes, now: float, timeout: float) -> bool:
    """Whether a stamped entry is past its timeout, or too short to hold a timestamp."""
    return len(value) < _STAMP.size or now - _STAMP.unpack_from(value)[0] > timeout


class CacheError(ValueError):
    """A cache database parameter that cannot be used."""


def parse_database(spec: str) -> tuple[str, str]:
    """Split a cache database `type:path` into type and path; bare paths are lmdb."""
    kind, sep, path = spec.partition(":")
    if not sep:
        kind, path = "lmdb", spec
    if kind not in SUPPORTED_TYPES:
        raise CacheError(f"unsupported session cache type \"{kind}\" in \"{spec}\""
                         f" (use {', '.join(sorted(SUPPORTED_TYPES))})")
    if not path:
        raise CacheError(f"no file name in session cache database \"{spec}\"")
    return kind, path


class SessionCache:
    """One TLS session cache: an LMDB environment with timestamped entries."""

    def __init__(self, name: str, database: str, path: str, timeout: float, map_size: int,
                 clock=time.time, warn=msg.warn):
        """Describe the cache; open() creates its file."""
        self.name = name                    # smtpd, smtp or lmtp (or "smtp,lmtp" when shared)
        self.database = database            # the parameter value, for logs and status
        self.file = path + SUFFIX
        self.timeout = timeout
        self.map_size = map_size
        self.max_map_size = map_size * MAX_GROWTH
        self.clock = clock
        self.warn = warn
        self.env: lmdb.Environment | None = None
        self._sweep_next: bytes | None = None     # where the current sweep pass resumes
        self._full_warned: dict[str, float] = {}  # monotonic time of the last map-full warnings
        self.counters = dict.fromkeys(
            ("lookups", "hits", "misses", "updates", "deletes", "expired", "evicted",
             "errors", "recreated"), 0)

    @property
    def enabled(self) -> bool:
        """Return True while the cache has a usable environment."""
        return self.env is not None

    # --- opening and recovery ------------------------------------------------------------
    def _remove_files(self) -> None:
        """Delete the cache file and its lock file (O_TRUNC, the LMDB way)."""
        for path in (self.file, self.file + "-lock"):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{path} is not a regular file")
            os.unlink(path)

    def open(self) -> bool:
        """Create the cache empty; warn and stay disabled when that fails."""
        self.close()
        try:
            self._remove_files()
            # lock=False: only this process opens the file, one transaction at a time.
            # A lock file is written through a shared mapping, which a full file system
            # answers with SIGBUS (tlsmgr dies); without one, ENOSPC is an lmdb.Error.
            self.env = lmdb.open(self.file, subdir=False, map_size=self.map_size, max_dbs=0,
                                 sync=False, metasync=False, readahead=False, meminit=False,
                                 mode=0o600, max_spare_txns=2, lock=False)
        except (OSError, lmdb.Error) as exc:
            self.warn(f"cannot open TLS session cache {self.database} ({self.file}): {exc}"
                      " -- cache disabled")
            self.env = None
            return False
        self._sweep_next = None
        return True

    def _recover(self, exc: Exception) -> None:
        """Recreate a damaged cache, empty, or disable it when that is impossible."""
        self.counters["errors"] += 1
        self.warn(f"TLS session cache {self.database} ({self.file}): {exc} -- recreating it")
        if self.open():
            self.counters["recreated"] += 1

    # --- requests ------------------------------------------------------------------------
    def _expired(self, value: bytes, now: float) -> bool:
        return expired(value, now, self.timeout)

    def lookup(self, cache_id: bytes) -> bytes | None:
        """Return the session stored under cache_id, or None."""
        env = self.env
        if env is None:
            return None
        self.counters["lookups"] += 1
        try:
            with env.begin() as txn:
                value = txn.get(cache_id)
            if value is not None and self._expired(value, self.clock()):
                with env.begin(write=True) as txn:
                    txn.delete(cache_id)
                self.counters["expired"] += 1
                value = None
        except lmdb.BadValsizeError:
            value = None
        except lmdb.Error as exc:
            self._recover(exc)
            value = None
        if value is None:
            self.counters["misses"] += 1
            return None
        self.counters["hits"] += 1
        return value[_STAMP.size:]

    def update(self, cache_id: bytes, session: bytes) -> bool:
        """Store session under cache_id, stamped now; False when it cannot be stored."""
        if self.env is None:
            return False
        value = _STAMP.pack(self.clock()) + session
        for _ in range(MAX_GROWTH + 4):     # enough for every purge, doubling and eviction
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(cache_id, value)
                self.counters["updates"] += 1
                return True
            except lmdb.MapFullError:
                if not self._make_room():
                    break
            except lmdb.BadValsizeError as exc:
                self.warn(f"TLS session cache {self.database}: cannot store entry: {exc}")
                return False
            except lmdb.Error as exc:
                self._recover(exc)
                return False
            if self.env is None:
                return False
        self.warn(f"TLS session cache {self.database}: map full, session of {len(session)}"
                  " bytes not stored")
        return False

    def delete(self, cache_id: bytes) -> bool:
        """Remove the entry under cache_id; True when there was one."""
        if self.env is None:
            return False
        try:
            with self.env.begin(write=True) as txn:
                found = txn.delete(cache_id)
        except lmdb.BadValsizeError:
            return False
        except lmdb.Error as exc:
            self._recover(exc)
            return False
        if found:
            self.counters["deletes"] += 1
        return found

    # --- full map ------------------------------------------------------------------------
    def _make_room(self) -> bool:
        """Free space after MapFullError: purge expired, else grow, else evict the oldest."""
        try:
            removed = self._purge_expired()
            if removed:
                self._warn_full("purge", f"removed {removed} expired entries")
                return True
            size = self.env.info()["map_size"]
            if size < self.max_map_size:
                size = min(size * 2, self.max_map_size)
                self.env.set_mapsize(size)      # no transaction is open here
                self.warn(f"TLS session cache {self.database}: map full: grew it to {size} bytes"
                          f" (limit {self.max_map_size}, {MAX_GROWTH} x lmdb_map_size)")
                return True
            evicted = self._evict_oldest()
            self._warn_full("evict", f"evicted the {evicted} oldest entries"
                            f" ({self.counters['evicted']} since start)")
            return evicted > 0
        except lmdb.Error as exc:
            self._recover(exc)
            return False

    def _warn_full(self, kind: str, what: str) -> None:
        """Log a map-full action of this kind at most once per FULL_WARN_INTERVAL."""
        now, last = time.monotonic(), self._full_warned.get(kind)
        if last is None or now - last >= FULL_WARN_INTERVAL:
            self._full_warned[kind] = now
            self.warn(f"TLS session cache {self.database}: map full at"
                      f" {self.env.info()['map_size']} bytes: {what}")

    def _purge_expired(self) -> int:
        """Delete every expired or malformed entry; return how many went."""
        now, removed = self.clock(), 0
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            more = cur.first()
            while more:
                if self._expired(cur.value(), now):
                    more = cur.delete() and bool(cur.key())
                    removed += 1
                else:
                    more = cur.next()
        self.counters["expired"] += removed
        return removed

    def _evict_oldest(self) -> int:
        """Delete the oldest 1/EVICT_FRACTION of the entries (at least one)."""
        with self.env.begin(write=True) as txn:
            stamps = [(_STAMP.unpack_from(v)[0] if len(v) >= _STAMP.size else 0.0, k)
                      for k, v in txn.cursor()]
            victims = heapq.nsmallest(max(1, len(stamps) // EVICT_FRACTION), stamps)
            for _, key in victims:
                txn.delete(key)
        self.counters["evicted"] += len(victims)
        return len(victims)

    # --- sweeping ------------------------------------------------------------------------
    def sweep_step(self, limit: int = SWEEP_BATCH) -> bool:
        """Examine up to limit entries, deleting expired ones; True when the pass is done."""
        if self.env is None:
            return True
        now, seen, removed = self.clock(), 0, 0
        try:
            with self.env.begin(write=True) as txn:
                cur = txn.cursor()
                more = cur.set_range(self._sweep_next) if self._sweep_next else cur.first()
                while more and seen < limit:
                    seen += 1
                    if self._expired(cur.value(), now):
                        more = cur.delete() and bool(cur.key())
                        removed += 1
                    else:
                        more = cur.next()
                self._sweep_next = cur.key() if more else None
        except lmdb.Error as exc:
            self._recover(exc)
            return True
        self.counters["expired"] += removed
        return self._sweep_next is None

    # --- status --------------------------------------------------------------------------
    def stats(self) -> dict:
        """Return counters, entry count and sizes; cheap (no walk of the cache)."""
        out = {"database": self.database, "file": self.file, "enabled": self.enabled,
               "timeout": self.timeout, **self.counters}
        lookups = self.counters["lookups"]
        out["hit_ratio"] = self.counters["hits"] / lookups if lookups else None
        if self.env is not None:
            st, info = self.env.stat(), self.env.info()
            used = (info["last_pgno"] + 1) * st["psize"]
            out.update(entries=st["entries"], bytes=used, map_size=info["map_size"],
                       map_use=used / info["map_size"])
        else:
            out.update(entries=0, bytes=0, map_size=0, map_use=0.0)
        return out

    def close(self) -> None:
        """Close the environment (the file stays until the next open truncates it)."""
        env, self.env = self.env, None
        if env is not None:
            env.close()


# --- a cache on a shared store ----------------------------------------------------------

STORE_TYPES = frozenset({"memcache", "redis"})


class StoreSessionCache:
    """A TLS session cache in a memcache: or redis: table (lib/table_store.py).

    The same interface as SessionCache, for the caches that the hosts of a fleet share:
    a session one host stored is resumed by another. Entries carry the same timestamp
    as in LMDB and expire in the store after the table's ttl; a lookup also refuses an
    entry older than the cache's timeout. Nothing is truncated at open (the store belongs
    to the fleet) and there is nothing to sweep. A store that is down costs resumption
    only: the table's backup, or a miss.
    """

    def __init__(self, name: str, database: str, table, timeout: float,
                 clock=time.time, warn=msg.warn):
        self.name = name
        self.database = database
        self.file = database            # what the timers and logs name it by
        self.table = table
        self.timeout = timeout
        self.clock = clock
        self.warn = warn
        self.counters = dict.fromkeys(
            ("lookups", "hits", "misses", "updates", "deletes", "expired", "evicted",
             "errors", "recreated"), 0)

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def open(self) -> bool:
        return self.enabled

    def lookup(self, cache_id: bytes) -> bytes | None:
        if self.table is None:
            return None
        self.counters["lookups"] += 1
        value = self.table.get(cache_id)
        if value is not None and expired(value, self.clock(), self.timeout):
            self.counters["expired"] += 1
            self.table.delete(cache_id)
            value = None
        if value is None:
            self.counters["misses"] += 1
            return None
        self.counters["hits"] += 1
        return value[_STAMP.size:]

    def update(self, cache_id: bytes, session: bytes) -> bool:
        if self.table is None:
            return False
        stored = self.table.put(cache_id, _STAMP.pack(self.clock()) + session)
        if stored:
            self.counters["updates"] += 1
        return stored

    def delete(self, cache_id: bytes) -> bool:
        if self.table is None:
            return False
        found = self.table.delete(cache_id)
        if found:
            self.counters["deletes"] += 1
        return found

    def sweep_step(self, limit: int = SWEEP_BATCH) -> bool:
        return True                     # the store expires entries itself

    def stats(self) -> dict:
        lookups = self.counters["lookups"]
        store = self.table.counters if self.table is not None else {}
        return {"database": self.database, "file": self.file, "enabled": self.enabled,
                "timeout": self.timeout, **self.counters,
                "hit_ratio": self.counters["hits"] / lookups if lookups else None,
                "store_up": bool(self.table and self.table.store_up),
                "store_errors": store.get("store_errors", 0),
                "backup_hits": store.get("backup_hits", 0),
                "entries": 0, "bytes": 0, "map_size": 0, "map_use": 0.0}

    def close(self) -> None:
        table, self.table = self.table, None
        if table is not None:
            table.close()
