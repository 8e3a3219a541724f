"""smtp/conncache.py's rules: when a connection is cached, reused, and ended."""

import time

from postfix_py.lib import maincf
from postfix_py.smtp import conncache, tls_policy


class FakeSession:
    def __init__(self, relay="mx[192.0.2.1]:25"):
        self.relay = relay
        self.ended = []

    def quit(self, timeout=None):
        self.ended.append(("quit", timeout))

    def close(self):
        self.ended.append(("close",))


class Addr:
    namaddrport = "mx[192.0.2.1]:25"


def cache(**overrides) -> conncache.ConnectionCache:
    cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf").with_overrides(overrides)
    return conncache.ConnectionCache(cfg, "smtp", conncache.Board())


def test_policy_on_demand_and_destinations():
    c = cache()
    assert c.policy((), "example.com") == (False, False)
    assert c.policy(("conn_load",), "example.com") == (True, False)
    assert c.policy(("conn_load", "conn_store"), "example.com") == (True, True)
    c = cache(smtp_connection_cache_on_demand="no",
              smtp_connection_cache_destinations="[Example.COM], other.net")
    assert c.policy(("conn_load", "conn_store"), "mx.test") == (False, False)
    assert c.policy((), "example.com") == (True, True)


def test_tls_reuse_default_parameter_and_policy_attribute():
    assert not cache().may_store_tls(tls_policy.Policy("may"))
    assert cache(smtp_tls_connection_reuse="yes").may_store_tls(tls_policy.Policy("may"))
    assert cache().may_store_tls(tls_policy.Policy("may", connection_reuse=True))
    assert not cache(smtp_tls_connection_reuse="yes").may_store_tls(
        tls_policy.Policy("may", connection_reuse=False))
    parsed = tls_policy.parse_policy("encrypt connection_reuse=yes", "t", "d", lambda t: None)
    assert parsed.connection_reuse is True


def test_reuse_limits():
    c = cache(smtp_connection_reuse_time_limit="10s", smtp_connection_reuse_count_limit="3")
    now = time.monotonic()
    assert not c.expired(now, 1, now + 5)
    assert c.expired(now, 1, now + 10)
    assert c.expired(now, 3, now)
    assert not cache().expired(now, 1000, now)          # count 0: no limit


def test_store_take_expire_and_the_board():
    c = cache(smtp_connection_cache_time_limit="1s")
    other = cache()                 # a sibling worker: the same memory, another slot
    other.board.mem = c.board.mem
    other.board.slot = (c.board.slot + 1) % conncache.BOARD_SLOTS
    key = c.key("Example.com", Addr(), tls_policy.Policy("may"))
    assert c.take(key) is None and c.due() is None
    s = FakeSession()
    c.store(key, s, time.monotonic(), 1)
    assert c.accept_delay() == 0                        # it has connections to offer
    assert other.accept_delay() == conncache.ACCEPT_DELAY   # a sibling should wait
    assert 0 < c.due() <= 1
    entry = c.take(key)
    assert entry.session is s and entry.uses == 1 and not c.entries
    assert other.accept_delay() == 0
    c.store(key, s, time.monotonic(), 2)
    time.sleep(1.05)
    c.expire()
    assert not c.entries and s.ended == [("quit", conncache.QUIT_TIMEOUT), ("close",)]
    # A key for another policy is another connection.
    assert key != c.key("example.com", Addr(), tls_policy.Policy("encrypt"))


def test_close_all_ends_every_connection():
    c = cache()
    sessions = [FakeSession(), FakeSession()]
    for n, s in enumerate(sessions):
        c.store(("k", n), s, time.monotonic(), 1)
    c.close_all()
    assert all(s.ended for s in sessions) and not c.entries
