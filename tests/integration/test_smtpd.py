"""smtpd through the real master: real clients (smtplib, swaks, raw sockets) on 127.0.0.1,
checking replies, queue files and log lines as an administrator would."""

import glob
import os
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from pfxinst import SmtpClient, wait_for

SWAKS = shutil.which("swaks")


@pytest.fixture
def mta(instance):
    """An instance with one smtpd service; .port and .queued()."""
    return instance.add_smtpd()


def test_smtplib_queues_a_message(mta):
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        code, banner = s.ehlo("client.example")
        assert code == 250 and b"PIPELINING" in banner and b"SIZE 10240000" in banner
        assert b"STARTTLS" not in banner
        refused = s.sendmail("alice@example.org", ["bob@mail.test.example"],
                             b"Subject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\n"
                             b".leading dot\r\nbody\r\n")
        assert refused == {}
    (m, content), = mta.queued()
    assert m.sender == "alice@example.org"
    assert [r.address for r in m.recipients] == ["bob@mail.test.example"]
    assert m.attrs["client_address"] == "127.0.0.1"
    assert m.attrs["helo_name"] == "client.example"
    text = content.decode()
    assert text.startswith("Received: from client.example (localhost [127.0.0.1])\n"
                           "\tby mail.test.example (postfix-py) with ESMTP id " + m.queue_id +
                           "\n\tfor <bob@mail.test.example>; ")
    # 127.0.0.1 is in the local rewrite context (permit_inet_interfaces): cleanup adds
    # the missing Date: and From: after the last header, as Postfix
    assert re.search(r"\nSubject: hello\nMessage-ID: <m1@example.org>\nDate: [^\n]+\n"
                     r"From: alice@example.org\n\n\.leading dot\nbody\n\Z", text), text
    log = mta.log()
    assert f"{m.queue_id}: client=localhost[127.0.0.1]" in log
    assert f"{m.queue_id}: message-id=<m1@example.org>" in log
    wait_for(lambda: "disconnect from localhost[127.0.0.1] ehlo=1 mail=1 rcpt=1 data=1 "
                     "quit=1 commands=5" in mta.log(), what="the disconnect line")
    st = os.stat(glob.glob(str(mta.queue / "incoming" / "*"))[0])
    assert st.st_mode & 0o777 == 0o600


@pytest.mark.skipif(not SWAKS, reason="swaks is not installed")
def test_swaks_plain(mta):
    mta.start()
    out = subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(mta.port),
                          "--from", "s@example.org", "--to", "r@localhost",
                          "--helo", "swaks.example", "--body", "hello from swaks"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<-  250 2.0.0 Ok: queued as" in out.stdout
    (m, content), = mta.queued()
    assert b"hello from swaks" in content


def test_relay_is_refused_from_outside_mynetworks(mta):
    mta.main["mynetworks"] = "10.0.0.0/8"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    assert c.cmd("HELO x").startswith("250")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == \
        "454 4.7.1 <x@elsewhere.example>: Relay access denied"
    assert c.cmd("RCPT TO:<x@localhost>") == "250 2.1.5 Ok"
    c.cmd("QUIT")
    c.close()
    assert "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 454 4.7.1 " \
           "<x@elsewhere.example>: Relay access denied; from=<a@example.org> " \
           "to=<x@elsewhere.example> proto=SMTP helo=<x>" in mta.log()


def test_reject_unauth_destination_and_client_access(mta):
    mta.main.update({"mynetworks": "10.0.0.0/8",
                     "smtpd_relay_restrictions": "reject_unauth_destination",
                     "smtpd_client_restrictions":
                         "check_client_access inline:{127.0.0.2=REJECT}",
                     "smtpd_recipient_restrictions":
                         "check_recipient_access inline:{{blocked@localhost=550 5.1.1 "
                         "No such user here}}"})
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<x@elsewhere.example>") == \
        "554 5.7.1 <x@elsewhere.example>: Relay access denied"
    # as Postfix's check_table_result: "<name>: <class> rejected: text" after the code
    assert c.cmd("RCPT TO:<blocked@localhost>") == \
        "550 5.1.1 <blocked@localhost>: Recipient address rejected: No such user here"
    c.close()
    raw = SmtpClient(mta.port, source="127.0.0.2")
    raw.reply()
    raw.cmd("EHLO x")
    raw.cmd("MAIL FROM:<a@example.org>")
    assert raw.cmd("RCPT TO:<x@localhost>").startswith(
        "554 5.7.1 <") and "Client host rejected: Access denied" in raw.cmd("RCPT TO:<y@localhost>")
    raw.close()


def test_no_open_relay_configuration_is_refused(mta):
    mta.main.update({"smtpd_relay_restrictions": "", "smtpd_recipient_restrictions":
                     "permit_mynetworks"})
    mta.start()
    sock = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
    wait_for(lambda: "specify at least one working instance of: reject_unauth_destination"
             in mta.log(), what="the configuration error")
    sock.close()


def test_message_size_limit_while_streaming(mta):
    mta.main["message_size_limit"] = "20000"
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=30000") == \
        "552 5.3.4 Message size exceeds fixed limit"
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<r@localhost>")
    assert c.cmd("DATA").startswith("354")
    c.send((b"x" * 998 + b"\r\n") * 40 + b".\r\n")
    assert c.reply() == "552 5.3.4 Message size exceeds fixed limit"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"          # the session goes on
    c.close()
    assert mta.queued() == []
    assert os.listdir(mta.queue / "incoming") == []  # nothing half-written stays


def test_recipient_limit_and_pipelining(mta):
    mta.main["smtpd_recipient_limit"] = "2"
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<r1@localhost>\r\nRCPT TO:<r2@localhost>\r\n"
           b"RCPT TO:<r3@localhost>\r\nDATA\r\n")
    assert [c.reply() for _ in range(5)] == [
        "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients",
        "354 End data with <CR><LF>.<CR><LF>"]
    c.send(b"Subject: two\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert c.reply().startswith("250 2.0.0 Ok: queued as ")
    assert c.reply() == "221 2.0.0 Bye"
    c.close()
    (m, _), = mta.queued()
    assert [r.address for r in m.recipients] == ["r1@localhost", "r2@localhost"]
    assert "improper command pipelining" not in mta.log()


SMUGGLE = (b"Subject: first\r\n\r\nfirst body\r\n"
           b"\n.\n"                                    # a bare-LF end of data: smuggling
           b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n"
           b"Subject: smuggled\r\n\r\nsecond\r\n.\r\n")


@pytest.mark.parametrize("mode", ["normalize", "no", "reject"])
def test_smtp_smuggling(mta, mode):
    if mode != "normalize":     # normalize is the default
        mta.main["smtpd_forbid_bare_newline"] = mode
    mta.main["smtpd_forbid_bare_newline_exclusions"] = ""
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<r@localhost>")
    c.cmd("DATA")
    c.send(SMUGGLE + b"QUIT\r\n")
    replies = []
    while True:
        r = c.reply()
        replies.append(r)
        if r.startswith("221") or r == "<EOF>" or r.startswith("550"):
            break
    c.close()
    queued = mta.queued()
    if mode == "normalize":
        (m, content), = queued                     # one message, the dot inside it
        assert b"MAIL FROM:<evil@example.org>" in content and b"second" in content
        assert [r.address for r in m.recipients] == ["r@localhost"]
    elif mode == "no":
        assert len(queued) == 2                    # the old, smugglable behaviour
    else:
        assert replies[0] == "550 5.5.2 Error: bare <LF> received"
        assert queued == []
        assert "bare <LF> received" in mta.log()


def test_starttls_not_offered_without_tls(mta):
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    assert "STARTTLS" not in c.cmd("EHLO x")
    assert c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
    c.close()


def test_bad_input_gets_clear_replies(mta):
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    assert c.cmd("X" * 3000) == "500 5.5.2 Error: command not recognized"
    c.send(b"Y" * (1 << 20) + b"\r\n")           # a 1 MB command line
    assert c.reply() == "500 5.5.2 Error: command not recognized"
    assert c.cmd("NOOP\x00junk") == "250 2.0.0 Ok"
    c.send(bytes(range(128, 256)) + b"\r\n")      # 8-bit garbage: not UTF-8, as Postfix
    assert c.reply() == "500 5.5.2 Error: bad UTF-8 syntax"
    assert c.cmd("HELO ok") == "250 mail.test.example"
    assert c.cmd("MAIL FROM:<a\x01b@example.org>") == "501 5.1.7 Bad sender address syntax"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    assert "request longer than 2048" in mta.log()
    assert "Traceback" not in mta.log() and "uncaught exception" not in mta.log()


def test_too_many_errors(mta):
    mta.main["smtpd_hard_error_limit"] = "5"
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    replies = [c.cmd("BOGUS") for _ in range(5)]
    assert replies == ["500 5.5.2 Error: command not recognized"] * 5
    assert c.reply() == "421 4.7.0 mail.test.example Error: too many errors"
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: "too many errors after UNKNOWN from localhost[127.0.0.1]" in mta.log(),
             what="the log line")


def test_idle_client_times_out(mta):
    mta.main["smtpd_timeout"] = "1s"
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    time.sleep(1.5)
    assert c.reply() == "421 4.4.2 mail.test.example Error: timeout exceeded"
    c.close()
    wait_for(lambda: "timeout after EHLO from localhost[127.0.0.1]" in mta.log(),
             what="the timeout line")
    c = SmtpClient(mta.port)                          # the next client is served
    assert c.reply().startswith("220 ")
    c.close()


def test_lost_connection_mid_data_leaves_nothing(mta):
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("EHLO x")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<r@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: cut\r\n\r\npartial")
    c.close()
    wait_for(lambda: "lost connection after DATA (" in mta.log(), what="the lost line")
    assert os.listdir(mta.queue / "incoming") == []


def test_too_many_hops(mta):
    mta.start()
    c = SmtpClient(mta.port)
    c.reply()
    c.cmd("HELO x")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<r@localhost>")
    c.cmd("DATA")
    c.send(b"Received: from a by b\r\n" * 51 + b"\r\nloop\r\n.\r\n")
    assert c.reply() == "554 5.4.0 Error: too many hops"
    c.close()
    assert mta.queued() == []


def test_many_connections_at_once(mta):
    mta.start()
    socks = []
    try:
        for _ in range(500):
            socks.append(socket.create_connection(("127.0.0.1", mta.port), timeout=60))
        done = []

        def finish(chunk):
            for s in chunk:
                f = s.makefile("rb")
                if f.readline().startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    if f.readline().startswith(b"221"):
                        done.append(1)
                f.close()
        threads = [threading.Thread(target=finish, args=(socks[i::10],)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(done) == 500
    finally:
        for s in socks:
            s.close()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.close()
