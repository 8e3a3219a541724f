"""The whole chain, as an administrator would try it: swaks -> postfix-py smtpd -> qmgr ->
smtp with STARTTLS and a client certificate -> Debian's Postfix, which relays only for
certificates in its relay_clientcerts; the second message resumes the TLS session."""

import os
import shutil
import subprocess

import pytest
import trustme
from cryptography import x509

from pfxinst import free_port, wait_for
from peers import PostfixPeer, available as postfix_available
from postfix_py.lib import tls as T

SWAKS = shutil.which("swaks")


@pytest.mark.interop
@pytest.mark.skipif(not (SWAKS and postfix_available()),
                    reason="needs swaks, Debian's postfix and root")
def test_swaks_to_postfix_py_to_postfix_with_tls_and_resumption(instance):
    d = instance.dir
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "peer.pem"))
    client = ca.issue_cert("relay.test.example", common_name="relay.test.example")
    client.private_key_and_cert_chain_pem.write_to_path(str(d / "client.pem"))
    fingerprint = T.fingerprint(x509.load_pem_x509_certificates(
        (d / "client.pem").read_bytes())[0], "sha256")
    for name in ("ca.pem", "peer.pem", "client.pem"):
        os.chmod(d / name, 0o644)
    (d / "relay_clientcerts").write_text(f"{fingerprint} relay.test.example\n")

    peer = PostfixPeer(free_port(), main={
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(d / "peer.pem"),
        "smtpd_tls_CAfile": str(d / "ca.pem"), "smtpd_tls_ask_ccert": "yes",
        "smtpd_tls_loglevel": "2", "smtpd_tls_fingerprint_digest": "sha256",
        "mynetworks": "10.255.255.0/24",            # loopback may NOT relay by address
        "relay_clientcerts": f"texthash:{d / 'relay_clientcerts'}",
        "smtpd_relay_restrictions": "permit_tls_clientcerts, reject_unauth_destination"})
    instance.port = free_port()
    instance.main.update({
        "relayhost": f"[127.0.0.1]:{peer.port}", "mydestination": "localhost",
        "smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "1",
        "smtp_tls_cert_file": str(d / "client.pem"), "smtp_tls_CAfile": str(d / "ca.pem"),
        "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache"})
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - y - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        "tlsmgr unix - - y 1000? 1 tlsmgr",
    ]
    peer.start()
    try:
        instance.start()
        for n in (1, 2):
            out = subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(instance.port),
                                  "--from", "alice@example.org", "--to", "bob@remote.example",
                                  "--header", f"Subject: chain {n}"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout[-1500:]
            wait_for(lambda: instance.log().count("status=sent") >= n, timeout=60,
                     what=f"delivery of message {n}")
        peer_log = peer.log()
    finally:
        peer.cleanup()
    log = instance.log()
    sent = [l for l in log.splitlines() if "status=sent" in l]
    assert len(sent) == 2 and all(f"relay=127.0.0.1[127.0.0.1]:{peer.port}" in l for l in sent)
    assert log.count("TLS connection established to 127.0.0.1[127.0.0.1]") >= 2
    # Postfix trusted our client certificate and let it relay; the second handshake resumed.
    trusted = [l for l in peer_log.splitlines()
               if "Trusted TLS connection established from" in l and "[127.0.0.1]" in l]
    assert len(trusted) == 2
    assert "Reusing old session" in peer_log
    assert peer_log.count("status=sent") == 2
    assert "Relay access denied" not in peer_log
