"""lib/tlsmgr_client: values, never exceptions; one warning per outage; back-off; reconnect."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postfix_py.lib import msg, tlsmgr_client
from postfix_py.lib.tlsmgr_client import TlsmgrClient


class Daemon:
    """tlsmgr on a private socket (`python -m postfix_py.tlsmgr.service`), stopped by pid."""

    def __init__(self, base: Path):
        (base / "q").mkdir(parents=True, exist_ok=True)
        (base / "data").mkdir(exist_ok=True)
        (base / "main.cf").write_text(
            f"queue_directory = {base}/q\ndata_directory = {base}/data\nmail_owner = root\n"
            f"maillog_file = {base}/maillog\n"
            "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n")
        self.base = base
        self.socket = str(base / "q" / "tlsmgr")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "postfix_py.tlsmgr.service",
                                      "-c", str(self.base), "--socket", self.socket],
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None and time.monotonic() < deadline, "tlsmgr did not start"
            time.sleep(0.02)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d.start()
    d.stop()


@pytest.fixture
def log(capsys):
    """Log lines written so far (msg goes to standard error here)."""
    msg.init_cli("smtp")
    yield lambda: capsys.readouterr().err.splitlines()
    msg.init_cli("postfix-py")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_requests_against_a_live_daemon(daemon, log):
    client = TlsmgrClient(daemon.socket)
    try:
        assert len(client.seed()) == 32 and len(client.seed(1024)) == 1024
        assert client.lookup("smtp", "smtp&mx.example&192.0.2.1&25") is None
        assert client.update("smtp", "smtp&mx.example&192.0.2.1&25", b"session") is True
        assert client.lookup("smtp", b"smtp&mx.example&192.0.2.1&25") == b"session"
        assert client.delete("smtp", "smtp&mx.example&192.0.2.1&25") is True
        assert client.delete("smtp", "smtp&mx.example&192.0.2.1&25") is True    # gone either way
        assert client.lookup("smtp", "smtp&mx.example&192.0.2.1&25") is None
        report = client.status()
        assert report["pid"] == daemon.proc.pid and report["caches"]["smtp"]["updates"] == 1
        # No cache configured for lmtp: quietly nothing.
        assert client.lookup("lmtp", "k") is None and client.update("lmtp", "k", b"s") is False
        assert client.mix_seed() is True
    finally:
        client.close()
    assert log() == []


def test_refused_requests_warn_once_per_interval(daemon, log):
    clock = Clock()
    client = TlsmgrClient(daemon.socket, clock=clock)
    try:
        assert client.lookup("imap", "k") is None
        assert client.seed(5000) is None
        assert client.update("smtp", "", b"s") is False
        lines = log()
        assert len(lines) == 1
        assert lines[0].startswith("smtp: warning: tlsmgr refused lookup request: status 2: unknown cache_type")
        clock.now += tlsmgr_client.WARN_INTERVAL
        assert client.delete("smtp", "") is False
        assert len(log()) == 1
    finally:
        client.close()


def test_openssl_rand_add_canary():
    """RAND_add comes from cryptography's internal binding: fail loudly if an upgrade drops it."""
    from cryptography.hazmat.bindings.openssl.binding import Binding

    assert hasattr(Binding().lib, "RAND_add"), (
        "cryptography no longer exposes RAND_add: lib/tlsmgr_client.openssl_rand_add needs a new home")
    tlsmgr_client.openssl_rand_add(os.urandom(32))


def test_absent_daemon_costs_nothing_and_one_warning(tmp_path, log):
    client = TlsmgrClient(str(tmp_path / "no-such-socket"), clock=Clock())
    t0 = time.monotonic()
    results = [client.seed(), client.lookup("smtp", "k"), client.update("smtp", "k", b"s"),
               client.delete("smtp", "k"), client.status(), client.mix_seed()]
    for _ in range(100):
        results.append(client.lookup("smtp", "k"))
    assert time.monotonic() - t0 < 0.5
    assert results[:6] == [None, None, False, False, None, False]
    assert set(results[6:]) == {None}
    lines = log()
    assert len(lines) == 1
    assert lines[0].startswith(f"smtp: warning: problem talking to server {tmp_path}/no-such-socket: ")
    assert lines[0].endswith("continuing without it, next try in 10s")
    client.close()


def test_backoff_after_a_failure(tmp_path, log, monkeypatch):
    clock = Clock()
    client = TlsmgrClient(str(tmp_path / "no-such-socket"), clock=clock)
    attempts = []
    real = client._clnt.request
    monkeypatch.setattr(client._clnt, "request", lambda req: attempts.append(req) or real(req))
    assert client.seed() is None and len(attempts) == 1
    clock.now += tlsmgr_client.BACKOFF - 1
    assert client.seed() is None and len(attempts) == 1       # not tried during the back-off
    clock.now += 1
    assert client.seed() is None and len(attempts) == 2       # tried again after it
    assert len(log()) == 1                                    # still the same outage
    client.close()


def test_a_hung_daemon_is_timed_out(tmp_path, log):
    path = str(tmp_path / "hung")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(path)
        hung.listen(8)                         # accepts connections, never answers
        client = TlsmgrClient(path, timeout=0.2)
        t0 = time.monotonic()
        assert client.lookup("smtp", "k") is None
        assert time.monotonic() - t0 < 1.0     # two attempts of 0.2 s, then give up
        assert client.lookup("smtp", "k") is None
        assert len(log()) == 1
        client.close()


def test_reconnects_after_a_daemon_restart(tmp_path, log):
    d = Daemon(tmp_path).start()
    clock = Clock()
    client = TlsmgrClient(d.socket, clock=clock)
    try:
        assert client.seed() is not None
        d.stop()
        assert client.seed() is None                          # down: one warning
        d.start()
        assert client.seed() is None                          # still backing off
        clock.now += tlsmgr_client.BACKOFF
        assert len(client.seed()) == 32                       # found again, new connection
        lines = log()
        assert len(lines) == 2 and "warning: problem talking to server" in lines[0]
        assert lines[1] == f"smtp: server {d.socket} answers again"
        d.stop()
        d.start()                                             # a restart between two calls
        assert len(client.seed()) == 32                       # the one retry covers it
        assert log() == []
    finally:
        client.close()
        d.stop()


def test_child_after_fork_uses_its_own_connection(daemon):
    client = TlsmgrClient(daemon.socket)
    try:
        assert client.seed() is not None
        pid = os.fork()
        if pid == 0:
            try:
                ok = client.seed() is not None and client.update("smtp", "child", b"s")
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.lookup("smtp", "child") == b"s"         # the parent's connection is intact
    finally:
        client.close()


def test_module_level_functions(daemon, log):
    tlsmgr_client.configure(path=daemon.socket)
    try:
        assert len(tlsmgr_client.seed(8)) == 8
        assert tlsmgr_client.update("smtp", "m", b"v") and tlsmgr_client.lookup("smtp", "m") == b"v"
        assert tlsmgr_client.delete("smtp", "m") and tlsmgr_client.status()["clients"] >= 1
        assert tlsmgr_client.mix_seed()
    finally:
        tlsmgr_client.close()
    assert log() == []
