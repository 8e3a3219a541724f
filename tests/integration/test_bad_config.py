"""Bad configuration, as an administrator meets it: `postfix-py start` refuses a broken
main.cf with the file and line and leaves nothing running; `postfix-py reload` (and a bare
SIGHUP) keeps the running configuration and says why; broken TLS keys and certificates
refuse `start` and `check`, each named by its parameter and file; what only a worker finds
(a CA file) leaves TLS-optional services in plain text while TLS-required ones refuse, as
Postfix does.

The main.cf cases live in tests/data/bad_configs/main_*/ (main.cf + expected-error, one
folder per case, beside the master.cf cases of tests/unit/test_mastercf.py). The case's
main.cf comes first, so the line numbers in expected-error are the folder file's; the
instance's own settings (queue_directory, ...) are appended for names the case leaves unset.
An expected-error that starts with `line N:` is reported as `.../main.cf, line N: ...`.
"""

import datetime
import fcntl
import os
import re
import signal
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from pfxinst import SmtpClient, free_port, wait_for

BAD_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "bad_configs"
CASES = sorted(p.name for p in BAD_CONFIGS.iterdir() if p.name.startswith("main_"))
ROOT = os.geteuid() == 0


def composed_main_cf(instance, case: str) -> str:
    """The case's main.cf, then the instance's settings that the case does not make."""
    text = (BAD_CONFIGS / case / "main.cf").read_text()
    own = set(re.findall(r"^(\w+)\s*=", text, re.M))
    if not text.endswith("\n"):
        text += "\n"
    return text + "".join(f"{k} = {v}\n" for k, v in instance.main.items() if k not in own)


def expected_error(instance, case: str) -> str:
    text = (BAD_CONFIGS / case / "expected-error").read_text().strip()
    return f"{instance.dir}/main.cf, {text}" if text.startswith("line ") else text


def master_running(instance) -> bool:
    """Whether a master holds the instance's pid file lock (what `status` believes)."""
    try:
        fd = os.open(instance.queue / "pid" / "master.pid", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def greeting(port: int) -> str:
    c = SmtpClient(port)
    try:
        return c.reply()
    finally:
        c.close()


def test_the_folders_are_there():
    assert len(CASES) >= 8
    for case in CASES:
        assert (BAD_CONFIGS / case / "expected-error").exists(), case
        assert not (BAD_CONFIGS / case / "master.cf").exists(), case   # test_mastercf's


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.skipif(not ROOT and c == "main_unknown_mail_owner",
                                             reason="mail_owner is checked only as root"))
    for c in CASES])
def test_start_refuses_with_file_and_line(instance, case):
    port = free_port()
    instance.master_lines = [f"127.0.0.1:{port} inet n - n - - smtpd"]
    instance.write()
    (instance.dir / "main.cf").write_text(composed_main_cf(instance, case))
    out = instance.cmd("start")
    assert out.returncode == 1, out
    want = f"postfix-py/postfix-script: fatal: {expected_error(instance, case)}"
    assert out.stderr.splitlines()[-1] == want, out.stderr
    assert "Traceback" not in out.stderr
    assert not master_running(instance)
    assert not listening(port)
    assert instance.master_pid() is None


def test_reload_keeps_the_running_configuration(instance):
    port = free_port()
    instance.main["smtpd_banner"] = "$myhostname ESMTP generation-1"
    instance.master_lines = [f"127.0.0.1:{port} inet n - n - - smtpd"]
    instance.start()
    master = instance.master_pid()
    assert greeting(port) == "220 mail.test.example ESMTP generation-1"
    good = (instance.dir / "main.cf").read_text()
    instance.main["smtpd_banner"] = "$myhostname ESMTP generation-2"
    for case in CASES:
        if case == "main_unknown_mail_owner" and not ROOT:
            continue
        (instance.dir / "main.cf").write_text(composed_main_cf(instance, case))
        why = expected_error(instance, case)
        out = instance.cmd("reload")
        assert out.returncode == 1, (case, out)
        assert f"error: {why}; the running configuration stays in effect" in out.stderr, \
            (case, out.stderr)
        assert "Traceback" not in out.stderr
        # The master, told directly (kill -HUP), refuses the same way and says so.
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: f"warning: reload: {why}; keeping the running configuration"
                 in instance.log(), what=f"the master's refusal of {case}")
        assert greeting(port) == "220 mail.test.example ESMTP generation-1", case
    assert instance.master_pid() == master
    log = instance.log()
    assert "reload -- version" not in log
    assert "exit status" not in log and "killed by signal" not in log
    assert "Traceback" not in log and "uncaught exception" not in log
    # A good configuration still reloads: the refusals above were not a broken reload.
    (instance.dir / "main.cf").write_text(good.replace("generation-1", "generation-2"))
    out = instance.cmd("reload")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: greeting(port) == "220 mail.test.example ESMTP generation-2",
             what="the new banner")


# --- TLS keys and certificates -------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A good certificate, a stranger's key, an expired certificate; paths by name."""
    d = tmp_path_factory.mktemp("badtls")
    os.chmod(d, 0o755)
    ca = trustme.CA()
    good = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("other.example")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert("localhost", not_before=now - datetime.timedelta(days=30),
                            not_after=now - datetime.timedelta(days=1))
    good.cert_chain_pems[0].write_to_path(str(d / "cert-only.pem"))
    other.private_key_pem.write_to_path(str(d / "other-key.pem"))
    expired.private_key_and_cert_chain_pem.write_to_path(str(d / "expired.pem"))
    return {"dir": str(d), "missing": str(d / "missing.pem"), "cert": str(d / "cert-only.pem"),
            "other_key": str(d / "other-key.pem"), "expired": str(d / "expired.pem")}


Client = SmtpClient


def send_plain_mail(client: Client) -> str:
    assert client.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert client.cmd("RCPT TO:<r@localhost>") == "250 2.1.5 Ok"
    assert client.cmd("DATA").startswith("354 ")
    return client.cmd("Subject: plain\r\n\r\nstill served\r\n.")


def test_broken_keys_and_certificates_refuse_start(instance, tls_files):
    """start, reload and check load every pair a service names: each problem is named."""
    f = tls_files
    problems = {   # service -> (-o overrides, the error that must be named)
        "missing": (f"smtpd_tls_cert_file={f['missing']}",
                    f"smtpd_tls_cert_file: cannot read file {f['missing']}: "
                    "No such file or directory"),
        "directory": (f"smtpd_tls_cert_file={f['dir']}",
                      f"smtpd_tls_cert_file: cannot read file {f['dir']}: Is a directory"),
        "missing_key": (f"smtpd_tls_cert_file={f['cert']} -o smtpd_tls_key_file={f['missing']}",
                        f"smtpd_tls_key_file: cannot read file {f['missing']}: "
                        "No such file or directory"),
        "mismatch": (f"smtpd_tls_cert_file={f['cert']} -o smtpd_tls_key_file={f['other_key']}",
                     f"smtpd_tls_key_file: the private key in {f['other_key']} does not "
                     f"match the certificate in {f['cert']} (smtpd_tls_cert_file)"),
        "client_mismatch": (f"smtp_tls_cert_file={f['cert']} -o smtp_tls_key_file={f['other_key']}",
                            f"smtp_tls_key_file: the private key in {f['other_key']} does not "
                            f"match the certificate in {f['cert']} (smtp_tls_cert_file)"),
    }
    ports = {name: free_port() for name in problems}
    instance.master_lines = [f"127.0.0.1:{ports[name]} inet n - y - - smtpd -o {overrides}"
                             for name, (overrides, _) in problems.items()]
    instance.write()
    out = instance.cmd("check")
    assert out.returncode == 1
    for name, (_, problem) in problems.items():
        assert f"error: service 127.0.0.1:{ports[name]}/inet: {problem}" in out.stderr, name
    assert "Traceback" not in out.stderr
    out = instance.cmd("start")
    assert out.returncode == 1
    first = problems["missing"][1]
    assert out.stderr.splitlines()[-1] == \
        f"postfix-py/postfix-script: fatal: service 127.0.0.1:{ports['missing']}/inet: {first}"
    assert not master_running(instance)
    assert not any(listening(port) for port in ports.values())


def test_broken_tls_material(instance, tls_files):
    """What only the worker finds (a CA file) disables TLS with a warning, as in Postfix."""
    f = tls_files
    problems = {   # service -> (security level, -o overrides, the error the log must show)
        "cafile": ("may", f"smtpd_tls_cert_file={f['expired']} -o smtpd_tls_CAfile={f['missing']}",
                   f"smtpd_tls_CAfile: cannot read file {f['missing']}: "
                   "No such file or directory"),
        "cafile_encrypt": ("encrypt", f"smtpd_tls_cert_file={f['expired']} "
                                      f"-o smtpd_tls_CAfile={f['missing']}",
                           f"smtpd_tls_CAfile: cannot read file {f['missing']}"),
    }
    ports = {name: free_port() for name in [*problems, "expired", "wrapper"]}
    instance.main.update({"mydestination": "$myhostname, localhost",
                          "smtpd_error_sleep_time": "0s"})
    instance.master_lines = [
        f"127.0.0.1:{ports[name]} inet n - y - - smtpd -o smtpd_tls_security_level={level}"
        f" -o {overrides}" for name, (level, overrides, _) in problems.items()]
    instance.master_lines += [
        f"127.0.0.1:{ports['expired']} inet n - y - - smtpd -o smtpd_tls_security_level=may"
        f" -o smtpd_tls_cert_file={f['expired']}",
        f"127.0.0.1:{ports['wrapper']} inet n - y - - smtpd -o smtpd_tls_wrappermode=yes"
        f" -o smtpd_tls_cert_file={f['expired']} -o smtpd_tls_CAfile={f['missing']}"]
    out = instance.start()
    assert "Traceback" not in out.stderr

    for name, (level, _, problem) in problems.items():
        c = Client(ports[name])
        assert c.reply().startswith("220 "), name
        ehlo = c.cmd("EHLO client.example")
        assert ehlo.startswith("250-mail.test.example") and "STARTTLS" not in ehlo, name
        if level == "may":
            # TLS is optional: plain text goes on, as with Postfix.
            assert send_plain_mail(c).startswith("250 2.0.0 Ok: queued as "), name
        else:
            # TLS is required and unavailable: nothing is accepted in plain text.
            assert c.cmd("MAIL FROM:<a@example.org>") == \
                "530 5.7.0 Must issue a STARTTLS command first", name
        assert c.cmd("STARTTLS") == "454 4.7.0 TLS not available due to local problem", name
        assert c.cmd("QUIT") == "221 2.0.0 Bye"
        c.close()
        wait_for(lambda: any("warning: TLS library problem: " in line and problem in line
                             for line in instance.log().splitlines()),
                 what=f"a warning naming the parameter ({name})")

    # An expired certificate is a warning, not an outage: Postfix serves it too.
    c = Client(ports["expired"])
    c.reply()
    assert "250-STARTTLS" in c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock)
    c.cmd("EHLO client.example")
    assert send_plain_mail(c).startswith("250 2.0.0 Ok: queued as ")
    c.close()
    assert re.search(rf"warning: smtpd_tls_cert_file: the certificate in {f['expired']} "
                     r"expired on \d{4}-\d\d-\d\d", instance.log())

    # Wrapper mode without TLS: no plain-text greeting on a port clients expect TLS on.
    c = Client(ports["wrapper"])
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: "TLS wrapper mode requested but TLS is not available; disconnecting"
             in instance.log(), what="the wrapper-mode warning")

    log = instance.log()
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "exit status" not in log and "killed by signal" not in log
    queued = [n for n in os.listdir(instance.queue / "incoming") if not n.startswith(".")]
    assert len(queued) == 2          # the "may" service, and the expired one
