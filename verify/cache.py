"""The address verification cache: its entries and Postfix's rules for them.

ENTRIES
    As Postfix's verify(8): the key is the address (`:` written `_`, as Postfix does for
    IPv6 address literals), the value `status:probed:updated:text`:

    status   the recipient status: 0 deliverable (OK), 1 undeliverable for now (DEFER),
             2 undeliverable (BOUNCE), 3 being probed, nothing known yet (TODO)
    probed   when the probe in flight was sent, 0 when none is
    updated  when the last probe result came in, 0 when none has
    text     the probe's reason (the far end's reply, or the agent's words)

    An entry with a bad syntax, an unknown status, or both times zero is warned about
    (`bad address verify table entry: ...`) and treated as absent.

RULES (Postfix's verify_query_service and verify_update_service)
    query    An absent entry, or one that has expired while no probe is in flight (none
             sent in the last PROBE_TTL seconds), is "in progress" (TODO): with
             address_verify_negative_cache = no the expired entry is deleted. An entry
             whose status is OK expires address_verify_positive_expire_time after its
             update, any other address_verify_negative_expire_time after. When no probe
             is in flight and the result is older than its refresh time
             (address_verify_positive_refresh_time or ..._negative_refresh_time; an
             address without a result always), a probe is sent and the entry records
             its time (unless there is no result and negative caching is off).
             A cache that fails gives DEFER "Address verification status unavailable"
             and sends no probe.
    update   A probe's result replaces the entry, except that a failed probe does not
             replace an OK entry (it stays OK until it expires, and the next query
             probes again). The text is kept printable.
    cleanup  An entry is kept while a probe is in flight or it has not expired; the
             others are deleted (verify_cache_validator).

CLASSES
    Verifier(cache, settings, probe, clock=time.time): query(addr) -> (status, text);
        update(addr, status, text) -> bool (False: not a result status); cleanup() ->
        (retained, dropped). probe(addr) -> bool sends a probe message.
    Settings(cfg) or Settings(pos_exp=..., pos_try=..., neg_exp=..., neg_try=...,
        neg_cache=...): the times, in seconds.
    MemoryCache: Postfix's internal:verify, for an empty address_verify_map.
    TableCache(ref): a lib/tables.py table opened writable (lmdb:, btree:, hash:,
        memcache:, redis:); CacheError when it fails.

SEE ALSO
    verify/service.py; Postfix verify(8), verify.c.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..lib import msg, tables
from ..lib.verify_client import RCPT_BOUNCE, RCPT_DEFER, RCPT_OK, RCPT_TODO

PROBE_TTL = 1000            # seconds after which a probe without a result counts as lost
IN_PROGRESS = "Address verification in progress"
UNAVAILABLE = "Address verification status unavailable"
MAX_TEXT = 1000             # characters of a probe's text kept in an entry


class CacheError(Exception):
    """The cache cannot be read or written now."""


def cache_key(addr: str) -> str:
    """The cache key of an address (Postfix: `:` of an IPv6 literal becomes `_`)."""
    return addr.replace(":", "_")


def make_entry(status: int, probed: int, updated: int, text: str) -> str:
    return f"{status}:{probed}:{updated}:{text}"


def parse_entry(raw: str) -> tuple[int, int, int, str] | None:
    """(status, probed, updated, text) of an entry; None (warned) when it is bad."""
    fields = raw.split(":", 3)
    if len(fields) == 4 and all(f.isdigit() and len(f) < 20 for f in fields[:3]):
        status, probed, updated = int(fields[0]), int(fields[1]), int(fields[2])
        if status in (RCPT_OK, RCPT_DEFER, RCPT_BOUNCE, RCPT_TODO) and (probed or updated):
            return status, probed, updated, fields[3]
    msg.warn(f"bad address verify table entry: {raw[:100]}")
    return None


def raw_status(raw: str) -> int | None:
    """The status of an entry without parsing the rest (Postfix's atoi)."""
    head = raw.split(":", 1)[0]
    return int(head) if head.isdigit() and len(head) < 20 else None


@dataclass
class Settings:
    pos_exp: int = 31 * 86400
    pos_try: int = 7 * 86400
    neg_exp: int = 3 * 86400
    neg_try: int = 3 * 3600
    neg_cache: bool = True

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        return cls(int(cfg["address_verify_positive_expire_time"]),
                   int(cfg["address_verify_positive_refresh_time"]),
                   int(cfg["address_verify_negative_expire_time"]),
                   int(cfg["address_verify_negative_refresh_time"]),
                   cfg["address_verify_negative_cache"])

    def expired(self, status: int, updated: int, now: int) -> bool:
        """POSITIVE_ENTRY_EXPIRED or NEGATIVE_ENTRY_EXPIRED."""
        return updated + (self.pos_exp if status == RCPT_OK else self.neg_exp) < now

    def refresh(self, status: int, updated: int, now: int) -> bool:
        """POSITIVE_REFRESH_NEEDED or NEGATIVE_REFRESH_NEEDED."""
        return updated + (self.pos_try if status == RCPT_OK else self.neg_try) < now


class MemoryCache:
    """The cache of an empty address_verify_map: this process's memory (internal:)."""

    ref = "internal:verify"
    iterable = True

    def __init__(self):
        self.data: dict[str, str] = {}

    def lookup(self, key: str) -> str | None:
        return self.data.get(key)

    def update(self, key: str, value: str) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def items(self) -> list[tuple[str, str]]:
        return list(self.data.items())

    def close(self) -> None:
        self.data.clear()


class TableCache:
    """address_verify_map as a writable lib/tables.py table (keys not folded, as
    Postfix's); TableError at open, CacheError afterwards."""

    def __init__(self, ref: str):
        self.ref = ref
        self.table = tables.open_table(ref, fold=False, writable=True)
        self.iterable = self.table.iterable

    def _do(self, fn, *args):
        try:
            return fn(*args)
        except tables.TableError as exc:
            raise CacheError(str(exc)) from None

    def lookup(self, key: str) -> str | None:
        return self._do(self.table.lookup, key)

    def update(self, key: str, value: str) -> None:
        self._do(self.table.update, key, value)

    def delete(self, key: str) -> None:
        self._do(self.table.delete, key)

    def items(self) -> list[tuple[str, str]]:
        return self._do(self.table.items)

    def close(self) -> None:
        self.table.close()


class Verifier:
    """Postfix's query and update rules over a cache; see the module documentation."""

    def __init__(self, cache, settings: Settings, probe, clock=time.time):
        self.cache = cache
        self.s = settings
        self.probe = probe
        self.clock = clock

    def query(self, addr: str) -> tuple[int, str]:
        """The status and text of addr, probing when it is due."""
        now = int(self.clock())
        key = cache_key(addr)
        try:
            raw = self.cache.lookup(key)
        except CacheError as exc:
            msg.warn(f"{self.cache.ref}: {exc}")
            return RCPT_DEFER, UNAVAILABLE
        parsed = parse_entry(raw) if raw is not None else None
        if parsed is not None:
            status, probed, updated, text = parsed
        if parsed is None or (now - probed > PROBE_TTL
                              and self.s.expired(status, updated, now)):
            status, probed, updated, text = RCPT_TODO, 0, 0, IN_PROGRESS
            if raw is not None and not self.s.neg_cache:
                self._try(self.cache.delete, key)
        if now - probed > PROBE_TTL and self.s.refresh(status, updated, now):
            self.probe(addr)
            if updated != 0 or self.s.neg_cache:
                self._try(self.cache.update, key, make_entry(status, now, updated, text))
        return status, text

    def update(self, addr: str, status: int, text: str) -> bool:
        """Record a probe's result; False for a status that is not a result."""
        if status not in (RCPT_OK, RCPT_DEFER, RCPT_BOUNCE):
            msg.warn(f"bad recipient status {status} for recipient {addr}")
            return False
        key = cache_key(addr)
        if status != RCPT_OK:
            # a failed probe does not clobber an OK entry before it expires
            try:
                raw = self.cache.lookup(key)
            except CacheError as exc:
                msg.warn(f"{self.cache.ref}: {exc}")
                return True
            if raw is not None and raw_status(raw) == RCPT_OK:
                return True
        text = msg.printable(text, MAX_TEXT)
        self._try(self.cache.update, key, make_entry(status, 0, int(self.clock()), text))
        return True

    def cleanup(self) -> tuple[int, int]:
        """Delete the entries that have expired with no probe in flight."""
        now = int(self.clock())
        retained = dropped = 0
        try:
            for key, raw in self.cache.items():
                parsed = parse_entry(raw)
                if parsed is not None and (now - parsed[1] < PROBE_TTL or
                                           not self.s.expired(parsed[0], parsed[2], now)):
                    retained += 1
                else:
                    self.cache.delete(key)
                    dropped += 1
        except CacheError as exc:
            msg.warn(f"{self.cache.ref}: {exc}")
        return retained, dropped

    def _try(self, fn, *args) -> None:
        try:
            fn(*args)
        except CacheError as exc:
            msg.warn(f"{self.cache.ref}: {exc}")
