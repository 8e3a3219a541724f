"""smtp/sasl.py: credential lookup order, mechanism choice, and the AUTH exchange over a
socketpair (the scripted server of test_smtp_session)."""

import base64

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib.maincf import ConfigError
from postfix_py.smtp import sasl as C
from test_smtp_session import GREETING, NAMADDR, RELAY, Harness

SECRET = "s3cr:et pass"


class DictTable:
    """A lookup table that records the keys asked for."""

    def __init__(self, entries):
        self.entries = {k.lower(): v for k, v in entries.items()}
        self.asked = []

    def lookup(self, key):
        self.asked.append(key)
        return self.entries.get(key.lower())


def client(entries=None, **kw):
    table = DictTable(entries or {})
    return C.Client(maps=[table], **kw), table


# --- credentials -----------------------------------------------------------------------

def test_lookup_order_host_then_nexthop_as_written():
    c, t = client({"[mail.isp.example]:587": "nexthop:pw", "mx.example": "host:pw"})
    assert c.credentials("mx.example", "[mail.isp.example]:587") == ("host", "pw")
    assert t.asked == ["mx.example"]
    c, t = client({"[mail.isp.example]:587": "nexthop:pw"})
    assert c.credentials("mail.isp.example", "[mail.isp.example]:587") == ("nexthop", "pw")
    assert t.asked == ["mail.isp.example", "[mail.isp.example]:587"]


def test_no_sender_key_unless_sender_dependent():
    c, t = client({"alice@example.org": "a:b"})
    assert c.credentials("h", "d", "alice@example.org") is None
    assert t.asked == ["h", "d"]
    c, t = client({"@example.org": "dom:pw"}, sender_auth=True)
    assert c.credentials("h", "d", "alice@example.org") == ("dom", "pw")
    assert t.asked == ["alice@example.org", "@example.org"]


def test_value_splits_at_first_colon():
    c, _ = client({"h": f"user:{SECRET}"})
    assert c.credentials("h", "") == ("user", SECRET)
    c, _ = client({"h": "useronly"})
    assert c.credentials("h", "") == ("useronly", "")


def test_first_table_with_an_entry_wins():
    a, b = DictTable({}), DictTable({"h": "b:1"})
    c = C.Client(maps=[a, b])
    assert c.credentials("h", "") == ("b", "1")


# --- mechanisms ------------------------------------------------------------------------

NOPLAIN = frozenset({"noplaintext", "noanonymous"})
NOANON = frozenset({"noanonymous"})


def test_mechanism_choice():
    c = C.Client(options=NOPLAIN, tls_options=NOANON)
    assert c.choose(["LOGIN", "PLAIN", "CRAM-MD5"], tls=True) == (
        ["LOGIN", "PLAIN", "CRAM-MD5"], ["PLAIN", "LOGIN"])
    assert c.choose(["LOGIN", "GSSAPI"], tls=True)[1] == ["LOGIN"]
    # Without TLS, noplaintext refuses both.
    assert c.choose(["PLAIN", "LOGIN"], tls=False) == (["PLAIN", "LOGIN"], [])
    assert c.choose(["GSSAPI", "NTLM"], tls=True)[1] == []


def test_mechanism_filter():
    c = C.Client(tls_options=NOANON, mech_filter=["login", "cram-md5"])
    assert c.choose(["PLAIN", "LOGIN"], tls=True) == (["LOGIN"], ["LOGIN"])
    assert c.choose(["PLAIN"], tls=True) == ([], [])


def test_parse_mechs():
    assert C.parse_mechs(["PLAIN", "login", "PLAIN", "CRAM-MD5"]) == ["PLAIN", "LOGIN",
                                                                       "CRAM-MD5"]


def test_from_config(tmp_path):
    (tmp_path / "main.cf").write_text("")
    cfg = maincf.load(str(tmp_path))
    assert C.from_config(cfg) is None
    pw = tmp_path / "pw"
    pw.write_text("[h]:587 u:p\n")
    cfg = cfg.with_overrides({"smtp_sasl_auth_enable": "yes",
                              "smtp_sasl_password_maps": f"texthash:{pw}",
                              "smtp_sasl_tls_security_options": "noanonymous"})
    c = C.from_config(cfg)
    assert c.options == NOPLAIN and c.tls_options == NOANON and c.soft_bounce
    assert c.credentials("h", "[h]:587") == ("u", "p")
    with pytest.raises(ConfigError):
        C.from_config(cfg.with_overrides({"smtp_sasl_password_maps": ""}))
    with pytest.raises(ConfigError):
        C.from_config(cfg.with_overrides({"smtp_sasl_security_options": "nosuch"}))


# --- the exchange ------------------------------------------------------------------------

EHLO_AUTH = b"250-mx.example\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
PLAIN_IR = base64.b64encode(f"\0user\0{SECRET}".encode()).decode()


def b64(text):
    return base64.b64encode(text.encode()).decode()


def harness(script, c, nexthop="[mx.example]:25", tls_active=False, final=True):
    h = Harness(script, final=final)
    h.options.sasl = c
    h.sess._nexthop = nexthop
    h.chat = []
    h.sess.chat = lambda d, line: h.chat.append((d, line))
    return h


def rest_of_mail():
    return [("expect", "MAIL FROM:<s@example.org>"), ("send", b"250 2.1.0 Ok\r\n"),
            ("expect", "RCPT TO:<a@example.org>"), ("send", b"250 2.1.5 Ok\r\n"),
            ("expect", "DATA"), ("send", b"354 go ahead\r\n"), ("data",),
            ("send", b"250 2.0.0 Ok\r\n"), ("expect", "QUIT"), ("send", b"221 Bye\r\n")]


def test_plain_with_initial_response_then_mail():
    c, _ = client({"[mx.example]:25": f"user:{SECRET}"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", f"AUTH PLAIN {PLAIN_IR}$"),
              ("send", b"235 2.7.0 Authentication successful\r\n"), *rest_of_mail()]
    h = harness(script, c).run()
    assert h.result()[0] == "sent"
    assert not any(SECRET in line or PLAIN_IR in line for _, line in h.chat)
    assert (">", "AUTH PLAIN ...") in h.chat


def test_login_when_filtered_to_login():
    c, _ = client({"mx.example": f"user:{SECRET}"}, options=NOANON, mech_filter=["login"])
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "AUTH LOGIN$"), ("send", b"334 VXNlcm5hbWU6\r\n"),
              ("expect", b64("user")), ("send", b"334 UGFzc3dvcmQ6\r\n"),
              ("expect", b64(SECRET)), ("send", b"235 2.7.0 Ok\r\n"), *rest_of_mail()]
    h = harness(script, c).run()
    assert h.result()[0] == "sent"


def test_535_defers_with_servers_reply():
    c, _ = client({"mx.example": f"user:{SECRET}"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "AUTH PLAIN"),
              ("send", b"535 5.7.8 Error: authentication failed: bad\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = harness(script, c).run()
    assert h.result() == ("deferred", "4.7.8", f"SASL authentication failed; server "
                          f"{NAMADDR} said: 535 5.7.8 Error: authentication failed: bad")
    c.soft_bounce = False
    h = harness(script, c).run()
    assert h.result()[:2] == ("bounced", "5.7.8")


def test_noplaintext_without_tls_sends_no_credentials():
    c, _ = client({"mx.example": f"user:{SECRET}"}, options=NOPLAIN)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = harness(script, c).run()
    assert h.result() == ("deferred", "4.7.0", f"SASL authentication failed; cannot "
                          f"authenticate to server {NAMADDR}: no mechanism available")


def test_no_credentials_no_auth():
    c, _ = client({}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH), *rest_of_mail()]
    assert harness(script, c).run().result()[0] == "sent"


def test_filter_leaves_nothing(monkeypatch):
    warned = []
    monkeypatch.setattr(msg, "warn", warned.append)
    c, _ = client({"mx.example": "u:p"}, options=NOANON, mech_filter=["cram-md5"])
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = harness(script, c).run()
    assert warned == [f"{RELAY} offered no supported AUTH mechanisms: 'PLAIN LOGIN'"]
    assert h.result() == ("deferred", "4.7.0", f"SASL authentication failed: server "
                          f"{NAMADDR} offered no compatible authentication mechanisms for "
                          f"this type of connection security")


def test_no_auth_offered_goes_on_unauthenticated():
    c, _ = client({"mx.example": "u:p"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"),
              ("send", b"250-mx.example\r\n250 8BITMIME\r\n"), *rest_of_mail()]
    assert harness(script, c).run().result()[0] == "sent"


def test_not_final_server_keeps_recipients():
    c, _ = client({"mx.example": "u:p"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "AUTH PLAIN"), ("send", b"535 5.7.8 no\r\n"),
              ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = harness(script, c, final=False).run()
    assert h.d.recipients[0].keep and h.d.recipients[0].result is None


def test_lost_connection_during_auth():
    c, _ = client({"mx.example": "u:p"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "AUTH PLAIN"), ("close",)]
    h = harness(script, c).run()
    assert h.result() == ("deferred", "4.4.2", f"lost connection with {NAMADDR} while "
                                               f"performing the EHLO handshake")


def test_protocol_error_aborts():
    c, _ = client({"mx.example": "u:p"}, options=NOANON)
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_AUTH),
              ("expect", "AUTH PLAIN"), ("send", b"334 \r\n"), ("expect", r"\*$"),
              ("send", b"501 5.7.0 aborted\r\n"), ("expect", "QUIT"), ("send", b"221 Bye\r\n")]
    h = harness(script, c).run()
    assert h.result()[:2] == ("deferred", "4.7.0")
    assert "authentication protocol error" in h.result()[2]
