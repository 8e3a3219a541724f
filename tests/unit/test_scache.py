"""tlsmgr's LMDB session caches: entries, expiry, bounded sweeps, full maps, damage."""

import os

import pytest

from postfix_py.tlsmgr import scache
from postfix_py.tlsmgr.scache import SessionCache


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def make_cache(tmp_path):
    caches = []

    def make(timeout=3600, map_size=1 << 20, name="cache", clock=None):
        warnings = []
        cache = SessionCache("smtp", f"btree:{tmp_path}/{name}", str(tmp_path / name), timeout,
                             map_size, clock=clock or Clock(), warn=warnings.append)
        cache.warnings = warnings
        caches.append(cache)
        assert cache.open()
        return cache

    yield make
    for cache in caches:
        cache.close()


def test_parse_database():
    assert scache.parse_database("btree:/var/lib/x") == ("btree", "/var/lib/x")
    assert scache.parse_database("hash:/x") == ("hash", "/x")
    assert scache.parse_database("lmdb:/x") == ("lmdb", "/x")
    assert scache.parse_database("/x") == ("lmdb", "/x")
    with pytest.raises(scache.CacheError, match="unsupported session cache type \"sdbm\""):
        scache.parse_database("sdbm:/x")
    with pytest.raises(scache.CacheError, match="no file name"):
        scache.parse_database("btree:")


def test_update_lookup_delete(make_cache, tmp_path):
    cache = make_cache()
    assert cache.file == f"{tmp_path}/cache.lmdb"
    assert cache.lookup(b"smtp&mx.example&192.0.2.1&25") is None
    assert cache.update(b"smtp&mx.example&192.0.2.1&25", b"session-1")
    assert cache.lookup(b"smtp&mx.example&192.0.2.1&25") == b"session-1"
    assert cache.update(b"smtp&mx.example&192.0.2.1&25", b"session-2")      # replaces
    assert cache.lookup(b"smtp&mx.example&192.0.2.1&25") == b"session-2"
    assert cache.delete(b"smtp&mx.example&192.0.2.1&25") is True
    assert cache.delete(b"smtp&mx.example&192.0.2.1&25") is False
    assert cache.lookup(b"smtp&mx.example&192.0.2.1&25") is None
    s = cache.stats()
    assert (s["lookups"], s["hits"], s["misses"], s["updates"], s["deletes"]) == (4, 2, 2, 2, 1)
    assert s["hit_ratio"] == 0.5 and s["entries"] == 0 and s["enabled"]
    assert 0 < s["map_use"] < 1 and s["map_size"] == 1 << 20
    assert oct(os.stat(cache.file).st_mode & 0o777) == "0o600"


def test_an_entry_older_than_the_timeout_is_never_returned(make_cache):
    clock = Clock()
    cache = make_cache(timeout=100, clock=clock)
    cache.update(b"k", b"v")
    clock.now += 100
    assert cache.lookup(b"k") == b"v"           # exactly the timeout: not older
    clock.now += 0.5
    assert cache.lookup(b"k") is None           # older: gone, and deleted
    assert cache.stats()["entries"] == 0 and cache.counters["expired"] == 1


def test_malformed_entries_are_dropped(make_cache):
    cache = make_cache()
    with cache.env.begin(write=True) as txn:
        txn.put(b"short", b"1234")              # too short for a timestamp
    assert cache.lookup(b"short") is None
    assert cache.stats()["entries"] == 0


def test_sweep_removes_expired_entries_in_bounded_batches(make_cache):
    clock = Clock()
    cache = make_cache(timeout=100, clock=clock)
    for i in range(500):
        cache.update(b"old%04d" % i, b"x" * 50)
    clock.now += 60
    for i in range(500):
        cache.update(b"new%04d" % i, b"y" * 50)
    clock.now += 60                              # the old ones are 120 s old, the new 60 s
    steps = 0
    while True:
        steps += 1
        with cache.env.begin(write=True) as txn:    # a batch never holds a transaction between steps
            pass
        assert cache.lookup(b"new0001") == b"y" * 50    # clients are served between batches
        if cache.sweep_step(limit=100):
            break
    assert steps == 10
    assert cache.stats()["entries"] == 500 and cache.counters["expired"] == 500
    assert cache.sweep_step(limit=100) is False         # a new pass starts from the beginning


def test_full_map_purges_expired_before_growing(make_cache):
    clock = Clock()
    cache = make_cache(timeout=10, map_size=65536, clock=clock)
    for i in range(12):
        assert cache.update(b"old%d" % i, os.urandom(3000))
    size, before = cache.env.info()["map_size"], len(cache.warnings)
    clock.now += 20
    stored = sum(cache.update(b"new%d" % i, os.urandom(3000)) for i in range(12))
    assert stored == 12
    assert cache.counters["expired"] == 12 and cache.stats()["entries"] == 12
    # Expired entries go first; LMDB reuses freed pages only after one more commit, so a
    # map this small may still have to grow once more.
    assert cache.warnings[before] == (f"TLS session cache {cache.database}: map full at {size}"
                                      " bytes: removed 12 expired entries")
    assert cache.env.info()["map_size"] <= 2 * size


def test_full_map_grows_then_evicts_oldest_never_fails(make_cache):
    clock = Clock()
    cache = make_cache(timeout=3600, map_size=65536, clock=clock)
    for i in range(400):
        clock.now += 1
        assert cache.update(b"key%04d" % i, os.urandom(3000)), i
        assert cache.lookup(b"key%04d" % i) is not None     # the newest is always there
    assert cache.env.info()["map_size"] == 65536 * scache.MAX_GROWTH
    assert cache.counters["evicted"] > 0
    assert cache.lookup(b"key0000") is None                # the oldest went first
    grew = [w for w in cache.warnings if "grew it to" in w]
    evicted = [w for w in cache.warnings if "oldest entries" in w]
    assert len(grew) == 3 and len(evicted) == 1            # evictions are logged once a minute


def test_a_session_larger_than_the_largest_map_is_refused(make_cache):
    cache = make_cache(map_size=65536)
    assert cache.update(b"k", b"x" * (65536 * scache.MAX_GROWTH)) is False
    assert cache.warnings[-1].endswith("bytes not stored")
    assert cache.update(b"k2", b"small")                   # and the cache still works


def test_open_starts_empty(make_cache, tmp_path):
    first = make_cache(name="c")
    first.update(b"k", b"v")
    first.close()
    second = make_cache(name="c")
    assert second.lookup(b"k") is None and second.stats()["entries"] == 0


def test_garbage_file_at_start_is_replaced(make_cache, tmp_path):
    (tmp_path / "c.lmdb").write_bytes(b"this is not an lmdb file" * 1000)
    cache = make_cache(name="c")
    assert cache.update(b"k", b"v") and cache.lookup(b"k") == b"v"
    assert cache.warnings == []


def test_corrupt_file_is_recreated_with_a_warning(make_cache):
    cache = make_cache()
    for i in range(50):
        cache.update(b"k%d" % i, b"v" * 200)
    with open(cache.file, "r+b") as f:                 # damage it under the open environment
        size = f.seek(0, 2)
        f.seek(0)
        f.write(b"\xff" * size)
    assert cache.lookup(b"k1") is None
    assert len(cache.warnings) == 1
    assert cache.warnings[0].startswith(f"TLS session cache {cache.database} ({cache.file}): ")
    assert cache.warnings[0].endswith("-- recreating it")
    assert cache.counters["recreated"] == 1 and cache.enabled
    assert cache.update(b"k1", b"fresh") and cache.lookup(b"k1") == b"fresh"


def test_unusable_path_disables_the_cache(tmp_path):
    (tmp_path / "dir.lmdb").mkdir()
    warnings = []
    cache = SessionCache("smtp", f"btree:{tmp_path}/dir", str(tmp_path / "dir"), 3600, 1 << 20,
                         warn=warnings.append)
    assert cache.open() is False and not cache.enabled
    assert warnings[0].startswith(f"cannot open TLS session cache btree:{tmp_path}/dir")
    assert warnings[0].endswith("-- cache disabled")
    assert cache.lookup(b"k") is None and cache.update(b"k", b"v") is False
    assert cache.delete(b"k") is False and cache.sweep_step() is True
    assert cache.stats()["enabled"] is False


def test_overlong_key_is_refused_not_fatal(make_cache):
    cache = make_cache()
    assert cache.update(b"k" * 600, b"v") is False
    assert cache.lookup(b"k" * 600) is None
    assert cache.delete(b"k" * 600) is False
    assert cache.counters["recreated"] == 0
