"""qmgr and DSN: NOTIFY=SUCCESS deliveries logged in trace/ID and reported at the end of
the pass ("delivered" or "relayed"), none when the next hop took NOTIFY over; the
delivery reply's action and passed attributes; the content_filter route."""

import email
import email.policy
import os
import time

import pytest

from postfix_py.lib import attr, bounce_log, deliver, maincf, msg
from postfix_py.lib import queue as Q
from postfix_py.qmgr.manager import QueueManager

HOST = "mail.example.com"


class Loop:
    def call_later(self, delay, fn):
        return None

    def cancel(self, handle):
        pass


def setup(tmp_path, rcpts, attrs=(), main=""):
    root = str(tmp_path / "queue")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub))
    (tmp_path / "main.cf").write_text(f"myhostname = {HOST}\nqueue_directory = {root}\n"
                                      "mydestination = $myhostname\n" + main)
    cfg = maincf.load(str(tmp_path))
    w = Q.QueueWriter(root)
    for name, value in attrs:
        w.add_attr(name, value)
    w.set_sender("alice@example.org")
    for address, notify in rcpts:
        w.add_recipient(address, notify)
    w.write(b"Subject: hi\n\nbody\n")
    qid = w.commit()
    calls = []
    mgr = QueueManager(cfg, root, lambda j, r: calls.append((j, r)), loop=Loop(),
                       now=time.time, maxproc={})
    return mgr, root, qid, calls


def notices(root):
    """The notifications qmgr wrote (and may have taken into active/ already)."""
    out = []
    for name, sub in [(n, s) for s in ("incoming", "active")
                      for n in os.listdir(os.path.join(root, s))]:
        path = os.path.join(root, sub, name)
        m = Q.read(path)
        out.append(email.message_from_bytes(b"".join(m.content(path)),
                                            policy=email.policy.default))
    return out


def test_success_notice_for_relayed_and_not_for_passed(tmp_path, capsys):
    msg.init_cli("qmgr")
    mgr, root, qid, calls = setup(tmp_path, [("a@remote.example", "SUCCESS"),
                                             ("b@remote.example", "SUCCESS,FAILURE"),
                                             ("c@remote.example", "")])
    mgr.start()
    ((job, request),) = calls
    assert request.recipients == ["a@remote.example", "b@remote.example",
                                  "c@remote.example"]
    ok = "250 2.0.0 Ok: queued as X"
    mgr.delivered(job, deliver.DeliveryStatus(relay="mx.remote.example[192.0.2.1]:25",
                                              results=[
        deliver.RcptResult("sent", "2.0.0", ok, "relayed"),
        deliver.RcptResult("sent", "2.0.0", ok, "relayed", passed=True),
        deliver.RcptResult("sent", "2.0.0", ok, "relayed")]))
    err = capsys.readouterr().err
    assert f"{qid}: sender delivery status notification: " in err
    assert f"{qid}: removed" in err
    assert not os.path.exists(bounce_log.path(root, bounce_log.TRACE, qid))
    (report,) = notices(root)
    assert report["Subject"] == "Successful Mail Delivery Report"
    status = report.get_payload()[1].get_payload()
    assert [g["Final-Recipient"] for g in status[1:]] == ["rfc822; a@remote.example"]
    assert status[1]["Action"] == "relayed"
    assert status[1]["Remote-MTA"] == "dns; mx.remote.example"
    mgr.close()


def test_no_notice_without_notify_success(tmp_path, capsys):
    msg.init_cli("qmgr")
    mgr, root, qid, calls = setup(tmp_path, [(f"bob@{HOST}", "FAILURE")])
    mgr.start()
    ((job, request),) = calls
    mgr.delivered(job, deliver.DeliveryStatus(relay="local", results=[
        deliver.RcptResult("sent", "2.0.0", "delivered to mailbox")]))
    assert "delivery status notification" not in capsys.readouterr().err
    assert notices(root) == []
    mgr.close()


def test_reply_action_and_passed_round_trip():
    reply = deliver.DeliveryStatus(relay="r", results=[
        deliver.RcptResult("sent", "2.0.0", "ok", "relayed", True),
        deliver.RcptResult("sent", "2.0.0", "ok"),
        deliver.RcptResult("bounced", "5.1.1", "no")])
    assert deliver.decode_reply(attr.decode(deliver.encode_reply(reply)), 3) == reply


def test_content_filter_route(tmp_path):
    msg.init_cli("qmgr")
    mgr, root, qid, calls = setup(tmp_path, [(f"bob@{HOST}", ""), ("c@remote.example", "")],
                                  attrs=[("content_filter", "scan:[127.0.0.1]:10025")])
    mgr.start()
    ((job, request),) = calls
    assert (request.transport, request.nexthop) == ("scan", "[127.0.0.1]:10025")
    assert request.recipients == [f"bob@{HOST}", "c@remote.example"]
    mgr.close()


@pytest.mark.parametrize("main, jobs", [
    # empty default_filter_nexthop: the recipient domain, $myhostname without one
    ("", {("scan", HOST): [f"bob@{HOST}", "nodomain"],
          ("scan", "remote.example"): ["c@remote.example"]}),
    ("default_filter_nexthop = [127.0.0.1]:10026\n",
     {("scan", "[127.0.0.1]:10026"): [f"bob@{HOST}", "c@remote.example", "nodomain"]}),
])
def test_content_filter_without_nexthop(tmp_path, main, jobs):
    msg.init_cli("qmgr")
    for spec in ("scan", "scan:"):
        path = tmp_path / spec.replace(":", "_")
        path.mkdir()
        mgr, root, qid, calls = setup(
            path, [(f"bob@{HOST}", ""), ("c@remote.example", ""), ("nodomain", "")],
            attrs=[("content_filter", spec)], main=main)
        mgr.start()
        assert {(r.transport, r.nexthop): r.recipients for _, r in calls} == jobs
        mgr.close()
