"""Real postfix-py instances for tests: a config dir, loopback ports, a running master.

`instance` makes an Instance in tmp_path; `start()` runs the real `postfix-py start`, and the
finalizer ends every process of the instance by pid (SIGINT to the master as `postfix-py
abort` sends, then SIGKILL what is left).
SmtpClient (tests/smtpclient.py) is the tests' one raw SMTP client; the far ends of
delivery (scripted servers and the counting sink) are in tests/sink.py.
"""

import contextlib
import fcntl
import glob
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
from helpers import POSTFIX_PY
from peers import free_port  # tests import it from here too
from smtpclient import SmtpClient  # noqa: F401  (the one raw SMTP client; tests import it here)

from postfix_py.lib import attr, deliver
from postfix_py.lib import queue as Q

PROGRAMS = str(Path(__file__).resolve().parents[1] / "programs")


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    """True once pid has exited (a zombie counts): race-free, unlike pid_exists then Process."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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

    @classmethod
    def make(cls, path: Path) -> "Instance":
        """An Instance in the new directory path, which mail_owner can reach (0755)."""
        path.mkdir()
        os.chmod(path, 0o755)
        return cls(path)

    @contextlib.contextmanager
    def running(self, service: str | None = None):
        """Start; wait for private/service when named; end every process on the way out
        (for module-scoped instances, which the instance fixture does not end)."""
        try:
            self.start()
            if service is not None:
                wait_for(lambda: (self.queue / "private" / service).exists(),
                         what=f"private/{service}")
            yield self
        finally:
            self.cleanup()

    def deliver(self, service: str, nexthop: str, flags=(), rcpt: str = "v@sink.test",
                content: bytes = b"Subject: direct\n\nhello\n",
                sender: str = "a@client.example", timeout: float = 30,
                keep: bool = False) -> deliver.DeliveryStatus:
        """qmgr's delivery request for a new queue file, sent to private/service as qmgr
        would send it (the queue file is owned by mail_owner, in active/, and removed
        after the reply unless keep); the reply."""
        w = Q.QueueWriter(str(self.queue))
        w.set_sender(sender)
        w.add_recipient(rcpt)
        w.write(content)
        qid = w.commit()
        path = self.queue / "active" / qid
        os.rename(self.queue / "incoming" / qid, path)
        owner = pwd.getpwnam(self.main["mail_owner"])
        os.chown(path, owner.pw_uid, owner.pw_gid)
        m = Q.read(str(path))
        req = deliver.Request(qid, f"active/{qid}", service, nexthop, m.sender, m.arrival,
                              [rcpt], [r.offset for r in m.recipients], list(flags))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.queue / "private" / service))
            s.sendall(deliver.encode_request(req))
            reply = deliver.decode_reply(attr.read_frame(s, timeout), 1)
        if not keep:
            os.unlink(path)
        return reply

    def add_smtpd(self, chroot: bool = True, **main) -> "Instance":
        """One smtpd (chrooted unless chroot is false) on a free 127.0.0.1 port
        (self.port), with main.cf as most smtpd tests want it (local mail for $myhostname
        and localhost, no error sleep), updated by main."""
        self.port = free_port()
        self.main.update({"mydestination": "$myhostname, localhost",
                          "smtpd_error_sleep_time": "0s", **main})
        self.master_lines.append(
            f"127.0.0.1:{self.port} inet n - {'y' if chroot else 'n'} - - smtpd")
        return self

    def add_mail_spool(self, maildir: bool = False) -> Path:
        """mail_spool_directory in the instance (mode 1777: local writes as each user),
        for mbox files, or maildirs with maildir."""
        spool = self.dir / "mail"
        os.mkdir(spool)
        os.chmod(spool, 0o1777)
        self.main["mail_spool_directory"] = str(spool) + ("/" if maildir else "")
        return spool

    def queued(self, sub: str = "incoming", text: bool = False) -> list:
        """The queue files in one queue subdirectory, by name: (Message, content) pairs,
        the content as bytes, or as str with text."""
        out = []
        for path in sorted(glob.glob(str(self.queue / sub / "*"))):
            m = Q.read(path)
            content = b"".join(m.content(path))
            out.append((m, content.decode() if text else content))
        return out

    def record_fake_agent(self) -> Path:
        """Have tests/programs/fake_agent.py record each request in self.record."""
        self.record = self.dir / "fake-agent.log"
        self.record.touch()
        os.chmod(self.record, 0o666)          # the fake agent runs as nobody
        self.env["FAKE_AGENT_LOG"] = str(self.record)
        return self.record

    def write(self):
        (self.dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self.main.items()))
        (self.dir / "master.cf").write_text("".join(l + "\n" for l in self.master_lines))

    def cmd(self, *args, timeout=60):
        return subprocess.run([POSTFIX_PY, "-c", str(self.dir), *map(str, args)],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def start(self):
        self.write()
        # Until `start` answers, a master may be on its way up (the answer timed out on a
        # loaded machine): cleanup then waits for its pid. Once it answered, the master it
        # started is in pids_seen (or it refused and there is none), so a test that stops
        # the instance itself costs cleanup no wait.
        self.start_tried = True
        out = self.cmd("start")
        self.start_tried = False
        assert out.returncode == 0, out.stderr
        if pid := self.master_pid():
            self.pids_seen.add(pid)
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
        return [p for p in kids if not gone(p.pid)]

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

    def running_master(self) -> int | None:
        """The master's pid while it runs (it holds the pid file's lock), else None: a
        master that was killed leaves its pid in the file, free for another process."""
        try:
            fd = os.open(self.queue / "pid" / "master.pid", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        finally:
            os.close(fd)
        return None

    def cleanup(self):
        """End every process of the instance: SIGINT to the master, as `postfix-py abort`
        sends (test_master.py tests the verb; a command here would cost each test the
        start-up of a Python program), then SIGKILL to whatever is left of those seen."""
        pid = self.running_master()
        deadline = time.monotonic() + 5
        while not pid and self.start_tried and time.monotonic() < deadline:
            # A start that failed its test (a timeout on a loaded machine) may still
            # bring a master up: wait for its pid rather than leave it running.
            time.sleep(0.1)
            pid = self.running_master()
        if pid:
            try:
                master = psutil.Process(pid)
                procs = [master, *master.children(recursive=True)]
                self.pids_seen.update(p.pid for p in procs)
                os.kill(pid, signal.SIGINT)
            except (psutil.NoSuchProcess, ProcessLookupError):
                procs = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(gone(p.pid) for p in procs):
                time.sleep(0.02)
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
