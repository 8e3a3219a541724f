"""smtp_tls_block_early_mail_reply: Postfix's smtp client defence against CVE-2009-3555.

Commands injected into a STARTTLS session (by a TLS renegotiation attack) are answered by
the server inside our session, so their replies arrive before we send MAIL FROM. With the
parameter on, the delivery is deferred ("4.7.0 unexpected server message") and Postfix's
warning is logged; with it off (the default) the delivery goes on as before. The scripted
server of test_smtp_session plays the attacked server.
"""

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.smtp import session as S

from test_smtp_session import EHLO_PIPE, GREETING, EHLO_TLS, RELAY, Harness, pki, starter  # noqa: F401

EARLY = b"250 2.1.0 Ok\r\n"      # the reply to an injected MAIL FROM


def early_dialogue(early: bool, blocked: bool):
    script = [("send", GREETING), ("expect", "EHLO"), ("send", EHLO_TLS),
              ("expect", "STARTTLS"), ("send", b"220 2.0.0 Ready to start TLS\r\n"),
              ("starttls",), ("expect", "EHLO client.example"),
              ("send", EHLO_PIPE + (EARLY if early else b"")),
              ("sleep", 0.2),
              ("expect", "MAIL"), ("expect", "RCPT"), ("expect", "DATA")]
    if blocked:
        # Our MAIL is "answered" by the early reply; RCPT and DATA get theirs, then we stop.
        script += [("send", b"250 Ok\r\n354 go\r\n"), ("eof",)]
    else:
        script += [("send", (b"" if early else b"250 Ok\r\n") + b"250 Ok\r\n354 go\r\n"),
                   ("data",), ("send", b"250 2.0.0 Ok: queued\r\n"), ("expect", "QUIT"),
                   ("send", b"221 Bye\r\n"), ("eof",)]
    return script


def options(block: bool):
    return S.Options(helo_name="client.example", block_early_mail_reply=block,
                     timeouts=dict.fromkeys(S.Options().timeouts, 2))


def test_early_reply_is_blocked(pki, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(msg, "warn", warnings.append)
    h = Harness(early_dialogue(early=True, blocked=True), options=options(True),
                tls=starter(pki, tmp_path, "may"), tls_ctx=pki["good"]).run()
    assert h.result() == ("deferred", "4.7.0", "unexpected server message")
    assert "server mx.example[192.0.2.1] violates smtp_tls_block_early_mail_reply policy" \
        in warnings


def test_without_the_setting_the_early_reply_is_taken_for_the_mail_reply(pki, tmp_path):
    h = Harness(early_dialogue(early=True, blocked=False), options=options(False),
                tls=starter(pki, tmp_path, "may"), tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"


def test_an_honest_server_is_not_blocked(pki, tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(msg, "warn", warnings.append)
    h = Harness(early_dialogue(early=False, blocked=False), options=options(True),
                tls=starter(pki, tmp_path, "may"), tls_ctx=pki["good"]).run()
    assert h.result()[0] == "sent"
    assert warnings == []


@pytest.mark.parametrize("prefix", ["smtp", "lmtp"])
def test_the_parameter_is_read_per_prefix(tmp_path, prefix):
    (tmp_path / "main.cf").write_text(f"{prefix}_tls_block_early_mail_reply = yes\n")
    cfg = maincf.load(str(tmp_path))
    assert S.Options.from_config(cfg, prefix).block_early_mail_reply is True
    other = "lmtp" if prefix == "smtp" else "smtp"
    assert S.Options.from_config(cfg, other).block_early_mail_reply is False
