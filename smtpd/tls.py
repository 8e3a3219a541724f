"""smtpd's use of lib/tls.py: the server contexts of a generation, handshakes, and logging.

TlsServer.build(cfg) runs in the master (smtpd's prepare()), so every worker forked from it
shares one SSL_CTX and one set of session-ticket keys; with tls_server_sni_maps, the
contexts of every SNI name's chain are built there too (lib/tls.py SniMap), and the
handshake switches to the one of the client's name. handshake() runs STARTTLS or wrapper
mode on a session's stream within smtpd_starttls_timeout, logs Postfix's lines at
smtpd_tls_loglevel, and records what the access restrictions need about the client
certificate (trusted chain, fingerprints).

Before the handshake, the first TLS record the client sent is peeked at (one poll and
one recv with MSG_PEEK, at most one record, within the same time limit): when the
handshake fails, smtpd logs what the client offered, which is what an administrator needs
to understand a failing legacy client:

    SSL_accept error from host[addr]: client offered: protocols=TLSv1 ciphers=AES128-SHA sni=none

Each handshake and each failure also goes to lib/metrics.py (counters, tls_event_log).
"""

from __future__ import annotations

import select
import socket
import time

from ..lib import metrics, msg, tls_session
from ..lib import tls as T
from ..lib.maincf import ConfigError
from ..lib.smtpio import TLSFailure


class TlsServer:
    """The server TLS state of one smtpd configuration generation."""

    def __init__(self, server: T.ServerTLS, timeout: int):
        self.server = server
        self.timeout = timeout

    @classmethod
    def build(cls, cfg, level: str) -> "TlsServer":
        """Contexts from main.cf at level (server_security_level's); ConfigError (naming
        the parameter) when TLS is unusable."""
        try:
            server = T.server_tls(cfg, level=level)
        except T.TLSConfigError as exc:
            raise ConfigError(str(exc)) from None
        return cls(server, cfg["smtpd_starttls_timeout"])

    def rekeyed(self, cfg) -> "TlsServer":
        """The next session ticket key period's state (lib/tls.rotate_server_tls); built
        in the master, before the new workers fork. ConfigError as build()."""
        try:
            server = T.rotate_server_tls(cfg, self.server)
        except T.TLSConfigError as exc:
            raise ConfigError(str(exc)) from None
        return TlsServer(server, self.timeout)

    def handshake(self, stream, client) -> T.TLSInfo:
        """The server handshake on stream; TLSFailure when it does not complete."""
        # The reply to STARTTLS goes out first: the ClientHello that answers it says
        # which period's ticket key the client's ticket is under.
        stream.flush(self.timeout)
        conn = self.server.connection(stream.sock, client.client,
                                      self.server.level == "encrypt",
                                      peek_timeout=self.timeout)
        if self.server.loglevel >= 4:
            stream.trace = lambda what, data: _trace(client.client, what, data)
        deadline = time.monotonic() + self.timeout
        hello = _peek_record(stream.sock, self.timeout)  # parsed only if it fails
        try:
            stream.start_tls(conn, max(1.0, deadline - time.monotonic()))
        except TLSFailure as exc:
            offer = T.client_hello_offer(hello)
            msg.info(f"SSL_accept error from {client.client}: client offered: "
                     f"{T.offer_text(offer)}")
            metrics.tls_server_failure(client.client, exc.reason, offer)
            raise
        info = self.server.info(conn)
        metrics.tls_server(info)
        for line in self.server.log_lines(info):
            msg.info(line)
        client.ccert_verified = info.peer_cert_present and info.peer_trusted
        client.ccert_fingerprint = info.peer_fingerprint or None
        client.ccert_pkey_fingerprint = info.peer_pkey_fingerprint or None
        return info

    @property
    def received_header(self) -> bool:
        """smtpd_tls_received_header, as the contexts were built with it."""
        return self.server.received_header

    def received_lines(self, info: T.TLSInfo) -> list[str]:
        """The Received: header's TLS clause, one physical line each."""
        return self.server.received_lines(info)


def _peek_record(sock, timeout: float) -> bytes:
    """The bytes of the client's first record that have arrived, left in the socket."""
    try:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            return b""
        return sock.recv(T.HELLO_PEEK_LIMIT, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return b""


def _trace(namaddr: str, what: str, data: bytes) -> None:
    """smtpd_tls_loglevel 4: the whole conversation after STARTTLS, dumped."""
    msg.info(f"{namaddr}: {what} ({len(data)} bytes of plaintext)")
    for line in tls_session.dump_lines(data[:tls_session.DUMP_LIMIT]):
        msg.info(line)


__all__ = ["TlsServer", "TLSFailure"]
