"""Private memcached and redis-server processes on loopback free ports, for the tests.

    with Memcached() as m:  m.port, m.stop()     (restartable: m.start() again)
    with Redis(tmpdir) as r: r.port

Each runs in the foreground as a child of the test, is ended by its pid (SIGTERM, then
SIGKILL), and keeps nothing on disk (redis: no RDB, no AOF).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from peers import free_port

MEMCACHED = shutil.which("memcached")
REDIS = shutil.which("redis-server")


def _wait_port(port: int, proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"store exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"store did not listen on port {port}")


class _Store:
    def __init__(self):
        self.port = free_port()
        self.proc = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class Memcached(_Store):
    def command(self):
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "16",
                *user]


class Redis(_Store):
    def __init__(self, directory):
        super().__init__()
        self.dir = str(directory)

    def command(self):
        return [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"]
