"""qmgr/bounce.py and lib/bounce_log.py: the notification, byte for byte in Postfix's
layout, and the status logs."""

import email
import email.policy
import os

from postfix_py.lib import maincf
from postfix_py.lib import queue as Q
from postfix_py.lib import bounce_log
from postfix_py.qmgr import bounce
from postfix_py.lib.bounce_log import LogEntry

HOST = "ref.test.example"
ORIGINAL = (b"Received: from [127.0.0.1] (localhost [127.0.0.1])\n\tby ref.test.example\n"
            b"Subject: unknown user\n\nhello unknown\n")


def setup(tmp_path, body=ORIGINAL, sender="alice@example.org", **settings):
    conf = {"myhostname": HOST, **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub))
    w = Q.QueueWriter(root, now=1700000000.0)
    w.set_sender(sender)
    w.add_recipient("nosuchuser@localhost")
    w.write(body)
    qid = w.commit()
    path = os.path.join(root, "incoming", qid)
    return maincf.load(str(tmp_path)), root, qid, path, Q.read(path)


UNKNOWN = LogEntry("nosuchuser@localhost", 0, "5.1.1", "failed",
                   'unknown user: "nosuchuser"')


def test_notification_layout_is_postfix(tmp_path):
    cfg, root, qid, path, env = setup(tmp_path)
    now = 1795607166.0
    got = bounce.build(cfg, qid, "NEWID", env, path, [UNKNOWN], "alice@example.org",
                       postmaster=False, headers_only=False, now=now).decode()
    date, arrival = bounce.mail_date(now), bounce.mail_date(1700000000.0)
    b = f"{qid}.1795607166/{HOST}"
    stamp = __import__("time").strftime("%Y%m%d%H%M%S", __import__("time").localtime(now))
    assert got == f"""\
Received: by {HOST} (postfix-py)
\tid NEWID; {date}
Date: {date}
From: Mail Delivery System <MAILER-DAEMON@{HOST}>
Subject: Undelivered Mail Returned to Sender
To: alice@example.org
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="{b}"
Content-Transfer-Encoding: 8bit
Message-Id: <{stamp}.NEWID@{HOST}>

This is a MIME-encapsulated message.

--{b}
Content-Description: Notification
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

This is the mail system at host {HOST}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

<nosuchuser@localhost>: unknown user: "nosuchuser"

--{b}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; {HOST}
X-Postfix-Queue-ID: {qid}
X-Postfix-Sender: rfc822; alice@example.org
Arrival-Date: {arrival}

Final-Recipient: rfc822; nosuchuser@localhost
Original-Recipient: rfc822;nosuchuser@localhost
Action: failed
Status: 5.1.1
Diagnostic-Code: X-Postfix; unknown user: "nosuchuser"

--{b}
Content-Description: Undelivered Message
Content-Type: message/rfc822
Content-Transfer-Encoding: 8bit

Return-Path: <alice@example.org>
Received: from [127.0.0.1] (localhost [127.0.0.1])
\tby ref.test.example
Subject: unknown user

hello unknown

--{b}--
"""
    m = email.message_from_string(got, policy=email.policy.default)
    assert [p.get_content_type() for p in m.iter_parts()] == [
        "text/plain", "message/delivery-status", "message/rfc822"]


def test_large_message_returns_headers_only(tmp_path):
    cfg, root, qid, path, env = setup(tmp_path, body=ORIGINAL + b"x" * 100,
                                      bounce_size_limit="50")
    got = bounce.build(cfg, qid, "N", env, path, [UNKNOWN], "alice@example.org", False,
                       False, 1.0).decode()
    assert "Content-Description: Undelivered Message Headers\n" \
           "Content-Type: text/rfc822-headers\n" in got
    assert got.endswith("Subject: unknown user\n\n--" + got.rsplit("--", 2)[1] + "--\n")
    assert "hello unknown" not in got


def test_smtp_diagnostics_and_wrapping(tmp_path):
    cfg, root, qid, path, env = setup(tmp_path)
    reason = ("host mx.example.com[192.0.2.7] said: 550 5.1.1 <bob@example.com>: Recipient "
              "address rejected: User unknown in virtual mailbox table (in reply to RCPT TO "
              "command)")
    entry = LogEntry("bob@example.com", 0, "5.1.1", "failed", reason, "mx.example.com")
    got = bounce.build(cfg, qid, "N", env, path, [entry], "a@b", False, False, 1.0).decode()
    assert "Remote-MTA: dns; mx.example.com\nDiagnostic-Code: smtp; 550 5.1.1 " \
           "<bob@example.com>: Recipient address rejected:\n    User unknown in virtual " \
           "mailbox table\n" in got
    lines = bounce.line_wrap(f"<bob@example.com>: {reason}")
    assert all(len(line) <= 79 for line in lines) and len(lines) == 3
    assert all(line.startswith("    ") for line in lines[1:])
    assert " ".join(line.strip() for line in lines) == f"<bob@example.com>: {reason}"


def test_who_is_notified(tmp_path, capsys):
    cfg, root, qid, path, env = setup(tmp_path, notify_classes="bounce",
                                      bounce_notice_recipient="pm")
    sent = bounce.notify(cfg, root, qid, env, path, [UNKNOWN], now=5.0)
    assert [kind for kind, _ in sent] == ["sender", "postmaster"]
    copy = Q.read(os.path.join(root, "incoming", sent[1][1]))
    assert copy.sender == f"double-bounce@{HOST}"
    assert [r.address for r in copy.recipients] == [f"pm@{HOST}"]
    body = b"".join(copy.content(os.path.join(root, "incoming", sent[1][1])))
    assert b"Content-Type: text/rfc822-headers" in body and b"hello unknown" not in body
    assert bounce.notify(cfg, root, qid, env, path, [], now=5.0) == []
    env.sender = f"Double-Bounce@{HOST}"
    assert bounce.notify(cfg, root, qid, env, path, [UNKNOWN]) == []
    assert f"warning: {qid}: undeliverable postmaster notification discarded" in \
        capsys.readouterr().err


def test_status_logs(tmp_path):
    root = str(tmp_path)
    os.mkdir(tmp_path / "defer")
    assert bounce_log.read(root, "defer", "X") == []
    bounce_log.append(root, "defer", "X", [
        LogEntry("a@x", 10, "4.0.0", "delayed", "first\nline"),
        LogEntry("b@x", 20, "4.4.1", "delayed", "b reason", "mx[1.2.3.4]:25")])
    bounce_log.append(root, "defer", "X", [LogEntry("a@x", 10, "4.2.0", "delayed", "later")],
                      sync=False)
    with open(bounce_log.path(root, "defer", "X"), "a") as f:
        f.write("garbage without equals\n\noffset=bad\nrecipient=c@x\n\n")
    got = bounce_log.read(root, "defer", "X")
    assert [(e.recipient, e.offset, e.status, e.reason, e.relay) for e in got] == [
        ("b@x", 20, "4.4.1", "b reason", "mx[1.2.3.4]:25"),
        ("a@x", 10, "4.2.0", "later", "none"),
        ("c@x", 0, "", "", "none")]
    assert bounce_log.remove(root, "defer", "X") and not bounce_log.remove(root, "defer", "X")
    bounce_log.append(root, "defer", "X", [LogEntry("a@x", 10, "4.2.0", "delayed", "later")])
    assert bounce_log.remove(root, "defer", "X", likely=True)
    assert not bounce_log.remove(root, "defer", "X", likely=True)
    assert not bounce_log.exists(root, "defer", "X")


def dsn_setup(tmp_path, **settings):
    """A queue file with DSN: RET=HDRS, ENVID, and recipients with NOTIFY and ORCPT."""
    conf = {"myhostname": HOST, **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub))
    w = Q.QueueWriter(root, now=1700000000.0)
    w.add_attr("dsn_ret", "HDRS")
    w.add_attr("dsn_envid", "env-1")
    w.set_sender("alice@example.org")
    w.add_recipient("never@example.net", "NEVER")
    w.add_recipient("fail@example.net", "SUCCESS,FAILURE", "rfc822;Fail@Example.net")
    w.add_recipient("plain@example.net")
    w.add_recipient("delay@example.net", "DELAY")
    w.write(ORIGINAL)
    qid = w.commit()
    path = os.path.join(root, "incoming", qid)
    env = Q.read(path)
    entries = [LogEntry(r.address, r.offset, "5.1.1", "failed", "no such user")
               for r in env.recipients]
    return maincf.load(str(tmp_path)), root, qid, path, env, entries


def content(root, qid):
    path = os.path.join(root, "incoming", qid)
    return email.message_from_bytes(b"".join(Q.read(path).content(path)),
                                    policy=email.policy.default)


def recipients_reported(report):
    status = report.get_payload()[1].get_payload()
    return {g["Final-Recipient"].split("; ")[1]: g for g in status[1:]}, status[0]


def test_failure_report_honours_notify_ret_envid_orcpt(tmp_path):
    cfg, root, qid, path, env, entries = dsn_setup(tmp_path, notify_classes="bounce")
    sent = bounce.notify(cfg, root, qid, env, path, entries, now=5.0)
    assert [kind for kind, _ in sent] == ["sender", "postmaster"]
    report = content(root, sent[0][1])
    rcpts, per_message = recipients_reported(report)
    # NEVER and DELAY-only recipients are not reported to the sender
    assert sorted(rcpts) == ["fail@example.net", "plain@example.net"]
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert rcpts["fail@example.net"]["Original-Recipient"] == "rfc822;Fail@Example.net"
    assert rcpts["plain@example.net"]["Original-Recipient"] == "rfc822;plain@example.net"
    assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"   # RET=HDRS
    # the postmaster copy ignores NOTIFY
    rcpts, _ = recipients_reported(content(root, sent[1][1]))
    assert len(rcpts) == 4


def test_notify_never_sends_no_report(tmp_path):
    cfg, root, qid, path, env, entries = dsn_setup(tmp_path)
    assert bounce.notify(cfg, root, qid, env, path, [entries[0], entries[3]]) == []
    assert bounce.warn(cfg, root, qid, env, path, [entries[0], entries[1]]) == []
    sent = bounce.warn(cfg, root, qid, env, path, entries)
    rcpts, _ = recipients_reported(content(root, sent[0][1]))
    assert sorted(rcpts) == ["delay@example.net", "plain@example.net"]


def test_success_report(tmp_path, capsys):
    cfg, root, qid, path, env, _ = dsn_setup(tmp_path)
    r = env.recipients[1]
    entries = [LogEntry(r.address, r.offset, "2.0.0", "relayed",
                        "250 2.0.0 Ok: queued as X", "mx.example.net[192.0.2.1]:25")]
    sent = bounce.success(cfg, root, qid, env, path, entries, now=5.0)
    assert [kind for kind, _ in sent] == ["sender"]
    copy = Q.read(os.path.join(root, "incoming", sent[0][1]))
    assert copy.sender == "" and [x.address for x in copy.recipients] == ["alice@example.org"]
    report = content(root, sent[0][1])
    assert report["Subject"] == "Successful Mail Delivery Report"
    assert "successfully delivered" in report.get_payload()[0].get_content()
    rcpts, _ = recipients_reported(report)
    g = rcpts["fail@example.net"]
    assert (g["Action"], g["Status"], g["Remote-MTA"], g["Diagnostic-Code"]) == (
        "relayed", "2.0.0", "dns; mx.example.net", "smtp; 250 2.0.0 Ok: queued as X")
    assert report.get_payload()[2]["Content-Description"] == "Message Headers"
    env.sender = ""
    assert bounce.success(cfg, root, qid, env, path, entries) == []
    assert "not sending trace/success notification for single-bounce message" in \
        capsys.readouterr().err
