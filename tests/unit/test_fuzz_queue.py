"""Fuzzing the queue-file reader (lib/queue.py): random files, valid files with bits
flipped, cut short or spliced, and record streams built from hostile records.

lib/queue.read() either returns a message whose recipients, sender and content are
usable, or raises QueueFileError; reading the content of a message read() accepted yields
bytes or raises QueueFileError. Nothing else: a corrupt file goes to corrupt/ with a
warning (qmgr), it never stops the queue manager. bench/fuzz_long.py runs it longer.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import queue as Q

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


def valid_file(tmp: str, rcpts=("a@example.com", "b@example.com"), body=b"Subject: x\n\nhi\n"):
    """A committed queue file as smtpd writes it; returns its bytes."""
    os.makedirs(os.path.join(tmp, "incoming"), exist_ok=True)
    w = Q.QueueWriter(tmp, now=1700000000.5)
    w.add_attr("client_address", "127.0.0.1")
    w.set_sender("s@example.org")
    for r in rcpts:
        w.add_recipient(r)
    w.write(body)
    qid = w.commit()
    path = os.path.join(tmp, "incoming", qid)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def read_all(path: str) -> None:
    """What qmgr and the delivery agents do with a file: read() and then its content."""
    try:
        m = Q.read(path)
    except Q.QueueFileError as exc:
        assert str(exc).startswith(path)
        return
    assert isinstance(m.sender, str) and isinstance(m.size, int) and m.size >= 0
    for r in m.recipients:
        assert isinstance(r.address, str) and 0 < r.offset < os.path.getsize(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in m.attrs.items())
    try:
        for block in m.content(path):
            assert isinstance(block, bytes)
    except Q.QueueFileError as exc:
        assert str(exc).startswith(path)


def write(tmp_path_factory, data: bytes) -> str:
    path = str(tmp_path_factory.mktemp("qf", numbered=True) / "4C1A21F3E8B")
    with open(path, "wb") as f:
        f.write(data)
    return path


@FUZZ
@given(data=st.binary(max_size=2000), magic=st.booleans())
def test_random_files(tmp_path_factory, data, magic):
    read_all(write(tmp_path_factory, (Q.MAGIC if magic else b"") + data))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), body=st.binary(max_size=300))
def test_valid_files_damaged(tmp_path_factory, flips, cut, body):
    good = bytearray(valid_file(str(tmp_path_factory.mktemp("good", numbered=True)),
                                body=body))
    for pos, bit in flips:
        good[pos % len(good)] ^= 1 << bit
    data = bytes(good[:cut % (len(good) + 1)] if cut is not None else good)
    read_all(write(tmp_path_factory, data))


RECORD_TYPES = st.sampled_from(list(b"TASRDMBXEZ\x00\xff"))


@st.composite
def records(draw) -> bytes:
    out = [Q.MAGIC]
    for _ in range(draw(st.integers(0, 12))):
        kind = bytes([draw(RECORD_TYPES)])
        value = draw(st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"", b"1700000000.5", b"nan", b"inf", b"-1", b"1e999", b"12",
                             b"\xc2\xb2", b"\xd9\xa3", b"name=value", b"=", b"\xff\xfe"])))
        length = len(value)
        if draw(st.integers(0, 9)) == 0:
            length = draw(st.integers(0, 2**32 - 1))                # a lying length
        out.append(kind + length.to_bytes(4, "big") + value)
    if draw(st.booleans()):
        out.append(b"E\x00\x00\x00\x00")
    return b"".join(out)


@FUZZ
@given(data=records())
def test_hostile_records(tmp_path_factory, data):
    read_all(write(tmp_path_factory, data))


@FUZZ
@given(body=st.binary(max_size=70000), rcpts=st.lists(st.text(max_size=30), min_size=1,
                                                        max_size=4))
def test_what_is_written_reads_back(tmp_path_factory, body, rcpts):
    tmp = str(tmp_path_factory.mktemp("rt", numbered=True))
    data = valid_file(tmp, rcpts=rcpts, body=body)
    path = write(tmp_path_factory, data)
    m = Q.read(path)
    assert [r.address for r in m.recipients] == rcpts
    assert m.size == len(body) and b"".join(m.content(path)) == body
