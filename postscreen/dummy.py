"""postscreen's SMTP engine after the greeting, for clients that postscreen refuses.

A client that failed a test under an `enforce` action (postscreen_greet_action,
postscreen_dnsbl_action, postscreen_denylist_action) is not handed to smtpd: this engine
talks to it as Postfix's postscreen_smtpd.c does, so that the refusal is logged with
the sender and recipient (`NOQUEUE: reject: RCPT from [addr]:port: 550 5.7.1 Service
unavailable; client [addr] blocked using LIST; from=<s>, to=<r>, proto=ESMTP,
helo=<h>`), and then the client is let go.

    220 smtpd_banner (not sent to a client that failed the pregreet test)
    HELO, EHLO          250 (EHLO: myhostname, SIZE, VRFY, ETRN, ENHANCEDSTATUSCODES,
                        8BITMIME, DSN, SMTPUTF8, CHUNKING as configured)
    MAIL                250 2.1.0 Ok
    RCPT                the enforce reply, logged NOQUEUE: reject
    DATA, BDAT          `DATA without valid RCPT`, 554 5.5.1 Error: no valid recipients
                        (503 without MAIL), and the connection ends
    RSET, NOOP          250 2.0.0 Ok;  VRFY: the enforce reply (502 when disabled)
    ETRN                458 Unable to queue messages;  QUIT: 221 2.0.0 Bye
    other               502 5.5.2 Error: command not recognized (STARTTLS, AUTH ...)

    A command line longer than line_length_limit, more than
    postscreen_command_count_limit commands, or postscreen_command_time_limit for one
    command end the session with Postfix's log line and 421 reply.

SEE ALSO
    postscreen/service.py; Postfix postscreen_smtpd.c.
"""

from __future__ import annotations

from ..lib import msg

READ = 4096


class Engine:
    """The replies of this configuration, built once."""

    def __init__(self, cfg):
        host = cfg.get("myhostname")
        self.greeting = f"220 {cfg.get('smtpd_banner')}\r\n"
        self.helo = f"250 {host}\r\n"
        lines = [host]
        size = cfg["message_size_limit"]
        lines.append(f"SIZE {size}" if size else "SIZE")
        self.disable_vrfy = cfg["disable_vrfy_command"]
        if not self.disable_vrfy:
            lines.append("VRFY")
        lines += ["ETRN", "ENHANCEDSTATUSCODES", "8BITMIME", "DSN"]
        if cfg["smtputf8_enable"]:
            lines.append("SMTPUTF8")
        lines.append("CHUNKING")
        self.ehlo = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self.timeout_reply = f"421 4.4.2 {host} Error: timeout exceeded\r\n"
        self.busy_reply = f"421 {host} Service unavailable - try again later\r\n"
        self.time_limit = cfg["postscreen_command_time_limit"]
        self.count_limit = cfg["postscreen_command_count_limit"]
        self.line_limit = cfg["line_length_limit"]

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
        self.where = "CONNECT"
        if "pregreet" not in session.failed and not session._write(engine.greeting):
            session.hangup_event()
            return
        session.loop.add_reader(session.fd, self._read)
        self._arm()

    def _arm(self) -> None:
        self.s.loop.cancel(self.s.timer)
        self.s.timer = self.s.loop.call_later(self.e.time_limit, self._time_limit)

    def _time_limit(self) -> None:
        self.s.timer = None
        msg.info(f"COMMAND TIME LIMIT from {self.s.where} after {self.where}")
        self._drop(self.e.timeout_reply)

    def _drop(self, reply: str) -> None:
        self.s.loop.remove_reader(self.s.fd)
        self.s.drop(reply)

    def _read(self) -> None:
        s = self.s
        try:
            data = s.conn.recv(READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            s.loop.remove_reader(s.fd)
            s.hangup_event()
            return
        self.buf += data
        while not s.closed:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > self.e.line_limit:
                    msg.info(f"COMMAND LENGTH LIMIT from {s.where} after {self.where}")
                    self._drop(self.e.busy_reply)
                return
            line, self.buf = self.buf[:end], self.buf[end + 1:]
            self._command(line.rstrip(b"\r").decode("utf-8", "replace"))

    def _command(self, line: str) -> None:
        s = self.s
        words = line.split()
        name = words[0].upper() if words else ""
        args = line.split(None, 1)[1] if len(words) > 1 else ""
        self.count += 1
        if self.count > self.e.count_limit and name != "QUIT":
            msg.info(f"COMMAND COUNT LIMIT from {s.where} after {self.where}")
            self._drop(self.e.busy_reply)
            return
        self.where = name if name in _KNOWN else "UNKNOWN"
        handler = getattr(self, "_" + name.lower(), None) if name in _KNOWN else None
        if handler is None:
            s._write("502 5.5.2 Error: command not recognized\r\n")
        else:
            handler(args)
        if not s.closed:
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
        self.s._write(self.e.ehlo)

    def _mail(self, args: str) -> None:
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
        msg.info(f"NOQUEUE: reject: RCPT from {s.where}: {s.rcpt_reply[:-2]}; "
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
        if self.helo is None:
            self.s._write("503 5.5.1 Error: send HELO/EHLO first\r\n")
        elif not args.split():
            self.s._write("500 Syntax: ETRN domain\r\n")
        else:
            self.s._write("458 Unable to queue messages\r\n")

    def _quit(self, args: str) -> None:
        self._drop("221 2.0.0 Bye\r\n")


_KNOWN = {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "ETRN",
          "QUIT"}


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

