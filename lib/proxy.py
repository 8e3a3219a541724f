"""Behind a load balancer: the haproxy PROXY protocol, as Postfix's haproxy_srvr.c.

Shared by smtpd (smtpd_upstream_proxy_protocol, a blocking receive()) and postscreen
(postscreen_upstream_proxy_protocol, parse() on peeked input from its event loop).

SYNOPSIS
    endpoint = proxy.receive(conn, timeout, families)   # before the greeting

DESCRIPTION
    With smtpd_upstream_proxy_protocol = haproxy, the connection starts with a PROXY
    header from the load balancer, version 1 (a text line `PROXY TCP4|TCP6 client-addr
    server-addr client-port server-port`) or version 2 (binary, 16 bytes and the
    addresses). receive() takes the header off the connection and returns the original
    client and server endpoints; smtpd then uses the client's address and port in
    everything (logging, Received: header, restrictions, anvil).

    As in Postfix: the header is peeked, parsed, and then exactly its length is read, so
    that no SMTP byte after it is consumed; at most 536 bytes are looked at; the protocol
    types are TCP4 and TCP6 as inet_protocols permits, and `PROXY UNKNOWN` is refused
    (it would sidestep address-based access control); a version 2 LOCAL header (the
    balancer's own health check) keeps the connection's own endpoints; version 2 TLVs
    are skipped. IPv4-mapped IPv6 addresses become IPv4. Any other header is logged as
    `warning: haproxy read: REASON: ESCAPED-INPUT` and the caller hangs up with
    `421 4.3.0 HOST Server local error`, as Postfix's smtpd_peer_fall_back_and_hangup.
    The refused bytes are read and dropped first, so that the 421 is not lost to a TCP
    reset at the close.

    Unlike Postfix's single peek, a header that arrives in several TCP segments is
    waited for (still within smtpd_upstream_proxy_timeout): only input that can still
    become a header is waited for.

SECURITY
    Untrusted input, bounded: 536 bytes at most, and smtpd_upstream_proxy_timeout for
    all of it. Only the configured load balancer should be able to connect to a service
    with this setting (master.cf / firewall): the header is trusted as such.

CONFIGURATION PARAMETERS
    smtpd_upstream_proxy_protocol (empty: no proxy; haproxy), smtpd_upstream_proxy_timeout
    (5s), inet_protocols (all).

SEE ALSO
    smtpd/service.py; Postfix smtpd(8), postconf(5) smtpd_upstream_proxy_protocol,
    https://www.haproxy.org/download/2.0/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from dataclasses import dataclass

HEADER_MAX = 536                        # Postfix's HAPROXY_HEADER_MAX_LEN
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
CMD_LOCAL, CMD_PROXY = 0x00, 0x01
FAM_TCP4, FAM_TCP6 = 0x11, 0x21         # AF_INET / AF_INET6 with STREAM transport


@dataclass
class Endpoints:
    """The original client and the server it connected to, as the balancer saw them."""
    client_addr: str
    client_port: str
    server_addr: str
    server_port: str


class ProxyError(Exception):
    """A header that cannot be used; the text is Postfix's reason."""


class _Incomplete(Exception):
    """More input could still make a header."""


Incomplete = _Incomplete      # for callers that parse peeked input themselves (postscreen)


def families(inet_protocols: list[str]) -> set[str]:
    """inet_protocols as the address families a header may use: {"ipv4", "ipv6"}."""
    words = {w.lower() for w in inet_protocols} or {"all"}
    if "all" in words:
        return {"ipv4", "ipv6"}
    return words & {"ipv4", "ipv6"}


def escape(data: bytes) -> str:
    """Postfix's escape(): printable ASCII as is (\\ doubled), C escapes, octal."""
    named = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}
    out = []
    for ch in data:
        if 32 <= ch < 127:
            out.append("\\\\" if ch == 92 else chr(ch))
        else:
            out.append(named.get(ch) or f"\\{ch:03o}")
    return "".join(out)


def _addr(text: str, family: str) -> str:
    """A v1 address in canonical form; ValueError when it is not one of family."""
    if len(text) >= 46 or "%" in text:            # INET6_ADDRSTRLEN; no scope ids
        raise ValueError
    ip = ipaddress.ip_address(text)
    if (family == "ipv4") != (ip.version == 4):
        raise ValueError
    return _canonical(ip)


def _canonical(ip) -> str:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _port(text: str) -> str:
    """valid_hostport(): digits, no leading zero, at most 65535."""
    if not text.isdigit() or not text.isascii() or (text[0] == "0" and len(text) > 1) \
            or len(text) > 5 or int(text) > 65535:
        raise ValueError
    return text


def parse(data: bytes, allowed: set[str]) -> tuple[Endpoints | None, int]:
    """Parse the header at the start of data: (endpoints, header length).

    Endpoints is None for a version 2 LOCAL header (not proxied). Raises ProxyError with
    Postfix's reason, or _Incomplete when more input could still complete the header."""
    if data.startswith(b"PROXY "):
        return _parse_v1(data, allowed)
    if len(data) < V2_HEADER:
        if V2_SIGNATURE.startswith(data[:12]) or b"PROXY ".startswith(data):
            raise _Incomplete
        raise ProxyError("short protocol header")
    return _parse_v2(data, allowed)


def _parse_v1(data: bytes, allowed: set[str]) -> tuple[Endpoints, int]:
    end = data.find(b"\n")
    if end < 0:
        if len(data) < HEADER_MAX:
            raise _Incomplete
        raise ProxyError("missing protocol header terminator")
    line = data[:end].split(b"\x00", 1)[0].decode("latin-1")   # a C string ends at NUL
    tokens = [t for t in line.replace("\r", " ").split(" ") if t] + [None] * 6
    if tokens[0] != "PROXY":
        raise ProxyError("bad or missing protocol header")
    proto = (tokens[1] or "").upper()
    family = {"TCP4": "ipv4", "TCP6": "ipv6"}.get(proto)
    if family is None or family not in allowed:
        raise ProxyError("bad or missing protocol type")
    values = []
    for i, (what, conv) in enumerate((("client address", _addr), ("server address", _addr),
                                      ("client port", _port), ("server port", _port))):
        text = tokens[2 + i]
        try:
            if text is None:
                raise ValueError
            values.append(conv(text, family) if conv is _addr else conv(text))
        except ValueError:
            raise ProxyError(f"bad or missing {what}") from None
    return Endpoints(values[0], values[2], values[1], values[3]), end + 1


def _parse_v2(data: bytes, allowed: set[str]) -> tuple[Endpoints | None, int]:
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("unrecognized protocol header")
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd & 0xF0 != 0x20:
        raise ProxyError("unrecognized protocol version")
    total = V2_HEADER + length
    if len(data) < total:
        if total <= HEADER_MAX:
            raise _Incomplete
        raise ProxyError("short version 2 protocol header")
    cmd = ver_cmd & 0x0F
    if cmd == CMD_LOCAL:
        return None, total                  # TLVs are skipped, as Postfix
    if cmd != CMD_PROXY:
        raise ProxyError("bad command in proxy header")
    body = data[V2_HEADER:total]
    if fam == FAM_TCP4:
        if "ipv4" not in allowed:
            raise ProxyError("Postfix IPv4 support is disabled")
        if length < 12:
            raise ProxyError("short address field")
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
    elif fam == FAM_TCP6:
        if "ipv6" not in allowed:
            raise ProxyError("Postfix IPv6 support is disabled")
        if length < 36:
            raise ProxyError("short address field")
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
    else:
        raise ProxyError("unsupported network protocol")
    return Endpoints(_canonical(ipaddress.ip_address(src)), str(sport),
                     _canonical(ipaddress.ip_address(dst)), str(dport)), total


def receive(conn: socket.socket, timeout: float, allowed: set[str]) -> Endpoints | None:
    """Read the PROXY header off conn: the endpoints, or None when not proxied (v2 LOCAL).

    Raises ProxyError with the text of Postfix's warning ("haproxy read: ..."); nothing
    after the header is read."""
    deadline = time.monotonic() + timeout
    fd = conn.fileno()
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            if data:
                break                       # what there is decides, as one peek would
            raise ProxyError("haproxy read: timeout error")
        try:
            peeked = conn.recv(HEADER_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ProxyError(f"haproxy read: {exc.strerror}") from None
        if not peeked:
            if data:
                break
            raise ProxyError("haproxy read: EOF")
        if peeked == data:
            time.sleep(0.01)                # no new byte yet: readable only for old ones
            continue
        data = peeked
        try:
            return _consume(conn, data, allowed)
        except _Incomplete:
            continue
    try:
        return _consume(conn, data, allowed)
    except _Incomplete:
        v1 = data.startswith(b"PROXY ") or b"PROXY ".startswith(data)
        reason = "missing protocol header terminator" if v1 and b"\n" not in data else \
            "short protocol header" if len(data) < V2_HEADER else \
            "short version 2 protocol header"
        _drop(conn, len(data))
        raise ProxyError(f"haproxy read: {reason}: {escape(data)}") from None


def _consume(conn: socket.socket, data: bytes, allowed: set[str]) -> Endpoints | None:
    try:
        endpoints, length = parse(data, allowed)
    except ProxyError as exc:
        _drop(conn, len(data))
        raise ProxyError(f"haproxy read: {exc}: {escape(data)}") from None
    try:
        got = conn.recv(length, socket.MSG_WAITALL)
    except OSError as exc:
        raise ProxyError(f"haproxy read: {exc.strerror}") from None
    if len(got) != length:
        raise ProxyError("haproxy read: EOF")
    return endpoints


def _drop(conn: socket.socket, length: int) -> None:
    """Discard the refused bytes, so that the 421 reaches the client before the close
    (unread input would turn the close into a reset)."""
    try:
        conn.recv(length, socket.MSG_DONTWAIT)
    except OSError:
        pass
