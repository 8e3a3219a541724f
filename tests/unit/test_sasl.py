"""smtpd/sasl.py and the AUTH parts of smtpd/session.py, without a mail system: mechanism
exchanges, passwd-file hashes (known vectors), the Dovecot protocol against a fake auth
server on a socketpair, and scripted SMTP sessions with AUTH."""

import base64
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib import queue as Q
from postfix_py.smtpd import sasl as S
from postfix_py.smtpd.check import Checker, ClientState
from postfix_py.smtpd.session import Session

OPENSSL = shutil.which("openssl")
DOVEADM = shutil.which("doveadm")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def config(**values) -> maincf.Config:
    base = {"smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "builtin",
            "smtpd_sasl_builtin_failure_delay": "0s", "myhostname": "mail.test.example",
            "smtpd_error_sleep_time": "0s"}
    base.update(values)
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base)


@pytest.fixture(autouse=True)
def quiet_log():
    msg.init_cli("test")
    yield
    msg.close()


# --- known vectors -------------------------------------------------------------------------
# From Ulrich Drepper's SHA-crypt specification, checked with `openssl passwd -5/-6`.
SHA_VECTORS = [
    ("Hello world!", "$6$saltstring",
     "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiB"
     "FdcbYEdFCoEOfaS35inz1"),
    ("Hello world!", "$6$rounds=10000$saltstringsaltstring",
     "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/U"
     "rjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v."),
    ("Hello world!", "$5$saltstring", "$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5"),
    ("This is just a test", "$5$rounds=5000$toolongsaltstring",
     "$5$rounds=5000$toolongsaltstrin$Un/5jzAHMgOGZ5.mWJpuVolil07guHPvOW8mGRcvxa5"),
]
# The OpenBSD / crypt_blowfish test vector.
BCRYPT_VECTOR = ("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")


@pytest.mark.parametrize("password,setting,expected", SHA_VECTORS)
def test_sha_crypt_known_vectors(password, setting, expected):
    assert S.sha_crypt(password.encode(), setting) == expected
    assert S.sha_crypt(password.encode(), expected) == expected      # a whole hash works too
    scheme = "{SHA512-CRYPT}" if expected.startswith("$6$") else "{SHA256-CRYPT}"
    assert S.verify_password(password.encode(), scheme + expected)
    assert S.verify_password(password.encode(), "{CRYPT}" + expected)
    assert S.verify_password(password.encode(), expected)       # no scheme: CRYPT
    assert not S.verify_password(b"hello world!", scheme + expected)


def test_sha_crypt_long_passwords_and_rounds_bounds():
    long = b"x" * 200     # longer than both digest sizes: the chunked branch
    h6 = S.sha_crypt(long, "$6$abc")
    h5 = S.sha_crypt(long, "$5$abc")
    assert S.verify_password(long, h6) and S.verify_password(long, h5)
    assert not S.verify_password(long[:-1], h6)
    assert S.sha_crypt(b"pw", "$6$rounds=10$salt").startswith("$6$rounds=1000$salt$")
    with pytest.raises(ValueError):
        S.sha_crypt(b"pw", "$1$salt")
    with pytest.raises(ValueError):
        S.sha_crypt(b"pw", "$6$rounds=x$salt")


@pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")
@pytest.mark.parametrize("flag", ["-5", "-6"])
def test_sha_crypt_matches_openssl(flag):
    for password, salt in [("secret", "Zx9.ab"), ("pässwörd", "s/alt"), ("x", "e")]:
        out = subprocess.run([OPENSSL, "passwd", flag, "-salt", salt, password],
                             capture_output=True, text=True, check=True).stdout.strip()
        assert S.sha_crypt(password.encode(), out) == out


@pytest.mark.skipif(not DOVEADM, reason="Dovecot's doveadm is not installed")
@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT"])
def test_hashes_made_by_dovecot_verify(scheme):
    out = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", "dove secret"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("{" + scheme + "}")
    assert S.verify_password(b"dove secret", out)
    assert not S.verify_password(b"dove secreT", out)


def test_hash_password():
    a, b = S.hash_password("pässword"), S.hash_password("pässword")
    assert a.startswith("{SHA512-CRYPT}$6$") and len(a.split("$")[2]) == 16 and a != b
    assert S.verify_password("pässword".encode(), a) and not S.verify_password(b"x", a)


def test_bcrypt_known_vector_and_prefixes():
    password, hashed = BCRYPT_VECTOR
    assert S.verify_password(password.encode(), "{BLF-CRYPT}" + hashed)
    assert S.verify_password(password.encode(), "{BLF-CRYPT}$2y$" + hashed[4:])   # Dovecot's
    assert S.verify_password(password.encode(), hashed)                           # CRYPT
    assert not S.verify_password(b"U*V", "{BLF-CRYPT}" + hashed)
    assert not S.verify_password(password.encode(), "{SHA512-CRYPT}" + hashed)   # mislabelled


def test_bcrypt_uses_the_first_72_bytes_as_crypt_blowfish():
    import bcrypt
    hashed = bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(4)).decode()
    assert S.verify_password(b"a" * 100, "{BLF-CRYPT}" + hashed)


def test_plain_and_unsupported_schemes(capfd):
    assert S.verify_password(b"secret", "{PLAIN}secret")
    assert S.verify_password(b"secret", "{CLEARTEXT}secret")
    assert not S.verify_password(b"secret", "{PLAIN}Secret")
    assert not S.verify_password(b"secret", "{ARGON2ID}$argon2id$v=19$m=65536$x$y")
    assert not S.verify_password(b"secret", "{CRYPT}abcdefghijklm")     # DES crypt
    err = capfd.readouterr().err
    assert "unsupported password scheme {ARGON2ID}" in err
    assert "secret" not in err


# --- passwd-file -------------------------------------------------------------------------
def test_parse_passwd(capfd):
    users = S.parse_passwd("# comment\n\nalice:{PLAIN}a:1000:1000::/home/a::\n"
                           "bob:$6$x$y\nbroken line\nalice:{PLAIN}second\n", "pw")
    assert users == {"alice": "{PLAIN}a", "bob": "$6$x$y"}
    assert "pw, line 5: missing ':'" in capfd.readouterr().err


def test_passwd_file_changes_are_picked_up(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}one\n")
    pf = S.PasswdFile(str(path), "/nonexistent")
    try:
        assert pf.lookup("alice") == "{PLAIN}one"
        with open(path, "w") as f:                   # edited in place
            f.write("alice:{PLAIN}two\nbob:{PLAIN}b\n")
        assert pf.lookup("alice") == "{PLAIN}two" and pf.lookup("bob") == "{PLAIN}b"
        new = tmp_path / "passwd.new"                # replaced by rename
        new.write_text("carol:{PLAIN}c\n")
        os.rename(new, path)
        assert pf.lookup("alice") is None and pf.lookup("carol") == "{PLAIN}c"
        assert not pf.changed
    finally:
        pf.close()


def test_passwd_file_replaced_out_of_reach_restarts_the_worker(tmp_path, capfd):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}one\n")
    pf = S.PasswdFile(str(path), "/nonexistent")
    backend = S.BuiltinBackend(config(), passwd=pf)
    try:
        pf.inside = str(tmp_path / "not-in-the-jail")   # as seen from a chroot jail
        assert pf.lookup("alice") == "{PLAIN}one" and not backend.needs_restart()
        new = tmp_path / "passwd.new"
        new.write_text("alice:{PLAIN}two\n")
        os.rename(new, path)
        assert backend.needs_restart()                   # checked after every client
        with pytest.raises(S.FileChanged):
            pf.lookup("alice")                           # the old copy is not trusted
        sess = backend.session("192.0.2.1", "192.0.2.2")
        assert sess.first("PLAIN", b64(b"\0alice\0one"), True) == \
            S.Step(S.TEMP, f"{path} has changed")
        assert f"table {path} has changed -- restarting" in capfd.readouterr().err
    finally:
        backend.close()


def test_unreadable_passwd_file_is_a_configuration_error(tmp_path):
    with pytest.raises(maincf.ConfigError, match="open smtpd_sasl_path file"):
        S.from_config(config(smtpd_sasl_path=str(tmp_path / "missing")))


# --- configuration -------------------------------------------------------------------------
def test_security_options_and_filtering():
    assert S.security_options(["noanonymous", "NOPLAINTEXT"], "x") == {"noanonymous",
                                                                       "noplaintext"}
    with pytest.raises(maincf.ConfigError, match='unknown x value "nosuch"'):
        S.security_options(["nosuch"], "x")
    plain = frozenset({"plaintext"})
    assert S.allowed(plain, frozenset({"noanonymous"}))
    assert not S.allowed(plain, frozenset({"noplaintext"}))
    assert not S.allowed(frozenset({"anonymous"}), frozenset({"noanonymous"}))
    assert not S.allowed(plain, frozenset({"mutual_auth"}))
    assert S.allowed(frozenset({"mutual-auth"}), frozenset({"mutual_auth"}))


def test_check_config():
    S.check_config(config(smtpd_sasl_auth_enable="no", smtpd_sasl_type="cyrus"))
    with pytest.raises(maincf.ConfigError, match="unsupported SASL server implementation: "
                                                 "cyrus"):
        S.check_config(config(smtpd_sasl_type="cyrus"))
    with pytest.raises(maincf.ConfigError, match="smtpd_sasl_tls_security_options"):
        S.check_config(config(smtpd_sasl_tls_security_options="bogus"))
    assert S.from_config(config(smtpd_sasl_auth_enable="no")) is None


def test_redact():
    assert S.redact("MAIL FROM:<a>\r\n") == "MAIL FROM:<a>\r\n"
    assert S.redact("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == "AUTH PLAIN ..."
    assert S.redact("NOOP\r\nauth login YWxpY2U=\r\nc2VjcmV0\r\n") == "NOOP\r\nauth login ..."
    assert S.redact("AUTH LOGIN") == "AUTH LOGIN"


# --- builtin exchanges ---------------------------------------------------------------------
@pytest.fixture
def builtin(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:" + "{SHA512-CRYPT}" + S.sha_crypt(b"secret1", "$6$abcdefgh")
                    + "\nbob:{PLAIN}secret2\n")
    backend = S.from_config(config(smtpd_sasl_path=str(path)))
    yield backend
    backend.close()


def test_builtin_mechanisms(builtin):
    sess = builtin.session("192.0.2.1", "192.0.2.2")
    assert sess.mechanisms(False) == ["PLAIN", "LOGIN"]
    builtin.options = frozenset({"noplaintext"})
    assert sess.mechanisms(False) == [] and sess.mechanisms(True) == ["PLAIN", "LOGIN"]


def test_builtin_plain(builtin):
    sess = builtin.session("192.0.2.1", "192.0.2.2")
    assert sess.first("plain", b64(b"\0alice\0secret1"), True) == S.Step(S.DONE)
    assert sess.username == "alice"
    assert sess.first("PLAIN", b64(b"alice\0alice\0secret1"), True).status == S.DONE
    step = sess.first("PLAIN", None, True)
    assert step == S.Step(S.MORE, "")
    assert sess.next(b64(b"\0bob\0secret2")).status == S.DONE and sess.username == "bob"
    assert sess.first("PLAIN", b64(b"\0alice\0wrong"), True) == S.Step(S.FAIL, "")
    assert sess.username == "alice"
    assert sess.first("PLAIN", b64(b"\0nobody\0secret1"), True).status == S.FAIL
    assert sess.first("PLAIN", b64(b"bob\0alice\0secret1"), True).status == S.FAIL
    assert sess.first("PLAIN", b64(b"alice\0secret1"), True) == S.Step(S.FAIL, "")
    assert sess.first("PLAIN", b64(b"\0alice\0"), True).status == S.FAIL
    assert sess.first("PLAIN", "!!!!", True) == \
        S.Step(S.FAIL, "Invalid base64 data in initial response")
    assert sess.first("PLAIN", "Zm9v", True).status == S.FAIL     # not base64 padding
    assert sess.first("CRAM-MD5", None, True) == \
        S.Step(S.FAIL, "Invalid authentication mechanism")
    assert sess.first("PLAIN", "=", True) == S.Step(S.FAIL, "")  # "=": an empty response
    assert sess.first("LOGIN", "=", True) == S.Step(S.MORE, b64(b"Username:"))   # Dovecot's
    assert sess.first("PLAIN", None, True) == S.Step(S.MORE, "")
    assert sess.next("\tinjected") == \
        S.Step(S.FAIL, "Invalid base64 data in continued response")


def test_builtin_login(builtin):
    sess = builtin.session("192.0.2.1", "192.0.2.2")
    assert sess.first("LOGIN", None, False) == S.Step(S.MORE, b64(b"Username:"))
    assert sess.next(b64(b"alice")) == S.Step(S.MORE, b64(b"Password:"))
    assert sess.next(b64(b"secret1")).status == S.DONE and sess.username == "alice"
    assert sess.first("LOGIN", b64(b"bob"), False) == S.Step(S.MORE, b64(b"Password:"))
    assert sess.next(b64(b"wrong")).status == S.FAIL and sess.username == "bob"
    sess.first("LOGIN", None, False)
    assert sess.next("**") == S.Step(S.FAIL, "Invalid base64 data in continued response")
    sess.first("LOGIN", None, False)
    assert sess.next(b64(b"al\tice")) == S.Step(S.FAIL, "")


def test_builtin_failure_delay(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("bob:{PLAIN}secret2\n")
    backend = S.from_config(config(smtpd_sasl_path=str(path),
                                   smtpd_sasl_builtin_failure_delay="1s"))
    try:
        sess = backend.session("192.0.2.1", "192.0.2.2")
        t = time.monotonic()
        assert sess.first("PLAIN", b64(b"\0bob\0secret2"), True).status == S.DONE
        assert time.monotonic() - t < 0.5
        for user in (b"bob", b"nobody"):
            t = time.monotonic()
            assert sess.first("PLAIN", b64(b"\0" + user + b"\0bad"), True).status == S.FAIL
            assert time.monotonic() - t >= 0.95
    finally:
        backend.close()


# --- Dovecot protocol, against a fake auth server ------------------------------------------
class FakeDovecot:
    """A scripted Dovecot auth server on one end of a socketpair."""

    def __init__(self, handshake, handler):
        self.handshake = handshake
        self.handler = handler           # request line -> list of reply lines (or None)
        self.requests: list[str] = []
        self.connections = 0
        self.threads = []
        self.socks = []

    def connect(self):
        ours, theirs = socket.socketpair()
        self.connections += 1
        self.socks.append(theirs)
        t = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        t.start()
        self.threads.append(t)
        return ours

    def _serve(self, sock):
        f = sock.makefile("rwb", buffering=0)
        try:
            f.write(self.handshake.encode())
            while True:
                line = f.readline()
                if not line:
                    break
                text = line.decode().rstrip("\n")
                self.requests.append(text)
                replies = self.handler(text)
                if replies is None:
                    break
                for r in replies:
                    f.write((r + "\n").encode())
        except OSError:
            pass
        finally:
            f.close()
            sock.close()

    def close(self):
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)


HANDSHAKE = ("VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
             "MECH\tANONYMOUS\tanonymous\nMECH\tGSSAPI\tprivate\nSPID\t1\nCUID\t1\n"
             "COOKIE\tab\nDONE\n")


def dovecot_handler(text):
    parts = text.split("\t")
    if parts[0] in ("VERSION", "CPID"):
        return []
    if parts[0] == "AUTH":
        rid, mech = parts[1], parts[2]
        resp = next((p[5:] for p in parts if p.startswith("resp=")), None)
        if mech == "LOGIN" and resp is None:
            return [f"CONT\t{rid}\t{b64(b'Username:')}"]
        if resp == b64(b"\0alice\0secret1"):
            # an answer to an old request first: it must be skipped
            return [f"FAIL\t{int(rid) - 1}\tuser=old", f"OK\t{rid}\tuser=alice"]
        if resp == b64(b"\0temp\0x"):
            return [f"FAIL\t{rid}\ttemp\treason=Internal error\tuser=temp"]
        if resp == b64(b"\0drop\0x"):
            return None
        if resp == b64(b"\0nouser\0x"):
            return [f"OK\t{rid}"]
        if resp == "=":
            return [f"FAIL\t{rid}"]
        return [f"FAIL\t{rid}\tuser=" + base64.b64decode(resp or "").split(b"\0")[1].decode()]
    if parts[0] == "CONT":
        rid = parts[1]
        if parts[2] == b64(b"bob"):
            return [f"CONT\t{rid}\t{b64(b'Password:')}"]
        if parts[2] == b64(b"secret2"):
            return [f"OK\t{rid}\tuser=bob\textra=1"]
        return [f"FAIL\t{rid}\treason=Bad\x01stuff"]
    return []


@pytest.fixture
def dovecot():
    fake = FakeDovecot(HANDSHAKE, dovecot_handler)
    backend = S.DovecotBackend(config(smtpd_sasl_type="dovecot"), path="private/auth",
                               timeout=5, connector=fake.connect)
    yield fake, backend
    backend.close()
    fake.close()


def test_dovecot_handshake_and_mechanisms(dovecot):
    fake, backend = dovecot
    sess = backend.session("192.0.2.1", "192.0.2.2")
    assert sess.mechanisms(False) == ["PLAIN", "LOGIN"]        # noanonymous; no private
    deadline = time.monotonic() + 5
    while len(fake.requests) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.requests[:2] == ["VERSION\t1\t0", f"CPID\t{os.getpid()}"]
    backend.options = frozenset()
    assert sess.mechanisms(False) == ["PLAIN", "LOGIN", "ANONYMOUS"]
    assert fake.connections == 1


def test_dovecot_plain_login_and_failures(dovecot):
    fake, backend = dovecot
    sess = backend.session("192.0.2.1", "192.0.2.2")
    assert sess.first("plain", b64(b"\0alice\0secret1"), True) == S.Step(S.DONE)
    assert sess.username == "alice"
    assert fake.requests[-1] == ("AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=192.0.2.2\t"
                                 "rip=192.0.2.1\tsecured\tresp=" + b64(b"\0alice\0secret1"))
    assert sess.first("LOGIN", None, False) == S.Step(S.MORE, b64(b"Username:"))
    assert "secured" not in fake.requests[-1] and "resp=" not in fake.requests[-1]
    assert sess.next(b64(b"bob")) == S.Step(S.MORE, b64(b"Password:"))
    assert fake.requests[-1] == "CONT\t2\t" + b64(b"bob")
    assert sess.next(b64(b"secret2")) == S.Step(S.DONE) and sess.username == "bob"
    step = sess.first("PLAIN", b64(b"\0carol\0bad"), False)
    assert step == S.Step(S.FAIL, "") and sess.username == "carol"
    assert sess.first("PLAIN", b64(b"\0temp\0x"), False) == S.Step(S.TEMP, "Internal error")
    assert sess.first("PLAIN", b64(b"\0nouser\0x"), False).status == S.FAIL
    sess.first("LOGIN", None, False)
    assert sess.next(b64(b"x")) == S.Step(S.FAIL, "Bad?stuff")   # made printable
    n = len(fake.requests)
    assert sess.first("PLAIN", "a\tb", False).status == S.FAIL     # never sent
    assert sess.first("PLAIN", "a\nAUTH", False).status == S.FAIL
    assert len(fake.requests) == n
    assert sess.first("DIGEST-MD5", None, False) == \
        S.Step(S.FAIL, "Invalid authentication mechanism")
    sess.first("PLAIN", "=", False)                # passed on as Postfix does
    assert fake.requests[-1].endswith("\tresp==")


def test_dovecot_lost_connection_is_temporary_and_reconnects(dovecot):
    fake, backend = dovecot
    sess = backend.session("192.0.2.1", "192.0.2.2")
    assert sess.first("PLAIN", b64(b"\0drop\0x"), False) == \
        S.Step(S.TEMP, "Connection lost to authentication server")
    assert sess.first("PLAIN", b64(b"\0alice\0secret1"), False).status == S.DONE
    assert fake.connections == 2


def test_dovecot_unreachable_and_bad_handshakes(tmp_path, capfd):
    backend = S.DovecotBackend(config(smtpd_sasl_type="dovecot"),
                               path=str(tmp_path / "nosuch"), timeout=2)
    sess = backend.session("192.0.2.1", "192.0.2.2")
    assert sess.mechanisms(False) is None
    assert sess.first("PLAIN", "=", False) == \
        S.Step(S.TEMP, "Can't connect to authentication server")
    assert f"warning: SASL: Connect to {tmp_path}/nosuch failed: No such file or directory" \
        in capfd.readouterr().err
    for handshake, handler, warning in [
            ("VERSION\t2\t0\nDONE\n", list, "Protocol version mismatch (2 vs. 1)"),
            ("VERSION\tx\nDONE\n", list, "Protocol version error"),
            ("VERSION\t1\t0\nMECH\tPLAIN\n", lambda text: None if text.startswith("CPID")
             else [], "lost during the handshake"),
            ("VERSION\t1\t0\nMECH\tPLAIN\n", lambda text: [],
             "Couldn't talk to x: timed out")]:
        fake = FakeDovecot(handshake, handler)
        backend = S.DovecotBackend(config(smtpd_sasl_type="dovecot"), path="x", timeout=0.5,
                                   connector=fake.connect)
        try:
            assert backend.session("a", "b").mechanisms(True) is None
        finally:
            fake.close()
            backend.close()
        assert warning in capfd.readouterr().err


def test_dovecot_overlong_line_is_a_protocol_error():
    fake = FakeDovecot("VERSION\t1\t0\nMECH\t" + "A" * (S.MAX_LINE + 10), lambda t: [])
    backend = S.DovecotBackend(config(smtpd_sasl_type="dovecot"), path="x", timeout=2,
                               connector=fake.connect)
    try:
        assert backend.all_mechanisms() is None
    finally:
        backend.close()
        fake.close()


# --- scripted SMTP sessions ----------------------------------------------------------------
class ScriptStream:
    """An SmtpStream stand-in: client bytes in, replies out."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.out = bytearray()

    def readline(self, limit, timeout=None):
        from postfix_py.lib.smtpio import StreamEOF
        if not self.data:
            raise StreamEOF("lost connection")
        nl = self.data.find(b"\n", 0, limit)
        n = nl + 1 if nl >= 0 else min(limit, len(self.data))
        line = bytes(self.data[:n])
        del self.data[:n]
        return line

    def buffered_lines(self, limit, timeout=None):
        return bytes(self.data[:self.data.rfind(b"\n") + 1])

    def consume(self, n):
        del self.data[:n]

    def write(self, data):
        self.out += data

    def flush(self, timeout=None):
        pass

    def pending(self):
        return len(self.data)

    def peek(self, n):
        return bytes(self.data[:n])

    def purge(self):
        n = len(self.data)
        self.data.clear()
        return n


class AllowAll:
    def connect(self, client):
        return None

    helo = mail = connect

    def rcpt(self, client, rcpt):
        return None

    data = end_of_data = rcpt

    def in_network_list(self, param, addr, name="unknown"):
        return False

    def header_rewrite_context(self, client):
        return "remote"


def run_session(lines, backend, tmp_path, cfg=None, tls_active=False, checker=None):
    (tmp_path / "incoming").mkdir(exist_ok=True)
    stream = ScriptStream("".join(l + "\r\n" for l in lines).encode())
    cfg = cfg or config()
    sess = Session(stream, cfg, ClientState(name="client.example", addr="192.0.2.9"),
                   str(tmp_path), checker or AllowAll(),
                   sasl=backend.session("192.0.2.9", "192.0.2.1") if backend else None)
    sess.tls_active = tls_active
    sess.run()
    return stream.out.decode().splitlines(), sess


def codes(out):
    return [l for l in out]


def test_session_auth_replies(builtin, tmp_path, capfd):
    out, sess = run_session([
        "AUTH PLAIN " + b64(b"\0alice\0secret1"),       # before EHLO: allowed, as Postfix
        "AUTH PLAIN " + b64(b"\0alice\0secret1"),
        "QUIT"], builtin, tmp_path)
    assert out[1:] == ["235 2.7.0 Authentication successful",
                       "503 5.5.1 Error: already authenticated", "221 2.0.0 Bye"]
    out, sess = run_session([
        "EHLO client.example",
        "AUTH", "AUTH PLAIN a b",
        "AUTH CRAM-MD5",
        "AUTH PLAIN", "*",
        "AUTH LOGIN", b64(b"alice"), "*",
        "AUTH PLAIN " + b64(b"\0alice\0wrong"),
        "AUTH PLAIN !!!",
        "AUTH LOGIN " + b64(b"bob"), b64(b"secret2"),
        "QUIT"], builtin, tmp_path)
    assert "250-AUTH PLAIN LOGIN" in out
    i = out.index("250 CHUNKING") + 1
    assert out[i:] == [
        "501 5.5.4 Syntax: AUTH mechanism",
        "501 5.5.4 Syntax: AUTH mechanism",
        "535 5.7.8 Error: authentication failed: Invalid authentication mechanism",
        "334 ",
        "501 5.7.0 Authentication aborted",
        "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6",
        "501 5.7.0 Authentication aborted",
        "535 5.7.8 Error: authentication failed: (reason unavailable)",
        "535 5.7.8 Error: authentication failed: Invalid base64 data in initial response",
        "334 UGFzc3dvcmQ6",
        "235 2.7.0 Authentication successful",
        "221 2.0.0 Bye"]
    assert sess.client.sasl_username == "bob" and sess.sasl_method == "LOGIN"
    err = capfd.readouterr().err
    assert ("warning: client.example[192.0.2.9]: SASL PLAIN authentication failed: "
            "(reason unavailable), sasl_username=alice") in err
    assert ("warning: client.example[192.0.2.9]: SASL CRAM-MD5 authentication failed: "
            "Invalid authentication mechanism, sasl_username=(unavailable)") in err
    assert "warning: client.example[192.0.2.9]: SASL LOGIN authentication aborted" in err
    for secret in ("secret1", "secret2", "wrong", b64(b"\0alice\0wrong"), b64(b"secret2"),
                   b64(b"alice")):
        assert secret not in err
    assert "disconnect from client.example[192.0.2.9] ehlo=1 auth=1/8 quit=1" in err


def test_session_auth_mail_in_progress_and_not_enabled(builtin, tmp_path):
    out, _ = run_session(["EHLO x", "MAIL FROM:<a@example.org>",
                          "AUTH PLAIN " + b64(b"\0alice\0secret1"), "QUIT"],
                         builtin, tmp_path)
    assert out[-2] == "503 5.5.1 Error: MAIL transaction in progress"
    out, _ = run_session(["EHLO x", "AUTH PLAIN =", "QUIT"], None, tmp_path)
    assert not any("AUTH" in l for l in out)
    assert out[-2] == "503 5.5.1 Error: authentication not enabled"
    cfg = config(smtpd_helo_required="yes")
    out, _ = run_session(["AUTH PLAIN =", "QUIT"], builtin, tmp_path, cfg)
    assert out[-2] == "503 5.5.1 Error: send HELO/EHLO first"
    cfg = config(smtpd_discard_ehlo_keywords="auth")
    out, _ = run_session(["EHLO x", "AUTH PLAIN =", "QUIT"], builtin, tmp_path, cfg)
    assert not any("AUTH" in l for l in out[:-2])
    assert out[-2] == "503 5.5.1 Error: authentication not enabled"


def test_session_tls_auth_only(builtin, tmp_path):
    cfg = config(smtpd_tls_auth_only="yes")
    out, _ = run_session(["EHLO x", "AUTH PLAIN " + b64(b"\0alice\0secret1"), "QUIT"],
                         builtin, tmp_path, cfg)
    assert not any("AUTH" in l for l in out[:-2])
    assert out[-2] == "503 5.5.1 Error: authentication not enabled"     # Postfix 3.7's
    out, sess = run_session(["EHLO x", "AUTH PLAIN " + b64(b"\0alice\0secret1"), "QUIT"],
                            builtin, tmp_path, cfg, tls_active=True)
    assert "250-AUTH PLAIN LOGIN" in out and out[-2] == "235 2.7.0 Authentication successful"
    assert sess.protocol() == "ESMTPSA"
    builtin.options = frozenset({"noanonymous", "noplaintext"})
    out, _ = run_session(["EHLO x", "QUIT"], builtin, tmp_path)
    assert not any("AUTH" in l for l in out)


def test_session_sasl_exceptions_networks(builtin, tmp_path):
    cfg = config(smtpd_sasl_exceptions_networks="192.0.2.0/24")
    out, _ = run_session(["EHLO x", "AUTH PLAIN " + b64(b"\0alice\0secret1"), "QUIT"],
                         builtin, tmp_path, cfg, checker=Checker(cfg))
    assert not any("AUTH" in l for l in out[:-2])
    assert out[-2] == "235 2.7.0 Authentication successful"   # not offered, still allowed


def test_session_overlong_response(builtin, tmp_path, capfd):
    cfg = config(smtpd_sasl_response_limit="100")
    out, _ = run_session(["EHLO x", "AUTH PLAIN", "A" * 300, "QUIT"], builtin, tmp_path, cfg)
    assert out[-2:] == ["500 5.5.6 Authentication exchange line is too long", "221 2.0.0 Bye"]
    err = capfd.readouterr().err
    assert "SASL PLAIN response longer than 100" in err and "AAAA" not in err


def test_session_queue_file_log_and_received_header(builtin, tmp_path, capfd):
    cfg = config(smtpd_sasl_authenticated_header="yes")
    out, _ = run_session([
        "EHLO client.example", "AUTH PLAIN " + b64(b"\0alice\0secret1"),
        "MAIL FROM:<alice@example.org> AUTH=alice@example.org", "RCPT TO:<bob@example.net>",
        "DATA", "Subject: x", "", "body", ".", "QUIT"], builtin, tmp_path, cfg)
    qid = out[-2].split()[-1] if out[-2].startswith("250") else out[-3].split()[-1]
    (path,) = (tmp_path / "incoming").iterdir()
    m = Q.read(str(path))
    assert m.attrs["protocol"] == "ESMTPA"
    assert m.attrs["sasl_method"] == "PLAIN" and m.attrs["sasl_username"] == "alice"
    assert m.attrs["sasl_sender"] == "alice@example.org"
    content = b"".join(m.content(str(path))).decode()
    assert content.startswith("Received: from client.example (client.example [192.0.2.9])\n"
                              "\t(Authenticated sender: alice)\n"
                              "\tby mail.test.example (postfix-py) with ESMTPA id ")
    err = capfd.readouterr().err
    assert (f"{qid}: client=client.example[192.0.2.9], sasl_method=PLAIN, "
            "sasl_username=alice, sasl_sender=alice@example.org") in err
    assert "secret1" not in err


def test_session_pipelined_auth_is_not_logged(builtin, tmp_path, capfd):
    # Sent before the EHLO reply: Postfix logs the pending input; credentials must not be.
    stream_lines = ["HELO x", "AUTH LOGIN", b64(b"alice"), b64(b"secret1"), "QUIT"]
    out, _ = run_session(stream_lines, builtin, tmp_path)
    assert "235 2.7.0 Authentication successful" in out
    err = capfd.readouterr().err
    assert "improper command pipelining" in err
    assert b64(b"secret1") not in err and b64(b"alice") not in err
    out, _ = run_session(["HELO x", "AUTH PLAIN " + b64(b"\0alice\0secret1"), "QUIT"],
                         builtin, tmp_path)
    err = capfd.readouterr().err
    assert "AUTH PLAIN ..." in err and b64(b"\0alice\0secret1") not in err


def test_comment_sanitised_user_name(tmp_path):
    from postfix_py.smtpd.session import comment_text
    assert comment_text("a(b)c\\d\x01") == "a\\(b\\)c\\\\d?"


def test_smtpd_sasl_local_domain_qualifies_builtin_login_names(tmp_path, capfd):
    path = tmp_path / "passwd"
    path.write_text("alice@example.com:{PLAIN}one\nbob@other.example:{PLAIN}two\n")
    backend = S.from_config(config(smtpd_sasl_path=str(path),
                                   smtpd_sasl_local_domain="example.com"))
    try:
        sess = backend.session("192.0.2.1", "192.0.2.2")
        assert sess.first("PLAIN", b64(b"\0alice\0one"), True) == S.Step(S.DONE)
        assert sess.username == "alice@example.com"
        step = sess.first("LOGIN", None, True)
        step = sess.next(b64(b"alice"))
        assert sess.next(b64(b"one")) == S.Step(S.DONE)
        assert sess.username == "alice@example.com"
        # a name with its own realm is taken as it is
        assert sess.first("PLAIN", b64(b"\0bob@other.example\0two"), True) == S.Step(S.DONE)
        assert sess.username == "bob@other.example"
    finally:
        backend.close()
    # without it, "alice" is not "alice@example.com"
    backend = S.from_config(config(smtpd_sasl_path=str(path)))
    try:
        sess = backend.session("192.0.2.1", "192.0.2.2")
        assert sess.first("PLAIN", b64(b"\0alice\0one"), True).status == S.FAIL
    finally:
        backend.close()
    # with Dovecot it cannot be honoured: said out loud
    S.check_config(config(smtpd_sasl_type="dovecot", smtpd_sasl_local_domain="example.com"))
    assert "smtpd_sasl_local_domain is ignored with smtpd_sasl_type = dovecot" in \
        capfd.readouterr().err
