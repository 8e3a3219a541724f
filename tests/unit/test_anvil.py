"""anvil's counters and rate windows (injected clock), its replies, and smtpd's exception list."""

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.anvil.service import Anvil, AnvilTable, Local, TableFull
from postfix_py.lib import anvil_client, attr, maincf
from postfix_py.lib.maincf import ConfigError
from postfix_py.smtpd.check import ClientState
from postfix_py.smtpd.limits import NO_LIMITS, ClientLimits, ExceptionList, Limits

ID = "smtp:192.0.2.1"


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


# A fixed wall clock in local time, so the statistics lines have a known date.
WALL = time.mktime((2026, 12, 5, 10, 0, 0, 0, 0, -1))


def table(unit=60, **kw):
    clock = Clock()
    return AnvilTable(unit, clock=clock, wallclock=lambda: WALL, **kw), clock


def test_connection_count_follows_connects_and_disconnects():
    t, _ = table()
    a, b, c = Local(), Local(), Local()
    assert t.connect(a, ID) == (1, 1)
    assert t.connect(b, ID) == (2, 2)
    assert t.connect(c, ID) == (3, 3)
    t.disconnect(b, ID)
    assert t.lookup(ID)["count"] == 2
    t.disconnect(b, ID)                 # not b's any more: nothing changes
    assert t.lookup(ID)["count"] == 2
    t.disconnect(Local(), ID)           # never registered by this client
    assert t.lookup(ID)["count"] == 2


def test_a_client_that_goes_away_takes_its_connection_along():
    t, _ = table()
    a, b = Local(), Local()
    t.connect(a, ID)
    t.connect(b, ID)
    t.drop_local(a)
    assert t.lookup(ID)["count"] == 1


def test_a_new_connect_from_the_same_client_ends_its_previous_one():
    t, _ = table()
    a = Local()
    t.connect(a, ID)
    t.connect(a, "smtp:192.0.2.2")
    assert t.lookup(ID)["count"] == 0
    assert t.connect(a, "smtp:192.0.2.2") == (1, 2)     # count 1, rate 2


def test_rates_start_over_after_the_time_unit():
    t, clock = table(unit=60)
    a = Local()
    t.connect(a, ID)
    assert [t.event(a, ID, "mail") for _ in range(3)] == [1, 2, 3]
    assert t.event(a, ID, "rcpt") == 1
    clock.now += 60                     # not more than a unit after the first event
    assert t.event(a, ID, "mail") == 4
    clock.now += 0.5                    # now more: every rate starts over
    assert t.event(a, ID, "mail") == 1
    assert t.lookup(ID) == {"count": 1, "rate": 0, "mail": 1, "rcpt": 0, "newtls": 0, "auth": 0}


def test_connection_rate_counts_sequential_connections():
    t, clock = table(unit=10)
    a = Local()
    rates = []
    for _ in range(3):
        rates.append(t.connect(a, ID))
        t.disconnect(a, ID)
    assert rates == [(1, 1), (1, 2), (1, 3)]
    clock.now += 11
    assert t.connect(a, ID) == (1, 1)


def test_lookup_and_newtls_status_report_no_stale_rates_and_count_nothing():
    t, clock = table(unit=10)
    a = Local()
    t.connect(a, ID)
    t.event(a, ID, "ntls")
    t.event(a, ID, "ntls")
    assert t.newtls_status(ID) == 2
    assert t.newtls_status(ID) == 2
    clock.now += 11
    assert t.newtls_status(ID) == 0
    assert t.lookup(ID)["rate"] == 0
    assert t.event(a, ID, "ntls") == 1
    assert t.newtls_status("smtp:192.0.2.99") == 0
    assert t.lookup("smtp:192.0.2.99")["count"] == 0


def test_an_event_for_an_unknown_ident_counts_as_a_connection():
    t, _ = table()
    a = Local()
    assert t.event(a, ID, "rcpt") == 1      # anvil restarted after smtpd's connect
    assert t.lookup(ID)["count"] == 1
    t.disconnect(a, ID)
    assert t.lookup(ID)["count"] == 0


def test_idle_entries_are_forgotten_after_a_time_unit():
    t, clock = table(unit=10)
    a, b = Local(), Local()
    t.connect(a, ID)
    t.connect(b, "smtp:192.0.2.2")
    t.disconnect(a, ID)
    clock.now += 9
    assert t.expire() == 0
    t.disconnect(b, "smtp:192.0.2.2")
    clock.now += 1
    assert t.expire() == 1
    assert ID not in t.remotes and "smtp:192.0.2.2" in t.remotes
    clock.now += 10
    assert t.expire() == 1 and not t.remotes


def test_an_entry_that_is_busy_again_is_not_forgotten():
    t, clock = table(unit=10)
    a = Local()
    t.connect(a, ID)
    t.disconnect(a, ID)
    clock.now += 5
    t.connect(a, ID)
    clock.now += 20
    assert t.expire() == 0 and ID in t.remotes


def test_the_table_is_bounded():
    t, clock = table(unit=10, max_remotes=2)
    a, b, c = Local(), Local(), Local()
    t.connect(a, "smtp:192.0.2.1")
    t.connect(b, "smtp:192.0.2.2")
    with pytest.raises(TableFull):
        t.connect(c, "smtp:192.0.2.3")
    t.disconnect(a, "smtp:192.0.2.1")
    clock.now += 10
    assert t.connect(c, "smtp:192.0.2.3") == (1, 1)    # room made by expiry


def test_statistics_lines_are_postfix_s_and_start_over():
    t, _ = table(unit=60)
    a, b = Local(), Local()
    t.connect(a, ID)
    t.connect(b, ID)
    t.event(a, ID, "mail")
    t.event(a, ID, "rcpt")
    t.event(a, ID, "rcpt")
    t.event(a, ID, "ntls")
    t.event(a, ID, "auth")
    t.connect(Local(), "smtp:192.0.2.2")
    assert t.report() == [
        "statistics: max connection rate 2/60s for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max connection count 2 for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max message rate 1/60s for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max recipient rate 2/60s for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max newtls rate 1/60s for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max auth rate 1/60s for (smtp:192.0.2.1) at Dec  5 10:00:00",
        "statistics: max cache size 2 at Dec  5 10:00:00",
    ]
    assert t.report() == []


# --- requests and replies ------------------------------------------------------------------

@pytest.fixture
def anvil(tmp_path):
    (tmp_path / "main.cf").write_text("anvil_rate_time_unit = 30s\n")
    return Anvil(maincf.load(str(tmp_path)), clock=Clock(), wallclock=lambda: WALL)


def ask(anvil, client, **attrs):
    return attr.decode(anvil.answer(client, {k: v.encode() for k, v in attrs.items()}))


def test_requests_get_postfix_s_replies(anvil):
    c = Local()
    assert ask(anvil, c, request="connect", ident=ID) == {
        "status": b"0", "count": b"1", "rate": b"1"}
    assert ask(anvil, c, request="message", ident=ID) == {"status": b"0", "rate": b"1"}
    assert ask(anvil, c, request="recipient", ident=ID) == {"status": b"0", "rate": b"1"}
    assert ask(anvil, c, request="newtls", ident=ID) == {"status": b"0", "rate": b"1"}
    assert ask(anvil, c, request="newtls_status", ident=ID) == {"status": b"0", "rate": b"1"}
    assert ask(anvil, c, request="auth", ident=ID) == {"status": b"0", "rate": b"1"}
    assert ask(anvil, c, request="lookup", ident=ID) == {
        "status": b"0", "count": b"1", "rate": b"1", "mail": b"1", "rcpt": b"1",
        "newtls": b"1", "auth": b"1"}
    assert ask(anvil, c, request="disconnect", ident=ID) == {"status": b"0"}
    assert anvil.table.lookup(ID)["count"] == 0


@pytest.mark.parametrize("attrs, reason", [
    ({"ident": ID}, 'missing attribute "request"'),
    ({"request": "connect"}, 'missing attribute "ident"'),
    ({"request": "connect", "ident": ID, "extra": "1"}, 'unknown attribute "extra"'),
    ({"request": "explode", "ident": ID}, 'unrecognized request: "explode"'),
    ({"request": "connect", "ident": ""}, "bad ident"),
    ({"request": "connect", "ident": "smtp: 192.0.2.1"}, "bad ident"),
    ({"request": "connect", "ident": "x" * 513}, "bad ident"),
])
def test_bad_requests_get_status_2(anvil, attrs, reason):
    reply = ask(anvil, Local(), **attrs)
    assert reply["status"] == attr.STATUS_BAD.encode()
    assert reason in reply["reason"].decode()
    assert not anvil.table.remotes


def test_a_full_table_gets_status_3(anvil):
    anvil.table.max_remotes = 1
    assert ask(anvil, Local(), request="connect", ident=ID)["status"] == b"0"
    reply = ask(anvil, Local(), request="message", ident="smtp:192.0.2.2")
    assert reply["status"] == attr.STATUS_ERROR.encode() and b"table full" in reply["reason"]


# --- the client side and smtpd's limits ----------------------------------------------------

def test_ident_is_service_colon_address_and_printable():
    assert anvil_client.ident("smtp", "192.0.2.1") == "smtp:192.0.2.1"
    assert anvil_client.ident("127.0.0.1:25", "::1") == "127.0.0.1:25:::1"
    assert anvil_client.ident("sm tp", "a\x00b") == "sm?tp:a?b"


def test_client_without_anvil_returns_none_and_warns_once(tmp_path, capsys):
    from postfix_py.lib import msg
    log = tmp_path / "log"
    msg.init("smtpd", maillog_file=str(log))
    clnt = anvil_client.AnvilClient(str(tmp_path / "nothing"), timeout=1, backoff=0)
    assert clnt.connect("smtp", "192.0.2.1") is None
    assert clnt.message("smtp", "192.0.2.1") is None
    assert not clnt.disconnect("smtp", "192.0.2.1")
    lines = [l for l in log.read_text().splitlines() if "warning" in l]
    assert len(lines) == 1
    assert lines[0].endswith(f"warning: connect to {tmp_path}/nothing: No such file or directory")


def cfg(tmp_path, text=""):
    (tmp_path / "main.cf").write_text(text)
    return maincf.load(str(tmp_path))


def test_exception_list_matches_as_a_host_address_list(tmp_path):
    lst = ExceptionList(["!192.0.2.7", "192.0.2.0/24", "[2001:db8::]/32", ".example.com",
                         "host.example.net"], cfg(tmp_path))
    assert lst.match("unknown", "192.0.2.1")
    assert not lst.match("unknown", "192.0.2.7")
    assert lst.match("unknown", "::ffff:192.0.2.1")
    assert lst.match("unknown", "2001:db8::5")
    assert lst.match("mx.example.com", "198.51.100.1")
    assert not lst.match("example.com", "198.51.100.1")
    assert lst.match("HOST.example.net", "198.51.100.1")
    assert not lst.match("sub.host.example.net", "198.51.100.1")
    assert not lst.match("unknown", "198.51.100.1")


def test_exception_list_with_a_table(tmp_path):
    (tmp_path / "hoggers").write_text("198.51.100.9 ok\nbig.example ok\n")
    lst = ExceptionList([f"texthash:{tmp_path}/hoggers"], cfg(tmp_path))
    assert lst.match("unknown", "198.51.100.9")
    assert lst.match("big.example", "198.51.100.1")
    assert not lst.match("unknown", "198.51.100.1")
    with pytest.raises(ConfigError):
        ExceptionList(["nosuchtype:/x"], cfg(tmp_path))


def test_default_exceptions_are_mynetworks_and_no_limit_means_no_anvil(tmp_path):
    limits = Limits(cfg(tmp_path))      # the count limit (50) is on by default
    assert limits.active
    assert limits.session(ClientState(addr="127.0.0.1"), "smtp") is NO_LIMITS
    assert isinstance(limits.session(ClientState(addr="198.51.100.1"), "smtp"), ClientLimits)
    off = Limits(cfg(tmp_path, "smtpd_client_connection_count_limit = 0\n"))
    assert not off.active
    assert off.session(ClientState(addr="198.51.100.1"), "smtp") is NO_LIMITS


# --- hostile input over a real socket ------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
requests = st.fixed_dictionaries({}, optional={
    "request": st.sampled_from([b"connect", b"disconnect", b"message", b"recipient",
                                b"newtls", b"newtls_status", b"auth", b"lookup", b"x", b""]),
    "ident": st.one_of(st.sampled_from([b"smtp:192.0.2.1", b"smtp:::1"]), st.binary(max_size=600)),
    "other": st.binary(max_size=10)}).filter(bool)
chunks = st.lists(st.one_of(requests.map(attr.encode), st.binary(min_size=1, max_size=64)),
                  min_size=1, max_size=8)


@FUZZ
@given(chunks)
def test_anvil_answers_anything_and_stays_consistent(anvil, data):
    from postfix_py.anvil.service import _Client
    from postfix_py.lib.events import EventLoop

    loop = EventLoop()
    anvil.loop, anvil.table = None, AnvilTable(30, clock=Clock())     # fresh per example
    ours, theirs = socket.socketpair()
    try:
        anvil.on_client(ours, loop)
        client = anvil.clients[ours.fileno()]
        sent = b"".join(data)
        theirs.sendall(sent)
        theirs.shutdown(socket.SHUT_WR)
        while client.fd in anvil.clients:
            anvil._readable(client)
        theirs.settimeout(5)
        dec = attr.FrameDecoder()
        while chunk := theirs.recv(65536):
            dec.feed(chunk)
        replies = list(dec.frames())
        expected = attr.FrameDecoder()
        expected.feed(sent)
        assert len(replies) == len(list(expected.frames()))    # one reply per frame, bad or not
        assert all(isinstance(r, dict) and r["status"] in (b"0", b"2", b"3")
                               for r in replies)
        assert isinstance(client, _Client) and client.remote is None   # dropped at close
        assert all(r.count >= 0 for r in anvil.table.remotes.values())
        assert sum(r.count for r in anvil.table.remotes.values()) == 0
    finally:
        theirs.close()
        loop.close()
