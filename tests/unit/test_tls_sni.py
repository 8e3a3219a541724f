"""lib/tls.py's tls_server_sni_maps: lookup order, table and file errors, and real
handshakes over socket pairs that get the chain of the name (integration: test_tls_sni_served)."""

import socket

import pytest
import trustme
from OpenSSL import SSL

from postfix_py.lib import maincf, tls


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    d = tmp_path_factory.mktemp("sni")
    ca = trustme.CA()
    for name in ("default.test", "a.example", "wild.example"):
        cert = ca.issue_cert(name, common_name=name)
        (d / f"{name}.pem").write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    return d


def server(tmp_path, chains, sni_maps, log=None):
    (tmp_path / "main.cf").write_text(f"smtpd_tls_chain_files = {chains}/default.test.pem\n"
                                      f"tls_server_sni_maps = {sni_maps}\n")
    log = log if log is not None else []
    return tls.server_tls(maincf.load(str(tmp_path)), level="may", warn=log.append,
                          info=log.append)


def served_name(srv, sni):
    """The CN of the certificate the server presents to a client that sends sni."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), a)
        client.set_connect_state()
        if sni:
            client.set_tlsext_host_name(sni.encode())
        conn = srv.connection(b, "client[192.0.2.1]")
        done = [False, False]
        for _ in range(20):
            for i, c in enumerate((client, conn)):
                if not done[i]:
                    try:
                        c.do_handshake()
                        done[i] = True
                    except SSL.WantReadError:
                        pass
        assert all(done)
        cert = client.get_peer_certificate(as_cryptography=True)
        return cert.subject.rfc4514_string().split("CN=")[1].split(",")[0], srv.info(conn)
    finally:
        a.close()
        b.close()


def test_names_and_parent_domains(tmp_path, chains):
    table = tmp_path / "sni"
    table.write_text(f"A.Example {chains}/a.example.pem\n"
                     f".wild.example {chains}/wild.example.pem\n")
    log = []
    srv = server(tmp_path, chains, f"texthash:{table}", log)
    assert set(srv.sni.contexts) == {"a.example", ".wild.example"}
    assert srv.sni.find("a.example") is srv.sni.find("A.EXAMPLE") is not None
    assert srv.sni.find("x.y.wild.example") is srv.sni.contexts[".wild.example"]
    assert srv.sni.find("wild.example") is None and srv.sni.find("b.example") is None
    name, info = served_name(srv, "deep.sub.wild.example")
    assert name == "wild.example" and info.peer_sni == "deep.sub.wild.example"
    assert " from client[192.0.2.1] to deep.sub.wild.example: " in tls.summary_line(info)
    name, info = served_name(srv, "nowhere.test")
    assert name == "default.test"
    assert "TLS SNI nowhere.test from client[192.0.2.1] not matched, using default chain" \
        in log
    name, info = served_name(srv, None)
    assert name == "default.test" and info.peer_sni == ""
    assert " from client[192.0.2.1]: " in tls.summary_line(info)


def test_inline_table_and_no_table(tmp_path, chains):
    srv = server(tmp_path, chains, f"inline:{{a.example={chains}/a.example.pem}}")
    assert served_name(srv, "a.example")[0] == "a.example"
    assert server(tmp_path, chains, "").sni is None


@pytest.mark.parametrize("entry,error", [
    ("a.example /nonexistent/sni.pem", "tls_server_sni_maps"),
    ("a.example {garbage}", "tls_server_sni_maps: no PEM data"),
])
def test_bad_files_are_configuration_errors(tmp_path, chains, entry, error):
    (tmp_path / "garbage").write_text("not pem\n")
    table = tmp_path / "sni"
    table.write_text(entry.format(garbage=tmp_path / "garbage") + "\n")
    with pytest.raises(tls.TLSConfigError, match=error):
        server(tmp_path, chains, f"texthash:{table}")


def test_table_that_cannot_list_its_entries(tmp_path, chains):
    with pytest.raises(tls.TLSConfigError, match="tls_server_sni_maps: .*not supported"):
        server(tmp_path, chains, f"static:{chains}/a.example.pem")
