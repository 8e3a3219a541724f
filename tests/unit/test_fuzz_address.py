"""Fuzzing address and destination parsing: smtpd's MAIL/RCPT path parser and address
syntax check, the access-table keys of an address, qmgr's address splitting, the smtp
client's next-hop and DNS-server syntax, and sendmail -t's header recipients.

Each takes any text and answers, or raises its own documented error (NexthopError, the
ValueError of a bad DNS server); an address smtpd accepts can never carry CR, LF or NUL
into a command that the smtp client will send, nor a control character into a log line.
bench/fuzz_long.py runs the same properties longer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import address
from postfix_py.lib import resolve
from postfix_py.smtp import nexthop
from postfix_py.smtpd import check, session
from postfix_py.tools import sendmail

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
PIECES = st.sampled_from(["<", ">", "@", '"', "\\", ":", ",", " ", ".", "[", "]", "(", ")",
                          "\r", "\n", "\x00", "\t", "=", "user", "example.com", "@a,@b:",
                          "IPv6:", "::1", "127.0.0.1", "SIZE=10", "\u00e9", "\udcff", "\x7f"])
TEXT = st.one_of(st.text(max_size=60),
                 st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=20).map("".join))


@FUZZ
@given(arg=TEXT, keyword=st.sampled_from(["FROM:", "TO:"]), strict=st.booleans())
def test_parse_path_and_address_syntax(arg, keyword, strict):
    for text in (arg, keyword + arg, keyword + "<" + arg + ">", keyword + " <" + arg + "> x"):
        parsed = session.parse_path(text, keyword, strict)
        if parsed is None:
            continue
        addr, params = parsed
        assert isinstance(addr, str) and all(isinstance(p, str) and p for p in params)
        if addr == "bad":
            continue
        addr = session.strip_route(addr)
        if session.valid_address(addr):
            # What the smtp client will write as MAIL FROM:<addr> / RCPT TO:<addr>.
            # No NUL or other control character, in any mode (it found "\0" quoted).
            assert not any(c < " " or c == "\x7f" for c in addr), repr(addr)
            assert len(addr) <= 1000


@FUZZ
@given(addr=TEXT)
def test_valid_address_never_raises(addr):
    assert session.valid_address(addr) in (True, False)
    assert isinstance(session.strip_route(addr), str)


@pytest.mark.parametrize("addr", ['"\x00"@x', '"a\x01"@example.org', 'a\x7f@example.org',
                                  '"\\\x00"@x', "a@exa\tmple.org"])
def test_control_characters_are_refused(addr):
    assert not session.valid_address(addr)
    for strict in (True, False):
        assert session.parse_path(f"FROM:<{addr}>", "FROM:", strict) == (addr, [])


@FUZZ
@given(text=TEXT, limit=st.integers(0, 200))
def test_log_and_header_text(text, limit):
    shown = session.printable(text, limit)
    assert len(shown) <= max(limit, 0) and all(" " <= c <= "~" for c in shown)
    comment = session.comment_text(text)
    assert all(" " <= c <= "~" for c in comment)
    assert "\n" not in comment and "\r" not in comment


@FUZZ
@given(addr=st.one_of(st.none(), TEXT))
def test_access_table_keys(addr):
    keys = check._address_keys(addr)
    assert isinstance(keys, list) and all(isinstance(k, str) for k in keys)
    if addr:
        assert keys[0] == addr


@FUZZ
@given(addr=TEXT, spec=TEXT, delimiters=st.text(max_size=3))
def test_qmgr_address_splitting(addr, spec, delimiters):
    local, domain = address.split_address(addr)
    assert domain == domain.lower() and not domain.endswith(".")
    transport, hop = resolve.parse_spec(spec)
    assert isinstance(transport, str) and isinstance(hop, str)
    assert isinstance(address.strip_extension(local, delimiters), str)


HOPS = st.one_of(TEXT, st.sampled_from([
    "[127.0.0.1]:25", "[::1]:2525", "[ipv6:::1]", "mx.example.com:smtp", "host:99999",
    "host:0", "host:", "[]", "[x", "[x]y", "unix:/path", "unix:", "inet:host:24",
    "a:b:c", "host:nosuchservice"]))


@FUZZ
@given(text=HOPS, lmtp=st.booleans())
def test_next_hop_syntax(text, lmtp):
    try:
        dest = nexthop.parse(text, lmtp)
    except nexthop.NexthopError as exc:
        assert str(exc)
        return
    assert dest.host and (dest.unix or 0 < dest.port < 65536)
    try:
        nexthop.parse_list(text + ", " + text, lmtp)
    except nexthop.NexthopError:
        pass


@FUZZ
@given(text=HOPS)
def test_dns_server_syntax(text):
    try:
        server = nexthop._nameserver(text)
    except ValueError as exc:
        assert str(exc)
        return
    assert server is not None


@FUZZ
@given(headers=st.lists(st.tuples(st.sampled_from(["To", "Cc", "Bcc", "Resent-To", "From",
                                                   "to", "X"]), TEXT), max_size=6),
       raw=st.binary(max_size=100))
def test_sendmail_header_recipients(headers, raw):
    message = "".join(f"{n}: {v}\n" for n, v in headers).encode("utf-8", "surrogatepass")
    for data in (message + b"\nbody\n", raw, message + raw):
        rcpts = sendmail.header_recipients(data)
        assert all(isinstance(r, str) and r for r in rcpts)
