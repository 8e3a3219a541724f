"""postscreen's SMTP engine after the greeting, for clients that postscreen refuses.

A client that failed a test under an `enforce` action (postscreen_greet_action,
postscreen_dnsbl_action, postscreen_denylist_action) is not handed to smtpd: this engine
talks to it as Postfix's postscreen_smtpd.c does, so that the refusal is logged with
the sender and recipient (`NOQUEUE: reject: RCPT from [addr]:port: 550 5.7.1 Service
unavailable; client [addr] blocked using LIST; from=<s>, to=<r>, proto=ESMTP,
helo=<h>`), and then the client is let go.

    220 smtpd_banner (not sent to a client that failed the pregreet test)
    HELO, EHLO          250 (EHLO: myhostname, SIZE, VRFY, ETRN, STARTTLS,
                        ENHANCEDSTATUSCODES, 8BITMIME, DSN, SMTPUTF8, CHUNKING as
                        configured, less postscreen_discard_ehlo_keywords, or the
                        client address's keywords in
                        postscreen_discard_ehlo_keyword_address_maps; STARTTLS
                        only before TLS and when TLS is ready)
    STARTTLS            220 2.0.0 Ready to start TLS, then the handshake (see TLS);
                        501 5.5.4 Syntax: STARTTLS with arguments, 554 5.5.1 Error: TLS
                        already active, 502 5.5.1 Error: command not implemented when
                        TLS is off or broken, 454 4.7.0 TLS not available due to local
                        problem when a connection cannot be set up
    MAIL                250 2.1.0 Ok (503 5.5.1 Error: send HELO/EHLO first with
                        postscreen_helo_required, as for ETRN)
    RCPT                the enforce reply, logged NOQUEUE: reject
    DATA, BDAT          `DATA without valid RCPT`, 554 5.5.1 Error: no valid recipients
                        (503 without MAIL), and the connection ends
    RSET, NOOP          250 2.0.0 Ok;  VRFY: the enforce reply (502 with
                        postscreen_disable_vrfy_command)
    ETRN                458 Unable to queue messages;  QUIT: 221 2.0.0 Bye
    other               502 5.5.2 Error: command not recognized (AUTH, XCLIENT ...)
    With postscreen_tls_security_level = encrypt, every command but HELO, EHLO,
    STARTTLS, NOOP and QUIT gets 530 5.7.0 Must issue a STARTTLS command first until
    TLS is up.

    The deep protocol tests run here, each when enabled (postscreen_*_enable) and due,
    or for any client that failed a test before the greeting:
        pipelining: a command (other than BDAT) with more input already behind it:
            `COMMAND PIPELINING from [addr]:port after CMD: NEXT`;
        non_smtp_command: an unknown command that looks like a header (`Name:`) or is in
            postscreen_forbidden_commands: `NON-SMTP COMMAND from [addr]:port after
            WHERE: CMD ARGS` (drop: 521 5.7.0 Error: I can break rules, too. Goodbye.);
        bare_newline: a command line ended by LF alone: `BARE NEWLINE from [addr]:port
            after LINE`;
    each with its action (postscreen_*_action: drop 521 5.5.1 Protocol error, enforce
    550 5.5.1 Protocol error at RCPT, ignore passes it for the least TTL). A client
    that reaches RCPT without failing passes them (their postscreen_*_ttl) and is told
    450 4.3.2 Service currently unavailable: it is let through when it comes back.

TLS
    The handshake runs in postscreen's event loop (postscreen/service.py says why), on
    the server contexts that postscreen's prepare() built with lib/tls.py from the
    smtpd_tls_* parameters, within postscreen_command_time_limit. Input that came
    after STARTTLS in plaintext is discarded (as Postfix purges it). Done: smtpd's TLS
    log lines at smtpd_tls_loglevel, for [addr]:port, and the session starts over (no
    HELO, no sender), its replies and commands in TLS. Failed or timed out: smtpd's
    `SSL_accept error from [addr]:port: REASON` lines and postscreen's HANGUP; that
    client alone ends.

    postscreen_command_filter replaces a command line before anything looks at it
    (`[addr]:port: replacing command "OLD" with "NEW"`); postscreen_reject_footer and
    postscreen_reject_footer_maps end every 4XX and 5XX reply (postscreen/service.py).

    A command line longer than line_length_limit, more than
    postscreen_command_count_limit commands, or postscreen_command_time_limit for one
    command end the session with Postfix's log line and 421 reply.

SEE ALSO
    postscreen/service.py; Postfix postscreen_smtpd.c.
"""

from __future__ import annotations

from OpenSSL import SSL

from ..lib import msg, tables
from ..lib import server_filters as SF
from ..lib import tls as T
from ..lib.proxy import escape as _escape

READ = 4096


class Engine:
    """The replies of this configuration, built once."""

    def __init__(self, cfg, tls_level: str = "none", tls=None):
        self.host = host = cfg.get("myhostname")
        self.greeting = f"220 {cfg.get('smtpd_banner')}\r\n"
        self.helo = f"250 {host}\r\n"
        size = cfg["message_size_limit"]
        # (keyword, line) in Postfix's order; postscreen_discard_ehlo_keywords hides some.
        # VRFY is announced after disable_vrfy_command, and answered after
        # postscreen_disable_vrfy_command, as Postfix's postscreen does.
        features = [("size", f"SIZE {size}" if size else "SIZE")]
        if not cfg["disable_vrfy_command"]:
            features.append(("vrfy", "VRFY"))
        features += [("etrn", "ETRN"), ("starttls", "STARTTLS"),
                     ("enhancedstatuscodes", "ENHANCEDSTATUSCODES"),
                     ("8bitmime", "8BITMIME"), ("dsn", "DSN")]
        if cfg["smtputf8_enable"]:
            features.append(("smtputf8", "SMTPUTF8"))
        features.append(("chunking", "CHUNKING"))
        self.features = features
        self.discard = frozenset(word.lower() for word in cfg["postscreen_discard_ehlo_keywords"])
        self.disable_vrfy = cfg["postscreen_disable_vrfy_command"]
        self.helo_required = cfg["postscreen_helo_required"]
        # tls: lib/tls.ServerTLS, or None when TLS is off or could not be set up (then
        # STARTTLS is not announced, but encrypt still refuses MAIL, as Postfix)
        self.tls = tls if tls_level != "none" else None
        self.enforce_tls = tls_level == "encrypt"

        self.ehlo_tls = self.format_ehlo(self.discard, False)
        self.ehlo = self.format_ehlo(self.discard, self.tls is not None)
        # postscreen_discard_ehlo_keyword_address_maps (lib/server_filters.ServerFilters)
        self.ehlo_maps = None
        self.cmd_filter = None      # postscreen_command_filter (likewise)
        self.timeout_reply = f"421 4.4.2 {host} Error: timeout exceeded\r\n"
        self.busy_reply = f"421 {host} Service unavailable - try again later\r\n"
        self.time_limit = cfg["postscreen_command_time_limit"]
        self.count_limit = cfg["postscreen_command_count_limit"]
        self.line_limit = cfg["line_length_limit"]

    def format_ehlo(self, discard: frozenset, starttls: bool) -> str:
        """psc_smtpd_format_ehlo_reply(): the EHLO reply less the discarded keywords."""
        return _ehlo([self.host] + [line for word, line in self.features
                                    if word not in discard and (word != "starttls" or starttls)])

    def start(self, session) -> None:
        """psc_smtpd_tests(): greet (unless it pregreeted), then read commands."""
        _Dialog(self, session)


class _Dialog:
    def __init__(self, engine: Engine, session):
        self.e, self.s = engine, session
        self.buf = b""
        self.helo = None
        self.sender = None
        self.protocol = "SMTP"
        self.count = 0
        self.tls_conn = None                # during the handshake
        self.where = "CONNECT"
        if "pregreet" not in session.failed and not session._write(engine.greeting):
            session.hangup_event()
            return
        session.loop.add_reader(session.fd, session.guard(self._read))
        self._arm()

    def _arm(self) -> None:
        self.s.loop.cancel(self.s.timer)
        self.s.timer = self.s.loop.call_later(self.e.time_limit,
                                             self.s.guard(self._time_limit))

    def _time_limit(self) -> None:
        self.s.timer = None
        msg.info(f"COMMAND TIME LIMIT from {self.s.where} after {self.where}")
        self._drop(self.e.timeout_reply)

    def _drop(self, reply: str) -> None:
        self.s.loop.remove_reader(self.s.fd)
        self.s.drop(reply)

    def _read(self) -> None:
        s = self.s
        data = s.recv(READ)
        if data is None:
            return
        if not data:
            s.loop.remove_reader(s.fd)
            s.hangup_event()
            return
        self.buf += data
        while not s.closed and self.tls_conn is None:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) >= self.e.line_limit:
                    msg.info(f"COMMAND LENGTH LIMIT from {s.where} after {self.where}")
                    self._drop(self.e.busy_reply)
                return
            if end >= self.e.line_limit:
                msg.info(f"COMMAND LENGTH LIMIT from {s.where} after {self.where}")
                self._drop(self.e.busy_reply)
                return
            line, self.buf = self.buf[:end], self.buf[end + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            elif s.deep_testing("bare_newline"):
                msg.info(f"BARE NEWLINE from {s.where} after {_escape(line[:100])}")
                action = s.deep_fail("bare_newline")
                if action == "drop":
                    self._drop("521 5.5.1 Protocol error\r\n")
                    return
                if action == "enforce":
                    s.enforce("550 5.5.1 Protocol error\r\n")
            line = line.decode("utf-8", "replace")
            if self.e.cmd_filter is not None:
                line = self._filter(line)
            self._command(line)

    def _filter(self, line: str) -> str:
        """postscreen_command_filter: the table's replacement, logged as Postfix's."""
        try:
            new = self.e.cmd_filter.filter_command(line)
        except tables.TableError:
            table = self.e.cmd_filter.cmd_table
            msg.fatal(f"{table.type}:{table.name} lookup error for \"{line[:100]}\"")
        if new is None:
            return line
        msg.info(f"[{self.s.addr}]:{self.s.port}: replacing command \"{_printable(line)[:100]}\" "
                 f"with \"{_printable(new)[:100]}\"")
        return new

    def _command(self, line: str) -> None:
        s = self.s
        words = line.split()
        name = words[0].upper() if words else ""
        args = line.split(None, 1)[1] if len(words) > 1 else ""
        saved_where, self.where = self.where, name if name in _KNOWN else "UNIMPLEMENTED"
        if s.x21 and name != "QUIT":
            self._drop(s.final_reply)       # the hand-off failed after the teaser
            return
        if s.deep_testing("non_smtp") and name not in _KNOWN and words and (
                s.s.filters.non_smtp(words[0])):
            msg.info(f"NON-SMTP COMMAND from {s.where} after {saved_where}: "
                     f"{_printable(words[0])} {_escape(args.encode()[:100])}")
            action = s.deep_fail("non_smtp")
            if action == "drop":
                self._drop("521 5.7.0 Error: I can break rules, too. Goodbye.\r\n")
                return
            if action == "enforce":
                s.enforce("550 5.5.1 Protocol error\r\n")
        if name != "BDAT" and self.buf and s.deep_testing("pipelining"):
            msg.info(f"COMMAND PIPELINING from {s.where} after {_printable(name or line)[:100]}"
                     f": {_escape(self.buf[:100])}")
            action = s.deep_fail("pipelining")
            if action == "drop":
                self._drop("521 5.5.1 Protocol error\r\n")
                return
            if action == "enforce":
                s.enforce("550 5.5.1 Protocol error\r\n")
        if name == "RCPT":
            # A client that got this far without failing passes the tests after the
            # greeting (it is still refused here: 450, and welcome next time).
            for test in ("bare_newline", "non_smtp", "pipelining"):
                if s.deep_testing(test) and test not in s.failed and test not in s.passed:
                    s.deep_pass(test, s.s.deep[test][2])
        self.count += 1
        if self.count > self.e.count_limit and name != "QUIT":
            msg.info(f"COMMAND COUNT LIMIT from {s.where} after {saved_where}")
            self._drop(self.e.busy_reply)
            return
        handler = getattr(self, "_" + name.lower(), None) if name in _KNOWN else None
        if handler is None:
            s._write("502 5.5.2 Error: command not recognized\r\n")
        elif self.e.enforce_tls and s.tls is None and name not in _PRE_TLS:
            s._write("530 5.7.0 Must issue a STARTTLS command first\r\n")
        else:
            handler(args)
        if not s.closed and self.tls_conn is None:
            self._arm()

    def _helo(self, args: str) -> None:
        if not args.split():
            self.s._write("501 Syntax: HELO hostname\r\n")
            return
        self.helo, self.protocol, self.sender = args.split()[0], "SMTP", None
        self.s._write(self.e.helo)

    def _ehlo(self, args: str) -> None:
        if not args.split():
            self.s._write("501 Syntax: EHLO hostname\r\n")
            return
        self.helo, self.protocol, self.sender = args.split()[0], "ESMTP", None
        if self.e.ehlo_maps is not None:
            reply = self._ehlo_for_client()
            if reply is not None:
                self.s._write(reply)
                return
        self.s._write(self.e.ehlo_tls if self.s.tls is not None else self.e.ehlo)

    def _ehlo_for_client(self) -> str | None:
        """postscreen_discard_ehlo_keyword_address_maps: the client's EHLO reply when its
        keywords differ from postscreen_discard_ehlo_keywords, logged as Postfix's (a
        lookup error is fatal there too)."""
        s = self.s
        try:
            words = self.e.ehlo_maps.ehlo_discard(s.addr)
        except tables.TableError as exc:
            msg.fatal(f"postscreen_discard_ehlo_keyword_address_maps lookup error for "
                      f"{s.addr}: {exc}")
        if words is None:
            return None
        discard = frozenset(w.lower() for w in words)
        if discard == self.e.discard:
            return None
        text = SF.ehlo_mask_text(discard)
        if text and "silent-discard" not in discard:
            # sic: Postfix's format has no colon between the address and the port here
            msg.info(f"[{s.addr}]{s.port}: discarding EHLO keywords: {text}")
        return self.e.format_ehlo(discard, s.tls is None and self.e.tls is not None)

    # --- STARTTLS ----------------------------------------------------------------------------
    def _starttls(self, args: str) -> None:
        """psc_starttls_cmd(): reply 220, then the handshake; commands wait for it."""
        s = self.s
        if args.split():
            s._write("501 5.5.4 Syntax: STARTTLS\r\n")
            return
        if s.tls is not None:
            s._write("554 5.5.1 Error: TLS already active\r\n")
            return
        if self.e.tls is None:
            s._write("502 5.5.1 Error: command not implemented\r\n")
            return
        try:
            conn = self.e.tls.connection(s.conn, s.where, self.e.enforce_tls)
        except (SSL.Error, OSError) as exc:
            msg.warn(f"cannot start TLS for {s.where}: {exc}")
            s._write("454 4.7.0 TLS not available due to local problem\r\n")
            return
        self.buf = b""                  # plaintext behind STARTTLS is never a command
        if not s._write("220 2.0.0 Ready to start TLS\r\n"):
            return
        self.tls_conn = conn
        s.loop.remove(s.fd)
        s.loop.cancel(s.timer)
        s.timer = s.loop.call_later(self.e.time_limit, s.guard(self._tls_timeout))
        self._handshake()

    def _handshake(self) -> None:
        s = self.s
        s.loop.remove(s.fd)
        try:
            want = T.handshake_step(self.tls_conn)
        except SSL.Error as exc:
            self._tls_failed(T.ssl_error_text(exc) or "lost connection")
            return
        if want == "read":
            s.loop.add_reader(s.fd, s.guard(self._handshake))
            return
        if want == "write":
            s.loop.add_writer(s.fd, s.guard(self._handshake))
            return
        # psc_starttls_resume(): TLS is up; the session starts over
        tls, conn, self.tls_conn = self.e.tls, self.tls_conn, None
        for line in tls.log_lines(tls.info(conn)):
            msg.info(line)
        s.tls = conn
        self.helo = self.sender = None
        s.loop.add_reader(s.fd, s.guard(self._read))
        self._arm()
        self._read()                    # what is already decrypted, if anything

    def _tls_timeout(self) -> None:
        self.s.timer = None
        self._tls_failed("timeout")

    def _tls_failed(self, reason: str) -> None:
        """The handshake did not complete: smtpd's lines, then this client hangs up."""
        s = self.s
        self.tls_conn = None
        msg.warn(f"TLS library problem: SSL_accept error from {s.where}: {reason}")
        msg.info(f"SSL_accept error from {s.where}: {reason}")
        s.loop.remove(s.fd)
        s.hangup_event()

    def _mail(self, args: str) -> None:
        if self.e.helo_required and self.helo is None:
            self.s._write("503 5.5.1 Error: send HELO/EHLO first\r\n")
            return
        if self.sender is not None:
            self.s._write("503 5.5.1 Error: nested MAIL command\r\n")
            return
        addr = _address(args, "FROM")
        if addr is None:
            self.s._write("501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return
        self.sender = addr
        self.s._write("250 2.1.0 Ok\r\n")

    def _rcpt(self, args: str) -> None:
        s = self.s
        if self.sender is None:
            s._write("503 5.5.1 Error: need MAIL command\r\n")
            return
        addr = _address(args, "TO")
        if addr is None:
            s._write("501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            return
        reply = SF.soft_bounce(s.rcpt_reply) if s.s.soft_bounce else s.rcpt_reply
        msg.info(f"NOQUEUE: reject: RCPT from {s.where}: {reply[:-2]}; "
                 f"from=<{self.sender}>, to=<{addr}>, proto={self.protocol}, "
                 f"helo=<{self.helo or ''}>")
        s._write(s.rcpt_reply)

    def _data(self, args: str) -> None:
        msg.info(f"DATA without valid RCPT from {self.s.where}")
        if args.split():
            self._drop("501 5.5.4 Syntax: DATA\r\n")
        elif self.sender is None:
            self._drop("503 5.5.1 Error: need RCPT command\r\n")
        else:
            self._drop("554 5.5.1 Error: no valid recipients\r\n")

    def _bdat(self, args: str) -> None:
        msg.info(f"BDAT without valid RCPT from {self.s.where}")
        if not args.split():
            self._drop("501 5.5.4 Syntax: BDAT count [LAST]\r\n")
        elif self.sender is None:
            self._drop("554 5.5.1 Error: need MAIL command\r\n")
        else:
            self._drop("554 5.5.1 Error: no valid recipients\r\n")

    def _rset(self, args: str) -> None:
        self.sender = None
        self.s._write("250 2.0.0 Ok\r\n")

    def _noop(self, args: str) -> None:
        self.s._write("250 2.0.0 Ok\r\n")

    def _vrfy(self, args: str) -> None:
        if not args.split():
            self.s._write("501 5.5.4 Syntax: VRFY address\r\n")
        elif self.e.disable_vrfy:
            self.s._write("502 5.5.1 VRFY command is disabled\r\n")
        else:
            self.s._write(self.s.rcpt_reply)

    def _etrn(self, args: str) -> None:
        if self.e.helo_required and self.helo is None:
            self.s._write("503 5.5.1 Error: send HELO/EHLO first\r\n")
        elif not args.split():
            self.s._write("500 Syntax: ETRN domain\r\n")
        else:
            self.s._write("458 Unable to queue messages\r\n")

    def _quit(self, args: str) -> None:
        self._drop("221 2.0.0 Bye\r\n")


def _printable(text: str) -> str:
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


def _ehlo(lines: list[str]) -> str:
    return "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"


# Postfix's command table: AUTH, XCLIENT and XFORWARD are known (no non-SMTP test, and
# `after AUTH` in log lines) but disabled: 502 5.5.2, as an unknown command.
_KNOWN = {"HELO", "EHLO", "STARTTLS", "XCLIENT", "XFORWARD", "AUTH", "MAIL", "RCPT",
          "DATA", "BDAT", "RSET", "NOOP", "VRFY", "ETRN", "QUIT"}
_PRE_TLS = {"HELO", "EHLO", "STARTTLS", "NOOP", "QUIT"}   # allowed before TLS with encrypt


def _address(args: str, keyword: str) -> str | None:
    """The address of `FROM:<a>` / `TO:<a>` (spaces allowed after the colon), or None."""
    head, colon, rest = args.partition(":")
    if not colon or head.strip().upper() != keyword:
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end > 0 else None
    return rest.split()[0] if rest.split() else None

