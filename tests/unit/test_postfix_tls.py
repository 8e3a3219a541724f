"""postfix-py tls (tools/postfix_tls.py): Postfix's postfix-tls(1) subcommands, plus server-fingerprint.

Most tests call main() in-process; the subprocess tests run the installed
`postfix-py tls ...` command line (the verb table in master/cli.py names tools/postfix_tls.py).
"""

import datetime
import hashlib
import itertools
import os
import shutil
import socket
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from helpers import POSTFIX_PY, run
from postfix_py.lib import maincf, tls
from postfix_py.tools import postfix_tls as tool

OPENSSL = shutil.which("openssl")
HAS_VERB = "tls" in __import__("postfix_py.master.cli", fromlist=["VERBS"]).VERBS


@pytest.fixture(autouse=True)
def distinct_file_names(monkeypatch):
    """Every new key or certificate gets its own second, as if time went on."""
    clock = itertools.count()
    start = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    monkeypatch.setattr(tool, "_now",
                        lambda: start + datetime.timedelta(seconds=next(clock)))


@pytest.fixture
def confdir(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    (d / "main.cf").write_text("# test instance\nmyhostname = mx.example.test\n")
    return d


def pft(confdir, *args):
    """main() as `postfix-py -c confdir tls args...` would call it."""
    return tool.main(["-c", str(confdir), *args])


def settings(confdir):
    cfg = maincf.load(str(confdir))
    return {name: entry.value for name, entry in cfg.entries.items()}


def new_files(confdir, prefix):
    return sorted(p for p in os.listdir(confdir) if p.startswith(prefix))


def no_traceback(text):
    assert "Traceback" not in text


# --- enable-server ------------------------------------------------------------------------

def test_enable_server_rsa(confdir, capsys):
    assert pft(confdir, "all-default-server") == 0
    assert pft(confdir, "enable-server") == 0
    err = capsys.readouterr().err
    assert "postfix-py/postfix-tls: Enabled opportunistic TLS in the Postfix SMTP server" in err
    [key] = new_files(confdir, "key-")
    [cert] = new_files(confdir, "cert-")
    assert key == "key-20260102-030405.pem" and cert == "cert-20260102-030405.pem"
    assert stat.S_IMODE(os.stat(confdir / key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(confdir / cert).st_mode) == 0o644
    values = settings(confdir)
    assert values["smtpd_tls_key_file"] == str(confdir / key)
    assert values["smtpd_tls_cert_file"] == str(confdir / cert)
    assert values["smtpd_tls_security_level"] == "may"
    assert values["smtpd_tls_loglevel"] == "1"
    assert values["smtpd_tls_received_header"] == "yes"
    certificate = x509.load_pem_x509_certificate((confdir / cert).read_bytes())
    assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
    assert certificate.public_key().key_size == 2048
    assert certificate.subject.rfc4514_string() == "CN=mx.example.test"
    assert certificate.issuer == certificate.subject
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.example.test"]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime.days >= 36500            # Postfix: a 100-year self-signed certificate
    assert pft(confdir, "all-default-server") == 1
    assert "# test instance" in (confdir / "main.cf").read_text()


def test_enable_server_ecdsa_with_hostnames(confdir):
    assert pft(confdir, "enable-server", "-a", "ecdsa", "-r", "dev:/dev/urandom",
               "mail.example.test", "mx.example.test") == 0
    [key] = new_files(confdir, "eckey-")
    [cert] = new_files(confdir, "eccert-")
    values = settings(confdir)
    assert values["smtpd_tls_eckey_file"] == str(confdir / key)
    assert values["smtpd_tls_eccert_file"] == str(confdir / cert)
    assert values["tls_random_source"] == "dev:/dev/urandom"
    assert "smtpd_tls_cert_file" not in values
    certificate = x509.load_pem_x509_certificate((confdir / cert).read_bytes())
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test", "mx.example.test"]


def test_enabled_server_serves_tls(confdir):
    """What enable-server writes is what lib/tls.py loads: a real handshake."""
    assert pft(confdir, "enable-server", "-a", "ecdsa") == 0
    server = tls.server_tls(maincf.load(str(confdir)), warn=lambda t: None)
    client = tls.client_tls(maincf.load(str(confdir)), warn=lambda t: None)
    a, b = socket.socketpair()
    try:
        s = server.connection(a, "localhost[127.0.0.1]")
        c = client.connection(b, "mx.example.test[127.0.0.1]:25")
        thread = threading.Thread(target=tls.handshake, args=(s, 5))
        thread.start()
        tls.handshake(c, 5)
        thread.join()
        info = client.info(c)
        assert info.peer_CN == "mx.example.test" and info.status == "Untrusted"
        tls.shutdown(c, 1)
        tls.shutdown(s, 1)
    finally:
        a.close()
        b.close()


def test_enable_server_leaves_non_default_settings_alone(confdir, capsys):
    (confdir / "main.cf").write_text("smtpd_tls_security_level = encrypt\n")
    assert pft(confdir, "all-default-server") == 1
    assert pft(confdir, "enable-server") == 0
    err = capsys.readouterr().err
    assert "*** Non-default SMTP server TLS settings detected, no changes made." in err
    assert "smtpd_tls_security_level = may" in err
    assert new_files(confdir, "key-") == []
    assert (confdir / "main.cf").read_text() == "smtpd_tls_security_level = encrypt\n"


def test_empty_setting_counts_as_default(confdir):
    (confdir / "main.cf").write_text("myhostname = mx.example.test\nsmtpd_tls_cert_file =\n")
    assert pft(confdir, "all-default-server") == 0


# --- new-server-key, new-server-cert, deploy-server-cert -----------------------------------

def test_new_server_key_does_not_deploy(confdir, capsys):
    before = (confdir / "main.cf").read_text()
    assert pft(confdir, "new-server-key", "-a", "ecdsa", "-b", "secp384r1") == 0
    [key] = new_files(confdir, "eckey-")
    [cert] = new_files(confdir, "eccert-")
    assert (confdir / "main.cf").read_text() == before
    err = capsys.readouterr().err
    assert (f"  # postfix-py tls deploy-server-cert {confdir / cert} {confdir / key}"
            in err)
    assert "(deploy after updating the DNS and waiting for stale RRs to expire)." in err
    certificate = x509.load_pem_x509_certificate((confdir / cert).read_bytes())
    assert certificate.public_key().curve.name == "secp384r1"


def test_new_server_cert_keeps_the_deployed_key(confdir, capsys):
    assert pft(confdir, "enable-server") == 0
    [old_key] = new_files(confdir, "key-")
    assert pft(confdir, "new-server-cert", "other.example.test") == 0
    keys = new_files(confdir, "key-")
    certs = new_files(confdir, "cert-")
    assert len(keys) == len(certs) == 2
    old = serialization.load_pem_private_key((confdir / keys[0]).read_bytes(), None)
    new = serialization.load_pem_private_key((confdir / keys[1]).read_bytes(), None)
    assert old.private_numbers() == new.private_numbers()
    certificate = x509.load_pem_x509_certificate((confdir / certs[1]).read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=other.example.test"
    err = capsys.readouterr().err
    assert "(deploy after updating the DNS" not in err.split("deploy-server-cert")[-1]
    assert settings(confdir)["smtpd_tls_key_file"] == str(confdir / old_key)


def test_new_server_cert_without_a_deployed_key_makes_one(confdir, capsys):
    (confdir / "main.cf").write_text("myhostname = mx.example.test\n"
                                     f"smtpd_tls_key_file = {confdir}/gone.pem\n")
    assert pft(confdir, "new-server-cert") == 0
    assert f"warning: Key file: {confdir}/gone.pem not found, creating new keys" in \
        capsys.readouterr().err
    assert len(new_files(confdir, "key-")) == 1


def test_deploy_server_cert(confdir, capsys):
    assert pft(confdir, "new-server-key", "-a", "ecdsa") == 0
    [key] = new_files(confdir, "eckey-")
    [cert] = new_files(confdir, "eccert-")
    assert pft(confdir, "deploy-server-cert", cert, key) == 0       # relative names
    values = settings(confdir)
    assert values["smtpd_tls_eccert_file"] == str(confdir / cert)
    assert values["smtpd_tls_eckey_file"] == str(confdir / key)
    assert "smtpd_tls_security_level" not in values
    assert "New TLS private key and certificate deployed." in capsys.readouterr().err


def test_deploy_server_cert_refuses_a_mismatch(confdir, capsys):
    assert pft(confdir, "new-server-key", "-a", "ecdsa") == 0
    assert pft(confdir, "new-server-key", "-a", "ecdsa") == 0
    keys, certs = new_files(confdir, "eckey-"), new_files(confdir, "eccert-")
    capsys.readouterr()
    assert pft(confdir, "deploy-server-cert", certs[0], keys[1]) == 1
    err = capsys.readouterr().err
    assert err == (f"postfix-py/postfix-tls: fatal: Certificate in {confdir / certs[0]} does "
                   f"not match key in {confdir / keys[1]}\n")


@pytest.mark.parametrize("args,message", [
    (["deploy-server-cert", "cert.pem"],
     "usage: postfix-py tls deploy-server-cert certfile keyfile"),
    (["deploy-server-cert", "nope.pem", "nokey.pem"], "no private key found in file: {d}/nokey.pem"),
    (["new-server-key", "-b", "1024"], "RSA key size 1024 is below 2048 bits"),
    (["new-server-key", "-b", "lots"], "invalid RSA key size: lots"),
    (["new-server-key", "-a", "dsa"], "Unsupported private key algorithm: dsa"),
    (["new-server-key", "-a", "ecdsa", "-b", "secp192k1"], "unsupported EC curve: secp192k1"),
    (["new-server-key", "-x"], "usage: postfix-py tls new-server-key [-a algorithm] [-b bits ] "
                               "[hostname ...]"),
    (["enable-client", "extra"], "usage: postfix-py tls enable-client [-r devrandom]"),
    (["all-default-server", "extra"], "usage: postfix-py tls all-default-server"),
    (["output-server-tlsa", "none"], "No usable keyfiles specified or configured"),
    (["output-server-csr"], "No usable keyfile specified or configured"),
    (["server-fingerprint"], "no server certificate configured"),
    (["server-fingerprint", "-d", "crc32", "x.pem"], "unsupported digest: crc32"),
    (["server-fingerprint", "missing.pem"], "cannot read certificate file {d}/missing.pem"),
])
def test_errors_are_one_fatal_line(confdir, capsys, args, message):
    assert pft(confdir, *args) == 1
    err = capsys.readouterr().err
    no_traceback(err)
    assert len(err.splitlines()) == 1
    assert err.startswith("postfix-py/postfix-tls: fatal: " + message.format(d=confdir))


def test_encrypted_key_is_a_clear_error(confdir, capsys):
    key = ec.generate_private_key(ec.SECP256R1())
    (confdir / "enc.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    assert pft(confdir, "deploy-server-cert", "enc.pem", "enc.pem") == 1
    err = capsys.readouterr().err
    assert err.startswith("postfix-py/postfix-tls: fatal: the private key in ")
    assert "is encrypted" in err and len(err.splitlines()) == 1


def test_unknown_command(confdir, capsys):
    assert pft(confdir, "bogus") == 1
    assert capsys.readouterr().err.splitlines() == [
        "postfix-py/postfix-tls: error: unknown tls command: 'bogus'",
        "postfix-py/postfix-tls: fatal: " + tool.COMMAND_USAGE]


def test_missing_config_directory(tmp_path, capsys):
    assert tool.main(["-c", str(tmp_path / "nowhere"), "all-default-server"]) == 1
    assert "fatal: no Postfix configuration directory" in capsys.readouterr().err


def test_no_command(confdir, capsys):
    assert tool.main(["-c", str(confdir)]) == 1
    assert capsys.readouterr().err.endswith(tool.COMMAND_USAGE + "\n")


# --- client -------------------------------------------------------------------------------

def test_enable_client(confdir, capsys):
    assert pft(confdir, "all-default-client") == 0
    assert pft(confdir, "enable-client", "-r", "dev:/dev/urandom") == 0
    values = settings(confdir)
    assert values["smtp_tls_security_level"] == "may"
    assert values["smtp_tls_loglevel"] == "1"
    assert values["smtp_tls_session_cache_database"] == "lmdb:${data_directory}/smtp_scache"
    assert values["tls_random_source"] == "dev:/dev/urandom"
    assert "Enabled opportunistic TLS in the Postfix SMTP client." in capsys.readouterr().err
    assert pft(confdir, "all-default-client") == 1
    assert pft(confdir, "enable-client") == 0
    assert "*** Non-default SMTP client TLS settings detected" in capsys.readouterr().err


# --- output ---------------------------------------------------------------------------------

def test_output_server_tlsa(confdir, capsys):
    assert pft(confdir, "enable-server") == 0
    assert pft(confdir, "new-server-key", "-a", "ecdsa") == 0
    [key] = new_files(confdir, "key-")
    [eckey] = new_files(confdir, "eckey-")
    capsys.readouterr()
    assert pft(confdir, "output-server-tlsa", "-h", "mail.example.test", "rsa", eckey) == 0
    out = capsys.readouterr().out.splitlines()
    expected = []
    for name in (key, eckey):
        k = serialization.load_pem_private_key((confdir / name).read_bytes(), None)
        spki = k.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
        expected += [f"; {confdir / name}",
                     f"_25._tcp.mail.example.test. IN TLSA 3 1 1 "
                     f"{hashlib.sha256(spki).hexdigest()}"]
    assert out == expected
    assert pft(confdir, "output-server-tlsa") == 0          # the deployed rsa key only
    assert capsys.readouterr().out.splitlines() == [
        expected[0], expected[1].replace("_25._tcp.mail.", "_25._tcp.mx.")]


def test_output_server_csr(confdir, capsys):
    assert pft(confdir, "enable-server", "-a", "ecdsa") == 0
    capsys.readouterr()
    assert pft(confdir, "output-server-csr", "-k", "ecdsa", "a.example.test",
               "b.example.test") == 0
    csr = x509.load_pem_x509_csr(capsys.readouterr().out.encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example.test", "b.example.test"]
    [key] = new_files(confdir, "eckey-")
    k = serialization.load_pem_private_key((confdir / key).read_bytes(), None)
    assert csr.public_key() == k.public_key()


@pytest.mark.skipif(not OPENSSL, reason="openssl command not installed")
@pytest.mark.parametrize("digest", ["md5", "sha1", "sha256"])
def test_server_fingerprint_matches_openssl(confdir, capsys, digest):
    assert pft(confdir, "enable-server", "-a", "ecdsa") == 0
    [cert] = new_files(confdir, "eccert-")
    capsys.readouterr()
    assert pft(confdir, "server-fingerprint", "-d", digest) == 0
    out = capsys.readouterr().out
    expected = subprocess.run([OPENSSL, "x509", "-in", str(confdir / cert), "-noout",
                               "-fingerprint", f"-{digest}"], capture_output=True, text=True,
                              check=True).stdout.strip().split("=", 1)[1]
    certificate = x509.load_pem_x509_certificate((confdir / cert).read_bytes())
    assert out == (f"{confdir / cert}: fingerprint={expected}, "
                   f"pkey_fingerprint={tls.pkey_fingerprint(certificate, digest)}\n")


def test_server_fingerprint_default_digest_from_main_cf(confdir, capsys):
    assert pft(confdir, "enable-server") == 0
    with open(confdir / "main.cf", "a") as f:
        f.write("smtpd_tls_fingerprint_digest = md5\n")
    capsys.readouterr()
    assert pft(confdir, "server-fingerprint") == 0
    fp = capsys.readouterr().out.split("fingerprint=")[1].split(",")[0]
    assert len(fp.split(":")) == 16


# --- the installed command ----------------------------------------------------------------

@pytest.mark.skipif(not HAS_VERB, reason="postfix-py has no tls verb yet")
def test_command_line_enable_server_and_fingerprint(confdir):
    r = run("-c", confdir, "tls", "enable-server", "-a", "ecdsa")
    assert r.returncode == 0, r.stderr
    assert "Enabled opportunistic TLS in the Postfix SMTP server" in r.stderr
    r = run("-c", confdir, "tls", "server-fingerprint", "-d", "sha1")
    assert r.returncode == 0 and "fingerprint=" in r.stdout
    r = run("-c", confdir, "tls", "all-default-server")
    assert r.returncode == 1


@pytest.mark.skipif(not HAS_VERB, reason="postfix-py has no tls verb yet")
@pytest.mark.parametrize("args", [["bogus"], ["new-server-key", "-b", "512"],
                                  ["deploy-server-cert", "a", "b"]])
def test_command_line_errors_exit_1_without_traceback(confdir, args):
    r = run("-c", confdir, "tls", *args)
    assert r.returncode == 1
    assert "fatal: " in r.stderr
    no_traceback(r.stderr)


@pytest.mark.skipif(not HAS_VERB, reason="postfix-py has no tls verb yet")
def test_command_line_is_installed():
    assert os.access(POSTFIX_PY, os.X_OK)
