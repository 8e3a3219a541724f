"""Client-side SASL in the smtp delivery agent, between two real postfix-py instances.

The receiver: smtpd with AUTH (builtin type, a passwd-file), a trustme certificate, and
`smtpd_relay_restrictions = permit_sasl_authenticated, reject`, so that mail is only
taken after AUTH; port .authonly has smtpd_tls_auth_only = yes, port .plainauth offers
AUTH without TLS too. The sender: chrooted smtp services with -o overrides, driven as
qmgr would (a queue file in active/, a lib/deliver.py request to private/SERVICE).
"""

import base64
import glob
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest
import trustme

from pfxinst import Instance, free_port, wait_for
from postfix_py.lib import queue as Q
from postfix_py.smtpd import sasl as S
from test_smtp_delivery import deliver_via, wait_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")

USER, PASSWORD = "relayuser", "Sekr1t:colon-pw"
WRONG = "Wrong-pw-77"
RCPT = ("bob@remote.example",)


def _root(prefix):
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


@pytest.fixture(scope="module")
def receiver():
    root = _root("pfx-csasl-rcv-")
    inst = Instance(root)
    pem = root / "server.pem"
    trustme.CA().issue_cert("localhost", "127.0.0.1") \
        .private_key_and_cert_chain_pem.write_to_path(str(pem))
    os.chmod(pem, 0o644)
    passwd = root / "passwd"
    passwd.write_text(f"{USER}:{S.hash_password(PASSWORD)}\n")
    os.chmod(passwd, 0o644)
    inst.main.update({
        "myhostname": "rcv.test.example", "mydestination": "$myhostname, localhost",
        "mynetworks": "192.0.2.0/24", "inet_protocols": "ipv4",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_error_sleep_time": "0s", "smtpd_tls_cert_file": str(pem),
        "smtpd_tls_security_level": "may", "smtpd_sasl_type": "builtin",
        "smtpd_sasl_path": str(passwd), "smtpd_sasl_builtin_failure_delay": "0s",
    })
    inst.authonly, inst.plainauth = free_port(), free_port()
    on = "-o smtpd_sasl_auth_enable=yes"
    inst.master_lines = [
        f"127.0.0.1:{inst.authonly} inet n - y - - smtpd {on} -o smtpd_tls_auth_only=yes",
        f"127.0.0.1:{inst.plainauth} inet n - y - - smtpd {on}",
    ]
    try:
        inst.start()
        wait_port(inst.authonly)
        wait_port(inst.plainauth)
        yield inst
    finally:
        inst.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(receiver):
    root = _root("pfx-csasl-snd-")
    inst = Instance(root)
    good, bad, empty = root / "sasl_passwd", root / "sasl_bad", root / "sasl_empty"
    good.write_text(f"[127.0.0.1]:{receiver.authonly} {USER}:{PASSWORD}\n"
                    f"[127.0.0.1]:{receiver.plainauth} {USER}:{PASSWORD}\n")
    bad.write_text(f"[127.0.0.1]:{receiver.authonly} {USER}:{WRONG}\n")
    empty.write_text("[other.example]:587 someone:else\n")
    inst.main.update({"inet_protocols": "ipv4", "myhostname": "snd.test.example",
                      "smtp_connect_timeout": "5s", "smtp_helo_timeout": "10s"})
    sasl = "-o smtp_sasl_auth_enable=yes -o smtp_sasl_password_maps=texthash:"
    # As SASL_README: plaintext mechanisms over TLS need smtp_sasl_tls_security_options
    # without noplaintext (its default is $smtp_sasl_security_options).
    tlsok = "-o smtp_sasl_tls_security_options=noanonymous"
    inst.master_lines = [
        "tlsmgr unix - - y 1000? 1 tlsmgr",
        f"authenc unix - - y - - smtp -o smtp_tls_security_level=encrypt {tlsok} "
        f"{sasl}{good}",
        f"authmay unix - - y - - smtp -o smtp_tls_security_level=may {tlsok} {sasl}{good}",
        f"authdeftls unix - - y - - smtp -o smtp_tls_security_level=encrypt {sasl}{good}",
        f"authbad unix - - y - - smtp -o smtp_tls_security_level=encrypt {tlsok} "
        f"{sasl}{bad}",
        f"authnomap unix - - y - - smtp -o smtp_tls_security_level=encrypt {tlsok} "
        f"{sasl}{empty}",
        f"authnone unix - - y - - smtp -o smtp_tls_security_level=none {sasl}{good}",
        f"authplain unix - - y - - smtp -o smtp_tls_security_level=none {sasl}{good}"
        " -o smtp_sasl_security_options=noanonymous",
    ]
    pw = pwd.getpwnam(inst.main["mail_owner"])
    inst.uid_gid = (pw.pw_uid, pw.pw_gid)
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "private" / "authplain").exists(), 15,
                 what="private/authplain")
        yield inst
    finally:
        inst.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def received(receiver, marker):
    """The receiver's queue file holding marker, once it is there."""
    def find():
        for path in glob.glob(str(receiver.queue / "incoming" / "*")):
            try:
                m = Q.read(path)
                body = b"".join(m.content(path)).decode()
            except (OSError, Q.QueueFileError):
                continue
            if marker in body:
                return m
        return None
    return wait_for(find, 10, what="the message at the receiver")


def no_secrets(*logs):
    plain_ir = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    for log in logs:
        for secret in (PASSWORD, WRONG, plain_ir, base64.b64encode(PASSWORD.encode()).decode()):
            assert secret not in log


@pytest.mark.parametrize("service", ["authenc", "authmay"])
def test_good_credentials_over_tls(sender, receiver, service):
    out = deliver_via(sender, service, f"[127.0.0.1]:{receiver.authonly}", recipients=RCPT)
    assert out.results == [("sent", "2.0.0")], out.reason()
    m = received(receiver, out.marker)
    assert m.attrs.get("sasl_username") == USER
    assert m.attrs.get("sasl_method") == "PLAIN"
    no_secrets(sender.log(), receiver.log())


def test_wrong_password_defers_with_the_servers_535(sender, receiver):
    out = deliver_via(sender, "authbad", f"[127.0.0.1]:{receiver.authonly}", recipients=RCPT)
    assert out.results == [("deferred", "4.7.8")], out.reason()
    assert out.reason().startswith("SASL authentication failed; server "
                                   "127.0.0.1[127.0.0.1] said: 535 5.7.8 ")
    assert "status=deferred (SASL authentication failed; server" in out.log
    no_secrets(sender.log(), receiver.log())


def test_no_tls_with_default_options_sends_no_credentials(sender, receiver):
    before = len(receiver.log())
    out = deliver_via(sender, "authnone", f"[127.0.0.1]:{receiver.plainauth}",
                      recipients=RCPT)
    assert out.results == [("deferred", "4.7.0")], out.reason()
    assert out.reason() == ("SASL authentication failed; cannot authenticate to server "
                            "127.0.0.1[127.0.0.1]: no mechanism available")
    assert "sasl_method" not in receiver.log()[before:]
    no_secrets(sender.log(), receiver.log())


def test_default_tls_options_refuse_plaintext_mechanisms_too(sender, receiver):
    """Postfix's defaults: smtp_sasl_tls_security_options = $smtp_sasl_security_options
    (noplaintext, noanonymous), so PLAIN and LOGIN are not used even over TLS."""
    out = deliver_via(sender, "authdeftls", f"[127.0.0.1]:{receiver.authonly}",
                      recipients=RCPT)
    assert out.results == [("deferred", "4.7.0")], out.reason()
    assert out.reason().endswith("no mechanism available")


def test_noanonymous_authenticates_in_plain_text(sender, receiver):
    out = deliver_via(sender, "authplain", f"[127.0.0.1]:{receiver.plainauth}",
                      recipients=RCPT)
    assert out.results == [("sent", "2.0.0")], out.reason()
    m = received(receiver, out.marker)
    assert m.attrs.get("sasl_username") == USER
    assert "tls_protocol" not in m.attrs or not m.attrs["tls_protocol"]
    no_secrets(sender.log(), receiver.log())


def test_no_map_entry_means_no_auth(sender, receiver):
    before = len(receiver.log())
    out = deliver_via(sender, "authnomap", f"[127.0.0.1]:{receiver.authonly}",
                      recipients=RCPT)
    result, dsn = out.results[0]
    assert result in ("bounced", "deferred") and dsn.startswith(("5.7", "4.7")), out.reason()
    assert "554" in out.reason() and "(in reply to RCPT TO command)" in out.reason()
    assert "sasl_" not in receiver.log()[before:]
    no_secrets(sender.log(), receiver.log())


def test_no_tracebacks(sender, receiver):
    for log in (sender.log(), receiver.log()):
        assert "Traceback" not in log and "internal error" not in log
