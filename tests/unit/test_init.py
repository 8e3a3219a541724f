"""Tests of `postfix-py init DIR`: the files it writes, their modes, the certificates, and
the command line (through the installed `postfix-py` script)."""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL

from postfix_py.lib import maincf, mastercf, tables, tlsgen
from postfix_py.master import init

POSTFIX_PY = os.path.join(os.path.dirname(sys.executable), "postfix-py")
POSTCONF = "/usr/sbin/postconf"
KEYS = {"rsa": ("rsa-key.pem", "rsa-cert.pem"), "ecdsa": ("ecdsa-key.pem", "ecdsa-cert.pem")}


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run the installed postfix-py with args."""
    return subprocess.run([POSTFIX_PY, *args], capture_output=True, text=True, timeout=120,
                          **kw)


def expected_owner() -> str:
    """The mail_owner init should pick for the user running the tests."""
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    """One instance made in-process with the default port base."""
    directory = tmp_path_factory.mktemp("inst") / "postfix-py"
    out = io.StringIO()
    init.create(str(directory), out=out)
    return directory, out.getvalue()


def snapshot(directory) -> dict[str, tuple[bytes, float]]:
    """Contents and mtimes of the regular files directly in directory."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = (f.read(), os.stat(path).st_mtime_ns)
    return out


# --- main.cf and master.cf ------------------------------------------------------------

def test_main_cf_values(instance):
    directory, _ = instance
    cfg = maincf.load(str(directory))
    d = str(directory)
    assert cfg["queue_directory"] == f"{d}/queue"
    assert cfg["data_directory"] == f"{d}/data"
    assert cfg["maillog_file"] == f"{d}/maillog"
    assert cfg["mail_owner"] == expected_owner()
    assert cfg["myhostname"] == "localhost"
    assert cfg["mydestination"] == ["localhost", "localhost.localdomain"]
    assert cfg["mynetworks"] == ["127.0.0.0/8", "[::1]/128"]
    assert cfg["inet_interfaces"] == ["127.0.0.1"]
    assert cfg["smtpd_tls_cert_file"] == f"{d}/rsa-cert.pem"
    assert cfg["smtpd_tls_key_file"] == f"{d}/rsa-key.pem"
    assert cfg["smtpd_tls_eccert_file"] == f"{d}/ecdsa-cert.pem"
    assert cfg["smtpd_tls_eckey_file"] == f"{d}/ecdsa-key.pem"
    assert cfg["smtpd_tls_security_level"] == "may"
    assert cfg["smtpd_tls_received_header"] is True
    assert cfg["smtpd_tls_loglevel"] == 1
    assert cfg["tls_random_source"] == "dev:/dev/urandom"
    assert cfg["smtp_tls_security_level"] == "may"
    assert cfg["smtp_tls_session_cache_database"] == f"lmdb:{d}/data/smtp_scache"
    assert cfg.unused() == [] and maincf.check(cfg) == []


def test_aliases_are_built(instance):
    directory, _ = instance
    cfg = maincf.load(str(directory))
    assert cfg["alias_maps"] == cfg["alias_database"] == [f"hash:{directory}/aliases"]
    with tables.open_table(f"hash:{directory}/aliases") as table:
        assert table.lookup("postmaster") == "root"
        assert table.lookup("abuse") == "postmaster"


def test_master_cf_services(instance):
    directory, _ = instance
    services = {s.key: s for s in mastercf.load(str(directory / "master.cf"))}
    smtp, smtps = services["127.0.0.1:2525/inet"], services["127.0.0.1:2526/inet"]
    assert (smtp.inet_host, smtp.inet_port, smtp.command) == ("127.0.0.1", 2525, "smtpd")
    assert smtp.overrides == {}
    assert (smtps.inet_host, smtps.inet_port) == ("127.0.0.1", 2526)
    assert smtps.overrides["smtpd_tls_wrappermode"] == "yes"
    assert smtps.overrides["smtpd_sasl_auth_enable"] == "yes"
    assert not any(s.chroot for s in services.values())
    assert {"qmgr/unix", "tlsmgr/unix", "smtp/unix", "local/unix",
            "pickup/unix"} <= set(services)


def test_master_cf_submission(instance):
    directory, output = instance
    services = {s.key: s for s in mastercf.load(str(directory / "master.cf"))}
    submission = services["127.0.0.1:2527/inet"]
    assert submission.overrides == {
        "syslog_name": "postfix-py/submission", "smtpd_tls_security_level": "encrypt",
        "smtpd_sasl_auth_enable": "yes", "smtpd_tls_auth_only": "yes",
        "smtpd_relay_restrictions": "permit_sasl_authenticated,reject"}
    # The SASL user exists, hashed, and its password is printed once.
    line = (directory / "sasl_passwd").read_text()
    assert line.startswith("test:{") and stat.S_IMODE(
        os.stat(directory / "sasl_passwd").st_mode) == 0o600
    assert "SASL user: test, password: " in output


def test_modes_and_layout(instance):
    directory, output = instance
    mode = lambda name: stat.S_IMODE(os.stat(directory / name).st_mode)  # noqa: E731
    assert mode(".") == 0o755
    assert mode("queue") == 0o755 and mode("data") == 0o700
    assert mode("main.cf") == 0o644 and mode("master.cf") == 0o644
    for key, cert in KEYS.values():
        assert mode(key) == 0o600 and mode(cert) == 0o644
        assert os.stat(directory / key).st_uid == os.geteuid()
    owner = pwd.getpwnam(expected_owner())
    assert os.stat(directory / "data").st_uid == owner.pw_uid
    assert not [n for n in os.listdir(directory) if n.startswith(".")]  # no temp files
    assert f"postfix-py -c {directory} start-fg" in output


@pytest.mark.skipif(not os.access(POSTCONF, os.X_OK), reason="Postfix is not installed")
def test_postfix_postconf_reads_instance(instance):
    directory, _ = instance
    for name in ("main.cf", "master.cf"):   # postconf waits for files of this second
        st = os.stat(directory / name)
        os.utime(directory / name, (st.st_atime, st.st_mtime - 10))
    result = subprocess.run([POSTCONF, "-c", str(directory), "-n"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "fatal" not in result.stderr
    assert f"queue_directory = {directory}/queue" in result.stdout.splitlines()
    result = subprocess.run([POSTCONF, "-c", str(directory), "-M"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    services = mastercf.load(str(directory / "master.cf"))
    assert "".join(mastercf.format_service(s) + "\n" for s in services) == result.stdout


# --- certificates ---------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_certificate_contents(instance, key_type):
    directory, _ = instance
    key_file, cert_file = KEYS[key_type]
    cert = x509.load_pem_x509_certificate((directory / cert_file).read_bytes())
    public = cert.public_key()
    if key_type == "rsa":
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert cert.issuer == cert.subject
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=364) < life <= datetime.timedelta(days=366)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_pyopenssl_loads_key_and_certificate(instance, key_type):
    directory, _ = instance
    key_file, cert_file = KEYS[key_type]
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_file(str(directory / cert_file))
    ctx.use_privatekey_file(str(directory / key_file))
    ctx.check_privatekey()


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1"])
def test_certificate_verifies_as_its_own_anchor(instance, key_type, server_name):
    directory, _ = instance
    key_file, cert_file = KEYS[key_type]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / cert_file, directory / key_file)
    client = ssl.create_default_context(cafile=str(directory / cert_file))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve():
        """Accept one TLS client and read its byte."""
        try:
            with server.wrap_socket(a, server_side=True) as conn:
                conn.recv(1)
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=server_name) as conn:
            conn.sendall(b"x")
    finally:
        thread.join(10)
    assert errors == []


def test_tlsgen_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError):
        tlsgen.new_key("dsa")
    with pytest.raises(ValueError):
        tlsgen.new_key("rsa", rsa_bits=1024)
    with pytest.raises(ValueError):
        tlsgen.self_signed(tlsgen.new_key(), dns_names=(), ip_addresses=())
    with pytest.raises(ValueError):
        tlsgen.self_signed(tlsgen.new_key(), ip_addresses=("not-an-address",))


def test_atomic_write_replaces_and_sets_mode(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    os.chmod(path, 0o666)
    tlsgen.atomic_write(str(path), b"new", 0o600)
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f"]


# --- the command line -----------------------------------------------------------------

def test_cli_creates_then_refuses_then_forces(tmp_path):
    directory = tmp_path / "inst"
    first = run("init", str(directory))
    assert first.returncode == 0, first.stderr
    assert f"postfix-py -c {directory} start-fg" in first.stdout
    (directory / "queue" / "keep").write_text("queued")
    before = snapshot(directory)

    again = run("init", str(directory))
    assert again.returncode == 1
    assert "already holds an instance" in again.stderr and "--force" in again.stderr
    assert again.stdout == ""
    assert snapshot(directory) == before

    forced = run("init", "--force", str(directory))
    assert forced.returncode == 0, forced.stderr
    after = snapshot(directory)
    for key_file, cert_file in KEYS.values():
        assert after[key_file][0] != before[key_file][0]     # new keys
        assert after[cert_file][0] != before[cert_file][0]   # and certificates
    assert (directory / "queue" / "keep").read_text() == "queued"
    maincf.load(str(directory))


def test_cli_refuses_when_only_master_cf_exists(tmp_path):
    (tmp_path / "master.cf").write_text("# mine\n")
    result = run("init", str(tmp_path))
    assert result.returncode == 1 and "master.cf exists" in result.stderr
    assert os.listdir(tmp_path) == ["master.cf"]
    assert (tmp_path / "master.cf").read_text() == "# mine\n"


def test_cli_port_base(tmp_path):
    result = run("init", str(tmp_path / "i"), "--port-base", "30000")
    assert result.returncode == 0, result.stderr
    ports = sorted(s.inet_port for s in mastercf.load(str(tmp_path / "i" / "master.cf"))
                   if s.type == "inet")
    assert ports == [30000, 30001, 30002, 30009]
    assert "30002" in (tmp_path / "i" / "master.cf").read_text()   # submission, commented


@pytest.mark.parametrize("value", ["x", "0", "-5", "65527", "2525.0", ""])
def test_cli_bad_port_base(tmp_path, value):
    result = run("init", str(tmp_path / "i"), f"--port-base={value}")
    assert result.returncode == 2
    assert "invalid port base" in result.stderr
    assert not (tmp_path / "i").exists()


def test_cli_syslog_name(tmp_path, instance):
    result = run("init", "--syslog-name", "postfix", str(tmp_path / "i"))
    assert result.returncode == 0, result.stderr
    cfg = maincf.load(str(tmp_path / "i"))
    assert cfg["syslog_name"] == "postfix" and cfg.unused() == []
    names = {s.key: s.overrides.get("syslog_name")
             for s in mastercf.load(str(tmp_path / "i" / "master.cf"))}
    assert names["127.0.0.1:2526/inet"] == "postfix/smtps"
    assert names["127.0.0.1:2527/inet"] == "postfix/submission"
    # Without the option main.cf leaves syslog_name at its default.
    assert "syslog_name" not in (instance[0] / "main.cf").read_text()
    assert maincf.load(str(instance[0]))["syslog_name"] == "postfix-py"


@pytest.mark.parametrize("value", ["", "post fix", "/postfix", "postfix/", "a$b", "x" * 65])
def test_cli_bad_syslog_name(tmp_path, value):
    result = run("init", str(tmp_path / "i"), f"--syslog-name={value}")
    assert result.returncode == 2 and "invalid syslog name" in result.stderr
    assert not (tmp_path / "i").exists()


def test_cli_directory_from_dash_c(tmp_path):
    result = run("-c", str(tmp_path / "i"), "init")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "i" / "main.cf").exists()
    result = run("-c", str(tmp_path / "j"), "init", str(tmp_path / "k"))
    assert result.returncode == 2 and "disagree" in result.stderr
    assert not (tmp_path / "j").exists() and not (tmp_path / "k").exists()


def test_cli_needs_directory():
    result = run("init")
    assert result.returncode == 2 and "DIR" in result.stderr


def test_cli_directory_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    result = run("init", str(tmp_path / "f"))
    assert result.returncode == 1 and "not a directory" in result.stderr


def _other_user():
    """A non-root user to run init as, when the tests run as root."""
    for name in ("daemon", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def test_non_root_mail_owner_is_the_user(tmp_path, monkeypatch):
    user = _other_user() if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
    if user is None:
        pytest.skip("no non-root user")
    monkeypatch.setattr(init.os, "geteuid", lambda: user.pw_uid)
    init.create(str(tmp_path / "i"), out=io.StringIO())
    assert maincf.load(str(tmp_path / "i"))["mail_owner"] == user.pw_name
    # Not root: nothing is given away; every file stays the invoking user's.
    assert os.stat(tmp_path / "i" / "data").st_uid == os.stat(tmp_path / "i").st_uid


def test_cli_as_non_root_user():
    """The real command run by a non-root user (as root: demoted to daemon or nobody)."""
    kwargs: dict = {}
    directory = tempfile.mkdtemp(prefix="postfix-py-init-")   # reachable by that user
    try:
        if os.geteuid() == 0:
            user = _other_user()
            if user is None:
                pytest.skip("no non-root user to run as")
            os.chown(directory, user.pw_uid, user.pw_gid)

            def demote():
                """Become the non-root user in the child, before exec."""
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

            kwargs = {"preexec_fn": demote, "env": {**os.environ, "HOME": directory},
                      "cwd": directory}
            try:
                probe = subprocess.run([sys.executable, "-c", "import postfix_py"],
                                       capture_output=True, timeout=60, **kwargs)
            except PermissionError:
                probe = None
            if probe is None or probe.returncode != 0:
                pytest.skip(f"{user.pw_name} cannot run {sys.executable}")
        else:
            user = pwd.getpwuid(os.geteuid())
        try:
            result = run("init", os.path.join(directory, "i"), **kwargs)
        except PermissionError:
            pytest.skip(f"{user.pw_name} cannot run {POSTFIX_PY}")
        assert result.returncode == 0, result.stderr
        instance = os.path.join(directory, "i")
        assert maincf.load(instance)["mail_owner"] == user.pw_name
        for key_file, _ in KEYS.values():
            st = os.stat(os.path.join(instance, key_file))
            assert st.st_uid == user.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
        assert os.stat(os.path.join(instance, "data")).st_uid == user.pw_uid
    finally:
        shutil.rmtree(directory)
