"""The smtp client's connection cache (smtp/conncache.py): several messages to one TLS
destination over one connection, with Postfix's conn_use= in the delivery log line.

The far end is a postfix-py smtpd with STARTTLS whose log shows every TLS handshake; the
near end is a whole instance (smtpd, qmgr, smtp) or its smtp services driven with
qmgr's own requests."""

import os
import pwd
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import trustme

from pfxinst import Instance, SmtpClient, free_port, wait_for
from postfix_py.lib import attr, deliver
from postfix_py.lib import queue as Q

HANDSHAKE = "TLS connection established from"


@pytest.fixture(scope="module")
def base():
    """A directory under /tmp that mail_owner can reach (pytest's are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="pfx-reuse-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sink(base):
    """A TLS smtpd that takes mail for sink.test and keeps it in its queue."""
    root = base / "sink"
    root.mkdir()
    os.chmod(root, 0o755)
    ca = trustme.CA()
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(root / "server.pem"))
    os.chmod(root / "server.pem", 0o644)
    inst = Instance(root / "inst")
    inst.dir.mkdir()
    os.chmod(inst.dir, 0o755)
    inst.port = free_port()
    inst.main.update({"mydestination": "sink.test", "smtpd_error_sleep_time": "0s",
                      "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
                      "smtpd_tls_cert_file": str(root / "server.pem")})
    inst.master_lines = [f"127.0.0.1:{inst.port} inet n - y - - smtpd"]
    try:
        inst.start()
        yield inst
    finally:
        inst.cleanup()


@pytest.fixture(scope="module")
def sender(base, sink):
    root = base / "sender"
    root.mkdir()
    os.chmod(root, 0o755)
    policy = root / "tls_policy"
    policy.write_text(f"[127.0.0.1]:{sink.port} may connection_reuse=yes\n")
    os.chmod(policy, 0o644)
    inst = Instance(root / "inst")
    inst.dir.mkdir()
    os.chmod(inst.dir, 0o755)
    inst.port = free_port()
    inst.main.update({"mydestination": "", "mynetworks": "127.0.0.0/8",
                      "relayhost": f"[127.0.0.1]:{sink.port}", "smtpd_error_sleep_time": "0s",
                      "smtp_tls_security_level": "may", "smtp_tls_loglevel": "1",
                      "smtp_tls_connection_reuse": "yes",
                      "smtp_connection_cache_destinations": "127.0.0.1",
                      "smtp_connection_cache_time_limit": "1s"})
    inst.master_lines = [
        f"127.0.0.1:{inst.port} inet n - y - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        # Driven directly: on-demand caching only, TLS reuse from the policy table or not.
        f"bypolicy unix - - y - - smtp -o smtp_connection_cache_destinations="
        f" -o smtp_tls_connection_reuse=no -o smtp_tls_policy_maps=texthash:{policy}",
        "noreuse unix - - y - - smtp -o smtp_connection_cache_destinations="
        " -o smtp_tls_connection_reuse=no",
    ]
    inst.uid_gid = (pwd.getpwnam(inst.main["mail_owner"]).pw_uid,
                    pwd.getpwnam(inst.main["mail_owner"]).pw_gid)
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "private" / "noreuse").exists(), what="private/noreuse")
        yield inst
    finally:
        inst.cleanup()


def submit(inst, rcpt: str, subject: str) -> None:
    c = SmtpClient(inst.port)
    assert c.reply().startswith("220")
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<a@client.example>").startswith("250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.").startswith("250")
    c.cmd("QUIT")
    c.close()


def test_three_messages_one_tls_handshake(sender, sink):
    before = sink.log().count(HANDSHAKE)
    mark = len(sender.log())
    for n in range(3):
        submit(sender, f"u{n}@sink.test", f"reuse {n}")
        wait_for(lambda: sender.log()[mark:].count("status=sent") == n + 1, timeout=20,
                 what=f"delivery {n + 1}")
    log = sender.log()[mark:]
    assert sink.log().count(HANDSHAKE) - before == 1, sink.log()
    lines = [line for line in log.splitlines() if "status=sent" in line]
    relay = f"relay=127.0.0.1[127.0.0.1]:{sink.port}"
    assert f"{relay}, delay=" in lines[0]                 # a new connection: no conn_use
    assert f"{relay}, conn_use=2, delay=" in lines[1]
    assert f"{relay}, conn_use=3, delay=" in lines[2]
    # Unused for smtp_connection_cache_time_limit, the connection ends with QUIT.
    wait_for(lambda: re.search(r"disconnect from .* quit=1", sink.log()[-2000:]),
             timeout=10, what="the cached connection's QUIT")


def request(inst, service: str, nexthop: str, flags: list[str]):
    """qmgr's delivery request for a new queue file, as qmgr would send it."""
    w = Q.QueueWriter(str(inst.queue))
    w.set_sender("a@client.example")
    w.add_recipient("v@sink.test")
    w.write(b"Subject: direct\n\nhello\n")
    qid = w.commit()
    path = inst.queue / "active" / qid
    os.rename(inst.queue / "incoming" / qid, path)
    os.chown(path, *inst.uid_gid)
    m = Q.read(str(path))
    req = deliver.Request(qid, f"active/{qid}", service, nexthop, m.sender, m.arrival,
                          ["v@sink.test"], [r.offset for r in m.recipients], flags)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(inst.queue / "private" / service))
        s.sendall(deliver.encode_request(req))
        reply = deliver.decode_reply(attr.read_frame(s, 30), 1)
    os.unlink(path)
    return reply


@pytest.mark.parametrize("service,handshakes", [("bypolicy", 1), ("noreuse", 2)])
def test_on_demand_caching_and_the_policy_table_attribute(sender, sink, service, handshakes):
    """qmgr's conn_load/conn_store flags; a TLS connection is kept only where
    smtp_tls_connection_reuse or the policy's connection_reuse=yes says so."""
    time.sleep(1.5)         # what an earlier test left cached has gone
    before = sink.log().count(HANDSHAKE)
    mark = len(sender.log())
    flags = ["conn_load", "conn_store"]
    for _ in range(2):
        reply = request(sender, service, f"[127.0.0.1]:{sink.port}", flags)
        assert reply.results[0].result == "sent", reply.results[0].reason
    assert sink.log().count(HANDSHAKE) - before == handshakes
    assert ("conn_use=2" in sender.log()[mark:]) == (handshakes == 1)
