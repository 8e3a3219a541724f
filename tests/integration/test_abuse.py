"""Connection abuse against one running instance (smtpd as shipped: chrooted, the default
process limit of 100, STARTTLS offered; smtpd_timeout 1s so that idle clients go quickly).

* 1,000 connections opened at once and held idle: 100 workers greet 100 of them, the rest
  wait in the listen queue and are greeted as the first ones time out; every one gets
  `220`, then `421 4.4.2 ... Error: timeout exceeded`, then the end; as Postfix's, the
  master does not warn about the process limit of a service that only loopback reaches.
* A slow writer (a byte every half smtpd_timeout, in one command) holds a worker for
  smtpd_timeout, no more, while other clients are served.
* Clients that vanish mid-DATA (FIN or RST) or mid-TLS-handshake leave no queue file and
  no dead worker; the log says where they were lost.
* Pipelined floods (10,000 NOOPs, RCPTs or unknown commands in one write) get a bounded
  number of replies: the junk-command and error limits end them with `421 4.7.0 ...
  Error: too many errors`, as Postfix does.
* Memory stays bounded: the master's and the workers' RSS grow by less than 20 MB over all
  of the above; and after each abuse the next legitimate client is served in time.
"""

import os
import resource
import selectors
import shutil
import smtplib
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import trustme

from pfxinst import Instance, free_port, wait_for

TIMEOUT = 1                     # smtpd_timeout, seconds
PROMPT = 3                      # the next legitimate client is greeted within, seconds
MAXPROC = 100                   # default_process_limit
MB = 1 << 20


@pytest.fixture(scope="module")
def mta():
    root = Path(tempfile.mkdtemp(prefix="pfx-abuse-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root)
    inst.port = free_port()
    pem = root / "server.pem"
    trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    inst.main.update({"mydestination": "$myhostname, localhost",
                      "smtpd_timeout": f"{TIMEOUT}s", "smtpd_tls_cert_file": str(pem),
                      "smtpd_tls_security_level": "may", "smtpd_error_sleep_time": "0s"})
    inst.master_lines = [f"127.0.0.1:{inst.port} inet n - y - - smtpd",
                         "tlsmgr unix - - y 1000? 1 tlsmgr"]
    inst.start()
    served(inst)                               # one worker exists: the baseline is warm
    inst.baseline = memory(inst)
    yield inst
    inst.cleanup()
    log = inst.log()
    if "Traceback" not in log:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"instance kept for inspection: {root}")


def memory(inst) -> dict:
    """RSS of the master and the largest worker, in bytes."""
    master = psutil.Process(inst.master_pid()).memory_info().rss
    workers = []
    for _ in range(10):
        try:
            workers = [p.memory_info().rss for p in inst.workers()]
            break
        except psutil.NoSuchProcess:
            time.sleep(0.05)
    return {"master": master, "worker": max(workers, default=0)}


def served(inst, within: float = TIMEOUT + 3) -> float:
    """A legitimate client gets its greeting and a whole transaction; seconds to greeting."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=within) as s:
        greeted = time.monotonic() - started
        s.ehlo("legit.example")
        s.sendmail("s@example.org", ["user@localhost"], b"Subject: legit\r\n\r\nok\r\n")
    return greeted


def queue_files(inst) -> list[str]:
    return sorted(os.listdir(inst.queue / "incoming"))


def log_since(inst, mark: int) -> str:
    return inst.log()[mark:]


def assert_clean(log: str) -> None:
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "exit status" not in log and "killed by signal" not in log


# --- a thousand idle connections ----------------------------------------------------------

def test_a_thousand_idle_connections(mta):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    mark = len(mta.log())
    sel = selectors.DefaultSelector()
    socks, data, first_byte, ended = [], {}, {}, {}
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", mta.port), timeout=30)
            s.setblocking(False)
            socks.append(s)
            data[s] = b""
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + 1000 / MAXPROC * (TIMEOUT + 2) + 30
        while len(ended) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                try:
                    chunk = s.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                now = time.monotonic() - t0
                if chunk:
                    first_byte.setdefault(s, now)
                    data[s] += chunk
                else:
                    ended[s] = now
                    sel.unregister(s)
    finally:
        sel.close()
        for s in socks:
            s.close()
    assert len(ended) == 1000, f"{len(ended)} of 1000 sessions ended"
    replies = [data[s].decode().splitlines() for s in socks]
    assert all(r == ["220 mail.test.example ESMTP postfix-py",
                     "421 4.4.2 mail.test.example Error: timeout exceeded"] for r in replies), \
        [r for r in replies if len(r) != 2][:3]
    # At most MAXPROC are greeted before the first of them time out; the rest wait.
    early = sum(1 for t in first_byte.values() if t < TIMEOUT * 0.9)
    assert 0 < early <= MAXPROC, early
    assert max(first_byte.values()) >= TIMEOUT * (1000 // MAXPROC - 2)
    log = log_since(mta, mark)
    wait_for(lambda: log_since(mta, mark).count("timeout after CONNECT") == 1000, 20,
             what="1000 timeout lines")
    # Postfix's master warns at the process limit only for services that remote clients
    # reach: this one listens on loopback alone (master_avail_listen(), master_ent.c).
    assert "has reached its process limit" not in log
    assert served(mta) < PROMPT
    assert_clean(mta.log())


# --- slow writers ------------------------------------------------------------------------------

def test_a_slow_writer_holds_a_worker_for_smtpd_timeout_only(mta):
    mark = len(mta.log())
    with socket.create_connection(("127.0.0.1", mta.port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        started = time.monotonic()
        got = b""
        for byte in b"EHLO slow.example\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            # Other clients are served meanwhile.
            if byte == ord("H"):
                assert served(mta) < 2
            s.settimeout(TIMEOUT / 2)     # a byte twice per smtpd_timeout
            try:
                got += s.recv(4096)
            except socket.timeout:
                pass
            s.settimeout(30)
            if got:
                break
        got += f.read()
        elapsed = time.monotonic() - started
    assert got == b"421 4.4.2 mail.test.example Error: timeout exceeded\r\n"
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 2
    wait_for(lambda: "timeout after CONNECT from localhost[127.0.0.1]" in log_since(mta, mark),
             what="the timeout line")
    assert_clean(mta.log())


# --- clients that vanish ---------------------------------------------------------------------

def start_data(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO gone.example\r\nMAIL FROM:<s@example.org>\r\n"
              b"RCPT TO:<user@localhost>\r\nDATA\r\n")
    while not f.readline().startswith(b"354"):
        pass
    s.sendall(b"Subject: cut\r\n\r\n" + b"partial line " * 5000)
    return s


def test_clients_that_vanish(mta):
    before = queue_files(mta)
    mark = len(mta.log())
    start_data(mta.port).close()                                   # FIN mid-DATA
    s = start_data(mta.port)                                       # RST mid-DATA
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # Mid-handshake: STARTTLS, then half a ClientHello, then gone.
    s = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO gone.example\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    s.sendall(b"STARTTLS\r\n")
    assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    hello = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(*hello, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    record = hello[1].read()
    s.sendall(record[:len(record) // 2])
    s.close()
    # Mid-handshake, the other way: the client hello, then silence until smtpd_timeout.
    s = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"STARTTLS\r\n")
    f.readline()
    s.sendall(record[:10])
    time.sleep(0.2)
    s.close()

    wait_for(lambda: log_since(mta, mark).count("lost connection after DATA (") >= 2,
             what="the lost-connection lines")
    wait_for(lambda: log_since(mta, mark).count("SSL_accept error from localhost[127.0.0.1]")
             >= 2, what="the TLS lines")
    assert queue_files(mta) == before                             # nothing half-written
    assert served(mta) < PROMPT
    assert_clean(mta.log())


# --- pipelined floods ------------------------------------------------------------------------

def flood(port: int, payload: bytes) -> list[bytes]:
    """Send payload in one write while reading; the replies until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")

        def write():
            try:
                s.sendall(payload)
            except OSError:
                pass                       # hung up on us: that is the point
        t = threading.Thread(target=write)
        t.start()
        lines = []
        try:
            while line := f.readline():
                lines.append(line)
        except ConnectionResetError:
            pass
        t.join(30)
    return lines


@pytest.mark.parametrize("what", ["NOOP", "RCPT", "BOGUS"])
def test_pipelined_floods_are_cut_short(mta, what):
    mark = len(mta.log())
    if what == "NOOP":
        payload = b"NOOP\r\n" * 10000
    elif what == "RCPT":
        payload = b"EHLO f\r\nMAIL FROM:<s@example.org>\r\n" + \
            b"".join(b"RCPT TO:<u%d@localhost>\r\n" % i for i in range(10000))
    else:
        payload = b"BOGUS command\r\n" * 10000
    started = time.monotonic()
    lines = flood(mta.port, payload)
    assert time.monotonic() - started < 20
    assert lines[-1] == b"421 4.7.0 mail.test.example Error: too many errors\r\n", lines[-3:]
    if what == "NOOP":
        # 100 junk commands are free; 20 more count as errors: the hard limit.
        assert lines[:-1] == [b"250 2.0.0 Ok\r\n"] * 120
    elif what == "RCPT":
        # the EHLO reply (as many lines as there are extensions), then at most this many
        replies = [line for line in lines if not line.startswith(b"250-")]
        assert len(replies) <= 1000 + 1000 + 20 + 10
        assert lines.count(b"250 2.1.5 Ok\r\n") == 1000          # smtpd_recipient_limit
        # smtpd_recipient_overshoot_limit (1000) replies are free, then 20 errors
        assert lines.count(b"452 4.5.3 Error: too many recipients\r\n") == 1000 + 20
    else:
        assert lines[:-1] == [b"500 5.5.2 Error: command not recognized\r\n"] * 20
    wait_for(lambda: "too many errors after " in log_since(mta, mark), what="the log line")
    assert not [n for n in queue_files(mta) if n.startswith(".")]
    assert served(mta) < PROMPT
    assert_clean(mta.log())


# --- memory ---------------------------------------------------------------------------------

def test_memory_stays_bounded(mta):
    """Run last in this module: all the abuse above is behind us."""
    served(mta)
    now = memory(mta)
    base = mta.baseline
    assert now["master"] - base["master"] < 20 * MB, (base, now)
    assert now["worker"] - base["worker"] < 20 * MB, (base, now)
    print(f"RSS before {base}, after {now}")
    workers = mta.workers()
    assert 1 <= len(workers) <= MAXPROC + 1                       # smtpd and tlsmgr
