"""The master's view of one master.cf service: listeners, pipes, workers, throttling.

A ServiceState is one service in one configuration generation. It owns the listening
sockets (which a reload may hand on to the next generation of the same service), the status
pipe its workers report on, and the liveness pipe whose closing retires them. It knows the
program its workers run and what that program prepared in the master before forking.

PROGRAMS
    The command column names a postfix-py program (PROGRAMS below) or, for a site's own
    service written in Python, `python:package.module`. A program module provides
    main(ctx) -> exit status, and may provide prepare(cfg, service) -> object, which the
    master runs once per generation before forking (smtpd builds its TLS contexts there, so
    that every worker shares one set of session-ticket keys).

FUNCTIONS
    load_program(command) -> (module or None, error text or None)
    open_listeners(svc, cfg, run_as_root, reuse) -> list of sockets; OSError with Postfix's
        wording ("bind 127.0.0.1 port 25: Address already in use")
    endpoint_key(svc, cfg) -> hashable key of what a service listens on, for reuse at reload
"""

from __future__ import annotations

import importlib
import os
import pwd
import socket
import time
from dataclasses import dataclass, field

from ..lib import msg

# command column -> module implementing it
PROGRAMS = {
    "smtpd": "postfix_py.smtpd.service",
    "smtp": "postfix_py.smtp.service",
    "lmtp": "postfix_py.smtp.service",
    "qmgr": "postfix_py.qmgr.service",
    "tlsmgr": "postfix_py.tlsmgr.service",
    "anvil": "postfix_py.anvil.service",
    "local": "postfix_py.local.service",
    "discard": "postfix_py.local.discard",
    "error": "postfix_py.local.error",
    "pickup": "postfix_py.smtpd.pickup",
}
EXTENSION_PREFIX = "python:"


def load_program(command: str):
    """Import the module of a master.cf command: (module, None) or (None, why not)."""
    if command.startswith(EXTENSION_PREFIX):
        name = command[len(EXTENSION_PREFIX):]
    else:
        name = PROGRAMS.get(command)
        if name is None:
            return None, f"unknown program: {command}"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return None, f"cannot load program {command}: {exc}"
    if not callable(getattr(module, "main", None)):
        return None, f"program {command} has no main()"
    return module, None


def program_name(command: str) -> str:
    """The name a program's workers log and show as: smtpd, tlsmgr, or the module's last part."""
    if command.startswith(EXTENSION_PREFIX):
        return command[len(EXTENSION_PREFIX):].rsplit(".", 1)[-1]
    return command


@dataclass
class Proc:
    pid: int
    key: str
    generation: int
    started: float = field(default_factory=time.time)
    avail: bool = True
    used: bool = False          # has taken a client: its death does not mean a bad start
    served: int = 0


@dataclass
class ServiceState:
    svc: object                 # lib.mastercf.Service
    cfg: object                 # Config with the service's -o overrides
    generation: int
    program: str
    module: object = None
    load_error: str | None = None
    prepared: object = None
    listeners: list = field(default_factory=list)
    status_r: int = -1
    status_w: int = -1
    live_r: int = -1
    live_w: int = -1
    maxproc: int = 0            # 0: no limit
    throttled_until: float = 0.0
    listening: bool = False
    wakeup_timer: object = None
    limit_warned: float = 0.0
    status_buf: bytes = b""

    @property
    def key(self) -> str:
        return self.svc.key

    def pipes(self) -> None:
        """Create the status and liveness pipes of this generation."""
        self.status_r, self.status_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.status_r, False)
        self.live_r, self.live_w = os.pipe2(os.O_CLOEXEC)

    def master_fds(self) -> list[int]:
        """Descriptors a worker of another service must close."""
        return [fd for fd in (self.status_r, self.status_w, self.live_r, self.live_w)
                if fd >= 0] + [s.fileno() for s in self.listeners]

    def retire(self) -> None:
        """Close the liveness pipe: this generation's workers finish and exit."""
        for name in ("live_w", "live_r", "status_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def close(self) -> None:
        """Release everything, once no worker of this generation is left."""
        self.retire()
        if self.status_r >= 0:
            os.close(self.status_r)
            self.status_r = -1
        for sock in self.listeners:
            sock.close()
        self.listeners = []


def endpoint_key(svc, cfg) -> tuple:
    """What a service listens on, so that a reload can keep the very same sockets."""
    if svc.type == "inet":
        return ("inet", svc.inet_host or "", svc.inet_port, cfg.get("inet_interfaces"),
                cfg.get("inet_protocols"))
    return ("unix", unix_path(svc, cfg))


def unix_path(svc, cfg) -> str:
    """queue_directory/private/NAME or queue_directory/public/NAME."""
    sub = "private" if svc.private else "public"
    return os.path.join(cfg.get("queue_directory"), sub, svc.name)


def _inet_addresses(svc, cfg) -> list[tuple]:
    """(family, sockaddr) pairs an inet service binds."""
    protocols = set(cfg["inet_protocols"]) or {"all"}
    families = []
    if protocols & {"all", "ipv4"}:
        families.append(socket.AF_INET)
    if protocols & {"all", "ipv6"} and socket.has_ipv6:
        families.append(socket.AF_INET6)
    hosts = [svc.inet_host] if svc.inet_host else cfg["inet_interfaces"]
    out = []
    for host in hosts:
        if host in ("all", ""):
            if socket.AF_INET in families:
                out.append((socket.AF_INET, ("0.0.0.0", svc.inet_port)))
            if socket.AF_INET6 in families:
                out.append((socket.AF_INET6, ("::", svc.inet_port)))
            continue
        if host == "loopback-only":
            host = "localhost"
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, svc.inet_port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OSError(f"{host}: host not found: {exc.strerror}") from None
        for family, _, _, _, sockaddr in infos:
            if family in families and (family, sockaddr[:2]) not in [(f, a[:2]) for f, a in out]:
                out.append((family, sockaddr[:2]))
    return out


def open_listeners(svc, cfg, run_as_root: bool) -> list[socket.socket]:
    """Bind and listen on everything a service serves; OSError names the address."""
    socks: list[socket.socket] = []
    try:
        if svc.type == "inet":
            for family, addr in _inet_addresses(svc, cfg):
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:
                    raise OSError(exc.errno, f"bind {addr[0]} port {addr[1]}: "
                                             f"{exc.strerror}") from None
                sock.listen(socket.SOMAXCONN)
        elif svc.type == "unix":
            path = unix_path(svc, cfg)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                sock.bind(path)
            except OSError as exc:
                raise OSError(exc.errno, f"bind {path}: {exc.strerror}") from None
            os.chmod(path, 0o600 if svc.private else 0o666)
            if run_as_root:
                pw = pwd.getpwnam(cfg.get("mail_owner"))
                os.chown(path, pw.pw_uid, pw.pw_gid)
            sock.listen(socket.SOMAXCONN)
        else:
            raise OSError(0, f"service {svc.key}: transport type {svc.type} is not supported")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
    return socks


def describe(svc) -> str:
    """The service as Postfix's master names it in warnings: `"smtp" (127.0.0.1:25)`."""
    return f'"{svc.name}" ({svc.endpoint})' if hasattr(svc, "endpoint") else f'"{svc.name}"'


def log_exit(program: str, pid: int, status: int) -> bool:
    """Log an abnormal worker exit as Postfix does; True when the exit was abnormal."""
    if os.WIFSIGNALED(status):
        msg.warn(f"process postfix-py/{program} pid {pid} killed by signal "
                 f"{os.WTERMSIG(status)}")
        return True
    code = os.WEXITSTATUS(status)
    if code != 0:
        msg.warn(f"process postfix-py/{program} pid {pid} exit status {code}")
        return True
    return False
