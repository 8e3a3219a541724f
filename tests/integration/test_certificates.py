"""Certificates and keys as an administrator changes them on a running instance: `check`,
`start` and `reload` load every pair the configuration names and refuse a bad one, naming
the parameter and the file, while the running instance goes on serving STARTTLS; a key and
its chain in separate smtpd_tls_chain_files work as their concatenation does."""

import os
import signal
import ssl
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pfxinst import SmtpClient, free_port, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    os.chmod(d, 0o755)
    ca = trustme.CA()
    good = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("other.example")
    good.private_key_and_cert_chain_pem.write_to_path(str(d / "good.pem"))
    good.private_key_pem.write_to_path(str(d / "key.pem"))
    (d / "chain.pem").write_bytes(b"".join(p.bytes() for p in good.cert_chain_pems))
    good.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    for name in ("good.pem", "key.pem", "other-key.pem"):
        os.chmod(d / name, 0o600)
    leaf = x509.load_pem_x509_certificate(good.cert_chain_pems[0].bytes())
    return {"dir": d, "good": str(d / "good.pem"), "key": str(d / "key.pem"),
            "chain": str(d / "chain.pem"), "cert": str(d / "cert.pem"),
            "other_key": str(d / "other-key.pem"),
            "leaf_der": leaf.public_bytes(serialization.Encoding.DER)}


def starttls_cert(port: int) -> bytes:
    """STARTTLS with the ssl module; the DER certificate the server presented."""
    c = SmtpClient(port)
    try:
        assert c.reply().startswith("220 ")
        assert "250-STARTTLS" in c.cmd("EHLO client.example")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        c.starttls(ctx)
        der = c.sock.getpeercert(binary_form=True)
        assert c.cmd("EHLO client.example").startswith("250-")
        assert c.cmd("QUIT").startswith("221 ")
        return der
    finally:
        c.close()


@pytest.fixture
def tlsmta(instance, pki):
    instance.port = free_port()
    instance.main.update({"smtpd_tls_security_level": "may",
                          "smtpd_tls_cert_file": pki["good"]})
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd"]
    return instance


def test_a_mismatched_key_is_refused_by_check_and_start(tlsmta, pki):
    tlsmta.main.update({"smtpd_tls_cert_file": pki["cert"],
                        "smtpd_tls_key_file": pki["other_key"]})
    tlsmta.write()
    why = (f"smtpd_tls_key_file: the private key in {pki['other_key']} does not match "
           f"the certificate in {pki['cert']} (smtpd_tls_cert_file)")
    out = tlsmta.cmd("check")
    assert out.returncode == 1
    assert f"postfix-py/postfix-script: error: {why}" in out.stderr
    out = tlsmta.cmd("start")
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == f"postfix-py/postfix-script: fatal: {why}"
    assert tlsmta.master_pid() is None


def test_reload_with_a_mismatched_key_keeps_serving_starttls(tlsmta, pki):
    tlsmta.start()
    master = tlsmta.master_pid()
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]
    tlsmta.main.update({"smtpd_tls_cert_file": pki["cert"],
                        "smtpd_tls_key_file": pki["other_key"],
                        "smtpd_banner": "$myhostname ESMTP second"})
    tlsmta.write()
    why = (f"smtpd_tls_key_file: the private key in {pki['other_key']} does not match "
           f"the certificate in {pki['cert']} (smtpd_tls_cert_file)")
    out = tlsmta.cmd("reload")
    assert out.returncode == 1
    assert f"error: {why}; the running configuration stays in effect" in out.stderr
    # The master, signalled directly, validates too, keeps the old generation, and says so.
    os.kill(master, signal.SIGHUP)
    wait_for(lambda: f"warning: reload: {why}; keeping the running configuration"
             in tlsmta.log(), what="the master's refusal")
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]
    assert "reload -- version" not in tlsmta.log()
    assert "TLS library problem" not in tlsmta.log()
    # The key put right, the reload goes through.
    tlsmta.main["smtpd_tls_key_file"] = pki["key"]
    tlsmta.reload()
    wait_for(lambda: "reload -- version" in tlsmta.log(), what="the reload")
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]


def test_a_service_override_and_a_client_certificate_are_checked(tlsmta, pki):
    tlsmta.master_lines.append(f"127.0.0.1:{free_port()} inet n - y - - smtpd"
                               f" -o smtpd_tls_key_file={pki['other_key']}"
                               f" -o smtpd_tls_cert_file={pki['cert']}")
    tlsmta.main.update({"smtp_tls_cert_file": pki["cert"],
                        "lmtp_tls_chain_files": pki["chain"]})
    tlsmta.write()
    out = tlsmta.cmd("check")
    assert out.returncode == 1
    err = out.stderr
    svc = tlsmta.master_lines[-1].split()[0]
    assert (f"error: service {svc}/inet: smtpd_tls_key_file: the private key in "
            f"{pki['other_key']} does not match") in err
    # smtp_tls_key_file defaults to the certificate file, which holds no key.
    assert f"error: smtp_tls_key_file: no private key in file {pki['cert']}" in err
    assert (f"error: lmtp_tls_chain_files: certificate in {pki['chain']} is not preceded "
            f"by its private key") in err
    assert "Traceback" not in err


def test_split_key_and_chain_files_are_one_stream(tlsmta, pki):
    del tlsmta.main["smtpd_tls_cert_file"]
    tlsmta.main["smtpd_tls_chain_files"] = f"{pki['key']}, {pki['chain']}"
    tlsmta.write()
    out = tlsmta.cmd("check")
    assert out.returncode == 0, out.stderr
    tlsmta.start()
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]
    assert "TLS library problem" not in tlsmta.log()
    # A key whose certificate never comes is still refused, naming the file.
    tlsmta.main["smtpd_tls_chain_files"] = f"{pki['key']}, {pki['other_key']}"
    tlsmta.write()
    out = tlsmta.cmd("reload")
    assert out.returncode == 1
    assert (f"smtpd_tls_chain_files: private key in {pki['key']} is not followed by its "
            f"certificate") in out.stderr
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]


def test_changed_certificate_files_are_reloaded_validated(tlsmta, pki, tmp_path):
    """tls_certificate_reload_interval: a renewal (ACME) is picked up without a reload
    hook; a renewal whose key does not match is refused and the old certificate stays."""
    live = tmp_path / "live.pem"
    live.write_bytes(Path(pki["good"]).read_bytes())
    os.chmod(tmp_path, 0o755)
    tlsmta.main.update({"smtpd_tls_cert_file": str(live),
                        "tls_certificate_reload_interval": "1s"})
    tlsmta.start()
    assert starttls_cert(tlsmta.port) == pki["leaf_der"]
    renewed = trustme.CA().issue_cert("localhost")
    new = tmp_path / "new.pem"
    renewed.private_key_and_cert_chain_pem.write_to_path(str(new))
    os.replace(new, live)
    wait_for(lambda: "reload -- version" in tlsmta.log(), timeout=10, what="the reload")
    assert f"certificate file changed: {live}: reloading" in tlsmta.log()
    renewed_der = x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()) \
        .public_bytes(serialization.Encoding.DER)
    wait_for(lambda: starttls_cert(tlsmta.port) == renewed_der, what="the new certificate")
    # A broken renewal: the certificate of one key with another key.
    broken = tmp_path / "broken.pem"
    broken.write_bytes(Path(pki["other_key"]).read_bytes() + renewed.cert_chain_pems[0].bytes())
    os.replace(broken, live)
    wait_for(lambda: "keeping the running configuration" in tlsmta.log(), timeout=10,
             what="the refusal")
    assert f"reload: smtpd_tls_key_file: the private key in {live} does not match" \
        in tlsmta.log()
    time.sleep(2.5)                         # looked at twice more: refused only once
    assert tlsmta.log().count("keeping the running configuration") == 1
    assert starttls_cert(tlsmta.port) == renewed_der
