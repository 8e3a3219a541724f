"""Queue files: the durable form of a message between smtpd and delivery.

A message lives in one file under queue_directory, first in incoming/, then active/, and
deferred/ or hold/ as the queue manager decides. The file is written once, sequentially,
and committed before anyone is told about it (STYLE item 14): smtpd writes it under a
dot-name in incoming/, ends it with an END record, fsyncs it, renames it to its queue id,
and only then answers `250 2.0.0 Ok: queued as ID` and wakes qmgr. As Postfix's cleanup,
it does not fsync the directory: the file was created under its dot name before the
content, so the file's fsync makes that name durable, and recover_incoming() renames a
complete dot file whose rename a crash lost. A reader skips dot-files and refuses a file
without END.

FORMAT
    magic  b"PFXQ1\\n"
    record type (1 byte) + length (4 bytes, big-endian) + data (length bytes)

    T  arrival time, seconds since the epoch (ASCII decimal, with fraction)
    W  the same, for a message whose delayed-mail warning was sent: qmgr rewrites the T
       record's type byte in place (mark_warned), as it marks recipients done, so that a
       message is warned about once (Postfix rewrites its queue file's warning time)
    A  attribute `name=value` (client_name, client_address, helo_name, protocol,
       sasl_method, sasl_username, tls_*, submit_uid, ...); repeated
    S  envelope sender (empty for the null sender <>); exactly one
    R  recipient address; one per recipient. Delivered or bounced recipients have the
       type byte rewritten in place to D (done), with one pwrite and fsync, so that a
       crash never forgets a result and never repeats more than the one in flight.
    D  a recipient that is done
    N  DSN NOTIFY of the next R record (RFC 3461: NEVER, or SUCCESS,FAILURE,DELAY);
       optional, absent in files of older versions
    O  DSN ORCPT of the next R record (`type;address`, decoded); optional
    G  the original recipient of the next R record: the address as given (RCPT TO, a
       sendmail argument) before canonical_maps, virtual_alias_maps and local's alias
       or .forward expansion (Postfix's REC_TYPE_ORCP; not the DSN ORCPT above). Only
       when it differs from the R record's address: absent, the original is the
       recipient itself (as in files of older versions); absent too with
       enable_original_recipient = no
    M  start of content
    B  a block of message content (at most BLOCK bytes): the message as received, with
       lines ending in LF and dot-stuffing removed
    X  end of content; data: the content size in bytes (ASCII decimal)
    E  end of file; nothing may follow

QUEUE IDS
    As Postfix's short ids: five hex digits of microseconds and the file's inode number in
    hex, e.g. `4C1A21F3E8B`. Unique while the file exists.

QUEUE ROOT
    queue_root(cfg) -> str: where the queue is, for a program outside the jail (master,
        tools): queue_directory. A worker uses WorkerContext.queue_root (lib/server.py),
        which is "/" inside the chroot jail and queue_root(cfg) outside it; qmgr, whose
        working directory is the queue, uses ".". Nothing else spells it.
    INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, DEFER, BOUNCE, MAILDROP: the names of its
        subdirectories (SUBDIRS lists them all).

FUNCTIONS
    QueueWriter(queue_root, now=None): create a file in incoming/; add_attr, set_sender,
        add_recipient(rcpt, notify, orcpt, original), write (content, any chunking),
        commit() -> queue id, abort().
        OSError from the file system propagates (ENOSPC: the caller answers 452 4.3.1).
    recover_incoming(queue_root) -> ids: at start, rename complete files a crash left
        under their dot name (commit does not fsync the directory, as Postfix).
    read(path) -> QueueMessage (sender, recipients with offsets and done flags, attrs,
        arrival, content offset and size); raises QueueFileError for a file that is
        incomplete or corrupt.
    read_open(fd, path, size, queue_id="") -> QueueMessage: the same, of a file open as
        fd (qmgr opens it with OPEN_ACTIVE, and keeps the descriptor for mark_done).
    QueueMessage.content(path) yields the content blocks.
    mark_done(path, offset, sync=True, fd=-1): rewrite one recipient's type byte to D
        (durably with sync), through fd when given.
    mark_warned(path, offset): rewrite the arrival record (QueueMessage.arrival_offset)
        to W, durably; QueueFileError when that offset holds no arrival record.
    free_space(queue_root) -> bytes available to the mail owner.
    wake(queue_root, request): poke qmgr through public/qmgr (best effort).
    records(f) -> iterator of (offset, type, data) for every record of an open binary
        stream after the magic (postcat); QueueFileError for what does not follow FORMAT.
    force_expire(path) -> bool: set STAT_EXPIRE on a queue file (postsuper -e, -f);
        False when it is gone, not a regular file, or already marked.

FORCED EXPIRY
    As Postfix's MAIL_QUEUE_STAT_EXPIRE: postsuper -e sets the group-execute bit of the
    file's mode (STAT_EXPIRE); the mode travels with the file through every rename, and
    qmgr, which sees it when it takes the file into the active queue, returns the
    message to its sender at that attempt instead of delivering it. Files are written
    0600, so the bit means nothing else, and a chmod is atomic: no record is rewritten.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field

from . import msg

MAGIC = b"PFXQ1\n"
HEADER = struct.Struct("!cI")
BLOCK = 65536
MAX_RECORD = 4 * BLOCK            # no envelope record is anywhere near this
WINDOW = 8192                     # what read() reads of a large file at a time, past content
# The queue's subdirectories, spelled once. defer/, bounce/ and trace/ hold per-message
# logs (trace/: deliveries to report to a NOTIFY=SUCCESS sender, as Postfix's).
INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT = "incoming", "active", "deferred", "hold", "corrupt"
DEFER, BOUNCE, TRACE, MAILDROP = "defer", "bounce", "trace", "maildrop"
SUBDIRS = (INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT, DEFER, BOUNCE, TRACE, MAILDROP)

# postsuper -e: return the message at the next delivery attempt (Postfix's mode bit)
STAT_EXPIRE = stat.S_IXGRP

# How qmgr opens a file that it takes into the active queue: to read its envelope and,
# through the same descriptor, to mark its recipients done; never through a symbolic
# link, and without waiting on something that is not a regular file (a FIFO).
OPEN_ACTIVE = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# qmgr trigger requests, as Postfix's
WAKE_INCOMING, WAKE_DEFERRED, WAKE_ALL = b"I", b"D", b"A"


def queue_root(cfg) -> str:
    """The queue directory as a program outside the chroot jail sees it."""
    return cfg.get("queue_directory")


class QueueFileError(Exception):
    """A queue file that is incomplete or does not follow the format."""


def queue_id(inode: int, usec: int) -> str:
    """A Postfix-style short queue id from a file's inode and the microseconds."""
    return f"{usec % 0x100000:05X}{inode:X}"


def valid_id(name: str) -> bool:
    """Whether name can be a queue id (Postfix's mail_queue_id_ok): 1-64 of [A-Za-z0-9_]."""
    return 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c == "_")
                                       for c in name)


def _record(kind: bytes, data: bytes) -> bytes:
    return HEADER.pack(kind, len(data)) + data


def _join(directory: str, name: str) -> str:
    """os.path.join(directory, name) for a plain file name, without its generality: a
    writer names three paths per message."""
    return directory + "/" + name if directory and directory[-1] != "/" else directory + name


class QueueWriter:
    """One new queue file in incoming/, written sequentially and committed at the end."""

    def __init__(self, queue_root: str, now: float | None = None):
        self.dir = _join(queue_root, INCOMING)
        now = time.time() if now is None else now
        tmp = _join(self.dir, f".new.{msg.pid()}.{time.monotonic_ns()}")
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            self.id = queue_id(os.fstat(self.fd).st_ino, int(now * 1e6))
            self.path = _join(self.dir, "." + self.id)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(self.fd)
            os.unlink(tmp)
            raise
        self.size = 0               # content bytes
        self._buf = bytearray(MAGIC)
        self._buf += _record(b"T", f"{now:.6f}".encode())
        self._in_content = False
        self._content = bytearray()     # content not yet in a B record
        self.closed = False

    def _flush(self) -> None:
        with memoryview(self._buf) as whole:
            view = whole
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            view.release()
        self._buf.clear()

    def add_attr(self, name: str, value: str) -> None:
        """Record an attribute (name=value) of the message."""
        self._end_content()
        self._buf += _record(b"A", f"{name}={value}".encode("utf-8", "surrogateescape"))

    def set_sender(self, sender: str) -> None:
        """Record the envelope sender ("" for the null sender)."""
        self._end_content()
        self._buf += _record(b"S", sender.encode("utf-8", "surrogateescape"))

    def add_recipient(self, rcpt: str, notify: str = "", orcpt: str = "",
                      original: str = "") -> None:
        """Record one envelope recipient, with its DSN NOTIFY and ORCPT when given, and
        its original address when that is not rcpt itself."""
        self._end_content()
        if notify:
            self._buf += _record(b"N", notify.encode("ascii"))
        if orcpt:
            self._buf += _record(b"O", orcpt.encode("utf-8", "surrogateescape"))
        if original and original != rcpt:
            self._buf += _record(b"G", original.encode("utf-8", "surrogateescape"))
        self._buf += _record(b"R", rcpt.encode("utf-8", "surrogateescape"))

    def write(self, data: bytes) -> None:
        """Append message content, in pieces of any size (smtpd writes a line at a time).

        Pieces are gathered into B records of BLOCK bytes, so that a reader handles a few
        large records instead of one per line; at most one BLOCK waits in memory.
        """
        if not self._in_content:
            self._buf += _record(b"M", b"")
            self._in_content = True
        self.size += len(data)
        pending = self._content
        pending += data
        if len(pending) >= BLOCK:
            whole = len(pending) - len(pending) % BLOCK
            for start in range(0, whole, BLOCK):
                self._buf += HEADER.pack(b"B", BLOCK)
                self._buf += pending[start:start + BLOCK]
            del pending[:whole]
            self._flush()

    def _end_content(self) -> None:
        if self._content:
            self._buf += HEADER.pack(b"B", len(self._content))
            self._buf += self._content
            self._content.clear()

    def commit(self) -> str:
        """End, fsync, rename to the queue id; returns the id.

        As Postfix's cleanup: one fsync of the file, no fsync of the directory. The file
        was created under its dot name before the content, so the fsync (a journal commit
        on Linux file systems) makes that name durable with the data; should a crash lose
        the rename, recover_incoming() finds the complete dot file at the next start.
        """
        if not self._in_content:
            self._buf += _record(b"M", b"")
        self._end_content()
        self._buf += _record(b"X", str(self.size).encode())
        self._buf += _record(b"E", b"")
        self._flush()
        os.fsync(self.fd)
        os.close(self.fd)
        self.closed = True
        final = _join(self.dir, self.id)
        os.rename(self.path, final)
        self.path = final
        return self.id

    def abort(self) -> None:
        """Throw the file away (a rejected or failed message)."""
        if not self.closed:
            os.close(self.fd)
            self.closed = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class Recipient:
    address: str
    offset: int                 # of the record's type byte, for mark_done
    done: bool = False
    notify: str = ""            # DSN NOTIFY (RFC 3461), "" when the client gave none
    orcpt: str = ""             # DSN ORCPT, `type;address`
    original: str = ""          # the original recipient (G record); "": address itself


@dataclass
class QueueMessage:
    queue_id: str
    arrival: float = 0.0
    sender: str | None = None
    recipients: list[Recipient] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)
    content_offset: int = 0     # of the first B record
    size: int = 0
    arrival_offset: int = 0     # of the T (or W) record's type byte, for mark_warned
    warned: bool = False        # the delayed-mail warning was sent (W record)
    originals: bool = False     # a recipient has an original address of its own (G)

    def content(self, path: str, blocks: bool = True):
        """Yield the message content in blocks, as written."""
        with open(path, "rb") as f:
            f.seek(self.content_offset)
            while True:
                head = f.read(HEADER.size)
                if len(head) < HEADER.size:
                    raise QueueFileError(f"{path}: truncated content")
                kind, length = HEADER.unpack(head)
                if kind != b"B":
                    return
                data = f.read(length)
                if len(data) != length:
                    raise QueueFileError(f"{path}: truncated content")
                yield data


def read(path: str) -> QueueMessage:
    """Read a committed queue file's envelope; QueueFileError when it is not one.

    qmgr reads every message once: a file of at most BLOCK bytes (most mail) is read with
    one read() and parsed in place; of a larger one only windows of the envelope records
    are read, content skipped.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_open(fd, path, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def read_open(fd: int, path: str, size: int, queue_id: str = "") -> QueueMessage:
    """read() of a queue file open as fd, whose size (fstat) and, if it likes, queue id
    (the file's name) the caller knows."""
    msg = QueueMessage(queue_id=queue_id or os.path.basename(path))
    return _read_envelope(fd, path, msg, size)


def _pread(fd: int, size: int, offset: int) -> bytes:
    """size bytes of the file from offset, fewer at its end."""
    data = os.pread(fd, size, offset)
    while 0 < len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _read_envelope(fd: int, path: str, msg: QueueMessage, end: int) -> QueueMessage:
    """The records of an open queue file of end bytes. buf holds the file's bytes from
    base: the whole file when it is small, else a window (the first BLOCK bytes, then
    WINDOW bytes or one record) moved forward as needed; content is skipped, not read,
    so memory stays small."""
    buf = _pread(fd, min(end, BLOCK), 0)
    if end <= BLOCK:
        end = len(buf)          # what there is (a file shrunk since fstat is refused below)
    if buf[:len(MAGIC)] != MAGIC:
        raise QueueFileError(f"{path}: not a queue file")
    base, avail = 0, len(buf)   # buf[i] is the file's byte at base + i
    pos, ended, content_size = len(MAGIC), False, None
    dsn = {}                    # N, O and G records wait for their R record
    unpack, head_size = HEADER.unpack_from, HEADER.size
    attrs, recipients = msg.attrs, msg.recipients
    while pos < end:
        i = pos - base
        try:
            kind, length = unpack(buf, i)
        except struct.error:    # the header runs past the window: move the window
            buf, base = _pread(fd, min(WINDOW, end - pos), pos), pos
            i, avail = 0, len(buf)
            if head_size > avail:
                raise QueueFileError(f"{path}: truncated record at offset {pos}") from None
            kind, length = unpack(buf, 0)
        i += head_size
        stop = i + length       # in buf
        if stop + base > end:
            raise QueueFileError(f"{path}: record at offset {pos} runs past the end")
        if kind == b"B":            # content: read by content(), not here
            pos = stop + base
            continue
        if stop > avail:
            # Past the window (a record that fits one is smaller than MAX_RECORD).
            if length > MAX_RECORD:
                raise QueueFileError(f"{path}: oversized record at offset {pos}")
            buf, base = _pread(fd, max(WINDOW, head_size + length), pos), pos
            i, avail = head_size, len(buf)
            stop = i + length
            if stop > avail:
                raise QueueFileError(f"{path}: record at offset {pos} runs past the end")
        value = buf[i:stop]
        if kind == b"A":
            name, _, val = value.decode("utf-8", "surrogateescape").partition("=")
            attrs[name] = val
        elif kind == b"R" or kind == b"D":
            if dsn:
                notify, orcpt = dsn.pop("N", ""), dsn.pop("O", "")
                original = dsn.pop("G", "")
            else:
                notify = orcpt = original = ""
            recipients.append(Recipient(value.decode("utf-8", "surrogateescape"), pos,
                                        kind == b"D", notify, orcpt, original))
        elif kind == b"T" or kind == b"W":
            try:
                msg.arrival = float(value.decode("utf-8", "surrogateescape"))
            except ValueError:
                raise QueueFileError(f"{path}: bad arrival time") from None
            msg.arrival_offset, msg.warned = pos, kind == b"W"
        elif kind == b"S":
            if msg.sender is not None:
                raise QueueFileError(f"{path}: more than one sender")
            msg.sender = value.decode("utf-8", "surrogateescape")
        elif kind == b"N" or kind == b"O" or kind == b"G":
            dsn[kind.decode()] = value.decode("utf-8", "surrogateescape")
            if kind == b"G":
                msg.originals = True
        elif kind == b"M":
            msg.content_offset = pos + head_size
        elif kind == b"X":
            # ASCII digits only (str.isdigit() takes "²", which int() refuses), 64 bits
            content_size = int(value) if value.isdigit() and len(value) <= 19 else -1
        elif kind == b"E":
            ended = pos + head_size == end
            if not ended:
                raise QueueFileError(f"{path}: data after the end record")
            break
        else:
            raise QueueFileError(f"{path}: unknown record type {kind!r} at offset {pos}")
        pos = stop + base
    if not ended:
        raise QueueFileError(f"{path}: no end record (incomplete file)")
    if msg.sender is None or content_size is None or content_size < 0:
        raise QueueFileError(f"{path}: missing sender or content")
    msg.size = content_size
    return msg


def recover_incoming(queue_root: str) -> list[str]:
    """At start, before any writer runs: commit the complete files a crash left unrenamed.

    A dot file in incoming/ named after a queue id is a QueueWriter's file between
    creation and rename. If it is complete (it ends with the end record and reads back)
    its fsync happened, and smtpd may have answered 250: it is renamed to its id, and
    the ids are returned. Incomplete ones are left for the administrator (and ignored).
    """
    directory = os.path.join(queue_root, INCOMING)
    recovered = []
    try:
        names = os.listdir(directory)
    except OSError:
        return recovered
    for name in names:
        qid = name[1:]
        if not name.startswith(".") or not qid or not qid.isalnum() or \
                not qid.isascii():
            continue
        path = os.path.join(directory, name)
        try:
            read(path)
            final = os.path.join(directory, qid)
            if not os.path.exists(final):
                os.rename(path, final)
                recovered.append(qid)
        except (OSError, QueueFileError):
            continue
    return recovered


def mark_done(path: str, offset: int, sync: bool = True, fd: int = -1) -> None:
    """Record that the recipient at offset is done (delivered or bounced); durably with
    sync. Without it (the file is removed next) a crash can at worst repeat a delivery.
    With fd (the file open for writing, OPEN_ACTIVE) the write goes through it, and path
    only names the file in errors."""
    own = fd < 0
    if own:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, b"D", offset) != 1:
            raise OSError(f"{path}: short write")
        if sync:
            os.fsync(fd)
    finally:
        if own:
            os.close(fd)


def mark_warned(path: str, offset: int) -> None:
    """Record, durably, that the message's delayed-mail warning was sent."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.pread(fd, 1, offset) not in (b"T", b"W"):
            raise QueueFileError(f"{path}: no arrival record at offset {offset}")
        if os.pwrite(fd, b"W", offset) != 1:
            raise OSError(f"{path}: short write")
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(queue_root: str) -> int:
    """Bytes of the queue file system available to unprivileged users."""
    st = os.statvfs(queue_root)
    return st.f_bavail * st.f_frsize


def wake(queue_root: str, request: bytes = WAKE_INCOMING) -> bool:
    """Poke qmgr through public/qmgr; False when it is not listening (it has a timer)."""
    # non-blocking from the start: no ioctl
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.connect(os.path.join(queue_root, "public", "qmgr"))
        sock.send(request)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def force_expire(path: str) -> bool:
    """Mark a queue file for return to its sender at the next attempt (postsuper -e).

    False when the file is gone, is not a regular file, or is marked already (Postfix's
    postexpire() counts only files it changed); other OSErrors propagate. The mode
    change is fsynced, so that a crash cannot forget it after postsuper reported it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & STAT_EXPIRE:
            return False
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | STAT_EXPIRE)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def records(f):
    """Every record of a queue file open for binary reading, in file order: (offset of the
    record, type byte, data). For tools that show a file as it is (postcat): it checks
    the magic and the record framing only, and works on a pipe. QueueFileError for a file
    that is not a queue file, or a record that is oversized or cut short.
    """
    if f.read(len(MAGIC)) != MAGIC:
        raise QueueFileError("input is not a valid queue file")
    pos = len(MAGIC)
    while True:
        head = f.read(HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise QueueFileError(f"truncated record at offset {pos}")
        kind, length = HEADER.unpack(head)
        if length > MAX_RECORD:
            raise QueueFileError(f"oversized record at offset {pos}")
        data = f.read(length)
        if len(data) != length:
            raise QueueFileError(f"truncated record at offset {pos}")
        yield pos, kind, data
        pos += HEADER.size + length
