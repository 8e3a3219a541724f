"""The address verification cache: entry encoding and Postfix verify(8)'s expiry, refresh
and update rules (verify/cache.py), driven with a clock of the test's own; the server's
request handling (verify/service.py) over a real socket pair; and lib/verify_client.py
against a real VerifyServer on a UNIX socket."""

import socket
import threading
import time

import pytest

from postfix_py.lib import attr, events, maincf, msg, verify_client
from postfix_py.lib.verify_client import RCPT_BOUNCE, RCPT_DEFER, RCPT_OK, RCPT_TODO, ProbeSender
from postfix_py.verify import cache as C
from postfix_py.verify import service as S

HOUR, DAY = 3600, 86400


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(msg, "_emit", lambda severity, text, tag=None: lines.append(
        ("" if severity == "info" else severity + ": ") + text))
    return lines


class Clock:
    def __init__(self, now=1_700_000_000):
        self.now = now

    def __call__(self):
        return self.now


def verifier(neg_cache=True, cache=None):
    clock, probes = Clock(), []
    v = C.Verifier(cache or C.MemoryCache(), C.Settings(neg_cache=neg_cache),
                   lambda addr: probes.append(addr) or True, clock)
    return v, clock, probes


def test_entry_round_trip_keeps_colons_in_the_text():
    raw = C.make_entry(RCPT_BOUNCE, 0, 1234, "host x said: 550 5.1.1 no: such user")
    assert raw == "2:0:1234:host x said: 550 5.1.1 no: such user"
    assert C.parse_entry(raw) == (RCPT_BOUNCE, 0, 1234, "host x said: 550 5.1.1 no: such user")
    assert C.raw_status(raw) == RCPT_BOUNCE


@pytest.mark.parametrize("raw", ["", "garbage", "2:0:0:both times zero", "7:1:1:status",
                                 "x:1:1:t", "1:-1:5:t", "2:1:1"])
def test_bad_entries_are_warned_about_and_absent(raw, logged):
    assert C.parse_entry(raw) is None
    assert logged == [f"warning: bad address verify table entry: {raw}"]


def test_ipv6_literal_colons_are_not_key_separators():
    assert C.cache_key("u@[ipv6:2001:db8::1]") == "u@[ipv6_2001_db8__1]"


def test_unknown_address_is_in_progress_and_probed_once_per_probe_ttl():
    v, clock, probes = verifier()
    assert v.query("a@x.example") == (RCPT_TODO, C.IN_PROGRESS)
    assert probes == ["a@x.example"]
    assert v.cache.lookup("a@x.example") == f"3:{clock.now}:0:{C.IN_PROGRESS}"
    clock.now += C.PROBE_TTL                    # the probe is still in flight
    assert v.query("a@x.example") == (RCPT_TODO, C.IN_PROGRESS)
    assert probes == ["a@x.example"]
    clock.now += 1                              # lost: probe again
    v.query("a@x.example")
    assert probes == ["a@x.example"] * 2


def test_result_answers_until_refresh_then_probes_while_answering():
    v, clock, probes = verifier()
    v.query("b@x.example")
    clock.now += 5
    assert v.update("b@x.example", RCPT_BOUNCE, "550 unknown") is True
    assert v.cache.lookup("b@x.example") == f"2:0:{clock.now}:550 unknown"
    updated = clock.now
    clock.now += 3 * HOUR                       # negative refresh time: not yet past
    assert v.query("b@x.example") == (RCPT_BOUNCE, "550 unknown")
    assert len(probes) == 1
    clock.now += 1
    assert v.query("b@x.example") == (RCPT_BOUNCE, "550 unknown")    # still the answer
    assert len(probes) == 2
    assert v.cache.lookup("b@x.example") == f"2:{clock.now}:{updated}:550 unknown"


def test_entries_expire_once_no_probe_is_in_flight():
    v, clock, probes = verifier()
    v.update("c@x.example", RCPT_OK, "250 Ok")
    clock.now += 31 * DAY                       # positive expire time, not past it
    assert v.query("c@x.example")[0] == RCPT_OK                 # refreshed: a probe
    clock.now += C.PROBE_TTL + 1
    assert v.query("c@x.example") == (RCPT_TODO, C.IN_PROGRESS)
    v.update("d@x.example", RCPT_DEFER, "451 later")
    clock.now += 3 * DAY + 1
    assert v.query("d@x.example") == (RCPT_TODO, C.IN_PROGRESS)


def test_a_failed_probe_does_not_clobber_an_ok_entry():
    v, clock, _ = verifier()
    v.update("e@x.example", RCPT_OK, "250 Ok")
    ok = v.cache.lookup("e@x.example")
    clock.now += 10
    assert v.update("e@x.example", RCPT_BOUNCE, "550 no") is True
    assert v.cache.lookup("e@x.example") == ok
    assert v.update("e@x.example", RCPT_OK, "250 2.1.5 Ok") is True
    assert v.cache.lookup("e@x.example") == f"0:0:{clock.now}:250 2.1.5 Ok"


def test_update_refuses_a_status_that_is_not_a_result(logged):
    v, _, _ = verifier()
    assert v.update("f@x.example", RCPT_TODO, "x") is False
    assert logged == ["warning: bad recipient status 3 for recipient f@x.example"]
    assert v.cache.lookup("f@x.example") is None


def test_update_keeps_text_printable():
    v, clock, _ = verifier()
    v.update("g@x.example", RCPT_BOUNCE, "550 bad\r\nthing\x00")
    assert v.cache.lookup("g@x.example") == f"2:0:{clock.now}:550 bad??thing?"


def test_without_negative_caching_nothing_unknown_is_written_and_expired_ones_go():
    v, clock, probes = verifier(neg_cache=False)
    assert v.query("h@x.example") == (RCPT_TODO, C.IN_PROGRESS)
    assert v.cache.lookup("h@x.example") is None
    v.query("h@x.example")
    assert probes == ["h@x.example"] * 2        # no entry holds the probe back
    v.update("h@x.example", RCPT_DEFER, "451 later")
    clock.now += 3 * DAY + 1
    assert v.query("h@x.example") == (RCPT_TODO, C.IN_PROGRESS)
    assert v.cache.lookup("h@x.example") is None


def test_a_failing_cache_defers_and_sends_no_probe(logged):
    class Broken(C.MemoryCache):
        ref = "btree:/broken"

        def lookup(self, key):
            raise C.CacheError("read error")
    v, _, probes = verifier(cache=Broken())
    assert v.query("i@x.example") == (RCPT_DEFER, C.UNAVAILABLE)
    assert probes == [] and logged == ["warning: btree:/broken: read error"]


def test_cleanup_drops_expired_entries_but_not_probes_in_flight():
    v, clock, _ = verifier()
    v.update("old@x.example", RCPT_BOUNCE, "550")
    v.update("ok@x.example", RCPT_OK, "250")
    clock.now += 3 * DAY + 1
    v.query("old2@x.example")                   # a probe in flight, nothing known
    v.cache.update("bad@x.example", "junk")
    assert v.cleanup() == (2, 2)
    assert sorted(k for k, _ in v.cache.items()) == ["ok@x.example", "old2@x.example"]


def test_lmdb_table_cache_round_trip(tmp_path):
    cache = C.TableCache(f"btree:{tmp_path}/verify_cache")
    try:
        v = C.Verifier(cache, C.Settings(), lambda addr: True, Clock())
        v.update("Mixed@X.example", RCPT_OK, "250 Ok")
        assert v.query("Mixed@X.example") == (RCPT_OK, "250 Ok")
        assert v.query("mixed@x.example") == (RCPT_TODO, C.IN_PROGRESS)   # not folded
        assert cache.iterable and (tmp_path / "verify_cache.db").exists()
    finally:
        cache.close()


def _cfg(**kw):
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides={
        "myorigin": "origin.example", "myhostname": "h.example", **kw})


def test_probe_sender_follows_address_verify_sender():
    def sender(**kw):
        return ProbeSender(_cfg(**kw)).make(time.time())
    assert sender() == "double-bounce@origin.example"
    assert sender(address_verify_sender="<>") == ""
    assert sender(address_verify_sender="") == ""
    assert sender(address_verify_sender="probe@x.example") == "probe@x.example"
    assert ProbeSender.error(_cfg()) is None
    assert ProbeSender.error(_cfg(address_verify_sender="@x.example")) == \
        "parameter address_verify_sender: value \"@x.example\" must not start with '@'"
    assert ProbeSender.error(_cfg(address_verify_sender="probe@")) == \
        "parameter address_verify_sender: value \"probe@\" must not end with '@'"


def test_probe_sender_ttl_appends_a_base31_time_stamp_to_the_local_part():
    # epoch 1127 = 1*31^2 + 5*31 + 11: the digits 1, 5 and C (0-9, then B-Z without vowels)
    now = 1127 * 3600 + 1799
    ps = ProbeSender(_cfg(address_verify_sender_ttl="1h"))
    assert ps.make(now) == "double-bounce15C@origin.example"
    assert ProbeSender(_cfg(address_verify_sender_ttl="1h", address_verify_sender="probe")
                       ).make(now) == "probe15C@origin.example"
    assert ProbeSender(_cfg(address_verify_sender_ttl="1h", address_verify_sender="<>")
                       ).make(now) == ""
    assert ps.make(now + 3600) == "double-bounce15D@origin.example"       # the next hour


def test_a_probe_sender_is_recognised_within_one_ttl():
    # Postfix's verify_sender_addr.ref: the slots before and after match, two away not
    now = 1127 * 3600
    ps = ProbeSender(_cfg(address_verify_sender_ttl="1h"))
    for stamp, ok in (("159", False), ("15B", True), ("15C", True), ("15D", True),
                      ("15F", False)):
        assert ps.valid(f"double-bounce{stamp}@origin.example", now) == \
            ("double-bounce@origin.example" if ok else None), stamp
    assert ps.valid("Double-Bounce15C@ORIGIN.example", now) == "double-bounce@origin.example"
    for bad in ("double-bounce@origin.example", "double-bounce15c@origin.example",
                "double-bounce15C@other.example", "double-bounce15C", "someone@origin.example",
                "double-bounce15C-x@origin.example"):
        assert ps.valid(bad, now) is None, bad
    fixed = ProbeSender(_cfg())
    assert fixed.valid("double-bounce@origin.example", now) == "double-bounce@origin.example"
    assert fixed.valid("double-bounce15C@origin.example", now) is None
    null = ProbeSender(_cfg(address_verify_sender="<>"))
    assert null.valid("", now) == "" and null.valid("x@origin.example", now) is None


# --- the server over a socket, and the client -----------------------------------------------

class _Server:
    """A VerifyServer on a UNIX socket, its event loop in a thread, probes recorded."""

    def __init__(self, path):
        cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf",
                            overrides={"myorigin": "o.example", "myhostname": "h.example"})
        self.srv = S.VerifyServer(cfg, C.MemoryCache(), None, "/nonexistent")
        self.probes = []
        self.srv.verifier.probe = lambda addr: self.probes.append(addr) or True
        self.loop = events.EventLoop()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.stop = False
        self.loop.add_reader(self.listener, self._accept)
        self.thread = threading.Thread(target=lambda: self.loop.run(until=lambda: self.stop),
                                       daemon=True)
        self.thread.start()

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.srv.on_client(conn, self.loop)

    def close(self):
        self.stop = True
        self.loop.call_later(0, lambda: None)
        self.thread.join(5)
        self.srv.close_clients()
        self.listener.close()
        self.loop.close()


@pytest.fixture
def server(tmp_path):
    s = _Server(tmp_path / "verify")
    yield s, tmp_path / "verify"
    s.close()


def test_client_queries_and_updates_a_real_server(server):
    s, path = server
    clnt = verify_client.VerifyClient(str(path), timeout=5)
    try:
        assert clnt.query("j@x.example") == (RCPT_TODO, C.IN_PROGRESS)
        assert s.probes == ["j@x.example"]
        assert clnt.update("j@x.example", RCPT_BOUNCE, "550 5.1.1 unknown") is True
        assert clnt.query("j@x.example") == (RCPT_BOUNCE, "550 5.1.1 unknown")
    finally:
        clnt.close()


def test_server_refuses_bad_requests(server, logged):
    _, path = server
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        for request, reason in [
                ({"request": "probe", "addr": "a@b"}, 'unrecognized request: "probe"'),
                ({"request": "query"}, 'request "query": missing attribute "addr"'),
                ({"request": "query", "addr": "a@b", "x": "1"},
                 'request "query": unknown attribute "x"'),
                ({"request": "query", "addr": ""}, 'bad address ""'),
                ({"request": "update", "addr": "a@b", "addr_status": "x", "why": ""},
                 'bad addr_status "x"')]:
            sock.sendall(attr.encode(request))
            reply = attr.read_frame(sock, 5)
            assert reply["status"] == b"2" and reason in reply["reason"].decode(), reply
        sock.sendall(attr.encode({"request": "update", "addr": "a@b", "addr_status": "3",
                                  "why": "x"}))
        assert attr.read_frame(sock, 5)["status"] == b"2"
    assert "warning: bad recipient status 3 for recipient a@b" in logged


def test_client_without_a_server_warns_and_returns_nothing(tmp_path, logged):
    clnt = verify_client.VerifyClient(str(tmp_path / "none"), timeout=1)
    assert clnt.query("k@x.example") is None
    assert clnt.update("k@x.example", RCPT_OK, "250") is False
    assert logged[0] == "warning: problem talking to service verify: No such file or directory"
