"""Address verification through the real master: smtpd's reject_unverified_recipient and
reject_unverified_sender ask the verify service, which probes through cleanup, qmgr and
the agents: the smtp client stops after RCPT at a sink that knows its users (tests/sink.py
refuses local parts ending in +bounce), local finds the account without delivering.
The probe never reaches the sink's DATA or a mailbox, and no notice is sent for it.
Probes take address_verify_relayhost (a sink of their own), normal mail relayhost; the
probe sender has a time stamp (address_verify_sender_ttl).

One instance for the module; each test uses addresses of its own, since the cache
(address_verify_map, an LMDB file in data_directory) remembers them.
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import POSTFIX_PY
from pfxinst import Instance, SmtpClient, free_port, wait_for
from sink import Sink

from postfix_py.lib import attr

UNKNOWN_AT_SINK = ("550 5.1.1 <{a}>: Recipient address rejected: User unknown")


@pytest.fixture(scope="module")
def mta():
    root = Path(tempfile.mkdtemp(prefix="pfx-verify-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root)
    sink = Sink()
    inst.probe_sink = Sink()        # address_verify_relayhost: where probes go
    chroot = "y" if os.geteuid() == 0 else "n"
    inst.port, inst.poll_port = free_port(), free_port()
    inst.defer_port, inst.dip_port = free_port(), free_port()
    inst.main.update({
        "mydestination": "$myhostname, localhost",
        "relay_domains": "remote.example, nowhere.example, datatarget.example",
        "transport_maps": "inline:{nowhere.example=nosuch:}",     # not in master.cf
        # probes to datatarget.example take a transport that ends them at DATA
        "address_verify_transport_maps": "inline:{nowhere.example=nosuch:, "
            f"datatarget.example=dataprobe:[127.0.0.1]:{inst.probe_sink.port}}}",
        "relayhost": f"[127.0.0.1]:{sink.port}",
        "address_verify_relayhost": f"[127.0.0.1]:{inst.probe_sink.port}",
        "address_verify_sender_ttl": "1h",
        "smtpd_error_sleep_time": "0s",
        "smtpd_recipient_restrictions": "reject_unauth_destination, "
                                        "reject_unverified_recipient",
        "smtpd_sender_restrictions": "reject_unverified_sender",
        "unverified_recipient_reject_code": "550",
        "address_verify_poll_count": "1",
        "address_verify_poll_delay": "1s",
        "queue_run_delay": "300s",
        "address_verify_cache_cleanup_interval": "2s",
    })
    inst.master_lines = [
        f"127.0.0.1:{inst.port} inet n - {chroot} - - smtpd",
        # the same server, waiting for the probe: Postfix's default polling
        f"127.0.0.1:{inst.poll_port} inet n - {chroot} - - smtpd"
        " -o address_verify_poll_count=8",
        # a restriction after reject_unverified_recipient that rejects everything: with
        # tempfail_action defer the 450 stands, with defer_if_permit the reject wins
        f"127.0.0.1:{inst.defer_port} inet n - {chroot} - - smtpd"
        " -o unverified_recipient_tempfail_action=defer"
        " -o {unverified_recipient_reject_reason=Address lookup failure}"
        " -o smtpd_recipient_restrictions=reject_unauth_destination,"
        "reject_unverified_recipient,reject",
        f"127.0.0.1:{inst.dip_port} inet n - {chroot} - - smtpd"
        " -o smtpd_recipient_restrictions=reject_unauth_destination,"
        "reject_unverified_recipient,reject",
        "qmgr unix n - n 300 1 qmgr",
        f"verify unix - - {chroot} - 1 verify",
        f"smtp unix - - {chroot} - - smtp",
        f"relay unix - - {chroot} - - smtp",
        f"dataprobe unix - - {chroot} - - smtp -o smtp_address_verify_target=data",
        "local unix - n n - - local",
        f"pickup unix n - {chroot} - - pickup",
    ]
    try:
        with inst.running("verify"):
            yield inst, sink
    finally:
        sink.stop()
        inst.probe_sink.stop()
        shutil.rmtree(root, ignore_errors=True)


def rcpt(port: int, address: str, sender: str = "") -> str:
    c = SmtpClient(port, timeout=30)
    try:
        assert c.reply().startswith("220")
        c.cmd("EHLO client.example")
        assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


def probed(inst, address: str, status: str) -> str:
    """The log line of the probe's result for address, once it is there."""
    def line():
        return next((l for l in inst.log().splitlines()
                     if f"to=<{address}>" in l and f"status={status} " in l), None)
    return wait_for(line, 20, what=f"probe of {address}: {status}")


def test_unknown_address_is_unverified_then_undeliverable(mta):
    inst, sink = mta
    a = "nobody+bounce@remote.example"
    assert rcpt(inst.port, a) == (f"450 4.1.1 <{a}>: Recipient address rejected: "
                                  "unverified address: Address verification in progress")
    line = probed(inst, a, "undeliverable")
    said = f"host 127.0.0.1[127.0.0.1] said: {UNKNOWN_AT_SINK.format(a=a)} " \
        "(in reply to RCPT TO command)"
    assert f"relay=127.0.0.1[127.0.0.1]:{inst.probe_sink.port}" in line and "dsn=5.1.1" in line
    assert said in line
    assert rcpt(inst.port, a) == (f"550 5.1.1 <{a}>: Recipient address rejected: "
                                  f"undeliverable address: {said}")
    log = inst.log()
    assert "non-delivery notification" not in log and "status=bounced" not in log
    assert not sink.messages            # never as far as DATA


def test_known_address_is_accepted_after_its_probe(mta):
    inst, sink = mta
    a = "known@remote.example"
    assert rcpt(inst.port, a).startswith(f"450 4.1.1 <{a}>: Recipient address rejected: "
                                         "unverified address:")
    line = probed(inst, a, "deliverable")
    assert "dsn=2.1.5" in line and "(250 2.1.5 Ok)" in line
    assert rcpt(inst.port, a) == "250 2.1.5 Ok"
    qid = re.search(r"\]: (\w+): to=", line).group(1)
    wait_for(lambda: f"{qid}: removed" in inst.log(), what="the probe removed")
    assert not sink.messages
    assert not any((inst.queue / d / qid).exists() for d in ("active", "deferred"))


def test_polling_smtpd_waits_for_the_probe(mta):
    inst, sink = mta
    a = "waited@remote.example"
    start = time.monotonic()
    assert rcpt(inst.poll_port, a) == "250 2.1.5 Ok"      # answered within the polls
    assert time.monotonic() - start >= 0.9                # after one poll delay at least
    b = "waited+bounce@remote.example"
    assert rcpt(inst.poll_port, b).startswith(
        f"550 5.1.1 <{b}>: Recipient address rejected: undeliverable address: host ")
    assert not sink.messages


def test_local_probe_finds_the_account_without_delivering(mta):
    inst, _ = mta
    ok = "nobody@localhost"
    bad = "no-such-user-vrfy@localhost"
    rcpt(inst.port, ok)
    rcpt(inst.port, bad)
    line = probed(inst, ok, "deliverable")
    assert "relay=local" in line and "(delivers to mailbox)" in line
    line = probed(inst, bad, "undeliverable")
    assert 'dsn=5.1.1' in line and '(unknown user: "no-such-user-vrfy")' in line
    assert rcpt(inst.port, ok) == "250 2.1.5 Ok"
    assert rcpt(inst.port, bad) == (f"550 5.1.1 <{bad}>: Recipient address rejected: "
                                    f'undeliverable address: unknown user: "no-such-user-vrfy"')


def test_unverified_sender(mta):
    inst, _ = mta
    s = "someone+bounce@remote.example"
    # the sender's 4XX is defer_if_permit: the reply comes at RCPT, once nothing rejects
    assert rcpt(inst.port, "nobody@localhost", sender=s) == (
        f"450 4.1.7 <{s}>: Sender address rejected: unverified address: "
        "Address verification in progress")
    probed(inst, s, "undeliverable")
    # unverified_sender_reject_code is 450: "unverified address" with the probe's text
    assert rcpt(inst.port, "nobody@localhost", sender=s).startswith(
        f"450 4.1.7 <{s}>: Sender address rejected: unverified address: host ")



def test_what_qmgr_cannot_deliver_is_reported_too(mta):
    inst, _ = mta
    a = "someone@nowhere.example"
    rcpt(inst.port, a)
    line = probed(inst, a, "undeliverable")
    assert "qmgr[" in line and "dsn=4.3.0" in line and "(mail transport unavailable)" in line
    # a temporary failure: unverified_recipient_defer_code, with the probe's text
    assert rcpt(inst.port, a) == (f"450 4.1.1 <{a}>: Recipient address rejected: "
                                  "unverified address: mail transport unavailable")
    qid = re.search(r"\]: (\w+): to=", line).group(1)
    wait_for(lambda: f"{qid}: removed" in inst.log(), what="the probe removed")
    assert not (inst.queue / "defer" / qid).exists()
    assert not (inst.queue / "deferred" / qid).exists()


def test_sendmail_bv_mails_a_report_and_delivers_nothing(mta):
    inst, sink = mta
    sink.keep_bodies = True
    bad, good, local = "bv+bounce@remote.example", "bv@remote.example", "nobody@localhost"
    out = subprocess.run([POSTFIX_PY, "-c", str(inst.dir), "sendmail", "-bv",
                          "-f", "reporter@remote.example", bad, good, local],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("Mail Delivery Status Report will be mailed to "
                          "<reporter@remote.example>.\n")
    wait_for(lambda: sink.messages, 30, what="the report at the sink")
    (msgid, rcpts, body), = sink.messages
    text = body.decode()
    assert rcpts == ["reporter@remote.example"]
    assert "Subject: Mail Delivery Status Report" in text
    assert "Enclosed is the mail delivery report that you requested." in text
    for address, action in ((bad, "undeliverable"), (good, "deliverable"),
                            (local, "deliverable")):
        assert f"Final-Recipient: rfc822; {address}\nOriginal-Recipient: rfc822;{address}\n" \
            f"Action: {action}" in text.replace("\r\n", "\n")
    assert "Subject: probe" in text                 # the probe's headers, returned
    log = inst.log()
    assert re.search(rf"to=<{re.escape(local)}>, relay=local, .*status=deliverable "
                     r"\(delivers to mailbox\)", log)
    assert "sender delivery status notification:" in log
    assert f"to=<{bad}>" in log and "non-delivery notification" not in log
    qid = re.search(r"pickup\[\d+\]: (\w+): uid=\d+ from=<reporter@remote.example>",
                    log).group(1)
    wait_for(lambda: f"{qid}: removed" in inst.log(), what="the -bv message removed")
    # sendmail -bv tells the user, not the verify service: no cache entry for bv@
    assert rcpt(inst.port, good).startswith(f"450 4.1.1 <{good}>: Recipient address "
                                            "rejected: unverified address: Address "
                                            "verification in progress")


def test_a_local_user_cannot_inject_a_verify_service_probe(mta):
    """pickup takes sendmail -bv's trace_flags (512) only: a probe of the verify service
    (256) would let a local user write the verify cache."""
    inst, _ = mta
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(inst.queue / "public" / "pickup"))
        for frame in ({"request": "submit", "sender": "", "trace_flags": "256"},
                      {"rcpt": "forged@remote.example"}, {"data": b"Subject: x\n"},
                      {"end": "1"}):
            attr.write_frame(sock, frame, 10)
        reply = attr.read_frame(sock, 10)
    assert reply["status"] == b"2" and reply["reason"] == b"5.5.4 Error: bad trace_flags"
    wait_for(lambda: "local submission refused: 5.5.4 Error: bad trace_flags" in inst.log(),
             what="pickup's warning")
    assert "to=<forged@remote.example>" not in inst.log()


def test_tempfail_action_and_reject_reason(mta):
    inst, _ = mta
    a = "tempfail@remote.example"
    assert rcpt(inst.dip_port, a) == (f"554 5.7.1 <{a}>: Recipient address rejected: "
                                      "Access denied")     # defer_if_permit: reject wins
    assert rcpt(inst.defer_port, a) == (f"450 4.1.1 <{a}>: Recipient address rejected: "
                                        "unverified address: Address lookup failure")


def test_the_cache_is_swept(mta):
    inst, _ = mta
    ref = f"btree:{inst.main['data_directory']}/verify_cache"
    pattern = re.compile(rf"verify\[\d+\]: cache {re.escape(ref)} full cleanup: "
                         r"retained=(\d+) dropped=(\d+) entries")

    def swept_some():       # nothing has expired with the default times: none dropped
        return [r for r, d in pattern.findall(inst.log()) if int(r) > 0 and d == "0"]
    wait_for(swept_some, 10, what="a cache cleanup run over the entries")


def _stamp(epoch: int) -> str:
    """Postfix's time stamp of address_verify_sender_ttl: base 31 in 0-9 and B-Z."""
    digits = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
    text = ""
    while epoch:
        epoch, d = divmod(epoch, 31)
        text = digits[d] + text
    return text


def test_probes_take_address_verify_relayhost_with_a_time_stamped_sender(mta):
    inst, sink = mta
    a = "routed@remote.example"
    assert rcpt(inst.port, a).startswith("450 4.1.1")
    line = probed(inst, a, "deliverable")
    assert f"relay=127.0.0.1[127.0.0.1]:{inst.probe_sink.port}" in line
    qid = re.search(r"\]: (\w+): to=", line).group(1)
    sender = re.search(rf"{qid}: from=<([^>]*)>", inst.log()).group(1)
    hour = int(time.time()) // 3600
    assert sender in (f"double-bounce{_stamp(hour)}@mail.test.example",
                      f"double-bounce{_stamp(hour - 1)}@mail.test.example")
    # normal mail to the verified address goes to relayhost, not to the probes' sink
    before = len(sink.messages)
    c = SmtpClient(inst.port, timeout=30)
    try:
        assert c.reply().startswith("220")
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<>").startswith("250")
        assert c.cmd(f"RCPT TO:<{a}>") == "250 2.1.5 Ok"
        assert c.cmd("DATA").startswith("354")
        assert c.cmd("Subject: routed\r\n\r\nhello\r\n.").startswith("250")
        c.cmd("QUIT")
    finally:
        c.close()
    wait_for(lambda: len(sink.messages) > before, 30, what="the message at relayhost")
    assert sink.messages[-1][1] == [a]
    assert not inst.probe_sink.messages


def test_our_own_probe_sender_passes_the_recipient_restrictions(mta):
    """As Postfix's smtpd (valid_verify_sender_addr): a probe of this site's MTAs, its
    time stamp within one ttl, is not rejected, so two sites cannot cache each other's
    probes as undeliverable; a stale stamp is an address as any other."""
    inst, _ = mta
    hour = int(time.time()) // 3600
    ours = f"double-bounce{_stamp(hour)}@mail.test.example"
    stale = f"double-bounce{_stamp(hour - 3)}@mail.test.example"
    assert rcpt(inst.port, ours) == "250 2.1.5 Ok"
    assert not rcpt(inst.port, stale).startswith("250")
    assert f"to=<{ours}>" not in inst.log()             # no probe for it


def test_smtp_address_verify_target_data_ends_the_probe_at_354(mta):
    inst, _ = mta
    a, b = "someone@datatarget.example", "nobody+bounce@datatarget.example"
    rcpt(inst.port, a)
    rcpt(inst.port, b)
    line = probed(inst, a, "deliverable")
    assert f"relay=127.0.0.1[127.0.0.1]:{inst.probe_sink.port}" in line
    assert "dsn=2.0.0" in line and "(354 go ahead)" in line
    line = probed(inst, b, "undeliverable")
    assert "dsn=5.1.1" in line and "(in reply to RCPT TO command)" in line
    assert rcpt(inst.port, a) == "250 2.1.5 Ok"
    assert not inst.probe_sink.messages         # the dot was never sent
