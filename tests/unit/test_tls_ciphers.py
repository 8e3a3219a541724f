"""The cipher audit of lib/tls.py: every grade offers what Postfix 3.7 on Debian's OpenSSL 3
offers (tests/data/openssl3-cipherlists.txt) and nothing that OpenSSL no longer has, on the
server and the client, at every security level; weak suites fail real handshakes.

pyOpenSSL's bundled OpenSSL still has SEED and IDEA in MEDIUM; a peer restricted to one of
them must not get a session from postfix-py, where Postfix refuses it.
"""

import socket
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from postfix_py.lib import maincf, tls

DATA = Path(__file__).resolve().parents[1] / "data" / "openssl3-cipherlists.txt"
WEAK = ("SEED", "IDEA", "RC4", "DES-CBC3", "3DES", "EXP", "RC2")
# Suites of pyOpenSSL's OpenSSL that Postfix on OpenSSL 3 refuses (RSA, DHE and anonymous).
WEAK_SUITES = ("SEED-SHA", "DHE-RSA-SEED-SHA", "ADH-SEED-SHA", "IDEA-CBC-SHA")


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


def reference(grade):
    for line in DATA.read_text().splitlines():
        if line.startswith(grade + " "):
            return set(line.split()[1].split(":"))
    raise KeyError(grade)


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """An RSA and an ECDSA server chain in one file (smtpd_tls_chain_files), and the CA."""
    d = tmp_path_factory.mktemp("ciphers")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    both = b""
    for kt in (trustme.KeyType.RSA, trustme.KeyType.ECDSA):
        both += ca.issue_cert("localhost", key_type=kt).private_key_and_cert_chain_pem.bytes()
    (d / "chains.pem").write_bytes(both)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    (d / "dh.pem").write_bytes(FFDHE2048)
    return d


def make_cfg(tmp_path, text):
    (tmp_path / "main.cf").write_text(text)
    return maincf.load(str(tmp_path))


def suites(ctx):
    return SSL.Connection(ctx, None).get_cipher_list()


def handshake(client_ctx, server_ctx):
    """A real handshake over a socket pair; the cipher name, or None when it fails."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    client, server = SSL.Connection(client_ctx, a), SSL.Connection(server_ctx, b)
    client.set_connect_state()
    server.set_accept_state()
    done = [False, False]
    try:
        for _ in range(50):
            for i, conn in enumerate((client, server)):
                if done[i]:
                    continue
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
            if all(done):
                return client.get_cipher_name()
        raise AssertionError("handshake did not finish")
    except SSL.Error:
        return None
    finally:
        a.close()
        b.close()


def peer_ctx(method, cipher, chains=None):
    """A pyOpenSSL peer with one suite only, at security level 0, TLS 1.0 to 1.2 (IDEA
    suites: to 1.1, TLS 1.2 has none), DHE parameters for the DHE and ADH suites."""
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_1_VERSION if "IDEA" in cipher else SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(f"{cipher}:@SECLEVEL=0".encode())
    if chains is not None:
        ctx.use_certificate_chain_file(str(chains / "chains.pem"))
        ctx.use_privatekey_file(str(chains / "chains.pem"))
        ctx.load_tmp_dh(str(chains / "dh.pem").encode())
    return ctx


@pytest.mark.parametrize("grade", ["high", "medium", "low", "export", "null"])
def test_grades_offer_what_postfix_on_openssl3_offers(tmp_path, chains, grade):
    cfg = make_cfg(tmp_path, f"smtpd_tls_chain_files = {chains}/chains.pem\n"
                             f"smtpd_tls_ciphers = {grade}\nsmtpd_tls_mandatory_ciphers = {grade}\n"
                             f"smtp_tls_ciphers = {grade}\n"
                             # encrypt excludes eNULL: the null grade leaves nothing there
                             f"smtp_tls_mandatory_ciphers = {'medium' if grade == 'null' else grade}\n"
                             "smtpd_tls_security_level = may\n")
    server = tls.server_tls(cfg, warn=lambda t: None)
    client = tls.client_tls(cfg, warn=lambda t: None)
    ref = reference(grade)
    for ctx in (server.opportunistic, server.mandatory, client.opportunistic):
        offered = set(suites(ctx))
        assert not [s for s in offered if any(w in s for w in WEAK)], offered
        if grade == "high":
            # OpenSSL 4 moved the CCM8 suites from HIGH to MEDIUM: fewer, none more.
            assert offered <= ref and {s for s in ref - offered if "CCM8" not in s} == set()
        else:
            assert offered == ref
    # The client's levels: encrypt drops eNULL, the matching levels drop aNULL too.
    if grade != "null":
        may = set(suites(client.opportunistic))
        assert set(suites(client.mandatory)) == {s for s in may if "NULL-" not in s}
    authenticated = set(suites(client.authenticated))
    assert authenticated and not [s for s in authenticated if s.startswith(("ADH", "AECDH"))]
    for ctx in (client.mandatory, client.authenticated):
        assert not [s for s in suites(ctx) if any(w in s for w in WEAK)]


def test_client_lists_per_level_as_smtp_tls_policy(tmp_path):
    cfg = make_cfg(tmp_path, "")
    client = tls.client_tls(cfg)
    base = "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH"
    assert client.cipher_list() == base
    assert client.cipher_list(mandatory=True) == base + ":!eNULL"
    assert client.cipher_list(mandatory=True, authenticated=True) == base + ":!aNULL"
    # At may the client offers the anonymous suites of the grade, as Postfix.
    assert "ADH-AES256-GCM-SHA384" in suites(client.opportunistic)


def test_legacy_cipherlist_of_removed_suites_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "smtp_tls_cipherlist = SEED-SHA:IDEA-CBC-SHA\n")
    with pytest.raises(tls.TLSConfigError, match="invalid smtp_tls_cipherlist cipher list"):
        tls.client_tls(cfg)


@pytest.mark.parametrize("cipher", WEAK_SUITES)
@pytest.mark.parametrize("level", ["may", "encrypt", "verify"])
def test_client_refuses_weak_suites(tmp_path, chains, cipher, level):
    cfg = make_cfg(tmp_path, f"smtp_tls_CAfile = {chains}/ca.pem\n")
    client = tls.client_tls(cfg)
    ctx = client.context(mandatory=level != "may", authenticated=level == "verify")
    weak_server = peer_ctx(SSL.TLS_SERVER_METHOD, cipher, chains)
    assert handshake(ctx, weak_server) is None
    # The same server with a strong suite works: the refusal is the suite's.
    assert handshake(ctx, peer_ctx(SSL.TLS_SERVER_METHOD, "ECDHE-RSA-AES128-GCM-SHA256",
                                   chains)) == "ECDHE-RSA-AES128-GCM-SHA256"


@pytest.mark.parametrize("cipher", WEAK_SUITES)
@pytest.mark.parametrize("settings", ["", "smtpd_tls_ask_ccert = yes\n",
                                      "smtpd_tls_security_level = encrypt\n"
                                      "smtpd_tls_req_ccert = yes\n"])
def test_server_refuses_weak_suites(tmp_path, chains, cipher, settings):
    cfg = make_cfg(tmp_path, f"smtpd_tls_chain_files = {chains}/chains.pem\n"
                             f"smtpd_tls_CAfile = {chains}/ca.pem\n"
                             f"smtpd_tls_dh1024_param_file = {chains}/dh.pem\n"
                             "smtpd_tls_security_level = may\n" + settings)
    server = tls.server_tls(cfg, warn=lambda t: None)
    # With a client certificate, which the last settings require.
    peer = peer_ctx(SSL.TLS_CLIENT_METHOD, cipher, chains)
    for ctx in (server.opportunistic, server.mandatory):
        assert handshake(peer, ctx) is None


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA",
                                    "CAMELLIA128-SHA", "AECDH-AES256-SHA"])
def test_server_keeps_what_postfix_negotiates(tmp_path, chains, cipher):
    cfg = make_cfg(tmp_path, f"smtpd_tls_chain_files = {chains}/chains.pem\n"
                             "smtpd_tls_security_level = may\n")
    server = tls.server_tls(cfg)
    assert handshake(peer_ctx(SSL.TLS_CLIENT_METHOD, cipher), server.opportunistic) == cipher
    # TLS 1.3 as well.
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    assert handshake(ctx, server.opportunistic) == "TLS_AES_256_GCM_SHA384"
