"""smtpd_milters against real milters: Debian's OpenDKIM and spamass-milter, as private
daemons on loopback (their own configuration, keys and ports; ended by pid).

Signing: a message relayed out through postfix-py (smtpd -> qmgr -> smtp -> a sink) with
OpenDKIM in signing mode carries a DKIM-Signature that dkimpy verifies with the public
key of the test's key pair. Verifying: a message signed by dkimpy gets OpenDKIM's
Authentication-Results header with dkim=pass; OpenDKIM finds the public key in the DNS,
served by a private dnsmasq on loopback (its Nameservers option names it).

SpamAssassin: spamass-milter (run as nobody, `-r 15`) hands each message to a private
spamd through spamc; spamd reads only tests/data/spamassassin/local.cf (GTUBE and the
test's PFX_PROBE rule, no network test). The GTUBE message (tests/data/gtube.eml) is
refused at end of DATA with spamass-milter's `550 5.7.1 Blocked by SpamAssassin`; a
message that is spam below the threshold is queued with the milter's changes (X-Spam-Flag:
YES, the rewritten Subject:, the body replaced by SpamAssassin's report with the original
attached); an ordinary message is queued with `X-Spam-Status: No` and its body intact.
The same milter as non_smtpd_milters filters `postfix-py sendmail -bs` (Postfix's
stand-alone smtpd, whose mail cleanup inspects with non_smtpd_milters), and only it.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import POSTFIX_PY
from pfxinst import SmtpClient, free_port, wait_for
from sink import Sink

try:
    import dkim
except ImportError:
    dkim = None

SBIN = "/usr/sbin:/usr/bin"
OPENDKIM = shutil.which("opendkim", path=SBIN)
GENKEY = shutil.which("opendkim-genkey", path=SBIN)
DNSMASQ = shutil.which("dnsmasq", path=SBIN)
SPAMD = shutil.which("spamd", path=SBIN)
SPAMC = shutil.which("spamc", path=SBIN)
SPAMASS = shutil.which("spamass-milter", path=SBIN)
ROOT = os.geteuid() == 0
DATA = Path(__file__).resolve().parents[1] / "data"
pytestmark = pytest.mark.interop
needs_opendkim = pytest.mark.skipif(
    not (OPENDKIM and GENKEY and ROOT and dkim),
    reason="needs Debian's opendkim, opendkim-tools, dkimpy and root")
needs_spamass = pytest.mark.skipif(
    not (SPAMD and SPAMC and SPAMASS and ROOT),
    reason="needs Debian's spamass-milter, spamd, spamc and root")


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


# libmilter daemons (opendkim, spamass-milter) leave on SIGTERM only after their 4 s
# accept loop; SIGKILL after MILTER_GRACE costs them nothing
MILTER_GRACE = 0.5


def stop(proc, log, grace: float = 10):
    proc.terminate()
    try:
        proc.wait(grace)
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
    stop(proc, log, MILTER_GRACE)


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
        stop(proc, log, MILTER_GRACE)
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


@needs_opendkim
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


@needs_opendkim
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


# --- spamass-milter with a private spamd ----------------------------------------------------
def spamd_pong(port: int) -> bool:
    """spamd answers spamc's PING (a bare connect would be logged as a bad request)."""
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b" PONG" in s.recv(100)
    except OSError:
        return False


@pytest.fixture(scope="module")
def spamass():
    """spamd and spamass-milter (reject at score 15) on loopback: the milter's port."""
    d = Path(tempfile.mkdtemp(prefix="pfx-spamass-", dir="/tmp"))
    os.chmod(d, 0o755)
    rules, site = d / "rules", d / "site"
    rules.mkdir(mode=0o755)
    site.mkdir(mode=0o755)
    shutil.copy(DATA / "spamassassin" / "local.cf", rules / "local.cf")
    os.chmod(rules / "local.cf", 0o644)
    spamd_port, milter_port = free_port(), free_port()
    spamd_log = open(d / "spamd.log", "w")
    spamd = subprocess.Popen(
        [SPAMD, "--local", "--nouser-config", "--username=nobody", "--groupname=nogroup",
         f"--configpath={rules}", f"--siteconfigpath={site}", f"--helper-home-dir={d}",
         f"--listen=127.0.0.1:{spamd_port}", "--max-children=1", "--min-children=1",
         "--max-spare=1", "--syslog=stderr", f"--pidfile={d / 'spamd.pid'}"],
        stdout=spamd_log, stderr=subprocess.STDOUT)
    milter_log = open(d / "spamass-milter.log", "w")
    milter = None
    try:
        wait_for(lambda: spamd_pong(spamd_port) or spamd.poll() is not None, 30,
                 interval=0.1, what="spamd")
        assert spamd.poll() is None, (d / "spamd.log").read_text()
        milter = subprocess.Popen(
            [SPAMASS, "-p", f"inet:{milter_port}@127.0.0.1", "-r", "15",
             "--", "-d", "127.0.0.1", "-p", str(spamd_port)],
            stdout=milter_log, stderr=subprocess.STDOUT, user="nobody", group="nogroup",
            extra_groups=[],
            cwd=d)
        wait_for(lambda: listening(milter_port) or milter.poll() is not None, 20,
                 interval=0.1, what="spamass-milter")
        assert milter.poll() is None, (d / "spamass-milter.log").read_text()
        yield milter_port
    finally:
        if milter is not None:
            stop(milter, milter_log, MILTER_GRACE)
        else:
            milter_log.close()
        stop(spamd, spamd_log)
        shutil.rmtree(d, ignore_errors=True)


def spamass_instance(instance, milter_port: int, param="smtpd_milters") -> None:
    instance.port = free_port()
    instance.main.update({"mydestination": "$myhostname, localhost, remote.example",
                          param: f"inet:127.0.0.1:{milter_port}"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd",
                             "pickup unix n - y - - pickup"]
    instance.start()


def sendmail_bs(instance, *messages: bytes) -> list[str]:
    """One `postfix-py sendmail -bs` session that sends each message; its replies."""
    session = b"EHLO me.example\r\n"
    for message in messages:
        session += (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@remote.example>\r\n"
                    b"DATA\r\n" + message + b".\r\n")
    out = subprocess.run([POSTFIX_PY, "-c", str(instance.dir), "sendmail", "-bs"],
                         input=session + b"QUIT\r\n", capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().splitlines()


def queued(instance, reply: str) -> str:
    """The content of the queue file that a `250 ... queued as ID` reply names."""
    from postfix_py.lib import queue as Q
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    path = instance.queue / "incoming" / reply.split()[-1]
    return b"".join(Q.read(str(path)).content(str(path))).decode()


def headers(content: str) -> dict[str, list[str]]:
    """The unfolded header fields of a message, by lower-case name."""
    fields: dict[str, list[str]] = {}
    head = content.replace("\r\n", "\n").split("\n\n", 1)[0]
    for line in head.replace("\n\t", " ").replace("\n ", " ").split("\n"):
        name, _, value = line.partition(":")
        fields.setdefault(name.lower(), []).append(value.strip())
    return fields


def ham(subject: str, text: str) -> bytes:
    return (f"From: Alice <alice@example.org>\r\nTo: bob@remote.example\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '-')}@example.org>\r\n"
            f"Date: Sat, 05 Dec 2026 12:00:00 +0000\r\n\r\n{text}\r\n").encode()


@needs_spamass
def test_spamass_milter_rejects_gtube(instance, spamass):
    spamass_instance(instance, spamass)
    reply = send(instance.port, (DATA / "gtube.eml").read_bytes())
    assert reply == "550 5.7.1 Blocked by SpamAssassin"
    assert not list((instance.queue / "incoming").iterdir())
    wait_for(lambda: "milter-reject: END-OF-MESSAGE from " in instance.log(), 10,
             what="the milter-reject log line")
    line = next(l for l in instance.log().splitlines() if "milter-reject:" in l)
    assert ": 5.7.1 Blocked by SpamAssassin; from=<alice@example.org> " \
        "to=<bob@remote.example> proto=ESMTP helo=<client.test>" in line
    # sendmail -bs is Postfix's stand-alone smtpd: smtpd_milters do not apply to it
    reply = sendmail_bs(instance, (DATA / "gtube.eml").read_bytes())[-2]
    assert "x-spam-status" not in headers(queued(instance, reply))


@needs_spamass
def test_spamass_milter_as_non_smtpd_milters_for_sendmail_bs(instance, spamass):
    spamass_instance(instance, spamass, "non_smtpd_milters")
    replies = sendmail_bs(instance, (DATA / "gtube.eml").read_bytes(),
                          ham("lunch", "See you at noon."))
    data = "354 End data with <CR><LF>.<CR><LF>"
    assert replies[-9:-2] == ["250 2.1.0 Ok", "250 2.1.5 Ok", data,
                              "550 5.7.1 Blocked by SpamAssassin",
                              "250 2.1.0 Ok", "250 2.1.5 Ok", data]
    fields = headers(queued(instance, replies[-2]))
    assert fields["x-spam-status"][0].startswith("No, score=0.0 required=5.0 tests=none")
    assert len(list((instance.queue / "incoming").iterdir())) == 1
    line = next(l for l in instance.log().splitlines() if "milter-reject:" in l)
    assert "milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: " \
        "5.7.1 Blocked by SpamAssassin; from=<alice@example.org>" in line
    # the smtpd service is not filtered by non_smtpd_milters
    reply = send(instance.port, (DATA / "gtube.eml").read_bytes())
    assert "x-spam-status" not in headers(queued(instance, reply))


@needs_spamass
def test_spamass_milter_tags_spam_and_passes_ham(instance, spamass):
    spamass_instance(instance, spamass)
    spam = queued(instance, send(instance.port, ham("cheap offer", "Buy now, pfx-spam-probe.")))
    fields = headers(spam)
    assert fields["x-spam-flag"] == ["YES"]
    assert fields["x-spam-status"][0].startswith("Yes, score=8.0 required=5.0 tests=PFX_PROBE")
    assert fields["subject"] == ["*****SPAM***** cheap offer"]
    # the body is SpamAssassin's report with the original attached (SMFIR_REPLBODY)
    assert fields["content-type"][0].startswith("multipart/mixed; boundary=")
    body = spam.split("\n\n", 1)[1]
    assert "has identified this incoming email as possible spam." in body
    assert "Content-Type: message/rfc822; x-spam-type=original" in body
    assert "Subject: cheap offer" in body and "Buy now, pfx-spam-probe." in body

    fine = queued(instance, send(instance.port, ham("lunch", "See you at noon.")))
    fields = headers(fine)
    assert fields["x-spam-status"][0].startswith("No, score=0.0 required=5.0 tests=none")
    assert "x-spam-flag" not in fields
    assert fields["subject"] == ["lunch"]
    assert fine.replace("\r\n", "\n").split("\n\n", 1)[1] == "See you at noon.\n"
