"""A STARTTLS-capable SMTP sink that counts full and resumed handshakes.

TlsSink(cert_pem_path, key_path=None) listens on a free loopback port (its `port`), offers
STARTTLS with a Python ssl server context (session tickets on, as OpenSSL's default), and
accepts every message with 250; a recipient whose local part is `defer` gets 451 at RCPT.
It counts `full` and `resumed` handshakes (SSLSocket.session_reused) and `messages`.
stop() ends its thread and closes the socket. Each connection is served in a thread.
"""

from __future__ import annotations

import socket
import ssl
import threading


class TlsSink:
    def __init__(self, cert_chain: str, key: str | None = None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_chain, key)
        self.lock = threading.Lock()
        self.full = self.resumed = self.messages = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.threads: list[threading.Thread] = []
        self.last: dict = {}        # thread -> (socket, file) in use, closed at its end
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        conn.settimeout(30)
        try:
            self._dialogue(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def _dialogue(self, conn):
        f = conn.makefile("rb")
        try:
            self._converse(conn, f)
        finally:
            self.last[threading.get_ident()][1].close()
            self.last[threading.get_ident()][0].close()

    def _converse(self, conn, f):
        self.last[threading.get_ident()] = (conn, f)
        conn.sendall(b"220 tls-sink.test ESMTP\r\n")
        tls = False
        while True:
            line = f.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-tls-sink.test\r\n" + (b"" if tls else b"250-STARTTLS\r\n")
                             + b"250 8BITMIME\r\n")
            elif verb == b"STAR" and not tls:
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                conn = self.ctx.wrap_socket(conn, server_side=True)
                with self.lock:
                    if conn.session_reused:
                        self.resumed += 1
                    else:
                        self.full += 1
                f.close()
                f = conn.makefile("rb")
                self.last[threading.get_ident()] = (conn, f)
                tls = True
            elif verb == b"MAIL":
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if b"<defer@" in line.lower():
                    conn.sendall(b"451 4.2.0 try later\r\n")
                else:
                    conn.sendall(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while True:
                    chunk = f.readline(65536)
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                with self.lock:
                    self.messages += 1
                conn.sendall(b"250 2.0.0 Ok: stored\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                if tls:
                    try:
                        conn.unwrap()
                    except (OSError, ssl.SSLError):
                        pass
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")

    def stop(self):
        self.running = False
        self.thread.join(5)
        for t in self.threads:
            t.join(5)
        self.sock.close()
