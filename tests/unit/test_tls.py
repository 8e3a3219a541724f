"""lib/tls.py: contexts from parameters, real handshakes, and Postfix 3.7's exact words.

The expected log lines and Received: header text below were observed from Debian's Postfix
3.7.11 (OpenSSL 3.0) with the same kind of certificates: a private instance on loopback,
swaks, openssl s_client and posttls-finger (see the module docstring of lib/tls.py).
"""

import datetime
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from postfix_py.lib import maincf, tls, tls_session

OPENSSL = shutil.which("openssl")
NAMADDR = "localhost[127.0.0.1]"
SERVER_AT = "mx.example.test[127.0.0.1]:25"

# RFC 7919 ffdhe2048, as `openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048`.
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


# --- fixtures -----------------------------------------------------------------------------

def _name(cn=None, org=None):
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _cert(key, subject, issuer, issuer_key, *, ca=False, sans=None, days=(-1, 30), eku=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + datetime.timedelta(days=days[0]))
         .not_valid_after(now + datetime.timedelta(days=days[1]))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(*objs):
    out = b""
    for o in objs:
        if isinstance(o, x509.Certificate):
            out += o.public_bytes(serialization.Encoding.PEM)
        else:
            out += o.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Certificates and keys on disk, as main.cf would name them."""
    d = tmp_path_factory.mktemp("pki")
    f = {}

    def write(name, data):
        path = d / name
        path.write_bytes(data)
        f[name] = str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(org="Test CA")                # no CN: Postfix falls back to O
    ca = _cert(ca_key, ca_name, ca_name, ca_key, ca=True)
    write("ca.pem", _pem(ca))
    f["ca_cert"] = ca

    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = _name(cn="Intermediate CA")
    inter = _cert(inter_key, inter_name, ca_name, ca_key, ca=True)

    def leaf(fname, key, cn, sans=None, issuer=(ca_name, ca_key), chain=(), **kw):
        cert = _cert(key, _name(cn=cn, org="trustme v1.2.1") if cn else _name(org="No CN"),
                     issuer[0], issuer[1], sans=sans, **kw)
        write(fname, _pem(key, cert, *chain))
        f[fname + ":cert"] = cert
        return cert

    server_names = [x509.DNSName("mx.example.test")]
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf("rsa.pem", rsa_key, "mx.example.test", server_names)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    leaf("ec.pem", ec_key, "mx.example.test", server_names)
    leaf("client.pem", ec.generate_private_key(ec.SECP256R1()), "client.example.test",
         [x509.DNSName("client.example.test")], eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    leaf("chained-client.pem", ec.generate_private_key(ec.SECP256R1()), "deep.example.test",
         [x509.DNSName("deep.example.test")], issuer=(inter_name, inter_key), chain=(inter,))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = _name(cn="Other CA")
    write("otherca.pem", _pem(_cert(other_key, other_name, other_name, other_key, ca=True)))
    leaf("stranger.pem", ec.generate_private_key(ec.SECP256R1()), "stranger.example.test",
         [x509.DNSName("stranger.example.test")], issuer=(other_name, other_key))
    leaf("ctrl-cn.pem", ec.generate_private_key(ec.SECP256R1()), "bad\x01name")
    leaf("expired.pem", ec.generate_private_key(ec.SECP256R1()), "old.example.test",
         server_names, days=(-30, -1))

    # Separate key and certificate files, an encrypted key, a key of another certificate.
    write("ec-cert-only.pem", _pem(f["ec.pem:cert"]))
    write("ec-key-only.pem", _pem(ec_key))
    write("encrypted-key.pem", ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    write("traditional-encrypted-key.pem", rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"secret")))
    write("other-key.pem", _pem(ec.generate_private_key(ec.SECP256R1())))
    write("both-chains.pem", (d / "ec.pem").read_bytes() + (d / "rsa.pem").read_bytes())
    write("cert-first.pem", _pem(f["ec.pem:cert"], ec_key))
    write("ffdhe2048.pem", FFDHE2048)
    write("garbage.pem", b"this is not PEM\n")

    dsa_key = dsa.generate_private_key(2048)
    leaf("dsa.pem", dsa_key, "mx.example.test", server_names)
    return f


def make_cfg(tmp_path, text="", name="cfg"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "main.cf").write_text(text)
    return maincf.load(str(d))


class Log:
    """Collects info() and warn() lines as the daemons would log them."""

    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)

    def warn(self, text):
        self.lines.append("warning: " + text)

    def warnings(self):
        return [line for line in self.lines if line.startswith("warning: ")]


def server_for(tmp_path, pki, extra="", log=None, level=None):
    log = log or Log()
    cfg = make_cfg(tmp_path, f"smtpd_tls_cert_file = {pki['rsa.pem']}\n"
                             f"smtpd_tls_eccert_file = {pki['ec.pem']}\n"
                             f"smtpd_tls_CAfile = {pki['ca.pem']}\n" + extra, "server")
    return tls.server_tls(cfg, level=level, warn=log.warn, info=log.info), log


def client_for(tmp_path, pki, extra="", log=None):
    log = log or Log()
    cfg = make_cfg(tmp_path, f"smtp_tls_CAfile = {pki['ca.pem']}\n" + extra, "client")
    return tls.client_tls(cfg, warn=log.warn, info=log.info), log


def recv(conn, timeout=10):
    """Read what the peer sent: pyOpenSSL on a socket with a timeout wants select()."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return conn.recv(100)
        except SSL.WantReadError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([conn], [], [], left)[0]:
                raise AssertionError("nothing to read") from None


class Session:
    """One handshake between a ServerTLS and a ClientTLS over a socketpair."""

    def __init__(self, server, client, mandatory=False, session=None, servername=None,
                 timeout=5, client_ctx=None):
        self.a, self.b = socket.socketpair()
        self.server = server.connection(self.a, NAMADDR, mandatory)
        if client_ctx is not None:
            self.client = SSL.Connection(client_ctx, self.b)
            self.client.set_connect_state()
        else:
            self.client = client.connection(self.b, SERVER_AT, mandatory,
                                            servername=servername, session=session)
        self.server_error = self.client_error = None

        def serve():
            try:
                tls.handshake(self.server, timeout)
            except tls.TLSHandshakeError as exc:
                self.server_error = exc
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            if client_ctx is not None:
                self.b.setblocking(True)
                self.client.do_handshake()
            else:
                tls.handshake(self.client, timeout)
        except (tls.TLSHandshakeError, SSL.Error) as exc:
            self.client_error = exc
        thread.join()

    @property
    def ok(self):
        return self.server_error is None and self.client_error is None

    def first_read(self):
        """The server's greeting read by the client: TLS 1.3 tickets arrive here."""
        self.a.setblocking(True)
        self.server.sendall(b"220 ok\r\n")
        return recv(self.client)

    def close(self):
        for conn in (self.client, self.server):
            tls.shutdown(conn, 1)
        self.a.close()
        self.b.close()


@pytest.fixture
def session_factory():
    made = []

    def factory(*args, **kw):
        s = Session(*args, **kw)
        made.append(s)
        return s
    yield factory
    for s in made:
        s.close()


# --- certificates and keys ----------------------------------------------------------------

def test_dual_certificates_by_tls12_cipher(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki)
    for cipher, key_type in (("ECDHE-RSA-AES128-GCM-SHA256", rsa.RSAPublicKey),
                             ("ECDHE-ECDSA-AES128-GCM-SHA256", ec.EllipticCurvePublicKey)):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(cipher.encode())
        s = session_factory(server, None, client_ctx=ctx)
        assert s.ok
        assert s.client.get_cipher_name() == cipher
        assert isinstance(s.client.get_peer_certificate(as_cryptography=True).public_key(),
                          key_type)
        info = server.info(s.server)
        assert tls.summary_line(info) == (
            f"Anonymous TLS connection established from {NAMADDR}: TLSv1.2 with cipher "
            f"{cipher} (128/128 bits)")


@pytest.mark.skipif(not OPENSSL, reason="openssl command not installed")
@pytest.mark.parametrize("sigalgs,expected", [
    ("ecdsa_secp256r1_sha256", "server-signature ECDSA (prime256v1) server-digest SHA256"),
    ("rsa_pss_rsae_sha256", "server-signature RSA-PSS (2048 bits) server-digest SHA256"),
    ("rsa_pss_rsae_sha384", "server-signature RSA-PSS (2048 bits) server-digest SHA384"),
])
def test_dual_certificates_by_tls13_sigalgs(tmp_path, pki, sigalgs, expected):
    """openssl s_client -sigalgs picks the certificate; the log line names it as Postfix."""
    server, _ = server_for(tmp_path, pki)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result = {}

    def serve():
        conn_sock, _ = listener.accept()
        conn = server.connection(conn_sock, NAMADDR)
        try:
            tls.handshake(conn, 10)
            result["info"] = server.info(conn)
            conn.sendall(b"220 ok\r\n")
            tls.shutdown(conn, 2)
        except (tls.TLSHandshakeError, SSL.Error) as exc:
            result["error"] = exc
        finally:
            conn_sock.close()
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        out = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}",
                              "-tls1_3", "-sigalgs", sigalgs, "-groups", "X25519"],
                             input="", capture_output=True, text=True, timeout=20)
    finally:
        thread.join(20)
        listener.close()
    assert "error" not in result, out.stderr
    line = tls.summary_line(result["info"])
    assert line == (f"Anonymous TLS connection established from {NAMADDR}: TLSv1.3 with "
                    f"cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 "
                    f"{expected}")


def test_key_and_certificate_in_separate_files(tmp_path, pki, session_factory):
    log = Log()
    cfg = make_cfg(tmp_path, f"smtpd_tls_eccert_file = {pki['ec-cert-only.pem']}\n"
                             f"smtpd_tls_eckey_file = {pki['ec-key-only.pem']}\n")
    server = tls.server_tls(cfg, warn=log.warn, info=log.info)
    client, _ = client_for(tmp_path, pki)
    assert session_factory(server, client).ok


def test_chain_files_with_two_keys_in_one_file(tmp_path, pki, session_factory):
    cfg = make_cfg(tmp_path, f"smtpd_tls_chain_files = {pki['both-chains.pem']}\n"
                             f"smtpd_tls_cert_file = /nonexistent/ignored.pem\n")
    server = tls.server_tls(cfg, warn=Log().warn)
    for cipher, key_type in (("ECDHE-RSA-AES128-GCM-SHA256", rsa.RSAPublicKey),
                             ("ECDHE-ECDSA-AES128-GCM-SHA256", ec.EllipticCurvePublicKey)):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(cipher.encode())
        s = session_factory(server, None, client_ctx=ctx)
        assert s.ok
        assert isinstance(s.client.get_peer_certificate(as_cryptography=True).public_key(),
                          key_type)


@pytest.mark.parametrize("extra,param,words", [
    ("smtpd_tls_eccert_file = {ec.pem}\nsmtpd_tls_eckey_file = {encrypted-key.pem}\n",
     "smtpd_tls_eckey_file", "is encrypted"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_key_file = {traditional-encrypted-key.pem}\n",
     "smtpd_tls_key_file", "is encrypted"),
    ("smtpd_tls_eccert_file = {ec.pem}\nsmtpd_tls_eckey_file = {other-key.pem}\n",
     "smtpd_tls_eckey_file", "does not match the certificate"),
    ("smtpd_tls_cert_file = /nonexistent/cert.pem\n",
     "smtpd_tls_cert_file", "cannot read file /nonexistent/cert.pem: No such file"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_key_file = /nonexistent/key.pem\n",
     "smtpd_tls_key_file", "cannot read file /nonexistent/key.pem"),
    ("smtpd_tls_eccert_file = {garbage.pem}\n", "smtpd_tls_eccert_file", "no certificate"),
    ("smtpd_tls_eccert_file = {ec-cert-only.pem}\n", "smtpd_tls_eckey_file", "no private key"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_CAfile = /nonexistent/ca.pem\n",
     "smtpd_tls_CAfile", "cannot read file"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_CAfile = {garbage.pem}\n",
     "smtpd_tls_CAfile", "no CA certificate"),
    ("smtpd_tls_chain_files = {cert-first.pem}\n", "smtpd_tls_chain_files",
     "not preceded by its private key"),
    ("smtpd_tls_chain_files = {ec-key-only.pem}\n", "smtpd_tls_chain_files",
     "not followed by its certificate"),
    ("", "No server certs available", "TLS won't be enabled"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_protocols = >=TLSv9\n",
     "smtpd_tls_protocols", "Invalid TLS protocol list"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_protocols = <=SSLv3\n",
     "smtpd_tls_protocols", "no TLS protocol version is left"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_ciphers = strong\n",
     "smtpd_tls_ciphers", "cipher grade"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_exclude_ciphers = !RC4\n",
     "smtpd_tls_exclude_ciphers", "invalid unary"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_cipherlist = NOSUCHCIPHER\n",
     "smtpd_tls_cipherlist", "invalid"),
    ("smtpd_tls_cert_file = {rsa.pem}\nsmtpd_tls_fingerprint_digest = crc32\n",
     "smtpd_tls_fingerprint_digest", "unsupported digest"),
])
def test_configuration_errors_name_the_parameter(tmp_path, pki, extra, param, words):
    cfg = make_cfg(tmp_path, re.sub(r"\{([^}]+)\}", lambda m: pki[m.group(1)], extra))
    with pytest.raises(tls.TLSConfigError) as excinfo:
        tls.server_tls(cfg, warn=Log().warn)
    assert param in str(excinfo.value)
    assert words in str(excinfo.value)


def test_expired_certificate_is_a_warning(tmp_path, pki, session_factory):
    log = Log()
    cfg = make_cfg(tmp_path, f"smtpd_tls_eccert_file = {pki['expired.pem']}\n")
    server = tls.server_tls(cfg, warn=log.warn)
    assert any("smtpd_tls_eccert_file: the certificate in" in w and "expired on" in w
               for w in log.warnings())
    client, _ = client_for(tmp_path, pki)
    s = session_factory(server, client)
    assert s.ok
    info = client.info(s.client)
    assert info.status == "Untrusted" and info.verify_error == tls.X509_V_ERR_CERT_HAS_EXPIRED
    assert tls.verify_error_line(info) == (
        f"server certificate verification failed for {SERVER_AT}: certificate has expired")


def test_dsa_certificate_loads_or_is_skipped_with_a_warning(tmp_path, pki, session_factory):
    log = Log()
    cfg = make_cfg(tmp_path, f"smtpd_tls_cert_file = {pki['rsa.pem']}\n"
                             f"smtpd_tls_dcert_file = {pki['dsa.pem']}\n")
    server = tls.server_tls(cfg, warn=log.warn)
    assert all("DSA" in w for w in log.warnings())
    client, _ = client_for(tmp_path, pki)
    assert session_factory(server, client).ok


def test_dh512_is_ignored_with_a_warning_and_dh1024_is_loaded(tmp_path, pki, session_factory):
    log = Log()
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_dh1024_param_file = {pki['ffdhe2048.pem']}\n"
                                          f"smtpd_tls_dh512_param_file = /etc/dh512.pem\n",
                           log=log)
    assert log.warnings() == ["warning: smtpd_tls_dh512_param_file is ignored: export "
                              "ciphers no longer exist"]
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"DHE-RSA-AES128-GCM-SHA256")
    # A client that lists FFDHE groups gets no DHE suite from a server whose groups are
    # tls_eecdh_auto_curves (RFC 7919, enforced by the bundled OpenSSL; Debian's OpenSSL
    # 3.0 under Postfix 3.7 still negotiated DHE then): offer an EC group only.
    tls_session.set_groups(ctx, ["X25519"])
    s = session_factory(server, None, client_ctx=ctx)
    assert s.ok and s.client.get_cipher_name() == "DHE-RSA-AES128-GCM-SHA256"


def test_bad_dh1024_file_is_a_warning(tmp_path, pki):
    log = Log()
    server_for(tmp_path, pki, f"smtpd_tls_dh1024_param_file = {pki['garbage.pem']}\n", log=log)
    assert len(log.warnings()) == 1
    assert "cannot load DH parameters from file" in log.warnings()[0]
    assert "smtpd_tls_dh1024_param_file" in log.warnings()[0]


def test_unknown_curve_and_option_names_are_warnings(tmp_path, pki):
    log = Log()
    server_for(tmp_path, pki, "tls_eecdh_auto_curves = X25519 nosuchcurve prime256v1\n"
                              "tls_ssl_options = NO_TICKET, NO_SUCH_OPTION\n", log=log)
    assert sorted(log.warnings()) == [
        'warning: tls_eecdh_auto_curves: ignoring unknown ECDHE curve "nosuchcurve"',
        'warning: tls_ssl_options: unknown value "NO_SUCH_OPTION" ignored']


@pytest.mark.parametrize("grade,group,kex", [
    ("auto", None, "key-exchange X25519"),
    ("strong", None, "key-exchange ECDHE (prime256v1)"),
    ("ultra", None, "key-exchange ECDHE (secp384r1)"),
])
def test_eecdh_grades(tmp_path, pki, session_factory, grade, group, kex):
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_eecdh_grade = {grade}\n")
    client, _ = client_for(tmp_path, pki)
    s = session_factory(server, client)
    assert s.ok
    assert kex in tls.summary_line(server.info(s.server))


# --- client certificates ------------------------------------------------------------------

def test_ca_file_is_sent_as_acceptable_ca_list(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki)
    s = session_factory(server, client)
    assert s.ok
    assert [n.get_components() for n in s.client.get_client_ca_list()] == \
        [[(b"O", b"Test CA")]]


@pytest.mark.skipif(not OPENSSL, reason="openssl command not installed")
def test_ca_list_seen_by_openssl_s_client(tmp_path, pki):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        sock, _ = listener.accept()
        conn = server.connection(sock, NAMADDR)
        try:
            tls.handshake(conn, 10)
            conn.sendall(b"220 ok\r\n")
            tls.shutdown(conn, 2)
        except (tls.TLSHandshakeError, SSL.Error):
            pass
        finally:
            sock.close()
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        out = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}"],
                             input="", capture_output=True, text=True, timeout=20)
    finally:
        thread.join(20)
        listener.close()
    assert "Acceptable client certificate CA names\nO = Test CA\n" in out.stdout


def test_ask_ccert_with_untrusted_certificate(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['stranger.pem']}\n")
    s = session_factory(server, client)
    assert s.ok
    info = server.info(s.server)
    assert info.status == "Untrusted" and not info.peer_trusted
    assert info.peer_CN == "stranger.example.test" and info.issuer_CN == "Other CA"
    assert info.verify_error == tls.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    assert tls.verify_error_line(info) == (
        f"certificate verification failed for {NAMADDR}: untrusted issuer /CN=Other CA")
    assert server.received_lines(info)[-1] == \
        '\t(Client CN "stranger.example.test", Issuer "Other CA" (not verified))'
    assert tls.summary_line(info).startswith(
        f"Untrusted TLS connection established from {NAMADDR}: TLSv1.3 with cipher ")


def test_ask_ccert_with_trusted_certificate(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['client.pem']}\n")
    s = session_factory(server, client)
    assert s.ok
    info = server.info(s.server)
    assert info.status == "Trusted" and info.peer_trusted and not info.peer_verified
    assert info.peer_fingerprint == tls.fingerprint(pki["client.pem:cert"], "sha256")
    assert server.received_lines(info) == [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
        "\t client-signature ECDSA (prime256v1) client-digest SHA256)",
        '\t(Client CN "client.example.test", Issuer "Test CA" (verified OK))']


def test_ask_ccert_without_certificate(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki)
    s = session_factory(server, client)
    assert s.ok
    info = server.info(s.server)
    assert info.status == "Anonymous"
    assert server.received_lines(info)[-1] == "\t(Client did not present a certificate)"


def test_req_ccert_without_certificate_fails_the_handshake(tmp_path, pki, session_factory):
    server, log = server_for(tmp_path, pki, "smtpd_tls_req_ccert = yes\n"
                                            "smtpd_tls_security_level = encrypt\n")
    assert server.require_ccert and server.ask_ccert and not log.warnings()
    client, _ = client_for(tmp_path, pki)
    s = session_factory(server, client)
    assert s.server_error is not None
    assert str(s.server_error) == f"SSL_accept error from {NAMADDR}: -1"
    assert any("certificate" in r for r in s.server_error.reasons)


def test_req_ccert_with_untrusted_certificate_is_logged(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_req_ccert = yes\n"
                                          "smtpd_tls_security_level = encrypt\n"
                                          "smtpd_tls_loglevel = 1\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['stranger.pem']}\n")
    s = session_factory(server, client)
    assert s.ok         # the caller refuses the untrusted client, not the handshake
    lines = server.log_lines(server.info(s.server))
    assert lines[0] == (f"certificate verification failed for {NAMADDR}: "
                        f"untrusted issuer /CN=Other CA")
    assert lines[1].startswith("Untrusted TLS connection established from")


@pytest.mark.parametrize("level,expected,warned", [
    ("may", (True, False), True), ("none", (True, False), True),
    ("encrypt", (True, True), False)])
def test_req_ccert_rule(tmp_path, level, expected, warned):
    log = Log()
    cfg = make_cfg(tmp_path, "smtpd_tls_req_ccert = yes\n")
    assert tls.ccert_policy(cfg, level, warn=log.warn) == expected
    assert log.warnings() == (["warning: Can't require client certs unless TLS is required"]
                              if warned else [])
    cfg = make_cfg(tmp_path, "smtpd_tls_ask_ccert = yes\n", "ask")
    assert tls.ccert_policy(cfg, level, warn=log.warn) == (True, False)
    assert tls.ccert_policy(make_cfg(tmp_path, "", "none"), level) == (False, False)


def test_wrappermode_counts_as_enforced_tls(tmp_path, pki):
    server, log = server_for(tmp_path, pki, "smtpd_tls_req_ccert = yes\n"
                                            "smtpd_tls_wrappermode = yes\n")
    assert server.level == "encrypt" and server.require_ccert and not log.warnings()


@pytest.mark.parametrize("depth,status,line", [
    (1, "Untrusted", f"certificate verification failed for {NAMADDR}: certificate chain "
                     f"longer than limit(1)"),
    (2, "Trusted", None),
])
def test_ccert_verify_depth(tmp_path, pki, session_factory, depth, status, line):
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_ask_ccert = yes\n"
                                          f"smtpd_tls_ccert_verifydepth = {depth}\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['chained-client.pem']}\n")
    s = session_factory(server, client)
    assert s.ok
    info = server.info(s.server)
    assert info.status == status
    if line:
        assert tls.verify_error_line(info) == line


def test_direct_client_certificate_passes_depth_one(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n"
                                          "smtpd_tls_ccert_verifydepth = 1\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['client.pem']}\n")
    s = session_factory(server, client)
    assert server.info(s.server).status == "Trusted"


def test_untrusted_client_stays_untrusted_when_resumed(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['stranger.pem']}\n")
    first = session_factory(server, client)
    first.first_read()
    session = first.client.get_session()
    first.close()
    second = session_factory(server, client, session=session)
    info = server.info(second.server)
    assert info.session_reused and info.status == "Untrusted"
    assert server.log_lines(info) == []          # smtpd_tls_loglevel = 0
    assert tls.log_lines(info, 1, require_trust=True)[0] == (
        f"{NAMADDR}: re-using session with untrusted certificate, look for details "
        f"earlier in the log")


def test_control_character_in_cn_is_refused_with_postfix_warning(tmp_path, pki,
                                                                  session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['ctrl-cn.pem']}\n")
    s = session_factory(server, client)
    log = Log()
    info = server.info(s.server, warn=log.warn)
    assert info.peer_CN == ""
    assert log.warnings() == [f"warning: tls_text_name: {NAMADDR}: non-printable content "
                              f"in peer subject CN"]


# --- protocols and ciphers ----------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    (">=TLSv1", ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")),
    (">=TLSv1.2", ("TLSv1.2", "TLSv1.3")),
    ("<=TLSv1.2", ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2")),
    (">=TLSv1.2, <=TLSv1.2", ("TLSv1.2",)),
    ("!SSLv2, !SSLv3", ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")),
    ("!SSLv2:!SSLv3:!TLSv1:!TLSv1.1", ("TLSv1.2", "TLSv1.3")),
    ("!SSLv3, !TLSv1", ("SSLv2", "TLSv1.1", "TLSv1.2", "TLSv1.3")),
    ("TLSv1.2 TLSv1.3", ("TLSv1.2", "TLSv1.3")),
    ("TLSv1.2, TLSv1.3, !TLSv1.3", ("TLSv1.2",)),
    ("TLSv1 TLSv1.2", ("TLSv1", "TLSv1.2")),
    ("", ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")),
])
def test_parse_protocols(text, expected):
    assert tls.parse_protocols(text) == expected


@pytest.mark.parametrize("text", ["TLSv9", "tlsv1.2", ">=TLSv1.4", "!TLS1", "<=", "SSLv2 bogus"])
def test_parse_protocols_rejects(text):
    with pytest.raises(ValueError):
        tls.parse_protocols(text)


@pytest.mark.parametrize("setting,client_max,ok,protocol", [
    (">=TLSv1.3", SSL.TLS1_2_VERSION, False, None),
    (">=TLSv1.2", SSL.TLS1_2_VERSION, True, "TLSv1.2"),
    ("<=TLSv1.2", SSL.TLS1_3_VERSION, True, "TLSv1.2"),
    ("!SSLv2, !SSLv3, !TLSv1, !TLSv1.1", SSL.TLS1_3_VERSION, True, "TLSv1.3"),
])
def test_protocols_in_effect(tmp_path, pki, session_factory, setting, client_max, ok, protocol):
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_protocols = {setting}\n")
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(client_max)
    s = session_factory(server, None, client_ctx=ctx)
    assert s.ok is ok
    if ok:
        assert s.server.get_protocol_version_name() == protocol


def test_mandatory_context_uses_mandatory_protocols(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki, "smtpd_tls_mandatory_protocols = >=TLSv1.3\n")
    assert server.mandatory is not server.opportunistic
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    assert session_factory(server, None, client_ctx=ctx).ok
    s = session_factory(server, None, client_ctx=ctx, mandatory=True)
    assert not s.ok


def test_identical_settings_share_one_context(tmp_path, pki):
    server, _ = server_for(tmp_path, pki)
    assert server.mandatory is server.opportunistic


def test_cipher_list_grades_and_exclusions(tmp_path):
    cfg = make_cfg(tmp_path, "smtpd_tls_ciphers = high\n"
                             "smtpd_tls_exclude_ciphers = aNULL, MD5\n"
                             "smtpd_tls_mandatory_exclude_ciphers = 3DES\n")
    assert tls.cipher_list(cfg, "smtpd", False) == "aNULL:-aNULL:HIGH:@STRENGTH:!aNULL:!MD5"
    assert tls.cipher_list(cfg, "smtpd", True, ask_ccert=True) == (
        "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH:!aNULL:!MD5:!3DES:!aNULL")
    # Postfix 3.7 logs this list at loglevel 2 for a server that asks for certificates.
    assert tls.cipher_list(make_cfg(tmp_path, "", "d"), "smtpd", False, True) == \
        "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH:!aNULL"


def test_legacy_cipherlist_passes_through_and_wins(tmp_path, pki, session_factory):
    log = Log()
    server, _ = server_for(tmp_path, pki, "smtpd_tls_cipherlist = ECDHE-ECDSA-AES128-SHA256\n"
                                          "smtpd_tls_ciphers = high\n"
                                          "smtpd_tls_loglevel = 2\n", log=log)
    assert server.cipher_lists == ("ECDHE-ECDSA-AES128-SHA256",) * 2
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    s = session_factory(server, None, client_ctx=ctx)
    assert s.ok and s.server.get_cipher_name() == "ECDHE-ECDSA-AES128-SHA256"
    assert f'{NAMADDR}: TLS cipher list "ECDHE-ECDSA-AES128-SHA256"' in log.lines


# --- resumption ---------------------------------------------------------------------------

def _serve_one(server, listener, report_fd):
    """Child: accept one client, handshake, greet, report whether it resumed."""
    status = 3
    try:
        signal.alarm(20)            # never outlive a failed test
        sock, _ = listener.accept()
        conn = server.connection(sock, NAMADDR)
        tls.handshake(conn, 10)
        reused = server.info(conn).session_reused
        conn.sendall(b"220 ok\r\n")
        tls.shutdown(conn, 5, fast=False)
        sock.close()
        os.write(report_fd, b"R" if reused else b"F")
        status = 0
    finally:
        os._exit(status)


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_tickets_resume_across_forked_workers(tmp_path, pki, version):
    """DESIGN.md: workers forked from one context share its ticket keys."""
    server, _ = server_for(tmp_path, pki)
    client, _ = client_for(tmp_path, pki, "smtp_tls_protocols = " +
                           ("<=TLSv1.2" if version == SSL.TLS1_2_VERSION else ">=TLSv1.3") + "\n")
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    r, w = os.pipe()
    pids = []
    try:
        for listener in listeners:
            pid = os.fork()
            if pid == 0:
                _serve_one(server, listener, w)
            pids.append(pid)
        session = None
        for listener in listeners:
            sock = socket.create_connection(listener.getsockname(), timeout=10)
            conn = client.connection(sock, SERVER_AT, session=session)
            tls.handshake(conn, 10)
            assert recv(conn) == b"220 ok\r\n"   # TLS 1.3: the tickets come with it
            session = conn.get_session()
            tls.shutdown(conn, 5)
            sock.close()
        reports = os.read(r, 10)
        while len(reports) < 2:
            reports += os.read(r, 10)
        assert reports == b"FR"
    finally:
        for listener in listeners:
            listener.close()
        for pid in pids:
            for _ in range(100):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)    # a child of this test, by its pid
                _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        for fd in (r, w):
            os.close(fd)


@pytest.mark.parametrize("timeout,reused", [(0, False), (3600, True)])
@pytest.mark.parametrize("version", ["<=TLSv1.2", ">=TLSv1.3"])
def test_session_cache_timeout_zero_disables_resumption(tmp_path, pki, session_factory,
                                                        timeout, reused, version):
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_session_cache_timeout = {timeout}\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_protocols = {version}\n")
    first = session_factory(server, client)
    first.first_read()
    session = first.client.get_session()
    first.close()
    second = session_factory(server, client, session=session)
    assert second.ok
    assert server.info(second.server).session_reused is reused


def test_resumed_tls13_session_logs_like_postfix(tmp_path, pki, session_factory):
    """Postfix 3.7 on a resumed TLS 1.3 session: the server-signature of the last-loaded
    certificate and no server-digest (there was no CertificateVerify)."""
    server, _ = server_for(tmp_path, pki, "smtpd_tls_loglevel = 2\n")
    client, _ = client_for(tmp_path, pki)
    first = session_factory(server, client)
    first.first_read()
    session = first.client.get_session()
    first.close()
    second = session_factory(server, client, session=session)
    info = server.info(second.server)
    assert server.log_lines(info) == [
        f"{NAMADDR}: Reusing old session",
        f"Anonymous TLS connection established from {NAMADDR}: TLSv1.3 with cipher "
        f"TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature "
        f"ECDSA (prime256v1)"]


# --- the client side ----------------------------------------------------------------------

@pytest.mark.parametrize("extra,match,status", [
    ("", None, "Trusted"),
    ("", ["mx.example.test"], "Verified"),
    ("", [".example.test"], "Verified"),
    ("", ["other.example.test"], "Untrusted"),
])
def test_client_trust_and_match(tmp_path, pki, session_factory, extra, match, status):
    server, _ = server_for(tmp_path, pki)
    client, _ = client_for(tmp_path, pki, extra)
    s = session_factory(server, client, servername="mx.example.test")
    info = client.info(s.client, match=match)
    assert info.status == status
    assert tls.summary_line(info).startswith(f"{status} TLS connection established to "
                                             f"{SERVER_AT}: TLSv1.3 with cipher")
    if status == "Untrusted":
        assert client.log_lines(info, require_trust=True)[0] == (
            f"server certificate verification failed for {SERVER_AT}: num=62:hostname mismatch")
    assert s.server.get_servername() == b"mx.example.test"


def test_client_without_ca_is_untrusted_and_goes_on(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki)
    log = Log()
    cfg = make_cfg(tmp_path, "smtp_tls_loglevel = 1\n", "bare")
    client = tls.client_tls(cfg, warn=log.warn, info=log.info)
    s = session_factory(server, client)
    assert s.ok
    info = client.info(s.client, match=["mx.example.test"])
    assert info.status == "Untrusted"
    assert client.log_lines(info, require_trust=True) == [
        f"certificate verification failed for {SERVER_AT}: untrusted issuer /O=Test CA",
        tls.summary_line(info)]


def test_client_loglevel_2_lines(tmp_path, pki, session_factory):
    server, _ = server_for(tmp_path, pki)
    log = Log()
    client, _ = client_for(tmp_path, pki, "smtp_tls_loglevel = 2\n", log=log)
    assert log.lines[0] == "initializing the client-side TLS engine"
    s = session_factory(server, client)
    info = client.info(s.client, match=["mx.example.test"])
    fp = tls.fingerprint(pki["rsa.pem:cert"] if info.srvr_sig_name == "RSA-PSS"
                         else pki["ec.pem:cert"])
    lines = client.log_lines(info)
    assert lines[0] == f"{SERVER_AT}: matched peername: mx.example.test"
    assert lines[1].startswith(f"{SERVER_AT}: subject_CN=mx.example.test, issuer_CN=Test CA, "
                               f"fingerprint={fp}, pkey_fingerprint=")
    assert lines[2].startswith(f"Verified TLS connection established to {SERVER_AT}:")
    assert f"setting up TLS connection to {SERVER_AT}" in log.lines
    assert f'{SERVER_AT}: TLS cipher list "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"' in log.lines
    assert any(line.startswith(f"{SERVER_AT}: depth=0 verify=1 subject=/O=trustme")
               for line in log.lines)
    assert "SSL_connect:before SSL initialization" in log.lines


def test_server_loglevel_2_lines(tmp_path, pki, session_factory):
    log = Log()
    server, _ = server_for(tmp_path, pki, "smtpd_tls_loglevel = 2\nsmtpd_tls_ask_ccert = yes\n",
                           log=log)
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['client.pem']}\n")
    s = session_factory(server, client)
    info = server.info(s.server)
    fp, pfp = (tls.fingerprint(pki["client.pem:cert"]),
               tls.pkey_fingerprint(pki["client.pem:cert"]))
    assert server.log_lines(info) == [
        "subject=/O=trustme v1.2.1/CN=client.example.test",
        "issuer=/O=Test CA",
        f"{NAMADDR}: subject_CN=client.example.test, issuer=Test CA, fingerprint={fp}, "
        f"pkey_fingerprint={pfp}",
        f"Trusted TLS connection established from {NAMADDR}: TLSv1.3 with cipher "
        f"TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA "
        f"(prime256v1) server-digest SHA256 client-signature ECDSA (prime256v1) client-digest "
        f"SHA256"]
    assert log.lines[:4] == [
        "initializing the server-side TLS engine",
        f"setting up TLS connection from {NAMADDR}",
        f'{NAMADDR}: TLS cipher list "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH:!aNULL"',
        "SSL_accept:before SSL initialization"]
    assert f"{NAMADDR}: depth=1 verify=1 subject=/O=Test CA" in log.lines
    assert (f"{NAMADDR}: depth=0 verify=1 subject=/O=trustme v1.2.1/CN=client.example.test"
            in log.lines)


@pytest.mark.parametrize("loglevel,count", [(0, 0), (1, 1)])
def test_low_loglevels(tmp_path, pki, session_factory, loglevel, count):
    server, _ = server_for(tmp_path, pki, f"smtpd_tls_loglevel = {loglevel}\n"
                                          "smtpd_tls_ask_ccert = yes\n")
    client, _ = client_for(tmp_path, pki, f"smtp_tls_cert_file = {pki['client.pem']}\n")
    s = session_factory(server, client)
    lines = server.log_lines(server.info(s.server))
    assert len(lines) == count


def test_handshake_timeout(tmp_path, pki):
    server, _ = server_for(tmp_path, pki)
    a, b = socket.socketpair()
    try:
        conn = server.connection(a, NAMADDR)
        with pytest.raises(tls.TLSHandshakeError) as excinfo:
            tls.handshake(conn, 0.2)
        assert str(excinfo.value) == f"SSL_accept error from {NAMADDR}: Connection timed out"
    finally:
        a.close()
        b.close()


def test_handshake_lost_connection(tmp_path, pki):
    client, _ = client_for(tmp_path, pki)
    a, b = socket.socketpair()
    b.close()
    try:
        conn = client.connection(a, SERVER_AT)
        with pytest.raises(tls.TLSHandshakeError) as excinfo:
            tls.handshake(conn, 2)
        assert str(excinfo.value).startswith(f"SSL_connect error to {SERVER_AT}: ")
    finally:
        a.close()


# --- levels -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,level,warned", [
    ("", "none", False),
    ("smtpd_use_tls = yes\n", "may", False),
    ("smtpd_use_tls = yes\nsmtpd_enforce_tls = yes\n", "encrypt", False),
    ("smtpd_enforce_tls = yes\n", "encrypt", False),
    ("smtpd_tls_security_level = may\nsmtpd_enforce_tls = yes\n", "may", False),
    ("smtpd_tls_security_level = none\nsmtpd_use_tls = yes\n", "none", False),
    ("smtpd_tls_security_level = ENCRYPT\n", "encrypt", False),
    ("smtpd_tls_security_level = verify\n", "encrypt", True),
])
def test_server_security_level(tmp_path, text, level, warned):
    log = Log()
    assert tls.server_security_level(make_cfg(tmp_path, text), warn=log.warn) == level
    assert bool(log.warnings()) is warned


def test_server_security_level_rejects_nonsense(tmp_path):
    with pytest.raises(tls.TLSConfigError, match='Invalid TLS level "sometimes"'):
        tls.server_security_level(make_cfg(tmp_path, "smtpd_tls_security_level = sometimes\n"))


# --- fingerprints -------------------------------------------------------------------------

@pytest.mark.skipif(not OPENSSL, reason="openssl command not installed")
@pytest.mark.parametrize("digest", ["md5", "sha1", "sha256"])
def test_fingerprints_match_openssl(pki, digest):
    path = pki["client.pem"]
    out = subprocess.run([OPENSSL, "x509", "-in", path, "-noout", "-fingerprint", f"-{digest}"],
                         capture_output=True, text=True, check=True).stdout
    assert tls.fingerprint(pki["client.pem:cert"], digest) == out.strip().split("=", 1)[1]
    pub = subprocess.run([OPENSSL, "x509", "-in", path, "-noout", "-pubkey"],
                         capture_output=True, check=True).stdout
    der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=pub,
                         capture_output=True, check=True).stdout
    hexed = subprocess.run([OPENSSL, "dgst", f"-{digest}", "-c"], input=der,
                           capture_output=True, check=True).stdout.decode()
    assert tls.pkey_fingerprint(pki["client.pem:cert"], digest) == \
        hexed.strip().split("= ", 1)[1].upper()


def test_fingerprint_accepts_pem_der_and_pyopenssl(pki):
    cert = pki["client.pem:cert"]
    expected = tls.fingerprint(cert, "md5")
    assert len(expected.split(":")) == 16 and expected == expected.upper()
    assert tls.fingerprint(cert.public_bytes(serialization.Encoding.PEM), "md5") == expected
    assert tls.fingerprint(cert.public_bytes(serialization.Encoding.DER), "md5") == expected
    from OpenSSL import crypto
    assert tls.fingerprint(crypto.X509.from_cryptography(cert), "md5") == expected
    with pytest.raises(ValueError):
        tls.fingerprint(cert, "crc32")


def test_fingerprints_observed_from_postfix():
    """Postfix 3.7 logged these for the certificate below (sha256, cert and public key)."""
    pem = POSTFIX_CLIENT_CERT
    assert tls.fingerprint(pem, "sha256") == (
        "78:DD:B6:49:4D:2F:E7:47:4D:A6:70:B1:83:46:16:D1:E1:C3:97:E5:4B:24:D8:8B:41:61:DD:49:"
        "6C:E9:1D:DC")
    assert tls.pkey_fingerprint(pem, "sha256") == (
        "E1:F8:38:80:AA:5F:05:C0:5A:C8:83:E9:E1:A1:ED:E2:25:DE:CB:46:E0:C0:43:A1:1C:3B:84:7F:"
        "51:B3:CC:6D")


# The client certificate of the Postfix 3.7 observation (trustme, ECDSA P-256).
POSTFIX_CLIENT_CERT = b"""-----BEGIN CERTIFICATE-----
MIICTzCCAfSgAwIBAgIUcgao0btTRKec7FSkCJsRIWCQZy8wCgYIKoZIzj0EAwIw
OTEQMA4GA1UECgwHVGVzdCBDQTElMCMGA1UECwwcVGVzdGluZyBDQSAjWUNZZ3NQ
Z3VpS3JQc1FWNjAgFw0wMDAxMDEwMDAwMDBaGA8zMDAwMDEwMTAwMDAwMFowYDEX
MBUGA1UECgwOdHJ1c3RtZSB2MS4yLjExJzAlBgNVBAsMHlRlc3RpbmcgY2VydCAj
VUF3bnVlN3g1TVpmSGpGYjEcMBoGA1UEAwwTY2xpZW50LmV4YW1wbGUudGVzdDBZ
MBMGByqGSM49AgEGCCqGSM49AwEHA0IABE9HBDHAk7Ip5WWxgsfT+ap8UcqwSmhD
90DvUj4z4IfC4U0rJWc4fEdcBMf00VkST5B825CEYJuAuf1Epw3FNdSjgbAwga0w
HQYDVR0OBBYEFJ6hiWliOfRlhStk9t/LHnOYz0wwMAwGA1UdEwEB/wQCMAAwHwYD
VR0jBBgwFoAUVOp9v2ulKS6fj9rN+VTszuwTQLwwIQYDVR0RAQH/BBcwFYITY2xp
ZW50LmV4YW1wbGUudGVzdDAOBgNVHQ8BAf8EBAMCBaAwKgYDVR0lAQH/BCAwHgYI
KwYBBQUHAwIGCCsGAQUFBwMBBggrBgEFBQcDAzAKBggqhkjOPQQDAgNJADBGAiEA
oa1jO1zWQ5DlB1+0J8jZF0kCKcEoYyUDyKR8BVBvP/4CIQCX8Rtz7FfFzdTuFaWA
51oDxn/coFgXA1eTDmvvpf4Hog==
-----END CERTIFICATE-----
"""


# --- names --------------------------------------------------------------------------------

def _named_cert(dns=(), cn=None, ips=()):
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                              for i in ips]
    return _cert(key, _name(cn=cn, org="Names"), _name(org="Names"), key,
                 sans=sans if sans else None)


@pytest.mark.parametrize("dns,cn,ips,names,multi,expected", [
    # subjectAltName dNSNames, every one of them
    (["a.example.com", "mx.example.com"], None, [], ["mx.example.com"], True, "mx.example.com"),
    # the CommonName only without dNSNames
    ([], "mx.example.com", [], ["mx.example.com"], True, "mx.example.com"),
    (["other.example.com"], "mx.example.com", [], ["mx.example.com"], True, None),
    # case and a trailing dot
    (["MX.Example.COM"], None, [], ["mx.example.com."], True, "MX.Example.COM"),
    # wildcards: one label, or more with tls_wildcard_matches_multiple_labels
    (["*.example.com"], None, [], ["mx.example.com"], False, "*.example.com"),
    (["*.example.com"], None, [], ["a.b.example.com"], False, None),
    (["*.example.com"], None, [], ["a.b.example.com"], True, "*.example.com"),
    (["*.example.com"], None, [], ["example.com"], True, None),
    (["*.example.com"], None, [], ["mx.example.org"], True, None),
    (["*.com"], None, [], ["example.com"], True, None),
    (["f*.example.com"], None, [], ["foo.example.com"], True, None),
    ([], "*.example.com", [], ["mx.example.com"], False, "*.example.com"),
    # ".domain" means any subdomain (secure-level syntax)
    (["mx.example.com"], None, [], [".example.com"], True, "mx.example.com"),
    (["example.com"], None, [], [".example.com"], True, None),
    # addresses match iPAddress names only
    (["mx.example.com"], None, ["192.0.2.1"], ["192.0.2.1"], True, "192.0.2.1"),
    ([], "192.0.2.1", [], ["192.0.2.1"], True, None),
    (["mx.example.com"], None, [], ["nomatch.example.com", "mx.example.com"], True,
     "mx.example.com"),
])
def test_match_peername(dns, cn, ips, names, multi, expected):
    matched, which = tls.match_peername(_named_cert(dns, cn, ips), names, multi)
    assert matched is (expected is not None)
    assert which == expected


def test_match_names_strategies():
    assert tls.match_names(["nexthop", "dot-nexthop"], "Example.COM.", "mx1.example.com") == \
        ["example.com", ".example.com"]
    assert tls.match_names(["hostname"], "[example.com]", "MX1.example.com") == \
        ["mx1.example.com"]
    assert tls.match_names(["nexthop", ".example.net", "nexthop"], "example.com", "h") == \
        ["example.com", ".example.net"]


@pytest.mark.parametrize("setting,expected", [
    ("", None), ("hostname", "mx1.example.com"), ("nexthop", "example.com"),
    ("mail.example.org", "mail.example.org"), ("nexthop-is-literal", "nexthop-is-literal")])
def test_sni_name(setting, expected):
    assert tls.sni_name(setting, "[example.com]", "mx1.example.com.") == expected


def test_sni_name_never_an_address():
    assert tls.sni_name("nexthop", "[192.0.2.1]", "h") is None


# --- Postfix 3.7's exact words --------------------------------------------------------------

def _info(**kw):
    base = dict(role="server", namaddr=NAMADDR, protocol="TLSv1.3",
                cipher_name="TLS_AES_256_GCM_SHA384", cipher_usebits=256, cipher_algbits=256,
                session_reused=False, kex_name="X25519", srvr_sig_name="ECDSA",
                srvr_sig_curve="prime256v1", srvr_sig_dgst="SHA256")
    base.update(kw)
    return tls.TLSInfo(**base)


CLIENT_SIG = dict(clnt_sig_name="ECDSA", clnt_sig_curve="prime256v1", clnt_sig_dgst="SHA256",
                  peer_cert_present=True, peer_CN="client.example.test", issuer_CN="Test CA")

OBSERVED_SUMMARIES = [
    (_info(), "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with "
              "cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 "
              "server-signature ECDSA (prime256v1) server-digest SHA256"),
    (_info(**CLIENT_SIG, peer_trusted=True),
     "Trusted TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA "
     "(prime256v1) server-digest SHA256 client-signature ECDSA (prime256v1) client-digest "
     "SHA256"),
    (_info(**{**CLIENT_SIG, "clnt_sig_name": "RSA-PSS", "clnt_sig_curve": "",
              "clnt_sig_bits": 2048}),
     "Untrusted TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA "
     "(prime256v1) server-digest SHA256 client-signature RSA-PSS (2048 bits) client-digest "
     "SHA256"),
    (_info(protocol="TLSv1.2", cipher_name="ECDHE-ECDSA-AES256-GCM-SHA384", kex_name="",
           srvr_sig_name=""),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.2 with cipher "
     "ECDHE-ECDSA-AES256-GCM-SHA384 (256/256 bits)"),
    (_info(protocol="TLSv1.2", cipher_name="ECDHE-RSA-AES128-GCM-SHA256", kex_name="",
           srvr_sig_name="", cipher_usebits=128, cipher_algbits=128),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.2 with cipher "
     "ECDHE-RSA-AES128-GCM-SHA256 (128/128 bits)"),
    (_info(kex_name="ECDHE", kex_curve="secp384r1", srvr_sig_name="RSA-PSS",
           srvr_sig_curve="", srvr_sig_bits=2048, srvr_sig_dgst="SHA384"),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange ECDHE (secp384r1) server-signature "
     "RSA-PSS (2048 bits) server-digest SHA384"),
    (_info(kex_name="ECDHE", kex_curve="prime256v1"),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange ECDHE (prime256v1) server-signature "
     "ECDSA (prime256v1) server-digest SHA256"),
    (_info(kex_name="X448"),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X448 server-signature ECDSA "
     "(prime256v1) server-digest SHA256"),
    (_info(session_reused=True, srvr_sig_name="RSA-PSS", srvr_sig_curve="", srvr_sig_bits=2048,
           srvr_sig_dgst=""),
     "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature RSA-PSS "
     "(2048 bits)"),
    (_info(role="client", namaddr="127.0.0.1[127.0.0.1]:12526", **CLIENT_SIG,
           peer_trusted=True),
     "Trusted TLS connection established to 127.0.0.1[127.0.0.1]:12526: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA "
     "(prime256v1) server-digest SHA256 client-signature ECDSA (prime256v1) client-digest "
     "SHA256"),
    (_info(role="client", namaddr="127.0.0.1[127.0.0.1]:12526", peer_cert_present=True,
           peer_trusted=True, peer_matched=True),
     "Verified TLS connection established to 127.0.0.1[127.0.0.1]:12526: TLSv1.3 with cipher "
     "TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature ECDSA "
     "(prime256v1) server-digest SHA256"),
    (_info(role="client", namaddr="127.0.0.1[127.0.0.1]:12526", peer_cert_present=True),
     "Untrusted TLS connection established to 127.0.0.1[127.0.0.1]:12526: TLSv1.3 with "
     "cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature "
     "ECDSA (prime256v1) server-digest SHA256"),
]


@pytest.mark.parametrize("info,expected", OBSERVED_SUMMARIES)
def test_summary_line_as_postfix_logged_it(info, expected):
    assert tls.summary_line(info) == expected


OBSERVED_RECEIVED = [
    (_info(), False, [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)",
        "\t(No client certificate requested)"]),
    (_info(), True, [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)",
        "\t(Client did not present a certificate)"]),
    (_info(**CLIENT_SIG, peer_trusted=True), True, [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
        "\t client-signature ECDSA (prime256v1) client-digest SHA256)",
        '\t(Client CN "client.example.test", Issuer "Test CA" (verified OK))']),
    (_info(**{**CLIENT_SIG, "peer_CN": "stranger.example.test", "issuer_CN": "Other CA"}),
     True, [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
        "\t client-signature ECDSA (prime256v1) client-digest SHA256)",
        '\t(Client CN "stranger.example.test", Issuer "Other CA" (not verified))']),
    (_info(**{**CLIENT_SIG, "clnt_sig_name": "RSA-PSS", "clnt_sig_curve": "",
              "clnt_sig_bits": 2048, "peer_CN": "client-rsa.example.test"},
           peer_trusted=True), True, [
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        "\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256",
        "\t client-signature RSA-PSS (2048 bits) client-digest SHA256)",
        '\t(Client CN "client-rsa.example.test", Issuer "Test CA" (verified OK))']),
    (_info(protocol="TLSv1.2", cipher_name="ECDHE-ECDSA-AES256-GCM-SHA384", kex_name="",
           srvr_sig_name="", **{**CLIENT_SIG, "clnt_sig_name": ""}, peer_trusted=True), True, [
        "\t(using TLSv1.2 with cipher ECDHE-ECDSA-AES256-GCM-SHA384 (256/256 bits))",
        '\t(Client CN "client.example.test", Issuer "Test CA" (verified OK))']),
    (_info(protocol="TLSv1.2", cipher_name="ECDHE-RSA-AES256-GCM-SHA384", kex_name="",
           srvr_sig_name=""), False, [
        "\t(using TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256/256 bits))",
        "\t(No client certificate requested)"]),
    # comment_sanitize(): observed with CNs a(b\c)d)e"f, münchen.example and none at all
    (_info(**{**CLIENT_SIG, "peer_CN": 'a(b\\c)d)e"f', "issuer_CN": "Odd CA"},
           peer_trusted=True), True,
     [None, None, None, '\t(Client CN "a(b?c)d?e"f", Issuer "Odd CA" (verified OK))']),
    (_info(**{**CLIENT_SIG, "peer_CN": "m\u00fcnchen.example", "issuer_CN": "Odd CA"},
           peer_trusted=True), True,
     [None, None, None, '\t(Client CN "m??nchen.example", Issuer "Odd CA" (verified OK))']),
    (_info(**{**CLIENT_SIG, "peer_CN": "", "issuer_CN": "Odd CA"}, peer_trusted=True), True,
     [None, None, None, '\t(Client CN "", Issuer "Odd CA" (verified OK))']),
]


@pytest.mark.parametrize("info,ask,expected", OBSERVED_RECEIVED)
def test_received_lines_as_postfix_wrote_them(info, ask, expected):
    lines = tls.received_lines(info, ask)
    assert len(lines) == len(expected)
    for got, want in zip(lines, expected):
        if want is not None:
            assert got == want
    assert tls.received_clause(info, ask) == "\n".join(lines)


@pytest.mark.parametrize("text,expected", [
    ("plain", "plain"), ("a(b)c", "a(b)c"), ("a(b", "a(b)"), ("a)b", "a?b"),
    ("back\\slash", "back?slash"), ("tab\there", "tab?here"), ('q"uote', 'q"uote'),
    ("((x", "((x))")])
def test_comment_sanitize(text, expected):
    assert tls.comment_sanitize(text) == expected


def test_log_lines_at_loglevel_2_server_order():
    info = _info(**CLIENT_SIG, peer_trusted=True, peer_subject="/O=trustme/CN=client",
                 peer_issuer="/O=Test CA", peer_fingerprint="AA:BB", peer_pkey_fingerprint="CC",
                 session_reused=True)
    assert tls.log_lines(info, 2) == [
        f"{NAMADDR}: Reusing old session",
        "subject=/O=trustme/CN=client",
        "issuer=/O=Test CA",
        f"{NAMADDR}: subject_CN=client.example.test, issuer=Test CA, fingerprint=AA:BB, "
        f"pkey_fingerprint=CC",
        tls.summary_line(info)]
    assert tls.log_lines(info, 1) == [tls.summary_line(info)]
    assert tls.log_lines(info, 0) == []


@pytest.mark.parametrize("error,depth,role,expected", [
    (20, 0, "client", "certificate verification failed for W: untrusted issuer /O=X"),
    (19, 1, "client", "certificate verification failed for W: untrusted issuer /O=X"),
    (18, 0, "server", "certificate verification failed for W: self-signed certificate"),
    (2, 1, "client", "CA certificate verification failed for W: num=2:unable to get issuer "
                     "certificate"),
    (14, 0, "client", "server certificate verification failed for W: certificate has expired"),
    (10, 0, "client", "server certificate verification failed for W: certificate has expired"),
    (10, 1, "server", "CA certificate verification failed for W: certificate has expired"),
    (9, 0, "server", "client certificate verification failed for W: certificate not yet valid"),
    (26, 0, "server", "certificate verification failed for W: not designated for use as a "
                      "client certificate"),
    (22, 3, "server", "certificate verification failed for W: certificate chain longer than "
                      "limit(2)"),
    (62, 0, "client", "server certificate verification failed for W: num=62:hostname mismatch"),
    (64, 0, "client", "server certificate verification failed for W: num=64:IP address "
                      "mismatch"),
])
def test_verify_error_lines(error, depth, role, expected):
    info = _info(role=role, namaddr="W", peer_cert_present=True, verify_error=error,
                 verify_error_depth=depth, verify_error_issuer="/O=X")
    assert tls.verify_error_line(info) == expected


def test_ecdsa_only_server_logs_the_digest_without_the_message_callback(tmp_path, pki,
                                                                      session_factory):
    """An ECDSA key fixes the TLS 1.3 signature digest, so such a server does without
    OpenSSL's per-record message callback and still logs Postfix's server-digest; a
    resumed session has no signature, so no digest."""
    log = Log()
    cfg = make_cfg(tmp_path, f"smtpd_tls_cert_file = {pki['ec.pem']}\n"
                             "smtpd_tls_loglevel = 1\n", "ec-only")
    server = tls.server_tls(cfg, warn=log.warn, info=log.info)
    client, _ = client_for(tmp_path, pki)
    first = session_factory(server, client)
    first.first_read()
    assert tls_session.signature_schemes(first.server) == (None, None)   # not captured
    assert server.log_lines(server.info(first.server))[-1].endswith(
        "key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256")
    session = first.client.get_session()
    first.close()
    second = session_factory(server, client, session=session)
    info = server.info(second.server)
    assert info.session_reused
    assert server.log_lines(info)[-1].endswith(
        "key-exchange X25519 server-signature ECDSA (prime256v1)")
    # With client certificates asked for, the callback is back (the client's digest).
    asking = tls.server_tls(make_cfg(tmp_path, f"smtpd_tls_cert_file = {pki['ec.pem']}\n"
                                               "smtpd_tls_ask_ccert = yes\n", "ec-ask"),
                            level="may", warn=log.warn, info=log.info)
    third = session_factory(asking, client)
    third.first_read()
    assert tls_session.signature_schemes(third.server)[0] == 0x0403   # ecdsa_secp256r1_sha256
