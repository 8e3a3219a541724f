"""lib/deliver.py: the delivery request's decoder (its one-go path and its rules) and
Postfix's delivery log line."""

from __future__ import annotations

import dataclasses
import math

import pytest

from postfix_py.lib import attr, deliver


def _request(n=1, flags=("conn_load", "conn_store")):
    return deliver.Request(queue_id="4C1A2000001", queue_file="active/4C1A2000001",
                           transport="discard", nexthop="example.net",
                           sender="bench@example.org", arrival=1700000000.25,
                           recipients=[f"r{i}@example.net" for i in range(n)],
                           offsets=[212 + 40 * i for i in range(n)], flags=list(flags))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("flags", [(), ("bounce",), ("conn_load", "conn_store")])
def test_request_round_trip(n, flags):
    req = _request(n, flags)
    assert deliver.decode_request(attr.decode(deliver.encode_request(req))) == req


def test_request_text_as_sent():
    attrs = attr.decode(deliver.encode_request(_request()))
    attrs["sender"] = b"\xff@x"             # not UTF-8: kept, as surrogates
    attrs["flags"] = b",bounce,,"           # empty words dropped
    attrs["offset.0"] = b" 7 "
    req = deliver.decode_request(attrs)
    assert req.sender == "\udcff@x" and req.flags == ["bounce"] and req.offsets == [7]
    attrs["arrival"] = "\u0661.5".encode()  # a Unicode digit, as float() takes it
    assert deliver.decode_request(attrs).arrival == 1.5
    attrs["arrival"] = b"nan"
    assert math.isnan(deliver.decode_request(attrs).arrival)


def test_bytes_that_are_not_utf8_cross_both_ways():
    # A decoder keeps such bytes as surrogates (above); qmgr must be able to send them
    # on (a next hop from a table, an address from a sendmail command line), and an
    # agent to answer with them (discard's reason is its next hop), as the same bytes.
    req = dataclasses.replace(_request(), nexthop="caf\udce9.example", sender="\udcff@x")
    frame = deliver.encode_request(req)
    assert b"caf\xe9.example" in frame and b"\xff@x" in frame
    assert deliver.decode_request(attr.decode(frame)) == req
    reply = deliver.DeliveryStatus(relay="none", results=[
        deliver.RcptResult("sent", "2.0.0", req.nexthop)])
    assert deliver.decode_reply(attr.decode(deliver.encode_reply(reply)), 1) == reply
    with pytest.raises(attr.AttrError, match="not encodable"):
        attr.encode({"v": "\ud800"})     # a surrogate that stands for no byte


@pytest.mark.parametrize("change, error", [
    ({"request": b"other"}, "not a delivery request"),
    ({"rcpt_count": None}, "missing attribute: rcpt_count"),
    ({"rcpt_count": b"0"}, "bad rcpt_count: '0'"),
    ({"rcpt_count": b"2"}, "bad arrival time or recipient offset"),  # no offset.1
    ({"arrival": None}, "bad arrival time or recipient offset"),
    ({"arrival": b"soon"}, "bad arrival time or recipient offset"),
    ({"offset.0": b"x"}, "bad arrival time or recipient offset"),
    ({"queue_id": None}, "missing attribute: queue_id"),
    ({"sender": None}, "missing attribute: sender"),
    ({"rcpt.0": None}, "missing attribute: rcpt.0"),
])
def test_request_errors(change, error):
    attrs = attr.decode(deliver.encode_request(_request()))
    for name, value in change.items():
        if value is None:
            del attrs[name]
        else:
            attrs[name] = value
    with pytest.raises(deliver.DeliverError) as info:
        deliver.decode_request(attrs)
    assert str(info.value) == error


def test_log_line(monkeypatch):
    lines = []
    monkeypatch.setattr(deliver.msg, "info", lines.append)
    monkeypatch.setattr(deliver.time, "time", lambda: 1000.0)
    deliver.log_delivery("Q", "r@x", "none", 1000.0, 1000.0, "2.0.0", "sent", "example.net")
    deliver.log_delivery("Q", "r@x", "mx[1.2.3.4]:25", 988.0, 990.5, "4.4.1", "deferred",
                         "lost", conn_setup=0.0456, transmit=-1.0, conn_use=2)
    deliver.log_delivery("Q", "r@x", "none", 1001.0, 1002.0, "2.0.0", "sent", "x")
    assert lines == [
        "Q: to=<r@x>, relay=none, delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (example.net)",
        "Q: to=<r@x>, relay=mx[1.2.3.4]:25, conn_use=2, delay=12, delays=2.5/9.5/0.05/0, "
        "dsn=4.4.1, status=deferred (lost)",
        "Q: to=<r@x>, relay=none, delay=0, delays=1/0/0/0, dsn=2.0.0, status=sent (x)"]
