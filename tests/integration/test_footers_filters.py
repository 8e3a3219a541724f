"""Reject footers, the command filter, the expansion filter, per-client EHLO keywords and
forbidden (non-SMTP) commands in smtpd and in postscreen's engine, through the real
master: one instance for the module.

    127.0.0.1:S   inet n - y - - smtpd       smtpd_reject_footer, _maps, command filter,
                                             EHLO keyword maps (main.cf)
    127.0.0.1:N   inet n - y - - smtpd       -o smtpd_expansion_filter=narrow
    127.0.0.1:B   inet n - y - - smtpd       -o soft_bounce=yes, every RCPT refused
    127.0.0.1:F   inet n - y - - smtpd       -o smtpd_forbidden_commands= (empty list)
    127.0.0.1:P   inet n - y - 1 postscreen  its engine at once (pipelining test on, no
                                             cache): every postscreen_* value is smtpd's
                                             by default, and postscreen_command_filter
    smtpd         pass - - y - - smtpd

Clients connect from 127.0.0.1 (in the EHLO map) and 127.0.0.2 (not in it).
The replies and log lines are Postfix's.
"""

import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

from pfxinst import Instance, SmtpClient, free_port, wait_for

FOOTER = r"\c (ref $client_address:$client_port)\nHelp: postmaster@$server_name $localtime"
TIME = r"[A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def inst():
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    i = Instance(root)
    (root / "footers").write_text(
        "/Relay access denied$/ Relay help: http://example.test/relay?$$client_address\n")
    (root / "commands").write_text(
        "/^(RCPT\\s+TO:<[^>]*>)\\s+XYZZY=\\S+$/ $1\n/^EHLO\\s+WRONG$/ EHLO fixed.example\n")
    (root / "ehlo").write_text("127.0.0.1 dsn, chunking\n")
    i.port, i.narrow_port, i.ps_port = free_port(), free_port(), free_port()
    i.soft_port, i.open_port = free_port(), free_port()
    i.main.update({
        "mydestination": "$myhostname, localhost",
        "mynetworks": "10.0.0.0/8",
        "smtpd_peername_lookup": "no",
        "smtpd_error_sleep_time": "0s",
        "smtpd_reject_footer": FOOTER,
        "smtpd_reject_footer_maps": f"regexp:{root}/footers",
        "smtpd_command_filter": f"regexp:{root}/commands",
        "smtpd_discard_ehlo_keywords": "etrn",
        "smtpd_discard_ehlo_keyword_address_maps": f"texthash:{root}/ehlo",
        "postscreen_command_filter": f"regexp:{root}/commands",
    })
    i.master_lines = [
        f"127.0.0.1:{i.port} inet n - y - - smtpd",
        f"127.0.0.1:{i.narrow_port} inet n - y - - smtpd"
        " -o smtpd_expansion_filter=0123456789",
        f"127.0.0.1:{i.soft_port} inet n - y - - smtpd -o soft_bounce=yes"
        " -o smtpd_recipient_restrictions=reject",
        f"127.0.0.1:{i.open_port} inet n - y - - smtpd -o smtpd_forbidden_commands=",
        f"127.0.0.1:{i.ps_port} inet n - y - 1 postscreen -o postscreen_cache_map="
        " -o postscreen_greet_banner= -o postscreen_dnsbl_sites="
        " -o postscreen_pipelining_enable=yes",
        "smtpd pass - - y - - smtpd",
    ]
    with i.running():
        yield i


def connect(port: int, source: str = "127.0.0.1") -> tuple[SmtpClient, int]:
    c = SmtpClient(port, source=source)
    assert c.reply() == "220 mail.test.example ESMTP postfix-py"
    return c, c.sock.getsockname()[1]


def lines(reply: str) -> list[str]:
    return reply.split("\n")


# --- smtpd ----------------------------------------------------------------------------------
GOODBYE = "221 2.7.0 Error: I can break rules, too. Goodbye."


@pytest.mark.parametrize("source, line, logged", [
    ("127.0.0.31", b"GET / HTTP/1.0", "GET / HTTP/1.0"),    # a web browser
    ("127.0.0.32", b"connect mail.example:25 HTTP/1.1",
     "connect mail.example:25 HTTP/1.1"),                   # in any case
    ("127.0.0.33", b"Subject: hello\tthere", "Subject: hello\\tthere"),  # escape()d
    ("127.0.0.34", b"1bogus", "1bogus"),    # regexp:{{/^[^A-Z]/ Bogus}}: no letter first
])
def test_smtpd_forbidden_command_ends_the_session(inst, source, line, logged):
    """smtpd_forbidden_commands (Postfix's default) and is_header(): a warning, 221 and
    the end of the session, with the command counted as unknown."""
    c, _ = connect(inst.port, source)
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd(line) == GOODBYE
    assert c.reply() == "<EOF>"
    c.close()
    done = f"disconnect from unknown[{source}] ehlo=1 unknown=0/1 commands=1/2"
    wait_for(lambda: done in inst.log(), what="disconnect")
    assert f"warning: non-SMTP command from unknown[{source}]: {logged}\n" in inst.log()


def test_smtpd_unknown_lowercase_command_is_only_refused(inst):
    """A command that starts with a letter, in any case, is not `Bogus`: 500, and the
    session goes on (Postfix's regexp tables ignore case)."""
    c, _ = connect(inst.port)
    assert lines(c.cmd("bogus"))[0].startswith("500-5.5.2 Error: command not recognized ")
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()


def test_smtpd_empty_forbidden_commands_keeps_only_headers(inst):
    """smtpd_forbidden_commands = (empty): GET is an unknown command; a header line
    still ends the session."""
    c, _ = connect(inst.open_port, "127.0.0.35")
    for line in ("GET / HTTP/1.0", "1bogus"):        # (each with this instance's footer)
        assert lines(c.cmd(line))[0].startswith("500-5.5.2 Error: command not recognized ")
    assert c.cmd("From: <a@example.com>") == GOODBYE
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: "non-SMTP command from unknown[127.0.0.35]: From: <a@example.com>"
             in inst.log(), what="warning")


def test_smtpd_footer_on_every_reject(inst):
    c, port = connect(inst.port)
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    reply = lines(c.cmd("MAIL FROM:<a@client.example> NOSUCH=1"))
    assert reply[0] == f"555-5.5.4 Unsupported option: NOSUCH=1 (ref 127.0.0.1:{port})"
    assert re.fullmatch(rf"555 5\.5\.4 Help: postmaster@mail\.test\.example {TIME}",
                        reply[1]), reply
    assert len(reply) == 2
    # 2XX replies have none
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    # smtpd_reject_footer_maps: the reply's text is the key; the map's template wins
    assert lines(c.cmd("RCPT TO:<x@elsewhere.example>")) == [
        "454-4.7.1 <x@elsewhere.example>: Relay access denied",
        "454 4.7.1 Relay help: http://example.test/relay?127.0.0.1"]
    # a reply without enhanced status code: none in the footer either
    reply = lines(c.cmd("HELO"))
    assert reply[0] == f"501-Syntax: HELO hostname (ref 127.0.0.1:{port})"
    assert reply[1].startswith("501 Help: postmaster@mail.test.example ")
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()


def test_smtpd_soft_bounce_turns_every_5xx_line_into_4xx(inst):
    """smtpd_chat.c's safety net: each line of a 5XX reply, its footer's too, goes out
    as 4XX with a 4.X.X status; the reject log line shows the reply that was sent."""
    c, port = connect(inst.soft_port)
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    reply = lines(c.cmd("MAIL FROM:<a@client.example> NOSUCH=1"))
    assert reply[0] == f"455-4.5.4 Unsupported option: NOSUCH=1 (ref 127.0.0.1:{port})"
    assert re.fullmatch(rf"455 4\.5\.4 Help: postmaster@mail\.test\.example {TIME}",
                        reply[1]), reply
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    reply = lines(c.cmd("RCPT TO:<u@localhost>"))
    assert reply[0] == "454-4.7.1 <u@localhost>: Recipient address rejected: Access " \
        f"denied (ref 127.0.0.1:{port})", reply
    assert reply[1].startswith("454 4.7.1 Help: postmaster@mail.test.example ")
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: "Recipient address rejected: Access denied;" in inst.log(),
             what="the reject log line")
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 454 4.7.1 <u@localhost>: " \
        "Recipient address rejected: Access denied; from=<a@client.example> " \
        "to=<u@localhost> proto=ESMTP helo=<client.example>" in inst.log()


def test_smtpd_expansion_filter(inst):
    c, port = connect(inst.narrow_port)
    reply = lines(c.cmd("NOSUCH"))
    # only digits: in the values, dots, letters, spaces and colons become _ (the
    # template's own text stays)
    assert reply[0] == f"500-5.5.2 Error: command not recognized (ref 127_0_0_1:{port})"
    assert re.fullmatch(r"500 5\.5\.2 Help: postmaster@_{17} ____\d\d_\d\d_\d\d_\d\d",
                        reply[1]), reply
    c.cmd("QUIT")
    c.close()


def test_smtpd_command_filter_replaces_a_line_and_logs_it(inst):
    c, port = connect(inst.port)
    ehlo = c.cmd("EHLO WRONG")
    assert ehlo.startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost> XYZZY=1") == "250 2.1.5 Ok"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: "replacing command \"RCPT" in inst.log(), what="replacement log")
    log = inst.log()
    assert 'unknown[127.0.0.1]: replacing command "EHLO WRONG" with ' \
        '"EHLO fixed.example"' in log
    assert 'unknown[127.0.0.1]: replacing command "RCPT TO:<u@localhost> XYZZY=1" with ' \
        '"RCPT TO:<u@localhost>"' in log


def test_smtpd_ehlo_keywords_per_client_address(inst):
    c, _ = connect(inst.port)                       # in the map: its keywords
    ehlo = lines(c.cmd("EHLO client.example"))
    assert "250-DSN" not in ehlo and "250 CHUNKING" not in ehlo and "250-ETRN" in ehlo
    assert ehlo[-1] == "250 SMTPUTF8"
    # DSN is refused as Postfix does when the keyword is hidden
    assert lines(c.cmd("MAIL FROM:<a@client.example> RET=FULL"))[0].startswith(
        "501-5.7.1 DSN support is disabled")
    c.cmd("QUIT")
    c.close()
    c, _ = connect(inst.port, "127.0.0.2")          # not in it: smtpd_discard_ehlo_keywords
    ehlo = lines(c.cmd("EHLO client.example"))
    assert "250-DSN" in ehlo and "250 CHUNKING" in ehlo and "250-ETRN" not in ehlo
    c.cmd("QUIT")
    c.close()
    log = inst.log()
    assert "smtpd[" in log and ": discarding EHLO keywords: DSN CHUNKING" in log
    assert ": discarding EHLO keywords: ETRN" in log


# --- postscreen -------------------------------------------------------------------------------
def test_postscreen_footer_is_smtpds_by_default(inst):
    c, port = connect(inst.ps_port)
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    reply = lines(c.cmd("RCPT TO:<u@localhost>"))
    assert reply[0] == f"450-4.3.2 Service currently unavailable (ref 127.0.0.1:{port})"
    assert re.fullmatch(rf"450 4\.3\.2 Help: postmaster@mail\.test\.example {TIME}",
                        reply[1]), reply
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()


def test_postscreen_command_filter_and_ehlo_keywords(inst):
    c, port = connect(inst.ps_port)
    ehlo = lines(c.cmd("EHLO WRONG"))
    assert ehlo[0] == "250-mail.test.example"
    assert "250-DSN" not in ehlo and "250 CHUNKING" not in ehlo and "250-ETRN" in ehlo
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    # the filtered line is what the engine sees: no "Unsupported option", 450 for a pass
    assert lines(c.cmd("RCPT TO:<u@localhost> XYZZY=1"))[0].startswith("450-4.3.2 ")
    c.cmd("QUIT")
    c.close()
    c, port2 = connect(inst.ps_port, "127.0.0.2")
    ehlo = lines(c.cmd("EHLO client.example"))
    assert "250-DSN" in ehlo and "250-ETRN" not in ehlo
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.2]:{port2}" in inst.log(), what="DISCONNECT")
    log = inst.log()
    assert f'[127.0.0.1]:{port}: replacing command "EHLO WRONG" with ' \
        '"EHLO fixed.example"' in log
    assert f'[127.0.0.1]:{port}: replacing command "RCPT TO:<u@localhost> XYZZY=1" with ' \
        '"RCPT TO:<u@localhost>"' in log
    # sic: Postfix's log line has no colon between the address and the port
    assert f"[127.0.0.1]{port}: discarding EHLO keywords: DSN CHUNKING" in log
    assert f"[127.0.0.2]{port2}: discarding" not in log


# --- postscreen_watchdog_timeout --------------------------------------------------------------
def test_postscreen_stuck_on_a_store_is_ended_by_its_watchdog_and_restarted(instance):
    """A memcache: cache whose server takes the connection and never answers (timeout 30s
    in its configuration) holds postscreen's event loop in one lookup: the watchdog ends
    the process as Postfix's does, the master logs its exit and starts a new one."""
    store = socket.socket()
    store.bind(("127.0.0.1", 0))
    store.listen(8)                  # the kernel completes connections; nobody answers
    (instance.dir / "mc.cf").write_text(
        f"memcache = inet:127.0.0.1:{store.getsockname()[1]}\ntimeout = 30\nmax_try = 1\n")
    port = free_port()
    instance.main.update({"mynetworks": "10.0.0.0/8",
                          "postscreen_cache_map": f"memcache:{instance.dir}/mc.cf",
                          "postscreen_watchdog_timeout": "10s",
                          "postscreen_greet_wait": "1s"})
    instance.master_lines = [f"127.0.0.1:{port} inet n - y - 1 postscreen",
                             "smtpd pass - - y - - smtpd"]
    instance.start()
    try:
        started = time.monotonic()
        c = SmtpClient(port, timeout=30)
        assert c.reply() == "<EOF>"              # the process ended with the client
        c.close()
        assert 5 <= time.monotonic() - started < 15
        log = instance.log()
        pid = re.search(r"postscreen\[(\d+)\]: fatal: watchdog timeout", log)
        assert pid, log
        wait_for(lambda: f"process postfix-py/postscreen pid {pid.group(1)} exit status 1"
                 in instance.log(), what="the master's log line")
    finally:
        store.close()                # down now: refused at once, every lookup a miss
    c = SmtpClient(port, timeout=30)        # the teaser, then the banner after the wait
    assert c.reply() == "220-mail.test.example ESMTP postfix-py\n" \
        "220 mail.test.example ESMTP postfix-py"
    c.cmd("QUIT")
    c.close()
    log = instance.log()
    new = re.findall(r"postscreen\[(\d+)\]: CONNECT from", log)
    assert len(set(new)) == 2 and new[-1] != pid.group(1)
    assert "bad command startup" not in log      # it had served: no throttling
