"""Writing one message into a maildir or an mbox file, as Postfix's local(8) and virtual(8)
write it, with the recipient's privileges.

These functions do the file work; local/service.py and virtual/service.py decide where and
with whose privileges, and run the work through run_as(). Each prepends the headers
Postfix's local and virtual agents add:

    Return-Path: <sender>            (<> for the null sender)
    X-Original-To: original          (the recipient's original address: as given, before
                                      rewriting and alias expansion; left out with
                                      enable_original_recipient = no)
    Delivered-To: recipient          (its local part quoted as in X-Original-To:, case kept,
                                      as Postfix's mail_copy; also the loop detector)

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

PRIVILEGES (run_as)
    run_as(privs, work) runs work(drop) in a forked child that sets its groups, gid and uid
    to privs' for good (before work runs, or when work calls drop() with
    privs.open_as_root) and reports work's [result, dsn, reason] through a pipe; the parent
    never changes identity. A child that dies or raises defers the recipient (4.3.0, with
    `PROGRAM delivery error: ...` or the warning `delivery process PID ended with ...`).
    When the process is not root, work runs in process with its own privileges, unless
    file_limit asks for a child: file_limit > 0 sets RLIMIT_FSIZE in the child (Postfix's
    set_file_limit: a write past it fails with EFBIG, which mbox_dsn() makes 5.2.2).

FUNCTIONS
    Privileges(uid, gid, open_as_root=False)
    run_as(privs, work, program="local", file_limit=0) -> (result, dsn, reason)
    added_headers(sender, recipient, original=None) -> bytes
    delivered_to(content) -> set of lower-cased Delivered-To: addresses in the header
    delivered_key(address) -> the form of address that delivered_to()'s set holds when a
        Delivered-To: header names it (quoted, lower-cased: Postfix's delivered_hdr_find)
    deliver_maildir(path, headers, content, hostname=None, now=None) -> new file name
    deliver_mbox(path, sender, headers, content, fd=None, now=None)
    open_mbox(path) -> (fd, created); write_all(fd, data)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import socket
import time

from . import msg
from .server import critical
from .tok822 import quote_822_local

LOCK_WAIT = 10.0
REPORT_LIMIT = 65536           # bytes of a child's report read at most
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


def added_headers(sender: str, recipient: str, original: str | None = None) -> bytes:
    """Return-Path, X-Original-To and Delivered-To, as Postfix's local adds them.
    original: the recipient's original address (None: recipient itself); "" leaves
    X-Original-To: out (enable_original_recipient = no, as Postfix's mail_copy)."""
    if original is None:
        original = recipient
    # quoted as Postfix's mail_copy does (quote_822_local): `"john doe"@example.org`
    x_original = f"X-Original-To: {quote_822_local(original)}\n" if original else ""
    return (f"Return-Path: <{sender}>\n{x_original}"
            f"Delivered-To: {quote_822_local(recipient)}\n").encode("utf-8", "surrogateescape")


def delivered_key(address: str) -> str:
    """address as delivered_to() holds it when a Delivered-To: header names it: quoted
    as added_headers() writes it, then lower-cased (Postfix's delivered_hdr_find)."""
    return quote_822_local(address).lower()


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
    """Open (or create) an mbox file for appending: (fd, created). Non-blocking, as
    Postfix's mbox_open(): a FIFO without a reader fails (ENXIO) instead of hanging."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        pass
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        return os.open(path, flags), False


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


class Privileges:
    """Whose identity a delivery uses."""

    def __init__(self, uid: int, gid: int, open_as_root: bool = False):
        self.uid, self.gid, self.open_as_root = uid, gid, open_as_root


def become(uid: int, gid: int) -> None:
    """Set groups, gid and uid for good (child side only)."""
    os.setgroups([gid])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def run_as(privs: Privileges | None, work, program: str = "local",
           file_limit: int = 0) -> tuple[str, str, str]:
    """Run work(drop) in a child with privs; its (result, dsn, reason)."""
    root = privs is not None and os.geteuid() == 0
    if not root and file_limit <= 0:
        return work(lambda: None)
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            if file_limit > 0:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
            dropped = []

            def drop():
                if root and not dropped:
                    become(privs.uid, privs.gid)
                    dropped.append(True)
            if not (privs and privs.open_as_root):
                drop()
            out = work(drop)
            os.write(w, json.dumps(out).encode())
            status = 0
        except BaseException as exc:       # report, never run the parent's code
            try:
                os.write(w, json.dumps(["deferred", "4.3.0",
                                        f"{program} delivery error: {exc}"]).encode())
            except BaseException:
                pass
        finally:
            os._exit(status)
    os.close(w)
    data = b""
    try:
        while len(data) <= REPORT_LIMIT and (chunk := os.read(r, 65536)):
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        kind, dsn, reason = json.loads(data)
        return kind, dsn, reason
    except (ValueError, TypeError):
        why = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"status {os.WEXITSTATUS(status)}")
        msg.warn(f"delivery process {pid} ended with {why}")
        return "deferred", "4.3.0", f"{program} delivery process failed"
