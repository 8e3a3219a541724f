"""Property tests for postfix_py.lib.attr: round trips, arbitrary splits, hostile input."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import attr
from postfix_py.lib.attr import MAX_FRAME, AttrError

# No example database: keep test runs from writing .hypothesis/ into the tree.
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# Structured round trips find bugs with fewer examples; keeps each test under a second.
QUICK = settings(FUZZ, max_examples=100)

names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=attr.MAX_NAME)
attr_sets = st.dictionaries(names, st.binary(max_size=300), min_size=1, max_size=12)


@QUICK
@given(attr_sets)
def test_roundtrip(attrs):
    frame = attr.encode(attrs)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoded = attr.decode(frame)
    assert decoded == attrs
    assert list(decoded) == list(attrs)
    assert attr.decode_body(frame[4:]) == attrs


@QUICK
@given(st.dictionaries(names, st.one_of(st.text(max_size=50), st.integers(), st.binary(max_size=50)),
                       min_size=1, max_size=8))
def test_roundtrip_value_types(attrs):
    want = {
        k: v.encode() if isinstance(v, str) else str(v).encode() if isinstance(v, int) else v
        for k, v in attrs.items()
    }
    assert attr.decode(attr.encode(attrs)) == want


@QUICK
@given(st.lists(attr_sets, min_size=1, max_size=6), st.data())
def test_decoder_arbitrary_splits(messages, data):
    stream = b"".join(attr.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    dec = attr.FrameDecoder()
    got = []
    last = 0
    for cut in [*cuts, len(stream)]:
        dec.feed(stream[last:cut])
        last = cut
        got.extend(dec.frames())
    assert got == messages
    assert dec.pending == 0
    assert dec.next_frame() is None


@FUZZ
@given(st.binary(max_size=2000))
def test_decode_random_bytes(blob):
    for func in (attr.decode, attr.decode_body):
        try:
            result = func(blob)
        except AttrError:
            pass
        else:
            assert isinstance(result, dict)


@FUZZ
@given(st.binary(min_size=1, max_size=2000))
def test_decode_random_body_with_good_length(body):
    # A valid prefix gets past the length check, so this exercises the body parser.
    try:
        result = attr.decode(len(body).to_bytes(4, "big") + body)
    except AttrError as exc:
        assert exc.recoverable
    else:
        assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in result.items())


@QUICK
@given(attr_sets, st.data())
def test_decode_mutated_frame(attrs, data):
    frame = bytearray(attr.encode(attrs))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    try:
        attr.decode(bytes(frame))
    except AttrError:
        pass


@QUICK
@given(st.lists(st.one_of(st.binary(max_size=300), attr_sets.map(attr.encode)), max_size=10))
def test_decoder_random_chunks(chunks):
    dec = attr.FrameDecoder()
    for chunk in chunks:
        dec.feed(chunk)
        assert dec.pending <= 4 + MAX_FRAME
        for item in dec.frames():
            assert isinstance(item, (dict, AttrError))
        try:
            dec.next_frame()
        except AttrError:
            pass


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=500))
def test_read_frame_random_bytes(blob):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(blob)
        a.shutdown(socket.SHUT_WR)
        try:
            while True:
                attr.read_frame(b, 1.0)
        except (AttrError, attr.PeerClosedError, attr.TruncatedFrameError):
            pass
