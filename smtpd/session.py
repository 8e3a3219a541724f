"""The ESMTP session of smtpd: one client, from greeting to QUIT, as Postfix's smtpd.c.

A Session reads commands and message content through an SmtpStream (lib/smtpio.py) and
writes replies to it; it knows nothing of accept, fork or chroot. Verbs dispatch through
one table with their flags, as Postfix's smtpd_cmd_table. Replies, reply codes and log
lines are Postfix 3.7's.

PROTOCOL
    HELO, EHLO (PIPELINING, SIZE, VRFY, ETRN-less, STARTTLS, AUTH, ENHANCEDSTATUSCODES,
    8BITMIME), MAIL (SIZE, BODY, AUTH), RCPT, DATA, RSET, NOOP, QUIT, VRFY
    (disable_vrfy_command), STARTTLS and TLS wrapper mode, AUTH (smtpd/sasl.py; offered
    only over TLS with smtpd_tls_auth_only = yes or enforced TLS, as Postfix). The queue
    file is created at the first accepted recipient, as Postfix does
    (smtpd_delay_open_until_valid_rcpt), and committed with fsync before
    `250 2.0.0 Ok: queued as ID`. The restriction lists (smtpd/check.py) run at their
    stages: connect (the reject replaces the 220 greeting, and every later command but
    QUIT gets `503 5.7.0 Error: access denied for host[addr]`), HELO/EHLO and MAIL with
    smtpd_delay_reject = no, RCPT, DATA (before 354) and the end of data (before the
    commit; the queue file is discarded on a reject). Commands in smtpd_noop_commands
    get `250 2.0.0 Ok` and nothing else. Recipients past smtpd_recipient_limit get
    `452 4.5.3 Error: too many recipients`, an error only past
    smtpd_recipient_overshoot_limit. A header longer than header_size_limit loses the
    excess (its further continuation lines), as Postfix's cleanup; the mail is accepted.

SECURITY
    STARTTLS discards every byte the client sent before the handshake (CVE-2011-0411) and
    forgets HELO, MAIL and RCPT. DATA ends only at <CR><LF>.<CR><LF> unless
    smtpd_forbid_bare_newline = no, so one message cannot be smuggled into two
    (CVE-2023-51764). Every input is bounded: command lines by line_length_limit, messages
    by message_size_limit while they stream to disk, errors by the error limits. An
    address with a NUL or another control character is refused in every mode (501
    5.1.7 / 5.1.3); a NUL ends a command line, as in Postfix's C strings. SASL
    responses are never logged, nor the arguments of a pipelined AUTH command; a failed
    AUTH counts as an error (smtpd_error_sleep_time past smtpd_soft_error_limit).
"""

from __future__ import annotations

import errno
import re
import time

from ..lib import msg, tables
from ..lib import queue as Q
from ..lib.smtpio import StreamEOF, StreamTimeout, TLSFailure, crlf_prefix
from . import sasl as SASL
from .check import ClientState, Reply
from .limits import NO_LIMITS

# verb -> (method, flags). Flags: "junk" counts against smtpd_junk_command_limit;
# "pretls" is allowed before STARTTLS when TLS is enforced.
VERB_ORDER = ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "rset", "noop",
              "vrfy", "etrn", "quit", "unknown")
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
_LOCAL_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")
_QUOTED = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"$')
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9.:-]+\])$")


def valid_address(addr: str) -> bool:
    """Whether an envelope address has a usable syntax (local part, optional domain)."""
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
    return domain is None or bool(_DOMAIN.fullmatch(domain))


def strip_route(addr: str) -> str:
    """Drop an RFC 821 source route: <@a,@b:user@c> is <user@c>."""
    if addr.startswith("@") and ":" in addr:
        return addr.split(":", 1)[1]
    return addr


class Session:
    """One SMTP session with one client."""

    limits = NO_LIMITS      # the client's anvil limits (smtpd/limits.py); service.py sets them

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
        self.hostname = cfg.get("myhostname")
        self.line_limit = cfg["line_length_limit"]
        self.size_limit = cfg["message_size_limit"]
        self.rcpt_limit = cfg["smtpd_recipient_limit"]
        self.soft_limit = cfg["smtpd_soft_error_limit"]
        self.hard_limit = cfg["smtpd_hard_error_limit"]
        self.error_sleep = cfg["smtpd_error_sleep_time"]
        self.junk_limit = cfg["smtpd_junk_command_limit"]
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
        self.noop_commands = {c.lower() for c in cfg["smtpd_noop_commands"]}
        self.discard_ehlo = {k.lower() for k in cfg["smtpd_discard_ehlo_keywords"]}
        self.overshoot_limit = cfg["smtpd_recipient_overshoot_limit"]
        self.reset()

    # --- configuration ---------------------------------------------------------------------
    def _bare_newline_mode(self) -> str:
        mode = self.cfg["smtpd_forbid_bare_newline"].lower()     # one of its values
        mode = {"yes": "normalize"}.get(mode, mode)
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
        """Queue one reply line (flushed before the next read); a 4xx or 5xx reply other
        than 421 counts as an error unless error is False."""
        if not (text.isascii() and text.isprintable()):
            text = printable(text, len(text))   # client text echoed: as Postfix, `?`
        code = text[:3]
        if code[:1] in ("4", "5") and not text.startswith("421"):
            self.errors += error
            if self.errors > self.soft_limit and self.error_sleep:
                self.s.flush()
                time.sleep(self.error_sleep)
        self.s.write(text.encode("utf-8", "replace") + b"\r\n")

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

    def log_reject(self, stage: str, reply, rcpt: str | None = None) -> None:
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
        msg.info(f"{qid}: reject: {stage} from {self.client.client}: {reply}; "
                 + " ".join(parts))

    def protocol(self) -> str:
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls_active else "") + \
            ("A" if self.client.sasl_username else "")

    # --- transaction state -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the mail transaction (RSET, end of DATA, STARTTLS)."""
        if getattr(self, "writer", None) is not None:
            self.writer.abort()
        self.writer = None
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.client.sender = None
        self.sasl_sender: str | None = None
        self.rcpt_overshoot = 0

    # --- the session -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve the client until QUIT, an error limit, a timeout or a lost connection."""
        msg.info(f"connect from {self.client.client}")
        try:
            if self.wrapper:
                if self.tls is None:
                    msg.warn(f"TLS wrapper mode requested but TLS is not available; "
                             f"disconnecting {self.client.client}")
                    raise Disconnect
                if not self.limits.wrapper():
                    raise Disconnect
                if not self.start_tls():
                    raise Disconnect
            if not self.limits.connect(self.reply):
                raise Disconnect
            denied = self.checker.connect(self.client)
            if denied is not None:
                # smtpd_delay_reject = no: the reject is the greeting, and every command
                # but QUIT is refused from now on, as Postfix's access_denied.
                self.log_reject("CONNECT", denied)
                self.access_denied = str(denied)
                self.reply(self.access_denied)
            else:
                self.reply(f"220 {self.cfg.get('smtpd_banner')}")
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
            self.limits.disconnect()
            msg.info(f"disconnect from {self.client.client} {self.stats()}")

    def last_for_log(self) -> str:
        if self.last == "DATA" and self.data_bytes is not None:
            return f"DATA ({self.data_bytes} bytes)"
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
        return raw.decode("latin-1")

    def ill_pipelining(self, after: str, auth: bool = False) -> None:
        """Log improper pipelining, once, and remember it (reject_unauth_pipelining)."""
        self.client.ill_pipelining = True
        ahead = "..." if auth else \
            printable(SASL.redact(self.s.peek(60).decode("latin-1")))   # no credentials
        msg.info(f"improper command pipelining after {after} from "
                 f"{self.client.client}: {ahead}")

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
        if self.access_denied and verb != "quit":
            self.last = verb.upper() if handler else "UNKNOWN"
            self.count(verb if handler else "unknown", False)
            self.reply(f"503 5.7.0 Error: access denied for {self.client.client}")
            return False
        if handler is None:
            self.last = "UNKNOWN"
            self.count("unknown", False)
            self.reply("500 5.5.2 Error: command not recognized")
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
        self.helo = name
        self.client.helo = self.helo
        self.esmtp = esmtp
        if not esmtp:
            self.reply(f"250 {self.hostname}")
            return True
        self.pipelining_ok = True
        lines = [self.hostname, "PIPELINING"]
        lines.append(f"SIZE {self.size_limit}" if self.size_limit else "SIZE")
        if not self.cfg["disable_vrfy_command"]:
            lines.append("VRFY")
        if self.starttls_offered:
            lines.append("STARTTLS")
        if self.sasl_active() and not self.sasl_exempt:
            mechs = self.sasl.mechanisms(self.tls_active)
            if mechs:
                lines.append("AUTH " + " ".join(mechs))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME"]
        lines = [lines[0]] + [k for k in lines[1:]
                              if k.split()[0].lower() not in self.discard_ehlo]
        for i, text in enumerate(lines):
            self.reply(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
        return True

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
            reason = step.data or SASL.REASON_UNAVAILABLE
            msg.warn(f"{self.client.client}: SASL {mech} authentication failed: {reason}, "
                     f"sasl_username={self.sasl.username or '(unavailable)'}")
            if step.status == SASL.TEMP:
                self.reply(f"454 4.7.0 Temporary authentication failure: {reason}")
            else:
                self.reply(f"535 5.7.8 Error: authentication failed: {reason}")
            return False
        self.reply("235 2.7.0 Authentication successful")
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
        parsed = parse_path(arg, "FROM:", self.cfg["strict_rfc821_envelopes"])
        if parsed is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return False
        if not self.limits.mail(self.reply):
            return False
        addr, params = parsed
        if addr != "bad":
            addr = strip_route(addr)
        if addr == "bad" or (addr and not valid_address(addr)):
            msg.warn(f"Illegal address syntax from {self.client.client} in MAIL command: "
                     f"{printable(arg[5:].strip())}")
            self.reply("501 5.1.7 Bad sender address syntax")
            return False
        size = 0
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
        self.client.sender = addr
        denied = self.checker.mail(self.client)
        if denied is not None:
            self.log_reject("MAIL", denied)
            self.reset()
            self.reply(str(denied))
            return False
        self.sender = addr
        self.reply("250 2.1.0 Ok")
        return True

    def rcpt_cmd(self, arg: str) -> bool:
        if self.sender is None:
            self.reply("503 5.5.1 Error: need MAIL command")
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
        if addr == "bad" or not valid_address(addr):
            msg.warn(f"Illegal address syntax from {self.client.client} in RCPT command: "
                     f"{printable(arg[3:].strip())}")
            self.reply("501 5.1.3 Bad recipient address syntax")
            return False
        if params:
            self.reply(f"555 5.5.4 Unsupported option: {printable(params[0])}")
            return False
        if len(self.rcpts) >= self.rcpt_limit:
            # Past smtpd_recipient_limit: 452, which counts as an error only once the
            # client overshoots by more than smtpd_recipient_overshoot_limit (smtpd.c).
            self.rcpt_overshoot += 1
            within = self.rcpt_overshoot <= self.overshoot_limit
            self.reply("452 4.5.3 Error: too many recipients", error=not within)
            return within
        verdict: Reply | None = self.checker.rcpt(self.client, addr)
        if verdict is not None:
            self.log_reject("RCPT", verdict, addr)
            self.reply(str(verdict))
            return False
        if self.writer is None and not self.open_queue_file():
            return False
        try:
            self.writer.add_recipient(addr)
        except OSError as exc:
            return self.queue_trouble(exc)
        self.rcpts.append(addr)
        self.reply("250 2.1.5 Ok")
        return True

    def open_queue_file(self) -> bool:
        """Create the queue file at the first good recipient, as Postfix does."""
        try:
            self.writer = Q.QueueWriter(self.queue_root)
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
        msg.info(f"{self.writer.id}: client={self.client.client}{sasl}")
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
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        self.s.flush()
        problem = None
        try:
            self.writer.write(self.received_header())
        except OSError as exc:
            problem = exc
        result = self.read_content(problem)
        self.data_bytes = None
        return result

    def _only_rcpt(self) -> str | None:
        """The recipient the DATA and end-of-data checks log: only when there is one."""
        return self.rcpts[0] if len(self.rcpts) == 1 else None

    def read_content(self, problem: OSError | None) -> bool:
        """Stream DATA to the queue file until <CR><LF>.<CR><LF>; reply; True if queued."""
        strict_end = self.bare_lf != "no"
        at_start = True          # this chunk begins a line
        prev_crlf = True         # the previous line ended in CRLF (or DATA just began)
        in_header, hops, msgid = True, 0, None
        header_limit, header_len = self.cfg["header_size_limit"], 0
        size, too_big, bare_lf_seen = 0, False, False
        hop_limit = self.cfg["hopcount_limit"]
        self.data_bytes = 0
        writer = self.writer
        while True:
            if at_start and prev_crlf and not in_header:
                # The body in bulk, at C speed: whole CRLF lines, with the result of the
                # line by line loop below (which takes whatever else comes).
                raw = self.s.buffered_lines(self.line_limit)
                lf = raw.replace(b"\r\n", b"\n")
                if raw.count(b"\n") != len(raw) - len(lf) or (
                        len(lf) >= self.line_limit - 1 and
                        max(map(len, lf.split(b"\n"))) >= self.line_limit - 1):
                    raw = raw[:crlf_prefix(raw, self.line_limit)]   # a bare LF, a long line
                    lf = raw.replace(b"\r\n", b"\n")
                if raw:
                    if lf.startswith(b".\n"):
                        stop = 0
                    else:
                        stop = lf.find(b"\n.\n")
                        stop = stop + 1 if stop >= 0 else -1
                    part = lf if stop < 0 else lf[:stop]
                    # On the wire each line had a CR more, and the end was ".\r\n".
                    used = len(raw) if stop < 0 else len(part) + part.count(b"\n") + 3
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
            if in_header and at_start and term and not body:
                in_header = False
            elif in_header:
                # header_size_limit, as Postfix's cleanup (mime_state.c): a header takes
                # its continuation lines and the rest of an over-long line only while it
                # is shorter than the limit; the excess is discarded, the mail accepted.
                if at_start and body[:1] not in (b" ", b"\t"):
                    header_len = len(body)          # a new header
                    low = body[:12].lower()
                    if low.startswith(b"received:"):
                        hops += 1
                    elif low.startswith(b"message-id:") and msgid is None:
                        msgid = body[11:].strip().decode("latin-1")
                elif header_len < header_limit:
                    header_len += len(body) + at_start
                else:
                    data = b"\n" if term and not at_start else b""
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
        if too_big:
            reply = "552 5.3.4 Message size exceeds fixed limit"
            self.log_reject("END-OF-MESSAGE", reply)
            self.reset()
            self.reply(reply)
            return False
        if hops > hop_limit:
            reply = "554 5.4.0 Error: too many hops"
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
        try:
            qid = writer.commit()
        except OSError as exc:
            ok = self.queue_trouble(exc)
            self.reset()
            return ok
        if msgid:
            msg.info(f"{qid}: message-id={msgid}")
        self.writer = None
        self.reset()
        self.reply(f"250 2.0.0 Ok: queued as {qid}")
        self.s.flush()
        Q.wake(self.queue_root)
        return True

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
        if not arg:
            self.reply("501 5.5.4 Syntax: VRFY address")
            return False
        addr = arg.strip("<>")
        if not valid_address(addr):
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
        self.reply("502 5.5.1 Error: command not implemented")
        return False

    def quit_cmd(self, arg: str) -> bool:
        self.reply("221 2.0.0 Bye")
        return True


COMMANDS = {
    "helo": Session.helo_cmd, "ehlo": Session.ehlo_cmd, "starttls": Session.starttls_cmd,
    "auth": Session.auth_cmd, "mail": Session.mail_cmd, "rcpt": Session.rcpt_cmd,
    "data": Session.data_cmd, "rset": Session.rset_cmd, "noop": Session.noop_cmd,
    "vrfy": Session.vrfy_cmd, "etrn": Session.etrn_cmd, "quit": Session.quit_cmd,
}
PRE_TLS = {"helo", "ehlo", "starttls", "noop", "quit", "rset"}
JUNK = {"noop", "vrfy", "etrn", "rset"}
