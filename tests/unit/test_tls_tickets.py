"""Session ticket key names: the ClientHello parser and the probe of a context's key
(lib/tls.py SESSION TICKET KEYS)."""

from OpenSSL import SSL

from postfix_py.lib import tls as T
from postfix_py.lib import tlsgen


def test_client_hello_ticket_key_name_parsing():
    """The ClientHello parser: no ticket, a TLS 1.2 ticket, truncated records."""
    assert T.client_hello_ticket_key_name(b"") is None
    assert T.client_hello_ticket_key_name(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01") is None
    ticket = bytes(range(16)) + b"rest-of-ticket"
    ext = (35).to_bytes(2, "big") + len(ticket).to_bytes(2, "big") + ticket
    body = (b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(ext).to_bytes(2, "big") + ext)
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    record = b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello
    assert T.client_hello_ticket_key_name(record) == bytes(range(16))
    assert T.client_hello_ticket_key_name(record[:-20]) is None


def _server_context():
    key = tlsgen.new_key()
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_privatekey(key)
    ctx.use_certificate(tlsgen.self_signed(key))
    ctx.set_session_id(b"test")
    return ctx


def test_each_context_has_its_own_ticket_key_and_the_probe_finds_it():
    a, b = _server_context(), _server_context()
    name_a = T.context_ticket_key_name(a)
    assert name_a is not None and len(name_a) == T.TICKET_KEY_NAME_LEN
    assert T.context_ticket_key_name(a) == name_a       # the same key, probed again
    assert T.context_ticket_key_name(b) not in (None, name_a)


def test_no_key_name_without_tickets():
    ctx = _server_context()
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)   # (TLS 1.3 would send a stateful one)
    ctx.set_options(SSL.OP_NO_TICKET)
    assert T.context_ticket_key_name(ctx) is None
