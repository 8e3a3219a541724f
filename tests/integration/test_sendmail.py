"""Local submission: `postfix-py sendmail` and the pickup service, through the real master
(chrooted, as root), as root and as plain users. A plain user's side runs either through
setpriv (when the interpreter is reachable by that user) or in a forked child that drops
to the user with setuid() and calls the sendmail code in-process, so that what the kernel
reports about the user, and what the user can reach in the queue, are the real thing."""

import json
import os
import pwd
import select
import stat
import subprocess
import sys
import traceback

import pytest

from helpers import POSTFIX_PY
from pfxinst import wait_for
from postfix_py.lib import queue as Q
from postfix_py.lib.cleanup import phrase
from postfix_py.tools import sendmail as SM

SETPRIV = "/usr/bin/setpriv"
PLAIN_USER = "daemon"       # not mail_owner (nobody in these tests), not root


@pytest.fixture
def submitmta(instance):
    """A running instance with the pickup service, as master.cf would name it."""
    instance.main.update({"mydestination": "$myhostname, localhost"})
    instance.master_lines = ["pickup unix n - y - - pickup"]

    def sendmail(*args, input="", env=None):
        return subprocess.run([POSTFIX_PY, "-c", str(instance.dir), "sendmail", *args],
                              input=input, capture_output=True, text=True, timeout=60,
                              env=env)
    instance.sendmail = sendmail
    return instance


def run_as(user: str, argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    """tools.sendmail.main(argv) in a forked child that is `user` for good."""
    pw = pwd.getpwnam(user)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            code = SM.main(argv)
        except BaseException:
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    os.write(in_w, stdin)
    os.close(in_w)
    out, err, open_fds = b"", b"", [out_r, err_r]
    while open_fds:
        ready, _, _ = select.select(open_fds, [], [], 60)
        assert ready, "the child hangs"
        for fd in ready:
            data = os.read(fd, 65536)
            if not data:
                open_fds.remove(fd)
                os.close(fd)
            elif fd == out_r:
                out += data
            else:
                err += data
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


def interpreter_reachable_by(user: str) -> bool:
    out = subprocess.run([SETPRIV, f"--reuid={user}", "--regid=nogroup", "--clear-groups",
                          sys.executable, "-c", "import postfix_py.tools.sendmail"],
                         capture_output=True, timeout=30)
    return out.returncode == 0


def test_recipients_as_arguments_as_root(submitmta):
    submitmta.start()
    out = submitmta.sendmail("bob@example.net", "carol",
                             input="Subject: args\n\nline 1\r\n.\nnot read\n")
    assert out.returncode == 0, out.stderr
    (m, content), = submitmta.queued(text=True)
    assert m.sender == "root@mail.test.example"
    assert [r.address for r in m.recipients] == ["bob@example.net",
                                                 "carol@mail.test.example"]
    assert (m.attrs["submit_uid"], m.attrs["submit_user"]) == ("0", "root")
    head, body = content.split("\n\n", 1)
    lines = head.split("\n")
    assert lines[0] == "Received: by mail.test.example (postfix-py, from userid 0)"
    assert lines[1].startswith(f"\tid {m.queue_id}; ")
    assert lines[2] == "Subject: args"
    assert lines[3] == f"Message-Id: <{lines[3][13:27]}.{m.queue_id}@mail.test.example>"
    assert lines[4].startswith("Date: ") and lines[5] == "From: root <root@mail.test.example>"
    assert body == "line 1\n"                  # CRLF made LF; a lone dot ends the input
    log = submitmta.log()
    assert "postfix-py/pickup[" in log and f"{m.queue_id}: uid=0 from=<root>" in log
    assert f"{m.queue_id}: message-id=<" in log
    # The null sender, and a full name that needs quoting (Postfix's forms).
    out = submitmta.sendmail("-f", "<>", "-F", 'A. (x) "Q" <z>', "dave", input="x\n")
    assert out.returncode == 0, out.stderr
    out = submitmta.sendmail("-F", 'Ann Other', "erin", input="x\n")
    assert out.returncode == 0, out.stderr
    rest = {mc[0].recipients[0].address: mc for mc in submitmta.queued(text=True)}
    m, content = rest["dave@mail.test.example"]
    assert m.sender == "" and "\nFrom: MAILER-DAEMON\n" in content
    m, content = rest["erin@mail.test.example"]
    assert "\nFrom: Ann Other <root@mail.test.example>\n" in content
    assert f"{m.queue_id}: uid=0 from=<root>" in submitmta.log()
    assert phrase('A. (x) "Q" <z>') == '"A. (x) \\"Q\\" <z>"'


def test_t_extracts_recipients_and_bcc_is_removed(submitmta):
    submitmta.start()
    message = ("From: Someone <someone@example.org>\nTo: To One <to1@example.net>,\n"
               " to2@example.net\nCc: cc@example.net\nBcc: hidden@example.net,\n"
               "  hidden2@example.net\nSubject: -t\nMessage-ID: <given@example.org>\n\n"
               "body\n.\nafter the dot\n")
    out = submitmta.sendmail("-t", "-i", "-f", "<sender@example.org>", "-F", "Ignored Here",
                             "extra@example.net", input=message)
    assert out.returncode == 0, out.stderr
    (m, content), = submitmta.queued(text=True)
    assert m.sender == "sender@example.org"
    assert sorted(r.address for r in m.recipients) == [
        "cc@example.net", "extra@example.net", "hidden2@example.net", "hidden@example.net",
        "to1@example.net", "to2@example.net"]
    assert "hidden" not in content.split("\n\n", 1)[0]
    assert "From: Someone <someone@example.org>\n" in content     # present: not added
    assert content.count("Message-I") == 1 and "\nDate: " in content
    assert content.endswith("\n\nbody\n.\nafter the dot\n")     # -i: the dot is content
    assert f"{m.queue_id}: message-id=<given@example.org>" in submitmta.log()
    # -oi is -i; no recipients at all is a usage error; Resent- headers take over.
    out = submitmta.sendmail("-t", "-oi", input="Subject: none\n\nx\n")
    assert out.returncode == 64
    assert "sendmail: fatal: No recipient addresses found in message header" in out.stderr
    out = submitmta.sendmail("-t", input="To: old@example.net\nResent-To: new@example.net\n"
                                          "Resent-From: r@example.org\n\nx\n")
    assert out.returncode == 0, out.stderr
    m, content = [mc for mc in submitmta.queued(text=True) if mc[0].queue_id != m.queue_id][0]
    assert [r.address for r in m.recipients] == ["new@example.net"]
    assert "\nResent-Message-Id: <" in content and "\nResent-Date: " in content
    assert "\nResent-From: r@example.org\n" in content and "\nFrom: " not in content


def test_bs_never_offers_starttls_or_auth(submitmta, tmp_path):
    import trustme
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    passwd = submitmta.dir / "passwd"
    passwd.write_text("alice:{PLAIN}x\n")
    submitmta.main.update({"smtpd_tls_security_level": "may",
                           "smtpd_tls_cert_file": str(cert),
                           "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_type": "builtin",
                           "smtpd_sasl_path": str(passwd)})
    submitmta.start()
    out = submitmta.sendmail("-bs", input=(
        "EHLO me.example\r\nSTARTTLS\r\nAUTH PLAIN AGFsaWNlAHg=\r\n"
        "XCLIENT ADDR=192.0.2.7 NAME=mx.example LOGIN=boss\r\nXFORWARD ADDR=192.0.2.7\r\n"
        "MAIL FROM:<me>\r\n"
        "RCPT TO:<you@example.net>\r\nDATA\r\nSubject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n"))
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert replies[0] == "220 mail.test.example ESMTP postfix-py"
    ehlo = [r for r in replies if r.startswith("250-") or r == "250 8BITMIME"]
    assert ehlo[0] == "250-mail.test.example"
    assert not any("STARTTLS" in r or "AUTH" in r for r in ehlo)
    assert not any("XCLIENT" in r or "XFORWARD" in r for r in ehlo)
    assert "502 5.5.1 Error: command not implemented" in replies
    assert "503 5.5.1 Error: authentication not enabled" in replies
    # Postfix's stand-alone smtpd allows neither: the user would forge the client
    assert replies.count("550 5.7.0 Error: insufficient authorization") == 2
    assert replies[-1] == "221 2.0.0 Bye"
    (m, content), = submitmta.queued(text=True)
    assert m.sender == "me@mail.test.example"
    assert m.attrs["submit_uid"] == "0" and m.attrs["protocol"] == "ESMTP"
    assert m.attrs["client_address"] == "127.0.0.1" and "192.0.2.7" not in str(m.attrs)
    assert content.startswith(
        "Received: by mail.test.example (postfix-py, from userid 0)\n"
        f"\tid {m.queue_id}; ")
    assert "Received: from me.example (localhost [127.0.0.1])\n" \
           f"\tby mail.test.example (postfix-py) with ESMTP id {m.queue_id}\n" in content
    assert "\nFrom: me@mail.test.example\n" in content
    wait_for(lambda: "disconnect from localhost[127.0.0.1]" in submitmta.log())
    assert "starttls=0/1 auth=0/1" in submitmta.log()


def test_bs_applies_smtpds_server_filters(submitmta):
    """sendmail -bs is Postfix's stand-alone smtpd, which reads main.cf as smtpd does:
    reject footers, the command filter, EHLO keywords per client address and forbidden
    commands apply to it as to smtpd (lib/server_filters.py, Session.use_filters)."""
    (submitmta.dir / "commands").write_text(
        "/^(RCPT\\s+TO:<[^>]*>)\\s+XYZZY=\\S+$/ $1\n")
    (submitmta.dir / "ehlo").write_text("127.0.0.1 dsn, chunking\n")
    (submitmta.dir / "footers").write_text("/Unsupported option/ \\c (see $$server_name)\n")
    submitmta.main.update({
        "smtpd_reject_footer": r"\c (ref $client_address)",
        "smtpd_reject_footer_maps": f"regexp:{submitmta.dir}/footers",
        "smtpd_command_filter": f"regexp:{submitmta.dir}/commands",
        "smtpd_discard_ehlo_keyword_address_maps": f"texthash:{submitmta.dir}/ehlo"})
    submitmta.start()
    out = submitmta.sendmail("-bs", input=(
        "EHLO me.example\r\nMAIL FROM:<me> NOSUCH=1\r\nMAIL FROM:<me>\r\n"
        "RCPT TO:<you@example.net> XYZZY=1\r\nVRFY\r\nRSET\r\nGET / HTTP/1.0\r\n"
        "QUIT\r\n"))
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    end = max(i for i, r in enumerate(replies) if r.startswith("250-")) + 2
    ehlo = [r[4:] for r in replies[1:end]]
    assert "PIPELINING" in ehlo and "DSN" not in ehlo and "CHUNKING" not in ehlo
    assert replies[end:] == [
        "555 5.5.4 Unsupported option: NOSUCH=1 (see mail.test.example)",   # the map's
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",                                 # XYZZY=1 filtered away
        "501 5.5.4 Syntax: VRFY address [SMTPUTF8] (ref 127.0.0.1)",  # the footer
        "250 2.0.0 Ok",
        "221 2.7.0 Error: I can break rules, too. Goodbye."]    # and no QUIT read
    log = submitmta.log()
    assert 'localhost[127.0.0.1]: replacing command "RCPT TO:<you@example.net> XYZZY=1" ' \
        'with "RCPT TO:<you@example.net>"' in log
    assert "discarding EHLO keywords: CHUNKING DSN" in log or \
        "discarding EHLO keywords: DSN CHUNKING" in log
    wait_for(lambda: "warning: non-SMTP command from localhost[127.0.0.1]: GET / HTTP/1.0"
             in submitmta.log(), what="non-SMTP warning")


def test_bs_refused_when_smtpd_tables_cannot_be_opened(submitmta):
    """A smtpd_* table that pickup cannot open: sendmail -bs gets 421 (Postfix's
    stand-alone smtpd would not start), a plain submission still works."""
    submitmta.main["smtpd_command_filter"] = "regexp:/nonexistent/commands"
    submitmta.start()
    out = submitmta.sendmail("-bs", input="QUIT\r\n")
    assert out.stdout.splitlines()[0] == "421 4.3.0 mail.test.example Server local error"
    out = submitmta.sendmail("x@example.net", input="Subject: plain\n\nhi\n")
    assert out.returncode == 0, out.stderr
    assert len(submitmta.queued()) == 1
    assert "warning: sendmail -bs sessions are refused: smtpd_command_filter: open " \
        "/nonexistent/commands: No such file or directory" in submitmta.log()


def test_bs_as_nobody_with_setpriv(submitmta):
    if not interpreter_reachable_by("nobody"):
        pytest.skip(f"{sys.executable} is not reachable by user nobody (a parent directory "
                    "such as /root is private); the forked-child tests cover this path")
    submitmta.start()
    out = subprocess.run([SETPRIV, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          POSTFIX_PY, "-c", str(submitmta.dir), "sendmail", "-bs"],
                         input="EHLO me\r\nMAIL FROM:<n>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n"
                               "\r\nhi\r\n.\r\nQUIT\r\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "STARTTLS" not in out.stdout and "250 2.0.0 Ok: queued as" in out.stdout
    (m, _), = submitmta.queued(text=True)
    assert m.attrs["submit_uid"] == str(pwd.getpwnam("nobody").pw_uid)


def test_plain_user_submits_and_is_recorded(submitmta):
    submitmta.start()
    uid = pwd.getpwnam(PLAIN_USER).pw_uid
    rc, out, err = run_as(PLAIN_USER, ["-c", str(submitmta.dir), "x@example.net"],
                          b"Subject: from a plain user\n\nhi\n")
    assert rc == 0, err
    # -f claims another sender: allowed, as with Postfix, and the real uid is recorded.
    rc, out, err = run_as(PLAIN_USER, ["-c", str(submitmta.dir), "-f", "root@example.org",
                                       "-v", "y@example.net"], b"Subject: claims root\n\nhi\n")
    assert rc == 0, err and b"sendmail: queued as " in err
    rc, out, err = run_as(PLAIN_USER, ["-c", str(submitmta.dir), "-bs"],
                          b"EHLO me\r\nMAIL FROM:<root>\r\nRCPT TO:<z@example.net>\r\nDATA\r\n"
                          b"Subject: bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert rc == 0, err
    assert b"STARTTLS" not in out and b"AUTH" not in out
    msgs = sorted(submitmta.queued(text=True), key=lambda mc: mc[0].recipients[0].address)
    assert [m.recipients[0].address for m, _ in msgs] == ["x@example.net", "y@example.net",
                                                          "z@example.net"]
    assert [m.sender for m, _ in msgs] == [f"{PLAIN_USER}@mail.test.example",
                                           "root@example.org", "root@mail.test.example"]
    for m, content in msgs:
        assert (m.attrs["submit_uid"], m.attrs["submit_user"]) == (str(uid), PLAIN_USER)
        assert content.startswith(
            f"Received: by mail.test.example (postfix-py, from userid {uid})\n")
    log = submitmta.log()
    assert f"{msgs[0][0].queue_id}: uid={uid} from=<{PLAIN_USER}>" in log
    assert f"{msgs[1][0].queue_id}: uid={uid} from=<root@example.org>" in log


def test_plain_user_cannot_read_or_alter_queued_mail(submitmta):
    submitmta.start()
    out = submitmta.sendmail("victim@example.net", input="Subject: private\n\nsecret\n")
    assert out.returncode == 0, out.stderr
    (m, _), = submitmta.queued(text=True)
    path = str(submitmta.queue / "incoming" / m.queue_id)
    # Nothing in the queue is writable by others; the socket is the only way in.
    for dirpath, dirnames, filenames in os.walk(submitmta.queue):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISSOCK(st.st_mode):
                continue
            assert not st.st_mode & stat.S_IWOTH, os.path.join(dirpath, name)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    probe = f"""
import os
results = []
for what, fn in [
    ("list", lambda: os.listdir({str(submitmta.queue / 'incoming')!r})),
    ("read", lambda: open({path!r}, 'rb').read()),
    ("write", lambda: open({path!r}, 'ab')),
    ("unlink", lambda: os.unlink({path!r})),
    ("create", lambda: open({str(submitmta.queue / 'incoming' / 'evil')!r}, 'wb')),
    ("maildrop", lambda: open({str(submitmta.queue / 'maildrop' / 'evil')!r}, 'wb')),
]:
    try:
        fn()
        results.append(what + "=allowed")
    except PermissionError:
        results.append(what + "=denied")
print(" ".join(results))
"""
    rc, out, err = run_probe(PLAIN_USER, probe)
    assert rc == 0, err
    assert out.split() == ["list=denied", "read=denied", "write=denied", "unlink=denied",
                           "create=denied", "maildrop=denied"]
    assert os.path.exists(path) and Q.read(path).recipients[0].address == "victim@example.net"


def run_probe(user: str, code: str) -> tuple[int, str, str]:
    """exec() code in a forked child that is user; (status, stdout, stderr)."""
    pw = pwd.getpwnam(user)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.dup2(out_w, 1)
            sys.stdout = open(1, "w", closefd=False)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            exec(code, {})
            sys.stdout.flush()
            status = 0
        except BaseException:
            os.write(1, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(out_w)
    chunks = []
    while True:
        data = os.read(out_r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(), ""


def test_refusals_and_a_stopped_mail_system(submitmta):
    submitmta.main["message_size_limit"] = "2000"
    submitmta.write()
    out = submitmta.sendmail("x@example.net", input="Subject: down\n\nx\n")
    assert out.returncode == 75
    assert out.stderr.startswith("sendmail: fatal: cannot connect to the mail system (")
    assert "is postfix-py running?" in out.stderr
    submitmta.start()
    out = submitmta.sendmail("bad address@@example.net", input="x\n")
    assert out.returncode == 65, out.stderr
    assert "5.1.3 Bad recipient address syntax" in out.stderr
    out = submitmta.sendmail(input="x\n")
    assert out.returncode == 64
    assert "Recipient addresses must be specified on the command line" in out.stderr
    out = submitmta.sendmail("x@example.net", input="Subject: big\n\n" + "y" * 5000 + "\n")
    assert out.returncode == 65 and "5.3.4 Message size exceeds fixed limit" in out.stderr
    for flag, text in (("-bd", "-bd (daemon mode): use postfix-py start"),
                       ("-bp", "use postfix-py postqueue -p")):
        out = submitmta.sendmail(flag, "x@example.net", input="")
        assert out.returncode == 64 and text in out.stderr
    assert submitmta.queued(text=True) == []
    assert "local submission refused: 5.3.4 Message size exceeds fixed limit" in \
        submitmta.log()


def test_postfix_style_wakeup_column_is_harmless(submitmta):
    # Postfix's own line is `pickup unix n - y 60 1 pickup`: the master's wakeup `W`
    # must not look like a bad request.
    submitmta.master_lines = ["pickup unix n - y 1 - pickup"]
    submitmta.start()
    wait_for(lambda: len([w for w in submitmta.workers() if "pickup" in " ".join(
        w.cmdline())]) >= 1, what="a pickup worker woken up")

    def wakeups_served() -> int:
        status = json.loads(submitmta.cmd("status", "--json").stdout)
        return sum(p["clients"] or 0 for p in status["processes"] if p["service"] == "pickup")
    # Several `W` wakeups (one a second) have been answered before anything is checked.
    wait_for(lambda: wakeups_served() >= 3, 15, what="three wakeups served by pickup")
    out = submitmta.sendmail("x@example.net", input="Subject: woken\n\nx\n")
    assert out.returncode == 0, out.stderr
    assert not [line for line in submitmta.log().splitlines()
                if "/pickup[" in line and "warning" in line]
