"""memcache: and redis: lookup tables: a store shared by several hosts, with a local backup.

SYNOPSIS
    main.cf:    smtp_tls_session_cache_database = memcache:/etc/postfix-py/memcache.cf
                postscreen_cache_map = redis:/etc/postfix-py/redis.cf

    memcache.cf:
        memcache = inet:127.0.0.1:11211
        backup = lmdb:/var/lib/postfix-py/scache_backup
        ttl = 3600

DESCRIPTION
    The memcache: type is Postfix's memcache_table(5); redis: has the same shape, with a
    Redis server (redis-py) instead of memcached (pymemcache). The name after the type is
    a configuration file of `name = value` lines (`#` comments, blank lines ignored):

    memcache = inet:host:port | unix:/path      (memcache: only; default
                                                 inet:localhost:11211)
    redis = inet:host:port | unix:/path         (redis: only; default inet:localhost:6379)
    database = N                                (redis: only; default 0)
    backup = lmdb:/path (btree:/path, hash:/path: the same LMDB file, path.db)
        A local table that keeps every entry too: a lookup that the store cannot answer
        (not found, or the store is down) is looked up there, and found entries are put
        back into the store. Without backup, a store that is down makes every lookup a
        miss and every update a no-op: never an error for the caller.
    ttl = 3600                  seconds an entry lives in the store and in the backup
    key_format = %s             the store key: %s the whole lookup key, %u its local part
                                (before the last @), %d its domain (after it; no lookup
                                when there is none), %% a percent sign
    timeout = 2                 seconds for each connect, read and write
    retry_pause = 10            seconds a store that failed is left alone, the backup
                                serving meanwhile (one warning per outage)
    data_size_limit = 10240     longest value stored (longer ones are refused)

    A store key that memcached would refuse (longer than 250 bytes, or with white space or
    control characters) is replaced by `sha256:` and the key's SHA-256 in hex, for both
    stores, so that the hosts of a fleet agree on it.

    The table is read-write: lookup(key), update(key, value), delete(key) take str;
    get(key), put(key, value: bytes) take and give bytes (TLS sessions). (lib/tables.py's
    open_table() gives a subclass whose items() is "sequence operation is not supported".) Keys are folded to lower case unless fold=False
    (tlsmgr's session ids are not).

    The backup is opened with an LMDB lock file (several processes may write it) and
    without fsync: like the store, it is a cache.

SEE ALSO
    Postfix memcache_table(5); lib/tables.py (open_table), tlsmgr/scache.py (session caches).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time

import lmdb
import redis
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheError

from . import msg

STORE_TYPES = ("memcache", "redis")
DEFAULT_ENDPOINT = {"memcache": "inet:localhost:11211", "redis": "inet:localhost:6379"}
SETTINGS = {"ttl": 3600, "key_format": "%s", "timeout": 2, "retry_pause": 10,
            "data_size_limit": 10240, "backup": "", "database": 0}
INT_SETTINGS = ("ttl", "timeout", "retry_pause", "data_size_limit", "database")
CONFIG_LIMIT = 65536
BACKUP_MAP_SIZE = 64 * 1024 * 1024
BACKUP_SUFFIX = {"lmdb": ".lmdb", "btree": ".db", "hash": ".db"}
_EXPIRES = struct.Struct(">d")
STORE_ERRORS = (OSError, MemcacheError, redis.RedisError)
_BACKUPS: dict[str, list] = {}      # file -> [environment, tables using it]


class StoreConfigError(ValueError):
    """A memcache: or redis: configuration file that cannot be used."""


def parse_endpoint(text: str, where: str) -> tuple:
    """("inet", host, port) or ("unix", path) from inet:host:port, host:port, unix:/path."""
    text = text.strip()
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:")
        if not path:
            raise StoreConfigError(f"{where}: empty unix socket path")
        return ("unix", path)
    text = text.removeprefix("inet:")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StoreConfigError(f"{where}: bad endpoint \"{text}\": use inet:host:port "
                               "or unix:/path")
    return ("inet", host, int(port))


def parse_config(type_: str, path: str, text: str) -> dict:
    """The settings of a configuration file's text; StoreConfigError names the line."""
    out = dict(SETTINGS, **{type_: DEFAULT_ENDPOINT[type_]})
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        where = f"{path}, line {number}"
        if not sep or not name:
            raise StoreConfigError(f"{where}: expected \"name = value\"")
        if name not in out:
            msg.warn(f"{where}: unknown {type_} parameter \"{name}\" ignored")
            continue
        if name in INT_SETTINGS:
            if not value.isdigit():
                raise StoreConfigError(f"{where}: {name} must be a number, not \"{value}\"")
            out[name] = int(value)
        else:
            out[name] = value
    out["endpoint"] = parse_endpoint(out[type_], f"{path}: {type_}")
    if out["timeout"] < 1:
        raise StoreConfigError(f"{path}: timeout must be at least 1")
    return out


def expand_key(fmt: str, key: str) -> str | None:
    """key_format applied to key; None when the format needs a domain and key has none."""
    local, at, domain = key.rpartition("@")
    if not at:
        local, domain = key, ""
    out, i = [], 0
    while i < len(fmt):
        c = fmt[i]
        if c == "%" and i + 1 < len(fmt):
            d = fmt[i + 1]
            if d == "d" and not domain:
                return None
            out.append({"s": key, "u": local, "d": domain, "%": "%"}.get(d, "%" + d))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def store_key(text: str) -> bytes:
    """The key as sent to the store: as is, or sha256:HEX when memcached would refuse it."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > 250 or any(b <= 32 or b == 127 for b in raw):
        return b"sha256:" + hashlib.sha256(raw).hexdigest().encode()
    return raw


class StoreTable:
    """One memcache: or redis: table: the store, and the optional LMDB backup."""

    def __init__(self, type_: str, name: str, fold: bool = True, warn=msg.warn):
        if type_ not in STORE_TYPES:
            raise StoreConfigError(f"unsupported dictionary type: {type_}")
        self.type = type_
        self.name = name
        self.ref = f"{type_}:{name}"
        self.fold = fold
        self.warn = warn
        try:
            with open(name, "rb") as f:
                text = f.read(CONFIG_LIMIT + 1)
        except OSError as exc:
            raise StoreConfigError(f"open {name}: {exc.strerror}") from None
        if len(text) > CONFIG_LIMIT:
            raise StoreConfigError(f"{name}: longer than {CONFIG_LIMIT} bytes")
        self.settings = parse_config(type_, name, text.decode("utf-8", "replace"))
        self.down_until = 0.0
        self.counters = dict.fromkeys(("lookups", "hits", "misses", "backup_hits",
                                       "updates", "deletes", "store_errors"), 0)
        self.client = self._client()
        self.backup = self._open_backup(self.settings["backup"]) \
            if self.settings["backup"] else None

    # --- the parts ---------------------------------------------------------------------
    def _client(self):
        s = self.settings
        endpoint, timeout = s["endpoint"], s["timeout"]
        if self.type == "memcache":
            server = endpoint[1] if endpoint[0] == "unix" else (endpoint[1], endpoint[2])
            return MemcacheClient(server, connect_timeout=timeout, timeout=timeout,
                                  no_delay=True, default_noreply=False)
        if endpoint[0] == "unix":
            return redis.Redis(unix_socket_path=endpoint[1], db=s["database"],
                               socket_timeout=timeout, socket_connect_timeout=timeout)
        return redis.Redis(host=endpoint[1], port=endpoint[2], db=s["database"],
                           socket_timeout=timeout, socket_connect_timeout=timeout)

    def _open_backup(self, ref: str) -> lmdb.Environment:
        kind, sep, path = ref.partition(":")
        if not sep or kind not in BACKUP_SUFFIX or not path:
            raise StoreConfigError(f"{self.name}: backup \"{ref}\": use lmdb:/path "
                                   "(or btree:/path, hash:/path)")
        file = os.path.abspath(path + BACKUP_SUFFIX[kind])
        shared = _BACKUPS.get(file)
        if shared is not None:          # LMDB opens a file once per process: share it
            shared[1] += 1
            self.backup_file = file
            return shared[0]
        try:
            env = lmdb.open(file, subdir=False, map_size=BACKUP_MAP_SIZE, sync=False,
                            metasync=False, readahead=False, max_dbs=0, mode=0o600)
        except (OSError, lmdb.Error) as exc:
            raise StoreConfigError(f"{self.name}: backup {ref}: {exc}") from None
        _BACKUPS[file] = [env, 1]
        self.backup_file = file
        return env

    @property
    def store_up(self) -> bool:
        """False while a failed store is left alone (retry_pause)."""
        return time.monotonic() >= self.down_until

    def _store(self, op: str, key: bytes, value: bytes | None = None):
        """One store operation; None (and the store marked down) when it fails."""
        if not self.store_up:
            return None
        try:
            if op == "get":
                return self.client.get(key)
            if op == "set":
                if self.type == "memcache":
                    return self.client.set(key, value, expire=self.settings["ttl"])
                return self.client.set(key, value, ex=self.settings["ttl"])
            return self.client.delete(key)
        except STORE_ERRORS as exc:
            self.counters["store_errors"] += 1
            self.down_until = time.monotonic() + self.settings["retry_pause"]
            where = self.settings[self.type]
            self.warn(f"{self.ref}: {self.type} server {where}: {exc or type(exc).__name__}"
                      f" -- {'using the backup' if self.backup else 'no backup'} for "
                      f"{self.settings['retry_pause']}s")
            try:
                self.client.close()
            except STORE_ERRORS:
                pass
            return None

    def _backup_get(self, key: bytes) -> bytes | None:
        if self.backup is None:
            return None
        try:
            with self.backup.begin() as txn:
                value = txn.get(key)
        except lmdb.Error as exc:
            self.warn(f"{self.ref}: backup: {exc}")
            return None
        if value is None or len(value) < _EXPIRES.size:
            return None
        if _EXPIRES.unpack_from(value)[0] < time.time():
            self._backup_delete(key)
            return None
        return value[_EXPIRES.size:]

    def _backup_put(self, key: bytes, value: bytes) -> None:
        if self.backup is None:
            return
        stamped = _EXPIRES.pack(time.time() + self.settings["ttl"]) + value
        try:
            with self.backup.begin(write=True) as txn:
                txn.put(key, stamped)
        except lmdb.MapFullError:
            try:
                self._backup_purge()
            except lmdb.Error as exc:
                self.warn(f"{self.ref}: backup: {exc}")
        except lmdb.Error as exc:
            self.warn(f"{self.ref}: backup: {exc}")

    def _backup_purge(self) -> None:
        """A full backup: drop what expired, or everything (it is a cache)."""
        now = time.time()
        with self.backup.begin(write=True) as txn:
            entries = [(k, v) for k, v in txn.cursor()]
            victims = [k for k, v in entries
                       if len(v) < _EXPIRES.size or _EXPIRES.unpack_from(v)[0] < now]
            victims = victims or [k for k, _ in entries]
            for k in victims:
                txn.delete(k)
        self.warn(f"{self.ref}: backup full: removed {len(victims)} entries")

    def _backup_delete(self, key: bytes) -> bool:
        if self.backup is None:
            return False
        try:
            with self.backup.begin(write=True) as txn:
                return txn.delete(key)
        except lmdb.Error:
            return False

    def _key(self, key) -> bytes | None:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "surrogateescape")
        if self.fold:
            key = key.lower()
        text = expand_key(self.settings["key_format"], key)
        return None if text is None else store_key(text)

    # --- the table ---------------------------------------------------------------------
    def get(self, key) -> bytes | None:
        """The value stored under key: from the store, else from the backup."""
        k = self._key(key)
        if k is None:
            return None
        self.counters["lookups"] += 1
        value = self._store("get", k)
        if value is None:
            value = self._backup_get(k)
            if value is not None:
                self.counters["backup_hits"] += 1
                self._store("set", k, value)        # the store lost it (or is down)
        if value is None:
            self.counters["misses"] += 1
            return None
        self.counters["hits"] += 1
        return bytes(value)

    def put(self, key, value: bytes) -> bool:
        """Store value under key; False when it is too long or nothing could keep it."""
        k = self._key(key)
        if k is None or len(value) > self.settings["data_size_limit"]:
            return False
        self.counters["updates"] += 1
        stored = bool(self._store("set", k, value))
        self._backup_put(k, value)
        return stored or self.backup is not None

    def delete(self, key) -> bool:
        """Remove key from the store and the backup; True when either had it."""
        k = self._key(key)
        if k is None:
            return False
        self.counters["deletes"] += 1
        found = bool(self._store("delete", k))
        return self._backup_delete(k) or found

    def lookup(self, key: str) -> str | None:
        value = self.get(key)
        return None if value is None else value.decode("utf-8", "replace")

    def update(self, key: str, value: str) -> bool:
        return self.put(key, value.encode("utf-8"))

    def close(self) -> None:
        try:
            self.client.close()
        except STORE_ERRORS:
            pass
        if self.backup is not None:
            shared = _BACKUPS.get(self.backup_file)
            if shared is not None:
                shared[1] -= 1
                if shared[1] <= 0:
                    del _BACKUPS[self.backup_file]
                    self.backup.close()
            self.backup = None

    def __enter__(self) -> "StoreTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StoreTable {self.ref}>"
