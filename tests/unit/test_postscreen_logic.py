"""postscreen's pure parts: DNSBL site syntax and scoring, cache entries, the access list,
the delay format, the dummy engine's address parsing; and the request deadline of
lib/smtpio.py that smtpd_per_request_deadline uses."""

import socket
import threading
import time

import pytest

from postfix_py.lib import maincf
from postfix_py.lib.maincf import ConfigError
from postfix_py.lib.smtpio import SmtpStream, StreamTimeout
from postfix_py.postscreen import cache, dummy, service
from postfix_py.postscreen.dnsbl import Score, Sites


def config(**values):
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=values)


def test_sites_parse_weights_and_filters():
    sites = Sites(["zen.example*3", "bl.example=127.0.0.[2;3]*2", "allow.example*-1",
                   "bl.example=127.0.0.4"])
    assert sorted(sites.by_domain) == ["allow.example", "bl.example", "zen.example"]
    assert [s.weight for s in sites.by_domain["bl.example"]] == [2, 1]
    assert sites.by_domain["zen.example"][0].pattern is None
    for bad in ("zen.example*x", "bad..domain", "bl.example=127.0.0"):
        with pytest.raises(ConfigError):
            Sites([bad])


def test_score_adds_matching_weights_and_names_the_heaviest_list():
    sites = Sites(["a.example*1", "b.example=127.0.0.2*3", "b.example=127.0.0.9*5",
                   "ok.example*-2"])
    score = Score.__new__(Score)       # the scoring alone, without queries
    score.sites = sites
    score.total, score.name, score.weight, score.fail_ttl, score.pass_ttl = 0, None, 0, -1, -1
    score._score("a.example", ["127.0.0.2"], 300)
    score._score("b.example", ["127.0.0.2"], 100)
    score._score("ok.example", [], 500)
    assert (score.total, score.name) == (4, "b.example")
    assert score.ttl(60, 3600) == 100          # the least TTL of what listed it
    score._score("ok.example", ["127.0.0.2"], 900)
    assert score.total == 2


def test_reply_map_hides_a_secret_list_domain(tmp_path):
    from postfix_py.lib import tables
    (tmp_path / "reply").write_text("key123.list.example public.example\n")
    reply_map = tables.open_table(f"texthash:{tmp_path}/reply")
    sites = Sites(["key123.list.example*2", "other.example"], reply_map)
    assert sites.reply_name == {"key123.list.example": "public.example",
                                "other.example": "other.example"}
    score = Score.__new__(Score)
    score.sites = sites
    score.total, score.name, score.weight, score.fail_ttl, score.pass_ttl = 0, None, 0, -1, -1
    score._score("other.example", ["127.0.0.2"], 60)
    score._score("key123.list.example", ["127.0.0.2"], 60)
    assert (score.total, score.name) == (3, "public.example")


def test_cache_entries_parse_and_expire_as_postfix():
    assert cache.parse("1700000000;1700000060;1;1;1") == [1700000000, 1700000060, 1, 1, 1]
    assert cache.parse("12;x") == [12, 1, 1, 1, 1]             # older or damaged entries
    now = 1_700_000_000
    entry = f"{now - 10};{now + 100};1;1;1"
    on = [True, True, False, False, False]
    assert not cache.expired(entry, now, 3600, on)     # the pregreet pass lapsed 10 s ago
    assert cache.expired(entry, now, 5, on)            # ... which is past a 5 s retention
    assert not cache.expired(entry, now, 5, [False, True, False, False, False])


def test_cache_file_round_trip(tmp_path):
    c = cache.Cache(f"btree:{tmp_path}/ps")
    assert c.enabled
    c.update("192.0.2.1", "1;2;1;1;1")
    assert c.lookup("192.0.2.1") == "1;2;1;1;1" and c.lookup("192.0.2.2") is None
    assert c.cleanup(0, [True, True, False, False, False]) == (0, 1)
    c.close()
    assert (tmp_path / "ps.db").exists()
    assert not cache.Cache("texthash:/x").enabled


def test_access_list_as_server_acl(tmp_path):
    (tmp_path / "acl.cidr").write_text("192.0.2.0/24 reject\n198.51.100.1 permit\n"
                                       "198.51.100.2 dunno\n198.51.100.3 bogus\n")
    s = service.Settings(config(mynetworks="10.0.0.0/8", postscreen_access_list=
                                f"permit_mynetworks, cidr:{tmp_path}/acl.cidr, reject"))
    assert s.acl_eval("10.1.2.3") == "permit"
    assert s.acl_eval("192.0.2.9") == "reject"
    assert s.acl_eval("198.51.100.1") == "permit"
    assert s.acl_eval("198.51.100.2") == "dunno"      # dunno in a table ends the list
    assert s.acl_eval("198.51.100.3") == "dunno"      # an unknown action: warned, dunno
    assert s.acl_eval("203.0.113.1") == "reject"
    with pytest.raises(ConfigError):
        service.Settings(config(postscreen_access_list="permit_sasl_authenticated"))
    with pytest.raises(ConfigError):
        service.Settings(config(postscreen_dnsbl_action="reject"))


def test_denylist_action_follows_its_old_name():
    assert service.Settings(config(postscreen_blacklist_action="drop")).deny_action == "drop"
    assert service.Settings(config(postscreen_blacklist_action="drop",
                                   postscreen_denylist_action="enforce")).deny_action == \
        "enforce"


def test_delay_format_two_significant_digits():
    assert [service.delta_time(x) for x in (0.0512, 0.001, 0.5, 1.234, 12.5)] == \
        ["0.05", "0", "0.5", "1.2", "12"]


def test_dummy_engine_addresses():
    assert dummy._address("FROM:<a@b>", "FROM") == "a@b"
    assert dummy._address("from: <> SIZE=10", "FROM") == ""
    assert dummy._address("TO:c@d", "TO") == "c@d"
    assert dummy._address("FROM <a@b>", "FROM") is None
    assert dummy._address("TO:<a@b>", "FROM") is None


def _trickle(sock, stop, every):
    while not stop.is_set():
        try:
            sock.send(b"x\r\n")
        except OSError:
            return
        time.sleep(every)


@pytest.mark.parametrize("rate,cut", [(500, True), (None, False)])
def test_request_deadline_cuts_a_trickle_of_whole_lines(rate, cut):
    a, b = socket.socketpair()
    stop = threading.Event()
    t = threading.Thread(target=_trickle, args=(b, stop, 0.05))
    t.start()
    try:
        s = SmtpStream(a, 0.5)
        s.request_deadline(rate)
        start = time.monotonic()
        with pytest.raises(StreamTimeout) if cut else _nothing():
            while time.monotonic() - start < 1.2:
                assert s.readline(100) == b"x\r\n"
        elapsed = time.monotonic() - start
        assert (elapsed < 1.0) if cut else (elapsed >= 1.2)
        s.request_deadline(None)
        assert s.readline(100) == b"x\r\n"         # ended: lines have their own timeout
    finally:
        stop.set()
        t.join()
        a.close()
        b.close()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pass_service_runs_and_passes_a_descriptor_with_endpoints(tmp_path):
    """master.cf's pass type is runnable and listens like a unix service under private/;
    lib/passfd carries a socket and its endpoints across a unix connection."""
    from postfix_py.lib import mastercf, passfd
    from postfix_py.master import services as S
    svc = mastercf.parse("smtpd pass - - y - - smtpd\n", "master.cf")[0]
    warned = []
    assert S.runnable([svc], warned.append) == [svc] and not warned
    cfg = config(queue_directory=str(tmp_path))
    assert S.unix_path(svc, cfg) == str(tmp_path / "private" / "smtpd")
    assert S.endpoint_key(svc, cfg) == ("unix", str(tmp_path / "private" / "smtpd"))
    a, b = socket.socketpair()
    client, peer = socket.socketpair()
    try:
        ends = {"client_address": "192.0.2.1", "client_port": "4242",
                "server_address": "2001:db8::1", "server_port": "25"}
        passfd.send(a, client.fileno(), ends)
        got, endpoints = passfd.receive(b, 5)
        assert endpoints == ends
        got.sendall(b"hello")                   # the same connection, another descriptor
        assert peer.recv(5) == b"hello"
        got.close()
        a.sendall(b"Fx")                        # a frame without a descriptor
        with pytest.raises(passfd.PassError):
            passfd.receive(b, 1)
        with pytest.raises(passfd.PassError, match="bad client address syntax"):
            passfd.check(dict(ends, client_address="1.2.3"))
        with pytest.raises(passfd.PassError, match="missing server port"):
            passfd.check({k: v for k, v in ends.items() if k != "server_port"})
    finally:
        for s in (a, b, client, peer):
            s.close()


def test_dnsbl_queries_without_answer_time_out_and_score_nothing():
    """A DNS server that never answers: the queries end at postscreen_dnsbl_timeout,
    resent each second meanwhile, and the client scores 0."""
    from postfix_py.lib.events import EventLoop
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    loop = EventLoop()
    done = []
    try:
        score = Score(loop, Sites(["a.example", "b.example*2"]), [dead.getsockname()],
                      "192.0.2.1", 1.3, lambda: done.append(time.monotonic()))
        assert score.pending == 2
        start = time.monotonic()
        while not done and time.monotonic() - start < 5:
            loop.run_once(0.1)
        assert done and 1.2 < done[0] - start < 2.0
        assert (score.total, score.pending) == (0, 0)
        got = []
        dead.setblocking(False)
        while True:
            try:
                got.append(dead.recv(512))
            except BlockingIOError:
                break
        assert len(got) == 4                  # each query sent, then resent once
    finally:
        loop.close()
        dead.close()


def test_postscreen_tls_level_as_postfix():
    from postfix_py.lib import tls as T
    level = lambda **kw: T.server_security_level(config(**kw), "postscreen",
                                                 warn=warnings.append)
    warnings: list = []
    assert level() == "none"
    assert level(smtpd_tls_security_level="may") == "may"      # $smtpd_tls_security_level
    assert level(smtpd_use_tls="yes") == "may"                 # the legacy pair, as smtpd's
    assert level(postscreen_enforce_tls="yes") == "encrypt"
    assert level(smtpd_tls_security_level="may", postscreen_tls_security_level="none") == "none"
    assert level(postscreen_tls_security_level="verify") == "encrypt" and warnings
    with pytest.raises(T.TLSConfigError):
        level(postscreen_tls_security_level="dane")


def test_engine_announces_starttls_only_when_tls_is_ready():
    from postfix_py.postscreen.dummy import Engine
    ready = Engine(config(), "may", tls=object())
    lines = ready.ehlo.split("\r\n")
    assert lines[lines.index("250-ETRN") + 1] == "250-STARTTLS"
    assert "STARTTLS" not in ready.ehlo_tls                    # once TLS is up
    assert "STARTTLS" not in Engine(config(), "may", tls=None).ehlo   # no certificate
    assert "STARTTLS" not in Engine(config(), "none", tls=object()).ehlo
    assert Engine(config(), "encrypt", tls=None).enforce_tls


def test_engine_ehlo_keywords_vrfy_and_helo_settings():
    from postfix_py.postscreen.dummy import Engine
    e = Engine(config(postscreen_discard_ehlo_keywords="size, STARTTLS, chunking, nosuch"),
               "may", tls=object())
    assert e.ehlo == ("250-localhost\r\n250-VRFY\r\n250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n"
                      "250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8\r\n").replace(
                          "localhost", config().get("myhostname"))
    every = "size vrfy etrn enhancedstatuscodes 8bitmime dsn smtputf8 chunking"
    assert Engine(config(postscreen_discard_ehlo_keywords=every)).ehlo == \
        f"250 {config().get('myhostname')}\r\n"
    # EHLO follows disable_vrfy_command, VRFY itself postscreen_disable_vrfy_command
    e = Engine(config(postscreen_disable_vrfy_command="yes"))
    assert "VRFY" in e.ehlo and e.disable_vrfy
    assert "VRFY" not in Engine(config(disable_vrfy_command="yes")).ehlo
    assert Engine(config(smtpd_helo_required="yes")).helo_required
    assert not Engine(config()).helo_required


def test_cache_cleanup_in_batches_keeps_what_was_renewed_meanwhile(tmp_path):
    c = cache.Cache(f"btree:{tmp_path}/ps")
    now = int(time.time())
    old = f"{now - 100000};{now - 100000};1;1;1"
    for i in range(5):
        c.update(f"192.0.2.{i}", old)
    steps = c.cleanup_steps(10, [True, True, False, False, False], batch=2)
    next(steps)                                 # the walk is listed, nothing dropped yet
    next(steps)                                 # .0 and .1 dropped
    assert c.lookup("192.0.2.0") is None and c.lookup("192.0.2.4") == old
    c.update("192.0.2.4", f"{now + 3600};{now + 3600};1;1;1")     # a client passed again
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
    assert done.value.value == (1, 4)
    assert c.lookup("192.0.2.4") is not None and c.lookup("192.0.2.3") is None
    c.close()
