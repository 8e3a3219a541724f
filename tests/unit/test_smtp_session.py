"""smtp/session.py and smtp/tls.py over a socketpair: a scripted server thread plays the
remote MTA.

Each test writes the server's side as a script (what it sends, what it expects), drives a
Session through helo(), xfer(), quit(), and checks the recipients' results, the reasons
in Postfix's words, and what went over the wire. TLS tests use trustme certificates and
Python's ssl module as the server.
"""

import socket
import ssl
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st
import trustme

from postfix_py.lib import maincf, msg
from postfix_py.lib import tls as libtls
from postfix_py.lib.smtpio import SmtpStream
from postfix_py.smtp import nexthop, session as S, tls as T, tls_policy
from sink import Script

ADDR = nexthop.Address("mx.example", "192.0.2.1", 25)
NAMADDR = "mx.example[192.0.2.1]"
RELAY = "mx.example[192.0.2.1]:25"
GREETING = b"220 mx.example ESMTP\r\n"
EHLO_PIPE = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n"
EHLO_PLAIN = b"250-mx.example\r\n250 8BITMIME\r\n"
EHLO_TLS = b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"


class Harness:
    """A Session on one end of a socketpair, a Script on the other."""

    def __init__(self, script, recipients=("a@example.org",), content=b"hello\n",
                 options=None, tls=None, tls_ctx=None, final=True, lmtp=False):
        self.client_sock, server_sock = socket.socketpair()
        # The remote side: tests/sink.py's Script, played on its end of the socketpair.
        self.script = Script(script, tls_ctx)
        self.server = threading.Thread(target=self.script, args=(server_sock,), daemon=True)
        self.logged = []
        self.d = S.Delivery("QID1", "s@example.org",
                            [S.Rcpt(r, i) for i, r in enumerate(recipients)],
                            size=len(content),
                            content=lambda: iter([content]))
        self.d.final_server = final
        self.d.log = lambda r, relay, status: self.logged.append((r.address, status, relay))
        self.options = options or S.Options(
            helo_name="client.example", lmtp=lmtp,
            timeouts={k: 2 for k in ("helo", "mail", "rcpt", "data_init", "data_xfer",
                                     "data_done", "quit", "starttls")})
        self.stream = SmtpStream(self.client_sock, 2)
        self.sess = S.ClientSession(self.stream, self.d, ADDR, self.options, tls=tls)

    def run(self, xfer=True):
        self.server.start()
        try:
            if self.sess.helo() and xfer:
                self.sess.xfer()
            self.sess.quit()
        finally:
            self.sess.close()
            self.server.join(10)
        assert self.script.error is None, self.script.error
        return self

    def result(self, i=0):
        r = self.d.recipients[i]
        return r.result, r.dsn, r.reason


def plain_dialogue(ehlo=EHLO_PLAIN, data_reply=b"250 2.0.0 Ok: queued as ABC\r\n"):
    return [("send", GREETING), ("expect", "EHLO client.example"), ("send", ehlo),
            ("expect", "MAIL FROM:<s@example.org>"), ("send", b"250 2.1.0 Ok\r\n"),
            ("expect", "RCPT TO:<a@example.org>"), ("send", b"250 2.1.5 Ok\r\n"),
            ("expect", "DATA"), ("send", b"354 go ahead\r\n"), ("data",),
            ("send", data_reply), ("expect", "QUIT"), ("send", b"221 Bye\r\n")]


def test_lockstep_delivery_stuffs_dots_and_uses_crlf():
    h = Harness(plain_dialogue(), content=b"Subject: x\n\n.dot\n..two\nend").run()
    assert h.result() == ("sent", "2.0.0", "250 2.0.0 Ok: queued as ABC")
    assert h.logged == [("a@example.org", "sent", RELAY)]
    assert h.script.data == b"Subject: x\r\n\r\n..dot\r\n...two\r\nend\r\n.\r\n"


def test_pipelining_sends_mail_rcpt_data_in_one_write():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              # No reply before all four commands are in: a client that waits would hang.
              ("expect", "MAIL FROM:<s@example.org> SIZE=6"), ("expect", "RCPT TO:<a@"),
              ("expect", "RCPT TO:<b@"), ("expect", "DATA"),
              ("send", b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"), ("data",),
              ("send", b"250 2.0.0 Ok: queued\r\n"), ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@example.org", "b@example.org")).run()
    assert [r.result for r in h.d.recipients] == ["sent", "sent"]


def test_per_recipient_replies():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              ("expect", "MAIL"), ("expect", "RCPT"), ("expect", "RCPT"), ("expect", "RCPT"),
              ("expect", "DATA"),
              ("send", b"250 Ok\r\n250 Ok\r\n450 4.2.0 <b@example.org>: greylisted\r\n"
                       b"550-5.1.1 <c@example.org>: no such user\r\n550 5.1.1 really\r\n"
                       b"354 go\r\n"),
              ("data",), ("send", b"250 2.0.0 Ok\r\n"), ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@example.org", "b@example.org", "c@example.org")).run()
    assert h.result(0)[0] == "sent"
    assert h.result(1) == ("deferred", "4.2.0", f"host {NAMADDR} said: 450 4.2.0 "
                           "<b@example.org>: greylisted (in reply to RCPT TO command)")
    assert h.result(2) == ("bounced", "5.1.1", f"host {NAMADDR} said: 550-5.1.1 "
                           "<c@example.org>: no such user 550 5.1.1 really "
                           "(in reply to RCPT TO command)")


@pytest.mark.parametrize("code,result", [(b"553 5.1.8 bad sender", "bounced"),
                                         (b"451 4.3.0 try later", "deferred")])
def test_mail_from_failure_affects_everyone(code, result):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PLAIN),
              ("expect", "MAIL"), ("send", code + b"\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@example.org", "b@example.org")).run()
    for i in (0, 1):
        assert h.result(i)[0] == result
        assert h.result(i)[2] == (f"host {NAMADDR} said: {code.decode()} "
                                  f"(in reply to MAIL FROM command)")


def test_data_rejection_and_end_of_data_deferral():
    script = plain_dialogue()[:8] + [("send", b"554 5.5.1 no thanks\r\n"), ("expect", "QUIT"),
                                     ("send", b"221 Bye\r\n")]
    h = Harness(script).run()
    assert h.result() == ("bounced", "5.5.1",
                          f"host {NAMADDR} said: 554 5.5.1 no thanks (in reply to DATA command)")
    h = Harness(plain_dialogue(data_reply=b"451 4.3.0 queue full\r\n")).run()
    assert h.result() == ("deferred", "4.3.0", f"host {NAMADDR} said: 451 4.3.0 queue full "
                                               "(in reply to end of DATA command)")


def test_reply_without_enhanced_code_gets_a_default_dsn():
    h = Harness(plain_dialogue(data_reply=b"250 queued\r\n")).run()
    assert h.result()[:2] == ("sent", "2.0.0")
    h = Harness(plain_dialogue(data_reply=b"452 4.0.0x nope\r\n")).run()
    assert h.result()[:2] == ("deferred", "4.0.0")


def test_soft_failure_on_a_non_final_server_keeps_recipients(monkeypatch):
    infos = []
    monkeypatch.setattr(msg, "info", infos.append)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              ("expect", "MAIL"), ("expect", "RCPT"), ("expect", "RCPT"), ("expect", "DATA"),
              ("send", b"250 Ok\r\n450 4.2.1 later\r\n550 5.1.1 unknown\r\n554 no valid rcpt\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@x", "b@x"), final=False).run()
    a, b = h.d.recipients
    assert a.result is None and a.keep
    assert b.result == "bounced"
    assert f"QID1: host {NAMADDR} said: 450 4.2.1 later (in reply to RCPT TO command)" in infos


@pytest.mark.parametrize("skip,final,result,dsn", [
    (True, True, "deferred", "4.7.1"),
    (True, False, None, None),
    (False, False, "bounced", "5.7.1"),
])
def test_5xx_greeting(skip, final, result, dsn):
    opts = S.Options(helo_name="c", skip_5xx_greeting=skip,
                     timeouts=dict.fromkeys(S.Options().timeouts, 2))
    h = Harness([("send", b"554 5.7.1 go away\r\n"), ("expect", "QUIT"),
                 ("send", b"221 Bye\r\n")], options=opts, final=final).run()
    r = h.d.recipients[0]
    assert r.result == result
    if result:
        assert (r.dsn, r.reason) == (dsn, f"host {NAMADDR} refused to talk to me: "
                                          f"554 5.7.1 go away")
    else:
        assert r.keep


def test_ehlo_refused_falls_back_to_helo_but_421_ends():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", b"502 5.5.2 what?\r\n"),
              ("expect", "HELO client.example"), ("send", b"250 mx.example\r\n")] + \
        plain_dialogue()[3:]
    assert Harness(script).run().result()[0] == "sent"
    script = [("send", GREETING), ("expect", "EHLO"),
              ("send", b"421 4.3.2 shutting down\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script).run()
    assert h.result() == ("deferred", "4.3.2", f"host {NAMADDR} refused to talk to me: "
                                               "421 4.3.2 shutting down")


def test_garbage_then_eof_is_a_lost_connection():
    h = Harness([("send", b"\x00\xffHELLO? garbage\r\nmore junk\r\n"), ("close",)]).run()
    assert h.result() == ("deferred", "4.4.2", f"lost connection with {NAMADDR} while "
                                               "receiving the initial server greeting")


def test_garbage_lines_are_ignored_in_a_reply():
    script = [("send", b"hello there\r\nxyz\r\n" + GREETING)] + plain_dialogue()[1:]
    assert Harness(script).run().result()[0] == "sent"


def test_timeouts_name_the_stage():
    h = Harness([("send", GREETING), ("expect", "EHLO"), ("sleep", 1)])
    opts = h.options
    opts.timeouts["helo"] = 0.5
    h.run()
    assert h.result() == ("deferred", "4.4.2", f"conversation with {NAMADDR} timed out "
                                               "while performing the EHLO handshake")
    h = Harness(plain_dialogue()[:9] + [("sleep", 1)])
    h.options.timeouts["data_done"] = 0.5
    h.run()
    assert h.result()[2] == (f"conversation with {NAMADDR} timed out while sending end of "
                             "data -- message may be sent more than once")


def test_stall_mid_data_times_out_the_body_write():
    big = b"x" * 70 + b"\n"
    content = big * (12 * 1024 * 1024 // len(big))
    h = Harness(plain_dialogue()[:9] + [("sleep", 1.5)], content=content)
    h.options.timeouts["data_xfer"] = 0.5
    h.run()
    assert h.result() == ("deferred", "4.4.2", f"conversation with {NAMADDR} timed out "
                                               "while sending message body")


def test_ten_megabyte_reply_line_is_read_in_bounded_pieces():
    huge = b"220-" + b"x" * (10 * 1024 * 1024) + b"\r\n"
    h = Harness([("send", huge + GREETING)] + plain_dialogue()[1:])
    longest = []
    real = h.stream.readline

    def readline(limit, timeout=None):
        line = real(limit, timeout)
        longest.append(len(line))
        assert len(h.stream._in) <= limit + (1 << 16)
        return line
    h.stream.readline = readline
    h.run()
    assert h.result()[0] == "sent"
    assert max(longest) <= h.options.reply_limit and len(longest) > 5000


def test_endless_reply_is_cut_off(monkeypatch):
    monkeypatch.setattr(S, "MAX_REPLY_BYTES", 100000)
    h = Harness([("send", b"220-" + b"y" * 200000 + b"\r\n"), ("sleep", 0.5)]).run()
    assert h.result()[2] == (f"lost connection with {NAMADDR} while receiving the initial "
                             "server greeting")


def test_size_limit_of_the_server():
    script = [("send", GREETING), ("expect", "EHLO"),
              ("send", b"250-mx.example\r\n250 SIZE 3\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, content=b"four").run()
    assert h.result() == ("bounced", "5.3.4", f"message size 4 exceeds size limit 3 of "
                                              f"server {NAMADDR}")


def test_lmtp_per_recipient_replies_after_data():
    script = [("send", b"220 lmtp ready\r\n"), ("expect", "LHLO client.example"),
              ("send", b"250-lmtp\r\n250 PIPELINING\r\n"),
              ("expect", "MAIL"), ("expect", "RCPT"), ("expect", "RCPT"), ("expect", "DATA"),
              ("send", b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"), ("data",),
              ("send", b"250 2.0.0 <a@x> Saved\r\n452 4.2.2 <b@x> Quota exceeded\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@x", "b@x"), lmtp=True).run()
    assert h.result(0) == ("sent", "2.0.0", "250 2.0.0 <a@x> Saved")
    assert h.result(1) == ("deferred", "4.2.2", f"host {NAMADDR} said: 452 4.2.2 <b@x> Quota "
                                                "exceeded (in reply to end of DATA command)")


@pytest.mark.parametrize("limit,content,wire", [
    (10, b"0123456789\n", b"0123456789\r\n.\r\n"),
    (10, b"0123456789AB\n", b"0123456789\r\n AB\r\n.\r\n"),
    (5, b".abcdefgh\n", b"..abcd\r\n efgh\r\n.\r\n"),   # the stuffed dot is not counted
    (0, b"x" * 2000 + b"\n", b"x" * 2000 + b"\r\n.\r\n"),
])
def test_body_writer_folds_long_lines(limit, content, wire):
    w = S.BodyWriter(limit)
    assert w.feed(content) + w.finish() == wire


def test_body_writer_across_blocks():
    w = S.BodyWriter(998)
    out = w.feed(b"line one\n") + w.feed(b".") + w.feed(b"dot line\nno newline") + w.finish()
    assert out == b"line one\r\n..dot line\r\nno newline\r\n.\r\n"
    assert not w.folded



@settings(max_examples=300, deadline=None)
@given(content=st.lists(st.sampled_from([b"a", b"bcdef", b".", b"\n", b"\n.", b"xyzxyzxyz"]),
                        max_size=40).map(b"".join),
       cuts=st.lists(st.integers(0, 200), max_size=6), limit=st.sampled_from([0, 4, 7, 998]))
def test_body_writer_output_does_not_depend_on_blocks(content, cuts, limit):
    """Whole content at once, byte by byte, or cut anywhere: the same wire form."""
    one = S.BodyWriter(limit)
    whole = one.feed(content) + one.finish()
    bytewise = S.BodyWriter(limit)
    assert b"".join(bytewise.feed(content[i:i + 1]) for i in range(len(content))) + \
        bytewise.finish() == whole
    assert bytewise.folded == one.folded
    pieces, at = [], 0
    for c in sorted(set(cuts)) + [len(content)]:
        pieces.append(content[at:c])
        at = max(at, c)
    cut = S.BodyWriter(limit)
    assert b"".join(cut.feed(p) for p in pieces) + cut.finish() == whole
    # Every line on the wire is dot-stuffed and within the limit (plus the fold's space).
    for line in whole.split(b"\r\n")[:-2]:
        assert limit <= 0 or len(line) <= limit + 1


# --- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    good = ca.issue_cert("mx.example")
    other = ca.issue_cert("other.example")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    # A chain two CAs deep: root -> intermediate -> mx.example.
    intermediate = ca.create_child_ca()
    deep = intermediate.issue_cert("mx.example")
    out = {"dir": d, "ca": ca}
    for name, cert in (("good", good), ("other", other), ("deep", deep)):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        out[name] = ctx
    return out


def starter(pki, tmp_path, level, cache=None, loglevel=1, infos=None, extra=""):
    (tmp_path / "main.cf").write_text(f"smtp_tls_CAfile = {pki['dir'] / 'ca.pem'}\n"
                                      f"smtp_tls_loglevel = {loglevel}\n"
                                      "smtp_starttls_timeout = 2s\n" + extra)
    cfg = maincf.load(str(tmp_path))
    infos = infos if infos is not None else []
    client = libtls.client_tls(cfg, "smtp", info=infos.append)
    return T.TlsStarter(client, tls_policy.Policy(level), cfg=cfg, nexthop_text="[mx.example]",
                        nexthop_domain="mx.example", cache=cache, info=infos.append,
                        warn=infos.append)


def tls_dialogue():
    return [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS), ("expect", "STARTTLS"),
            ("send", b"220 2.0.0 Ready to start TLS\r\n"), ("starttls",),
            ("expect", "EHLO client.example"), ("send", EHLO_PIPE),
            ("expect", "MAIL"), ("expect", "RCPT"), ("expect", "DATA"),
            ("send", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("data",),
            ("send", b"250 2.0.0 Ok: queued\r\n"), ("expect", "QUIT"), ("send", b"221 Bye\r\n"),
            ("eof",)]


@pytest.mark.parametrize("level,status", [("may", "Trusted"), ("encrypt", "Trusted"),
                                          ("verify", "Verified"), ("secure", "Verified")])
def test_starttls_delivery_logs_postfix_lines(pki, tmp_path, level, status):
    infos = []
    h = Harness(tls_dialogue(), tls=starter(pki, tmp_path, level, infos=infos),
                tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"
    assert h.sess.tls_active
    assert any(line.startswith(f"{status} TLS connection established to {RELAY}: TLSv1.3 "
                               "with cipher") for line in infos), infos


def test_tls_required_but_not_offered(pki, tmp_path):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PLAIN), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, tls=starter(pki, tmp_path, "encrypt")).run()
    assert h.result() == ("deferred", "4.7.4", f"TLS is required, but was not offered by "
                                               f"host {NAMADDR}")


def test_tls_required_but_refused(pki, tmp_path):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS), ("expect", "STARTTLS"),
              ("send", b"454 4.7.0 TLS not available\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, tls=starter(pki, tmp_path, "verify")).run()
    assert h.result() == ("deferred", "4.7.0", f"TLS is required, but host {NAMADDR} refused "
                                               "to start TLS: 454 4.7.0 TLS not available")


def test_opportunistic_tls_refused_goes_on_in_plain_text(pki, tmp_path):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS), ("expect", "STARTTLS"),
              ("send", b"454 4.7.0 TLS not available\r\n")] + plain_dialogue()[3:]
    h = Harness(script, tls=starter(pki, tmp_path, "may")).run()
    assert h.result()[0] == "sent" and not h.sess.tls_active


def test_handshake_failure_drops_the_connection(pki, tmp_path):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS), ("expect", "STARTTLS"),
              ("send", b"220 2.0.0 Ready to start TLS\r\n"), ("sleep", 0.2),
              ("send", b"this is not TLS\r\n" * 20),
              ("eof",)]
    infos = []
    h = Harness(script, tls=starter(pki, tmp_path, "may", infos=infos)).run()
    assert h.result() == ("deferred", "4.7.5", "Cannot start TLS: handshake failure")
    assert not h.sess.usable
    # Nothing after STARTTLS in plain text: no QUIT, no EHLO.
    assert h.script.lines == ["EHLO client.example", "STARTTLS"]
    assert any(line.startswith(f"SSL_connect error to {RELAY}") for line in infos), infos


def test_certificate_mismatch_at_verify(pki, tmp_path):
    # Postfix checks right after the handshake, and says QUIT over TLS.
    script = tls_dialogue()[:6] + [("expect", "QUIT"), ("send", b"221 Bye\r\n"), ("eof",)]
    infos = []
    h = Harness(script, tls=starter(pki, tmp_path, "verify", infos=infos),
                tls_ctx=pki["other"]).run()
    assert h.result() == ("deferred", "4.7.5", "Server certificate not verified")
    assert f"server certificate verification failed for {RELAY}: num=62:hostname mismatch" \
        in infos
    # At encrypt the same certificate is fine.
    h = Harness(tls_dialogue(), tls=starter(pki, tmp_path, "encrypt"), tls_ctx=pki["other"]).run()
    assert h.result()[0] == "sent"


def test_plaintext_injected_after_starttls_is_discarded(pki, tmp_path):
    script = tls_dialogue()
    script[4] = ("send", b"220 2.0.0 Ready\r\n250-injected\r\n250 PIPELINING\r\n")
    script[7] = ("send", EHLO_PLAIN)
    script[8:12] = [("expect", "MAIL"), ("send", b"250 Ok\r\n"), ("expect", "RCPT"),
                    ("send", b"250 Ok\r\n"), ("expect", "DATA"), ("send", b"354 go\r\n")]
    h = Harness(script, tls=starter(pki, tmp_path, "may"), tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"
    assert "PIPELINING" not in h.sess.features


def test_note_starttls_offer_at_level_none(pki, tmp_path, monkeypatch):
    infos = []
    monkeypatch.setattr(msg, "info", infos.append)
    opts = S.Options(helo_name="client.example", note_starttls_offer=True,
                     timeouts=dict.fromkeys(S.Options().timeouts, 2))
    script = plain_dialogue(ehlo=EHLO_TLS.replace(b"PIPELINING", b"8BITMIME"))
    h = Harness(script, tls=starter(pki, tmp_path, "none"), options=opts).run()
    assert h.result()[0] == "sent"
    assert "Host offered STARTTLS: [mx.example]" in infos


def test_session_is_cached_and_resumed(pki, tmp_path):
    cache = T.MemoryCache()
    infos = []
    first = starter(pki, tmp_path, "may", cache=cache, loglevel=2, infos=infos)
    Harness(tls_dialogue(), tls=first, tls_ctx=pki["good"]).run()
    key = first.cache_key
    assert key.startswith("smtp&[mx.example]&mx.example&192.0.2.1&25&") and key in cache.entries
    assert f"save session {key} to memory cache" in infos
    infos.clear()
    second = starter(pki, tmp_path, "may", cache=cache, loglevel=2, infos=infos)
    h = Harness(tls_dialogue(), tls=second, tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"
    assert second.tls_info.session_reused
    assert f"reloaded session {key} from memory cache" in infos
    assert f"{RELAY}: Reusing old session" in infos
    # Another policy gives another key: no session offered.
    third = starter(pki, tmp_path, "encrypt", cache=cache, loglevel=2)
    Harness(tls_dialogue(), tls=third, tls_ctx=pki["good"]).run()
    assert third.cache_key != key and not third.tls_info.session_reused


@pytest.mark.parametrize("depth,status", [(5, "Verified"), (2, "Verified"), (1, None)])
def test_scert_verifydepth(pki, tmp_path, depth, status):
    infos = []
    tls = starter(pki, tmp_path, "verify", infos=infos,
                  extra=f"smtp_tls_scert_verifydepth = {depth}\n")
    if status:
        h = Harness(tls_dialogue(), tls=tls, tls_ctx=pki["deep"]).run()
        assert h.result()[0] == "sent"
        assert any(line.startswith(f"{status} TLS connection") for line in infos), infos
    else:
        script = tls_dialogue()[:6] + [("expect", "QUIT"), ("send", b"221 Bye\r\n"), ("eof",)]
        h = Harness(script, tls=tls, tls_ctx=pki["deep"]).run()
        assert h.result() == ("deferred", "4.7.5", "Server certificate not verified")
        assert any("certificate chain longer than limit(1)" in line for line in infos), infos


def test_cipherlist_and_protocols(pki, tmp_path):
    infos = []
    tls = starter(pki, tmp_path, "may", infos=infos,
                  extra="smtp_tls_protocols = <=TLSv1.2\n"
                        "smtp_tls_cipherlist = ECDHE-ECDSA-AES128-GCM-SHA256\n")
    h = Harness(tls_dialogue(), tls=tls, tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"
    assert any(" TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits)" in line
               for line in infos), infos


def test_starttls_timeout(pki, tmp_path):
    # The server says yes to STARTTLS, then never sends its hello.
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS), ("expect", "STARTTLS"),
              ("send", b"220 2.0.0 Ready to start TLS\r\n"), ("sleep", 1.5)]
    infos = []
    tls = starter(pki, tmp_path, "may", infos=infos, extra="smtp_starttls_timeout = 1s\n")
    started = time.monotonic()
    h = Harness(script, tls=tls).run()
    assert time.monotonic() - started < 2.5
    assert h.result() == ("deferred", "4.7.5", "Cannot start TLS: handshake failure")
    assert f"SSL_connect error to {RELAY}: Connection timed out" in infos


def test_loglevel_zero_logs_nothing(pki, tmp_path):
    infos = []
    h = Harness(tls_dialogue(), tls=starter(pki, tmp_path, "may", loglevel=0, infos=infos),
                tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent" and h.sess.tls_active
    assert infos == []


@pytest.mark.parametrize("param", [None, "smtp_tls_cert_file", "smtp_tls_eccert_file"])
def test_client_certificate_only_when_configured(pki, tmp_path, param):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki["ca"].issue_cert("mx.example").configure_cert(ctx)
    pki["ca"].configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL       # ask, as smtpd_tls_ask_ccert = yes
    extra = ""
    if param:
        pem = tmp_path / "client.pem"
        pki["ca"].issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(
            str(pem))
        extra = f"{param} = {pem}\n"
    h = Harness(tls_dialogue(), tls=starter(pki, tmp_path, "may", extra=extra),
                tls_ctx=ctx).run()
    assert h.result()[0] == "sent"
    assert (h.script.peercert is not None) == bool(param)


@pytest.mark.parametrize("level,fallback,retry", [("may", True, True), ("may", False, False),
                                                   ("encrypt", True, False)])
def test_tls_session_failure_at_may_retries_in_plain_text(pki, tmp_path, level, fallback,
                                                          retry):
    # Postfix's PLAINTEXT_FALLBACK_OK_AFTER_TLS_SESSION_FAILURE: the connection is lost
    # inside TLS with recipients to do; on a deferred message at may, the same server again.
    script = tls_dialogue()[:8] + [("eof",)]
    h = Harness(script, tls=starter(pki, tmp_path, level), tls_ctx=pki["good"])
    h.d.plaintext_fallback = fallback
    h.run()
    assert h.sess.tls_active and h.sess.retry_plain is retry
    if retry:
        r = h.d.recipients[0]
        assert r.result is None and r.keep and not h.d.final_server
        assert h.d.why[0] == "4.4.2" and f"with {NAMADDR}" in h.d.why[1]
    else:
        assert h.result()[:2] == ("deferred", "4.4.2")


# --- SMTPUTF8 (RFC 6531), as Postfix's smtp_proto.c ----------------------------------------

EHLO_UTF8 = b"250-mx.example\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"


def test_smtputf8_is_passed_on_when_requested_and_offered():
    script = [("send", GREETING), ("expect", "EHLO client.example"), ("send", EHLO_UTF8),
              ("expect", r"^MAIL FROM:<s@example.org> SMTPUTF8$"), ("send", b"250 Ok\r\n"),
              ("expect", "^RCPT TO:<j\u00f6rg@b\u00fccher.example>$"),
              ("send", b"250 Ok\r\n"), ("expect", "DATA"), ("send", b"354 go\r\n"),
              ("data",), ("send", b"250 2.0.0 Ok\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("j\u00f6rg@b\u00fccher.example",))
    h.d.smtputf8 = True
    h.run()
    assert h.result()[0] == "sent"


def test_no_smtputf8_parameter_unless_the_sender_asked():
    h = Harness(plain_dialogue(ehlo=EHLO_UTF8)).run()
    assert h.result()[0] == "sent"
    assert "MAIL FROM:<s@example.org>" in h.script.lines


@pytest.mark.parametrize("rcpt,content", [
    ("j\u00f6rg@example.org", b"Subject: x\n\nbody\n"),
    ("a@example.org", "Subject: gr\u00fc\u00df\n\nbody\n".encode()),
])
def test_smtputf8_required_but_not_offered_bounces(rcpt, content):
    script = [("send", GREETING), ("expect", "EHLO client.example"), ("send", EHLO_PLAIN),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=(rcpt,), content=content)
    h.d.smtputf8 = True
    h.run()
    assert h.result() == ("bounced", "5.6.7", "SMTPUTF8 is required, but was not offered "
                                              f"by host {NAMADDR}")


def test_smtputf8_requested_but_all_ascii_goes_without_it():
    h = Harness(plain_dialogue(), content="Subject: x\n\nb\u00fcdy only\n".encode())
    h.d.smtputf8 = True
    h.run()
    assert h.result()[0] == "sent"
    assert "MAIL FROM:<s@example.org>" in h.script.lines


# --- DSN parameters (RFC 3461), as Postfix's smtp_proto.c ---------------------------------

EHLO_DSN = b"250-mx.example\r\n250-DSN\r\n250 8BITMIME\r\n"


def test_dsn_parameters_go_to_a_server_that_offers_dsn():
    script = [("send", GREETING), ("expect", "EHLO client.example"), ("send", EHLO_DSN),
              ("expect", r"^MAIL FROM:<s@example.org> ENVID=id\+2B1 RET=HDRS$"),
              ("send", b"250 Ok\r\n"),
              ("expect", r"^RCPT TO:<a@example.org> ORCPT=rfc822;A\+2Bx@example.org "
                         r"NOTIFY=SUCCESS,FAILURE$"), ("send", b"250 Ok\r\n"),
              ("expect", r"^RCPT TO:<b@example.org> ORCPT=rfc822;b@example.org$"),
              ("send", b"250 Ok\r\n"),
              # no DSN ORCPT: the original recipient, as smtp_proto.c
              ("expect", r"^RCPT TO:<c@example.org> ORCPT=rfc822;list@example.org$"),
              ("send", b"250 Ok\r\n"), ("expect", "DATA"), ("send", b"354 go\r\n"),
              ("data",), ("send", b"250 2.0.0 Ok\r\n"), ("expect", "QUIT"),
              ("send", b"221 Bye\r\n")]
    h = Harness(script, recipients=("a@example.org", "b@example.org", "c@example.org"))
    h.d.dsn_ret, h.d.dsn_envid = "HDRS", "id+1"
    h.d.recipients[0].notify = "SUCCESS,FAILURE"
    h.d.recipients[0].orcpt = "rfc822;A+x@example.org"
    h.d.recipients[0].original = "ignored@example.org"      # the DSN ORCPT wins
    h.d.recipients[2].original = "list@example.org"
    h.run()
    assert [r.result for r in h.d.recipients] == ["sent", "sent", "sent"]


def test_no_dsn_parameters_without_the_keyword():
    h = Harness(plain_dialogue())
    h.d.dsn_ret = "FULL"
    h.d.recipients[0].notify = "NEVER"
    h.run()
    assert h.result()[0] == "sent"
    assert "MAIL FROM:<s@example.org>" in h.script.lines
    assert "RCPT TO:<a@example.org>" in h.script.lines


@pytest.mark.parametrize("with_tls", [False, True])
def test_a_finished_client_session_is_freed_without_the_cycle_collector(pki, tmp_path,
                                                                        with_tls):
    """No reference cycle through a client session: each one (with its TLS connection)
    is freed when the delivery is done, not at the next full garbage collection."""
    import gc
    import weakref
    gc.disable()
    try:
        if with_tls:
            h = Harness(tls_dialogue(), tls=starter(pki, tmp_path, "may"),
                        tls_ctx=pki["good"]).run()
        else:
            h = Harness(plain_dialogue()).run()
        assert h.result()[0] == "sent"
        gone = weakref.ref(h.sess)
        del h.sess
        assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
    finally:
        gc.enable()


# --- address verification probes (smtp_address_verify_target) --------------------------------

def _probe(target, script):
    h = Harness(script, recipients=("a@example.org", "b@example.org"),
                options=S.Options(helo_name="client.example", verify_target=target,
                                  timeouts=dict.fromkeys(S.Options().timeouts, 2)))
    h.d.verify = True
    return h.run()


def test_a_probe_ends_at_rcpt_by_default():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              ("expect", "MAIL"), ("expect", "RCPT TO:<a@"), ("expect", "RCPT TO:<b@"),
              ("send", b"250 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@example.org>: unknown\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = _probe("rcpt", script)
    assert h.result(0) == ("sent", "2.1.5", "250 2.1.5 Ok")
    assert h.result(1)[:2] == ("bounced", "5.1.1")
    assert "DATA" not in h.script.lines


def test_a_probe_with_target_data_ends_at_354_without_quit():
    """As Postfix's smtp_proto.c: 354 makes the accepted recipients deliverable (2.0.0),
    and nothing more is sent: the server is reading the message."""
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              ("expect", "MAIL"), ("expect", "RCPT TO:<a@"), ("expect", "RCPT TO:<b@"),
              ("expect", "DATA"),
              ("send", b"250 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@example.org>: unknown\r\n"
                       b"354 End data with <CR><LF>.<CR><LF>\r\n"), ("eof",)]
    h = _probe("data", script)
    assert h.result(0) == ("sent", "2.0.0", "354 End data with <CR><LF>.<CR><LF>")
    assert h.result(1)[:2] == ("bounced", "5.1.1")
    assert h.script.lines[-1] == "DATA" and h.script.buf == b""     # no dot, no QUIT
    assert not h.sess.quit_ok


def test_a_probe_with_target_data_takes_a_data_rejection_as_the_result():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PLAIN),
              ("expect", "MAIL"), ("send", b"250 Ok\r\n"),
              ("expect", "RCPT TO:<a@"), ("send", b"250 Ok\r\n"),
              ("expect", "RCPT TO:<b@"), ("send", b"250 Ok\r\n"),
              ("expect", "DATA"), ("send", b"554 5.7.1 <a@example.org>: no mail here\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = _probe("data", script)
    for i in (0, 1):
        assert h.result(i) == ("bounced", "5.7.1", f"host {NAMADDR} said: 554 5.7.1 "
                               "<a@example.org>: no mail here (in reply to DATA command)")


def test_a_probe_with_target_data_sends_no_dot_when_no_recipient_was_accepted():
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_PIPE),
              ("expect", "MAIL"), ("expect", "RCPT TO:<a@"), ("expect", "RCPT TO:<b@"),
              ("expect", "DATA"),
              ("send", b"250 Ok\r\n550 5.1.1 unknown\r\n550 5.1.1 unknown\r\n354 go\r\n"),
              ("eof",)]
    h = _probe("data", script)
    assert [r.result for r in h.d.recipients] == ["bounced", "bounced"]
    assert h.script.buf == b""
