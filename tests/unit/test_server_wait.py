"""lib/server.py's wait for a client: an exclusive wait wakes one idle worker per
connection; a connection that waits already is taken; retirement takes none."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest

from postfix_py.lib import server


class CountingSocket(socket.socket):
    """A listener that counts accept attempts (each idle worker woken makes one)."""

    attempts = 0

    def _accept(self):
        type(self).attempts += 1
        return super()._accept()


@pytest.fixture
def listener(tmp_path):
    CountingSocket.attempts = 0
    sock = CountingSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "s")
    sock.bind(path)
    sock.listen(10)
    sock.setblocking(False)
    yield sock, path
    sock.close()


def _worker_ctx(sock):
    live_r, live_w = os.pipe()
    sig_r, sig_w = os.pipe()
    ctx = server.WorkerContext(service=None, cfg=None, program="test", listeners=[sock],
                               status_fd=-1, live_fd=live_r, generation=1)
    ctx.signal_fd = sig_r
    return ctx, [live_r, live_w, sig_r, sig_w]


@pytest.mark.parametrize("exclusive", [True, False])
def test_one_connection_wakes_one_worker(listener, exclusive):
    """Three idle workers, one connection: one takes it, the others wait on; with the
    exclusive wait only one was woken (select wakes all, though a sibling may find the
    connection gone before its select returns)."""
    sock, path = listener
    results, fds, threads = [], [], []
    for _ in range(3):
        ctx, pipes = _worker_ctx(sock)
        fds += pipes
        listening = server._listening(ctx, exclusive=exclusive)
        assert (listening[2] is not None) == exclusive
        t = threading.Thread(target=lambda c=ctx, w=listening: results.append(
            server._wait_for_client(c, 0.5, None, w)))
        threads.append(t)
        t.start()
    time.sleep(0.2)                 # all three wait
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    for t in threads:
        t.join()
    conns = [r for r in results if r is not None]
    assert len(conns) == 1 and results.count(None) == 2
    assert conns[0].gettimeout() is None        # blocking, as socket.accept() makes it
    assert CountingSocket.attempts == 1 if exclusive else CountingSocket.attempts >= 1
    conns[0].close()
    client.close()
    for fd in fds:
        os.close(fd)


def test_exclusive_for_listeners_only(listener):
    """The epoll has the listener with EPOLLEXCLUSIVE, the two pipes without (every
    worker sees its retirement and its signals): as /proc's fdinfo shows it."""
    sock, _ = listener
    ctx, pipes = _worker_ctx(sock)
    poller = server._listening(ctx, exclusive=True)[2]
    events = {}
    with open(f"/proc/self/fdinfo/{poller.fileno()}") as f:
        for line in f:
            if line.startswith("tfd:"):
                words = line.split()
                events[int(words[1])] = int(words[3], 16)
    poller.close()
    for fd in pipes:
        os.close(fd)
    exclusive = select.EPOLLEXCLUSIVE
    assert events[sock.fileno()] & exclusive
    assert not events[ctx.live_fd] & exclusive and not events[ctx.signal_fd] & exclusive


def test_waiting_connection_taken_and_retirement(listener):
    sock, path = listener
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)            # before the worker waits
    ctx, pipes = _worker_ctx(sock)
    listening = server._listening(ctx, exclusive=True)
    conn = server._wait_for_client(ctx, 1.0, None, listening)
    assert conn is not None
    conn.close()
    os.close(pipes[1])              # the master retires the worker: EOF
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(path)
    assert server._wait_for_client(ctx, 1.0, None, listening) is None and ctx.stopping
    listening[2].close()
    for fd in (pipes[0], pipes[2], pipes[3]):
        os.close(fd)
    client.close()
    other.close()
