"""history - the TLS history per next hop, in LMDB, kept by tlsmgr.

NAME
    history - the last TLS outcomes of every next hop the smtp client delivered to

DESCRIPTION
    For each next hop (the delivery request's, lower-cased) tlsmgr keeps the last
    smtp_tls_history_size outcomes as one JSON array, oldest first; each outcome is the
    JSON object that the smtp client sent (lib/tls_history.py: time, server, level,
    protocol, cipher, certificate fingerprint and issuer, verified, resumed). tlsmgr
    does not interpret them: the smtp client compares, and `postfix-py tls history`
    shows them. Unlike the session caches, the file is kept across restarts (it is a
    record, not a cache), and it is written by tlsmgr alone (one writer, one home:
    the smtp client runs chrooted and asks over private/tlsmgr).

    tlsmgr requests (tlsmgr/service.py, DESIGN.md "tlsmgr protocol"):
    request=history_update nexthop=N record=JSON
        append the record (1..4096 bytes of JSON object text) to N's history; the reply
        carries `history_json`, N's history before this record (a JSON array), so that
        the client can compare with what it saw before.
    request=history_lookup [nexthop=N]
        `history_json`: a JSON object of next hop -> array, for N only or for every
        next hop (at most MAX_REPLY bytes: next hops in key order until full, then
        `truncated` = 1).
    Status 1 (not found) when smtp_tls_history_database is empty or unusable.

CONFIGURATION PARAMETERS
    smtp_tls_history_database (empty: no history; postfix-py extension)
    smtp_tls_history_size (10; postfix-py extension), lmdb_map_size

SEE ALSO
    lib/tls_history.py, tlsmgr/service.py, smtp/service.py, tools/postfix_tls.py.
"""

from __future__ import annotations

import json
import os

import lmdb

from postfix_py.lib import msg

SUFFIX = ".lmdb"
MAX_KEY = 511
MAX_RECORD = 4096
MAX_REPLY = 900_000
MAX_GROWTH = 16


class History:
    """The TLS history file: next hop -> JSON array of the last `size` records."""

    def __init__(self, database: str, path: str, size: int, map_size: int, warn=msg.warn):
        self.database = database
        self.file = path + SUFFIX
        self.size = size
        self.map_size = map_size
        self.warn = warn
        self.env: lmdb.Environment | None = None

    def open(self) -> bool:
        """Open (or create) the file; warn and stay disabled when that fails."""
        try:
            # lock=False: only tlsmgr opens the file (see tlsmgr/scache.py).
            self.env = lmdb.open(self.file, subdir=False, map_size=self.map_size, max_dbs=0,
                                 sync=False, metasync=False, readahead=False,
                                 mode=0o600, lock=False)
        except (OSError, lmdb.Error) as exc:
            self.warn(f"cannot open TLS history {self.database} ({self.file}): {exc}"
                      " -- history disabled")
            self.env = None
            return False
        return True

    @property
    def enabled(self) -> bool:
        return self.env is not None

    def _get(self, txn, key: bytes) -> list:
        raw = txn.get(key)
        if raw is None:
            return []
        try:
            value = json.loads(raw)
        except ValueError:
            return []
        return value if isinstance(value, list) else []

    def update(self, nexthop: bytes, record: dict) -> list | None:
        """Append record; return the history before it, or None when it was not stored."""
        if self.env is None:
            return None
        key = nexthop.lower()
        for _ in range(4):
            try:
                with self.env.begin(write=True) as txn:
                    before = self._get(txn, key)
                    after = (before + [record])[-self.size:]
                    txn.put(key, json.dumps(after, separators=(",", ":")).encode())
                return before
            except lmdb.MapFullError:
                if self.map_size * 2 > self.map_size * MAX_GROWTH:
                    break
                self.map_size *= 2
                try:
                    self.env.set_mapsize(self.map_size)
                except lmdb.Error:
                    break
            except lmdb.Error as exc:
                self.warn(f"TLS history {self.database}: {exc}")
                return None
        self.warn(f"TLS history {self.database}: map full, outcome for "
                  f"{nexthop.decode('utf-8', 'replace')} not stored")
        return None

    def lookup(self, nexthop: bytes | None = None) -> tuple[dict, bool]:
        """({next hop: records}, truncated) for one next hop or all of them."""
        out: dict = {}
        if self.env is None:
            return out, False
        total = 0
        try:
            with self.env.begin() as txn:
                if nexthop is not None:
                    records = self._get(txn, nexthop.lower())
                    if records:
                        out[nexthop.lower().decode("utf-8", "replace")] = records
                    return out, False
                for key, raw in txn.cursor():
                    total += len(key) + len(raw) + 8
                    if total > MAX_REPLY:
                        return out, True
                    try:
                        records = json.loads(raw)
                    except ValueError:
                        continue
                    out[key.decode("utf-8", "replace")] = records
        except lmdb.Error as exc:
            self.warn(f"TLS history {self.database}: {exc}")
        return out, False

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def parse_record(data: bytes) -> dict | None:
    """A record from a request: a JSON object of at most MAX_RECORD bytes, else None."""
    if not 1 <= len(data) <= MAX_RECORD:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def file_path(spec: str) -> str:
    """The path of a `type:path` database (lmdb, btree and hash are all LMDB here)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("lmdb", "btree", "hash") or not os.path.isabs(path):
        raise ValueError(f"unsupported database \"{spec}\" (use lmdb:/absolute/path)")
    return path
