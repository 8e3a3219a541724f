"""A small, bounded HTTPS client for MTA-STS policy fetches and TLSRPT report uploads.

NAME
    https - one HTTPS request to an address the caller resolved, with size and time limits

DESCRIPTION
    The smtp client runs in a chroot jail where the C library's resolver sees only the
    jail's resolv.conf, and MTA-STS must use the same DNS view as MX lookups; so the
    caller resolves the host (with dnspython, smtp_dns_nameservers) and request()
    connects to those addresses in turn, with SNI and certificate name checks against the
    host name. Redirects are never followed (RFC 8461 section 3.3: "HTTP 3xx redirects
    MUST NOT be followed"); the caller sees the status. The response body is read up to
    max_body bytes; a longer one is an error, not a truncation. Every socket operation has
    the timeout; the whole request has at most `timeout` per address.

FUNCTIONS
    client_context(cafile="") -> ssl.SSLContext: certificate and host name checks on,
        TLS 1.2 or later, the system's CA bundle or cafile. Build it before a chroot.
    request(method, host, port, path, ctx, addresses, timeout, body=None, headers=None,
            max_body=65536) -> Response(status, content_type, body)
        HttpsError(kind, text): kind is "webpki" for a certificate or TLS failure,
        "fetch" for anything else (connect, timeout, size, protocol).

SEE ALSO
    smtp/mta_sts.py, lib/tlsrpt.py; RFC 8461, RFC 8460.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass


class HttpsError(Exception):
    """A request that failed; kind is "webpki" (certificate, TLS) or "fetch"."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes


def client_context(cafile: str = "") -> ssl.SSLContext:
    """A verifying client context (system CAs, or cafile); ssl.SSLError/OSError if bad."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Connection(http.client.HTTPSConnection):
    """An HTTPSConnection to one given address, with SNI and name checks for host."""

    def __init__(self, host: str, port: int, address: str, ctx: ssl.SSLContext,
                 timeout: float):
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._address = address

    def connect(self):
        family = socket.AF_INET6 if ":" in self._address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self._address, self.port))
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def _request_one(method, host, port, path, ctx, address, timeout, body, headers,
                 max_body) -> Response:
    conn = _Connection(host, port, address, ctx, timeout)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read(max_body + 1)
        except ssl.SSLCertVerificationError as exc:
            raise HttpsError("webpki", f"certificate verification failed: "
                                       f"{exc.verify_message or exc.reason}") from None
        except ssl.SSLError as exc:
            raise HttpsError("webpki", f"TLS handshake failed: {exc.reason or exc}") from None
        except (TimeoutError, socket.timeout):
            raise HttpsError("fetch", "timed out") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise HttpsError("fetch", f"{type(exc).__name__}: {exc}") from None
        if len(data) > max_body:
            raise HttpsError("fetch", f"response body larger than {max_body} bytes")
        return Response(resp.status, resp.getheader("Content-Type", "") or "", data)
    finally:
        conn.close()


def request(method: str, host: str, port: int, path: str, ctx: ssl.SSLContext,
            addresses, timeout: float, body: bytes | None = None,
            headers: dict | None = None, max_body: int = 65536) -> Response:
    """One request, to the first address that answers; HttpsError when none does."""
    last = HttpsError("fetch", f"no address for {host}")
    for address in addresses:
        try:
            return _request_one(method, host, port, path, ctx, address, timeout, body,
                                headers, max_body)
        except HttpsError as exc:
            last = exc
            if exc.kind == "webpki":
                break           # a certificate problem is not cured by another address
    raise last
