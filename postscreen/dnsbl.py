"""postscreen's DNS list lookups: postscreen_dnsbl_sites, scored, without blocking.

Postfix's postscreen asks its dnsblog service; here the queries go straight from
postscreen's event loop over UDP (dnspython builds and parses the messages), so that one
slow list never holds up another client.

SITES
    postscreen_dnsbl_sites words are `domain[=d.d.d.d][*weight]`, as Postfix: the filter
    is lib/dnsbl.py's ip_match pattern (each octet a number or [n;lo..hi]), the weight an
    integer (default 1, negative for an allow list). A client's score is the sum of the
    weights of the sites whose A record matches; the name replied is the domain of the
    site of the largest weight that matched (psc_dnsbl_receive()), or what
    postscreen_dnsbl_reply_map says for that domain: a list domain that holds a secret
    (a subscriber's key) is never shown to the client. The map is looked up once per
    domain, when the sites are parsed (before the chroot), as Postfix does.

TTL
    A listing's TTL is the least TTL of the A records that scored; a pass's is the
    least negative TTL (the SOA's, in NXDOMAIN or NODATA replies); either is kept within
    postscreen_dnsbl_min_ttl and postscreen_dnsbl_max_ttl when the result is taken.

RESOLVER
    The servers of smtpd_dns_nameservers, or the system's resolv.conf read before the
    chroot (lib/dnsbl.DnsLookup). A query is sent to the first server and again to the
    next each second until a reply comes or postscreen_dnsbl_timeout ends it; a query
    without an answer scores nothing (a warning says so).

CLASSES
    Sites(words, reply_map=None) -> the parsed sites (ConfigError for a bad word or a
        reply map lookup error); reply_map is an open lib/tables.py table.
    Score(loop, sites, servers, addr, timeout, done): starts the queries at once; done()
        is called when the last reply is in. total, name, ttl(min_ttl, max_ttl) read it
        at any time (partial while queries are pending); cancel() stops what is pending.

SEE ALSO
    postscreen/service.py, lib/dnsbl.py; Postfix postscreen_dnsbl.c, dnsblog.c.
"""

from __future__ import annotations

import socket

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from ..lib import dnsbl, msg, tables
from ..lib.maincf import ConfigError

RESEND = 1.0


class Site:
    def __init__(self, domain: str, pattern, weight: int, text: str):
        self.domain, self.pattern, self.weight, self.text = domain, pattern, weight, text


class Sites:
    """postscreen_dnsbl_sites, grouped by list domain."""

    def __init__(self, words: list[str], reply_map=None):
        self.by_domain: dict[str, list[Site]] = {}
        self.reply_name: dict[str, str] = {}    # domain -> the name shown to clients
        for word in words:
            text, weight = word, 1
            if "*" in text:
                text, _, number = text.rpartition("*")
                try:
                    weight = int(number)
                except ValueError:
                    raise ConfigError(f"postscreen_dnsbl_sites: bad weight in \"{word}\"")\
                        from None
            domain, _, pattern = text.partition("=")
            domain = domain.lower().rstrip(".")
            if not dnsbl.valid_hostname(domain):
                raise ConfigError(f"postscreen_dnsbl_sites: bad DNS list domain in "
                                  f"\"{word}\"")
            octets = None
            if pattern:
                try:
                    octets = dnsbl.parse_reply_pattern(pattern)
                except ValueError as exc:
                    raise ConfigError(f"postscreen_dnsbl_sites: \"{word}\": {exc}") from None
            if domain not in self.by_domain:
                self.reply_name[domain] = _reply_name(reply_map, domain)
            self.by_domain.setdefault(domain, []).append(Site(domain, octets, weight, word))

    def __bool__(self) -> bool:
        return bool(self.by_domain)


def _reply_name(reply_map, domain: str) -> str:
    if reply_map is None:
        return domain
    try:
        safe = reply_map.lookup(domain)
    except tables.TableError as exc:
        raise ConfigError(f"{reply_map.type}:{reply_map.name} lookup error: {exc}") from None
    return safe.strip() if safe and safe.strip() else domain


def servers(nameservers: list[str]) -> list[tuple[str, int]]:
    """(address, port) of the DNS servers: smtpd_dns_nameservers, else resolv.conf."""
    resolver = dnsbl.DnsLookup(nameservers=nameservers).resolver
    out = []
    for ns in resolver.nameservers:
        if isinstance(ns, str):
            out.append((ns, resolver.port))
        else:
            out.append((ns.address, ns.port))
    return out or [("127.0.0.1", 53)]


class _Query:
    def __init__(self, score, domain: str, qname: str):
        self.score, self.domain, self.qname = score, domain, qname
        self.message = dns.message.make_query(qname, dns.rdatatype.A)
        self.message.flags |= dns.flags.RD
        family = socket.AF_INET6 if ":" in score.servers[0][0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0
        self.resend_timer = None

    def send(self) -> None:
        servers = self.score.servers
        server = servers[self.sent % len(servers)]
        self.sent += 1
        try:
            self.sock.sendto(self.message.to_wire(), server)
        except OSError as exc:
            msg.verbose(1, f"dnsblog_query: sendto {server[0]}: {exc.strerror}")
        self.resend_timer = self.score.loop.call_later(RESEND, self.send)

    def close(self) -> None:
        self.score.loop.cancel(self.resend_timer)
        self.score.loop.remove(self.sock)
        self.sock.close()


class Score:
    """The DNSBL score of one client address, as its replies come in."""

    def __init__(self, loop, sites: Sites, servers_: list, addr: str, timeout: float, done):
        self.loop, self.sites, self.servers, self.done = loop, sites, servers_, done
        self.total, self.name, self.weight = 0, None, 0
        self.fail_ttl, self.pass_ttl = -1, -1
        self.queries: list[_Query] = []
        self.timer = None
        labels = dnsbl.reverse_address(addr)
        if labels is None:
            return
        for domain in sites.by_domain:
            query = _Query(self, domain, f"{labels}.{domain}")
            self.queries.append(query)
            loop.add_reader(query.sock, lambda q=query: self._receive(q))
            query.send()
        self.timer = loop.call_later(timeout, self._timeout) if self.queries else None

    @property
    def pending(self) -> int:
        return len(self.queries)

    def ttl(self, min_ttl: int, max_ttl: int) -> int:
        ttl = self.fail_ttl if self.total > 0 else self.pass_ttl
        return max(min_ttl, min(max_ttl, ttl))

    def cancel(self) -> None:
        for query in self.queries:
            query.close()
        self.queries = []
        if self.timer is not None:
            self.loop.cancel(self.timer)
            self.timer = None

    def _finish(self, query: _Query) -> None:
        query.close()
        self.queries.remove(query)
        if not self.queries:
            self.loop.cancel(self.timer)
            self.timer = None
            self.done()

    def _timeout(self) -> None:
        self.timer = None
        for query in list(self.queries):
            msg.warn(f"dnsblog_query: lookup error for DNS query {query.qname}: Host or "
                     f"domain name not found. Name service error for name={query.qname} "
                     f"type=A: Host not found, try again")
            query.close()
        self.queries = []
        self.done()

    def _receive(self, query: _Query) -> None:
        try:
            wire, _ = query.sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return              # an ICMP error from one server: the resend tries the next
        try:
            reply = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError, EOFError):
            return
        if not query.message.is_response(reply):
            return
        rcode = reply.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return              # SERVFAIL, REFUSED: another server may know
        addresses, ttl = [], -1
        for rrset in reply.answer:
            if rrset.rdtype == dns.rdatatype.A:
                addresses += [r.address for r in rrset]
                ttl = rrset.ttl if ttl < 0 else min(ttl, rrset.ttl)
        if not addresses:
            for rrset in reply.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    soa = min(rrset.ttl, min(r.minimum for r in rrset))
                    ttl = soa if ttl < 0 else min(ttl, soa)
        self._score(query.domain, addresses, ttl)
        self._finish(query)

    def _score(self, domain: str, addresses: list[str], ttl: int) -> None:
        """psc_dnsbl_receive(): add the weights of the sites the reply matches."""
        for site in self.sites.by_domain.get(domain, ()):
            if addresses:
                if site.pattern is None or any(dnsbl.match_reply(site.pattern, a)
                                               for a in addresses):
                    if self.name is None or self.weight < site.weight:
                        self.name, self.weight = self.sites.reply_name[domain], site.weight
                    self.total += site.weight
                listed = site.weight > 0
            else:
                listed = site.weight <= 0
            if ttl >= 0:
                if listed:
                    self.fail_ttl = ttl if self.fail_ttl < 0 else min(self.fail_ttl, ttl)
                else:
                    self.pass_ttl = ttl if self.pass_ttl < 0 else min(self.pass_ttl, ttl)
