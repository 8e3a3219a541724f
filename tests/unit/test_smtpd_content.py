"""smtpd/content.py, and BDAT content queued as DATA content is, however it is split."""

from hypothesis import given, settings, strategies as st

from postfix_py.smtpd.content import ContentSink

CFG = {"header_size_limit": 40, "message_size_limit": 0, "line_length_limit": 30}


class Writer:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def sink_output(pieces, cfg=CFG):
    w = Writer()
    sink = ContentSink(w, cfg)
    for piece in pieces:
        sink.write(piece)
    return w.data, sink


def test_content_passes_through_whole():
    # The headers are the cleanup stage's business: the sink passes content on as is.
    text = b"Received: a\nX-Long: " + b"y" * 35 + b"\n\tcontinued\n\nbody\n"
    out, sink = sink_output([text[:7], text[7:30], text[30:]])
    assert out == text and sink.size == len(text) and not sink.too_big


def test_size_limit_and_write_errors():
    out, sink = sink_output([b"Subject: x\n\n" + b"z" * 100], dict(CFG, message_size_limit=50))
    assert sink.too_big and len(out) <= 50

    class Broken:
        def write(self, data):
            raise OSError(28, "No space left on device")
    sink = ContentSink(Broken(), CFG)
    sink.write(b"Subject: x\n\nbody\n")
    assert sink.problem.errno == 28


# --- the DATA path and the BDAT path queue the same content ------------------------------

from test_fuzz_smtpd import run_session, world  # noqa: E402,F401 - the Session harness

import os  # noqa: E402

from postfix_py.lib import queue as Q  # noqa: E402

LINES = st.sampled_from([b"Received: from x", b"Message-ID: <id@x>", b"\tcontinued",
                         b"X-H: " + b"h" * 70, b"", b"body", b".leading dot", b"..",
                         b"a" * 1200, b"b" * 2500, b"tail\r"])


def queued_content(world, script: bytes) -> bytes:
    out, log = run_session(world, script)
    assert b"250 2.0.0 Ok: queued as " in out, (out, log)
    incoming = os.path.join(world[0], "incoming")
    path = os.path.join(incoming, os.listdir(incoming)[0])
    content = b"".join(Q.read(path).content(path))
    # after the Received: header's last line ("\tfor <...>; DATE"), whose date may differ
    return content[content.index(b"\n\tfor <") + 1:].split(b"\n", 1)[1]


@settings(deadline=None, max_examples=30)
@given(lines=st.lists(LINES, min_size=1, max_size=15),
       cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=4))
def test_bdat_queues_what_data_queues(world, lines, cuts):
    text = b"".join(line + b"\r\n" for line in lines)
    head = b"EHLO c\r\nMAIL FROM:<a@localhost>\r\nRCPT TO:<u@localhost>\r\n"
    stuffed = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n"
                       for line in lines)
    via_data = queued_content(world, head + b"DATA\r\n" + stuffed + b".\r\nQUIT\r\n")
    points = sorted({min(c, len(text)) for c in cuts} - {len(text)})
    pieces = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    chunks = b"".join(b"BDAT %d%s\r\n" % (len(p), b" LAST" if i == len(pieces) - 1 else b"")
                      + p for i, p in enumerate(pieces))
    via_bdat = queued_content(world, head + chunks + b"QUIT\r\n")
    assert via_bdat == via_data


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 700), max_size=12), st.integers(1, 600), st.booleans())
def test_long_line_measures_as_the_split_did(lengths, n, final_lf):
    """session.long_line's shortcut (an LF in every block of n // 2 bytes) gives the
    answer of measuring every line."""
    from postfix_py.smtpd.session import long_line
    data = b"\n".join(b"x" * k for k in lengths) + (b"\n" if final_lf else b"")
    assert long_line(data, n) == (max(map(len, data.split(b"\n"))) >= n)
