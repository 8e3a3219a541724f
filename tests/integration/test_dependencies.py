"""Dependencies that fail under a running mail system: tlsmgr gone or hung, its cache file
damaged while it was down, a lookup table rebuilt (or wrecked) under load, DNS that does
not answer. Mail must keep flowing, or wait in the queue; never bounce, never be lost; and
the log says what happened, once, in Postfix's words.

Two postfix-py instances on loopback: `mta` (smtpd with STARTTLS, qmgr, smtp with the
tlsmgr session cache, tlsmgr) relays everything for peer.test to `peer` (a TLS smtpd whose
accepted mail stays in its incoming/, where the test reads the Message-IDs).
"""

import collections
import glob
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import trustme

from helpers import DEBIAN_POSTMAP
from pfxinst import Instance, SmtpClient, free_port, wait_for
from postfix_py.lib import queue as Q
from postfix_py.lib import tlsmgr_client

MSGID_RE = re.compile(rb"^message-id:\s*(<[^>\r\n]*>)", re.I | re.M)
TLSMGR_WARNING = re.compile(r"postfix-py/(\w+)\[(\d+)\]: warning: problem talking to server "
                            r"private/tlsmgr")
LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("deps-pki")
    os.chmod(d, 0o755)
    server = trustme.CA().issue_cert("localhost", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    return str(d / "server.pem")


@pytest.fixture
def peer(cert):
    """A TLS smtpd for peer.test; accepted mail stays in its incoming/."""
    root = Path(tempfile.mkdtemp(prefix="pfx-peer-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root)
    inst.port = free_port()
    inst.main.update({"myhostname": "peer.test.example", "mydestination": "peer.test",
                      "smtpd_tls_cert_file": cert, "smtpd_tls_security_level": "may",
                      "smtpd_tls_loglevel": "1", "smtpd_error_sleep_time": "0s"})
    inst.master_lines = [f"127.0.0.1:{inst.port} inet n - y - - smtpd"]
    inst.start()
    yield inst
    inst.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def received_ids(inst) -> collections.Counter:
    """Message-IDs of the messages in an instance's incoming/ (the peer has no qmgr)."""
    ids = collections.Counter()
    for path in glob.glob(str(inst.queue / "incoming" / "*")):
        try:
            m = Q.read(path)
            head = b"".join(m.content(path))
        except (OSError, Q.QueueFileError):
            continue
        found = MSGID_RE.search(head)
        ids[found.group(1).decode() if found else None] += 1
    return ids


MASTER_CF = ["qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
TLSMGR_LINE = "tlsmgr unix - - y 1000? 1 tlsmgr"


@pytest.fixture
def mta(instance, peer, cert):
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost", "relayhost": f"[127.0.0.1]:{peer.port}",
        "smtpd_tls_cert_file": cert, "smtpd_tls_security_level": "may",
        "smtpd_error_sleep_time": "0s",
        "smtp_tls_security_level": "may", "smtp_tls_loglevel": "2",
        "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache",
        "smtpd_tls_session_cache_database": "lmdb:${data_directory}/smtpd_scache",
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
    })
    instance.smtpd_line = f"127.0.0.1:{instance.port} inet n - y - - smtpd"
    instance.master_lines = [instance.smtpd_line, *MASTER_CF, TLSMGR_LINE]
    instance.peer = peer
    return instance


def send_tls(port: int, n: int, timeout: float = 30) -> str:
    """Submit message n over STARTTLS; returns its Message-ID."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    msgid = f"<dep-{n}-{time.monotonic_ns()}@client.example>"
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
        s.ehlo("client.example")
        assert s.starttls(context=ctx)[0] == 220
        s.ehlo("client.example")
        s.sendmail("sender@example.org", ["user@peer.test"],
                   f"Message-ID: {msgid}\r\nSubject: dependency {n}\r\n\r\nbody\r\n")
    return msgid


def delivered(mta, msgids, timeout=40):
    wait_for(lambda: all(received_ids(mta.peer)[m] for m in msgids), timeout,
             what=f"delivery of {msgids}")
    counts = received_ids(mta.peer)
    assert all(counts[m] == 1 for m in msgids), counts


def tlsmgr_pids(inst) -> list[int]:
    for _ in range(10):          # a worker may end while we look at it
        try:
            return [p.pid for p in inst.workers()
                    if "postfix-py/tlsmgr" in " ".join(p.cmdline())]
        except psutil.NoSuchProcess:
            time.sleep(0.05)
    raise AssertionError("the process list keeps changing")


def tlsmgr_status(inst) -> dict:
    clnt = tlsmgr_client.TlsmgrClient(str(inst.queue / "private" / "tlsmgr"), timeout=5)
    try:
        report = clnt.status()
    finally:
        clnt.close()
    assert report is not None, "tlsmgr does not answer"
    return report


def warnings_per_process(log: str) -> collections.Counter:
    return collections.Counter((m.group(1), m.group(2)) for m in TLSMGR_WARNING.finditer(log))


def assert_clean(log: str, killed: bool = False) -> None:
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "status=bounced" not in log and "exit status" not in log
    assert killed or "killed by signal" not in log


# --- tlsmgr ----------------------------------------------------------------------------------

def test_mail_flows_while_tlsmgr_is_gone_and_caching_resumes(mta):
    mta.start()
    first = send_tls(mta.port, 1)
    delivered(mta, [first])
    wait_for(lambda: "save session" in mta.log(), what="a session saved in tlsmgr's cache")
    assert tlsmgr_status(mta)["caches"]["smtp"]["updates"] >= 1
    old = tlsmgr_pids(mta)
    assert len(old) == 1

    # tlsmgr goes and cannot come back: removed from master.cf, reloaded, killed.
    mta.master_lines = [mta.smtpd_line, *MASTER_CF]
    mta.reload()
    try:
        os.kill(old[0], signal.SIGKILL)        # if it has not retired already
    except ProcessLookupError:
        pass
    wait_for(lambda: not tlsmgr_pids(mta), what="tlsmgr to be gone")
    mark = len(mta.log())
    ids = [send_tls(mta.port, n) for n in range(2, 6)]
    delivered(mta, ids)
    outage = mta.log()[mark:]
    assert not tlsmgr_pids(mta)
    per_process = warnings_per_process(outage)
    assert per_process, "nobody said that tlsmgr is missing"
    assert set(per_process.values()) == {1}, per_process          # once per process
    assert {prog for prog, _ in per_process} >= {"smtp", "smtpd"}
    assert "reloaded session" not in outage                         # nowhere to get one
    peer_log = mta.peer.log()
    assert peer_log.count("TLS connection established from") >= 5    # TLS all along
    assert mta.log().count("TLS connection established to") >= 5

    # tlsmgr comes back: sessions are cached and reused again.
    mta.master_lines = [mta.smtpd_line, *MASTER_CF, TLSMGR_LINE]
    mta.reload()
    mark = len(mta.log())
    back = [send_tls(mta.port, 6), send_tls(mta.port, 7)]
    delivered(mta, back[:1])
    delivered(mta, back)
    wait_for(lambda: "save session" in mta.log()[mark:], what="caching to resume")
    report = tlsmgr_status(mta)["caches"]["smtp"]
    assert report["updates"] >= 1 and report["lookups"] >= 2
    assert not warnings_per_process(mta.log()[mark:])
    assert_clean(mta.log(), killed=True)                            # by us, above


def test_a_hung_tlsmgr_costs_time_not_mail(mta):
    """SIGSTOP: connections to tlsmgr hang until the client's timeout (2 s, one retry)."""
    mta.master_lines = [mta.smtpd_line, "qmgr unix n - n 300 1 qmgr",
                        "smtp unix - - y - 1 smtp", TLSMGR_LINE]     # one smtp process
    mta.start()
    first = send_tls(mta.port, 1)
    delivered(mta, [first])
    (pid,) = tlsmgr_pids(mta)
    before = tlsmgr_status(mta)["caches"]["smtp"]
    os.kill(pid, signal.SIGSTOP)
    try:
        mark = len(mta.log())
        started = time.monotonic()
        ids = [send_tls(mta.port, n) for n in (2, 3)]
        delivered(mta, ids)
        assert time.monotonic() - started < 30
        outage = mta.log()[mark:]
        per_process = warnings_per_process(outage)
        assert per_process and set(per_process.values()) == {1}, per_process
        assert "timeout" in outage
    finally:
        os.kill(pid, signal.SIGCONT)
    # The clients back off for 10 s, then find tlsmgr again by themselves.
    mark = len(mta.log())
    time.sleep(10.5)
    last = send_tls(mta.port, 4)
    delivered(mta, [last])
    wait_for(lambda: "server private/tlsmgr answers again" in mta.log()[mark:],
             what="the client to find tlsmgr again")
    after = mta.log()[mark:]
    assert "reloaded session" in after and "Reusing old session" in after
    now = tlsmgr_status(mta)["caches"]["smtp"]
    assert now["hits"] > before["hits"] and now["lookups"] > before["lookups"]
    assert tlsmgr_pids(mta) == [pid]                                 # never restarted
    assert not warnings_per_process(after)
    assert_clean(mta.log())


def test_damaged_cache_files_are_replaced_at_start(mta):
    mta.start()
    send_tls(mta.port, 1)
    wait_for(lambda: "save session" in mta.log(), what="the smtp cache to be written")
    assert mta.cmd("stop").returncode == 0
    data = Path(mta.main["data_directory"])
    smtp_cache, smtpd_cache = data / "smtp_scache.lmdb", data / "smtpd_scache.lmdb"
    size = smtp_cache.stat().st_size
    with open(smtp_cache, "r+b") as f:       # truncated in the middle of a page
        f.truncate(size // 2 + 100)
    smtpd_cache.write_bytes(b"\x00garbage, not LMDB\xff" * 5000)
    (data / "smtp_scache.lmdb-lock").write_bytes(b"junk")
    mta.start()
    report = tlsmgr_status(mta)["caches"]
    for kind, path in (("smtp", smtp_cache), ("smtpd", smtpd_cache)):
        assert report[kind]["enabled"] and report[kind]["entries"] == 0, report[kind]
        assert path.read_bytes()[16:20] == LMDB_MAGIC, path        # a fresh LMDB file
    assert not (data / "smtp_scache.lmdb-lock").exists()
    ids = [send_tls(mta.port, n) for n in (2, 3)]
    delivered(mta, ids)
    wait_for(lambda: tlsmgr_status(mta)["caches"]["smtp"]["updates"] >= 1,
             what="the recreated cache to be used")
    log = mta.log()
    assert "cache disabled" not in log and "cannot open TLS session cache" not in log
    assert_clean(log)


# --- lookup tables ---------------------------------------------------------------------------

def table_source(version: int, filler: int = 3000) -> str:
    lines = ["blocked@localhost 550 5.7.1 Blocked by table",
             "ok@localhost OK",
             f"version@localhost 550 5.7.1 version {version}"]
    lines += [f"filler{i}@example.com REJECT filler {version}" for i in range(filler)]
    return "\n".join(lines) + "\n"


def test_tables_rebuilt_with_postmap_under_load(instance):
    """Every lookup during 20 rebuilds answers from a whole table, old or new."""
    access, clients = instance.dir / "access", instance.dir / "clients"
    access.write_text(table_source(0))
    clients.write_text("127.0.0.2 REJECT\n127.0.0.1 DUNNO\n")
    instance.write()
    for table in (access, clients):
        out = instance.cmd("postmap", f"hash:{table}")
        assert out.returncode == 0, out.stderr
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
        "smtpd_client_restrictions": f"check_client_access hash:{clients}",
        "smtpd_recipient_restrictions":
            f"check_recipient_access hash:{access}, reject_unauth_destination"})
    # chroot n: a chrooted smtpd cannot see the rebuilt file, and keeps the table it opened
    # (RELIABILITY.md); here every worker must switch from file to file under load.
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - n - 8 smtpd"]
    instance.start()
    stop = threading.Event()
    bad: list = []
    checks = collections.Counter()

    def client(k: int):
        while not stop.is_set():
            try:
                c = SmtpClient(instance.port, timeout=20)
                try:
                    c.reply()
                    c.send(b"HELO c\r\nMAIL FROM:<s@example.org>\r\n")
                    c.reply(), c.reply()
                    for _ in range(20):
                        c.send(b"RCPT TO:<ok@localhost>\r\nRCPT TO:<blocked@localhost>\r\n")
                        got = (c.reply(), c.reply())
                        checks[k] += 1
                        if got != ("250 2.1.5 Ok", "550 5.7.1 <blocked@localhost>: "
                                   "Recipient address rejected: Blocked by table"):
                            bad.append(got)
                    c.cmd("QUIT")
                finally:
                    c.close()
            except OSError as exc:
                bad.append(repr(exc))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        for version in range(1, 21):
            access.write_text(table_source(version))
            out = instance.cmd("postmap", f"hash:{access}")
            assert out.returncode == 0, out.stderr
            clients.write_text(f"127.0.0.2 REJECT\n127.0.0.1 DUNNO\n# {version}\n")
            out = instance.cmd("postmap", f"hash:{clients}")
            assert out.returncode == 0, out.stderr
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert bad == []
    assert sum(checks.values()) >= 200, checks
    c = SmtpClient(instance.port, timeout=20)
    c.reply()
    c.send(b"HELO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<version@localhost>\r\n")
    assert [c.reply() for _ in range(3)][-1] == \
        "550 5.7.1 <version@localhost>: Recipient address rejected: version 20"
    c.close()
    log = instance.log()
    assert "warning" not in log, [l for l in log.splitlines() if "warning" in l][:5]
    assert "Temporary lookup failure" not in log
    assert_clean(log)


def test_a_wrecked_table_defers_instead_of_crashing(instance):
    """A .db that is not an LMDB file (made by Postfix's own postmap): 451, as Postfix."""
    access = instance.dir / "access"
    access.write_text("blocked@localhost REJECT\n")
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
        "smtpd_recipient_restrictions":
            f"check_recipient_access hash:{access}, reject_unauth_destination"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - n - - smtpd"]
    instance.write()
    assert instance.cmd("postmap", f"hash:{access}").returncode == 0
    instance.start()
    c = SmtpClient(instance.port, timeout=20)
    try:
        c.reply()
        c.send(b"HELO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<blocked@localhost>\r\n")
        assert [c.reply() for _ in range(3)][-1].startswith("5")
        if DEBIAN_POSTMAP:     # the habit of a Postfix administrator: a Berkeley DB file
            out = subprocess.run([DEBIAN_POSTMAP, f"hash:{access}"], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
        else:
            wrecked = instance.dir / "access.db.new"
            wrecked.write_bytes(b"\x00\x00\x00\x00" * 3 + b"\x61\x15\x06\x00" + bytes(4080))
            os.rename(wrecked, instance.dir / "access.db")
        c.send(b"RCPT TO:<blocked@localhost>\r\nRCPT TO:<other@localhost>\r\nQUIT\r\n")
        assert c.reply() == "451 4.3.0 <blocked@localhost>: Temporary lookup failure"
        assert c.reply() == "451 4.3.0 <other@localhost>: Temporary lookup failure"
        assert c.reply() == "221 2.0.0 Bye"
    finally:
        c.close()
    log = instance.log()
    # Debian's postmap rewrites the file in place (the worker's map reads "not an LMDB
    # file"); a new file under the name is refused at open ("Berkeley DB format ...").
    assert re.search(rf"warning: table lookup problem: (read|open) database {access}\.db: "
                     r".*(not an LMDB file|Berkeley DB format)", log), log
    assert "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 451 4.3.0 <blocked@localhost>: " \
           "Temporary lookup failure" in log
    # postmap repairs it; the same worker answers from the rebuilt table.
    assert instance.cmd("postmap", f"hash:{access}").returncode == 0
    c = SmtpClient(instance.port, timeout=20)
    c.reply()
    c.send(b"HELO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<blocked@localhost>\r\n")
    assert [c.reply() for _ in range(3)][-1] == \
        "554 5.7.1 <blocked@localhost>: Recipient address rejected: Access denied"
    c.close()
    assert_clean(instance.log())


# --- DNS -------------------------------------------------------------------------------------

def test_unreachable_dns_defers_and_never_bounces(instance):
    closed = free_port()             # nothing listens there: every query is refused or lost
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
        "smtp_dns_nameservers": f"127.0.0.1:{closed}", "smtp_dns_timeout": "1s",
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd", *MASTER_CF]
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.port, timeout=20) as s:
        s.sendmail("sender@example.org", ["user@remote.example"],
                   b"Subject: dns\r\n\r\nwaits for DNS\r\n")
    wait_for(lambda: instance.log().count("status=deferred") >= 2, 30,
             what="two deferred attempts")
    log = instance.log()
    assert re.search(r": to=<user@remote\.example>, relay=none, delay=[\d.]+, delays=\S+, "
                     r"dsn=4\.4\.3, status=deferred \(Host or domain name not found\. Name "
                     r"service error for name=remote\.example type=MX: Host not found, "
                     r"try again\)", log), log
    assert "status=bounced" not in log and "non-delivery notification" not in log
    out = instance.cmd("postqueue", "-p")
    assert "user@remote.example" in out.stdout
    assert "Host or domain name not found" in out.stdout
    deferred = [n for n in os.listdir(instance.queue / "deferred")]
    assert len(deferred) == 1
    assert_clean(log)
