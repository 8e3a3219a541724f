"""tools/postcat.py and tools/postlog.py: Postfix's postcat layout of a postfix-py queue
file (envelope, header, body, markers, -q search, bad input) and postlog's records."""

import io
import os
import re
import time

import pytest

from postfix_py.lib import queue as Q
from postfix_py.tools import postcat, postlog

ARRIVAL = 1795607166.0
BODY = (b"Received: from client.example\n\tby mail.example\nSubject: hello\n"
        b"X-Long: a\n  continued\n\nfirst body line\nSubject: not a header\nlast")


@pytest.fixture
def inst(tmp_path):
    root = tmp_path / "queue"
    for sub in Q.SUBDIRS:
        os.makedirs(root / sub)
    (tmp_path / "main.cf").write_text(f"queue_directory = {root}\n"
                                      f"maillog_file = {tmp_path / 'maillog'}\n"
                                      "syslog_name = pfx\n")
    w = Q.QueueWriter(str(root), now=ARRIVAL)
    w.add_attr("client_name", "client.example")
    w.set_sender("alice@example.org")
    w.add_recipient("bob@example.com")
    w.add_recipient("carol@example.com", original="list@example.com")
    for piece in (BODY[:7], BODY[7:60], BODY[60:]):       # lines cut across B records
        w.write(piece)
    qid = w.commit()
    os.rename(root / "incoming" / qid, root / "deferred" / qid)
    env = Q.read(str(root / "deferred" / qid))
    Q.mark_done(str(root / "deferred" / qid), env.recipients[1].offset)
    return type("Inst", (), {"dir": str(tmp_path), "root": root, "qid": qid,
                             "env": env, "log": lambda self: (tmp_path / "maillog").read_text()})()


def cat(capfdbinary, *argv, status=0):
    assert postcat.main(list(argv)) == status
    out, err = capfdbinary.readouterr()
    return out.decode(), err.decode()


def test_postcat_whole_file(inst, capfdbinary):
    out, err = cat(capfdbinary, "-c", inst.dir, "-q", inst.qid)
    name = f"deferred/{inst.qid}"
    stamp = time.asctime(time.localtime(ARRIVAL))
    sizes = " ".join(f"{v:15d}" for v in (len(BODY), inst.env.content_offset, 2, 0,
                                          len(BODY), 0))
    assert err == ""
    assert out == (
        f"*** ENVELOPE RECORDS {name} ***\n"
        f"message_size: {sizes}\n"
        f"message_arrival_time: {stamp}\n"
        "named_attribute: client_name=client.example\n"
        "sender: alice@example.org\n"
        "recipient: bob@example.com\n"
        "original_recipient: list@example.com\n"
        "done_recipient: carol@example.com\n"
        f"*** MESSAGE CONTENTS {name} ***\n"
        + BODY.decode() + "\n"
        f"*** HEADER EXTRACTED {name} ***\n"
        f"*** MESSAGE FILE END {name} ***\n")


def test_postcat_parts(inst, capfdbinary):
    path = str(inst.root / "deferred" / inst.qid)
    header, body = BODY.split(b"\n\n")
    assert cat(capfdbinary, "-c", inst.dir, "-h", path)[0] == header.decode() + "\n"
    assert cat(capfdbinary, "-c", inst.dir, "-b", path)[0] == "\n" + body.decode() + "\n"
    assert cat(capfdbinary, "-c", inst.dir, "-bh", path)[0] == BODY.decode() + "\n"
    env = cat(capfdbinary, "-c", inst.dir, "-e", path)[0]
    assert env.startswith(f"*** ENVELOPE RECORDS {path} ***\n")
    assert "Subject" not in env and env.endswith(f"*** MESSAGE FILE END {path} ***\n")
    assert f"*** MESSAGE CONTENTS {path} ***\n*** HEADER EXTRACTED {path} ***\n" in env


def test_postcat_stdin_and_bad_input(inst, capfdbinary, monkeypatch, tmp_path):
    data = (inst.root / "deferred" / inst.qid).read_bytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    out, _ = cat(capfdbinary, "-c", inst.dir, "-e")
    assert out.startswith("*** ENVELOPE RECORDS stdin ***\n")
    junk = tmp_path / "junk"
    junk.write_bytes(b"From alice Mon Jan 1\n")
    path = str(inst.root / "deferred" / inst.qid)
    out, err = cat(capfdbinary, "-c", inst.dir, "-h", str(junk), path)
    assert err == f"postcat: warning: {junk}: input is not a valid queue file\n"
    assert out.startswith("Received: from client.example\n")      # the next file is shown
    cut = tmp_path / "cut"
    cut.write_bytes(data[:inst.env.content_offset + 20])
    out, err = cat(capfdbinary, "-c", inst.dir, "-e", str(cut), status=1)
    assert err == "postcat: fatal: record read error\n" and "sender: alice" in out
    assert cat(capfdbinary, "-c", inst.dir, "-q", "NOSUCH1", status=1)[1] == \
        "postcat: fatal: open queue file NOSUCH1: No such file or directory\n"
    assert cat(capfdbinary, "-c", inst.dir, "-q", "../x", status=1)[1] == \
        "postcat: fatal: bad mail queue ID: ../x\n"
    assert cat(capfdbinary, "-c", inst.dir, "-o", path, status=1)[1].endswith(
        f"postcat: fatal: {postcat.USAGE}\n")


def test_postlog(inst, capsys, monkeypatch):
    assert postlog.main(["-c", inst.dir, "backup", "done"]) == 0
    assert postlog.main(["-c", inst.dir, "-p", "Warn", "-t", "nightly\x1b", "disk", "low"]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\x07\n")))
    assert postlog.main(["-c", inst.dir, "-p", "err"]) == 0
    assert postlog.main(["-c", inst.dir, "-p", "loud", "x"]) == 1
    assert capsys.readouterr().err == 'postlog: fatal: bad severity: "loud"\n'
    lines = [re.sub(r"^\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ ", "", line)
             for line in inst.log().splitlines()]
    pid = os.getpid()
    assert lines == [f"pfx/postlog[{pid}]: backup done",
                     f"nightly?[{pid}]: warning: disk low",
                     f"pfx/postlog[{pid}]: error: one",
                     f"pfx/postlog[{pid}]: error: two?"]
