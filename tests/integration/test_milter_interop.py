"""smtpd_milters against a real milter: Debian's OpenDKIM, as a private daemon on
loopback (its own configuration, key and port; ended by pid).

Signing: a message relayed out through postfix-py (smtpd -> qmgr -> smtp -> a sink) with
OpenDKIM in signing mode carries a DKIM-Signature that dkimpy verifies with the public
key of the test's key pair. Verifying: a message signed by dkimpy gets OpenDKIM's
Authentication-Results header with dkim=pass; OpenDKIM finds the public key in the DNS,
served by a private dnsmasq on loopback (its Nameservers option names it).
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pfxinst import SmtpClient, free_port, wait_for
from sink import Sink

dkim = pytest.importorskip("dkim")

OPENDKIM = shutil.which("opendkim", path="/usr/sbin:/usr/bin")
GENKEY = shutil.which("opendkim-genkey", path="/usr/sbin:/usr/bin")
DNSMASQ = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin")
ROOT = os.geteuid() == 0
pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not (OPENDKIM and GENKEY and ROOT),
                                 reason="needs Debian's opendkim, opendkim-tools and root")]


def listening(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def keys():
    """A DKIM key pair for selector test of example.org: (dir, TXT record value)."""
    d = Path(tempfile.mkdtemp(prefix="pfx-dkim-", dir="/tmp"))
    os.chmod(d, 0o755)
    subprocess.run([GENKEY, "-b", "1024", "-d", "example.org", "-s", "test", "-D", str(d)],
                   check=True, timeout=60)
    shutil.chown(d / "test.private", "nobody", "nogroup")
    txt = (d / "test.txt").read_text()
    value = "".join(part for part in txt.split('"')[1::2])
    yield d, value
    shutil.rmtree(d, ignore_errors=True)


def start_opendkim(d: Path, name: str, lines: list[str]):
    port = free_port()
    conf = d / f"{name}.conf"
    conf.write_text("\n".join([
        "Syslog no", "Background no", "UserID nobody:nogroup", "RequireSafeKeys no",
        f"Socket inet:{port}@127.0.0.1", "Canonicalization relaxed/relaxed",
        "AuthservID mail.test.example", *lines]) + "\n")
    log = open(d / f"{name}.log", "w")
    proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 20, interval=0.1,
                 what="opendkim")
    except BaseException:
        proc.kill()
        raise
    assert proc.poll() is None, (d / f"{name}.log").read_text()
    return proc, port, log


def stop(proc, log):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def signer(keys):
    d, _ = keys
    proc, port, log = start_opendkim(d, "signer", [
        "Mode s", "Domain example.org", "Selector test", f"KeyFile {d / 'test.private'}"])
    yield port
    stop(proc, log)


@pytest.fixture(scope="module")
def verifier(keys):
    d, txt = keys
    if not DNSMASQ:
        pytest.skip("needs dnsmasq")
    dns_port = free_port()
    dns_log = open(d / "dnsmasq.log", "w")
    dns = subprocess.Popen(
        [DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
         "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={dns_port}",
         "--pid-file=", "--user=nobody", "--group=nogroup", "--local=/example.org/",
         f"--txt-record=test._domainkey.example.org,{txt}"],
        stdout=dns_log, stderr=subprocess.STDOUT)
    try:
        proc, port, log = start_opendkim(d, "verifier", [
            "Mode v", f"Nameservers 127.0.0.1@{dns_port}"])
        yield port
        stop(proc, log)
    finally:
        stop(dns, dns_log)


def send(port: int, message: bytes, sender="alice@example.org", rcpt="bob@remote.example"):
    c = SmtpClient(port)
    try:
        assert c.reply().startswith("220")
        assert c.cmd("EHLO client.test").startswith("250")
        assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        reply = c.cmd(message.decode() + ".")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@remote.example\r\n"
           b"Subject: signed by a milter\r\nMessage-ID: <dkim-1@example.org>\r\n"
           b"Date: Sat, 05 Dec 2026 12:00:00 +0000\r\n\r\nHello Bob,\r\n\r\nsee you.\r\n")


def test_opendkim_signs_mail_relayed_out(instance, keys, signer):
    d, txt = keys
    with Sink(keep_bodies=True) as sink:
        instance.port = free_port()
        instance.main.update({
            "relayhost": f"[127.0.0.1]:{sink.port}", "mydestination": "localhost",
            "smtpd_milters": f"inet:127.0.0.1:{signer}"})
        instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd",
                                 "qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
        instance.start()
        assert send(instance.port, MESSAGE).startswith("250 2.0.0 Ok: queued as ")
        wait_for(lambda: sink.messages, 60, what="the relayed message")
        (_, _, body), = sink.messages
    assert b"\r\nDKIM-Signature: " in b"\r\n" + body
    assert b"d=example.org" in body and b"s=test" in body
    record = txt.encode()
    assert dkim.verify(body + b"\r\n", dnsfunc=lambda name, timeout=5: record
                       if name == b"test._domainkey.example.org." else None)
    # the Received: header of postfix-py stays out of the signature, as with Postfix
    signature = body.split(b"DKIM-Signature:", 1)[1].split(b"b=", 1)[0].lower()
    assert b"received" not in signature.split(b"h=", 1)[1]


def test_opendkim_verifies_inbound_mail(instance, keys, verifier):
    d, _ = keys
    key = (d / "test.private").read_bytes()
    signature = dkim.sign(MESSAGE, b"test", b"example.org", key,
                          include_headers=[b"from", b"to", b"subject", b"date"])
    instance.port = free_port()
    instance.main.update({"mydestination": "$myhostname, localhost, remote.example",
                          "smtpd_milters": f"inet:127.0.0.1:{verifier}"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd"]
    instance.start()
    assert send(instance.port, signature + MESSAGE).startswith("250 2.0.0 Ok: queued as ")
    from postfix_py.lib import queue as Q
    (path,) = list((instance.queue / "incoming").iterdir())
    m = Q.read(str(path))
    content = b"".join(m.content(str(path))).decode()
    header = content.split("Authentication-Results:", 1)[1].split("\n")[0:3]
    text = " ".join(header)
    assert text.lstrip().startswith("mail.test.example;")
    assert "dkim=pass" in text and "header.d=example.org" in text
