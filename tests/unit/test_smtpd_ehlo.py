"""The EHLO reply that smtpd/session.py keeps per configuration (SessionConfig.ehlo) is
byte for byte the one it built line by line before, for every fact the reply depends on:
STARTTLS offered or not, AUTH and its mechanisms, XCLIENT and XFORWARD, REQUIRETLS, and
the main.cf settings (SIZE, VRFY, SMTPUTF8, smtpd_discard_ehlo_keywords)."""

import itertools

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.smtpd import session as S
from postfix_py.smtpd import xclient as X
from postfix_py.smtpd.check import ClientState


@pytest.fixture(autouse=True)
def quiet_log():
    msg.init_cli("test")
    yield
    msg.close()


class Out:
    def __init__(self):
        self.out = bytearray()

    def write(self, data):
        self.out += data

    def flush(self, timeout=None):
        pass


class Lists:
    """A checker whose network lists hold the client for the parameters named."""

    def __init__(self, params):
        self.params = set(params)

    def in_network_list(self, param, addr, name="unknown"):
        return param in self.params

    def helo(self, client):
        return None


class Sasl:
    def __init__(self, mechs):
        self.mechs = mechs

    def mechanisms(self, tls):
        return None if self.mechs is None else list(self.mechs) + (["EXTERNAL"] if tls else [])


def reference(sess) -> bytes:
    """The EHLO reply as helo_cmd built it before, one reply() per line."""
    lines = [sess.hostname, "PIPELINING"]
    lines.append(f"SIZE {sess.size_limit}" if sess.size_limit else "SIZE")
    if not sess.cfg["disable_vrfy_command"]:
        lines.append("VRFY")
    lines.append("ETRN")
    if sess.starttls_offered:
        lines.append("STARTTLS")
    if sess.sasl_active() and not sess.sasl_exempt:
        mechs = sess.sasl.mechanisms(sess.tls_active)
        if mechs:
            lines.append("AUTH " + " ".join(mechs))
    lines += X.ehlo_keywords(sess)
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME"] + ["DSN"] + \
        ["SMTPUTF8"] * sess.smtputf8_enable + ["CHUNKING"] + \
        ["REQUIRETLS"] * sess.requiretls_offered
    lines = [lines[0]] + [k for k in lines[1:]
                          if k.split()[0].lower() not in sess.discard_ehlo]
    out = bytearray()
    for i, text in enumerate(lines):
        text = f"250{'-' if i < len(lines) - 1 else ' '}{text}"
        if not (text.isascii() and text.isprintable()):
            text = msg.printable(text, len(text), utf8=False)
        out += text.encode("utf-8", "replace") + b"\r\n"
    return bytes(out)


CONFIGS = [
    {},
    {"message_size_limit": "0", "disable_vrfy_command": "yes", "smtputf8_enable": "no"},
    {"smtpd_discard_ehlo_keywords": "pipelining, SIZE, starttls, auth, xclient, dsn, "
                                    "chunking, requiretls", "requiretls_enable": "yes"},
    {"requiretls_enable": "yes", "smtpd_tls_auth_only": "yes",
     "myhostname": "mx.example.org"},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_kept_reply_is_the_line_by_line_one(overrides):
    cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=overrides)
    seen = {}
    facts = itertools.product(
        (False, True),                              # TLS active
        ("none", "may"),                            # security level
        (False, True),                              # a TlsServer
        (None, (), ("PLAIN", "LOGIN")),             # SASL: off, no mechanism, two
        ((), ("smtpd_authorized_xclient_hosts",),
         ("smtpd_authorized_xclient_hosts", "smtpd_authorized_xforward_hosts")))
    for tls_active, level, tls, mechs, lists in facts:
        for _ in range(2):                          # made, then taken from the cache
            out = Out()
            sess = S.Session(out, cfg, ClientState(name="client.example", addr="192.0.2.9"),
                             "/nonexistent", Lists(lists), level=level,
                             tls=object() if tls else None,
                             sasl=None if mechs is None else Sasl(mechs))
            sess.tls_active = tls_active
            assert sess.helo_cmd("client.example", esmtp=True)
            assert bytes(out.out) == reference(sess)
            seen.setdefault(bytes(out.out), set()).add((sess.starttls_offered, mechs,
                                                        lists, tls_active))
    assert len(S.session_config(cfg).ehlo) >= 1
    if not overrides.get("smtpd_discard_ehlo_keywords"):
        assert len(seen) > 8        # the facts do make different replies


def test_one_session_config_per_config():
    a = maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides={})
    b = maincf.Config("/nonexistent", "/nonexistent/main.cf",
                      overrides={"myhostname": "other.example"})
    assert S.session_config(a) is S.session_config(a)
    assert S.session_config(b) is not S.session_config(a)
    assert S.session_config(b).attrs["hostname"] == "other.example"
