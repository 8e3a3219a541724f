"""qmgr/dispatch.py: one delivery conversation over a real UNIX socket in a real event loop,
against a scripted agent thread: good replies, garbage, silence, hang-ups, no listener."""

import os
import socket
import threading
import time

import pytest

from postfix_py.lib import attr, deliver, msg
from postfix_py.lib.events import EventLoop
from postfix_py.qmgr.dispatch import AgentPool
from postfix_py.qmgr.manager import Failure

REQUEST = deliver.Request(queue_id="ABC", queue_file="active/ABC", transport="smtp",
                          nexthop="example.com", sender="a@example.org", arrival=1.0,
                          recipients=["x@example.com", "y@example.com"], offsets=[10, 20])


@pytest.fixture
def root(tmp_path):
    os.mkdir(tmp_path / "private")
    msg.init_cli("qmgr")
    return str(tmp_path)


def agent(root, behave):
    """Listen on private/smtp; serve one connection with behave(conn, request) in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(root, "private", "smtp"))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            request = deliver.decode_request(attr.read_frame(conn, 5))
            behave(conn, request)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def converse(root, timeout=5.0):
    loop = EventLoop()
    out = []
    pool = AgentPool(loop, root, timeout, done=lambda job, result: out.append((job, result)))
    pool.dispatch("job", REQUEST)
    deadline = time.monotonic() + 10
    try:
        loop.run(until=lambda: out or time.monotonic() > deadline, max_wait=0.05)
    finally:
        pool.close()
        loop.close()
    assert out and out[0][0] == "job" and not pool.calls
    return out[0][1]


def run_with(root, behave, timeout=5.0):
    listener, thread = agent(root, behave)
    try:
        return converse(root, timeout)
    finally:
        thread.join(10)
        listener.close()


def test_good_reply(root):
    def behave(conn, request):
        assert request.recipients == ["x@example.com", "y@example.com"]
        conn.sendall(deliver.encode_reply(deliver.DeliveryStatus("mx[192.0.2.1]:25", [
            deliver.RcptResult("sent", "2.0.0", "ok"),
            deliver.RcptResult("bounced", "5.1.1", "no")])))
    reply = run_with(root, behave)
    assert isinstance(reply, deliver.DeliveryStatus) and reply.relay == "mx[192.0.2.1]:25"
    assert [r.result for r in reply.results] == ["sent", "bounced"]


def test_no_listener(root, capsys):
    result = converse(root)
    assert result == Failure("4.3.0", "mail transport unavailable")
    assert "warning: connect to transport private/smtp: No such file or directory" in \
        capsys.readouterr().err


@pytest.mark.parametrize("send, warning", [
    (b"\x00\x00\x00\x05junk!", "malformed delivery status"),
    (attr.encode({"status": "0", "relay": "x", "rcpt_count": 1}), "reply does not match"),
    (attr.encode({"status": "0", "relay": "x", "rcpt_count": 2, "result.0": "sent",
                  "dsn.0": "2.0.0", "reason.0": "", "result.1": "maybe", "dsn.1": "2.0.0",
                  "reason.1": ""}), "bad result"),
    (b"", "closed the connection without a status"),
    (b"\x00\x00\x01", "closed the connection without a status"),
])
def test_broken_replies(root, capsys, send, warning):
    result = run_with(root, lambda conn, request: conn.sendall(send))
    assert result == Failure("4.3.0", "unknown mail transport error")
    assert warning in capsys.readouterr().err


def test_agent_status_error_is_a_reply(root):
    result = run_with(root, lambda conn, request: conn.sendall(
        attr.encode({"status": "2", "reason": "bad request"})))
    assert isinstance(result, deliver.DeliveryStatus) and result.status == "2"
    assert result.reason == "bad request"


def test_timeout(root, capsys):
    gate = threading.Event()
    started = time.monotonic()
    listener, thread = agent(root, lambda conn, request: gate.wait(5))
    try:
        result = converse(root, timeout=0.3)
    finally:
        gate.set()
        thread.join(10)
        listener.close()
    assert result == Failure("4.3.0", "delivery agent timeout")
    assert time.monotonic() - started < 3
    assert "no delivery status after 0.3s" in capsys.readouterr().err
