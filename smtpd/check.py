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
    PERMIT, a restriction name), permit_auth_destination, reject_unauth_destination,
    defer_unauth_destination (these three by the address class of the recipient as
    lib/resolve.py resolves it, qmgr's resolver: user%domain@mydomain, site!user@mydomain
    and "user@domain"@mydomain are the remote user@domain; local, virtual mailbox and
    relay classes are authorized, unless routing operators are left in the local part),
    defer_if_permit (450 at the end of the stage unless something rejects),
    reject_unauth_pipelining (503 5.5.0 once the client sent ahead where it may not:
    commands before EHLO announced PIPELINING, or message content before 354),
    reject_unknown_client_hostname (alias reject_unknown_client; 4.7.25) and
    reject_unknown_reverse_client_hostname (4.7.1) with unknown_client_reject_code (450)
    when the name does not exist, 450 when its lookup failed for now;
    reject_unknown_sender_domain (4.1.8) and reject_unknown_recipient_domain (4.1.2):
    no MX, A or AAAA record, with unknown_address_reject_code (450); a null MX is 550
    5.7.27 / 556 5.1.10; a DNS failure for now acts as unknown_address_tempfail_action's
    default, defer_if_permit. Local (mydestination) and [literal] domains are not looked
    up. The DNS is the system resolver's (resolv.conf, read before the chroot).

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
    virtual and relay kin). VRFY gives the same replies (smtpd/session.py).

CONFIGURATION PARAMETERS
    smtpd_client_restrictions, smtpd_helo_restrictions, smtpd_sender_restrictions,
    smtpd_relay_restrictions, smtpd_recipient_restrictions, smtpd_data_restrictions,
    smtpd_end_of_data_restrictions, smtpd_delay_reject (yes), mynetworks, relay_clientcerts,
    those of lib/resolve.py (mydestination, relay_domains, virtual_mailbox_domains,
    allow_percent_hack, swap_bangpath, ...), smtpd_reject_unlisted_recipient (yes),
    smtpd_reject_unlisted_sender (no),
    local_recipient_maps (unix:passwd.byname; Postfix adds $alias_maps),
    virtual_mailbox_maps, relay_recipient_maps (empty),
    unknown_local_recipient_reject_code, unknown_virtual_mailbox_reject_code,
    unknown_relay_recipient_reject_code (550), the reply codes
    reject_code (554), defer_code (450), access_map_reject_code (554),
    relay_domains_reject_code (554), unknown_client_reject_code (450),
    unknown_address_reject_code (450).

FUNCTIONS
    Checker(cfg) compiles the lists once per worker (tables opened, ConfigError for an
    unknown restriction or an open-relay configuration, as Postfix refuses to start).
    One method per protocol stage, each -> None (go on) or the Reply: connect(state),
        helo(state), mail(state) run the client, HELO and sender lists there only with
        smtpd_delay_reject = no; rcpt(state, rcpt) runs them (delay_reject = yes) and the
        relay and recipient lists; data(state, rcpt) and end_of_data(state, rcpt) run
        smtpd_data_restrictions at DATA and smtpd_end_of_data_restrictions after the final
        dot (rcpt: the recipient when there is exactly one). A table that cannot be read
        (TableError) gives 451 4.3.0 "<name>: Temporary lookup failure", with a warning.
    is_local_domain / auth_destination / unlisted_recipient / in_mynetworks /
    in_network_list are the shared predicates; NetworkList is the one matcher of client lists (mynetworks,
    smtpd_forbid_bare_newline_exclusions, smtpd_sasl_exceptions_networks).
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - dnspython's IDNA codec, loaded before the chroot
import ipaddress
import re
from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from ..lib import msg, tables
from ..lib.address import addr_find
from ..lib.maincf import ConfigError
from ..lib.params import split_list
from ..lib.resolve import AddressResolver, ResolveError, internal_form

RELAY_GUARDS = {"reject_unauth_destination", "defer_unauth_destination", "reject", "defer",
                "defer_if_permit"}
DNS_CHECKS = {"reject_unknown_sender_domain", "reject_unknown_recipient_domain"}
SIMPLE = {"permit", "reject", "defer", "defer_if_permit", "permit_mynetworks",
          "permit_sasl_authenticated", "permit_tls_clientcerts", "permit_tls_all_clientcerts",
          "reject_unauth_destination", "defer_unauth_destination", "permit_auth_destination",
          "reject_unlisted_recipient", "reject_unlisted_sender", "dunno",
          "reject_unknown_client_hostname", "reject_unknown_client",
          "reject_unknown_reverse_client_hostname", "reject_unauth_pipelining"} | DNS_CHECKS
WITH_TABLE = {"check_ccert_access", "check_client_access", "check_helo_access",
              "check_sender_access", "check_recipient_access"}
_DSN_RE = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
# The parameters that list client networks, all matched by NetworkList.
NETWORK_LISTS = ("mynetworks", "smtpd_forbid_bare_newline_exclusions",
                 "smtpd_sasl_exceptions_networks")


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
             "smtpd_end_of_data_restrictions")

    def __init__(self, cfg):
        self.cfg = cfg
        self._tables: dict[str, tables.Table] = {}
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
            "local": ([self._table(r) for r in cfg["local_recipient_maps"]],
                      cfg["unknown_local_recipient_reject_code"],
                      "User unknown in local recipient table"),
            "virtual": ([self._table(r) for r in cfg["virtual_mailbox_maps"]],
                        cfg["unknown_virtual_mailbox_reject_code"],
                        "User unknown in virtual mailbox table"),
            "relay": ([self._table(r) for r in cfg["relay_recipient_maps"]],
                      cfg["unknown_relay_recipient_reject_code"],
                      "User unknown in relay recipient table")}
        self.reject_unlisted_recipient = cfg["smtpd_reject_unlisted_recipient"]
        self.reject_unlisted_sender = cfg["smtpd_reject_unlisted_sender"]
        # Every client-network list, one matcher (NetworkList): tables open before chroot.
        self.network_lists = {p: self._network_list(p) for p in NETWORK_LISTS}
        self.mynetworks = self.network_lists["mynetworks"]
        self.relay_clientcerts = self._table(cfg.get("relay_clientcerts")) \
            if cfg.get("relay_clientcerts") else None
        self.delay_reject = cfg["smtpd_delay_reject"]
        used = {r for rs in self.lists.values() for r, _ in rs}
        # The system resolver (resolv.conf read now, before the chroot), when a list or an
        # access table (whose action may name a restriction) can need it.
        self.dns = MailhostLookup() if used & (DNS_CHECKS | WITH_TABLE) else None

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
            if word not in SIMPLE:
                raise ConfigError(f"unknown smtpd restriction: \"{words[i]}\" in {param}")
            out.append((word, None))
            i += 1
        return out

    def _network_list(self, param: str) -> "NetworkList":
        words = self.cfg[param]
        return NetworkList(param, words, self._table,
                           param in self.cfg["parent_domain_matches_subdomains"])

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
        mailbox or relay class and no routing operator is left in its local part
        (allow_untrusted_routing = no, Postfix's default)."""
        route = self.resolve(rcpt)
        return not route.routed and route.addr_class in ("local", "virtual", "relay")

    def unlisted_recipient(self, rcpt: str, what: str = "Recipient") -> Reply | None:
        """check_rcpt_maps: the reply for a recipient (or, what = "Sender", a sender)
        that the recipient table of its address class does not list (an empty table
        list validates nothing)."""
        try:
            route = self.resolve(rcpt)
            maps, code, text = self.rcpt_maps.get(route.addr_class, ([], 0, ""))
            if not maps or addr_find(maps, internal_form(route.recipient).lower(),
                                     self.cfg.get("recipient_delimiter"),
                                     localpart=route.addr_class == "local") is not None:
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

    @staticmethod
    def _carried(state: ClientState, *stages: str) -> list[Reply]:
        return [r for r in (state.deferred.get(s) for s in stages) if r is not None][:1]

    def _early(self, name: str, stage: str, pending: list, state: ClientState):
        """A list of an earlier stage: its defer_if_permit waits for RCPT."""
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
            elif isinstance(verdict, Reply):
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
        if restriction == "defer_if_permit":
            return DeferIfPermit(self._reject(name, state, rcpt, cfg["defer_code"],
                                              "defer_if_permit requested"))
        if restriction == "permit_mynetworks":
            return "permit" if self.in_mynetworks(state.addr, state.name) else None
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
            keys, what = [state.addr, state.name], "Client host"
        elif restriction == "check_helo_access":
            keys, what = [state.helo], "Helo command"
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

    def _unknown_address(self, address: str | None, what: str):
        """reject_unknown_{sender,recipient}_domain: smtpd_check.c's reject_unknown_address
        and reject_unknown_mailhost (MX, then A and AAAA)."""
        domain = _domain(address or "")
        if not domain or domain.startswith("[") or self.is_local_domain(domain):
            return None     # a local destination or an address literal: not looked up
        if self.dns is None:        # not foreseen above; the jail has etc/resolv.conf
            self.dns = MailhostLookup()
        status = self.dns.status(domain)
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

    def _action(self, action: str, name: str, state, rcpt, what: str):
        """An access(5) table result."""
        word, _, text = action.strip().partition(" ")
        upper = word.upper()
        if upper in ("OK", "PERMIT") or word.isdigit() and len(word) != 3:
            return "permit"
        if upper == "DUNNO":
            return None
        if upper == "REJECT":
            return self._reject(name, state, rcpt, self.cfg["access_map_reject_code"],
                                text or "Access denied", what)
        if upper == "DEFER":
            return self._reject(name, state, rcpt, self.cfg["defer_code"],
                                text or "Access denied", what)
        if re.fullmatch(r"[45]\d\d", word):
            code = int(word)
            dsn = f"{word[0]}.7.1"
            parts = text.split(" ", 1)
            if parts and _DSN_RE.match(parts[0]):
                dsn, text = parts[0], (parts[1] if len(parts) > 1 else "")
            return Reply(code, dsn, text or "Access denied")
        if word.lower() in SIMPLE:      # a restriction name as the action, as access(5)
            return self._apply(word.lower(), None, name, state, rcpt)
        msg.warn(f"access table: unknown action \"{action}\" -- ignored")
        return None


class NetworkList:
    """A list of clients, as Postfix's namadr_list (mynetworks and its kind).

    Words, in order, the first that matches decides: an address or network (a.b.c.d/len,
    IPv6 with or without [ ], as [::1]/128), a type:table (looked up with the client name,
    then its address; any result matches), a /file/name of more such words, a host name or
    .domain matched against the client's verified name (a bare domain matches subdomains
    too where parent_domain_matches_subdomains names the parameter), and !word, which
    excludes what word matches."""

    def __init__(self, param: str, words: list[str], open_table, parent_matches: bool):
        self.param = param
        self.parent_matches = parent_matches
        self.entries: list[tuple[bool, str, object]] = []   # (negated, kind, value)
        self._add(words, open_table)

    def _add(self, words, open_table, depth: int = 0) -> None:
        for word in words:
            negated = word.startswith("!")
            word = word.lstrip("!")
            if not word:
                continue
            if word.startswith("/") and depth == 0:
                try:
                    with open(word, encoding="utf-8", errors="replace") as f:
                        text = "\n".join(line.split("#", 1)[0] for line in f)
                except OSError as exc:
                    raise ConfigError(f"{self.param}: open {word}: {exc.strerror}") from None
                sub = NetworkList(self.param, [], open_table, self.parent_matches)
                sub._add(split_list(text), open_table, depth + 1)
                self.entries.append((negated, "list", sub))
                continue
            text = word
            if word.startswith("["):        # [address] or [address]/len
                m = re.fullmatch(r"\[([^\]]*)\](/\d+)?", word)
                text = m.group(1) + (m.group(2) or "") if m else ""
            try:
                self.entries.append((negated, "net", ipaddress.ip_network(text,
                                                                          strict=False)))
                continue
            except ValueError:
                pass
            if "/" in word and ":" not in word.partition("/")[0] or word.startswith("["):
                # a net/mask that is not one: Postfix's smtpd stops here too
                raise ConfigError(f"{self.param}: bad net/mask pattern: \"{word}\"")
            if ":" in word:
                self.entries.append((negated, "table", open_table(word)))
            elif re.fullmatch(r"\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", word):
                self.entries.append((negated, "name", word.lower().rstrip(".")))
            else:
                msg.warn(f"{self.param}: ignoring entry that is not an address, network, "
                         f"host name or table: {word}")

    def match(self, addr: str, name: str = "unknown") -> bool:
        """Whether the client (address, verified name or "unknown") is in the list."""
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return bool(self._match(ip, str(ip), name.lower().rstrip(".")))

    def _match(self, ip, addr: str, name: str) -> bool | None:
        """True or False from the first entry that matches; None when none does."""
        for negated, kind, value in self.entries:
            if kind == "net":
                hit = ip.version == value.version and ip in value
            elif kind == "table":
                hit = (name != "unknown" and value.lookup(name) is not None) or \
                    value.lookup(addr) is not None
            elif kind == "name":
                hit = name != "unknown" and (
                    name == value.lstrip(".") and not value.startswith(".")
                    or (value.startswith(".") or self.parent_matches)
                    and name.endswith("." + value.lstrip(".")))
            else:
                inner = value._match(ip, addr, name)
                if inner is not None:
                    return inner != negated
                continue
            if hit:
                return not negated
        return None


@dataclass
class DeferIfPermit:
    """A verdict that becomes the reply only if the stage would otherwise permit."""
    reply: Reply


class MailhostLookup:
    """Whether a mail domain exists in the DNS: MX, then A, then AAAA, as Postfix's
    dns_lookup_l() for reject_unknown_mailhost. The resolver is the system's (resolv.conf,
    read when this is made: before the chroot)."""

    TYPES = ("MX", "A", "AAAA")

    def __init__(self, resolver: dns.resolver.Resolver | None = None):
        self.problem: str | None = None     # said at the first lookup, not before
        if resolver is None:
            try:
                resolver = dns.resolver.Resolver()
            except Exception as exc:       # noqa: BLE001 - no or unreadable resolv.conf
                self.problem = f"cannot read resolver configuration: {exc}"
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = ["127.0.0.1"]
        resolver.use_search_by_default = False   # absolute names, as Postfix
        self.resolver = resolver

    def status(self, domain: str) -> str:
        """ok, notfound, retry (a temporary failure, a malformed reply too) or nullmx."""
        if self.problem:
            msg.warn(self.problem)
            self.problem = None
        try:
            qname = dns.name.from_text(domain.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return "notfound"
        soft = False
        for rdtype in self.TYPES:
            try:
                answer = self.resolver.resolve(qname, rdtype, raise_on_no_answer=False,
                                               search=False)
            except dns.resolver.NXDOMAIN:
                return "notfound"         # no such name: no other type will have it
            except (dns.exception.DNSException, OSError, ValueError, EOFError):
                soft = True               # timeout, SERVFAIL, refused: try again later
                continue
            except Exception:             # noqa: BLE001 - whatever a server sends
                soft = True
                continue
            if answer.rrset is not None and len(answer.rrset):
                if rdtype == "MX" and len(answer.rrset) == 1 and \
                        next(iter(answer.rrset)).exchange == dns.name.root:
                    return "nullmx"
                return "ok"
        return "retry" if soft else "notfound"


def _load_record_types() -> None:
    """The record classes dnspython imports on first use: now, before any chroot."""
    for name in ("A", "AAAA", "MX", "CNAME", "SOA", "NS"):
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(name))


_load_record_types()


# list -> (where, Postfix's reply class): the subject and words of its reject replies
_STAGE = {"smtpd_client_restrictions": ("CONNECT", "Client host"),
          "smtpd_helo_restrictions": ("HELO", "Helo command"),
          "smtpd_sender_restrictions": ("MAIL", "Sender address"),
          "smtpd_relay_restrictions": ("RCPT", "Recipient address"),
          "smtpd_recipient_restrictions": ("RCPT", "Recipient address"),
          "smtpd_data_restrictions": ("DATA", "Data command"),
          "smtpd_end_of_data_restrictions": ("END-OF-MESSAGE", "End-of-data")}


def _subject(what: str, state: ClientState, rcpt: str | None) -> str:
    """What a reply of class `what` names in <...>, as smtpd_check.c's reply_name."""
    return {"Client host": state.client, "Client certificate": state.client,
            "Helo command": state.helo or "", "Sender address": state.sender or "",
            "Data command": "DATA", "End-of-data": "END-OF-MESSAGE"}.get(what, rcpt or "")


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


def parse_restrictions_ok(cfg) -> str | None:
    """The configuration error of the restriction lists, or None (for start-up checks)."""
    try:
        Checker(cfg)
    except ConfigError as exc:
        return str(exc)
    return None
