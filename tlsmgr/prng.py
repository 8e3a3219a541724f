"""tlsmgr's PRNG pool: an HMAC_DRBG, its entropy sources, and the PRNG exchange file.

NAME
    prng - the pseudo-random number generator behind tlsmgr's `seed` requests

DESCRIPTION
    This module holds what Postfix's tls_prng_*.c and the PRNG half of tlsmgr.c do. The pool
    is an HMAC_DRBG (NIST SP 800-90A rev. 1, section 10.1.2) over SHA-256, built on the
    standard library's hmac and hashlib, without prediction resistance. It is instantiated at
    start and reseeded after a pseudo-random time between 0 and tls_random_reseed_period.

    Every instantiation and reseed takes 32 bytes from the kernel (os.urandom, i.e.
    getrandom(2), which needs no file and works inside the chroot jail), plus whatever the
    configured tls_random_source yields. So a source that fails, or lies, never leaves the
    pool predictable; the source adds to it, as it adds to OpenSSL's self-seeded pool in
    Postfix. The exchange file is mixed in at start as personalization string: extra input,
    never the sole state. The DRBG's internal state (Key, V) never leaves the process: the
    exchange file receives generated output.

SOURCES (tls_random_source)
    dev:/path   a device, opened once before the chroot, non-blocking; each seeding event
                reads at most 255 bytes (the seed document's limit), fewer when the device
                has less ready. Postfix does the same.
    egd:/path   a socket speaking the EGD protocol, connected once before the chroot. A
                seeding event sends 0x01 NN ("read entropy nonblocking", NN <= 255 bytes
                requested) and reads one count byte MM and then MM bytes (MM may be 0).
                The other EGD commands are 0x00 (entropy level: 4-byte big-endian bit
                count), 0x02 NN (blocking read), 0x03 (write entropy) and 0x04 (report pid);
                tlsmgr uses 0x01 only, as Postfix's tls_prng_egd.c and OpenSSL's
                RAND_query_egd_bytes do. Each exchange has EGD_TIMEOUT seconds (Postfix
                allows 10; tlsmgr serves clients from one thread, so it waits less).
    /path       a plain file, opened before the chroot and read once, at the first seeding
                (tls_random_bytes bytes, at most MAX_FILE_READ), then closed, as Postfix's
                tlsmgr does; later reseeds rely on the kernel.
    A source that cannot be opened or read is logged with a warning and closed; tlsmgr
    carries on with the kernel's entropy and what the pool already has.

EXCHANGE FILE
    tls_random_exchange_name holds EXCH_SIZE bytes of pool output. It is read at start and
    written every tls_random_prng_update_period and at exit, atomically: a temporary file
    (mode 0600) in the same directory, fsync, rename, fsync of the directory. The directory
    is opened before the chroot and reached through that descriptor afterwards, so the file
    can live outside the jail (the seed's advice) and still be updated by the jailed,
    unprivileged tlsmgr.

    As in Postfix 2.5 and later (data_redirect.c), a file in a directory not owned by
    mail_owner is not maintained there: redirect_path() moves the request to data_directory
    and logs two warnings.

CLASSES AND FUNCTIONS
    HmacDrbg(entropy, nonce=b"", personalization=b"")
        instantiate; reseed(entropy, additional=b""); generate(n, additional=b"") -> bytes.
        reseed_counter counts generate calls since the last (re)seed. Raises DrbgError for
        inputs outside SP 800-90A's limits (entropy shorter than 32 bytes, any input over
        2**32 bytes, a request over 65536 bytes) and ReseedRequired (a DrbgError) once the
        reseed counter passes 2**48.
    open_source(spec, warn=msg.warn) -> Source or None
        Open tls_random_source; None (after a warning) when it is empty or cannot be opened.
        A Source has spec, read(n) -> bytes (OSError on failure) and close().
    Pool(source, nbytes, reseed_period, clock=time.monotonic, wallclock=time.time,
         urandom=os.urandom, rng=None, warn=msg.warn)
        start(exchange=b""); reseed() -> bytes taken from the source; random_bytes(n);
        next_reseed_delay() -> seconds; arm(loop) schedules reseed events on an
        events.EventLoop (or anything with call_later and cancel), disarm(loop) stops them;
        stats() -> dict; close().
        rng() -> float in [0, 1) picks the reseed time; by default it comes from the pool,
        as the seed document says.
    ExchangeFile(path) - read() -> bytes, write(data), close(); last_write (wallclock).
    redirect_path(path, owner, owner_uid, data_directory, log_type, log_name=None,
                  warn=msg.warn) -> str

SEE ALSO
    NIST SP 800-90A rev. 1; Postfix tlsmgr(8), tls_prng_dev.c, tls_prng_egd.c,
    tls_prng_file.c, tls_prng_exch.c, data_redirect.c.
"""

from __future__ import annotations

import hmac
import os
import socket
import stat
import struct
import time

from postfix_py.lib import msg

SECURITY_STRENGTH = 32      # bytes: 256 bits, SHA-256's
OUTLEN = 32                 # bytes of one HMAC-SHA-256 output
MAX_INPUT = 1 << 32         # bytes: 2**35 bits, for entropy, nonce, personalization, additional
MAX_REQUEST = 1 << 16       # bytes: 2**19 bits per generate call
RESEED_INTERVAL = 1 << 48   # generate calls between reseeds

KERNEL_BYTES = 32           # taken from os.urandom at every (re)seed
MAX_DEV_STEP = 255          # the seed document's per-step limit for dev: and egd:
MAX_FILE_READ = 1 << 20     # bound on a plain-file source read
EGD_TIMEOUT = 1.0           # seconds per EGD exchange
EXCH_SIZE = 1024            # bytes kept in the exchange file (Postfix's TLS_PRNG_EXCH_SIZE)


class DrbgError(ValueError):
    """An HMAC_DRBG input or request outside SP 800-90A's limits."""


class ReseedRequired(DrbgError):
    """The reseed counter passed RESEED_INTERVAL: reseed before generating more."""


def _hmac(key: bytes, data: bytes) -> bytes:
    """Return HMAC-SHA-256 of data under key (OpenSSL's one-shot path)."""
    return hmac.digest(key, data, "sha256")


class HmacDrbg:
    """HMAC_DRBG with SHA-256, no prediction resistance (SP 800-90A rev. 1, 10.1.2)."""

    def __init__(self, entropy: bytes, nonce: bytes = b"", personalization: bytes = b""):
        """Instantiate from entropy input, nonce and personalization string."""
        _check_input("entropy input", entropy, SECURITY_STRENGTH)
        _check_input("nonce", nonce)
        _check_input("personalization string", personalization)
        self._key = b"\x00" * OUTLEN
        self._v = b"\x01" * OUTLEN
        self._update(entropy + nonce + personalization)
        self.reseed_counter = 1

    def _update(self, data: bytes) -> None:
        """HMAC_DRBG_Update: fold data into Key and V."""
        key = _hmac(self._key, self._v + b"\x00" + data)
        v = _hmac(key, self._v)
        if data:
            key = _hmac(key, v + b"\x01" + data)
            v = _hmac(key, v)
        self._key, self._v = key, v

    def reseed(self, entropy: bytes, additional: bytes = b"") -> None:
        """Reseed with fresh entropy input and optional additional input."""
        _check_input("entropy input", entropy, SECURITY_STRENGTH)
        _check_input("additional input", additional)
        self._update(entropy + additional)
        self.reseed_counter = 1

    def generate(self, n: int, additional: bytes = b"") -> bytes:
        """Return n pseudo-random bytes (0 <= n <= MAX_REQUEST)."""
        if not 0 <= n <= MAX_REQUEST:
            raise DrbgError(f"request of {n} bytes (must be 0..{MAX_REQUEST})")
        if self.reseed_counter > RESEED_INTERVAL:
            raise ReseedRequired("reseed counter exhausted")
        _check_input("additional input", additional)
        if additional:
            self._update(additional)
        key, v = self._key, self._v
        out = bytearray()
        while len(out) < n:
            v = _hmac(key, v)
            out += v
        self._v = v
        self._update(additional)
        self.reseed_counter += 1
        return bytes(out[:n])


def _check_input(what: str, data: bytes, minimum: int = 0) -> None:
    """Reject a DRBG input that is not bytes or is outside minimum..MAX_INPUT bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    if not minimum <= len(data) <= MAX_INPUT:
        raise DrbgError(f"{what} of {len(data)} bytes (must be {minimum}..{MAX_INPUT})")


# --- entropy sources ---------------------------------------------------------------------

class Source:
    """An external entropy source named by tls_random_source."""

    spec = ""

    def read(self, n: int) -> bytes:
        """Return up to n bytes of entropy; raise OSError when the source fails."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the source."""


class DevSource(Source):
    """A device special file, read without blocking, at most MAX_DEV_STEP bytes a step."""

    def __init__(self, path: str):
        """Open the device now (before any chroot) and keep it open."""
        self.spec = "dev:" + path
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)

    def read(self, n: int) -> bytes:
        """Read what the device has ready, up to min(n, 255) bytes."""
        if self._fd is None:
            raise OSError(f"entropy device {self.path} is closed")
        try:
            return os.read(self._fd, min(n, MAX_DEV_STEP))
        except BlockingIOError:
            return b""

    def close(self) -> None:
        """Close the device."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class EgdSource(Source):
    """An EGD-compatible entropy server on a UNIX-domain socket."""

    def __init__(self, path: str, timeout: float = EGD_TIMEOUT):
        """Connect now (before any chroot) and keep the connection."""
        self.spec = "egd:" + path
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

    def _recv(self, n: int) -> bytes:
        """Read exactly n bytes from the server."""
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"EGD server {self.path} closed the connection")
            buf += chunk
        return bytes(buf)

    def read(self, n: int) -> bytes:
        """Ask for up to min(n, 255) bytes with "read entropy nonblocking" (0x01)."""
        if self._sock is None:
            raise OSError(f"EGD server {self.path}: not connected")
        want = min(n, MAX_DEV_STEP)
        try:
            self._sock.sendall(bytes((0x01, want)))
            count = self._recv(1)[0]
            if count > want:
                raise ConnectionError(f"EGD server {self.path} granted {count} bytes of {want} asked")
            return self._recv(count)
        except TimeoutError:
            raise TimeoutError(f"EGD server {self.path}: timeout") from None

    def close(self) -> None:
        """Drop the connection."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class FileSource(Source):
    """A plain file, opened before the chroot and read once."""

    def __init__(self, path: str):
        """Open the file now; it is read at the first seeding event."""
        self.spec = path
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def read(self, n: int) -> bytes:
        """Read up to n bytes (at most MAX_FILE_READ), then close: a file is read once."""
        if self._fd is None:
            return b""
        try:
            want, parts = min(n, MAX_FILE_READ), []
            while want > 0:
                chunk = os.read(self._fd, want)
                if not chunk:
                    break
                parts.append(chunk)
                want -= len(chunk)
            return b"".join(parts)
        finally:
            self.close()

    def close(self) -> None:
        """Close the file."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def open_source(spec: str, warn=msg.warn) -> Source | None:
    """Open tls_random_source; None, after a warning, when it cannot be opened."""
    if not spec:
        return None
    try:
        if spec.startswith("dev:"):
            return DevSource(spec[4:])
        if spec.startswith("egd:"):
            return EgdSource(spec[4:])
        return FileSource(spec)
    except OSError as exc:
        warn(f"cannot open entropy source {spec}: {exc.strerror or exc}")
        return None


# --- the pool ----------------------------------------------------------------------------

class Pool:
    """tlsmgr's PRNG pool: an HMAC_DRBG fed by the kernel, the source and the exchange file."""

    def __init__(self, source: Source | None, nbytes: int, reseed_period: float,
                 clock=time.monotonic, wallclock=time.time, urandom=os.urandom, rng=None,
                 warn=msg.warn):
        """Remember where entropy comes from; start() instantiates the DRBG."""
        self.source = source
        self.source_spec = source.spec if source else ""
        self.nbytes = nbytes
        self.reseed_period = reseed_period
        self.clock, self.wallclock, self.urandom, self.warn = clock, wallclock, urandom, warn
        self.rng = rng or self._pool_fraction
        self.drbg: HmacDrbg | None = None
        self.reseeds = 0
        self.source_bytes = 0
        self.bytes_served = 0
        self.requests = 0
        self.last_reseed: float | None = None      # wallclock
        self.next_reseed: float | None = None      # wallclock, while a reseed is armed
        self._timer = None

    def _from_source(self) -> bytes:
        """Take up to nbytes from the source; on failure warn, close it and go on without."""
        if self.source is None:
            return b""
        try:
            data = self.source.read(self.nbytes)
        except OSError as exc:
            self.warn(f"cannot read from entropy source {self.source.spec}: {exc} -- closing it")
            self.source.close()
            self.source = None
            return b""
        self.source_bytes += len(data)
        return data

    def start(self, exchange: bytes = b"") -> None:
        """Instantiate the DRBG from the kernel and the source; exchange adds to it."""
        entropy = self.urandom(KERNEL_BYTES) + self._from_source()
        nonce = self.urandom(KERNEL_BYTES // 2)
        # The personalization string makes this instance unique and carries the
        # exchange file; it is extra input, never the state on its own.
        person = struct.pack(">Qd", os.getpid(), self.wallclock()) + b"postfix-py tlsmgr" + exchange
        self.drbg = HmacDrbg(entropy, nonce, person)
        self.last_reseed = self.wallclock()

    def reseed(self) -> int:
        """Reseed from the kernel and the source; return the bytes the source gave."""
        before = self.source_bytes
        self.drbg.reseed(self.urandom(KERNEL_BYTES) + self._from_source())
        self.reseeds += 1
        self.last_reseed = self.wallclock()
        return self.source_bytes - before

    def generate(self, n: int) -> bytes:
        """Return n bytes of pool output, reseeding first if the DRBG demands it."""
        try:
            return self.drbg.generate(n)
        except ReseedRequired:
            self.reseed()
            return self.drbg.generate(n)

    def random_bytes(self, n: int) -> bytes:
        """Return n bytes for a client, and count them."""
        data = self.generate(n)
        self.requests += 1
        self.bytes_served += n
        return data

    def _pool_fraction(self) -> float:
        """Return a number in [0, 1) from the pool."""
        return int.from_bytes(self.generate(7), "big") / (1 << 56)

    def next_reseed_delay(self) -> float:
        """Return a pseudo-random delay between 0 and tls_random_reseed_period."""
        return self.rng() * self.reseed_period

    def arm(self, loop) -> None:
        """Schedule the next reseed event on loop (call_later/cancel)."""
        loop.cancel(self._timer)
        delay = self.next_reseed_delay()
        self.next_reseed = self.wallclock() + delay

        def event():
            self._timer = None
            self.reseed()
            self.arm(loop)

        self._timer = loop.call_later(delay, event)

    def disarm(self, loop) -> None:
        """Cancel the pending reseed event."""
        loop.cancel(self._timer)
        self._timer = None
        self.next_reseed = None

    def stats(self) -> dict:
        """Return counters and times for `tlsmgr status`."""
        return {
            "source": self.source_spec,
            "source_open": self.source is not None,
            "source_bytes": self.source_bytes,
            "reseeds": self.reseeds,
            "last_reseed": self.last_reseed,
            "next_reseed": self.next_reseed,
            "seed_requests": self.requests,
            "bytes_served": self.bytes_served,
        }

    def close(self) -> None:
        """Close the entropy source."""
        if self.source is not None:
            self.source.close()
            self.source = None


# --- the exchange file -------------------------------------------------------------------

class ExchangeFile:
    """The PRNG exchange file, reached through a directory descriptor opened before chroot."""

    def __init__(self, path: str, wallclock=time.time):
        """Open the file's directory; OSError when it cannot be opened."""
        self.path = path
        self.wallclock = wallclock
        directory, self.name = os.path.split(os.path.abspath(path))
        self._dirfd: int | None = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.last_write: float | None = None
        self._seq = 0

    def read(self) -> bytes:
        """Return up to EXCH_SIZE bytes of the file; b"" when it does not exist yet."""
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self._dirfd)
        except FileNotFoundError:
            return b""
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path}: not a regular file")
            return os.read(fd, EXCH_SIZE)
        finally:
            os.close(fd)

    def write(self, data: bytes) -> None:
        """Replace the file atomically with data: temporary file, fsync, rename, 0600."""
        self._seq += 1
        tmp = f".{self.name}.{os.getpid()}.{self._seq}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self._dirfd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, 0o600)    # whatever the umask said
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.name, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self._dirfd)
            except OSError:
                pass
            raise
        os.fsync(self._dirfd)
        self.last_write = self.wallclock()

    def close(self) -> None:
        """Close the directory descriptor."""
        fd, self._dirfd = self._dirfd, None
        if fd is not None:
            os.close(fd)


def redirect_path(path: str, owner: str, owner_uid: int, data_directory: str, log_type: str,
                  log_name: str | None = None, warn=msg.warn) -> str:
    """Return path, or its name under data_directory when its directory is not owner's."""
    directory = os.path.dirname(path) or "."
    try:
        uid = os.stat(directory).st_uid
    except OSError:
        return path     # as Postfix: a missing directory fails later, where it is opened
    if uid == owner_uid:
        return path
    warn(f"request to update {log_type} {log_name or path} in non-{owner} directory {directory}")
    warn(f"redirecting the request to {owner}-owned data_directory {data_directory}")
    return os.path.join(data_directory, os.path.basename(path))
