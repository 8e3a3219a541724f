"""The client of a delegated SMTPD access policy server, as Postfix's attr_clnt/auto_clnt.

smtpd's check_policy_service sends one request per restriction: attribute lines
`name=value` ending with an empty line, and reads the answer in the same form; the one
attribute it needs is `action` (an access(5) action). The protocol is Postfix's
SMTPD_POLICY_README ("plain" attribute encoding).

ENDPOINTS
    inet:host:port (host may be [ipv6]) and unix:path. A relative unix path is taken from
    the current directory, which is queue_directory (the root of the chroot jail when
    smtpd runs chrooted), as Postfix's private/policy; an absolute path is absolute inside
    the jail.

CONNECTIONS
    A connection is kept for the next request (and the next SMTP session of the same smtpd
    process) unless it has been idle max_idle seconds, or open max_ttl seconds, or served
    request_limit requests (0: no limit). Postfix's auto_clnt closes an idle connection
    from a timer; smtpd here has no event loop between sessions, so an expired connection
    is closed at the next request (or when the process ends) and a new one made. A
    connection that is readable before a request is sent was closed by the server: it is
    dropped and the request tried again. Each failed try waits try_delay seconds and
    reconnects; after try_limit tries the request fails (None), and the caller applies
    its default action.

LOG LINES
    Postfix's: "warning: connect to HOST:PORT: Connection refused" (or the unix path),
    "warning: problem talking to server HOST:PORT: <reason>", "warning: unexpected
    attribute NAME from HOST:PORT (expecting: action)", "warning: missing attribute action
    in input from HOST:PORT".

FUNCTIONS
    PolicyClient(endpoint, timeout, max_idle, max_ttl, request_limit, try_limit,
        try_delay) -> a client (ValueError for an endpoint that is not inet: or unix:).
    PolicyClient.request(attrs) -> the action text, or None when the server could not be
        asked (after the warnings above). attrs is a list of (name, value) pairs.
    PolicyClient.close() drops the connection.
    parse_endpoint(text) -> (family, address) for socket.socket / connect, or ValueError.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from . import msg

LINE_LIMIT = 4096         # one answer line, bounded
ATTR_LIMIT = 1024         # attributes in one answer (attr_scan_plain's count limit)


class PolicyProblem(Exception):
    """A request that failed on this connection, with its errno (0: none, as a hang-up
    or a malformed answer)."""

    def __init__(self, errnum: int = 0):
        super().__init__(os.strerror(errnum) if errnum else "Success")
        self.errno = errnum


# attr_clnt_request warns at every try unless the errno is one of a plain hang-up
_QUIET = {0, errno.EPIPE, errno.ENOENT, errno.ECONNRESET}


def parse_endpoint(text: str) -> tuple[int, object, str]:
    """(address family, connect address, the name Postfix logs) of inet:... or unix:..."""
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise ValueError(f"malformed policy server endpoint: \"{text}\"")
    if kind == "unix":
        return socket.AF_UNIX, rest, rest
    if kind == "inet":
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]")
            port = port[1:] if port.startswith(":") else ""
        else:
            host, _, port = rest.rpartition(":")
        if not host or not port:
            raise ValueError(f"malformed policy server endpoint: \"{text}\"")
        if not port.isdigit():
            try:
                port = str(socket.getservbyname(port, "tcp"))
            except OSError:
                raise ValueError(f"unknown service: {port}/tcp") from None
        if int(port) > 65535:
            raise ValueError(f"malformed policy server endpoint: \"{text}\"")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, int(port)), rest
    raise ValueError(f"unsupported policy server transport: \"{kind}\" in \"{text}\"")


def _quote(value) -> str:
    """A value as one line: the plain encoding has no escapes, so line ends go."""
    return str(value).replace("\n", " ").replace("\r", " ")


class PolicyClient:
    """One policy server endpoint, its connection kept between requests."""

    def __init__(self, endpoint: str, timeout: int = 100, max_idle: int = 300,
                 max_ttl: int = 1000, request_limit: int = 0, try_limit: int = 2,
                 try_delay: int = 1):
        self.family, self.address, self.name = parse_endpoint(endpoint)
        self.timeout = timeout
        self.max_idle, self.max_ttl = max_idle, max_ttl
        self.request_limit, self.try_limit, self.try_delay = request_limit, try_limit, \
            try_delay
        self.sock: socket.socket | None = None
        self.rfile = None
        self.opened = self.used = 0.0
        self.requests = 0

    # --- the connection ---------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection (auto_clnt_recover)."""
        if self.rfile is not None:
            self.rfile.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.rfile = None
        self.requests = 0

    def _connection(self) -> socket.socket:
        """The open connection, or a new one; PolicyProblem when connect fails."""
        now = time.monotonic()
        if self.sock is not None and (
                self.max_idle > 0 and now - self.used >= self.max_idle
                or self.max_ttl > 0 and now - self.opened >= self.max_ttl):
            self.close()
        if self.sock is None:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
            sock.settimeout(self.timeout if self.timeout > 0 else None)
            try:
                sock.connect(self.address)
            except OSError as exc:
                sock.close()
                problem = PolicyProblem(_errno(exc))
                msg.warn(f"connect to {self.name}: {problem}")
                raise problem from None
            self.sock, self.rfile = sock, sock.makefile("rb")
            self.opened = now
        self.used = now
        return self.sock

    # --- one request ------------------------------------------------------------------
    def request(self, attrs: list[tuple[str, object]]) -> str | None:
        """Send attrs, return the action; None after try_limit failed tries."""
        payload = "".join(f"{name}={_quote(value)}\n" for name, value in attrs) + "\n"
        data = payload.encode("utf-8", "surrogateescape")
        count = 0
        while True:
            try:
                sock = self._connection()
                if select.select([sock], [], [], 0)[0]:
                    # readable before we asked: the server hung up (or talks out of turn)
                    raise PolicyProblem()
                sock.sendall(data)
                action = self._answer()
                self.requests += 1
                if self.request_limit > 0 and self.requests >= self.request_limit:
                    self.close()
                return action
            except OSError as exc:
                problem = PolicyProblem(_errno(exc))
            except PolicyProblem as exc:
                problem = exc
            count += 1
            last = count >= self.try_limit > 0
            if last or problem.errno not in _QUIET:
                msg.warn(f"problem talking to server {self.name}: {problem}")
            self.close()
            if last:
                return None
            time.sleep(self.try_delay)

    def _answer(self) -> str:
        """Read name=value lines to the empty line; the action's value."""
        action, seen = None, 0
        while True:
            line = self.rfile.readline(LINE_LIMIT + 1)
            if not line:
                raise PolicyProblem()     # EOF: Postfix's %m is then errno 0
            if len(line) > LINE_LIMIT or not line.endswith(b"\n"):
                msg.warn(f"string length > {LINE_LIMIT} characters from {self.name} "
                         f"while reading input attribute name")
                raise PolicyProblem()
            text = line.rstrip(b"\n").decode("utf-8", "surrogateescape")
            if text == "":
                break
            seen += 1
            if seen > ATTR_LIMIT:
                msg.warn(f"attribute count exceeds limit {ATTR_LIMIT} in input from "
                         f"{self.name}")
                raise PolicyProblem()
            name, eq, value = text.partition("=")
            if name != "action":
                msg.warn(f"unexpected attribute {name} from {self.name} "
                         f"(expecting: action)")
                raise PolicyProblem()
            if not eq:
                msg.warn(f"missing value for string attribute action from {self.name}")
                raise PolicyProblem()
            action = value
        if action is None:
            msg.warn(f"missing attribute action in input from {self.name}")
            raise PolicyProblem()
        return action


def _errno(exc: OSError) -> int:
    """The errno of a socket error (a timeout is ETIMEDOUT, as Postfix's %m says)."""
    if isinstance(exc, socket.timeout) or not exc.errno:
        return errno.ETIMEDOUT if isinstance(exc, socket.timeout) else errno.EIO
    return exc.errno
