"""Virtual mailbox domains through the real master: smtpd -> qmgr (the virtual address
class) -> the virtual agent writing maildirs and mboxes as the mailbox owner, and ->
lmtp -> a private Dovecot (LMTP on a unix socket), read back over IMAP with imaplib; and a
UTF-8 address through the virtual agent into the maildir that Dovecot serves."""

import glob
import imaplib
import os
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from peers import stop_dovecot
from pfxinst import free_port, wait_for

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin")
DOVECOT_IMAP = "/usr/lib/dovecot/imap"
DOVECOT_LMTP = "/usr/lib/dovecot/lmtp"
VUID = 5000 if os.geteuid() == 0 else os.getuid()
VGID = 5000 if os.geteuid() == 0 else os.getgid()


def send(port, sender, rcpts, subject):
    """One message over SMTP; its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = s.data(f"From: <{sender}>\r\nSubject: {subject}\r\n\r\n"
                            f"body of {subject}\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def log_has(inst, text, timeout=15):
    return wait_for(lambda: text in inst.log(), timeout=timeout, what=repr(text))


@pytest.fixture
def mta(instance):
    instance.port = free_port()
    instance.record_fake_agent()
    instance.main.update({
        "mydestination": "$myhostname, localhost",
        "smtpd_error_sleep_time": "0s",
        "queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
        "ipc_timeout": "5s", "transport_retry_time": "1s",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "virtual unix - n n - - virtual",
        "lmtp unix - - n - - lmtp",
        "smtp unix - - n - - python:fake_agent",     # bounces to the remote sender
    ]
    return instance


def test_virtual_agent_maildir_mbox_and_unknown_user(mta):
    base = mta.dir / "vmail"
    (base / "hosted.example").mkdir(parents=True)
    for p in (base, base / "hosted.example"):
        os.chown(p, VUID, VGID)
    maps = mta.dir / "vmailbox"
    maps.write_text("ann@hosted.example  hosted.example/ann/\n"
                    "bob@hosted.example  hosted.example/bob\n"
                    "@catch.example      catch.example/\n")
    mta.main.update({
        "virtual_mailbox_domains": "hosted.example, catch.example",
        "virtual_mailbox_base": str(base),
        "virtual_mailbox_maps": f"texthash:{maps}",
        "virtual_uid_maps": f"static:{VUID}", "virtual_gid_maps": f"static:{VGID}",
        "virtual_minimum_uid": str(min(VUID, 100)),
        "recipient_delimiter": "+",
    })
    mta.start()
    # A recipient without a mailbox is refused at RCPT, as Postfix's smtpd does.
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("alice@example.org")
        assert s.rcpt("carol@hosted.example") == (
            550, b"5.1.1 <carol@hosted.example>: Recipient address rejected: "
                 b"User unknown in virtual mailbox table")
    qid = send(mta.port, "alice@example.org",
               ["Ann+Box@hosted.example", "bob@hosted.example",
                "anyone@catch.example"], "virtual one")
    log_has(mta, f"{qid}: removed")
    log = mta.log()
    assert (f"{qid}: to=<Ann+Box@hosted.example>, relay=virtual, delay=" in log)
    assert log.count("status=sent (delivered to maildir)") == 2
    assert f"{qid}: to=<bob@hosted.example>, relay=virtual," in log
    assert "status=sent (delivered to mailbox)" in log
    (ann,) = glob.glob(str(base / "hosted.example" / "ann" / "new" / "*"))
    head = Path(ann).read_text().split("\n\n", 1)[0]
    assert head.startswith("Return-Path: <alice@example.org>\nX-Original-To: "
                           "Ann+Box@hosted.example\nDelivered-To: Ann+Box@hosted.example\n")
    assert "Subject: virtual one" in head
    st = os.stat(ann)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (VUID, VGID, 0o600)
    mbox = (base / "hosted.example" / "bob").read_text()
    assert mbox.startswith("From alice@example.org  ") and "body of virtual one" in mbox
    assert os.stat(base / "hosted.example" / "bob").st_uid == VUID
    assert len(glob.glob(str(base / "catch.example" / "new" / "*"))) == 1
    assert "Traceback" not in mta.log()


# --- Dovecot: LMTP in, IMAP out --------------------------------------------------------

def wait_port(port, timeout=15):
    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(up, timeout, what=f"port {port}")


@pytest.fixture
def dovecot(mta):
    if not (DOVECOT and os.path.exists(DOVECOT_IMAP) and os.path.exists(DOVECOT_LMTP)):
        pytest.skip("needs dovecot-core, dovecot-lmtpd and dovecot-imapd")
    if os.geteuid() != 0:
        pytest.skip("needs root: dovecot delivers as the mailbox owner")
    d = mta.dir / "dovecot"
    for sub in ("run", "state", "mail"):
        (d / sub).mkdir(parents=True)
    os.chown(d / "mail", VUID, VGID)
    os.chmod(d, 0o755)
    users = d / "users"
    home = d / "mail"
    users.write_text(f"ann@hosted.example:{{PLAIN}}ann-secret:{VUID}:{VGID}::{home}/ann::\n"
                     f"bob@hosted.example:{{PLAIN}}bob-secret:{VUID}:{VGID}::{home}/bob::\n")
    port = free_port()
    sock = d / "lmtp.sock"
    (d / "dovecot.conf").write_text(f"""
protocols = lmtp imap
base_dir = {d / 'run'}
state_dir = {d / 'state'}
listen = 127.0.0.1
log_path = {d / 'dovecot.log'}
ssl = no
disable_plaintext_auth = no
mail_location = maildir:{home}/%d/%n
default_login_user = nobody
default_internal_user = nobody
default_internal_group = nogroup
first_valid_uid = {VUID}
auth_username_format = %Lu
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    path = {sock}
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
""")
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(d / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_for(sock.exists, 10, what="dovecot lmtp socket")
        mta.dovecot_log = d / "dovecot.log"
        yield type("Dovecot", (), {"port": port, "sock": sock, "mail": home})
    finally:
        stop_dovecot(proc)


def imap_messages(port, user, password):
    """The full text of every message in the user's INBOX, over IMAP."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        assert imap.login(user, password)[0] == "OK"
        typ, data = imap.select("INBOX")
        assert typ == "OK", data
        typ, data = imap.search(None, "ALL")
        out = []
        for num in data[0].split():
            typ, parts = imap.fetch(num, "(RFC822)")
            assert typ == "OK", parts
            out.append(parts[0][1].decode())
        imap.close()
        return out
    finally:
        imap.logout()


@pytest.mark.interop
def test_virtual_transport_lmtp_to_dovecot_then_imap(mta, dovecot):
    mta.main.update({
        "virtual_mailbox_domains": "hosted.example",
        "virtual_transport": f"lmtp:unix:{dovecot.sock}",
    })
    mta.start()
    first = send(mta.port, "alice@example.org", ["ann@hosted.example"], "lmtp one")
    second = send(mta.port, "alice@example.org",
                  ["ann@hosted.example", "bob@hosted.example", "nobody@hosted.example"],
                  "lmtp two")
    for qid in (first, second):
        log_has(mta, f"{qid}: removed")
    log = mta.log()
    # Postfix's lmtp names a unix-socket server with $myhostname.
    relay = f"relay=mail.test.example[{dovecot.sock}]"
    assert f"{first}: to=<ann@hosted.example>, {relay}," in log
    assert f"{second}: to=<bob@hosted.example>, {relay}," in log
    assert log.count(f"{relay},") == 4 and "postfix-py/lmtp[" in log
    assert (f"dsn=5.1.1, status=bounced (host mail.test.example[{dovecot.sock}] said: 550 "
            "5.1.1 <nobody@hosted.example> User doesn't exist: nobody@hosted.example "
            "(in reply to RCPT TO command))") in log
    ann = imap_messages(dovecot.port, "ann@hosted.example", "ann-secret")
    bob = imap_messages(dovecot.port, "bob@hosted.example", "bob-secret")
    assert sorted(m.split("Subject: ", 1)[1].split("\r\n", 1)[0] for m in ann) == [
        "lmtp one", "lmtp two"]
    assert len(bob) == 1 and "body of lmtp two" in bob[0]
    assert bob[0].startswith("Return-Path: <alice@example.org>\r\nReceived: from "
                             "mail.test.example\r\n") and " with LMTP\r\n" in bob[0]
    with pytest.raises(imaplib.IMAP4.error):
        imap_messages(dovecot.port, "ann@hosted.example", "wrong")
    assert "Traceback" not in mta.log()


def send_utf8(port, sender, rcpt, subject, smtputf8=True):
    """One message, with SMTPUTF8 or as legacy 8-bit mail; its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        assert "smtputf8" in s.esmtp_features
        if smtputf8:
            assert s.mail(sender, ["SMTPUTF8"])[0] == 250
        else:
            s.command_encoding = "utf-8"        # smtplib sends ASCII otherwise
            assert s.mail(sender)[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(f"From: <{sender}>\r\nSubject: {subject}\r\n"
                            f"\r\nbody of {subject}\r\n".encode("utf-8"))
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


@pytest.mark.interop
def test_utf8_addresses_to_dovecot(mta, dovecot):
    # Dovecot 2.3's LMTP announces no SMTPUTF8 (RFC 6531) and refuses an 8-bit address
    # ("501 5.5.4 Invalid TO"), so a UTF-8 address reaches a Dovecot mailbox through
    # virtual_alias_maps: in legacy 8-bit mail (no SMTPUTF8 requested, so no promise,
    # as Postfix) it is delivered, its UTF-8 kept in the Received: header; in mail that
    # asked for SMTPUTF8 it bounces with 5.6.7, as Postfix's lmtp does.
    mta.main.update({
        "virtual_mailbox_domains": "hosted.example",
        "virtual_transport": f"lmtp:unix:{dovecot.sock}",
        "virtual_alias_maps": "inline:{j\u00f6rg@hosted.example=ann@hosted.example}",
    })
    mta.start()
    one = send_utf8(mta.port, "alice@example.org", "j\u00f6rg@hosted.example", "utf8 one",
                    smtputf8=False)
    two = send_utf8(mta.port, "alice@example.org", "j\u00f6rg@hosted.example", "utf8 two")
    for qid in (one, two):
        log_has(mta, f"{qid}: removed")
    log = mta.log()
    relay = f"relay=mail.test.example[{dovecot.sock}]"
    sent = [line for line in log.splitlines() if f"{one}: to=<ann@hosted.example>" in line]
    assert len(sent) == 1 and relay in sent[0] and "status=sent (250 2.0.0 " in sent[0], sent
    # the virtual alias's original address is logged as orig_to=, as Postfix
    assert f"{one}: to=<ann@hosted.example>, orig_to=<j\u00f6rg@hosted.example>, " \
           f"{relay}" in sent[0]
    assert (f"{two}: to=<ann@hosted.example>, orig_to=<j\u00f6rg@hosted.example>, "
            f"{relay}") in log
    assert "dsn=5.6.7, status=bounced (SMTPUTF8 is required, but was not offered by host " \
           f"mail.test.example[{dovecot.sock}])" in log
    (got,) = imap_messages(dovecot.port, "ann@hosted.example", "ann-secret")
    assert "Subject: utf8 one" in got and "body of utf8 one" in got
    assert "for <j\u00f6rg@hosted.example>;" in got
    assert "Traceback" not in mta.log()


@pytest.mark.interop
def test_utf8_address_through_the_virtual_agent_into_dovecot(mta, dovecot):
    # Dovecot 2.3's LMTP refuses an 8-bit RCPT TO, so an SMTPUTF8 message to a UTF-8
    # address goes through postfix-py's own virtual agent instead: virtual_mailbox_maps
    # maps the address to the maildir that Dovecot serves (mail_location
    # maildir:HOME/%d/%n), and Dovecot's IMAP reads it back.
    mta.main.update({
        "virtual_mailbox_domains": "hosted.example",
        "virtual_mailbox_base": str(dovecot.mail),
        "virtual_mailbox_maps": "inline:{j\u00f6rg@hosted.example=hosted.example/ann/}",
        "virtual_uid_maps": f"static:{VUID}", "virtual_gid_maps": f"static:{VGID}",
        "virtual_minimum_uid": str(VUID),
    })
    mta.start()
    qid = send_utf8(mta.port, "al\u00efce@example.org", "j\u00f6rg@hosted.example",
                    "gr\u00fc\u00dfe")
    log_has(mta, f"{qid}: removed")
    assert (f"{qid}: to=<j\u00f6rg@hosted.example>, relay=virtual, delay=") in mta.log()
    assert "status=sent (delivered to maildir)" in mta.log()
    (got,) = imap_messages(dovecot.port, "ann@hosted.example", "ann-secret")
    assert got.startswith("Return-Path: <al\u00efce@example.org>\r\nX-Original-To: "
                          "j\u00f6rg@hosted.example\r\nDelivered-To: "
                          "j\u00f6rg@hosted.example\r\n")
    assert "Subject: gr\u00fc\u00dfe\r\n" in got and "body of gr\u00fc\u00dfe" in got
    assert "Traceback" not in mta.log()
