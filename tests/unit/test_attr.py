"""Unit tests for postfix_py.lib.attr: framing, strict decoding, socket I/O and AttrClient."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from postfix_py.lib import attr
from postfix_py.lib.attr import MAX_FRAME, AttrError


def prefix(length: int) -> bytes:
    """Return a 4-byte big-endian frame length prefix."""
    return length.to_bytes(4, "big")


def raw_attr(name: bytes, value: bytes) -> bytes:
    """Return one wire attribute without any validation."""
    return bytes((len(name),)) + name + len(value).to_bytes(4, "big") + value


def frame_of(body: bytes) -> bytes:
    """Return body with its length prefix."""
    return prefix(len(body)) + body


@pytest.fixture
def pair():
    """Yield a connected UNIX socketpair, closed afterwards."""
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


# --- encode -----------------------------------------------------------------


def test_encode_layout():
    frame = attr.encode({"request": "seed", "size": 32})
    body = raw_attr(b"request", b"seed") + raw_attr(b"size", b"32")
    assert frame == frame_of(body)


def test_encode_value_types():
    frame = attr.encode({
        "s": "caf\u00e9",
        "i": 42,
        "n": -7,
        "b": b"\x00\xff",
        "ba": bytearray(b"xy"),
        "mv": memoryview(b"zz"),
        "e": b"",
    })
    assert attr.decode(frame) == {
        "s": "caf\u00e9".encode(),
        "i": b"42",
        "n": b"-7",
        "b": b"\x00\xff",
        "ba": b"xy",
        "mv": b"zz",
        "e": b"",
    }


def test_encode_keeps_order():
    names = ["z", "a", "m", "b"]
    decoded = attr.decode(attr.encode({n: n for n in names}))
    assert list(decoded) == names


@pytest.mark.parametrize("value", [True, 1.5, None, ["x"], "\ud800"])
def test_encode_rejects_bad_values(value):
    with pytest.raises(AttrError, match="attribute 'v'"):
        attr.encode({"v": value})


@pytest.mark.parametrize("name", ["", "a" * 65, "caf\u00e9", "a b", "a\n", "\x7f", "tab\t"])
def test_encode_rejects_bad_names(name):
    with pytest.raises(AttrError, match="bad attribute name"):
        attr.encode({name: b"x"})


def test_encode_accepts_longest_name():
    name = "n" * attr.MAX_NAME
    assert attr.decode(attr.encode({name: b"v"})) == {name: b"v"}


def test_encode_rejects_non_str_name():
    with pytest.raises(AttrError, match="name must be str"):
        attr.encode({b"a": b"x"})


def test_encode_rejects_empty_and_non_mapping():
    with pytest.raises(AttrError, match="empty"):
        attr.encode({})
    with pytest.raises(TypeError):
        attr.encode([("a", b"x")])


def test_encode_size_limit():
    # name_len(1) + name(1) + value_len(4) + value == MAX_FRAME exactly.
    fits = {"a": b"x" * (MAX_FRAME - 6)}
    frame = attr.encode(fits)
    assert len(frame) == 4 + MAX_FRAME
    assert attr.decode(frame) == fits
    with pytest.raises(AttrError, match="exceeds MAX_FRAME"):
        attr.encode({"a": b"x" * (MAX_FRAME - 5)})
    with pytest.raises(AttrError, match="cannot fit in a frame"):
        attr.encode({"a": b"x" * (MAX_FRAME + 1)})
    with pytest.raises(AttrError, match="exceeds MAX_FRAME"):
        attr.encode({"a": b"x" * (MAX_FRAME // 2), "b": b"y" * (MAX_FRAME // 2)})


# --- decode / decode_body -----------------------------------------------------


def test_decode_roundtrip_simple():
    attrs = {"status": b"1", "reason": b"not found"}
    assert attr.decode(attr.encode(attrs)) == attrs
    assert attr.decode_body(attr.encode(attrs)[4:]) == attrs


def test_decode_accepts_bytes_like():
    frame = attr.encode({"a": b"1"})
    assert attr.decode(bytearray(frame)) == {"a": b"1"}
    assert attr.decode(memoryview(frame)) == {"a": b"1"}
    assert attr.decode_body(memoryview(frame)[4:]) == {"a": b"1"}
    assert type(attr.decode(bytearray(frame))["a"]) is bytes


def test_decode_rejects_non_bytes():
    with pytest.raises(TypeError):
        attr.decode(5)


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_decode_bad_length(length):
    with pytest.raises(AttrError, match=f"bad frame length {length}") as info:
        attr.decode(prefix(length) + b"\x01a\x00\x00\x00\x00")
    assert info.value.recoverable is False


def test_decode_truncated():
    frame = attr.encode({"a": b"hello"})
    with pytest.raises(AttrError, match="truncated frame") as info:
        attr.decode(frame[:-1])
    assert info.value.recoverable is False
    with pytest.raises(AttrError, match="truncated frame"):
        attr.decode(frame[:2])
    with pytest.raises(AttrError, match="truncated frame"):
        attr.decode(b"")


def test_decode_extra_bytes_after_frame():
    with pytest.raises(AttrError, match="1 extra bytes after the end of the frame") as info:
        attr.decode(attr.encode({"a": b"x"}) + b"!")
    assert info.value.recoverable is False


BAD_BODIES = [
    (b"", "empty frame body"),
    (b"\x00\x00\x00\x00\x00\x00", "bad attribute name length 0"),
    (bytes((65,)) + b"a" * 65 + b"\x00\x00\x00\x00", "bad attribute name length 65"),
    (raw_attr(b"\xe9t\xe9", b"x"), "bad byte 0xe9 in attribute name"),
    (raw_attr(b"a b", b"x"), "bad byte 0x20 in attribute name"),
    (raw_attr(b"a\x01", b"x"), "bad byte 0x01 in attribute name"),
    (raw_attr(b"\x7f", b"x"), "bad byte 0x7f in attribute name"),
    (b"\x01a" + prefix(10) + b"abc", r"value of attribute 'a' \(10 bytes\) runs past the end of the body"),
    (b"\x01a" + prefix(0xFFFFFFFF), "runs past the end of the body"),
    (b"\x0aabcdefg", "runs past the end of the body"),
    (raw_attr(b"a", b"x") + b"xy", "2 trailing bytes after the last attribute"),
    (raw_attr(b"a", b"x") + b"\x01b\x00\x00\x00", "5 trailing bytes"),
    (b"\x01", "too short for an attribute"),
    (raw_attr(b"a", b"x") + raw_attr(b"b", b"y") + raw_attr(b"a", b"z"), "repeated attribute 'a'"),
    (raw_attr(b"a", b"x") + b"\x00" + b"\x00" * 5, "bad attribute name length 0 at body offset 7"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES)
def test_decode_body_rejections(body, message):
    with pytest.raises(AttrError, match=message) as info:
        attr.decode_body(body)
    assert info.value.recoverable is True
    if body:
        with pytest.raises(AttrError, match=message) as info:
            attr.decode(frame_of(body))
        assert info.value.recoverable is True


def test_decode_body_too_large():
    with pytest.raises(AttrError, match="exceeds MAX_FRAME"):
        attr.decode_body(b"\x00" * (MAX_FRAME + 1))


# --- FrameDecoder ---------------------------------------------------------------


def test_decoder_split_everywhere():
    frames = [attr.encode({"n": str(i), "pad": b"p" * i}) for i in range(5)]
    stream = b"".join(frames)
    want = [attr.decode(f) for f in frames]
    for cut in range(len(stream) + 1):
        dec = attr.FrameDecoder()
        got = []
        for chunk in (stream[:cut], stream[cut:]):
            dec.feed(chunk)
            got.extend(dec.frames())
        assert got == want
        assert dec.pending == 0


def test_decoder_byte_at_a_time_pending():
    frame = attr.encode({"a": b"hello"})
    dec = attr.FrameDecoder()
    for i, byte in enumerate(frame[:-1]):
        dec.feed(bytes((byte,)))
        assert dec.next_frame() is None
        assert dec.pending == i + 1
    dec.feed(frame[-1:])
    assert dec.pending == 0
    assert dec.next_frame() == {"a": b"hello"}
    assert dec.next_frame() is None


def test_decoder_bad_body_is_recoverable():
    bad = frame_of(raw_attr(b"a", b"x") + raw_attr(b"a", b"y"))
    stream = attr.encode({"n": 1}) + bad + attr.encode({"n": 2})
    dec = attr.FrameDecoder()
    dec.feed(stream)
    items = list(dec.frames())
    assert items[0] == {"n": b"1"}
    assert isinstance(items[1], AttrError) and items[1].recoverable
    assert "repeated attribute 'a'" in str(items[1])
    assert items[2] == {"n": b"2"}
    assert not dec.failed

    dec = attr.FrameDecoder()
    dec.feed(stream)
    assert dec.next_frame() == {"n": b"1"}
    with pytest.raises(AttrError, match="repeated") as info:
        dec.next_frame()
    assert info.value.recoverable
    assert dec.next_frame() == {"n": b"2"}
    assert dec.next_frame() is None


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1])
def test_decoder_bad_length_rejected_from_prefix_alone(length):
    good = attr.encode({"a": b"x"})
    dec = attr.FrameDecoder()
    dec.feed(good + prefix(length))  # no body byte follows
    assert dec.pending == 0
    items = list(dec)
    assert items[0] == {"a": b"x"}
    assert isinstance(items[1], AttrError)
    assert items[1].recoverable is False
    assert f"bad frame length {length}" in str(items[1])
    assert dec.failed
    # Sticky: the stream is out of sync; later input is dropped.
    dec.feed(good * 3)
    assert dec.pending == 0
    assert [type(i) for i in dec.frames()] == [AttrError]
    with pytest.raises(AttrError, match="bad frame length") as info:
        dec.next_frame()
    assert info.value.recoverable is False


def test_decoder_bad_length_across_feeds():
    dec = attr.FrameDecoder()
    dec.feed(prefix(MAX_FRAME + 1)[:3])
    assert dec.next_frame() is None
    dec.feed(prefix(MAX_FRAME + 1)[3:])
    with pytest.raises(AttrError, match="bad frame length"):
        dec.next_frame()


def test_decoder_memory_bound_on_max_frame():
    frame = attr.encode({"a": b"x" * (MAX_FRAME - 6)}) + attr.encode({"b": b"y"})
    dec = attr.FrameDecoder()
    got = []
    for pos in range(0, len(frame), 65536):
        dec.feed(memoryview(frame)[pos:pos + 65536])
        assert dec.pending <= 4 + MAX_FRAME
        assert len(dec._buf) <= MAX_FRAME
        got.extend(dec.frames())
    assert [list(g) for g in got] == [["a"], ["b"]]
    assert len(got[0]["a"]) == MAX_FRAME - 6
    assert dec.pending == 0


def test_decoder_feed_bytearray_copy():
    data = bytearray(attr.encode({"a": b"x"}))
    dec = attr.FrameDecoder()
    dec.feed(data[:5])
    chunk = bytearray(data[5:])
    dec.feed(chunk)
    chunk[:] = b"\x00" * len(chunk)  # caller reuses its buffer
    assert dec.next_frame() == {"a": b"x"}


# --- read_frame / write_frame ---------------------------------------------------


def test_socket_roundtrip_back_to_back(pair):
    a, b = pair
    attr.write_frame(a, {"request": "lookup", "cache_id": b"\x00id"}, 1.0)
    attr.write_frame(a, {"request": "status"}, 1.0)
    assert attr.read_frame(b, 1.0) == {"request": b"lookup", "cache_id": b"\x00id"}
    assert attr.read_frame(b, 1.0) == {"request": b"status"}


def test_read_frame_large(pair):
    a, b = pair
    big = {"a": b"x" * (MAX_FRAME - 6)}
    t = threading.Thread(target=attr.write_frame, args=(a, big, 5.0))
    t.start()
    try:
        assert attr.read_frame(b, 5.0) == big
    finally:
        t.join()


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 0xFFFFFFFF])
def test_read_frame_bad_length_before_body(pair, length):
    a, b = pair
    a.sendall(prefix(length))
    start = time.monotonic()
    with pytest.raises(AttrError, match=f"bad frame length {length}") as info:
        attr.read_frame(b, 5.0)
    assert time.monotonic() - start < 1.0
    assert info.value.recoverable is False


def test_read_frame_bad_body_stays_in_sync(pair):
    a, b = pair
    a.sendall(frame_of(raw_attr(b"a b", b"x")) + attr.encode({"ok": 1}))
    with pytest.raises(AttrError, match="bad byte 0x20") as info:
        attr.read_frame(b, 1.0)
    assert info.value.recoverable is True
    assert attr.read_frame(b, 1.0) == {"ok": b"1"}


def test_read_frame_timeout_mid_frame(pair):
    a, b = pair
    frame = attr.encode({"a": b"hello world"})
    half = len(frame) // 2
    a.sendall(frame[:half])
    start = time.monotonic()
    with pytest.raises(attr.FrameTimeoutError, match="timeout reading frame") as info:
        attr.read_frame(b, 0.2)
    elapsed = time.monotonic() - start
    assert 0.19 <= elapsed < 1.0
    assert info.value.received == half
    assert isinstance(info.value, TimeoutError)


def test_read_frame_idle_timeout_keeps_sync(pair):
    a, b = pair
    b.settimeout(3.0)
    with pytest.raises(attr.FrameTimeoutError) as info:
        attr.read_frame(b, 0.05)
    assert info.value.received == 0
    assert b.gettimeout() == 3.0  # restored
    a.sendall(attr.encode({"a": b"1"}))
    assert attr.read_frame(b, 1.0) == {"a": b"1"}
    assert b.gettimeout() == 3.0


def test_read_frame_blocking_socket_stays_blocking(pair):
    """A frame read from a socket without a timeout, at once or after a wait for the
    rest, leaves it blocking; a wait still ends at the deadline."""
    a, b = pair
    frame = attr.encode({"a": b"hello world"})
    a.sendall(frame)
    assert attr.read_frame(b, 1.0) == {"a": b"hello world"}
    assert b.gettimeout() is None
    a.sendall(frame[:3])
    t = threading.Timer(0.05, a.sendall, args=(frame[3:],))
    t.start()
    try:
        assert attr.read_frame(b, 5.0) == {"a": b"hello world"}
    finally:
        t.join()
    assert b.gettimeout() is None
    start = time.monotonic()
    with pytest.raises(attr.FrameTimeoutError) as info:
        attr.read_frame(b, 0.1)
    assert 0.09 <= time.monotonic() - start < 1.0 and info.value.received == 0
    assert b.gettimeout() is None


def test_read_frame_clean_eof(pair):
    a, b = pair
    a.close()
    with pytest.raises(attr.PeerClosedError, match="closed by peer") as info:
        attr.read_frame(b, 1.0)
    assert isinstance(info.value, ConnectionError)
    assert not isinstance(info.value, attr.TruncatedFrameError)


@pytest.mark.parametrize("cut", [1, 3, 4, 9])
def test_read_frame_eof_mid_frame(pair, cut):
    a, b = pair
    frame = attr.encode({"a": b"hello"})
    a.sendall(frame[:cut])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(attr.TruncatedFrameError, match=f"closed after {cut} bytes") as info:
        attr.read_frame(b, 1.0)
    assert info.value.received == cut
    assert not isinstance(info.value, attr.PeerClosedError)


def test_read_frame_no_timeout(pair):
    a, b = pair
    a.sendall(attr.encode({"a": b"1"}))
    assert attr.read_frame(b, None) == {"a": b"1"}


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_bad_timeout_values(pair, timeout):
    a, b = pair
    with pytest.raises(ValueError):
        attr.read_frame(b, timeout)
    with pytest.raises(ValueError):
        attr.write_frame(a, {"a": 1}, timeout)


def test_write_frame_bad_attrs_sends_nothing(pair):
    a, b = pair
    with pytest.raises(AttrError):
        attr.write_frame(a, {"bad name": b"x"}, 1.0)
    a.close()
    with pytest.raises(attr.PeerClosedError):
        attr.read_frame(b, 1.0)


def test_write_frame_timeout(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    start = time.monotonic()
    with pytest.raises(attr.FrameTimeoutError, match="timeout writing"):
        attr.write_frame(a, {"a": b"x" * (MAX_FRAME - 6)}, 0.2)  # nobody reads
    assert time.monotonic() - start < 1.0


def test_write_frame_broken_pipe(pair):
    a, b = pair
    b.close()
    with pytest.raises(BrokenPipeError):
        attr.write_frame(a, {"a": 1}, 1.0)


# --- reply_status ---------------------------------------------------------------


def test_reply_status():
    assert attr.reply_status({"status": b"0"}) == attr.STATUS_OK
    assert attr.reply_status({"status": b"1", "reason": b"no"}) == attr.STATUS_NOTFOUND
    assert attr.reply_status({"status": "3"}) == attr.STATUS_ERROR
    with pytest.raises(AttrError, match="no 'status' attribute"):
        attr.reply_status({"reason": b"x"})
    with pytest.raises(AttrError, match="unknown status"):
        attr.reply_status({"status": b"9"})
    with pytest.raises(AttrError, match="unknown status"):
        attr.reply_status({"status": b"\xff"})


def test_constants():
    assert attr.STATUSES == {"0", "1", "2", "3"}
    assert attr.REQUESTS == {"seed", "lookup", "update", "delete", "status"}
    assert attr.MAX_FRAME == 1048576


# --- AttrClient -------------------------------------------------------------------


class EchoServer:
    """Threaded UNIX-socket server replying status 0 plus the request's attributes."""

    def __init__(self, path, close_after=None, mute=False, garbage=False):
        self.path = str(path)
        self.close_after = close_after  # close each connection after N replies
        self.mute = mute  # read requests, never reply
        self.garbage = garbage  # reply with a bad length prefix
        self.accepted = 0
        self.requests = 0
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(0.02)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                self.serve(conn)

    def serve(self, conn):
        replies = 0
        while not self.stop.is_set():
            if self.close_after is not None and replies >= self.close_after:
                return
            try:
                request = attr.read_frame(conn, 0.02)
            except attr.FrameTimeoutError as exc:
                if exc.received == 0:
                    continue  # idle, still in sync: look at self.stop again
                return
            except (AttrError, OSError):
                return
            self.requests += 1
            if self.mute:
                continue
            try:
                if self.garbage:
                    conn.sendall(prefix(0))
                else:
                    attr.write_frame(conn, {**request, "status": attr.STATUS_OK}, 1.0)
            except OSError:
                return
            replies += 1

    def close(self):
        self.stop.set()
        self.thread.join(2.0)
        self.listener.close()


@pytest.fixture
def server(tmp_path):
    """Return a factory for EchoServers under tmp_path, all stopped at teardown."""
    servers = []

    def start(**kwargs):
        srv = EchoServer(tmp_path / f"s{len(servers)}", **kwargs)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()
    for srv in servers:
        assert not srv.thread.is_alive()


def test_client_lazy_connect_and_reuse(server):
    srv = server()
    with attr.AttrClient(srv.path, timeout=1.0) as clnt:
        assert not clnt.connected
        assert srv.accepted == 0
        for i in range(3):
            reply = clnt.request({"request": "lookup", "n": i})
            assert reply == {"request": b"lookup", "n": str(i).encode(), "status": b"0"}
            assert attr.reply_status(reply) == attr.STATUS_OK
        assert clnt.connected
        assert srv.accepted == 1
        assert srv.requests == 3
    assert not clnt.connected


def test_client_retries_once_after_server_close(server):
    srv = server(close_after=1)
    with attr.AttrClient(srv.path, timeout=1.0) as clnt:
        assert clnt.request({"request": "seed", "n": 1})["n"] == b"1"
        assert clnt.request({"request": "seed", "n": 2})["n"] == b"2"
        assert srv.accepted == 2
        assert srv.requests == 2


def test_client_reconnects_after_close(server):
    srv = server()
    clnt = attr.AttrClient(srv.path, timeout=1.0)
    try:
        clnt.request({"request": "status"})
        clnt.close()
        assert not clnt.connected
        clnt.request({"request": "status"})
        assert srv.accepted == 2
    finally:
        clnt.close()


def test_client_gives_up_after_one_retry(server):
    srv = server(close_after=0)  # accept, then hang up at once
    with attr.AttrClient(srv.path, timeout=1.0) as clnt:
        with pytest.raises(attr.AttrClientError, match="problem talking to server") as info:
            clnt.request({"request": "seed"})
        assert isinstance(info.value, ConnectionError)
        assert isinstance(info.value.__cause__, (ConnectionError, attr.TruncatedFrameError))
        assert info.value.path == srv.path
        assert not clnt.connected
    assert srv.accepted == 2


def test_client_timeout(server):
    srv = server(mute=True)
    start = time.monotonic()
    with attr.AttrClient(srv.path, timeout=0.15) as clnt:
        with pytest.raises(attr.AttrClientError) as info:
            clnt.request({"request": "seed"})
    assert isinstance(info.value.__cause__, attr.FrameTimeoutError)
    assert time.monotonic() - start < 1.0
    assert srv.requests == 2


def test_client_bad_reply(server):
    srv = server(garbage=True)
    with attr.AttrClient(srv.path, timeout=1.0) as clnt:
        with pytest.raises(attr.AttrClientError, match="bad frame length 0") as info:
            clnt.request({"request": "seed"})
    assert isinstance(info.value.__cause__, AttrError)
    assert srv.accepted == 2


def test_client_nothing_listening(tmp_path):
    path = tmp_path / "missing"
    with attr.AttrClient(path, timeout=1.0) as clnt:
        with pytest.raises(attr.AttrClientError, match=str(path)) as info:
            clnt.request({"request": "seed"})
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not clnt.connected


def test_client_stale_socket(tmp_path):
    path = str(tmp_path / "stale")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    with attr.AttrClient(path, timeout=1.0) as clnt:
        with pytest.raises(attr.AttrClientError) as info:
            clnt.request({"request": "seed"})
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_client_bad_request_not_sent(server):
    srv = server()
    with attr.AttrClient(srv.path, timeout=1.0) as clnt:
        with pytest.raises(AttrError, match="bad attribute name"):
            clnt.request({"": b"x"})
        assert not clnt.connected
    assert srv.accepted == 0


def test_client_threads_serialised(server):
    srv = server()
    errors = []
    with attr.AttrClient(srv.path, timeout=10.0) as clnt:

        def worker(k):
            try:
                for i in range(20):
                    reply = clnt.request({"k": k, "i": i})
                    assert reply["k"] == str(k).encode() and reply["i"] == str(i).encode()
            except Exception as exc:  # collected, asserted in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert srv.accepted == 1
    assert srv.requests == 80
