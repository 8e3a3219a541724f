"""tools/postqueue.py and tools/postsuper.py on a queue built in a test directory:
Postfix's mailq text and JSON, flush triggers, and postsuper's moves and messages."""

import json
import os
import socket
import time

import pytest

from postfix_py.lib import queue as Q
from postfix_py.lib import bounce_log
from postfix_py.lib.bounce_log import LogEntry
from postfix_py.tools import postqueue, postsuper

REASON = "connect to 127.0.0.1[127.0.0.1]:1: Connection refused"


@pytest.fixture
def inst(tmp_path):
    root = tmp_path / "queue"
    for sub in Q.SUBDIRS + ("public",):
        os.makedirs(root / sub)
    (tmp_path / "main.cf").write_text(f"queue_directory = {root}\n"
                                      f"maillog_file = {tmp_path / 'maillog'}\n")
    inst = type("Inst", (), {})()
    inst.dir, inst.root = str(tmp_path), str(root)
    inst.log = lambda: (tmp_path / "maillog").read_text() if (tmp_path / "maillog").exists() \
        else ""

    def add(queue, sender, rcpts, body=b"Subject: x\n\nbody\n", arrival=1795607166.0):
        w = Q.QueueWriter(inst.root, now=arrival)
        w.set_sender(sender)
        for r in rcpts:         # an address, or (address, its original address)
            w.add_recipient(*((r, "", "") if isinstance(r, str) else (r[0], "", "", r[1])))
        w.write(body)
        qid = w.commit()
        if queue != "incoming":
            os.rename(root / "incoming" / qid, root / queue / qid)
        return qid
    inst.add = add
    return inst


def mailq(inst, capsys, *flags):
    assert postqueue.main(["-c", inst.dir, *flags]) == 0
    return capsys.readouterr().out


def test_empty_queue(inst, capsys):
    assert mailq(inst, capsys, "-p") == "Mail queue is empty\n"
    assert mailq(inst, capsys, "-j") == ""


def test_mailq_format(inst, capsys):
    a = inst.add("deferred", "alice@example.org", ["bob@remote.example", "carol@remote.example",
                                                   "dave@other.example", "erin@x.example"],
                 body=b"x" * 2000)
    path = os.path.join(inst.root, "deferred", a)
    Q.mark_done(path, Q.read(path).recipients[3].offset)            # erin: done
    offsets = [r.offset for r in Q.read(path).recipients]
    bounce_log.append(inst.root, "defer", a, [
        LogEntry("bob@remote.example", offsets[0], "4.4.1", "delayed", REASON),
        LogEntry("carol@remote.example", offsets[1], "4.4.1", "delayed", REASON)])
    b = inst.add("hold", "", ["alice@example.org"], body=b"y" * 300)
    c = inst.add("active", "x@y", ["z@y"], body=b"z" * 0)
    when = time.asctime(time.localtime(1795607166))[:20]
    out = mailq(inst, capsys, "-p")
    assert out == (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        f"{c + '*':<11} {0:>7} {when} x@y\n"
        f"{'':41}z@y\n"
        "\n"
        f"{a:<11} {2000:>7} {when} alice@example.org\n"
        f"{'':23}({REASON})\n"
        f"{'':41}bob@remote.example\n"
        f"{'':41}carol@remote.example\n"
        f"{'':58}(reason unavailable)\n"
        f"{'':41}dave@other.example\n"
        "\n"
        f"{b + '!':<11} {300:>7} {when} MAILER-DAEMON\n"
        f"{'':41}alice@example.org\n"
        "\n"
        "-- 2 Kbytes in 3 Requests.\n")
    lines = [json.loads(line) for line in mailq(inst, capsys, "-j").splitlines()]
    assert [m["queue_name"] for m in lines] == ["active", "deferred", "hold"]
    assert lines[1] == {"queue_name": "deferred", "queue_id": a, "arrival_time": 1795607166,
                        "message_size": 2000, "forced_expire": False,
                        "sender": "alice@example.org", "recipients": [
                            {"orig_address": "bob@remote.example",
                             "address": "bob@remote.example", "delay_reason": REASON},
                            {"orig_address": "carol@remote.example",
                             "address": "carol@remote.example", "delay_reason": REASON},
                            {"orig_address": "dave@other.example",
                             "address": "dave@other.example"}]}
    assert mailq(inst, capsys, "-j").splitlines()[2].startswith(
        '{"queue_name": "hold", "queue_id": "')


def test_original_and_quoted_addresses(inst, capsys):
    # As Postfix 3.11's postqueue -j: orig_address (the queue file's original recipient,
    # else the address), then address, each quoted as showq quotes it (quote_822_local).
    a = inst.add("deferred", "alice@example.org", [
        ("bob@remote.example", "Info@alias.example"), "john doe@remote.example",
        ("a,b@remote.example", "list@alias.example")])
    (line,) = mailq(inst, capsys, "-j").splitlines()
    assert json.loads(line)["recipients"] == [
        {"orig_address": "Info@alias.example", "address": "bob@remote.example"},
        {"orig_address": '"john doe"@remote.example', "address": '"john doe"@remote.example'},
        {"orig_address": "list@alias.example", "address": '"a,b"@remote.example'}]
    assert line.endswith('"recipients": [{"orig_address": "Info@alias.example", '
                         '"address": "bob@remote.example"}, {"orig_address": '
                         '"\\"john doe\\"@remote.example", "address": '
                         '"\\"john doe\\"@remote.example"}, {"orig_address": '
                         '"list@alias.example", "address": "\\"a,b\\"@remote.example"}]}')
    out = mailq(inst, capsys, "-p").splitlines()
    assert out[1].startswith(a) and [l.strip() for l in out[2:5]] == [
        "bob@remote.example", '"john doe"@remote.example', '"a,b"@remote.example']


def listening_qmgr(inst):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(inst.root, "public", "qmgr"))
    sock.listen(5)
    return sock


def received(sock):
    conn, _ = sock.accept()
    with conn:
        return conn.recv(100)


def test_flush(inst, capsys):
    assert postqueue.main(["-c", inst.dir, "-f"]) == 69
    assert capsys.readouterr().err == \
        "postqueue: fatal: Cannot flush mail queue - mail system is down\n"
    qid = inst.add("deferred", "a@b", ["c@d.example"])
    later = time.time() + 3600
    os.utime(os.path.join(inst.root, "deferred", qid), (later, later))
    with listening_qmgr(inst) as sock:
        assert postqueue.main(["-c", inst.dir, "-f"]) == 0
        assert received(sock) == b"FA"
        assert os.stat(os.path.join(inst.root, "deferred", qid)).st_mtime <= time.time()
        other = inst.add("deferred", "a@b", ["c@e.example"])
        assert postqueue.main(["-c", inst.dir, "-i", qid]) == 0
        assert received(sock) == b"I"
        assert os.listdir(os.path.join(inst.root, "incoming")) == [qid]
        assert postqueue.main(["-c", inst.dir, "-s", "E.example"]) == 0
        assert received(sock) == b"I"
        assert sorted(os.listdir(os.path.join(inst.root, "incoming"))) == sorted([qid, other])
        assert postqueue.flush(["-c", inst.dir]) == 0
        assert received(sock) == b"FA"


def test_postqueue_usage(inst, capsys):
    for argv in ([], ["-p", "-f"], ["-x"], ["-p", "extra"]):
        assert postqueue.main(["-c", inst.dir, *argv]) == 69
        assert capsys.readouterr().err.endswith(f"postqueue: fatal: {postqueue.USAGE}\n")
    assert postqueue.main(["-c", inst.dir, "-i", "../x"]) == 69


def sup(inst, capsys, *argv, stdin=None):
    assert postsuper.main(["-c", inst.dir, *argv]) == 0
    return capsys.readouterr().err


def test_postsuper(inst, capsys, monkeypatch):
    d1 = inst.add("deferred", "a@b", ["c@d"])
    d2 = inst.add("deferred", "a@b", ["c@d"])
    i1 = inst.add("incoming", "a@b", ["c@d"])
    bounce_log.append(inst.root, "defer", d1, [LogEntry("c@d", 0, "4.0.0", "delayed", "x")])

    assert sup(inst, capsys, "-h", d1, "-h", "BAD-ID") == (
        f"postsuper: {d1}: placed on hold\npostsuper: warning: invalid mail queue id: BAD-ID\n"
        "postsuper: Placed on hold: 1 message\n")
    assert sorted(os.listdir(os.path.join(inst.root, "hold"))) == [d1]
    assert sup(inst, capsys, "-h", "ALL", "deferred") == "postsuper: Placed on hold: 1 message\n"
    assert sup(inst, capsys, "-H", "ALL") == "postsuper: Released from hold: 2 messages\n"
    assert sorted(os.listdir(os.path.join(inst.root, "deferred"))) == sorted([d1, d2])
    assert sup(inst, capsys, "-r", d1) == \
        f"postsuper: {d1}: requeued\npostsuper: Requeued: 1 message\n"
    assert not os.path.exists(bounce_log.path(inst.root, "defer", d1))
    assert sorted(os.listdir(os.path.join(inst.root, "incoming"))) == sorted([d1, i1])
    assert sup(inst, capsys, "-d", d2, "-d", "NOSUCH") == (
        f"postsuper: {d2}: removed\npostsuper: Deleted: 1 message\n")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(f"{d1}\n{i1}\n"))
    assert sup(inst, capsys, "-d", "-") == (f"postsuper: {d1}: removed\npostsuper: {i1}: "
                                            "removed\npostsuper: Deleted: 2 messages\n")
    assert sup(inst, capsys, "-d", "ALL") == "postsuper: Deleted: 0 messages\n"
    log = inst.log()
    assert f"postfix-py/postsuper[{os.getpid()}]: {d2}: removed" in log
    assert "postfix-py/postsuper" in log and "Deleted: 2 messages" in log


def test_postsuper_purge(inst, capsys):
    # -p: an old dot-file (a queue file a crash left half written) and anything that is
    # not a regular file go; a young dot-file, a message and a directory stay
    qid = inst.add("deferred", "a@b", ["c@d.example"])
    incoming = os.path.join(inst.root, "incoming")
    old, young = os.path.join(incoming, ".old"), os.path.join(incoming, ".young")
    for path in (old, young):
        with open(path, "w") as f:
            f.write("partial")
    stale = time.time() - postsuper.MAX_TEMP_AGE - 60
    os.utime(old, (stale, stale))
    os.symlink("/etc/passwd", os.path.join(incoming, "link"))
    os.mkdir(os.path.join(incoming, "subdir"))
    assert sup(inst, capsys, "-p") == ""
    assert sorted(os.listdir(incoming)) == [".young", "subdir"]
    assert os.listdir(os.path.join(inst.root, "deferred")) == [qid]


def test_postsuper_usage(inst, capsys):
    assert postsuper.main(["-c", inst.dir, "-x"]) == 1
    assert capsys.readouterr().err.endswith(f"postsuper: fatal: {postsuper.USAGE}\n")
    assert postsuper.main(["-c", inst.dir, "-d", "ALL", "nosuchqueue"]) == 1
    assert "unknown queue name: nosuchqueue" in capsys.readouterr().err


def mode(inst, queue, qid):
    return os.stat(os.path.join(inst.root, queue, qid)).st_mode & 0o7777


def test_postsuper_expire_and_force(inst, capsys):
    d1 = inst.add("deferred", "a@b", ["c@d"])
    h1 = inst.add("hold", "a@b", ["c@d"])
    h2 = inst.add("hold", "a@b", ["c@d"])
    assert mode(inst, "deferred", d1) & Q.STAT_EXPIRE == 0
    assert sup(inst, capsys, "-e", d1, "-e", h1) == (
        f"postsuper: {d1}: expired\npostsuper: {h1}: expired\n"
        "postsuper: Force-expired: 2 messages\n")
    assert mode(inst, "deferred", d1) & Q.STAT_EXPIRE and mode(inst, "hold", h1) & Q.STAT_EXPIRE
    listing = postqueue.format_mailq(postqueue.show(inst.root))
    assert f"\n{d1}# " in listing and f"\n{h1}!# " in listing and f"\n{h2}! " in listing
    assert {m["queue_id"]: m["forced_expire"] for m in postqueue.show(inst.root)} == {
        d1: True, h1: True, h2: False}
    # -e leaves a held message on hold; a second -e finds it marked already.
    assert sup(inst, capsys, "-e", h1) == "postsuper: Force-expired: 0 messages\n"
    assert sorted(os.listdir(os.path.join(inst.root, "hold"))) == sorted([h1, h2])
    # -f marks (if not yet) and releases.
    assert sup(inst, capsys, "-f", h1) == (
        f"postsuper: {h1}: released from hold\npostsuper: Force-expired: 0 messages\n"
        "postsuper: Released from hold: 1 message\n")
    assert sup(inst, capsys, "-f", "ALL") == (
        "postsuper: Force-expired: 1 message\npostsuper: Released from hold: 1 message\n")
    assert os.listdir(os.path.join(inst.root, "hold")) == []
    assert mode(inst, "deferred", h2) & Q.STAT_EXPIRE
    # -r makes it an ordinary message again, as Postfix's requeue through pickup does.
    assert sup(inst, capsys, "-r", h2).endswith("Requeued: 1 message\n")
    assert mode(inst, "incoming", h2) == 0o600
    assert sup(inst, capsys, "-e", "ALL", "incoming") == \
        "postsuper: Force-expired: 1 message\n"
    assert f"postsuper[{os.getpid()}]: {d1}: expired" in inst.log()


def test_postsuper_purge(inst, capsys):
    qid = inst.add("deferred", "a@b", ["c@d"])
    old = time.time() - 8 * 86400
    paths = {}
    for queue, name, age in (("incoming", ".4AB12C", old), ("incoming", ".4AB13D", None),
                             ("maildrop", ".tmp.1", old), ("hold", ".x", old)):
        path = os.path.join(inst.root, queue, name)
        with open(path, "wb") as f:
            f.write(b"PFXQ1\n")
        if age:
            os.utime(path, (age, age))
        paths[name] = path
    os.utime(os.path.join(inst.root, "deferred", qid), (old, old))   # a message: kept
    fifo = os.path.join(inst.root, "active", "fifo")
    os.mkfifo(fifo)
    assert sup(inst, capsys, "-p") == ""
    left = {n for n, p in paths.items() if os.path.exists(p)}
    assert left == {".4AB13D"} and not os.path.exists(fifo)
    assert os.listdir(os.path.join(inst.root, "deferred")) == [qid]
    os.utime(paths[".4AB13D"], (old, old))
    assert sup(inst, capsys, "-p", "hold") == "" and os.path.exists(paths[".4AB13D"])
    assert sup(inst, capsys) == "" and not os.path.exists(paths[".4AB13D"])   # the default
