"""Length-prefixed attribute frames for local client/server IPC.

NAME
    attr - attribute frame encoder, strict decoder and blocking client

SYNOPSIS
    from postfix_py.lib import attr

    frame = attr.encode({"request": "lookup", "cache_id": key})
    attrs = attr.decode(frame)

    dec = attr.FrameDecoder()
    dec.feed(sock.recv(65536))
    for item in dec.frames():
        ...                      # dict, or an AttrError instance

    attr.write_frame(sock, {"status": attr.STATUS_OK}, timeout=10)
    attrs = attr.read_frame(sock, timeout=10)

    with attr.AttrClient("/var/spool/postfix/private/tlsmgr") as clnt:
        reply = clnt.request({"request": "seed", "size": 32})
        status = attr.reply_status(reply)

DESCRIPTION
    This module is the framing layer that postfix-py daemons and their
    clients (tlsmgr and its users, for now) speak over a UNIX-domain
    stream socket, in the role of Postfix's attr_print(3), attr_scan(3)
    and attr_clnt(3). A message is a set of named attributes; each
    message travels as one self-delimiting frame, so a reader always
    knows how much to read and can bound its memory before reading it.
    The module knows nothing of what the attributes mean, apart from the
    request and status constants shared by the tlsmgr protocol.

WIRE FORMAT
    frame = length body
        length: 4-byte unsigned big-endian, 1 .. MAX_FRAME (1048576).
    body = attr*
        The body is consumed exactly: the last attribute ends exactly
        at the body end. An empty body is impossible (length >= 1).
    attr = name_len name value_len value
        name_len: 1 byte, 1 .. MAX_NAME (64).
        name: printable ASCII only, bytes 0x21 .. 0x7e (no space, no
        control characters, nothing >= 0x80). This keeps names safe to
        log and to use as dictionary keys without escaping.
        value_len: 4-byte unsigned big-endian.
        value: arbitrary bytes.
    A name may appear only once per frame (strict reading, as Postfix
    ATTR_FLAG_STRICT).

    Requests carry "request" = REQ_SEED, REQ_LOOKUP, REQ_UPDATE,
    REQ_DELETE or REQ_STATUS. Replies carry "status" = STATUS_OK ("0"),
    STATUS_NOTFOUND ("1"), STATUS_BAD ("2") or STATUS_ERROR ("3"), and
    "reason" when the status is not STATUS_OK. The constants are str;
    decoded values are bytes, and reply_status() returns str.

FUNCTIONS AND CLASSES
    encode(attrs) -> bytes
        Return one complete frame (length prefix and body) for the
        mapping attrs of name -> value. A str value is encoded as UTF-8,
        its U+DC80..U+DCFF back to the bytes they stand for (surrogateescape:
        what a reader of these frames makes of bytes that are not UTF-8, such
        as an address from a sendmail command line or a table), an int (not
        bool) as ASCII decimal, a bytes-like value as is.
        Raises AttrError for a bad name, an unsupported value type, an
        empty mapping or a body larger than MAX_FRAME; TypeError when
        attrs is not a Mapping.

    decode_body(body) -> dict[str, bytes]
        Strictly parse one frame body. Raises AttrError (recoverable)
        for an empty or oversized body, a bad name length, a bad name
        byte, a value running past the body, trailing bytes that do not
        form an attribute, or a repeated name.

    decode(frame) -> dict[str, bytes]
        Parse exactly one complete frame. Raises AttrError with
        recoverable False for a bad length prefix, a buffer shorter than
        the prefix says, or bytes after the frame; otherwise as
        decode_body().

    FrameDecoder()
        Incremental decoder for event loops. feed(data) appends received
        bytes and splits them into frames at once, so the raw input it
        holds is never more than one incomplete frame (< 4 + MAX_FRAME
        bytes); complete frames wait, already decoded, until taken.
        Drain after every feed():
            frames(): generator yielding, in arrival order, a dict per
                good frame or an AttrError instance per bad frame. A
                recoverable error means that frame was skipped and the
                stream is still in sync (reply STATUS_BAD and go on). A
                non-recoverable error (bad length prefix, detected as
                soon as the 4 prefix bytes arrive) is yielded last; the
                decoder then discards further input and yields the same
                error on every later call: close the connection.
            next_frame(): return the next dict, or None when no complete
                frame is pending; raise the AttrError instead of
                yielding it. A recoverable error may be followed by
                another next_frame() call.
            pending: bytes of the incomplete frame received so far; 0 at
                a frame boundary, so at EOF pending != 0 means the peer
                closed mid-frame.
            failed: True after a non-recoverable error.
        Iterating over the decoder is the same as frames().

    read_frame(sock, timeout) -> dict[str, bytes]
        Read exactly one frame from a connected stream socket; never
        reads past its end and never allocates more than MAX_FRAME for
        the body. timeout (seconds, > 0, or None for no limit) bounds
        the whole frame, not each recv(). The length prefix is checked
        before any body byte is read. Raises:
            AttrError (recoverable False): bad length prefix.
            AttrError (recoverable True): bad body, fully consumed.
            PeerClosedError (ConnectionError): EOF before the first
                byte of a frame - the clean end of a conversation.
            TruncatedFrameError (ConnectionError): EOF inside a frame.
            FrameTimeoutError (TimeoutError): the deadline passed. Its
                received attribute counts the frame bytes already read;
                when 0 the stream is still in sync and the read may be
                retried, otherwise the connection must be closed.
            OSError: other socket errors, unchanged (e.g.
                ConnectionResetError).
        The socket's own timeout setting is restored on return.

    write_frame(sock, attrs, timeout) -> None
        Encode attrs and send the whole frame. Nothing is sent when
        encoding fails (AttrError). Raises FrameTimeoutError when the
        frame is not sent within timeout (part may have been sent:
        close the connection), and OSError (e.g. BrokenPipeError) as is.

    AttrClient(path, timeout=10.0)
        Blocking client for a UNIX-domain stream server, as Postfix's
        attr_clnt(3). It connects on the first request and keeps the
        connection. request(attrs) -> dict[str, bytes] sends one frame
        and reads one reply frame; connect, write and read each get
        timeout seconds. When talking to the server fails for any
        reason (connect error, EOF, reset, timeout, malformed reply) the
        client closes the connection and tries once more on a fresh
        one, like attr_clnt; if that fails too it raises AttrClientError
        (a ConnectionError) chained to the last cause. As in Postfix a
        retried request may be seen twice by the server, so requests
        should be idempotent. A bad request raises AttrError before
        anything is sent and is not retried. close() drops the
        connection; the client is a context manager and may be used by
        several threads (requests are serialised).

    reply_status(reply) -> str
        Return the "status" attribute of a reply as str. Raises
        AttrError (recoverable) when it is missing or not one of
        STATUS_OK, STATUS_NOTFOUND, STATUS_BAD, STATUS_ERROR.

DIAGNOSTICS
    AttrError (a ValueError) is the only exception raised for bad input:
    decoding arbitrary bytes raises nothing else. Its recoverable
    attribute says whether the byte stream is still in sync. Passing
    something that is not bytes-like (or not a Mapping, to encode())
    is a programming error and raises TypeError.

SEE ALSO
    Postfix attr_print(3), attr_scan(3), attr_clnt(3), auto_clnt(3).
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping

__all__ = [
    "MAX_FRAME",
    "MAX_NAME",
    "LENGTH_SIZE",
    "ATTR_REQUEST",
    "ATTR_STATUS",
    "ATTR_REASON",
    "REQ_SEED",
    "REQ_LOOKUP",
    "REQ_UPDATE",
    "REQ_DELETE",
    "REQ_STATUS",
    "REQUESTS",
    "STATUS_OK",
    "STATUS_NOTFOUND",
    "STATUS_BAD",
    "STATUS_ERROR",
    "STATUSES",
    "AttrError",
    "PeerClosedError",
    "TruncatedFrameError",
    "FrameTimeoutError",
    "AttrClientError",
    "encode",
    "decode",
    "decode_body",
    "FrameDecoder",
    "read_frame",
    "write_frame",
    "AttrClient",
    "reply_status",
]

MAX_FRAME = 1048576  # largest body length a frame may announce
MAX_NAME = 64  # longest attribute name
LENGTH_SIZE = 4  # size of the frame length prefix and of value_len

ATTR_REQUEST = "request"
ATTR_STATUS = "status"
ATTR_REASON = "reason"

REQ_SEED = "seed"
REQ_LOOKUP = "lookup"
REQ_UPDATE = "update"
REQ_DELETE = "delete"
REQ_STATUS = "status"
REQ_HISTORY_UPDATE = "history_update"     # the TLS history per next hop (tlsmgr/history.py)
REQ_HISTORY_LOOKUP = "history_lookup"
REQUESTS = frozenset({REQ_SEED, REQ_LOOKUP, REQ_UPDATE, REQ_DELETE, REQ_STATUS})

STATUS_OK = "0"
STATUS_NOTFOUND = "1"
STATUS_BAD = "2"
STATUS_ERROR = "3"
STATUSES = frozenset({STATUS_OK, STATUS_NOTFOUND, STATUS_BAD, STATUS_ERROR})

# Smallest possible attribute: 1-byte name_len, 1-byte name, 4-byte value_len.
_MIN_ATTR = 1 + 1 + LENGTH_SIZE

_NAME_STR = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_NAME)
_BAD_NAME_BYTE = re.compile(rb"[^\x21-\x7e]")
_LENGTH = struct.Struct(">I")             # the frame length prefix and value_len
_DONTWAIT = socket.MSG_DONTWAIT
# Names already checked, with their wire form (encode) or their str (decode): a program
# speaks a few dozen names over and over; checking each once saves a regular expression
# and a conversion per attribute. Bounded, as rcpt.N-style names have no end.
_HEADS: dict[str, bytes] = {}
_NAMES: dict[bytes, str] = {}
NAME_CACHE = 4096


class AttrError(ValueError):
    """Malformed attribute data: a bad frame, body, name or value."""

    def __init__(self, message: str, *, recoverable: bool = True) -> None:
        super().__init__(message)
        # True when the bad frame was consumed exactly and the next frame
        # can still be read; False when the stream is out of sync.
        self.recoverable = recoverable


class PeerClosedError(ConnectionError):
    """The peer closed the connection at a frame boundary (clean EOF)."""

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class TruncatedFrameError(ConnectionError):
    """The peer closed the connection in the middle of a frame."""

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class FrameTimeoutError(TimeoutError):
    """A frame was not read or written within its deadline."""

    def __init__(self, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        # Frame bytes consumed before the deadline; 0 means still in sync.
        self.received = received


class AttrClientError(ConnectionError):
    """AttrClient could not complete a request, even after one retry."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def _as_bytes(data: object) -> bytes:
    """Return a bytes copy of a bytes-like object (no copy for bytes)."""
    if isinstance(data, bytes):
        return data
    # memoryview() rejects int, unlike bytes(), which would make zeros.
    return memoryview(data).tobytes()  # type: ignore[arg-type]


def _check_length(length: int) -> None:
    """Reject a frame length prefix outside 1 .. MAX_FRAME."""
    if not 1 <= length <= MAX_FRAME:
        raise AttrError(
            f"bad frame length {length} (must be 1..{MAX_FRAME})",
            recoverable=False,
        )


def _encode_value(name: str, value: object) -> bytes:
    """Convert one attribute value to its wire bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _as_bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise AttrError(f"attribute {name!r}: value is not encodable as UTF-8: {exc}") from None
    # bool is an int, but "True" on the wire is almost surely a caller bug.
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(value).encode("ascii")
        except ValueError as exc:  # beyond sys.get_int_max_str_digits()
            raise AttrError(f"attribute {name!r}: integer value too large: {exc}") from None
    raise AttrError(f"attribute {name!r}: unsupported value type {type(value).__name__}")


def _head(name: object) -> bytes:
    """name_len and name, as sent, for a good attribute name; AttrError otherwise."""
    if not isinstance(name, str):
        raise AttrError(f"attribute name must be str, not {type(name).__name__}")
    if not _NAME_STR.fullmatch(name):
        raise AttrError(
            f"bad attribute name {name!r}: must be 1..{MAX_NAME} printable ASCII characters (0x21..0x7e)"
        )
    head = bytes((len(name),)) + name.encode("ascii")
    if type(name) is str and len(_HEADS) < NAME_CACHE:
        _HEADS[name] = head
    return head


def encode(attrs: Mapping[str, bytes | str | int]) -> bytes:
    """Return one complete frame (length prefix and body) for attrs."""
    if type(attrs) is not dict and not isinstance(attrs, Mapping):  # ABC check: slow
        raise TypeError(f"attrs must be a Mapping, not {type(attrs).__name__}")
    if not attrs:
        raise AttrError("cannot encode an empty attribute set (frame length would be 0)")
    parts: list[bytes] = [b""]          # [0]: the length prefix, once the body is known
    heads, pack = _HEADS, _LENGTH.pack
    for name, value in attrs.items():
        head = heads.get(name)          # only good str names are there
        if head is None:
            head = _head(name)
        if type(value) is str:
            try:
                raw = value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = _encode_value(name, value)      # raises the AttrError
        elif type(value) is bytes:
            raw = value
        else:
            raw = _encode_value(name, value)
        size = len(raw)
        if size > MAX_FRAME:  # also keeps value_len within 4 bytes
            raise AttrError(
                f"attribute {name!r}: value of {size} bytes cannot fit in a frame"
                f" (MAX_FRAME {MAX_FRAME})"
            )
        parts += (head, pack(size), raw)
    frame = b"".join(parts)
    size = len(frame)
    if size > MAX_FRAME:
        raise AttrError(f"frame body of {size} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return pack(size) + frame


def _parse(buf: bytes, start: int, end: int) -> dict[str, bytes]:
    """Strictly parse the body buf[start:end]; offsets in errors are body-relative.

    A body whose names have all been seen before (_NAMES: checked names only) is read
    with the few tests that still apply: a known name is 1..MAX_NAME good bytes, so
    only the bounds and repetition are left. Anything else, and every error, is left
    to _parse_strict(), which reads the body again from the start and is the rule."""
    if start < end <= start + MAX_FRAME:
        attrs: dict[str, bytes] = {}
        pos, names, unpack = start, _NAMES, _LENGTH.unpack_from
        while pos < end:
            at = pos + 1 + buf[pos]                     # where value_len is
            name = names.get(buf[pos + 1:at])
            value_at = at + 4                           # LENGTH_SIZE
            if name is None or value_at > end or name in attrs:
                break
            pos = value_at + unpack(buf, at)[0]
            if pos > end:
                break
            attrs[name] = buf[value_at:pos]
        else:
            return attrs
    return _parse_strict(buf, start, end)


def _parse_strict(buf: bytes, start: int, end: int) -> dict[str, bytes]:
    """_parse() for every body, with the precise error for a bad one."""
    if end <= start:
        raise AttrError("empty frame body")
    if end - start > MAX_FRAME:
        raise AttrError(f"frame body of {end - start} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    attrs: dict[str, bytes] = {}
    pos = start
    unpack = _LENGTH.unpack_from
    while pos < end:
        at = pos                        # body offset at - start, for the errors
        if end - pos < _MIN_ATTR:
            left, off = end - pos, at - start
            if attrs:
                raise AttrError(f"{left} trailing bytes after the last attribute at body offset {off}")
            raise AttrError(f"frame body of {left} bytes is too short for an attribute")
        name_len = buf[pos]
        if not 1 <= name_len <= MAX_NAME:
            raise AttrError(f"bad attribute name length {name_len} at body offset {at - start} (must be 1..{MAX_NAME})")
        pos += 1
        if name_len + LENGTH_SIZE > end - pos:
            raise AttrError(f"attribute at body offset {at - start} runs past the end of the body")
        raw = buf[pos:pos + name_len]
        name = _NAMES.get(raw)
        if name is None:
            bad = _BAD_NAME_BYTE.search(raw)
            if bad is not None:
                raise AttrError(
                    f"bad byte 0x{bad.group()[0]:02x} in attribute name at body offset {at - start}"
                    " (names are printable ASCII 0x21..0x7e)"
                )
            name = raw.decode("ascii")
            if len(_NAMES) < NAME_CACHE:
                _NAMES[raw] = name
        pos += name_len
        value_len = unpack(buf, pos)[0]
        pos += LENGTH_SIZE
        if value_len > end - pos:
            raise AttrError(
                f"value of attribute {name!r} ({value_len} bytes) runs past the end of the body"
                f" ({end - pos} bytes left)"
            )
        if name in attrs:
            raise AttrError(f"repeated attribute {name!r} at body offset {at - start}")
        attrs[name] = buf[pos:pos + value_len]
        pos += value_len
    return attrs


def decode_body(body: bytes) -> dict[str, bytes]:
    """Strictly parse one frame body into a dict of name -> value bytes."""
    buf = _as_bytes(body)
    return _parse(buf, 0, len(buf))


def decode(frame: bytes) -> dict[str, bytes]:
    """Parse exactly one complete frame, length prefix included."""
    buf = _as_bytes(frame)
    if len(buf) < LENGTH_SIZE:
        raise AttrError(
            f"truncated frame: {len(buf)} bytes, shorter than the {LENGTH_SIZE}-byte length prefix",
            recoverable=False,
        )
    length = int.from_bytes(buf[:LENGTH_SIZE], "big")
    _check_length(length)
    got = len(buf) - LENGTH_SIZE
    if got < length:
        raise AttrError(f"truncated frame: body has {got} of {length} bytes", recoverable=False)
    if got > length:
        raise AttrError(f"{got - length} extra bytes after the end of the frame", recoverable=False)
    return _parse(buf, LENGTH_SIZE, len(buf))


class FrameDecoder:
    """Incremental frame decoder with bounded buffering, for event loops."""

    def __init__(self) -> None:
        """Start at a frame boundary with nothing buffered."""
        self._buf = bytearray()  # prefix or body bytes of the incomplete frame
        self._need: int | None = None  # body length, once the prefix is in
        self._ready: deque[dict[str, bytes] | AttrError] = deque()
        self._error: AttrError | None = None  # sticky, non-recoverable

    @property
    def pending(self) -> int:
        """Return how many bytes of an incomplete frame have been received."""
        if self._need is None:
            return len(self._buf)
        return LENGTH_SIZE + len(self._buf)

    @property
    def failed(self) -> bool:
        """Return True once a non-recoverable error has been seen."""
        return self._error is not None

    def _deliver(self, buf: bytes, start: int, end: int) -> None:
        """Queue the decoded body buf[start:end], or its recoverable error."""
        try:
            self._ready.append(_parse(buf, start, end))
        except AttrError as exc:
            self._ready.append(exc)

    def feed(self, data: bytes) -> None:
        """Append received bytes and split off every frame they complete."""
        if self._error is not None:
            return  # out of sync: nothing after a bad prefix means anything
        buf = _as_bytes(data)
        view = memoryview(buf)
        pos, end = 0, len(buf)
        while pos < end:
            if self._need is None:
                if not self._buf and end - pos >= LENGTH_SIZE:
                    length = int.from_bytes(buf[pos:pos + LENGTH_SIZE], "big")
                    pos += LENGTH_SIZE
                else:
                    take = min(LENGTH_SIZE - len(self._buf), end - pos)
                    self._buf += view[pos:pos + take]
                    pos += take
                    if len(self._buf) < LENGTH_SIZE:
                        return
                    length = int.from_bytes(self._buf, "big")
                    self._buf = bytearray()
                # Check the prefix now, so a bad one is never followed by
                # buffering of its (possibly huge) announced body.
                try:
                    _check_length(length)
                except AttrError as exc:
                    self._error = exc
                    self._buf = bytearray()
                    return
                self._need = length
                continue
            need = self._need
            if not self._buf and end - pos >= need:
                # Whole body in this chunk: parse in place, no copy.
                self._deliver(buf, pos, pos + need)
                pos += need
            else:
                take = min(need - len(self._buf), end - pos)
                self._buf += view[pos:pos + take]
                pos += take
                if len(self._buf) < need:
                    return
                body = bytes(self._buf)
                self._buf = bytearray()  # drop the capacity, not just the length
                self._deliver(body, 0, need)
            self._need = None

    def next_frame(self) -> dict[str, bytes] | None:
        """Return the next decoded frame, None if none is complete; raise AttrError for a bad one."""
        if self._ready:
            item = self._ready.popleft()
            if isinstance(item, AttrError):
                raise item
            return item
        if self._error is not None:
            raise self._error.with_traceback(None)
        return None

    def frames(self) -> Iterator[dict[str, bytes] | AttrError]:
        """Yield each complete frame as a dict, or as an AttrError instance when bad."""
        while self._ready:
            yield self._ready.popleft()
        if self._error is not None:
            yield self._error

    __iter__ = frames


def _check_timeout(timeout: float | None) -> None:
    """Reject a timeout that is neither None nor positive."""
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive or None, not {timeout!r}")


def _recv_exact(sock: socket.socket, view: memoryview, before: int, total: int | None,
                deadline: float | None) -> None:
    """Fill view from sock before deadline; before counts frame bytes already read.

    A socket without a timeout of its own (blocking, or non-blocking) keeps its mode:
    what has arrived is taken by a recv that does not wait, and poll waits for more
    with the time left, so that a frame costs no switch of the socket's mode (an ioctl
    each way) and, when it is there already, no poll. A socket with a timeout of its
    own gets the time left as its timeout."""
    got, size = 0, len(view)
    while got < size:
        if deadline is None:
            n = sock.recv_into(view[got:], size - got)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FrameTimeoutError(
                    f"timeout reading frame after {before + got} bytes", received=before + got
                )
            if sock.gettimeout():
                sock.settimeout(remaining)
                try:
                    n = sock.recv_into(view[got:], size - got)
                except TimeoutError:
                    raise FrameTimeoutError(
                        f"timeout reading frame after {before + got} bytes",
                        received=before + got
                    ) from None
            else:
                try:
                    n = sock.recv_into(view[got:], size - got, _DONTWAIT)
                except BlockingIOError:
                    waiter = select.poll()
                    waiter.register(sock, select.POLLIN)
                    waiter.poll(remaining * 1000)
                    continue            # the time left, then what has arrived
        if n == 0:
            if before + got == 0:
                raise PeerClosedError("connection closed by peer")
            expect = f"{total + LENGTH_SIZE}-byte frame" if total is not None else "frame"
            raise TruncatedFrameError(
                f"connection closed after {before + got} bytes of a {expect}", received=before + got
            )
        got += n


def read_frame(sock: socket.socket, timeout: float | None) -> dict[str, bytes]:
    """Read exactly one frame from a connected stream socket and decode it."""
    _check_timeout(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    saved = sock.gettimeout()
    try:
        if deadline is None and saved is not None:
            sock.settimeout(None)
        head = bytearray(LENGTH_SIZE)
        _recv_exact(sock, memoryview(head), 0, None, deadline)
        length = int.from_bytes(head, "big")
        _check_length(length)  # before reading, or allocating, the body
        body = bytearray(length)
        _recv_exact(sock, memoryview(body), LENGTH_SIZE, length, deadline)
    finally:
        if sock.gettimeout() != saved:      # each settimeout() is an ioctl
            sock.settimeout(saved)
    return _parse(bytes(body), 0, length)


def _send_frame(sock: socket.socket, frame: bytes, timeout: float | None) -> None:
    """Send an encoded frame completely within timeout."""
    _check_timeout(timeout)
    saved = sock.gettimeout()
    try:
        sock.settimeout(timeout)  # sendall() treats it as a total deadline
        try:
            sock.sendall(frame)
        except TimeoutError:
            raise FrameTimeoutError(f"timeout writing {len(frame)}-byte frame") from None
    finally:
        sock.settimeout(saved)


def write_frame(sock: socket.socket, attrs: Mapping[str, bytes | str | int],
                timeout: float | None) -> None:
    """Encode attrs and send the whole frame on a connected stream socket."""
    _send_frame(sock, encode(attrs), timeout)


def reply_status(reply: Mapping[str, bytes]) -> str:
    """Return a reply's status attribute as str, checking it is present and known."""
    try:
        raw = reply[ATTR_STATUS]
    except KeyError:
        raise AttrError("reply has no 'status' attribute") from None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        status = _as_bytes(raw).decode("ascii", "replace")
    else:
        status = str(raw)
    if status not in STATUSES:
        raise AttrError(f"reply has unknown status {raw!r}")
    return status


class AttrClient:
    """Blocking request/reply client over a kept UNIX-domain stream connection."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = 10.0) -> None:
        """Remember where the server listens; do not connect yet."""
        _check_timeout(timeout)
        self.path = os.fspath(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        """Return True while a connection to the server is open."""
        return self._sock is not None

    def _connect(self) -> socket.socket:
        """Open a fresh connection to the server."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _drop(self) -> None:
        """Close the connection, if any, ignoring errors."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def request(self, attrs: Mapping[str, bytes | str | int]) -> dict[str, bytes]:
        """Send one request frame and return the decoded reply frame."""
        frame = encode(attrs)  # a bad request fails here, unsent and unretried
        with self._lock:
            last: BaseException | None = None
            for _ in range(2):
                try:
                    sock = self._sock if self._sock is not None else self._connect()
                    _send_frame(sock, frame, self.timeout)
                    return read_frame(sock, self.timeout)
                except (OSError, AttrError) as exc:
                    # Any failure leaves the stream in an unknown state: the
                    # server may have died or restarted, so start over once.
                    last = exc
                    self._drop()
                except BaseException:
                    self._drop()  # e.g. KeyboardInterrupt mid-frame: stream out of sync
                    raise
            raise AttrClientError(
                f"problem talking to server {self.path}: {last}", path=self.path
            ) from last

    def close(self) -> None:
        """Close the connection; a later request reconnects."""
        with self._lock:
            self._drop()

    def __enter__(self) -> AttrClient:
        """Return self; the connection is still made lazily."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the connection."""
        self.close()
