"""qmgr, local, discard and error through the real master: mail in over SMTP, out to
maildirs and to a test-only agent (tests/programs/fake_agent.py) standing in for smtp,
with deferral, retry, bounces, expiry, restarts and the queue tools."""

import email
import email.policy
import glob
import os
import signal
import smtplib
import time
from pathlib import Path

import pytest

from helpers import run
from pfxinst import free_port, gone, wait_for
from postfix_py.lib import queue as Q

HOST = "mail.test.example"


@pytest.fixture
def mta(instance):
    """An instance with smtpd, qmgr, local, discard, error and the fake smtp agent."""
    instance.port = free_port()
    instance.spool = str(instance.dir / "mail")
    os.mkdir(instance.spool)
    os.chmod(instance.spool, 0o1777)          # local writes as each user
    instance.record = instance.dir / "fake-agent.log"
    instance.record.touch()
    os.chmod(instance.record, 0o666)          # the fake agent runs as nobody
    instance.env["FAKE_AGENT_LOG"] = str(instance.record)
    instance.main.update({
        "mydestination": "$myhostname, localhost",
        "smtpd_error_sleep_time": "0s",
        "mail_spool_directory": instance.spool + "/",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "ipc_timeout": "3s",
        "transport_retry_time": "1s",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "local unix - n n - - local",
        "discard unix - - y - - discard",     # chrooted, as conf/master.cf ships them
        "error unix - - y - - error",
        "smtp unix - - n - - python:fake_agent",
    ]
    instance.send = lambda *a, **kw: send(instance.port, *a, **kw)
    instance.files = lambda queue: sorted(
        os.path.basename(p) for p in glob.glob(str(instance.queue / queue / "*")))
    instance.tool = lambda *args: run("-c", instance.dir, *args)
    return instance


def send(port, sender, rcpts, subject="test", body="hello\r\n") -> str:
    """Submit one message over SMTP; its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = s.data(f"From: <{sender}>\r\nSubject: {subject}\r\n"
                            f"Message-ID: <{subject.replace(' ', '.')}@client.example>\r\n"
                            f"\r\n{body}".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def log_has(inst, text, timeout=15):
    return wait_for(lambda: text in inst.log(), timeout=timeout, what=repr(text))


def maildir_files(spool, user):
    return sorted(glob.glob(os.path.join(spool, user, "new", "*")))


def test_local_delivery_to_maildir(mta):
    mta.start()
    qid = mta.send("alice@example.org", [f"nobody@{HOST}"], subject="local one")
    log_has(mta, f"{qid}: removed")
    (path,) = maildir_files(mta.spool, "nobody")
    data = Path(path).read_bytes()
    head = data.split(b"\n\n", 1)[0].decode()
    assert head.startswith("Return-Path: <alice@example.org>\n"
                           f"X-Original-To: nobody@{HOST}\nDelivered-To: nobody@{HOST}\n"
                           "Received: from client.example")
    assert "Subject: local one" in head and data.endswith(b"\n\nhello\n")
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o600)   # written as the user
    assert os.listdir(os.path.join(mta.spool, "nobody", "tmp")) == []
    log = mta.log()
    assert f"{qid}: from=<alice@example.org>, size=" in log and "nrcpt=1 (queue active)" in log
    assert f"{qid}: to=<nobody@{HOST}>, relay=local, delay=" in log
    assert "dsn=2.0.0, status=sent (delivered to maildir)" in log
    assert mta.files("active") == [] and mta.files("incoming") == []


def qmgr_pids(inst):
    return [p.pid for p in inst.workers() if "postfix-py/qmgr" in " ".join(p.cmdline())]


def parse_mail(path):
    return email.message_from_bytes(Path(path).read_bytes(), policy=email.policy.default)


def test_remote_delivery_through_the_agent(mta):
    mta.start()
    qid = mta.send("alice@example.org", ["bob@remote.example", "carol@remote.example"])
    log_has(mta, f"{qid}: removed")
    log = mta.log()
    for rcpt in ("bob@remote.example", "carol@remote.example"):
        assert (f"{qid}: to=<{rcpt}>, relay=fake.example[192.0.2.1]:25, delay=") in log
    assert log.count("status=sent (250 2.0.0 Ok: queued as FAKE)") == 2
    # Same transport and next hop: one request for both recipients.
    assert mta.record.read_text().split("\n").count(f"{qid} bob@remote.example") == 1
    out = mta.tool("postqueue", "-p")
    assert (out.returncode, out.stdout) == (0, "Mail queue is empty\n")


def test_defer_retry_postqueue_and_postsuper(mta):
    mta.start()
    qid = mta.send("alice@example.org", ["defer+1@remote.example", "ok@remote.example"])
    log_has(mta, f"{qid}: to=<defer+1@remote.example>, relay=fake.example")
    wait_for(lambda: mta.files("deferred") == [qid], what="deferred file")
    out = mta.tool("postqueue", "-p").stdout.splitlines()
    assert out[0] == "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------"
    assert out[1].startswith(f"{qid} ") and out[1].endswith(" alice@example.org")
    assert out[2] == " " * (76 - 22) + "(fake: deferred as told)"
    assert out[3] == " " * 41 + "defer+1@remote.example"    # ok@ is done: not shown
    assert out[-1] == "-- 0 Kbytes in 1 Request."
    # Retried after the backoff (1 s) at the next deferred-queue scan (1 s).
    wait_for(lambda: mta.log().count(f"{qid}: from=<alice@example.org>") >= 2, what="retry")
    assert mta.record.read_text().count("ok@remote.example") == 1   # never sent twice

    wait_for(lambda: mta.files("deferred") == [qid], what="deferred again")
    out = mta.tool("postsuper", "-h", qid)
    assert out.stderr == f"postsuper: {qid}: placed on hold\npostsuper: Placed on hold: 1 message\n"
    assert mta.files("hold") == [qid]
    line = mta.tool("postqueue", "-p").stdout.splitlines()[1]
    assert line.startswith(f"{qid}! ")
    (obj,) = [__import__("json").loads(l) for l in mta.tool("postqueue", "-j").stdout.splitlines()]
    assert obj["queue_name"] == "hold" and obj["queue_id"] == qid
    assert obj["sender"] == "alice@example.org" and obj["forced_expire"] is False
    assert obj["recipients"] == [{"orig_address": "defer+1@remote.example",
                                  "address": "defer+1@remote.example",
                                  "delay_reason": "fake: deferred as told"}]
    assert mta.tool("postsuper", "-H", "ALL").stderr == \
        "postsuper: Released from hold: 1 message\n"
    assert mta.tool("postsuper", "-r", qid).stderr.startswith(f"postsuper: {qid}: requeued\n")
    wait_for(lambda: mta.files("deferred") == [qid], what="requeued and deferred")
    assert mta.tool("postqueue", "-f").returncode == 0
    # qmgr keeps moving it between deferred/ and active/: a rename may win the race.
    wait_for(lambda: mta.tool("postsuper", "-d", "ALL").stderr.endswith(
        "postsuper: Deleted: 1 message\n"), what="deleted")
    assert mta.tool("postsuper", "-d", "BOGUS-ID").stderr == (
        "postsuper: warning: invalid mail queue id: BOGUS-ID\npostsuper: Deleted: 0 messages\n")
    wait_for(lambda: mta.tool("postqueue", "-p").stdout == "Mail queue is empty\n",
             what="empty queue")
    assert not os.path.exists(mta.queue / "defer" / qid)
    assert f"postfix-py/postsuper[" in mta.log()


def test_bounce_to_sender_is_rfc3464(mta):
    mta.start()
    qid = mta.send(f"nobody@{HOST}", ["bounce+x@remote.example"], subject="will bounce")
    line = log_has(mta, f"{qid}: sender non-delivery notification: ")
    log_has(mta, f"{qid}: removed")
    wait_for(lambda: maildir_files(mta.spool, "nobody"), what="bounce in the maildir")
    (path,) = maildir_files(mta.spool, "nobody")
    m = parse_mail(path)
    assert m["Subject"] == "Undelivered Mail Returned to Sender"
    assert m["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert m["Return-Path"] == "<>" and m["Auto-Submitted"] == "auto-replied"
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "delivery-status"
    text, report, original = m.get_payload()
    body = text.get_content()
    assert body.startswith(f"This is the mail system at host {HOST}.\n\n"
                           "I'm sorry to have to inform you that your message could not\n"
                           "be delivered to one or more recipients. It's attached below.")
    assert "<bounce+x@remote.example>: host fake.example[192.0.2.1] said: 550 5.1.1" in body
    assert report.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = report.get_payload()
    assert per_msg["Reporting-MTA"] == f"dns; {HOST}" and per_msg["X-Postfix-Queue-ID"] == qid
    assert per_rcpt["Final-Recipient"] == "rfc822; bounce+x@remote.example"
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "5.1.1")
    assert per_rcpt["Remote-MTA"] == "dns; fake.example"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1 <bounce+x@remote.example>")
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "will bounce" and inner["Return-Path"] == f"<nobody@{HOST}>"
    new_id = line and mta.log().split(f"{qid}: sender non-delivery notification: ")[1].split()[0]
    assert f"{new_id}: from=<>, size=" in mta.log()


def test_bounce_of_a_bounce_goes_to_postmaster_once(mta):
    mta.main.update({"notify_classes": "resource, software, 2bounce",
                     "2bounce_notice_recipient": "bounce+pm@remote.example"})
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("", ["bounce+x@remote.example"], b"Subject: a bounce\r\n\r\nbody\r\n")
    log_has(mta, "postmaster non-delivery notification: ")
    log_has(mta, ": undeliverable postmaster notification discarded")
    wait_for(lambda: mta.log().count(": removed") == 2, what="both removed")
    # Nothing else happens: no triple bounce, no loop. A later message that qmgr has
    # finished proves it went past anything the bounces left in the queue.
    marker = mta.send("alice@example.org", ["after+x@remote.example"], subject="marker")
    log_has(mta, f"{marker}: removed")
    log = mta.log()
    assert log.count(": removed") == 3
    assert log.count("non-delivery notification") == 1
    assert f"from=<double-bounce@{HOST}>" in log
    assert mta.tool("postqueue", "-p").stdout == "Mail queue is empty\n"


def test_unknown_user_and_expiry(mta):
    mta.main.update({"maximal_queue_lifetime": "0"})
    mta.start()
    q1 = mta.send(f"nobody@{HOST}", [f"nosuch@{HOST}"], subject="unknown")
    log_has(mta, f'{q1}: to=<nosuch@{HOST}>, relay=local')
    assert 'dsn=5.1.1, status=bounced (unknown user: "nosuch")' in mta.log()
    q2 = mta.send(f"nobody@{HOST}", ["defer+9@remote.example"], subject="expires")
    log_has(mta, f"{q2}: from=<nobody@{HOST}>, status=expired, returned to sender")
    log_has(mta, f"{q2}: removed")
    wait_for(lambda: len(maildir_files(mta.spool, "nobody")) == 2, what="two bounces")
    reports = {}
    for path in maildir_files(mta.spool, "nobody"):
        m = parse_mail(path)
        per_rcpt = m.get_payload()[1].get_payload()[1]
        reports[per_rcpt["Final-Recipient"]] = (per_rcpt["Action"], per_rcpt["Status"],
                                                per_rcpt["Diagnostic-Code"])
    assert reports == {
        f"rfc822; nosuch@{HOST}": ("failed", "5.1.1", 'X-Postfix; unknown user: "nosuch"'),
        "rfc822; defer+9@remote.example": ("failed", "4.0.0",
                                           "X-Postfix; fake: deferred as told")}


def test_soft_bounce_discard_and_error(mta):
    mta.main.update({"soft_bounce": "yes",
                     "transport_maps": "inline:{discard.example=discard:dropped, "
                                       "{error.example=error:5.1.2 gone away}}"})
    mta.start()
    q1 = mta.send("alice@example.org", [f"nosuch@{HOST}", "a@discard.example",
                                        "b@error.example"])
    log_has(mta, f"{q1}: to=<a@discard.example>, relay=none")
    log_has(mta, f"{q1}: to=<b@error.example>, relay=none")
    wait_for(lambda: mta.files("deferred") == [q1], what="deferred")
    log = mta.log()
    assert 'dsn=4.1.1, status=deferred (unknown user: "nosuch")' in log
    assert "dsn=2.0.0, status=sent (dropped)" in log
    assert "dsn=4.1.2, status=deferred (gone away)" in log
    assert "non-delivery notification" not in log


def test_restart_with_mail_in_active(mta):
    mta.start()
    qid = mta.send("alice@example.org", ["slow+1@remote.example"])
    log_has(mta, f"{qid}: from=<alice@example.org>")
    (pid,) = qmgr_pids(mta)
    os.kill(pid, signal.SIGKILL)            # mid-delivery: the agent is still at it
    assert mta.files("active") == [qid]
    wait_for(lambda: gone(pid),
             what="qmgr gone")
    Q.wake(str(mta.queue), b"W")            # the master's wakeup timer would do this
    log_has(mta, f"{qid}: removed")
    deliveries = mta.record.read_text().split("\n").count(f"{qid} slow+1@remote.example")
    assert deliveries == 2                  # the crash fell between delivery and recording

    # A stop with mail in flight, then a start: delivered, once more at most.
    q2 = mta.send("alice@example.org", ["slow+2@remote.example"])
    log_has(mta, f"{q2}: from=<alice@example.org>")
    assert mta.cmd("stop").returncode == 0
    wait_for(lambda: mta.master_pid() is None, what="stopped")
    assert mta.files("active") + mta.files("incoming") == [q2]
    mta.start()
    Q.wake(str(mta.queue), b"W")
    log_has(mta, f"{q2}: removed", timeout=20)
    assert mta.files("active") == [] and mta.files("deferred") == []


def test_garbage_and_broken_agents(mta):
    mta.main.update({"transport_maps": "inline:{nowhere.example=nosuchtransport:}"})
    mta.start()
    garbage = mta.queue / "incoming" / "ABCDEF12345"
    garbage.write_bytes(b"this is not a queue file\n")
    old = time.time() - 3600
    os.utime(garbage, (old, old))
    Q.wake(str(mta.queue), b"I")
    log_has(mta, "warning: corrupt file queue incoming id ABCDEF12345")
    assert (mta.queue / "corrupt" / "ABCDEF12345").exists()
    (pid,) = qmgr_pids(mta)

    # Each failure suspends the transport for transport_retry_time (1 s); each message is
    # deleted once deferred, so that its retries do not interfere with the next case.
    cases = [("garbage", "unknown mail transport error",
              "warning: private/smtp: malformed delivery status: bad frame length"),
             ("badreply", "unknown mail transport error",
              "warning: private/smtp: malformed delivery status: reply does not match"),
             ("crash", "unknown mail transport error", "warning: private/smtp: delivery "
              "agent closed the connection without a status"),
             ("hang", "delivery agent timeout",
              "warning: private/smtp: no delivery status after 3s")]
    for mode, reason, warning in cases:
        qid = mta.send("alice@example.org", [f"{mode}+1@remote.example"])
        line = log_has(mta, f"{qid}: to=<{mode}+1@remote.example>, relay=none") and [
            l for l in mta.log().splitlines() if f"{qid}: to=<" in l][0]
        assert line.endswith(f"dsn=4.3.0, status=deferred ({reason})"), line
        assert warning in mta.log()
        wait_for(lambda: qid in mta.files("deferred"), what="deferred")
        wait_for(lambda: "Deleted: 1 message" in mta.tool("postsuper", "-d", qid).stderr,
                 what="deleted")
        time.sleep(1.1)
    assert "warning: transport smtp failure -- see a previous warning/fatal/panic" in mta.log()
    q_none = mta.send("alice@example.org", ["x@nowhere.example"])
    log_has(mta, f"{q_none}: to=<x@nowhere.example>, relay=none")
    assert "status=deferred (mail transport unavailable)" in mta.log()
    assert ("warning: connect to transport private/nosuchtransport: No such file or "
            "directory") in mta.log()
    # Still the same qmgr, and it still delivers.
    q_ok = mta.send("alice@example.org", [f"nobody@{HOST}"])
    log_has(mta, f"{q_ok}: removed")
    assert qmgr_pids(mta) == [pid]
    assert "Traceback" not in mta.log()


def test_start_recovers_a_committed_file_that_lost_its_rename(mta):
    """smtpd fsyncs the file under its dot name, then renames it (no directory fsync, as
    Postfix); a crash may lose the rename. The next start commits the complete file and
    leaves an incomplete one alone."""
    mta.start()
    assert mta.cmd("stop").returncode == 0
    wait_for(lambda: mta.master_pid() is None, what="stopped")
    incoming = mta.queue / "incoming"
    w = Q.QueueWriter(str(mta.queue))
    w.set_sender("alice@example.org")
    w.add_recipient(f"nobody@{HOST}")
    w.write(b"Subject: survived\n\nafter the crash\n")
    qid = w.commit()
    os.rename(incoming / qid, incoming / f".{qid}")     # the rename that did not survive
    os.chown(incoming / f".{qid}", 65534, 65534)        # smtpd writes as mail_owner
    partial = Q.QueueWriter(str(mta.queue))            # a file smtpd was still writing
    partial.set_sender("bob@example.org")
    partial.write(b"half a message\n")
    partial._flush()
    os.close(partial.fd)
    mta.start()
    log_has(mta, f"warning: {qid}: complete queue file recovered in incoming/ after a crash")
    log_has(mta, f"{qid}: removed")
    (path,) = maildir_files(mta.spool, "nobody")
    assert Path(path).read_bytes().endswith(b"Subject: survived\n\nafter the crash\n")
    assert os.path.exists(partial.path) and partial.id not in mta.log()
