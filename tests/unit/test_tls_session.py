"""lib/tls_session.py: the canary for pyOpenSSL's internal bindings, and what they give us.

The canary tests fail loudly, naming the symbol, when a pyOpenSSL or cryptography upgrade
drops something postfix-py needs. The round trips check the facts DESIGN.md relies on:
serialised sessions resume (TLS 1.2 and 1.3, the 1.3 ticket fetched after the first read),
and a connection freed without a TLS shutdown leaves a session that cannot be resumed.
"""

import gc
import socket

import pytest
import trustme
from OpenSSL import SSL

from postfix_py.lib import tls_session

VERSIONS = [pytest.param(SSL.TLS1_2_VERSION, id="TLSv1.2"),
            pytest.param(SSL.TLS1_3_VERSION, id="TLSv1.3")]


# --- the canary ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", tls_session.REQUIRED_SYMBOLS)
def test_binding_symbol_present(name):
    from OpenSSL.SSL import _lib
    assert hasattr(_lib, name), (
        f"pyOpenSSL's bindings (OpenSSL.SSL._lib) no longer offer {name}: "
        f"lib/tls_session.py needs a replacement before this upgrade can go in")


def test_no_symbol_missing():
    assert tls_session.missing_symbols() == []


def test_pyopenssl_internals_present():
    # deserialize() builds Sessions as pyOpenSSL does; the callbacks map SSL* to Connection.
    assert hasattr(SSL.Connection, "_reverse_mapping"), \
        "OpenSSL.SSL.Connection._reverse_mapping is gone"
    assert hasattr(SSL.Session, "__new__")
    probe = SSL.Context(SSL.TLS_METHOD)
    assert hasattr(probe, "_context"), "OpenSSL.SSL.Context._context is gone"


# --- helpers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    return {"ca": ca, "server": ca.issue_cert("mx.example.test"),
            "client": ca.issue_cert("client.example.test", common_name="client.example.test"),
            "stranger": trustme.CA().issue_cert("stranger.example.test",
                                                common_name="stranger.example.test")}


def server_context(pki, ask=False):
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    pki["server"].configure_cert(ctx)
    pki["ca"].configure_trust(ctx)
    ctx.set_session_id(b"Postfix/TLS")
    ctx.set_timeout(3600)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL)
    if ask:
        tls_session.set_verify(ctx, SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE,
                               lambda *args: None)
    tls_session.capture_signatures(ctx)
    return ctx


def client_context(version, cert=None):
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_max_proto_version(version)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT | SSL.SESS_CACHE_NO_INTERNAL_STORE)
    if cert is not None:
        cert.configure_cert(ctx)
    tls_session.capture_signatures(ctx)
    return ctx


class Pair:
    """A server and a client connection over a socketpair, handshaken in lockstep."""

    def __init__(self, sctx, cctx, session=None):
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.server = SSL.Connection(sctx, self.a)
        self.server.set_accept_state()
        self.client = SSL.Connection(cctx, self.b)
        if session is not None:
            self.client.set_session(session)
        self.client.set_connect_state()
        done = [False, False]
        for _ in range(200):
            for i, conn in enumerate((self.client, self.server)):
                if not done[i]:
                    try:
                        conn.do_handshake()
                        done[i] = True
                    except (SSL.WantReadError, SSL.WantWriteError):
                        pass
            if all(done):
                break
        assert all(done), "handshake did not complete"

    def exchange(self):
        """Server writes, client reads: with TLS 1.3 the tickets arrive on this read."""
        self.server.sendall(b"220 ready\r\n")
        for _ in range(200):
            try:
                return self.client.recv(100)
            except SSL.WantReadError:
                pass
        raise AssertionError("no data")

    def close(self, clean=True):
        if clean:
            for conn in (self.client, self.server, self.client, self.server):
                try:
                    conn.shutdown()
                except SSL.Error:
                    pass
        self.a.close()
        self.b.close()


# --- sessions -----------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_serialize_round_trip_resumes(pki, version):
    sctx, cctx = server_context(pki), client_context(version)
    first = Pair(sctx, cctx)
    assert first.exchange() == b"220 ready\r\n"
    assert not tls_session.session_reused(first.server)
    data = tls_session.serialize(first.client.get_session())
    first.close()

    assert isinstance(data, bytes) and len(data) > 50
    restored = tls_session.deserialize(data, cctx)
    second = Pair(sctx, cctx, session=restored)
    try:
        assert tls_session.session_reused(second.client)
        assert tls_session.session_reused(second.server)
        assert second.client.get_protocol_version() == first.client.get_protocol_version()
    finally:
        second.close()


def test_tls13_session_before_first_read_is_not_resumable(pki):
    # The TLS 1.3 ticket arrives after the handshake: a session taken before the first
    # read has nothing to resume with (DESIGN.md: fetch it after the first read).
    sctx, cctx = server_context(pki), client_context(SSL.TLS1_3_VERSION)
    first = Pair(sctx, cctx)
    early = tls_session.serialize(first.client.get_session())
    first.exchange()
    first.close()
    second = Pair(sctx, cctx, session=tls_session.deserialize(early, cctx))
    try:
        assert not tls_session.session_reused(second.server)
    finally:
        second.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_connection_freed_without_shutdown_leaves_no_resumable_session(pki, version):
    sctx, cctx = server_context(pki), client_context(version)
    first = Pair(sctx, cctx)
    first.exchange()
    session = first.client.get_session()
    first.close(clean=False)
    del first
    gc.collect()        # SSL_free without SSL_shutdown: OpenSSL marks the session bad
    second = Pair(sctx, cctx, session=session)
    try:
        assert not tls_session.session_reused(second.client)
    finally:
        second.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_shutdown_keeps_the_session_resumable(pki, version):
    sctx, cctx = server_context(pki), client_context(version)
    first = Pair(sctx, cctx)
    first.exchange()
    session = first.client.get_session()
    first.close(clean=True)
    del first
    gc.collect()
    second = Pair(sctx, cctx, session=session)
    try:
        assert tls_session.session_reused(second.client)
    finally:
        second.close()


@pytest.mark.parametrize("data", [b"", b"not a session", b"\x30\x03\x02\x01\x01"])
def test_deserialize_rejects_garbage(data):
    with pytest.raises(ValueError):
        tls_session.deserialize(data, SSL.Context(SSL.TLS_CLIENT_METHOD))


def test_serialize_rejects_an_empty_session():
    with pytest.raises(ValueError):
        tls_session.serialize(SSL.Session())


# --- handshake facts ----------------------------------------------------------------------

@pytest.mark.parametrize("version,bits", [(SSL.TLS1_2_VERSION, (256, 256)),
                                          (SSL.TLS1_3_VERSION, (256, 256))])
def test_cipher_bits(pki, version, bits):
    pair = Pair(server_context(pki), client_context(version))
    try:
        assert tls_session.cipher_bits(pair.server) == bits
        assert tls_session.cipher_bits(pair.client) == bits
    finally:
        pair.close()


def test_signature_schemes_of_a_tls13_handshake(pki):
    pair = Pair(server_context(pki, ask=True),
                client_context(SSL.TLS1_3_VERSION, pki["client"]))
    try:
        server_local, server_peer = tls_session.signature_schemes(pair.server)
        client_local, client_peer = tls_session.signature_schemes(pair.client)
        # trustme keys are ECDSA P-256: ecdsa_secp256r1_sha256 both ways.
        assert server_local == client_peer == 0x0403
        assert client_local == server_peer == 0x0403
    finally:
        pair.close()


def test_no_signature_on_resumption(pki):
    sctx, cctx = server_context(pki), client_context(SSL.TLS1_3_VERSION)
    first = Pair(sctx, cctx)
    first.exchange()
    session = first.client.get_session()
    first.close()
    second = Pair(sctx, cctx, session=session)
    try:
        assert tls_session.session_reused(second.server)
        assert tls_session.signature_schemes(second.server) == (None, None)
    finally:
        second.close()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who,trusted", [("client", True), ("stranger", False)])
def test_verify_result_survives_resumption(pki, version, who, trusted):
    """The handshake goes on with an untrusted client certificate, and OpenSSL's verdict
    stays in the session: a resumed handshake must not turn it into a trusted one."""
    seen = []
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    pki["server"].configure_cert(sctx)
    pki["ca"].configure_trust(sctx)
    sctx.set_session_id(b"Postfix/TLS")
    sctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL)
    tls_session.set_verify(sctx, SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE,
                           lambda conn, ok, err, depth, subject, issuer:
                           seen.append((ok, err, depth, subject)))
    cctx = client_context(version, pki[who])
    first = Pair(sctx, cctx)
    first.exchange()
    assert (tls_session.verify_result(first.server) == 0) is trusted
    subject, issuer = tls_session.peer_names(first.server)
    assert subject.startswith("/O=trustme") and subject.endswith(f"/CN={who}.example.test")
    assert issuer.startswith("/O=")
    session = first.client.get_session()
    first.close()
    assert seen and all(s[3].startswith("/") for s in seen)
    if not trusted:
        assert any(not ok for ok, *_ in seen)
    second = Pair(sctx, cctx, session=session)
    try:
        assert tls_session.session_reused(second.server)
        assert (tls_session.verify_result(second.server) == 0) is trusted
    finally:
        second.close()


def test_verify_observer_can_impose_an_error(pki):
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    pki["server"].configure_cert(sctx)
    pki["ca"].configure_trust(sctx)
    tls_session.set_verify(sctx, SSL.VERIFY_PEER,
                           lambda conn, ok, err, depth, subject, issuer: 22 if depth else None)
    pair = Pair(sctx, client_context(SSL.TLS1_3_VERSION, pki["client"]))
    try:
        assert tls_session.verify_result(pair.server) == 22
        assert tls_session.verify_error_string(22) == "certificate chain too long"
    finally:
        pair.close()


def test_peer_names_without_a_peer_certificate(pki):
    pair = Pair(server_context(pki), client_context(SSL.TLS1_3_VERSION))
    try:
        assert tls_session.peer_names(pair.server) == ("", "")
    finally:
        pair.close()


def test_set_groups(pki):
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    tls_session.set_groups(ctx, ["X25519", "prime256v1"])
    with pytest.raises(ValueError, match="nosuchcurve"):
        tls_session.set_groups(ctx, ["nosuchcurve"])
    with pytest.raises(ValueError):
        tls_session.set_groups(ctx, [])
