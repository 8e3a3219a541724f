"""smtpd_milters and non_smtpd_milters through the real master, smtpd and pickup, against
the scripted milter of tests/milter_peer.py: the replies at each SMTP stage with Postfix's
log lines, end-of-message edits in the queue file, a milter that is down
(milter_default_action), and `-o smtpd_milters=` per service in master.cf."""

import subprocess

import pytest

from helpers import POSTFIX_PY
from milter_peer import MilterPeer, cstrings
from pfxinst import SmtpClient, free_port


@pytest.fixture
def mta(instance):
    return instance.add_smtpd()


def session(port, sender="alice@example.org", rcpt="bob@mail.test.example",
            body="Subject: milter\r\n\r\nhello\r\n"):
    """EHLO, MAIL, RCPT, DATA: the replies, up to the first refusal."""
    c = SmtpClient(port)
    out = []
    try:
        out.append(c.reply())
        out.append(c.cmd("EHLO client.test"))
        for cmd in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "DATA"):
            out.append(c.cmd(cmd))
            if not out[-1][:1] in "23":
                return out
        out.append(c.cmd(body + "."))
        c.cmd("QUIT")
    finally:
        c.close()
    return out


def test_smtpd_milter_stages_and_edits(mta):
    eom = [("h", cstrings("X-Milter", "seen")),
           ("+", cstrings("<carol@mail.test.example>")),
           ("c", b"")]
    with MilterPeer({"E": eom, "M": [("y", b"550 5.7.1 not you\0")]}) as bad_sender, \
            MilterPeer({"E": eom}) as peer:
        mta.main["smtpd_milters"] = peer.name
        mta.start()
        replies = session(mta.port)
        assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
        (m, content), = mta.queued(text=True)
        assert "X-Milter: seen\n\nhello\n" in content
        assert [r.address for r in m.recipients] == ["bob@mail.test.example",
                                                     "carol@mail.test.example"]
        macros = peer.macros("C")
        assert macros["{daemon_name}"] == "mail.test.example"
        assert macros["_"] == "localhost [127.0.0.1]"
        assert peer.macros("M")["{mail_addr}"] == "alice@example.org"
        assert peer.macros("E")["i"] == m.queue_id

        mta.main["smtpd_milters"] = bad_sender.name
        mta.reload()
        replies = session(mta.port)
        assert replies[-1] == "550 5.7.1 not you"
        log = mta.log()
        assert ("NOQUEUE: milter-reject: MAIL from localhost[127.0.0.1]: 550 5.7.1 not "
                "you; from=<alice@example.org> proto=ESMTP helo=<client.test>") in log


def test_end_of_message_reject_and_hold(mta):
    with MilterPeer({"E": [("r", b"")]}) as rejecting, \
            MilterPeer({"E": [("q", b"check me\0"), ("c", b"")]}) as holding:
        port2 = free_port()
        mta.main["smtpd_milters"] = rejecting.name
        mta.master_lines.append(f"127.0.0.1:{port2} inet n - y - - smtpd "
                                f"-o smtpd_milters={holding.name}")
        mta.start()
        assert session(mta.port)[-1] == "550 5.7.1 Command rejected"
        assert session(port2)[-1].startswith("250 2.0.0 Ok: queued as ")
        (m, _), = mta.queued("hold", text=True)
        log = mta.log()
        assert (f"{m.queue_id}: milter-hold: END-OF-MESSAGE from localhost[127.0.0.1]: "
                "check me; from=<alice@example.org> to=<bob@mail.test.example> "
                "proto=ESMTP helo=<client.test>") in log
        assert ": milter-reject: END-OF-MESSAGE from localhost[127.0.0.1]: 5.7.1 Command " \
            "rejected; from=<alice@example.org>" in log
        assert not mta.queued(text=True)


def test_milter_down_default_action(mta):
    with MilterPeer() as gone:
        name = gone.name
    port2 = free_port()
    mta.main["smtpd_milters"] = name
    mta.master_lines.append(f"127.0.0.1:{port2} inet n - y - - smtpd "
                            f"-o milter_default_action=accept")
    mta.start()
    replies = session(mta.port)
    assert replies[0].startswith("220 ")
    assert replies[-1] == "451 4.7.1 Service unavailable - try again later"
    log = mta.log()
    assert f"warning: connect to Milter service {name}: Connection refused" in log
    assert ("NOQUEUE: milter-reject: CONNECT from localhost[127.0.0.1]: 451 4.7.1 Service "
            "unavailable - try again later; proto=SMTP") in log
    assert session(port2)[-1].startswith("250 2.0.0 Ok: queued as ")


def test_non_smtpd_milters_see_local_submission(mta):
    with MilterPeer({"E": [("h", cstrings("X-Local-Milter", "yes")), ("c", b"")]}) as peer:
        mta.main["non_smtpd_milters"] = peer.name
        mta.master_lines = ["pickup unix n - y - - pickup"]
        mta.start()
        out = subprocess.run([POSTFIX_PY, "-c", str(mta.dir), "sendmail", "-f",
                              "root@mail.test.example", "bob@mail.test.example"],
                             input="Subject: local\n\nhi\n", capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        (m, content), = mta.queued(text=True)
        assert "X-Local-Milter: yes\n" in content
        ev = dict((e, d) for e, d in peer.events if e in "CHMR")
        assert ev["C"] == ["localhost", "4", "127.0.0.1"]
        assert ev["H"] == ["localhost"]
        assert ev["M"] == ["<root@mail.test.example>"]
        assert ev["R"] == ["<bob@mail.test.example>"]


def deliver_from(port, source, subject, xclient=None):
    """One message from a source address (after XCLIENT ADDR=xclient, when given)."""
    c = SmtpClient(port, source=source)
    try:
        assert c.reply().startswith("220 ")
        if xclient:
            assert c.cmd(f"XCLIENT ADDR={xclient}").startswith("220 ")
        assert c.cmd("EHLO client.test").startswith("250-")
        assert c.cmd("MAIL FROM:<alice@example.org>") == "250 2.1.0 Ok"
        assert c.cmd("RCPT TO:<bob@mail.test.example>") == "250 2.1.5 Ok"
        assert c.cmd("DATA").startswith("354 ")
        reply = c.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        c.cmd("QUIT")
    finally:
        c.close()


def test_smtpd_milter_maps_per_client_address(mta):
    """smtpd_milter_maps: the client IP address's milters replace smtpd_milters, DISABLE
    (any case) turns them off, other clients keep smtpd_milters; after XCLIENT, the new
    client address decides."""
    with MilterPeer({"E": [("h", cstrings("X-Milter", "a")), ("c", b"")]}) as a, \
            MilterPeer({"E": [("h", cstrings("X-Milter", "b")), ("c", b"")]}) as b:
        (mta.dir / "milter_map").write_text(
            f"127.0.0.2 {{ {b.name} default_action=tempfail }}\n127.0.0.3 disable\n")
        mta.main.update({"smtpd_milters": a.name,
                         "smtpd_milter_maps": f"cidr:{mta.dir}/milter_map",
                         "smtpd_authorized_xclient_hosts": "127.0.0.4"})
        mta.start()
        for source, xclient in (("127.0.0.1", None), ("127.0.0.2", None),
                                ("127.0.0.3", None), ("127.0.0.4", "127.0.0.2")):
            deliver_from(mta.port, source, f"from {source}", xclient)
        seen = {}
        for _, content in mta.queued(text=True):
            subject = content.split("Subject: ", 1)[1].split("\n", 1)[0]
            seen[subject] = [h for h in ("X-Milter: a", "X-Milter: b") if h in content]
        assert seen == {"from 127.0.0.1": ["X-Milter: a"], "from 127.0.0.2": ["X-Milter: b"],
                        "from 127.0.0.3": [], "from 127.0.0.4": ["X-Milter: b"]}
        connects = [d[2] for e, d in a.events if e == "C"], \
            [d[2] for e, d in b.events if e == "C"]
        # 127.0.0.4 met smtpd_milters' milter at its greeting, then XCLIENT's one
        assert connects == (["127.0.0.1", "127.0.0.4"], ["127.0.0.2", "127.0.0.2"])
