"""Routing and queue features through a real master, to counting SMTP sinks on loopback:
sender-dependent relayhost and default transport (lib/resolve.py), smtp_fallback_relay
(smtp/service.py), and postsuper -e / -f with qmgr's forced expiry."""

import os
import re
import smtplib
import socket

import pytest

from helpers import run
from pfxinst import wait_for
from sink import Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")


@pytest.fixture
def mta(instance):
    """smtpd, qmgr, a chrooted smtp client, error and local; main.cf set by each test."""
    instance.add_smtpd(chroot=False, queue_run_delay="1s", minimal_backoff_time="1s",
                       maximal_backoff_time="2s", smtp_connect_timeout="5s")
    instance.add_mail_spool(maildir=True)
    instance.master_lines += [
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        "error unix - - y - - error",
        "local unix - n n - - local",
    ]
    instance.tool = lambda *args: run("-c", instance.dir, *args)
    return instance


def send(port, sender, rcpts, subject) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(f"From: <{sender}>\r\nSubject: {subject}\r\n"
                            f"Message-ID: <{subject}@client.example>\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def closed_port() -> int:
    """A loopback port where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sender_dependent_relayhost_and_default_transport(mta):
    with Sink() as a, Sink() as b, Sink() as everyone:
        mta.main.update({
            "relayhost": f"[127.0.0.1]:{everyone.port}",
            "sender_dependent_relayhost_maps":
                f"inline:{{alice@a.example=[127.0.0.1]:{a.port}, "
                f"@b.example=[127.0.0.1]:{b.port}, dunno@b.example=DUNNO}}",
            "sender_dependent_default_transport_maps":
                "inline:{{carol@c.example=error:5.7.1 carol may not send out}}",
        })
        mta.start()
        q1 = send(mta.port, "alice@a.example", ["x@remote.example"], "from-alice")
        q2 = send(mta.port, "bob@b.example", ["y@remote.example"], "from-bob")
        q3 = send(mta.port, "dunno@b.example", ["z@remote.example"], "from-dunno")
        q4 = send(mta.port, "carol@c.example", ["w@remote.example"], "from-carol")
        wait_for(lambda: all(f"{q}: removed" in mta.log() for q in (q1, q2, q3, q4)),
                 timeout=30, what="four messages done")
        assert list(a.ids) == ["<from-alice@client.example>"]
        assert list(b.ids) == ["<from-bob@client.example>"]
        # DUNNO: the global relayhost; carol's transport is not smtp at all.
        ours = [i for i in everyone.ids if i and i.endswith("@client.example>")]
        assert ours == ["<from-dunno@client.example>"]      # (carol's bounce goes there too)
    log = mta.log()
    assert f"{q1}: to=<x@remote.example>, relay=127.0.0.1[127.0.0.1]:{a.port}" in log
    assert f"{q2}: to=<y@remote.example>, relay=127.0.0.1[127.0.0.1]:{b.port}" in log
    assert (f"{q4}: to=<w@remote.example>, relay=none" in log
            and "dsn=5.7.1, status=bounced (carol may not send out)" in log)


def test_fallback_relay_when_the_next_hop_is_unreachable(mta):
    dead = closed_port()
    with Sink() as fallback:
        mta.main.update({
            "transport_maps": f"inline:{{remote.example=smtp:[127.0.0.1]:{dead}}}",
            "smtp_fallback_relay": f"[127.0.0.1]:{fallback.port}",
        })
        mta.start()
        qid = send(mta.port, "alice@a.example", ["x@remote.example"], "to-fallback")
        wait_for(lambda: f"{qid}: removed" in mta.log(), timeout=30, what="delivery")
        assert list(fallback.ids) == ["<to-fallback@client.example>"]
    log = mta.log()
    assert f"connect to 127.0.0.1[127.0.0.1]:{dead}: Connection refused" in log
    assert (f"{qid}: to=<x@remote.example>, relay=127.0.0.1[127.0.0.1]:{fallback.port}, "
            in log and "status=sent (250 2.0.0 Ok: stored)" in log)


def test_unreachable_fallback_relay_defers(mta):
    dead, dead2 = closed_port(), closed_port()
    mta.main.update({"relayhost": f"[127.0.0.1]:{dead}",
                     "fallback_relay": f"[127.0.0.1]:{dead2}"})   # the Postfix 2.2 name
    mta.start()
    qid = send(mta.port, "alice@a.example", ["x@remote.example"], "nowhere")
    wait_for(lambda: f"{qid}: to=<x@remote.example>" in mta.log(), timeout=30,
             what="deferral")
    log = mta.log()
    assert f"127.0.0.1[127.0.0.1]:{dead}: Connection refused" in log
    assert (f"{qid}: to=<x@remote.example>, relay=none, " in log and
            f"status=deferred (connect to 127.0.0.1[127.0.0.1]:{dead2}: Connection refused)"
            in log)


def test_postsuper_expire_returns_deferred_mail(mta):
    dead = closed_port()
    mta.main.update({"relayhost": f"[127.0.0.1]:{dead}",
                     "minimal_backoff_time": "1h", "maximal_backoff_time": "2h"})
    mta.start()
    qid = send(mta.port, f"nobody@{mta.main['myhostname']}", ["x@remote.example"], "expire-me")
    deferred = mta.queue / "deferred" / qid
    wait_for(deferred.exists, timeout=30, what="deferred")
    # postcat -q finds it; postlog writes to the same mail log as the daemons.
    out = mta.tool("postcat", "-q", qid)
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0] == f"*** ENVELOPE RECORDS deferred/{qid} ***"
    assert f"sender: nobody@{mta.main['myhostname']}" in lines
    assert "recipient: x@remote.example" in lines and "Subject: expire-me" in lines
    assert lines[-1] == f"*** MESSAGE FILE END deferred/{qid} ***"
    assert mta.tool("postcat", "-bq", qid).stdout == "\nhello\n"
    out = mta.tool("postlog", "-p", "warning", f"about to expire {qid}")
    assert out.returncode == 0
    assert re.search(rf" postfix-py/postlog\[\d+\]: warning: about to expire {qid}$",
                     mta.log(), re.M)
    out = mta.tool("postsuper", "-e", qid)
    assert out.stderr == (f"postsuper: {qid}: expired\n"
                          "postsuper: Force-expired: 1 message\n")
    assert deferred.stat().st_mode & 0o010
    # Due in an hour: qmgr acts when it next looks at the message, here at once.
    assert mta.tool("postqueue", "-f").returncode == 0
    wait_for(lambda: f"{qid}: removed" in mta.log(), timeout=30, what="return to sender")
    log = mta.log()
    assert (f"{qid}: from=<nobody@{mta.main['myhostname']}>, status=force-expired, "
            "returned to sender") in log
    assert f"{qid}: sender non-delivery notification: " in log
    # The message held and force-expired with -f goes back without a delivery attempt.
    q2 = send(mta.port, f"nobody@{mta.main['myhostname']}", ["y@remote.example"], "held")
    wait_for(lambda: (mta.queue / "deferred" / q2).exists(), timeout=30, what="deferred")
    assert mta.tool("postsuper", "-h", q2).returncode == 0
    attempts = mta.log().count(f"{q2}: to=<y@remote.example>")
    assert mta.tool("postsuper", "-f", q2).stderr == (
        f"postsuper: {q2}: expired\npostsuper: {q2}: released from hold\n"
        "postsuper: Force-expired: 1 message\npostsuper: Released from hold: 1 message\n")
    wait_for(lambda: f"{q2}: removed" in mta.log(), timeout=30, what="second return")
    log = mta.log()
    assert log.count(f"{q2}: to=<y@remote.example>") == attempts     # no new attempt
    assert f"{q2}: from=<nobody@{mta.main['myhostname']}>, status=force-expired" in log

