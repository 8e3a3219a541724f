"""Client-side SASL AUTH for the smtp and lmtp delivery agents.

NAME
    sasl - authenticate the smtp/lmtp client to a server (Postfix's smtp_sasl_*.c)

DESCRIPTION
    With smtp_sasl_auth_enable = yes (lmtp_sasl_auth_enable for lmtp) the client
    authenticates after the last EHLO (after STARTTLS and the second EHLO when TLS is
    used) and before MAIL FROM, when the server offers AUTH and smtp_sasl_password_maps
    has an entry for this server. Without an entry the client talks to the server "like
    a stranger": no AUTH at all.

    Credentials are looked up as Postfix's smtp_sasl_passwd_lookup() does: with
    smtp_sender_dependent_authentication = yes (where postfix-py declares it) the
    envelope sender first (the address, then @domain); then the remote host name (the
    MX host, or the address of a [literal]); then the next-hop destination as written
    in the request (`[mail.isp.example]:587`, brackets and port included). Keys are
    folded to lower case. The value is `username:password`, split at the first colon.

    Mechanisms: PLAIN (RFC 4616, sent as an initial response) and LOGIN, implemented
    here (Postfix uses Cyrus; postfix-py has no Cyrus). The server's AUTH list (several
    AUTH lines are concatenated) is filtered by smtp_sasl_mechanism_filter; of what is
    left, those allowed by the security options in force are tried: PLAIN before LOGIN.
    smtp_sasl_security_options applies without TLS, smtp_sasl_tls_security_options with
    TLS. PLAIN and LOGIN are plaintext mechanisms, so with the default `noplaintext,
    noanonymous` credentials are only sent over TLS.

FAILURES (Postfix 3.x texts; the session fails, the recipients go to the next server or
are deferred)
    filter left nothing:   warning: HOST[ADDR]:PORT offered no supported AUTH
                           mechanisms: 'WORDS'   and, with credentials, 4.7.0 "SASL
                           authentication failed: server HOST[ADDR] offered no
                           compatible authentication mechanisms for this type of
                           connection security"
    options refuse all:    4.7.0 "SASL authentication failed; cannot authenticate to
                           server HOST[ADDR]: no mechanism available"
    server refuses:        "SASL authentication failed; server HOST[ADDR] said: 535 ..."
                           with the server's status; 5xx becomes 4xx while
                           smtp_sasl_auth_soft_bounce = yes (the default, and the
                           behaviour where postfix-py does not declare it)
    protocol loop:         4.3.0 "SASL authentication failed; authentication protocol
                           loop with server HOST[ADDR]"
    A timeout or lost connection during AUTH reads as one during the EHLO handshake, as
    Postfix's does.

SECURITY
    Usernames, passwords and the base64 responses never appear in a log line; the
    session's chat hook (posttls-finger style) sees `AUTH PLAIN ...` and `...` instead.
    The password table is opened in pre_init, before the chroot.

FUNCTIONS
    from_config(cfg, prefix) -> Client or None (smtp_sasl_auth_enable = no);
        ConfigError for a bad security option or an empty password table parameter.
    Client.credentials(host, dest, sender) -> (username, password) or None;
        Client.has_credentials(session) for the plaintext fallback of smtp/session.py.
    Client.choose(offered, tls) -> (mechanisms passing the filter, those passing the
        security options too), in preference order.
    Client.helo_login(session) -> True (go on to MAIL), False (the session failed; the
        Delivery says why).
    parse_mechs(features_words) -> mechanism names from EHLO AUTH lines.

SEE ALSO
    smtp/session.py (the hook), smtp/service.py (pre_init), lib/sasl_common.py (security
    options), smtpd/sasl.py (server side);
    Postfix smtp_sasl_glue.c, smtp_sasl_proto.c, SASL_README.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from ..lib import msg, params, tables
from ..lib.maincf import ConfigError
from ..lib.smtpio import StreamEOF, StreamTimeout
from ..lib.sasl_common import allowed, security_options

# Mechanisms this client implements, in preference order, with their properties
# (Dovecot/Cyrus names, as lib/sasl_common.py's security options use).
MECHANISMS: tuple[tuple[str, frozenset[str]], ...] = (
    ("PLAIN", frozenset({"plaintext"})),
    ("LOGIN", frozenset({"plaintext"})),
)
MAX_STEPS = 100                 # Postfix's protocol loop limit
EHLO_WHERE = "performing the EHLO handshake"


class SaslClientError(Exception):
    """The client side cannot go on (Cyrus's sasl_reply text)."""


def parse_mechs(words: list[str]) -> list[str]:
    """Mechanism names (upper case, duplicates dropped) from AUTH words."""
    out: list[str] = []
    for w in words:
        for m in w.replace("=", " ").split():
            m = m.upper()
            if m not in out:
                out.append(m)
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Exchange:
    """One mechanism's client steps: initial() then step(challenge) per 334."""

    def __init__(self, mech: str, user: str, password: str):
        self.mech = mech
        self.user = user.encode("utf-8", "surrogateescape")
        self.password = password.encode("utf-8", "surrogateescape")
        self.steps = 0

    def initial(self) -> str | None:
        """The initial response, or None to send AUTH MECH alone."""
        if self.mech == "PLAIN":
            self.steps = 1
            return _b64(b"\0" + self.user + b"\0" + self.password)
        return None

    def step(self, challenge: str) -> str:
        """The response to a 334 challenge; SaslClientError when there is none."""
        self.steps += 1
        if self.mech == "PLAIN":
            if self.steps == 1:         # the server asked for the response instead
                return _b64(b"\0" + self.user + b"\0" + self.password)
            raise SaslClientError("authentication protocol error")
        if self.steps == 1:
            return _b64(self.user)
        if self.steps == 2:
            return _b64(self.password)
        raise SaslClientError("authentication protocol error")


@dataclass
class Client:
    """What main.cf says about client SASL, with the password tables open."""

    maps: list = field(default_factory=list)
    param: str = "smtp_sasl_password_maps"
    options: frozenset[str] = frozenset({"noplaintext", "noanonymous"})
    tls_options: frozenset[str] = frozenset({"noplaintext", "noanonymous"})
    mech_filter: list[str] = field(default_factory=list)
    soft_bounce: bool = True
    sender_auth: bool = False

    # --- credentials ---------------------------------------------------------------------
    def _find(self, key: str) -> str | None:
        for table in self.maps:
            value = table.lookup(key)
            if value is not None:
                return value
        return None

    def lookup_keys(self, host: str, dest: str, sender: str = "") -> list[str]:
        """The keys tried, in Postfix's order: sender (when enabled), host, next hop."""
        keys: list[str] = []
        if self.sender_auth and sender:
            keys.append(sender)
            if "@" in sender:
                keys.append(sender[sender.rfind("@"):])
        for k in (host, dest):
            if k and k not in keys:
                keys.append(k)
        return keys

    def credentials(self, host: str, dest: str, sender: str = "") -> tuple[str, str] | None:
        """(username, password) for this server, or None; TableError propagates."""
        for key in self.lookup_keys(host, dest, sender):
            value = self._find(key)
            if value is not None:
                user, _, password = value.partition(":")
                return user, password
        return None

    def has_credentials(self, sess) -> bool:
        """Whether there are credentials for sess's server (Postfix's
        HAVE_SASL_CREDENTIALS); a lookup error counts as yes (no plaintext fallback)."""
        try:
            return self.credentials(sess.addr.name, _dest_text(sess), sess.d.sender) is not None
        except tables.TableError:
            return True

    # --- mechanisms --------------------------------------------------------------------------
    def filtered(self, offered: list[str]) -> list[str]:
        """The server's list after smtp_sasl_mechanism_filter (Postfix's compat_mechs)."""
        if not self.mech_filter:
            return list(offered)
        wanted = {m.lower() for m in self.mech_filter}
        return [m for m in offered if m.lower() in wanted]

    def usable(self, mechs: list[str], tls: bool) -> list[str]:
        """Of mechs, those implemented here and allowed by the options, best first."""
        options = self.tls_options if tls else self.options
        have = {m.upper() for m in mechs}
        return [name for name, props in MECHANISMS
                if name in have and allowed(props, options)]

    def choose(self, offered: list[str], tls: bool) -> tuple[list[str], list[str]]:
        """(the filtered server list, the mechanisms to try in order)."""
        compat = self.filtered(offered)
        return compat, self.usable(compat, tls)

    # --- the dialogue ---------------------------------------------------------------------
    def helo_login(self, sess) -> bool:
        """Authenticate sess (smtp/session.ClientSession) when wanted; False: session failed."""
        if "AUTH" not in sess.features:
            return True
        offered = list(getattr(sess, "sasl_mechs", []))
        compat, usable = self.choose(offered, sess.tls_active)
        if not compat:
            words = " ".join(offered)
            msg.warn(f"{sess.relay} offered no supported AUTH mechanisms: '{words}'"
                     if words else f"{sess.relay} offered null AUTH mechanism list")
        dest = _dest_text(sess)
        try:
            creds = self.credentials(sess.addr.name, dest, sess.d.sender)
        except tables.TableError as exc:
            msg.warn(f"{sess.d.queue_id}: {self.param} lookup error: {exc}")
            return sess._site_fail(None, "4.3.0", "mail system configuration error")
        if creds is None:
            msg.verbose(1, f"smtp_sasl_passwd_lookup: no auth info found "
                           f"(host=`{sess.addr.name}')")
            return True
        if not compat:
            return sess._site_fail(None, "4.7.0", f"SASL authentication failed: server "
                                                  f"{sess.namaddr} offered no compatible "
                                                  f"authentication mechanisms for this type "
                                                  f"of connection security")
        if not usable:
            return sess._site_fail(None, "4.7.0", f"SASL authentication failed; cannot "
                                                  f"authenticate to server {sess.namaddr}: "
                                                  f"no mechanism available")
        try:
            return self._authenticate(sess, usable[0], *creds)
        except (StreamTimeout, StreamEOF) as exc:
            sess._except(exc, EHLO_WHERE)
            return False

    def _authenticate(self, sess, mech: str, user: str, password: str) -> bool:
        timeout = sess.o.timeouts["helo"]
        sess._where = EHLO_WHERE
        ex = _Exchange(mech, user, password)
        initial = ex.initial()
        if initial is None:
            _send(sess, f"AUTH {mech}", f"AUTH {mech}")
        else:
            _send(sess, f"AUTH {mech} {initial}", f"AUTH {mech} ...")
        sess._flush(timeout)
        steps = 0
        while True:
            reply = sess._reply(timeout)
            if reply.klass != 3:
                break
            steps += 1
            if steps > MAX_STEPS:
                return sess._site_fail(None, "4.3.0", f"SASL authentication failed; "
                                                      f"authentication protocol loop with "
                                                      f"server {sess.namaddr}")
            line = reply.lines[-1] if reply.lines else ""
            try:
                response = ex.step(line[4:].strip())
            except SaslClientError as exc:
                # Leave the server in a known state: abort the exchange (RFC 4954).
                _send(sess, "*", "*")
                sess._flush(timeout)
                sess._reply(timeout)
                return sess._site_fail(None, "4.7.0", f"SASL authentication failed; cannot "
                                                      f"authenticate to server "
                                                      f"{sess.namaddr}: {exc}")
            _send(sess, response, "...")
            sess._flush(timeout)
        sess._where = ""
        if reply.klass == 2:
            return True
        dsn = reply.dsn
        if self.soft_bounce and dsn.startswith("5"):
            dsn = "4" + dsn[1:]
        return sess._site_fail(reply, dsn, f"SASL authentication failed; server "
                                           f"{sess.namaddr} said: {reply.text1}")


def _send(sess, line: str, shown: str) -> None:
    """A command with credentials in it: the chat hook sees `shown`, never the line."""
    if sess.chat is not None:
        sess.chat(">", shown)
    sess.s.write(line.encode("utf-8", "surrogateescape") + b"\r\n")


def _dest_text(sess) -> str:
    """The next-hop destination as written, for this session."""
    text = getattr(sess, "sasl_dest", None)
    if text:
        return text
    nexthop = (getattr(sess, "_nexthop", "") or "").strip()
    parts = nexthop.replace(",", " ").split()
    # A request with one destination (the usual case): that one. With a list, the
    # service tells the session which one it is on (sess.sasl_dest).
    return parts[0] if len(parts) == 1 else ""


def _param(cfg, prefix: str, suffix: str) -> str:
    name = f"{prefix}_{suffix}"
    return name if params.lookup(name) else f"smtp_{suffix}"


def from_config(cfg, prefix: str = "smtp", open_table=tables.open_table) -> Client | None:
    """The client SASL settings, tables open; None when smtp_sasl_auth_enable = no."""
    if not cfg[_param(cfg, prefix, "sasl_auth_enable")]:
        return None
    maps_param = _param(cfg, prefix, "sasl_password_maps")
    refs = cfg[maps_param]
    if not refs:
        raise ConfigError(f"specify a password table via the `{maps_param}' "
                          f"configuration parameter")
    opts_param = _param(cfg, prefix, "sasl_security_options")
    tls_param = _param(cfg, prefix, "sasl_tls_security_options")
    options = security_options(cfg[opts_param], opts_param)
    tls_options = security_options(cfg[tls_param], tls_param)
    soft = _param(cfg, prefix, "sasl_auth_soft_bounce")
    sender = _param(cfg, prefix, "sender_dependent_authentication")
    client = Client(
        maps=[open_table(ref, cfg) for ref in refs], param=maps_param,
        options=options, tls_options=tls_options,
        mech_filter=list(cfg[_param(cfg, prefix, "sasl_mechanism_filter")]),
        soft_bounce=bool(cfg[soft]) if params.lookup(soft) else True,
        sender_auth=bool(cfg[sender]) if params.lookup(sender) and prefix == "smtp"
        else False)
    return client
