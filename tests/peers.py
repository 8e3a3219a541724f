"""Real third-party peers for tests and benchmarks: a private Debian Postfix instance.

PostfixPeer(dir, port) writes a self-contained Postfix configuration under dir (its own
queue and data directories, loopback only, its log in dir/maillog) and runs it with
`postfix -c dir start`; stop() ends it. The system's own Postfix service is never touched.
Mail it accepts is discarded after queueing unless `deliver` says otherwise, so that it
measures and behaves like a receiving MX.

Dnsmasq(records, log_path, ...) is a private DNS server; scrape_metrics(port) reads a
Prometheus exporter's /metrics on 127.0.0.1 (prometheus-postfix-exporter, the metrics
service); stop_dovecot(proc) ends a Dovecot a test started.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
MASTER_CF = "/etc/postfix/master.cf"


def reap(pid: int | None, timeout: float = 10) -> None:
    """Wait for a process to end; SIGKILL it (by pid) when it has not within timeout."""
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def stop_dovecot(proc: subprocess.Popen, timeout: float = 10) -> None:
    """End a `dovecot -F` a test started (proc) and every process it had. On SIGTERM its
    master ends the services, then waits a fixed second for its log process (for late
    log lines, which a test has none of): once the services have ended, the master is
    killed; the log process ends as its pipes close. What is left a second later (auth,
    kept by connected clients) gets SIGKILL, by pid."""
    if proc.poll() is not None:
        return

    def name(p: psutil.Process) -> str | None:
        try:
            return p.name()
        except psutil.NoSuchProcess:
            return None

    def ended(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        children = []
    services = [p for p in children if name(p) != "log"]
    proc.terminate()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and \
            not all(ended(p) for p in services):
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout)
    grace = time.monotonic() + 1
    for p in children:
        while not ended(p) and time.monotonic() < grace:
            time.sleep(0.02)
        if not ended(p):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory: Path) -> Path:
    """A self-signed ECDSA key and certificate for localhost, in one file readable by all."""
    from postfix_py.lib import tlsgen
    key, cert = directory / "key.pem", directory / "cert.pem"
    tlsgen.write_server_cert(str(key), str(cert), "ecdsa", dns_names=("localhost",))
    both = directory / "server.pem"
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    os.chmod(both, 0o644)
    return both


def available() -> bool:
    """Whether Debian's Postfix is installed here."""
    return bool(POSTFIX) and os.path.exists(MASTER_CF) and os.geteuid() == 0


class PostfixPeer:
    """A private Postfix instance on 127.0.0.1:port."""

    def __init__(self, port: int, main: dict | None = None,
                 services: list[str] | None = None, smtpd_args: str = "", directory=None):
        # Postfix's unprivileged daemons must reach their files: pytest's tmp dirs are
        # 0700, so by default the instance lives in a directory of its own under /tmp.
        self.own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="pfx-postfix-peer-"))
        self.port = port
        self.main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.dir / "queue"),
            "data_directory": str(self.dir / "data"),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.peer.test",
            "mydestination": "$myhostname, localhost",
            "maillog_file": str(self.dir / "maillog"),
            "maillog_file_prefixes": str(self.dir),
            "default_transport": "discard",
            "local_transport": "discard",
            "relay_transport": "discard",
            "smtpd_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
        }
        self.main.update(main or {})
        self.services = services or []
        self.smtpd_args = smtpd_args

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        (self.dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main.items()))
        lines = []
        for line in Path(MASTER_CF).read_text().splitlines():
            if line.startswith("smtp      inet"):
                line = f"127.0.0.1:{self.port} inet n - y - - smtpd {self.smtpd_args}".rstrip()
            elif line.startswith("#postlog"):
                line = line[1:]
            lines.append(line)
        lines += self.services
        (self.dir / "master.cf").write_text("\n".join(lines) + "\n")
        for sub in ("queue", "data"):
            (self.dir / sub).mkdir(exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(self.dir / "data", pw.pw_uid, pw.pw_gid)

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until its SMTP port accepts."""
        self.write()
        out = subprocess.run([POSTFIX, "-c", str(self.dir), "start"], capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"postfix start: {out.stderr or self.log()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"postfix did not listen on {self.port}: {self.log()[-2000:]}")

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop it (postfix stop, then SIGKILL by pid if it lingers)."""
        pid = self.master_pid()
        subprocess.run([POSTFIX, "-c", str(self.dir), "stop"], capture_output=True,
                       timeout=60)
        reap(pid)

    def cleanup(self) -> None:
        """Stop it and remove its directory when the peer made it."""
        self.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "maillog").read_text()
        except OSError:
            return ""


DNSMASQ = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin")


def loopback_resolver(port: int, timeout: float = 1.0):
    """A dnspython resolver that asks only 127.0.0.1:port, giving up after timeout s."""
    import dns.resolver
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.timeout = r.lifetime = timeout
    return r


class Dnsmasq:
    """A private dnsmasq on 127.0.0.1:port serving `records` (dnsmasq options such as
    --mx-host=..., --txt-record=...) for the --local domains, logging to log_path.
    ready(resolver) -> truthy when it answers as wanted; restart(records) serves other
    records on the same port (dnsmasq does not reload --txt-record); stop() ends it by pid.
    port: a free one unless given; prefix: words run before dnsmasq (`ip netns exec NAME`,
    where ready, which asks from this namespace, cannot serve)."""

    def __init__(self, records, log_path, local=("test",), ready=None, port=None,
                 prefix=()):
        self.port = port or free_port()
        self.local = local
        self.prefix = list(prefix)
        self.log = open(log_path, "a")
        self.proc = None
        self.start(records, ready)

    def resolver(self):
        return loopback_resolver(self.port, 0.5)

    def start(self, records, ready=None) -> None:
        self.records = list(records)
        self.proc = subprocess.Popen(
            [*self.prefix, DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
             "--pid-file=", "--user=nobody", "--group=nogroup", "--no-negcache",
             *(f"--local=/{d}/" for d in self.local), *self.records],
            stdout=self.log, stderr=subprocess.STDOUT)
        if ready is not None:
            r = self.resolver()
            deadline = time.monotonic() + 10
            while True:
                try:
                    if ready(r):
                        return
                except Exception:       # noqa: BLE001 - not up yet
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("dnsmasq did not answer")
                time.sleep(0.05)

    def restart(self, records, ready=None) -> None:
        self.stop()
        self.start(records, ready)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self.log.close()

    def __enter__(self) -> "Dnsmasq":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scrape_metrics(port: int) -> dict[str, float]:
    """The samples of a Prometheus text exposition on 127.0.0.1:port/metrics, by their
    name with labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values
