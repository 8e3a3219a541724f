"""smtpd/proxy.py: PROXY v1 and v2 headers, parsed and refused as Postfix's haproxy_srvr.c,
and read off a real socket pair without consuming the SMTP bytes after them."""

import socket
import struct

import pytest

from postfix_py.lib import proxy
from postfix_py.lib.proxy import ProxyError

BOTH = {"ipv4", "ipv6"}


def v2(cmd=1, fam=0x11, body=b"", version=0x20):
    return proxy.V2_SIGNATURE + struct.pack("!BBH", version | cmd, fam, len(body)) + body


def v2_tcp4(src="192.0.2.7", dst="198.51.100.1", sport=40000, dport=25, tlv=b""):
    return v2(body=socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!HH", sport, dport) + tlv)


def test_v1_tcp4():
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n"
    ep, n = proxy.parse(data, BOTH)
    assert (ep.client_addr, ep.client_port, ep.server_addr, ep.server_port) == \
        ("192.0.2.7", "40000", "198.51.100.1", "25")
    assert data[n:] == b"EHLO x\r\n"


def test_v1_tcp6_canonical_and_v4_mapped():
    ep, _ = proxy.parse(b"PROXY TCP6 2001:DB8:0::1 ::ffff:192.0.2.9 1 65535\r\n", BOTH)
    assert (ep.client_addr, ep.server_addr, ep.server_port) == \
        ("2001:db8::1", "192.0.2.9", "65535")


@pytest.mark.parametrize("line, reason", [
    (b"PROXY UNKNOWN\r\n", "bad or missing protocol type"),
    (b"PROXY TCP4 192.0.2.300 1.2.3.4 1 2\r\n", "bad or missing client address"),
    (b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n", "bad or missing client address"),
    (b"PROXY TCP4 1.2.3.4\r\n", "bad or missing server address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 01 2\r\n", "bad or missing client port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 65536\r\n", "bad or missing server port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 x\r\n", "bad or missing server port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "bad or missing server port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5\r\n", "bad or missing client port"),
    (b"PROXY TCP6 ::1%eth0 ::1 1 2\r\n", "bad or missing client address"),
    (b"PROXY\r\n", "short protocol header"),
    (b"EHLO client.example.com\r\n", "unrecognized protocol header"),
    (b"HELO x\r\n", "short protocol header"),
])
def test_v1_refused(line, reason):
    with pytest.raises(ProxyError, match=reason):
        proxy.parse(line, BOTH)


def test_v1_protocol_must_be_enabled():
    with pytest.raises(ProxyError, match="bad or missing protocol type"):
        proxy.parse(b"PROXY TCP6 ::1 ::1 1 2\r\n", {"ipv4"})
    assert proxy.families(["ipv4"]) == {"ipv4"} and proxy.families(["all"]) == BOTH


def test_v1_without_terminator():
    with pytest.raises(proxy._Incomplete):
        proxy.parse(b"PROXY TCP4 1.2.3.4", BOTH)
    with pytest.raises(ProxyError, match="missing protocol header terminator"):
        proxy.parse(b"PROXY " + b"x" * 600, BOTH)


def test_v2_tcp4_with_tlv_and_local():
    data = v2_tcp4(tlv=b"\x04\x00\x01x") + b"EHLO x\r\n"
    ep, n = proxy.parse(data, BOTH)
    assert (ep.client_addr, ep.client_port) == ("192.0.2.7", "40000")
    assert data[n:] == b"EHLO x\r\n"
    ep, n = proxy.parse(v2(cmd=0) + b"QUIT\r\n", BOTH)
    assert ep is None and n == 16


def test_v2_tcp6():
    body = socket.inet_pton(socket.AF_INET6, "2001:db8::5") + \
        socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.2") + struct.pack("!HH", 5, 25)
    ep, _ = proxy.parse(v2(fam=0x21, body=body), BOTH)
    assert (ep.client_addr, ep.server_addr) == ("2001:db8::5", "198.51.100.2")


@pytest.mark.parametrize("data, reason", [
    (v2(version=0x10), "unrecognized protocol version"),
    (v2(cmd=2), "bad command in proxy header"),
    (v2(fam=0x31, body=b"x" * 216), "unsupported network protocol"),
    (v2(fam=0x11, body=b"x" * 8), "short address field"),
    (v2(fam=0x11, body=b"x" * 600), "short version 2 protocol header"),
])
def test_v2_refused(data, reason):
    with pytest.raises(ProxyError, match=reason):
        proxy.parse(data[:proxy.HEADER_MAX], BOTH)


def test_v2_family_disabled():
    with pytest.raises(ProxyError, match="Postfix IPv4 support is disabled"):
        proxy.parse(v2_tcp4(), {"ipv6"})


def test_escape_as_postfix():
    assert proxy.escape(b"a\\b\r\n\x00\xff") == "a\\\\b\\r\\n\\000\\377"


def test_receive_leaves_the_smtp_bytes():
    a, b = socket.socketpair()
    with a, b:
        header = v2_tcp4()
        a.sendall(header[:10])              # a header in two segments is waited for
        a.sendall(header[10:] + b"EHLO x\r\n")
        ep = proxy.receive(b, 2, BOTH)
        assert ep.client_addr == "192.0.2.7"
        assert b.recv(100) == b"EHLO x\r\n"


def test_receive_timeout_and_bad_header():
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ProxyError, match="^haproxy read: timeout error$"):
            proxy.receive(b, 0.2, BOTH)
        a.sendall(b"PROXY TCP4 1.2.3.4")    # never finished
        with pytest.raises(ProxyError, match=r"^haproxy read: missing protocol header "
                                             r"terminator: PROXY TCP4 1\.2\.3\.4$"):
            proxy.receive(b, 0.3, BOTH)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"PROXY UNKNOWN\r\n")
        with pytest.raises(ProxyError, match=r"^haproxy read: bad or missing protocol type: "
                                             r"PROXY UNKNOWN\\r\\n$"):
            proxy.receive(b, 2, BOTH)
        a.close()
        b.recv(100)
        with pytest.raises(ProxyError, match="^haproxy read: EOF$"):
            proxy.receive(b, 2, BOTH)
