"""lib/milter.py against a scripted milter (tests/milter_peer.py): negotiation, events and
macros, replies, every end-of-message edit through lib/cleanup.py, and a milter that is
down, hangs up or times out (milter_default_action, Postfix's warnings)."""

import os
import struct

import pytest

from milter_peer import MilterPeer, cstrings
from postfix_py.lib import cleanup, maincf, milter, msg, tables
from postfix_py.lib import queue as Q
from postfix_py.lib.maincf import ConfigError
from postfix_py.smtpd import milters as smtpd_milters

MACROS = {"j": "mx.test.example", "{daemon_name}": "mx.test.example", "v": "postfix-py 0.1.0",
          "_": "client.example [192.0.2.1]", "i": "QID", "{mail_addr}": "a@example.org",
          "{rcpt_addr}": "b@example.org"}


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(msg, "_emit", lambda severity, text, tag=None: lines.append(
        ("" if severity == "info" else severity + ": ") + text))
    return lines


def config(tmp_path, **settings):
    conf = {"myhostname": "mx.test.example", "mydestination": "$myhostname", **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    return maincf.load(str(tmp_path))


def milters_for(cfg, *names):
    return milter.Milters(milter.parse(", ".join(names), cfg), cfg, MACROS.get)


def envelope(ms, sender="a@example.org", rcpts=("b@example.org",)):
    """The SMTP stages; the first reply that is not continue, or None."""
    for call in (lambda: ms.conn_event("client.example", "192.0.2.1", "4321"),
                 lambda: ms.helo_event("client.example"),
                 lambda: ms.mail_event([f"<{sender}>", "BODY=8BITMIME"]),
                 *[(lambda r=r: ms.rcpt_event([f"<{r}>"])) for r in rcpts],
                 lambda: ms.data_event()):
        reply = call()
        if reply is not None:
            return reply
    return None


def deliver(tmp_path, cfg, ms, content, sender="a@example.org", rcpts=("b@example.org",)):
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    c = cleanup.Cleanup(cleanup.Settings(cfg), root, origin="client.example[192.0.2.1]",
                        proto="ESMTP", helo="client.example", milters=ms)
    c.set_sender(sender)
    for r in rcpts:
        c.add_recipient(r)
    c.write(content)
    result = c.finish()
    sub = {"queued": "incoming", "held": "hold"}.get(result.status)
    if sub is None:
        return result, None, None
    path = os.path.join(root, sub, result.queue_id)
    env = Q.read(path)
    return result, env, b"".join(env.content(path)).decode()


CONTENT = (b"Received: from client.example (client.example [192.0.2.1])\n\tby mx\n"
           b"Subject: hello\nX-Old: one\nX-Old: two\nTo: b@example.org\n\nline 1\n.line 2\n")


def test_negotiation_events_and_macros(tmp_path):
    cfg = config(tmp_path)
    with MilterPeer(symlist={milter.ENVRCPT: "{rcpt_addr} j"}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, env, data = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert result.status == "queued"
    assert data == CONTENT.decode()
    (opt, masks), *_ = peer.events
    assert opt == "O" and masks == [6, 0x1FF, 0x1FFFFF]
    assert peer.letters() == "OCHMRTLLLLNBEQ"       # own Received: header hidden
    ev = dict((e, d) for e, d in peer.events if e != "D")
    assert ev["C"] == ["client.example", "4", "192.0.2.1"]
    assert ev["M"] == ["<a@example.org>", "BODY=8BITMIME"]
    assert ev["B"] == ["line 1\r\n.line 2\r\n"]
    headers = [d for e, d in peer.events if e == "L"]
    assert headers[0] == ["Subject", "hello"]
    assert peer.macros("C") == {"j": "mx.test.example", "{daemon_name}": "mx.test.example",
                                "v": "postfix-py 0.1.0", "_": "client.example [192.0.2.1]"}
    assert peer.macros("M") == {"i": "QID", "{mail_addr}": "a@example.org"}
    # the milter's own list for RCPT replaces milter_rcpt_macros
    assert peer.macros("R") == {"{rcpt_addr}": "b@example.org", "j": "mx.test.example"}
    assert peer.macros("E") == {"i": "QID"}


def test_every_modification_action(tmp_path, logged):
    cfg = config(tmp_path)
    eom = [("h", cstrings("X-Added", "yes")),
           ("i", struct.pack("!I", 0) + cstrings("X-Top", "first")),
           ("m", struct.pack("!I", 2) + cstrings("X-Old", "changed")),
           ("m", struct.pack("!I", 1) + cstrings("Subject", "")),
           ("b", b"new body\r\n"), ("b", b"second line\r\n"),
           ("+", cstrings("<c@example.org>")),
           ("2", cstrings("<d@example.org>", "NOTIFY=NEVER")),
           ("-", cstrings("<b@example.org>")),
           ("e", cstrings("<new@example.org>")),
           ("c", b"")]
    with MilterPeer({"E": eom}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, env, data = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert result.status == "queued"
    assert env.sender == "new@example.org"
    assert [(r.address, r.notify) for r in env.recipients] == \
        [("c@example.org", ""), ("d@example.org", "NEVER")]
    assert data == ("X-Top: first\n"
                    "Received: from client.example (client.example [192.0.2.1])\n\tby mx\n"
                    "X-Old: one\nX-Old: changed\nTo: b@example.org\nX-Added: yes\n\n"
                    "new body\nsecond line\n")


@pytest.mark.parametrize("eom, status, reply, log", [
    ([("r", b"")], "rejected", "550 5.7.1 Command rejected",
     "milter-reject: END-OF-MESSAGE from client.example[192.0.2.1]: 5.7.1 Command "
     "rejected; from=<a@example.org> to=<b@example.org> proto=ESMTP helo=<client.example>"),
    ([("t", b"")], "deferred", "451 4.7.1 Service unavailable - try again later",
     "milter-reject: END-OF-MESSAGE"),
    ([("y", b"554 5.7.0 Go away\0")], "rejected", "554 5.7.0 Go away",
     "milter-reject: END-OF-MESSAGE from client.example[192.0.2.1]: 5.7.0 Go away;"),
    ([("d", b"")], "discarded", "",
     "milter-discard: END-OF-MESSAGE from client.example[192.0.2.1]: milter triggers "
     "DISCARD action;"),
    ([("q", b"suspect\0"), ("h", cstrings("X-Q", "1")), ("c", b"")], "held", "",
     "milter-hold: END-OF-MESSAGE from client.example[192.0.2.1]: suspect;"),
])
def test_end_of_message_verdicts(tmp_path, logged, eom, status, reply, log):
    cfg = config(tmp_path)
    with MilterPeer({"E": eom}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, env, data = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert (result.status, result.reply) == (status, reply)
    assert any(log in line for line in logged), logged
    if status == "held":
        assert "X-Q: 1\n" in data


def test_stage_replies_and_connection_state(tmp_path):
    cfg = config(tmp_path)
    with MilterPeer({"R": [("y", b"550 5.1.1 <b@example.org>: no such user\0")],
                     "M": [("p", b""), ("p", b""), ("c", b"")]}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) == "550 5.1.1 <b@example.org>: no such user"
        ms.abort()
        assert ms.mail_event(["<x@example.org>"]) is None
        ms.disc_event()
    assert peer.letters().endswith("RAMQ")
    with MilterPeer({"C": [("r", b"")]}) as peer:
        ms = milters_for(cfg, peer.name)
        assert ms.conn_event("c", "192.0.2.1", "1") == "550 5.7.1 Command rejected"
        # the reject lasts for the connection, with no more events sent
        assert ms.mail_event(["<a@example.org>"]) == "550 5.7.1 Command rejected"
        ms.disc_event()
    assert "M" not in peer.letters()
    with MilterPeer({"C": [("a", b"")]}) as peer, MilterPeer() as second:
        ms = milters_for(cfg, peer.name, second.name)
        assert envelope(ms) is None          # the first accepts: the second still sees all
        ms.disc_event()
    assert "M" not in peer.letters() and "M" in second.letters()


def test_protocol_flags_skip_events(tmp_path):
    cfg = config(tmp_path)
    # no connect, no helo, no reply to headers (SMFIP_NOCONNECT|NOHELO|NR_HDR)
    with MilterPeer(protocol=0x1 | 0x2 | 0x80) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, _, _ = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert result.status == "queued"
    assert peer.letters() == "OMRTLLLLNBEQ"


def test_milter_down_refused(tmp_path, logged):
    cfg = config(tmp_path)
    with MilterPeer() as peer:
        name = peer.name
    ms = milters_for(cfg, name)
    assert ms.conn_event("c", "192.0.2.1", "1") == \
        "451 4.7.1 Service unavailable - try again later"
    assert f"warning: connect to Milter service {name}: Connection refused" in logged
    assert ms.mail_event(["<a@example.org>"]) == \
        "451 4.7.1 Service unavailable - try again later"
    for action, reply in (("accept", None), ("reject", "550 5.5.0 Service unavailable"),
                          ("quarantine", "Hdefault_action")):
        ms = milters_for(cfg, f"{{ {name}, default_action={action} }}")
        assert ms.conn_event("c", "192.0.2.1", "1") == reply


def test_milter_hangs_up_at_negotiation(tmp_path, logged):
    cfg = config(tmp_path, milter_default_action="accept")
    with MilterPeer(optneg="close") as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
    assert logged[:2] == [
        f"warning: milter {peer.name}: can't read SMFIC_OPTNEG reply packet header: Success",
        f"warning: milter {peer.name}: read error in initial handshake"]


def test_milter_timeout_then_default_action(tmp_path, logged):
    cfg = config(tmp_path)
    with MilterPeer(delay=("M", 3)) as peer:
        ms = milters_for(cfg, f"{{ {peer.name}, command_timeout=1s, "
                              "default_action=reject }")
        assert ms.conn_event("c", "192.0.2.1", "1") is None
        assert ms.mail_event(["<a@example.org>"]) == "550 5.5.0 Service unavailable"
        assert ms.rcpt_event(["<b@example.org>"]) == "550 5.5.0 Service unavailable"
    assert f"warning: milter {peer.name}: can't read SMFIC_MAIL reply packet header: " \
        "Connection timed out" in logged


def test_malformed_reply_is_a_configuration_error(tmp_path, logged):
    cfg = config(tmp_path)
    with MilterPeer({"M": [("y", b"250 fine\0")]}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) == "451 4.3.5 Server configuration problem - try again later"
    assert f"warning: milter {peer.name}: malformed reply: 250 fine" in logged


def test_milter_lists(tmp_path):
    cfg = config(tmp_path)
    specs = milter.parse("inet:127.0.0.1:1 unix:/run/m.sock, { inet:[::1]:2, "
                         "connect_timeout=5s content_timeout=1m, protocol=4 }", cfg)
    assert [(s.transport, s.address) for s in specs] == \
        [("inet", ("127.0.0.1", "1")), ("unix", "/run/m.sock"), ("inet", ("::1", "2"))]
    assert specs[2].timeouts == {"connect_timeout": 5, "command_timeout": 30,
                                 "content_timeout": 60}
    assert specs[2].version == 4 and specs[0].default_action == "tempfail"
    for bad in ("127.0.0.1:1", "tcp:host:1", "{ inet:h:1, bogus=1 }", "{ inet:h:1",
                "{ inet:h:1, protocol=5 }"):
        with pytest.raises(ConfigError):
            milter.parse(bad, cfg)


def test_soft_bounce_makes_a_milter_reply_temporary(tmp_path):
    cfg = config(tmp_path, soft_bounce="yes")
    with MilterPeer({"M": [("y", b"550-5.7.1 first\r\n550 5.7.1 second\0")]}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) == "450-4.7.1 first\r\n450 4.7.1 second"
        ms.disc_event()


def test_header_indexes_skip_postfix_own_received_header():
    m = milter.Message(b"Received: own\nReceived: theirs\nSubject: s\n\nbody\n", None)
    assert m.visible_headers() == [("Received", " theirs"), ("Subject", " s")]
    m.chg_header(1, "received", " changed")          # the first one the milter saw
    m.ins_header(1, "X-First", " 1")                  # position 1: above everything
    m.del_header(1, "Subject")
    m.chg_header(1, "X-Missing", " added")            # not there: added, as Postfix
    assert m.content() == (b"X-First: 1\nReceived: own\nreceived: changed\n"
                           b"X-Missing: added\n\nbody\n")


def test_milter_header_checks(tmp_path, logged):
    (tmp_path / "mhc").write_text("/^X-Spam: yes/ REJECT spam from a milter\n"
                                  "/^X-Drop:/ IGNORE\n/^X-Tag:/ PREPEND X-Tagged: 1\n")
    cfg = config(tmp_path, milter_header_checks=f"regexp:{tmp_path / 'mhc'}")
    eom = [("h", cstrings("X-Drop", "1")), ("h", cstrings("X-Tag", "t")), ("c", b"")]
    with MilterPeer({"E": eom}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, _, data = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert result.status == "queued"
    assert data.endswith("To: b@example.org\nX-Tagged: 1\nX-Tag: t\n\nline 1\n.line 2\n")
    with MilterPeer({"E": [("h", cstrings("X-Spam", "yes")), ("c", b"")]}) as peer:
        ms = milters_for(cfg, peer.name)
        assert envelope(ms) is None
        result, _, _ = deliver(tmp_path, cfg, ms, CONTENT)
        ms.disc_event()
    assert (result.status, result.reply) == ("rejected", "550 5.7.1 spam from a milter")
    assert any(": milter-header-reject: header X-Spam: yes from client.example[192.0.2.1]; "
               "from=<a@example.org> to=<b@example.org> proto=ESMTP helo=<client.example>: "
               "5.7.1 spam from a milter" in line for line in logged), logged


def test_no_milters_override(tmp_path):
    # receive_override_options = no_milters: smtpd runs no smtpd_milters (a content
    # filter's re-injection service), as Postfix's setup_milters
    cfg = config(tmp_path, smtpd_milters="inet:127.0.0.1:9")
    assert len(smtpd_milters.prepare(cfg).for_client("127.0.0.1")) == 1
    cfg = config(tmp_path, smtpd_milters="inet:127.0.0.1:9",
                 receive_override_options="no_milters")
    assert smtpd_milters.prepare(cfg).for_client("127.0.0.1") == []


class _Failing(tables.Table):
    """A table whose every lookup fails, as a database that cannot be read."""

    def lookup(self, key):
        raise tables.TableError("read database /x: broken")


def test_smtpd_milter_maps_choice(tmp_path, capsys):
    """smtpd/milters.Prepared: the map's result for the client address (smtpd_milters'
    syntax), DISABLE in any case, else smtpd_milters; a lookup error falls back to
    smtpd_milters with a warning, as Postfix's setup_milters()."""
    cfg = config(tmp_path, smtpd_milters="inet:127.0.0.1:9",
                 smtpd_milter_maps="inline:{ {127.0.0.2 = inet:127.0.0.1:8, unix:/m},"
                                   " 127.0.0.3=Disable }")
    prepared = smtpd_milters.prepare(cfg)
    names = [[s.name for s in prepared.for_client(a)]
             for a in ("127.0.0.1", "127.0.0.2", "127.0.0.3")]
    assert names == [["inet:127.0.0.1:9"], ["inet:127.0.0.1:8", "unix:/m"], []]
    failing = smtpd_milters.Prepared(cfg, prepared.default, [_Failing("x", "y")])
    assert [s.name for s in failing.for_client("127.0.0.2")] == ["inet:127.0.0.1:9"]
    assert "warning: smtpd_milter_maps: read database /x: broken" in capsys.readouterr().err
    # receive_override_options = no_milters: neither applies
    cfg = config(tmp_path, smtpd_milters="inet:127.0.0.1:9", smtpd_milter_maps="static:x",
                 receive_override_options="no_milters")
    assert smtpd_milters.prepare(cfg).for_client("127.0.0.2") == []
