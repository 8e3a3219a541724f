"""smtpd access restrictions: the smtpd_*_restrictions lists, as Postfix's smtpd_check.c.

Each list is evaluated in order; the first restriction that decides ends the list:
permit-like restrictions let the client through this list (the next lists still apply),
reject-like ones answer with an SMTP reply. A list that runs out permits. With
smtpd_delay_reject = yes (the default) the client, HELO and sender lists run at RCPT time,
before the relay and recipient lists, so that the log shows the recipient; with no, each
runs at its own stage (connect, HELO/EHLO, MAIL). smtpd_data_restrictions run at DATA and
smtpd_end_of_data_restrictions after the final dot, whatever smtpd_delay_reject says.

RESTRICTIONS
    permit, reject, defer, permit_mynetworks, permit_sasl_authenticated,
    permit_tls_clientcerts (a verified client certificate whose fingerprint is in
    relay_clientcerts), permit_tls_all_clientcerts (any verified client certificate),
    check_ccert_access type:table (certificate, then public-key fingerprint as the key),
    check_client_access, check_helo_access, check_sender_access, check_recipient_access
    type:table (access(5) actions: OK, REJECT [text], DEFER [text], DUNNO, 4NN/5NN text,
    PERMIT, a restriction name, a DNS list restriction and its domain[=pattern];
    check_client_access asks for the client name and its
    parent domains, then the address and its parent networks, check_helo_access for the
    name and its parent domains, as smtpd_check.c; regexp, pcre and cidr tables are asked
    with whole keys only), permit_auth_destination, reject_unauth_destination,
    defer_unauth_destination (these three by the address class of the recipient as
    lib/resolve.py resolves it, qmgr's resolver: user%domain@mydomain, site!user@mydomain
    and "user@domain"@mydomain are the remote user@domain; local, virtual mailbox and
    relay classes are authorized, unless routing operators are left in the local part),
    defer_if_permit (450 at the end of the stage unless something rejects),
    defer_if_reject (a later 5XX reject of the stage becomes 450 ... defer_if_reject
    requested),
    reject_unauth_pipelining (503 5.5.0 once the client sent ahead where it may not:
    commands before EHLO announced PIPELINING, or message content before 354),
    reject_unknown_client_hostname (alias reject_unknown_client; 4.7.25) and
    reject_unknown_reverse_client_hostname (4.7.1) with unknown_client_reject_code (450)
    when the name does not exist, 450 when its lookup failed for now;
    reject_unverified_recipient (4.1.1) and reject_unverified_sender (4.1.7): ask the
    verify service (verify/service.py, lib/verify_client.py), polling while a probe is
    in progress; "<a>: Recipient address rejected: unverified address: TEXT" with
    unverified_*_defer_code (450) while unknown or failing for now, the same or, with a
    5XX unverified_*_reject_code, "undeliverable address: TEXT" when the address
    bounced; "address verification problem" when the service does not answer; 4XX
    replies as unverified_*_tempfail_action (defer_if_permit) says.
    reject_unknown_sender_domain (4.1.8) and reject_unknown_recipient_domain (4.1.2):
    no MX, A or AAAA record, with unknown_address_reject_code (450); a null MX is 550
    5.7.27 / 556 5.1.10; a DNS failure for now acts as unknown_address_tempfail_action's
    default, defer_if_permit. Local (mydestination) and [literal] domains are not looked
    up.
    reject_invalid_helo_hostname (501 5.5.2 ... Invalid name, invalid_hostname_reject_code),
    reject_non_fqdn_helo_hostname (504 5.5.2 ... need fully-qualified hostname,
    non_fqdn_reject_code), reject_unknown_helo_hostname (no A, AAAA or MX: 450 4.7.1 ...
    Host not found, unknown_hostname_reject_code; a DNS failure: 450 as defer_if_permit);
    a HELO [address literal] is checked as one (501 5.5.2 ... invalid ip address); the
    older names reject_invalid_hostname, reject_non_fqdn_hostname, reject_unknown_hostname
    too. reject_non_fqdn_sender and reject_non_fqdn_recipient (504 5.5.2 ... need
    fully-qualified address; the null sender and [literal] domains pass). The SMTPUTF8
    allowance of non-ASCII names is not made: such names are not fully qualified here.
    DNS lists, each with a list domain argument domain[=pattern], where pattern is an
    address d.d.d.d whose octets may be [n;lo..hi] sets, and the list's A record must
    match it: reject_rbl_client (alias reject_rbl; the client address, IPv6 by nibbles),
    reject_rhsbl_client, reject_rhsbl_reverse_client, reject_rhsbl_helo,
    reject_rhsbl_sender, reject_rhsbl_recipient (the name or the address's domain; not for
    "unknown", [literals] or a numeric last label) reply with rbl_reply_maps' template for
    the list domain as written, else default_rbl_reply, expanding $rbl_code
    (maps_rbl_reject_code, 554), $rbl_class, $rbl_what, $rbl_domain, $rbl_reason (the TXT
    records joined with " / ") and $client_address, $client_name, $reverse_client_name,
    $helo_name, $sender, $recipient; a bad template is warned about and the default used.
    permit_dnswl_client and permit_rhswl_client permit a listed client, but not to a
    recipient this host may not relay to. A list that does not answer lists nobody (the
    warning "QUERY: RBL lookup error: ..."); for an allow list, a later 5XX reject of the
    same stage then becomes "450 4.7.1 <what>: Client host rejected: Service unavailable",
    as with defer_if_reject.
    The DNS is the system resolver's (resolv.conf, read before the chroot), or that of
    smtpd_dns_nameservers; lib/dnsbl.py asks it.
    check_policy_service inet:host:port or unix:path (a relative path from
    queue_directory, the jail's root): ask a policy server (lib/policy_client.py, Postfix's
    SMTPD_POLICY_README protocol, with every attribute Postfix 3.7 sends) and apply its
    action as an access(5) result; when it cannot be asked,
    smtpd_policy_service_default_action. Access results also take DEFER_IF_PERMIT text,
    RELAY, and PREPEND header: text (a header above smtpd's Received:, before
    end-of-data only).

RECIPIENT VALIDATION
    reject_unlisted_recipient and reject_unlisted_sender apply it where they are listed;
    smtpd_reject_unlisted_sender = yes checks the sender after smtpd_sender_restrictions
    ("<sender>: Sender address rejected: ...", 5.1.0).
    With smtpd_reject_unlisted_recipient = yes, after the lists permit, the resolved
    recipient must be in the table of its address class, when that list is not empty:
    local_recipient_maps (keys: user@domain, user, @domain, with and without the
    extension), virtual_mailbox_maps, relay_recipient_maps; else 550 5.1.1 "<rcpt>:
    Recipient address rejected: User unknown in local recipient table" (virtual mailbox
    table, relay recipient table), with unknown_local_recipient_reject_code (and its
    virtual and relay kin). A recipient in virtual_alias_domains has no such table: it
    is "User unknown in virtual alias table" (unknown_virtual_alias_reject_code) unless
    aliased. As Postfix's check_rcpt_maps, an address that recipient_canonical_maps,
    canonical_maps or virtual_alias_maps knows passes in every class. VRFY gives the
    same replies (smtpd/session.py).

CONFIGURATION PARAMETERS
    smtpd_client_restrictions, smtpd_helo_restrictions, smtpd_sender_restrictions,
    smtpd_relay_restrictions, smtpd_recipient_restrictions, smtpd_data_restrictions,
    smtpd_end_of_data_restrictions, smtpd_etrn_restrictions, smtpd_delay_reject (yes),
    fast_flush_domains ($relay_domains), mynetworks, relay_clientcerts,
    those of lib/resolve.py (mydestination, relay_domains, virtual_mailbox_domains,
    allow_percent_hack, swap_bangpath, ...), smtpd_reject_unlisted_recipient (yes),
    smtpd_reject_unlisted_sender (no), receive_override_options (empty;
    no_unknown_recipient_checks turns the recipient table checks off),
    local_recipient_maps (unix:passwd.byname $alias_maps; a table that cannot be opened
    fails each lookup temporarily, as Postfix's surrogate),
    virtual_mailbox_maps, relay_recipient_maps (empty),
    unknown_local_recipient_reject_code, unknown_virtual_mailbox_reject_code,
    unknown_relay_recipient_reject_code, unknown_virtual_alias_reject_code (550),
    local_header_rewrite_clients (permit_inet_interfaces: header_rewrite_context()),
    recipient_canonical_maps, canonical_maps, virtual_alias_maps,
    parent_domain_matches_subdomains, the reply codes
    reject_code (554), defer_code (450), access_map_reject_code (554),
    relay_domains_reject_code (554), unknown_client_reject_code (450),
    unknown_address_reject_code (450), unknown_hostname_reject_code (450),
    invalid_hostname_reject_code (501), non_fqdn_reject_code (504), maps_rbl_reject_code
    (554), rbl_reply_maps (empty), default_rbl_reply, smtpd_dns_nameservers (empty; a
    postfix-py extension); smtpd_policy_service_timeout (100s),
    smtpd_policy_service_max_idle (300s), smtpd_policy_service_max_ttl (1000s),
    smtpd_policy_service_request_limit (0), smtpd_policy_service_try_limit (2),
    smtpd_policy_service_retry_delay (1s), smtpd_policy_service_default_action (451 4.3.5
    Server configuration problem), smtpd_policy_service_policy_context (empty);
    address_verify_poll_count (${stress?{1}:{3}}), address_verify_poll_delay (3s),
    address_verify_service_name (verify), unverified_recipient_reject_code,
    unverified_sender_reject_code, unverified_recipient_defer_code,
    unverified_sender_defer_code (450), unverified_recipient_reject_reason,
    unverified_sender_reject_reason (empty), unverified_recipient_tempfail_action,
    unverified_sender_tempfail_action (defer_if_permit).

FUNCTIONS
    Checker(cfg, resolver=None) compiles the lists once per worker (tables opened,
    ConfigError for an unknown restriction, a bad DNS list reply pattern or an open-relay
    configuration, as Postfix refuses to start); resolver, a dnspython Resolver, replaces
    the system's for every DNS restriction (tests).
    One method per protocol stage, each -> None (go on) or the Reply: connect(state),
        helo(state), mail(state) run the client, HELO and sender lists there only with
        smtpd_delay_reject = no; rcpt(state, rcpt) runs them (delay_reject = yes) and the
        relay and recipient lists; data(state, rcpt) and end_of_data(state, rcpt) run
        smtpd_data_restrictions at DATA and smtpd_end_of_data_restrictions after the final
        dot (rcpt: the recipient when there is exactly one); etrn(state, domain) runs
        the client and HELO lists (delay_reject = yes) and smtpd_etrn_restrictions, and
        flush_allowed(domain) matches fast_flush_domains. A table that cannot be read
        (TableError) gives 451 4.3.0 "<name>: Temporary lookup failure", with a warning.
    is_local_domain / auth_destination / unlisted_recipient / in_mynetworks /
    in_network_list are the shared predicates; NetworkList is the one matcher of client lists (mynetworks,
    smtpd_forbid_bare_newline_exclusions, smtpd_sasl_exceptions_networks).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from ..lib import dnsbl, metrics, msg, tables, verify_client
from ..lib import server_filters as SF
from ..lib.address import addr_find
from ..lib.cleanup import receive_overrides
from ..lib.dnsbl import DnsLookup
from ..lib.domains import DomainList
from ..lib.policy_client import PolicyClient
from ..lib.maincf import ConfigError
from ..lib.netlist import NetworkList
from ..lib.resolve import AddressResolver, ResolveError, internal_form

RELAY_GUARDS = {"reject_unauth_destination", "defer_unauth_destination", "reject", "defer",
                "defer_if_permit"}
DNS_CHECKS = {"reject_unknown_sender_domain", "reject_unknown_recipient_domain"}
SIMPLE = {"permit", "reject", "defer", "defer_if_permit", "permit_mynetworks",
          "permit_sasl_authenticated", "permit_tls_clientcerts", "permit_tls_all_clientcerts",
          "reject_unauth_destination", "defer_unauth_destination", "permit_auth_destination",
          "reject_unlisted_recipient", "reject_unlisted_sender", "dunno",
          "reject_unknown_client_hostname", "reject_unknown_client",
          "reject_unknown_reverse_client_hostname", "reject_unauth_pipelining",
          "reject_unverified_recipient", "reject_unverified_sender"} | DNS_CHECKS
# HELO and address syntax checks, and the HELO name in the DNS (Postfix's older names too)
NAME_CHECKS = {"reject_invalid_helo_hostname", "reject_invalid_hostname",
               "reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname",
               "reject_unknown_helo_hostname", "reject_unknown_hostname",
               "reject_non_fqdn_sender", "reject_non_fqdn_recipient"}
SIMPLE |= NAME_CHECKS | {"defer_if_reject"}
# DNS lists: each takes a list domain argument, domain[=d.d.d.d]
DNSXL = {"reject_rbl_client", "reject_rbl", "permit_dnswl_client", "reject_rhsbl_client",
         "permit_rhswl_client", "reject_rhsbl_reverse_client", "reject_rhsbl_helo",
         "reject_rhsbl_sender", "reject_rhsbl_recipient"}
POLICY = "check_policy_service"
WITH_TABLE = {"check_ccert_access", "check_client_access", "check_helo_access",
              "check_sender_access", "check_recipient_access"}
COMPATIBILITY_LEVEL = "3.6"     # what check_policy_service sends: see lib/params.py
_HEADER_RE = re.compile(r"^[!-9;-~]+:")     # a header name (printable, no colon)
_DSN_RE = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
# The parameters that list client networks, all matched by NetworkList.
NETWORK_LISTS = ("mynetworks", "smtpd_forbid_bare_newline_exclusions",
                 "smtpd_sasl_exceptions_networks", "smtpd_authorized_xclient_hosts",
                 "smtpd_authorized_xforward_hosts")


@dataclass
class Reply:
    code: int
    dsn: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.dsn} {self.text}"


@dataclass
class ClientState:
    """What the restrictions look at; smtpd fills it in as the session goes on."""
    name: str = "unknown"
    addr: str = ""
    helo: str | None = None
    sender: str | None = None
    sasl_username: str | None = None
    ccert_verified: bool = False
    ccert_fingerprint: str | None = None
    ccert_pkey_fingerprint: str | None = None
    # Postfix's name_status and reverse_name_status: ok, temp, perm (or forged: the name
    # does not resolve back to the address); smtpd/service.py's client_name() sets them.
    name_status: str = "ok"
    reverse_name: str = "unknown"
    reverse_status: str = "ok"
    # defer_if_permit raised at connect, HELO or MAIL, carried to RCPT (smtpd_check.c's
    # defer_if_permit_client / _helo / _sender)
    deferred: dict = field(default_factory=dict)
    ill_pipelining: bool = False    # sent ahead where it may not: reject_unauth_pipelining
    # defer_if_reject raised in the current stage (a DNS allow list that did not answer):
    # a later 5XX reject of the stage becomes this 450 (smtpd_check.c's defer_if_reject)
    defer_if_reject: "Reply | None" = None
    # What check_policy_service sends of the session (protocol_state, queue_id, size, TLS,
    # ...): a function of the session's, -> dict of attribute values (policy_attrs).
    session_attrs: object = None
    # PREPEND results of this transaction: headers above smtpd's Received: (smtpd.c)
    prepend: list = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.name}[{self.addr}]"


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


class Checker:
    """The restriction lists of one smtpd configuration, compiled."""

    LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
             "smtpd_sender_restrictions", "smtpd_relay_restrictions",
             "smtpd_recipient_restrictions", "smtpd_data_restrictions",
             "smtpd_end_of_data_restrictions", "smtpd_etrn_restrictions")

    def __init__(self, cfg, resolver=None):
        self.cfg = cfg
        self._tables: dict[str, tables.Table] = {}
        self._policy: dict[str, PolicyClient] = {}   # one per endpoint, kept across sessions
        self.lists = {name: self._compile(name, cfg[name]) for name in self.LISTS}
        relay = [r for r, _ in self.lists["smtpd_relay_restrictions"]]
        rcpt = [r for r, _ in self.lists["smtpd_recipient_restrictions"]]
        if not relay and not RELAY_GUARDS & set(rcpt):
            # No open relay by accident: Postfix refuses this configuration too.
            raise ConfigError("parameter smtpd_recipient_restrictions: specify at least one "
                              "working instance of: reject_unauth_destination, "
                              "defer_unauth_destination, reject, defer, defer_if_permit")
        # qmgr's resolver (lib/resolve.py): relaying and recipient validation decide by
        # the address class of the resolved recipient, as smtpd_resolve_addr() does.
        try:
            self.resolver = AddressResolver(cfg)
            self.resolver.is_local("[127.0.0.1]")   # inet_interfaces, before the chroot
        except tables.TableError as exc:
            raise ConfigError(str(exc)) from None
        # The recipient table of each address class (check_rcpt_maps)
        self.rcpt_maps = {
            "local": ([self._table_or_stand_in(r) for r in cfg["local_recipient_maps"]],
                      cfg["unknown_local_recipient_reject_code"],
                      "User unknown in local recipient table"),
            "virtual": ([self._table(r) for r in cfg["virtual_mailbox_maps"]],
                        cfg["unknown_virtual_mailbox_reject_code"],
                        "User unknown in virtual mailbox table"),
            "relay": ([self._table(r) for r in cfg["relay_recipient_maps"]],
                      cfg["unknown_relay_recipient_reject_code"],
                      "User unknown in relay recipient table"),
            # the alias class has no recipient table: what is not aliased is unknown
            "alias": ([NOWHERE], cfg["unknown_virtual_alias_reject_code"],
                      "User unknown in virtual alias table")}
        # An address that cleanup rewrites (canonical, virtual alias) is known whatever
        # its class, as Postfix's check_rcpt_maps looks these up first.
        self.rewrite_maps = [self._table(r) for name in (
            "recipient_canonical_maps", "canonical_maps", "virtual_alias_maps")
            for r in cfg[name]]
        # receive_override_options = no_unknown_recipient_checks: no recipient table
        # check, as Postfix's check_recipient_rcpt_maps / check_sender_rcpt_maps
        self.rcpt_checks = "no_unknown_recipient_checks" not in receive_overrides(cfg)
        self.reject_unlisted_recipient = cfg["smtpd_reject_unlisted_recipient"]
        self.reject_unlisted_sender = cfg["smtpd_reject_unlisted_sender"]
        self.fast_flush_domains = self._domain_list("fast_flush_domains")
        # Every client-network list, one matcher (NetworkList): tables open before chroot.
        self.network_lists = {p: self._network_list(p) for p in NETWORK_LISTS}
        self.mynetworks = self.network_lists["mynetworks"]
        self.relay_clientcerts = self._table(cfg.get("relay_clientcerts")) \
            if cfg.get("relay_clientcerts") else None
        self.delay_reject = cfg["smtpd_delay_reject"]
        used = {r for rs in self.lists.values() for r, _ in rs}
        # The resolver (resolv.conf or smtpd_dns_nameservers, read now, before the
        # chroot), when a list or an access table (whose action may name a restriction)
        # can need it; `resolver` (dnspython) replaces it, for tests.
        self.dns = None
        self._dns_servers = cfg["smtpd_dns_nameservers"]
        self._resolver = resolver
        if resolver is not None or used & (DNS_CHECKS | WITH_TABLE | DNSXL | NAME_CHECKS):
            self.dns = self._make_dns()
        self.rbl_reply_maps = [self._table(ref) for ref in cfg["rbl_reply_maps"]]
        self.local_rewrite = self._rewrite_clients(cfg["local_header_rewrite_clients"])
        # Postfix expands the template itself: $rbl_code and friends are not main.cf's.
        self.default_rbl_reply = cfg.raw("default_rbl_reply") or ""
        self.expansion_filter = SF.ServerFilters.expansion_filter(cfg, "smtpd")

    def _make_dns(self) -> DnsLookup:
        try:
            return DnsLookup(self._resolver, self._dns_servers)
        except ValueError as exc:
            raise ConfigError(f"smtpd_dns_nameservers: {exc}") from None

    # --- compile ---------------------------------------------------------------------------
    def _table(self, ref: str) -> tables.Table:
        if ref not in self._tables:
            try:
                self._tables[ref] = tables.open_table(ref, self.cfg)
            except tables.TableError as exc:
                raise ConfigError(str(exc)) from None
        return self._tables[ref]

    def _compile(self, param: str, words: list[str]) -> list[tuple[str, object]]:
        out, i = [], 0
        while i < len(words):
            word = words[i].lower()
            if word in WITH_TABLE:
                if i + 1 >= len(words) or ":" not in words[i + 1]:
                    raise ConfigError(f"restriction {word} in {param} requires a "
                                      f"type:table argument")
                out.append((word, self._table(words[i + 1])))
                i += 2
                continue
            if word in DNSXL:
                arg = self._dnsxl_arg(param, word, words[i + 1] if i + 1 < len(words)
                                      else None)
                if arg is not None:
                    out.append((word, arg))
                i += 2
                continue
            if word == POLICY:
                if i + 1 >= len(words) or ":" not in words[i + 1]:
                    raise ConfigError(f"restriction {word} in {param} requires a "
                                      f"transport:endpoint argument")
                out.append((word, self._policy_client(words[i + 1])))
                i += 2
                continue
            if word not in SIMPLE:
                raise ConfigError(f"unknown smtpd restriction: \"{words[i]}\" in {param}")
            out.append((word, None))
            i += 1
        return out

    @staticmethod
    def _dnsxl_arg(param: str, word: str, arg: str | None):
        """(list domain as written, its domain, the reply filter or None) of a DNS list."""
        if arg is None:
            # Postfix warns and skips the restriction
            msg.warn(f"restriction {word} requires domain name argument")
            return None
        domain, eq, pattern = arg.partition("=")
        if not domain:
            raise ConfigError(f"restriction {word} in {param}: bad list domain \"{arg}\"")
        octets = None
        if eq:
            try:
                octets = dnsbl.parse_reply_pattern(pattern)
            except ValueError as exc:
                raise ConfigError(f"RBL reply error: {exc}") from None
        return arg, domain.lower().rstrip("."), octets

    def _policy_client(self, endpoint: str) -> PolicyClient:
        """The client of a check_policy_service endpoint, made once (policy_client_register)."""
        if endpoint not in self._policy:
            cfg = self.cfg
            try:
                self._policy[endpoint] = PolicyClient(
                    endpoint, cfg["smtpd_policy_service_timeout"],
                    cfg["smtpd_policy_service_max_idle"], cfg["smtpd_policy_service_max_ttl"],
                    cfg["smtpd_policy_service_request_limit"],
                    cfg["smtpd_policy_service_try_limit"],
                    cfg["smtpd_policy_service_retry_delay"])
            except ValueError as exc:
                raise ConfigError(f"check_policy_service {endpoint}: {exc}") from None
        return self._policy[endpoint]

    def _table_or_stand_in(self, ref: str) -> tables.Table:
        """A table that may be missing at start (alias_maps in local_recipient_maps before
        newaliases ran): as Postfix's surrogate table, every lookup then fails
        temporarily (451 4.3.0), and smtpd still starts."""
        try:
            return self._table(ref)
        except ConfigError as exc:
            msg.warn(f"{exc}; lookups in {ref} fail temporarily")
            return _Unavailable(ref, str(exc))

    def _domain_list(self, param: str) -> DomainList:
        try:
            return DomainList.for_param(self.cfg, param, self._table)
        except tables.TableError as exc:
            raise ConfigError(f"{param}: {exc}") from None

    def _network_list(self, param: str) -> "NetworkList":
        words = self.cfg[param]
        return NetworkList(param, words, self._table,
                           param in self.cfg["parent_domain_matches_subdomains"])

    def _rewrite_clients(self, words: list[str]) -> list:
        """local_header_rewrite_clients, compiled: (name, table or None)."""
        out = []
        for word in words:
            name = word.lower()
            if ":" in word:
                out.append(("table", self._table(word)))
            elif name in ("permit_inet_interfaces", "permit_mynetworks",
                          "permit_sasl_authenticated", "permit_tls_clientcerts",
                          "permit_tls_all_clientcerts"):
                out.append((name, None))
            else:
                msg.warn(f"parameter local_header_rewrite_clients: invalid request: {word}")
        return out

    def header_rewrite_context(self, state: ClientState) -> str:
        """"local" when the client matches local_header_rewrite_clients, else "remote"
        (Postfix's smtpd_check_rewrite): lib/cleanup.py rewrites the message's header
        addresses in that context. A table that cannot be read counts as no match."""
        for name, table in self.local_rewrite:
            try:
                if name == "permit_inet_interfaces":
                    addr = state.addr.removeprefix("ipv6:")
                    literal = f"[ipv6:{addr}]" if ":" in addr else f"[{addr}]"
                    hit = self.resolver.is_local(literal)
                elif name == "permit_mynetworks":
                    hit = self.in_mynetworks(state.addr, state.name)
                elif name == "permit_sasl_authenticated":
                    hit = bool(state.sasl_username)
                elif name == "table":
                    hit = table.lookup(state.addr) is not None
                else:
                    hit = self._apply(name, None, name, state, None) == "permit"
            except tables.TableError as exc:
                msg.warn(f"local_header_rewrite_clients: table lookup problem: {exc}")
                continue
            if hit:
                return "local"
        return "remote"

    # --- predicates ------------------------------------------------------------------------
    def in_mynetworks(self, addr: str, name: str = "unknown") -> bool:
        """Whether a client is in mynetworks."""
        return self.mynetworks.match(addr, name)

    def in_network_list(self, param: str, addr: str, name: str = "unknown") -> bool:
        """Whether a client is in one of the NETWORK_LISTS (compiled before the chroot)."""
        return self.network_lists[param].match(addr, name)

    def is_local_domain(self, domain: str) -> bool:
        """A domain of mydestination (or a literal of this host): mail for it stays on
        this host (TableError when a table cannot be read)."""
        return self.resolver.is_local(domain)

    def resolve(self, address: str):
        """The resolved recipient and its address class (lib/resolve.py's Route), as
        smtpd_resolve_addr(); a table failure raises TableError."""
        try:
            return self.resolver.resolve_class(address)
        except ResolveError as exc:
            raise tables.TableError(str(exc)) from None

    def auth_destination(self, rcpt: str) -> bool:
        """permit_auth_destination: the resolved recipient is in the local, virtual
        alias, virtual mailbox or relay class and no routing operator is left in its
        local part (allow_untrusted_routing = no, Postfix's default)."""
        route = self.resolve(rcpt)
        return not route.routed and route.addr_class in ("local", "alias", "virtual",
                                                         "relay")

    def unlisted_recipient(self, rcpt: str, what: str = "Recipient") -> Reply | None:
        """check_rcpt_maps: the reply for a recipient (or, what = "Sender", a sender)
        that the recipient table of its address class does not list (an empty table
        list validates nothing; receive_override_options = no_unknown_recipient_checks
        validates nothing either)."""
        if not self.rcpt_checks:
            return None
        try:
            route = self.resolve(rcpt)
            maps, code, text = self.rcpt_maps.get(route.addr_class, ([], 0, ""))
            if not maps:
                return None
            key = internal_form(route.recipient).lower()
            delimiters = self.cfg.get("recipient_delimiter")
            local = route.addr_class == "local"
            if self.rewrite_maps and addr_find(self.rewrite_maps, key, delimiters,
                                               localpart=local) is not None:
                return None
            if addr_find(maps, key, delimiters, localpart=local) is not None:
                return None
        except tables.TableError as exc:
            msg.warn(f"table lookup problem: {exc}")
            return Reply(451, "4.3.0", f"<{rcpt}>: Temporary lookup failure")
        detail = "1.0" if what == "Sender" else "1.1"
        return Reply(code, f"{str(code)[0]}.{detail}",
                     f"<{rcpt}>: {what} address rejected: {text}")

    # --- evaluation: one method per protocol stage, as smtpd_check.c ---------------------
    def connect(self, state: ClientState) -> Reply | None:
        """smtpd_client_restrictions at connect, with smtpd_delay_reject = no."""
        if self.delay_reject:
            return None
        return self._early("smtpd_client_restrictions", "client", [], state)

    def helo(self, state: ClientState) -> Reply | None:
        """smtpd_helo_restrictions at HELO/EHLO (state.helo is the new name), delay_reject=no."""
        if self.delay_reject:
            return None
        return self._early("smtpd_helo_restrictions", "helo",
                           self._carried(state, "client"), state)

    def mail(self, state: ClientState) -> Reply | None:
        """smtpd_sender_restrictions at MAIL (state.sender set), delay_reject = no."""
        if self.delay_reject:
            return None
        return self._early("smtpd_sender_restrictions", "sender",
                           self._carried(state, "client", "helo"), state)

    def rcpt(self, state: ClientState, rcpt: str) -> Reply | None:
        """Run the lists that apply at RCPT TO; None to accept, else the reply."""
        if self.delay_reject:
            names, pending = self.LISTS[:5], []
        else:
            names, pending = self.LISTS[3:5], self._carried(state, "client", "helo", "sender")
        # As smtpd_check_rcpt: the restrictions, then the recipient tables.
        return self._stage(names, state, rcpt, pending) or (
            self.unlisted_recipient(rcpt) if self.reject_unlisted_recipient else None)

    def data(self, state: ClientState, rcpt: str | None) -> Reply | None:
        """smtpd_data_restrictions at DATA; rcpt is the recipient when there is only one."""
        return self._stage(["smtpd_data_restrictions"], state, rcpt, [])

    def end_of_data(self, state: ClientState, rcpt: str | None) -> Reply | None:
        """smtpd_end_of_data_restrictions after the final dot, before the commit."""
        return self._stage(["smtpd_end_of_data_restrictions"], state, rcpt, [])

    def etrn(self, state: ClientState, domain: str) -> Reply | None:
        """At ETRN: the client and HELO lists (smtpd_delay_reject = yes), then
        smtpd_etrn_restrictions; replies name the domain, as Postfix's smtpd_check_etrn."""
        if self.delay_reject:
            names, pending = self.LISTS[:2] + ("smtpd_etrn_restrictions",), []
        else:
            names = ["smtpd_etrn_restrictions"]
            pending = self._carried(state, "client", "helo")
        return self._stage(names, state, domain, pending)

    def flush_allowed(self, domain: str) -> bool:
        """Whether ETRN may flush domain (fast_flush_domains); TableError."""
        return self.fast_flush_domains.match(domain)

    @staticmethod
    def _carried(state: ClientState, *stages: str) -> list[Reply]:
        return [r for r in (state.deferred.get(s) for s in stages) if r is not None][:1]

    def _early(self, name: str, stage: str, pending: list, state: ClientState):
        """A list of an earlier stage: its defer_if_permit waits for RCPT."""
        state.defer_if_reject = None
        reply = self._run(name, state, None, pending) or self._unlisted_sender(name, state)
        state.deferred[stage] = pending[0] if pending else None
        return reply

    def _unlisted_sender(self, name: str, state: ClientState) -> Reply | None:
        """smtpd_reject_unlisted_sender: the sender table check after the sender list."""
        if name != "smtpd_sender_restrictions" or not self.reject_unlisted_sender \
                or not state.sender:
            return None
        return self.unlisted_recipient(state.sender, "Sender")

    def _stage(self, names, state: ClientState, rcpt: str | None, pending: list):
        """The lists of a stage; a defer_if_permit that nothing rejected is the reply."""
        state.defer_if_reject = None
        for name in names:
            reply = self._run(name, state, rcpt, pending) or self._unlisted_sender(name, state)
            if reply is not None:
                return reply
        return pending[0] if pending else None

    def _run(self, name: str, state: ClientState, rcpt: str | None,
             pending: list) -> Reply | None:
        for restriction, table in self.lists[name]:
            try:
                verdict = self._apply(restriction, table, name, state, rcpt)
            except tables.TableError as exc:
                # A table that cannot be read now: defer, as Postfix's reject_dict_retry.
                msg.warn(f"table lookup problem: {exc}")
                subject = _subject(_STAGE[name][1], state, rcpt)
                return Reply(451, "4.3.0", f"<{subject}>: Temporary lookup failure")
            if verdict == "permit":
                return None
            if isinstance(verdict, DeferIfPermit):
                if not pending:         # the first reason is kept, as defer_if()
                    pending.append(verdict.reply)
            elif isinstance(verdict, DeferIfReject):
                if state.defer_if_reject is None:
                    state.defer_if_reject = verdict.reply
            elif isinstance(verdict, Reply):
                metrics.smtpd_restriction(restriction, verdict.code)
                if verdict.code >= 500 and state.defer_if_reject is not None:
                    return state.defer_if_reject
                return verdict
        return None

    def _reject(self, name: str, state: ClientState, rcpt, code: int, text: str,
                what: str | None = None) -> Reply:
        what = what or _STAGE[name][1]
        subject = _subject(what, state, rcpt)
        dsn = f"{str(code)[0]}.7.1"
        words = text.split(" ", 1)
        if _DSN_RE.match(words[0]) and words[0][0] == str(code)[0]:
            dsn, text = words[0], (words[1] if len(words) > 1 else "")
        return Reply(code, dsn, f"<{subject}>: {what} rejected: {text}")

    def _apply(self, restriction: str, table, name: str, state: ClientState, rcpt):
        cfg = self.cfg
        if restriction == "permit":
            return "permit"
        if restriction == "dunno":
            return None
        if restriction == "reject":
            return self._reject(name, state, rcpt, cfg["reject_code"], "Access denied")
        if restriction == "defer":
            return self._reject(name, state, rcpt, cfg["defer_code"], "Access denied")
        if restriction == "reject_unauth_pipelining":
            if not state.ill_pipelining:
                return None
            what = _STAGE[name][1]
            return Reply(503, "5.5.0", f"<{_subject(what, state, rcpt)}>: {what} rejected: "
                         "Improper use of SMTP command pipelining")
        if restriction == "defer_if_reject":
            return DeferIfReject(self._reject(name, state, rcpt, cfg["defer_code"],
                                              "defer_if_reject requested"))
        if restriction == "defer_if_permit":
            return DeferIfPermit(self._reject(name, state, rcpt, cfg["defer_code"],
                                              "defer_if_permit requested"))
        if restriction == "permit_mynetworks":
            return "permit" if self.in_mynetworks(state.addr, state.name) else None
        if restriction == POLICY:
            return self._policy_service(table, name, state, rcpt)
        if restriction in ("reject_unknown_client_hostname", "reject_unknown_client"):
            # RFC 7372's 4.7.25; a temporary lookup failure is always 450 (smtpd_check.c)
            if state.name_status == "ok":
                return None
            code = cfg["unknown_client_reject_code"] if state.name_status in (
                "perm", "forged") else 450
            return Reply(code, f"{str(code)[0]}.7.25", "Client host rejected: cannot find "
                         f"your hostname, [{state.addr}]")
        if restriction == "reject_unknown_reverse_client_hostname":
            if state.reverse_status == "ok":
                return None
            code = cfg["unknown_client_reject_code"] if state.reverse_status == "perm" \
                else 450
            return Reply(code, f"{str(code)[0]}.7.1", "Client host rejected: cannot find "
                         f"your reverse hostname, [{state.addr}]")
        if restriction in DNSXL:
            return self._dnsxl(restriction, table, name, state, rcpt)
        if restriction in NAME_CHECKS:
            return self._name_check(restriction, state, rcpt)
        if restriction in DNS_CHECKS:
            sender = restriction == "reject_unknown_sender_domain"
            address = state.sender if sender else rcpt
            return self._unknown_address(address, "Sender address" if sender
                                         else "Recipient address")
        if restriction == "permit_sasl_authenticated":
            return "permit" if state.sasl_username else None
        if restriction == "permit_tls_all_clientcerts":
            return "permit" if state.ccert_verified else None
        if restriction == "permit_tls_clientcerts":
            if state.ccert_verified and self.relay_clientcerts is not None:
                for key in (state.ccert_fingerprint, state.ccert_pkey_fingerprint):
                    if key and self.relay_clientcerts.lookup(key) is not None:
                        return "permit"
            return None
        if restriction == "reject_unlisted_recipient":
            return self.unlisted_recipient(rcpt) if rcpt else None
        if restriction == "reject_unlisted_sender":
            return self.unlisted_recipient(state.sender, "Sender") if state.sender else None
        if restriction in _UNVERIFIED:
            address = rcpt if restriction == "reject_unverified_recipient" else state.sender
            return self._unverified(address, *_UNVERIFIED[restriction]) if address else None
        if restriction == "permit_auth_destination":
            return "permit" if rcpt is not None and self.auth_destination(rcpt) else None
        if restriction in ("reject_unauth_destination", "defer_unauth_destination"):
            if rcpt is None or self.auth_destination(rcpt):
                return None
            if restriction == "reject_unauth_destination":
                return Reply(cfg["relay_domains_reject_code"], "5.7.1",
                             f"<{rcpt}>: Relay access denied")
            return Reply(454, "4.7.1", f"<{rcpt}>: Relay access denied")
        # check_*_access type:table
        if restriction == "check_ccert_access":
            if not state.ccert_verified:
                return None
            keys, what = [state.ccert_fingerprint, state.ccert_pkey_fingerprint], \
                "Client certificate"
        elif restriction == "check_client_access":
            parent = "smtpd_access_maps" in cfg["parent_domain_matches_subdomains"]
            keys = _domain_keys(table, state.name, parent) + _addr_keys(table, state.addr)
            what = "Client host"
        elif restriction == "check_helo_access":
            parent = "smtpd_access_maps" in cfg["parent_domain_matches_subdomains"]
            keys, what = _domain_keys(table, state.helo, parent), "Helo command"
        elif restriction == "check_sender_access":
            keys, what = _address_keys(state.sender), "Sender address"
        else:
            keys, what = _address_keys(rcpt), "Recipient address"
        for key in keys:
            if not key:
                continue
            action = table.lookup(key)
            if action is not None:
                return self._action(action, name, state, rcpt, what)
        return None

    def _policy_service(self, client: PolicyClient, name: str, state: ClientState, rcpt):
        """check_policy_service: ask the server, apply its action as an access(5) result;
        when it cannot be asked, smtpd_policy_service_default_action (smtpd_check.c)."""
        cfg = self.cfg
        where, what = _STAGE[name]
        session = state.session_attrs() if callable(state.session_attrs) else {}
        if where not in ("DATA", "END-OF-MESSAGE"):
            where = session.get("protocol_state") or where
        at_data = where in ("DATA", "END-OF-MESSAGE")
        attrs = [("request", "smtpd_access_policy"), ("protocol_state", where),
                 ("protocol_name", session.get("protocol_name", "SMTP")),
                 ("client_address", state.addr), ("client_name", state.name),
                 ("client_port", session.get("client_port", "")),
                 ("reverse_client_name", state.reverse_name),
                 ("server_address", session.get("server_address", "")),
                 ("server_port", session.get("server_port", "")),
                 ("helo_name", state.helo or ""), ("sender", state.sender or ""),
                 ("recipient", rcpt or ""),
                 ("recipient_count", session.get("recipient_count", 0) if at_data else 0),
                 ("queue_id", session.get("queue_id", "")),
                 ("instance", session.get("instance", "")),
                 ("size", session.get("size", 0)),
                 ("etrn_domain", session.get("etrn_domain", "")),
                 ("stress", cfg.get("stress") or ""),
                 ("sasl_method", session.get("sasl_method", "") if state.sasl_username
                  else ""),
                 ("sasl_username", state.sasl_username or ""),
                 ("sasl_sender", session.get("sasl_sender", "")),
                 # the certificate's names only when it is trusted, xtext-quoted
                 ("ccert_subject", _xtext(session.get("ccert_subject", ""))
                  if state.ccert_verified else ""),
                 ("ccert_issuer", _xtext(session.get("ccert_issuer", ""))
                  if state.ccert_verified else ""),
                 ("ccert_fingerprint", state.ccert_fingerprint or ""),
                 ("ccert_pubkey_fingerprint", state.ccert_pkey_fingerprint or ""),
                 ("encryption_protocol", session.get("encryption_protocol", "")),
                 ("encryption_cipher", session.get("encryption_cipher", "")),
                 ("encryption_keysize", session.get("encryption_keysize", 0)),
                 ("policy_context", cfg.get("smtpd_policy_service_policy_context") or ""),
                 # the level whose defaults postfix-py follows (lib/params.py DEVIATIONS)
                 ("compatibility_level", COMPATIBILITY_LEVEL),
                 ("mail_version", cfg.get("mail_version") or "")]
        action = client.request(attrs)
        if action is None:
            action = cfg.get("smtpd_policy_service_default_action") or \
                "451 4.3.5 Server configuration problem"
        return self._action(action, name, state, rcpt, what)

    def _unknown_address(self, address: str | None, what: str):
        """reject_unknown_{sender,recipient}_domain: smtpd_check.c's reject_unknown_address
        and reject_unknown_mailhost (MX, then A and AAAA)."""
        domain = _domain(address or "")
        if not domain or domain.startswith("[") or self.is_local_domain(domain):
            return None     # a local destination or an address literal: not looked up
        status = self._lookup().mailhost(domain)
        if status == "ok":
            return None
        sender = what == "Sender address"
        if status == "nullmx":
            code, dsn = (550, "5.7.27") if sender else (556, "5.1.10")
            return Reply(code, dsn, f"<{address}>: {what} rejected: Domain {domain} "
                         f"does not accept mail (nullMX)")
        detail = "1.8" if sender else "1.2"
        if status == "retry":
            # unknown_address_tempfail_action's default, defer_if_permit: 450 unless
            # a later restriction rejects
            return DeferIfPermit(Reply(450, f"4.{detail}",
                                       f"<{address}>: {what} rejected: Domain not found"))
        code = self.cfg["unknown_address_reject_code"]
        return Reply(code, f"{str(code)[0]}.{detail}",
                     f"<{address}>: {what} rejected: Domain not found")

    def _unverified(self, address: str, reply_class: str, dsn: str, reject_code: str,
                    defer_code: str, reject_reason: str, tempfail_action: str):
        """reject_unverified_{recipient,sender}: what the verify service knows of the
        address (smtpd_check.c's reject_unverified_address). While a probe is in
        progress the service is asked again, address_verify_poll_count times in all,
        address_verify_poll_delay apart. Deliverable: no verdict. Unknown or failed for
        now: unverified_*_defer_code; undeliverable: unverified_*_reject_code; a 4XX
        reply "unverified address", a 5XX one "undeliverable address", with the probe's
        text or unverified_*_reject_reason. The 4XX replies, and the one when the
        service does not answer, follow unverified_*_tempfail_action: defer_if_permit
        or defer."""
        cfg = self.cfg
        clnt = verify_client.client(cfg)
        polls, delay = cfg["address_verify_poll_count"], cfg["address_verify_poll_delay"]
        count = 0
        while True:
            found = clnt.query(address)
            if found is None or found[0] != verify_client.RCPT_TODO:
                break
            count += 1
            if count >= polls:
                break
            time.sleep(delay)
        tempfail = cfg[tempfail_action].lower()

        def soft(code: int, text: str):
            reply = Reply(code, str(code)[0] + dsn[1:], f"<{address}>: {reply_class} "
                          f"rejected: {text}")
            return DeferIfPermit(reply) if tempfail == "defer_if_permit" else reply
        if found is None:
            msg.warn(f"{clnt.service} service failure")
            return soft(450, "address verification problem")
        status, why = found
        if status == verify_client.RCPT_OK:
            return None
        code = cfg[reject_code] if status == verify_client.RCPT_BOUNCE else cfg[defer_code]
        alt = cfg.get(reject_reason) or ""
        if code >= 400 and alt:
            why = alt
        if code // 100 == 2:
            return None
        if code // 100 == 4:
            return soft(code, f"unverified address: {why[:250]}")
        return Reply(code, str(code)[0] + dsn[1:], f"<{address}>: {reply_class} rejected: "
                     f"undeliverable address: {why}")

    def _lookup(self) -> DnsLookup:
        if self.dns is None:        # not foreseen above; the jail has etc/resolv.conf
            self.dns = self._make_dns()
        return self.dns

    # --- DNS lists: smtpd_check.c's reject_rbl_addr, reject_rbl_domain, permit_dnswl_* --
    def _dnsxl(self, restriction: str, arg, name: str, state: ClientState, rcpt):
        """A DNS list restriction: a Reply (listed, reject_*), "permit" (listed, permit_*)
        or None (not listed, the name is unknown, or the list could not be asked)."""
        written, domain, octets = arg
        if restriction in ("reject_rbl_client", "reject_rbl", "permit_dnswl_client"):
            labels = dnsbl.reverse_address(state.addr)
            what, reply_class = state.addr, "Client host"
            query = f"{labels}.{domain}" if labels else None
        else:
            what, reply_class = {
                "reject_rhsbl_client": (state.name, "Client host"),
                "permit_rhswl_client": (state.name, "Client host"),
                "reject_rhsbl_reverse_client": (state.reverse_name, "Unverified Client host"),
                "reject_rhsbl_helo": (state.helo, "Helo command"),
                "reject_rhsbl_sender": (state.sender, "Sender address"),
                "reject_rhsbl_recipient": (rcpt, "Recipient address")}[restriction]
            if not what or restriction.endswith("client") and what.lower() == "unknown":
                return None
            query = _rhsbl_query(what, domain)
        if query is None:
            return None
        permit = restriction.startswith("permit_")
        if permit and _STAGE[name][0] == "RCPT" and rcpt is not None and \
                not self.auth_destination(rcpt):
            return None     # as Postfix: never allowlist an unauthorized destination
        result = self._lookup().dnsxl(query)
        if permit and result.status == "retry":
            # Postfix's DEFER_IF_REJECT3: a later reject of this stage becomes 450
            return DeferIfReject(Reply(450, "4.7.1", f"<{what}>: {reply_class} rejected: "
                                       "Service unavailable"))
        if result.status != "ok" or octets is not None and \
                not any(dnsbl.match_reply(octets, a) for a in result.addresses):
            return None     # not listed, or not with an answer the filter asks for
        if permit:
            return "permit"
        return self._rbl_reply(written, domain, what, reply_class, result.txt, state, rcpt)

    def _rbl_reply(self, written: str, domain: str, what: str, reply_class: str,
                   txt: str | None, state: ClientState, rcpt) -> Reply:
        """rbl_reply_maps' template for the list (as written), else default_rbl_reply,
        expanded as Postfix's rbl_reject_reply()."""
        template = None
        for table in self.rbl_reply_maps:
            template = table.lookup(written)
            if template is not None:
                break
        attrs = state.session_attrs() if state.session_attrs else {}
        values = SF.smtpd_values(self.cfg.get("myhostname"), state,
                                 attrs.get("client_port", ""), state.sender, rcpt)
        values.update(rbl_code=str(self.cfg["maps_rbl_reject_code"]), rbl_domain=domain,
                      rbl_reason=txt or "", rbl_txt=txt or "", rbl_what=what,
                      rbl_class=reply_class)
        text = None
        if template is not None:
            try:
                text = SF.expand(template, values, self.expansion_filter, strict=True)
            except ValueError:
                msg.warn(f"rbl_reject_reply: bad rbl reply template for domain "
                         f"{written}: {template}")
        if text is None:
            try:
                text = SF.expand(self.default_rbl_reply, values, self.expansion_filter,
                                 strict=True)
            except ValueError:
                msg.warn(f"rbl_reject_reply: bad default rbl reply template: "
                         f"{self.default_rbl_reply}")
                return Reply(450, "4.7.1", "Service unavailable")
        m = re.match(r"([45]\d\d) (.*)", text, re.DOTALL)
        if not m:
            msg.warn(f"rbl response code configuration error: {text}")
            return Reply(450, "4.7.1", "Service unavailable")
        code, text = int(m.group(1)), m.group(2)
        dsn = "4.7.1"
        words = text.split(" ", 1)
        if _DSN_RE.match(words[0]):
            dsn, text = words[0], (words[1] if len(words) > 1 else "")
        return Reply(code, _dsn_fix(f"{str(code)[0]}{dsn[1:]}", reply_class),
                     text or "Service unavailable")

    # --- HELO and address syntax: reject_invalid_hostname and friends ------------------
    def _name_check(self, restriction: str, state: ClientState, rcpt):
        cfg = self.cfg
        if restriction in ("reject_non_fqdn_sender", "reject_non_fqdn_recipient"):
            sender = restriction == "reject_non_fqdn_sender"
            address = state.sender if sender else rcpt
            if not address:
                return None         # no MAIL yet, or the null sender
            domain = address.rpartition("@")[2] if "@" in address else ""
            if domain.startswith("[") and domain.endswith("]"):
                return None
            domain = _truncate_dot(domain)
            if domain and dnsbl.valid_hostname(domain) and "." in domain:
                return None
            code = cfg["non_fqdn_reject_code"]
            what = "Sender address" if sender else "Recipient address"
            return Reply(code, f"{str(code)[0]}.5.2",
                         f"<{address}>: {what} rejected: need fully-qualified address")
        helo = state.helo
        if not helo:
            return None
        if helo.startswith("["):    # an address literal: valid_mailhost_addr()
            inner = helo[1:-1] if len(helo) > 2 and helo.endswith("]") else helo
            if dnsbl.valid_mailhost_literal(inner):
                return None
            code = cfg["invalid_hostname_reject_code"]
            return Reply(code, f"{str(code)[0]}.5.2",
                         f"<{helo}>: Helo command rejected: invalid ip address")
        name = _truncate_dot(helo)
        if restriction in ("reject_invalid_helo_hostname", "reject_invalid_hostname"):
            if dnsbl.valid_hostname(name) or dnsbl.valid_hostaddr(name):
                return None
            code = cfg["invalid_hostname_reject_code"]
            return Reply(code, f"{str(code)[0]}.5.2",
                         f"<{helo}>: Helo command rejected: Invalid name")
        if restriction in ("reject_non_fqdn_helo_hostname", "reject_non_fqdn_hostname"):
            if dnsbl.valid_hostname(name) and "." in name:
                return None
            code = cfg["non_fqdn_reject_code"]
            return Reply(code, f"{str(code)[0]}.5.2",
                         f"<{helo}>: Helo command rejected: need fully-qualified hostname")
        # reject_unknown_helo_hostname: A, AAAA or MX records
        status = self._lookup().hostname(helo)
        if status == "ok":
            return None
        if status == "retry":
            # unknown_helo_hostname_tempfail_action's default, defer_if_permit
            return DeferIfPermit(Reply(450, "4.7.1",
                                       f"<{helo}>: Helo command rejected: Host not found"))
        code = cfg["unknown_hostname_reject_code"]
        return Reply(code, f"{str(code)[0]}.7.1",
                     f"<{helo}>: Helo command rejected: Host not found")

    def _action(self, action: str, name: str, state, rcpt, what: str):
        """An access(5) table result."""
        word, _, text = action.strip().partition(" ")
        upper = word.upper()
        if upper in ("OK", "PERMIT", "RELAY") or word.isdigit() and len(word) != 3:
            return "permit"
        if upper == "DUNNO":
            return None
        if upper == "REJECT":
            return self._reject(name, state, rcpt, self.cfg["access_map_reject_code"],
                                text or "Access denied", what)
        if upper == "DEFER":
            return self._reject(name, state, rcpt, self.cfg["defer_code"],
                                text or "Access denied", what)
        if upper == "PREPEND":
            # as check_table_result: a header for the message, before end-of-data only
            if name == "smtpd_end_of_data_restrictions":
                msg.warn("access table: action PREPEND must be used before "
                         "smtpd_end_of_data_restrictions")
            elif state.sender is None:
                msg.warn("access table: action PREPEND is unavailable before MAIL FROM")
            elif not _HEADER_RE.match(text):
                msg.warn(f"access table: entry \"{action}\" requires header: text")
            else:
                state.prepend.append(text)
            return None
        if upper == "DEFER_IF_PERMIT":      # with its own text, as check_table_result
            return DeferIfPermit(self._reject(name, state, rcpt, self.cfg["defer_code"],
                                              text or "Service unavailable", what))
        if re.fullmatch(r"[45]\d\d", word):
            # "<name>: <class> rejected: text", a DSN after the code kept
            return self._reject(name, state, rcpt, int(word), text or "Access denied", what)
        if word.lower() in SIMPLE:      # a restriction name as the action, as access(5)
            return self._apply(word.lower(), None, name, state, rcpt)
        if word.lower() in DNSXL and len(text.split()) == 1:   # a DNS list and its domain
            try:
                arg = self._dnsxl_arg(name, word.lower(), text.strip())
            except ConfigError as exc:
                msg.warn(f"access table: {exc} -- ignored")
                return None
            return self._dnsxl(word.lower(), arg, name, state, rcpt)
        msg.warn(f"access table: unknown action \"{action}\" -- ignored")
        return None


@dataclass
class DeferIfReject:
    """A 450 that replaces any 5XX reject later in the same stage."""
    reply: Reply


@dataclass
class DeferIfPermit:
    """A verdict that becomes the reply only if the stage would otherwise permit."""
    reply: Reply


# reject_unverified_*: the reply class, DSN and parameters of smtpd_check.c's
# reject_unverified_address() calls
_UNVERIFIED = {
    "reject_unverified_recipient": ("Recipient address", "4.1.1",
                                    "unverified_recipient_reject_code",
                                    "unverified_recipient_defer_code",
                                    "unverified_recipient_reject_reason",
                                    "unverified_recipient_tempfail_action"),
    "reject_unverified_sender": ("Sender address", "4.1.7", "unverified_sender_reject_code",
                                 "unverified_sender_defer_code",
                                 "unverified_sender_reject_reason",
                                 "unverified_sender_tempfail_action")}

# list -> (where, Postfix's reply class): the subject and words of its reject replies
_STAGE = {"smtpd_client_restrictions": ("CONNECT", "Client host"),
          "smtpd_helo_restrictions": ("HELO", "Helo command"),
          "smtpd_sender_restrictions": ("MAIL", "Sender address"),
          "smtpd_relay_restrictions": ("RCPT", "Recipient address"),
          "smtpd_recipient_restrictions": ("RCPT", "Recipient address"),
          "smtpd_data_restrictions": ("DATA", "Data command"),
          "smtpd_end_of_data_restrictions": ("END-OF-MESSAGE", "End-of-data"),
          "smtpd_etrn_restrictions": ("ETRN", "Etrn command")}


def _subject(what: str, state: ClientState, rcpt: str | None) -> str:
    """What a reply of class `what` names in <...>, as smtpd_check.c's reply_name."""
    return {"Client host": state.client, "Client certificate": state.client,
            "Helo command": state.helo or "", "Sender address": state.sender or "",
            "Data command": "DATA", "End-of-data": "END-OF-MESSAGE"}.get(what, rcpt or "")


def _truncate_dot(name: str) -> str:
    """A name ending in one dot (not two) without it, as smtpd_check.c's dup_if_truncate."""
    return name[:-1] if len(name) > 1 and name.endswith(".") and name[-2] != "." else name


def _rhsbl_query(what: str, list_domain: str) -> str | None:
    """The query of a right-hand-side list for a name or address (find_dnsxl_domain):
    none for an address literal, a name with a numeric last label, or an invalid name."""
    domain = what.rpartition("@")[2] if "@" in what else what
    if not domain or domain.startswith("["):
        return None
    if domain.rpartition(".")[2].isdigit():
        return None         # Spamhaus answers "No IP queries"; Postfix skips these
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not dnsbl.valid_hostname(domain):
        return None
    return f"{domain}.{list_domain}"


# smtpd_dsn_fix.c: an address status (X.1.Y) follows what is rejected
_DSN_FIX = {"1": ("X.1.7", "X.1.1"), "2": ("X.1.8", "X.1.2"), "3": ("X.1.7", "X.1.3"),
            "4": ("X.1.7", "X.1.4"), "5": ("X.1.0", "X.1.5"), "6": ("X.1.7", "X.1.6"),
            "7": ("X.1.7", "X.1.3"), "8": ("X.1.8", "X.1.2")}


def _dsn_fix(dsn: str, reply_class: str) -> str:
    """Postfix's smtpd_dsn_fix(): an address DSN fitted to the reply class."""
    if dsn[1:4] != ".1.":
        return dsn
    if reply_class in ("Sender address", "Recipient address"):
        pair = _DSN_FIX.get(dsn[4:], ("X.1.0", "X.1.0"))
        fixed = pair[0 if reply_class == "Sender address" else 1]
    else:
        fixed = "X.0.0"
    return dsn[0] + fixed[1:]


# Tables that match patterns: Postfix asks them with the whole key only (not the parent
# domains or networks, its PARTIAL lookups).
_PATTERN_TABLES = {"regexp", "pcre", "cidr"}


def _domain_keys(table, name: str | None, parent: bool) -> list[str]:
    """A host name, then its parent domains (example.com, or .example.com when
    smtpd_access_maps is not in parent_domain_matches_subdomains), as smtpd_check.c's
    check_domain_access; an address or a name without a dot has no parents."""
    if not name:
        return []
    keys = [name]
    if getattr(table, "type", "") in _PATTERN_TABLES or dnsbl.valid_hostaddr(name):
        return keys
    rest = name
    while "." in rest[1:]:
        rest = rest[rest.index(".", 1):]
        keys.append(rest[1:] if parent else rest)
    return [k for k in keys if k]


def _addr_keys(table, addr: str) -> list[str]:
    """An address, then its parent networks (1.2.3, 1.2, 1; IPv6 at its colons), as
    smtpd_check.c's check_addr_access."""
    if not addr:
        return []
    keys = [addr]
    if getattr(table, "type", "") in _PATTERN_TABLES:
        return keys
    delim = ":" if ":" in addr else "."
    rest = addr
    while delim in rest:
        rest = rest.rpartition(delim)[0]
        keys.append(rest)
    return [k for k in keys if k]


def _xtext(text: str) -> str:
    """RFC 3461 xtext, as Postfix's xtext_quote() of certificate names."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else
                   "".join(f"+{b:02X}" for b in c.encode()) for c in text)


def _address_keys(address: str | None) -> list[str]:
    """Lookup keys of an address, as access(5): user@domain, domain, parent domains, user@."""
    if address is None:
        return []
    if address == "":
        return ["<>"]
    user, at, domain = address.rpartition("@")
    if not at:
        return [address, address + "@"]
    keys = [address, domain]
    parts = domain.split(".")
    keys += [".".join(parts[i:]) for i in range(1, len(parts))]
    keys.append(user + "@")
    return keys


class _Unavailable(tables.Table):
    """A table that could not be opened: every lookup is a temporary failure."""

    def __init__(self, ref: str, why: str):
        type_, _, name = ref.partition(":")
        super().__init__(type_, name)
        self.why = why

    def lookup(self, key: str) -> str | None:
        raise tables.TableError(self.why)

    def close(self) -> None:
        pass


class _Nowhere(tables.Table):
    """The recipient table of the virtual alias class: it lists nobody."""

    def __init__(self):
        super().__init__("static", "nowhere")

    def lookup(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        pass


NOWHERE = _Nowhere()
