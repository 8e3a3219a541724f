"""The ESMTP session of smtpd: one client, from greeting to QUIT, as Postfix's smtpd.c.

A Session reads commands and message content through an SmtpStream (lib/smtpio.py) and
writes replies to it; it knows nothing of accept, fork or chroot. Verbs dispatch through
one table with their flags, as Postfix's smtpd_cmd_table. Replies, reply codes and log
lines are Postfix 3.7's.

PROTOCOL
    HELO, EHLO (PIPELINING, SIZE, VRFY, ETRN, STARTTLS, AUTH, ENHANCEDSTATUSCODES,
    8BITMIME, DSN, SMTPUTF8, CHUNKING), MAIL (SIZE, BODY, AUTH, SMTPUTF8, RET, ENVID),
    RCPT (NOTIFY, ORCPT), DATA, BDAT, RSET, NOOP, QUIT, ETRN, VRFY
    (disable_vrfy_command), STARTTLS and TLS wrapper mode, AUTH (smtpd/sasl.py; offered
    only over TLS with smtpd_tls_auth_only = yes or enforced TLS, as Postfix). The queue
    file is created at the first accepted recipient, as Postfix does
    (smtpd_delay_open_until_valid_rcpt), and committed with fsync before
    `250 2.0.0 Ok: queued as ID`. The restriction lists (smtpd/check.py) run at their
    stages: connect (the reject replaces the 220 greeting, and every later command but
    QUIT gets `503 5.7.0 Error: access denied for host[addr]`), HELO/EHLO and MAIL with
    smtpd_delay_reject = no, RCPT, DATA (before 354) and the end of data (before the
    commit; the queue file is discarded on a reject). Commands in smtpd_noop_commands
    get `250 2.0.0 Ok` and nothing else. An unknown command that looks like a header
    (`Label:`) or is in smtpd_forbidden_commands (CONNECT GET POST, and a name that does
    not start with a letter) ends the session: `warning: non-SMTP command from
    host[addr]: LINE` and `221 2.7.0 Error: I can break rules, too. Goodbye.`, as
    Postfix. Recipients past smtpd_recipient_limit get
    `452 4.5.3 Error: too many recipients`, an error only past
    smtpd_recipient_overshoot_limit. The queue file is written through the cleanup stage
    (lib/cleanup.py: header_size_limit, hopcount_limit, address rewriting, header_checks
    and body_checks), in this process; its reject is the reply at the end of data.
    SMTPUTF8 (RFC 6531, smtputf8_enable): announced in EHLO; `MAIL FROM:<...> SMTPUTF8`
    allows UTF-8 domains in MAIL and RCPT and is recorded in the queue file (attribute
    smtputf8=1, for the smtp client); 8-bit local parts pass in every mode, as Postfix;
    strict_smtputf8 = yes refuses non-ASCII addresses without the parameter (553 5.6.7).
    REQUIRETLS (RFC 8689, requiretls_enable): announced in EHLO inside TLS only, as
    Postfix; `MAIL FROM:<...> REQUIRETLS` is taken only there (else 555 5.5.4
    Unsupported option) and recorded in the queue file (requiretls=1) for the smtp client.
    CHUNKING (RFC 3030): `BDAT n [LAST]` reads exactly n bytes, CRLF becomes LF and nothing
    is dot-unstuffed; the content goes to the same queue file writer as DATA's, Received
    header first, through smtpd/content.py's ContentSink (size and write errors; the
    cleanup stage takes the headers however the chunks split them), and end_of_message()
    answers for it as for the end of DATA. As Postfix: a chunk
    past message_size_limit is read and dropped (552 5.3.4 Chunk exceeds message size
    limit), a failed chunk makes the following ones be dropped until LAST or RSET (551
    5.0.0 Discarded N bytes after earlier error), MAIL, RCPT and DATA after BDAT get 503,
    and a malformed BDAT 521 and the end of the session.
    ETRN domain (RFC 1985): for a domain in fast_flush_domains ($relay_domains) that passes
    smtpd_etrn_restrictions, its deferred mail is made due now and qmgr woken
    (lib/flush.py: no per-site logs, the deferred envelopes are read); `250 Queuing
    started`, `459 <domain>: service unavailable` outside the list, `458 Unable to queue
    messages` when that fails, `500 Syntax: ETRN domain`, as Postfix.
    DSN (RFC 3461) parameters, checked as Postfix (lib/dsn.py; `501 5.7.1 DSN support is
    disabled` when smtpd_discard_ehlo_keywords has dsn): RET and ENVID become the queue
    file attributes dsn_ret and dsn_envid, NOTIFY and ORCPT the recipient's N and O records
    (lib/queue.py). Delivery status notices for them are not implemented.
    Milters (smtpd_milters, smtpd/milters.py and lib/milter.py) see every stage: their
    reply replaces smtpd's at connect (a reject: `554 HOST ESMTP not accepting
    connections`, and the reply persists), HELO/EHLO (421 only), MAIL, RCPT, DATA (and the
    first BDAT), an unknown command (4XX only) and the end of the message, where the
    cleanup stage applies their edits before the queue file is committed; logged as
    Postfix's `milter-reject`, `milter-hold` and `milter-discard`.
    Reject footers (smtpd_reject_footer, smtpd_reject_footer_maps; reply() adds one to
    every 4XX and 5XX reply, its $names expanded per reply through
    smtpd_expansion_filter), smtpd_command_filter (read_command() replaces the line and
    logs `CLIENT: replacing command "OLD" with "NEW"`) and
    smtpd_discard_ehlo_keyword_address_maps (looked up at greet(): the client address's
    keywords instead of smtpd_discard_ehlo_keywords; each EHLO logs `discarding EHLO
    keywords: ...` unless silent-discard, as Postfix) are lib/server_filters.py's; a
    table that cannot be read gets `421 4.3.0 HOST Server local data error`.
    use_filters() gives a session all of these, from the ServerFilters that smtpd's
    pre_init opened (sendmail -bs's stand-alone session too, as Postfix's smtpd -S).
    XCLIENT and XFORWARD, for authorized clients only, are in smtpd/xclient.py; greet()
    runs again after XCLIENT. A session whose PROXY header was unusable (hangup) answers
    only `421 4.3.0 HOST Server local error` (smtpd/proxy.py).

SECURITY
    STARTTLS discards every byte the client sent before the handshake (CVE-2011-0411) and
    forgets HELO, MAIL and RCPT. DATA ends only at <CR><LF>.<CR><LF> unless
    smtpd_forbid_bare_newline = no, so one message cannot be smuggled into two
    (CVE-2023-51764). Every input is bounded: command lines by line_length_limit, messages
    by message_size_limit while they stream to disk, errors by the error limits. An
    address with a NUL or another control character is refused in every mode (501
    5.1.7 / 5.1.3); a NUL ends a command line, as in Postfix's C strings. SASL
    responses are never logged, nor the arguments of a pipelined AUTH command; a failed
    AUTH counts as an error (smtpd_error_sleep_time past smtpd_soft_error_limit). With
    smtputf8_enable, a command that is not valid UTF-8 (overlong forms, stray bytes) gets
    `500 5.5.2 Error: bad UTF-8 syntax` before anything parses it. With soft_bounce,
    every 5XX reply line goes out as 4XX (and 5.X.X as 4.X.X), and the reject log lines
    show what was sent, as Postfix's smtpd_chat.c and smtpd_check_reject().
"""

from __future__ import annotations

import contextlib
import errno
import re
import time
import weakref

from ..lib import cleanup, flush, mail_flow, metrics, msg, tables, verify_client
from ..lib import server_filters as SF
from ..lib import dsn as DSN
from ..lib import queue as Q
from ..lib.proxy import escape
from ..lib.smtpio import StreamEOF, StreamTimeout, TLSFailure, crlf_prefix
from . import milters as M
from . import sasl as SASL
from . import xclient as X
from .check import ClientState, Reply
from .content import ContentSink
from .limits import NO_LIMITS

# verb -> (method, flags). Flags: "junk" counts against smtpd_junk_command_limit;
# "pretls" is allowed before STARTTLS when TLS is enforced.
VERB_ORDER = ("helo", "ehlo", "xclient", "xforward", "starttls", "auth", "mail", "rcpt",
              "data", "bdat", "rset", "noop", "vrfy", "etrn", "quit", "unknown")
PARAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(=[!-~]*)?$")


class Disconnect(Exception):
    """End the session (after the reply that has been written)."""


def printable(data: bytes | str, limit: int = 100) -> str:
    """Client text for a reply or log line, ASCII only (lib/msg.printable's rule)."""
    return msg.printable(data, limit, utf8=False)


def comment_text(text: str) -> str:
    """Text safe inside a header comment: printable, with ( ) and \\ escaped."""
    return "".join("\\" + c if c in "()\\" else c for c in printable(text, 1000))


def parse_path(arg: str, keyword: str, strict: bool):
    """Split `FROM:<addr> params` into (address, params); None for a syntax error."""
    if not arg[:len(keyword)].upper() == keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest:
        return None
    if rest.startswith("<"):
        if '"' not in rest:
            end = rest.find(">", 1)         # nothing quoted (nearly always): no scan
            if end < 0:
                end = len(rest)
        else:
            end, quoted = 1, False
            while end < len(rest):
                c = rest[end]
                if c == '"':
                    quoted = not quoted
                elif c == "\\" and quoted:
                    end += 1
                elif c == ">" and not quoted:
                    break
                end += 1
        if end >= len(rest):
            return "bad", []
        addr, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(" "):
            return "bad", []
    else:
        if strict:
            return None
        addr, _, tail = rest.partition(" ")
    return addr, tail.split()


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Postfix has never refused 8-bit local parts: non-ASCII is taken there in every mode
# (with smtputf8_enable = no, bytes that are not UTF-8 come as surrogate escapes).
_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\u0080-\U0010ffff-]+$")
_QUOTED = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"$')
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9.:-]+\])$")
# A UTF-8 domain (RFC 6531), only after MAIL FROM ... SMTPUTF8: labels of letters, digits,
# - and _ of any script (no surrogate escape: smtputf8_enable refuses malformed UTF-8).
_U = r"[A-Za-z0-9_\u0080-\ud7ff\ue000-\U0010ffff-]+"
_DOMAIN_UTF8 = re.compile(rf"^(?:{_U}(?:\.{_U})*\.?|\[[A-Za-z0-9.:-]+\])$")


def valid_address(addr: str, smtputf8: bool = False) -> bool:
    """Whether an envelope address has a usable syntax (local part, optional domain).

    As Postfix's smtpd_check_addr: a non-ASCII domain only when the client asked for
    SMTPUTF8; a non-ASCII local part always (Postfix never refused 8-bit local parts).
    """
    if not addr or len(addr) > 1000:
        return False
    if _CONTROL.search(addr):
        # NUL and other controls, quoted or not, in every mode: they would reach the
        # queue file and the logs (501 5.1.7 / 5.1.3)
        return False
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, None
    # fullmatch: `$` alone would also match before a final newline ("user\n@example.com")
    if not local or not (_LOCAL_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        return False
    if domain is None or _DOMAIN.fullmatch(domain):
        return True
    return smtputf8 and bool(_DOMAIN_UTF8.fullmatch(domain))


def strip_route(addr: str) -> str:
    """Drop an RFC 821 source route: <@a,@b:user@c> is <user@c>."""
    if addr.startswith("@") and ":" in addr:
        return addr.split(":", 1)[1]
    return addr


def long_line(data: bytes, n: int) -> bool:
    """Whether a line of data (lines end in LF) has n bytes or more. When every aligned
    block of n // 2 bytes holds an LF (found at memchr speed), no line can be that long,
    and the lines are not measured one by one."""
    block = n // 2
    if block >= 64:
        for start in range(0, len(data), block):
            if data.find(b"\n", start, start + block) < 0:
                break
        else:
            return False
    return max(map(len, data.split(b"\n"))) >= n


def reply_bytes(text: str) -> bytes:
    """One reply line as sent: client text echoed in it is made printable (as Postfix,
    `?`), and CRLF ends it."""
    if not (text.isascii() and text.isprintable()):
        text = printable(text, len(text))
    return text.encode("utf-8", "replace") + b"\r\n"


class SessionConfig:
    """What a Session takes from main.cf alone, worked out once per Config instead of
    once per client (a Config does not change once loaded: lib/maincf.py), and the EHLO
    replies made for it (Session.ehlo_reply)."""

    def __init__(self, cfg):
        self.attrs = {          # Session attributes
            "hostname": cfg.get("myhostname"),
            "line_limit": cfg["line_length_limit"],
            "size_limit": cfg["message_size_limit"],
            "rcpt_limit": cfg["smtpd_recipient_limit"],
            "soft_limit": cfg["smtpd_soft_error_limit"],
            "hard_limit": cfg["smtpd_hard_error_limit"],
            "error_sleep": cfg["smtpd_error_sleep_time"],
            "junk_limit": cfg["smtpd_junk_command_limit"],
            "noop_commands": frozenset(c.lower() for c in cfg["smtpd_noop_commands"]),
            "discard_ehlo": frozenset(k.lower() for k in cfg["smtpd_discard_ehlo_keywords"]),
            "overshoot_limit": cfg["smtpd_recipient_overshoot_limit"],
            "smtputf8_enable": cfg["smtputf8_enable"],
            "soft_bounce": cfg["soft_bounce"]}
        mode = cfg["smtpd_forbid_bare_newline"].lower()     # one of its values
        self.bare_lf = {"yes": "normalize"}.get(mode, mode)
        self.ehlo: dict[tuple, bytes] = {}
        self.probe_sender = verify_client.ProbeSender(cfg)


def session_config(cfg) -> SessionConfig:
    """cfg's SessionConfig, made once and kept with it (Config.derived)."""
    return cfg.derived("smtpd.session", SessionConfig)


class Session:
    """One SMTP session with one client."""

    limits = NO_LIMITS      # the client's anvil limits (smtpd/limits.py); service.py sets them
    stand_alone = False     # sendmail -bs (pickup/service.py's LocalSession)
    hangup = False          # the PROXY header was unusable: 421 and goodbye (smtpd/proxy.py)
    client_port = ""        # the client's TCP port, when known (PROXY header, XCLIENT)
    server_addr = server_port = ""      # the server end, when known (XCLIENT DESTADDR)
    limits_for = None       # client -> its limits, for a client that XCLIENT brings
    cleanup_settings = None  # lib/cleanup.Settings, opened before the jail by service.py
    milters = None          # lib/milter.Milters (smtpd_milters), set by smtpd/milters.setup
    milter_rcpt = milter_reject = None
    milter_settings = None  # smtpd/milters.Prepared: smtpd_milters, smtpd_milter_maps
    # lib/server_filters: set by service.py when configured, else one attribute test each
    footer = None           # smtpd_reject_footer(_maps)
    cmd_filter = None       # smtpd_command_filter
    ehlo_maps = None        # smtpd_discard_ehlo_keyword_address_maps
    non_smtp = staticmethod(SF.is_header)   # + smtpd_forbidden_commands: use_filters()
    ehlo_unknown = False    # its lookup failed: EHLO gets 421 (Postfix's SMTP_ERR_DATA)

    def __init__(self, stream, cfg, client: ClientState, queue_root: str, checker,
                 level: str = "none", tls=None, wrapper: bool = False,
                 stopping=lambda: False, sasl=None):
        self.s = stream
        self.cfg = cfg
        self.client = client
        self.queue_root = queue_root
        self.checker = checker
        self.tls = tls                  # smtpd.service.TlsServer or None
        self.wrapper = wrapper
        self.stopping = stopping
        self.conf = conf = session_config(cfg)
        # hostname, line_limit, size_limit, ...: main.cf's, worked out once (SessionConfig)
        self.__dict__.update(conf.attrs)
        self.level = level              # lib/tls.server_security_level's, from prepare()
        self.bare_lf = self._bare_newline_mode()
        self.counts: dict[str, list[int]] = {}
        self.errors = 0
        self.junk = 0
        self.last = "CONNECT"
        self.tls_active = False
        self.tls_info = None
        self.esmtp = False
        self.pipelining_ok = False
        self.pipelining_warned = False
        self.data_bytes = None
        self.helo: str | None = None
        self.sasl = sasl                # smtpd.sasl.SaslSession, or None: AUTH is off
        self.sasl_method: str | None = None
        self.sasl_exempt = self._sasl_exempt()
        self.access_denied: str | None = None
        self.seqno = 0                  # messages begun: the policy "instance"
        # The client state must not hold the session: a reference cycle would keep each
        # finished session, its TLS connection and OpenSSL's buffers with it, until the
        # next full garbage collection (the C heap of a busy worker grew by megabytes).
        attrs = weakref.WeakMethod(self.policy_attrs)
        self.client.session_attrs = lambda: attrs()()
        self.reset()

    # --- configuration ---------------------------------------------------------------------
    def _bare_newline_mode(self) -> str:
        mode = self.conf.bare_lf
        if mode != "no" and self._in_list("smtpd_forbid_bare_newline_exclusions"):
            mode = "no"
        return mode

    def _in_list(self, param: str) -> bool:
        """Whether the client is in a network list (check.NetworkList, the one matcher)."""
        try:
            return self.checker.in_network_list(param, self.client.addr, self.client.name)
        except tables.TableError as exc:
            msg.warn(f"{param}: table lookup problem: {exc}")
            return False

    @property
    def tls_required(self) -> bool:
        return self.level == "encrypt" and not self.wrapper

    def _sasl_exempt(self) -> bool:
        """Whether the client is in smtpd_sasl_exceptions_networks (AUTH not announced)."""
        return self.sasl is not None and self._in_list("smtpd_sasl_exceptions_networks")

    def sasl_active(self) -> bool:
        """Whether AUTH may be used now: enabled, and over TLS where TLS is required."""
        if self.sasl is None:
            return False
        if not self.tls_active and (self.cfg["smtpd_tls_auth_only"] or self.level == "encrypt"):
            return False
        return "auth" not in self.discard_ehlo

    @property
    def starttls_offered(self) -> bool:
        return (not self.tls_active and not self.wrapper and self.level != "none"
                and self.tls is not None)

    # --- replies and logging -----------------------------------------------------------------
    def reply(self, text: str, error: bool = True) -> None:
        """Queue one reply (flushed before the next read; lines joined by CRLF); a 4xx
        or 5xx reply other than 421 counts as an error unless error is False, and gets
        smtpd_reject_footer; with soft_bounce each 5XX line goes out as 4XX."""
        if text[:1] in ("4", "5"):
            if self.footer is not None:
                text = self.footer.add_footer(text, self.macro_values)
            if not text.startswith("421"):
                self.errors += error
                if self.errors > self.soft_limit and self.error_sleep:
                    self.s.flush()
                    time.sleep(self.error_sleep)
            if "\r\n" in text:            # a footer's or a milter's lines
                lines = text.split("\r\n")
                if self.soft_bounce:
                    lines = map(SF.soft_bounce, lines)
                self.s.write(b"".join(map(reply_bytes, lines)))
                return
            if self.soft_bounce:
                text = SF.soft_bounce(text)   # smtpd_chat.c's safety net, line by line
        self.s.write(reply_bytes(text))

    def macro_values(self) -> dict:
        """The $names of smtpd's reply templates (Postfix's smtpd_expand_lookup)."""
        return SF.smtpd_values(self.hostname, self.client, self.client_port, self.sender)

    def local_data_error(self) -> None:
        """Postfix's SMTP_ERR_DATA: a table that cannot be read; 421 and goodbye."""
        reply = f"421 4.3.0 {self.hostname} Server local data error"
        msg.info(f"{self.writer.id if self.writer else 'NOQUEUE'}: reject: {self.last} "
                 f"from {self.client.client}: {reply}")
        self.reply(reply)
        raise Disconnect

    def count(self, verb: str, ok: bool) -> None:
        c = self.counts.setdefault(verb, [0, 0])
        c[1] += 1
        if ok:
            c[0] += 1

    def stats(self) -> str:
        parts, ok, total = [], 0, 0
        for verb in VERB_ORDER:
            if verb in self.counts:
                good, all_ = self.counts[verb]
                parts.append(f"{verb}={good}" if good == all_ else f"{verb}={good}/{all_}")
                ok, total = ok + good, total + all_
        parts.append(f"commands={ok}" if ok == total else f"commands={ok}/{total}")
        return " ".join(parts)

    def log_reject(self, stage: str, reply, rcpt: str | None = None,
                   action: str = "reject") -> None:
        """Postfix's log_whatsup: "QUEUEID: reject: STAGE from client: reply; from=<>...";
        the sender and HELO name are the client state's (the ones being checked)."""
        qid = self.writer.id if self.writer else "NOQUEUE"
        parts = []
        if self.client.sender is not None:
            parts.append(f"from=<{self.client.sender}>")
        if rcpt is not None:
            parts.append(f"to=<{rcpt}>")
        parts.append(f"proto={'ESMTP' if self.esmtp else 'SMTP'}")
        if self.client.helo:
            parts.append(f"helo=<{self.client.helo}>")
        if self.client.sasl_username:
            parts.append(f"sasl_method={self.sasl_method} "
                         f"sasl_username={self.client.sasl_username}")
        if self.sasl_sender:
            parts.append(f"sasl_sender={self.sasl_sender}")
        if self.soft_bounce:
            # as smtpd_check_reject(): the log shows the reply the client gets
            reply = SF.soft_bounce(str(reply))
        msg.info(f"{qid}: {action}: {stage} from {self.client.client}: {reply}; "
                 + " ".join(parts))
        metrics.smtpd_reject(stage, reply)

    def protocol(self) -> str:
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls_active else "") + \
            ("A" if self.client.sasl_username else "")

    def policy_attrs(self) -> dict:
        """The session's part of a check_policy_service request (smtpd/check.py)."""
        attrs = {"protocol_state": self.last, "protocol_name": self.protocol(),
                 "queue_id": self.writer.id if self.writer is not None else "",
                 "recipient_count": len(self.rcpts), "instance": self.instance,
                 "size": self.data_bytes or self.msg_size,
                 "sasl_method": self.sasl_method or "", "sasl_sender": self.sasl_sender or ""}
        for key, call in (("client", "getpeername"), ("server", "getsockname")):
            try:
                host, port = getattr(self.s.sock, call)()[:2]
            except (OSError, AttributeError, ValueError, TypeError):
                continue
            host = host[7:] if host.startswith("::ffff:") else host
            attrs[f"{key}_port"] = str(port)
            if key == "server":
                attrs["server_address"] = host
        info = self.tls_info if self.tls_active else None
        if info is not None:
            attrs.update(encryption_protocol=info.protocol,
                         encryption_cipher=info.cipher_name,
                         encryption_keysize=info.cipher_usebits,
                         ccert_subject=info.peer_CN, ccert_issuer=info.issuer_CN)
        return attrs

    # --- transaction state -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the mail transaction (RSET, end of DATA, STARTTLS)."""
        if getattr(self, "milter_abort", False):
            self.milters.abort()
        self.milter_abort = self.milter_hold = self.milter_discard = False
        if getattr(self, "writer", None) is not None:
            self.writer.abort()
        self.writer = None
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.client.sender = None
        self.sasl_sender: str | None = None
        self.rcpt_overshoot = 0
        self.smtputf8 = False           # MAIL FROM ... SMTPUTF8 (RFC 6531)
        self.requiretls = False         # MAIL FROM ... REQUIRETLS (RFC 8689)
        self.dsn_ret = ""               # MAIL FROM ... RET= and ENVID= (RFC 3461)
        self.dsn_envid = ""
        if getattr(self, "bdat", None) is not None:
            self.data_bytes = None
        self.bdat: str | None = None    # None, "ok" (in a BDAT transfer) or "error"
        self.bdat_sink: ContentSink | None = None
        self.bdat_cr = b""              # a CR that ended the last read of a chunk
        self.bdat_bare_lf = False       # smtpd_forbid_bare_newline reject or note
        self.msg_size = 0               # MAIL FROM's SIZE=
        self.client.prepend = []
        self.instance = ""
        self.xforward: dict[str, str] = {}      # XFORWARD attributes (smtpd/xclient.py)

    # --- the session -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve the client until QUIT, an error limit, a timeout or a lost connection."""
        msg.info(f"connect from {self.client.client}")
        metrics.smtpd_connect()
        try:
            if self.hangup:
                self.reply(f"421 4.3.0 {self.hostname} Server local error")
                raise Disconnect
            if self.wrapper:
                if self.tls is None:
                    msg.warn(f"TLS wrapper mode requested but TLS is not available; "
                             f"disconnecting {self.client.client}")
                    raise Disconnect
                if not self.limits.wrapper():
                    raise Disconnect
                if not self.start_tls():
                    raise Disconnect
            self.greet()
            while True:
                if self.stopping():
                    self.reply(f"421 4.3.2 {self.hostname} Service shutting down, "
                               "closing transmission channel")
                    break
                line = self.read_command()
                if line is None:
                    continue
                if self.dispatch(line):
                    break
                if self.errors >= self.hard_limit:
                    msg.info(f"too many errors after {self.last} from {self.client.client}")
                    self.reply(f"421 4.7.0 {self.hostname} Error: too many errors")
                    break
        except Disconnect:
            pass
        except StreamTimeout:
            msg.info(f"timeout after {self.last_for_log()} from {self.client.client}")
            try:
                self.reply(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
                self.s.flush(timeout=5)
            except (StreamTimeout, StreamEOF):
                pass
        except StreamEOF:
            msg.info(f"lost connection after {self.last_for_log()} from {self.client.client}")
        finally:
            try:
                self.s.flush(timeout=5)
            except (StreamTimeout, StreamEOF):
                pass
            self.reset()
            if self.milters is not None:
                self.milters.disc_event()
            self.limits.disconnect()
            msg.info(f"disconnect from {self.client.client} {self.stats()}")
            metrics.smtpd_session_end(self.counts)

    def greet(self) -> None:
        """Connection limits, connect restrictions and the greeting; again after XCLIENT.
        XCLIENT hosts are not counted by anvil, as in Postfix."""
        if self.ehlo_maps is not None:
            self.ehlo_discard_for_client()
        if not self._in_list("smtpd_authorized_xclient_hosts") and \
                not self.limits.connect(self.reply):
            raise Disconnect
        denied = self.checker.connect(self.client)
        if denied is not None:
            # smtpd_delay_reject = no: the reject is the greeting, and every command
            # but QUIT is refused from now on, as Postfix's access_denied.
            self.log_reject("CONNECT", denied)
            self.access_denied = str(denied)
            self.reply(self.access_denied)
            return
        err = None
        if self.milter_settings is not None and self.milter_settings.maps:
            # smtpd_milter_maps: after XCLIENT, the new client's milters
            if self.milters is not None:
                self.milters.disc_event()
            M.setup(self, self.milter_settings)
        if self.milters is not None:
            self.milters.disc_event()       # after XCLIENT: a new client, new connections
            err = self.milters.conn_event(self.client.name, self.client.addr,
                                          self.client_port or M.sockname(self, "getpeername")[1]
                                          or "0")
            if err is not None:
                err = M.check_reply(self, "CONNECT", err)
        if err and err[0] == "5":
            self.reply(f"554 {self.hostname} ESMTP not accepting connections")
        elif err and err.startswith("421"):
            self.reply(f"421 {self.hostname} Service unavailable - try again later")
            raise Disconnect
        else:
            self.reply(f"220 {self.cfg.get('smtpd_banner')}")

    def ehlo_discard_for_client(self) -> None:
        """smtpd_discard_ehlo_keyword_address_maps: the client address's keywords replace
        smtpd_discard_ehlo_keywords (a failed lookup: 421 at EHLO, as Postfix)."""
        self.ehlo_unknown = False
        try:
            words = self.ehlo_maps.ehlo_discard(self.client.addr)
        except tables.TableError as exc:
            msg.warn(f"smtpd_discard_ehlo_keyword_address_maps: {exc}")
            self.ehlo_unknown, words = True, None
        self.discard_ehlo = self.conf.attrs["discard_ehlo"] if words is None else \
            frozenset(w.lower() for w in words)

    def milter_event(self, where: str, call, rcpt: str | None = None) -> str | None:
        """One SMTP stage's milter event (a no-op without milters or after a milter's
        DISCARD): the reply to give instead of smtpd's own, as Postfix's smtpd.c."""
        if self.milters is None or self.milter_discard:
            return None
        err = call(self.milters)
        if err is None:
            return None
        return M.check_reply(self, where, err, rcpt)

    def milter_refuse(self, err: str) -> bool:
        """Give a milter's reply (it may be multi-line); 421 ends the session."""
        self.reply(err)
        if err.startswith("421"):
            raise Disconnect
        return False

    def last_for_log(self) -> str:
        if self.last in ("DATA", "BDAT") and self.data_bytes is not None:
            return f"{self.last} ({self.data_bytes} bytes)"
        return self.last

    def read_command(self) -> str | None:
        """One command line, or None when it was refused (too long, bare LF)."""
        raw = self.s.readline(self.line_limit)
        if not raw.endswith(b"\n"):
            # Longer than line_length_limit: skip the rest of it, as Postfix's smtp_get.
            first = raw
            while not raw.endswith(b"\n"):
                raw = self.s.readline(self.line_limit)
            msg.warn(f"{self.client.client}: request longer than {self.line_limit}: "
                     f"{printable(SASL.redact(first.decode('latin-1')), 30)}...")
            self.count("unknown", False)
            self.last = "UNKNOWN"
            self.reply("500 5.5.2 Error: command not recognized")
            return None
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        else:
            raw = raw[:-1]
            if self.bare_lf in ("reject", "note"):
                msg.info(f"disconnect: bare <LF> received from {self.client.client} "
                         f"after {self.last}")
                self.reply(f"{self.cfg['smtpd_forbid_bare_newline_reject_code']} 5.5.2 "
                           "Error: bare <LF> received")
                if self.bare_lf == "reject":
                    raise Disconnect
                return None
        if not self.pipelining_ok and not self.pipelining_warned and self.s.pending():
            # Sending ahead without having seen PIPELINING: logged, as Postfix does.
            self.pipelining_warned = True
            self.ill_pipelining(self.last, raw[:4].lower() == b"auth")
        if self.cmd_filter is not None:
            return self.filter_command(self.decode_command(raw))
        return self.decode_command(raw)

    def filter_command(self, line: str | None) -> str | None:
        """smtpd_command_filter: the table's replacement of the line, logged as Postfix."""
        if line is None:
            return None
        try:
            new = self.cmd_filter.filter_command(line)
        except tables.TableError:
            table = self.cmd_filter.cmd_table
            msg.warn(f"{table.type}:{table.name} lookup error for \"{printable(line)}\"")
            self.local_data_error()
        if new is None:
            return line
        msg.info(f"{self.client.client}: replacing command \"{printable(line)}\" with "
                 f"\"{printable(new)}\"")
        return new

    def decode_command(self, raw: bytes) -> str | None:
        """The command line as text: UTF-8. With smtputf8_enable, malformed UTF-8 (up to a
        NUL, as Postfix's C string) is refused as Postfix does, to protect the queue file
        and the logs; without it, bytes that are not UTF-8 pass as surrogate escapes."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if self.smtputf8_enable:
            try:
                raw.split(b"\0", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                self.last = "UNKNOWN"
                self.count("unknown", False)
                self.reply("500 5.5.2 Error: bad UTF-8 syntax")
                return None
        return raw.decode("utf-8", "surrogateescape")

    def ill_pipelining(self, after: str, auth: bool = False) -> None:
        """Log improper pipelining, once, and remember it (reject_unauth_pipelining)."""
        self.client.ill_pipelining = True
        ahead = "..." if auth else \
            printable(SASL.redact(self.s.peek(60).decode("latin-1")))   # no credentials
        msg.info(f"improper command pipelining after {after} from "
                 f"{self.client.client}: {ahead}")

    def use_filters(self, filters: SF.ServerFilters) -> None:
        """The smtpd_* reject footers, command filter, EHLO keyword maps and forbidden
        commands of lib/server_filters (opened before the jail)."""
        self.footer, self.cmd_filter = filters.footer, filters.command_filter
        if filters.ehlo_maps is not None:
            self.ehlo_maps = filters
        self.non_smtp = filters.non_smtp

    def dispatch(self, line: str) -> bool:
        """Run one command; True when the session is over."""
        line = line.split("\x00", 1)[0]    # as Postfix's C strings: a NUL ends the line
        verb, _, arg = line.strip(" ").partition(" ")
        verb = verb.lower()
        if verb in self.noop_commands:
            # smtpd_noop_commands: 250 without any check or state change, not counted
            self.reply("250 2.0.0 Ok")
            self.junk += 1
            if self.junk > self.junk_limit:
                self.errors += 1
            return False
        handler = COMMANDS.get(verb)
        if handler is None and self.non_smtp(line.split(None, 1)[0] if line.split() else ""):
            # A web browser, a proxy probe or a mail header sent as commands.
            self.last = "UNKNOWN"
            self.count("unknown", False)
            msg.warn(f"non-SMTP command from {self.client.client}: "
                     f"{escape(line.encode('utf-8', 'surrogateescape'))[:100]}")
            self.reply("221 2.7.0 Error: I can break rules, too. Goodbye.")
            return True
        if self.access_denied and verb != "quit":
            self.last = verb.upper() if handler else "UNKNOWN"
            self.count(verb if handler else "unknown", False)
            self.reply(f"503 5.7.0 Error: access denied for {self.client.client}")
            return False
        if handler is None:
            self.last = "UNKNOWN"
            self.count("unknown", False)
            err = None
            if self.milters is not None:       # only a 4XX overrides, as Postfix
                err = self.milters.unknown_event(line)
                if err is not None and err[0] not in "4HDS5":
                    msg.warn(f"unexpected SMFIC_UNKNOWN response: {err}")
            self.reply(err if err is not None and err[0] == "4"
                       else "500 5.5.2 Error: command not recognized")
            return False
        self.last = verb.upper()
        if self.tls_required and not self.tls_active and verb not in PRE_TLS:
            self.count(verb, False)
            self.reply("530 5.7.0 Must issue a STARTTLS command first")
            return False
        if verb in JUNK:
            self.junk += 1
            if self.junk > self.junk_limit:
                self.errors += 1
        ok = handler(self, arg.strip(" "))
        self.count(verb, bool(ok))
        return verb == "quit"

    # --- commands ----------------------------------------------------------------------------
    def helo_cmd(self, arg: str, esmtp: bool = False) -> bool:
        if not arg:
            self.reply(f"501 Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return False
        name = arg.split(" ")[0] if esmtp else arg
        saved, self.client.helo = self.client.helo, name
        denied = self.checker.helo(self.client)
        if denied is not None:
            self.log_reject("EHLO" if esmtp else "HELO", denied)
            self.client.helo = saved
            self.reply(str(denied))
            return False
        self.reset()
        err = self.milter_event("EHLO" if esmtp else "HELO",
                                lambda m: m.helo_event(name))
        if err is not None and err.startswith("421"):
            return self.milter_refuse(err)
        self.helo = name
        self.client.helo = self.helo
        self.esmtp = esmtp
        if not esmtp:
            self.reply(f"250 {self.hostname}")
            return True
        if self.ehlo_unknown:
            msg.warn(f"don't know what EHLO features to announce to {self.client.client}")
            self.local_data_error()
        if self.discard_ehlo and "enhancedstatuscodes" not in self.discard_ehlo and \
                "silent-discard" not in self.discard_ehlo:
            words = SF.ehlo_mask_text(self.discard_ehlo)
            if words:
                msg.info(f"discarding EHLO keywords: {words}")
        self.pipelining_ok = True
        self.s.write(self.ehlo_reply())
        return True

    def ehlo_reply(self) -> bytes:
        """The whole EHLO reply. Apart from main.cf (SessionConfig) it depends on whether
        STARTTLS, AUTH (which mechanisms), XCLIENT, XFORWARD and REQUIRETLS are offered:
        it is made once for each combination of those and kept."""
        mechs = None
        if self.sasl_active() and not self.sasl_exempt:
            mechs = self.sasl.mechanisms(self.tls_active)
            mechs = tuple(mechs) if mechs else None
        key = (self.starttls_offered, mechs, tuple(X.ehlo_keywords(self)),
               self.requiretls_offered, self.discard_ehlo)
        reply = self.conf.ehlo.get(key)
        if reply is None:
            reply = self.conf.ehlo[key] = self._ehlo_reply(*key)
        return reply

    def _ehlo_reply(self, starttls: bool, mechs: tuple | None, x_keywords: tuple,
                    requiretls: bool, discard: frozenset) -> bytes:
        lines = [self.hostname, "PIPELINING"]
        lines.append(f"SIZE {self.size_limit}" if self.size_limit else "SIZE")
        if not self.cfg["disable_vrfy_command"]:
            lines.append("VRFY")
        lines.append("ETRN")
        if starttls:
            lines.append("STARTTLS")
        if mechs:
            lines.append("AUTH " + " ".join(mechs))
        lines += x_keywords
        # after 8BITMIME, in Postfix's order
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN"] + ["SMTPUTF8"] * \
            self.smtputf8_enable + ["CHUNKING"] + ["REQUIRETLS"] * requiretls
        lines = [lines[0]] + [k for k in lines[1:]
                              if k.split()[0].lower() not in discard]
        return b"".join(reply_bytes(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
                        for i, text in enumerate(lines))

    @property
    def requiretls_offered(self) -> bool:
        """REQUIRETLS (RFC 8689): only inside TLS, as Postfix."""
        return self.tls_active and self.cfg["requiretls_enable"] and \
            "requiretls" not in self.discard_ehlo

    @property
    def smtputf8_offered(self) -> bool:
        return self.smtputf8_enable and "smtputf8" not in self.discard_ehlo

    def smtputf8_check(self, addr: str, requested: bool) -> bool:
        """strict_smtputf8: a non-ASCII address needs MAIL FROM ... SMTPUTF8 (Postfix's
        553); otherwise the address is taken, as Postfix always took 8-bit local parts."""
        if addr and not requested and not addr.isascii() and self.cfg["strict_smtputf8"]:
            self.reply("553 5.6.7 Must declare SMTPUTF8 to send unicode address")
            return False
        return True

    # --- DSN (RFC 3461) parameters, as Postfix's mail_cmd and rcpt_cmd --------------------
    def _dsn_disabled(self) -> bool:
        if "dsn" in self.discard_ehlo:
            self.reply("501 5.7.1 DSN support is disabled")
            return True
        return False

    def mail_dsn_param(self, name: str, value: str) -> bool:
        """RET= or ENVID= of MAIL FROM (once each), kept in _dsn_mail until MAIL is ok."""
        if self._dsn_disabled():
            return False
        ret, envid = self._dsn_mail
        if name == "RET":
            ret = "" if ret else DSN.ret_code(value)
            if not ret:
                self.reply("501 5.5.4 Bad RET parameter syntax")
                return False
        else:
            envid = "" if envid else DSN.envid(value)
            if not envid:
                self.reply("501 5.5.4 Bad ENVID parameter syntax")
                return False
        self._dsn_mail = (ret, envid)
        return True

    def rcpt_dsn_params(self, params: list[str]) -> tuple[str, str] | None:
        """NOTIFY= and ORCPT= of RCPT TO as (notify, orcpt); None after the reply."""
        notify = orcpt = ""
        for p in params:
            name, _, value = p.partition("=")
            name = name.upper()
            if name in ("NOTIFY", "ORCPT") and "=" in p:
                if self._dsn_disabled():
                    return None
                if name == "NOTIFY":
                    notify = "" if notify else DSN.notify_mask(value)
                    if not notify:
                        self.reply("501 5.5.4 Error: Bad NOTIFY parameter syntax")
                        return None
                else:
                    orcpt = "" if orcpt else DSN.orcpt(value)
                    if not orcpt:
                        self.reply("501 5.5.4 Error: Bad ORCPT parameter syntax")
                        return None
            else:
                self.reply(f"555 5.5.4 Unsupported option: {printable(p)}")
                return None
        return notify, orcpt

    def ehlo_cmd(self, arg: str) -> bool:
        return self.helo_cmd(arg, esmtp=True)

    def starttls_cmd(self, arg: str) -> bool:
        if arg:
            self.reply("501 5.5.4 Syntax: STARTTLS")
            return False
        if self.tls_active:
            self.reply("554 5.5.1 Error: TLS already active")
            return False
        if self.level == "none" or self.wrapper:
            self.reply("502 5.5.1 Error: command not implemented")
            return False
        if self.tls is None:
            self.reply("454 4.7.0 TLS not available due to local problem")
            return False
        if not self.limits.starttls(self.reply):
            return False
        self.reply("220 2.0.0 Ready to start TLS")
        self.s.flush()
        # Whatever the client sent after STARTTLS came in plain text: never act on it.
        discarded = self.s.purge()
        if discarded:
            msg.verbose(1, f"discarding {discarded} bytes of pipelined input after STARTTLS")
        if not self.start_tls():
            raise Disconnect
        self.helo = None
        self.client.helo = None
        self.esmtp = False
        self.pipelining_ok = False
        self.client.sasl_username = None      # RFC 3207: forget AUTH as well
        self.sasl_method = None
        self.reset()
        return True

    def start_tls(self) -> bool:
        """Run the server handshake; log as Postfix does; False when it failed."""
        try:
            self.tls_info = self.tls.handshake(self.s, self.client)
        except TLSFailure as exc:
            msg.warn(f"TLS library problem: SSL_accept error from {self.client.client}: "
                     f"{exc.reason}")
            msg.info(f"SSL_accept error from {self.client.client}: {exc.reason}")
            msg.info(f"lost connection after {self.last} from {self.client.client}")
            return False
        self.tls_active = True
        if not self.limits.newtls(self.reply, self.tls_info.session_reused):
            return False
        return True

    def auth_cmd(self, arg: str) -> bool:
        """AUTH mechanism [initial-response], as Postfix's smtpd_sasl_auth_cmd."""
        if not self.limits.auth(self.reply):
            return False
        if self.cfg["smtpd_helo_required"] and not self.helo:
            self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return False
        if not self.sasl_active():
            self.reply("503 5.5.1 Error: authentication not enabled")
            return False
        if self.sender is not None:
            self.reply("503 5.5.1 Error: MAIL transaction in progress")
            return False
        if self.client.sasl_username:
            self.reply("503 5.5.1 Error: already authenticated")
            return False
        words = arg.split()
        if not 1 <= len(words) <= 2:
            self.reply("501 5.5.4 Syntax: AUTH mechanism")
            return False
        mech = printable(words[0])
        step = self.sasl.first(words[0], words[1] if len(words) == 2 else None,
                               self.tls_active)
        limit = self.cfg["smtpd_sasl_response_limit"]
        while step.status == SASL.MORE:
            self.reply(f"334 {step.data}")
            self.s.flush()
            raw = self.s.readline(limit + 2)
            if not raw.endswith(b"\n"):
                while not raw.endswith(b"\n"):
                    raw = self.s.readline(limit + 2)
                msg.warn(f"{self.client.client}: SASL {mech} response longer than {limit}")
                self.reply("500 5.5.6 Authentication exchange line is too long")
                self.sasl.next("*")   # abandons the exchange; never a valid response
                return False
            line = raw.rstrip(b"\r\n").decode("latin-1")
            if line == "*":
                msg.warn(f"{self.client.client}: SASL {mech} authentication aborted")
                self.reply("501 5.7.0 Authentication aborted")
                return False
            step = self.sasl.next(line)
        if step.status != SASL.DONE:
            metrics.smtpd_auth(mech, False)
            reason = step.data or SASL.REASON_UNAVAILABLE
            msg.warn(f"{self.client.client}: SASL {mech} authentication failed: {reason}, "
                     f"sasl_username={self.sasl.username or '(unavailable)'}")
            if step.status == SASL.TEMP:
                self.reply(f"454 4.7.0 Temporary authentication failure: {reason}")
            else:
                self.reply(f"535 5.7.8 Error: authentication failed: {reason}")
            return False
        self.reply("235 2.7.0 Authentication successful")
        metrics.smtpd_auth(mech, True)
        self.client.sasl_username = self.sasl.username
        self.sasl_method = mech.upper()
        return True

    def mail_cmd(self, arg: str) -> bool:
        if self.cfg["smtpd_helo_required"] and not self.helo:
            self.reply("503 5.5.1 Error: send HELO/EHLO first")
            return False
        if self.sender is not None:
            self.reply("503 5.5.1 Error: nested MAIL command")
            return False
        if self.after_bdat("MAIL"):
            return False
        parsed = parse_path(arg, "FROM:", self.cfg["strict_rfc821_envelopes"])
        if parsed is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return False
        if not self.limits.mail(self.reply):
            return False
        addr, params = parsed
        if addr != "bad":
            addr = strip_route(addr)
        # SMTPUTF8 decides the address syntax: taken before the address, as Postfix does
        utf8 = self.smtputf8_offered and any(p.upper() == "SMTPUTF8" for p in params)
        if addr == "bad" or (addr and not valid_address(addr, utf8)):
            msg.warn(f"Illegal address syntax from {self.client.client} in MAIL command: "
                     f"{printable(arg[5:].strip())}")
            self.reply("501 5.1.7 Bad sender address syntax")
            return False
        size, self._dsn_mail = 0, ("", "")
        requiretls = False
        for p in params:
            name, _, value = p.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    self.reply("501 5.5.4 Bad message size syntax")
                    return False
                size = int(value)
            elif name == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif name == "SMTPUTF8" and utf8 and not value:
                pass
            elif name == "REQUIRETLS" and "=" not in p and self.requiretls_offered:
                requiretls = True
            elif name in ("RET", "ENVID") and "=" in p:
                if not self.mail_dsn_param(name, value):
                    return False
            elif name == "AUTH" and value:
                if self.sasl_active() and value != "<>":
                    self.sasl_sender = printable(value)   # RFC 4954 section 5, as Postfix
            else:
                self.reply(f"555 5.5.4 Unsupported option: {printable(p)}")
                return False
        if self.size_limit and size > self.size_limit:
            self.client.sender = addr
            self.log_reject("MAIL", "552 5.3.4 Message size exceeds fixed limit")
            self.client.sender = None
            self.reply("552 5.3.4 Message size exceeds fixed limit")
            return False
        minfree = self.cfg["queue_minfree"]
        try:
            free = Q.free_space(self.queue_root)
        except OSError:
            free = None
        if free is not None and (free < minfree or free < 1.5 * size):
            msg.warn(f"not enough free space in mail queue: {free} bytes < "
                     f"{max(minfree, int(1.5 * size))} bytes")
            self.reply("452 4.3.1 Insufficient system storage")
            return False
        if not self.smtputf8_check(addr, utf8):
            return False
        if not self.stand_alone:
            addr = self._own_probe_sender(addr) or addr
        self.client.sender = addr
        self.msg_size = size
        denied = self.checker.mail(self.client)
        if denied is not None:
            self.log_reject("MAIL", denied)
            self.reset()
            self.reply(str(denied))
            return False
        if self.milters is not None:
            self.milter_abort = True
            err = self.milter_event("MAIL", lambda m: m.mail_event([f"<{addr}>"] + params))
            if err is not None:
                self.reset()
                return self.milter_refuse(err)
        self.sender = addr
        self.smtputf8 = utf8
        self.requiretls = requiretls
        self.dsn_ret, self.dsn_envid = self._dsn_mail
        # as Postfix's mail_cmd: one instance per transaction, after the checks
        now = time.time()
        self.instance = f"{msg.pid():x}.{int(now):x}.{int(now % 1 * 1e6):x}.{self.seqno:x}"
        self.seqno += 1
        self.reply("250 2.1.0 Ok")
        return True

    def _own_probe_sender(self, addr: str) -> str | None:
        """This site's address verification sender, time stamp removed, when addr is
        one (lib/verify_client.ProbeSender.valid): as Postfix's smtpd, MAIL FROM takes
        it in that form and RCPT TO skips the restrictions for it, so that two sites'
        probes of each other cannot cache each other as undeliverable."""
        return self.conf.probe_sender.valid(addr, time.time())

    def rcpt_cmd(self, arg: str) -> bool:
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
            return False
        if self.after_bdat("RCPT"):
            return False
        parsed = parse_path(arg, "TO:", self.cfg["strict_rfc821_envelopes"])
        if parsed is None or parsed[0] == "":
            if parsed is not None:
                msg.warn(f"Illegal address syntax from {self.client.client} in RCPT "
                         f"command: <>")
                self.reply("501 5.1.3 Bad recipient address syntax")
                return False
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return False
        if not self.limits.rcpt(self.reply):
            return False
        addr, params = parsed
        if addr != "bad":
            addr = strip_route(addr)
        if addr == "bad" or not valid_address(addr, self.smtputf8):
            msg.warn(f"Illegal address syntax from {self.client.client} in RCPT command: "
                     f"{printable(arg[3:].strip())}")
            self.reply("501 5.1.3 Bad recipient address syntax")
            return False
        rcpt_dsn = self.rcpt_dsn_params(params)
        if rcpt_dsn is None:
            return False
        if len(self.rcpts) >= self.rcpt_limit:
            # Past smtpd_recipient_limit: 452, which counts as an error only once the
            # client overshoots by more than smtpd_recipient_overshoot_limit (smtpd.c).
            self.rcpt_overshoot += 1
            within = self.rcpt_overshoot <= self.overshoot_limit
            self.reply("452 4.5.3 Error: too many recipients", error=not within)
            return within
        if not self.smtputf8_check(addr, self.smtputf8):
            return False
        own = None if self.stand_alone else self._own_probe_sender(addr)
        if own:
            addr, verdict = own, None
        else:
            verdict = self.checker.rcpt(self.client, addr)
        if verdict is not None:
            self.log_reject("RCPT", verdict, addr)
            self.reply(str(verdict))
            return False
        if self.milters is not None:
            self.milter_rcpt = addr
            err = self.milter_event("RCPT", lambda m: m.rcpt_event([f"<{addr}>"] + params),
                                    addr)
            self.milter_rcpt = None
            if err is not None:
                return self.milter_refuse(err)
        if self.writer is None and not self.open_envelope():
            return False
        try:
            self.writer.add_recipient(addr, *rcpt_dsn)
        except OSError as exc:
            return self.queue_trouble(exc)
        self.rcpts.append(addr)
        self.reply("250 2.1.5 Ok")
        return True

    def new_cleanup(self, **kw) -> cleanup.Cleanup:
        """The cleanup stage (lib/cleanup.py) that writes this message's queue file."""
        if self.cleanup_settings is None:
            self.cleanup_settings = cleanup.Settings(self.cfg)
        if self.milters is not None:
            kw.setdefault("milters", self.milters)
        return cleanup.Cleanup(self.cleanup_settings, self.queue_root,
                               origin=self.client.client, proto=self.protocol(),
                               helo=self.helo or "",
                               # local_header_rewrite_clients (smtpd/check.py)
                               header_rewrite=self.checker.header_rewrite_context(self.client),
                               **kw)

    def open_queue_file(self) -> bool:
        """Create the queue file at the first good recipient, as Postfix does."""
        # Flow control: pause when the queue manager falls behind (Postfix's cleanup
        # waits for a token at the same point, when smtpd connects to it).
        mail_flow.wait(self.cfg["in_flow_delay"])
        try:
            self.writer = self.new_cleanup()
            w = self.writer
            w.add_attr("client_name", self.client.name)
            w.add_attr("client_address", self.client.addr)
            if self.helo:
                w.add_attr("helo_name", self.helo)
            w.add_attr("protocol", self.protocol())
            if self.client.sasl_username:
                w.add_attr("sasl_method", self.sasl_method or "")
                w.add_attr("sasl_username", self.client.sasl_username)
            if self.sasl_sender:
                w.add_attr("sasl_sender", self.sasl_sender)
            X.queue_attrs(self, w)
            w.set_sender(self.sender)
        except OSError as exc:
            self.writer = None
            return self.queue_trouble(exc)
        sasl = ""
        if self.client.sasl_username:
            sasl = (f", sasl_method={self.sasl_method}, "
                    f"sasl_username={self.client.sasl_username}")
        if self.sasl_sender:
            sasl += f", sasl_sender={self.sasl_sender}"
        sasl += X.log_suffix(self)
        msg.info(f"{self.writer.id}: client={self.client.client}{sasl}")
        metrics.smtpd_message(self.sasl_method if self.client.sasl_username else None)
        return True

    def open_envelope(self) -> bool:
        """The queue file, with the envelope's extension attributes after the client's:
        smtputf8=1 for MAIL FROM ... SMTPUTF8 (Postfix's SMTPUTF8_FLAG_REQUESTED)."""
        if not self.open_queue_file():
            return False
        try:
            if self.smtputf8:
                self.writer.add_attr("smtputf8", "1")
            if self.requiretls:
                self.writer.add_attr("requiretls", "1")
            if self.dsn_ret:
                self.writer.add_attr("dsn_ret", self.dsn_ret)
            if self.dsn_envid:
                self.writer.add_attr("dsn_envid", self.dsn_envid)
        except OSError as exc:
            return self.queue_trouble(exc)
        return True

    def queue_trouble(self, exc: OSError) -> bool:
        """Answer a queue file system error; the transaction goes on without a file."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            msg.warn(f"queue file write error: {exc.strerror}")
            self.reply("452 4.3.1 Insufficient system storage")
        else:
            msg.warn(f"queue file write error: {exc.strerror or exc}")
            self.reply("451 4.3.0 Error: queue file write error")
        return False

    def received_header(self) -> bytes:
        """Postfix's Received: header for this message."""
        c = self.client
        lines = [f"Received: from {self.helo or c.name} ({c.name} [{c.addr}])"]
        if self.tls_active and self.tls_info is not None and self.tls.received_header:
            lines += self.tls.received_lines(self.tls_info)
        if self.cfg["smtpd_sasl_authenticated_header"] and c.sasl_username:
            lines.append(f"\t(Authenticated sender: {comment_text(c.sasl_username)})")
        lines.append(f"\tby {self.hostname} ({self.cfg.get('mail_name')}) with "
                     f"{self.protocol()} id {self.writer.id}")
        date = time.strftime("%a, %d %b %Y %H:%M:%S %z (%Z)")
        if len(self.rcpts) == 1:
            lines.append(f"\tfor <{self.rcpts[0]}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")

    def data_cmd(self, arg: str) -> bool:
        if self.after_bdat("DATA"):
            return False
        if arg:
            self.reply("501 5.5.4 Syntax: DATA")
            return False
        if self.sender is None:
            self.reply("503 5.5.1 Error: need RCPT command")
            return False
        if not self.rcpts:
            self.reply("554 5.5.1 Error: no valid recipients")
            return False
        if not self.client.ill_pipelining and self.s.pending():
            # Content sent before 354: as Postfix's check after a "last" command
            self.pipelining_warned = True
            self.ill_pipelining("DATA")
        denied = self.checker.data(self.client, self._only_rcpt())
        if denied is not None:
            self.log_reject("DATA", denied, self._only_rcpt())
            self.reply(str(denied))
            return False
        err = self.milter_event("DATA", lambda m: m.data_event(), self._only_rcpt())
        if err is not None:
            return self.milter_refuse(err)
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        self.s.flush()
        with self.content_deadline():
            result = self.read_content(self.start_content())
        self.data_bytes = None
        return result

    @contextlib.contextmanager
    def content_deadline(self):
        """smtpd_per_request_deadline: the content of one DATA or BDAT request must come
        within smtpd_timeout, extended by smtpd_min_data_rate per byte (a trickling
        client is cut off); without it, each line has smtpd_timeout of its own."""
        if not self.cfg["smtpd_per_request_deadline"]:
            yield
            return
        self.s.request_deadline(self.cfg["smtpd_min_data_rate"])
        try:
            yield
        finally:
            self.s.request_deadline(None)

    def start_content(self) -> OSError | None:
        """The lines smtpd puts before the client's content: access PREPEND headers, then
        the Received: header, as Postfix's smtpd; the write error, if any."""
        try:
            self.writer.write("".join(h + "\n" for h in self.client.prepend)
                              .encode("utf-8", "surrogateescape") + self.received_header())
        except OSError as exc:
            return exc
        return None

    def _only_rcpt(self) -> str | None:
        """The recipient the DATA and end-of-data checks log: only when there is one."""
        return self.rcpts[0] if len(self.rcpts) == 1 else None

    def read_content(self, problem: OSError | None) -> bool:
        """Stream DATA to the queue file until <CR><LF>.<CR><LF>; reply; True if queued."""
        strict_end = self.bare_lf != "no"
        at_start = True          # this chunk begins a line
        prev_crlf = True         # the previous line ended in CRLF (or DATA just began)
        size, too_big, bare_lf_seen = 0, False, False
        self.data_bytes = 0
        writer = self.writer
        while True:
            if at_start and prev_crlf:
                # The content in bulk, at C speed: whole CRLF lines, with the result of
                # the line by line loop below (which takes whatever else comes). The
                # headers are the cleanup stage's business (header_size_limit,
                # hopcount_limit, header_checks): it takes content in pieces of any size.
                raw = self.s.buffered_lines(self.line_limit)
                lf = raw.replace(b"\r\n", b"\n")
                crlfs = len(raw) - len(lf)
                if raw.count(b"\n") != crlfs or (
                        len(lf) >= self.line_limit - 1 and
                        long_line(lf, self.line_limit - 1)):
                    raw = raw[:crlf_prefix(raw, self.line_limit)]   # a bare LF, a long line
                    lf = raw.replace(b"\r\n", b"\n")
                    crlfs = len(raw) - len(lf)
                # every LF of raw (and of lf) now ends a CRLF: there are crlfs of them
                if raw:
                    if lf.startswith(b".\n"):
                        stop = 0
                    else:
                        stop = lf.find(b"\n.\n")
                        stop = stop + 1 if stop >= 0 else -1
                    part = lf if stop < 0 else lf[:stop]
                    # On the wire each line had a CR more, and the end was ".\r\n":
                    # part's lines are all of them but those from the end line on.
                    used = len(raw) if stop < 0 else \
                        len(part) + crlfs - lf.count(b"\n", stop) + 3
                    self.s.consume(used)
                    self.data_bytes += used
                    if part:
                        if part.startswith(b".") or b"\n." in part:
                            part = (b"\n" + part).replace(b"\n.", b"\n")[1:]
                        size += len(part)
                        if self.size_limit and size > self.size_limit:
                            too_big = True
                        elif problem is None:
                            try:
                                writer.write(part)
                            except OSError as exc:
                                problem = exc
                    if stop >= 0:
                        break
                    continue
            chunk = self.s.readline(self.line_limit)
            self.data_bytes += len(chunk)
            if chunk.endswith(b"\r\n"):
                body, term = chunk[:-2], "crlf"
            elif chunk.endswith(b"\n"):
                body, term = chunk[:-1], "lf"
            else:
                body, term = chunk, None
            if at_start and term and body == b".":
                if term == "crlf" and prev_crlf or not strict_end:
                    break
            if term == "lf":
                bare_lf_seen = True
                if self.bare_lf in ("reject", "note"):
                    msg.info(f"disconnect: bare <LF> received from {self.client.client} "
                             f"after DATA")
                    self.reply(f"{self.cfg['smtpd_forbid_bare_newline_reject_code']} 5.5.2 "
                               "Error: bare <LF> received")
                    if writer:
                        writer.abort()
                    self.writer = None
                    self.reset()
                    if self.bare_lf == "reject":
                        raise Disconnect
                    # note: reply now, but keep reading to the end of this message
                    self._discard_to_end()
                    return False
            if at_start and body.startswith(b"."):
                body = body[1:]
            data = body + b"\n" if term else body
            size += len(data)
            if self.size_limit and size > self.size_limit:
                too_big = True
            elif problem is None:
                try:
                    writer.write(data)
                except OSError as exc:
                    problem = exc
            at_start = term is not None
            if term:
                prev_crlf = term == "crlf"
        self.last = "END-OF-MESSAGE"
        if bare_lf_seen and self.bare_lf == "normalize":
            msg.verbose(1, f"bare <LF> in message from {self.client.client}: normalized")
        return self.end_of_message(too_big, problem)

    def _discard_to_end(self) -> None:
        """Read and drop message content through the end-of-data line."""
        prev_crlf, at_start = True, True
        while True:
            chunk = self.s.readline(self.line_limit)
            if at_start and chunk == b".\r\n" and prev_crlf:
                return
            at_start = chunk.endswith(b"\n")
            if at_start:
                prev_crlf = chunk.endswith(b"\r\n")

    # --- CHUNKING (RFC 3030), as Postfix's bdat_cmd ---------------------------------------
    def after_bdat(self, verb: str) -> bool:
        """MAIL, RCPT and DATA are refused once BDAT began, until the end or RSET."""
        if self.bdat is None:
            return False
        self.reply(f"503 5.5.1 Error: {verb} after BDAT")
        return True

    def bdat_cmd(self, arg: str) -> bool:
        """BDAT size [LAST]: exactly size bytes of content follow the command line."""
        qid = self.writer.id if self.writer else "NOQUEUE"
        if "chunking" in self.discard_ehlo:
            # the content that follows would be read as commands: hang up (521)
            self.reply("521 5.5.1 Error: command not implemented")
            raise Disconnect
        words = arg.split(" ")
        if not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit()) \
                or len(words[0]) > 18 or (len(words) == 2 and words[1].upper() != "LAST"):
            msg.warn(f"{qid}: malformed BDAT command syntax from {self.client.client}: "
                     f"{printable('BDAT ' + arg)}")
            self.reply("521 5.5.4 Syntax: BDAT count [LAST]")
            raise Disconnect
        size, last = int(words[0]), len(words) == 2
        if size == 0 and not last:
            msg.warn(f"{qid}: null BDAT request from {self.client.client}")
            return self.skip_bdat(size, last, "551 5.7.1 Null BDAT request")
        if self.bdat == "error":
            return self.skip_bdat(size, last,
                                  f"551 5.0.0 Discarded {size} bytes after earlier error")
        if self.bdat is None:
            # the first chunk is the DATA command of this transaction
            if not self.rcpts:
                return self.skip_bdat(size, last, "554 5.5.1 Error: no valid recipients"
                                      if self.sender is not None else
                                      "503 5.5.1 Error: need RCPT command")
            denied = self.checker.data(self.client, self._only_rcpt())
            if denied is not None:
                self.log_reject("DATA", denied, self._only_rcpt())
                return self.skip_bdat(size, last, str(denied))
            err = self.milter_event("DATA", lambda m: m.data_event(), self._only_rcpt())
            if err is not None:
                return self.skip_bdat(size, last, err)
        if self.size_limit and (self.data_bytes or 0) > self.size_limit - size:
            msg.warn(f"{qid}: BDAT request from {self.client.client} exceeds message "
                     f"size limit")
            return self.skip_bdat(size, last, "552 5.3.4 Chunk exceeds message size limit")
        if self.bdat is None:
            self.bdat, self.data_bytes = "ok", 0
            self.bdat_sink = ContentSink(self.writer, self.cfg)
            self.bdat_sink.problem = self.start_content()
        with self.content_deadline():
            self.read_chunk(size, self.bdat_sink)
        if last:
            return self.end_of_bdat()
        if self.bdat_sink.problem is not None:
            # as Postfix: the error now, and the chunks that follow are discarded
            self.end_of_bdat()
            self.bdat = "error"
            return False
        self.reply(f"250 2.0.0 Ok: {size} bytes")
        return True

    def read_chunk(self, size: int, sink: ContentSink) -> None:
        """Read size bytes of content into the sink: CRLF becomes LF (a CR at the end of a
        read waits for the next byte), nothing else changes: no dot-unstuffing in BDAT."""
        left = size
        while left > 0:
            data = self.s.read_some(min(left, 1 << 20))
            left -= len(data)
            self.data_bytes += len(data)
            data = self.bdat_cr + data
            self.bdat_cr = b""
            if data.endswith(b"\r"):
                self.bdat_cr, data = b"\r", data[:-1]
            if b"\n" in data:
                if self.bare_lf in ("reject", "note") and \
                        data.count(b"\n") != data.count(b"\r\n"):
                    self.bdat_bare_lf = True
                data = data.replace(b"\r\n", b"\n")
            sink.write(data)

    def end_of_bdat(self) -> bool:
        """BDAT LAST (or a failed chunk): answer for the message, as the end of DATA."""
        sink = self.bdat_sink
        if self.bdat_cr:
            sink.write(self.bdat_cr)        # a CR at the very end stays a CR
        self.bdat_cr = b""
        self.last = "END-OF-MESSAGE"
        if self.bdat_bare_lf:
            self.bdat_bare_lf = False
            reply = (f"{self.cfg['smtpd_forbid_bare_newline_reject_code']} 5.5.2 "
                     "Error: bare <LF> received")
            self.log_reject("END-OF-MESSAGE", reply)
            self.reset()
            self.reply(reply)
            return False
        return self.end_of_message(sink.too_big, sink.problem)

    def end_of_message(self, too_big: bool, problem: OSError | None) -> bool:
        """The end of the content, of DATA or of BDAT LAST: the size limit, a write error,
        smtpd_end_of_data_restrictions, then the cleanup stage's verdict and the reply."""
        if too_big:
            reply = "552 5.3.4 Message size exceeds fixed limit"
            self.log_reject("END-OF-MESSAGE", reply)
            self.reset()
            self.reply(reply)
            return False
        if problem is not None:
            ok = self.queue_trouble(problem)
            self.reset()
            return ok
        denied = self.checker.end_of_data(self.client, self._only_rcpt())
        if denied is not None:
            self.log_reject("END-OF-MESSAGE", denied, self._only_rcpt())
            self.reset()        # the queue file is discarded, as Postfix's mail_reset
            self.reply(str(denied))
            return False
        if self.milter_hold:            # a milter's HOLD or DISCARD before the content
            self.writer.hold = True
        if self.milter_discard:
            self.writer.discard = True
        try:
            result = self.writer.finish()
        except OSError as exc:
            ok = self.queue_trouble(exc)
            self.reset()
            return ok
        self.writer = None
        self.reset()
        if result.reply:        # rejected or deferred by the cleanup stage (it logged why)
            return self.milter_refuse(result.reply)
        qid = result.queue_id   # queued, held, or discarded: the client is told "queued"
        self.reply(f"250 2.0.0 Ok: queued as {qid}")
        self.s.flush()
        Q.wake(self.queue_root)
        return True

    def skip_bdat(self, size: int, last: bool, reply: str) -> bool:
        """Read and drop a chunk, then answer; the transaction ends with LAST, otherwise
        the chunks that follow are dropped too (Postfix's skip_bdat)."""
        left = size
        while left > 0:
            left -= len(self.s.read_some(min(left, 1 << 20)))
        self.reply(reply)
        if last:
            self.reset()
        else:
            self.bdat = "error"
        return False

    def rset_cmd(self, arg: str) -> bool:
        if arg:
            self.reply("501 5.5.4 Syntax: RSET")
            return False
        self.reset()
        self.reply("250 2.0.0 Ok")
        return True

    def noop_cmd(self, arg: str) -> bool:
        self.reply("250 2.0.0 Ok")
        return True

    def vrfy_cmd(self, arg: str) -> bool:
        if self.cfg["disable_vrfy_command"]:
            self.reply("502 5.5.1 VRFY command is disabled")
            return False
        words = arg.split()
        utf8 = self.smtputf8_offered and words[-1:] != [] and words[-1].upper() == "SMTPUTF8"
        if utf8:                        # VRFY address SMTPUTF8 (RFC 6531)
            words.pop()
            arg = arg.rsplit(None, 1)[0] if words else ""
        if not words:
            self.reply("501 5.5.4 Syntax: VRFY address" +
                       " [SMTPUTF8]" * self.smtputf8_enable)
            return False
        addr = arg.strip("<>")
        if not valid_address(addr, utf8):
            self.reply("501 5.1.3 Bad recipient address syntax")
            return False
        # As Postfix's vrfy_cmd: the RCPT restrictions and recipient validation decide
        # (an unknown user gets the 550 that RCPT TO would), then 252 with the argument.
        verdict: Reply | None = self.checker.rcpt(self.client, addr)
        if verdict is not None:
            self.log_reject("VRFY", verdict, addr)
            self.reply(str(verdict))
            return False
        self.reply(f"252 2.0.0 {arg.strip()}")
        return True

    def etrn_cmd(self, arg: str) -> bool:
        """ETRN domain (RFC 1985): the deferred mail of a fast_flush_domains site goes out
        now (lib/flush.py); replies and log lines are Postfix 3.7's etrn_cmd."""
        if self.cfg["smtpd_helo_required"] and not self.helo:
            self.reply("503 Error: send HELO/EHLO first")
            return False
        if self.sender is not None:
            self.reply("503 Error: MAIL transaction in progress")
            return False
        words = arg.split()
        if len(words) != 1:
            self.reply("500 Syntax: ETRN domain")
            return False
        domain = words[0][1:] if words[0][:1] in ("@", "#") else words[0]
        if not (domain.isascii() and _DOMAIN.fullmatch(domain)) or len(domain) > 255:
            self.reply("501 Error: invalid parameter syntax")
            return False
        if self.stand_alone:
            msg.warn('do not use ETRN in "sendmail -bs" mode')
            self.reply("458 Unable to queue messages")
            return False
        try:
            denied = self.checker.etrn(self.client, domain)
            allowed = denied is None and self.checker.flush_allowed(domain)
        except tables.TableError as exc:
            msg.warn(f"fast_flush_domains: table lookup problem: {exc}")
            msg.warn("unable to talk to fast flush service")
            self.reply("458 Unable to queue messages")
            return False
        if denied is not None:
            self.log_reject("ETRN", denied)
            self.reply(str(denied))
            return False
        if not allowed:
            msg.warn(f"reject: ETRN {domain[:100]}... from {self.client.client}")
            self.reply(f"459 <{domain}>: service unavailable")
            return False
        try:
            flush.flush_site(self.queue_root, domain)
        except OSError as exc:
            msg.warn(f"flush {domain}: {exc.strerror or exc}")
            msg.warn("unable to talk to fast flush service")
            self.reply("458 Unable to queue messages")
            return False
        self.reply("250 Queuing started")
        return True

    def quit_cmd(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return True


COMMANDS = {
    "helo": Session.helo_cmd, "ehlo": Session.ehlo_cmd, "starttls": Session.starttls_cmd,
    "auth": Session.auth_cmd, "mail": Session.mail_cmd, "rcpt": Session.rcpt_cmd,
    "data": Session.data_cmd, "bdat": Session.bdat_cmd, "rset": Session.rset_cmd,
    "noop": Session.noop_cmd, "vrfy": Session.vrfy_cmd, "etrn": Session.etrn_cmd,
    "quit": Session.quit_cmd,
}
COMMANDS["xclient"], COMMANDS["xforward"] = X.xclient_cmd, X.xforward_cmd
PRE_TLS = {"helo", "ehlo", "xclient", "starttls", "noop", "quit", "rset"}
JUNK = {"noop", "vrfy", "etrn", "rset"}
