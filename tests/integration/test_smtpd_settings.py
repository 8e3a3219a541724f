"""smtpd settings that are enforced or refused out loud (issue 13), through a real instance.

The TLS security level is computed once: verify, secure and fingerprint act as encrypt
with Postfix's warning, and an unknown level stops start, check and reload. Every
restriction list runs at its own stage, as Postfix's smtpd_check.c: the client, HELO and
sender lists at connect, HELO and MAIL with smtpd_delay_reject = no; the DATA and
end-of-data lists at DATA and after the final dot, with nothing queued on a reject.
Recipients past smtpd_recipient_limit get 452 without ending the session.
"""

import os
import signal
import smtplib
import ssl

import pytest
import trustme

from pfxinst import SmtpClient, wait_for


@pytest.fixture
def mta(instance):
    """An instance with one smtpd service; .port and .queued()."""
    return instance.add_smtpd()


@pytest.fixture
def server_pem(tmp_path):
    path = tmp_path / "server.pem"
    trustme.CA().issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem \
        .write_to_path(str(path))
    os.chmod(tmp_path, 0o755)
    return str(path)


def client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def send_message(c: SmtpClient, rcpts=("b@localhost",), body="Subject: t\r\n\r\nhi\r\n"):
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>") == "250 2.1.5 Ok"


# --- the TLS security level -----------------------------------------------------------------
def test_verify_level_is_encrypt_and_refuses_plaintext_mail(mta, server_pem):
    mta.main.update({"smtpd_tls_security_level": "verify", "smtpd_tls_cert_file": server_pem})
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    assert "STARTTLS" in c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org>") == "530 5.7.0 Must issue a STARTTLS command first"
    assert c.cmd("RCPT TO:<b@localhost>") == "530 5.7.0 Must issue a STARTTLS command first"
    c.starttls(client_ctx())
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    c.cmd("QUIT")
    c.close()
    assert mta.queued() == []
    assert 'smtpd_tls_security_level: unsupported TLS level "verify", using "encrypt"' \
        in mta.log()


def test_unknown_level_stops_start_check_and_reload(mta):
    bad = ('invalid smtpd_tls_security_level parameter value: "sometimes" '
           '(one of: none, may, encrypt, verify, secure, fingerprint)')
    mta.main["smtpd_tls_security_level"] = "sometimes"
    mta.write()
    for verb in ("check", "start"):
        out = mta.cmd(verb)
        assert out.returncode != 0, (verb, out)
        assert bad in out.stderr, (verb, out.stderr)
    assert mta.master_pid() is None
    # in master.cf too (-o), named with its service
    mta.main["smtpd_tls_security_level"] = "may"
    mta.master_lines = [f"127.0.0.1:{mta.port} inet n - y - - smtpd "
                        f"-o smtpd_tls_security_level=Sometimes"]
    mta.write()
    out = mta.cmd("check")
    assert out.returncode != 0 and "smtpd_tls_security_level" in out.stderr, out
    # reload: the running configuration stays, and the log says why
    mta.master_lines = [f"127.0.0.1:{mta.port} inet n - y - - smtpd"]
    mta.main["smtpd_banner"] = "$myhostname ESMTP first"
    mta.start()
    master = mta.master_pid()
    mta.main["smtpd_tls_security_level"] = "sometimes"
    mta.main["smtpd_banner"] = "$myhostname ESMTP second"
    mta.write()
    out = mta.cmd("reload")
    assert out.returncode != 0 and "smtpd_tls_security_level" in out.stderr, out
    os.kill(master, signal.SIGHUP)          # a bare SIGHUP, as an init system sends
    wait_for(lambda: "keeping the running configuration" in mta.log(), what="the warning")
    assert "smtpd_tls_security_level" in mta.log()
    c = SmtpClient(mta.port)
    assert c.reply() == "220 mail.test.example ESMTP first"
    c.close()
    assert mta.master_pid() == master


# --- restriction lists at their stages ------------------------------------------------------
def test_client_reject_at_connect_without_delay_reject(mta):
    mta.main.update({"smtpd_delay_reject": "no", "smtpd_client_restrictions": "reject"})
    mta.start()
    c = SmtpClient(mta.port)
    denied = "554 5.7.1 <localhost[127.0.0.1]>: Client host rejected: Access denied"
    assert c.reply() == denied
    refused = "503 5.7.0 Error: access denied for localhost[127.0.0.1]"
    assert c.cmd("EHLO client.example") == refused
    assert c.cmd("MAIL FROM:<a@example.org>") == refused
    assert c.cmd("NONSENSE") == refused
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    assert mta.queued() == []
    wait_for(lambda: "disconnect from" in mta.log(), what="the disconnect")
    assert f"NOQUEUE: reject: CONNECT from localhost[127.0.0.1]: {denied}; proto=SMTP" \
        in mta.log()


def test_client_list_waits_for_rcpt_with_delay_reject(mta):
    mta.main.update({"smtpd_client_restrictions": "reject"})
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b@localhost>") == \
        "554 5.7.1 <localhost[127.0.0.1]>: Client host rejected: Access denied"
    c.close()


def test_helo_and_sender_lists_at_their_commands(mta):
    mta.main.update({
        "smtpd_delay_reject": "no",
        "smtpd_helo_restrictions": "check_helo_access inline:{bad.example=REJECT}",
        "smtpd_sender_restrictions": "check_sender_access inline:{spam.example=REJECT}"})
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    assert c.cmd("EHLO bad.example") == \
        "554 5.7.1 <bad.example>: Helo command rejected: Access denied"
    assert c.cmd("EHLO good.example").startswith("250-")
    assert c.cmd("MAIL FROM:<x@spam.example>") == \
        "554 5.7.1 <x@spam.example>: Sender address rejected: Access denied"
    assert c.cmd("RCPT TO:<b@localhost>") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("MAIL FROM:<x@example.org>") == "250 2.1.0 Ok"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: "disconnect from" in mta.log(), what="the disconnect")
    log = mta.log()
    assert ("NOQUEUE: reject: EHLO from localhost[127.0.0.1]: 554 5.7.1 <bad.example>: "
            "Helo command rejected: Access denied; proto=SMTP helo=<bad.example>") in log
    assert ("NOQUEUE: reject: MAIL from localhost[127.0.0.1]: 554 5.7.1 <x@spam.example>: "
            "Sender address rejected: Access denied; from=<x@spam.example> proto=ESMTP "
            "helo=<good.example>") in log


def test_data_restrictions_reject_before_354(mta):
    mta.main["smtpd_data_restrictions"] = "reject"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    send_message(c)
    assert c.cmd("DATA") == "554 5.7.1 <DATA>: Data command rejected: Access denied"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: "disconnect from" in mta.log(), what="the disconnect")
    assert mta.queued() == []
    # The queue file was open since the first RCPT: Postfix logs its id, not NOQUEUE.
    assert (": reject: DATA from localhost[127.0.0.1]: 554 5.7.1 <DATA>: Data command "
            "rejected: Access denied; from=<a@example.org> to=<b@localhost> proto=ESMTP "
            "helo=<client.example>") in mta.log()


def test_end_of_data_restrictions_reject_and_discard(mta):
    mta.main["smtpd_end_of_data_restrictions"] = "check_client_access inline:{ {127.0.0.1=REJECT no thanks} }"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    send_message(c, rcpts=("b@localhost", "c@localhost"))
    assert c.cmd("DATA").startswith("354 ")
    assert c.cmd("Subject: t\r\n\r\nhello\r\n.") == \
        "554 5.7.1 <localhost[127.0.0.1]>: Client host rejected: no thanks"
    # the transaction is over: a new one starts cleanly
    assert c.cmd("RCPT TO:<b@localhost>") == "503 5.5.1 Error: need MAIL command"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: "disconnect from" in mta.log(), what="the disconnect")
    assert mta.queued() == []
    line, = [l for l in mta.log().splitlines() if ": reject: END-OF-MESSAGE from " in l]
    qid = line.split(": reject:")[0].rsplit(" ", 1)[1]
    assert qid != "NOQUEUE" and qid.isalnum()
    assert line.endswith(": reject: END-OF-MESSAGE from localhost[127.0.0.1]: 554 5.7.1 "
                         "<localhost[127.0.0.1]>: Client host rejected: no thanks; "
                         "from=<a@example.org> proto=ESMTP helo=<client.example>")


# --- recipients past smtpd_recipient_limit -------------------------------------------------
def test_recipient_overshoot_keeps_the_first_thousand(mta):
    mta.start()
    c = SmtpClient(mta.port, timeout=60)
    assert c.reply().startswith("220 ")
    assert "PIPELINING" in c.cmd("EHLO client.example")
    rcpts = [f"r{i}@localhost" for i in range(1100)]
    c.sock.sendall(b"MAIL FROM:<a@example.org>\r\n" +
                   b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
    assert c.reply() == "250 2.1.0 Ok"
    replies = [c.reply() for _ in rcpts]
    assert replies[:1000] == ["250 2.1.5 Ok"] * 1000
    assert replies[1000:] == ["452 4.5.3 Error: too many recipients"] * 100
    assert c.reply().startswith("354 ")
    assert c.cmd("Subject: many\r\n\r\nhello\r\n.").startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    c.close()
    (m, _), = mta.queued()
    assert [r.address for r in m.recipients] == rcpts[:1000]
    assert "too many errors" not in mta.log()


def test_recipient_overshoot_past_its_limit_counts_as_errors(mta):
    mta.main.update({"smtpd_recipient_limit": "2", "smtpd_recipient_overshoot_limit": "3",
                     "smtpd_hard_error_limit": "3"})
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    send_message(c, rcpts=("a1@localhost", "a2@localhost"))
    for _ in range(3):         # within the overshoot limit: not errors
        assert c.cmd("RCPT TO:<a3@localhost>") == "452 4.5.3 Error: too many recipients"
    for _ in range(3):         # past it: errors, up to the hard limit
        assert c.cmd("RCPT TO:<a3@localhost>") == "452 4.5.3 Error: too many recipients"
    assert c.reply() == "421 4.7.0 mail.test.example Error: too many errors"
    c.close()


# --- parameters that were declared and not read --------------------------------------------
def test_smtpd_noop_commands(mta):
    mta.main["smtpd_noop_commands"] = "xyzzy, HELP"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    assert c.cmd("XYZZY anything at all") == "250 2.0.0 Ok"
    assert c.cmd("help") == "250 2.0.0 Ok"
    assert c.cmd("PLUGH") == "500 5.5.2 Error: command not recognized"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    # answered, not counted, as Postfix
    wait_for(lambda: "disconnect from localhost[127.0.0.1] quit=1 unknown=0/1 commands=1/2"
             in mta.log(), what="the disconnect line")


def test_reject_unknown_client_hostnames(mta):
    mta.main.update({"smtpd_peername_lookup": "no", "unknown_client_reject_code": "550",
                     "smtpd_client_restrictions": "reject_unknown_client_hostname",
                     "smtpd_helo_restrictions": "reject_unknown_reverse_client_hostname"})
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b@localhost>") == \
        "550 5.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"
    c.close()
    mta.main["smtpd_client_restrictions"] = ""
    mta.reload()
    wait_for(lambda: "reload -- version" in mta.log(), what="the reload")
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b@localhost>") == \
        "550 5.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.1]"
    c.close()


def test_known_client_hostname_passes(mta):
    # 127.0.0.1 is localhost in the jail's etc/hosts, both ways
    mta.main["smtpd_client_restrictions"] = \
        "reject_unknown_client_hostname, reject_unknown_reverse_client_hostname"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    send_message(c)
    c.close()


def test_reject_unknown_sender_domain_in_the_jail(mta):
    # .invalid never exists (RFC 6761): NXDOMAIN from a resolver, or no answer at all
    # where none can be reached; both are 450 4.1.8 with the default reject code.
    mta.main["smtpd_sender_restrictions"] = "reject_unknown_sender_domain"
    mta.start()
    c = SmtpClient(mta.port, timeout=60)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@nowhere.invalid>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b@localhost>") == \
        "450 4.1.8 <a@nowhere.invalid>: Sender address rejected: Domain not found"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@localhost>") == "250 2.1.0 Ok"    # mydestination: no lookup
    assert c.cmd("RCPT TO:<b@localhost>") == "250 2.1.5 Ok"
    c.close()
    assert "Traceback" not in mta.log() and "fatal" not in mta.log()


# --- address and header hygiene ------------------------------------------------------------
def test_control_characters_in_addresses(mta):
    mta.main["strict_rfc821_envelopes"] = "no"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    for ctl in ("\x01", "\x7f", "\t", "\x1b"):
        assert c.cmd(f'MAIL FROM:<"a{ctl}b"@example.org>') == \
            "501 5.1.7 Bad sender address syntax"
    # a NUL ends the command line, as in Postfix's C strings: what is left is bad
    assert c.cmd('MAIL FROM:<"\x00"@example.org>') == "501 5.1.7 Bad sender address syntax"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd('RCPT TO:<"b\x01"@localhost>') == "501 5.1.3 Bad recipient address syntax"
    assert c.cmd('RCPT TO:<"b\x00"@localhost>') == "501 5.1.3 Bad recipient address syntax"
    c.close()
    assert mta.queued() == []


def test_header_size_limit_truncates_a_header(mta):
    mta.main["header_size_limit"] = "100"
    mta.start()
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    send_message(c)
    assert c.cmd("DATA").startswith("354 ")
    folded = "X-Folded: start" + "".join(f"\r\n word{i:02d}-{'x' * 20}" for i in range(10))
    long_line = "X-Long: " + "y" * 300          # one line: kept whole, as Postfix
    reply = c.cmd(f"Subject: t\r\n{folded}\r\n{long_line}\r\nTo: b@localhost\r\n\r\n"
                  f" body line that starts with a space\r\nbody\r\n.")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    c.close()
    (m, _), = mta.queued()
    text = b"".join(m.content(str(mta.queue / "incoming" / m.queue_id))).decode()
    header, body = text.split("\n\n", 1)
    # 15 bytes, then 29 a continuation line: after three the header is 102 bytes long,
    # past the limit, and the other seven are dropped
    assert "X-Folded: start\n word00-" + "x" * 20 + "\n word01-" + "x" * 20 + \
        "\n word02-" + "x" * 20 + "\nX-Long: " in header
    assert "word03" not in text and "word09" not in text
    assert "X-Long: " + "y" * 300 + "\nTo: b@localhost" in header
    assert body == " body line that starts with a space\nbody\n"


def test_reject_unauth_pipelining_in_data_restrictions(mta):
    # the most common smtpd_data_restrictions: once unread, now run (and not "unknown")
    mta.main["smtpd_data_restrictions"] = "reject_unauth_pipelining"
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:      # waits for 354
        assert s.sendmail("a@example.org", ["b@localhost"], b"Subject: t\r\n\r\nhi\r\n") == {}
    assert len(mta.queued()) == 1
    c = SmtpClient(mta.port)
    assert c.reply().startswith("220 ")
    c.cmd("EHLO client.example")
    c.sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
                   b"Subject: ahead\r\n\r\nsent before 354\r\n.\r\nQUIT\r\n")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.reply() == "250 2.1.5 Ok"
    assert c.reply() == ("503 5.5.0 <DATA>: Data command rejected: Improper use of SMTP "
                         "command pipelining")
    while not (line := c.reply()).startswith("221"):    # the content, read as commands
        assert line[:1] in ("5",), line
    c.close()
    assert len(mta.queued()) == 1
    assert "improper command pipelining after DATA from localhost[127.0.0.1]: Subject: ahead" \
        in mta.log()
