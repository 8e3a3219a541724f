"""tlsmgr's PRNG: HMAC_DRBG against NIST CAVP vectors, entropy sources, reseed timing,
the exchange file and the redirect rule."""

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib.events import EventLoop
from postfix_py.tlsmgr import prng
from postfix_py.tlsmgr.service import Tlsmgr

VECTORS = Path(__file__).parent.parent / "data" / "hmac_drbg_sha256.txt"


def load_vectors():
    """Parse the .rsp-style vector file into dicts of bytes (AdditionalInput is a list)."""
    cases, case = [], None
    for line in VECTORS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        name, _, value = (part.strip() for part in line.partition("="))
        if name == "COUNT":
            case = {"COUNT": value, "AdditionalInput": []}
            cases.append(case)
        elif name == "AdditionalInput":
            case[name].append(bytes.fromhex(value))
        else:
            case[name] = bytes.fromhex(value)
    return cases


CASES = load_vectors()


def test_vector_file_has_a_handful_of_cases():
    assert len(CASES) >= 5
    assert any(c["PersonalizationString"] and c["AdditionalInput"][0] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"pers{len(c['PersonalizationString'])}"
                         f"-add{len(c['AdditionalInput'][0])}-count{c['COUNT']}")
def test_hmac_drbg_nist_cavp(case):
    drbg = prng.HmacDrbg(case["EntropyInput"], case["Nonce"], case["PersonalizationString"])
    drbg.reseed(case["EntropyInputReseed"], case["AdditionalInputReseed"])
    drbg.generate(len(case["ReturnedBits"]), case["AdditionalInput"][0])
    assert drbg.generate(len(case["ReturnedBits"]), case["AdditionalInput"][1]) == case["ReturnedBits"]
    assert drbg.reseed_counter == 3


def test_hmac_drbg_limits():
    with pytest.raises(prng.DrbgError):
        prng.HmacDrbg(b"x" * 31)                # less than the security strength
    drbg = prng.HmacDrbg(b"e" * 32, b"n" * 16)
    with pytest.raises(prng.DrbgError):
        drbg.generate(prng.MAX_REQUEST + 1)
    with pytest.raises(prng.DrbgError):
        drbg.reseed(b"short")
    assert len(drbg.generate(prng.MAX_REQUEST)) == prng.MAX_REQUEST
    drbg.reseed_counter = prng.RESEED_INTERVAL + 1
    with pytest.raises(prng.ReseedRequired):
        drbg.generate(16)
    drbg.reseed(b"f" * 32)
    assert drbg.reseed_counter == 1 and len(drbg.generate(16)) == 16


def test_generate_lengths_and_outputs_differ():
    drbg = prng.HmacDrbg(os.urandom(32), os.urandom(16))
    outputs = {drbg.generate(n) for n in (1, 31, 32, 33, 1024)}
    assert sorted(len(o) for o in outputs) == [1, 31, 32, 33, 1024]


# --- sources -------------------------------------------------------------------------------

def test_dev_source_reads_at_most_255_bytes_a_step():
    src = prng.open_source("dev:/dev/zero")
    try:
        assert src.spec == "dev:/dev/zero"
        assert src.read(1000) == b"\x00" * 255
        assert src.read(10) == b"\x00" * 10
    finally:
        src.close()


def test_dev_source_never_blocks(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = prng.DevSource(str(fifo))
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)    # a writer that writes nothing
    try:
        assert src.read(32) == b""                          # EAGAIN, not a hang
        os.write(writer, b"abc")
        assert src.read(32) == b"abc"
    finally:
        os.close(writer)
        src.close()


def test_file_source_is_read_once(tmp_path):
    path = tmp_path / "random"
    path.write_bytes(bytes(range(256)) * 4)
    src = prng.open_source(str(path))
    assert isinstance(src, prng.FileSource)
    assert src.read(600) == (bytes(range(256)) * 4)[:600]      # more than 255: a plain file
    assert src.read(600) == b""                                # closed after the first read


def test_open_source_failures_warn_and_return_none(tmp_path):
    warnings = []
    assert prng.open_source("", warn=warnings.append) is None
    assert prng.open_source(f"dev:{tmp_path}/missing", warn=warnings.append) is None
    assert prng.open_source(f"egd:{tmp_path}/missing", warn=warnings.append) is None
    assert len(warnings) == 2
    assert warnings[0].startswith(f"cannot open entropy source dev:{tmp_path}/missing")


class EgdServer:
    """A small EGD server: 0x00 level, 0x01 non-blocking read, 0x02 blocking read, 0x04 pid."""

    def __init__(self, path, grant=None, close_after=None):
        self.path = str(path)
        self.grant = grant                  # bytes granted per 0x01 request (None: all asked)
        self.close_after = close_after      # drop the connection after this many commands
        self.asked = []                     # (command, count) seen
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn, n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                while self.close_after is None or len(self.asked) < self.close_after:
                    cmd = self._recv(conn, 1)[0]
                    if cmd == 0x00:
                        self.asked.append((cmd, 0))
                        conn.sendall((4096).to_bytes(4, "big"))
                    elif cmd in (0x01, 0x02):
                        count = self._recv(conn, 1)[0]
                        self.asked.append((cmd, count))
                        granted = count if self.grant is None or cmd == 0x02 else min(count, self.grant)
                        data = bytes((i * 7) & 0xFF for i in range(granted))
                        conn.sendall((bytes((granted,)) if cmd == 0x01 else b"") + data)
                    elif cmd == 0x04:
                        self.asked.append((cmd, 0))
                        pid = str(os.getpid()).encode()
                        conn.sendall(bytes((len(pid),)) + pid)
                    else:
                        return
            except (EOFError, OSError):
                return

    def close(self):
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def egd(tmp_path):
    servers = []

    def make(**kw):
        server = EgdServer(tmp_path / f"egd{len(servers)}", **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_egd_source_uses_nonblocking_read_of_at_most_255(egd):
    server = egd()
    src = prng.open_source(f"egd:{server.path}")
    try:
        assert src.read(32) == bytes((i * 7) & 0xFF for i in range(32))
        assert len(src.read(1000)) == 255
    finally:
        src.close()
    assert server.asked == [(0x01, 32), (0x01, 255)]


def test_egd_source_with_little_entropy(egd):
    server = egd(grant=0)
    src = prng.EgdSource(server.path)
    try:
        assert src.read(32) == b""          # granted 0 bytes: fine, nothing to add
    finally:
        src.close()


def test_failing_egd_source_is_closed_and_the_pool_carries_on(egd):
    server = egd(close_after=1)
    warnings = []
    pool = prng.Pool(prng.EgdSource(server.path), 32, 3600, warn=warnings.append)
    pool.start()                            # first read works
    assert pool.source_bytes == 32
    pool.reseed()                           # the server has gone
    assert pool.source is None and len(warnings) == 1
    assert warnings[0].startswith(f"cannot read from entropy source egd:{server.path}: ")
    assert warnings[0].endswith("-- closing it")
    pool.reseed()                           # no more warnings, still reseeding from the kernel
    assert len(pool.random_bytes(32)) == 32 and pool.reseeds == 2 and len(warnings) == 1


# --- the pool -----------------------------------------------------------------------------

def fixed_urandom(byte):
    return lambda n: bytes((byte,)) * n


def pool_output(urandom_byte, exchange, source=None):
    pool = prng.Pool(source, 32, 3600, wallclock=lambda: 1000.0, urandom=fixed_urandom(urandom_byte))
    pool.start(exchange)
    return pool.generate(32)


def test_exchange_is_extra_input_never_the_sole_state(monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    same = pool_output(1, b"exchange")
    assert pool_output(1, b"exchange") == same          # deterministic with everything fixed
    assert pool_output(1, b"other exchange") != same    # the exchange file counts ...
    assert pool_output(2, b"exchange") != same          # ... and so does the kernel, always


def test_random_bytes_are_counted():
    pool = prng.Pool(None, 32, 3600)
    pool.start()
    assert len(pool.random_bytes(1024)) == 1024
    pool.random_bytes(5)
    stats = pool.stats()
    assert stats["bytes_served"] == 1029 and stats["seed_requests"] == 2 and stats["source"] == ""


def test_reseed_delay_comes_from_injected_rng():
    pool = prng.Pool(None, 32, 3600, rng=lambda: 0.25)
    pool.start()
    assert pool.next_reseed_delay() == 900.0


def test_default_reseed_delays_are_spread_within_the_period():
    pool = prng.Pool(None, 32, 100)
    pool.start()
    delays = [pool.next_reseed_delay() for _ in range(200)]
    assert all(0 <= d < 100 for d in delays)
    assert max(delays) - min(delays) > 50


def test_reseed_timer_with_injected_clock():
    now = [0.0]
    loop = EventLoop(clock=lambda: now[0])
    fractions = iter([0.5, 0.1, 0.9])
    source = prng.open_source("dev:/dev/zero")
    pool = prng.Pool(source, 32, 3600, clock=lambda: now[0], wallclock=lambda: 5000 + now[0],
                     rng=lambda: next(fractions))
    try:
        pool.start()
        pool.arm(loop)
        assert pool.next_reseed == 5000 + 1800
        now[0] = 1799.0
        loop.run_due_timers()
        assert pool.reseeds == 0
        now[0] = 1800.0
        loop.run_due_timers()
        assert pool.reseeds == 1 and pool.last_reseed == 6800
        assert pool.next_reseed == 6800 + 360               # re-armed with the next fraction
        assert pool.source_bytes == 64                     # start and one reseed read the source
        now[0] = 2160.0
        loop.run_due_timers()
        assert pool.reseeds == 2
    finally:
        pool.close()
        loop.close()


# --- exchange file and redirect rule -------------------------------------------------------

def test_exchange_file_written_atomically_with_mode_0600(tmp_path):
    saved = os.umask(0o000)                 # a careless umask must not widen the mode
    exch = prng.ExchangeFile(str(tmp_path / "prng_exch"), wallclock=lambda: 1234.0)
    try:
        assert exch.read() == b""                           # not there yet
        exch.write(b"a" * prng.EXCH_SIZE)
        exch.write(b"b" * prng.EXCH_SIZE)
        assert exch.read() == b"b" * prng.EXCH_SIZE
        assert exch.last_write == 1234.0
    finally:
        exch.close()
        os.umask(saved)
    st = os.stat(tmp_path / "prng_exch")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert os.listdir(tmp_path) == ["prng_exch"]            # no temporary file left


def test_exchange_file_refuses_a_symlink(tmp_path):
    (tmp_path / "elsewhere").write_bytes(b"x" * 10)
    os.symlink(tmp_path / "elsewhere", tmp_path / "prng_exch")
    exch = prng.ExchangeFile(str(tmp_path / "prng_exch"))
    try:
        with pytest.raises(OSError):
            exch.read()
    finally:
        exch.close()


def test_exchange_file_survives_losing_the_path(tmp_path):
    """Written through the directory descriptor, as after a chroot."""
    directory = tmp_path / "data"
    directory.mkdir()
    exch = prng.ExchangeFile(str(directory / "prng_exch"))
    try:
        moved = tmp_path / "moved"
        directory.rename(moved)                             # the old path no longer exists
        exch.write(b"z" * 16)
        assert (moved / "prng_exch").read_bytes() == b"z" * 16
    finally:
        exch.close()


def test_redirect_rule(tmp_path):
    foreign = tmp_path / "etc"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    data = tmp_path / "data"
    warnings = []
    path = prng.redirect_path(str(foreign / "prng_exch"), "postfix", 0, str(data), "file",
                              warn=warnings.append)
    assert path == str(data / "prng_exch")
    assert warnings == [
        f"request to update file {foreign}/prng_exch in non-postfix directory {foreign}",
        f"redirecting the request to postfix-owned data_directory {data}",
    ]
    warnings.clear()
    own = str(tmp_path / "prng_exch")
    assert prng.redirect_path(own, "postfix", os.stat(tmp_path).st_uid, str(data), "file",
                              warn=warnings.append) == own
    missing = str(tmp_path / "nope" / "x")
    assert prng.redirect_path(missing, "postfix", 0, str(data), "file", warn=warnings.append) == missing
    assert warnings == []


# --- the daemon's PRNG life: read at start, written at exit -------------------------------

def make_config(tmp_path, **extra):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    settings = {"data_directory": data, "queue_directory": tmp_path, "mail_owner": "root",
                "tls_random_source": "dev:/dev/urandom", **extra}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return maincf.load(str(tmp_path))


@pytest.fixture
def captured_warnings(capsys):
    """The warnings logged so far (msg writes to standard error in tests), without prefix."""
    msg.init_cli("tlsmgr")

    def lines():
        err = capsys.readouterr().err
        return [line.split("warning: ", 1)[1] for line in err.splitlines() if "warning: " in line]

    yield lines
    msg.init_cli("postfix-py")


@pytest.fixture
def run_tlsmgr_life(monkeypatch):
    """Run pre_init, post_init, on_exit; return the exchange bytes Pool.start received."""
    original = prng.Pool.start

    def life(cfg):
        seen = []

        def spy(self, exchange=b""):
            seen.append(exchange)
            return original(self, exchange)

        monkeypatch.setattr(prng.Pool, "start", spy)
        loop = EventLoop()
        try:
            mgr = Tlsmgr(cfg)
            mgr.pre_init()
            mgr.post_init(loop)
            mgr.on_exit()
        finally:
            loop.close()
        return seen[0]

    return life


def test_exchange_file_written_at_exit_and_read_at_start(tmp_path, captured_warnings, run_tlsmgr_life):
    cfg = make_config(tmp_path)
    exch = tmp_path / "data" / "prng_exch"
    assert run_tlsmgr_life(cfg) == b""                  # first life: no file yet
    written = exch.read_bytes()
    assert len(written) == prng.EXCH_SIZE and stat.S_IMODE(exch.stat().st_mode) == 0o600
    assert run_tlsmgr_life(cfg) == written              # second life reads what the first left
    assert exch.read_bytes() != written                 # and leaves fresh bytes
    assert captured_warnings() == []


def test_exchange_file_in_foreign_directory_is_redirected(tmp_path, captured_warnings, run_tlsmgr_life):
    etc = tmp_path / "etc"
    etc.mkdir()
    os.chown(etc, 65534, 65534)
    cfg = make_config(tmp_path, tls_random_exchange_name=f"{etc}/prng_exch")
    run_tlsmgr_life(cfg)
    assert not (etc / "prng_exch").exists()
    assert (tmp_path / "data" / "prng_exch").stat().st_size == prng.EXCH_SIZE
    assert captured_warnings() == [
        f"request to update file {etc}/prng_exch in non-root directory {etc}",
        f"redirecting the request to root-owned data_directory {tmp_path}/data",
    ]


def test_unusable_source_is_logged_and_tlsmgr_carries_on(tmp_path, captured_warnings, run_tlsmgr_life):
    cfg = make_config(tmp_path, tls_random_source=f"dev:{tmp_path}/no-such-device")
    run_tlsmgr_life(cfg)
    assert captured_warnings() == [f"cannot open entropy source dev:{tmp_path}/no-such-device:"
                                 " No such file or directory"]
    assert (tmp_path / "data" / "prng_exch").exists()
