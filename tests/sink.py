"""The one fake SMTP server of the tests: scripted peers, and a counting sink.

FakeServer(handler, host="127.0.0.1", port=0, rcvbuf=None, concurrent=False) listens on
loopback and plays handler(conn) on each connection it accepts, one at a time (or each in
a thread of its own with concurrent=True), then closes it. It counts connections, keeps an
exception a handler raised in errors (a peer going away is not one), and ends with stop()
or as a context manager. A handler is a plain function of the connected socket; these help
write one:

    lines_of(conn) -> (readline, read_data): readline() returns one line as text without
        its CRLF; read_data() returns the message content up to the final dot (dot-stuffing
        kept, without the last CRLF). Both raise EOFError when the peer closes.
    Script(steps, tls_ctx=None): a handler that plays a list of steps and records what it
        got: ("send", bytes), ("expect", regex) for the next command line, ("data",) for
        content up to and with the final dot, ("starttls",) to become the TLS server side
        with tls_ctx, ("sleep", seconds), ("eof",) to read until the peer closes,
        ("close",). It keeps lines, data, recv_sizes, peercert and the first error.

Sink(port=0, keep_bodies=False) is a FakeServer (concurrent) whose handler accepts every
message (250 after the final dot, which it records first) and remembers each message's
Message-ID and recipients, so a test can check what arrived and how often: the far end of
delivery tests and the fault campaign. It offers no STARTTLS and no extensions but
PIPELINING and 8BITMIME, and reads at most MAX_LINE bytes a line and MAX_MESSAGE a message.

A Sink can also misbehave, for the fault campaign: a recipient whose local part ends in
`+bounce` gets `550 5.1.1` at RCPT; with probability `tempfail` a message gets
`451 4.3.0` after its final dot and is not recorded; with probability `stall` the sink
waits `stall_seconds` after the final dot and then closes the connection without an
answer (and without recording). Delivery status notifications (multipart/report) are
counted under every campaign Message-ID they quote, in `bounced`.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import threading
import time
from collections import Counter

MAX_LINE = 65536
MAX_MESSAGE = 64 * 1024 * 1024
MSGID_RE = re.compile(rb"^message-id:\s*(<[^>\r\n]*>)", re.I | re.M)
QUOTED_ID_RE = re.compile(rb"^message-id:\s*(<campaign-[^>\r\n]*>)", re.I | re.M)


class FakeServer:
    """An SMTP peer on loopback: handler(conn) plays each accepted connection."""

    def __init__(self, handler, host="127.0.0.1", port=0, rcvbuf=None, concurrent=False,
                 timeout=20):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.handler, self.concurrent, self.timeout = handler, concurrent, timeout
        self.stopping = False
        self.errors: list[Exception] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            if self.concurrent:
                threading.Thread(target=self._play, args=(conn,), daemon=True).start()
            else:
                self._play(conn)

    def _play(self, conn):
        try:
            conn.settimeout(self.timeout)
            self.handler(conn)
        except (OSError, ssl.SSLError, EOFError):
            pass        # the peer went away (the fault campaign kills clients on purpose)
        except Exception as exc:        # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        finally:
            conn.close()

    def stop(self):
        self.stopping = True
        self.thread.join(10)
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def lines_of(conn):
    """A line reader for a FakeServer handler: (readline, read_data)."""
    buf = bytearray()

    def readline():
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf.extend(chunk)
        i = buf.index(b"\n")
        line = bytes(buf[:i + 1])
        del buf[:i + 1]
        return line.decode("latin-1").rstrip("\r\n")

    def read_data():
        while b"\r\n.\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf.extend(chunk)
        i = buf.index(b"\r\n.\r\n")
        data = bytes(buf[:i])
        del buf[:i + 5]
        return data
    return readline, read_data


class Script:
    """A handler that plays scripted steps (see the module's docstring) and records."""

    def __init__(self, steps, tls_ctx=None):
        self.steps = steps
        self.tls_ctx = tls_ctx
        self.buf = b""
        self.lines = []         # command lines received, in order
        self.data = b""         # DATA content received (with the final dot)
        self.error = None
        self.recv_sizes = []
        self.peercert = None

    def _recv(self, conn):
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError("client closed")
        self.recv_sizes.append(len(chunk))
        self.buf += chunk

    def _readline(self, conn):
        while b"\n" not in self.buf:
            self._recv(conn)
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.rstrip(b"\r").decode()
        self.lines.append(text)
        return text

    def __call__(self, sock):
        """Play the steps on sock; the first error is kept in error, not raised."""
        conn = sock
        try:
            for step in self.steps:
                op, *args = step
                if op == "send":
                    conn.sendall(args[0])
                elif op == "expect":
                    line = self._readline(conn)
                    if not re.match(args[0], line):
                        raise AssertionError(f"expected {args[0]!r}, got {line!r}")
                elif op == "data":
                    while b"\r\n.\r\n" not in self.buf:
                        self._recv(conn)
                    self.data, self.buf = self.buf.split(b"\r\n.\r\n", 1)
                    self.data += b"\r\n.\r\n"
                elif op == "starttls":
                    conn = self.tls_ctx.wrap_socket(sock, server_side=True)
                    self.peercert = conn.getpeercert(binary_form=True)
                elif op == "sleep":
                    time.sleep(args[0])
                elif op == "eof":
                    try:
                        while True:
                            self._recv(conn)
                    except (EOFError, OSError, ssl.SSLError):
                        pass
                elif op == "close":
                    break
        except Exception as exc:        # noqa: BLE001 - the test reports it
            self.error = exc
        finally:
            try:
                if conn is not sock:
                    conn.close()
            except OSError:
                pass
            sock.close()


class Sink(FakeServer):
    """A counting SMTP sink; use as a context manager or start()/stop()."""

    def __init__(self, port: int = 0, keep_bodies: bool = False, tempfail: float = 0.0,
                 stall: float = 0.0, stall_seconds: float = 0.0, seed: int = 0):
        self.keep_bodies = keep_bodies
        self.tempfail, self.stall, self.stall_seconds = tempfail, stall, stall_seconds
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.lock = threading.Lock()
        self.ids: Counter = Counter()
        self.bounced: Counter = Counter()
        self.messages: list[tuple[str | None, list[str], bytes]] = []
        super().__init__(self._converse, port=port, concurrent=True, timeout=60)

    def fate(self) -> str:
        """What happens to the message just received: stored, tempfail or stall."""
        with self.lock:
            x = self.rng.random()
            fate = "stall" if x < self.stall else \
                "tempfail" if x < self.stall + self.tempfail else "stored"
            self.faults[fate] += 1
            return fate

    def record(self, msgid, rcpts, body) -> None:
        with self.lock:
            self.ids[msgid] += 1
            if b"multipart/report" in body[:4096].lower():
                for quoted in set(QUOTED_ID_RE.findall(body)):
                    self.bounced[quoted.decode("latin-1")] += 1
            self.messages.append((msgid, rcpts, body if self.keep_bodies else b""))

    def start(self) -> "Sink":
        return self         # listening since it was made; kept for the callers' symmetry

    def _converse(self, conn):
        with conn.makefile("rb") as f:
            self._dialogue(f, conn.sendall)

    def _dialogue(self, f, w):
        w(b"220 sink.test ESMTP counting sink\r\n")
        rcpts: list[str] = []
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                w(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                rcpts = []
                w(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpt = line[8:].strip().strip(b"<>").decode("latin-1")
                if rcpt.partition("@")[0].endswith("+bounce"):
                    w(b"550 5.1.1 <" + rcpt.encode() + b">: Recipient address "
                      b"rejected: User unknown\r\n")
                    continue
                rcpts.append(rcpt)
                w(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                w(b"354 go ahead\r\n")
                data, size = [], 0
                while True:
                    chunk = f.readline(MAX_LINE)
                    if not chunk or chunk == b".\r\n":
                        break
                    size += len(chunk)
                    if size < MAX_MESSAGE:
                        data.append(chunk)
                if not chunk:
                    return
                fate = self.fate()
                if fate == "stall":
                    time.sleep(self.stall_seconds)
                    return          # no answer, nothing recorded: the client must retry
                if fate == "tempfail":
                    w(b"451 4.3.0 Error: try again later (sink chaos)\r\n")
                    continue
                body = b"".join(data)
                m = MSGID_RE.search(body)
                self.record(m.group(1).decode("latin-1") if m else None, rcpts, body)
                w(b"250 2.0.0 Ok: stored\r\n")
            elif verb == b"RSET" or verb == b"NOOP":
                w(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                w(b"221 2.0.0 Bye\r\n")
                return
            else:
                w(b"502 5.5.2 Error: command not recognized\r\n")
