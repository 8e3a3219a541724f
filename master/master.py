"""master: the resident supervisor of postfix-py, as Postfix's master(8).

The master reads main.cf and master.cf, opens every service's listening sockets, and forks
workers from its own already-imported image (no exec) that accept on those sockets. It
accepts no client itself: it watches a service's listeners only while none of its workers is
available, and then forks one more, up to the service's process limit. Workers report
available/taken over a status pipe; the master believes the kernel (waitpid) about deaths.

SIGNALS (handlers only record; the loop acts, in this order)
    SIGCHLD  reap every dead worker, log abnormal exits, throttle a service whose workers
             die before their first client (service_throttle_time).
    SIGHUP   reload: re-read both files; keep the listening sockets of services whose
             address is unchanged, open new ones, close removed ones; every worker of the
             old configuration finishes its client and exits. A configuration that does not
             parse, or names a certificate or key that does not load or does not match
             (load_config), is logged and the running one stays.
    SIGTERM  stop, as Postfix's `postfix stop`: close the listeners and hand every worker
             SIGTERM; idle workers exit, busy ones end their client at once (lib/server.py
             STOPPING: no acknowledged mail is lost). A worker still there after
             STOP_GRACE seconds is killed. Exit when none is left.
    SIGUSR2  drain (`postfix-py stop -t SECONDS`): close the listeners and retire every
             worker; each finishes its client, then exits; exit when none is left. A
             SIGTERM meanwhile ends the rest at once.
    SIGINT, SIGQUIT  abort: kill every worker at once, exit.
    SIGUSR1  write a status snapshot (queue_directory/pid/master.status, JSON) for
             `postfix-py status`.

SECURITY
    Runs as root, unchrooted; opens no LMDB environment and stays single-threaded, so that
    forking is safe. Workers chroot and drop privileges in lib/server.py.

FILES
    queue_directory/pid/master.pid   pid file, locked while the master runs
    queue_directory/private, public  unix service sockets
    queue_directory/etc              copies of system files chrooted workers need

CONFIGURATION PARAMETERS
    default_process_limit (100), service_throttle_time (60s), inet_interfaces (all),
    inet_protocols (all), queue_directory, mail_owner, and every service's master.cf columns.
    in_flow_delay (1s): with a qmgr service, the master opens the flow control pipe
    (lib/mail_flow.py) that every worker inherits.
    tls_certificate_reload_interval (0s, off; a postfix-py extension): every so often the
    master looks at the certificate and key files that main.cf and master.cf name (inode,
    size, modification time, through symlinks) and, when one changed, reloads itself the
    validated way of SIGHUP, so that a renewed certificate (ACME) needs no reload hook. A
    renewal that does not validate is logged and the running certificates stay, until the
    files change again.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import time
import traceback

import setproctitle

from ..lib import mail_flow, maincf, mastercf, metrics, msg, params, tls
from ..lib.events import EventLoop
from ..lib.queue import queue_root, recover_incoming
from ..lib.server import STATUS_FORMAT, STATUS_SIZE, STATUS_TAKEN, WorkerContext
from . import services as S

CHROOT_FILES = ("/etc/localtime", "/etc/hosts", "/etc/resolv.conf", "/etc/services",
                "/etc/nsswitch.conf", "/etc/host.conf")
LIMIT_WARN_INTERVAL = 1000      # seconds, as Postfix's master_avail_listen()
STOP_GRACE = 10                 # seconds a worker has to end after SIGTERM


class StartError(Exception):
    """The mail system cannot start as configured (the message says why).

    problems lists every reason found (the message is the first), for `postfix-py check`.
    """

    def __init__(self, text: str, problems: list[str] | None = None):
        super().__init__(text)
        self.problems = problems or [text]


# The parameters whose files check_certificates() reads, per side (lib/tls.py).
_CERT_PARAMS = ("tls_cert_file", "tls_key_file", "tls_dcert_file", "tls_dkey_file",
                "tls_eccert_file", "tls_eckey_file", "tls_chain_files")
_TLS_SIDES = ("smtpd", "smtp", "lmtp")


def load_config(config_dir: str, warn=msg.warn, certificates: bool = True):
    """main.cf and master.cf, checked: (Config, [Service]); StartError when unusable.

    The services that postfix-py cannot run are warned about and left out (services.py
    runnable()). Every certificate and key that main.cf or a service's -o overrides name
    is loaded and validated (certificate_problems()): start, reload and check refuse a
    key that does not match its certificate before any worker could serve without TLS.
    """
    try:
        cfg = maincf.load(config_dir)
        problems = maincf.check(cfg)
        if problems:
            raise StartError(problems[0])
        svcs = mastercf.load(os.path.join(cfg.config_dir, "master.cf"), warn=warn)
        for svc in svcs:
            problems = maincf.check(cfg.with_overrides(svc.overrides))
            if problems:
                raise StartError(f"service {svc.key}: {problems[0]}")
    except (maincf.ConfigError, mastercf.MasterCfError) as exc:
        raise StartError(str(exc)) from None
    if os.geteuid() == 0:
        # Checked here, not only at start: a reload must not hand workers a user that
        # does not exist (every one of them would die at the privilege drop).
        try:
            pwd.getpwnam(cfg.get("mail_owner"))
        except KeyError:
            raise StartError(f"mail_owner: unknown user: {cfg.get('mail_owner')}") from None
    svcs = S.runnable(svcs, warn)
    problems = certificate_problems(cfg, svcs, warn) if certificates else []
    if problems:
        raise StartError(problems[0], problems)
    return cfg, svcs


def certificate_problems(cfg, svcs, warn=msg.warn) -> list[str]:
    """Every certificate/key problem of main.cf and of each service's overrides.

    Each distinct set of certificate parameters is loaded once, for the server side
    (smtpd_*) and both client sides (smtp_*, lmtp_*); a problem of a service's own -o
    setting is prefixed with "service NAME/TYPE: ". Warnings (an expired certificate) are
    given once each.
    """
    said: set = set()

    def warn_once(text: str) -> None:
        if text not in said:
            said.add(text)
            warn(text)

    problems: list[str] = []
    seen: set = set()
    views = [("", cfg)] + [(f"service {svc.key}: ", cfg.with_overrides(svc.overrides))
                           for svc in svcs if svc.overrides]
    for where, view in views:
        for side in _TLS_SIDES:
            try:
                key = (side,) + tuple(view.get(f"{side}_{name}") for name in _CERT_PARAMS)
            except maincf.ConfigError as exc:
                problems.append(f"{where}{exc}")
                continue
            if key in seen:
                continue
            seen.add(key)
            try:
                tls.check_certificates(view, side, warn_once)
            except tls.TLSConfigError as exc:
                problems.append(f"{where}{exc}")
            except maincf.ConfigError as exc:
                problems.append(f"{where}{exc}")
    return problems


def pid_path(cfg) -> str:
    return os.path.join(queue_root(cfg), cfg.get("process_id_directory"),
                        "master.pid")


def status_path(cfg) -> str:
    return os.path.join(os.path.dirname(pid_path(cfg)), "master.status")


def read_pid(cfg) -> int | None:
    """The pid of a running master of this instance, or None (the lock tells, not the file)."""
    path = pid_path(cfg)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def prepare_directories(cfg, run_as_root: bool, chroot: bool) -> None:
    """Create the queue's directories with Postfix's owners and modes; copy chroot files."""
    queue = queue_root(cfg)
    owner = pwd.getpwnam(cfg.get("mail_owner")) if run_as_root else None
    os.makedirs(queue, mode=0o755, exist_ok=True)
    from ..lib.queue import SUBDIRS
    layout = [(cfg.get("process_id_directory"), 0o755, False), ("private", 0o700, True),
              ("public", 0o755, True)] + [(sub, 0o700, True) for sub in SUBDIRS]
    for sub, mode, owned in layout:
        path = os.path.join(queue, sub)
        os.makedirs(path, mode=mode, exist_ok=True)
        if run_as_root:
            os.chown(path, owner.pw_uid if owned else 0, owner.pw_gid if owned else 0)
        os.chmod(path, mode)
    metrics.remove_directory(queue)             # the counts of an earlier master
    data = cfg.get("data_directory")
    try:
        os.makedirs(data, mode=0o700, exist_ok=True)
        st = os.stat(data)
        if run_as_root and (st.st_uid, st.st_gid) != (owner.pw_uid, owner.pw_gid):
            os.chown(data, owner.pw_uid, owner.pw_gid)
    except OSError as exc:
        # Only tlsmgr's caches and exchange file live there: they warn and do without.
        msg.warn(f"data_directory {data}: {exc.strerror or exc}")
    if chroot and run_as_root:
        etc = os.path.join(queue, "etc")
        os.makedirs(etc, mode=0o755, exist_ok=True)
        for src in CHROOT_FILES:
            if os.path.exists(src):
                dst = os.path.join(etc, os.path.basename(src))
                tmp = dst + ".tmp"
                shutil.copyfile(src, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, dst)


def warm_up() -> None:
    """Load what workers would load lazily, before any of them enters a chroot jail."""
    import encodings.idna  # noqa: F401  (host names with non-ASCII labels)
    try:
        socket.getaddrinfo("localhost", 25, 0, socket.SOCK_STREAM)   # loads NSS modules
    except OSError:
        pass
    time.tzset()


class Master:
    """One running master: its services, workers, and event loop."""

    def __init__(self, config_dir: str, verbose: int = 0):
        self.config_dir = config_dir
        self.verbose = verbose
        self.run_as_root = os.geteuid() == 0
        self.loop = EventLoop()
        self.services: dict[str, S.ServiceState] = {}
        self.retired: list[S.ServiceState] = []
        self.procs: dict[int, S.Proc] = {}
        self.states_by_key_gen: dict[tuple, S.ServiceState] = {}
        self.generation = 0
        self.pending: set[int] = set()
        self.stopping = False       # draining or terminating: no new client, exit when empty
        self.terminating = False    # SIGTERM: workers were told to end now
        self.started = time.time()
        self.lock_fd = -1
        self.cfg = None
        self.cert_files: dict = {}      # path -> (inode, size, mtime) when last loaded
        self.cert_timer = None
        self._sig_r = self._sig_w = -1

    # --- start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the configuration, lock the pid file, open every listener; StartError if not."""
        warnings: list[str] = []
        cfg, svcs = load_config(self.config_dir, warn=warnings.append)
        self.cfg = cfg
        msg.init("master", syslog_name=cfg.get("syslog_name"),
                 maillog_file=cfg.get("maillog_file"),
                 syslog_facility=cfg.get("syslog_facility"), verbose=self.verbose)
        setproctitle.setproctitle(f"{msg.base_name(cfg.get('syslog_name'))}/master")
        for text in warnings:
            msg.warn(text)
        if self.run_as_root:
            try:
                pwd.getpwnam(cfg.get("mail_owner"))
            except KeyError:
                raise StartError(f"mail_owner: unknown user: {cfg.get('mail_owner')}") from None
        try:
            prepare_directories(cfg, self.run_as_root, any(s.chroot for s in svcs))
            self._collecting(cfg, svcs)
        except OSError as exc:
            raise StartError(f"{exc.filename or queue_root(cfg)}: "
                             f"{exc.strerror}") from None
        self._lock(cfg)
        for qid in recover_incoming(queue_root(cfg)):
            msg.warn(f"{qid}: complete queue file recovered in incoming/ after a crash")
        if not self.run_as_root:
            msg.warn("not running as root: workers run as this user, without chroot "
                     "and without privilege drop")
        warm_up()
        if not mail_flow.active() and any(svc.command == "qmgr" for svc in svcs):
            # Inherited by every worker: qmgr produces tokens, smtpd consumes them; the
            # first ones are here before qmgr runs. Without a qmgr there is nothing to
            # couple receiving to, and no flow control.
            mail_flow.init()
            mail_flow.put(cfg["default_process_limit"])
        self.generation += 1
        new = {}
        try:
            for svc in svcs:
                state = self._make_state(cfg, svc, {})
                if state:
                    new[svc.key] = state
        except OSError as exc:
            for state in new.values():
                state.close()
            raise StartError(str(exc.strerror or exc)) from None
        self.services = new
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r, self._sig_w = r, w
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                    signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.loop.add_reader(r, self._on_wakeup)
        for state in self.services.values():
            self._activate(state)
        self._watch_certificates()
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid():>10}\n".encode(), 0)
        msg.info(f"daemon started -- version {params.lookup('mail_version').default}, "
                 f"configuration {cfg.config_dir}")

    def _lock(self, cfg) -> None:
        path = pid_path(cfg)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise StartError(f"the postfix-py mail system is already running "
                             f"(pid {other or 'unknown'}, {path})") from None
        self.lock_fd = fd

    def _make_state(self, cfg, svc, reuse: dict) -> S.ServiceState | None:
        """A ServiceState for svc in the current generation, listeners opened or reused."""
        scfg = cfg.with_overrides(svc.overrides)
        scfg.warm()
        module, error = S.load_program(svc.command)
        state = S.ServiceState(svc=svc, cfg=scfg, generation=self.generation,
                               program=S.program_name(svc.command), module=module,
                               load_error=error)
        state.maxproc = svc.maxproc if svc.maxproc is not None else \
            cfg["default_process_limit"]
        key = S.endpoint_key(svc, scfg)
        state.listeners = reuse.pop(key, None) or S.open_listeners(svc, scfg, self.run_as_root)
        state.pipes()
        if module is not None and hasattr(module, "prepare"):
            try:
                state.prepared = module.prepare(scfg, svc)
            except Exception as exc:  # a program's setup trouble must not stop the others
                state.load_error = f"prepare failed: {exc}"
        if error:
            msg.warn(f"service {svc.key}: {error}")
        return state

    def _activate(self, state: S.ServiceState) -> None:
        """Arm a service: wakeup timer, and spawn-on-demand listening."""
        self.states_by_key_gen[(state.key, state.generation)] = state
        self.loop.add_reader(state.status_r, lambda: self._read_status(state))
        if state.svc.wakeup:
            self._arm_wakeup(state)
        self._arm_rekey(state)
        self._update_listen(state)

    # --- key periods ------------------------------------------------------------------------
    def _arm_rekey(self, state: S.ServiceState) -> None:
        """A program whose prepare() keys something on time (smtpd's session ticket keys:
        prepared.rekey_interval seconds) gets a new generation of that service each
        period: module.rekey() builds it before the fork, as prepare() did, and the old
        workers finish their client and exit, as after a reload (lib/tls.py SESSION
        TICKET KEYS)."""
        interval = getattr(state.prepared, "rekey_interval", 0) or 0
        if interval <= 0 or not hasattr(state.module, "rekey"):
            return

        def fire():
            state.rekey_timer = None
            if not self.stopping and self.services.get(state.key) is state:
                self._rekey(state)
        state.rekey_timer = self.loop.call_later(interval, fire)

    def _rekey(self, old: S.ServiceState) -> None:
        """The next key period of one service: a new generation on the same sockets."""
        try:
            prepared = old.module.rekey(old.cfg, old.prepared)
        except Exception as exc:  # keep the running keys: resumption, not mail, is at stake
            msg.warn(f"service {old.key}: new session ticket keys: {exc}")
            self._arm_rekey(old)
            return
        self.generation += 1
        new = S.ServiceState(svc=old.svc, cfg=old.cfg, generation=self.generation,
                             program=old.program, module=old.module,
                             load_error=old.load_error, prepared=prepared,
                             maxproc=old.maxproc)
        new.pipes()
        if old.listening:
            for sock in old.listeners:
                self.loop.remove_reader(sock)
            old.listening = False
        self.loop.cancel(old.wakeup_timer)
        new.listeners, old.listeners = old.listeners, []
        old.retire()
        self.retired.append(old)
        self.services[old.key] = new
        self._activate(new)
        self._collect_retired()

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        self.loop.run(until=lambda: self.stopping and not self.procs)
        self._finish()
        return 0

    def _on_signal(self, signum, frame) -> None:
        self.pending.add(signum)

    def _on_wakeup(self) -> None:
        try:
            while os.read(self._sig_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        pending, self.pending = self.pending, set()
        if signal.SIGCHLD in pending:
            self._reap()
        if signal.SIGHUP in pending and not self.stopping:
            self.reload()
        if signal.SIGINT in pending or signal.SIGQUIT in pending:
            self.abort()
        elif signal.SIGTERM in pending:
            self.stop()
        elif signal.SIGUSR2 in pending:
            self.drain()
        if signal.SIGUSR1 in pending:
            self.write_status()

    # --- workers ---------------------------------------------------------------------------
    def _all_fds(self) -> list[int]:
        fds = [self._sig_r, self._sig_w, self.lock_fd]
        for st in list(self.services.values()) + self.retired:
            fds += st.master_fds()
        return fds

    def _count(self, key: str) -> int:
        return sum(1 for p in self.procs.values() if p.key == key)

    def spawn(self, state: S.ServiceState) -> None:
        """Fork one worker of state's service."""
        keep = {state.status_w, state.live_r} | {s.fileno() for s in state.listeners}
        close = [fd for fd in self._all_fds() if fd not in keep]
        close.append(self.loop.fileno())
        gc.freeze()   # the child's writes then copy fewer of the master's pages
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = self._child(state, close)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                try:
                    msg.error(f"uncaught exception in {msg.name()}/{state.program}: "
                              f"{type(exc).__name__}: {exc}")
                    for line in traceback.format_exc().splitlines()[-12:]:
                        msg.error(line)
                except BaseException:
                    pass
            finally:
                os._exit(status if isinstance(status, int) else 1)
        self.procs[pid] = S.Proc(pid=pid, key=state.key, generation=state.generation)
        msg.verbose(1, f"spawn service {state.key} pid {pid}")

    def _child(self, state: S.ServiceState, close: list[int]) -> int:
        """The worker side of the fork: hand over to the program's main()."""
        ctx = WorkerContext(service=state.svc, cfg=state.cfg, program=state.program,
                            listeners=state.listeners, status_fd=state.status_w,
                            live_fd=state.live_r, generation=state.generation,
                            prepared=state.prepared, close_fds=close, verbose=self.verbose,
                            run_as_root=self.run_as_root)
        for fd in (state.status_w, state.live_r):
            os.set_inheritable(fd, False)
        if state.module is None or state.load_error:
            msg.init(state.program, syslog_name=state.cfg.get("syslog_name"),
                     maillog_file=state.cfg.get("maillog_file"),
                     syslog_facility=state.cfg.get("syslog_facility"))
            msg.fatal(f"service {state.key}: {state.load_error}")
        return int(state.module.main(ctx) or 0)

    def _read_status(self, state: S.ServiceState) -> None:
        try:
            data = os.read(state.status_r, STATUS_SIZE * 256)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.loop.remove_reader(state.status_r)
            return
        data = state.status_buf + data
        whole = len(data) - len(data) % STATUS_SIZE
        state.status_buf = data[whole:]
        for off in range(0, whole, STATUS_SIZE):
            pid, gen, avail, served = struct.unpack_from(STATUS_FORMAT, data, off)
            proc = self.procs.get(pid)
            if proc is None or proc.generation != gen or proc.key != state.key:
                continue   # a report from a process we already reaped, or of another life
            proc.avail = avail != STATUS_TAKEN
            proc.served = served
            if not proc.avail:
                proc.used = True
        self._update_listen(state)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            proc = self.procs.pop(pid, None)
            if proc is None:
                continue
            state = self.states_by_key_gen.get((proc.key, proc.generation))
            program = state.program if state else proc.key.split("/")[0]
            abnormal = S.log_exit(program, pid, status)
            current = self.services.get(proc.key)
            if abnormal and not proc.used and current is state and state is not None \
                    and not self.stopping:
                self._throttle(state)
            if current is not None:
                self._update_listen(current)
        self._collect_retired()

    def _throttle(self, state: S.ServiceState) -> None:
        if state.throttled_until:
            return
        delay = state.cfg["service_throttle_time"]
        msg.warn(f"{msg.name()}/{state.program}: bad command startup -- throttling")
        state.throttled_until = time.monotonic() + delay

        def unthrottle():
            state.throttled_until = 0.0
            self._update_listen(state)
        self.loop.call_later(delay, unthrottle)
        self._update_listen(state)

    def _update_listen(self, state: S.ServiceState) -> None:
        """Watch a service's listeners only while a client could wait for a new worker."""
        key = state.key
        if self.services.get(key) is not state:
            return
        # One pass over the processes (this runs on every worker status report): all of
        # the service's, this generation's own, and its own available ones.
        total = own = avail = 0
        for p in self.procs.values():
            if p.key == key:
                total += 1
                if p.generation == state.generation:
                    own += 1
                    avail += p.avail
        at_limit = state.maxproc and total >= state.maxproc
        want = (not self.stopping and not state.throttled_until
                and avail == 0 and not at_limit)
        # Warn only when this generation's own workers fill the limit: processes of an
        # older generation that are finishing after a reload are not a capacity problem.
        # As Postfix's master_avail_listen(), only a service that remote clients reach
        # and that runs more than one process is worth the warning: not a unix service
        # (pickup's wakeup connects while its one process works), nor a loopback one.
        if at_limit and not self.stopping and own >= state.maxproc and \
                avail == 0 and S.stress_warned(state) and \
                (not state.limit_warned or
                 time.monotonic() - state.limit_warned > LIMIT_WARN_INTERVAL):
            state.limit_warned = time.monotonic()
            msg.warn(f"service {S.describe(state.svc)} has reached its process limit "
                     f"\"{state.maxproc}\": new clients may experience noticeable delays")
            msg.warn("to avoid this condition, increase the process count in master.cf "
                     "or reduce the service time per client")
            msg.warn("see https://www.postfix.org/STRESS_README.html for examples of "
                     "stress-adapting configuration settings")
        if want and not state.listening:
            for sock in state.listeners:
                self.loop.add_reader(sock, lambda st=state: self._on_listener(st))
            state.listening = True
        elif not want and state.listening:
            for sock in state.listeners:
                self.loop.remove_reader(sock)
            state.listening = False

    def _on_listener(self, state: S.ServiceState) -> None:
        """A client waits and no worker is available: fork one."""
        self.spawn(state)
        self._update_listen(state)

    def _arm_wakeup(self, state: S.ServiceState) -> None:
        def fire():
            if self.services.get(state.key) is not state or self.stopping:
                return
            if not (state.svc.wakeup_conditional and self._count(state.key) == 0):
                self._trigger(state)
            state.wakeup_timer = self.loop.call_later(state.svc.wakeup, fire)
        # As Postfix's master: the first wakeup goes out at once, so that after a start or
        # reload qmgr looks at the queue without waiting a whole period.
        state.wakeup_timer = self.loop.call_later(0, fire)

    def _trigger(self, state: S.ServiceState) -> None:
        """Wake a unix service the way Postfix's master does: connect and send `W`."""
        if state.svc.type != "unix":
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(S.unix_path(state.svc, state.cfg))
            sock.send(b"W")
        except OSError as exc:
            msg.verbose(1, f"wakeup {state.key}: {exc}")
        finally:
            sock.close()

    # --- reload, stop, abort ---------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the configuration; on failure keep the running one and say so."""
        try:
            cfg, svcs = load_config(self.config_dir)
        except StartError as exc:
            for problem in exc.problems:
                msg.warn(f"reload: {problem}; keeping the running configuration")
            return
        self.generation += 1
        try:
            self._collecting(cfg, svcs)
        except (OSError, KeyError) as exc:    # KeyError: no such mail_owner
            msg.warn(f"reload: metrics directory: {exc}; no counters for the metrics service")
        reuse = {}
        for state in self.services.values():
            reuse[S.endpoint_key(state.svc, state.cfg)] = state.listeners
        new: dict[str, S.ServiceState] = {}
        for svc in svcs:
            try:
                new[svc.key] = self._make_state(cfg, svc, reuse)
            except OSError as exc:
                msg.warn(f"reload: service {svc.key}: {exc.strerror or exc}")
        # Old generations: their workers finish and exit. Sockets handed on stay open;
        # what is left in reuse belongs to services that moved or went away.
        for state in self.services.values():
            if state.listening:
                for sock in state.listeners:
                    self.loop.remove_reader(sock)
                state.listening = False
            self.loop.cancel(state.wakeup_timer)
            state.listeners = []
            state.retire()
            self.retired.append(state)
        for socks in reuse.values():
            for sock in socks:
                sock.close()
        self.cfg = cfg
        self.services = new
        msg.init("master", syslog_name=cfg.get("syslog_name"),
                 maillog_file=cfg.get("maillog_file"),
                 syslog_facility=cfg.get("syslog_facility"), verbose=self.verbose)
        for state in new.values():
            self._activate(state)
        self._collect_retired()
        self._watch_certificates()
        msg.info(f"reload -- version {params.lookup('mail_version').default}, "
                 f"configuration {cfg.config_dir}")

    # --- certificate files ------------------------------------------------------------------
    def _certificate_state(self) -> dict:
        """path -> (inode, size, mtime) of every certificate and key file now configured."""
        files: set = set()
        for view in [self.cfg] + [state.cfg for state in self.services.values()]:
            for side in _TLS_SIDES:
                try:
                    files.update(tls.certificate_files(view, side))
                except (maincf.ConfigError, ValueError):
                    pass        # load_config() has accepted it; nothing to watch then
        out = {}
        for path in sorted(files):
            try:
                st = os.stat(path)
                out[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                out[path] = None
        return out

    def _watch_certificates(self) -> None:
        """Record the certificate files just loaded; look again every interval."""
        self.loop.cancel(self.cert_timer)
        self.cert_timer = None
        interval = self.cfg["tls_certificate_reload_interval"]
        if not interval:
            return
        self.cert_files = self._certificate_state()

        def look():
            self.cert_timer = None
            if self.stopping:
                return
            now = self._certificate_state()
            changed = [path for path in now if now[path] != self.cert_files.get(path)]
            if not changed:
                self.cert_timer = self.loop.call_later(interval, look)
                return
            # Recorded now: a renewal that does not validate is reported once, not at
            # every look, and tried again when the files change again.
            self.cert_files = now
            msg.info(f"certificate file changed: {changed[0]}: reloading")
            self.reload()
            if self.cert_timer is None and self.cfg["tls_certificate_reload_interval"]:
                # The reload was refused: the running configuration keeps looking.
                self.cert_timer = self.loop.call_later(interval, look)
        self.cert_timer = self.loop.call_later(interval, look)

    def _collect_retired(self) -> None:
        """Release old generations once their last worker is gone."""
        keep = []
        for state in self.retired:
            if any(p.key == state.key and p.generation == state.generation
                   for p in self.procs.values()):
                keep.append(state)
                continue
            if state.status_r >= 0:
                self.loop.remove_reader(state.status_r)
            state.close()
            self.states_by_key_gen.pop((state.key, state.generation), None)
        self.retired = keep

    def _close_services(self) -> None:
        """No new client: close every listener, retire every generation's workers."""
        self.stopping = True
        for state in list(self.services.values()):
            if state.listening:
                for sock in state.listeners:
                    self.loop.remove_reader(sock)
                state.listening = False
            self.loop.cancel(state.wakeup_timer)
            for sock in state.listeners:
                sock.close()
            state.listeners = []
            state.retire()

    def drain(self) -> None:
        """Close the listeners; workers finish their client and exit; then so do we."""
        if self.stopping:
            return
        msg.info("stopping when every client is done")
        self._close_services()

    def stop(self) -> None:
        """Close the listeners and hand every worker SIGTERM; kill stragglers later."""
        if self.terminating:
            return
        msg.info("terminating on signal 15")
        self.terminating = True
        self._close_services()
        self._signal_workers(signal.SIGTERM)
        self.loop.call_later(STOP_GRACE, self._kill_stragglers)

    def _signal_workers(self, sig: int) -> None:
        for pid in list(self.procs):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _kill_stragglers(self) -> None:
        """A worker that did not end within STOP_GRACE seconds of SIGTERM is killed."""
        for pid, proc in list(self.procs.items()):
            state = self.states_by_key_gen.get((proc.key, proc.generation))
            program = state.program if state else proc.key.split("/")[0]
            msg.warn(f"process {msg.name()}/{program} pid {pid} did not stop "
                     f"within {STOP_GRACE}s: killing it")
        self._signal_workers(signal.SIGKILL)

    def abort(self) -> None:
        """Kill every worker now and exit."""
        msg.info("terminating immediately on abort")
        self.terminating = True
        self._close_services()
        self._signal_workers(signal.SIGKILL)

    def _collecting(self, cfg, svcs) -> None:
        """Whether this generation's workers count (lib/metrics.py): when master.cf has a
        metrics service."""
        owner = pwd.getpwnam(cfg.get("mail_owner")) if self.run_as_root else None
        metrics.collecting(any(s.command == "metrics" for s in svcs), queue_root(cfg), owner)

    def _finish(self) -> None:
        for state in list(self.services.values()) + self.retired:
            state.close()
        try:
            os.unlink(status_path(self.cfg))
        except OSError:
            pass
        try:
            os.unlink(pid_path(self.cfg))
        except OSError:
            pass
        metrics.remove_directory(queue_root(self.cfg))
        os.close(self.lock_fd)
        self.loop.close()

    # --- status ----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """What `postfix-py status` shows, as plain data."""
        services = []
        for state in list(self.services.values()) + self.retired:
            services.append({
                "service": state.svc.name, "type": state.svc.type, "key": state.key,
                "program": state.program, "generation": state.generation,
                "current": self.services.get(state.key) is state,
                "maxproc": state.maxproc,
                "throttled": bool(state.throttled_until),
                "processes": [
                    {"pid": p.pid, "state": "idle" if p.avail else "busy",
                     "started": p.started, "served": p.served}
                    for p in self.procs.values()
                    if p.key == state.key and p.generation == state.generation],
            })
        return {"pid": os.getpid(), "started": self.started,
                "config_directory": self.cfg.config_dir, "generation": self.generation,
                "stopping": self.stopping, "services": services}

    def write_status(self) -> None:
        """Write the snapshot atomically where `postfix-py status` reads it."""
        path = status_path(self.cfg)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.snapshot(), f)
            os.replace(tmp, path)
        except OSError as exc:
            msg.warn(f"write {path}: {exc.strerror}")
