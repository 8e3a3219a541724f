"""Address resolution: which transport and next hop deliver a recipient (trivial-rewrite).

Postfix's qmgr asks trivial-rewrite(8) where a recipient goes; postfix-py's qmgr does the
same lookups in process, with the same parameters and the same precedence. These are
Postfix's address classes (ADDRESS_CLASS_README), tried in this order:

    1. local: the recipient domain is in mydestination, or is an address literal
       ([192.0.2.1], [ipv6:2001:db8::1]) of an address the inet services listen on
       (inet_interfaces; `all` is every interface's address), or the address has no
       domain (Postfix would have qualified it with $myorigin): local_transport (default
       local:$myhostname).
    2. virtual mailbox: the domain is listed in virtual_mailbox_domains (exact names, no
       subdomains, as Postfix's string list): virtual_transport (default virtual).
    3. relay: the domain matches relay_domains (a parent domain matches its subdomains, as
       with Postfix's default parent_domain_matches_subdomains): relay_transport.
    4. default: default_transport.
    For 1 and 2 the next hop is the transport's own next hop when it names one
    (`lmtp:unix:private/dovecot-lmtp`), else the recipient domain; for 3 and 4 the
    transport's own next hop, else relayhost when set, else the recipient domain.
    A domain listed in mydestination and virtual_mailbox_domains, or in
    virtual_mailbox_domains and relay_domains, gets Postfix's warning
    `do not list domain D in BOTH mydestination and virtual_mailbox_domains` and the
    class that comes first above. The virtual alias class (virtual_alias_domains) is not
    implemented: postfix-py has no virtual_alias_maps rewriting yet.
    5. transport_maps, when set, override the result, as transport(5) says: the keys are
       user+extension@domain, user@domain, domain, .parent domains (each parent, nearest
       first), then `*`; regexp: and pcre: tables see the full address only. In the value
       `transport:nexthop` an empty transport keeps the transport of steps 1-4, an empty
       next hop with a non-empty transport resets the next hop to the recipient domain, and
       both empty change nothing.

FUNCTIONS
    AddressResolver(cfg): open the tables that cfg names (TableError when one cannot be opened).
    AddressResolver.resolve(address) -> Route(transport, nexthop, local, addr_class);
        addr_class is "local", "virtual", "relay" or "default" (the class before
        transport_maps; not part of equality); raises ResolveError (a transport_maps or
        domain list lookup failure: the caller defers the recipient with "4.3.0 address
        resolver failure").
    parse_spec(text) -> (transport, nexthop) of a "transport:nexthop" value.

CONFIGURATION PARAMETERS
    mydestination ($myhostname, localhost.$mydomain, localhost), relay_domains (empty),
    relayhost (empty), default_transport (smtp), relay_transport (relay), local_transport
    (local:$myhostname), transport_maps (empty), recipient_delimiter (empty), myhostname,
    myorigin ($myhostname), parent_domain_matches_subdomains (Postfix's default list),
    inet_interfaces (all), virtual_mailbox_domains ($virtual_mailbox_maps),
    virtual_transport (virtual).

SEE ALSO
    lib/address.py, lib/domains.py, virtual/service.py; Postfix trivial-rewrite(8),
    transport(5), postconf(5), ADDRESS_CLASS_README, VIRTUAL_README.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import psutil

from . import msg, tables
from .address import split_address, strip_extension
from .domains import DomainList


class ResolveError(Exception):
    """A lookup table failed while resolving an address (a temporary condition)."""


@dataclass(frozen=True)
class Route:
    transport: str
    nexthop: str
    local: bool = False
    addr_class: str = field(default="default", compare=False)


def parse_spec(text: str) -> tuple[str, str]:
    """A `transport:nexthop` value as its two parts; no colon means a transport only."""
    transport, _, nexthop = text.strip().partition(":")
    return transport.strip(), nexthop.strip()


class AddressResolver:
    """Recipient address -> Route, from main.cf as trivial-rewrite(8) reads it."""

    def __init__(self, cfg):
        parents = set(cfg["parent_domain_matches_subdomains"])
        self.myhostname = cfg.get("myhostname").lower()
        self.myorigin = (cfg.get("myorigin") or self.myhostname).lower()
        self.delimiters = cfg.get("recipient_delimiter")
        self.relayhost = cfg.get("relayhost").strip()
        self.local_spec = parse_spec(cfg.get("local_transport"))
        self.relay_spec = parse_spec(cfg.get("relay_transport"))
        self.default_spec = parse_spec(cfg.get("default_transport"))
        self.mydestination = DomainList(cfg["mydestination"], subdomains=False)
        self.relay_domains = DomainList(cfg["relay_domains"], "relay_domains" in parents)
        self.virtual_spec = parse_spec(cfg.get("virtual_transport"))
        # A string list in Postfix: names as written, no .parent matching.
        self.virtual_mailbox_domains = DomainList(cfg["virtual_mailbox_domains"],
                                                  subdomains=False, exact=True)
        self.inet_interfaces = cfg["inet_interfaces"]
        self._own: set | None = None
        self.transport_subdomains = "transport_maps" in parents
        self.transport_maps = [tables.open_table(ref) for ref in cfg["transport_maps"]]

    def close(self) -> None:
        """Release the tables."""
        self.mydestination.close()
        self.relay_domains.close()
        self.virtual_mailbox_domains.close()
        for table in self.transport_maps:
            table.close()

    def is_local(self, domain: str) -> bool:
        """Whether mail for domain is delivered on this host (Postfix's resolve_local)."""
        if not domain or self.mydestination.match(domain):
            return True
        if domain.startswith("[") and domain.endswith("]"):
            text = domain[1:-1]
            if text[:5] == "ipv6:":
                text = text[5:]
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                return False
            return addr in self._own_addresses()
        return False

    def _own_addresses(self) -> set:
        """The addresses of inet_interfaces, found at first need (names are resolved)."""
        if self._own is None:
            own = set()
            for word in self.inet_interfaces:
                if word == "all":
                    try:
                        found = [a.address.split("%")[0] for entries in
                                 psutil.net_if_addrs().values() for a in entries
                                 if a.family in (socket.AF_INET, socket.AF_INET6)]
                    except OSError:
                        found = []
                elif word == "loopback-only":
                    found = ["127.0.0.1", "::1"]
                else:
                    try:
                        found = [info[4][0] for info in socket.getaddrinfo(
                            word.strip("[]"), None, 0, socket.SOCK_STREAM)]
                    except (socket.gaierror, UnicodeError) as exc:
                        msg.warn(f"inet_interfaces: {word}: host not found: {exc}")
                        found = []
                for text in found:
                    try:
                        own.add(ipaddress.ip_address(text))
                    except ValueError:
                        pass
            self._own = own
        return self._own

    def resolve(self, address: str) -> Route:
        """Where the recipient address goes; ResolveError on a table failure."""
        local, domain = split_address(address)
        if not domain:
            domain = self.myorigin
        try:
            route = self._class_route(domain)
        except tables.TableError as exc:     # a domain list's table failed
            raise ResolveError(str(exc)) from None
        found = self._transport_lookup(local, domain)
        if found is None:
            return route
        transport, nexthop = parse_spec(found)
        if not transport and not nexthop:
            return route
        if transport and not nexthop:
            nexthop = domain
        return Route(transport or route.transport, nexthop or route.nexthop,
                     local=route.local and not transport, addr_class=route.addr_class)

    def _class_route(self, domain: str) -> Route:
        """The route of the domain's address class, before transport_maps."""
        if self.is_local(domain):
            if self.virtual_mailbox_domains.match(domain):
                msg.warn(f"do not list domain {domain} in BOTH mydestination and "
                         "virtual_mailbox_domains")
            transport, nexthop = self.local_spec
            return Route(transport or "local", nexthop or domain, True, "local")
        if self.virtual_mailbox_domains.match(domain):
            if self.relay_domains.match(domain):
                msg.warn(f"do not list domain {domain} in BOTH virtual_mailbox_domains "
                         "and relay_domains")
            transport, nexthop = self.virtual_spec
            return Route(transport or "virtual", nexthop or domain, False, "virtual")
        if self.relay_domains.match(domain):
            transport, nexthop = self.relay_spec
            addr_class = "relay"
        else:
            transport, nexthop = self.default_spec
            addr_class = "default"
        return Route(transport or "smtp", nexthop or self.relayhost or domain, False,
                     addr_class)

    def _transport_lookup(self, local: str, domain: str) -> str | None:
        """transport(5) search order; the first table with an answer wins."""
        if not self.transport_maps:
            return None
        full = f"{local}@{domain}"
        keys = [full]
        if self.delimiters:
            base = strip_extension(local, self.delimiters)
            if base != local:
                keys.append(f"{base}@{domain}")
        keys.append(domain)
        labels = domain.split(".")
        for i in range(1, len(labels)):
            keys.append(("" if self.transport_subdomains else ".") + ".".join(labels[i:]))
        keys.append("*")
        for table in self.transport_maps:
            pattern = table.type in ("regexp", "pcre")
            for key in [full] if pattern else keys:
                try:
                    value = table.lookup(key)
                except Exception as exc:
                    raise ResolveError(f"transport_maps: {exc}") from None
                if value is not None:
                    return value
        return None
