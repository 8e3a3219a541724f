"""DNS lookups of smtpd's restrictions: mail hosts, HELO names and DNS lists (DNSBL).

The one home of the DNS questions smtpd/check.py asks, as Postfix's dns_lookup() calls in
smtpd_check.c: whether a mail domain exists (MX, then A, then AAAA: reject_unknown_sender_
domain and friends), whether a HELO name exists (A, AAAA, then MX), and what a DNS list
says about a client address or a domain (reject_rbl_client, reject_rhsbl_*, permit_dnswl_
client, permit_rhswl_client): the A records of the query name, then its TXT records (the
reason, joined with " / ", at most 500 characters, as rbl_pagein()).

RESOLVER
    The system's (resolv.conf, read when a DnsLookup is made: before the chroot), or the
    servers of smtpd_dns_nameservers (a postfix-py extension, as smtp_dns_nameservers:
    "address", "address:port" or "[address]:port"), or a dnspython resolver given by the
    caller (tests). Names are absolute: no search list, as Postfix.

FUNCTIONS
    DnsLookup(resolver=None, nameservers=()):
        mailhost(domain) -> ok, notfound, retry or nullmx.
        hostname(name) -> ok, notfound or retry (A, AAAA, then MX; a null MX
            counts as found, as Postfix lets an MTA name have one).
        dnsxl(query) -> DnsxlResult(status, addresses, txt): status ok (A records found),
            notfound, or retry (with a warning "QUERY: RBL lookup error: ...").
    reverse_address(addr) -> the DNSBL query labels of an address (IPv4 octets, IPv6
        nibbles, reversed), or None when addr is not an address.
    match_reply(pattern, address) -> whether a list's A record matches Postfix's
        ip_match pattern: d.d.d.d where each d is a number, or [n;n..m;...] (numbers and
        ranges) for that octet.
    valid_hostname(name), valid_hostaddr(text): Postfix's valid_hostname.c rules.

SEE ALSO
    smtpd/check.py (the restrictions), lib/server_filters.py (reply templates); Postfix
    smtpd_check.c, dns_lookup.c, ip_match.c.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - dnspython's IDNA codec, loaded before the chroot
import ipaddress
import re
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from . import msg

RBL_TXT_LIMIT = 500             # Postfix's cap on the joined TXT reason
VALID_HOSTNAME_LEN = 255
VALID_LABEL_LEN = 63
_SOFT = (dns.exception.DNSException, OSError, ValueError, EOFError)


@dataclass
class DnsxlResult:
    status: str                                  # ok, notfound or retry
    addresses: list[str] = field(default_factory=list)
    txt: str | None = None


def nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """A server from "address", "address:port" or "[address]:port"; ValueError if bad."""
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"bad DNS server address: {text}")
            port = tail[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ipaddress.ip_address(host)
        number = int(port) if port.isdigit() else -1
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise ValueError(f"bad DNS server address: {text}")
    return dns.nameserver.Do53Nameserver(host, number)


class DnsLookup:
    """The resolver of smtpd's restrictions, configured when made (before the chroot)."""

    def __init__(self, resolver: dns.resolver.Resolver | None = None, nameservers=()):
        self.problem: str | None = None     # said at the first lookup, not before
        if resolver is None and nameservers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [nameserver(n) for n in nameservers]
        elif resolver is None:
            try:
                resolver = dns.resolver.Resolver()
            except Exception as exc:       # noqa: BLE001 - no or unreadable resolv.conf
                self.problem = f"cannot read resolver configuration: {exc}"
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.use_search_by_default = False   # absolute names, as Postfix
        self.resolver = resolver

    def _say_problem(self) -> None:
        if self.problem:
            msg.warn(self.problem)
            self.problem = None

    @staticmethod
    def _qname(name: str):
        try:
            return dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None

    def _resolve(self, qname, rdtype: str):
        """The answer (rrset may be None), "notfound" for NXDOMAIN, or the exception."""
        try:
            return self.resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                         search=False)
        except dns.resolver.NXDOMAIN:
            return "notfound"
        except _SOFT as exc:                # timeout, SERVFAIL, refused: try again later
            return exc
        except Exception as exc:           # noqa: BLE001 - whatever a server sends
            return exc

    def mailhost(self, domain: str) -> str:
        """ok, notfound, retry (a temporary failure, a malformed reply too) or nullmx:
        MX, then A, then AAAA, as dns_lookup_l() for reject_unknown_mailhost."""
        self._say_problem()
        qname = self._qname(domain)
        if qname is None:
            return "notfound"
        soft = False
        for rdtype in ("MX", "A", "AAAA"):
            answer = self._resolve(qname, rdtype)
            if answer == "notfound":
                return "notfound"         # no such name: no other type will have it
            if isinstance(answer, Exception):
                soft = True
                continue
            if answer.rrset is not None and len(answer.rrset):
                if rdtype == "MX" and len(answer.rrset) == 1 and \
                        next(iter(answer.rrset)).exchange == dns.name.root:
                    return "nullmx"
                return "ok"
        return "retry" if soft else "notfound"


    def hostname(self, name: str) -> str:
        """ok, notfound or retry for a host name: A, AAAA, then MX (a null MX is ok),
        as reject_unknown_hostname()."""
        self._say_problem()
        qname = self._qname(name)
        if qname is None:
            return "notfound"
        soft = False
        for rdtype in ("A", "AAAA", "MX"):
            answer = self._resolve(qname, rdtype)
            if answer == "notfound":
                return "notfound"
            if isinstance(answer, Exception):
                soft = True
                continue
            if answer.rrset is not None and len(answer.rrset):
                return "ok"
        return "retry" if soft else "notfound"

    def dnsxl(self, query: str) -> DnsxlResult:
        """What a DNS list says about query (labels + list domain), as rbl_pagein()."""
        self._say_problem()
        qname = self._qname(query)
        if qname is None:
            return DnsxlResult("notfound")
        answer = self._resolve(qname, "A")
        if answer == "notfound":
            return DnsxlResult("notfound")
        if isinstance(answer, Exception):
            # No definitive reply: the client has the benefit of the doubt.
            msg.warn(f"{query}: RBL lookup error: {_why(answer)}")
            return DnsxlResult("retry")
        if answer.rrset is None or not len(answer.rrset):
            return DnsxlResult("notfound")
        addresses = [r.address for r in answer.rrset]
        txt = None
        answer = self._resolve(qname, "TXT")
        if not isinstance(answer, (str, Exception)) and answer.rrset is not None:
            pieces = ["".join(s.decode("latin-1") for s in r.strings) for r in answer.rrset]
            buf = ""
            for i, piece in enumerate(pieces):
                buf += piece[:RBL_TXT_LIMIT - len(buf)]
                if i + 1 < len(pieces) and RBL_TXT_LIMIT - len(buf) > 3:
                    buf += " / "
                if len(buf) >= RBL_TXT_LIMIT:
                    break
            txt = buf
        return DnsxlResult("ok", addresses, txt)



def _why(exc: Exception) -> str:
    if isinstance(exc, (dns.resolver.LifetimeTimeout, dns.exception.Timeout)):
        return "Host not found, try again"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "Host not found, try again"
    return str(exc) or type(exc).__name__


def reverse_address(addr: str) -> str | None:
    """The DNSBL labels of an address: 4.3.2.1 for 1.2.3.4, 32 nibbles for IPv6."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is None:
        return ".".join(reversed(ip.exploded.replace(":", "")))
    if ip.version == 6:
        ip = ip.ipv4_mapped
    return ".".join(reversed(str(ip).split(".")))


_OCTET_RE = re.compile(r"^(\d{1,3})(?:\.\.(\d{1,3}))?$")


def parse_reply_pattern(pattern: str) -> list[list[tuple[int, int]]]:
    """Postfix's ip_match syntax: four octets, each a number or [n;lo..hi;...]; ValueError
    with Postfix's kind of message when it is not one."""
    octets = []
    rest = pattern
    while True:
        if rest.startswith("["):
            inner, close, rest = rest[1:].partition("]")
            if not close:
                raise ValueError(f"missing \"]\" in \"{pattern}\"")
            ranges = []
            for item in inner.split(";"):
                m = _OCTET_RE.match(item)
                if not m:
                    raise ValueError(f"bad octet value or range in \"{pattern}\"")
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) else lo
                if lo > 255 or hi > 255 or lo > hi:
                    raise ValueError(f"bad octet value or range in \"{pattern}\"")
                ranges.append((lo, hi))
            octets.append(ranges)
        else:
            m = re.match(r"\d{1,3}", rest)
            if not m or int(m.group(0)) > 255:
                raise ValueError(f"bad octet value in \"{pattern}\"")
            value = int(m.group(0))
            octets.append([(value, value)])
            rest = rest[m.end():]
        if len(octets) == 4:
            if rest:
                raise ValueError(f"unexpected text after address pattern \"{pattern}\"")
            return octets
        if not rest.startswith("."):
            raise ValueError(f"expected \".\" in address pattern \"{pattern}\"")
        rest = rest[1:]


def match_reply(octets: list[list[tuple[int, int]]], address: str) -> bool:
    """Whether an A record (d.d.d.d) matches a parse_reply_pattern() result."""
    parts = address.split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return False
    return all(any(lo <= int(p) <= hi for lo, hi in ranges)
               for p, ranges in zip(parts, octets))


def valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname(): letters, digits, _ and inner -, labels of 1-63, not
    all numeric, at most 255 characters."""
    if not name or len(name) > VALID_HOSTNAME_LEN:
        return False
    non_numeric = False
    for label in name.split("."):
        if not label or len(label) > VALID_LABEL_LEN:
            return False
        if label[0] == "-" or label[-1] == "-":
            return False
        for ch in label:
            if ch == "-" or ch.isascii() and (ch.isalpha() or ch == "_"):
                non_numeric = True
            elif not (ch.isascii() and ch.isdigit()):
                return False
    return non_numeric


def valid_ipv4(text: str) -> bool:
    """A dotted quad as Postfix's valid_ipv4_hostaddr (no leading zeros beyond one)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255
        and not (len(p) > 1 and p[0] == "0") for p in parts)


def valid_hostaddr(text: str) -> bool:
    """An IPv4 or IPv6 address as Postfix's valid_hostaddr()."""
    if ":" in text:
        try:
            return ipaddress.ip_address(text).version == 6
        except ValueError:
            return False
    return valid_ipv4(text)


def valid_mailhost_literal(text: str) -> bool:
    """The inside of an address literal: d.d.d.d or IPv6:address (valid_mailhost_addr)."""
    if text[:5].lower() == "ipv6:":
        return ":" in text[5:] and valid_hostaddr(text[5:])
    return valid_ipv4(text)


def _load_record_types() -> None:
    """The record classes dnspython imports on first use: now, before any chroot."""
    for name in ("A", "AAAA", "MX", "CNAME", "SOA", "NS", "TXT"):
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(name))


_load_record_types()
