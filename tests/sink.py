"""A counting SMTP sink on loopback: the far end of delivery tests and the fault campaign.

Sink(port) runs a threaded server that accepts every message (250 after the final dot,
which it records first) and remembers each message's Message-ID and recipients, so a test
can check what arrived and how often. It offers no STARTTLS and no extensions but
PIPELINING and 8BITMIME, and reads at most MAX_LINE bytes a line and MAX_MESSAGE a message.

A Sink can also misbehave, for the fault campaign: a recipient whose local part ends in
`+bounce` gets `550 5.1.1` at RCPT; with probability `tempfail` a message gets
`451 4.3.0` after its final dot and is not recorded; with probability `stall` the sink
waits `stall_seconds` after the final dot and then closes the connection without an
answer (and without recording). Delivery status notifications (multipart/report) are
recorded under every campaign Message-ID they quote, in `bounced`.
"""

from __future__ import annotations

import random
import re
import socketserver
import threading
import time
from collections import Counter

MAX_LINE = 65536
MAX_MESSAGE = 64 * 1024 * 1024
MSGID_RE = re.compile(rb"^message-id:\s*(<[^>\r\n]*>)", re.I | re.M)
QUOTED_ID_RE = re.compile(rb"^message-id:\s*(<campaign-[^>\r\n]*>)", re.I | re.M)


class _Handler(socketserver.StreamRequestHandler):
    timeout = 60          # wfile is unbuffered: every reply goes out as it is written

    def handle(self):
        try:
            self.converse()
        except (ConnectionError, TimeoutError):
            pass    # a client killed mid-session (the campaign does that on purpose)

    def converse(self):
        sink: Sink = self.server.sink
        w = self.wfile
        w.write(b"220 sink.test ESMTP counting sink\r\n")
        rcpts: list[str] = []
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                w.write(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                rcpts = []
                w.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpt = line[8:].strip().strip(b"<>").decode("latin-1")
                if rcpt.partition("@")[0].endswith("+bounce"):
                    w.write(b"550 5.1.1 <" + rcpt.encode() + b">: Recipient address "
                            b"rejected: User unknown\r\n")
                    continue
                rcpts.append(rcpt)
                w.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                w.write(b"354 go ahead\r\n")
                data, size = [], 0
                while True:
                    chunk = self.rfile.readline(MAX_LINE)
                    if not chunk or chunk == b".\r\n":
                        break
                    size += len(chunk)
                    if size < MAX_MESSAGE:
                        data.append(chunk)
                if not chunk:
                    return
                fate = sink.fate()
                if fate == "stall":
                    time.sleep(sink.stall_seconds)
                    return          # no answer, nothing recorded: the client must retry
                if fate == "tempfail":
                    w.write(b"451 4.3.0 Error: try again later (sink chaos)\r\n")
                    continue
                body = b"".join(data)
                m = MSGID_RE.search(body)
                sink.record(m.group(1).decode("latin-1") if m else None, rcpts, body)
                w.write(b"250 2.0.0 Ok: stored\r\n")
            elif verb == b"RSET" or verb == b"NOOP":
                w.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                w.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                w.write(b"502 5.5.2 Error: command not recognized\r\n")


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Sink:
    """A counting SMTP sink; use as a context manager or start()/stop()."""

    def __init__(self, port: int = 0, keep_bodies: bool = False, tempfail: float = 0.0,
                 stall: float = 0.0, stall_seconds: float = 0.0, seed: int = 0):
        self.server = _Server(("127.0.0.1", port), _Handler)
        self.server.sink = self
        self.port = self.server.server_address[1]
        self.keep_bodies = keep_bodies
        self.tempfail, self.stall, self.stall_seconds = tempfail, stall, stall_seconds
        self.rng = random.Random(seed)
        self.faults: Counter = Counter()
        self.lock = threading.Lock()
        self.ids: Counter = Counter()
        self.bounced: Counter = Counter()
        self.messages: list[tuple[str | None, list[str], bytes]] = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "Sink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

