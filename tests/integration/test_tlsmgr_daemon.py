"""The real tlsmgr daemon over real UNIX sockets: every request, hostile input, many
clients, a client that never reads, generated frames, SIGTERM, ownership and redirects."""

import json
import os
import pwd
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import attr, maincf
from postfix_py.lib.events import EventLoop
from postfix_py.tlsmgr import service

IPC_TIMEOUT = 2     # seconds a client may leave replies unread (main.cf ipc_timeout)


class Daemon:
    """A tlsmgr started with `python -m postfix_py.tlsmgr.service` on a private socket."""

    def __init__(self, base: Path, **settings):
        self.base = base
        (base / "queue" / "private").mkdir(parents=True, exist_ok=True)
        (base / "data").mkdir(exist_ok=True)
        self.socket = str(base / "queue" / "private" / "tlsmgr")
        self.maillog = base / "maillog"
        conf = {"queue_directory": base / "queue", "data_directory": base / "data",
                "mail_owner": "root", "maillog_file": self.maillog,
                "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
                "smtpd_tls_session_cache_database": "hash:${data_directory}/smtpd_scache",
                **settings}
        (base / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self.proc = None

    def start(self, nofile=None):
        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        stderr = open(self.base / "stderr", "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postfix_py.tlsmgr.service", "-c", str(self.base),
                 "--socket", self.socket], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                preexec_fn=limit if nofile else None)
        finally:
            stderr.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self
            if os.path.exists(self.socket):
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(self.socket)
                        return self
                    except OSError:
                        pass
            time.sleep(0.02)
        raise AssertionError("tlsmgr did not start:\n" + self.log())

    def stop(self, sig=signal.SIGTERM):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        text = self.maillog.read_text() if self.maillog.exists() else ""
        err = self.base / "stderr"
        return text + (err.read_text() if err.exists() else "")

    def request(self, attrs, timeout=5):
        with attr.AttrClient(self.socket, timeout) as clnt:
            return clnt.request(attrs)

    def connect(self, timeout=5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.socket)
        return sock


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("tlsmgr"), ipc_timeout=f"{IPC_TIMEOUT}s")
    d.start()
    yield d
    assert d.alive(), "tlsmgr died during the tests:\n" + d.log()
    assert d.stop() == 0


@pytest.fixture
def fresh(tmp_path):
    """A function-scoped daemon factory; every daemon is stopped by pid at the end."""
    daemons = []

    def make(base=None, **settings):
        d = Daemon(base or tmp_path / f"d{len(daemons)}", **settings)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.stop(signal.SIGKILL if d.alive() else signal.SIGTERM)


def frame(*pairs):
    """Encode attributes by hand, repeats allowed, as a hostile client might."""
    body = b"".join(bytes((len(n),)) + n + len(v).to_bytes(4, "big") + v for n, v in pairs)
    return len(body).to_bytes(4, "big") + body


def status_of(reply):
    return reply["status"].decode()


def reason_of(reply):
    return reply.get("reason", b"").decode()


# --- requests -----------------------------------------------------------------------------

def test_seed(daemon):
    reply = daemon.request({"request": "seed"})
    assert status_of(reply) == "0" and len(reply["seed"]) == 32 and "reason" not in reply
    for size in (1, 1024):
        assert len(daemon.request({"request": "seed", "size": size})["seed"]) == size
    assert daemon.request({"request": "seed"})["seed"] != reply["seed"]


@pytest.mark.parametrize("size", [b"0", b"1025", b"abc", b"-1", b"+5", b"", b"12345", b" 5"])
def test_bad_seed_size(daemon, size):
    reply = daemon.request({"request": "seed", "size": size})
    assert status_of(reply) == "2" and "bad size" in reason_of(reply)


def test_update_lookup_delete(daemon):
    key = b"smtp&mx.example&192.0.2.1&25&digest"
    session = os.urandom(1800)
    assert status_of(daemon.request({"request": "lookup", "cache_type": "smtp", "cache_id": key})) == "1"
    assert daemon.request({"request": "update", "cache_type": "smtp", "cache_id": key,
                           "session": session}) == {"status": b"0"}
    reply = daemon.request({"request": "lookup", "cache_type": "smtp", "cache_id": key})
    assert reply == {"status": b"0", "session": session}
    # smtpd's cache is a separate database
    assert status_of(daemon.request({"request": "lookup", "cache_type": "smtpd", "cache_id": key})) == "1"
    assert daemon.request({"request": "delete", "cache_type": "smtp", "cache_id": key}) == {"status": b"0"}
    reply = daemon.request({"request": "delete", "cache_type": "smtp", "cache_id": key})
    assert status_of(reply) == "1" and reason_of(reply) == "not found"


def test_unconfigured_cache_answers_not_found(daemon):
    for req in ({"request": "lookup", "cache_type": "lmtp", "cache_id": "k"},
                {"request": "update", "cache_type": "lmtp", "cache_id": "k", "session": "s"},
                {"request": "delete", "cache_type": "lmtp", "cache_id": "k"}):
        reply = daemon.request(req)
        assert status_of(reply) == "1"
        assert reason_of(reply) == "no lmtp session cache (lmtp_tls_session_cache_database is empty)"


def test_status(daemon):
    reply = daemon.request({"request": "status"})
    assert status_of(reply) == "0"
    report = json.loads(reply["status_json"])
    assert report["pid"] == daemon.proc.pid and report["clients"] >= 1 and report["uptime"] >= 0
    p = report["prng"]
    assert p["source"] == "dev:/dev/urandom" and p["next_reseed"] > p["last_reseed"]
    assert p["exchange_file"].endswith("/data/prng_exch") and p["last_exchange_write"]
    smtp = report["caches"]["smtp"]
    for field in ("database", "file", "entries", "bytes", "map_use", "lookups", "hits", "misses",
                  "updates", "deletes", "expired", "hit_ratio"):
        assert field in smtp
    assert smtp["database"].startswith("btree:") and smtp["file"].endswith("smtp_scache.lmdb")
    assert report["caches"]["lmtp"]["enabled"] is False
    assert report["server_resumption"].startswith("session tickets shared by all smtpd workers")


# --- strict attributes --------------------------------------------------------------------

@pytest.mark.parametrize("raw, reason", [
    (frame((b"request", b"bogus")), 'unknown request "bogus"'),
    (frame((b"size", b"5")), 'missing attribute "request"'),
    (frame((b"request", b"lookup"), (b"cache_type", b"smtp")), 'missing attribute "cache_id"'),
    (frame((b"request", b"seed"), (b"colour", b"blue")), 'unknown attribute "colour"'),
    (frame((b"request", b"status"), (b"size", b"5")), 'unknown attribute "size"'),
    (frame((b"request", b"seed"), (b"size", b"5"), (b"size", b"6")), "repeated attribute 'size'"),
    (frame((b"request", b"lookup"), (b"cache_type", b"imap"), (b"cache_id", b"k")), 'unknown cache_type "imap"'),
    (frame((b"request", b"lookup"), (b"cache_type", b"smtp"), (b"cache_id", b"")), "cache_id of 0 bytes"),
    (frame((b"request", b"lookup"), (b"cache_type", b"smtp"), (b"cache_id", b"k" * 512)), "cache_id of 512 bytes"),
    (frame((b"request", b"update"), (b"cache_type", b"smtp"), (b"cache_id", b"k"), (b"session", b"s" * 65537)),
     "session of 65537 bytes"),
    (b"\x00\x00\x00\x03\x00ab", "too short for an attribute"),
    (b"\x00\x00\x00\x08\x00abcdefg", "bad attribute name length 0"),
])
def test_bad_requests_get_status_2_and_the_connection_stays(daemon, raw, reason):
    with daemon.connect() as sock:
        sock.sendall(raw)
        reply = attr.read_frame(sock, 5)
        assert status_of(reply) == "2" and reason in reason_of(reply)
        attr.write_frame(sock, {"request": "seed"}, 5)        # still in step
        assert status_of(attr.read_frame(sock, 5)) == "0"


@pytest.mark.parametrize("prefix", [b"GARB", b"\x00\x00\x00\x00", (attr.MAX_FRAME + 1).to_bytes(4, "big"),
                                    b"\xff\xff\xff\xff"])
def test_bad_length_prefix_gets_status_2_then_close(daemon, prefix):
    with daemon.connect() as sock:
        sock.sendall(prefix + b"garbage that follows")
        reply = attr.read_frame(sock, 5)
        assert status_of(reply) == "2" and "bad frame length" in reason_of(reply)
        assert sock.recv(100) == b""                           # closed: the stream is lost
    assert daemon.request({"request": "seed"})["status"] == b"0"


def test_truncated_frame_then_close(daemon):
    whole = attr.encode({"request": "update", "cache_type": "smtp", "cache_id": "t", "session": "x" * 5000})
    for cut in (2, 4, 10, len(whole) - 1):
        with daemon.connect() as sock:
            sock.sendall(whole[:cut])
    assert daemon.request({"request": "seed"})["status"] == b"0"
    assert status_of(daemon.request({"request": "lookup", "cache_type": "smtp", "cache_id": "t"})) == "1"


def test_pipelined_frames_are_answered_in_order(daemon):
    with daemon.connect() as sock:
        sock.sendall(b"".join(attr.encode({"request": "seed", "size": n}) for n in range(1, 201)))
        for n in range(1, 201):
            assert len(attr.read_frame(sock, 5)["seed"]) == n


# --- many clients, slow clients -----------------------------------------------------------

def test_client_that_never_reads_replies_is_disconnected(daemon):
    request = attr.encode({"request": "seed", "size": 1024})
    hog = daemon.connect()
    hog.setblocking(False)
    sent = 0
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:         # until the daemon stops reading from it
            try:
                sent += hog.send(request * 64)
            except BlockingIOError:
                _, writable, _ = select.select([], [hog], [], 0.3)
                if not writable:
                    break
        assert sent > 0
        # Meanwhile everybody else is served promptly.
        t0 = time.monotonic()
        for _ in range(20):
            assert daemon.request({"request": "seed"})["status"] == b"0"
        assert time.monotonic() - t0 < 2
        # And after ipc_timeout the hog is gone.
        deadline = time.monotonic() + IPC_TIMEOUT + 6
        while "does not read its replies" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.1)
        hog.setblocking(True)
        hog.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while hog.recv(1 << 20):               # the replies it left, then the reset
                pass
    except ConnectionResetError:
        pass
    finally:
        hog.close()
    assert f"does not read its replies for {IPC_TIMEOUT}s: disconnecting" in daemon.log()


def test_a_thousand_concurrent_clients(daemon):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    socks = []
    try:
        for _ in range(1000):
            socks.append(daemon.connect(timeout=10))
        request = attr.encode({"request": "seed", "size": 16})
        for s in socks:
            s.sendall(request)
        for s in socks:
            assert len(attr.read_frame(s, 10)["seed"]) == 16
        report = json.loads(daemon.request({"request": "status"})["status_json"])
        assert report["clients"] >= 1001
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while json.loads(daemon.request({"request": "status"})["status_json"])["clients"] > 5:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_out_of_descriptors_pauses_accepting_and_recovers(fresh):
    d = fresh().start(nofile=40)
    socks = []
    try:
        for _ in range(60):                      # more than the daemon can accept
            socks.append(d.connect())
        deadline = time.monotonic() + 5
        while "pausing for 1s" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while True:                                  # the queued connections drain, then it answers
        try:
            if d.request({"request": "seed"}, timeout=2)["status"] == b"0":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, d.log()
    assert d.alive()


# --- generated frames never kill it -------------------------------------------------------

NAMES = st.sampled_from([b"request", b"size", b"cache_type", b"cache_id", b"session", b"status", b"x"])
VALUES = st.one_of(st.sampled_from([b"seed", b"lookup", b"update", b"delete", b"status", b"smtp",
                                    b"smtpd", b"lmtp", b"32", b"1024", b"0"]), st.binary(max_size=40))
ATTRS = st.lists(st.tuples(NAMES, VALUES), max_size=5)


@st.composite
def hostile_streams(draw):
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            parts.append(frame(*draw(ATTRS)))                       # well framed, any content
        elif kind == 1:
            parts.append(draw(st.binary(max_size=64)))              # noise
        elif kind == 2:                                             # a lying length prefix
            parts.append(draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") + draw(st.binary(max_size=32)))
        else:
            whole = frame(*draw(ATTRS))
            parts.append(whole[:draw(st.integers(0, len(whole)))])  # cut short
    return b"".join(parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_streams())
def test_generated_frames_never_kill_it(daemon, data):
    with daemon.connect(timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    decoder = attr.FrameDecoder()
    decoder.feed(received)
    for reply in decoder.frames():
        assert isinstance(reply, dict) and reply["status"] in (b"0", b"1", b"2", b"3")
    assert decoder.pending == 0
    assert daemon.alive()


def test_still_alive_and_answering_at_the_end(daemon):
    assert daemon.alive()
    assert daemon.request({"request": "seed"})["status"] == b"0"
    assert "Traceback" not in daemon.log()


# --- life cycle, ownership, configuration -------------------------------------------------

def test_sigterm_writes_the_exchange_file(fresh):
    d = fresh().start()
    exch = d.base / "data" / "prng_exch"
    # An answer proves start-up is over (the socket listens before the file is written).
    assert d.request({"request": "status"})["status"] == b"0"
    at_start = exch.read_bytes()                 # written once at start, against crashes
    assert len(at_start) == 1024
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 0
    at_exit = exch.read_bytes()
    assert len(at_exit) == 1024 and at_exit != at_start
    assert stat.S_IMODE(exch.stat().st_mode) == 0o600
    assert not os.path.exists(d.socket)
    assert [p.name for p in exch.parent.iterdir() if p.name.startswith(".")] == []


def test_caches_start_empty(fresh):
    d = fresh().start()
    assert d.request({"request": "update", "cache_type": "smtp", "cache_id": "k", "session": "s"})["status"] == b"0"
    d.stop()
    d.start()
    assert d.request({"request": "lookup", "cache_type": "smtp", "cache_id": "k"})["status"] == b"1"


def test_files_belong_to_mail_owner_and_foreign_directories_are_redirected(fresh):
    if os.geteuid() != 0:
        pytest.skip("needs root to open files as mail_owner")
    try:
        owner = pwd.getpwnam("postfix")
    except KeyError:
        pytest.skip("no postfix user")
    base = Path(tempfile.mkdtemp(prefix="tlsmgr-owner-"))    # traversable by postfix
    try:
        os.chmod(base, 0o755)
        data = base / "data"
        data.mkdir()
        os.chown(data, owner.pw_uid, owner.pw_gid)
        etc = base / "etc"
        etc.mkdir()                                            # root's: not mail_owner's
        d = fresh(base, mail_owner="postfix",
                  smtp_tls_session_cache_database=f"btree:{etc}/smtp_scache").start()
        assert d.request({"request": "update", "cache_type": "smtp", "cache_id": "k",
                          "session": "s"})["status"] == b"0"
        assert not (etc / "smtp_scache.lmdb").exists()
        assert (data / "smtp_scache.lmdb").stat().st_uid == owner.pw_uid
        assert (data / "smtpd_scache.lmdb").stat().st_uid == owner.pw_uid
        log = d.log()
        assert f"warning: request to update table btree:{etc}/smtp_scache in non-postfix directory {etc}" in log
        assert f"warning: redirecting the request to postfix-owned data_directory {data}" in log
        d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_broken_configuration_is_fatal_with_one_line(fresh):
    d = fresh(tls_random_reseed_period="often").start()
    assert d.proc.wait(timeout=10) == 1
    fatal = [line for line in d.log().splitlines() if "fatal:" in line]
    assert len(fatal) == 1 and "tls_random_reseed_period" in fatal[0]
    assert "Traceback" not in d.log()


def test_bad_cache_database_type_disables_only_that_cache(fresh):
    d = fresh(smtp_tls_session_cache_database="sdbm:/tmp/x").start()
    reply = d.request({"request": "lookup", "cache_type": "smtp", "cache_id": "k"})
    assert status_of(reply) == "1"
    assert 'smtp_tls_session_cache_database: unsupported session cache type "sdbm"' in d.log()
    assert d.request({"request": "update", "cache_type": "smtpd", "cache_id": "k",
                      "session": "s"})["status"] == b"0"


# --- the skeleton's hooks, in process ------------------------------------------------------

def test_hooks_in_process(tmp_path):
    """What lib/server.multi_server will do: pre_init, post_init(loop), on_client, on_exit."""
    (tmp_path / "data").mkdir()
    (tmp_path / "main.cf").write_text(
        f"data_directory = {tmp_path}/data\nqueue_directory = {tmp_path}\nmail_owner = root\n"
        "smtp_tls_session_cache_database = lmdb:${data_directory}/smtp_scache\n")
    mgr = service.Tlsmgr(maincf.load(str(tmp_path)))
    loop = EventLoop()
    mgr.pre_init()
    mgr.post_init(loop)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        mgr.on_client(ours, loop)
        assert mgr.client_count() == 1
        theirs.sendall(attr.encode({"request": "update", "cache_type": "smtp", "cache_id": "k",
                                    "session": "s"}) + attr.encode({"request": "seed", "size": 3}))
        theirs.settimeout(0)
        decoder = attr.FrameDecoder()
        deadline = time.monotonic() + 5
        replies = []
        while len(replies) < 2 and time.monotonic() < deadline:
            loop.run_once(0.05)
            try:
                decoder.feed(theirs.recv(65536))
            except BlockingIOError:
                continue
            replies += list(decoder.frames())
        assert replies[0] == {"status": b"0"} and len(replies[1]["seed"]) == 3
        theirs.close()
        for _ in range(5):
            loop.run_once(0.05)
        assert mgr.client_count() == 0
    finally:
        theirs.close()
        mgr.on_exit()
        loop.close()
    assert (tmp_path / "data" / "prng_exch").stat().st_size == 1024


@pytest.mark.parametrize("status, reason, extra", [
    ("1", "not found", {}),
    ("2", "bad size \"x\"", {}),
    ("3", "cannot store session", {"session": b"\x00" * 70}),
])
def test_replies_decode_strictly(status, reason, extra):
    want = {"status": status.encode(), "reason": reason.encode(), **extra}
    assert attr.decode(service._reply(status, reason, **extra)) == want
    assert attr.decode(service._NOT_FOUND) == {"status": b"1", "reason": b"not found"}
    assert attr.decode(service._OK) == {"status": b"0"}
