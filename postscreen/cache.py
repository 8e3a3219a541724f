"""postscreen's temporary allowlist: postscreen_cache_map, a table opened writable.

As Postfix's postscreen cache: the key is the client address, the value the expiry
times of its tests, `pregreet;dnsbl;pipelining;non_smtp_command;bare_newline` in seconds
since the epoch (0: never passed, 1: passed nothing but the test was off). A client
whose enabled tests have not expired is let through at once (PASS OLD).

The map is opened by lib/tables.py's open_table(writable=True), keys not folded:
    btree:path (Postfix's default, $data_directory/postscreen_cache), hash:, lmdb:
        An LMDB file of the host (path.db, or path.lmdb), created when missing. Only
        postscreen writes it (one process: master.cf maxproc 1), but after a reload the
        old postscreen may still finish its clients while the new one starts: LMDB's
        lock file (path.db-lock) keeps their writes apart.
    memcache:/file, redis:/file
        A store that the postscreens of a fleet share (lib/table_store.py, the file is
        memcache_table(5)'s configuration; `key_format = postscreen:%s` keeps the entries
        apart from other users of the store): a client that passed on one host is PASS
        OLD on every other. The store's ttl bounds an entry's life. A lookup waits for
        the store (timeout, max_try in the file) in postscreen's one event loop, as
        Postfix's does; a store that fails is left alone for store_down_pause seconds.
The table is opened before the chroot, with mail_owner's effective uid and gid, and
stays open. It is a cache: a table that cannot be opened, or an LMDB file that fails
later, is logged and the cache is off until postscreen restarts; a lost entry costs a
client one more round of tests. Any other type is refused ("... map requires O_RDONLY
access mode"): the cache is off.

CLEANUP
    Every postscreen_cache_cleanup_interval (0: never) the whole map is walked, and an
    entry with an enabled test that expired more than postscreen_cache_retention_time
    ago is dropped (psc_cache_validator()), BATCH entries per turn of postscreen's event
    loop; the result is logged as Postfix does:
    `cache btree:PATH full cleanup: retained=N dropped=M entries`. memcache: and redis:
    cannot be walked (Postfix's memcache: has no first-next API, and its POSTSCREEN_README
    says to set the interval to 0): for them postscreen_cache_cleanup_interval is
    ignored, and the store's ttl drops old entries instead (its backup file drops an
    entry past the ttl when it is looked up, and expired ones when it is full).

CLASSES
    Cache(ref) -> opened at once; .enabled; .iterable; lookup(addr) -> text or None;
        update(addr, text); cleanup(retention, enabled) -> (retained, dropped);
        cleanup_steps(retention, enabled): the same in batches, a generator; close().

SEE ALSO
    postscreen/service.py, lib/tables.py, lib/table_store.py; Postfix postscreen_dict.c,
    postscreen_tests.c, POSTSCREEN_README ("Sharing the temporary allowlist").
"""

from __future__ import annotations

import time

from ..lib import msg, tables

TESTS = 5                       # pregreet, dnsbl, pipelining, non_smtp_command, bare_newline
BATCH = 1000                    # cleanup entries per event loop turn (~25 ms of deletes)


class Cache:
    def __init__(self, ref: str):
        self.ref = ref
        self.table = None
        try:
            self.table = tables.open_table(ref, fold=False, writable=True)
        except tables.TableError as exc:
            msg.warn(f"postscreen_cache_map: {exc}; the cache is off")

    @property
    def enabled(self) -> bool:
        return self.table is not None

    @property
    def iterable(self) -> bool:
        """Whether cleanup() can walk the table (not memcache:, redis:)."""
        return self.table is not None and self.table.iterable

    def _failed(self, exc: Exception) -> None:
        msg.warn(f"{self.ref}: {exc}; the cache is off")
        self.close()

    def lookup(self, addr: str) -> str | None:
        if self.table is None:
            return None
        try:
            return self.table.lookup(addr)
        except tables.TableError as exc:
            self._failed(exc)
            return None

    def update(self, addr: str, text: str) -> None:
        """Remember an entry; a full or unreachable table has warned already."""
        if self.table is None:
            return
        try:
            self.table.update(addr, text)
        except tables.TableError as exc:
            self._failed(exc)

    def cleanup(self, retention: float, enabled: list[bool]) -> tuple[int, int]:
        """The whole walk at once (see cleanup_steps()): (retained, dropped)."""
        steps = self.cleanup_steps(retention, enabled)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def cleanup_steps(self, retention: float, enabled: list[bool], batch: int = BATCH):
        """Drop entries with an enabled test that expired more than retention ago, batch
        entries per next(), so that postscreen's event loop serves clients between
        batches (as Postfix's dict_cache cleans in the background) and a large cache
        never keeps one pass past postscreen_watchdog_timeout. The generator returns
        (retained, dropped); a table that cannot be walked is left to its ttl: (0, 0),
        nothing logged."""
        if not self.iterable:
            return 0, 0
        now = time.time()
        retained = dropped = 0
        try:
            entries = self.table.items()
            yield
            for i, (key, value) in enumerate(entries, 1):
                if self.table is None:
                    return retained, dropped        # failed meanwhile: off, and said so
                if expired(value, now, retention, enabled):
                    # a client may have renewed it since the walk began: ask again
                    value = self.table.lookup(key)
                if value is None:
                    pass
                elif expired(value, now, retention, enabled):
                    self.table.delete(key)
                    dropped += 1
                else:
                    retained += 1
                if i % batch == 0:
                    yield
        except tables.TableError as exc:
            self._failed(exc)
            return 0, 0
        msg.info(f"cache {self.ref} full cleanup: retained={retained} dropped={dropped} "
                 f"entries")
        return retained, dropped

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None


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
