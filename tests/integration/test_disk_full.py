"""A queue on a file system that fills up, and a data_directory that is full or read-only.

The queue lives on a 4 MB tmpfs mounted for the test (root only); a filler file takes the
space away and gives it back. What an administrator checks:

* below queue_minfree, MAIL gets `452 4.3.1 Insufficient system storage` and the log says
  how much space is left; a MAIL ... SIZE= that would not fit gets the same;
* when a write fails with ENOSPC, the end of DATA gets `452 4.3.1 Insufficient system
  storage`, the session goes on, and no file is left behind (not even a dot-file);
* mail accepted before the disk filled waits in the queue, and once space returns and the
  queue is flushed it is delivered, once each, to a counting sink;
* tlsmgr with its data_directory full or read-only warns and keeps serving (no SIGBUS from
  a memory-mapped LMDB lock file on a full file system), and mail flows over STARTTLS.
"""

import json
import os
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from helpers import TLSMGR
from pfxinst import SmtpClient, free_port, wait_for
from sink import Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: root only")

INSUFFICIENT = "452 4.3.1 Insufficient system storage"


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", str(path)],
                   check=True, timeout=30)


def unmount(path: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True,
                          timeout=30).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system at path; returns the filler file."""
    filler = path / "filler"
    with open(filler, "ab") as f:
        want = free_bytes(path) - leave
        if want > 0:
            os.posix_fallocate(f.fileno(), f.seek(0, 2), want)
    return filler


@pytest.fixture
def small_queue(instance):
    """instance.queue on a 4 MB tmpfs, unmounted after the instance has stopped."""
    mount_tmpfs(instance.queue, "4m")
    yield instance
    instance.cleanup()
    unmount(instance.queue)


def stray_files(queue: Path) -> list[str]:
    """Files in the queue directories that hold messages, dot-files included."""
    out = []
    for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
        d = queue / sub
        if d.exists():
            out += [f"{sub}/{n}" for n in os.listdir(d)]
    return sorted(out)


def message(n: int, size: int = 0) -> bytes:
    body = (b"x" * 78 + b"\r\n") * (size // 80 + 1) if size else b"small\r\n"
    return f"Message-ID: <full-{n}@client.example>\r\nSubject: {n}\r\n\r\n".encode() + body


def send(port: int, n: int, size: int = 0) -> str:
    """Submit message n; the final reply to DATA."""
    c = SmtpClient(port, timeout=20)
    try:
        c.reply()
        c.cmd("EHLO client.example")
        for line, want in (("MAIL FROM:<s@example.org>", "250"),
                           ("RCPT TO:<user@remote.example>", "250"), ("DATA", "354")):
            got = c.cmd(line)
            if not got.startswith(want):
                return got
        c.sock.sendall(message(n, size) + b".\r\n")
        final = c.reply()
        assert c.cmd("NOOP") == "250 2.0.0 Ok"          # the session goes on
        c.cmd("QUIT")
        return final
    finally:
        c.close()


def test_queue_minfree_and_a_full_disk_during_data(small_queue):
    mta = small_queue
    mta.port = free_port()
    mta.main.update({"mydestination": "localhost", "smtpd_error_sleep_time": "0s",
                     "queue_minfree": "1000000", "message_size_limit": "2000000"})
    mta.master_lines = [f"127.0.0.1:{mta.port} inet n - y - - smtpd"]
    mta.start()
    assert send(mta.port, 1).startswith("250 2.0.0 Ok: queued as ")
    filler = fill(mta.queue, 800000)                       # below queue_minfree

    c = SmtpClient(mta.port, timeout=20)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<s@example.org>") == INSUFFICIENT
    assert c.cmd("RCPT TO:<user@remote.example>") == "503 5.5.1 Error: need MAIL command"
    c.close()
    wait_for(lambda: "warning: not enough free space in mail queue: " in mta.log(),
             what="the queue_minfree warning")
    assert "bytes < 1000000 bytes" in mta.log()

    # Room above queue_minfree, but not for 1.5 x a SIZE of 1.5 MB.
    os.truncate(filler, os.path.getsize(filler) - 700000)
    c = SmtpClient(mta.port, timeout=20)
    c.reply()
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<s@example.org> SIZE=1500000") == INSUFFICIENT
    assert c.cmd("MAIL FROM:<s@example.org> SIZE=1000") == "250 2.1.0 Ok"
    c.close()
    assert stray_files(mta.queue) == [f"incoming/{n}" for n in
                                      sorted(os.listdir(mta.queue / "incoming"))]
    assert len(stray_files(mta.queue)) == 1                # message 1, nothing else
    log = mta.log()
    assert "Traceback" not in log and "exit status" not in log


def test_full_disk_refuses_then_accepted_mail_is_delivered(small_queue):
    mta = small_queue
    sink_port = free_port()                 # nothing listens there yet: mail waits
    mta.port = free_port()
    mta.main.update({
        "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
        "relayhost": f"[127.0.0.1]:{sink_port}", "smtp_connect_timeout": "2s",
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"})
    mta.master_lines = [f"127.0.0.1:{mta.port} inet n - y - - smtpd",
                        "qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
    mta.start()
    qids = []
    for n in (1, 2, 3):
        reply = send(mta.port, n)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        qids.append(reply.rsplit(" ", 1)[-1])
    wait_for(lambda: len(os.listdir(mta.queue / "deferred")) == 3, 20,
             what="the three messages to wait in deferred/")

    filler = fill(mta.queue, 100000)
    # A message larger than what is left: the write fails, the file goes.
    assert send(mta.port, 4, size=1000000) == INSUFFICIENT
    wait_for(lambda: "warning: queue file write error: No space left on device" in mta.log(),
             what="the write error")
    # Nothing left at all: even a small message cannot be committed.
    fill(mta.queue, 0)
    assert send(mta.port, 5) == INSUFFICIENT

    def deferrals():
        lines = [line for line in mta.log().splitlines() if "status=deferred" in line]
        return [sum(f" {qid}: to=<" in line for line in lines) for qid in qids]
    before = deferrals()
    # qmgr retries (and fails) with the disk full: wait until each message was tried again.
    wait_for(lambda: all(a > b for a, b in zip(deferrals(), before)), 20,
             what="a retry of each message with the disk full")
    assert sorted(os.listdir(mta.queue / "incoming")) == []
    assert len(os.listdir(mta.queue / "deferred")) == 3
    assert all(not n.startswith(".") for n in stray_files(mta.queue))

    # Space returns, the next hop answers, the queue is flushed: all three arrive, once.
    os.unlink(filler)
    with Sink(sink_port) as sink:
        assert mta.cmd("flush").returncode == 0
        wanted = {f"<full-{n}@client.example>" for n in (1, 2, 3)}
        wait_for(lambda: wanted <= set(sink.ids), 30, what="delivery after the disk filled")
        assert send(mta.port, 6).startswith("250 2.0.0 Ok: queued as ")
        wait_for(lambda: "<full-6@client.example>" in sink.ids, 30, what="new mail")
        wait_for(lambda: stray_files(mta.queue) == [], 10, what="an empty queue")
        assert all(sink.ids[m] == 1 for m in wanted)
        assert "<full-4@client.example>" not in sink.ids     # refused, never delivered
        assert "<full-5@client.example>" not in sink.ids
    log = mta.log()
    assert "status=bounced" not in log
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "exit status" not in log and "killed by signal" not in log
    assert os.listdir(mta.queue / "defer") == [] and os.listdir(mta.queue / "bounce") == []


# --- tlsmgr's data_directory ---------------------------------------------------------------

@pytest.fixture
def small_data(instance):
    data = Path(instance.main["data_directory"])
    mount_tmpfs(data, "1m")
    cert = instance.dir / "server.pem"
    trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
        "smtpd_tls_cert_file": str(cert), "smtpd_tls_security_level": "may",
        "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache",
        "smtpd_tls_session_cache_database": "lmdb:${data_directory}/smtpd_scache"})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd",
                             "tlsmgr unix - - y 1000? 1 tlsmgr"]
    instance.data = data
    yield instance
    instance.cleanup()
    unmount(data)


def starttls_mail(port: int, n: int) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.starttls(context=ctx)
        s.ehlo("client.example")
        s.mail("s@example.org")
        s.rcpt("user@localhost")
        code, text = s.data(message(n))
    return f"{code} {text.decode()}"


def tlsmgr_answers(inst) -> dict:
    """`tlsmgr status --json`: tlsmgr is alive and answers."""
    out = subprocess.run([TLSMGR, "-c", str(inst.dir), "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_tlsmgr_data_directory_full_then_read_only(small_data):
    mta = small_data
    mta.start()                                   # creates data_directory's owner and mode
    assert mta.cmd("stop").returncode == 0
    filler = fill(mta.data, 0)

    # Full: no room for the caches or the exchange file. tlsmgr warns and serves seeds.
    mta.start()
    assert starttls_mail(mta.port, 1).startswith("250 2.0.0 Ok: queued as ")
    report = tlsmgr_answers(mta)
    assert report["caches"]["smtp"]["enabled"] is False
    wait_for(lambda: "cannot update PRNG exchange file" in mta.log(), what="the exchange warning")
    log = mta.log()
    assert "No space left on device" in log
    assert "cannot open TLS session cache" in log and "-- cache disabled" in log
    assert "killed by signal" not in log and "Traceback" not in log
    assert mta.cmd("stop").returncode == 0

    # Read-only: the same warnings, the same service.
    os.unlink(filler)
    subprocess.run(["mount", "-o", "remount,ro", str(mta.data)], check=True, timeout=30)
    mark = len(mta.log())
    mta.start()
    assert starttls_mail(mta.port, 2).startswith("250 2.0.0 Ok: queued as ")
    assert tlsmgr_answers(mta)["caches"]["smtp"]["enabled"] is False
    wait_for(lambda: "Read-only file system" in mta.log()[mark:], what="the read-only warning")
    log = mta.log()[mark:]
    assert "cannot update PRNG exchange file" in log
    assert "killed by signal" not in log and "Traceback" not in log
    assert "exit status" not in mta.log()
