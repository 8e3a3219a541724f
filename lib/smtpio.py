"""SMTP streams: buffered line I/O with deadlines, over plain TCP or TLS (Postfix's smtp_stream).

smtpd and the smtp client talk through an SmtpStream. Every read and write waits with
select() against a deadline, so a silent or slow peer costs a timeout, never a hung worker;
input is buffered in bounded amounts; and the same calls work before and after a TLS
handshake (pyOpenSSL over the same non-blocking socket).

    s = SmtpStream(sock, timeout)
    s.readline(limit) -> bytes       one line with its terminator (LF, CRLF), or `limit`
                                     bytes of a longer line (the rest comes next call);
                                     raises StreamTimeout or StreamEOF
    s.read_some(n) -> bytes          up to n bytes (at least one) of input, as they come
    s.write(data); s.flush()         writes are buffered until flush()
    s.request_deadline(rate)         one deadline over a whole request (DATA content), moved
                                     later by each byte received (rate bytes/s); None ends it
    s.pending() -> int               input bytes received but not yet read (pipelining;
                                     STARTTLS discards them: purge())
    s.start_tls(conn, timeout)       handshake of a prepared SSL.Connection on this socket,
                                     with its own deadline; raises TLSFailure
    s.close(timeout)                 TLS close_notify (best effort), then close the socket;
                                     with tls_fast_shutdown_enable = no, first waits up to
                                     timeout for the peer's close_notify (lib/tls.shutdown)

ERRORS
    StreamTimeout (TimeoutError), StreamEOF (ConnectionError; includes resets and TLS
    errors after the handshake), TLSFailure (a handshake that failed; `reason` says why).
"""

from __future__ import annotations

import re
import select
import socket
import time

from OpenSSL import SSL

from . import tls as libtls
from .tls import ssl_error_text

READ_SIZE = 65536
_BARE_LF = re.compile(rb"(?<!\r)\n")
_TOO_LONG: dict = {}    # line limit -> regex for a line of that many bytes or more


def crlf_prefix(data: bytes, limit: int) -> int:
    """How many bytes of data are whole lines that readline(limit) would return one by
    one, each ending in CRLF: up to the first bare LF or line of limit bytes or more."""
    end = data.rfind(b"\n") + 1
    m = _BARE_LF.search(data, 0, end)
    if m:
        end = data.rfind(b"\n", 0, m.start()) + 1
    too_long = _TOO_LONG.get(limit)
    if too_long is None:
        # Anchored at line starts, so the search is linear in the input.
        too_long = _TOO_LONG[limit] = re.compile(rb"^[^\n]{%d}" % max(1, limit), re.M)
    m = too_long.search(data, 0, end)
    return m.start() if m else end


class StreamTimeout(TimeoutError):
    """The peer did not send or take data before the deadline."""


class StreamEOF(ConnectionError):
    """The peer closed the connection, or it broke."""


class TLSFailure(Exception):
    """A TLS handshake that did not complete."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SmtpStream:
    """A connected socket with line-buffered reads, buffered writes and deadlines."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self.tls: SSL.Connection | None = None
        # tls_loglevel 4: called as trace("read from" | "write to", data) for every piece
        # of the conversation that travels inside TLS.
        self.trace = None
        self._in = bytearray()
        self._out = bytearray()
        self._rate = 0                  # request_deadline(): bytes/s, 0 when off
        self._request_deadline = None
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Replies must not wait for the peer's delayed ACK (DESIGN.md).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # --- low level ---------------------------------------------------------------------
    def _wait(self, want_write: bool, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StreamTimeout("timeout")
        fd = self.sock.fileno()
        r, w, _ = select.select([] if want_write else [fd], [fd] if want_write else [], [], left)
        if not r and not w:
            raise StreamTimeout("timeout")

    def _recv(self, deadline: float, answered: bool = False) -> bytes:
        """Some bytes from the peer (never empty: EOF raises). answered: a reply has just
        gone out, so the peer's next words are most likely not here yet: wait for them
        before the first read, which saves the read that would fail (a system call and
        an exception; with TLS, OpenSSL's WANT_READ) on the way to the same wait."""
        if self._request_deadline is not None:
            deadline = min(deadline, self._request_deadline)
        if answered and (self.tls is None or not self.tls.pending()):
            left = deadline - time.monotonic()
            if left > 0:
                try:
                    select.select([self.sock.fileno()], [], [], left)
                except (OSError, ValueError):
                    pass                # the read below decides, as before
        while True:
            try:
                if self.tls is not None:
                    data = self.tls.recv(READ_SIZE)
                else:
                    data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError, SSL.WantReadError):
                self._wait(False, deadline)
                continue
            except SSL.WantWriteError:
                self._wait(True, deadline)
                continue
            except SSL.ZeroReturnError:
                raise StreamEOF("lost connection") from None
            except (SSL.SysCallError, SSL.Error) as exc:
                raise StreamEOF(f"lost connection: {ssl_error_text(exc)}") from None
            except OSError as exc:
                raise StreamEOF(f"lost connection: {exc.strerror}") from None
            if not data:
                raise StreamEOF("lost connection")
            if self.trace is not None and self.tls is not None:
                self.trace("read from", data)
            if self._rate:
                # Each byte buys 1/rate seconds more, never more than timeout from now.
                self._request_deadline = min(self._request_deadline + len(data) / self._rate,
                                             time.monotonic() + self.timeout)
            return data

    def _send_all(self, data, deadline: float) -> None:
        if self.trace is not None and self.tls is not None:
            self.trace("write to", bytes(data))
        view = memoryview(data)
        while view:
            try:
                if self.tls is not None:
                    n = self.tls.send(view[:READ_SIZE])
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError, SSL.WantWriteError):
                self._wait(True, deadline)
                continue
            except SSL.WantReadError:
                self._wait(False, deadline)
                continue
            except (SSL.SysCallError, SSL.Error) as exc:
                raise StreamEOF(f"lost connection: {ssl_error_text(exc)}") from None
            except OSError as exc:
                raise StreamEOF(f"lost connection: {exc.strerror}") from None
            view = view[n:]

    # --- the interface ---------------------------------------------------------------------
    def readline(self, limit: int, timeout: float | None = None) -> bytes:
        """One line including its LF, or `limit` bytes of a longer one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            nl = self._in.find(b"\n", 0, limit)
            if nl >= 0:
                line = bytes(self._in[:nl + 1])
                del self._in[:nl + 1]
                return line
            if len(self._in) >= limit:
                line = bytes(self._in[:limit])
                del self._in[:limit]
                return line
            answered = bool(self._out)
            if answered:
                self.flush()
            self._in += self._recv(deadline, answered)

    def buffered_lines(self, limit: int, timeout: float | None = None) -> bytes:
        """The input up to its last LF, left in place (see consume()); waits for input
        like readline(). b"" when the first line has no LF within limit bytes.

        smtpd's DATA takes the body in bulk this way (crlf_prefix() says how much of it
        readline() would have returned as whole CRLF lines).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            end = self._in.rfind(b"\n") + 1
            if end:
                return bytes(self._in[:end])
            if len(self._in) >= limit:
                return b""
            answered = bool(self._out)
            if answered:
                self.flush()
            self._in += self._recv(deadline, answered)

    def read_some(self, n: int, timeout: float | None = None) -> bytes:
        """Up to n bytes of input, at least one; waits like readline() (BDAT chunks)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._in:
            answered = bool(self._out)
            if answered:
                self.flush()
            self._in += self._recv(deadline, answered)
        data = bytes(self._in[:n])
        del self._in[:n]
        return data

    def request_deadline(self, rate: int | None) -> None:
        """Start (rate: bytes per second) or end (None) a deadline over a whole request:
        its input must come within timeout, and each byte received moves the deadline
        1/rate seconds later, at most to timeout from now (smtpd_per_request_deadline
        with smtpd_min_data_rate, for DATA and BDAT content)."""
        self._rate = rate or 0
        self._request_deadline = time.monotonic() + self.timeout if rate else None

    def consume(self, n: int) -> None:
        """Drop n bytes of input that buffered_lines() showed."""
        del self._in[:n]

    def pending(self) -> int:
        """Bytes the peer sent that nobody has read yet."""
        extra = self.tls.pending() if self.tls is not None else 0
        return len(self._in) + extra

    def peek(self, n: int) -> bytes:
        """Up to n buffered input bytes, left in place (for log lines)."""
        return bytes(self._in[:n])

    def purge(self) -> int:
        """Discard buffered input; returns how much (STARTTLS: CVE-2011-0411)."""
        n = len(self._in)
        self._in.clear()
        return n

    def write(self, data: bytes) -> None:
        """Queue data for the next flush."""
        self._out += data

    def flush(self, timeout: float | None = None) -> None:
        """Send everything written so far."""
        if self._out:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            data, self._out = self._out, bytearray()
            self._send_all(data, deadline)

    # --- TLS -------------------------------------------------------------------------------
    def _handshake(self, conn: SSL.Connection, timeout: float) -> None:
        try:
            libtls.handshake_loop(conn, timeout)
        except TimeoutError:
            raise TLSFailure("timeout") from None
        except SSL.SysCallError as exc:
            raise TLSFailure(ssl_error_text(exc) or "lost connection") from None
        except SSL.Error as exc:
            raise TLSFailure(ssl_error_text(exc)) from None

    def start_tls(self, conn: SSL.Connection, timeout: float) -> SSL.Connection:
        """Run the handshake of a connection made on this socket (server or client side)."""
        self.flush()
        self.tls = conn
        self._handshake(conn, timeout)
        return conn

    def close(self, timeout: float = 2.0) -> None:
        """Shut TLS down cleanly when it is up (a session stays resumable), then close."""
        if self.tls is not None:
            try:
                self.flush(timeout)
            except (StreamTimeout, StreamEOF):
                pass
            libtls.shutdown(self.tls, timeout)
        try:
            self.sock.close()
        except OSError:
            pass
