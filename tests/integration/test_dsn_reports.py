"""DSN (RFC 3461) end to end through a real master: NOTIFY, ORCPT, RET and ENVID given at
MAIL and RCPT are kept in the queue file and honoured by qmgr's reports (qmgr/bounce.py),
which are read back from the sender's mailbox and parsed with Python's email package; and
the smtp client passes them on to a next hop that announces DSN, which then reports for
itself (no success notice from us)."""

import mailbox
import os
import smtplib

import pytest

from pfxinst import wait_for
from sink import FakeServer, Script, Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")


@pytest.fixture
def mta(instance):
    """smtpd, qmgr, a chrooted smtp client and local delivery to mbox files."""
    instance.add_smtpd(chroot=False, queue_run_delay="1s", minimal_backoff_time="1s",
                       maximal_backoff_time="2s", smtp_connect_timeout="5s")
    instance.add_mail_spool()
    instance.master_lines += [
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        "local unix - n n - - local",
    ]
    return instance


def reports(mta, user, count):
    """The first count messages of user's mbox, once they are there."""
    path = mta.dir / "mail" / user

    def messages():
        if not path.exists():
            return []
        box = mailbox.mbox(str(path), create=False)
        try:
            return [box.get_message(key) for key in box.keys()]
        finally:
            box.close()
    wait_for(lambda: len(messages()) >= count, timeout=30,
             what=f"{count} message(s) for {user}")
    return messages()


def status_groups(report):
    """The per-recipient field groups of a report's message/delivery-status part, and
    its per-message fields."""
    part = report.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    groups = part.get_payload()             # the email package parses it into blocks
    return groups[0], {g["Final-Recipient"].split(";")[1].strip(): g for g in groups[1:]}


def test_notify_success_failure_never_with_ret_hdrs_and_envid(mta):
    host = mta.main["myhostname"]
    with Sink() as sink:
        mta.main["relayhost"] = f"[127.0.0.1]:{sink.port}"
        mta.start()
        sender = f"nobody@{host}"
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.ehlo("client.example")
            assert "dsn" in s.esmtp_features
            assert s.mail(sender, ["RET=HDRS", "ENVID=env+2B123"])[0] == 250
            for rcpt, opts in [
                    ("good@remote.example",
                     ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Good@Remote.example"]),
                    ("bad+bounce@remote.example", ["NOTIFY=SUCCESS,FAILURE"]),
                    ("never+bounce@remote.example", ["NOTIFY=NEVER"]),
                    (f"daemon@{host}", ["NOTIFY=SUCCESS"]),
                    ("plain@remote.example", [])]:
                assert s.rcpt(rcpt, opts)[0] == 250, rcpt
            code, text = s.data(f"From: <{sender}>\r\nSubject: dsn test\r\n"
                                "Message-ID: <dsn-test@client.example>\r\n\r\n"
                                "the body line\r\n".encode())
            assert code == 250, text
            qid = text.decode().rsplit(" ", 1)[-1]
        got = reports(mta, "nobody", 2)
        wait_for(lambda: f"{qid}: removed" in mta.log(), timeout=30, what="removed")
    log = mta.log()
    assert f"{qid}: sender non-delivery notification: " in log
    assert f"{qid}: sender delivery status notification: " in log
    by_subject = {m["Subject"]: m for m in got}
    assert sorted(by_subject) == ["Successful Mail Delivery Report",
                                  "Undelivered Mail Returned to Sender"]

    # The failure report: only bad+bounce (never+bounce said NEVER), headers only (RET=HDRS).
    bounce = by_subject["Undelivered Mail Returned to Sender"]
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["From"] == f"Mail Delivery System <MAILER-DAEMON@{host}>"
    text, _, original = bounce.get_payload()
    assert "<bad+bounce@remote.example>:" in text.get_payload()
    assert "never+bounce" not in text.get_payload()
    per_message, rcpts = status_groups(bounce)
    assert per_message["Reporting-MTA"] == f"dns; {host}"
    assert per_message["Original-Envelope-Id"] == "env+123"
    assert per_message["X-Postfix-Queue-ID"] == qid
    assert list(rcpts) == ["bad+bounce@remote.example"]
    bad = rcpts["bad+bounce@remote.example"]
    assert bad["Action"] == "failed" and bad["Status"] == "5.1.1"
    assert bad["Original-Recipient"] == "rfc822;bad+bounce@remote.example"
    assert bad["Remote-MTA"] == "dns; 127.0.0.1"
    assert bad["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    assert original.get_content_type() == "text/rfc822-headers"
    assert "Subject: dsn test" in original.get_payload()
    assert "the body line" not in original.get_payload()

    # The success report: relayed to a server without DSN, and delivered here.
    ok = by_subject["Successful Mail Delivery Report"]
    assert ok["To"] == sender and ok["Auto-Submitted"] == "auto-replied"
    text, _, original = ok.get_payload()
    assert "successfully delivered" in text.get_payload()
    per_message, rcpts = status_groups(ok)
    assert per_message["Original-Envelope-Id"] == "env+123"
    assert sorted(rcpts) == sorted(["good@remote.example", f"daemon@{host}"])
    good = rcpts["good@remote.example"]
    assert good["Action"] == "relayed" and good["Status"] == "2.0.0"
    assert good["Original-Recipient"] == "rfc822;Good@Remote.example"
    assert good["Remote-MTA"] == "dns; 127.0.0.1"
    assert good["Diagnostic-Code"].startswith("smtp; 250")
    local = rcpts[f"daemon@{host}"]
    assert local["Action"] == "delivered" and local["Status"] == "2.0.0"
    assert local["Diagnostic-Code"].startswith("X-Postfix; delivered to")
    assert original.get_content_type() == "text/rfc822-headers"
    assert "the body line" not in original.get_payload()

    # The relay got every recipient but the refused ones; the reports did not go there.
    assert sorted(r for _, rcpts, _ in sink.messages for r in rcpts) == [
        "good@remote.example", "plain@remote.example"]


def test_dsn_is_passed_to_a_next_hop_that_announces_it(mta):
    script = Script([
        ("send", b"220 dsn.example ESMTP\r\n"),
        ("expect", r"^EHLO "),
        ("send", b"250-dsn.example\r\n250-DSN\r\n250 PIPELINING\r\n"),
        ("expect", r"^MAIL FROM:<nobody@[^>]+> ENVID=x\+2Bid RET=FULL$"),
        ("expect", r"^RCPT TO:<far@remote\.example> "
                   r"ORCPT=rfc822;Far@remote\.example NOTIFY=SUCCESS,DELAY$"),
        ("expect", r"^DATA$"),
        ("send", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
        ("data",),
        ("send", b"250 2.0.0 Ok: queued as FAR1\r\n"),
        ("expect", r"^QUIT$"),
        ("send", b"221 2.0.0 Bye\r\n"),
    ])
    with FakeServer(script) as server:
        mta.main["relayhost"] = f"[127.0.0.1]:{server.port}"
        mta.start()
        host = mta.main["myhostname"]
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.ehlo("client.example")
            assert s.mail(f"nobody@{host}", ["RET=FULL", "ENVID=x+2Bid"])[0] == 250
            assert s.rcpt("far@remote.example", ["NOTIFY=DELAY,SUCCESS",
                                                 "ORCPT=rfc822;Far@remote.example"])[0] == 250
            code, text = s.data(b"Subject: pass on\r\n\r\nhi\r\n")
            assert code == 250
            qid = text.decode().rsplit(" ", 1)[-1]
        wait_for(lambda: f"{qid}: removed" in mta.log(), timeout=30, what="delivery")
    assert script.error is None, (script.error, script.lines)
    log = mta.log()
    assert f"{qid}: to=<far@remote.example>, relay=127.0.0.1[127.0.0.1]:" in log
    assert "delivery status notification" not in log
    assert not (mta.dir / "mail" / "nobody").exists()


def test_alias_expansion_reports_expanded_once(mta):
    # Postfix's local(8): NOTIFY=SUCCESS to an alias gives one success notice with
    # Action: expanded; the addresses it expands to carry NOTIFY without SUCCESS (the
    # forwarded copy keeps FAILURE, ORCPT, ENVID and RET), so they give no notice.
    host = mta.main["myhostname"]
    (mta.dir / "aliases").write_text("team daemon, bin, far@remote.example\n")
    mta.main["alias_maps"] = f"texthash:{mta.dir}/aliases"
    script = Script([
        ("send", b"220 dsn.example ESMTP\r\n"),
        ("expect", r"^EHLO "),
        ("send", b"250-dsn.example\r\n250-DSN\r\n250 PIPELINING\r\n"),
        ("expect", rf"^MAIL FROM:<nobody@{host}> ENVID=t1 RET=HDRS$"),
        ("expect", rf"^RCPT TO:<far@remote\.example> ORCPT=rfc822;Team@{host} "
                   r"NOTIFY=FAILURE$"),
        ("expect", r"^DATA$"),
        ("send", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
        ("data",),
        ("send", b"250 2.0.0 Ok: queued as FAR2\r\n"),
        ("expect", r"^QUIT$"),
        ("send", b"221 2.0.0 Bye\r\n"),
    ])
    with FakeServer(script) as server:
        mta.main["relayhost"] = f"[127.0.0.1]:{server.port}"
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.ehlo("client.example")
            assert s.mail(f"nobody@{host}", ["RET=HDRS", "ENVID=t1"])[0] == 250
            assert s.rcpt(f"team@{host}", ["NOTIFY=SUCCESS,FAILURE",
                                           f"ORCPT=rfc822;Team@{host}"])[0] == 250
            code, text = s.data(b"Subject: to the team\r\n\r\nhello team\r\n")
            assert code == 250
            qid = text.decode().rsplit(" ", 1)[-1]
        wait_for(lambda: f"{qid}: removed" in mta.log(), timeout=30, what="delivery")
        forwarded = mta.log().split(f"{qid}: to=<team@{host}>", 1)[1].split(
            "(forwarded as ", 1)[1].split(")", 1)[0]
        wait_for(lambda: f"{forwarded}: removed" in mta.log(), timeout=30,
                 what="the forwarded copy's delivery")
    assert script.error is None, (script.error, script.lines)
    for user in ("daemon", "bin"):
        assert "hello team" in reports(mta, user, 1)[0].get_payload()
    (ok,) = reports(mta, "nobody", 1)
    assert ok["Subject"] == "Successful Mail Delivery Report"
    text, _, original = ok.get_payload()
    assert f"<team@{host}>: alias expanded" in text.get_payload()
    per_message, rcpts = status_groups(ok)
    assert per_message["Original-Envelope-Id"] == "t1"
    assert list(rcpts) == [f"team@{host}"]
    team = rcpts[f"team@{host}"]
    assert team["Action"] == "expanded" and team["Status"] == "2.0.0"
    assert team["Original-Recipient"] == f"rfc822;Team@{host}"
    assert team["Diagnostic-Code"] == "X-Postfix; alias expanded"
    assert original.get_content_type() == "text/rfc822-headers"
    log = mta.log()
    # one notice; the log lines keep the deliveries' own texts
    assert log.count("sender delivery status notification") == 1
    assert "status=sent (alias expanded)" not in log
    assert f"{qid}: to=<team@{host}>, relay=local" in log
    # the local users the alias names are logged as Postfix's local logs them
    assert f"{qid}: to=<daemon@{host}>, orig_to=<team@{host}>, relay=local" in log
