"""Address resolution: which transport and next hop deliver a recipient (trivial-rewrite).

Postfix's qmgr and smtpd ask trivial-rewrite(8) where a recipient goes; postfix-py's qmgr
and smtpd's restrictions (reject_unauth_destination, recipient validation) do the same
in process, with this one resolver, the same parameters and the same precedence.

First the address is parsed as trivial-rewrite does (rewrite.c, then resolve.c):
    rewrite     a source route (@a,@b:user@domain) is dropped; an address without @
                becomes user@site from site!user (swap_bangpath), else user@domain from
                user%domain (allow_percent_hack), else user@$myorigin
                (append_at_myorigin); a domain without a dot gets .$mydomain
                (append_dot_mydomain, default no); a final dot is removed.
    resolve     local domains are stripped from the right, one after the other, and what
                remains is parsed again: user%remote@mydomain and remote!user@mydomain
                are user@remote; a quoted local part with @, % or ! in it is opened
                (resolve_dequoted_address): "user@remote"@mydomain is user@remote too.
                An address left without a domain is user@$myhostname; an empty local
                part is MAILER-DAEMON; user@ is an error (the default class) unless
                resolve_null_domain. A result whose local part still holds @, ! or % is
                "routed" (RESOLVE_FLAG_ROUTED): smtpd does not trust it for relaying.
The resolved recipient's domain gives Postfix's address classes (ADDRESS_CLASS_README),
tried in this order:

    1. local: the recipient domain is in mydestination, or is an address literal
       ([192.0.2.1], [ipv6:2001:db8::1]) of an address the inet services listen on
       (inet_interfaces; `all` is every interface's address): local_transport (default
       local:$myhostname). A bare user is user@$myorigin (rewrite, above).
    2. virtual mailbox: the domain is listed in virtual_mailbox_domains (exact names, no
       subdomains, as Postfix's string list): virtual_transport (default virtual).
    3. relay: the domain matches relay_domains (a parent domain matches its subdomains, as
       with Postfix's default parent_domain_matches_subdomains): relay_transport.
    4. default: default_transport, or the sender_dependent_default_transport_maps
       result for the envelope sender.
    For 1 and 2 the next hop is the transport's own next hop when it names one
    (`lmtp:unix:private/dovecot-lmtp`), else the recipient domain; for 3 and 4 the
    transport's own next hop, else the sender_dependent_relayhost_maps result for the
    sender, else relayhost when set, else the recipient domain.
    A domain listed in mydestination and virtual_mailbox_domains, or in
    virtual_mailbox_domains and relay_domains, gets Postfix's warning
    `do not list domain D in BOTH mydestination and virtual_mailbox_domains` and the
    class that comes first above.
    Between 1 and 2, the virtual alias class: the domain is listed in
    virtual_alias_domains (default $virtual_alias_maps; exact names). Its addresses
    exist only as virtual_alias_maps keys, which lib/cleanup.py rewrites before qmgr
    resolves them; one left over is unknown: transport error, next hop "5.1.1 User
    unknown in virtual alias table" (Postfix's), class "alias". A domain in both
    virtual_alias_domains and virtual_mailbox_domains gets Postfix's warning.
    5. transport_maps, when set, override the result, as transport(5) says: the keys are
       user+extension@domain, user@domain, domain, .parent domains (each parent, nearest
       first), then `*`; regexp: and pcre: tables see the full address only. In the value
       `transport:nexthop` an empty transport keeps the transport of steps 1-4, an empty
       next hop with a non-empty transport resets the next hop to the recipient domain, and
       both empty change nothing.

Address verification probes are routed as Postfix's trivial-rewrite does for its "verify"
class (resolve_clnt_verify): the same rules, with address_verify_relayhost,
address_verify_transport_maps, address_verify_{default,local,virtual,relay}_transport and
address_verify_sender_dependent_{relayhost,default_transport}_maps in place of the
parameters they default to (PROBE_PARAMS); qmgr holds a second resolver for them only when
one of those differs, so normal mail pays nothing for it.

FUNCTIONS
    AddressResolver(cfg, probe=False): open the tables that cfg names (TableError when one
        cannot be opened); probe=True: the routing parameters of probes (PROBE_PARAMS).
    probe_routing_differs(cfg) -> whether a probe's resolver would route otherwise.
    AddressResolver.resolve(address, sender=None) -> Route(transport, nexthop, local,
        addr_class, recipient, routed); addr_class is "local", "virtual", "relay" or
        "default" (the class before transport_maps), recipient the resolved user@domain,
        routed the flag above (these three are not part of equality); addr_class
        "alias" for virtual_alias_domains; raises
        ResolveError (a transport_maps, domain list or sender-dependent lookup failure:
        the caller defers the recipient with "4.3.0 address resolver failure"). Without
        a sender (None) the sender-dependent tables are not consulted.
    AddressResolver.resolve_class(address, sender=None) -> the Route before
        transport_maps (smtpd).
    SenderRoutes(cfg, resolver).offhost(sender, relay_class) -> (transport spec, relayhost).
    AddressResolver.rewrite(address) -> the canonical form (the rewrite step above).
    Rewriter(cfg).rewrite(address, context) -> the rewrite step on an address in
        external form, in trivial-rewrite's "local" context (@$myorigin, .$mydomain) or
        "remote" one (remote_header_rewrite_domain for both); the one set of rules for
        the resolver and for lib/cleanup.py's envelope and header addresses.
    quote_local(address), internal_form(address): quote / dequote the local part.
    parse_spec(text) -> (transport, nexthop) of a "transport:nexthop" value.

CONFIGURATION PARAMETERS
    mydestination ($myhostname, localhost.$mydomain, localhost), relay_domains (empty),
    relayhost (empty), default_transport (smtp), relay_transport (relay), local_transport
    (local:$myhostname), transport_maps (empty), sender_dependent_relayhost_maps (empty),
    sender_dependent_default_transport_maps (empty), empty_address_relayhost_maps_lookup_key
    (<>), empty_address_default_transport_maps_lookup_key (<>), recipient_delimiter (empty),
    myhostname, myorigin ($myhostname), parent_domain_matches_subdomains (Postfix's default
    list), inet_interfaces (all), virtual_mailbox_domains ($virtual_mailbox_maps),
    virtual_transport (virtual), mydomain, allow_percent_hack (yes), swap_bangpath (yes),
    append_at_myorigin (yes), append_dot_mydomain (no), resolve_dequoted_address (yes),
    resolve_null_domain (no), remote_header_rewrite_domain (empty); for probes address_verify_relayhost ($relayhost),
    address_verify_transport_maps ($transport_maps), address_verify_default_transport
    ($default_transport), address_verify_local_transport ($local_transport),
    address_verify_virtual_transport ($virtual_transport), address_verify_relay_transport
    ($relay_transport), address_verify_sender_dependent_relayhost_maps
    ($sender_dependent_relayhost_maps), address_verify_sender_dependent_default_transport_maps
    ($sender_dependent_default_transport_maps).

SEE ALSO
    lib/address.py, lib/domains.py, lib/tok822.py, qmgr/manager.py, smtpd/check.py,
    virtual/service.py; Postfix trivial-rewrite(8), ADDRESS_REWRITING_README,
    transport(5), postconf(5), ADDRESS_CLASS_README, VIRTUAL_README.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass, field

import psutil

from . import msg, tables, tok822
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
    # The resolved recipient (user@domain, routing operators and local domains handled)
    # and Postfix's RESOLVE_FLAG_ROUTED: routing operators are left in the local part.
    recipient: str = field(default="", compare=False)
    routed: bool = field(default=False, compare=False)


ALIAS_UNKNOWN = "5.1.1 User unknown in virtual alias table"   # Postfix's error next hop
EMPTY_ADDRESS_RECIPIENT = "MAILER-DAEMON"    # Postfix's empty_address_recipient default


@functools.lru_cache(maxsize=64)
def _literal_address(text: str):
    """The address of a [literal]'s text, None when it is not one; memoised, as smtpd asks
    about its client's literal at every message (local_header_rewrite_clients)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _scan(text: str, ops: str, last: bool) -> int:
    """Index of the first (last) character of ops outside quoted strings and [literals]."""
    if '"' not in text and "[" not in text:
        # Nothing quoted, no literal (nearly every address): the plain search, in C.
        hits = [i for i in ((text.rfind(c) if last else text.find(c)) for c in ops)
                if i >= 0]
        return (max(hits) if last else min(hits)) if hits else -1
    found, quoted, literal, i = -1, False, False, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "[":
            literal = True
        elif c == "]":
            literal = False
        elif c in ops and not literal:
            if not last:
                return i
            found = i
        i += 1
    return found


def _dequote(local: str) -> str:
    """The internal form of a quoted-string local part: quotes and escapes removed."""
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def quote_local(address: str) -> str:
    """Postfix's quote_822_local: the local part quoted when it is not a dot-string."""
    return tok822.quote_822_local(address)


def internal_form(address: str) -> str:
    """Postfix's unquote_822_local: the internal form of an address."""
    return tok822.unquote_822_local(address)


def parse_spec(text: str) -> tuple[str, str]:
    """A `transport:nexthop` value as its two parts; no colon means a transport only."""
    transport, _, nexthop = text.strip().partition(":")
    return transport.strip(), nexthop.strip()


LOCAL, REMOTE = "local", "remote"       # trivial-rewrite's rewrite contexts
# An address of atoms and operators only, none of them spaced when written back (as
# "<" and "," are): its tokens joined are its text, so that the rewrite rules can work
# on the string (nearly every address).
_PLAIN = re.compile(r'[^\s"()\[\]\\<,]*')
# The common address that every rule leaves as it is: a dot-string local part that
# quote_822_local leaves unquoted, one @, and a dotted domain without a final dot.
_CANONICAL = re.compile(r"[A-Za-z0-9_+=-]+(?:\.[A-Za-z0-9_+=-]+)*"
                        r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# canonical(address): whether it is one (the same in internal and external form)
canonical = _CANONICAL.fullmatch


class Rewriter:
    """trivial-rewrite's rewrite_tree: an address in external form, in a context."""

    def __init__(self, cfg, myorigin: str | None = None, mydomain: str | None = None):
        self.percent_hack = cfg["allow_percent_hack"]
        self.swap_bangpath = cfg["swap_bangpath"]
        self.append_at_myorigin = cfg["append_at_myorigin"]
        self.append_dot_mydomain = cfg["append_dot_mydomain"]
        if myorigin is None:
            myorigin = cfg.get("myorigin") or cfg.get("myhostname")
        remote = cfg.get("remote_header_rewrite_domain").strip()
        # (origin, domain) of each context: Postfix's local_context and remote_context
        self.contexts = {LOCAL: (myorigin, cfg.get("mydomain") if mydomain is None
                                 else mydomain),
                         REMOTE: (remote, remote)}

    def rewrite(self, address: str, context: str = LOCAL) -> str:
        """The address in its canonical form: a source route dropped; without @,
        site!user -> user@site (swap_bangpath), else user%domain -> user@domain
        (allow_percent_hack), else the context's origin appended (append_at_myorigin);
        the context's domain appended to a domain without a dot (append_dot_mydomain);
        a final dot removed from the domain. The result is written as trivial-rewrite
        writes its address node: the tokens joined, the local part quoted when it is not
        a dot-string (quote_822_local). "" stays; a lone @ becomes ""."""
        if canonical(address):
            return address          # most envelope addresses: nothing to do
        origin, domain = self.contexts[context]
        if not address:
            return address
        if address == "@":
            return '""'
        if _PLAIN.fullmatch(address):
            # written back with quote_822_local, as trivial-rewrite externalizes the
            # address node: a local part that is not a dot-string is quoted
            return tok822.quote_822_local(self._rewrite_plain(address, origin, domain))
        return self._rewrite_tokens(address, origin, domain)

    def _rewrite_plain(self, text: str, origin: str, domain: str) -> str:
        if text.startswith("@"):
            colon = text.find(":")
            if 0 < colon < len(text) - 1:
                text = text[colon + 1:]
        at = text.rfind("@")
        if at < 0:
            bang = text.find("!") if self.swap_bangpath else -1
            percent = text.rfind("%") if self.percent_hack else -1
            if bang >= 0:
                text = f"{text[bang + 1:]}@{text[:bang]}"
            elif percent >= 0:
                text = f"{text[:percent]}@{text[percent + 1:]}"
            elif self.append_at_myorigin and origin:
                text = f"{text}@{origin}"
            at = text.rfind("@")
        if self.append_dot_mydomain and domain and 0 <= at < len(text) - 1 \
                and "." not in text[at:]:
            text = f"{text}.{domain}"
        if text.endswith(".") and len(text) > 1 and text[-2] not in ".@":
            text = text[:-1]
        return text

    def _rewrite_tokens(self, text: str, origin: str, domain: str) -> str:
        """rewrite_tree on the tokens of the address (quoted strings, literals)."""
        toks = tok822.tokens(tok822.scan(text)[0])
        at, dot, colon = ord("@"), ord("."), ord(":")
        if not toks:
            return text
        if len(toks) == 1 and toks[0].type == tok822.QSTRING and not toks[0].text:
            return '""'
        if len(toks) == 1 and toks[0].type == at:
            return '""'
        if toks[0].type == at:                          # a source route
            cut = next((i for i, t in enumerate(toks) if t.type == colon), -1)
            if 0 <= cut < len(toks) - 1:
                toks = toks[cut + 1:]
        kinds = [t.type for t in toks]
        if at not in kinds:
            bang = kinds.index(ord("!")) if self.swap_bangpath and ord("!") in kinds \
                else -1
            percent = len(kinds) - 1 - kinds[::-1].index(ord("%")) \
                if self.percent_hack and ord("%") in kinds else -1
            if bang >= 0:
                toks = toks[bang + 1:] + [tok822.Token(at)] + toks[:bang]
            elif percent >= 0:
                toks[percent].type = at
            elif self.append_at_myorigin and origin:
                toks += [tok822.Token(at)] + tok822.tokens(tok822.scan(origin)[0])
        kinds = [t.type for t in toks]
        if self.append_dot_mydomain and domain and at in kinds:
            last = len(kinds) - 1 - kinds[::-1].index(at)
            if last != len(toks) - 1 and tok822.DOMLIT not in kinds[last:] \
                    and dot not in kinds[last:]:
                toks += [tok822.Token(dot)] + tok822.tokens(tok822.scan(domain)[0])
        if toks[-1].type == dot and len(toks) > 1 and toks[-2].type not in (dot, at):
            toks.pop()
        return tok822.quote_822_local(tok822.internalize(tok822.relink(toks)))



# trivial-rewrite's "verify" class (Postfix's resolve_clnt_verify): the parameters an
# address verification probe is routed by instead of the normal ones.
PROBE_PARAMS = {
    "relayhost": "address_verify_relayhost",
    "transport_maps": "address_verify_transport_maps",
    "default_transport": "address_verify_default_transport",
    "local_transport": "address_verify_local_transport",
    "virtual_transport": "address_verify_virtual_transport",
    "relay_transport": "address_verify_relay_transport",
    "sender_dependent_relayhost_maps": "address_verify_sender_dependent_relayhost_maps",
    "sender_dependent_default_transport_maps":
        "address_verify_sender_dependent_default_transport_maps",
}


def probe_routing_differs(cfg) -> bool:
    """Whether probes are routed by other settings than normal mail (else the normal
    resolver serves them too)."""
    return any(cfg.get(probe) != cfg.get(name) for name, probe in PROBE_PARAMS.items())


class AddressResolver:
    """Recipient address -> Route, from main.cf as trivial-rewrite(8) reads it; with
    probe=True, from the address_verify_* parameters of PROBE_PARAMS instead."""

    def __init__(self, cfg, probe: bool = False):
        name = (lambda n: PROBE_PARAMS[n]) if probe else (lambda n: n)
        parents = set(cfg["parent_domain_matches_subdomains"])
        self.myhostname = cfg.get("myhostname").lower()
        self.myorigin = (cfg.get("myorigin") or self.myhostname).lower()
        self.delimiters = cfg.get("recipient_delimiter")
        self.relayhost = cfg.get(name("relayhost")).strip()
        self.local_spec = parse_spec(cfg.get(name("local_transport")))
        self.relay_spec = parse_spec(cfg.get(name("relay_transport")))
        self.default_spec = parse_spec(cfg.get(name("default_transport")))
        self.mydestination = DomainList(cfg["mydestination"], subdomains=False)
        self.relay_domains = DomainList(cfg["relay_domains"], "relay_domains" in parents)
        self.virtual_spec = parse_spec(cfg.get(name("virtual_transport")))
        # A string list in Postfix: names as written, no .parent matching.
        self.virtual_mailbox_domains = DomainList(cfg["virtual_mailbox_domains"],
                                                  subdomains=False, exact=True)
        self.virtual_alias_domains = DomainList(cfg["virtual_alias_domains"],
                                                subdomains=False, exact=True)
        self.inet_interfaces = cfg["inet_interfaces"]
        # Address parsing (rewrite.c, resolve.c)
        self.mydomain = cfg.get("mydomain").lower()
        self.rewriter = Rewriter(cfg, self.myorigin, self.mydomain)
        self.resolve_dequoted = cfg["resolve_dequoted_address"]
        self.resolve_null_domain = cfg["resolve_null_domain"]
        self._own: set | None = None
        self.transport_subdomains = "transport_maps" in parents
        self.transport_maps_name = name("transport_maps")
        self.transport_maps = [tables.open_table(ref) for ref in cfg[self.transport_maps_name]]
        self.sender_routes = SenderRoutes(cfg, self, name)

    def close(self) -> None:
        """Release the tables."""
        self.mydestination.close()
        self.relay_domains.close()
        self.virtual_mailbox_domains.close()
        self.virtual_alias_domains.close()
        for table in self.transport_maps:
            table.close()
        self.sender_routes.close()

    def is_local(self, domain: str) -> bool:
        """Whether mail for domain is delivered on this host (Postfix's resolve_local)."""
        if not domain or self.mydestination.match(domain):
            return True
        if domain.startswith("[") and domain.endswith("]"):
            text = domain[1:-1]
            if text[:5] == "ipv6:":
                text = text[5:]
            addr = _literal_address(text)
            return addr is not None and addr in self._own_addresses()
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

    # --- address parsing, as trivial-rewrite's rewrite.c and resolve.c ------------------
    def rewrite(self, address: str) -> str:
        """The canonical form: Rewriter.rewrite in the "local" context; "" for ""."""
        if not address or address == "@":
            return ""
        return self.rewriter.rewrite(address, LOCAL)

    def resolve_address(self, address: str) -> tuple[str, bool, bool]:
        """resolve.c's resolve_addr loop on a canonical address -> (recipient, remote,
        routed): local domains are stripped one after another, and what is left is parsed
        again (user%domain, site!user, a quoted local part with routing operators when
        resolve_dequoted_address); remote: a domain that is not local is left;
        routed: routing operators remain in the local part (RESOLVE_FLAG_ROUTED).
        TableError when mydestination cannot be read."""
        text, saved, remote = address, None, False
        bangs, percents = self.rewriter.swap_bangpath, self.rewriter.percent_hack
        for _ in range(len(address) + 100):
            at = _scan(text, "@", last=True)
            if at >= 0 and text.endswith(".") and not text.endswith(("..", "@.")):
                text = text[:-1]
            if self.resolve_null_domain and text.endswith("@") and at == len(text) - 1:
                text = text[:-1]
            at = _scan(text, "@", last=True)
            if at >= 0:
                domain = text[at + 1:]
                if domain and not self.is_local(domain.lower()):
                    remote = True
                    break
                text, saved = text[:at], domain
            if _scan(text, "@", last=True) >= 0 \
                    or bangs and _scan(text, "!", last=True) >= 0 \
                    or percents and _scan(text, "%", last=True) >= 0:
                text = self.rewrite(text)
                continue
            inner = _dequote(text) if text.startswith('"') else None
            if self.resolve_dequoted and inner is not None and (
                    "@" in inner or percents and "%" in inner
                    or bangs and "!" in inner):
                oper = inner.rfind("@")
                if oper < 0 and percents:
                    oper = inner.rfind("%")
                if oper < 0:
                    oper = inner.rfind("!")
                if inner[oper] == "%":
                    inner = inner[:oper] + "@" + inner[oper + 1:]
                text = self.rewrite(quote_local(inner) if inner[oper] == "@" else inner)
                continue
            if text == '""':
                text = ""
            if not text:
                text = EMPTY_ADDRESS_RECIPIENT
                continue
            if saved is None:
                text = f"{text}@{self.myhostname}"
                continue
            break
        else:
            msg.warn(f"resolve_addr: <{address}>: giving up after "
                     f"{len(address) + 100} iterations")
            raise ResolveError(f"<{address}>: address resolver loop")
        if not remote:
            text = f"{text}@{saved if saved is not None else self.myhostname}"
        internal = internal_form(text)
        domain = internal.rpartition("@")[2]
        cut = min([i for i in (internal.find(c) for c in "@!%") if i >= 0])
        return text, remote, internal[cut + 1:] != domain

    def resolve_class(self, address: str, sender: str | None = None) -> Route:
        """The rewritten and resolved address and its class, before transport_maps
        (what smtpd's restrictions decide by); ResolveError on a table failure."""
        try:
            recipient, remote, routed = self.resolve_address(self.rewrite(address))
            domain = recipient.rpartition("@")[2].lower()
            # user@ (resolve_null_domain = no) is an error in Postfix: the default class
            route = self._class_route(domain, not remote and bool(domain), sender)
        except tables.TableError as exc:     # a domain list's table failed
            raise ResolveError(str(exc)) from None
        return Route(route.transport, route.nexthop, route.local, route.addr_class,
                     recipient, routed)

    def resolve(self, address: str, sender: str | None = None) -> Route:
        """Where the recipient address goes; ResolveError on a table failure."""
        route = self.resolve_class(address, sender)
        local, domain = split_address(route.recipient)
        found = self._transport_lookup(local, domain)
        if found is None:
            return route
        transport, nexthop = parse_spec(found)
        if not transport and not nexthop:
            return route
        if transport and not nexthop:
            nexthop = domain
        return Route(transport or route.transport, nexthop or route.nexthop,
                     local=route.local and not transport, addr_class=route.addr_class,
                     recipient=route.recipient, routed=route.routed)

    def _class_route(self, domain: str, local: bool, sender: str | None = None) -> Route:
        """The route of the domain's address class, before transport_maps."""
        if local:
            if self.virtual_mailbox_domains.match(domain):
                msg.warn(f"do not list domain {domain} in BOTH mydestination and "
                         "virtual_mailbox_domains")
            transport, nexthop = self.local_spec
            return Route(transport or "local", nexthop or domain, True, "local")
        if self.virtual_alias_domains.match(domain):
            if self.virtual_mailbox_domains.match(domain):
                msg.warn(f"do not list domain {domain} in BOTH virtual_alias_domains "
                         "and virtual_mailbox_domains")
            return Route("error", ALIAS_UNKNOWN, False, "alias")
        if self.virtual_mailbox_domains.match(domain):
            if self.relay_domains.match(domain):
                msg.warn(f"do not list domain {domain} in BOTH virtual_mailbox_domains "
                         "and relay_domains")
            transport, nexthop = self.virtual_spec
            return Route(transport or "virtual", nexthop or domain, False, "virtual")
        relay_class = self.relay_domains.match(domain)
        (transport, nexthop), relayhost = self.sender_routes.offhost(sender, relay_class)
        return Route(transport or "smtp", nexthop or relayhost or domain, False,
                     "relay" if relay_class else "default")

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
                    raise ResolveError(f"{self.transport_maps_name}: {exc}") from None
                if value is not None:
                    return value
        return None


class SenderRoutes:
    """sender_dependent_default_transport_maps and sender_dependent_relayhost_maps."""

    RELAY, TRANSPORT = "sender_dependent_relayhost_maps", "sender_dependent_default_transport_maps"

    def __init__(self, cfg, resolver: AddressResolver, param=lambda name: name):
        self.resolver = resolver
        self.maps = {name: [tables.open_table(ref) for ref in cfg[param(name)]]
                     for name in (self.RELAY, self.TRANSPORT)}
        self.shown = {name: param(name) for name in (self.RELAY, self.TRANSPORT)}
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
                    msg.warn(f"{self.shown[name]} lookup failure")
                    raise ResolveError(f"{self.shown[name]} lookup failure") from None
                if value is None:
                    continue
                if not value.strip():
                    msg.warn(f"{self.shown[name]}: ignoring null lookup result for {shown}")
                    return "DUNNO"
                return value
        return None
