"""smtpd's side of the milters (smtpd_milters), as Postfix's smtpd_milter.c and the
milter calls of smtpd.c.

DESCRIPTION
    prepare(cfg) parses smtpd_milters once per worker (a bad list is fatal, as Postfix)
    and opens smtpd_milter_maps (before the jail); setup(session, prepared) gives a
    session its lib/milter.Milters: smtpd_milter_maps' result for the client IP address
    (the syntax of smtpd_milters; DISABLE, in any case: no milters), else smtpd_milters
    (also when the lookup fails, with a warning, as Postfix's setup_milters()). XCLIENT
    sets them up again for the new client. The milters' macros are
    evaluated here with Postfix's values: j ($myhostname), {daemon_name}
    ($milter_macro_daemon_name), {daemon_addr}, {daemon_port}, v ($milter_macro_v),
    _ (`name [addr]`, `(may be forged)` when the verified name differs), {client_addr},
    {client_port}, {client_name}, {client_ptr}, {client_resolve}, {client_connections},
    {tls_version}, {cipher}, {cipher_bits}, {cert_subject}, {cert_issuer} (a trusted
    client certificate only), i (the queue ID), {auth_type}, {auth_authen},
    {auth_author}, {mail_addr}, {mail_host}, {mail_mailer}, {rcpt_addr}, {rcpt_host},
    {rcpt_mailer} (resolved as smtpd_resolve_addr does).

    check_reply(session, where, reply, rcpt) is Postfix's check_milter_reply: it logs
    `NOQUEUE: milter-reject: MAIL from host[addr]: 550 5.7.1 Command rejected; from=<...>
    proto=ESMTP helo=<...>` (milter-hold, milter-discard likewise), remembers hold and
    discard for the message, and returns the SMTP reply, if any.

CONFIGURATION PARAMETERS
    smtpd_milters (empty), smtpd_milter_maps (empty), milter_macro_daemon_name
    ($myhostname), milter_macro_v ($mail_name $mail_version), receive_override_options
    (no_milters: none), and those of lib/milter.py.

SEE ALSO
    lib/milter.py, smtpd/session.py, lib/cleanup.py.
"""

from __future__ import annotations

import weakref

from ..lib import cleanup, milter, msg, tables
from ..lib.maincf import ConfigError
from ..lib.resolve import ResolveError

SMTPD_MILTERS_DISABLE = "DISABLE"


class Prepared:
    """smtpd_milters and smtpd_milter_maps of one worker: the specs for each client."""

    CACHE = 64                  # parsed map results kept (a map gives few distinct lists)

    def __init__(self, cfg, default: list, maps: list):
        self.cfg, self.default, self.maps = cfg, default, maps
        self._parsed: dict[str, list] = {}

    def for_client(self, addr: str) -> list:
        """The milters for a client address: smtpd_milter_maps' result (DISABLE: none),
        else smtpd_milters. A lookup error falls back to smtpd_milters, as Postfix's
        setup_milters(); a result that is no Milter list is fatal, as milter_create()."""
        for table in self.maps:
            try:
                text = table.lookup(addr)
            except tables.TableError as exc:
                msg.warn(f"smtpd_milter_maps: {exc}")
                break
            if text is not None:
                return self._parse(text)
        return self.default

    def _parse(self, text: str) -> list:
        text = text.strip()
        if text.upper() == SMTPD_MILTERS_DISABLE:
            return []
        specs = self._parsed.get(text)
        if specs is None:
            try:
                specs = milter.parse(text, self.cfg)
            except ConfigError as exc:
                msg.fatal(f"smtpd_milter_maps: {exc}")
            if len(self._parsed) >= self.CACHE:
                self._parsed.clear()
            self._parsed[text] = specs
        return specs


def prepare(cfg) -> Prepared:
    """smtpd_milters, parsed, and smtpd_milter_maps, opened (before the jail);
    lib.maincf.ConfigError when either is bad. No milters at all with
    receive_override_options = no_milters (a content filter's re-injection service)."""
    if "no_milters" in cleanup.receive_overrides(cfg):
        return Prepared(cfg, [], [])
    text = cfg.get("smtpd_milters").strip()
    default = [] if not text or text.upper() == SMTPD_MILTERS_DISABLE \
        else milter.parse(text, cfg)
    maps = []
    for ref in cfg["smtpd_milter_maps"]:
        try:
            maps.append(tables.open_table(ref, cfg))
        except tables.TableError as exc:
            raise ConfigError(f"smtpd_milter_maps: {exc}") from None
    return Prepared(cfg, default, maps)


def setup(session, prepared: Prepared) -> None:
    """The session's milters, for its client (None when it has none)."""
    session.milter_settings = prepared     # greet() asks again after XCLIENT (maps)
    specs = prepared.for_client(session.client.addr)
    # A weak reference: the session must not hold itself through its milters' macro
    # callback (a cycle would keep every finished session until a full collection).
    ref = weakref.ref(session)
    session.milters = milter.Milters(specs, session.cfg, lambda name: evaluate(ref(), name)) \
        if specs else None
    session.milter_rcpt = None          # the recipient being checked, for {rcpt_*}
    session.milter_reject = None        # smtpd's own reject of it (SMFIP_RCPT_REJ)


def _resolved(session, addr: str, sender: str | None = None):
    resolver = getattr(session.checker, "resolver", None)
    if resolver is None:
        return None
    try:
        return resolver.resolve(addr, sender)
    except ResolveError:
        return None


def evaluate(session, name: str) -> str | None:
    """A macro's value for this session, or None (not sent), as smtpd_milter_eval."""
    cfg, client = session.cfg, session.client
    if name == "{daemon_name}":
        return cfg.get("milter_macro_daemon_name")
    if name == "v":
        return cfg.get("milter_macro_v")
    if name == "_":
        text = f"{client.reverse_name} [{client.addr}]"
        if client.name.lower() != client.reverse_name.lower():
            text += " (may be forged)"
        return text
    if name == "j":
        return session.hostname
    if name == "{client_addr}":
        return client.addr
    if name == "{client_port}":
        return session.client_port or sockname(session, "getpeername")[1] or "0"
    if name == "{client_name}":
        return client.name
    if name == "{client_ptr}":
        return client.reverse_name
    if name == "{client_resolve}":
        return {"ok": "OK", "forged": "FORGED", "temp": "TEMP"}.get(client.name_status,
                                                                   "FAIL")
    if name == "{client_connections}":
        return "0"
    if name == "{daemon_addr}":
        return session.server_addr or sockname(session, "getsockname")[0]
    if name == "{daemon_port}":
        return session.server_port or sockname(session, "getsockname")[1]
    info = session.tls_info if session.tls_active else None
    if name in ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}",
                "{cert_issuer}"):
        if info is None:
            return None
        if name == "{tls_version}":
            return info.protocol
        if name == "{cipher}":
            return info.cipher_name
        if name == "{cipher_bits}":
            return str(info.cipher_usebits)
        if not client.ccert_verified:
            return None
        return info.peer_CN if name == "{cert_subject}" else info.issuer_CN
    if name == "i":
        return session.writer.id if session.writer is not None else None
    if name == "{auth_type}":
        return session.sasl_method if client.sasl_username else None
    if name == "{auth_authen}":
        return client.sasl_username
    if name == "{auth_author}":
        return session.sasl_sender
    if name in ("{mail_addr}", "{mail_host}", "{mail_mailer}"):
        sender = client.sender
        if sender is None:
            return None
        if name == "{mail_addr}" and not sender:
            return ""
        route = _resolved(session, sender)
        if route is None:
            return None
        return {"{mail_addr}": route.recipient, "{mail_host}": route.nexthop,
                "{mail_mailer}": route.transport}[name]
    if name in ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"):
        rcpt = session.milter_rcpt
        if rcpt is None:
            return None
        reject = session.milter_reject
        if reject is not None:          # smtpd rejected it: the reply, as Postfix
            code, _, rest = reject.partition(" ")
            dsn, _, text = rest.partition(" ")
            return {"{rcpt_addr}": text, "{rcpt_host}": dsn,
                    "{rcpt_mailer}": "error"}[name]
        if name == "{rcpt_addr}" and not rcpt:
            return ""
        route = _resolved(session, rcpt, client.sender)
        if route is None:
            return None
        return {"{rcpt_addr}": route.recipient, "{rcpt_host}": route.nexthop,
                "{rcpt_mailer}": route.transport}[name]
    return None


def sockname(session, call: str) -> tuple[str, str]:
    try:
        host, port = getattr(session.s.sock, call)()[:2]
    except (OSError, AttributeError, ValueError, TypeError):
        return "", ""
    return (host[7:] if host.startswith("::ffff:") else host), str(port)


def check_reply(session, where: str, reply: str, rcpt: str | None = None) -> str | None:
    """Postfix's check_milter_reply: log, remember hold/discard; the SMTP reply or None."""
    if reply[0] == "H":
        if session.milter_hold:
            return None
        session.milter_hold = True
        action, text, reply = "milter-hold", reply[1:] or "milter triggers HOLD action", None
    elif reply[0] == "D":
        if session.milter_discard:
            return None
        session.milter_discard = True
        action, text, reply = "milter-discard", "milter triggers DISCARD action", None
    elif reply[0] == "S":
        action, reply = "milter-reject", "421 4.7.0 Server closing connection"
        text = reply
    elif reply[0] in "45":
        action, text = "milter-reject", reply
    else:
        action, reply = "reject", "421 4.3.5 Server configuration error"
        text = reply
    session.log_reject(where, text, rcpt, action=action)
    return reply
