"""Next-hop destinations of the smtp/lmtp client: syntax, MX and address lookup.

NAME
    nexthop - from "example.com" or "[mailhost]:587" to the addresses to try, in order

DESCRIPTION
    This module is postfix-py's smtp_addr.c plus the destination parsing of
    smtp_connect.c. A next hop is one of

        domain              MX lookup; without MX records, the domain's own addresses
        domain:port         the same, on another port
        [host]              no MX lookup: the host's addresses (or a numeric address,
        [host]:port         [192.0.2.1], [::1] or [ipv6:::1])
        unix:/path          LMTP only: a UNIX-domain socket
        inet:host[:port]    LMTP only: a host, never with MX lookup

    and a delivery request may name several, separated by commas or white space; they
    are tried in order. A port may be a number or a service name (/etc/services).

    MX hosts are sorted by preference, hosts of equal preference in random order;
    each host's addresses follow (A, then AAAA, as inet_protocols allows), in the
    order smtp_address_preference asks for. The name kept with an address is the MX
    host name (or the [host]), never a CNAME target unless
    smtp_cname_overrides_servername = yes: it is the name TLS policy lookups and
    certificate checks use.

    With dnssec = True (smtp_dns_support_level = dnssec) every query asks for DNSSEC
    (the DO bit in EDNS0 and the AD bit in the header) and each answer's DNSSEC status
    is the AD bit of the configured resolver's reply, which Postfix trusts in the same
    way: the resolver must validate, and the path to it must be trusted (loopback).
    An Address then carries whether its address records were secure (dnssec) and,
    when it came from an MX lookup, whether the MX RRset was (mx_dnssec): the DANE
    rules of smtp/dane.py need both.

    Errors are Postfix's, with its status codes:
        4.4.3 Host or domain name not found. Name service error for name=N type=T:
              Host not found, try again            (timeout, SERVFAIL, garbage)
        5.4.4 ... Host not found                   (NXDOMAIN)
        5.4.4 ... Host found but no data record of requested type
        5.1.10 Domain D does not accept mail (nullMX)
    A temporary error dominates permanent ones, so that mail is never bounced because
    one of several lookups failed for good while another could not be done.

FUNCTIONS
    parse(text, lmtp=False) -> NextHop; NexthopError for bad syntax.
    parse_list(text, lmtp=False) -> [NextHop]
    NexthopResolver(nameservers=(), timeout=DNS_TIMEOUT, host_lookup=("dns",),
             protocols=("ipv4", "ipv6"), cname_overrides=False, preference="any")
        .addresses(dest) -> (list of Address, Why or None): Why only when the list is
        empty. Never raises for anything the network sends.
    .lookup(name, rdtype) -> (answer or None, kind, secure): kind is ok, nodata,
        nxdomain or again; secure is the AD bit (False without dnssec).
    prepare_for_chroot(): load what the C library loads on first use (NSS modules), so
        that lookups work inside a chroot jail. dnspython and the record classes it
        would load lazily are imported with this module, in the master, so that every
        forked smtp worker inherits them instead of importing them again.

CONFIGURATION PARAMETERS
    smtp_host_lookup (dns), inet_protocols (all), smtp_address_preference (any),
    smtp_cname_overrides_servername (no), smtp_dns_nameservers (empty: the
    system's resolv.conf) and smtp_dns_timeout (10s).

SEE ALSO
    smtp/service.py, smtp/tls_policy.py; Postfix smtp_addr.c, smtp_connect.c.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - dnspython's IDNA codec
import ipaddress
import random
import socket
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

DNS_TIMEOUT = 10.0
SMTP_PORT, LMTP_PORT = 25, 24
MAX_RECORDS = 100           # Postfix's dns_rr_list_limit: bounded work per lookup


class NexthopError(ValueError):
    """A next-hop destination that does not parse."""


@dataclass(frozen=True)
class NextHop:
    """One next hop: what was written, and how to reach it."""

    text: str           # as written: the per-site and policy table key
    host: str           # domain, host name or address without brackets; unix: the path
    port: int           # 0 for unix
    mx: bool            # MX lookup wanted
    literal: bool       # [host] or host:port form: policy lookups take it as written
    unix: bool = False

    @property
    def numeric(self) -> bool:
        """Whether host is an IP address."""
        return _ip(self.host) is not None


@dataclass
class Address:
    """One server address to try."""

    name: str           # host name for logs, TLS policy and certificate checks
    addr: str           # printable address (or unix path)
    port: int
    pref: int = 0
    family: int = socket.AF_INET
    dnssec: bool = False        # the address records were DNSSEC-validated (AD bit)
    mx_dnssec: bool | None = None   # from an MX lookup: was the MX RRset validated
    rname: str = ""             # the name the address records are at (CNAME target)

    @property
    def namaddr(self) -> str:
        """host[addr], as Postfix logs it."""
        return f"{self.name}[{self.addr}]"

    @property
    def namaddrport(self) -> str:
        """host[addr]:port (host[path] for unix sockets)."""
        return f"{self.name}[{self.addr}]:{self.port}" if self.port else self.namaddr


@dataclass
class Why:
    """Why there is nothing to deliver to: an enhanced status code and a reason."""

    dsn: str
    reason: str

    @property
    def soft(self) -> bool:
        """A temporary condition."""
        return self.dsn.startswith("4")


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _port(service: str, text: str) -> int:
    if service.isdigit():
        port = int(service)
        if not 0 < port < 65536:
            raise NexthopError(f"bad network port: {service} for destination: {text}")
        return port
    if not service:
        raise NexthopError(f"missing port after ':' in server description: {text}")
    try:
        return socket.getservbyname(service, "tcp")
    except (OSError, UnicodeError, ValueError):     # not a name: bytes from a bad main.cf, NUL
        if service == "smtp":
            return SMTP_PORT
        raise NexthopError(f"unknown service: {service}/tcp") from None


def parse(text: str, lmtp: bool = False) -> NextHop:
    """One next hop; NexthopError when it does not parse."""
    raw = text.strip()
    if not raw:
        raise NexthopError("empty destination")
    default_port = LMTP_PORT if lmtp else SMTP_PORT
    if lmtp and raw.startswith("unix:"):
        path = raw[5:]
        if not path:
            raise NexthopError(f"empty pathname in server description: {text}")
        return NextHop(raw, path, 0, mx=False, literal=True, unix=True)
    rest = raw[5:] if lmtp and raw.startswith("inet:") else raw
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise NexthopError(f"missing \"]\" in server description: {text}")
        host, tail = rest[1:end], rest[end + 1:]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if not host:
            raise NexthopError(f"empty host name in server description: {text}")
        if tail and not tail.startswith(":"):
            raise NexthopError(f"garbage after \"]\" in server description: {text}")
        port = _port(tail[1:], text) if tail else default_port
        # For tables, "[host]" and "[host]:port" are keys as written (minus inet:).
        return NextHop(rest, host, port, mx=False, literal=True)
    host, colon, service = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if colon and ":" in host:
        raise NexthopError(f"bad server description (IPv6 addresses need [ ]): {text}")
    if not host:
        raise NexthopError(f"empty host name in server description: {text}")
    port = _port(service, text) if colon else default_port
    numeric = _ip(host) is not None
    return NextHop(rest, host, port, mx=not lmtp and not numeric, literal=bool(colon))


def parse_list(text: str, lmtp: bool = False) -> list[NextHop]:
    """The next hops of a delivery request, in order."""
    return [parse(item, lmtp) for item in text.replace(",", " ").split()]


# --- lookups ------------------------------------------------------------------------------

_DNS_TEXT = {"nxdomain": "Host not found", "again": "Host not found, try again",
             "nodata": "Host found but no data record of requested type"}


def _dns_why(kind: str, name: str, rdtype: str) -> Why:
    dsn = "4.4.3" if kind == "again" else "5.4.4"
    return Why(dsn, f"Host or domain name not found. Name service error for name={name} "
                    f"type={rdtype}: {_DNS_TEXT[kind]}")


def _load_record_types() -> None:
    """Import the record classes dnspython loads on first use (at import: see FUNCTIONS)."""
    for name in ("A", "AAAA", "MX", "CNAME", "SOA", "NS", "PTR", "TXT", "DNAME", "SRV",
                 "TLSA"):
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(name))


_load_record_types()


def prepare_for_chroot() -> None:
    """Load what the C library loads on first use (NSS modules), before a chroot."""
    try:
        # NSS modules for getaddrinfo and getservbyname are dlopen()ed on first use.
        socket.getaddrinfo("localhost", SMTP_PORT, 0, socket.SOCK_STREAM)
        socket.getservbyname("smtp", "tcp")
    except OSError:
        pass


class NexthopResolver:
    """MX and address lookups with dnspython (and the C library for "native")."""

    def __init__(self, nameservers=(), timeout: float = DNS_TIMEOUT,
                 host_lookup=("dns",), protocols=("ipv4", "ipv6"),
                 cname_overrides: bool = False, preference: str = "any",
                 randomize: bool = True, dnssec: bool = False):
        """Build the dnspython resolver now (before any chroot: resolv.conf is read here)."""
        self.timeout = timeout
        self.host_lookup = [h.lower() for h in host_lookup] or ["dns"]
        self.types = []
        if "ipv4" in protocols or "all" in protocols:
            self.types.append("A")
        if "ipv6" in protocols or "all" in protocols:
            self.types.append("AAAA")
        if not self.types:
            self.types = ["A"]
        self.cname_overrides = cname_overrides
        self.preference = preference
        self.randomize = randomize
        self.problem: str | None = None
        if nameservers:
            self.dns = dns.resolver.Resolver(configure=False)
            self.dns.nameservers = [_nameserver(n) for n in nameservers]
        else:
            try:
                self.dns = dns.resolver.Resolver()
            except Exception as exc:        # no or unreadable resolv.conf
                self.dns = dns.resolver.Resolver(configure=False)
                self.dns.nameservers = ["127.0.0.1"]
                self.problem = f"cannot read resolver configuration: {exc}"
        self.dns.timeout = min(timeout, 5.0)
        self.dns.lifetime = timeout
        self.dns.cache = None
        # Queries are absolute names: no search list, as Postfix (no RES_DEFNAMES).
        self.dns.use_search_by_default = False
        self.dnssec = dnssec
        if dnssec:
            # RES_USE_DNSSEC: DO in EDNS0, and AD in the query so that the resolver
            # reports what it validated.
            self.dns.use_edns(0, dns.flags.DO, 1232)
            self.dns.flags = dns.flags.RD | dns.flags.AD

    # --- DNS -------------------------------------------------------------------------
    def lookup(self, name: str, rdtype: str):
        """(answer or None, kind, secure): secure is the resolver's AD bit (dnssec only)."""
        answer, kind = self._query(name, rdtype)
        return answer, kind, self._secure(answer)

    def _secure(self, answer) -> bool:
        if not self.dnssec or answer is None:
            return False
        return bool(answer.response.flags & dns.flags.AD)

    def _query(self, name: str, rdtype: str):
        """(answer or None, kind): kind is ok, nodata, nxdomain or again."""
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return None, "nxdomain"
        try:
            answer = self.dns.resolve(qname, rdtype, raise_on_no_answer=False,
                                      search=False, lifetime=self.timeout)
        except dns.resolver.NXDOMAIN:
            return None, "nxdomain"
        except (dns.exception.DNSException, OSError, ValueError, EOFError):
            # Timeouts, SERVFAIL, refused, truncated or malformed replies: try again later.
            return None, "again"
        except Exception:       # noqa: BLE001 - whatever a DNS server sends, mail waits
            return None, "again"
        if answer.rrset is None or len(answer.rrset) == 0:
            return answer, "nodata"
        return answer, "ok"

    def _host_addresses(self, name: str, pref: int, port: int) -> tuple[list[Address], Why | None]:
        """A/AAAA records of one host name (numeric names are taken as they are)."""
        ip = _ip(name)
        if ip is not None:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [Address(name, str(ip), port, pref, family)], None
        why = None
        found: list[Address] = []
        if "dns" in self.host_lookup:
            soft = None
            for rdtype in self.types:
                answer, kind = self._query(name, rdtype)
                if kind == "ok":
                    label = name
                    rname = answer.canonical_name.to_text(omit_final_dot=True)
                    if self.cname_overrides:
                        label = rname
                    family = socket.AF_INET6 if rdtype == "AAAA" else socket.AF_INET
                    secure = self._secure(answer)
                    for rr in list(answer.rrset)[:MAX_RECORDS]:
                        found.append(Address(label, rr.address, port, pref, family,
                                             dnssec=secure, rname=rname))
                    continue
                failure = _dns_why(kind, name, rdtype)
                if kind == "again":
                    soft = failure
                why = failure
            if found:
                return found, None
            why = soft or why
        if "native" in self.host_lookup and (why is None or not why.soft):
            native, native_why = self._native(name, pref, port)
            if native:
                return native, None
            why = why if why is not None and why.soft else native_why
        return [], why

    def _native(self, name: str, pref: int, port: int) -> tuple[list[Address], Why | None]:
        try:
            infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            soft = exc.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", -11))
            return [], Why("4.4.4" if soft else "5.4.4",
                           f"unable to look up host {name}: {exc.strerror}")
        except (OSError, UnicodeError) as exc:
            return [], Why("4.3.0", f"unable to look up host {name}: {exc}")
        out, seen = [], set()
        for family, _, _, _, sockaddr in infos:
            if family == socket.AF_INET and "A" not in self.types:
                continue
            if family == socket.AF_INET6 and "AAAA" not in self.types:
                continue
            if sockaddr[0] not in seen:
                seen.add(sockaddr[0])
                out.append(Address(name, sockaddr[0], port, pref, family))
        if not out:
            return [], Why("5.4.4", f"{name}: host not found")
        return out, None

    def _order(self, addrs: list[Address]) -> list[Address]:
        """By preference; equal preferences shuffled; then the preferred family first."""
        if self.randomize:
            random.shuffle(addrs)
        want = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(self.preference)

        def key(a: Address):
            return (a.pref, 0 if want is None or a.family == want else 1)
        return sorted(addrs, key=key)

    def addresses(self, dest: NextHop) -> tuple[list[Address], Why | None]:
        """The addresses to try for dest, best first; (empty list, why) on failure."""
        if dest.unix:
            return [Address("", dest.host, 0, 0, socket.AF_UNIX)], None
        if not dest.mx:
            addrs, why = self._host_addresses(dest.host, 0, dest.port)
            return (self._order(addrs), None) if addrs else ([], why)
        if "dns" not in self.host_lookup:
            addrs, why = self._host_addresses(dest.host, 0, dest.port)
            return (self._order(addrs), None) if addrs else ([], why)
        answer, kind = self._query(dest.host, "MX")
        if kind == "again":
            return [], _dns_why("again", dest.host, "MX")
        if kind in ("nxdomain", "nodata"):
            # No MX records: the domain's own addresses, as RFC 5321 says.
            addrs, why = self._host_addresses(dest.host, 0, dest.port)
            return (self._order(addrs), None) if addrs else ([], why)
        mx_secure = self._secure(answer)
        records = sorted(list(answer.rrset)[:MAX_RECORDS], key=lambda rr: rr.preference)
        if len(records) == 1 and records[0].exchange.to_text() == ".":
            return [], Why("5.1.10", f"Domain {dest.host} does not accept mail (nullMX)")
        addrs: list[Address] = []
        soft = hard = None
        by_pref: dict[int, list] = {}
        for rr in records:
            by_pref.setdefault(rr.preference, []).append(rr)
        for pref in sorted(by_pref):
            group = by_pref[pref]
            if self.randomize:
                random.shuffle(group)
            for rr in group:
                host = rr.exchange.to_text(omit_final_dot=True)
                if not host or host == ".":
                    continue
                found, why = self._host_addresses(host, pref, dest.port)
                for a in found:
                    a.mx_dnssec = mx_secure
                if why is not None:
                    if why.soft:
                        soft = soft or why
                    else:
                        hard = hard or why
                addrs += found
        if addrs:
            return self._order(addrs), None
        return [], soft or hard or Why("5.4.4", f"no MX host for {dest.host} has a valid "
                                                f"address record")


def _nameserver(text: str):
    """A dnspython nameserver from "address", "address:port" or "[address]:port"."""
    text = text.strip()
    port = 53
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        if tail.startswith(":") and tail[1:].isdigit():
            port = int(tail[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p) if p.isdigit() else 53
    else:
        host = text
    if _ip(host) is None:
        raise ValueError(f"bad DNS server address: {text}")
    return dns.nameserver.Do53Nameserver(host, port)
