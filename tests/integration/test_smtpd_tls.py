"""smtpd's TLS, as the seed specifies it, through real handshakes with real clients:
smtplib, raw sockets with the ssl module, openssl s_client, swaks, and Debian's Postfix."""

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme

from pfxinst import SmtpClient, free_port, wait_for
from peers import PostfixPeer, available as postfix_available
from postfix_py.lib import tls as T

OPENSSL = shutil.which("openssl")
SWAKS = shutil.which("swaks")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost, trusted and self-signed client certs."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    server.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client = ca.issue_cert("client.example", common_name="client.example")
    client.private_key_and_cert_chain_pem.write_to_path(str(d / "client.pem"))
    other_ca = trustme.CA()
    stranger = other_ca.issue_cert("stranger.example", common_name="stranger.example")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(d / "stranger.pem"))
    from cryptography import x509
    def fp(path):
        pem = Path(path).read_bytes()
        cert = x509.load_pem_x509_certificates(pem)[0]
        return T.fingerprint(cert, "sha256")
    os.chmod(d, 0o755)
    return {"dir": d, "server": str(d / "server.pem"), "ca": str(d / "ca.pem"),
            "client": str(d / "client.pem"), "stranger": str(d / "stranger.pem"),
            "client_fp": fp(d / "client.pem"), "stranger_fp": fp(d / "stranger.pem")}


@pytest.fixture
def tlsmta(instance, pki):
    return instance.add_smtpd(**{
        "smtpd_tls_cert_file": pki["server"],
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "1",
        "smtpd_tls_received_header": "yes",
    })


def client_ctx(cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


class Plain(SmtpClient):
    def starttls(self, cert=None):
        super().starttls(client_ctx(cert))


def test_starttls_with_smtplib_and_the_received_header(tlsmta):
    tlsmta.start()
    with smtplib.SMTP("127.0.0.1", tlsmta.port, timeout=10) as s:
        s.ehlo("tls.example")
        assert s.has_extn("starttls")
        s.starttls(context=client_ctx())
        s.ehlo("tls.example")
        assert not s.has_extn("starttls")
        s.sendmail("a@example.org", ["b@localhost"], b"Subject: tls\r\n\r\nsecret\r\n")
    (m, content), = tlsmta.queued()
    text = content.decode()
    assert "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" in text
    assert "(No client certificate requested)" in text
    assert f"with ESMTPS id {m.queue_id}" in text
    log = tlsmta.log()
    assert "Anonymous TLS connection established from localhost[127.0.0.1]: TLSv1.3 with " \
           "cipher TLS_AES_256_GCM_SHA384 (256/256 bits)" in log


def test_enforced_tls_refuses_mail_before_starttls(tlsmta):
    tlsmta.main["smtpd_enforce_tls"] = "yes"
    del tlsmta.main["smtpd_tls_security_level"]
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    assert "STARTTLS" in c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@example.org>") == "530 5.7.0 Must issue a STARTTLS command first"
    c.starttls()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    c.close()


def test_starttls_injection_is_discarded(tlsmta):
    """CVE-2011-0411: commands sent with STARTTLS in the same packet are never executed."""
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
    assert c.reply() == "220 2.0.0 Ready to start TLS"
    c.sock = client_ctx().wrap_socket(c.sock)
    reply = c.cmd("EHLO again")
    assert reply.startswith("250-mail.test.example")      # no reply to the injected MAIL
    assert c.cmd("RCPT TO:<b@localhost>") == "503 5.5.1 Error: need MAIL command"
    c.close()


def test_state_is_reset_by_starttls(tlsmta):
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    c.starttls()
    assert c.cmd("RCPT TO:<b@localhost>") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active"
    c.close()


def test_required_client_certificate(tlsmta, pki):
    tlsmta.main.update({"smtpd_tls_security_level": "encrypt", "smtpd_tls_req_ccert": "yes",
                        "smtpd_tls_CAfile": pki["ca"]})
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.starttls()                                      # no certificate: no TLS
        c.cmd("EHLO x")                                   # TLS 1.3 reports it on read
    c.close()
    wait_for(lambda: "SSL_accept error from localhost[127.0.0.1]" in tlsmta.log(),
             what="the handshake failure")
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.starttls(pki["client"])
    assert c.cmd("EHLO x").startswith("250")
    c.close()
    wait_for(lambda: "Trusted TLS connection established from localhost" in tlsmta.log(),
             what="the Trusted line")


def test_req_ccert_without_enforced_tls_only_asks(tlsmta, pki):
    tlsmta.main.update({"smtpd_tls_req_ccert": "yes", "smtpd_tls_CAfile": pki["ca"]})
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.starttls()                                          # no certificate, still fine
    assert c.cmd("EHLO x").startswith("250")
    c.close()
    wait_for(lambda: "Can't require client certs unless TLS is required" in tlsmta.log(),
             what="the seed's warning")


@pytest.mark.parametrize("who,relays", [("client", True), ("stranger", False), ("none", False),
                                        ("unlisted", False)])
def test_relay_clientcerts(tlsmta, pki, tmp_path, who, relays):
    table = tmp_path / "relay_clientcerts"
    listed = pki["client_fp"] if who != "unlisted" else "00:11"
    table.write_text(f"{listed} client.example\n{pki['stranger_fp']} stranger.example\n")
    tlsmta.main.update({"mynetworks": "10.0.0.0/8", "smtpd_tls_ask_ccert": "yes",
                        "smtpd_tls_CAfile": pki["ca"],
                        "relay_clientcerts": f"texthash:{table}",
                        "smtpd_relay_restrictions":
                            "permit_tls_clientcerts, reject_unauth_destination"})
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.starttls({"client": pki["client"], "unlisted": pki["client"],
                "stranger": pki["stranger"], "none": None}[who])
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@example.org>")
    reply = c.cmd("RCPT TO:<x@remote.example>")
    c.close()
    if relays:
        assert reply == "250 2.1.5 Ok"
    else:
        assert reply == "554 5.7.1 <x@remote.example>: Relay access denied"
    if who == "stranger":
        assert "Untrusted TLS connection established from" in tlsmta.log()


def test_check_ccert_access(tlsmta, pki):
    tlsmta.main.update({"smtpd_tls_ask_ccert": "yes", "smtpd_tls_CAfile": pki["ca"],
                        "smtpd_recipient_restrictions":
                            f"check_ccert_access inline:{{{pki['client_fp']}=REJECT}}"})
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.starttls(pki["client"])
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<b@localhost>") == \
        "554 5.7.1 <localhost[127.0.0.1]>: Client certificate rejected: Access denied"
    c.close()


def test_wrapper_mode(tlsmta):
    tlsmta.main["smtpd_tls_wrappermode"] = "no"
    smtps = free_port()
    tlsmta.master_lines.append(f"127.0.0.1:{smtps} inet n - y - - smtpd "
                               "-o smtpd_tls_wrappermode=yes -o syslog_name=postfix-py/smtps")
    tlsmta.start()
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=client_ctx()) as s:
        code, text = s.ehlo("x")
        assert code == 250 and b"STARTTLS" not in text
        s.sendmail("a@example.org", ["b@localhost"], b"Subject: smtps\r\n\r\nhi\r\n")
    assert len(tlsmta.queued()) == 1
    # Plain text on the smtps port: the handshake fails, the connection closes, no traceback.
    c = socket.create_connection(("127.0.0.1", smtps), timeout=10)
    c.sendall(b"EHLO plain\r\n")
    c.settimeout(10)
    try:
        data = c.recv(100)            # a TLS alert, or nothing
    except ConnectionResetError:
        data = b""
    c.close()
    assert not data.startswith(b"220")
    wait_for(lambda: "postfix-py/smtps/smtpd" in tlsmta.log() and
             "SSL_accept error" in tlsmta.log(), what="the wrapper-mode failure")
    assert "uncaught exception" not in tlsmta.log()


def test_tls_garbage_on_the_starttls_port(tlsmta):
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    assert c.cmd("STARTTLS").startswith("220")
    c.sock.sendall(os.urandom(2000))
    c.sock.settimeout(10)
    try:
        while c.sock.recv(4096):
            pass
    except OSError:
        pass
    c.close()
    wait_for(lambda: "SSL_accept error from localhost[127.0.0.1]" in tlsmta.log(),
             what="the failure line")
    with smtplib.SMTP("127.0.0.1", tlsmta.port, timeout=10) as s:   # the next client
        assert s.noop()[0] == 250


def test_resumption_across_processes_with_openssl(tlsmta):
    if not OPENSSL:
        pytest.skip("openssl is not installed")
    tlsmta.main["max_use"] = "1"          # every connection is served by a new process
    tlsmta.start()
    out = subprocess.run([OPENSSL, "s_client", "-starttls", "smtp", "-reconnect",
                          "-connect", f"127.0.0.1:{tlsmta.port}", "-tls1_2"],
                         input="", capture_output=True, text=True, timeout=60)
    reused = out.stdout.count("Reused, TLSv1.2")
    assert reused == 5, out.stdout[-2000:]
    pids = {line.split("[")[1].split("]")[0] for line in tlsmta.log().splitlines()
            if "postfix-py/smtpd[" in line and "connect from" in line}
    assert len(pids) == 6                 # six connections, six smtpd processes


def test_resumption_tls13_across_processes(tlsmta):
    tlsmta.main["max_use"] = "1"
    tlsmta.start()
    ctx = client_ctx()
    session, reused = None, []
    for _ in range(4):
        c = Plain(tlsmta.port)
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("STARTTLS").startswith("220")
        c.sock = ctx.wrap_socket(c.sock, session=session)
        c.cmd("EHLO x")                       # the TLS 1.3 ticket arrives with this read
        reused.append(c.sock.session_reused)
        session = c.sock.session
        c.cmd("QUIT")
        c.sock.unwrap()
        c.close()
    assert reused == [False, True, True, True]


def test_resumption_off_with_zero_timeout(tlsmta):
    tlsmta.main["smtpd_tls_session_cache_timeout"] = "0"
    tlsmta.start()
    ctx = client_ctx()
    session, reused = None, []
    for _ in range(2):
        c = Plain(tlsmta.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("STARTTLS")
        c.sock = ctx.wrap_socket(c.sock, session=session)
        c.cmd("EHLO x")
        reused.append(c.sock.session_reused)
        session = c.sock.session
        c.cmd("QUIT")
        c.close()
    assert reused == [False, False]


def test_broken_tls_config_serves_plaintext(tlsmta, tmp_path):
    # A certificate or key that does not load refuses start and reload
    # (test_certificates.py); what only the worker meets, here a CA file, turns TLS off
    # with a warning while plain text is served, as in Postfix.
    tlsmta.main["smtpd_tls_CAfile"] = str(tmp_path / "missing.pem")
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    assert "STARTTLS" not in c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    c.close()
    wait_for(lambda: "smtpd_tls_CAfile" in tlsmta.log(), what="a warning naming the file")


@pytest.mark.skipif(not SWAKS, reason="swaks is not installed")
@pytest.mark.parametrize("how", ["starttls", "smtps", "client-cert"])
def test_swaks(tlsmta, pki, how):
    args = ["--server", "127.0.0.1", "--from", "s@example.org", "--to", "r@localhost",
            "--body", f"via swaks {how}"]
    port = tlsmta.port
    if how == "smtps":
        port = free_port()
        tlsmta.master_lines.append(f"127.0.0.1:{port} inet n - y - - smtpd "
                                   "-o smtpd_tls_wrappermode=yes")
        args += ["--tlsc"]
    elif how == "client-cert":
        tlsmta.main.update({"smtpd_tls_ask_ccert": "yes", "smtpd_tls_CAfile": pki["ca"]})
        args += ["--tls", "--tls-cert", pki["client"], "--tls-key", pki["client"]]
    else:
        args += ["--tls"]
    tlsmta.start()
    out = subprocess.run([SWAKS, "--port", str(port), *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    (m, content), = tlsmta.queued()
    assert f"via swaks {how}".encode() in content
    if how == "client-cert":
        assert b'(Client CN "client.example", Issuer' in content
        assert "Trusted TLS connection established" in tlsmta.log()


@pytest.mark.interop
@pytest.mark.skipif(not postfix_available(), reason="Debian's postfix is not installed")
def test_debian_postfix_relays_into_postfix_py_over_tls(tlsmta, pki, tmp_path):
    tlsmta.start()
    peer = PostfixPeer(free_port(), main={
        "relayhost": f"[127.0.0.1]:{tlsmta.port}", "default_transport": "smtp",
        "smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "1",
        "mynetworks": "127.0.0.0/8"})
    peer.start()
    try:
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=10) as s:
            s.sendmail("a@example.org", ["b@mail.test.example"],
                       b"Subject: through postfix\r\n\r\nrelayed\r\n")
        wait_for(lambda: "status=sent" in peer.log(), timeout=30, what="Postfix's delivery")
        log = peer.log()
    finally:
        peer.cleanup()
    assert f"TLS connection established to 127.0.0.1[127.0.0.1]:{tlsmta.port}" in log
    (m, content), = tlsmta.queued()
    assert b"relayed" in content and b"with ESMTPS id" in content


@pytest.mark.parametrize("level", [3, 4])
def test_tls_loglevels_3_and_4_dump(tlsmta, level):
    tlsmta.main["smtpd_tls_loglevel"] = str(level)
    tlsmta.start()
    c = Plain(tlsmta.port)
    c.reply()
    c.cmd("EHLO x")
    c.starttls()
    c.cmd("EHLO dumped.example")
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: "disconnect from" in tlsmta.log(), what="the session's end")
    log = tlsmta.log()
    assert "localhost[127.0.0.1]: read from (Handshake, " in log     # level 3: the handshake
    assert "localhost[127.0.0.1]: write to (Handshake, " in log
    assert "SSL_accept:" in log                                      # level 2 and up
    dumped_ehlo = "45 48 4c 4f 20 64 75 6d-70 65 64"                 # "EHLO dumped"
    assert (dumped_ehlo in log) == (level == 4)                      # level 4: the plaintext
