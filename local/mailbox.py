"""Writing one message into a maildir or an mbox file, as Postfix's local(8) writes it.

These functions do the file work only; local/service.py decides where and with whose
privileges. Each prepends the headers Postfix's local agent adds:

    Return-Path: <sender>            (<> for the null sender)
    X-Original-To: recipient
    Delivered-To: recipient          (lower-cased; also the loop detector)

MAILDIR (deliver_maildir)
    The message is written to DIR/tmp/TIME.PPID.HOST (created with mode 0600; tmp/, new/
    and cur/ are created with mode 0700 when missing), fsynced, then linked to
    DIR/new/TIME.VdevIinodeMusec.HOST (maildir.c's unique name) and the tmp/ name removed;
    new/ is fsynced so that the name survives a crash. link() never replaces a file.

MBOX (deliver_mbox)
    The file is opened for append (created 0600), locked with fcntl (Postfix's default
    lock on Linux; waits up to LOCK_WAIT seconds), and gets a `From sender  date` line, the
    headers, the content with lines starting `From ` quoted as `>From `, and an empty line;
    it is fsynced. A failed write truncates the file back to where it was.

ERRORS
    MailboxError(dsn, text): 4.3.1 when the file system is full, 5.2.2 when the mailbox is
    over quota or too large (EDQUOT, EFBIG), 4.2.0 otherwise, so that a problem an
    administrator can fix defers the mail rather than bouncing it.

FUNCTIONS
    added_headers(sender, recipient) -> bytes
    delivered_to(content) -> set of lower-cased Delivered-To: addresses in the header
    deliver_maildir(path, headers, content, hostname=None, now=None) -> new file name
    deliver_mbox(path, sender, headers, content, fd=None, now=None)
    open_mbox(path) -> (fd, created); write_all(fd, data)
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time

from ..lib.server import critical

LOCK_WAIT = 10.0
_FROM_LINE = re.compile(rb"(?m)^From ")


class MailboxError(Exception):
    """A delivery that did not happen: dsn (4.x.x or 5.x.x) and a reason."""

    def __init__(self, dsn: str, text: str):
        super().__init__(text)
        self.dsn, self.text = dsn, text


def mbox_dsn(err: int | None, default: str = "4.2.0") -> str:
    """Postfix's mbox_dsn(): the status of a mailbox write error."""
    if err == errno.ENOSPC:
        return "4.3.1"
    if err in (errno.EDQUOT, errno.EFBIG):
        return "5.2.2"
    return default


def added_headers(sender: str, recipient: str) -> bytes:
    """Return-Path, X-Original-To and Delivered-To, as Postfix's local adds them."""
    return (f"Return-Path: <{sender}>\nX-Original-To: {recipient}\n"
            f"Delivered-To: {recipient.lower()}\n").encode("utf-8", "surrogateescape")


def delivered_to(content: bytes) -> set[str]:
    """Addresses of the Delivered-To: headers already in the message (loop detection)."""
    found = set()
    for line in content.split(b"\n"):
        if not line.strip():
            break
        if line[:13].lower() == b"delivered-to:":
            found.add(line[13:].strip().decode("utf-8", "replace").lower())
    return found


def _hostname() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver_maildir(path: str, headers: bytes, content: bytes, hostname: str | None = None,
                    now: float | None = None) -> str:
    """Deliver into the maildir at path (ending in /); the new file's path."""
    host = hostname or _hostname()
    now = time.time() if now is None else now
    sec, usec = int(now), int((now % 1) * 1e6)
    tmpdir, newdir, curdir = (os.path.join(path, d) for d in ("tmp", "new", "cur"))
    tmpfile = os.path.join(tmpdir, f"{sec}.P{os.getpid()}.{host}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        try:
            fd = os.open(tmpfile, flags, 0o600)
        except FileNotFoundError:
            os.makedirs(tmpdir, 0o700, exist_ok=True)
            fd = os.open(tmpfile, flags, 0o600)
    except OSError as exc:
        raise MailboxError(mbox_dsn(exc.errno), f"maildir delivery failed: create maildir "
                           f"file {tmpfile}: {exc.strerror}") from None
    newfile = None
    try:
        try:
            st = os.fstat(fd)
            newfile = os.path.join(newdir, f"{sec}.V{st.st_dev:x}I{st.st_ino:x}M{usec}.{host}")
            write_all(fd, headers)
            write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmpfile, newfile)
        except FileNotFoundError:
            os.makedirs(curdir, 0o700, exist_ok=True)
            os.makedirs(newdir, 0o700, exist_ok=True)
            os.link(tmpfile, newfile)
        _fsync_dir(newdir)
    except OSError as exc:
        raise MailboxError(mbox_dsn(exc.errno), f"maildir delivery failed: "
                           f"{'link to ' + newfile if newfile else 'write ' + tmpfile}: "
                           f"{exc.strerror}") from None
    finally:
        try:
            os.unlink(tmpfile)
        except OSError:
            pass
    return newfile


def open_mbox(path: str) -> tuple[int, bool]:
    """Open (or create) an mbox file for appending: (fd, created)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW), False
    except FileNotFoundError:
        pass
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                       | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600), True
    except FileExistsError:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW), False


def deliver_mbox(path: str, sender: str, headers: bytes, content: bytes, fd: int | None = None,
                 now: float | None = None) -> None:
    """Append the message to the mbox file at path (or to the open fd), locked."""
    now = time.time() if now is None else now
    own = fd is None
    try:
        if own:
            fd, _ = open_mbox(path)
    except OSError as exc:
        raise MailboxError(mbox_dsn(exc.errno, "5.2.0"),
                           f"cannot open file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000) == 0o100000:
            raise MailboxError("5.2.0", f"destination {path} is not a regular file")
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or \
                        time.monotonic() > deadline:
                    raise MailboxError("4.2.0", f"unable to lock for exclusive access: "
                                       f"{exc.strerror}") from None
                time.sleep(0.1)
        end = os.lseek(fd, 0, os.SEEK_END)
        stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(now))
        body = _FROM_LINE.sub(b">From ", content)
        if body and not body.endswith(b"\n"):
            body += b"\n"
        data = (f"From {sender or 'MAILER-DAEMON'}  {stamp}\n".encode("utf-8", "surrogateescape")
                + headers + body + b"\n")
        # Under critical(): `postfix-py stop` must not leave half a message in the mbox.
        with critical():
            try:
                write_all(fd, data)
                os.fsync(fd)
            except OSError as exc:
                try:
                    os.ftruncate(fd, end)
                except OSError:
                    pass
                raise MailboxError(mbox_dsn(exc.errno), f"error writing message: "
                                   f"{exc.strerror}") from None
    finally:
        if own:
            os.close(fd)
