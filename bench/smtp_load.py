"""SMTP load generator: drives any SMTP server on loopback and reports rate and latency.

    python bench/smtp_load.py --port 2525 --mode plain --clients 8 --messages 400
    python bench/smtp_load.py --port 2525 --mode starttls-resume --clients 32 --json

One message per connection, as a busy MX sees them: connect, EHLO, (STARTTLS, EHLO), MAIL,
RCPT, DATA with a message of --size bytes, QUIT. Modes:
    plain             no TLS
    starttls          STARTTLS with a full handshake every time
    starttls-resume   STARTTLS offering the previous session of this client process
    smtps             TLS from the first byte (wrapper mode)
Clients are separate processes (the machine has few cores; threads would serialize on the
GIL). The client side uses the standard library's ssl module (C), so the generator costs
the server under test as little CPU as possible. Reports messages/s, p50/p99 latency per
message, failures, and for the modes that offer the previous session (starttls-resume,
smtps) the fraction of those offers that the server accepted.

MAIL, RCPT and DATA go in one write when the server announces PIPELINING (RFC 2920), one
by one otherwise (OpenSMTPD does not announce it and rejects pipelined commands). With
`until` set in the arguments (a time.monotonic() value, shared by all clients of a run)
each client sends message after message until that instant instead of a fixed count, and
only the messages whose 250 came before it are counted (bench/sustained.py's windows).
With `skip_quit` set, a client sends QUIT and closes without waiting for the 221, as
Postfix's smtp client does by default (smtp_skip_quit_response = yes); a TLS session is
still closed with close_notify, which keeps it resumable. `timeout` (seconds, 30 by
default) bounds every connect, read and write.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import socket
import ssl
import statistics
import sys
import time


def _message(size: int) -> bytes:
    head = (b"From: bench@example.org\r\nTo: sink@example.net\r\n"
            b"Subject: load test\r\nMessage-ID: <bench@example.org>\r\n\r\n")
    line = b"0123456789" * 7 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


class Conn:
    """A minimal SMTP client over a socket that may become TLS."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.lines: list[bytes] = []

    def reply(self) -> bytes:
        """The last line of the next reply; the reply's other lines go to self.lines."""
        self.lines = []
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line[3:4] != b"-":
                    return line
                self.lines.append(line)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.buf += data

    def cmd(self, data: bytes, expect: bytes) -> bytes:
        self.sock.sendall(data)
        line = self.reply()
        if not line.startswith(expect):
            raise RuntimeError(f"{data[:20]!r} -> {line[:80]!r}")
        return line


def _client(args, count: int, out: mp.Queue) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    msg = _message(args.size)
    session = None
    lat, fails, resumed, handshakes = [], 0, 0, 0
    until = getattr(args, "until", None)
    sent = 0
    while (time.monotonic() < until) if until is not None else (sent < count):
        sent += 1
        start = time.perf_counter()
        sock = None
        offered = session is not None and args.mode in ("smtps", "starttls-resume")
        try:
            sock = socket.create_connection((args.host, args.port),
                                            timeout=getattr(args, "timeout", 30))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if args.mode == "smtps":
                sock = ctx.wrap_socket(sock, session=session)
            c = Conn(sock)
            c.reply()
            c.cmd(b"EHLO bench.example\r\n", b"250")
            if args.mode.startswith("starttls"):
                c.cmd(b"STARTTLS\r\n", b"220")
                sock = ctx.wrap_socket(sock, session=session if args.mode.endswith("resume")
                                       else None)
                c = Conn(sock)
                c.cmd(b"EHLO bench.example\r\n", b"250")
            pipelining = any(x[4:].strip().upper() == b"PIPELINING" for x in c.lines)
            if isinstance(sock, ssl.SSLSocket):
                if offered:
                    handshakes += 1         # a resumption was attempted
                    resumed += bool(sock.session_reused)
                session = sock.session      # after a read: the TLS 1.3 ticket is in
            if pipelining:
                c.cmd(b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<sink@example.net>\r\n"
                      b"DATA\r\n", b"250")
                c.reply()   # RCPT
                line = c.reply()
            else:
                c.cmd(b"MAIL FROM:<bench@example.org>\r\n", b"250")
                c.cmd(b"RCPT TO:<sink@example.net>\r\n", b"250")
                c.sock.sendall(b"DATA\r\n")
                line = c.reply()
            if not line.startswith(b"354"):
                raise RuntimeError(f"DATA -> {line[:80]!r}")
            c.cmd(msg + b".\r\n", b"250")
            accepted_at = time.monotonic()
            if getattr(args, "skip_quit", False):
                c.sock.sendall(b"QUIT\r\n")   # and close without waiting for the 221
            else:
                c.cmd(b"QUIT\r\n", b"221")
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.unwrap()       # a clean shutdown keeps the session resumable
                except (OSError, ssl.SSLError):
                    pass
            if until is None or accepted_at <= until:
                lat.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - count and report every kind of failure
            fails += 1
            if fails <= 3:
                print(f"client error: {exc}", file=sys.stderr)
        finally:
            if sock is not None:
                sock.close()
    out.put((lat, fails, resumed, handshakes))


def run(args) -> dict:
    """Run one load and return its figures."""
    per = [args.messages // args.clients + (1 if i < args.messages % args.clients else 0)
           for i in range(args.clients)]
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_client, args=(args, n, q)) for n in per if n]
    start = time.perf_counter()
    for p in procs:
        p.start()
    # args.deadline (optional, seconds): the whole load must end within it, or the clients
    # still running are terminated (by their pids) and TimeoutError is raised.
    deadline = getattr(args, "deadline", None)
    end = None if deadline is None else time.monotonic() + deadline
    results = []
    try:
        for _ in procs:
            results.append(q.get(timeout=None if end is None
                                 else max(0.1, end - time.monotonic())))
    except queue.Empty:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        raise TimeoutError(f"the load did not end within {deadline} s") from None
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r[0])
    fails = sum(r[1] for r in results)
    resumed = sum(r[2] for r in results)
    handshakes = sum(r[3] for r in results)
    return {
        "mode": args.mode, "clients": args.clients, "messages": len(lat), "failures": fails,
        "seconds": round(elapsed, 3), "rate": round(len(lat) / elapsed, 1) if elapsed else 0,
        "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
        "resumed": round(resumed / handshakes, 4) if handshakes else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="plain",
                   choices=["plain", "starttls", "starttls-resume", "smtps"])
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--size", type=int, default=5000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result) if args.json else
          " ".join(f"{k}={v}" for k, v in result.items()))
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
