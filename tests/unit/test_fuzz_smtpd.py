"""Fuzzing smtpd's command parser and DATA reader: smtpd.session.Session over a socketpair.

Hypothesis writes client streams (SMTP-shaped command scripts with hostile arguments,
DATA content with dots, bare LFs, over-long lines, a STARTTLS into garbage; and plain
random bytes) into a Session served by a thread. Whatever comes in:

* the session ends by itself (EOF, QUIT, an error limit), within the test's deadline;
* nothing escapes Session.run() but its own end (no exception, no traceback in the log);
* every reply is one or more well-formed SMTP lines (`NNN text` / `NNN-text`, 7-bit,
  no control characters), and the session never talks after 221 or 421;
* every `250 2.0.0 Ok: queued as ID` has a complete queue file ID in incoming/ that
  lib/queue reads back, and nothing else is left there (no dot-file, no other file).

bench/fuzz_long.py runs the same properties with many more examples.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import maincf, msg
from postfix_py.lib import queue as Q
from postfix_py.lib.smtpio import SmtpStream
from postfix_py.smtpd.check import Checker, ClientState
from postfix_py.smtpd.session import Session
from postfix_py.smtpd.tls import TlsServer

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
REPLY_LINE = re.compile(rb"^[2345][0-9][0-9][ -][\x20-\x7e]*\r\n$")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-F]+)\r\n$")
SESSION_DEADLINE = 20        # seconds: far above what one example needs


def config(queue: str, **extra) -> maincf.Config:
    values = {"myhostname": "mail.test.example", "mydestination": "localhost",
              "local_recipient_maps": "",  # any local part: not what is tested here
              "queue_directory": queue, "smtpd_error_sleep_time": "0s",
              "smtpd_timeout": "5s", "smtpd_starttls_timeout": "5s",
              "message_size_limit": "20000", "smtpd_recipient_limit": "5",
              "smtpd_hard_error_limit": "20", "smtpd_junk_command_limit": "30",
              "smtpd_tls_security_level": "may", "smtpd_peername_lookup": "no",
              "mynetworks": "127.0.0.0/8",
              # the remote header rewrite context: cleanup adds no Message-Id:, Date:
              # or From: (they differ between runs), so queued content compares exactly
              "local_header_rewrite_clients": ""}
    values.update(extra)
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=values)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A queue directory, a Checker, and the server TLS of one generation."""
    root = tmp_path_factory.mktemp("fuzz-smtpd")
    queue = root / "queue"
    (queue / "incoming").mkdir(parents=True)
    (queue / "public").mkdir()
    pem = root / "server.pem"
    trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    worlds = {}
    for mode in ("normalize", "reject", "no"):
        cfg = config(str(queue), smtpd_forbid_bare_newline=mode,
                     smtpd_forbid_bare_newline_exclusions="", smtpd_tls_cert_file=str(pem))
        worlds[mode] = (cfg, Checker(cfg), TlsServer.build(cfg, "may"))
    return str(queue), worlds


@contextlib.contextmanager
def captured_log():
    """The session's log lines as they would be written (formatted), not on stderr."""
    lines: list[str] = []
    saved = msg._write
    msg.init_cli("smtpd")
    msg._write = lambda stream, line: lines.append(line)
    try:
        yield lines
    finally:
        msg._write = saved
        msg.close()


def run_session(world, data: bytes, mode: str = "normalize", addr: str = "127.0.0.1"):
    """Serve data to a Session; returns (reply bytes, log lines). Asserts it ended cleanly."""
    queue, worlds = world
    cfg, checker, tls = worlds[mode]
    incoming = os.path.join(queue, "incoming")
    for name in os.listdir(incoming):
        os.unlink(os.path.join(incoming, name))
    server, client = socket.socketpair()
    stream = SmtpStream(server, cfg["smtpd_timeout"])
    session = Session(stream, cfg, ClientState(name="client.example", addr=addr), queue,
                      checker, level="may", tls=tls)
    escaped: list[BaseException] = []

    def serve():
        try:
            session.run()
        except BaseException as exc:       # noqa: BLE001 - the property under test
            escaped.append(exc)
        finally:
            stream.close()

    def feed():
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass                           # the session hung up first (QUIT, error limit)

    with captured_log() as log:
        threads = [threading.Thread(target=serve), threading.Thread(target=feed)]
        for t in threads:
            t.start()
        client.settimeout(SESSION_DEADLINE)
        out = bytearray()
        try:
            while chunk := client.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        for t in threads:
            t.join(SESSION_DEADLINE)
        client.close()
    assert not any(t.is_alive() for t in threads), "the session did not end"
    assert escaped == [], escaped
    return bytes(out), log


def check_replies(out: bytes, queue: str, log) -> None:
    tls = out.find(b"220 2.0.0 Ready to start TLS\r\n")
    if tls >= 0:                       # what follows is TLS records (alerts): not ours
        out = out[:tls + 30]
    lines = out.splitlines(keepends=True)
    queued = []
    for i, line in enumerate(lines):
        assert REPLY_LINE.match(line), line
        if line[:3] in (b"221", b"421"):
            assert i == len(lines) - 1, lines[i:]      # nothing after goodbye
        m = QUEUED.match(line)
        if m:
            queued.append(m.group(1).decode())
    incoming = os.path.join(queue, "incoming")
    assert sorted(os.listdir(incoming)) == sorted(queued)   # no dot-file, nothing else
    for qid in queued:
        m = Q.read(os.path.join(incoming, qid))
        assert m.recipients and b"".join(m.content(os.path.join(incoming, qid)))
    for line in log:
        assert line.startswith("smtpd: ") and "Traceback" not in line, line
        assert not re.search(r"^smtpd: (fatal|panic|error): ", line), line
        assert not re.search("[\x00-\x08\x0a-\x1f\x7f-\x9f]", line), line  # no escapes


# --- strategies ------------------------------------------------------------------------------

TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=0x2ff), max_size=40)
ADDRESSES = st.one_of(
    st.sampled_from(["user@localhost", "a@localhost", "x@remote.example", "", "postmaster",
                     '"quoted local"@localhost', "@route,@r2:u@localhost", "u@[127.0.0.1]",
                     "u@@localhost", "<nested>@localhost", "\u00fcser@localhost"]),
    TEXT, TEXT.map(lambda t: f'"{t}"@localhost'), TEXT.map(lambda t: f"{t}@localhost"),
    TEXT.map(lambda t: f"user@{t}"))
PARAMS = st.lists(st.one_of(
    st.sampled_from(["SIZE=100", "SIZE=99999999999", "SIZE=", "SIZE=-1", "BODY=8BITMIME",
                     "BODY=BINARYMIME", "AUTH=<>", "AUTH=x@y", "SMTPUTF8", "NOTIFY=NEVER",
                     "=", "X" * 300, "RET=FULL", "RET=", "ENVID=a+2Bb", "ENVID=+0",
                     "ORCPT=rfc822;a+2Bb@x", "ORCPT=utf-8;\\x{FFFFFF}", "ORCPT=x;+00",
                     "NOTIFY=SUCCESS,DELAY", "NOTIFY=NEVER,DELAY"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20)), max_size=3)
WORDS = st.text(st.characters(min_codepoint=0, max_codepoint=0xff), max_size=60)
ENDINGS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n", b""])


@st.composite
def command(draw) -> bytes:
    kind = draw(st.integers(0, 12))
    if kind == 0:
        addr, params = draw(ADDRESSES), draw(PARAMS)
        text = f"MAIL FROM:<{addr}>" + "".join(" " + p for p in params)
    elif kind in (1, 2):
        text = f"RCPT TO:<{draw(ADDRESSES)}>" + "".join(" " + p for p in draw(PARAMS))
    elif kind == 3:
        text = draw(st.sampled_from(["MAIL FROM:", "RCPT TO:", "mail from: <a@b>",
                                     "RCPT TO:user@localhost", "MAIL FROM:<a@b",
                                     "RCPT TO:<a@b>junk", "MAIL FROM:<>", "DATA x",
                                     "RSET x", "QUIT now", "STARTTLS x", "AUTH", "AUTH PLAIN",
                                     "AUTH LOGIN x y z", "HELO", "EHLO", "VRFY", "VRFY <>"]))
    elif kind == 4:
        text = draw(st.sampled_from(["HELO", "EHLO", "helo", "ehlo"])) + " " + draw(WORDS)
    elif kind == 5:
        text = draw(st.sampled_from(["NOOP", "RSET", "VRFY user@localhost", "ETRN x",
                                     "HELP", "TURN", "BDAT 10", "XCLIENT ADDR=1.2.3.4"]))
    elif kind == 8:
        text = draw(st.sampled_from(["VRFY ", "VRFY <", "AUTH ", "ETRN ", "NOOP "])) + \
            draw(ADDRESSES)
    elif kind == 6:
        return draw(st.binary(max_size=200))                   # anything at all
    elif kind == 7:
        return b"X" * draw(st.integers(2000, 5000)) + b"\r\n"    # over line_length_limit
    else:
        text = draw(st.sampled_from(["EHLO client.example", "MAIL FROM:<s@example.org>",
                                     "RCPT TO:<user@localhost>", "DATA", "NOOP"]))
    raw = text.encode("latin-1", "replace") if all(ord(c) < 256 for c in text) \
        else text.encode("utf-8")
    return raw + draw(ENDINGS)


@st.composite
def content(draw) -> bytes:
    """What follows DATA: lines with dots and odd endings, maybe an end, maybe not."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        line = draw(st.one_of(
            st.sampled_from([b".", b"..", b".x", b"Received: from a by b", b"Message-ID: <m>",
                             b"", b"Subject: fuzz", b"\x00\xff", b".\r", b"\r"]),
            st.binary(max_size=120),
            st.binary(min_size=1, max_size=1).map(lambda b: b * 3000)))
        parts.append(line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""])))
    end = draw(st.sampled_from([b".\r\n", b"\r\n.\r\n", b"\n.\n", b".\n", b"", b".\r\n"]))
    return b"".join(parts) + end


@st.composite
def script(draw) -> bytes:
    out = [b"EHLO fuzz.example\r\n"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 14))):
        out.append(draw(command()))
        if draw(st.integers(0, 5)) == 0:
            out += [b"MAIL FROM:<s@example.org>\r\n", b"RCPT TO:<user@localhost>\r\n",
                    b"DATA\r\n", draw(content())]
        if draw(st.integers(0, 7)) == 0:
            # CHUNKING: chunks of content, sizes true or not, LAST or not
            out += [b"MAIL FROM:<s@example.org>\r\n", b"RCPT TO:<user@localhost>\r\n"]
            for chunk in draw(st.lists(content(), max_size=3)):
                size = len(chunk) + draw(st.sampled_from([0, 0, 0, -1, 1]))
                last = b" LAST" if draw(st.booleans()) else b""
                out.append(b"BDAT %d%s\r\n" % (max(size, 0), last) + chunk)
        if draw(st.integers(0, 25)) == 0:
            out.append(b"STARTTLS\r\n" + draw(st.binary(max_size=100)))   # garbage handshake
    if draw(st.booleans()):
        out.append(b"QUIT\r\n")
    return b"".join(out)


# --- properties ------------------------------------------------------------------------------

@FUZZ
@given(data=script(), mode=st.sampled_from(["normalize", "reject", "no"]),
       addr=st.sampled_from(["127.0.0.1", "192.0.2.7"]))
def test_command_scripts(world, data, mode, addr):
    out, log = run_session(world, data, mode, addr)
    assert out.startswith(b"220 mail.test.example ESMTP")
    check_replies(out, world[0], log)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes(world, data):
    out, log = run_session(world, data)
    check_replies(out, world[0], log)


@FUZZ
@given(body=content(), pipelined=st.booleans())
def test_data_reader(world, body, pipelined):
    head = b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n"
    tail = b"NOOP\r\nQUIT\r\n"
    data = head + body + tail if pipelined else head + body
    out, log = run_session(world, data)
    check_replies(out, world[0], log)
    replies = out.splitlines()
    assert b"354 End data with <CR><LF>.<CR><LF>" in replies
    ended = body.endswith(b"\r\n.\r\n") or body == b".\r\n"
    if ended and len(body) <= 15000:
        # A message that ends properly and fits gets queued, whatever its content.
        assert any(QUEUED.match(line + b"\r\n") for line in replies), replies


def test_a_message_survives_the_trip(world):
    """The DATA reader's output: dot-unstuffed, LF line ends, as lib/queue documents."""
    out, _ = run_session(world, b"EHLO c\r\nMAIL FROM:<s@example.org>\r\n"
                                b"RCPT TO:<user@localhost>\r\nDATA\r\n"
                                b"Subject: t\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    qid = re.search(rb"queued as ([0-9A-F]+)", out).group(1).decode()
    path = os.path.join(world[0], "incoming", qid)
    assert b"".join(Q.read(path).content(path)).endswith(b"Subject: t\n\n.leading dot\n")


def _queued(world, out: bytes) -> list[bytes]:
    """The content of every message a session's replies say was queued."""
    found = []
    for qid in re.findall(rb"queued as ([0-9A-F]+)", out):
        path = os.path.join(world[0], "incoming", qid.decode())
        text = b"".join(Q.read(path).content(path))
        found.append(text[text.index(b"Subject: bulk\n"):])   # after our Received:
    return found


@FUZZ
@given(body=content(), pipelined=st.booleans(), mode=st.sampled_from(["normalize", "no"]))
def test_bulk_body_reader_matches_the_line_reader(world, body, pipelined, mode):
    """smtpd takes whole CRLF lines of the body in bulk (SmtpStream.buffered_lines); with that
    turned off every line goes through readline(). Replies and queued content agree."""
    data = (b"EHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n"
            b"Subject: bulk\r\n\r\n" + body + (b"NOOP\r\nQUIT\r\n" if pipelined else b""))
    bulk, _ = run_session(world, data, mode)
    bulk_content = _queued(world, bulk)
    original = SmtpStream.buffered_lines
    SmtpStream.buffered_lines = lambda self, limit, timeout=None: b""
    try:
        lines, _ = run_session(world, data, mode)
    finally:
        SmtpStream.buffered_lines = original
    mask = re.compile(rb"queued as [0-9A-F]+")
    assert mask.sub(b"queued", bulk) == mask.sub(b"queued", lines)
    assert bulk_content == _queued(world, lines)


@pytest.mark.parametrize("milters", [False, True])
def test_a_finished_session_is_freed_without_the_cycle_collector(world, milters):
    """No reference cycle through the session: a worker's sessions (each with its TLS
    connection and OpenSSL's buffers) are freed when they end, not at the next full
    garbage collection, which let a busy worker's C heap grow by megabytes. With
    smtpd_milters too (a milter that cannot be reached, milter_default_action accept)."""
    import gc
    import weakref

    from postfix_py.smtpd import milters as M
    queue, worlds = world
    cfg, checker, tls = worlds["normalize"]
    if milters:
        cfg = cfg.with_overrides({"smtpd_milters": "inet:127.0.0.1:9",
                                  "milter_default_action": "accept",
                                  "milter_connect_timeout": "1s"})
    server, client = socket.socketpair()
    client.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"
                   b"RCPT TO:<b@localhost>\r\nDATA\r\nSubject: x\r\n\r\nhello\r\n.\r\n"
                   b"QUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    gc.disable()
    try:
        with captured_log():
            stream = SmtpStream(server, cfg["smtpd_timeout"])
            session = Session(stream, cfg, ClientState(name="client.example",
                                                       addr="127.0.0.1"),
                              queue, checker, level="may", tls=tls)
            M.setup(session, M.prepare(cfg))
            assert (session.milters is not None) == milters
            session.run()
            stream.close()
        gone = weakref.ref(session)
        del session, stream
        assert gone() is None, [type(r).__name__ for r in gc.get_referrers(gone())]
    finally:
        gc.enable()
        replies = client.recv(65536)
        client.close()
    assert b"250 2.0.0 Ok: queued as" in replies
