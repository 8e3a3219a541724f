"""The smtp client's connection cache (smtp/conncache.py): several messages to one TLS
destination over one connection, with Postfix's conn_use= in the delivery log line.

The far end is a postfix-py smtpd with STARTTLS whose log shows every TLS handshake; the
near end is a whole instance (smtpd, qmgr, smtp) or its smtp services driven with
qmgr's own requests."""

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import trustme

from pfxinst import Instance, SmtpClient, wait_for

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
    inst = Instance.make(root / "inst")
    inst.add_smtpd(mydestination="sink.test", smtpd_tls_security_level="may",
                   smtpd_tls_loglevel="1", smtpd_tls_cert_file=str(root / "server.pem"))
    with inst.running():
        yield inst


@pytest.fixture(scope="module")
def sender(base, sink):
    root = base / "sender"
    root.mkdir()
    os.chmod(root, 0o755)
    policy = root / "tls_policy"
    policy.write_text(f"[127.0.0.1]:{sink.port} may connection_reuse=yes\n")
    os.chmod(policy, 0o644)
    inst = Instance.make(root / "inst")
    inst.add_smtpd(mydestination="", mynetworks="127.0.0.0/8",
                   relayhost=f"[127.0.0.1]:{sink.port}",
                   smtp_tls_security_level="may", smtp_tls_loglevel="1",
                   smtp_tls_connection_reuse="yes",
                   smtp_connection_cache_destinations="127.0.0.1",
                   smtp_connection_cache_time_limit="1s")
    inst.master_lines += [
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        # Driven directly: on-demand caching only, TLS reuse from the policy table or not.
        f"bypolicy unix - - y - - smtp -o smtp_connection_cache_destinations="
        f" -o smtp_tls_connection_reuse=no -o smtp_tls_policy_maps=texthash:{policy}",
        "noreuse unix - - y - - smtp -o smtp_connection_cache_destinations="
        " -o smtp_tls_connection_reuse=no",
    ]
    with inst.running("noreuse"):
        yield inst


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


@pytest.mark.parametrize("service,handshakes", [("bypolicy", 1), ("noreuse", 2)])
def test_on_demand_caching_and_the_policy_table_attribute(sender, sink, service, handshakes):
    """qmgr's conn_load/conn_store flags; a TLS connection is kept only where
    smtp_tls_connection_reuse or the policy's connection_reuse=yes says so."""
    time.sleep(1.5)         # what an earlier test left cached has gone
    before = sink.log().count(HANDSHAKE)
    mark = len(sender.log())
    flags = ["conn_load", "conn_store"]
    for _ in range(2):
        reply = sender.deliver(service, f"[127.0.0.1]:{sink.port}", flags)
        assert reply.results[0].result == "sent", reply.results[0].reason
    assert sink.log().count(HANDSHAKE) - before == handshakes
    assert ("conn_use=2" in sender.log()[mark:]) == (handshakes == 1)
