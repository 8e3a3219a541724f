"""Sustained load: every mail system's whole pipeline, fixed time windows, no drain between them.

    .venv/bin/python bench/sustained.py                        # 4 modes x 1,8,32 clients, 3 runs
    .venv/bin/python bench/sustained.py --runs 3 --write BENCHMARKS.md   # ~25 min, 2 cores
    .venv/bin/python bench/sustained.py --duration 2 --runs 1 --clients 8 --modes plain
    .venv/bin/python bench/sustained.py --systems postfix-py,postfix --json
    .venv/bin/python bench/sustained.py --milter --modes plain --write BENCHMARKS.md
    .venv/bin/python bench/sustained.py --postscreen --modes plain,starttls   # postscreen row

bench/suite.py measures bursts of 300 messages and waits for both queues to drain before each
run, so a queue manager that falls behind does its work outside the timed window. Here every
run is a fixed window (--duration, 8 s) of one message per connection (5 KB; connect, EHLO,
[STARTTLS, EHLO], MAIL, RCPT, DATA, QUIT; bench/smtp_load.py's clients) at 1, 8 and 32
concurrent clients, in four modes: plain, STARTTLS with a full handshake, STARTTLS offering
the previous session, smtps offering it. Nothing waits for a queue: the systems alternate
window after window (the one that goes first rotates every run), each keeping whatever
backlog it built. Every system relays everything to a delivery agent that throws the mail
away, so smtpd -> queue -> queue manager -> delivery all work inside the window:

  postfix-py  bench/compare.py's instance: smtpd + smtps, qmgr, tlsmgr,
              `default_transport = discard`
  postfix     bench/compare.py's private Debian Postfix: Debian's master.cf plus an smtps
              service, `default_transport = discard` (the `discard:` transport)
  exim        Debian's exim4-daemon-light, a private daemon (`-bdf`): every address to a
              `:blackhole:` redirect router; smtps by tls_on_connect_ports
  chasquid    Debian's chasquid: a catch-all alias of the recipient's domain to the pipe
              `| /bin/cat` (chasquid's documented way to discard mail; its output is dropped)
  opensmtpd   Debian's OpenSMTPD: `action "drop" mda "cat >/dev/null"` for every recipient

The peers are not installed (they conflict with postfix as mail-transport-agent): their
.debs are fetched with `apt-get download` into --peers-cache (bench/.peers, gitignored) and
unpacked with `dpkg-deb -x`; a library missing on this machine (Exim's libidn12) is fetched
the same way. Exim and OpenSMTPD look up fixed users (Debian-exim, opensmtpd, opensmtpq) and
paths (/var/spool/smtpd, /var/lib/opensmtpd/empty, /run/smtpd.sock): each runs in a private
mount namespace (`unshare -m`) where a copy of /etc/passwd and /etc/group with those users
is bind-mounted, and overlays (their upper layers in the instance directory) provide the
library and the paths; nothing of the host is changed. Every system uses the same
self-signed ECDSA P-256 certificate. Where a peer cannot do a mode, the table says why.

Measured per system and window (medians over --runs):
  accepted/s    messages whose 250 came back inside the window, / window
  delivered/s   accepted minus the growth of the queue over the window, / window: what
                left the queue (queue files counted at the window's start and end: Postfix
                and postfix-py incoming+active+deferred+hold+maildrop, Exim's spool -H
                files, chasquid's queue items, OpenSMTPD's queue/ message directories)
  backlog       the growth of that queue over the window; a system that keeps up stays
                near 0, one that falls behind grows run after run
  CPU ms/msg    the busy time (user + system) of every process of the system during the
                window, / accepted messages, and the same / window as cores busy
  memory        sampled 40%, 60% and 80% into the window, the largest of the three: the
                USS (psutil) of the largest process serving an SMTP session (smtpd; Exim's
                receiving process; OpenSMTPD's "pony express"; chasquid is one process)
                and the summed USS of all processes of the system

How the CPU time of all processes is counted, also those that end inside the window: each
system is started under bench/subreaper.py, a child subreaper (prctl), so every process it
forks, including daemons that detach (`postfix start`) or double-fork (Exim's deliveries),
stays below that one pid and is waited for there. At the window's start and end the
benchmark reads, from /proc/PID/stat, the cumulative children times (cutime + cstime) of the
subreaper, which hold every descendant that has ended and been waited for, plus user +
system + cutime + cstime of every live descendant (a parent's cumulative times hold the
children it waited for); the reading is repeated when a process was waited for in the
middle of it. The difference is the system's CPU in the window, exact to the clock tick.
The CPU the other, idle systems used in the same window (a backlog still being delivered)
is recorded as spill-over.

--milter is the "one milter" setup: postfix-py and Postfix only, each with one private
Debian OpenDKIM daemon in signing mode as smtpd_milters (the same key, selector and
configuration; the benchmark's sender domain example.org is signed); OpenDKIM's own CPU is
not counted for either. Its report goes between `<!-- sustained-milter:begin/end -->`.
--postscreen puts postscreen in front of smtpd on both (section sustained-postscreen).
--metrics measures what counting costs: postfix-py without a metrics service (it then does
not count), postfix-py+metrics (a metrics service, scraped every 15 s) and Postfix, in the
same run (section sustained-metrics).

--write FILE puts the report between `<!-- sustained:begin -->` and `<!-- sustained:end -->`
(inserted before bench/suite.py's section when absent). Needs root and Debian's postfix
(exit code 2 otherwise); a peer that cannot be fetched or started is left out, with the
reason in the report. Every process started is ended by its pid, and every directory removed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import smtp_load  # noqa: E402
from peers import POSTFIX, MASTER_CF, free_port, make_cert  # noqa: E402
from report import (command_line, fmt, machine_description, md_table, median,  # noqa: E402
                    pct, ratio, write_section)

MODES = ("plain", "starttls", "starttls-resume", "smtps")
CLIENTS = (1, 8, 32)
SYSTEMS = ("postfix-py", "postfix", "exim", "chasquid", "opensmtpd")
SIZE = 5000
MIB = 1048576
SUBREAPER = HERE / "subreaper.py"
PEERS_CACHE = HERE / ".peers"
WARMUP = 40                   # untimed messages per system over plain SMTP and over TLS
MEM_AT = (0.4, 0.6, 0.8)      # the memory samples, as fractions of the window
WAIT_AFTER = 60.0             # seconds the clients may take to finish after the window

PEER_DEBS = {"exim": ["exim4-daemon-light", "exim4-base", "exim4-config"],
             "chasquid": ["chasquid"], "opensmtpd": ["opensmtpd"]}
PEER_BINARY = {"exim": "usr/sbin/exim4", "chasquid": "usr/bin/chasquid",
               "opensmtpd": "usr/sbin/smtpd"}
# A shared library a peer needs that Postfix's dependencies do not bring, and its package.
LIB_PACKAGES = {"libidn.so.12": "libidn12"}
LIBDIR = "usr/lib/x86_64-linux-gnu"


def log(msg) -> None:
    if not isinstance(msg, str):
        msg = json.dumps(msg, default=str)
    print(f"[sustained {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM arrived: unwind so that every finally block stops what it started."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"signal {signum}")


# --- the process tree of one system -----------------------------------------------------------

def _cum(t) -> float:
    return t.children_user + t.children_system


def tree_cpu(root: psutil.Process) -> float:
    """Seconds of CPU used so far by every process below root (see the module docstring):
    root's cumulative children times plus every live descendant's own and cumulative
    children times. When a cumulative time changed during the reading (a process was waited
    for in the middle of it, so it may be missing or counted twice), read again."""
    total = 0.0
    for _ in range(5):
        first = root.cpu_times()
        total = _cum(first)
        seen = []
        for p in root.children(recursive=True):
            try:
                t = p.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += t.user + t.system + _cum(t)
            seen.append((p, _cum(t)))
        stable = _cum(root.cpu_times()) == _cum(first)
        for p, cum in seen:
            if not stable:
                break
            try:
                stable = _cum(p.cpu_times()) == cum
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                stable = False
        if stable:
            break
    return total


def tree_memory(root: psutil.Process, is_session) -> dict:
    """USS of every process below root: the sum, the largest SMTP-session process, counts."""
    total = busy = 0
    procs = sessions = 0
    for p in root.children(recursive=True):
        try:
            cmd = p.cmdline()
            uss = p.memory_full_info().uss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        procs += 1
        total += uss
        if is_session(p, cmd):
            sessions += 1
            busy = max(busy, uss)
    return {"all_uss": total / MIB, "busy_uss": busy / MIB if sessions else None,
            "procs": procs, "sessions": sessions}


def count_files(top: Path, subdirs, pattern=None) -> int:
    n = 0
    for sub in subdirs:
        for _, _, files in os.walk(top / sub):
            n += len(files) if pattern is None else sum(1 for f in files if pattern(f))
    return n


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before port {port} "
                               "listened")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on port {port} after {timeout:g} s")


# --- the systems ------------------------------------------------------------------------------

class MailSystem:
    """One mail system, started under bench/subreaper.py and ended by pid."""

    name = "?"
    unsupported: dict[str, str] = {}     # mode -> why this system cannot be measured in it
    notes = ""                           # how it discards, for the report

    def __init__(self, top: Path, cert_dir: Path):
        self.dir = top / self.name
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.cert_dir = cert_dir
        self.port, self.smtps = compare.free_port(), compare.free_port()
        self.proc: subprocess.Popen | None = None
        self.root: psutil.Process | None = None
        self.version = ""

    # subclasses: command(), queue_count(), is_session(), stop_daemon()
    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.out = open(self.dir / "subreaper.out", "wb")
        self.proc = subprocess.Popen([sys.executable, str(SUBREAPER), *self.command()],
                                     stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.root = psutil.Process(self.proc.pid)
        try:
            wait_port(self.port, self.proc)
            if "smtps" not in self.unsupported:
                wait_port(self.smtps, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: {exc}: {self.output()[-1500:]}") from None
        time.sleep(0.5)      # the other daemons (queue manager, tlsmgr, ...) come up

    def output(self) -> str:
        try:
            return (self.dir / "subreaper.out").read_text(errors="replace")
        except OSError:
            return ""

    def stop_daemon(self) -> None:
        """Ask the system to stop (its own stop command, or SIGTERM to its daemon)."""
        for p in self.root.children():
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        """Stop the system, then end by pid every process still below the subreaper."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.stop_daemon()
        finally:
            try:
                procs = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                procs = []
            _, alive = psutil.wait_procs(procs, timeout=10)
            for p in alive:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=5)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()       # by pid; psutil checked nothing is left below it
                self.proc.wait(timeout=5)
            self.out.close()
            self.proc = None

    def is_session(self, proc: psutil.Process, cmd: list[str]) -> bool:
        raise NotImplementedError

    def queue_count(self) -> int:
        raise NotImplementedError

    def supports(self, mode: str) -> bool:
        return mode not in self.unsupported


POSTFIX_QUEUES = ("incoming", "active", "deferred", "hold", "maildrop")


def _prog(cmd: list[str]) -> str:
    first = next((a for a in cmd if a), "")
    return first.split()[0].rsplit("/", 1)[-1] if first.strip() else "?"


class PostfixPy(MailSystem):
    name = "postfix-py"
    notes = "`default_transport = discard`"

    def __init__(self, top, cert_dir):
        super().__init__(top, cert_dir)
        self.inst = compare.PyInstance(self.dir, cert_dir / "server.pem")
        self.port, self.smtps = self.inst.port, self.inst.smtps
        self.version = _py_version()

    def command(self):
        return [compare.POSTFIX_PY, "-c", str(self.dir), "start"]

    def stop_daemon(self):
        self.inst.stop()

    def is_session(self, proc, cmd):
        return _prog(cmd) == "smtpd"

    def queue_count(self):
        return count_files(self.dir / "queue", POSTFIX_QUEUES)


class PostfixPyMetrics(PostfixPy):
    """postfix-py with a metrics service in master.cf, so that every daemon counts (lib/
    metrics.py), scraped every 15 s as a common Prometheus set-up scrapes it: beside
    plain postfix-py (which then does not count at all) it shows what the counting costs."""
    name = "postfix-py+metrics"
    notes = "`default_transport = discard`; a `metrics` service, scraped every 15 s"

    def __init__(self, top, cert_dir):
        super().__init__(top, cert_dir)
        self.metrics_port = free_port()
        with open(self.dir / "master.cf", "a") as f:
            f.write(f"127.0.0.1:{self.metrics_port} inet n - n - 1 metrics\n")
        self._scraping = None

    def start(self):
        super().start()
        self._scraping = mp.Process(target=_scrape_forever, args=(self.metrics_port,),
                                    daemon=True)
        self._scraping.start()

    def stop_daemon(self):
        if self._scraping is not None:
            self._scraping.terminate()
            self._scraping.join(5)
        super().stop_daemon()


def _scrape_forever(port: int) -> None:
    import urllib.request
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the harness's handler: just end
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            pass
        time.sleep(15)           # a common Prometheus scrape_interval


class Postfix(MailSystem):
    name = "postfix"
    notes = "`default_transport = discard` (Postfix's `discard:` transport)"

    def __init__(self, top, cert_dir):
        super().__init__(top, cert_dir)
        self.inst = compare.PfInstance(self.dir, cert_dir / "server.pem")
        self.port, self.smtps = self.inst.port, self.inst.smtps
        from report import postfix_version
        self.version = postfix_version()

    def command(self):
        self.inst.peer.write()
        return [POSTFIX, "-c", str(self.dir), "start"]

    def stop_daemon(self):
        self.inst.stop()

    def is_session(self, proc, cmd):
        return _prog(cmd) == "smtpd"

    def queue_count(self):
        return count_files(self.dir / "queue", POSTFIX_QUEUES)


# --- the postscreen variant (--postscreen) ---------------------------------------------------
# postfix-py and Postfix alike: postscreen owns the SMTP port and hands clients to smtpd
# over the `smtpd pass` service; smtps stays with smtpd (postscreen does not do it). The
# access list is empty, so no client is allowlisted by address: the first connections
# wait postscreen_greet_wait (1s, in the warm-up), and every later one passes the cache.
POSTSCREEN_MAIN = {"postscreen_access_list": "", "postscreen_greet_wait": "1s"}
POSTSCREEN_NOTE = "postscreen in front of the SMTP port (cache hits), smtps direct"


def put_postscreen_in_front(system: MailSystem) -> None:
    """Configure postfix-py or Postfix with postscreen on system.port (before start)."""
    direct = f"127.0.0.1:{system.port} inet n - y - - smtpd"
    front = [f"127.0.0.1:{system.port} inet n - y - 1 postscreen",
             "smtpd pass - - y - - smtpd"]
    system.notes += f"; {POSTSCREEN_NOTE}"
    if isinstance(system, PostfixPy):
        cf = system.dir / "master.cf"
        lines = []
        for line in cf.read_text().splitlines():
            lines += front if line == direct else [line]
        cf.write_text("\n".join(lines) + "\n")
        with open(system.dir / "main.cf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in POSTSCREEN_MAIN.items()))
        return
    peer = system.inst.peer
    peer.main.update(POSTSCREEN_MAIN)
    write = peer.write

    def write_with_postscreen():
        write()
        cf = peer.dir / "master.cf"
        lines = []
        for line in cf.read_text().splitlines():
            if line.split() == direct.split():
                lines += front          # Debian's commented-out pass line stays as is
            else:
                lines.append(line)
        cf.write_text("\n".join(lines) + "\n")
    peer.write = write_with_postscreen


def _py_version() -> str:
    try:
        from importlib.metadata import version
        return version("postfix-py")
    except Exception:  # noqa: BLE001 - a detail of the report
        return ""


# --- the peers: fetched, unpacked, run privately ---------------------------------------------

def _deb_version(deb: Path) -> str:
    return deb.name.split("_")[1] if deb.name.count("_") >= 2 else deb.name


def _download(cache: Path, package: str) -> Path:
    debs = sorted(cache.glob(f"{package}_*.deb"))
    if not debs:
        out = subprocess.run(["apt-get", "download", package], cwd=cache, capture_output=True,
                             text=True, timeout=300)
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} failed: "
                               f"{(out.stderr or out.stdout).strip()[-300:]}")
    return debs[-1]


def _unpack(cache: Path, deb: Path) -> None:
    stamp = cache / "root" / f".unpacked-{deb.name}"
    if not stamp.exists():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "root")], check=True,
                       capture_output=True, timeout=300)
        stamp.touch()


def _missing_libs(cache: Path, binary: Path) -> list[str]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(cache / "root" / LIBDIR))
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env,
                         timeout=60)
    return re.findall(r"^\s*(\S+) => not found", out.stdout, re.M)


def provision(cache: Path, peer: str) -> tuple[Path, str]:
    """The peer's files unpacked under cache/root, fetched on first use: (root, version)."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "root").mkdir(exist_ok=True)
    version = ""
    for package in PEER_DEBS[peer]:
        deb = _download(cache, package)
        _unpack(cache, deb)
        version = version or _deb_version(deb)
    binary = cache / "root" / PEER_BINARY[peer]
    for lib in _missing_libs(cache, binary):
        if lib not in LIB_PACKAGES:
            raise RuntimeError(f"{binary.name} needs {lib}, which this machine lacks")
        _unpack(cache, _download(cache, LIB_PACKAGES[lib]))
    still = _missing_libs(cache, binary)
    if still:
        raise RuntimeError(f"{binary.name} still lacks {', '.join(still)}")
    return cache / "root", version


def _passwd_copies(directory: Path, users: list[str], groups: list[str]) -> tuple[Path, Path]:
    """Copies of /etc/passwd and /etc/group with the peer's fixed users added (uid and gid
    of nobody/nogroup), for bind-mounting in the peer's mount namespace."""
    passwd, group = directory / "passwd", directory / "group"
    pw = Path("/etc/passwd").read_text()
    gr = Path("/etc/group").read_text()
    for u in users:
        if not re.search(rf"^{re.escape(u)}:", pw, re.M):
            pw += f"{u}:x:65534:65534:{u} (benchmark):/:/bin/sh\n"
    for g in groups:
        if not re.search(rf"^{re.escape(g)}:", gr, re.M):
            gr += f"{g}:x:65534:\n"
    passwd.write_text(pw if pw.endswith("\n") else pw + "\n")
    group.write_text(gr)
    os.chmod(passwd, 0o644)
    os.chmod(group, 0o644)
    return passwd, group


class Peer(MailSystem):
    def __init__(self, top, cert_dir, cache: Path):
        super().__init__(top, cert_dir)
        self.peer_root, self.version = provision(cache, self.name)
        self.binary = self.peer_root / PEER_BINARY[self.name]

    def namespace_command(self, mounts: list[str], argv: list[str]) -> list[str]:
        """Run argv in a private mount namespace after the given mount commands, with a
        resolv.conf whose name server is 127.0.0.1, where nothing answers: a lookup fails
        at once instead of waiting on this machine's resolver (see RESOLV_NOTE)."""
        resolv = self.dir / "resolv.conf"
        # use-vc: over TCP, refused at once (a UDP query waits for its timeout whenever
        # the kernel rate-limits the ICMP port-unreachable); `lookup file bind` makes
        # OpenSMTPD's resolver read /etc/hosts first, as glibc does
        resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1 use-vc\n"
                          "lookup file bind\n")
        os.chmod(resolv, 0o644)
        mounts = [f"mount --bind {resolv} /etc/resolv.conf", *mounts]
        script = self.dir / "run.sh"
        script.write_text("set -e\n" + "\n".join(mounts) + "\nexec "
                          + " ".join(f"'{a}'" for a in argv) + "\n")
        return ["unshare", "-m", "--propagation", "private", "sh", str(script)]

    def overlay(self, target: str, lower: str | None = None) -> str:
        """A mount command: an overlay on target whose upper layer is in the instance."""
        tag = target.strip("/").replace("/", "-")
        up, work = self.dir / "overlay" / tag / "up", self.dir / "overlay" / tag / "work"
        up.mkdir(parents=True)
        work.mkdir(parents=True)
        lowers = f"{lower}:{target}" if lower else target
        return (f"mount -t overlay overlay -o lowerdir={lowers},upperdir={up},"
                f"workdir={work} {target}")


class Exim(Peer):
    name = "exim"
    notes = "every address to a `:blackhole:` redirect router"

    def command(self):
        spool, logs = self.dir / "spool", self.dir / "log"
        for d in (spool, logs):
            d.mkdir()
            os.chown(d, 65534, 65534)
        conf = self.dir / "exim.conf"
        conf.write_text(f"""\
keep_environment =
exim_path = {self.binary}
spool_directory = {spool}
log_file_path = {logs}/%slog
pid_file_path = {self.dir}/exim.pid
primary_hostname = exim.bench.test
local_interfaces = 127.0.0.1
daemon_smtp_ports = {self.port} : {self.smtps}
tls_on_connect_ports = {self.smtps}
tls_certificate = {self.cert_dir / 'cert.pem'}
tls_privatekey = {self.cert_dir / 'key.pem'}
tls_advertise_hosts = *
host_lookup =
rfc1413_hosts =
smtp_accept_max = 200
smtp_connect_backlog = 128
smtp_accept_queue_per_connection = 0
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept

begin routers
blackhole:
  driver = redirect
  data = :blackhole:
""")
        passwd, group = _passwd_copies(self.dir, ["Debian-exim"], ["Debian-exim"])
        mounts = [f"mount --bind {passwd} /etc/passwd", f"mount --bind {group} /etc/group",
                  self.overlay(f"/{LIBDIR}", str(self.peer_root / LIBDIR))]
        return self.namespace_command(mounts, [str(self.binary), "-C", str(conf), "-bdf"])

    def is_session(self, proc, cmd):
        # a receiving process: forked by the daemon, with the daemon's command line
        try:
            parent = proc.parent()
            return parent is not None and parent.ppid() == self.root.pid and \
                cmd == parent.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def queue_count(self):
        return count_files(self.dir / "spool", ["input"], lambda f: f.endswith("-H"))


class Chasquid(Peer):
    name = "chasquid"
    unsupported = {"smtps": "chasquid's only TLS-on-connect listener is "
                            "submission_over_tls, which requires AUTH (`550 5.7.9 Mail to "
                            "submission port must be authenticated`)"}
    notes = "a catch-all alias to the pipe `| /bin/cat` (one `cat` per message)"

    def __init__(self, top, cert_dir, cache):
        super().__init__(top, cert_dir, cache)
        self.smtps = None

    def command(self):
        conf, data = self.dir / "conf", self.dir / "data"
        certs = conf / "certs" / "localhost"
        certs.mkdir(parents=True)
        shutil.copy(self.cert_dir / "cert.pem", certs / "fullchain.pem")
        shutil.copy(self.cert_dir / "key.pem", certs / "privkey.pem")
        domain = conf / "domains" / "example.net"
        domain.mkdir(parents=True)
        (domain / "aliases").write_text("*: | /bin/cat\n")
        data.mkdir()
        (conf / "chasquid.conf").write_text(
            'hostname: "chasquid.bench.test"\n'
            f'smtp_address: "127.0.0.1:{self.port}"\n'
            f'submission_address: "127.0.0.1:{compare.free_port()}"\n'
            f'data_dir: "{data}"\n'
            f'mail_log_path: "{self.dir / "mail.log"}"\n')
        return self.namespace_command([], [str(self.binary), "-config_dir", str(conf),
                                           "-logfile", str(self.dir / "chasquid.log")])

    def is_session(self, proc, cmd):
        return _prog(cmd) == "chasquid"

    def queue_count(self):
        return count_files(self.dir / "data", ["queue"])


class OpenSMTPD(Peer):
    name = "opensmtpd"
    tls_broken = ("Debian 12's OpenSMTPD 6.8.0p2 fails every TLS handshake with OpenSSL 3 "
                  "(`SSL routines::EVP lib`; ECDSA and RSA keys alike; OpenSMTPD issues "
                  "#1171, #1239)")
    unsupported = {"starttls": tls_broken, "starttls-resume": tls_broken,
                   "smtps": tls_broken}
    notes = ("`action \"drop\" mda \"cat >/dev/null\"` for every recipient, run as the "
             "user `sink` (one shell + `cat` per message)")

    def __init__(self, top, cert_dir, cache):
        super().__init__(top, cert_dir, cache)
        self.smtps = None
        self.spool = self.dir / "overlay" / "var-spool" / "up" / "smtpd"

    def command(self):
        conf = self.dir / "smtpd.conf"
        conf.write_text(
            f'listen on 127.0.0.1 port {self.port} hostname opensmtpd.bench.test\n'
            'action "drop" mda "cat >/dev/null"\n'
            'match from any for any action "drop"\n')
        # the recipient's user part must be a user: "sink" in the namespace's passwd copy
        passwd, group = _passwd_copies(self.dir, ["opensmtpd", "opensmtpq", "sink"],
                                       ["opensmtpd", "opensmtpq"])
        mounts = [f"mount --bind {passwd} /etc/passwd", f"mount --bind {group} /etc/group",
                  self.overlay("/var/lib"), self.overlay("/var/spool"), self.overlay("/run"),
                  "mkdir -p /var/lib/opensmtpd/empty"]
        return self.namespace_command(mounts, [str(self.binary), "-d", "-f", str(conf)])

    def is_session(self, proc, cmd):
        return " ".join(cmd).startswith("smtpd: pony express")

    def queue_count(self):
        q = self.spool / "queue"
        try:
            return sum(len(os.listdir(q / b)) for b in os.listdir(q))
        except OSError:
            return 0


RESOLV_NOTE = (
    "The peers run with a resolv.conf naming 127.0.0.1, where no name server listens, so "
    "that a DNS lookup fails at once: this machine's resolver lets some queries time out "
    "after 5 s, and chasquid looks up the SPF record of every sender's domain (with the "
    "lookup failing, SPF gives `temperror` and chasquid accepts the mail), OpenSMTPD "
    "the client's names. Postfix and postfix-py keep the machine's resolver: they make no "
    "lookup here but the PTR of 127.0.0.1, which it answers at once.")

CLASSES = {"postfix-py": PostfixPy, "postfix-py+metrics": PostfixPyMetrics, "postfix": Postfix, "exim": Exim, "chasquid": Chasquid,
           "opensmtpd": OpenSMTPD}


# --- one window -------------------------------------------------------------------------------

def _timed_client(args, out) -> None:
    """A load client that starts at args.start_at (all clients of a window at once)."""
    delay = args.start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    smtp_load._client(args, 0, out)


def window(system: MailSystem, others: list[MailSystem], mode: str, clients: int,
           duration: float) -> dict:
    port = system.smtps if mode == "smtps" else system.port
    start_at = time.monotonic() + 0.3 + 0.01 * clients      # after every client has forked
    until = start_at + duration
    args = argparse.Namespace(host="127.0.0.1", port=port, mode=mode, clients=clients,
                              messages=0, size=SIZE, start_at=start_at, until=until,
                              skip_quit=True, timeout=max(10.0, duration))
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_timed_client, args=(args, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        time.sleep(max(0.0, start_at - 0.05 - time.monotonic()))
        cpu0 = tree_cpu(system.root)
        others0 = [tree_cpu(o.root) for o in others]
        q0 = system.queue_count()
        mems = []
        for at in MEM_AT:
            time.sleep(max(0.0, start_at + at * duration - time.monotonic()))
            mems.append(tree_memory(system.root, system.is_session))
        mem = {k: max((m[k] for m in mems if m[k] is not None), default=None)
               for k in mems[0]}
        time.sleep(max(0.0, until - time.monotonic()))
        q1 = system.queue_count()
        cpu1 = tree_cpu(system.root)
        others1 = [tree_cpu(o.root) for o in others]
        results = []
        for _ in procs:
            results.append(out.get(timeout=max(1.0, until + WAIT_AFTER - time.monotonic())))
    except queue_mod.Empty:
        raise RuntimeError(f"{system.name}: clients still busy {WAIT_AFTER:g} s after the "
                           "window") from None
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    lat = sorted(x for r in results for x in r[0])
    accepted = len(lat)
    handshakes = sum(r[3] for r in results)
    growth = q1 - q0
    cpu = cpu1 - cpu0
    return {
        "accepted": accepted,
        "accepted_rate": accepted / duration,
        "delivered_rate": max(0, accepted - growth) / duration,
        "queue_start": q0, "queue_end": q1, "growth": growth,
        "cpu_s": cpu,
        "cpu_ms_msg": cpu * 1000 / accepted if accepted else None,
        "cores": cpu / duration,
        "spill_cores": sum(b - a for a, b in zip(others0, others1)) / duration,
        "failures": sum(r[1] for r in results),
        "resumed": sum(r[2] for r in results) / handshakes if handshakes else None,
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
        **mem,
    }


def warm_up(system: MailSystem) -> None:
    """WARMUP untimed messages over plain SMTP and over TLS (workers forked, TLS state and
    tickets set up), as bench/compare.py does."""
    smtp_load.run(argparse.Namespace(host="127.0.0.1", port=system.port, mode="plain",
                                     clients=4, messages=WARMUP, size=SIZE, deadline=120))
    if system.supports("smtps"):
        smtp_load.run(argparse.Namespace(host="127.0.0.1", port=system.smtps, mode="smtps",
                                         clients=4, messages=WARMUP, size=SIZE, deadline=120))
    elif system.supports("starttls-resume"):
        smtp_load.run(argparse.Namespace(host="127.0.0.1", port=system.port,
                                         mode="starttls-resume", clients=4, messages=WARMUP,
                                         size=SIZE, deadline=120))


KEYS = ("accepted_rate", "delivered_rate", "growth", "queue_end", "cpu_ms_msg", "cores",
        "spill_cores", "busy_uss", "all_uss", "procs", "resumed", "p50_ms", "p99_ms")


def measure(args) -> dict:
    """Start the systems, run every mode x clients cell --runs times, stop them all."""
    top = Path(tempfile.mkdtemp(prefix="pfx-sustained-"))
    os.chmod(top, 0o755)     # the systems' unprivileged users must reach their files
    systems: list[MailSystem] = []
    skipped: dict[str, str] = {}
    cells = []
    signer = None
    try:
        if args.milter:
            signer = OpenDkimSigner(top)
        cert_dir = top / "cert"
        cert_dir.mkdir()
        make_cert(cert_dir)
        os.chmod(cert_dir / "key.pem", 0o644)   # Exim reads it as its own user
        for name in args.systems:
            s = None
            try:
                cls = CLASSES[name]
                s = cls(top, cert_dir, args.peers_cache) if issubclass(cls, Peer) else \
                    cls(top, cert_dir)
                if args.postscreen and name in ("postfix-py", "postfix"):
                    put_postscreen_in_front(s)
                systems.append(s)           # from here on, measure() stops it
                if signer is not None:
                    signer.configure(s)
                s.start()
                warm_up(s)
                log(f"{name} {s.version}: started, warmed up")
            except (KeyboardInterrupt, Terminated):
                raise
            except Exception as exc:  # noqa: BLE001 - leave the peer out, say why
                if name in ("postfix-py", "postfix"):
                    raise
                skipped[name] = f"{type(exc).__name__}: {exc}".strip()[:600]
                log(f"{name}: left out: {skipped[name]}")
                if s is not None:
                    systems.remove(s)
                    s.stop()
        for mode in args.modes:
            for clients in args.clients:
                runs = {s.name: [] for s in systems if s.supports(mode)}
                for run in range(args.runs):
                    order = [s for s in systems if s.supports(mode)]
                    k = run % len(order)
                    for s in order[k:] + order[:k]:
                        r = window(s, [o for o in systems if o is not s], mode, clients,
                                   args.duration)
                        runs[s.name].append(r)
                        log({"mode": mode, "clients": clients, "run": run + 1,
                             "system": s.name, **{k2: (round(v, 2) if isinstance(v, float)
                                                       else v) for k2, v in r.items()
                                                  if k2 in ("accepted_rate", "delivered_rate",
                                                            "growth", "queue_end",
                                                            "cpu_ms_msg", "cores",
                                                            "spill_cores", "busy_uss",
                                                            "all_uss", "failures",
                                                            "resumed")}})
                cells.append({"mode": mode, "clients": clients, "runs": runs,
                              "median": {n: {k: median(r[k] for r in rs) for k in KEYS}
                                         | {"failures": sum(r["failures"] for r in rs)}
                                         for n, rs in runs.items()}})
    finally:
        for s in systems:
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                log(f"stop {s.name}: {exc}")
        if signer is not None:
            signer.stop()
        shutil.rmtree(top, ignore_errors=True)
    return {"cells": cells, "skipped": skipped,
            "systems": {s.name: {"version": s.version, "notes": s.notes,
                                 "unsupported": s.unsupported} for s in systems}}


# --- the "one milter" setup (--milter) -----------------------------------------------------------

class OpenDkimSigner:
    """A private Debian OpenDKIM in signing mode for example.org on a loopback port."""

    def __init__(self, top: Path):
        self.dir = top / "opendkim"
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        self.port = compare.free_port()
        subprocess.run(["opendkim-genkey", "-b", "2048", "-d", "example.org", "-s", "bench",
                        "-D", str(self.dir)], check=True, capture_output=True, timeout=60)
        shutil.chown(self.dir / "bench.private", "nobody", "nogroup")
        conf = self.dir / "opendkim.conf"
        conf.write_text("Syslog no\nBackground no\nUserID nobody:nogroup\n"
                        "RequireSafeKeys no\nMode s\nDomain example.org\nSelector bench\n"
                        f"KeyFile {self.dir / 'bench.private'}\n"
                        "Canonicalization relaxed/relaxed\n"
                        f"Socket inet:{self.port}@127.0.0.1\n")
        self.out = open(self.dir / "opendkim.log", "wb")
        self.proc = subprocess.Popen(["opendkim", "-f", "-x", str(conf)],
                                     stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        self.name = f"inet:127.0.0.1:{self.port}"

    def configure(self, system: MailSystem) -> None:
        """The same smtpd_milters for postfix-py and Postfix."""
        if isinstance(system, PostfixPy):
            with open(system.dir / "main.cf", "a") as f:
                f.write(f"smtpd_milters = {self.name}\n")
        else:
            system.inst.peer.main["smtpd_milters"] = self.name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


# --- the report -------------------------------------------------------------------------------

def render(res: dict, args, elapsed: float) -> str:
    names = list(res["systems"])
    short = args.duration < 8 or args.runs < 3
    py_pf = [["mode", "clients", "accepted msg/s py / Pf", "ratio",
              "delivered msg/s py / Pf", "ratio", "backlog growth per run py / Pf",
              "CPU ms/msg py / Pf", "ratio", "busy smtpd USS MiB py / Pf",
              "all USS MiB py / Pf"]]
    rows = []
    for c in res["cells"]:
        a, b = c["median"].get("postfix-py"), c["median"].get("postfix")
        if not a or not b:
            continue
        rows.append([
            c["mode"], c["clients"],
            f"{fmt(a['accepted_rate'])} / {fmt(b['accepted_rate'])}",
            fmt(ratio(a["accepted_rate"], b["accepted_rate"]), ".2f"),
            f"{fmt(a['delivered_rate'])} / {fmt(b['delivered_rate'])}",
            fmt(ratio(a["delivered_rate"], b["delivered_rate"]), ".2f"),
            f"{fmt(a['growth'], '+.0f')} / {fmt(b['growth'], '+.0f')}",
            f"{fmt(a['cpu_ms_msg'], '.2f')} / {fmt(b['cpu_ms_msg'], '.2f')}",
            fmt(ratio(a["cpu_ms_msg"], b["cpu_ms_msg"]), ".2f"),
            f"{fmt(a['busy_uss'], '.1f')} / {fmt(b['busy_uss'], '.1f')}",
            f"{fmt(a['all_uss'], '.1f')} / {fmt(b['all_uss'], '.1f')}",
        ])
    every = []
    for c in res["cells"]:
        for n in names:
            m = c["median"].get(n)
            if m is None:
                why = res["systems"][n]["unsupported"].get(c["mode"], "")
                every.append([c["mode"], c["clients"], n, "n/a" + ("¹" if why else "")])
                continue
            every.append([
                c["mode"], c["clients"], n, fmt(m["accepted_rate"]), fmt(m["delivered_rate"]),
                fmt(m["growth"], "+.0f"), fmt(m["queue_end"]),
                fmt(m["cpu_ms_msg"], ".2f"), fmt(m["cores"], ".2f"),
                fmt(m["spill_cores"], ".2f"), fmt(m["busy_uss"], ".1f"),
                f"{fmt(m['all_uss'], '.1f')} ({fmt(m['procs'])})",
                pct(m["resumed"], "") if c["mode"] in ("starttls-resume", "smtps") else "",
                m["failures"] or "",
            ])
    spill = [r["spill_cores"] for c in res["cells"] for rs in c["runs"].values() for r in rs]
    versions = "; ".join(f"{n} {v['version']}".strip() + f" ({v['notes']})"
                         for n, v in res["systems"].items())
    text = [
        "## Sustained load: the whole pipeline, no drain between runs — "
        "`bench/sustained.py`" + (" — one milter (OpenDKIM signing as smtpd_milters)"
                                  if args.milter else ""),
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_description(),
        "",
        f"Took {elapsed / 60:.1f} min. Every run is a fixed window of {args.duration:g} s "
        f"of 5 KB messages, one per connection (connect, EHLO, [STARTTLS, EHLO], MAIL, RCPT, "
        f"DATA, QUIT; `bench/smtp_load.py`'s clients, stdlib ssl; MAIL/RCPT/DATA pipelined "
        f"where the server announces PIPELINING; QUIT sent without waiting for the 221, as "
        f"Postfix's smtp client does by default, since Exim holds its 221 up to 200 ms for "
        f"the client to close first); medians of {args.runs} "
        f"run{'s' if args.runs != 1 else ''} per system and cell. No queue is drained: the "
        "systems alternate window after window (the first one rotates each run) and each "
        "keeps the backlog it built, so the queue manager and the delivery agents work inside "
        "the window. Every system relays all mail to a delivery that discards it, and uses "
        "the same self-signed ECDSA P-256 certificate with TLS resumption as it comes by "
        f"default. Systems: {versions}. The peers are Debian's packages, unpacked (not "
        "installed) and run as private instances on loopback "
        "(see `bench/sustained.py`'s docstring). "
        + ("**A short development run (fewer than 3 runs or windows under 8 s): not for "
           "conclusions.** " if short else "")
        + "Other processes may share the machine; every system saw the same conditions.",
        "",
        "*accepted* counts messages whose 250 came back inside the window; *delivered* is "
        "accepted minus the growth of the system's queue over the window (queue files counted "
        "at the window's start and end), i.e. what left the queue; *backlog growth* is that "
        "growth, near 0 for a system that keeps up; *CPU ms/msg* is the busy time (user + "
        "system) of every process of the system in the window, ended processes included "
        "(each system runs under a child subreaper whose cumulative children times collect "
        "every process that ended; live ones are read from /proc), per accepted message; "
        "*cores* is that time per second of window (the machine has "
        f"{os.cpu_count()}); *spill-over* is the CPU the other, idle systems used meanwhile "
        "(their backlog); *busy smtpd USS* is the largest USS among the processes serving "
        "SMTP sessions (Exim: its receiving processes; OpenSMTPD: \"pony express\"; "
        "chasquid is one process), *all USS* the sum over all processes of the system "
        "(their count), idle workers left by earlier cells included; both the largest of "
        "three samples, 40%, 60% and 80% into the window. Postfix's smtpd hands the "
        "message to cleanup, which writes the queue file; postfix-py's smtpd writes it "
        "itself. " + RESOLV_NOTE,
        "",
        "### postfix-py / Postfix",
        "",
        md_table(py_pf[0], rows, align="lrrrrrrrrrr") if rows else
        "postfix-py or Postfix was not measured.",
        "",
        "### Every system",
        "",
        md_table(["mode", "clients", "system", "accepted msg/s", "delivered msg/s",
                  "backlog growth per run", "queue at end", "CPU ms/msg", "cores",
                  "spill-over cores", "busy smtpd USS MiB", "all USS MiB (procs)",
                  "resumed", "failed"], every, align="lrlrrrrrrrrrrr"),
    ]
    notes = []
    for n, v in res["systems"].items():
        reasons: dict[str, list[str]] = {}
        for mode, why in v["unsupported"].items():
            if mode in args.modes:
                reasons.setdefault(why, []).append(mode)
        for why, modes in reasons.items():
            notes.append(f"¹ {n}, {', '.join(modes)}: {why}.")
    if spill:
        notes.append(f"Spill-over: at most {max(spill):.2f} cores (median "
                     f"{median(spill):.2f}) of other systems' work ran during a window.")
    for n, why in res["skipped"].items():
        notes.append(f"{n} was left out: {why}")
    if notes:
        text += [""] + [" ".join(notes)]
    return "\n".join(text)


def ensure_markers(path: Path) -> None:
    """Put the sustained markers at the head of the figures, before the suite's section."""
    begin, end = "<!-- sustained:begin -->", "<!-- sustained:end -->"
    try:
        old = path.read_text()
    except FileNotFoundError:
        return
    if begin in old:
        return
    i = old.find("<!-- suite:begin -->")
    if i < 0:
        return      # write_section appends them at the end
    path.write_text(old[:i] + f"{begin}\n{end}\n\n" + old[i:])


# --- the command ------------------------------------------------------------------------------

def preflight() -> str | None:
    if os.geteuid() != 0:
        return "bench/sustained.py must run as root (the mail systems chroot and change users)"
    if not POSTFIX or not os.path.exists(MASTER_CF):
        return "Debian's postfix is not installed (apt-get install postfix)"
    if not os.access(compare.POSTFIX_PY, os.X_OK):
        return (f"postfix-py is not installed next to {sys.executable} "
                "(run it with the project's venv: .venv/bin/python bench/sustained.py)")
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per window (8)")
    p.add_argument("--runs", type=int, default=3, help="windows per system and cell (3)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="postfix-py and postfix always; peers: exim, chasquid, opensmtpd; "
                        "postfix-py+metrics: postfix-py counting for a metrics service")
    p.add_argument("--peers-cache", type=Path, default=PEERS_CACHE,
                   help="where the peers' .debs are fetched and unpacked (bench/.peers)")
    p.add_argument("--write", metavar="FILE",
                   help="put the report between <!-- sustained:begin/end --> in FILE "
                        "(a variant's: sustained-milter, -postscreen, -metrics)")
    p.add_argument("--json", action="store_true", help="dump the raw results to stdout")
    p.add_argument("--milter", action="store_true",
                   help="one milter: OpenDKIM signing on postfix-py and Postfix alike")
    p.add_argument("--postscreen", action="store_true",
                   help="postfix-py and Postfix with postscreen in front of smtpd")
    p.add_argument("--metrics", action="store_true",
                   help="what counting costs: postfix-py, postfix-py+metrics and Postfix")
    args = p.parse_args(argv)
    if args.milter or args.postscreen:
        args.systems = "postfix-py,postfix"
    if args.metrics:
        args.systems = "postfix-py,postfix-py+metrics,postfix"
    # a variant's report has its own section, beside the headline table
    args.section = ("sustained-milter" if args.milter else
                    "sustained-postscreen" if args.postscreen else
                    "sustained-metrics" if args.metrics else "sustained")
    args.modes = [m for m in args.modes.split(",") if m]
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.systems = [s for s in args.systems.split(",") if s]
    for s in ("postfix", "postfix-py"):
        if s not in args.systems:
            args.systems.insert(0, s)
    bad = [m for m in args.modes if m not in MODES] + \
          [s for s in args.systems if s not in CLASSES]
    if bad:
        p.error(f"unknown mode or system: {', '.join(bad)}")
    if args.runs < 1 or args.duration <= 0 or not args.clients or min(args.clients) < 1:
        p.error("--runs, --duration and --clients must be positive")
    args.peers_cache = args.peers_cache.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = preflight()
    if why:
        print(f"sustained: {why}", file=sys.stderr)
        return 2
    if args.write and not Path(args.write).parent.is_dir():
        print(f"sustained: cannot write {args.write}: no such directory", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    try:
        res = measure(args)
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"sustained: interrupted ({exc or 'Ctrl-C'}); every system was stopped",
              file=sys.stderr)
        return 130
    text = render(res, args, time.monotonic() - t0)
    if args.write:
        if args.section == "sustained":
            ensure_markers(Path(args.write))
        write_section(args.write, args.section, text)
        log(f"wrote the {args.section} section of {args.write}")
    if args.json:
        print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **res},
                         indent=2, default=str))
    elif not args.write:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
