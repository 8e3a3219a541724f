"""The original recipient (Postfix's orig_rcpt) from cleanup to delivery: the queue
file's G record, the delivery request's orig.I, the orig_to= of the log line,
X-Original-To:, and the notices' "(expanded from <o>)" and Original-Recipient."""

from __future__ import annotations

import email
import email.policy
import os

from postfix_py.lib import attr, cleanup, deliver, mailbox, maincf
from postfix_py.lib import queue as Q
from postfix_py.lib.bounce_log import LogEntry
from postfix_py.qmgr import bounce

HOST = "mx.test.example"


def _root(tmp_path, **settings):
    conf = {"myhostname": HOST, "mydestination": "$myhostname, localhost", **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items())
                                      .replace("@DIR@", str(tmp_path)))
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    return maincf.load(str(tmp_path)), root


def _write(root, rcpts):
    w = Q.QueueWriter(root, now=1700000000.0)
    w.set_sender("alice@example.org")
    for args in rcpts:
        w.add_recipient(*args)
    w.write(b"Subject: x\n\nbody\n")
    qid = w.commit()
    path = os.path.join(root, "incoming", qid)
    return qid, path, Q.read(path)


def test_queue_record_round_trip_and_older_files(tmp_path):
    _, root = _root(tmp_path)
    qid, path, env = _write(root, [("bob@example.net", "SUCCESS", "rfc822;x@y",
                                    "alias@example.org"),
                                   ("carol@example.net", "", "", "carol@example.net"),
                                   ("dave@example.net",)])
    got = [(r.address, r.notify, r.orcpt, r.original) for r in env.recipients]
    assert got == [("bob@example.net", "SUCCESS", "rfc822;x@y", "alias@example.org"),
                   ("carol@example.net", "", "", ""), ("dave@example.net", "", "", "")]
    with open(path, "rb") as f:
        kinds = [kind for _, kind, _ in Q.records(f)]
    # one G record, for the one recipient whose original differs; before its R record
    assert kinds.count(b"G") == 1 and kinds[kinds.index(b"G") + 1] == b"R"
    # a G record is kept through mark_done: the done recipient keeps its original
    Q.mark_done(path, env.recipients[0].offset)
    r = Q.read(path).recipients[0]
    assert r.done and r.original == "alias@example.org"


def test_request_carries_originals_only_where_they_differ():
    req = deliver.Request("Q1", "active/Q1", "local", "mx.test.example", "a@x", 1.5,
                          ["b@x", "c@x", "d@x"], [10, 20, 30],
                          originals=["alias@x", "", "d@x"])
    frame = deliver.encode_request(req)
    attrs = attr.decode(frame)
    assert attrs["orig.0"] == b"alias@x" and "orig.1" not in attrs and "orig.2" not in attrs
    back = deliver.decode_request(attrs)
    assert back.originals == ["alias@x", "", ""]
    assert [back.original(i) for i in range(3)] == ["alias@x", "c@x", "d@x"]
    # no rewriting: the frame is as before (no orig.I), and the agent knows the
    # recipients are their own originals
    plain = deliver.Request("Q1", "active/Q1", "discard", "x", "a@x", 1.5, ["b@x"], [10],
                            originals=[""])
    attrs = attr.decode(deliver.encode_request(plain))
    assert not any(name.startswith("orig.") for name in attrs)
    back = deliver.decode_request(attrs)
    assert not back.originals and back.original(0) == "b@x"
    single = deliver.decode_request(attr.decode(deliver.encode_request(
        deliver.Request("Q1", "active/Q1", "local", "x", "a@x", 1.5, ["b@x"], [10],
                        originals=["Alias@x"]))))
    assert single.originals == ["Alias@x"] and single.original(0) == "Alias@x"


def test_log_line_orig_to(monkeypatch):
    lines = []
    monkeypatch.setattr(deliver.msg, "info", lines.append)
    monkeypatch.setattr(deliver.time, "time", lambda: 1000.0)
    deliver.log_delivery("Q", "bob@x", "local", 1000.0, 1000.0, "2.0.0", "sent",
                         "delivered to maildir", orig="alias@x")
    deliver.log_delivery("Q", "r@x", "mx[1.2.3.4]:25", 1000.0, 1000.0, "2.0.0", "sent",
                         "250 ok", conn_use=3, orig="R@X")      # differs by case only
    deliver.log_delivery("Q", "r@x", "none", 1000.0, 1000.0, "2.0.0", "sent", "x", orig="")
    assert lines == [
        "Q: to=<bob@x>, orig_to=<alias@x>, relay=local, delay=0, delays=0/0/0/0, "
        "dsn=2.0.0, status=sent (delivered to maildir)",
        "Q: to=<r@x>, relay=mx[1.2.3.4]:25, conn_use=3, delay=0, delays=0/0/0/0, "
        "dsn=2.0.0, status=sent (250 ok)",
        "Q: to=<r@x>, relay=none, delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (x)"]
    assert deliver.shown_original("a@x", "A@X") == "" and \
        deliver.shown_original("a@x", "b@x") == "b@x"


def _cleanup(tmp_path, rcpts, **settings):
    (tmp_path / "virt").write_text("info@example.org bob@example.net, carol@example.net\n"
                                   "sales@example.org bob@example.net\n")
    cfg, root = _root(tmp_path, virtual_alias_maps="texthash:@DIR@/virt", **settings)
    c = cleanup.Cleanup(cleanup.Settings(cfg), root, origin="client[192.0.2.1]",
                        proto="ESMTP", helo="client")
    c.set_sender("a@example.org")
    for r in rcpts:
        c.add_recipient(r)
    c.write(b"Subject: x\n\nbody\n")
    result = c.finish()
    env = Q.read(os.path.join(root, "incoming", result.queue_id))
    return [(r.address, r.original) for r in env.recipients]


def test_cleanup_records_the_address_the_client_gave(tmp_path):
    got = _cleanup(tmp_path, ["info@example.org", "sales@example.org", "dave@example.net",
                              "root"])
    # one copy per original address (Postfix's cleanup_out_recipient); an address that
    # is its own original has no G record; an unqualified one is kept as given
    assert got == [("bob@example.net", "info@example.org"),
                   ("carol@example.net", "info@example.org"),
                   ("bob@example.net", "sales@example.org"),
                   ("dave@example.net", ""), (f"root@{HOST}", "root")]


def test_cleanup_without_original_recipient(tmp_path):
    got = _cleanup(tmp_path, ["info@example.org", "sales@example.org"],
                   enable_original_recipient="no")
    assert got == [("bob@example.net", ""), ("carol@example.net", "")]


def test_added_headers():
    assert mailbox.added_headers("a@x", "Bob@x", "alias@x") == (
        b"Return-Path: <a@x>\nX-Original-To: alias@x\nDelivered-To: Bob@x\n")
    assert mailbox.added_headers("a@x", "Bob@x") == (
        b"Return-Path: <a@x>\nX-Original-To: Bob@x\nDelivered-To: Bob@x\n")
    assert mailbox.added_headers("", "bob@x", "") == (
        b"Return-Path: <>\nDelivered-To: bob@x\n")
    assert mailbox.added_headers("a@x", "bob@x", "john doe@x") == (
        b'Return-Path: <a@x>\nX-Original-To: "john doe"@x\nDelivered-To: bob@x\n')


def test_notice_names_the_original(tmp_path):
    cfg, root = _root(tmp_path)
    qid, path, env = _write(root, [("bob@example.net", "", "", "alias@example.org"),
                                   ("carol@example.net", "", "rfc822;Given@example.org",
                                    "list@example.org"),
                                   ("dave@example.net",)])
    entries = [LogEntry(r.address, r.offset, "5.1.1", "failed", "unknown user")
               for r in env.recipients]
    text = bounce.build(cfg, qid, "NEWID", env, path, entries, "alice@example.org",
                        postmaster=False, headers_only=False, now=1700000100.0).decode()
    assert "<bob@example.net> (expanded from <alias@example.org>): unknown user" in text
    assert "<carol@example.net> (expanded from <list@example.org>): unknown user" in text
    assert "\n<dave@example.net>: unknown user" in text
    report = email.message_from_string(text, policy=email.policy.compat32)
    groups = report.get_payload()[1].get_payload()[1:]
    assert [g["Original-Recipient"] for g in groups] == [
        "rfc822;alias@example.org", "rfc822;Given@example.org", "rfc822;dave@example.net"]


def test_cleanup_keeps_the_clients_orcpt_apart(tmp_path):
    (tmp_path / "virt").write_text("info@example.org bob@example.net\n")
    cfg, root = _root(tmp_path, virtual_alias_maps="texthash:@DIR@/virt")
    c = cleanup.Cleanup(cleanup.Settings(cfg), root, origin="client[192.0.2.1]",
                        proto="ESMTP", helo="client")
    c.set_sender("a@example.org")
    c.add_recipient("info@example.org")
    c.add_recipient("Sales@example.org", "SUCCESS", "rfc822;Given@example.org")
    c.write(b"Subject: x\n\nbody\n")
    env = Q.read(os.path.join(root, "incoming", c.finish().queue_id))
    # the DSN ORCPT is the client's only (Postfix's dsn_orcpt); the original is apart
    assert [(r.address, r.orcpt, r.original, r.notify) for r in env.recipients] == [
        ("bob@example.net", "", "info@example.org", ""),
        ("Sales@example.org", "rfc822;Given@example.org", "", "SUCCESS")]
