"""smtpd's client limits: connection count and rates counted by anvil, as Postfix's smtpd.c.

SYNOPSIS
    limits = Limits(cfg)                          # per worker, before the chroot
    session.limits = limits.session(client, service_name)   # per client
    self.limits.connect(self.reply)   ...   self.limits.disconnect()

DESCRIPTION
    smtpd reports each client's connections, MAIL and RCPT commands, new TLS sessions and
    AUTH commands to anvil (anvil/service.py, through lib/anvil_client.py) and compares
    the counts anvil returns with its limits; every check is here, and the session calls
    one method per event. Each check that fails logs Postfix's warning and answers with
    Postfix's reply (through the reply function the session passes), and returns False:

    connect(reply)      at connect, after a wrapper-mode handshake, before the greeting:
                        421 4.7.0 HOST Error: too many connections from ADDR (count or
                        rate); the session then ends.
    disconnect()        at the end of the session (always, when connect was registered).
    mail(reply)         MAIL, after the syntax check: 450 4.7.1 Error: too much mail from ADDR
    rcpt(reply)         RCPT, after the syntax check: 450 4.7.1 Error: too many recipients
                        from ADDR
    auth(reply)         AUTH, first: 450 4.7.1 Error: too many AUTH commands from ADDR
    starttls(reply)     STARTTLS, before "220 Ready": 454 4.7.0 Error: too many new TLS
                        sessions from NAME[ADDR]
    wrapper()           a wrapper-mode connection, before the handshake: no reply; the
                        session ends.
    newtls(reply, reused)  after a handshake that made a new session: 421 4.7.0 HOST Error:
                        too many new TLS sessions from NAME[ADDR]; the session ends.

    As in Postfix: an event is counted only when its limit is not 0, connections always
    (so that anvil keeps the other rates for the right time); nothing is counted for a
    client that smtpd_client_event_limit_exceptions matches; no limit applies when every
    limit is 0 (anvil is not asked) or when anvil cannot be reached (one warning per
    process, from lib/anvil_client.py).

    smtpd_client_event_limit_exceptions is a host name/address list, as Postfix's
    namadr lists: addresses and networks (192.0.2.0/24, [2001:db8::]/32, [::1]),
    host names (a leading dot matches subdomains; a name without one too when the
    parameter is in parent_domain_matches_subdomains), type:table lookups of the name
    and the address, and !pattern to exclude; the first match decides.

CONFIGURATION PARAMETERS
    smtpd_client_connection_count_limit (50), smtpd_client_connection_rate_limit (0),
    smtpd_client_message_rate_limit (0), smtpd_client_recipient_rate_limit (0),
    smtpd_client_new_tls_session_rate_limit (0), smtpd_client_auth_rate_limit (0),
    smtpd_client_event_limit_exceptions (${smtpd_client_connection_limit_exceptions:$mynetworks}:
    $mynetworks unless the former name is set), anvil_rate_time_unit (60s, anvil's).

SEE ALSO
    anvil/service.py, lib/anvil_client.py; Postfix smtpd(8), anvil(8).
"""

from __future__ import annotations

import ipaddress
import re

from ..lib import anvil_client, msg, tables
from ..lib.maincf import ConfigError
from ..lib.netlist import client_ip

PARAM = "smtpd_client_event_limit_exceptions"
_ADDR_RE = re.compile(r"^\[?[0-9a-fA-F:.]+\]?(/\d{1,3})?$")


class ExceptionList:
    """A Postfix host name/address list: first match wins, !pattern excludes."""

    def __init__(self, words: list[str], cfg, param: str = PARAM):
        """Compile the words; open tables (before the chroot). ConfigError when bad."""
        parent = param in cfg["parent_domain_matches_subdomains"]
        self.items: list[tuple[bool, str, object]] = []
        for word in words:
            negate = word.startswith("!")
            pattern = word[1:] if negate else word
            if not pattern:
                raise ConfigError(f"{param}: empty pattern after \"!\"")
            if _ADDR_RE.match(pattern) and any(c in pattern for c in ".:"):
                text = pattern.replace("[", "").replace("]", "")
                try:
                    self.items.append((negate, "net", ipaddress.ip_network(text, strict=False)))
                    continue
                except ValueError:
                    pass
            if ":" in pattern and not pattern.startswith("/"):
                try:
                    self.items.append((negate, "table", tables.open_table(pattern, cfg)))
                except tables.TableError as exc:
                    raise ConfigError(f"{param}: {exc}") from None
                continue
            if pattern.startswith("/"):
                raise ConfigError(f"{param}: file patterns are not supported: {pattern}")
            name = pattern.lower().rstrip(".")
            self.items.append((negate, "name", (name, parent)))

    def match(self, name: str, addr: str) -> bool:
        """Whether the client (verified name or "unknown", address) is listed."""
        parsed = client_ip(addr)        # memoised: the network lists parse it too
        ip = parsed[0] if parsed is not None else None
        host = name.lower().rstrip(".")
        for negate, kind, value in self.items:
            if kind == "net":
                hit = ip is not None and ip.version == value.version and ip in value
            elif kind == "table":
                hit = (host != "unknown" and value.lookup(host) is not None) or \
                    value.lookup(addr) is not None
            else:
                pattern, parent = value
                if pattern.startswith("."):
                    hit = host.endswith(pattern)
                else:
                    hit = host == pattern or (parent and host.endswith("." + pattern))
            if hit:
                return not negate
        return False


class Limits:
    """The limits of one smtpd configuration (one per worker)."""

    def __init__(self, cfg):
        """Read the limits and compile the exception list; ConfigError when bad."""
        self.hostname = cfg.get("myhostname")
        self.count_limit = cfg["smtpd_client_connection_count_limit"]
        self.rate_limit = cfg["smtpd_client_connection_rate_limit"]
        self.mail_limit = cfg["smtpd_client_message_rate_limit"]
        self.rcpt_limit = cfg["smtpd_client_recipient_rate_limit"]
        self.newtls_limit = cfg["smtpd_client_new_tls_session_rate_limit"]
        self.auth_limit = cfg["smtpd_client_auth_rate_limit"]
        # As Postfix: without any limit, anvil is not asked at all.
        self.active = any((self.count_limit, self.rate_limit, self.mail_limit,
                           self.rcpt_limit, self.newtls_limit, self.auth_limit))
        self.exceptions = ExceptionList(cfg[PARAM], cfg) if self.active else None

    def session(self, client, service: str) -> ClientLimits | NoLimits:
        """The limits of one client (a ClientState) of service (master.cf name)."""
        if not self.active or self.exceptions.match(client.name, client.addr):
            return NO_LIMITS
        return ClientLimits(self, client, service, anvil_client.client())


class NoLimits:
    """No limit applies: every check passes, nothing is counted."""

    def connect(self, reply) -> bool:
        return True

    def disconnect(self) -> None:
        pass

    def mail(self, reply) -> bool:
        return True

    def rcpt(self, reply) -> bool:
        return True

    def auth(self, reply) -> bool:
        return True

    def starttls(self, reply) -> bool:
        return True

    def wrapper(self) -> bool:
        return True

    def newtls(self, reply, reused: bool) -> bool:
        return True


NO_LIMITS = NoLimits()


class ClientLimits(NoLimits):
    """The limits of one client, counted by anvil."""

    def __init__(self, limits: Limits, client, service: str, anvil):
        self.lim = limits
        self.client = client            # ClientState: .addr, .client (NAME[ADDR])
        self.service = service
        self.anvil = anvil              # lib.anvil_client.AnvilClient
        self.connected = False
        self._rate = 0                  # the rate of the last check, for the warning

    def _past(self, ask, limit: int) -> bool:
        """Count (or look at) an event with ask, an AnvilClient method, when limit is on;
        whether the rate is past limit (no answer from anvil: no limit)."""
        if limit <= 0:
            return False
        self._rate = ask(self.service, self.client.addr)
        return self._rate is not None and self._rate > limit

    def connect(self, reply) -> bool:
        """Register the connection; refuse it past the count or rate limit."""
        counts = self.anvil.connect(self.service, self.client.addr)
        if counts is None:
            return True
        self.connected = True
        count, rate = counts
        lim = self.lim
        if lim.count_limit > 0 and count > lim.count_limit:
            msg.warn(f"Connection concurrency limit exceeded: {count} from "
                     f"{self.client.client} for service {self.service}")
        elif lim.rate_limit > 0 and rate > lim.rate_limit:
            msg.warn(f"Connection rate limit exceeded: {rate} from "
                     f"{self.client.client} for service {self.service}")
        else:
            return True
        reply(f"421 4.7.0 {lim.hostname} Error: too many connections from {self.client.addr}")
        return False

    def disconnect(self) -> None:
        """Register the end of the connection (once)."""
        if self.connected:
            self.connected = False
            self.anvil.disconnect(self.service, self.client.addr)

    def mail(self, reply) -> bool:
        """Count a MAIL command; refuse it past smtpd_client_message_rate_limit."""
        if not self._past(self.anvil.message, self.lim.mail_limit):
            return True
        reply(f"450 4.7.1 Error: too much mail from {self.client.addr}")
        msg.warn(f"Message delivery request rate limit exceeded: {self._rate} from "
                 f"{self.client.client} for service {self.service}")
        return False

    def rcpt(self, reply) -> bool:
        """Count a RCPT command; refuse it past smtpd_client_recipient_rate_limit."""
        if not self._past(self.anvil.recipient, self.lim.rcpt_limit):
            return True
        msg.warn(f"Recipient address rate limit exceeded: {self._rate} from "
                 f"{self.client.client} for service {self.service}")
        reply(f"450 4.7.1 Error: too many recipients from {self.client.addr}")
        return False

    def auth(self, reply) -> bool:
        """Count an AUTH command; refuse it past smtpd_client_auth_rate_limit."""
        if not self._past(self.anvil.auth, self.lim.auth_limit):
            return True
        msg.warn(f"AUTH command rate limit exceeded: {self._rate} from "
                 f"{self.client.client} for service {self.service}")
        reply(f"450 4.7.1 Error: too many AUTH commands from {self.client.addr}")
        return False

    def starttls(self, reply) -> bool:
        """Refuse STARTTLS, before the handshake, past the new TLS session rate limit."""
        if not self._past(self.anvil.newtls_status, self.lim.newtls_limit):
            return True
        msg.warn(f"Refusing STARTTLS request from {self.client.client} "
                 f"for service {self.service}")
        reply(f"454 4.7.0 Error: too many new TLS sessions from {self.client.client}")
        return False

    def wrapper(self) -> bool:
        """Refuse a wrapper-mode connection, before the handshake, past that limit."""
        if not self._past(self.anvil.newtls_status, self.lim.newtls_limit):
            return True
        msg.warn(f"Refusing TLS service request from {self.client.client} "
                 f"for service {self.service}")
        return False

    def newtls(self, reply, reused: bool) -> bool:
        """Count a new (not resumed) TLS session; end the session past the limit."""
        if reused or not self._past(self.anvil.newtls, self.lim.newtls_limit):
            return True
        msg.warn(f"New TLS session rate limit exceeded: {self._rate} from "
                 f"{self.client.client} for service {self.service}")
        reply(f"421 4.7.0 {self.lim.hostname} Error: too many new TLS sessions from "
              f"{self.client.client}")
        return False
