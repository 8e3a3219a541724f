"""postscreen's temporary allowlist: postscreen_cache_map, in LMDB.

As Postfix's postscreen cache: the key is the client address, the value the expiry
times of its tests, `pregreet;dnsbl;pipelining;non_smtp_command;bare_newline` in seconds
since the epoch (0: never passed, 1: passed nothing but the test was off). A client
whose enabled tests have not expired is let through at once (PASS OLD).

The map is `btree:path` (Postfix's default, $data_directory/postscreen_cache), `hash:`
or `lmdb:`: all are LMDB files here, named as lib/tables.py names them (path.db, or
path.lmdb). Only postscreen writes it (one process: master.cf maxproc 1), but after a
reload the old postscreen may still finish its clients while the new one starts: LMDB's
lock file (path.db-lock) keeps their writes apart. It is opened before the chroot and
stays open. It is a cache: a damaged or
unreadable file is logged and the cache is off until postscreen restarts, and a lost
entry costs a client one more round of tests.

CLEANUP
    Every postscreen_cache_cleanup_interval (0: never) the whole map is walked, and an
    entry with an enabled test that expired more than postscreen_cache_retention_time
    ago is dropped (psc_cache_validator()); the result is logged as Postfix does:
    `cache btree:PATH full cleanup: retained=N dropped=M entries`.

CLASSES
    Cache(ref) -> opened at once; .enabled; lookup(addr) -> text or None;
        update(addr, text); cleanup(retention, enabled) -> (retained, dropped); close().

SEE ALSO
    postscreen/service.py; Postfix postscreen_dict.c, postscreen_tests.c.
"""

from __future__ import annotations

import time

import lmdb

from ..lib import msg, tables

MAP_SIZE = 64 << 20
TESTS = 5                       # pregreet, dnsbl, pipelining, non_smtp_command, bare_newline


class Cache:
    def __init__(self, ref: str):
        self.ref = ref
        self.env = None
        try:
            type_, name = tables.split_ref(ref)
        except tables.TableError as exc:
            msg.warn(f"postscreen_cache_map: {exc}; the cache is off")
            return
        path = tables.db_path(type_, name)
        if path is None:
            msg.warn(f"postscreen_cache_map: unsupported dictionary type for a cache: "
                     f"{type_}; the cache is off")
            return
        try:
            self.env = lmdb.open(path, subdir=False, map_size=MAP_SIZE, max_dbs=0,
                                 sync=False, metasync=False, readahead=False,
                                 mode=0o600, lock=True)
        except (OSError, lmdb.Error) as exc:
            msg.warn(f"cannot open {ref}: {exc}; the cache is off")

    @property
    def enabled(self) -> bool:
        return self.env is not None

    def _failed(self, exc: Exception) -> None:
        msg.warn(f"{self.ref}: {exc}; the cache is off")
        self.close()

    def lookup(self, addr: str) -> str | None:
        if self.env is None:
            return None
        try:
            with self.env.begin() as txn:
                value = txn.get(addr.encode("ascii", "replace"))
        except lmdb.Error as exc:
            self._failed(exc)
            return None
        return None if value is None else value.decode("ascii", "replace")

    def update(self, addr: str, text: str) -> None:
        if self.env is None:
            return
        try:
            with self.env.begin(write=True) as txn:
                txn.put(addr.encode("ascii", "replace"), text.encode("ascii"))
        except lmdb.MapFullError:
            msg.warn(f"{self.ref}: cache is full; entry for {addr} not saved")
        except lmdb.Error as exc:
            self._failed(exc)

    def cleanup(self, retention: float, enabled: list[bool]) -> tuple[int, int]:
        """Drop entries with an enabled test that expired more than retention ago."""
        if self.env is None:
            return 0, 0
        now = time.time()
        retained = dropped = 0
        try:
            with self.env.begin(write=True) as txn:
                for key, value in list(txn.cursor()):
                    if expired(value.decode("ascii", "replace"), now, retention, enabled):
                        txn.delete(key)
                        dropped += 1
                    else:
                        retained += 1
        except lmdb.Error as exc:
            self._failed(exc)
            return 0, 0
        msg.info(f"cache {self.ref} full cleanup: retained={retained} dropped={dropped} "
                 f"entries")
        return retained, dropped

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def parse(text: str) -> list[int]:
    """The expiry times of an entry; a missing or bad field counts as a disabled test."""
    fields = text.split(";")
    out = []
    for i in range(TESTS):
        field = fields[i] if i < len(fields) else ""
        out.append(int(field) if field.isdigit() and len(field) < 20 else 1)
    return out


def expired(text: str, now: float, retention: float, enabled: list[bool]) -> bool:
    """psc_cache_validator(): whether an enabled test of an entry would be due again
    retention seconds ago."""
    return any(on and now - retention > stamp for on, stamp in zip(enabled, parse(text)))
