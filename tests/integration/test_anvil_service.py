"""anvil and smtpd's client limits through the real master: a real anvil chrooted as
mail_owner on private/anvil, real smtpd workers, clients on 127.0.0.1."""

import os
import re
import signal
import socket
import ssl
import struct
import time

import psutil
import pytest
import trustme

from pfxinst import SmtpClient, free_port, wait_for
from postfix_py.lib import attr

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="chroot and privilege drop need root")


@pytest.fixture
def limited(instance):
    """An instance with smtpd and anvil; 127.0.0.1 is not exempt from the limits."""
    instance.add_smtpd(smtpd_client_event_limit_exceptions="", anvil_rate_time_unit="60s")
    instance.service = f"127.0.0.1:{instance.port}"
    instance.master_lines.append("anvil unix - - y - 1 anvil")
    return instance


def session(inst) -> tuple[SmtpClient, str]:
    c = SmtpClient(inst.port)
    return c, c.reply()


def anvil_pid(inst):
    for p in inst.workers():
        try:
            if "postfix-py/anvil" in " ".join(p.cmdline()):
                return p.pid
        except psutil.NoSuchProcess:
            continue        # a worker that ended while we looked
    return None


def warnings(inst, text):
    return [l for l in inst.log().splitlines() if f"warning: {text}" in l]


def test_count_limit_refuses_a_second_simultaneous_connection(limited):
    inst = limited
    inst.main["smtpd_client_connection_count_limit"] = "1"
    inst.start()
    first, banner = session(inst)
    assert banner.startswith("220 ")
    second, reply = session(inst)
    assert reply == "421 4.7.0 mail.test.example Error: too many connections from 127.0.0.1"
    assert second.reply() == "<EOF>"
    second.close()
    line = wait_for(lambda: warnings(inst, "Connection concurrency limit exceeded"),
                    what="the concurrency warning")[0]
    assert re.search(r"warning: Connection concurrency limit exceeded: 2 from "
                     rf"\S+\[127\.0\.0\.1\] for service {re.escape(inst.service)}$", line)
    # The first session is unaffected; once it ends, a new one is welcome.
    assert first.cmd("EHLO client.example").startswith("250")
    assert first.cmd("QUIT").startswith("221")
    first.close()
    wait_for(lambda: session_ok(inst), what="a connection accepted after the first ended")


def session_ok(inst) -> bool:
    c, banner = session(inst)
    try:
        if banner.startswith("220 "):
            c.cmd("QUIT")
            return True
        return False
    finally:
        c.close()


def test_rate_limit_refuses_the_third_connection_in_the_window(limited):
    inst = limited
    inst.main.update({"smtpd_client_connection_rate_limit": "2",
                      "smtpd_client_connection_count_limit": "0",
                      "anvil_rate_time_unit": "2s"})
    inst.start()
    for _ in range(2):
        c, banner = session(inst)
        assert banner.startswith("220 "), banner
        assert c.cmd("QUIT").startswith("221")
        c.close()
    c, reply = session(inst)
    assert reply.startswith("421 4.7.0 mail.test.example Error: too many connections from 127.0.0.1")
    c.close()
    line = wait_for(lambda: warnings(inst, "Connection rate limit exceeded"), what="warning")[0]
    assert re.search(r"warning: Connection rate limit exceeded: 3 from \S+\[127\.0\.0\.1\] "
                     rf"for service {re.escape(inst.service)}$", line)
    # A time unit after the first connection the count starts over.
    time.sleep(2.1)
    assert session_ok(inst)


def test_message_and_recipient_rate_limits(limited):
    inst = limited
    inst.main.update({"smtpd_client_message_rate_limit": "2",
                      "smtpd_client_recipient_rate_limit": "3"})
    inst.start()
    c, banner = session(inst)
    assert banner.startswith("220 ")
    assert c.cmd("EHLO client.example").startswith("250")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    for _ in range(3):
        assert c.cmd("RCPT TO:<postmaster@localhost>") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<postmaster@localhost>") == \
        "450 4.7.1 Error: too many recipients from 127.0.0.1"
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RSET").startswith("250")
    assert c.cmd("MAIL FROM:<a@client.example>") == "450 4.7.1 Error: too much mail from 127.0.0.1"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: warnings(inst, "Message delivery request rate limit exceeded: 3 from "),
             what="message rate warning")
    line = warnings(inst, "Recipient address rate limit exceeded")[0]
    assert re.search(r"Recipient address rate limit exceeded: 4 from \S+\[127\.0\.0\.1\] "
                     rf"for service {re.escape(inst.service)}$", line)
    # The rates belong to the client, not to the connection.
    c, _ = session(inst)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@client.example>").startswith("450 4.7.1")
    c.close()


def test_exceptions_exempt_the_listed_client(limited):
    inst = limited
    inst.main.update({"smtpd_client_connection_count_limit": "1",
                      "smtpd_client_message_rate_limit": "1",
                      "smtpd_client_event_limit_exceptions": "127.0.0.1"})
    inst.start()
    clients = []
    for _ in range(3):
        c, banner = session(inst)
        assert banner.startswith("220 "), banner
        clients.append(c)
    c = clients[0]
    c.cmd("EHLO client.example")
    for _ in range(3):
        assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
        assert c.cmd("RSET").startswith("250")
    for c in clients:
        c.close()
    assert not warnings(inst, "Connection concurrency")


def test_without_anvil_mail_flows_and_smtpd_warns_once(limited):
    inst = limited
    inst.main.update({"smtpd_client_connection_count_limit": "1",
                      "smtpd_client_message_rate_limit": "1"})
    inst.master_lines = [f"{inst.service} inet n - y - 1 smtpd"]   # no anvil; one worker
    inst.start()
    for _ in range(2):
        c, banner = session(inst)
        assert banner.startswith("220 ")
        c.cmd("EHLO client.example")
        for _ in range(2):
            assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
            assert c.cmd("RCPT TO:<postmaster@localhost>") == "250 2.1.5 Ok"
            assert c.cmd("DATA").startswith("354")
            assert c.cmd("Subject: t\r\n\r\nhello\r\n.").startswith("250 2.0.0 Ok: queued as ")
        assert c.cmd("QUIT").startswith("221")
        c.close()
    wait_for(lambda: inst.log().count("disconnect from") >= 2, what="both sessions logged")
    lines = warnings(inst, "connect to private/anvil")
    assert len(lines) == 1, lines
    assert lines[0].endswith("warning: connect to private/anvil: No such file or directory")


# --- anvil itself, talked to directly ---------------------------------------------------------

def anvil_socket(inst) -> socket.socket:
    path = str(inst.queue / "private" / "anvil")
    wait_for(lambda: os.path.exists(path), what="private/anvil")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def ask(sock, **attrs):
    attr.write_frame(sock, attrs, timeout=10)
    return attr.read_frame(sock, timeout=10)


def test_protocol_abuse_gets_status_2_and_anvil_lives_on(limited):
    inst = limited
    inst.start()
    s = anvil_socket(inst)
    pid = wait_for(lambda: anvil_pid(inst), what="the anvil worker")
    assert ask(s, request="connect", ident="svc:192.0.2.1") == {
        "status": b"0", "count": b"1", "rate": b"1"}
    for bad in ({"request": "connect"}, {"request": "nope", "ident": "x:1"},
                {"request": "lookup", "ident": "x:1", "more": "1"},
                {"request": "connect", "ident": "bad ident"}, {"ident": "x:1"}):
        reply = ask(s, **bad)
        assert reply["status"] == b"2", (bad, reply)
    # a body that is not attributes: status 2, and the stream stays usable
    s.sendall(struct.pack("!I", 3) + b"\x00ab")
    assert attr.read_frame(s, timeout=10)["status"] == b"2"
    assert ask(s, request="lookup", ident="svc:192.0.2.1")["count"] == b"1"
    # a bad length prefix: status 2, then the connection is closed
    s.sendall(struct.pack("!I", 0))
    assert attr.read_frame(s, timeout=10)["status"] == b"2"
    assert s.recv(10) == b""
    s.close()
    # a client closing mid-frame, and many at once
    for _ in range(20):
        t = anvil_socket(inst)
        t.sendall(struct.pack("!I", 100) + b"\x07request")
        t.close()
    s = anvil_socket(inst)
    # the first connection went away: its registered connection ended with it
    assert ask(s, request="lookup", ident="svc:192.0.2.1") == {
        "status": b"0", "count": b"0", "rate": b"1", "mail": b"0", "rcpt": b"0",
        "newtls": b"0", "auth": b"0"}
    s.close()
    assert anvil_pid(inst) == pid
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    proc = psutil.Process(pid)
    assert proc.uids().real != 0          # runs as mail_owner
    assert os.readlink(f"/proc/{pid}/root") == str(inst.queue)   # chrooted


STAMP = r"[A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d"


def test_statistics_logged_periodically(limited):
    inst = limited
    inst.main.update({"anvil_status_update_time": "1s", "anvil_rate_time_unit": "30s"})
    inst.start()
    s = anvil_socket(inst)
    assert ask(s, request="connect", ident="smtp:192.0.2.1")["status"] == b"0"
    assert ask(s, request="message", ident="smtp:192.0.2.1")["status"] == b"0"
    wait_for(lambda: re.search(r"statistics: max connection rate 1/30s for "
                               rf"\(smtp:192\.0\.2\.1\) at {STAMP}$", inst.log(), re.M),
             what="periodic statistics")
    log = inst.log()
    assert re.search(rf"statistics: max connection count 1 for \(smtp:192\.0\.2\.1\) at {STAMP}$",
                     log, re.M)
    assert re.search(rf"statistics: max message rate 1/30s for \(smtp:192\.0\.2\.1\) at {STAMP}$",
                     log, re.M)
    assert re.search(rf"statistics: max cache size 1 at {STAMP}$", log, re.M)
    s.close()


def test_statistics_logged_at_exit(limited):
    inst = limited
    inst.start()            # anvil_status_update_time is 600s: only the exit logs them
    s = anvil_socket(inst)
    for _ in range(3):
        assert ask(s, request="recipient", ident="smtp:192.0.2.1")["status"] == b"0"
    assert ask(s, request="newtls", ident="smtp:192.0.2.1")["status"] == b"0"
    s.close()
    assert "statistics:" not in inst.log()
    master = inst.master_pid()
    assert inst.cmd("stop").returncode == 0
    wait_for(lambda: not psutil.pid_exists(master), what="the master's exit")
    wait_for(lambda: re.search(rf"statistics: max recipient rate 3/60s for \(smtp:192\.0\.2\.1\)"
                               rf" at {STAMP}$", inst.log(), re.M), what="statistics at exit")
    assert re.search(rf"statistics: max newtls rate 1/60s for \(smtp:192\.0\.2\.1\) at {STAMP}$",
                     inst.log(), re.M)


def test_auth_rate_limit(limited):
    inst = limited
    inst.main["smtpd_client_auth_rate_limit"] = "2"
    inst.start()
    c, _ = session(inst)
    c.cmd("EHLO client.example")
    for _ in range(2):      # AUTH is not enabled here; it is counted all the same, as Postfix
        assert c.cmd("AUTH PLAIN").startswith("503 5.5.1 Error: authentication not enabled")
    assert c.cmd("AUTH PLAIN") == "450 4.7.1 Error: too many AUTH commands from 127.0.0.1"
    c.close()
    line = wait_for(lambda: warnings(inst, "AUTH command rate limit exceeded"), what="warning")[0]
    assert re.search(r"AUTH command rate limit exceeded: 3 from \S+\[127\.0\.0\.1\] "
                     rf"for service {re.escape(inst.service)}$", line)


def tls_client_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_new_tls_session_rate_limit_with_starttls_and_wrapper_mode(limited, tmp_path):
    inst = limited
    ca = trustme.CA()
    pem = inst.dir / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    inst.main.update({"smtpd_tls_cert_file": str(pem), "smtpd_tls_security_level": "may",
                      "smtpd_client_new_tls_session_rate_limit": "1",
                      "smtpd_tls_session_cache_timeout": "0"})      # every session is new
    inst.smtps = free_port()
    inst.master_lines.append(f"127.0.0.1:{inst.smtps} inet n - y - - smtpd"
                             " -o smtpd_tls_wrappermode=yes")
    inst.start()
    ctx = tls_client_ctx()
    # STARTTLS: the first new session is within the limit, the second is one too many
    # (421 after its handshake), and the third is refused before any handshake.
    c, _ = session(inst)
    c.cmd("EHLO client.example")
    c.starttls(ctx)
    assert c.cmd("EHLO client.example").startswith("250")
    c.cmd("QUIT")
    c.close()
    c, _ = session(inst)
    c.cmd("EHLO client.example")
    c.starttls(ctx)
    reply = c.reply()
    assert re.match(r"421 4\.7\.0 mail\.test\.example Error: too many new TLS sessions from "
                    r"\S+\[127\.0\.0\.1\]$", reply.splitlines()[0]), reply
    c.close()
    c, _ = session(inst)
    c.cmd("EHLO client.example")
    reply = c.cmd("STARTTLS")
    assert re.match(r"454 4\.7\.0 Error: too many new TLS sessions from \S+\[127\.0\.0\.1\]$",
                    reply), reply
    c.close()
    log = inst.log()
    assert re.search(r"warning: New TLS session rate limit exceeded: 2 from \S+\[127\.0\.0\.1\] "
                     rf"for service {re.escape(inst.service)}$", log, re.M)
    assert re.search(r"warning: Refusing STARTTLS request from \S+\[127\.0\.0\.1\] "
                     rf"for service {re.escape(inst.service)}$", log, re.M)
    # Wrapper mode counts under its own service name.
    wrapped = SmtpClient(inst.smtps, tls_context=ctx)
    assert wrapped.reply().startswith("220 ")
    wrapped.close()
    wrapped = SmtpClient(inst.smtps, tls_context=ctx)
    assert wrapped.reply().startswith("421 4.7.0 mail.test.example Error: too many new TLS")
    wrapped.close()
    with pytest.raises((ssl.SSLError, OSError)):
        SmtpClient(inst.smtps, tls_context=ctx)     # no handshake at all
    wait_for(lambda: re.search(r"warning: Refusing TLS service request from \S+\[127\.0\.0\.1\]"
                               rf" for service 127\.0\.0\.1:{inst.smtps}$", inst.log(), re.M),
             what="the wrapper-mode refusal")


def test_counting_resumes_after_anvil_dies(limited):
    inst = limited
    inst.main["smtpd_client_connection_count_limit"] = "1"
    inst.start()
    first, banner = session(inst)
    assert banner.startswith("220 ")
    old = wait_for(lambda: anvil_pid(inst), what="the anvil worker")
    os.kill(old, signal.SIGKILL)        # its counts die with it, as Postfix's would
    wait_for(lambda: anvil_pid(inst) != old, what="the old anvil reaped")
    # smtpd reconnects (a fresh anvil is started on demand) and counts again from zero.
    second, banner = session(inst)
    assert banner.startswith("220 "), banner
    third, reply = session(inst)
    assert reply.startswith("421 4.7.0 mail.test.example Error: too many connections"), reply
    for c in (first, second, third):
        c.close()
    assert wait_for(lambda: anvil_pid(inst), what="the new anvil") != old
