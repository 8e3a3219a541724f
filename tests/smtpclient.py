"""The one raw SMTP client of the tests: it sends anything, pipelined or not, and can switch
to TLS.

    c = SmtpClient(port, timeout=10, tls_context=None, source=None)
    c.reply()           one whole (multi-line) reply as text, lines joined by "\\n"; "<EOF>"
                        is appended when the server closed the connection before its end
    c.cmd(line)         send one command (str, or bytes sent as they are; CRLF added)
                        and return its reply
    c.send(data)        send raw bytes, nothing added (pipelining, content, garbage)
    c.starttls(ctx)     STARTTLS, which must be accepted, then the handshake
    c.wrap(ctx, session=None)  the handshake alone (after a STARTTLS the caller checked)
    c.close()

tls_context makes it a wrapper-mode (smtps) client; source binds the local address (a
second loopback address, for client access tests). A reply's last line is the first
whose fourth character is not `-`, as RFC 5321 has it.
"""

from __future__ import annotations

import socket


class SmtpClient:
    """A line-level SMTP client that can send anything and switch to TLS."""

    def __init__(self, port: int, timeout: float = 10, tls_context=None,
                 source: str | None = None):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None)
        if tls_context is not None:             # wrapper mode (smtps)
            self.sock = tls_context.wrap_socket(self.sock)
        self.buf = b""

    def reply(self) -> str:
        lines = []
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    return "\n".join(lines + ["<EOF>"])
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            lines.append(line.decode().rstrip("\r"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, text: str | bytes) -> str:
        self.sock.sendall((text if isinstance(text, bytes) else text.encode()) + b"\r\n")
        return self.reply()

    def starttls(self, tls_context) -> None:
        assert self.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        self.wrap(tls_context)

    def wrap(self, tls_context, session=None) -> None:
        self.sock = tls_context.wrap_socket(self.sock, session=session)

    def close(self) -> None:
        self.sock.close()
