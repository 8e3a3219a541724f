"""memcache: and redis: tables (lib/table_store.py) against real memcached and redis-server,
and their users: tlsmgr's session caches, postscreen's cache."""

import pytest

from postfix_py.lib import table_store, tables
from postfix_py.postscreen import cache
from postfix_py.tlsmgr import cli, scache
from stores import MEMCACHED, REDIS, Memcached, Redis

pytestmark = pytest.mark.skipif(not (MEMCACHED and REDIS), reason="needs memcached, redis")


def test_parse_config_and_key_format(tmp_path):
    s = table_store.parse_config("memcache", "m.cf", "# c\nmemcache = inet:[::1]:11212\n"
                                 "ttl = 60\nkey_format = tls:%s\n")
    assert s["endpoint"] == ("inet", "::1", 11212) and s["ttl"] == 60
    assert table_store.parse_config("redis", "r.cf", "redis = unix:/run/r.sock\n")[
        "endpoint"] == ("unix", "/run/r.sock")
    for bad in ("ttl = soon\n", "memcache = inet:host\n", "nonsense\n", "timeout = 0\n"):
        with pytest.raises(table_store.StoreConfigError):
            table_store.parse_config("memcache", "m.cf", bad)
    assert table_store.expand_key("%u/%d%%", "bob@example.org") == "bob/example.org%"
    assert table_store.expand_key("v:%S", "Bob@x") == "v:Bob@x"
    assert table_store.expand_key("%1.%2/%3", "a@mail.example.com") == "com.example/mail"
    assert table_store.expand_key("%4", "a@mail.example.com") is None
    assert table_store.expand_key("%u", "@example.com") is None
    assert table_store.expand_key("%d", "nodomain") is None
    assert table_store.store_key("a b") == table_store.store_key("a b")
    assert table_store.store_key("a b").startswith(b"sha256:")
    assert table_store.store_key("x" * 300).startswith(b"sha256:")
    assert table_store.store_key("smtp&[mx]:25") == b"smtp&[mx]:25"


@pytest.fixture(params=["memcache", "redis"])
def store(request, tmp_path):
    server = Memcached() if request.param == "memcache" else Redis(tmp_path)
    with server:
        conf = tmp_path / f"{request.param}.cf"
        conf.write_text(f"{request.param} = inet:127.0.0.1:{server.port}\n"
                        f"backup = lmdb:{tmp_path}/backup\nttl = 60\ntimeout = 1\n"
                        "key_format = t:%s\nstore_down_pause = 1\n")
        yield request.param, server, conf


def test_read_write_and_backup_when_the_store_is_down(store, tmp_path):
    kind, server, conf = store
    warnings = []
    a = tables.open_table(f"{kind}:{conf}")
    a.warn = warnings.append
    other = tmp_path / "other.cf"                   # a second host: the same store
    other.write_text(conf.read_text().replace("/backup", "/backup2"))
    b = tables.open_table(f"{kind}:{other}")
    c = tables.open_table(f"{kind}:{conf}")         # a second table on the same backup
    c.close()
    try:
        assert a.lookup("Key@Example.org") is None
        assert a.update("Key@Example.org", "value 1")
        assert b.lookup("key@example.org") == "value 1"          # folded, shared
        assert a.put(b"\x00binary id", b"\xff\x00session")
        assert b.get(b"\x00binary id") == b"\xff\x00session"
        assert a.delete("key@example.org") and b.lookup("key@example.org") is None
        with pytest.raises(tables.TableError, match="sequence operation"):
            a.items()
        a.update("k2", "kept")
        server.stop()
        assert a.lookup("k2") == "kept"                 # from the backup
        assert a.update("k3", "while down") and a.lookup("k3") == "while down"
        assert len(warnings) == 1 and "using the backup" in warnings[0]
        assert a.counters["backup_hits"] == 2
    finally:
        a.close()
        b.close()


def test_without_backup_a_dead_store_is_a_miss(tmp_path):
    with Memcached() as server:
        port = server.port
    conf = tmp_path / "m.cf"
    conf.write_text(f"memcache = inet:127.0.0.1:{port}\ntimeout = 1\n")
    t = tables.open_table(f"memcache:{conf}")
    t.warn = lambda text: None
    try:
        assert t.lookup("x") is None and not t.update("x", "y") and not t.store_up
    finally:
        t.close()


def test_bad_config_is_a_table_error(tmp_path):
    with pytest.raises(tables.TableError, match="open .*: No such file"):
        tables.open_table(f"redis:{tmp_path}/missing.cf")
    (tmp_path / "r.cf").write_text("backup = nosuch:/x\n")
    with pytest.raises(tables.TableError, match="backup"):
        tables.open_table(f"redis:{tmp_path}/r.cf")


def test_tlsmgr_session_cache_on_a_store(tmp_path):
    now = [1000.0]
    with Memcached() as server:
        conf = tmp_path / "m.cf"
        conf.write_text(f"memcache = inet:127.0.0.1:{server.port}\n")
        one = scache.StoreSessionCache("smtp", f"memcache:{conf}",
                                       tables.open_table(f"memcache:{conf}", fold=False),
                                       timeout=60, clock=lambda: now[0])
        two = scache.StoreSessionCache("smtp", f"memcache:{conf}",
                                       tables.open_table(f"memcache:{conf}", fold=False),
                                       timeout=60, clock=lambda: now[0])
        try:
            assert one.open() and one.lookup(b"smtp&Mx&id") is None
            assert one.update(b"smtp&Mx&id", b"\x30session")
            assert two.lookup(b"smtp&Mx&id") == b"\x30session"     # another tlsmgr
            assert two.lookup(b"smtp&mx&id") is None                # not folded
            now[0] += 61
            assert two.lookup(b"smtp&Mx&id") is None                # past the timeout
            stats = two.stats()
            assert (stats["hits"], stats["misses"], stats["expired"]) == (1, 2, 1)
            text = cli.format_report({"caches": {"smtp": {**stats, "shared_by": "smtp"}}})
            assert "shared store up, 0 store errors" in text
        finally:
            one.close()
            two.close()


def test_postscreen_cache_on_a_store(store, tmp_path):
    """postscreen_cache_map = memcache:/redis: (postscreen/cache.py): two hosts' caches
    share entries; the cleanup walk is skipped (the store's ttl ages entries out)."""
    kind, server, conf = store
    other = tmp_path / "other.cf"
    other.write_text(conf.read_text().replace("/backup", "/backup2"))
    one, two = cache.Cache(f"{kind}:{conf}"), cache.Cache(f"{kind}:{other}")
    try:
        assert one.enabled and not one.iterable
        one.update("2001:DB8::7", "1900000000;1;1;1;1")
        assert two.lookup("2001:DB8::7") == "1900000000;1;1;1;1"
        assert one.cleanup(0, [True] * 5) == (0, 0)
        assert two.lookup("2001:DB8::7") is not None               # nothing walked
    finally:
        one.close()
        two.close()
