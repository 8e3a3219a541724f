"""Worker skeletons: what every forked service process does around its service function.

The master forks a worker and calls its program's main(ctx); main() is one call to a
skeleton here, which owns everything the service function must not care about, in
Postfix's order:

    set the process title  (postfix-py/smtpd -n smtp -t inet; syslog_name's first part)
    close what belongs to other services, reset signals, open the log
    pre_init()             as root: keys, certificates, tables, files outside the jail
    chroot                 into queue_directory when the service's chroot column is y
    drop privileges        supplementary groups, gid, uid of mail_owner; then verify that
                           root cannot be regained (not for services whose master.cf
                           unpriv column is n, such as local, which acts for each user)
    post_init()            inside the jail, unprivileged
    serve                  report idle/busy to the master over the status pipe; exit after
                           max_use clients, after max_idle seconds without one, when the
                           master goes away or retires this generation (EOF on the
                           liveness pipe), or after SIGTERM once the current client is done

SKELETONS
    single_server(ctx, service, **hooks): one client at a time: service(conn, ctx) per
        accepted connection (smtpd, smtp).
    multi_server(ctx, on_client, **hooks): one event loop (lib/events.py) serving many
        clients: on_client(conn, loop) per accepted connection; the service registers its
        own callbacks and timers (tlsmgr, qmgr).

    Hooks: pre_init(ctx), post_init(ctx) (multi_server: post_init(ctx, loop)),
    on_exit(ctx). ctx.stopping is true once the worker should finish its client and exit;
    a long session checks it between commands.

STOPPING
    Retirement (EOF on the liveness pipe: a reload, or `postfix-py stop -t`) is graceful:
    the worker finishes its client, then exits. SIGTERM (`postfix-py stop`) is not, as in
    Postfix, whose master hands its children SIGTERM: an idle worker exits at once, and a
    single_server worker busy with a client gets Terminated raised where it is (a read
    from a silent client included), the connection closes and the worker exits.
    That loses no mail: a message is acknowledged only after QueueWriter.commit() has
    written the end record, fsynced and renamed the file, and smtpd forgets the writer
    before it sends 250. Cut short before commit() returns, the session's clean-up
    (QueueWriter.abort) removes the file (cut just after the rename, it may leave it
    queued); either way the client got no 250 and sends again (at worst a duplicate,
    never a loss: RFC 1047). Cut after commit() but before the 250 went out,
    the same. Only the master's SIGKILL of a worker that outlives the grace period skips
    the clean-up: a partial file then lacks its end record and is never delivered, and a
    complete one left under its dot name is queued by recover_incoming() at the next
    start. A step that must not be cut in half (an mbox append) runs inside critical(),
    which holds SIGTERM back until it is done.
    multi_server workers (tlsmgr, qmgr) keep their state in memory: they end their event
    loop at SIGTERM.

STATUS PIPE
    A worker writes fixed 13-byte records (pid, generation, state, clients served;
    network order) to the master: state 1 available, 0 taken. Writes under PIPE_BUF are
    atomic, so records from many workers never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass, field

import setproctitle

from . import metrics, msg
from .events import EventLoop
from .queue import queue_root

class Terminated(BaseException):
    """SIGTERM arrived while a single_server worker served a client: end it now.

    A BaseException, so that a service's `except Exception` does not swallow it; its
    finally clauses run (they remove an unfinished queue file).
    """


@contextlib.contextmanager
def critical():
    """Hold SIGTERM back while a step that must not be cut in half runs."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


STATUS_FORMAT = "!IIBI"
STATUS_SIZE = struct.calcsize(STATUS_FORMAT)
_STATUS = struct.Struct(STATUS_FORMAT)
STATUS_AVAIL, STATUS_TAKEN = 1, 0


@dataclass
class WorkerContext:
    """Everything the master hands a worker it forks."""

    service: object                 # lib.mastercf.Service
    cfg: object                     # lib.maincf.Config with the service's -o overrides
    program: str                    # smtpd, tlsmgr, ...
    listeners: list                 # listening sockets of this service (shared)
    status_fd: int                  # write end of the service's status pipe
    live_fd: int                    # read end of the liveness pipe: EOF means "retire"
    generation: int
    prepared: object = None         # what the program's prepare() built in the master
    close_fds: list = field(default_factory=list)   # other services' descriptors
    verbose: int = 0
    stopping: bool = False
    busy: bool = False              # serving a client in single_server: SIGTERM cuts it short
    served: int = 0
    run_as_root: bool = False       # the master runs as root: chroot and drop apply
    signal_fd: int = -1             # read end of the signal wakeup pipe (set by _start)
    state: dict = field(default_factory=dict)   # what the program keeps between clients

    @property
    def queue_root(self) -> str:
        """Where the queue is seen from this worker: / inside the jail."""
        jailed = self.run_as_root and self.service.chroot
        return "/" if jailed else queue_root(self.cfg)

    def report(self, state: int) -> None:
        """Tell the master this worker is available or taken; the master may be gone."""
        try:
            os.write(self.status_fd, _STATUS.pack(msg.pid(), self.generation, state,
                                                  self.served))
        except OSError:
            self.stopping = True


def process_title(program: str, service, syslog_name: str = "postfix-py") -> str:
    """The title ps shows for a worker, as Postfix: `postfix-py/smtpd -n smtp -t inet`,
    its first part following syslog_name: `syslog_name = postfix` shows `postfix/smtpd ...`,
    and so does a service's own `-o syslog_name=postfix/submission`."""
    return f"{msg.base_name(syslog_name)}/{program} -n {service.name} -t {service.type}"


def _set_title(title: str) -> None:
    setproctitle.setproctitle(title)


def _start(ctx: WorkerContext) -> None:
    """The part before any hook: title, foreign descriptors, signals, log."""
    _set_title(process_title(ctx.program, ctx.service, ctx.cfg.get("syslog_name")))
    for fd in ctx.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    # SIGTERM must interrupt a wait for clients at once: wake select through a pipe.
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w)
    ctx.signal_fd = r
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def on_term(signum, frame):
        ctx.stopping = True     # no new client; an idle worker exits at once
        if ctx.busy:
            ctx.busy = False    # once: the service's clean-up is not cut short again
            raise Terminated
    signal.signal(signal.SIGTERM, on_term)
    cfg = ctx.cfg
    msg.init(ctx.program, syslog_name=cfg.get("syslog_name"),
             maillog_file=cfg.get("maillog_file"),
             syslog_facility=cfg.get("syslog_facility"), verbose=ctx.verbose)
    for sock in ctx.listeners:
        sock.setblocking(False)
    metrics.worker_start(ctx)
    if metrics.counting():
        with as_mail_owner(ctx.cfg):
            metrics.open_files(queue_root(ctx.cfg))     # the real path: before the chroot


@contextlib.contextmanager
def as_mail_owner(cfg):
    """mail_owner's effective uid and gid for the block, when the process is still root (a
    worker before drop_privileges; tlsmgr also when run standalone): a cache that holds
    what clients did (postscreen's, the verify cache, tlsmgr's) is created as mail_owner's
    file, never root's, as Postfix opens them. Not root: the block runs as it is."""
    if os.geteuid() != 0:       # a worker is root exactly when its master is (run_as_root)
        yield
        return
    try:
        pw = pwd.getpwnam(cfg.get("mail_owner"))
    except KeyError:
        msg.fatal(f"unknown mail_owner: {cfg.get('mail_owner')}")
    if pw.pw_uid == 0:
        yield
        return
    saved_gid = os.getegid()
    os.setegid(pw.pw_gid)
    os.seteuid(pw.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)


def drop_privileges(ctx: WorkerContext) -> None:
    """Chroot when the service says so, then become mail_owner for good."""
    queue = queue_root(ctx.cfg)
    if not ctx.run_as_root:
        _chdir(queue)
        return
    owner = ctx.cfg.get("mail_owner")
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        msg.fatal(f"unknown mail_owner: {owner}")
    if ctx.service.chroot:
        try:
            os.chroot(queue)
            os.chdir("/")
        except OSError as exc:
            msg.fatal(f"chroot({queue}): {exc.strerror}")
    else:
        _chdir(queue)   # as Postfix: every daemon works in queue_directory
    if not ctx.service.unpriv:
        return          # master.cf "unpriv n": this program keeps root (local, pipe)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    if pw.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            msg.panic(f"privilege drop to {owner} did not stick")


def _chdir(path: str) -> None:
    try:
        os.chdir(path)
    except OSError as exc:
        msg.fatal(f"chdir({path}): {exc.strerror}")


def _listening(ctx: WorkerContext, exclusive: bool = False) -> tuple[list, list, object]:
    """What a worker waits on, worked out once: its listeners do not change.

    (descriptors for select: listeners, liveness pipe, signal pipe; per listener
    (socket, descriptor, what accept() makes of it: family, type, proto), read here once
    because a socket's family and type properties convert to an enum at each reading;
    an epoll object or None). exclusive: wait in an epoll that has the listeners with
    EPOLLEXCLUSIVE, so that a new connection wakes one idle worker of the service, not
    all of them (each of which would find accept() empty but one: two system calls and
    a pass of this loop per idle sibling and connection). The pipes are not exclusive:
    every worker sees retirement and its own signals."""
    accepts = [(sock, sock.fileno(), sock.family, sock.type, sock.proto)
               for sock in ctx.listeners]
    fds = [a[1] for a in accepts] + [ctx.live_fd, ctx.signal_fd]
    poller = None
    if exclusive and hasattr(select, "EPOLLEXCLUSIVE"):
        poller = select.epoll()
        try:
            for a in accepts:
                poller.register(a[1], select.EPOLLIN | select.EPOLLEXCLUSIVE)
            poller.register(ctx.live_fd, select.EPOLLIN)
            poller.register(ctx.signal_fd, select.EPOLLIN)
        except OSError:         # a kernel before 4.5: every worker wakes, as with select
            poller.close()
            poller = None
    return fds, accepts, poller


def _wait_for_client(ctx: WorkerContext, timeout: float | None,
                     idle=None, listening=None) -> socket.socket | None:
    """Accept one connection; None on timeout, on retirement, or when stopping.

    idle (single_server's): idle.due() is the time until idle.expire() has work (None:
    none), run while waiting; a worker with idle.accept_delay() > 0 lets its siblings
    take a new client first (the smtp client's cached connections are in the worker
    that made them), so such a worker waits with select, which wakes them all.
    listening: _listening(ctx), when the caller keeps it.

    With an exclusive wait a woken worker takes the connection unless the master
    retired it or SIGTERM stops it in the same wake-up: then the next generation's
    worker, which the master starts for a waiting connection, or the next start,
    takes it; a level-triggered epoll reports a connection still waiting to the worker
    that comes back to it, and a new one to a worker that registers."""
    fds, accepts, poller = listening or _listening(ctx)
    live_fd, signal_fd = ctx.live_fd, ctx.signal_fd
    deadline = None if timeout is None else time.monotonic() + timeout
    while not ctx.stopping:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return None
        due = idle.due() if idle is not None else None
        if due is not None and (wait is None or due < wait):
            wait = max(0.0, due)
        # Counts of the last clients wait in this process until a flush, due a second
        # after the last one: a busy worker flushes here, an idle one wakes for it.
        flush = metrics.flush_due()
        if flush == 0:
            metrics.flush()
            flush = None
        if flush is not None and (wait is None or flush < wait):
            wait = flush
        try:
            if poller is not None:
                ready = [fd for fd, _ in poller.poll(-1 if wait is None else wait)]
            else:
                ready, _, _ = select.select(fds, [], [], wait)
        except InterruptedError:
            continue
        if not ready:
            if flush is not None:
                metrics.flush()
            if due is not None:
                idle.expire()
            continue
        if idle is not None and live_fd not in ready and signal_fd not in ready:
            delay = idle.accept_delay()
            if delay > 0:
                time.sleep(delay)
        if signal_fd in ready:
            _drain(signal_fd)
            continue              # the handler has set ctx.stopping if it was SIGTERM
        if live_fd in ready:
            ctx.stopping = True   # the master retired us or went away: take no new client
            return None
        for sock, fd, family, type_, proto in accepts:
            if fd in ready:
                try:
                    # socket.accept()'s work, without its two enum conversions
                    conn_fd, _ = sock._accept()
                except (BlockingIOError, InterruptedError):
                    continue      # another worker took it
                except OSError as exc:
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    raise
                # Blocking already: accept() on the non-blocking listener gives a blocking
                # socket (no default timeout is set), and no ioctl is spent saying so.
                return socket.socket(family, type_, proto, conn_fd)
    return None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def single_server(ctx: WorkerContext, service, pre_init=None, post_init=None,
                  on_exit=None, idle=None) -> int:
    """Serve one client at a time with service(conn, ctx); return the exit status.
    idle: work done while waiting for the next client (see _wait_for_client)."""
    _start(ctx)
    if pre_init:
        pre_init(ctx)
    drop_privileges(ctx)
    if post_init:
        post_init(ctx)
    max_use = ctx.cfg["max_use"]
    max_idle = ctx.cfg["max_idle"]
    watchdog = ctx.cfg["daemon_timeout"]
    listening = _listening(ctx, exclusive=idle is None)
    # Watchdog, as Postfix's: a worker stuck this long in one pass is killed (SIGALRM's
    # default action), and the master logs the signal. A busy worker starts a pass every
    # millisecond: the alarm is set again once the last setting is `slack` old (one
    # second, or 1% of a shorter daemon_timeout), not with a system call per pass, so
    # a pass stuck for between daemon_timeout - slack and daemon_timeout is killed.
    slack = min(1.0, watchdog / 100)
    armed = None
    try:
        while not ctx.stopping and ctx.served < max_use:
            now = time.monotonic()
            if armed is None or now - armed >= slack:
                signal.alarm(watchdog)
                armed = now
            conn = _wait_for_client(ctx, max_idle, idle, listening)
            if conn is None:
                break
            ctx.report(STATUS_TAKEN)
            try:
                ctx.busy = not ctx.stopping
                service(conn, ctx)
            except ConnectionError as exc:
                # The client went away mid-write: its loss, not a reason to die.
                msg.verbose(1, f"lost connection: {exc}")
            except Terminated:
                msg.verbose(1, "terminated by signal 15 while serving a client")
            finally:
                ctx.busy = False
                try:
                    conn.close()
                except OSError:
                    pass
            ctx.served += 1
            ctx.report(STATUS_AVAIL)
    except Terminated:
        pass        # SIGTERM between the service's end and the clean-up above
    finally:
        if listening[2] is not None:
            listening[2].close()
        if on_exit:
            on_exit(ctx)
        metrics.flush()
    return 0


def _watchdog_timeout(signum, frame) -> None:
    """Postfix's watchdog_event(): `fatal: watchdog timeout` and exit status 1, with
    killme_after(5) should the exit itself hang. A pass stuck in a system call (a table
    that does not answer) is interrupted by the signal and gets here."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(5)
    try:
        msg.fatal("watchdog timeout")
    finally:
        os._exit(1)


def multi_server(ctx: WorkerContext, on_client, pre_init=None, post_init=None,
                 on_exit=None, client_count=None, long_running: bool = False,
                 watchdog: int | None = None) -> int:
    """Serve many clients from one event loop; return the exit status.

    on_client(conn, loop) takes a non-blocking connection. client_count() says how many
    are still connected, so that max_idle counts only time without any. A long-running
    daemon (tlsmgr, qmgr) ignores max_idle and max_use: its state lives in memory.
    watchdog: seconds one pass of the loop may take before the process ends with Postfix's
    `fatal: watchdog timeout` (daemon_timeout unless given; postscreen's
    postscreen_watchdog_timeout).
    """
    _start(ctx)
    if pre_init:
        pre_init(ctx)
    drop_privileges(ctx)
    loop = EventLoop()
    if post_init:
        post_init(ctx, loop)
    max_use = ctx.cfg["max_use"]
    max_idle = ctx.cfg["max_idle"]
    last_activity = [time.monotonic()]

    def accept_ready(sock):
        def handler():
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors: stop accepting for a moment rather than spin or die.
                msg.warn(f"accept: {exc.strerror}; pausing for a second")
                loop.remove_reader(sock)
                loop.call_later(1.0, lambda: loop.add_reader(sock, handler))
                return
            conn.setblocking(False)
            ctx.served += 1
            if ctx.served == 1:
                # Once: the master learns that this process started well (Postfix's
                # event_server says TAKEN, then AVAIL, for each client), so that its
                # abnormal end later is not taken for a bad command startup.
                ctx.report(STATUS_TAKEN)
                ctx.report(STATUS_AVAIL)
            last_activity[0] = time.monotonic()
            on_client(conn, loop)
        return handler

    def retire():
        ctx.stopping = True
        loop.remove_reader(ctx.live_fd)     # EOF stays readable: once is enough

    def stop_accepting():
        # A worker that finishes its clients (retired, or SIGTERM) takes no new ones:
        # the next generation's worker, or the next start, serves them.
        for sock in ctx.listeners:
            loop.remove_reader(sock)

    for sock in ctx.listeners:
        loop.add_reader(sock, accept_ready(sock))
    loop.add_reader(ctx.live_fd, retire)
    loop.add_reader(ctx.signal_fd, lambda: _drain(ctx.signal_fd))
    ctx.report(STATUS_AVAIL)

    def done() -> bool:
        busy = client_count() if client_count else 0
        if busy:
            last_activity[0] = time.monotonic()
        if ctx.stopping:
            stop_accepting()
            return not busy or long_running
        if long_running:
            return False
        return ctx.served >= max_use and not busy or \
            time.monotonic() - last_activity[0] > max_idle

    if watchdog is None:
        watchdog = ctx.cfg["daemon_timeout"]

    def pet():
        signal.alarm(watchdog)
        # backstop for a pass stuck in C code, where no Python handler can run: the CPU
        # time it burns (SIGPROF's default action ends the process)
        signal.setitimer(signal.ITIMER_PROF, watchdog + 5)
        loop.call_later(min(60, watchdog / 2), pet)
    signal.signal(signal.SIGALRM, _watchdog_timeout)
    pet()
    try:
        loop.run(until=done)
    finally:
        if on_exit:
            on_exit(ctx)
        metrics.flush()
        loop.close()
    return 0
