"""The cipher audit against a real smtpd: a client that offers only suites that Postfix 3.7
on OpenSSL 3 no longer has (SEED, IDEA: pyOpenSSL's bundled OpenSSL still has them) gets
no session on the STARTTLS port or the smtps port; the strong defaults still work.

The client side of the audit (smtp's contexts against a server of weak suites) is in
tests/unit/test_tls_ciphers.py, with real handshakes over socket pairs.
"""

import os
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from pfxinst import Instance, free_port, wait_for

WEAK_SUITES = ("SEED-SHA", "DHE-RSA-SEED-SHA", "ADH-SEED-SHA", "IDEA-CBC-SHA")
FFDHE2048 = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")


@pytest.fixture(scope="module")
def mta():
    """One instance: STARTTLS at may on one port, wrapper mode on another; RSA and ECDSA."""
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    chains = b"".join(ca.issue_cert("localhost", key_type=kt).private_key_and_cert_chain_pem
                      .bytes() for kt in (trustme.KeyType.RSA, trustme.KeyType.ECDSA))
    (root / "chains.pem").write_bytes(chains)
    (root / "dh.pem").write_bytes(FFDHE2048)
    inst = Instance(root)
    inst.port, inst.smtps = free_port(), free_port()
    inst.main.update({
        "smtpd_tls_chain_files": str(root / "chains.pem"),
        "smtpd_tls_dh1024_param_file": str(root / "dh.pem"),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "1",
    })
    inst.master_lines = [f"127.0.0.1:{inst.port} inet n - y - - smtpd",
                         f"127.0.0.1:{inst.smtps} inet n - y - - smtpd "
                         "-o smtpd_tls_wrappermode=yes"]
    try:
        inst.start()
        yield inst
    finally:
        inst.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def read_reply(sock) -> bytes:
    data = b""
    while not any(line[3:4] == b" " for line in data.split(b"\r\n") if len(line) > 3):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def tls_session(mta, how, ctx):
    """A handshake with ctx on the STARTTLS or the smtps port; the cipher, or None."""
    port = mta.port if how == "starttls" else mta.smtps
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if how == "starttls":
            assert read_reply(sock).startswith(b"220 ")
            sock.sendall(b"EHLO client.example\r\n")
            assert b"STARTTLS" in read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            assert read_reply(sock).startswith(b"220 2.0.0")
        # pyOpenSSL wants a blocking socket; the kernel's receive timeout bounds it.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        try:
            conn.do_handshake()
        except (SSL.Error, OSError):
            return None
        conn.sendall(b"EHLO client.example\r\n" if how == "starttls" else b"")
        if how == "smtps":
            assert read_reply(conn).startswith(b"220 ")
            conn.sendall(b"EHLO client.example\r\n")
        assert read_reply(conn).startswith(b"250")
        conn.sendall(b"QUIT\r\n")
        assert read_reply(conn).startswith(b"221")
        return conn.get_cipher_name()
    finally:
        sock.close()


def weak_client(cipher):
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    # TLS 1.2 has no IDEA suite; TLS 1.1 is served at security level 0, as by Postfix.
    ctx.set_max_proto_version(SSL.TLS1_1_VERSION if "IDEA" in cipher else SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(f"{cipher}:@SECLEVEL=0".encode())
    return ctx


@pytest.mark.parametrize("how", ["starttls", "smtps"])
@pytest.mark.parametrize("cipher", WEAK_SUITES)
def test_weak_suites_get_no_session(mta, how, cipher):
    assert tls_session(mta, how, weak_client(cipher)) is None


@pytest.mark.parametrize("how", ["starttls", "smtps"])
def test_strong_defaults_still_work(mta, how):
    for cipher in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256",
                   "CAMELLIA128-SHA"):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(cipher.encode())
        assert tls_session(mta, how, ctx) == cipher
    assert tls_session(mta, how, SSL.Context(SSL.TLS_CLIENT_METHOD)) == "TLS_AES_256_GCM_SHA384"
    wait_for(lambda: "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384" in mta.log(),
             what="the TLS 1.3 log line")
    assert "uncaught exception" not in mta.log() and "Traceback" not in mta.log()
