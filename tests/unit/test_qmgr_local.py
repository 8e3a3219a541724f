"""local/: maildir and mbox writing, recipient rules and privileges of local(8), the
discard and error agents, and the agent side of lib/deliver.py (lib/delivery_agent.py).
Run as root."""

import os
import pwd
import shutil
import socket
import tempfile
from types import SimpleNamespace

import pytest

from postfix_py.lib import attr, deliver, delivery_agent, maincf, msg
from postfix_py.lib import queue as Q
from postfix_py.lib import mailbox
from postfix_py.local import discard, error
from postfix_py.local import service as local

HOST = "mail.example.com"
MESSAGE = b"Subject: hi\nFrom: a@example.org\n\nFrom the start\n>From quoted\nend\n"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def config(tmp_path, **settings):
    conf = {"myhostname": HOST, "alias_maps": "", **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    return maincf.load(str(tmp_path))


@pytest.fixture
def spool():
    """A directory every user can reach (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="local-spool-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def cli_log():
    msg.init_cli("local")


def test_maildir_delivery(tmp_path):
    headers = mailbox.added_headers("a@example.org", "Bob@Example.com")
    assert headers == (b"Return-Path: <a@example.org>\nX-Original-To: Bob@Example.com\n"
                       b"Delivered-To: Bob@Example.com\n")   # case kept, as Postfix
    path = mailbox.deliver_maildir(str(tmp_path / "Maildir") + "/", headers, MESSAGE,
                                   hostname="host", now=1700000000.25)
    name = os.path.basename(path)
    assert name.startswith("1700000000.V") and name.endswith("M250000.host")
    assert os.path.dirname(path) == str(tmp_path / "Maildir" / "new")
    with open(path, "rb") as f:
        assert f.read() == headers + MESSAGE
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []
    assert os.listdir(tmp_path / "Maildir" / "cur") == []
    second = mailbox.deliver_maildir(str(tmp_path / "Maildir") + "/", headers, MESSAGE)
    assert second != path


def test_maildir_failure_defers(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(mailbox.MailboxError) as info:
        mailbox.deliver_maildir(str(blocker) + "/", b"", MESSAGE)
    assert info.value.dsn == "4.2.0"
    assert info.value.text.startswith("maildir delivery failed: create maildir file ")


def test_mbox_delivery(tmp_path):
    path = str(tmp_path / "mbox")
    headers = mailbox.added_headers("", "bob@example.com")
    mailbox.deliver_mbox(path, "", headers, MESSAGE, now=0)
    mailbox.deliver_mbox(path, "a@example.org", headers, MESSAGE + b"no newline", now=0)
    with open(path, "rb") as f:
        data = f.read()
    first, second = data.split(b"\n\nFrom ")
    assert first.startswith(b"From MAILER-DAEMON  ") and b" 1970\nReturn-Path: <>\n" in first
    assert b"\n>From the start\n>From quoted\n" in first          # >From is not re-quoted
    assert second.startswith(b"a@example.org  ") and data.endswith(b"no newline\n\n")
    with pytest.raises(mailbox.MailboxError) as info:
        mailbox.deliver_mbox(str(tmp_path), "", headers, MESSAGE)
    assert info.value.dsn.startswith("5.2")


def test_delivered_to():
    content = b"Delivered-To: Bob@Example.com\nSubject: x\n\nDelivered-To: body@example.com\n"
    assert mailbox.delivered_to(content) == {"bob@example.com"}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@root_only
def test_recipient_rules(tmp_path, spool, capsys):
    cfg = config(tmp_path, mail_spool_directory=spool + "/", recipient_delimiter="+")
    job = local.LocalDelivery(cfg, "a@example.org", MESSAGE)
    assert job.deliver(f"nobody+tag@{HOST}") == deliver.RcptResult(
        "sent", "2.0.0", "delivered to maildir")
    (name,) = os.listdir(os.path.join(spool, "nobody", "new"))
    path = os.path.join(spool, "nobody", "new", name)
    assert os.stat(path).st_uid == pwd.getpwnam("nobody").pw_uid     # written as the user
    assert _read(path).startswith(b"Return-Path: <a@example.org>\nX-Original-To: "
                                  b"nobody+tag@mail.example.com\nDelivered-To: nobody+tag@")
    assert job.deliver(f"NoSuchUser@{HOST}") == deliver.RcptResult(
        "bounced", "5.1.1", 'unknown user: "nosuchuser"')
    assert job.deliver(f"postmaster@{HOST}") == deliver.RcptResult("sent", "2.0.0", "discarded")
    assert "warning: required alias not found: postmaster" in capsys.readouterr().err
    looped = local.LocalDelivery(cfg, "a@example.org",
                                 b"Delivered-To: nobody@mail.example.com\n\nx\n")
    assert looped.deliver(f"nobody@{HOST}") == deliver.RcptResult(
        "bounced", "5.4.6", f"mail forwarding loop for nobody@{HOST}")


@root_only
def test_mbox_in_a_root_owned_spool(tmp_path, spool):
    os.chmod(spool, 0o755)                     # not writable by users: create as root
    cfg = config(tmp_path, mail_spool_directory=spool)
    job = local.LocalDelivery(cfg, "a@example.org", MESSAGE)
    assert job.deliver(f"nobody@{HOST}").reason == "delivered to mailbox"
    st = os.stat(os.path.join(spool, "nobody"))
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam("nobody").pw_uid, 0o600)
    assert _read(os.path.join(spool, "nobody")).startswith(b"From a@example.org  ")


@root_only
def test_maildir_not_writable_by_the_user_defers(tmp_path, spool, capsys):
    os.chmod(spool, 0o755)
    cfg = config(tmp_path, mail_spool_directory=spool + "/")
    r = local.LocalDelivery(cfg, "a@example.org", MESSAGE).deliver(f"nobody@{HOST}")
    assert (r.result, r.dsn) == ("deferred", "4.2.0")
    assert "Permission denied" in r.reason
    assert "maildir access problem for UID/GID=65534/65534" in capsys.readouterr().err


@root_only
def test_any_user_and_home_mailbox(tmp_path, spool, monkeypatch):
    cfg = config(tmp_path, mail_spool_directory=spool + "/", local_delivery_any_user="yes")
    job = local.LocalDelivery(cfg, "a@example.org", MESSAGE)
    assert job.deliver(f"alice@{HOST}").result == "sent"
    assert os.stat(os.path.join(spool, "alice", "new")).st_uid == pwd.getpwnam("nobody").pw_uid
    assert job.deliver(f"../etc@{HOST}").result == "bounced"
    assert job.deliver(f".hidden@{HOST}").result == "bounced"

    home = os.path.join(spool, "home")
    os.mkdir(home)
    os.chown(home, 65534, 65534)
    real = pwd.getpwnam
    monkeypatch.setattr(local.pwd, "getpwnam", lambda name: pwd.struct_passwd(
        ("carol", "x", 65534, 65534, "", home, "/bin/sh")) if name == "carol" else real(name))
    cfg = config(tmp_path, home_mailbox="Maildir/")
    job = local.LocalDelivery(cfg, "a@example.org", MESSAGE)
    assert job.deliver(f"carol@{HOST}").reason == "delivered to maildir"
    assert len(os.listdir(os.path.join(home, "Maildir", "new"))) == 1


def _ctx(tmp_path, name="local", **settings):
    return SimpleNamespace(cfg=config(tmp_path, **settings), queue_root=str(tmp_path / "q"),
                           service=SimpleNamespace(name=name, unpriv=False, chroot=False))


def _request(queue_file="active/ABC", nexthop=HOST, rcpts=("root@" + HOST,), sender="a@b"):
    return deliver.Request(queue_id="ABC", queue_file=queue_file, transport="local",
                           nexthop=nexthop, sender=sender, arrival=1.0, recipients=list(rcpts),
                           offsets=[0] * len(rcpts))


def test_deliver_request_reads_the_queue_file(tmp_path, spool):
    ctx = _ctx(tmp_path, mail_spool_directory=spool + "/")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(ctx.queue_root, sub))
    w = Q.QueueWriter(ctx.queue_root)
    w.set_sender("a@example.org")
    w.add_recipient(f"root@{HOST}")
    w.write(MESSAGE)
    qid = w.commit()
    os.rename(os.path.join(ctx.queue_root, "incoming", qid),
              os.path.join(ctx.queue_root, "active", qid))
    relay, results = _local_deliver(_request(f"active/{qid}"), ctx)
    assert relay == "local" and results[0].result == "sent"
    (name,) = os.listdir(os.path.join(spool, "root", "new"))
    assert _read(os.path.join(spool, "root", "new", name)).endswith(MESSAGE)
    for bad in ("active/../../etc/passwd", "active/NOSUCH"):
        _, results = _local_deliver(_request(bad), ctx)
        assert results == [deliver.RcptResult("deferred", "4.3.0", "queue file read error")]


def _local_deliver(request, ctx):
    """local's deliver_request through a Report, as serve() runs it: (relay, results)."""
    report = delivery_agent.Report(request, False)
    relay = local.deliver_request(request, ctx, report)
    return relay, report.reply(relay).results


def test_discard_and_error_agents(tmp_path):
    ctx = _ctx(tmp_path)
    assert discard.deliver_request(_request(nexthop="dropped"), ctx) == (
        "none", [deliver.RcptResult("sent", "2.0.0", "dropped")])
    assert discard.deliver_request(_request(nexthop=""), ctx)[1][0].reason == "discarded"
    assert error.deliver_request(_request(nexthop="5.1.2 gone away"), ctx) == (
        "none", [deliver.RcptResult("bounced", "5.1.2", "gone away")])
    assert error.deliver_request(_request(nexthop="no such domain"), ctx)[1][0] == \
        deliver.RcptResult("bounced", "5.0.0", "no such domain")
    retry = _ctx(tmp_path, name="retry")
    assert error.deliver_request(_request(nexthop="5.1.2 gone"), retry)[1][0] == \
        deliver.RcptResult("deferred", "4.1.2", "gone")


def test_serve_one_request(tmp_path, capsys):
    ctx = _ctx(tmp_path, soft_bounce="yes")
    a, b = socket.socketpair()
    with a, b:
        a.sendall(deliver.encode_request(_request(nexthop="5.7.1 go away",
                                                  rcpts=("x@y.example", "z@y.example"))))
        error.service(b, ctx)
        reply = deliver.decode_reply(attr.read_frame(a, 5), 2)
    assert [(r.result, r.dsn) for r in reply.results] == [("deferred", "4.7.1")] * 2
    err = capsys.readouterr().err
    assert "ABC: to=<x@y.example>, relay=none, delay=" in err
    assert "dsn=4.7.1, status=deferred (go away)" in err


def test_serve_answers_a_bad_request(tmp_path, capsys):
    ctx = _ctx(tmp_path)
    a, b = socket.socketpair()
    with a, b:
        a.sendall(attr.encode({"request": "deliver", "queue_id": "X"}))
        error.service(b, ctx)
        reply = attr.read_frame(a, 5)
    assert reply["status"] == b"2" and b"missing attribute" in reply["reason"]
    assert "warning: bad delivery request" in capsys.readouterr().err


def test_serve_answers_a_broken_frame_it_can_read_past(tmp_path, capsys):
    ctx = _ctx(tmp_path)
    a, b = socket.socketpair()
    with a, b:
        # A frame whose body breaks lib/attr (a name length of 255): the stream is still
        # in step, so the agent answers status 2, as every delivery agent now does.
        body = b"\xff" * 8
        a.sendall(len(body).to_bytes(4, "big") + body)
        error.service(b, ctx)
        reply = attr.read_frame(a, 5)
    assert reply["status"] == b"2" and reply["reason"]
    assert "warning: malformed delivery request" in capsys.readouterr().err


def test_report_is_the_one_place_for_soft_bounce(tmp_path, capsys):
    request = _request(rcpts=("x@y.example", "z@y.example"))
    report = delivery_agent.Report(request, soft_bounce=True)
    assert report.record(0, "bounced", "5.1.1", "no such user", "mx[192.0.2.1]:25") == \
        deliver.RcptResult("deferred", "4.1.1", "no such user")
    assert report.record(1, "sent", "2.0.0", "ok", "none").result == "sent"
    err = capsys.readouterr().err
    assert "ABC: to=<x@y.example>, relay=mx[192.0.2.1]:25, delay=" in err
    assert "dsn=4.1.1, status=deferred (no such user)" in err
    # A recipient nobody recorded is deferred in the reply, never lost.
    unfinished = delivery_agent.Report(request, soft_bounce=False)
    unfinished.record(0, "bounced", "5.1.1", "no such user", "none")
    assert [(r.result, r.dsn) for r in unfinished.reply("none").results] == \
        [("bounced", "5.1.1"), ("deferred", "4.3.0")]
