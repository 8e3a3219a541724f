"""`postfix-py sendmail`: the Sendmail-compatible local submission command.

SYNOPSIS
    postfix-py [-c config_dir] sendmail [-C config_dir] [-t] [-i] [-oi] [-f sender]
        [-F full_name] [-bm | -bs | -bv] [-v] [recipient ...]
    postfix-py [-c config_dir] sendmail -bi [-C config_dir] [-oA/path/aliases] [-v]

DESCRIPTION
    Reads a message from standard input and hands it to the mail system through the
    pickup service (pickup/service.py) over queue_directory/public/pickup: any user may
    submit; the daemon, not this command, writes the queue file, and records the
    submitting user from the kernel (submit_uid, submit_user, and
    `Received: by host (postfix-py, from userid N)`).

    -bm (default)  read the message from standard input. Lines may end in LF or CRLF. A
                   line with only `.` ends the message unless -i or -oi is given. A
                   leading UNIX `From ` line is dropped.
    -bs            speak SMTP on standard input and output (Postfix's stand-alone smtpd):
                   the pickup daemon serves the session; it never offers STARTTLS or
                   AUTH. non_smtpd_milters, not smtpd_milters, inspect its mail, as with
                   Postfix, where it goes through postdrop and pickup to cleanup.
    -bv            do not read or deliver a message: verify each recipient address and
                   mail the sender a report ("Mail Delivery Status Report", each address
                   deliverable or undeliverable, with the reason). As Postfix's: a probe
                   message (From:, Subject: probe, To:) with the queue file attribute
                   trace_flags=512 goes through routing and rewriting, and the delivery
                   agents go as far as delivery without delivering. Says "Mail Delivery
                   Status Report will be mailed to <sender>." on standard output.
    -bi            initialize the alias database, as newaliases (tools/postalias.py):
                   build every table of alias_database, or with -oA/path that file
                   (type default_database_type unless given); no recipient allowed.
                   Exit status 0, or 1 on a fatal error, as postalias's.
    -t             also take recipients from the To:, Cc: and Bcc: headers (Resent-To:,
                   Resent-Cc:, Resent-Bcc: when the message has Resent- headers).
                   Bcc: headers are removed from every local submission.
    -i, -oi        a line with only `.` is message content.
    -f sender      the envelope sender (`<>` or an empty argument: the null sender);
                   default: the invoking user's login name, qualified with $myorigin by
                   the daemon. The real uid is recorded whatever -f says. -r is the same.
    -F full_name   the name in an added From: header; default: $NAME, else the GECOS
                   field of the invoking user.
    -C dir         configuration directory (or a main.cf file in it); also -c before the
                   verb, and $MAIL_CONFIG.
    -v             report the queue id on standard error.
    -B, -N, -R, -V, -X, -h, -o*, -e, -m, -n, -U, -G, -I, -L, -O, -x
                   accepted and ignored, as Postfix ignores most of them.
    -bd, -bp, -q   refused (no daemon mode or mailq here; see postfix-py postqueue).

    When the mail system is not running, the message is not queued: sendmail says so
    and exits 75 (EX_TEMPFAIL). (Postfix's postdrop would leave it in the world-unreadable
    maildrop directory for later; postfix-py has no set-gid program and no
    world-writable queue directory, so the daemon must take it.)

EXIT STATUS
    0 queued; 64 usage; 65 the message or an address was refused; 67 unknown user;
    75 temporary failure (the mail system is down, or could not queue now).

SEE ALSO
    pickup/service.py, Postfix sendmail(1).
"""

from __future__ import annotations

import email.utils
import getopt
import os
import pwd
import select
import socket
import sys

from ..lib import attr, maincf, msg, verify_client
from ..lib import queue as Q
from . import postalias

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_SOFTWARE, EX_TEMPFAIL = 0, 64, 65, 67, 70, 75
OPTIONS = "B:C:F:GIL:N:O:R:UV:X:b:e:f:h:imno:p:r:q:tvx"
CHUNK = 65536
TIMEOUT = 300
USAGE = ("usage: postfix-py sendmail [-C config_dir] [-t] [-i] [-oi] [-f sender] "
         "[-F full_name] [-bm | -bs | -bv | -bi] [-v] [recipient ...]")


class Failure(Exception):
    """sendmail cannot go on; status is the exit status."""

    def __init__(self, text: str, status: int):
        super().__init__(text)
        self.status = status


def _fatal(text: str, status: int) -> int:
    try:
        msg.fatal(text)
    except msg.FatalError:
        pass
    return status


def newaliases(config: str | None, alias_map: str | None, rcpts: list[str],
               verbose: bool) -> int:
    """sendmail -bi: newaliases' own code (tools/postalias.alias_init), on -oA's file
    when given, as Postfix's sendmail runs `postalias -- $alias_database`."""
    if rcpts:
        return _fatal("alias initialization mode requires no recipient", EX_USAGE)
    msg.init_cli("newaliases", verbose=int(verbose))
    try:
        return postalias.alias_init(config, None if alias_map is None else [alias_map])
    except msg.FatalError:
        return 1


# --- input ----------------------------------------------------------------------------------
def read_message(fd: int, ignore_dots: bool) -> bytes:
    """The message from fd with LF line ends, up to EOF or a lone `.` (without -i)."""
    chunks, buf = [], b""
    first = True
    while True:
        data = os.read(fd, CHUNK)
        buf += data
        lines = buf.split(b"\n")
        buf = lines.pop()           # an unfinished line, or b""
        if not data and buf:
            lines.append(buf)       # the last line had no LF
            buf = b""
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if first:
                first = False
                if line.startswith(b"From "):
                    continue
            if not ignore_dots and line == b".":
                return b"".join(chunks)
            chunks.append(line + b"\n")
        if not data:
            return b"".join(chunks)


def probe_message(sender: str, rcpts: list[str]) -> bytes:
    """sendmail -bv's message, as Postfix's: From: the sender, Subject: probe, and a To:
    header with the recipients."""
    lines = [f"From: {sender}"] if sender else []
    lines.append("Subject: probe")
    if rcpts:
        lines.append("To:")
        lines += [f"\t{r}{',' if i < len(rcpts) - 1 else ''}" for i, r in enumerate(rcpts)]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field."""
    fields: list[list[str]] = []
    for raw in message.split(b"\n"):
        if not raw:
            break
        line = raw.decode("utf-8", "surrogateescape")
        if line[:1] in (" ", "\t") and fields:
            fields[-1][1] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or any(c <= " " or c > "~" for c in name):
            break
        fields.append([name.lower(), value.strip()])
    return [(n, v) for n, v in fields]


def header_recipients(message: bytes) -> list[str]:
    """Recipients of -t: To, Cc, Bcc, or their Resent- forms when Resent- headers exist."""
    fields = header_fields(message)
    resent = any(n.startswith("resent-") for n, _ in fields)
    wanted = {"resent-to", "resent-cc", "resent-bcc"} if resent else {"to", "cc", "bcc"}
    values = [v for n, v in fields if n in wanted]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


# --- the invoking user ----------------------------------------------------------------------
def login_name(uid: int) -> str:
    """The invoking user's login name; Failure when the uid has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise Failure(f"no login name found for user ID {uid}", EX_NOUSER) from None


def full_name(uid: int) -> str:
    """$NAME, else the GECOS name of uid (& is the capitalised login name)."""
    name = os.environ.get("NAME")
    if name is not None:
        return name
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return ""
    gecos = pw.pw_gecos.split(",", 1)[0]
    return gecos.replace("&", pw.pw_name[:1].upper() + pw.pw_name[1:])


# --- the pickup service ---------------------------------------------------------------------
def connect(cfg) -> socket.socket:
    """A connection to queue_directory/public/pickup; Failure when the system is down."""
    path = os.path.join(Q.queue_root(cfg), "public", "pickup")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise Failure(f"cannot connect to the mail system ({path}): "
                      f"{exc.strerror or exc}; is postfix-py running?", EX_TEMPFAIL) from None
    return sock


def submit(cfg, sender: str, fullname: str, rcpts: list[str], message: bytes,
           trace: bool = False) -> str:
    """Queue one message through pickup; its queue id, or Failure. trace: sendmail
    -bv's probe (trace_flags 512, Postfix's DEL_REQ_FLAG_USR_VRFY)."""
    sock = connect(cfg)
    try:
        try:
            first = {"request": "submit", "sender": sender}
            if fullname:
                first["fullname"] = fullname
            if trace:
                first["trace_flags"] = str(verify_client.TRACE_FLAG_REPORT)
            attr.write_frame(sock, first, TIMEOUT)
            for rcpt in rcpts:
                attr.write_frame(sock, {"rcpt": rcpt}, TIMEOUT)
            for start in range(0, len(message), CHUNK):
                attr.write_frame(sock, {"data": message[start:start + CHUNK]}, TIMEOUT)
            attr.write_frame(sock, {"end": "1"}, TIMEOUT)
            reply = attr.read_frame(sock, TIMEOUT)
        except (OSError, attr.AttrError) as exc:
            raise Failure(f"lost connection to the mail system: {exc}", EX_TEMPFAIL) from None
    finally:
        sock.close()
    status = attr.reply_status(reply)
    if status == attr.STATUS_OK:
        return reply.get("queue_id", b"").decode("ascii", "replace")
    reason = reply.get("reason", b"unknown error").decode("utf-8", "replace")
    raise Failure(reason, EX_DATAERR if status == attr.STATUS_BAD else EX_TEMPFAIL)


def smtp_session(cfg, in_fd: int = 0, out_fd: int = 1) -> int:
    """sendmail -bs: relay standard input and output to an SMTP session in pickup."""
    sock = connect(cfg)
    try:
        attr.write_frame(sock, {"request": "smtp"}, TIMEOUT)
        sock.setblocking(False)
        reading_in = True
        while True:
            fds = [sock.fileno()] + ([in_fd] if reading_in else [])
            ready, _, _ = select.select(fds, [], [], TIMEOUT)
            if not ready:
                raise Failure("timeout talking to the mail system", EX_TEMPFAIL)
            if sock.fileno() in ready:
                try:
                    data = sock.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    data = None
                if data == b"":
                    return EX_OK
                if data:
                    _write_all(out_fd, data)
            if reading_in and in_fd in ready:
                data = os.read(in_fd, CHUNK)
                if not data:
                    reading_in = False
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.setblocking(True)
                    sock.sendall(data)
                    sock.setblocking(False)
    except (BrokenPipeError, ConnectionError) as exc:
        raise Failure(f"lost connection to the mail system: {exc}", EX_TEMPFAIL) from None
    finally:
        sock.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# --- the command ----------------------------------------------------------------------------
def _config_dir(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `-c dir` (from `postfix-py -c dir sendmail`) off the front of argv."""
    config = None
    while len(argv) >= 2 and argv[0] == "-c":
        config, argv = argv[1], argv[2:]
    return config, argv


def main(argv: list[str]) -> int:
    """Run sendmail with argv (without the program name); returns the exit status."""
    msg.init_cli("sendmail")
    config, argv = _config_dir(list(argv))
    try:
        opts, rcpts = getopt.getopt(argv, OPTIONS)
    except getopt.GetoptError as exc:
        print(f"sendmail: {exc}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    mode, extract, ignore_dots, sender, fullname, verbose = "m", False, False, None, None, False
    alias_map = None
    for opt, value in opts:
        if opt == "-C":
            config = os.path.dirname(value) if value.endswith("main.cf") else value
        elif opt == "-b":
            mode = value[:1]
        elif opt == "-t":
            extract = True
        elif opt == "-i" or (opt == "-o" and value == "i"):
            ignore_dots = True
        elif opt == "-o" and value.startswith("A"):
            if not value[1:]:
                return _fatal("-oA requires pathname", EX_USAGE)
            alias_map = value[1:]
        elif opt in ("-f", "-r"):
            sender = value
        elif opt == "-F":
            fullname = value
        elif opt == "-v":
            verbose = True
        elif opt == "-q":
            return _fatal("-q (queue runs) is not supported; use postfix-py flush", EX_USAGE)
    if mode == "i":
        return newaliases(config, alias_map, rcpts, verbose)
    if mode not in ("m", "s", "v"):
        what = {"d": "-bd (daemon mode): use postfix-py start",
                "p": "-bp (mailq): use postfix-py postqueue -p"}.get(mode, f"-b{mode}")
        return _fatal(f"{what} is not supported", EX_USAGE)
    if mode == "v" and extract:
        return _fatal("-t option cannot be used with -bv", EX_USAGE)
    try:
        cfg = maincf.load(config)
    except maincf.ConfigError as exc:
        return _fatal(str(exc), EX_TEMPFAIL)
    try:
        if mode == "s":
            return smtp_session(cfg)
        uid = os.getuid()
        if sender is None:
            sender = login_name(uid)
        sender = sender.strip()
        if sender.startswith("<") and sender.endswith(">"):
            sender = sender[1:-1]
        if fullname is None:
            fullname = full_name(uid)
        message = probe_message(sender, rcpts) if mode == "v" else \
            read_message(0, ignore_dots)
        if extract:
            rcpts = list(rcpts) + header_recipients(message)
        rcpts = [addr for _, addr in email.utils.getaddresses(rcpts) if addr]
        if not rcpts:
            raise Failure("No recipient addresses found in message header" if extract else
                          "Recipient addresses must be specified on the command line or "
                          "via the -t option", EX_USAGE)
        qid = submit(cfg, sender, fullname, rcpts, message, trace=mode == "v")
    except Failure as exc:
        return _fatal(str(exc), exc.status)
    if mode == "v":
        print(f"Mail Delivery Status Report will be mailed to <{sender}>.", flush=True)
    if verbose:
        print(f"sendmail: queued as {qid}", file=sys.stderr)
    return EX_OK
