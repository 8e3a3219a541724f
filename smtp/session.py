"""The SMTP/LMTP client dialogue: greeting, EHLO, STARTTLS, MAIL, RCPT, DATA, QUIT.

NAME
    session - one conversation of the smtp/lmtp client with one server

DESCRIPTION
    This module is postfix-py's smtp_proto.c, smtp_chat.c and smtp_trouble.c. A
    ClientSession talks to one server over an SmtpStream (lib/smtpio.py) and knows nothing of sockets,
    DNS or the queue manager, so that tests can drive it over a socketpair. What the
    conversation decides about each recipient goes into the Delivery it was given,
    which outlives the session: one delivery request may need several servers.

    helo()     reads the greeting and sends EHLO (LHLO for LMTP; HELO when EHLO is
               refused), notes the server's features, and runs STARTTLS when the TLS
               policy asks for it (then EHLO again). False when the server cannot be
               used; the Delivery says why.
    xfer()     XFORWARD first where smtp_send_xforward_command and the server ask for it
               (smtp/xforward.py); then
               MAIL FROM, RCPT TO for every recipient still to do, DATA, the message
               (CRLF line ends, dot-stuffed, lines longer than smtp_line_length_limit
               folded with <CR><LF>SPACE), and the final dot. With PIPELINING the
               commands go out in one write and the replies are read in order. To a
               server that announces DSN, MAIL carries ENVID and RET and each RCPT
               ORCPT (the stored one, else rfc822;address) and NOTIFY, as Postfix.
               A recipient the server accepts has the DSN action "relayed"; when the
               server announced DSN it also reports passed (the server sends any
               success notice: Postfix's smtp_rcpt_done clears NOTIFY=SUCCESS).
               An address verification probe (Delivery.verify) stops after RCPT: the
               RCPT reply is each recipient's result, no DATA is sent, and the
               session ends with QUIT (never cached mid-transaction). With
               smtp_address_verify_target (lmtp_...) = data it goes on to DATA: a 354
               makes the recipients the server accepted deliverable (dsn 2.0.0, the
               354 text), and the connection is closed at once, without QUIT (the
               server is reading the message), as Postfix's smtp_proto.c.
    quit()     QUIT, best effort; close() shuts TLS down cleanly and closes.

    Replies are read in bounded pieces: a line longer than line_length_limit is kept to
    that length and the rest is read and dropped, so a server that sends megabytes
    without a newline costs time, never memory; lines that do not start with a reply
    code are ignored, as Postfix does.

FAILURES (Postfix's smtp_trouble.c)
    A 4xx reply, a lost connection or a timeout defers; a 5xx reply bounces: per
    recipient for RCPT (and for LMTP's per-recipient replies after DATA), every
    recipient for MAIL, DATA and the end of DATA. A temporary failure on a server that
    is not the last one to try keeps the recipients for the next server instead (and
    logs "queue_id: reason"). A 5xx greeting counts as temporary with
    smtp_skip_5xx_greeting = yes. Reasons read as Postfix's:
        host mx.example.com[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO command)
        host ... refused to talk to me: 554 ...
        lost connection with mx.example.com[192.0.2.1] while receiving the initial
            server greeting
        conversation with ... timed out while sending message body
        TLS is required, but was not offered by host mx.example.com[192.0.2.1]
        SMTPUTF8 is required, but was not offered by host mx.example.com[192.0.2.1]
            (5.6.7: the sender asked for SMTPUTF8 and the envelope or a header is not
            ASCII; MAIL FROM carries SMTPUTF8 when the sender asked and the server offers)
        Cannot start TLS: handshake failure
        Server certificate not verified

REQUIRETLS (RFC 8689, as Postfix's enforce mode)
    For a message received with MAIL FROM ... REQUIRETLS (Delivery.requiretls), the
    server must offer STARTTLS, its certificate must match (the TLS level must be one
    that matches certificates: smtp/service.py skips others with 5.7.10), and it must
    announce REQUIRETLS after STARTTLS; MAIL FROM then carries REQUIRETLS. Failures are
    Postfix's, temporary on a server that is not the last one, final on the last:
        5.7.30 Sender requested REQUIRETLS, but TLS service was not offered by host H
        5.7.10 Sender requested REQUIRETLS, but host H refused to start TLS: reply
        5.7.10 Sender requested REQUIRETLS, but no matching (trusted) server certificate
               was found. The last attempted server was H
        5.7.30 Sender requested REQUIRETLS, but no server was found that supports
               REQUIRETLS. The last attempted server was H
    tls_required_no() finds the "TLS-Required: No" header (RFC 8689 section 5).

TLS
    smtp/tls.py's TlsStarter runs STARTTLS (or wrapper mode) for a ClientSession under
    the TLS policy, with the session cache; a handshake that fails leaves the connection
    unusable: no QUIT, no plaintext. At the may level, when the request has waited
    minimal_backoff_time (Delivery.plaintext_fallback) and there are no SASL
    credentials for the server, a failed handshake, or a timeout or lost connection
    inside TLS with recipients still to do, sets retry_plain: the failure is logged as
    for a server that is not the last ("queue_id: Cannot start TLS: handshake
    failure") and smtp/service.py connects to the same address again without TLS, as
    Postfix 3.x (smtp_proto.c, smtp_connect.c). Never at encrypt and above.

CLASSES
    Rcpt, Delivery (recipients, results; a lib/delivery_agent.py Report records them),
    ServerReply, read_reply(), Options, ClientSession, BodyWriter.

SEE ALSO
    smtp/service.py, smtp/tls.py, smtp/tls_policy.py, lib/smtpio.py, lib/tls.py,
    lib/delivery_agent.py; Postfix smtp_proto.c, smtp_trouble.c, smtp_chat.c.
"""

from __future__ import annotations

import re
import select
import time
from dataclasses import dataclass, field

from ..lib import dsn as DSN
from ..lib import msg, params
from ..lib.smtpio import StreamEOF, StreamTimeout
from . import tls_policy, xforward
from .tls import TLSStartError, TlsStarter
MAX_REPLY_BYTES = 1 << 24       # one reply may not run longer than this, however sent
MAX_REPLY_LINES = 200           # lines kept of a reply (the rest is read and dropped)
WRITE_CHUNK = 1 << 16
PIPELINE_BYTES = 4096           # commands sent before their replies are read (Postfix)

_DSN_RE = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


# --- recipients and their fate ------------------------------------------------------------

@dataclass
class Rcpt:
    """One recipient of the delivery request."""

    address: str
    index: int
    result: str | None = None       # sent, deferred, bounced; None while undecided
    dsn: str = ""
    reason: str = ""
    keep: bool = False              # soft failure here: try the next server
    notify: str = ""                # DSN NOTIFY and ORCPT from the queue file (RFC 3461)
    orcpt: str = ""
    original: str = ""              # the original recipient, "" when it is address


@dataclass
class Delivery:
    """What one delivery request has decided so far (Postfix's SMTP_STATE)."""

    queue_id: str
    sender: str
    recipients: list[Rcpt]
    size: int = 0
    content: object = None          # callable returning an iterator of content blocks
    started: float = field(default_factory=time.time)
    final_server: bool = False
    report: object = None           # lib.delivery_agent.Report: soft_bounce, log lines
    why: tuple[str, str] | None = None   # the last reason there is no delivery (dsn, text)
    conn_setup_done: float = 0.0
    # The request waited minimal_backoff_time before this delivery (Postfix's
    # PREACTIVE_DELAY test): opportunistic TLS that fails may fall back to plain text.
    plaintext_fallback: bool = False
    smtputf8: bool = False          # the sender asked for SMTPUTF8 (queue file smtputf8=1)
    requiretls: bool = False        # MAIL FROM ... REQUIRETLS (queue file requiretls=1)
    tls_not_required: bool = False  # "TLS-Required: No" (and tls_required_enable)
    dsn_ret: str = ""               # DSN RET and ENVID (queue file dsn_ret, dsn_envid)
    dsn_envid: str = ""
    log = None                      # for tests without a Report: f(rcpt, relay, status)
    client: dict = field(default_factory=dict)   # original client, for XFORWARD
    conn_use: int = 0               # the connection's use count (>1: a cached one)
    request_flags: tuple = ()       # the request's flags (conn_load, conn_store: qmgr)
    # An address verification probe (qmgr's "verify" or "expand" flag, sendmail -bv's):
    # the session ends after RCPT, whose reply is the recipient's result (Postfix's
    # DEL_REQ_TRACE_ONLY).
    verify: bool = False

    @property
    def soft_bounce(self) -> bool:
        """soft_bounce: a 5xx on a server that is not the last tries the next one too."""
        return self.report is not None and self.report.soft_bounce

    def todo(self) -> list[Rcpt]:
        """Recipients that this session still has to handle."""
        return [r for r in self.recipients if r.result is None and not r.keep]

    def left(self) -> list[Rcpt]:
        """Recipients without a final result (kept ones included)."""
        return [r for r in self.recipients if r.result is None]

    def unkeep(self) -> None:
        """After a session: kept recipients are to do again, with the next server."""
        for r in self.recipients:
            r.keep = False

    def mark_setup_done(self) -> None:
        """Connection set-up ends here (for the delays= breakdown)."""
        if not self.conn_setup_done:
            self.conn_setup_done = time.time()

    def finish(self, r: Rcpt, status: str, dsn: str, reason: str, relay: str,
               dsn_passed: bool = False) -> None:
        """Give r its final result: the Report applies soft_bounce and logs the line."""
        now = time.time()
        setup_done = self.conn_setup_done or now
        if self.report is not None:
            decided = self.report.record(r.index, status, dsn, reason, relay,
                                         conn_setup=setup_done - self.started,
                                         transmit=now - setup_done,
                                         conn_use=self.conn_use, action="relayed",
                                         passed=dsn_passed)
            status, dsn = decided.result, decided.dsn
        r.result, r.dsn, r.reason = status, dsn, reason
        if self.log is not None:
            self.log(r, relay, status)

    def rcpt_fail(self, r: Rcpt, dsn: str, reason: str, relay: str) -> None:
        """A failure for one recipient: keep it for the next server, defer or bounce."""
        self.why = (dsn, reason)
        if self._retry_elsewhere(dsn):
            msg.info(f"{self.queue_id}: {reason}")
            r.keep = True
            return
        self.finish(r, "deferred" if dsn.startswith("4") else "bounced", dsn, reason, relay)

    def bulk_fail(self, dsn: str, reason: str, relay: str) -> None:
        """A failure for every recipient still to do here."""
        self.why = (dsn, reason)
        todo = self.todo()
        if not todo:
            return
        if self._retry_elsewhere(dsn):
            msg.info(f"{self.queue_id}: {reason}")
            for r in todo:
                r.keep = True
            return
        self.mark_setup_done()
        for r in todo:
            self.finish(r, "deferred" if dsn.startswith("4") else "bounced", dsn, reason,
                        relay)

    def _retry_elsewhere(self, dsn: str) -> bool:
        soft = dsn.startswith("4") or (dsn.startswith("5") and self.soft_bounce)
        return soft and not self.final_server

    def sent(self, r: Rcpt, reply: "ServerReply", relay: str, dsn_passed: bool = False) -> None:
        """The server took responsibility for r: DSN action "relayed", as Postfix's
        smtp_rcpt_done(); with dsn_passed (the server announced DSN) the server sends
        any success notice, not us."""
        self.finish(r, "sent", reply.dsn, reply.text1, relay, dsn_passed)


# --- replies --------------------------------------------------------------------------------

@dataclass
class ServerReply:
    """A server reply: code, enhanced status, and its lines (bounded)."""

    code: int
    dsn: str
    lines: list[str]

    @property
    def text(self) -> str:
        """The lines, newline-separated, as Postfix keeps them."""
        return "\n".join(self.lines)

    @property
    def text1(self) -> str:
        """The lines on one line, as Postfix logs them (newlines become spaces)."""
        return " ".join(self.lines)

    @property
    def klass(self) -> int:
        """The reply's first digit."""
        return self.code // 100


def read_reply(stream, timeout: float, line_limit: int, chat=None) -> ServerReply:
    """Read one (multi-line) reply; StreamTimeout/StreamEOF from the stream propagate."""
    lines: list[str] = []
    kept = 0
    total = 0
    last = b""
    while True:
        line = stream.readline(line_limit, timeout)
        total += len(line)
        if not line.endswith(b"\n"):
            # Over-long: keep line_limit bytes, read the rest and let it go.
            while True:
                more = stream.readline(line_limit, timeout)
                total += len(more)
                if total > MAX_REPLY_BYTES:
                    raise StreamEOF("reply too long")
                if more.endswith(b"\n"):
                    break
        if total > MAX_REPLY_BYTES:
            raise StreamEOF("reply too long")
        data = line.rstrip(b"\r\n")
        if chat is not None:
            chat("<", msg.printable(data[:line_limit], None))
        head = data[:3]
        if len(head) == 3 and head.isdigit() and data[3:4] in (b"-", b" ", b""):
            if kept < MAX_REPLY_LINES and sum(len(x) for x in lines) < line_limit:
                lines.append(msg.printable(data, None))
                kept += 1
            if data[3:4] == b"-":
                continue
            last = data
            break
        # Not a reply line: ignored, as Postfix's smtp_chat_resp does.
    code = int(last[:3])
    text = last[4:].lstrip(b" ")
    m = _DSN_RE.match(text)
    if m and m.group(1) == last[:1]:
        dsn = m.group(0).decode("ascii")
    else:
        dsn = f"{last[:1].decode('ascii')}.0.0"
    return ServerReply(code, dsn, lines)


# --- message content ----------------------------------------------------------------------

class BodyWriter:
    """Queue file content (LF lines) to SMTP DATA: CRLF, dot-stuffing, line folding."""

    def __init__(self, line_limit: int):
        self.limit = line_limit
        self.col = 0            # bytes on the current output line
        self.bol = True         # at the start of an input line
        self.folded = False     # some line was longer than the limit

    def feed(self, data: bytes) -> bytes:
        """The SMTP form of the next piece of content (lines may span pieces)."""
        if not data:
            return b""
        lines = data.split(b"\n")
        if b"\n." not in data and not (self.bol and data[:1] == b".") and (
                self.limit <= 0 or (self.col + len(lines[0]) <= self.limit
                                    and max(map(len, lines)) <= self.limit)):
            # The common case, at C speed: nothing to stuff, no line to fold.
            last = lines[-1]
            if len(lines) == 1:
                self.col += len(last)
            else:
                self.col = len(last)
            self.bol = not last
            return data.replace(b"\n", b"\r\n")
        out = bytearray()
        start, n = 0, len(data)
        while start < n:
            nl = data.find(b"\n", start)
            end = n if nl < 0 else nl
            if end > start:
                self._emit(data[start:end], out)
            if nl < 0:
                break
            out += b"\r\n"
            self.col, self.bol = 0, True
            start = nl + 1
        return bytes(out)

    def _emit(self, seg: bytes, out: bytearray) -> None:
        if self.bol and seg[:1] == b".":
            out += b"."
        self.bol = False
        if self.limit <= 0:
            out += seg
            return
        pos = 0
        while pos < len(seg):
            room = self.limit - self.col
            if room <= 0:
                out += b"\r\n "
                self.col, room = 1, self.limit - 1
                self.folded = True
            piece = seg[pos:pos + room]
            out += piece
            self.col += len(piece)
            pos += len(piece)

    def finish(self) -> bytes:
        """The end of the message: a line end if one is missing, and the dot."""
        return b".\r\n" if self.bol else b"\r\n.\r\n"


# --- options --------------------------------------------------------------------------------

@dataclass
class Options:
    """What a session needs from main.cf (smtp_* or lmtp_*)."""

    helo_name: str = "localhost"
    lmtp: bool = False
    myhostname: str = ""
    timeouts: dict = field(default_factory=lambda: {
        "helo": 300, "mail": 300, "rcpt": 300, "data_init": 120, "data_xfer": 180,
        "data_done": 600, "quit": 300, "starttls": 300})
    skip_5xx_greeting: bool = True
    always_send_ehlo: bool = True
    line_limit: int = 998           # smtp_line_length_limit: folding of content
    reply_limit: int = 2048         # line_length_limit: longest reply line kept
    note_starttls_offer: bool = False
    wrappermode: bool = False
    block_early_mail_reply: bool = False    # smtp_tls_block_early_mail_reply (CVE-2009-3555)
    send_xforward: bool = False     # smtp_send_xforward_command (smtp/xforward.py)
    xforward_timeout: int = 300     # smtp_xforward_timeout
    verify_target: str = "rcpt"     # smtp_address_verify_target: where a probe stops

    @classmethod
    def from_config(cls, cfg, prefix: str = "smtp") -> "Options":
        """Options from main.cf; lmtp_* where declared, else smtp_*."""

        def p(suffix):
            name = f"{prefix}_{suffix}"
            return cfg[name] if params.lookup(name) else cfg[f"smtp_{suffix}"]
        lmtp = prefix == "lmtp"
        names = ("helo", "mail", "rcpt", "data_init", "data_xfer", "data_done", "quit")
        timeouts = {n: p(f"{n}_timeout") for n in names}
        timeouts["starttls"] = p("starttls_timeout")
        return cls(helo_name=(cfg.get("lmtp_lhlo_name") if lmtp else cfg.get("smtp_helo_name"))
                   or cfg.get("myhostname"),
                   lmtp=lmtp, myhostname=cfg.get("myhostname"), timeouts=timeouts,
                   skip_5xx_greeting=cfg["smtp_skip_5xx_greeting"],
                   always_send_ehlo=cfg["smtp_always_send_ehlo"],
                   line_limit=cfg["smtp_line_length_limit"],
                   reply_limit=max(cfg["line_length_limit"], 512),
                   note_starttls_offer=p("tls_note_starttls_offer"),
                   wrappermode=p("tls_wrappermode"),
                   block_early_mail_reply=p("tls_block_early_mail_reply"),
                   send_xforward=cfg["smtp_send_xforward_command"],
                   xforward_timeout=cfg["smtp_xforward_timeout"],
                   verify_target=p("address_verify_target").lower())


def tls_required_no(blocks) -> bool:
    """Whether the message headers hold "TLS-Required: No" (RFC 8689 section 5)."""
    data = b""
    try:
        for block in blocks:
            data += block
            end = data.find(b"\n\n")
            if end >= 0 or data.startswith(b"\n") or len(data) > 1 << 20:
                data = data[:end] if end >= 0 else data
                break
    finally:
        if hasattr(blocks, "close"):
            blocks.close()
    if data.startswith(b"\n"):
        return False
    return bool(re.search(rb"(?im)^tls-required:[ \t]*no[ \t]*$", data))


def requires_smtputf8(d: Delivery, todo: list[Rcpt]) -> bool:
    """Whether this delivery breaks the SMTPUTF8 promise without SMTPUTF8 (Postfix's
    DELIVERY_REQUIRES_SMTPUTF8): the sender asked for it, and the envelope sender, a
    recipient of this delivery or a message header is not ASCII."""
    if not d.smtputf8:
        return False
    if not d.sender.isascii() or not all(r.address.isascii() for r in todo):
        return True
    if d.content is None:
        return False
    blocks = d.content()
    try:
        first, prev = True, b""
        for block in blocks:
            if first and block.startswith(b"\n"):
                return False               # no headers
            first = False
            data = prev + block
            end = data.find(b"\n\n")
            if not (data if end < 0 else data[:end]).isascii():
                return True
            if end >= 0:
                return False
            prev = data[-1:]               # a header end may span two blocks
    finally:
        if hasattr(blocks, "close"):
            blocks.close()
    return False


# --- the session --------------------------------------------------------------------------------

class ClientSession:
    """One conversation with one server (greeting to QUIT)."""

    def __init__(self, stream, delivery: Delivery, addr, options: Options,
                 tls: TlsStarter | None = None, chat=None, port25: bool = False,
                 best_pref: int = 0, request_nexthop: str = ""):
        self.s = stream
        self._where = ""                    # what was going on, for timeout and EOF reasons
        self._best_pref = best_pref         # loop detection: 5.4.6 at the best MX, else 4.4.6
        self._nexthop = request_nexthop
        self.d = delivery
        self.addr = addr                    # nexthop.Address
        self.o = options
        self.tls = tls
        self.chat = chat
        self.port25 = port25
        self.namaddr = addr.namaddr
        self.relay = addr.namaddrport
        self.features: set[str] = set()
        self.size_limit = 0
        self.server_helo = ""
        self.tls_active = False
        self.usable = True                  # False: no more I/O (handshake failure)
        self.retry_plain = False            # try this server again without TLS
        self.quit_ok = True                 # QUIT may be sent
        self.mail_sent = False
        self._early_reply = False           # smtp_tls_block_early_mail_reply tripped

    # --- I/O --------------------------------------------------------------------------
    def _cmd(self, line: str) -> None:
        if self.chat is not None:
            self.chat(">", line)
        self.s.write(line.encode("utf-8", "surrogateescape") + b"\r\n")

    def _flush(self, timeout: float) -> None:
        self.s.flush(timeout)

    def _reply(self, timeout: float) -> ServerReply:
        reply = read_reply(self.s, timeout, self.o.reply_limit, self.chat)
        return reply

    def _except(self, exc: Exception, where: str) -> None:
        """A timeout or lost connection: every recipient still to do fails softly."""
        self.usable = False
        self.quit_ok = False
        if self.tls_active and self.d.todo():
            self._retry_as_plaintext()
        if isinstance(exc, StreamTimeout):
            reason = f"conversation with {self.namaddr} timed out while {where}"
        else:
            reason = f"lost connection with {self.namaddr} while {where}"
        self.d.bulk_fail("4.4.2", reason, self.relay)

    def _said(self, reply: ServerReply, command: str) -> str:
        return f"host {self.namaddr} said: {reply.text1} (in reply to {command} command)"

    def _site_fail(self, reply: ServerReply | None, dsn: str, reason: str) -> bool:
        if reply is not None and not dsn.startswith(("4", "5")):
            reason, dsn = "Protocol error: " + reason, "5.5.0"
        self.d.bulk_fail(dsn, reason, self.relay)
        return False

    # --- greeting, EHLO, STARTTLS -------------------------------------------------------------
    def helo(self) -> bool:
        """Greeting, EHLO/HELO/LHLO, STARTTLS; True when mail can be sent."""
        t = self.o.timeouts
        if self.o.wrappermode and self.tls is not None:
            if not self._start_tls_now():
                return False
        where = "receiving the initial server greeting"
        try:
            greeting = self._reply(t["helo"])
            if greeting.klass != 2:
                dsn = greeting.dsn
                if greeting.klass == 5 and self.o.skip_5xx_greeting:
                    dsn = "4" + dsn[1:]
                return self._site_fail(greeting, dsn, f"host {self.namaddr} refused to talk "
                                                      f"to me: {greeting.text1}")
            words = greeting.lines[0][4:].split() if greeting.lines else []
            if words and self.o.myhostname and words[0].lower() == self.o.myhostname.lower() \
                    and self.port25:
                msg.warn(f"host {self.relay} greeted me with my own hostname "
                         f"{self.o.myhostname}")
            esmtp = self.o.lmtp or self.o.always_send_ehlo or \
                any(w.upper() == "ESMTP" for w in words)
            while True:
                ok = self._ehlo(esmtp)
                if ok is not True:
                    return ok
                if self.tls_active or self.tls is None:
                    break
                started = self._maybe_starttls()
                if started is None:
                    break               # go on in plain text
                if not started:
                    return False
                esmtp = True            # after STARTTLS: EHLO again
                where = "performing the EHLO handshake"
        except (StreamTimeout, StreamEOF) as exc:
            self._except(exc, self._where or where)
            return False
        if self.d.requiretls and not self.tls_active:
            if "STARTTLS" not in self.features:
                return self._requiretls_fail("5.7.30", f"Sender requested REQUIRETLS, but "
                                                       f"TLS service was not offered by host "
                                                       f"{self.namaddr}")
        if self.d.requiretls and self.tls_active and "REQUIRETLS" not in self.features:
            return self._requiretls_fail("5.7.30", f"Sender requested REQUIRETLS, but no "
                                                   f"server was found that supports "
                                                   f"REQUIRETLS. The last attempted server "
                                                   f"was {self.namaddr}")
        if self.tls is not None and tls_policy.requires_tls(self.tls.level) \
                and not self.tls_active:
            if "STARTTLS" not in self.features:
                return self._site_fail(None, "4.7.4", f"TLS is required, but was not "
                                                      f"offered by host {self.namaddr}")
            return self._site_fail(None, "4.7.5", "TLS is required, but our TLS engine is "
                                                  "unavailable")
        sasl = getattr(self.o, "sasl", None)    # smtp/sasl.py Client, set in pre_init
        if sasl is not None:
            return sasl.helo_login(self)
        return True

    def _ehlo(self, esmtp: bool):
        """EHLO (or LHLO, or HELO after a refused EHLO); True, or False after a failure."""
        t = self.o.timeouts
        if self.o.lmtp:
            self._where = "performing the LHLO handshake"
            self._cmd(f"LHLO {self.o.helo_name}")
            self._flush(t["helo"])
            reply = self._reply(t["helo"])
            if self.tls is not None and self.tls.conn is not None:
                self.tls.save()
            if reply.klass != 2:
                return self._site_fail(reply, reply.dsn, f"host {self.namaddr} refused to "
                                                         f"talk to me: {reply.text1}")
        else:
            reply = None
            if esmtp:
                self._where = "performing the EHLO handshake"
                self._cmd(f"EHLO {self.o.helo_name}")
                self._flush(t["helo"])
                reply = self._reply(t["helo"])
                if self.tls is not None and self.tls.conn is not None:
                    self.tls.save()
                if reply.klass != 2:
                    if reply.code == 421:
                        return self._site_fail(reply, reply.dsn,
                                               f"host {self.namaddr} refused to talk to "
                                               f"me: {reply.text1}")
                    reply = None
            if reply is None:
                self._where = "performing the HELO handshake"
                self._cmd(f"HELO {self.o.helo_name}")
                self._flush(t["helo"])
                helo = self._reply(t["helo"])
                if self.tls is not None and self.tls.conn is not None:
                    self.tls.save()
                if helo.klass != 2:
                    return self._site_fail(helo, helo.dsn, f"host {self.namaddr} refused "
                                                           f"to talk to me: {helo.text1}")
                self.features = set()
                self._where = ""
                return True
        self._features(reply)
        self._where = ""
        if self.server_helo and self.o.myhostname and self.port25 and \
                self.server_helo.lower() == self.o.myhostname.lower():
            msg.warn(f"host {self.relay} replied to HELO/EHLO with my own hostname "
                     f"{self.o.myhostname}")
            dsn = "5.4.6" if self.addr.pref == self._best_pref else "4.4.6"
            return self._site_fail(None, dsn, f"mail for {self._nexthop} loops back to myself")
        return True

    def _requiretls_fail(self, dsn: str, reason: str) -> bool:
        """Postfix's SMTP_MISC_FAIL_SOFT_NON_FINAL: try the next server, else final."""
        if not self.d.final_server:
            dsn = "4" + dsn[1:]
        self.d.bulk_fail(dsn, reason, self.relay)
        return False

    def _features(self, reply: ServerReply) -> None:
        self.features = set()
        self.sasl_mechs: list[str] = []     # AUTH lines, for smtp/sasl.py
        self.xforward_attrs: set[str] = set()   # XFORWARD attributes (smtp/xforward.py)
        for n, line in enumerate(reply.lines):
            words = line[4:].replace("=", " ").split()
            if not words:
                continue
            if n == 0:
                self.server_helo = words[0]
                continue
            word = words[0].upper()
            self.features.add(word)
            if word == "XFORWARD":
                self.xforward_attrs = {w.upper() for w in words[1:]}
            if word == "AUTH":
                self.sasl_mechs += [w.upper() for w in words[1:] if w.upper() not in
                                    self.sasl_mechs]
            if word == "SIZE" and len(words) > 1:
                if words[1].isdigit():
                    self.size_limit = int(words[1])
                else:
                    msg.warn(f"bad EHLO SIZE limit \"{words[1][:50]}\" from {self.relay}")

    def _maybe_starttls(self):
        """STARTTLS when offered and wanted: True (TLS up), False (failed), None (plain)."""
        level = self.tls.level
        offered = "STARTTLS" in self.features
        if offered and self.o.note_starttls_offer and level == "none":
            msg.info(f"Host offered STARTTLS: [{self.addr.name}]")
        if not offered or not self.tls.available or tls_policy.rank(level) < tls_policy.rank("may"):
            return None
        t = self.o.timeouts
        self._where = "receiving the STARTTLS response"
        self._cmd("STARTTLS")
        self._flush(t["starttls"])
        reply = self._reply(t["starttls"])
        self._where = ""
        if reply.klass != 2:
            self.features.discard("STARTTLS")
            if self.d.requiretls:
                return self._requiretls_fail("5.7.10", f"Sender requested REQUIRETLS, but "
                                                       f"host {self.namaddr} refused to "
                                                       f"start TLS: {reply.text1}")
            if tls_policy.requires_tls(level):
                return self._site_fail(reply, reply.dsn,
                                       f"TLS is required, but host {self.namaddr} refused "
                                       f"to start TLS: {reply.text1}")
            return None
        return self._start_tls_now()

    def _start_tls_now(self) -> bool:
        """The handshake and the certificate check."""
        try:
            self.tls.start(self.s, self.addr, self.server_helo)
        except TLSStartError:
            # The peer is in an undefined state: no more I/O on this connection.
            self.usable = False
            self.quit_ok = False
            self._retry_as_plaintext()
            return self._site_fail(None, "4.7.5", "Cannot start TLS: handshake failure")
        self.tls_active = True
        self.features = set()
        if not self.tls.acceptable():
            if self.d.requiretls:
                info = self.tls.tls_info
                trusted = info is not None and info.verify_error in (62, 64)
                return self._requiretls_fail(
                    "5.7.10", f"Sender requested REQUIRETLS, but no "
                              f"{'matching' if trusted else 'trusted'} server certificate "
                              f"was found. The last attempted server was {self.namaddr}")
            self._site_fail(None, "4.7.5", "Server certificate not verified")
            return False
        return True

    def _retry_as_plaintext(self) -> bool:
        """Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE (and _AFTER_TLS_SESSION_
        FAILURE): at the may level only, for a request that has waited minimal_backoff_time,
        and never when there are SASL credentials for the server (they must not go in plain
        text, and without them a relay would refuse). As RETRY_AS_PLAINTEXT, this server is
        no longer the final one: the failure keeps the recipients for the plaintext retry."""
        if self.tls is None or self.tls.level != "may" or not self.d.plaintext_fallback:
            return False
        sasl = getattr(self.o, "sasl", None)
        if sasl is not None and sasl.has_credentials(self):
            return False
        self.retry_plain = True
        self.d.final_server = False
        return True

    # --- mail transfer -------------------------------------------------------------------------
    def xfer(self) -> None:
        """MAIL, RCPT, DATA, content and the final dot for every recipient still to do."""
        d = self.d
        todo = d.todo()
        if not todo:
            return
        d.mark_setup_done()
        if self.size_limit and d.size > self.size_limit:
            d.bulk_fail("5.3.4", f"message size {d.size} exceeds size limit "
                                 f"{self.size_limit} of server {self.namaddr}", self.relay)
            return
        utf8 = "SMTPUTF8" in self.features
        if not utf8 and requires_smtputf8(d, todo):
            d.bulk_fail("5.6.7", f"SMTPUTF8 is required, but was not offered by host "
                                 f"{self.namaddr}", self.relay)
            return
        if self.o.send_xforward and "XFORWARD" in self.features and not self._xforward():
            return
        mail = f"MAIL FROM:<{d.sender}>"
        if "SIZE" in self.features:
            mail += f" SIZE={d.size}"
        if "DSN" in self.features:
            if d.dsn_envid:
                mail += " ENVID=" + DSN.xtext_quote(d.dsn_envid.encode("ascii", "replace"))
            if d.dsn_ret:
                mail += f" RET={d.dsn_ret}"
        if utf8 and d.smtputf8:
            mail += " SMTPUTF8"
        if d.requiretls and "REQUIRETLS" in self.features:
            mail += " REQUIRETLS"
        # CVE-2009-3555 (TLS renegotiation), as Postfix's smtp_proto.c: commands injected
        # into our STARTTLS session show as a server reply that is here before our MAIL.
        self._early_reply = (self.o.block_early_mail_reply and self.tls_active
                             and not self.o.wrappermode and self._input_waiting())
        commands = [("MAIL FROM", mail, None)]
        commands += [("RCPT TO", self._rcpt_command(r), r) for r in todo]
        if not self._probe_ends_at_rcpt():
            commands.append(("DATA", "DATA", None))
        if "PIPELINING" in self.features:
            self._xfer_pipelined(commands)
        else:
            self._xfer_lockstep(commands)

    def _probe_ends_at_rcpt(self) -> bool:
        """A probe with smtp_address_verify_target = rcpt: the RCPT reply is the result."""
        return self.d.verify and self.o.verify_target == "rcpt"

    def _rcpt_command(self, r: Rcpt) -> str:
        """RCPT TO, with ORCPT and NOTIFY when the server announced DSN (smtp_proto.c:
        the DSN ORCPT, else the original recipient)."""
        line = f"RCPT TO:<{r.address}>"
        if "DSN" in self.features:
            line += " ORCPT=" + DSN.orcpt_param(r.orcpt, r.original or r.address,
                                                self.d.smtputf8)
            if r.notify:
                line += f" NOTIFY={r.notify}"
        return line

    def _xforward(self) -> bool:
        """The message's original client, before MAIL (smtp/xforward.py); False when the
        connection failed. A refusal is logged, and the delivery goes on, as Postfix."""
        timeout = self.o.xforward_timeout
        try:
            for where, what, line in xforward.commands(self.xforward_attrs, self.d.client):
                self._where = where
                self._cmd(line)
                self._flush(timeout)
                reply = self._reply(timeout)
                if reply.code // 100 != 2:
                    msg.warn(f"host {self.relay} said: {reply.text1} "
                             f"(in reply to {what} command)")
        except (StreamTimeout, StreamEOF) as exc:
            self._except(exc, self._where)
            return False
        return True

    _STATE = {"MAIL FROM": ("mail", "sending MAIL FROM"),
              "RCPT TO": ("rcpt", "sending RCPT TO"),
              "DATA": ("data_init", "sending DATA command")}

    def _xfer_pipelined(self, commands) -> None:
        t = self.o.timeouts
        state = _XferState()
        i = 0
        try:
            while i < len(commands):
                # A group of commands no larger than PIPELINE_BYTES, then its replies.
                group, size = [], 0
                while i < len(commands) and (not group or size + len(commands[i][1]) < PIPELINE_BYTES):
                    group.append(commands[i])
                    size += len(commands[i][1]) + 2
                    i += 1
                for name, line, _ in group:
                    self._cmd(line)
                where = self._STATE[group[0][0]][1]
                self._where = where
                self._flush(t[self._STATE[group[-1][0]][0]])
                for name, line, r in group:
                    key, where = self._STATE[name]
                    self._where = where
                    reply = self._reply(t[key])
                    self._handle(state, name, r, reply)
            self._after_data(state)
        except (StreamTimeout, StreamEOF) as exc:
            self._except(exc, self._where)

    def _xfer_lockstep(self, commands) -> None:
        t = self.o.timeouts
        state = _XferState()
        try:
            for name, line, r in commands:
                if name == "RCPT TO" and state.mail_rejected:
                    continue
                if name == "DATA" and (state.mail_rejected or not state.accepted):
                    break
                key, where = self._STATE[name]
                self._where = where
                self._cmd(line)
                self._flush(t[key])
                reply = self._reply(t[key])
                self._handle(state, name, r, reply)
            self._after_data(state)
        except (StreamTimeout, StreamEOF) as exc:
            self._except(exc, self._where)

    def _input_waiting(self) -> bool:
        """Whether the server has sent anything that we have not read."""
        if self.s.pending() > 0:
            return True
        try:
            return bool(select.select([self.s.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def _handle(self, state: "_XferState", name: str, r: Rcpt | None, reply: ServerReply) -> None:
        d = self.d
        if name == "MAIL FROM":
            if self._early_reply:
                state.mail_rejected = True
                d.bulk_fail("4.7.0", "unexpected server message", self.relay)
                msg.warn(f"server {self.namaddr} violates "
                         f"{'lmtp' if self.o.lmtp else 'smtp'}_tls_block_early_mail_reply policy")
            elif reply.klass != 2:
                state.mail_rejected = True
                d.bulk_fail(reply.dsn, self._said(reply, "MAIL FROM"), self.relay)
        elif name == "RCPT TO":
            if state.mail_rejected:
                return
            if reply.klass == 2:
                if self._probe_ends_at_rcpt():
                    d.sent(r, reply, self.relay)        # a probe goes no further
                else:
                    state.accepted.append(r)
            else:
                d.rcpt_fail(r, reply.dsn, self._said(reply, "RCPT TO"), self.relay)
        else:
            state.data_reply = reply

    def _after_data(self, state: "_XferState") -> None:
        """After the DATA reply: the content and the final dot, or nothing."""
        t = self.o.timeouts
        d = self.d
        reply = state.data_reply
        if reply is None:
            return                      # lock-step: no DATA was sent
        if d.verify and reply.klass == 3:
            # smtp_address_verify_target = data: the server now reads the message, so
            # nothing more may be sent on this connection, not even the dot or QUIT
            ok = ServerReply(reply.code, "2.0.0", reply.lines)
            for r in [] if state.mail_rejected else state.accepted:
                d.sent(r, ok, self.relay)
            self.quit_ok = False
            return
        if state.mail_rejected or not state.accepted:
            if reply.klass == 3:
                # A server that says 354 with nobody to deliver to: end it empty.
                self._where = "sending end of data -- message may be sent more than once"
                self._cmd(".")
                self._flush(t["data_done"])
                self._reply(t["data_done"])
            return
        if reply.klass != 3:
            d.bulk_fail(reply.dsn, self._said(reply, "DATA"), self.relay)
            return
        self._where = "sending message body"
        writer = BodyWriter(self.o.line_limit)
        pending = bytearray()
        for block in d.content():
            pending += writer.feed(block)
            if len(pending) >= WRITE_CHUNK:
                self.s.write(bytes(pending))
                pending.clear()
                self._flush(t["data_xfer"])
        if writer.folded:
            msg.info(f"{d.queue_id}: breaking line > {self.o.line_limit} bytes with "
                     f"<CR><LF>SPACE")
        pending += writer.finish()
        self.s.write(bytes(pending))
        if self.chat is not None:
            self.chat(">", ".")
        self._where = "sending end of data -- message may be sent more than once"
        self._flush(t["data_xfer"])
        self.mail_sent = True
        if self.o.lmtp:
            for r in state.accepted:
                reply = self._reply(t["data_done"])
                if reply.klass == 2:
                    d.sent(r, reply, self.relay, "DSN" in self.features)
                else:
                    d.rcpt_fail(r, reply.dsn, self._said(reply, "end of DATA"), self.relay)
            return
        reply = self._reply(t["data_done"])
        if reply.klass == 2:
            for r in state.accepted:
                d.sent(r, reply, self.relay, "DSN" in self.features)
        else:
            d.bulk_fail(reply.dsn, self._said(reply, "end of DATA"), self.relay)

    # --- connection reuse (smtp/conncache.py) ---------------------------------------------
    def rset_probe(self, timeout: float) -> bool:
        """Postfix's RSET probe before a cached connection carries another message:
        True when the server answers 2xx; False (the connection unusable) otherwise."""
        try:
            self._cmd("RSET")
            self._flush(timeout)
            reply = self._reply(timeout)
        except Exception:       # noqa: BLE001 - closed, reset, TLS alert: a new connection
            self.usable = self.quit_ok = False
            return False
        if reply.klass != 2:
            self.quit_ok = reply.code != 421
            return False
        return True

    def reuse(self, delivery: Delivery) -> None:
        """Carry another delivery over this connection (after rset_probe())."""
        self.d = delivery
        self.mail_sent = False
        self.retry_plain = False
        self._early_reply = False

    # --- the end ---------------------------------------------------------------------------
    def quit(self, timeout: float | None = None) -> None:
        """QUIT and its reply, when the connection is still in a known state; never raises.
        timeout: instead of smtp_quit_timeout (an idle cached connection's end)."""
        if not self.usable or not self.quit_ok:
            return
        t = self.o.timeouts["quit"] if timeout is None else timeout
        try:
            self._cmd("QUIT")
            self._flush(t)
            self._reply(t)
        except (StreamTimeout, StreamEOF):
            pass

    def close(self) -> None:
        """Shut TLS down cleanly (a session stays resumable) and close the connection."""
        if self.usable:
            self.s.close(timeout=min(2.0, self.o.timeouts["quit"]))
            return
        # After a failed handshake or a broken connection: no more TLS records, just go.
        self.s.tls = None
        self.s.close()


@dataclass
class _XferState:
    mail_rejected: bool = False
    accepted: list = field(default_factory=list)
    data_reply: ServerReply | None = None
