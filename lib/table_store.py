"""memcache: and redis: lookup tables: a store shared by several hosts, with a local backup.

SYNOPSIS
    main.cf:    smtp_tls_session_cache_database = memcache:/etc/postfix-py/memcache.cf
                postscreen_cache_map = redis:/etc/postfix-py/redis.cf

    memcache.cf:
        memcache = inet:127.0.0.1:11211
        backup = lmdb:/var/lib/postfix-py/scache_backup
        ttl = 3600

    redis.cf:
        redis = inet:127.0.0.1:6379
        key_format = postscreen:%s
        ttl = 86400

USERS
    tlsmgr (smtp_tls_session_cache_database and the other session caches,
    tlsmgr/scache.py) and postscreen (postscreen_cache_map, postscreen/cache.py), through
    lib/tables.py's open_table(). Neither can walk such a table: a session entry ends at
    its cache timeout or the ttl, and postscreen skips its cache cleanup for these types
    (postscreen_cache_cleanup_interval is ignored), so that a postscreen entry lives at
    most ttl seconds: a ttl shorter than postscreen_greet_ttl (1d) makes clients take the
    tests again sooner.

DESCRIPTION
    The memcache: type is Postfix's memcache_table(5); redis: has the same shape, with a
    Redis server (redis-py) instead of memcached (pymemcache). The name after the type is
    a configuration file of `name = value` lines (`#` comments, blank lines ignored):

    memcache = inet:host:port | unix:/path      (memcache: only; default
                                                 inet:localhost:11211)
    redis = inet:host:port | unix:/path         (redis: only; default inet:localhost:6379)
    database = N                                (redis: only; default 0)
    backup = lmdb:/path (btree:/path, hash:/path: the same LMDB file, path.db)
        A local table that keeps every entry too, under the key as given (key_format
        does not apply to it, as in Postfix): a lookup that the store cannot answer (not
        found, or the store is down) is looked up there, and found entries are put back
        into the store. Without backup, a store that is down makes every lookup a miss
        and every update a no-op: never an error for the caller.
    flags = 0                   memcache: the flags stored with each update
    ttl = 3600                  seconds an entry lives in the store and in the backup
    key_format = %s             the store key: %s the whole lookup key; %u its local part
                                (the whole key when it has no @; an empty local part
                                suppresses the request); %d its domain (no domain: no
                                request); %1 .. %9 the domain's labels from the right;
                                %S, %U, %D as %s, %u, %d; %% a percent sign
    timeout = 2                 seconds for each connect, read and write
    max_try = 2, retry_pause = 1
                                tries of one command, and the pause in seconds between
                                them; a store that refuses the connection is not tried
                                again (Postfix's rules)
    store_down_pause = 10       (postfix-py extension) seconds a store that failed a
                                command is left alone, the backup serving meanwhile, so
                                that each request does not wait for it (one warning per
                                outage)
    data_size_limit = 10240     longest value stored or accepted (longer: refused)
    Other memcache_table(5) parameters (domain, line_size_limit) are not supported: they
    are warned about and ignored.

    A store key that memcached would refuse (longer than 250 bytes, or with white space or
    control characters) is replaced by `sha256:` and the key's SHA-256 in hex, for both
    stores, so that the hosts of a fleet agree on it.

    The table is read-write: lookup(key), update(key, value), delete(key) take str;
    get(key), put(key, value: bytes) take and give bytes (TLS sessions). (lib/tables.py's
    open_table() gives a subclass whose items() is "sequence operation is not supported".) Keys are folded to lower case unless fold=False
    (tlsmgr's session ids are not).

    The backup is opened with an LMDB lock file (several processes may write it) and
    without fsync: like the store, it is a cache (acquire_cache_env(), which lib/tables.py
    uses for its writable LMDB tables too).

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
SETTINGS = {"ttl": 3600, "key_format": "%s", "timeout": 2, "max_try": 2, "retry_pause": 1,
            "store_down_pause": 10, "data_size_limit": 10240, "backup": "", "database": 0,
            "flags": 0}
INT_SETTINGS = ("ttl", "timeout", "max_try", "retry_pause", "store_down_pause",
                "data_size_limit", "database", "flags")
CONFIG_LIMIT = 65536
CACHE_MAP_SIZE = 64 * 1024 * 1024
BACKUP_SUFFIX = {"lmdb": ".lmdb", "btree": ".db", "hash": ".db"}
_EXPIRES = struct.Struct(">d")
STORE_ERRORS = (OSError, MemcacheError, redis.RedisError)
MAX_BACKUP_KEY = 511            # LMDB's key limit
_CACHE_ENVS: dict[str, list] = {}   # file -> [environment, tables using it]


class StoreConfigError(ValueError):
    """A memcache: or redis: configuration file that cannot be used."""


def acquire_cache_env(file: str) -> lmdb.Environment:
    """The read-write LMDB environment of a cache file (a backup here, and lib/tables.py's
    writable lmdb:, btree: and hash: tables): created when missing (mode 0600), with a
    lock file (several processes may write it), without fsync (it is a cache). LMDB opens
    a file once per process, so the users of one file share it. OSError or lmdb.Error."""
    shared = _CACHE_ENVS.get(file)
    if shared is not None:
        shared[1] += 1
        return shared[0]
    env = lmdb.open(file, subdir=False, map_size=CACHE_MAP_SIZE, sync=False,
                    metasync=False, readahead=False, max_dbs=0, mode=0o600)
    _CACHE_ENVS[file] = [env, 1]
    return env


def release_cache_env(file: str) -> None:
    """Give back what acquire_cache_env(file) gave; the last user closes it."""
    shared = _CACHE_ENVS.get(file)
    if shared is not None:
        shared[1] -= 1
        if shared[1] <= 0:
            del _CACHE_ENVS[file]
            shared[0].close()


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
    if out["timeout"] < 1 or out["max_try"] < 1:
        raise StoreConfigError(f"{path}: timeout and max_try must be at least 1")
    return out


def expand_key(fmt: str, key: str) -> str | None:
    """key_format applied to key; None when the format asks for a part key lacks."""
    local, at, domain = key.rpartition("@")
    if not at:
        local, domain = key, ""
    labels = domain.split(".")[::-1] if domain else []
    out, i = [], 0
    while i < len(fmt):
        c = fmt[i]
        if c == "%" and i + 1 < len(fmt):
            d = fmt[i + 1].lower()
            if d == "u" and not local or d == "d" and not domain:
                return None
            if d.isdigit() and d != "0":
                if int(d) > len(labels):
                    return None
                out.append(labels[int(d) - 1])
            else:
                out.append({"s": key, "u": local, "d": domain, "%": "%"}.get(
                    d, "%" + fmt[i + 1]))
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
        try:
            env = acquire_cache_env(file)
        except (OSError, lmdb.Error) as exc:
            raise StoreConfigError(f"{self.name}: backup {ref}: {exc}") from None
        self.backup_file = file
        return env

    @property
    def store_up(self) -> bool:
        """False while a failed store is left alone (retry_pause)."""
        return time.monotonic() >= self.down_until

    def _command(self, op: str, key: bytes, value: bytes | None):
        s = self.settings
        if op == "get":
            return self.client.get(key)
        if op == "set":
            if self.type == "memcache":
                return self.client.set(key, value, expire=s["ttl"], flags=s["flags"])
            return self.client.set(key, value, ex=s["ttl"])
        return self.client.delete(key)

    def _store(self, op: str, key: bytes, value: bytes | None = None):
        """One store command, tried max_try times; None (store left alone) when it fails."""
        if not self.store_up:
            return None
        s = self.settings
        for attempt in range(1, s["max_try"] + 1):
            try:
                return self._command(op, key, value)
            except STORE_ERRORS as exc:
                try:
                    self.client.close()
                except STORE_ERRORS:
                    pass
                refused = isinstance(exc, ConnectionRefusedError) or isinstance(
                    exc.__cause__ or exc.__context__, ConnectionRefusedError) or \
                    "refused" in str(exc).lower()
                if attempt < s["max_try"] and not refused:
                    time.sleep(s["retry_pause"])
                    continue
                self.counters["store_errors"] += 1
                self.down_until = time.monotonic() + s["store_down_pause"]
                self.warn(f"{self.ref}: {self.type} server {s[self.type]}: "
                          f"{exc or type(exc).__name__} -- "
                          f"{'using the backup' if self.backup else 'no backup'} for "
                          f"{s['store_down_pause']}s")
                return None
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

    def _keys(self, key) -> tuple[bytes | None, bytes]:
        """(the store's key, None when key_format suppresses it; the backup's key)."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", "surrogateescape")
        if self.fold:
            key = key.lower()
        text = expand_key(self.settings["key_format"], key)
        return (None if text is None else store_key(text),
                key.encode("utf-8", "surrogateescape")[:MAX_BACKUP_KEY])

    # --- the table ---------------------------------------------------------------------
    def get(self, key) -> bytes | None:
        """The value stored under key: from the store, else from the backup."""
        k, bk = self._keys(key)
        if k is None:
            return None
        self.counters["lookups"] += 1
        value = self._store("get", k)
        if value is not None and len(value) > self.settings["data_size_limit"]:
            value = None
        if value is None:
            value = self._backup_get(bk)
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
        k, bk = self._keys(key)
        if k is None:
            self.warn(f"{self.ref}: key_format {self.settings['key_format']} does not "
                      f"apply to the key; update skipped")
            return False
        if len(value) > self.settings["data_size_limit"]:
            return False
        self.counters["updates"] += 1
        stored = bool(self._store("set", k, value))
        self._backup_put(bk, value)
        return stored or self.backup is not None

    def delete(self, key) -> bool:
        """Remove key from the store and the backup; True when either had it."""
        k, bk = self._keys(key)
        if k is None:
            return False
        self.counters["deletes"] += 1
        found = bool(self._store("delete", k))
        return self._backup_delete(bk) or found

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
            release_cache_env(self.backup_file)
            self.backup = None

    def __enter__(self) -> "StoreTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<StoreTable {self.ref}>"
