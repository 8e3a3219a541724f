"""SASL AUTH in smtpd through the real master, chrooted, with real clients: swaks and raw
sockets, against both SASL types: the built-in passwd-file, and a real private Dovecot
(skipped when Dovecot is not installed) on queue_directory/private/auth."""

import base64
import os
import pwd
import shutil
import ssl
import subprocess
import time

import bcrypt
import pytest
import trustme

from peers import stop_dovecot
from pfxinst import SmtpClient, free_port, wait_for
from postfix_py.smtpd import sasl as S

SWAKS = shutil.which("swaks")
DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin")
PASSWORDS = {"alice": "Alice's secret 1", "bob": "bob-secret-2"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}".encode())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    os.chmod(d, 0o755)
    return str(d / "server.pem")


def passwd_text() -> str:
    """alice with SHA512-CRYPT, bob with BLF-CRYPT, as `doveadm pw` writes them."""
    alice = S.sha_crypt(PASSWORDS["alice"].encode(), "$6$" + b64(os.urandom(12))[:16]
                        .replace("+", "."))
    bob = bcrypt.hashpw(PASSWORDS["bob"].encode(), bcrypt.gensalt(5)).decode()
    bob = "$2y$" + bob[4:]
    return f"alice:{{SHA512-CRYPT}}{alice}\nbob:{{BLF-CRYPT}}{bob}::::::\n"


class Dovecot:
    """A private Dovecot with only an auth service, its socket at `socket`."""

    def __init__(self, root, socket_path, passwd_path):
        self.root = root
        self.socket = socket_path
        self.proc = None
        user = "dovenull"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        for sub in ("base", "state"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        self.log = os.path.join(root, "dovecot.log")
        self.conf = os.path.join(root, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(f"""\
base_dir = {root}/base
state_dir = {root}/state
log_path = {self.log}
protocols =
ssl = no
default_internal_user = {user}
default_login_user = {user}
auth_mechanisms = plain login
auth_failure_delay = 0
# No per-address penalty (2, 4, 8 s... per failure from 127.0.0.1): the tests' failures
# would wait for it, and smtpd's own error delays are what they measure.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {socket_path} {{
    mode = 0666
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT {passwd_path}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/tmp
}}
""")

    def start(self):
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None,
                 what="dovecot's auth socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dovecot did not start: {self.proc.stderr.read()!r}")

    def stop(self):
        if self.proc is not None:
            stop_dovecot(self.proc)
            self.proc.stderr.close()


@pytest.fixture(params=["builtin", "dovecot"])
def authmta(request, instance, pki):
    """A running instance with AUTH on: ports .starttls (smtpd_tls_security_level=encrypt,
    as submission), .smtps (wrapper mode) and .authonly (may + smtpd_tls_auth_only);
    127.0.0.1 is not in mynetworks, so relaying needs AUTH."""
    kind = request.param
    passwd = instance.dir / "passwd"
    passwd.write_text(passwd_text())
    os.chmod(passwd, 0o644)
    instance.main.update({
        "mydestination": "$myhostname, localhost",
        "mynetworks": "192.0.2.0/24",
        "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, "
                                    "reject_unauth_destination",
        "smtpd_error_sleep_time": "0s",
        "smtpd_tls_cert_file": pki,
        "smtpd_tls_security_level": "may",
        "smtpd_sasl_type": kind,
        "smtpd_sasl_authenticated_header": "yes",
    })
    if kind == "builtin":
        instance.main.update({"smtpd_sasl_path": str(passwd),
                              "smtpd_sasl_builtin_failure_delay": "0s"})
    else:
        if not DOVECOT:
            pytest.skip("Dovecot is not installed")
        private = instance.queue / "private"
        private.mkdir(parents=True)
        instance.dovecot = Dovecot(str(instance.dir / "dovecot"), str(private / "auth"),
                                   str(passwd))
        request.addfinalizer(instance.dovecot.stop)
        request.addfinalizer(instance.cleanup)    # first: smtpd's auth clients go
        instance.dovecot.start()
        instance.main["smtpd_sasl_path"] = "private/auth"      # relative: inside the jail
    instance.kind = kind
    instance.starttls, instance.smtps, instance.authonly = free_port(), free_port(), free_port()
    on = "-o smtpd_sasl_auth_enable=yes"
    instance.master_lines = [
        f"127.0.0.1:{instance.starttls} inet n - y - - smtpd {on} "
        "-o smtpd_tls_security_level=encrypt -o syslog_name=postfix-py/submission",
        f"127.0.0.1:{instance.smtps} inet n - y - - smtpd {on} "
        "-o smtpd_tls_wrappermode=yes -o syslog_name=postfix-py/smtps",
        f"127.0.0.1:{instance.authonly} inet n - y - - smtpd {on} -o smtpd_tls_auth_only=yes",
    ]
    return instance


def client_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Client(SmtpClient):
    """An SMTP client that reads the greeting at once and STARTTLSes without a certificate."""

    def __init__(self, port, wrapped=False):
        super().__init__(port, timeout=20, tls_context=client_ctx() if wrapped else None)
        self.greeting = self.reply()

    def starttls(self):
        super().starttls(client_ctx())


def swaks(port, mech, user, password, *extra, to="rcpt@elsewhere.example"):
    assert SWAKS
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(port),
                           "--helo", "client.example", "--from", "alice@example.org",
                           "--to", to, "--auth", mech, "--auth-user", user,
                           "--auth-password", password, *extra],
                          capture_output=True, text=True, timeout=60)


def assert_no_secrets(text: str):
    for user, password in PASSWORDS.items():
        for secret in (password, b64(password.encode()), plain(user, password)):
            assert secret not in text
    assert "wrong-password" not in text and b64(b"wrong-password") not in text


@pytest.mark.skipif(not SWAKS, reason="swaks is not installed")
def test_swaks_plain_and_login_over_starttls_and_smtps(authmta):
    authmta.start()
    runs = [(authmta.starttls, "--tls", "PLAIN", "alice"),
            (authmta.starttls, "--tls", "LOGIN", "bob"),
            (authmta.smtps, "--tls-on-connect", "PLAIN", "bob"),
            (authmta.smtps, "--tls-on-connect", "LOGIN", "alice")]
    for i, (port, how, mech, user) in enumerate(runs):
        out = swaks(port, mech, user, PASSWORDS[user], how, to=f"rcpt{i}@elsewhere.example")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "<~  235 2.7.0 Authentication successful" in out.stdout     # <~: over TLS
        assert "<~  250-AUTH PLAIN LOGIN" in out.stdout and "<-  250-AUTH" not in out.stdout
        if mech == "LOGIN":
            assert "<~  334 VXNlcm5hbWU6" in out.stdout and "<~  334 UGFzc3dvcmQ6" in out.stdout
    queued = sorted(authmta.queued(text=True), key=lambda mc: mc[0].recipients[0].address)
    assert len(queued) == 4
    log = authmta.log()
    assert "postfix-py/submission/smtpd[" in log and "postfix-py/smtps/smtpd[" in log
    for (m, content), (_, _, mech, user) in zip(queued, runs):
        assert m.attrs["protocol"] == "ESMTPSA"
        assert (m.attrs["sasl_method"], m.attrs["sasl_username"]) == (mech, user)
        assert f"\t(Authenticated sender: {user})\n" \
               f"\tby mail.test.example (postfix-py) with ESMTPSA id {m.queue_id}" in content
        assert (f"{m.queue_id}: client=localhost[127.0.0.1], sasl_method={mech}, "
                f"sasl_username={user}") in log
    assert_no_secrets(log)


def test_wrong_password_unknown_user_and_temporary_failures(authmta):
    authmta.start()
    c = Client(authmta.starttls)
    c.cmd("EHLO client.example")
    c.starttls()
    assert "250-AUTH PLAIN LOGIN" in c.cmd("EHLO client.example")
    fail = "535 5.7.8 Error: authentication failed: "
    assert c.cmd("AUTH PLAIN " + plain("alice", "wrong-password")).startswith(fail)
    assert c.cmd("AUTH PLAIN " + plain("mallory", "wrong-password")).startswith(fail)
    assert c.cmd("AUTH LOGIN " + b64(b"bob")) == "334 UGFzc3dvcmQ6"
    assert c.cmd(b64(b"wrong-password")).startswith(fail)
    assert c.cmd("AUTH XOAUTH2 abc") == fail + "Invalid authentication mechanism"
    assert c.cmd("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<rcpt@elsewhere.example>") == \
        "554 5.7.1 <rcpt@elsewhere.example>: Relay access denied"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: "disconnect from" in authmta.log(), what="disconnect line")
    log = authmta.log()
    assert "warning: localhost[127.0.0.1]: SASL PLAIN authentication failed: " in log
    assert ", sasl_username=alice" in log and ", sasl_username=mallory" in log
    assert "warning: localhost[127.0.0.1]: SASL LOGIN authentication failed: " in log
    assert "ehlo=2 starttls=1 auth=0/4 mail=1 rcpt=0/1 quit=1" in log
    assert_no_secrets(log)
    if authmta.kind == "dovecot":
        # The auth server goes away: a temporary failure, and AUTH is no longer offered.
        authmta.dovecot.stop()
        c = Client(authmta.smtps, wrapped=True)
        ehlo = c.cmd("EHLO client.example")
        if "AUTH" in ehlo:      # a worker connected before: its connection breaks now
            assert c.cmd("AUTH PLAIN " + plain("alice", "x")) == \
                "454 4.7.0 Temporary authentication failure: " \
                "Connection lost to authentication server"
        assert c.cmd("AUTH PLAIN " + plain("alice", "x")) in (
            "454 4.7.0 Temporary authentication failure: Can't connect to authentication "
            "server", "535 5.7.8 Error: authentication failed: Invalid authentication "
            "mechanism")
        c.close()
        assert "warning: SASL: Connect to private/auth failed" in authmta.log()


def test_auth_only_after_tls(authmta):
    authmta.start()
    # smtpd_tls_auth_only = yes: neither offered nor accepted in plain text (Postfix 3.7's
    # reply), offered and accepted after STARTTLS.
    c = Client(authmta.authonly)
    ehlo = c.cmd("EHLO client.example")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORDS["alice"])) == \
        "503 5.5.1 Error: authentication not enabled"
    c.starttls()
    assert "250-AUTH PLAIN LOGIN" in c.cmd("EHLO client.example")
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORDS["alice"])) == \
        "235 2.7.0 Authentication successful"
    c.close()
    # Enforced TLS: AUTH before STARTTLS is refused like any other command.
    c = Client(authmta.starttls)
    ehlo = c.cmd("EHLO client.example")
    assert "AUTH" not in ehlo
    assert c.cmd("AUTH PLAIN " + plain("alice", PASSWORDS["alice"])) == \
        "530 5.7.0 Must issue a STARTTLS command first"
    c.close()
    assert_no_secrets(authmta.log())


def test_relay_needs_authentication(authmta):
    authmta.start()
    c = Client(authmta.smtps, wrapped=True)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<rcpt@elsewhere.example>") == \
        "554 5.7.1 <rcpt@elsewhere.example>: Relay access denied"
    assert c.cmd("RCPT TO:<postmaster@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("AUTH PLAIN " + plain("bob", PASSWORDS["bob"])) == \
        "235 2.7.0 Authentication successful"
    assert c.cmd("MAIL FROM:<bob@example.org> AUTH=<>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<rcpt@elsewhere.example>") == "250 2.1.5 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    log = authmta.log()
    assert "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 5.7.1 " \
           "<rcpt@elsewhere.example>: Relay access denied" in log


# Builtin only: Dovecot holds each failure reply for its own timer (up to 0.5 s), which
# would blur the timings, and smtpd's error counting is the same code for both types.
@pytest.mark.parametrize("authmta", ["builtin"], indirect=True)
def test_burst_of_failed_auth_is_slowed_and_disconnected(authmta):
    authmta.main.update({"smtpd_soft_error_limit": "3", "smtpd_hard_error_limit": "8",
                         "smtpd_error_sleep_time": "1s"})
    authmta.start()
    c = Client(authmta.smtps, wrapped=True)
    c.cmd("EHLO client.example")
    times, replies = [], []
    for i in range(30):
        t = time.monotonic()
        r = c.cmd("AUTH PLAIN " + plain("alice", "wrong-password"))
        times.append(time.monotonic() - t)
        replies.append(r)
        if "<EOF>" in r or r.startswith("421"):
            break
    c.close()
    fails = [r for r in replies if r.startswith("535 5.7.8")]
    assert len(fails) == 8, replies
    assert replies[8].startswith("421 4.7.0 mail.test.example Error: too many errors")
    assert all(t < 0.9 for t in times[:3]), times         # up to the soft limit: at once
    assert all(t >= 0.95 for t in times[3:8]), times      # past it: smtpd_error_sleep_time
    wait_for(lambda: "too many errors after AUTH from localhost[127.0.0.1]" in authmta.log(),
             what="the too-many-errors line")
    assert_no_secrets(authmta.log())


@pytest.mark.parametrize("authmta", ["builtin"], indirect=True)
def test_builtin_passwd_file_changes_without_restart(authmta):
    authmta.main["smtpd_sasl_builtin_failure_delay"] = "1s"
    authmta.start()
    passwd = authmta.dir / "passwd"

    def auth(user, password):
        c = Client(authmta.smtps, wrapped=True)
        c.cmd("EHLO client.example")
        t = time.monotonic()
        r = c.cmd("AUTH PLAIN " + plain(user, password))
        took = time.monotonic() - t
        c.cmd("QUIT")
        c.close()
        return r, took

    ok = "235 2.7.0 Authentication successful"
    assert auth("alice", PASSWORDS["alice"])[0] == ok
    r, took = auth("alice", "wrong-password")
    assert r.startswith("535 5.7.8") and took >= 0.95      # the builtin failure delay
    # Edited in place: seen by the very next AUTH of the same (chrooted) worker.
    with open(passwd, "a") as f:
        f.write("carol:{PLAIN}carol-secret\n")
    assert auth("carol", "carol-secret")[0] == ok
    # Replaced by rename, outside the jail: one temporary failure (the old copy is not
    # trusted), then a new worker reads the new file; the old entry is gone.
    new = authmta.dir / "passwd.new"
    new.write_text("dave:{PLAIN}dave-secret\n")
    os.chmod(new, 0o644)
    os.rename(new, passwd)
    r, _ = auth("dave", "dave-secret")
    assert r in (ok, f"454 4.7.0 Temporary authentication failure: {passwd} has changed")
    if r != ok:
        assert "has changed -- restarting" in authmta.log()
        r, _ = wait_for(lambda: (lambda x: x if x[0] == ok else None)(
            auth("dave", "dave-secret")), timeout=15, what="a worker with the new file")
    assert auth("carol", "carol-secret")[0].startswith("535 5.7.8")
