"""Random bytes to a real smtpd: a running instance (chrooted smtpd as shipped, STARTTLS
offered) takes hypothesis-made client streams, sent in random pieces, over real TCP
connections, one after another.

For each stream: a 220 greeting first, then only well-formed SMTP reply lines (up to a
STARTTLS handshake, after which the bytes are TLS), then the end of the connection within
the deadline. Afterwards: no traceback, no worker that died or was killed, every
`queued as ID` is a complete file in incoming/ and nothing else is there, and the next
legitimate client is served. The unit-level twin is tests/unit/test_fuzz_smtpd.py.
"""

import os
import re
import smtplib
import socket
import time

import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfxinst import free_port
from postfix_py.lib import queue as Q

REPLY_LINE = re.compile(rb"^[2345][0-9][0-9][ -][\x20-\x7e]*\r\n$")

COMMANDS = st.sampled_from([
    b"EHLO fuzz.example\r\n", b"HELO x\r\n", b"MAIL FROM:<s@example.org>\r\n",
    b"RCPT TO:<user@localhost>\r\n", b"RCPT TO:<x@elsewhere.example>\r\n", b"DATA\r\n",
    b"Subject: fuzz\r\n\r\nbody\r\n.\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"RSET\r\n",
    b"NOOP\r\n", b"VRFY user\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AGFhAGI=\r\n", b"QUIT\r\n",
    b"MAIL FROM:<a@b> SIZE=999999999999\r\n", b"BDAT 100 LAST\r\n", b"\x00\r\n",
    b"X" * 3000 + b"\r\n", b"MAIL FROM:<\"\x1b[31m\"@x>\r\n"])


@st.composite
def transaction(draw) -> bytes:
    """MAIL, RCPT, DATA, any content, and (mostly) the end of data."""
    body = draw(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from(
        [b".", b"..x", b"Received: x", b"\x00\xff", b"\r", b"X" * 5000])), max_size=8))
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b"\n.\n", b""]))
    return (b"MAIL FROM:<s@example.org>\r\nRCPT TO:<user@localhost>\r\nDATA\r\n" +
            b"\r\n".join(body) + end)


@st.composite
def streams(draw):
    parts = draw(st.lists(st.one_of(COMMANDS, st.binary(max_size=300), transaction()),
                          max_size=20))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return data, cuts


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send data in pieces, half-close, read everything until the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        last = 0
        try:
            for cut in [*cuts, len(data)]:
                s.sendall(data[last:cut])
                last = cut
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass                                  # the server hung up first
        out = bytearray()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        else:
            raise AssertionError("the server did not end the session")
    return bytes(out)


def test_random_streams_to_a_real_smtpd(instance):
    port = free_port()
    pem = instance.dir / "server.pem"
    trustme.CA().issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    instance.main.update({"mydestination": "$myhostname, localhost",
                          "smtpd_error_sleep_time": "0s", "smtpd_timeout": "5s",
                          "smtpd_tls_cert_file": str(pem), "smtpd_tls_security_level": "may"})
    instance.master_lines = [f"127.0.0.1:{port} inet n - y - 10 smtpd"]
    instance.start()
    master = instance.master_pid()
    queued: list[str] = []
    seen: list[int] = []

    examples = settings.default.max_examples       # the profile's: ci, or fuzz_long's
    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
    @given(stream=streams())
    def one_client(stream):
        data, cuts = stream
        seen.append(len(data))
        out = exchange(port, data, cuts)
        tls = out.find(b"220 2.0.0 Ready to start TLS\r\n")
        if tls >= 0:
            out = out[:tls + 30]                   # the rest is TLS records
        lines = out.splitlines(keepends=True)
        assert lines and lines[0].startswith(b"220 mail.test.example ESMTP"), out[:200]
        for line in lines:
            assert REPLY_LINE.match(line), line
        queued.extend(m.decode() for m in re.findall(rb"queued as ([0-9A-F]+)\r\n", out))

    one_client()
    assert len(seen) >= examples // 2 and len(queued) >= 5, (len(seen), len(queued))
    # The next legitimate client is served.
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("s@example.org", ["user@localhost"], b"Subject: after\r\n\r\nfine\r\n")
    assert instance.master_pid() == master
    log = instance.log()
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "exit status" not in log and "killed by signal" not in log
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", log)        # no escapes in the log
    names = os.listdir(instance.queue / "incoming")
    assert not [n for n in names if n.startswith(".")]
    assert set(queued) <= set(names) and len(names) == len(queued) + 1
    for name in names:
        path = instance.queue / "incoming" / name
        assert Q.read(str(path)).recipients
