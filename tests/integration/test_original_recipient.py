"""The original recipient through a real instance: mail over SMTP to an alias (alias_maps)
and to a virtual_alias_maps address ends in nobody's maildir with X-Original-To: the
address of RCPT TO, and the delivery lines say `to=<final>, orig_to=<original>`, as
Postfix's; with enable_original_recipient = no neither is there."""

import glob
import os
import smtplib
from pathlib import Path

import pytest

from pfxinst import free_port, wait_for

HOST = "mail.test.example"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def mta(instance):
    instance.port = free_port()
    instance.spool = str(instance.dir / "mail")
    os.mkdir(instance.spool)
    os.chmod(instance.spool, 0o1777)
    (instance.dir / "aliases").write_text("team: nobody\n")
    (instance.dir / "virtual").write_text(f"Info@{HOST} nobody@{HOST}\n")
    instance.main.update({
        "mydestination": "$myhostname, localhost",
        "smtpd_error_sleep_time": "0s",
        "mail_spool_directory": instance.spool + "/",
        "alias_maps": f"hash:{instance.dir}/aliases",
        "alias_database": f"hash:{instance.dir}/aliases",
        "virtual_alias_maps": f"texthash:{instance.dir}/virtual",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "local unix - n n - - local",
    ]
    instance.write()
    out = instance.cmd("newaliases")
    assert out.returncode == 0, out.stderr
    return instance


def send(port, rcpt, subject):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        refused = s.sendmail("alice@example.org", [rcpt],
                             f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert refused == {}


def delivered(mta, count):
    """The header of each message in nobody's maildir, by Subject, once there are count."""
    def files():
        found = glob.glob(os.path.join(mta.spool, "nobody", "new", "*"))
        return len(found) >= count and found
    heads = {}
    for path in wait_for(files, what=f"{count} messages in nobody's maildir"):
        head = Path(path).read_text().split("\n\n", 1)[0]
        subject = next(x for x in head.split("\n") if x.startswith("Subject: "))
        heads[subject[len("Subject: "):]] = head
    return heads


def test_original_recipient_to_maildir_and_log(mta):
    mta.start()
    send(mta.port, f"team@{HOST}", "alias")
    send(mta.port, f"Info@{HOST}", "virtual")
    heads = delivered(mta, 2)
    assert heads["alias"].startswith(
        f"Return-Path: <alice@example.org>\nX-Original-To: team@{HOST}\n"
        f"Delivered-To: team@{HOST}\n")
    assert heads["virtual"].startswith(
        f"Return-Path: <alice@example.org>\nX-Original-To: Info@{HOST}\n"
        f"Delivered-To: nobody@{HOST}\n")
    log = wait_for(lambda: mta.log().count("relay=local") >= 2 and mta.log(),
                   what="two local delivery lines")
    # local logs the address the alias expanded to; qmgr gave it team@, whose original
    # is itself; cleanup's virtual alias expansion kept Info@ as the original
    assert f"to=<nobody@{HOST}>, orig_to=<team@{HOST}>, relay=local, " in log
    assert f"to=<nobody@{HOST}>, orig_to=<Info@{HOST}>, relay=local, " in log
    assert log.count("status=sent (delivered to maildir)") == 2

    mta.main["enable_original_recipient"] = "no"
    mta.reload()
    send(mta.port, f"team@{HOST}", "alias, no original")
    send(mta.port, f"Info@{HOST}", "virtual, no original")
    heads = delivered(mta, 4)
    assert heads["alias, no original"].startswith(
        f"Return-Path: <alice@example.org>\nDelivered-To: team@{HOST}\n")
    assert heads["virtual, no original"].startswith(
        f"Return-Path: <alice@example.org>\nDelivered-To: nobody@{HOST}\n")
    log = wait_for(lambda: mta.log().count("relay=local") >= 4 and mta.log(),
                   what="four local delivery lines")
    assert log.count("orig_to=") == 2
    assert log.count(f"to=<nobody@{HOST}>, relay=local, ") == 2
