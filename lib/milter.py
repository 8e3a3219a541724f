"""milter: the Sendmail milter protocol client, as Postfix's milter8.

DESCRIPTION
    smtpd (smtpd_milters) and pickup (non_smtpd_milters) hand each connection and message
    to external mail filters through this module. A milter is named as in Postfix:
    `inet:host:port`, `unix:/path` (also `local:/path`), or the grouped form
    `{ inet:host:port, connect_timeout=10s, command_timeout=10s, content_timeout=100s,
    default_action=accept, protocol=6 }` with per-milter settings.

    Milters(cfg, list) opens no connection until conn_event(); then, per milter and in
    list order, the events go out as milter8 sends them: SMFIC_OPTNEG (protocol version,
    every action and every protocol flag of version 6), SMFIC_CONNECT, HELO, MAIL, RCPT,
    DATA, UNKNOWN, then for the message HEADER (one per logical header, Postfix's own
    first Received: header hidden), EOH, BODY (CRLF lines, 65535-byte chunks) and
    BODYEOB; ABORT after a transaction, QUIT at the end. Each event carries the macros
    that milter_*_macros name (or that the milter asked for in its negotiation reply),
    their values given by the caller's evaluate(name). The first milter whose reply is not
    "continue" decides, as Postfix's milter.c.

    A reply is Postfix's internal form: None (continue), an SMTP reply ("550 5.7.1
    Command rejected", "451 4.7.1 Service unavailable - try again later", a milter's own
    SMFIR_REPLYCODE), "D" (discard), "H" + text (quarantine: hold), or "S" (shutdown).
    At the end of the message the modification requests go to an editor object
    (add_header, chg_header, ins_header, chg_from, add_rcpt, del_rcpt, repl_body).

    A milter that cannot be reached, that times out (milter_connect_timeout,
    milter_command_timeout, milter_content_timeout) or that breaks the protocol is closed
    and answers every later event with milter_default_action: accept (no reply),
    tempfail (451 4.7.1), reject (550 5.5.0), quarantine (hold), with Postfix's warnings:
    `milter inet:127.0.0.1:8891: can't read SMFIC_OPTNEG reply packet header: Success`.

CONFIGURATION PARAMETERS
    milter_protocol (6), milter_default_action (tempfail), milter_connect_timeout (30s),
    milter_command_timeout (30s), milter_content_timeout (300s), milter_connect_macros,
    milter_helo_macros, milter_mail_macros, milter_rcpt_macros, milter_data_macros,
    milter_end_of_header_macros, milter_end_of_data_macros, milter_unknown_command_macros
    (Postfix's defaults); soft_bounce (no) turns a milter's 5XX reply into 4XX.

DEVIATIONS
    milter_header_checks applies to the headers milters add, insert or change (the
    cleanup stage's header_checks actions, logged as `milter-header-reject` etc.).
    milter_macro_defaults and smtpd_milter_maps are not implemented. The message goes to
    the milters from memory (at most message_size_limit bytes), not from the queue file.

SEE ALSO
    smtpd/session.py, lib/cleanup.py, pickup/service.py; Postfix MILTER_README,
    src/milter/milter8.c.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct

from . import msg, params
from .maincf import ConfigError

# commands (MTA -> milter)
SMFIC_ABORT, SMFIC_BODY, SMFIC_CONNECT, SMFIC_MACRO = b"A", b"B", b"C", b"D"
SMFIC_BODYEOB, SMFIC_HELO, SMFIC_HEADER, SMFIC_MAIL = b"E", b"H", b"L", b"M"
SMFIC_EOH, SMFIC_OPTNEG, SMFIC_QUIT, SMFIC_RCPT = b"N", b"O", b"Q", b"R"
SMFIC_DATA, SMFIC_UNKNOWN = b"T", b"U"
SMFIC_NAMES = {SMFIC_ABORT: "SMFIC_ABORT", SMFIC_BODY: "SMFIC_BODY",
               SMFIC_CONNECT: "SMFIC_CONNECT", SMFIC_MACRO: "SMFIC_MACRO",
               SMFIC_BODYEOB: "SMFIC_BODYEOB", SMFIC_HELO: "SMFIC_HELO",
               SMFIC_HEADER: "SMFIC_HEADER", SMFIC_MAIL: "SMFIC_MAIL",
               SMFIC_EOH: "SMFIC_EOH", SMFIC_OPTNEG: "SMFIC_OPTNEG",
               SMFIC_QUIT: "SMFIC_QUIT", SMFIC_RCPT: "SMFIC_RCPT",
               SMFIC_DATA: "SMFIC_DATA", SMFIC_UNKNOWN: "SMFIC_UNKNOWN"}

# replies (milter -> MTA)
SMFIR_NAMES = {b"+": "SMFIR_ADDRCPT", b"-": "SMFIR_DELRCPT", b"2": "SMFIR_ADDRCPT_PAR",
               b"4": "SMFIR_SHUTDOWN", b"a": "SMFIR_ACCEPT", b"b": "SMFIR_REPLBODY",
               b"c": "SMFIR_CONTINUE", b"d": "SMFIR_DISCARD", b"e": "SMFIR_CHGFROM",
               b"f": "SMFIR_CONN_FAIL", b"h": "SMFIR_ADDHEADER", b"i": "SMFIR_INSHEADER",
               b"l": "SMFIR_SETSYMLIST", b"m": "SMFIR_CHGHEADER", b"p": "SMFIR_PROGRESS",
               b"q": "SMFIR_QUARANTINE", b"r": "SMFIR_REJECT", b"s": "SMFIR_SKIP",
               b"t": "SMFIR_TEMPFAIL", b"y": "SMFIR_REPLYCODE", b"O": "SMFIC_OPTNEG"}

# actions the MTA allows (SMFIF_*): all of them
SMFIF_ALL = 0x1FF
# protocol flags (SMFIP_*)
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH = 1, 2, 4, 8, 0x10, 0x20, 0x40
NR_HDR, NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x80, 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
NR_DATA, NR_UNKN, NR_EOH, NR_BODY, HDR_LEADSPC = 0x10000, 0x20000, 0x40000, 0x80000, 0x100000
NOSEND_MASK = NOCONNECT | NOHELO | NOMAIL | NORCPT | NOBODY | NOHDRS | NOEOH | NOUNKNOWN \
    | NODATA
V2_MASK = NOCONNECT | NOHELO | NOMAIL | NORCPT | NOBODY | NOHDRS | NOEOH
EVENT_MASKS = {6: V2_MASK | NOUNKNOWN | NODATA | SKIP | RCPT_REJ | NR_HDR | NR_CONN
               | NR_HELO | NR_MAIL | NR_RCPT | NR_DATA | NR_UNKN | NR_EOH | NR_BODY
               | HDR_LEADSPC,
               4: V2_MASK | NOUNKNOWN | NODATA, 3: V2_MASK | NOUNKNOWN, 2: V2_MASK}

# macro stages (SMFIM_*) and their parameters
CONNECT, HELO, ENVFROM, ENVRCPT, DATA, EOM, EOH = range(7)
UNKNOWN = 99                    # no SMFIM code: milter_unknown_command_macros
MACRO_PARAMS = {CONNECT: "milter_connect_macros", HELO: "milter_helo_macros",
                ENVFROM: "milter_mail_macros", ENVRCPT: "milter_rcpt_macros",
                DATA: "milter_data_macros", EOM: "milter_end_of_data_macros",
                EOH: "milter_end_of_header_macros", UNKNOWN: "milter_unknown_command_macros"}

CHUNK = 65535                   # body chunk, as MILTER_CHUNK_SIZE
MAX_DATA = 1 << 26              # a reply packet larger than this is a protocol error
DEFAULT_ACTIONS = ("accept", "reject", "tempfail", "quarantine", "shutdown")
REJECT = "550 5.7.1 Command rejected"
TEMPFAIL = "451 4.7.1 Service unavailable - try again later"

CLOSED, READY, ENVELOPE, MESSAGE, ACCEPT_CON, REJECT_CON, ACCEPT_MSG, ERROR = range(8)
_REPLY = re.compile(r"^[45]\d\d(?:[ -](?:[45]\.\d{1,3}\.\d{1,3}\b)?.*)?$", re.S)


class _Broken(Exception):
    """The milter stream failed; the warning has been logged."""


class Spec:
    """One milter of a smtpd_milters-style list, with its own settings."""

    def __init__(self, name: str, cfg, attrs: dict[str, str]):
        self.name = name
        transport, _, endpoint = name.partition(":")
        if not endpoint or transport not in ("inet", "unix", "local"):
            raise ConfigError(f"Milter service needs transport:endpoint instead of "
                              f"\"{name}\"" if not endpoint else
                              f"invalid transport name: {transport} in Milter service: "
                              f"{name}")
        self.transport, self.endpoint = transport, endpoint
        if transport == "inet":
            host, _, port = endpoint.rpartition(":")
            if not host or not port:
                raise ConfigError(f"Milter service {name}: need host:port")
            self.address = (host.strip("[]"), port)
        else:
            self.address = endpoint
        values = {"connect_timeout": cfg.get("milter_connect_timeout"),
                  "command_timeout": cfg.get("milter_command_timeout"),
                  "content_timeout": cfg.get("milter_content_timeout"),
                  "default_action": cfg.get("milter_default_action"),
                  "protocol": cfg.get("milter_protocol")}
        for key, value in attrs.items():
            if key not in values:
                raise ConfigError(f"bad Milter attribute name: {key}={value} "
                                  f"in Milter service: {name}")
            values[key] = value
        try:
            self.timeouts = {k: params.convert(params.lookup(f"milter_{k}"),
                                               values[k])
                             for k in ("connect_timeout", "command_timeout",
                                       "content_timeout")}
        except params.ParamError as exc:
            raise ConfigError(f"Milter service {name}: {exc}") from None
        self.default_action = values["default_action"].strip()
        words = params.split_list(values["protocol"])
        versions = [int(w) for w in words if w.isdigit()]
        if len(versions) != 1 or versions[0] not in EVENT_MASKS or \
                any(not w.isdigit() and w != "no_header_reply" for w in words):
            raise ConfigError(f"milter_protocol: bad protocol information: "
                              f"{values['protocol']}")
        self.version = versions[0]
        self.events = EVENT_MASKS[self.version] | \
            (NR_HDR if "no_header_reply" in words else 0)


def parse(text: str, cfg) -> list[Spec]:
    """A smtpd_milters or non_smtpd_milters value; ConfigError when it is malformed."""
    specs, pos = [], 0
    text = text.strip()
    while pos < len(text):
        c = text[pos]
        if c in " \t\r\n,":
            pos += 1
            continue
        if c == "{":
            end = text.find("}", pos)
            if end < 0:
                raise ConfigError(f"missing '}}' in Milter list: {text}")
            words = [w for w in re.split(r"[\s,]+", text[pos + 1:end]) if w]
            pos = end + 1
            if not words:
                raise ConfigError(f"empty '{{}}' in Milter list: {text}")
            attrs = {}
            for w in words[1:]:
                key, eq, value = w.partition("=")
                if not eq:
                    raise ConfigError(f"missing '=' after attribute name: {w} in "
                                      f"Milter service: {words[0]}")
                attrs[key] = value
            specs.append(Spec(words[0], cfg, attrs))
            continue
        m = re.compile(r"[^\s,{}]+").match(text, pos)
        if not m:
            raise ConfigError(f"bad Milter list: {text}")
        specs.append(Spec(m.group(0), cfg, {}))
        pos = m.end()
    return specs


def macro_lists(cfg) -> dict[int, list[str]]:
    return {stage: params.split_list(cfg.get(name)) for stage, name in MACRO_PARAMS.items()}


def _strerror(exc: BaseException | None) -> str:
    if exc is None:
        return "Success"                # EOF: errno unset, as Postfix's %m shows it
    if isinstance(exc, socket.timeout):
        return os.strerror(errno.ETIMEDOUT)
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


def _cstr(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape").replace(b"\0", b"") + b"\0"


class Milter:
    """One milter application: its connection, negotiated masks and state."""

    def __init__(self, spec: Spec, macros: dict[int, list[str]], soft_bounce: bool = False):
        self.spec = spec
        self.name = spec.name
        self.macros = dict(macros)
        self.sock: socket.socket | None = None
        self.state = CLOSED
        self.def_reply: str | None = None
        self.skip_event: bytes | None = None
        self.version = spec.version
        self.rq_mask = self.ev_mask = self.np_mask = 0
        self.timeout = spec.timeouts["command_timeout"]
        self.soft_bounce = soft_bounce

    # --- errors, as milter8_comm_error and milter8_conf_error --------------------------
    def _close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None

    def comm_error(self) -> str | None:
        self._close()
        action = self.spec.default_action.lower()
        if action == "accept":
            reply = None
        elif action == "reject":
            reply = "550 5.5.0 Service unavailable"
        elif action == "tempfail":
            reply = TEMPFAIL
        elif action == "shutdown":
            reply = "421 4.7.1 Service unavailable - try again later"
        elif action == "quarantine":
            reply = "Hdefault_action"
        else:
            msg.warn(f"milter {self.name}: unrecognized default action: "
                     f"{self.spec.default_action}")
            reply = "451 4.3.5 Server configuration problem - try again later"
        self.def_reply, self.state = reply, ERROR
        return reply

    def conf_error(self) -> str | None:
        self._close()
        action = self.spec.default_action.lower()
        reply = None if action == "accept" else \
            "421 4.3.5 Server configuration problem - try again later" \
            if action == "shutdown" else "Hdefault_action" if action == "quarantine" \
            else "451 4.3.5 Server configuration problem - try again later"
        self.def_reply, self.state = reply, ERROR
        return reply

    # --- packets -----------------------------------------------------------------------
    def _write(self, cmd: bytes, data: bytes = b"") -> None:
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)
        except OSError as exc:
            msg.warn(f"milter {self.name}: error writing command: {_strerror(exc)}")
            self.comm_error()
            raise _Broken from None

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def _read(self, event: bytes) -> tuple[bytes, bytes]:
        """One reply packet: (command, data)."""
        try:
            self.sock.settimeout(self.timeout)
            head = self._read_exact(4)
        except (OSError, EOFError) as exc:
            msg.warn(f"milter {self.name}: can't read {SMFIC_NAMES.get(event, '(unknown MTA event)')} "
                     f"reply packet header: {_strerror(None if isinstance(exc, EOFError) else exc)}")
            self.comm_error()
            raise _Broken from None
        length = struct.unpack("!I", head)[0]
        if length < 1:
            msg.warn(f"milter {self.name}: bad packet length: {length}")
        elif length > MAX_DATA:
            msg.warn(f"milter {self.name}: unreasonable packet length: {length} > {MAX_DATA}")
        else:
            try:
                cmd = self._read_exact(1)
            except (OSError, EOFError) as exc:
                msg.warn(f"milter {self.name}: EOF while reading command code: "
                         f"{_strerror(None if isinstance(exc, EOFError) else exc)}")
            else:
                try:
                    return cmd, self._read_exact(length - 1)
                except (OSError, EOFError) as exc:
                    msg.warn(f"milter {self.name}: EOF while reading data: "
                             f"{_strerror(None if isinstance(exc, EOFError) else exc)}")
        self.comm_error()
        raise _Broken

    def _strings(self, data: bytes, count: int | None) -> list[str]:
        parts = data.split(b"\0")
        if parts[-1] != b"" or (count is not None and len(parts) - 1 < count):
            msg.warn(f"milter {self.name}: missing string null termimator")
            self.comm_error()
            raise _Broken
        return [p.decode("utf-8", "surrogateescape") for p in parts[:-1]]

    # --- negotiation --------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and negotiate (milter8_connect); the state is READY or ERROR."""
        spec = self.spec
        try:
            if spec.transport == "inet":
                self.sock = socket.create_connection(spec.address,
                                                     spec.timeouts["connect_timeout"])
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(spec.timeouts["connect_timeout"])
                self.sock.connect(spec.address)
        except OSError as exc:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            msg.warn(f"connect to Milter service {self.name}: {_strerror(exc)}")
            self.comm_error()
            return
        try:
            self._write(SMFIC_OPTNEG, struct.pack("!III", spec.version, SMFIF_ALL,
                                                  spec.events))
        except _Broken:
            msg.warn(f"milter {self.name}: write error in initial handshake")
            return
        try:
            cmd, data = self._read(SMFIC_OPTNEG)
        except _Broken:
            msg.warn(f"milter {self.name}: read error in initial handshake")
            return
        if cmd != SMFIC_OPTNEG:
            msg.warn(f"milter {self.name}: unexpected reply \"{cmd.decode('latin-1')}\" "
                     "in initial handshake")
            self.comm_error()
            return
        if len(data) < 12:
            msg.warn(f"milter {self.name}: input packet too short for network long")
            msg.warn(f"milter {self.name}: read error in initial handshake")
            self.comm_error()
            return
        self.version, self.rq_mask, self.ev_mask = struct.unpack("!III", data[:12])
        if self.version > spec.version:
            msg.warn(f"milter {self.name}: protocol version {self.version} conflict with "
                     f"MTA protocol version {spec.version}")
            self.comm_error()
            return
        if self.rq_mask & SMFIF_ALL != self.rq_mask:
            msg.warn(f"milter {self.name}: request mask 0x{self.rq_mask:x} conflict with "
                     f"MTA request mask 0x{SMFIF_ALL:x}")
            self.comm_error()
            return
        if self.version < spec.version:
            for version in sorted(EVENT_MASKS, reverse=True):
                if version <= self.version:
                    self.np_mask |= NOSEND_MASK & ~EVENT_MASKS[version]
                    break
            else:
                msg.warn(f"milter {self.name}: unexpected protocol version {self.version}")
        self.state, self.def_reply, self.skip_event = READY, None, None
        rest = data[12:]
        while rest:                     # the milter's own macro lists (SMFIR_SETSYMLIST)
            if len(rest) < 5 or b"\0" not in rest[4:]:
                msg.warn(f"milter {self.name}: missing string null termimator")
                self.comm_error()
                return
            stage = struct.unpack("!I", rest[:4])[0]
            end = rest.index(b"\0", 4)
            names = rest[4:end].decode("utf-8", "surrogateescape")
            rest = rest[end + 1:]
            if stage not in MACRO_PARAMS or stage == UNKNOWN:
                msg.warn(f"milter {self.name}: ignoring unknown macro type {stage}")
            else:
                self.macros[stage] = params.split_list(names)

    # --- events -------------------------------------------------------------------------
    def event(self, event: bytes, no_flag: int, nr_flag: int, macros: list | None,
              data: bytes = b"", editor=None, timeout: float | None = None) -> str | None:
        """Send one event and read its reply (milter8_event); the reply."""
        if self.sock is None or self.def_reply is not None and self.state == ERROR:
            return self.def_reply
        if no_flag & self.np_mask:
            return self.def_reply
        if self.skip_event is not None:
            if event == self.skip_event:
                return self.def_reply
            self.skip_event = None
        self.timeout = self.spec.timeouts["command_timeout"] if timeout is None else timeout
        try:
            if macros:
                self._write(SMFIC_MACRO, event + b"".join(_cstr(n) + _cstr(v)
                                                          for n, v in macros))
            if no_flag & self.ev_mask:
                return self.def_reply
            self._write(event, data)
            if nr_flag & self.ev_mask:
                return self.def_reply
            return self._replies(event, editor)
        except _Broken:
            return self.def_reply

    def _replies(self, event: bytes, editor) -> str | None:
        in_connect = event in (SMFIC_CONNECT, SMFIC_HELO)
        edit_reply = None
        space = "" if self.ev_mask & HDR_LEADSPC else " "
        while True:
            cmd, data = self._read(event)
            if cmd in (b"p", b"c", b"a", b"d", b"r", b"t", b"s", b"4") and data:
                msg.warn(f"milter {self.name}: reply {SMFIR_NAMES.get(cmd, 'unknown')} was "
                         f"followed by {len(data)} data bytes")
                self.comm_error()
                return self.def_reply
            if cmd == b"p":
                continue
            if cmd == b"c":
                return self._end(self.def_reply, edit_reply)
            if cmd == b"a":
                self.state = ACCEPT_CON if in_connect else ACCEPT_MSG
                return self._end(self.def_reply, edit_reply)
            if cmd == b"d":
                if in_connect:
                    msg.warn(f"milter {self.name}: DISCARD action is not allowed "
                             "for connect or helo")
                    return self.def_reply
                self.state = ACCEPT_MSG
                return self._end("D", edit_reply)
            if cmd in (b"r", b"t"):
                reply = REJECT if cmd == b"r" else TEMPFAIL
                if in_connect:
                    self.state, self.def_reply = REJECT_CON, reply
                return self._end(reply, edit_reply)
            if cmd == b"4":
                self.state, self.def_reply = REJECT_CON, "S"
                return "S"
            if cmd == b"y":
                text = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                if not _REPLY.match(text):
                    msg.warn(f"milter {self.name}: malformed reply: {text}")
                    return self.conf_error()
                if self.soft_bounce:        # 5XX becomes 4XX, as Postfix's milter8
                    text = "\r\n".join(
                        ("4" + line[1:4] + ("4" + line[5:] if line[4:5] == "5" else line[4:]))
                        if line[:1] == "5" else line for line in text.split("\r\n"))
                if in_connect:
                    self.state, self.def_reply = REJECT_CON, text
                return self._end(text, edit_reply)
            if cmd == b"q":
                text = data.rstrip(b"\0").decode("utf-8", "surrogateescape")[:100]
                self.def_reply = "H" + text
                continue
            if cmd == b"s":
                self.skip_event = event
                return self._end(self.def_reply, edit_reply)
            if event == SMFIC_BODYEOB and editor is not None and cmd in b"mhie+2-b":
                if cmd == b"b":
                    if edit_reply is None:
                        edit_reply = editor.repl_body(data)
                    continue
                if cmd in (b"m", b"i"):
                    if len(data) < 4:
                        msg.warn(f"milter {self.name}: input packet too short for "
                                 "network long")
                        self.comm_error()
                        return self.def_reply
                    index = struct.unpack("!i", data[:4])[0]
                    name, value = self._strings(data[4:], 2)[:2]
                    if edit_reply is not None:
                        continue
                    if cmd == b"m":
                        index = index or 1
                        if index < 1:
                            msg.warn(f"milter {self.name}: bad change header index: {index}")
                            return self.conf_error()
                        if not name:
                            msg.warn(f"milter {self.name}: null change header name")
                            return self.conf_error()
                        edit_reply = editor.chg_header(index, name, space + value) \
                            if value else editor.del_header(index, name)
                    else:
                        if index + 1 < 1:
                            msg.warn(f"milter {self.name}: bad insert header index: {index}")
                            return self.conf_error()
                        edit_reply = editor.ins_header(index + 1, name, space + value)
                    continue
                strings = self._strings(data, 2 if cmd == b"h" else 1)
                if edit_reply is not None:
                    continue
                if cmd == b"h":
                    edit_reply = editor.add_header(strings[0], space + strings[1])
                elif cmd == b"e":
                    edit_reply = editor.chg_from(strings[0], " ".join(strings[1:]))
                elif cmd in (b"+", b"2"):
                    edit_reply = editor.add_rcpt(strings[0], " ".join(strings[1:]))
                elif cmd == b"-":
                    edit_reply = editor.del_rcpt(strings[0])
                continue
            msg.warn(f"milter {self.name}: unexpected filter response "
                     f"{SMFIR_NAMES.get(cmd, '(unknown filter reply)')} after event "
                     f"{SMFIC_NAMES.get(event, '(unknown MTA event)')}")
            self.comm_error()
            return self.def_reply

    @staticmethod
    def _end(reply, edit_reply):
        """An edit that failed wins over a reply that accepts (milter8_event's end)."""
        if edit_reply is not None and (reply is None or reply[0] not in "DS4"):
            return edit_reply
        return reply

    def quit(self) -> None:
        if self.sock is not None:
            try:
                self.timeout = self.spec.timeouts["command_timeout"]
                self._write(SMFIC_QUIT)
            except _Broken:
                pass
            self._close()
        self.state = CLOSED

    def abort(self) -> None:
        if self.sock is not None and self.state in (ENVELOPE, MESSAGE, ACCEPT_MSG):
            try:
                self._write(SMFIC_ABORT)
            except _Broken:
                return
        if self.state in (ENVELOPE, MESSAGE, ACCEPT_MSG):
            self.state = READY


def _family(addr: str) -> tuple[bytes, bool]:
    if addr.startswith("/"):
        return b"L", False
    return (b"6", True) if ":" in addr else (b"4", True)


class Milters:
    """The milters of one smtpd session (or one pickup message), in list order."""

    def __init__(self, specs: list[Spec], cfg, evaluate):
        macros = macro_lists(cfg)
        self.milters = [Milter(s, macros, cfg["soft_bounce"]) for s in specs]
        self.evaluate = evaluate        # macro name -> value or None

    def _macros(self, m: Milter, stage: int) -> list:
        out = []
        for name in m.macros.get(stage, ()):
            value = self.evaluate(name)
            if value is not None:
                out.append((name, value))
        return out

    def _each(self, states, call) -> str | None:
        for m in self.milters:
            if m.state == ERROR:
                reply = m.def_reply
            elif m.state in states:
                reply = call(m)
            elif m.state in (ACCEPT_CON, REJECT_CON):
                reply = m.def_reply
            else:
                reply = None
            if reply is not None:
                return reply
        return None

    def conn_event(self, name: str, addr: str, port: str) -> str | None:
        def send(m: Milter):
            family, inet = _family(addr)
            data = _cstr(name) + family
            if inet:
                try:
                    data += struct.pack("!H", int(port or 0))
                except (ValueError, struct.error):
                    msg.warn(f"milter {m.name}: bad client port number {port}")
                    data += struct.pack("!H", 0)
            data += _cstr(addr)
            return m.event(SMFIC_CONNECT, NOCONNECT, NR_CONN, self._macros(m, CONNECT), data)
        for m in self.milters:
            if m.state == CLOSED:
                m.connect()
        return self._each((READY,), send)

    def helo_event(self, helo: str) -> str | None:
        return self._each((READY,), lambda m: m.event(
            SMFIC_HELO, NOHELO, NR_HELO, self._macros(m, HELO), _cstr(helo)))

    def mail_event(self, args: list[str]) -> str | None:
        def send(m: Milter):
            m.state, m.def_reply = ENVELOPE, None     # a new transaction
            return m.event(SMFIC_MAIL, NOMAIL, NR_MAIL, self._macros(m, ENVFROM),
                           b"".join(_cstr(a) for a in args))
        return self._each((READY,), send)

    def rcpt_event(self, args: list[str], rejected: bool = False) -> str | None:
        def send(m: Milter):
            if rejected and not m.ev_mask & RCPT_REJ:
                return None
            return m.event(SMFIC_RCPT, NORCPT, NR_RCPT, self._macros(m, ENVRCPT),
                           b"".join(_cstr(a) for a in args))
        return self._each((ENVELOPE,), send)

    def data_event(self) -> str | None:
        return self._each((ENVELOPE,), lambda m: m.event(
            SMFIC_DATA, NODATA, NR_DATA, self._macros(m, DATA)))

    def unknown_event(self, command: str) -> str | None:
        return self._each((READY, ENVELOPE), lambda m: m.event(
            SMFIC_UNKNOWN, NOUNKNOWN, NR_UNKN, self._macros(m, UNKNOWN), _cstr(command)))

    def message(self, editor) -> str | None:
        """The message (editor.headers() and editor.body() give its current form) to each
        milter in turn, with the end-of-message edits applied through editor."""
        for m in self.milters:
            if m.state == ERROR:
                reply = m.def_reply
            elif m.state in (ACCEPT_CON, REJECT_CON):
                reply = m.def_reply
            elif m.state != ENVELOPE:
                reply = None
            else:
                m.state = MESSAGE
                reply = self._message(m, editor)
                if m.state == MESSAGE:
                    m.state = READY
                elif m.state == ACCEPT_MSG:
                    m.state = READY
            if reply is not None:
                return reply
        return None

    def _message(self, m: Milter, editor) -> str | None:
        content = m.spec.timeouts["content_timeout"]
        eoh = self._macros(m, EOH)
        eod = self._macros(m, EOM)
        lead = m.ev_mask & HDR_LEADSPC
        for name, value in editor.visible_headers():
            if not lead and value.startswith(" "):
                value = value[1:]
            reply = m.event(SMFIC_HEADER, NOHDRS, NR_HDR, eoh,
                            _cstr(name) + _cstr(value), timeout=content)
            if reply is not None or m.state != MESSAGE:
                return reply
        reply = m.event(SMFIC_EOH, NOEOH, NR_EOH, eoh, timeout=content)
        if reply is not None or m.state != MESSAGE:
            return reply
        body = editor.body().replace(b"\n", b"\r\n")
        for start in range(0, len(body), CHUNK):
            reply = m.event(SMFIC_BODY, NOBODY, NR_BODY, eod, body[start:start + CHUNK],
                            timeout=content)
            if reply is not None or m.state != MESSAGE:
                return reply
        editor.begin_milter(m.name)
        reply = m.event(SMFIC_BODYEOB, 0, 0, eod, editor=editor, timeout=content)
        return editor.end_milter(reply)

    def abort(self) -> None:
        for m in self.milters:
            m.abort()

    def disc_event(self) -> None:
        for m in self.milters:
            m.quit()


_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class Message:
    """A message in memory as the milters see and edit it (Postfix's cleanup_milter):
    the header section as a list of [name, value] (value as written after the colon,
    folded lines joined with LF), the body as bytes (LF line ends). The first Received:
    header, Postfix's own, is hidden from the milters: header indexes of change requests
    count the visible headers, insert positions count every header (cleanup_milter.c)."""

    def __init__(self, content: bytes, owner):
        self.owner = owner              # add_recipient / del_recipient / set_sender
        self.headers: list[list] = []   # [name, value, hidden]
        self.blank = False
        pos, end = 0, len(content)
        hidden_done = False
        while pos < end:
            nl = content.find(b"\n", pos)
            line = content[pos:nl if nl >= 0 else end]
            nxt = end if nl < 0 else nl + 1
            if line[:1] in (b" ", b"\t") and self.headers:
                self.headers[-1][1] += "\n" + line.decode("utf-8", "surrogateescape")
                pos = nxt
                continue
            m = _HEADER_NAME.match(line)
            if not m:
                if not line and nl >= 0:
                    self.blank, pos = True, nxt
                break
            name = m.group(1).decode("utf-8", "surrogateescape")
            value = line[line.index(b":") + 1:].decode("utf-8", "surrogateescape")
            hidden = not hidden_done and name.lower() == "received"
            hidden_done = hidden_done or hidden
            self.headers.append([name, value, hidden])
            pos = nxt
        self._body = content[pos:]
        self._new_body: bytearray | None = None
        self.milter = ""

    # --- what the milters see --------------------------------------------------------------
    def visible_headers(self):
        return [(h[0], h[1]) for h in self.headers if not h[2]]

    def body(self) -> bytes:
        return self._body

    def content(self) -> bytes:
        out = bytearray()
        for name, value, _ in self.headers:
            out += f"{name}:{value}\n".encode("utf-8", "surrogateescape")
        if self.blank or self.headers and self._body:
            out += b"\n"
        out += self._body
        return bytes(out)

    # --- the end-of-message requests -------------------------------------------------------
    def begin_milter(self, name: str) -> None:
        self.milter, self._new_body = name, None

    def end_milter(self, reply):
        if self._new_body is not None:
            body = bytes(self._new_body).replace(b"\r\n", b"\n")
            self._body, self._new_body = body, None
        return reply

    def _find(self, index: int, name: str) -> int | None:
        """The position of the index-th visible header called name (1-based)."""
        seen = 0
        for pos, (hname, _, hidden) in enumerate(self.headers):
            if not hidden and hname.lower() == name.lower():
                seen += 1
                if seen == index:
                    return pos
        return None

    def _checked(self, name: str, value: str) -> list[list]:
        """The header after milter_header_checks (the owner's), as [name, value, False]."""
        check = getattr(self.owner, "milter_header_check", None)
        lines = [f"{name}:{value}"] if check is None else check(name, value)
        out = []
        for line in lines:
            hname, _, hvalue = line.partition(":")
            out.append([hname.strip(), hvalue, False])
        return out

    def add_header(self, name: str, value: str):
        self.headers += self._checked(name, value)

    def chg_header(self, index: int, name: str, value: str):
        pos = self._find(index, name)
        if pos is None:
            self.add_header(name, value)     # as Postfix: a missing header is added
        else:
            self.headers[pos:pos + 1] = self._checked(name, value)

    def del_header(self, index: int, name: str):
        pos = self._find(index, name)
        if pos is not None:
            del self.headers[pos]

    def ins_header(self, position: int, name: str, value: str):
        # position 1 is the top, before Postfix's own Received: header
        at = max(0, min(position - 1, len(self.headers)))
        self.headers[at:at] = self._checked(name, value)

    def repl_body(self, data: bytes):
        if self._new_body is None:
            self._new_body = bytearray()
        if len(self._new_body) + len(data) > MAX_DATA:
            return "451 4.3.0 Error: queue file write error"
        self._new_body += data

    def chg_from(self, sender: str, args: str):
        return self.owner.milter_chg_from(sender.strip().removeprefix("<").removesuffix(">"),
                                          args)

    def add_rcpt(self, rcpt: str, args: str):
        return self.owner.milter_add_rcpt(rcpt.strip().removeprefix("<").removesuffix(">"),
                                          args)

    def del_rcpt(self, rcpt: str):
        return self.owner.milter_del_rcpt(rcpt.strip().removeprefix("<").removesuffix(">"))


def local_macros(cfg, writer):
    """Macro values for mail that did not come through smtpd (cleanup_milter_eval): it
    comes from localhost[127.0.0.1]; writer is the lib/cleanup.Cleanup of the message."""
    fixed = {"{daemon_name}": cfg.get("milter_macro_daemon_name"),
             "v": cfg.get("milter_macro_v"), "_": "localhost [127.0.0.1]",
             "j": cfg.get("myhostname"), "{client_addr}": "127.0.0.1",
             "{client_name}": "localhost", "{client_port}": "0",
             "{client_ptr}": "localhost"}

    def evaluate(name: str) -> str | None:
        if name in fixed:
            return fixed[name]
        if name == "i":
            return writer.id
        if name == "{mail_addr}":
            return writer.sender
        if name == "{rcpt_addr}":
            return getattr(writer, "milter_rcpt", None)
        return None
    return evaluate


def emulate_envelope(ms: Milters, writer, rcpts: list[str]) -> None:
    """Connect, EHLO, MAIL, RCPT and DATA for local mail, as Postfix's
    cleanup_milter_emul_*: localhost[127.0.0.1] over ESMTP. A verdict goes to the
    writer (milter_apply); a milter cannot reject one recipient of a local submission."""
    steps = [("CONNECT", lambda: ms.conn_event("localhost", "127.0.0.1", "0")),
             ("EHLO", lambda: ms.helo_event("localhost")),
             ("MAIL", lambda: ms.mail_event([f"<{writer.sender or ''}>"]))]
    for where, call in steps:
        reply = call()
        if reply is not None:
            writer.milter_apply(where, reply)
            return
    for rcpt in rcpts:
        writer.milter_rcpt = rcpt
        reply = ms.rcpt_event([f"<{rcpt}>"])
        if reply is not None and reply[0] in "45S":
            msg.warn(f"{writer.id}: milter configuration error: can't reject recipient "
                     "in non-smtpd(8) submission")
            msg.warn(f"{writer.id}: message not accepted, try again later")
            writer.milter_apply("RCPT", "451 4.3.5 Server configuration error")
            return
        if reply is not None:
            writer.milter_apply("RCPT", reply)
    writer.milter_rcpt = None
    reply = ms.data_event()
    if reply is not None:
        writer.milter_apply("DATA", reply)
