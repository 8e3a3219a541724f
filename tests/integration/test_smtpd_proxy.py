"""smtpd behind a load balancer (smtpd_upstream_proxy_protocol = haproxy), through the real
master: a client sends a PROXY header then SMTP, and the log lines, the queue file and its
Received: header show the original client, as Postfix's; a bad header is refused."""

import glob
import socket
import struct

import pytest

from pfxinst import free_port, wait_for
from postfix_py.lib import queue as Q

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def lb(instance):
    """An instance whose smtpd expects a PROXY header; .port and .queued()."""
    instance.port = free_port()
    instance.main.update({"mydestination": "$myhostname, localhost",
                          "smtpd_error_sleep_time": "0s",
                          "smtpd_peername_lookup": "no",
                          "smtpd_upstream_proxy_protocol": "haproxy",
                          "smtpd_upstream_proxy_timeout": "2s"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd"]

    def queued():
        out = []
        for path in sorted(glob.glob(str(instance.queue / "incoming" / "*"))):
            m = Q.read(path)
            out.append((m, b"".join(m.content(path)).decode()))
        return out
    instance.queued = queued
    return instance


def chat(port: int, header: bytes, lines: list[str]) -> list[str]:
    """Send the header and the SMTP lines pipelined; the reply lines until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, \
            s.makefile("rb") as f:
        s.sendall(header)
        replies = [f.readline().decode().rstrip()]
        if replies[0].startswith("220"):
            for line in lines:
                s.sendall(line.encode() + b"\r\n")
                while True:
                    reply = f.readline().decode().rstrip()
                    replies.append(reply)
                    if len(reply) < 4 or reply[3] != "-":
                        break
        replies.append(f.read().decode())      # EOF after QUIT or a hang-up
        return replies


MESSAGE = ["EHLO relay.example", "MAIL FROM:<alice@example.org>",
           "RCPT TO:<bob@mail.test.example>", "DATA",
           "Subject: via the balancer\r\n\r\nhello\r\n.", "QUIT"]


def check_delivered(lb, client_addr: str, port_hint: str):
    (m, content), = lb.queued()
    assert m.attrs["client_address"] == client_addr
    assert content.startswith(f"Received: from relay.example (unknown [{client_addr}])\n")
    log = lb.log()
    assert f"connect from unknown[{client_addr}]" in log
    assert f"{m.queue_id}: client=unknown[{client_addr}]" in log
    wait_for(lambda: f"disconnect from unknown[{client_addr}] ehlo=1 mail=1 rcpt=1 data=1 "
                     "quit=1 commands=5" in lb.log(), what="the disconnect line")
    assert "[127.0.0.1]" not in lb.log()


def test_v2_header_gives_the_original_client(lb):
    lb.start()
    header = V2_SIG + struct.pack("!BBH", 0x21, 0x11, 12) + socket.inet_aton("192.0.2.7") \
        + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40123, lb.port)
    replies = chat(lb.port, header, MESSAGE)
    assert replies[0].startswith("220 ")
    assert any(r.startswith("250 2.0.0 Ok: queued as") for r in replies), replies
    check_delivered(lb, "192.0.2.7", "40123")


def test_v1_header_gives_the_original_client(lb):
    lb.start()
    header = f"PROXY TCP6 2001:db8::25 ::1 40124 {lb.port}\r\n".encode()
    replies = chat(lb.port, header, MESSAGE)
    assert any(r.startswith("250 2.0.0 Ok: queued as") for r in replies), replies
    check_delivered(lb, "2001:db8::25", "40124")


def test_bad_header_is_refused(lb):
    lb.start()
    replies = chat(lb.port, b"PROXY UNKNOWN\r\nEHLO x\r\n", MESSAGE)
    assert replies[0] == "421 4.3.0 mail.test.example Server local error"
    assert replies[-1] == ""            # and the connection is closed
    wait_for(lambda: "disconnect from unknown[unknown]" in lb.log(), what="the disconnect")
    log = lb.log()
    assert "warning: haproxy read: bad or missing protocol type: " \
           "PROXY UNKNOWN\\r\\nEHLO x\\r\\n" in log
    assert "connect from unknown[unknown]" in log
    assert lb.queued() == []


def test_v2_local_keeps_the_connection_endpoints(lb):
    lb.start()
    header = V2_SIG + struct.pack("!BBH", 0x20, 0x00, 0)
    replies = chat(lb.port, header, ["QUIT"])
    assert replies[0].startswith("220 ") and replies[1] == "221 2.0.0 Bye"
    wait_for(lambda: "disconnect from unknown[127.0.0.1] quit=1 commands=1" in lb.log(),
             what="the disconnect line")
