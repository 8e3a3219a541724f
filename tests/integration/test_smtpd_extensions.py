"""smtpd's SMTP extensions of today through the real master, as Postfix 3.7: SMTPUTF8
(RFC 6531), CHUNKING/BDAT (RFC 3030), ETRN and DSN parameters (RFC 3461), with swaks
and raw clients."""

import shutil
import socket
import threading
import subprocess

import pytest

from pfxinst import SmtpClient, free_port, wait_for

SWAKS = shutil.which("swaks")
UTF8_SENDER = "j\u00f6rg@b\u00fccher.example"


@pytest.fixture
def mta(instance):
    """An instance with one smtpd service; .port and .queued()."""
    return instance.add_smtpd()


def connect(port: int) -> SmtpClient:
    """A raw client (tests/smtpclient.py) past smtpd's greeting."""
    c = SmtpClient(port, timeout=20)
    assert c.reply().startswith("220 ")
    return c


def message(subject="x"):
    return f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode()


# --- SMTPUTF8 ---------------------------------------------------------------------------

@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_ehlo_shows_the_extensions(mta):
    mta.start()
    out = subprocess.run([SWAKS, "--server", f"127.0.0.1:{mta.port}", "--quit-after", "EHLO",
                          "--ehlo", "client.example"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    ehlo = [line[4:] for line in out.stdout.splitlines() if line.startswith("<-  250")]
    assert ehlo[-4:] == ["250-8BITMIME", "250-DSN", "250-SMTPUTF8", "250 CHUNKING"], \
        out.stdout
    assert "250-ETRN" in ehlo


def test_smtputf8_addresses_are_taken_and_recorded(mta):
    mta.start()
    c = connect(mta.port)
    assert "SMTPUTF8" in c.cmd("EHLO client.example")
    # Without the parameter: a UTF-8 domain is refused, an 8-bit local part is not.
    assert c.cmd(f"MAIL FROM:<{UTF8_SENDER}>") == "501 5.1.7 Bad sender address syntax"
    assert c.cmd("MAIL FROM:<j\u00f6rg@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@b\u00fccher.example>") == "501 5.1.3 Bad recipient address syntax"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    # With it, UTF-8 everywhere, and the queue file remembers the request.
    assert c.cmd(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b\u00f6b@mail.test.example>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(message("gr\u00fc\u00dfe")[:-2]).startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    c.close()
    (m, content), = mta.queued()
    assert m.sender == UTF8_SENDER
    assert [r.address for r in m.recipients] == ["b\u00f6b@mail.test.example"]
    assert m.attrs["smtputf8"] == "1"
    assert "\nSubject: gr\u00fc\u00dfe\n".encode() in content
    # the local rewrite context (127.0.0.1): cleanup adds the From: it lacked, in UTF-8
    assert f"\nFrom: {UTF8_SENDER}\n\nbody\n".encode() in content


def test_malformed_utf8_is_refused(mta):
    mta.main["strict_smtputf8"] = "yes"
    mta.start()
    c = connect(mta.port)
    # an overlong "/" in the EHLO name, a lone continuation byte in an address
    assert c.cmd(b"EHLO client\xc0\xafexample") == "500 5.5.2 Error: bad UTF-8 syntax"
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd(b"MAIL FROM:<a\x80b@example.org>") == "500 5.5.2 Error: bad UTF-8 syntax"
    # strict_smtputf8: non-ASCII needs the parameter
    assert c.cmd("MAIL FROM:<j\u00f6rg@example.org>") == \
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b\u00f6b@mail.test.example>") == \
        "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: "disconnect from" in mta.log(), what="disconnect")
    assert "unknown=0/2" in mta.log()


def test_smtputf8_disabled(mta):
    mta.main["smtputf8_enable"] = "no"
    mta.start()
    c = connect(mta.port)
    assert "SMTPUTF8" not in c.cmd("EHLO client.example")
    # the address comes first, as in Postfix: a UTF-8 domain is a syntax error
    assert c.cmd(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8") == "501 5.1.7 Bad sender address syntax"
    assert c.cmd("MAIL FROM:<a@example.org> SMTPUTF8") == \
        "555 5.5.4 Unsupported option: SMTPUTF8"
    # Postfix < 3.0 behaviour: 8-bit local parts pass as they are, byte for byte
    assert c.cmd(b"MAIL FROM:<a\xe9b@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(message()[:-2]).startswith("250 2.0.0 Ok: queued as ")
    c.close()
    (m, _), = mta.queued()
    assert m.sender.encode("utf-8", "surrogateescape") == b"a\xe9b@example.org"
    assert "smtputf8" not in m.attrs


# --- CHUNKING / BDAT ----------------------------------------------------------------------

def bdat(c, chunk: bytes, last=False) -> str:
    c.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
    return c.reply()


def test_bdat_transfers_a_large_message_intact(mta):
    mta.main["message_size_limit"] = str(20 << 20)
    mta.start()
    lines = [f"line {i} " + "x" * (i % 90) for i in range(190000)]
    lines[5000] = ".a leading dot stays"          # no dot-unstuffing in BDAT
    lines[6000] = "."
    # a complete header: cleanup adds no From: or Date: after it
    body = ("Subject: big\r\nMessage-ID: <big@example.org>\r\nFrom: a@example.org\r\n"
            "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
            + "\r\n".join(lines) + "\r\n").encode()
    assert len(body) > 10 << 20
    c = connect(mta.port)
    assert "250 CHUNKING" in c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
    # chunks that split a CRLF and a header line
    cuts = [0, 20, 4 << 20, (4 << 20) + 1, 9 << 20, len(body)]
    for a, b in zip(cuts, cuts[1:-1]):
        assert bdat(c, body[a:b]) == f"250 2.0.0 Ok: {b - a} bytes"
    final = bdat(c, body[cuts[-2]:], last=True)
    assert final.startswith("250 2.0.0 Ok: queued as ")
    c.cmd("QUIT")
    c.close()
    (m, content), = mta.queued()
    head, _, rest = content.partition(b"\n")
    assert head.startswith(b"Received: from client.example (localhost [127.0.0.1])")
    assert content.endswith(body.replace(b"\r\n", b"\n"))
    assert content.count(b"\n.a leading dot stays\n") == 1
    qid = final.rsplit(" ", 1)[1]
    wait_for(lambda: f"{qid}: message-id=<big@example.org>" in mta.log(), what="message-id")


def test_bdat_errors_as_postfix(mta):
    mta.main["message_size_limit"] = "1000"
    mta.start()
    c = connect(mta.port)
    c.cmd("EHLO client.example")
    # no transaction: the chunk is read and dropped, and so are the chunks that follow
    assert bdat(c, b"junk\r\n") == "503 5.5.1 Error: need RCPT command"
    assert bdat(c, b"more junk\r\n") == "551 5.0.0 Discarded 11 bytes after earlier error"
    assert c.cmd("MAIL FROM:<a@example.org>") == "503 5.5.1 Error: MAIL after BDAT"
    assert bdat(c, b"end\r\n", last=True) == "551 5.0.0 Discarded 5 bytes after earlier error"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
    assert bdat(c, b"Subject: x\r\n\r\n") == "250 2.0.0 Ok: 14 bytes"
    assert c.cmd("DATA") == "503 5.5.1 Error: DATA after BDAT"
    assert c.cmd("RCPT TO:<carol@mail.test.example>") == "503 5.5.1 Error: RCPT after BDAT"
    assert c.cmd("BDAT 0") == "551 5.7.1 Null BDAT request"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    # a chunk past message_size_limit: read, dropped, 552; the session goes on in step
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
    assert bdat(c, b"x" * 2000, last=True) == "552 5.3.4 Chunk exceeds message size limit"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
    assert c.cmd("BDAT 0 LAST").startswith("250 2.0.0 Ok: queued as ")
    # a malformed BDAT: the content would be read as commands, so 521 and hang up
    assert c.cmd("BDAT ten") == "521 5.5.4 Syntax: BDAT count [LAST]"
    assert c.reply() == "<EOF>"
    c.close()
    (m, content), = mta.queued()
    assert content.startswith(b"Received: ")
    log = mta.log()
    assert "exceeds message size limit" in log
    assert "malformed BDAT command syntax from localhost[127.0.0.1]: BDAT ten" in log


# --- ETRN ---------------------------------------------------------------------------------

def test_etrn_sends_deferred_mail_at_once(instance):
    from sink import Sink

    sink_port = free_port()
    instance.add_smtpd(**{
        "mydestination": "localhost",
        "relay_domains": "etrn.example",                  # fast_flush_domains follows it
        "relayhost": f"[127.0.0.1]:{sink_port}",
        "queue_run_delay": "3600s", "minimal_backoff_time": "3600s",
        "maximal_backoff_time": "3600s"})
    instance.master_lines += [
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        "relay unix - - y - - smtp",
    ]
    instance.start()
    c = connect(instance.port)
    c.cmd("EHLO client.example")
    for rcpt in ("bob@etrn.example", "carol@other.test"):
        assert c.cmd("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:<{rcpt}>") == "250 2.1.5 Ok"
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(message(rcpt)[:-2]).startswith("250 2.0.0 Ok: queued as ")
    # nothing listens yet: both are deferred, for an hour
    wait_for(lambda: instance.log().count("status=deferred") == 2, timeout=30,
             what="the deferrals")
    with Sink(sink_port) as sink:
        assert c.cmd("ETRN") == "500 Syntax: ETRN domain"
        assert c.cmd("ETRN bad!domain") == "501 Error: invalid parameter syntax"
        assert c.cmd("ETRN other.test") == "459 <other.test>: service unavailable"
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("ETRN etrn.example") == "503 Error: MAIL transaction in progress"
        assert c.cmd("RSET") == "250 2.0.0 Ok"
        assert c.cmd("ETRN @etrn.example") == "250 Queuing started"
        wait_for(lambda: "status=sent" in instance.log(), timeout=20, what="the delivery")
        c.cmd("QUIT")
        c.close()
        assert [rcpts for _, rcpts, _ in sink.messages] == [["bob@etrn.example"]]
    log = instance.log()
    assert "warning: reject: ETRN other.test... from localhost[127.0.0.1]" in log
    assert log.count("status=sent") == 1        # other.test waits for its hour
    assert "etrn=1/5" in log


# --- DSN parameters -----------------------------------------------------------------------

def test_dsn_parameters_are_kept_per_recipient(mta):
    mta.start()
    c = connect(mta.port)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org> RET=FULL RET=HDRS") == \
        "501 5.5.4 Bad RET parameter syntax"
    assert c.cmd("MAIL FROM:<a@example.org> ENVID=bad=") == "501 5.5.4 Bad ENVID parameter syntax"
    assert c.cmd("MAIL FROM:<a@example.org> RET=hdrs ENVID=QQ+2Bid+3D1") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<bob@mail.test.example> NOTIFY=NEVER,DELAY") == \
        "501 5.5.4 Error: Bad NOTIFY parameter syntax"
    assert c.cmd("RCPT TO:<bob@mail.test.example> ORCPT=rfc822") == \
        "501 5.5.4 Error: Bad ORCPT parameter syntax"
    assert c.cmd("RCPT TO:<bob@mail.test.example> FOO=1") == "555 5.5.4 Unsupported option: FOO=1"
    assert c.cmd("RCPT TO:<bob@mail.test.example> NOTIFY=delay,failure "
                 "ORCPT=rfc822;Bob+2BX@example.org") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<carol@mail.test.example>") == "250 2.1.5 Ok"
    assert c.cmd("RCPT TO:<dave@mail.test.example> NOTIFY=NEVER") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    assert c.cmd(message()[:-2]).startswith("250 2.0.0 Ok: queued as ")
    c.close()
    (m, _), = mta.queued()
    assert (m.attrs["dsn_ret"], m.attrs["dsn_envid"]) == ("HDRS", "QQ+id=1")
    assert [(r.address, r.notify, r.orcpt) for r in m.recipients] == [
        ("bob@mail.test.example", "FAILURE,DELAY", "rfc822;Bob+X@example.org"),
        ("carol@mail.test.example", "", ""),
        ("dave@mail.test.example", "NEVER", "")]


def test_dsn_disabled_by_discard_ehlo_keywords(mta):
    mta.main["smtpd_discard_ehlo_keywords"] = "dsn"
    mta.start()
    c = connect(mta.port)
    assert "DSN" not in c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@example.org> RET=FULL") == "501 5.7.1 DSN support is disabled"
    c.cmd("QUIT")
    c.close()


class DsnPeer:
    """A next hop that announces DSN and SMTPUTF8 and records MAIL and RCPT lines."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 peer.example ESMTP\r\n")
            while line := f.readline():
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = text[:4].upper()
                if verb == "EHLO":
                    conn.sendall(b"250-peer.example\r\n250-DSN\r\n250-8BITMIME\r\n"
                                 b"250 SMTPUTF8\r\n")
                elif verb in ("MAIL", "RCPT"):
                    self.lines.append(text)
                    conn.sendall(b"250 Ok\r\n")
                elif verb == "DATA":
                    conn.sendall(b"354 go\r\n")
                    while f.readline() not in (b".\r\n", b""):
                        pass
                    conn.sendall(b"250 2.0.0 Ok: stored\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 Ok\r\n")

    def close(self):
        self.listener.close()
        self.thread.join(10)


def test_dsn_and_smtputf8_reach_the_next_hop(instance):
    peer = DsnPeer()
    instance.add_smtpd(mydestination="localhost", relayhost=f"[127.0.0.1]:{peer.port}")
    instance.master_lines += ["qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
    try:
        instance.start()
        c = connect(instance.port)
        c.cmd("EHLO client.example")
        assert c.cmd(f"MAIL FROM:<{UTF8_SENDER}> SMTPUTF8 RET=HDRS ENVID=e1") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<bob@remote.example> NOTIFY=FAILURE,DELAY") == "250 2.1.5 Ok"
        assert c.cmd("RCPT TO:<carol@remote.example> ORCPT=rfc822;c+2B1@old.example") == \
            "250 2.1.5 Ok"
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(message()[:-2]).startswith("250 2.0.0 Ok: queued as ")
        c.cmd("QUIT")
        c.close()
        wait_for(lambda: instance.log().count("status=sent") == 2, timeout=30,
                 what="the delivery")
    finally:
        peer.close()
    assert peer.lines[1:] == [
        "RCPT TO:<bob@remote.example> ORCPT=rfc822;bob@remote.example NOTIFY=FAILURE,DELAY",
        "RCPT TO:<carol@remote.example> ORCPT=rfc822;c+2B1@old.example"]
    assert peer.lines[0] == f"MAIL FROM:<{UTF8_SENDER}> ENVID=e1 RET=HDRS SMTPUTF8"


def test_vrfy_takes_smtputf8(mta):
    mta.start()
    c = connect(mta.port)
    c.cmd("EHLO client.example")
    assert c.cmd("VRFY") == "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"
    assert c.cmd("VRFY SMTPUTF8") == "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"
    assert c.cmd("VRFY <b\u00f6b@b\u00fccher.example>") == "501 5.1.3 Bad recipient address syntax"
    assert c.cmd("VRFY <b\u00f6b@b\u00fccher.example> SMTPUTF8").startswith("252 2.0.0 ")
    c.cmd("QUIT")
    c.close()


def test_bdat_message_is_delivered_intact(instance):
    from sink import Sink

    lines = [f"{i} " + "y" * (i % 100) for i in range(185000)]
    lines[100] = ".dot"
    body = ("Subject: big\r\nMessage-ID: <big2@example.org>\r\nFrom: a@example.org\r\n"
            "Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n"
            + "\r\n".join(lines) + "\r\n").encode()
    assert len(body) > 10 << 20
    with Sink(keep_bodies=True) as sink:
        instance.port = free_port()
        instance.main.update({"mydestination": "localhost", "message_size_limit": "20000000",
                              "relayhost": f"[127.0.0.1]:{sink.port}"})
        instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd",
                                 "qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
        instance.start()
        c = connect(instance.port)
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<bob@remote.example>") == "250 2.1.5 Ok"
        half = len(body) // 2 + 7
        assert bdat(c, body[:half]) == f"250 2.0.0 Ok: {half} bytes"
        assert bdat(c, body[half:], last=True).startswith("250 2.0.0 Ok: queued as ")
        c.cmd("QUIT")
        c.close()
        wait_for(lambda: sink.messages, timeout=60, what="the delivery")
    (_, rcpts, delivered), = sink.messages
    assert rcpts == ["bob@remote.example"]
    # the sink keeps the DATA stream as sent: dot-stuffed, after our Received header
    assert delivered.startswith(b"Received: from client.example")
    assert delivered.endswith(body.replace(b"\r\n.", b"\r\n.."))
