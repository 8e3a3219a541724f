"""A Postfix policy server for the tests, in a thread: each request (name=value lines up to
an empty line) is recorded and answered by a function of the test.

    server = PolicyServer(answer, family=socket.AF_INET, path=None)
    answer(attrs) -> the reply lines (without the closing empty line), or None to hang up
    server.endpoint   "inet:127.0.0.1:PORT" or "unix:PATH", as check_policy_service takes it
    server.port       the TCP port (inet servers)
    server.requests   every request, as a dict; server.connections: connections accepted
    server.close()
"""

from __future__ import annotations

import socket
import threading


class PolicyServer:
    """A policy server: answers each request with answer(attrs) (a list of lines, or
    None to hang up); records every request and every connection it accepted."""

    def __init__(self, answer, family=socket.AF_INET, path=None):
        self.answer = answer
        self.requests: list[dict] = []
        self.connections = 0
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(path if path else ("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = None if path else self.sock.getsockname()[1]
        self.endpoint = f"unix:{path}" if path else \
            f"inet:127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        with conn, conn.makefile("rb") as rfile:
            attrs = {}
            for raw in rfile:
                line = raw.decode().rstrip("\n")
                if line:
                    name, _, value = line.partition("=")
                    attrs[name] = value
                    continue
                self.requests.append(attrs)
                lines = self.answer(attrs)
                attrs = {}
                if lines is None:
                    return
                conn.sendall("".join(x + "\n" for x in lines).encode() + b"\n")

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()
