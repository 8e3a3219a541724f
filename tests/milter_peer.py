"""A tiny scripted milter (the Sendmail milter protocol, filter side) for the tests.

MilterPeer(replies=None, actions=0x1ff, protocol=0, version=6, symlist=None,
delay=None, optneg="ok") listens on 127.0.0.1 (a thread per connection) and answers
each event: replies maps an event command letter ("C" connect, "H" helo, "M" mail,
"R" rcpt, "T" data, "L" header, "N" eoh, "B" body, "E" end of message, "U" unknown) to a
list of (reply letter, data bytes) packets; an event not in replies gets "c" (continue).
actions and protocol are what the milter asks for in its SMFIC_OPTNEG reply (protocol
flags such as 0x1 no connect), symlist a {stage: "macro names"} for SMFIR_SETSYMLIST.
delay = (event letter, seconds) sleeps before that event's reply; optneg="close" hangs up
instead of negotiating, "silent" never answers it.

It records what it got: events, a list of (letter, [strings]) per connection in
connections (macros as ("D", [event letter, name, value, ...])); port; stop().
"""

from __future__ import annotations

import socket
import struct
import threading
import time

NO_REPLY = {"A", "D", "Q", "K"}         # abort, macro, quit: no reply
NR_FLAGS = {"C": 0x1000, "H": 0x2000, "M": 0x4000, "R": 0x8000, "T": 0x10000,
            "U": 0x20000, "N": 0x40000, "B": 0x80000, "L": 0x80}


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def cstrings(*items: str) -> bytes:
    return b"".join(i.encode() + b"\0" for i in items)


class MilterPeer:
    def __init__(self, replies=None, actions=0x1FF, protocol=0, version=6, symlist=None,
                 delay=None, optneg="ok"):
        self.replies = replies or {}
        self.actions, self.protocol, self.version = actions, protocol, version
        self.symlist = symlist or {}
        self.delay = delay
        self.optneg = optneg
        self.connections: list[list] = []
        self.errors: list[BaseException] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.name = f"inet:127.0.0.1:{self.port}"
        self.running = True
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def events(self) -> list:
        return [e for conn in self.connections for e in conn]

    def letters(self) -> str:
        return "".join(e[0] for e in self.events if e[0] != "D")

    def macros(self, letter: str) -> dict:
        out = {}
        for ev, items in self.events:
            if ev == "D" and items and items[0] == letter:
                out.update(zip(items[1::2], items[2::2]))
        return out

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    @staticmethod
    def _read(conn, n):
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def _serve(self, conn: socket.socket):
        log: list = []
        self.connections.append(log)
        try:
            with conn:
                while True:
                    length = struct.unpack("!I", self._read(conn, 4))[0]
                    cmd = self._read(conn, 1).decode()
                    data = self._read(conn, length - 1)
                    if cmd == "O":
                        log.append(("O", list(struct.unpack("!III", data[:12]))))
                        if self.optneg == "close":
                            return
                        if self.optneg == "silent":
                            time.sleep(30)
                            return
                        extra = b"".join(struct.pack("!I", k) + v.encode() + b"\0"
                                         for k, v in self.symlist.items())
                        conn.sendall(packet(b"O", struct.pack(
                            "!III", self.version, self.actions, self.protocol) + extra))
                        continue
                    if cmd == "D":
                        items = [data[:1].decode()] + [
                            s.decode("utf-8", "replace") for s in data[1:].split(b"\0")[:-1]]
                        log.append(("D", items))
                        continue
                    if cmd == "C":
                        name, _, rest = data.partition(b"\0")
                        log.append(("C", [name.decode(), rest[:1].decode(),
                                          rest[3:].rstrip(b"\0").decode()]))
                    elif cmd == "B":
                        log.append(("B", [data.decode("utf-8", "replace")]))
                    else:
                        log.append((cmd, [s.decode("utf-8", "replace")
                                          for s in data.split(b"\0")[:-1]]))
                    if cmd == "Q":
                        return
                    if cmd in NO_REPLY or self.protocol & NR_FLAGS.get(cmd, 0):
                        continue
                    if self.delay and self.delay[0] == cmd:
                        end = time.monotonic() + self.delay[1]
                        while self.running and time.monotonic() < end:
                            time.sleep(0.05)
                    for letter, payload in self.replies.get(cmd, [("c", b"")]):
                        conn.sendall(packet(letter.encode(), payload))
        except (EOFError, OSError):
            pass
        except BaseException as exc:        # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def stop(self):
        self.running = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)      # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        self.acceptor.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
