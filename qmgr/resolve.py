"""Address resolution: which transport and next hop deliver a recipient (trivial-rewrite).

Postfix's qmgr asks trivial-rewrite(8) where a recipient goes; postfix-py's qmgr does the
same lookups in process, with the same parameters and the same precedence:

    1. The recipient domain is in mydestination (or is an address without a domain, which
       Postfix would have qualified with $myorigin): local_transport (default
       local:$myhostname).
    2. The domain matches relay_domains (a parent domain matches its subdomains, as with
       Postfix's default parent_domain_matches_subdomains): relay_transport.
    3. Otherwise: default_transport, or the sender_dependent_default_transport_maps
       result for the envelope sender.
    For 2 and 3 the next hop is the transport's own next hop when it names one
    (`smtp:[gw.example]`), else the sender_dependent_relayhost_maps result for the
    sender, else relayhost when set, else the recipient domain.
    4. transport_maps, when set, override the result, as transport(5) says: the keys are
       user+extension@domain, user@domain, domain, .parent domains (each parent, nearest
       first), then `*`; regexp: and pcre: tables see the full address only. In the value
       `transport:nexthop` an empty transport keeps the transport of steps 1-3, an empty
       next hop with a non-empty transport resets the next hop to the recipient domain, and
       both empty change nothing.

SENDER-DEPENDENT ROUTING
    As trivial-rewrite's resolve.c: the sender_dependent_* tables are searched with the
    envelope sender as mail_addr_find(3) does: user+ext@domain, user@domain (without the
    recipient_delimiter extension), the local part alone when the domain is local, then
    @domain; regexp: and pcre: tables see the full address only; each key is tried in
    every table before the next key. The null sender is looked up as
    empty_address_relayhost_maps_lookup_key (empty_address_default_transport_maps_
    lookup_key), `<>` by default. A result of DUNNO (any case) ends the search and keeps
    relayhost (default_transport); an empty result is ignored with Postfix's warning.

FUNCTIONS
    AddressResolver(cfg): open the tables that cfg names (TableError when one cannot be opened).
    AddressResolver.resolve(address, sender=None) -> Route(transport, nexthop, local); raises
        ResolveError (transport_maps, mydestination or sender-dependent lookup failure: the
        caller defers the recipient with "4.3.0 address resolver failure"). Without a
        sender (None) the sender-dependent tables are not consulted.
    SenderRoutes(cfg, resolver).offhost(sender, relay_class) -> (transport spec, relayhost).
    parse_spec(text) -> (transport, nexthop) of a "transport:nexthop" value.

CONFIGURATION PARAMETERS
    mydestination ($myhostname, localhost.$mydomain, localhost), relay_domains (empty),
    relayhost (empty), default_transport (smtp), relay_transport (relay), local_transport
    (local:$myhostname), transport_maps (empty), sender_dependent_relayhost_maps (empty),
    sender_dependent_default_transport_maps (empty), empty_address_relayhost_maps_lookup_key
    (<>), empty_address_default_transport_maps_lookup_key (<>), recipient_delimiter (empty),
    myhostname,
    myorigin ($myhostname), parent_domain_matches_subdomains (Postfix's default list, read
    with a local default while the parameter table does not declare it).

SEE ALSO
    lib/address.py; Postfix trivial-rewrite(8), transport(5), postconf(5).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lib import msg, params, tables
from ..lib.address import split_address, strip_extension


class ResolveError(Exception):
    """A lookup table failed while resolving an address (a temporary condition)."""


@dataclass(frozen=True)
class Route:
    transport: str
    nexthop: str
    local: bool = False


def parse_spec(text: str) -> tuple[str, str]:
    """A `transport:nexthop` value as its two parts; no colon means a transport only."""
    transport, _, nexthop = text.strip().partition(":")
    return transport.strip(), nexthop.strip()


class DomainList:
    """A list of domains as main.cf writes them: names, /file/names and type:table refs."""

    def __init__(self, words: list[str], subdomains: bool):
        self.names: set[str] = set()
        self.tables: list[tables.Table] = []
        self.subdomains = subdomains
        for word in words:
            if word.startswith("/"):
                try:
                    with open(word, encoding="utf-8") as f:
                        self.names.update(w.lower() for w in params.split_list(f.read())
                                          if not w.startswith("#"))
                except OSError as exc:
                    raise tables.TableError(f"open {word}: {exc.strerror}") from None
            elif ":" in word and not word.startswith("["):
                self.tables.append(tables.open_table(word))
            else:
                self.names.add(word.lower().rstrip("."))

    def _one(self, name: str) -> bool:
        if name in self.names:
            return True
        for table in self.tables:
            try:
                if table.lookup(name) is not None:
                    return True
            except Exception as exc:     # a table backend error: not "not found"
                raise ResolveError(f"{table.ref}: {exc}") from None
        return False

    def match(self, domain: str) -> bool:
        """Whether domain (or, with subdomain matching, a parent of it) is listed."""
        if not domain:
            return False
        if self._one(domain):
            return True
        if self.subdomains:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                # Postfix: "example.com" matches its subdomains; ".example.com" only them.
                if self._one(parent) or self._one("." + parent):
                    return True
        return False

    def close(self) -> None:
        for table in self.tables:
            table.close()


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
        self.transport_subdomains = "transport_maps" in parents
        self.transport_maps = [tables.open_table(ref) for ref in cfg["transport_maps"]]
        self.sender_routes = SenderRoutes(cfg, self)

    def close(self) -> None:
        """Release the tables."""
        self.mydestination.close()
        self.relay_domains.close()
        for table in self.transport_maps:
            table.close()
        self.sender_routes.close()

    def is_local(self, domain: str) -> bool:
        """Whether mail for domain is delivered on this host."""
        return not domain or self.mydestination.match(domain)

    def resolve(self, address: str, sender: str | None = None) -> Route:
        """Where the recipient address of a message from sender goes; ResolveError on a
        table failure."""
        local, domain = split_address(address)
        if not domain:
            domain = self.myorigin
        if self.is_local(domain):
            transport, nexthop = self.local_spec
            route = Route(transport or "local", nexthop or domain, local=True)
        else:
            spec, relayhost = self.sender_routes.offhost(sender,
                                                         self.relay_domains.match(domain))
            transport, nexthop = spec
            route = Route(transport or "smtp", nexthop or relayhost or domain)
        found = self._transport_lookup(local, domain)
        if found is None:
            return route
        transport, nexthop = parse_spec(found)
        if not transport and not nexthop:
            return route
        if transport and not nexthop:
            nexthop = domain
        return Route(transport or route.transport, nexthop or route.nexthop,
                     local=route.local and not transport)

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


class SenderRoutes:
    """sender_dependent_default_transport_maps and sender_dependent_relayhost_maps."""

    RELAY, TRANSPORT = "sender_dependent_relayhost_maps", "sender_dependent_default_transport_maps"

    def __init__(self, cfg, resolver: AddressResolver):
        self.resolver = resolver
        self.maps = {name: [tables.open_table(ref) for ref in cfg[name]]
                     for name in (self.RELAY, self.TRANSPORT)}
        self.null_key = {self.RELAY: cfg.get("empty_address_relayhost_maps_lookup_key"),
                         self.TRANSPORT: cfg.get(
                             "empty_address_default_transport_maps_lookup_key")}

    def close(self) -> None:
        for maps in self.maps.values():
            for table in maps:
                table.close()

    def offhost(self, sender: str | None, relay_class: bool) -> tuple[tuple[str, str], str]:
        """The transport spec and relayhost of off-host mail (relay_domains: relay_class)
        from sender, as resolve.c: the default class alone has a sender-dependent
        transport; both have a sender-dependent relayhost."""
        r = self.resolver
        spec = r.relay_spec if relay_class else r.default_spec
        if sender is None:
            return spec, r.relayhost
        if not relay_class:
            found = self._find(self.TRANSPORT, sender)
            if found is not None and found.strip().lower() != "dunno":
                spec = parse_spec(found)
        relay = self._find(self.RELAY, sender)
        if relay is None or relay.strip().lower() == "dunno":
            relay = ""
        return spec, relay.strip() or r.relayhost

    def _keys(self, sender: str) -> list[str]:
        """mail_addr_find(3)'s default search order for an address."""
        local, at, _ = sender.rpartition("@")
        if not at or not local:
            return [sender]
        _, domain = split_address(sender)
        keys = [sender]
        base = strip_extension(local, self.resolver.delimiters) if \
            self.resolver.delimiters else local
        if base != local:
            keys.append(f"{base}@{domain}")
        if self.resolver.is_local(domain):
            keys += [local] + ([base] if base != local else [])
        keys.append("@" + domain)
        return keys

    def _find(self, name: str, sender: str) -> str | None:
        maps = self.maps[name]
        if not maps:
            return None
        shown = sender or self.null_key[name]
        for n, key in enumerate(self._keys(sender) if sender else [shown]):
            for table in maps:
                if n and table.type in ("regexp", "pcre"):
                    continue
                try:
                    value = table.lookup(key)
                except Exception:       # a table backend error: not "not found"
                    msg.warn(f"{name} lookup failure")
                    raise ResolveError(f"{name} lookup failure") from None
                if value is None:
                    continue
                if not value.strip():
                    msg.warn(f"{name}: ignoring null lookup result for {shown}")
                    return "DUNNO"
                return value
        return None
