"""postfix-py posttls-finger against a real STARTTLS server, side by side with Debian's.

The server is a small SMTP/LMTP responder in a thread, with Python's ssl module and trustme
certificates (its SSLContext issues TLS 1.3 tickets, so -r can resume). Each case runs
Debian's posttls-finger (skipped when absent) and ours with the same options, and compares
their output line by line once the parts that legitimately differ are normalised: the EHLO
name, the cache-key digest (a different salt), and subject_CN (see the report on lib/tls).
"""

import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import run  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

from postfix_py.lib import tls as libtls  # noqa: E402
from postfix_py.tools import posttls_finger  # noqa: E402

pytestmark = pytest.mark.interop
DEBIAN_FINGER = shutil.which("posttls-finger", path="/usr/sbin:/usr/bin")


class StartTlsServer(threading.Thread):
    """EHLO/LHLO, STARTTLS, QUIT on 127.0.0.1; one connection at a time."""

    def __init__(self, ctx, offer_tls=True, lmtp=False):
        super().__init__(daemon=True)
        self.ctx = ctx
        self.offer_tls = offer_tls
        self.lmtp = lmtp
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.commands = []
        self.start()

    def run(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            try:
                conn.settimeout(10)
                self.serve(conn)
            except (OSError, ssl.SSLError, EOFError):
                pass
            finally:
                conn.close()

    def serve(self, conn):
        f = conn.makefile("rwb", buffering=0)
        try:
            f.write(b"220 finger.test ESMTP ready\r\n")
            tls = None
            while True:
                line = (tls or f).readline()
                if not line:
                    return
                cmd = line.decode().strip().upper()
                self.commands.append(cmd)
                if cmd.startswith(("EHLO", "LHLO")):
                    ext = b"250-STARTTLS\r\n" if self.offer_tls and tls is None else b""
                    (tls or f).write(b"250-finger.test\r\n250-PIPELINING\r\n" + ext +
                                     b"250 8BITMIME\r\n")
                elif cmd == "STARTTLS":
                    f.write(b"220 2.0.0 Ready to start TLS\r\n")
                    sock = self.ctx.wrap_socket(conn, server_side=True)
                    tls = sock.makefile("rwb", buffering=0)
                    conn = sock
                elif cmd == "QUIT":
                    (tls or f).write(b"221 2.0.0 Bye\r\n")
                    if isinstance(conn, ssl.SSLSocket):
                        try:
                            conn.unwrap()
                        except (OSError, ssl.SSLError):
                            pass
                    return
                else:
                    (tls or f).write(b"502 5.5.2 Error: command not recognized\r\n")
        finally:
            f.close()
            if isinstance(conn, ssl.SSLSocket):
                conn.close()

    def stop(self):
        self.stopping = True
        self.join(10)
        self.listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("finger-pki")
    for p in (d, *d.parents):     # Postfix reads CApath as an unprivileged user
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, 0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "mx.finger.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    capath = d / "capath"
    capath.mkdir()
    ca.cert_pem.write_to_path(str(capath / "ca.pem"))
    if shutil.which("openssl"):
        subprocess.run(["openssl", "rehash", str(capath)], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "chain.pem"))
    return {"ca": str(d / "ca.pem"), "capath": str(capath), "ctx": ctx,
            "chain": str(d / "chain.pem"),
            "fp": libtls.fingerprint(cert.cert_chain_pems[0].bytes(), "sha256")}


@pytest.fixture(scope="module")
def server(pki):
    srv = StartTlsServer(pki["ctx"])
    yield srv
    srv.stop()


def ours(*args) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = posttls_finger.main(list(args))
    assert status == 0
    return buf.getvalue()


def debian(*args) -> str:
    if not DEBIAN_FINGER:
        pytest.skip("Debian's posttls-finger is not installed")
    out = subprocess.run([DEBIAN_FINGER, *args], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def normalise(text: str) -> list[str]:
    text = re.sub(r"([>] [EL]HLO) \S+", r"\1 NAME", text)
    text = re.sub(r"subject_CN=[^,]*", "subject_CN=X", text)
    text = re.sub(r"&[0-9A-F]{64}", "&DIGEST", text)
    return [line for line in text.splitlines() if not line.startswith("posttls-finger: warning: DNSSEC")
            and "dnssec_probe" not in line]


@pytest.mark.parametrize("case", [
    ["-l", "verify", "-F", "{ca}"],
    ["-c", "-l", "secure", "-F", "{ca}", "{dest}", "mx.finger.test"],
    ["-c", "-l", "secure", "-F", "{ca}", "{dest}", "other.example"],
    ["-c", "-l", "verify", "-P", "{capath}"],
    ["-c", "-l", "secure"],                     # no CAfile: untrusted issuer
    ["-c", "-l", "may", "-L", "summary"],
    ["-c", "-l", "encrypt", "-L", "summary,peercert"],
    ["-c", "-l", "fingerprint", "{dest}", "{fp}"],
    ["-c", "-l", "fingerprint", "{dest}", "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:"
     "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"],
    ["-c", "-C", "-l", "may", "-L", "none"],
    ["-c", "-r", "1", "-l", "verify", "-F", "{ca}"],
])
def test_same_output_as_debian(server, pki, case):
    dest = f"[localhost]:{server.port}"
    args = ["-h", "native"] + [a.format(dest=dest, **pki) for a in case]
    if "{dest}" not in case:
        args.append(dest)
    mine = ours(*args)
    theirs = debian(*args)
    assert normalise(mine) == normalise(theirs), f"ours:\n{mine}\nDebian's:\n{theirs}"


def test_report_contents(server, pki):
    text = ours("-h", "native", "-l", "verify", "-F", pki["ca"], f"[localhost]:{server.port}")
    relay = f"localhost[127.0.0.1]:{server.port}"
    assert f"posttls-finger: Connected to {relay}\n" in text
    assert "posttls-finger: > STARTTLS\n" in text
    assert f"posttls-finger: {relay}: matched peername: localhost\n" in text
    assert f"posttls-finger: Verified TLS connection established to {relay}: TLSv1.3" in text
    assert "posttls-finger: > QUIT\n" in text


def test_reconnect_resumes_the_session(server, pki):
    text = ours("-h", "native", "-c", "-r", "1", "-l", "may", f"[localhost]:{server.port}")
    relay = f"localhost[127.0.0.1]:{server.port}"
    assert "posttls-finger: Reconnecting after 1 seconds\n" in text
    assert re.search(rf"reloaded session \[127\.0\.0\.1\]:{server.port}&[0-9A-F]{{64}} "
                     r"from memory cache", text)
    assert f"posttls-finger: {relay}: Reusing old session\n" in text
    assert text.endswith("posttls-finger: Found a previously used server.  Done reconnecting.\n")


def test_no_starttls_offered(pki):
    srv = StartTlsServer(pki["ctx"], offer_tls=False)
    try:
        text = ours("-h", "native", "-l", "may", f"[127.0.0.1]:{srv.port}")
    finally:
        srv.stop()
    assert "STARTTLS" not in text and "TLS connection" not in text
    assert text.endswith("posttls-finger: < 221 2.0.0 Bye\n")


def test_lmtp_mode(pki):
    srv = StartTlsServer(pki["ctx"], lmtp=True)
    try:
        text = ours("-h", "native", "-S", "-l", "may", f"inet:[127.0.0.1]:{srv.port}")
    finally:
        srv.stop()
    assert "posttls-finger: > LHLO " in text
    assert "TLS connection established to 127.0.0.1[127.0.0.1]" in text


def test_failures_are_reported_like_postfix():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    dest = f"[127.0.0.1]:{number}"
    text = ours("-h", "native", dest)
    assert text == (f"posttls-finger: Failed to establish session to {dest} via 127.0.0.1: "
                    f"connect to 127.0.0.1[127.0.0.1]:{number}: Connection refused\n")
    if DEBIAN_FINGER:
        assert normalise(text) == normalise(debian("-h", "native", dest))


def test_usage_errors(capsys):
    assert posttls_finger.main([]) == 1
    assert "usage: posttls-finger" in capsys.readouterr().err
    assert posttls_finger.main(["-l", "sometimes", "[127.0.0.1]"]) == 1
    assert 'Invalid TLS level "sometimes"' in capsys.readouterr().err
    for opt, why in (("-X", "tlsproxy(8) mode needs tlsproxy(8), which postfix-py does "
                            "not have"),
                     ("-R", "SRV lookups (Postfix 3.8) are not implemented"),
                     ("-x", "raw public keys (RFC 7250, Postfix 3.9) are not implemented")):
        assert posttls_finger.main(["-c", opt, "[127.0.0.1]"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"posttls-finger: option {opt} is not supported by "
                              f"postfix-py: {why}\nusage: posttls-finger"), err


def test_command_line_verb(server, pki, tmp_path):
    (tmp_path / "main.cf").write_text("myhostname = finger-client.test\n")
    out = run("-c", str(tmp_path), "posttls-finger", "-h", "native", "-l", "verify",
              "-F", pki["ca"], f"[localhost]:{server.port}")
    assert out.returncode == 0, out.stderr
    assert "posttls-finger: > EHLO finger-client.test" in out.stdout
    assert "Verified TLS connection established" in out.stdout


@pytest.fixture(scope="module")
def tls10_server(pki):
    """The same server, speaking TLS 1.0 only (at OpenSSL security level 0)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)     # TLSv1 is, as a setting
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(pki["chain"])
    srv = StartTlsServer(ctx)
    yield srv
    srv.stop()


@pytest.mark.parametrize("case,established", [
    (["-c", "-l", "may", "-L", "summary"], True),
    (["-c", "-l", "encrypt", "-L", "summary"], True),
    (["-c", "-l", "verify", "-F", "{ca}", "-L", "summary"], False),   # security level 1
])
def test_tls10_server_as_debian_sees_it(tls10_server, pki, case, established):
    """smtp_tls_protocols = >=TLSv1 means TLS 1.0 too, but not where the peer must match."""
    dest = f"[localhost]:{tls10_server.port}"
    args = ["-h", "native"] + [a.format(**pki) for a in case] + [dest]
    mine, theirs = ours(*args), debian(*args)
    relay = f"localhost[127.0.0.1]:{tls10_server.port}"
    if established:
        assert f"TLS connection established to {relay}: TLSv1 with cipher" in mine, mine
        assert normalise(mine) == normalise(theirs)
    else:
        # OpenSSL's reason differs: ours does not offer TLS 1.0 at level 1, Debian's
        # offers it and then refuses the server's SHA-1 signature.
        for text in (mine, theirs):
            assert f"SSL_connect error to {relay}: -1" in text, text
            assert "TLS connection established" not in text, text


# --- -A trust anchors -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ta_server(tmp_path_factory):
    """A server that sends its certificate and an intermediate (not the root), and PEM
    files of each level: certificates and bare public keys, and an unrelated CA."""
    d = tmp_path_factory.mktemp("finger-ta")
    ca = trustme.CA()
    inter = ca.create_child_ca()
    cert = inter.issue_cert("localhost", "mx.finger.test")
    files = {"ca": ca.cert_pem.bytes(), "inter": inter.cert_pem.bytes(),
             "leaf": cert.cert_chain_pems[0].bytes(), "other": trustme.CA().cert_pem.bytes()}
    for name in ("ca", "inter"):
        key = x509.load_pem_x509_certificate(files[name]).public_key()
        files[name + "key"] = key.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    srv = StartTlsServer(ctx)
    srv.dir = d
    yield srv
    srv.stop()


@pytest.mark.parametrize("case", [
    ["-l", "secure", "-A", "{d}/ca.pem"],                   # the root, not sent: depth 2
    ["-l", "secure", "-A", "{d}/inter.pem"],                # sent: depth 1
    ["-l", "secure", "-A", "{d}/leaf.pem"],                 # the server's own: depth 0
    ["-l", "secure", "-A", "{d}/cakey.pem"],                # a bare key that signed depth 1
    ["-l", "verify", "-A", "{d}/interkey.pem", "-L", "routine,certmatch,dane"],
    ["-l", "secure", "-A", "{d}/other.pem"],                # no match: num=65
    ["-l", "secure", "-F", "{d}/ca.pem", "-A", "{d}/other.pem"],    # -A replaces -F
    ["-l", "secure", "-A", "{d}/other.pem", "-A", "{d}/inter.pem"],
    ["-l", "secure", "-A", "{d}/ca.pem", "{dest}", "other.example"],    # names still count
    ["-l", "secure", "-A", "{d}/leaf.pem", "{dest}", "other.example"],  # at depth 0 too
    ["-l", "secure", "-A", "{d}/ca.pem", "-L", "summary,peercert"],
    ["-l", "may", "-A", "{d}/ca.pem"],                      # ignored below verify
    ["-l", "secure", "-A", "{d}/ca.pem", "-r", "1"],        # resumed: still Verified
])
def test_trust_anchors_as_debian(ta_server, case):
    dest = f"[localhost]:{ta_server.port}"
    args = ["-h", "native", "-c"] + [a.format(d=ta_server.dir, dest=dest) for a in case]
    if "{dest}" not in case:
        args.append(dest)
    mine = ours(*args)
    assert normalise(mine) == normalise(debian(*args)), mine


def test_trust_anchor_report(ta_server):
    """Without Debian's tool as well: what -A says, by itself."""
    relay = f"localhost[127.0.0.1]:{ta_server.port}"
    dest = f"[localhost]:{ta_server.port}"
    d = ta_server.dir
    for ta, depth in (("ca", 2), ("inter", 1), ("leaf", 0), ("cakey", 1), ("interkey", 1)):
        text = ours("-h", "native", "-c", "-l", "secure", "-A", f"{d}/{ta}.pem", dest)
        assert f"posttls-finger: {relay}: matched peername: localhost\n" \
               f"posttls-finger: {relay}: Matched trust anchor at depth {depth}\n" in text, ta
        assert f"posttls-finger: Verified TLS connection established to {relay}" in text, ta
    text = ours("-h", "native", "-c", "-l", "secure", "-F", f"{d}/ca.pem", "-A",
                f"{d}/other.pem", dest)
    assert (f"posttls-finger: CA certificate verification failed for {relay}: num=65:no "
            f"matching DANE TLSA records\n") in text
    assert f"posttls-finger: Untrusted TLS connection established to {relay}" in text
    text = ours("-h", "native", "-c", "-l", "secure", "-A", f"{d}/ca.pem", dest, "other.example")
    assert f"posttls-finger: server certificate verification failed for {relay}: " \
           f"num=62:hostname mismatch\n" in text
    assert f"posttls-finger: Untrusted TLS connection established to {relay}" in text
    text = ours("-h", "native", "-c", "-l", "verify", "-A", f"{d}/leaf.pem", "-L", "dane", dest)
    der = x509.load_pem_x509_certificate((d / "leaf.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert (f"posttls-finger: TA cert as TLSA record: {d}/leaf.pem: 2 0 0 "
            f"{der[:32].hex().upper()}...{der[-32:].hex().upper()}\n") in text


def test_trust_anchor_files_that_cannot_be_used(ta_server, tmp_path, capsys):
    """Postfix's warning, then "fatal: Failed to load trust anchor file", exit status 1,
    before any connection; below verify the files are not even read."""
    dest = f"[localhost]:{ta_server.port}"
    before = len(ta_server.commands)
    (tmp_path / "empty.pem").write_text("no PEM here\n")
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n"
                                      "-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    for path, lines in (
            (missing, [f"posttls-finger: warning: error opening trust anchor file: {missing}: "
                       f"No such file or directory"]),
            (tmp_path / "empty.pem", []),
            (tmp_path / "bad.pem", [f"posttls-finger: warning: error reading: "
                                    f"{tmp_path}/bad.pem: malformed trust-anchor cert"])):
        assert posttls_finger.main(["-h", "native", "-l", "secure", "-A", str(path), dest]) == 1
        assert capsys.readouterr().out.splitlines() == lines + [
            f"posttls-finger: fatal: Failed to load trust anchor file: {path}"]
    assert len(ta_server.commands) == before
    text = ours("-h", "native", "-c", "-l", "may", "-A", str(missing), dest)
    assert "TLS connection established" in text
