"""smtp/xforward.py: which XFORWARD commands the smtp client sends for a queued message,
as Postfix's smtp_proto.c; and smtpd/xclient.py's value helpers."""

from postfix_py.smtp import xforward
from postfix_py.smtpd import xclient

ALL = {"NAME", "ADDR", "PORT", "PROTO", "HELO", "SOURCE", "IDENT"}


def test_own_client_of_a_message():
    attrs = {"client_name": "unknown", "client_address": "2001:db8::7", "client_port": "25",
             "protocol": "ESMTP", "helo_name": "h.example"}
    client = xforward.client_attributes(attrs, "4Xq1")
    assert xforward.commands(ALL, client) == [
        ("sending XFORWARD name/address", "XFORWARD name/address",
         "XFORWARD ADDR=IPv6:2001:db8::7 PORT=25"),      # an unknown NAME is not sent
        ("sending XFORWARD protocol/helo_name", "XFORWARD helo/protocol",
         "XFORWARD PROTO=ESMTP HELO=h.example IDENT=4Xq1 SOURCE=REMOTE")]


def test_forwarded_attributes_win_and_only_announced_ones_are_sent():
    attrs = {"client_address": "127.0.0.1", "log_client_address": "192.0.2.7",
             "log_client_name": "orig.example", "log_ident": "FIRST", "helo_name": "a b=c"}
    client = xforward.client_attributes(attrs, "SECOND")
    assert xforward.commands({"ADDR", "IDENT", "HELO"}, client) == [
        ("sending XFORWARD name/address", "XFORWARD name/address", "XFORWARD ADDR=192.0.2.7"),
        ("sending XFORWARD protocol/helo_name", "XFORWARD helo/protocol",
         "XFORWARD HELO=a+20b+3Dc IDENT=FIRST")]


def test_local_submission_sends_only_ident_and_source():
    client = xforward.client_attributes({}, "LOC1")
    assert [c[2] for c in xforward.commands(ALL, client)] == \
        ["XFORWARD IDENT=LOC1 SOURCE=LOCAL"]


def test_xclient_value_helpers():
    assert xclient.xtext_unquote("a+20b") == "a b"
    assert xclient.xtext_unquote("a+2") == "a+2"           # not xtext: as written
    assert xclient.mailhost_addr("IPv6:::ffff:192.0.2.1") == ("192.0.2.1", "192.0.2.1")
    assert xclient.mailhost_addr("IPv6:2001:DB8::1") == ("2001:db8::1", "IPv6:2001:db8::1")
    assert xclient.mailhost_addr("2001:db8::1") is None   # IPv6 needs its prefix
    assert xclient.valid_hostname("a-b.example") and not xclient.valid_hostname("1.2.3.4")
    assert not xclient.valid_hostname("-a.example")
