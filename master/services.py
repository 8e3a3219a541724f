"""The master's view of one master.cf service: listeners, pipes, workers, throttling.

A ServiceState is one service in one configuration generation. It owns the listening
sockets (which a reload may hand on to the next generation of the same service), the status
pipe its workers report on, and the liveness pipe whose closing retires them. It knows the
program its workers run and what that program prepared in the master before forking.

PASS SERVICES
    A master.cf service of type pass (`smtpd pass - - y - - smtpd`, Postfix's layout
    behind postscreen) listens on a unix socket under private/ as a unix service does;
    what differs is what its workers receive on it: each connection carries one client
    socket (SCM_RIGHTS) and its endpoint attributes (lib/passfd.py), and the worker
    serves that client. The master treats it as a unix service otherwise.

PROGRAMS
    The command column names a postfix-py program (PROGRAMS below) or, for a site's own
    service written in Python, `python:package.module`. A program module provides
    main(ctx) -> exit status, and may provide prepare(cfg, service) -> object, which the
    master runs once per generation before forking (smtpd builds its TLS contexts there, so
    that every worker shares one set of session-ticket keys).

    A Postfix administrator's master.cf names programs and transport types that
    postfix-py does not have (cleanup, bounce, trivial-rewrite, postlogd on unix-dgram,
    pipe, ...): runnable() warns about each such service and leaves it out, at start,
    reload and check, so that Debian's stock master.cf starts.

FUNCTIONS
    runnable(services, warn) -> the services the master can run; the others are warned
        about ("master.cf, line N: service cleanup/unix: unknown program: cleanup;
        service skipped") and dropped. A python: extension that fails to import stays (its
        workers fail, and the master throttles it, loudly).
    load_program(command) -> (module or None, error text or None)
    open_listeners(svc, cfg, run_as_root) -> list of sockets; OSError with Postfix's
        wording ("bind 127.0.0.1 port 25: Address already in use"). Unix sockets are made
        with mail_owner's effective uid and gid and their mode set by the umask at bind:
        root never follows a path in a directory that mail_owner can write.
    endpoint_key(svc, cfg) -> hashable key of what a service listens on, for reuse at reload
    local_only(svc, listeners) -> True for a unix service or an inet one on loopback alone
    stress_warned(state) -> whether the "has reached its process limit" warning applies:
        as Postfix (master_ent.c, master_avail_listen()), only to a service that is not
        local-only and whose process limit is above 1 (not pickup's `1`)
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import pwd
import socket
import time
from dataclasses import dataclass, field

from ..lib import msg
from ..lib.queue import queue_root

# command column -> module implementing it
PROGRAMS = {
    "smtpd": "postfix_py.smtpd.service",
    "smtp": "postfix_py.smtp.service",
    "lmtp": "postfix_py.smtp.service",
    "qmgr": "postfix_py.qmgr.service",
    "tlsmgr": "postfix_py.tlsmgr.service",
    "anvil": "postfix_py.anvil.service",
    "local": "postfix_py.local.service",
    "virtual": "postfix_py.virtual.service",
    "discard": "postfix_py.local.discard",
    "spawn": "postfix_py.local.spawn",
    "error": "postfix_py.local.error",
    "pickup": "postfix_py.pickup.service",
    "showq": "postfix_py.showq.service",
    "metrics": "postfix_py.metrics.service",
    "postscreen": "postfix_py.postscreen.service",
    "verify": "postfix_py.verify.service",
}
EXTENSION_PREFIX = "python:"
RUNNABLE_TYPES = ("inet", "unix", "pass")


def runnable(services: list, warn) -> list:
    """The services the master can run; each other one is warned about and skipped."""
    kept = []
    for svc in services:
        if svc.type not in RUNNABLE_TYPES:
            why = f"transport type {svc.type} is not supported"
        elif not svc.command.startswith(EXTENSION_PREFIX) and svc.command not in PROGRAMS:
            why = f"unknown program: {svc.command}"
        else:
            kept.append(svc)
            continue
        warn(f"{svc.path}, line {svc.line}: service {svc.key}: {why}; service skipped")
    return kept


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
    rekey_timer: object = None      # the next session ticket key period (Master._arm_rekey)
    limit_warned: float = 0.0
    status_buf: bytes = b""

    @property
    def key(self) -> str:
        try:
            return self._key
        except AttributeError:      # once: the master asks on every worker status report
            self._key = self.svc.key
            return self._key

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
    return ("unix", unix_path(svc, cfg))     # unix and pass: a socket under private/


def unix_path(svc, cfg) -> str:
    """queue_directory/private/NAME or queue_directory/public/NAME."""
    sub = "private" if svc.private else "public"
    return os.path.join(queue_root(cfg), sub, svc.name)


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
        elif svc.type in ("unix", "pass"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            _bind_unix(sock, svc, cfg, run_as_root)
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


def _bind_unix(sock: socket.socket, svc, cfg, run_as_root: bool) -> None:
    """Replace the socket file of a unix service, as mail_owner, with its mode set at bind.

    private/ and public/ belong to mail_owner: a compromised mail_owner process could
    swap a symlink in at any moment, so nothing here runs as root on a path there (no
    chmod or chown that follows a link to /etc/shadow). As Postfix's master does, the
    unlink and bind run with mail_owner's effective uid and gid, which makes the socket
    mail_owner's; the umask gives it 0600 (private) or 0666 (public) as it is created.
    """
    path = unix_path(svc, cfg)
    pw = pwd.getpwnam(cfg.get("mail_owner")) if run_as_root else None
    old_mask = os.umask(0o177 if svc.private else 0o111)
    try:
        if pw is not None:
            os.setegid(pw.pw_gid)
            os.seteuid(pw.pw_uid)
        try:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            try:
                sock.bind(path)
            except OSError as exc:
                raise OSError(exc.errno, f"bind {path}: {exc.strerror}") from None
        finally:
            if pw is not None:
                os.seteuid(0)
                os.setegid(0)
    finally:
        os.umask(old_mask)


def local_only(svc, listeners) -> bool:
    """Whether only this host reaches the service: unix, or inet on loopback alone."""
    if svc.type != "inet":
        return True
    for sock in listeners:
        try:
            if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
                return False
        except (OSError, ValueError):
            return False
    return True


def stress_warned(state) -> bool:
    """Whether the process-limit warning applies: Postfix's rule in master_ent.c.

    Postfix gives a service the stress flag, and master_avail_listen() warns at its
    process limit, only when it is not local-only and its process limit is above 1.
    """
    return state.maxproc > 1 and not local_only(state.svc, state.listeners)


def describe(svc) -> str:
    """The service as Postfix's master names it in warnings: `"smtp" (127.0.0.1:25)`."""
    return f'"{svc.name}" ({svc.endpoint})' if hasattr(svc, "endpoint") else f'"{svc.name}"'


def log_exit(program: str, pid: int, status: int) -> bool:
    """Log an abnormal worker exit as Postfix does; True when the exit was abnormal."""
    if os.WIFSIGNALED(status):
        msg.warn(f"process {msg.name()}/{program} pid {pid} killed by signal "
                 f"{os.WTERMSIG(status)}")
        return True
    code = os.WEXITSTATUS(status)
    if code != 0:
        msg.warn(f"process {msg.name()}/{program} pid {pid} exit status {code}")
        return True
    return False
