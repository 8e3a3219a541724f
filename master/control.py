"""The life-cycle verbs of `postfix-py`: start, start-fg, stop, abort, reload, status, check.

    postfix-py [-c config_dir] [-v] start       check, daemonize, return 0 once every
                                                listener is bound (non-zero and the reason
                                                otherwise)
    postfix-py [-c config_dir] [-v] start-fg    the same in the foreground (systemd,
                                                containers); returns when the master exits
    postfix-py [-c config_dir] stop [-t secs]   as Postfix: workers end now, busy or not
                                                (nothing acknowledged is lost); with -t,
                                                clients get up to secs to finish first;
                                                exit 0 when every process of the
                                                instance has ended
    postfix-py [-c config_dir] abort            kill every process of the instance now
    postfix-py [-c config_dir] reload           re-read main.cf and master.cf; a
                                                configuration that does not parse is
                                                reported and the running one stays
    postfix-py [-c config_dir] status [--json]  running or not; each process's service,
                                                pid, state, uptime, clients, RSS/USS, CPU
    postfix-py [-c config_dir] check            configuration, directories, owners and
                                                modes, key files, the chroot jail

Exit status 0 on success, 1 on failure, with `postfix-py/postfix-script: fatal: ...` or a
warning on standard error, as Postfix's postfix command reports.
"""

from __future__ import annotations

import getopt
import json
import os
import pwd
import signal
import stat
import time

from ..lib import maincf, msg
from ..lib import tls as libtls
from ..lib.queue import queue_root
from . import master as M

TOOL = "postfix-py/postfix-script"


def _options(argv: list[str], spec: str = "c:v", long=()):
    try:
        opts, args = getopt.gnu_getopt(argv, spec, list(long))
    except getopt.GetoptError as exc:
        msg.fatal(f"{exc.msg}")
    config_dir = maincf.default_config_dir()
    verbose = 0
    rest = {}
    for opt, val in opts:
        if opt == "-c":
            config_dir = os.path.abspath(val)
        elif opt == "-v":
            verbose += 1
        else:
            rest[opt] = val
    return config_dir, verbose, rest, args


def _config(config_dir: str):
    try:
        return maincf.load(config_dir)
    except maincf.ConfigError as exc:
        msg.fatal(str(exc))


# --- start ---------------------------------------------------------------------------------
def start(argv: list[str], foreground: bool = False) -> int:
    """Start the mail system: in the background (start) or the foreground (start-fg)."""
    msg.init_cli(TOOL)
    config_dir, verbose, _, args = _options(argv)
    if args:
        msg.fatal(f"unexpected argument: {args[0]}")
    cfg = _config(config_dir)
    pid = M.read_pid(cfg)
    if pid:
        msg.fatal(f"the postfix-py mail system is already running (pid {pid})")
    # As `postfix start` runs `postfix check`: what the master would skip or refuse is
    # said here, on standard error (the master logs it again to the mail log).
    try:
        M.load_config(config_dir)
    except M.StartError as exc:
        msg.fatal(str(exc))
    if foreground:
        return _run_master(config_dir, verbose, ready_fd=None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        status = 1
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            status = _run_master(config_dir, verbose, ready_fd=w, daemon=True)
        finally:
            os._exit(status)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode("utf-8", "replace")
    if report.startswith("ok"):
        return 0
    msg.init_cli(TOOL)
    # `postfix-py/postfix-script: fatal: main.cf, line N: ...`, exit status 1
    msg.fatal(report.strip().removeprefix("fatal: ") or "the master exited before it was ready")


def _run_master(config_dir: str, verbose: int, ready_fd, daemon: bool = False) -> int:
    """Become the master: start (reporting on ready_fd), then serve until stopped."""
    import setproctitle
    setproctitle.setproctitle("postfix-py/master")
    master = M.Master(config_dir, verbose)
    try:
        master.start()
    except M.StartError as exc:
        if ready_fd is not None:
            os.write(ready_fd, f"fatal: {exc}".encode())
            os.close(ready_fd)
            return 1
        msg.init_cli(TOOL)
        msg.fatal(str(exc))
    if daemon:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if not (fd == 1 and master.cfg.get("maillog_file") == "/dev/stdout"):
                os.dup2(null, fd)
        os.close(null)
        os.chdir("/")
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    return master.run()


# --- stop, abort, reload -------------------------------------------------------------------
def _signal_master(argv: list[str], sig: int, verb: str, spec: str = "c:v"):
    msg.init_cli(TOOL)
    config_dir, verbose, opts, args = _options(argv, spec)
    cfg = _config(config_dir)
    pid = M.read_pid(cfg)
    if not pid:
        msg.fatal("the postfix-py mail system is not running")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        msg.fatal("the postfix-py mail system is not running")
    except PermissionError:
        msg.fatal(f"cannot signal the master (pid {pid}): permission denied")
    return cfg, pid, opts


def _wait_gone(cfg, pid: int, timeout: float) -> bool:
    import psutil
    deadline = time.monotonic() + timeout
    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return True
    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    while time.monotonic() < deadline:
        if not any(running(p) for p in [proc] + children):
            return True
        time.sleep(0.05)
    return False


def stop(argv: list[str]) -> int:
    """Stop and wait; exit 0 only when every process of the instance ended.

    Without -t, as Postfix's `postfix stop`: the master hands its workers SIGTERM, and
    clients in the middle of a session are cut off (nothing acknowledged is lost). With
    -t SECONDS, gracefully: no new client, and those connected get up to SECONDS to
    finish before the same prompt stop ends the rest.
    """
    msg.init_cli(TOOL)
    _, _, opts, _ = _options(argv, "c:vt:")
    grace = None
    if "-t" in opts:
        try:
            grace = float(opts["-t"])
        except ValueError:
            msg.fatal(f"bad -t value: {opts['-t']}")
        if grace < 0:
            msg.fatal(f"bad -t value: {opts['-t']}")
    if grace is not None:
        cfg, pid, _ = _signal_master(argv, signal.SIGUSR2, "stop", "c:vt:")
        msg.info(f"stopping the postfix-py mail system (up to {grace:g}s for clients)")
        if _wait_gone(cfg, pid, grace):
            return 0
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return 0
    else:
        cfg, pid, _ = _signal_master(argv, signal.SIGTERM, "stop", "c:vt:")
        msg.info("stopping the postfix-py mail system")
    # The master kills a worker that outlives SIGTERM by M.STOP_GRACE seconds.
    wait = M.STOP_GRACE + 10
    if _wait_gone(cfg, pid, wait):
        return 0
    msg.error(f"the mail system did not stop within {wait:g}s; "
              "'postfix-py abort' ends it at once")
    return 1


def abort(argv: list[str]) -> int:
    """Stop at once: the master kills every worker."""
    cfg, pid, _ = _signal_master(argv, signal.SIGINT, "abort")
    msg.info("aborting the postfix-py mail system")
    return 0 if _wait_gone(cfg, pid, 10) else 1


def reload(argv: list[str]) -> int:
    """Check the configuration, then have the master re-read it."""
    msg.init_cli(TOOL)
    config_dir, _, _, _ = _options(argv)
    try:
        # Validated here, before the signal: the exit status and standard error tell the
        # administrator, and the master (which checks again) keeps serving the old one.
        M.load_config(config_dir, warn=lambda text: None)
    except M.StartError as exc:
        for problem in exc.problems:
            msg.error(f"{problem}; the running configuration stays in effect")
        return 1
    _signal_master(argv, signal.SIGHUP, "reload")
    msg.info("refreshing the postfix-py mail system")
    return 0


# --- status --------------------------------------------------------------------------------
def _snapshot(cfg, pid: int, timeout: float = 3.0) -> dict | None:
    path = M.status_path(cfg)
    try:
        before = os.stat(path).st_mtime_ns
    except OSError:
        before = 0
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = os.stat(path)
            if st.st_mtime_ns != before:
                with open(path) as f:
                    return json.load(f)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return None


def status(argv: list[str]) -> int:
    """Say whether the mail system runs and, with psutil, what every process does."""
    msg.init_cli(TOOL)
    config_dir, _, opts, args = _options(argv, "c:v", ["json"])
    cfg = _config(config_dir)
    pid = M.read_pid(cfg)
    as_json = "--json" in opts
    if not pid:
        if as_json:
            print(json.dumps({"running": False}))
        else:
            print("postfix-py is not running")
        return 1
    snap = _snapshot(cfg, pid) or {"pid": pid, "services": []}
    now = time.time()
    rows = [_proc_row(pid, "master", "-", "running", snap.get("started", now), None, now)]
    for svc in snap["services"]:
        for p in svc["processes"]:
            rows.append(_proc_row(p["pid"], svc["program"], svc["service"], p["state"],
                                  p["started"], p["served"], now,
                                  generation=svc["generation"], current=svc["current"]))
    report = {"running": True, "pid": pid, "config_directory": snap.get("config_directory"),
              "uptime": round(now - snap.get("started", now), 1), "processes": rows,
              "services": [{k: s[k] for k in ("service", "type", "program", "maxproc",
                                              "throttled", "generation", "current")}
                           for s in snap["services"]]}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"postfix-py is running: master pid {pid}, up {_human(report['uptime'])}, "
          f"configuration {report['config_directory']}")
    throttled = [s["service"] for s in report["services"] if s["throttled"]]
    if throttled:
        print("throttled: " + ", ".join(throttled))
    sw = max(8, *(len(r["service"]) for r in rows)) + 2
    pw = max(8, *(len(r["program"]) for r in rows)) + 1
    print(f"{'SERVICE':<{sw}}{'PROGRAM':<{pw}}{'PID':>8}  {'STATE':<8}{'UPTIME':>8}"
          f"{'CLIENTS':>9}{'RSS':>9}{'USS':>9}{'CPU':>8}")
    for r in rows:
        clients = "-" if r["clients"] is None else str(r["clients"])
        print(f"{r['service']:<{sw}}{r['program']:<{pw}}{r['pid']:>8}  {r['state']:<8}"
              f"{_human(r['uptime']):>8}{clients:>9}{_mib(r['rss']):>9}{_mib(r['uss']):>9}"
              f"{r['cpu']:>7.2f}s")
    return 0


def _proc_row(pid, program, service, state, started, served, now, **extra) -> dict:
    import psutil
    row = {"service": service, "program": program, "pid": pid, "state": state,
           "uptime": round(now - started, 1), "clients": served, "rss": None, "uss": None,
           "cpu": 0.0, **extra}
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            mem = proc.memory_full_info()
            cpu = proc.cpu_times()
        row.update(rss=mem.rss, uss=mem.uss, cpu=round(cpu.user + cpu.system, 2))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return row


def _human(seconds: float) -> str:
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 1048576:.1f}M"


# --- check ---------------------------------------------------------------------------------
def check(argv: list[str]) -> int:
    """Look for problems as Postfix's `postfix check` does; exit 1 on an error."""
    msg.init_cli(TOOL)
    config_dir, _, _, _ = _options(argv)
    try:
        # Warns about the services it skips; certificates are checked below, so that
        # their problems are listed with everything else.
        cfg, svcs = M.load_config(config_dir, certificates=False)
    except M.StartError as exc:
        for problem in exc.problems:
            msg.error(problem)
        return 1
    errors = 0
    for problem in M.certificate_problems(cfg, svcs):
        msg.error(problem)
        errors += 1
    from . import services as S
    for svc in svcs:
        _, error = S.load_program(svc.command)
        if error:
            msg.warn(f"{svc.path}, line {svc.line}: service {svc.key}: {error}")
    root = os.geteuid() == 0
    owner = None
    try:
        owner = pwd.getpwnam(cfg.get("mail_owner"))
    except KeyError:
        msg.error(f"mail_owner: unknown user: {cfg.get('mail_owner')}")
        errors += 1
    queue = queue_root(cfg)
    expect = [(queue, 0, 0o022), (os.path.join(queue, "private"), "owner", 0o077),
              (os.path.join(queue, "public"), "owner", 0o022),
              (cfg.get("data_directory"), "owner", 0o077)]
    for path, who, forbidden in expect:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            msg.warn(f"{path}: does not exist; 'postfix-py start' creates it")
            continue
        want_uid = (owner.pw_uid if owner else None) if who == "owner" else 0
        if root and want_uid is not None and st.st_uid != want_uid:
            msg.warn(f"not owned by {'mail_owner' if who == 'owner' else 'root'}: {path}")
        if st.st_mode & forbidden:
            msg.warn(f"group or other writable: {path}" if forbidden == 0o022
                     else f"group or other accessible: {path}")
    for name in sorted(n for n in cfg.entries if n.endswith("key_file")):
        path = cfg.get(name)
        if not path:
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            msg.error(f"{name} = {path}: {exc.strerror}")
            errors += 1
            continue
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            msg.warn(f"{name} = {path}: private key is readable by others "
                     f"(mode {stat.S_IMODE(st.st_mode):04o})")
    for text in libtls.config_warnings(cfg):
        msg.warn(text)
    if root and any(s.chroot for s in svcs):
        for src in M.CHROOT_FILES:
            dst = os.path.join(queue, "etc", os.path.basename(src))
            if os.path.exists(src) and not _same_file(src, dst):
                msg.warn(f"{dst} and {src} differ")
    return 1 if errors else 0


def _same_file(a: str, b: str) -> bool:
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def start_fg(argv: list[str]) -> int:
    """Start the mail system in the foreground."""
    return start(argv, foreground=True)
