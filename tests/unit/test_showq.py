"""lib/showq: Postfix's showq records in attr_print0 form, and the queue they list."""

import os

from postfix_py.lib import showq
from postfix_py.lib import queue as Q


def test_protocol_record():
    assert showq.PROTOCOL_RECORD == b"protocol\0mail_queue_list_protocol\0\0"
    assert showq.END == b"\0"


def test_message_record_bytes():
    m = {"queue_name": "deferred", "queue_id": "4XyZ", "arrival_time": 1700000000,
         "message_size": 1234, "forced_expire": True, "sender": "MAILER-DAEMON",
         "recipients": [("a@x.example", "connect refused", "o@x.example"),
                        ("b@x.example", "", "b@x.example")]}
    assert showq.message_record(m) == (
        b"queue_name\0deferred\0queue_id\0004XyZ\0time\0001700000000\0size\0001234\0"
        b"forced_expire\0001\0sender\0MAILER-DAEMON\0"
        b"recipient\0a@x.example\0reason\0connect refused\0"
        b"recipient\0b@x.example\0reason\0\0"
        b"\0")


def test_values_never_hold_a_nul():
    m = {"queue_name": "hold", "queue_id": "A", "arrival_time": 1, "message_size": 0,
         "forced_expire": False, "sender": "ev\0il\n@x", "recipients": [("r\0@x", "wh\0y", "o")]}
    fields = showq.message_record(m)[:-2].split(b"\0")
    assert len(fields) == 2 * (6 + 2)
    assert b"ev?il?@x" in fields and b"r?@x" in fields and b"wh?y" in fields


def test_messages_reads_the_queue(tmp_path):
    root = str(tmp_path)
    for sub in Q.SUBDIRS:
        os.mkdir(os.path.join(root, sub))
    w = Q.QueueWriter(root)
    w.set_sender("")
    w.add_recipient("a@x.example", "", "", "Alias@x.example")
    w.add_recipient("b c@x.example")
    w.write(b"Subject: t\n\nhello\n")
    qid = w.commit()
    os.rename(os.path.join(root, Q.INCOMING, qid), os.path.join(root, Q.HOLD, qid))
    (tmp_path / Q.DEFERRED / "notaqueuefile").write_text("junk")     # skipped, as showq does
    (m,) = showq.messages(root)
    assert (m["queue_name"], m["queue_id"], m["sender"]) == (Q.HOLD, qid, "MAILER-DAEMON")
    assert m["recipients"] == [("a@x.example", "", "Alias@x.example"),
                               ('"b c"@x.example', "", '"b c"@x.example')]
    assert m["message_size"] > 0 and m["forced_expire"] is False
