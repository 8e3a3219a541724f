"""smtpd behind a load balancer (smtpd_upstream_proxy_protocol = haproxy), through the real
master: a client sends a PROXY header then SMTP, and the log lines, the queue file and its
Received: header show the original client, as Postfix's; a bad header is refused. XCLIENT
and XFORWARD (smtpd/xclient.py), and the smtp client's XFORWARD to a second instance."""

import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from pfxinst import Instance, free_port, wait_for

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture
def lb(instance):
    """An instance whose smtpd expects a PROXY header; .port and .queued()."""
    return instance.add_smtpd(smtpd_peername_lookup="no",
                              smtpd_upstream_proxy_protocol="haproxy",
                              smtpd_upstream_proxy_timeout="2s")


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
    (m, content), = lb.queued(text=True)
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
    assert lb.queued(text=True) == []


def test_v2_local_keeps_the_connection_endpoints(lb):
    lb.start()
    header = V2_SIG + struct.pack("!BBH", 0x20, 0x00, 0)
    replies = chat(lb.port, header, ["QUIT"])
    assert replies[0].startswith("220 ") and replies[1] == "221 2.0.0 Bye"
    wait_for(lambda: "disconnect from unknown[127.0.0.1] quit=1 commands=1" in lb.log(),
             what="the disconnect line")


XCLIENT_MAIN = {"smtpd_peername_lookup": "no", "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
                "smtpd_client_restrictions": "check_client_access inline:{ 192.0.2.66=REJECT }",
                "smtpd_delay_reject": "no"}


@pytest.fixture
def xmta(instance):
    """An instance whose smtpd lets 127.0.0.1 use XCLIENT; .port and .queued()."""
    return instance.add_smtpd(**XCLIENT_MAIN)


@pytest.fixture(scope="module")
def xreplies():
    """One running instance for the tests that only look at the replies to one command on
    a connection of their own (nothing queued, no log read): xmta, and 127.0.0.1 may
    also use XFORWARD."""
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root).add_smtpd(**XCLIENT_MAIN, smtpd_authorized_xforward_hosts="127.0.0.1")
    with inst.running():
        yield inst
    shutil.rmtree(root, ignore_errors=True)


def test_xclient_replaces_the_client_and_greets_again(xmta):
    xmta.start()
    replies = chat(xmta.port, b"", [
        "EHLO proxy.example",
        "XCLIENT NAME=client.example ADDR=192.0.2.8 PORT=4711 HELO=orig+2Ehelo LOGIN=joe",
        "EHLO again.example", "MAIL FROM:<alice@example.org>",
        "RCPT TO:<bob@mail.test.example>", "DATA", "Subject: x\r\n\r\nbody\r\n.", "QUIT"])
    assert "250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT" \
        in replies
    # The end of the first EHLO reply: its last line, whatever the last keyword
    i = next(n for n, r in enumerate(replies) if r.startswith("250 ") and n > 0)
    assert replies[i + 1].startswith("220 mail.test.example ESMTP")   # the new greeting
    assert not any(r.startswith("250-XCLIENT") for r in replies[i + 2:])   # not for it
    assert any(r.startswith("250 2.0.0 Ok: queued as") for r in replies), replies
    (m, content), = xmta.queued(text=True)
    assert m.attrs["client_address"] == "192.0.2.8"
    assert m.attrs["client_name"] == "client.example"
    assert m.attrs["sasl_method"] == "XCLIENT" and m.attrs["sasl_username"] == "joe"
    assert content.startswith("Received: from again.example (client.example [192.0.2.8])\n")
    log = xmta.log()
    assert f"{m.queue_id}: client=client.example[192.0.2.8], sasl_method=XCLIENT, " \
           "sasl_username=joe" in log
    wait_for(lambda: "disconnect from client.example[192.0.2.8] ehlo=2 xclient=1 mail=1 "
                     "rcpt=1 data=1 quit=1 commands=7" in xmta.log(), what="disconnect")


def test_xclient_new_client_meets_the_connect_restrictions(xmta):
    xmta.start()
    replies = chat(xmta.port, b"", ["XCLIENT ADDR=192.0.2.66", "MAIL FROM:<a@example.org>",
                                    "QUIT"])
    assert replies[1] == "554 5.7.1 <unknown[192.0.2.66]>: Client host rejected: " \
                         "Access denied"
    assert replies[2] == "503 5.7.0 Error: access denied for unknown[192.0.2.66]"


@pytest.mark.parametrize("command, reply", [
    ("XCLIENT", "501 5.5.4 Syntax: XCLIENT attribute=value..."),
    ("XCLIENT NAME", "501 5.5.4 Error: attribute=value expected"),
    ("XCLIENT ADDR=300.1.1.1", "501 5.5.4 Bad ADDR syntax: 300.1.1.1"),
    ("XCLIENT PORT=x1", "501 5.5.4 Bad PORT syntax: x1"),
    ("XCLIENT PROTO=LMTP", "501 5.5.4 Bad PROTO syntax: LMTP"),
    ("XCLIENT NAME=bad..name", "501 5.5.4 Bad NAME syntax: bad..name"),
    ("XCLIENT COLOR=blue", "501 5.5.4 Bad XCLIENT attribute name: COLOR"),
    ("XCLIENT NAME=" + "a" * 256, "501 5.5.4 Error: attribute value too long"),
])
def test_xclient_errors(xreplies, command, reply):
    replies = chat(xreplies.port, b"", [command, "QUIT"])
    assert replies[1] == reply


def test_xclient_needs_authorization(mta_plain):
    mta_plain.start()
    replies = chat(mta_plain.port, b"", ["EHLO x", "XCLIENT ADDR=192.0.2.8", "QUIT"])
    assert not any("XCLIENT" in r for r in replies[:-3])
    assert replies[-3] == "550 5.7.0 Error: insufficient authorization"


@pytest.fixture
def mta_plain(instance):
    return instance.add_smtpd(smtpd_peername_lookup="no")


def test_xforward_end_to_end(lb):
    """A client behind the balancer -> smtpd -> qmgr -> smtp with XFORWARD -> a second
    postfix-py whose smtpd authorizes 127.0.0.1: the second hop logs and records the
    original client and the first hop's queue ID."""
    root = Path(tempfile.mkdtemp(prefix="pfx-test-hop2-", dir="/tmp"))
    os.chmod(root, 0o755)
    hop2 = Instance(root)
    hop2.port = free_port()
    hop2.main.update({"mydestination": "remote.example", "smtpd_peername_lookup": "no",
                      "myhostname": "hop2.test.example",
                      "smtpd_authorized_xforward_hosts": "127.0.0.0/8"})
    hop2.master_lines = [f"127.0.0.1:{hop2.port} inet n - y - - smtpd"]
    lb.main.update({"mynetworks": "127.0.0.0/8 192.0.2.0/24",
                    "relayhost": f"[127.0.0.1]:{hop2.port}",
                    "smtp_send_xforward_command": "yes"})
    lb.master_lines += ["qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
    try:
        hop2.start()
        lb.start()
        header = V2_SIG + struct.pack("!BBH", 0x21, 0x11, 12) + \
            socket.inet_aton("192.0.2.7") + socket.inet_aton("127.0.0.1") + \
            struct.pack("!HH", 40123, lb.port)
        replies = chat(lb.port, header, [
            "EHLO relay.example", "MAIL FROM:<alice@example.org>",
            "RCPT TO:<bob@remote.example>", "DATA", "Subject: hop\r\n\r\nhi\r\n.", "QUIT"])
        queued = [r for r in replies if r.startswith("250 2.0.0 Ok: queued as")]
        assert queued, replies
        first_id = queued[0].split()[-1]
        wait_for(lambda: "status=sent" in lb.log(), timeout=30, what="the relay")
        hop2_log = hop2.log()
        (m, _), = hop2.queued()
    finally:
        hop2.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    assert f"{m.queue_id}: client=unknown[127.0.0.1], orig_queue_id={first_id}, " \
           "orig_client=unknown[192.0.2.7]" in hop2_log
    assert m.attrs["log_client_address"] == "192.0.2.7"
    assert m.attrs["log_client_port"] == "40123"
    assert m.attrs["log_helo_name"] == "relay.example"
    assert m.attrs["log_protocol_name"] == "ESMTP"
    assert m.attrs["log_ident"] == first_id
    assert m.attrs["rewrite_context"] == "remote"


@pytest.mark.parametrize("command, reply", [
    ("XFORWARD", "501 5.5.4 Syntax: XFORWARD attribute=value..."),
    ("XFORWARD ADDR=1.2.3", "501 5.5.4 Bad ADDR syntax: 1.2.3"),
    ("XFORWARD SOURCE=MARS", "501 5.5.4 Bad SOURCE syntax: MARS"),
    ("XFORWARD COLOR=blue", "501 5.5.4 Bad XFORWARD attribute name: COLOR"),
    ("XFORWARD NAME=a.example ADDR=IPv6:2001:db8::1 HELO=x+20y", "250 2.0.0 Ok"),
])
def test_xforward_replies(xreplies, command, reply):
    replies = chat(xreplies.port, b"", ["EHLO x", command, "QUIT"])
    assert "250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT" in replies
    assert replies[-3] == reply


def test_xforward_needs_authorization(mta_plain):
    mta_plain.start()
    replies = chat(mta_plain.port, b"", ["XFORWARD ADDR=192.0.2.8", "QUIT"])
    assert replies[1] == "550 5.7.0 Error: insufficient authorization"
