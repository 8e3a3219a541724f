"""local(8) aliases through a real instance: an aliases file built with `postfix-py
newaliases`, mail in over SMTP, delivered by qmgr and local to mailboxes, a |command, a
/file and an :include: list (whose members come back through the queue as a new queue
file), and a command destination that allow_mail_to_commands forbids, bounced."""

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
    instance.out = instance.dir / "out"
    for d in (instance.spool, instance.out):
        os.mkdir(d)
        os.chmod(d, 0o1777)                       # written as nobody (default_privs)
    instance.main.update({
        "mydestination": "$myhostname, localhost",
        "smtpd_error_sleep_time": "0s",
        "mail_spool_directory": instance.spool + "/",
        "alias_maps": f"hash:{instance.dir}/aliases",
        "alias_database": f"hash:{instance.dir}/aliases",
        "queue_run_delay": "1s",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "local unix - n n - - local",
        "error unix - - n - - error",
        "discard unix - - n - - discard",
    ]
    return instance


def send(port, sender, rcpts, subject="test"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        refused = s.sendmail(sender, rcpts, f"From: <{sender}>\r\nSubject: {subject}\r\n"
                             f"\r\nhello\r\n".encode())
        assert refused == {}


def new_aliases(mta, text):
    (mta.dir / "aliases").write_text(text)
    mta.write()
    out = mta.cmd("newaliases")
    assert out.returncode == 0, out.stderr
    assert (mta.dir / "aliases.db").exists()


def maildir(mta, user):
    return sorted(glob.glob(os.path.join(mta.spool, user, "new", "*")))


def log_has(mta, text, timeout=15):
    return wait_for(lambda: text in mta.log(), timeout=timeout, what=repr(text))


def test_postmaster_and_abuse_through_newaliases(mta):
    new_aliases(mta, "# required aliases\npostmaster: nobody\nabuse:\n  nobody\n")
    mta.start()
    send(mta.port, "alice@example.org", [f"postmaster@{HOST}", f"Abuse@{HOST}"])
    files = wait_for(lambda: len(maildir(mta, "nobody")) == 2 and maildir(mta, "nobody"),
                     what="two messages in nobody's maildir")
    heads = sorted(Path(p).read_bytes().split(b"\n\n", 1)[0].decode() for p in files)
    assert heads[0].startswith(f"Return-Path: <alice@example.org>\nX-Original-To: "
                               f"Abuse@{HOST}\nDelivered-To: Abuse@{HOST}\n")
    assert heads[1].startswith(f"Return-Path: <alice@example.org>\nX-Original-To: "
                               f"postmaster@{HOST}\nDelivered-To: postmaster@{HOST}\n")
    # local logs the user the alias names, and the original recipient (Postfix's)
    log = log_has(mta, f"to=<nobody@{HOST}>, orig_to=<postmaster@{HOST}>, relay=local") \
        and mta.log()
    assert f"to=<nobody@{HOST}>, orig_to=<Abuse@{HOST}>, relay=local" in log
    assert "status=sent (delivered to maildir)" in log
    assert "required alias not found" not in log


def test_command_file_include_and_forbidden(mta):
    script = mta.dir / "save.sh"
    script.write_text(f"#!/bin/sh\ncat > {mta.out}/piped.$$\n")
    os.chmod(script, 0o755)
    (mta.dir / "members").write_text("nobody\n")
    new_aliases(mta, f'pipe: "|{script}"\nfile: {mta.out}/file.mbox\n'
                     f'list: :include:{mta.dir}/members\n')
    mta.start()
    send(mta.port, "alice@example.org", [f"pipe@{HOST}", f"file@{HOST}", f"list@{HOST}"])
    piped = wait_for(lambda: glob.glob(f"{mta.out}/piped.*"), what="the command's output")
    log_has(mta, f"to=<pipe@{HOST}>, relay=local")
    data = Path(piped[0]).read_bytes()
    assert data.startswith(b"From alice@example.org  ") and data.endswith(b"\n\nhello\n")
    assert f"status=sent (delivered to command: {script})" in mta.log()
    wait_for(lambda: os.path.exists(f"{mta.out}/file.mbox"), what="the /file")
    log_has(mta, f"status=sent (delivered to file: {mta.out}/file.mbox)")
    assert os.stat(f"{mta.out}/file.mbox").st_uid == 65534          # default_privs
    # The include list's member comes back through the queue as a new message.
    log_has(mta, "status=sent (forwarded as ")
    (path,) = wait_for(lambda: maildir(mta, "nobody"), what="the list member's copy")
    assert f"Delivered-To: list@{HOST}\n".encode() in Path(path).read_bytes()
    # Commands only from .forward files: the alias's command is bounced, as Postfix.
    mta.main["allow_mail_to_commands"] = "forward"
    mta.reload()
    send(mta.port, "nobody@" + HOST, [f"pipe@{HOST}"], subject="forbidden")
    log_has(mta, f"to=<pipe@{HOST}>, relay=local")
    log_has(mta, "dsn=5.7.1, status=bounced (mail to command is restricted)")
    assert len(glob.glob(f"{mta.out}/piped.*")) == 1
