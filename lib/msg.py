"""Diagnostics and the mail log, in Postfix's formats.

Every program of postfix-py reports through this module, so that log lines look like
Postfix's and the tools that read Postfix logs keep working:

    Nov 25 11:05:43 mail postfix-py/smtpd[1234]: warning: hostname nope does not resolve

DESTINATIONS
    init(service, ...) chooses where lines go. With `maillog_file` set, lines are appended to
    that file (`/dev/stdout` and `/dev/stderr` work, for containers) with Postfix's timestamp
    and host name. Otherwise lines go to syslog through `/dev/log` with `syslog_facility`;
    the socket is connected at init, before any chroot, and reconnected on failure.
    init_cli(program) is for command-line tools: lines go to standard error as
    `program: warning: text`, as Postfix's postconf and postmap print them.

FUNCTIONS
    info(text), warn(text), error(text): log with Postfix's `warning: ` or `error: ` prefix.
    fatal(text): log `fatal: text`, then raise FatalError (a SystemExit with status 1), for
        "cannot go on as configured"; the text names the file or parameter.
    panic(text): log `panic: text` and raise PanicError (status 2), for broken invariants.
    verbose(level, text): logged only when the -v count is at least `level`.
    printable(data, limit=100, utf8=True) -> str: peer-supplied text (bytes or str) fit
        for a log line, a reply or a header, as Postfix's printable(): at most `limit`
        characters (None: no limit), each character that is not printable replaced with
        `?`. ASCII keeps 0x20 .. 0x7e. With utf8 (Postfix's util_utf8_enable, which
        follows smtputf8_enable, on by default in Postfix 3.x) non-ASCII text is kept
        when it is valid UTF-8 (bytes) and its characters are printable (str.isprintable:
        no C1 control, no line or paragraph separator, no lone surrogate, no non-breaking
        or other Unicode space); each byte of an invalid UTF-8 sequence becomes one `?`.
        Without utf8 every non-ASCII byte or character becomes `?`, and bytes are read as
        Latin-1, one character per byte. Postfix lets any well-formed multi-byte sequence
        pass; this rule also refuses the non-printable code points, so that no terminal
        control reaches a log.
    set_tag(tag): replace the tag before `[pid]` (postlog -t), after init.
    info_as(service, text): an info line under `NAME/service[pid]`, NAME being
        base_name(syslog_name): for the work Postfix does in another daemon, which
        postfix-py does in this one (smtpd and pickup log cleanup's
        `QUEUEID: message-id=<...>` as `postfix/cleanup[pid]`, so that the tools that
        read Postfix's log find it where Postfix puts it).
    base_name(syslog_name) -> the part before the first `/` (`postfix` for a service's
        `-o syslog_name=postfix/submission`); process titles start with it too.
    name() -> base_name of the syslog_name given to init(): the master names its workers
        with it (`process postfix/smtpd pid 1234 exit status 1`).
    pid() -> this process's id, without a system call: glibc no longer caches getpid(),
        and a worker names itself in every log line, status report and queue file name.
        The id is taken at import and again in the child of every os.fork()
        (os.register_at_fork), so a forked worker never reports its master's.

Input from a peer or a client program is never worth more than a warning.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time

FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
    "local6": 22, "local7": 23,
}
_SEVERITY = {"info": 6, "warning": 4, "error": 3, "fatal": 2, "panic": 0}
MAX_LINE = 4096  # a single log record; longer text is cut, never wrapped
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")   # C0 but TAB, DEL, C1
SYSLOG_PATH = "/dev/log"


def printable(data: bytes | str, limit: int | None = 100, utf8: bool = True) -> str:
    """Peer-supplied text, cut at limit characters, with non-printables replaced by `?`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data if limit is None else data[:limit * 4 if utf8 else limit])
        text = raw.decode("utf-8", "surrogateescape") if utf8 else raw.decode("latin-1")
    else:
        text = data
    if limit is not None:
        text = text[:limit]
    if text.isascii() and text.isprintable():
        return text
    if utf8:
        return "".join(c if c.isprintable() else "?" for c in text)
    return "".join(c if " " <= c <= "~" else "?" for c in text)


class FatalError(SystemExit):
    """Raised by fatal(): the program cannot go on as configured."""

    def __init__(self, text: str):
        super().__init__(1)
        self.text = text

    def __str__(self) -> str:
        return self.text


class PanicError(SystemExit):
    """Raised by panic(): one of our own invariants broke."""

    def __init__(self, text: str):
        super().__init__(2)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _State:
    tag = "postfix-py"          # the part before [pid]: syslog_name/service, or the program
    name = "postfix-py"         # base_name(syslog_name), for info_as()
    with_pid = True
    sink = "stderr"             # "stderr", "file" or "syslog"
    stream = None               # file object for "file"
    sock = None                 # socket for "syslog"
    facility = FACILITIES["mail"]
    hostname = socket.gethostname().split(".")[0]
    verbose = 0
    lock = threading.Lock()


_s = _State()
_pid = os.getpid()
_stamp = (None, "")          # (second, its timestamp text): a busy daemon logs many a second


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """This process's id (see the module's FUNCTIONS)."""
    return _pid


def _timestamp() -> str:
    """Postfix's log time stamp (`Dec  6 02:09:36`), formatted once per second."""
    global _stamp
    now = int(time.time())
    if _stamp[0] != now:
        _stamp = (now, time.strftime("%b %e %H:%M:%S", time.localtime(now)))
    return _stamp[1]


def init(service: str, syslog_name: str = "postfix-py", maillog_file: str = "",
         syslog_facility: str = "mail", verbose: int = 0) -> None:
    """Send this daemon's lines to maillog_file, or to syslog when it is empty."""
    close()
    _s.tag, _s.with_pid, _s.verbose = f"{syslog_name}/{service}", True, verbose
    _s.name = base_name(syslog_name)
    if syslog_facility not in FACILITIES:
        raise ValueError(f"unknown syslog_facility: {syslog_facility}")
    _s.facility = FACILITIES[syslog_facility]
    if maillog_file:
        # Line-buffered append; the fd survives chroot and privilege drop.
        _s.stream = open(maillog_file, "a", buffering=1, encoding="utf-8",
                         errors="backslashreplace")
        _s.sink = "file"
    else:
        _s.sink = "syslog"
        _syslog_connect()


def init_cli(program: str, verbose: int = 0) -> None:
    """Send a command-line tool's lines to standard error as `program: text`."""
    close()
    _s.tag, _s.with_pid, _s.sink, _s.verbose = program, False, "stderr", verbose


def base_name(syslog_name: str) -> str:
    """syslog_name up to its first `/`: the mail system's name without the service's."""
    return syslog_name.split("/", 1)[0] or "postfix-py"


def name() -> str:
    """The mail system's name in this process's log lines (see base_name)."""
    return _s.name


def set_tag(tag: str) -> None:
    """Log under another tag (Postfix's postlog -t); the destination stays."""
    _s.tag = tag


def close() -> None:
    """Release the log file or syslog socket (before exec, or in tests)."""
    if _s.stream is not None and _s.stream not in (sys.stdout, sys.stderr):
        try:
            _s.stream.close()
        except OSError:
            pass
    if _s.sock is not None:
        _s.sock.close()
    _s.stream = _s.sock = None
    _s.sink = "stderr"


def _syslog_connect() -> None:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.connect(SYSLOG_PATH)
        except OSError:
            sock.close()
            continue
        _s.sock = sock
        return
    _s.sock = None


def _format(severity: str, text: str, tag: str | None = None) -> str:
    prefix = "" if severity == "info" else severity + ": "
    # Peer-supplied text can hold anything; keep one record on one line, and no control
    # character (a terminal escape) reaches the log: `?`, as Postfix's printable().
    if not text.isprintable():      # CR and LF are not: printable text needs no step
        text = text.replace("\r", "\\r").replace("\n", "\\n")
        if not text.isprintable():
            text = _CONTROL.sub("?", text)
    tag = tag or _s.tag
    tag = f"{tag}[{_pid}]" if _s.with_pid else tag
    return f"{tag}: {prefix}{text}"[:MAX_LINE]


def _emit(severity: str, text: str, tag: str | None = None) -> None:
    line = _format(severity, text, tag)
    with _s.lock:
        if _s.sink == "syslog":
            stamp = _timestamp()
            pri = _s.facility * 8 + _SEVERITY[severity]
            record = f"<{pri}>{stamp} {line}".encode("utf-8", "backslashreplace")
            for _ in range(2):
                if _s.sock is None:
                    _syslog_connect()
                if _s.sock is None:
                    break
                try:
                    _s.sock.send(record)
                    return
                except OSError:
                    _s.sock.close()
                    _s.sock = None
            _write(sys.stderr, line)  # no syslog: better stderr than silence
        elif _s.sink == "file":
            _write(_s.stream, f"{_timestamp()} {_s.hostname} {line}")
        else:
            _write(sys.stderr, line)


def _write(stream, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a log that cannot be written must not take the mail system down


def info(text: str) -> None:
    """Log an informational line."""
    _emit("info", text)


def info_as(service: str, text: str) -> None:
    """Log an informational line as the mail system's `service` (see base_name)."""
    _emit("info", text, f"{_s.name}/{service}" if _s.with_pid else None)


def warn(text: str) -> None:
    """Log `warning: text`."""
    _emit("warning", text)


def error(text: str) -> None:
    """Log `error: text`."""
    _emit("error", text)


def fatal(text: str) -> None:
    """Log `fatal: text` and stop the program with exit status 1."""
    _emit("fatal", text)
    raise FatalError(text)


def panic(text: str) -> None:
    """Log `panic: text` and stop the program with exit status 2."""
    _emit("panic", text)
    raise PanicError(text)


def verbose(level: int, text: str) -> None:
    """Log text when the verbosity (the -v count) is at least level."""
    if _s.verbose >= level:
        _emit("info", text)
