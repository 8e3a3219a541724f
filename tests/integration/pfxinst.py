"""Real postfix-py instances for tests: a config dir, loopback ports, a running master.

`instance` makes an Instance in tmp_path; `start()` runs the real `postfix-py start`, and the
finalizer ends every process of the instance by pid (abort, then SIGKILL what is left).
SmtpClient (tests/smtpclient.py) is the tests' one raw SMTP client; the far ends of
delivery (scripted servers and the counting sink) are in tests/sink.py.
"""

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
from helpers import POSTFIX_PY
from peers import free_port  # noqa: F401  (tests import it from here)
from smtpclient import SmtpClient  # noqa: F401  (the one raw SMTP client; tests import it here)

PROGRAMS = str(Path(__file__).resolve().parents[1] / "programs")


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Instance:
    def __init__(self, root: Path):
        self.dir = root
        self.queue = root / "queue"
        self.maillog = root / "maillog"
        self.env = dict(os.environ, PYTHONPATH=PROGRAMS)
        self.main = {
            "queue_directory": str(self.queue),
            "data_directory": str(root / "data"),
            "mail_owner": "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name,
            "maillog_file": str(self.maillog),
            "inet_interfaces": "127.0.0.1",
            "myhostname": "mail.test.example",
            "service_throttle_time": "2s",
            "alias_maps": "",           # not the host's /etc/aliases; tests set their own
            # the tests' local recipients are not system accounts (unix:passwd.byname)
            "local_recipient_maps": "",
        }
        self.master_lines: list[str] = []
        self.pids_seen: set[int] = set()
        self.start_tried = False

    def write(self):
        (self.dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (self.dir / "master.cf").write_text("".join(l + "\n" for l in self.master_lines))

    def cmd(self, *args, timeout=60):
        return subprocess.run([POSTFIX_PY, "-c", str(self.dir), *map(str, args)],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self):
        self.write()
        self.start_tried = True
        out = self.cmd("start")
        self.start_tried = out.returncode == 0     # a refused start leaves no master
        assert out.returncode == 0, out.stderr
        self.pids_seen.add(self.master_pid())
        return out

    def master_pid(self) -> int | None:
        try:
            text = (self.queue / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def workers(self) -> list[psutil.Process]:
        pid = self.master_pid()
        if not pid:
            return []
        try:
            kids = psutil.Process(pid).children()
        except psutil.NoSuchProcess:
            return []
        self.pids_seen.update(p.pid for p in kids)
        return [p for p in kids if p.status() != psutil.STATUS_ZOMBIE]

    def log(self) -> str:
        try:
            return self.maillog.read_text()
        except FileNotFoundError:
            return ""

    def reload(self):
        self.write()
        out = self.cmd("reload")
        assert out.returncode == 0, out.stderr
        return out

    def cleanup(self):
        pid = self.master_pid()
        deadline = time.monotonic() + 5
        while not pid and self.start_tried and time.monotonic() < deadline:
            # A start that failed its test (a timeout on a loaded machine) may still
            # bring a master up: wait for its pid rather than leave it running.
            time.sleep(0.1)
            pid = self.master_pid()
        if pid:
            self.workers()
            self.cmd("abort", timeout=30)
        for p in list(self.pids_seen):
            try:
                proc = psutil.Process(p)
                if proc.status() != psutil.STATUS_ZOMBIE and "postfix-py" in " ".join(
                        proc.cmdline() or [proc.name()]):
                    os.kill(p, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def greet(port: int, timeout: float = 10.0):
    """Connect to an echo service; returns (socket file, greeting fields)."""
    sock = connect(port, timeout)
    f = sock.makefile("rwb", buffering=0)
    sock.close()   # the file object keeps the connection
    line = f.readline().decode()
    assert line.startswith("hello "), line
    return f, dict(kv.split("=", 1) for kv in line.split()[1:])
