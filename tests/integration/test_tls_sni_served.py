"""tls_server_sni_maps with a real smtpd and openssl s_client -servername: the chain of
the name or of its nearest listed parent domain (".example.net"), the default chain for
other names and for no SNI, Postfix's log lines, and resumption that still works."""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import trustme

from pfxinst import Instance, free_port, wait_for

OPENSSL = shutil.which("openssl")

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)"),
              pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")]


@pytest.fixture(scope="module")
def mta():
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    ca = trustme.CA()
    for name in ("default.test", "mail.example.com", "star.example.net"):
        cert = ca.issue_cert(name, common_name=name)
        (root / f"{name}.pem").write_bytes(cert.private_key_and_cert_chain_pem.bytes())
    # The key and the chain in separate files, read as one stream (as smtpd_tls_chain_files).
    pem = (root / "star.example.net.pem").read_text()
    key_end = re.search(r"-----END [A-Z ]*PRIVATE KEY-----\n", pem).end()
    (root / "net-key.pem").write_text(pem[:key_end])
    (root / "net-chain.pem").write_text(pem[key_end:])
    (root / "sni").write_text(f"mail.example.com {root}/mail.example.com.pem\n"
                              f".example.net {root}/net-key.pem, {root}/net-chain.pem\n")
    inst = Instance(root)
    inst.port, inst.smtps = free_port(), free_port()
    inst.main.update({
        "smtpd_tls_chain_files": str(root / "default.test.pem"),
        "tls_server_sni_maps": f"texthash:{root}/sni",
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "1",
        "max_use": "1",                 # every connection is a new process
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


def s_client(port, *args, starttls=True):
    cmd = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args]
    if starttls:
        cmd[2:2] = ["-starttls", "smtp"]
    return subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60).stdout


def subject_cn(out: str) -> str:
    m = re.search(r"^subject=.*CN\s*=\s*([^\s,/]+)", out, re.M)
    assert m, out[-2000:]
    return m.group(1)


@pytest.mark.parametrize("servername,expected", [
    ("mail.example.com", "mail.example.com"),
    ("MAIL.Example.COM", "mail.example.com"),          # names are case-folded
    ("a.b.example.net", "star.example.net"),           # the parent domain's entry
    ("example.net", "default.test"),                   # ".example.net" is not example.net
    ("other.test", "default.test"),
    (None, "default.test"),
])
def test_the_chain_of_the_name(mta, servername, expected):
    args = ["-servername", servername] if servername else ["-noservername"]
    assert subject_cn(s_client(mta.port, *args)) == expected
    if servername:
        line = (f"Anonymous TLS connection established from localhost[127.0.0.1] to "
                f"{servername}: TLSv1.3 with cipher")
        wait_for(lambda: line in mta.log(), what=line)
    if expected == "default.test" and servername:
        wait_for(lambda: f"TLS SNI {servername} from localhost[127.0.0.1] not matched, "
                         f"using default chain" in mta.log(), what="the not-matched line")


def test_smtps_port(mta):
    out = s_client(mta.smtps, "-servername", "mail.example.com", starttls=False)
    assert subject_cn(out) == "mail.example.com"


def test_invalid_name_gets_the_default_chain(mta):
    # openssl s_client sends what it is given; Postfix ignores a name that is no host name.
    assert subject_cn(s_client(mta.port, "-servername", "bad_name!.test")) == "default.test"
    wait_for(lambda: "TLS SNI from localhost[127.0.0.1] is invalid: bad_name!.test"
             in mta.log(), what="the invalid-SNI warning")


def test_resumption_for_the_default_name_and_a_mapped_one(mta):
    out = s_client(mta.port, "-noservername", "-reconnect", "-tls1_2")
    assert out.count("Reused, TLSv1.2") == 5, out[-2000:]
    out = s_client(mta.port, "-servername", "mail.example.com", "-reconnect", "-tls1_2")
    assert out.count("Reused, TLSv1.2") == 5, out[-2000:]
    assert subject_cn(out) == "mail.example.com"
    assert "Traceback" not in mta.log() and "uncaught exception" not in mta.log()
