"""The cleanup stage (lib/cleanup.py) through a real instance: smtpd and pickup (sendmail)
write every message through it; header_checks, virtual aliases, canonical maps, always_bcc
and the missing headers of mail in the local rewrite context, as Postfix's cleanup(8)."""

import glob
import json
from pathlib import Path
import smtplib
from email.message import EmailMessage
import subprocess

import pytest

from helpers import POSTFIX_PY
from pfxinst import free_port, wait_for
from postfix_py.lib import queue as Q

HEADER_CHECKS = """\
/^Subject: .*reject me/    REJECT no spam here
/^Subject: .*discard me/   DISCARD dropped
/^Subject: .*hold me/      HOLD quarantine
/^Subject: .*redirect me/  REDIRECT trap@mail.test.example
/^X-Secret:/               IGNORE
"""

VIRTUAL = """\
a@example.com       b@example.com
b@example.com       c@mail.test.example
list@example.com    x@example.org, y@example.org, z@example.org
"""


@pytest.fixture
def mta(instance):
    """smtpd and pickup, with header_checks and address maps in main.cf."""
    instance.port = free_port()
    (instance.dir / "header_checks").write_text(HEADER_CHECKS)
    (instance.dir / "virtual").write_text(VIRTUAL)
    (instance.dir / "canonical").write_text("old@example.net new@example.net\n")
    instance.main.update({
        "mydestination": "$myhostname, localhost", "smtpd_error_sleep_time": "0s",
        "header_checks": f"regexp:{instance.dir}/header_checks",
        "virtual_alias_maps": f"texthash:{instance.dir}/virtual",
        "virtual_alias_expansion_limit": "2",
        "sender_canonical_maps": f"texthash:{instance.dir}/canonical",
        "always_bcc": "archive@mail.test.example",
    })
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd",
                             "pickup unix n - y - - pickup"]

    def queued(sub="incoming"):
        out = {}
        for path in glob.glob(str(instance.queue / sub / "*")):
            m = Q.read(path)
            out[m.queue_id] = (m, b"".join(m.content(path)).decode())
        return out
    instance.queued = queued
    return instance


def send(mta, subject, rcpts=("r@mail.test.example",), sender="s@example.org",
         extra=""):
    """One message over SMTP; (code, text) of the end-of-data reply."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(f"{extra}Subject: {subject}\r\n\r\nbody\r\n".encode())
    return code, text.decode()


def test_header_checks_actions_on_real_messages(mta):
    mta.start()
    code, text = send(mta, "please reject me")
    assert (code, text) == (550, "5.7.1 no spam here")
    wait_for(lambda: ": reject: header Subject: please reject me from "
             "localhost[127.0.0.1]; from=<s@example.org> to=<r@mail.test.example> "
             "proto=ESMTP helo=<client.example>: 5.7.1 no spam here" in mta.log(),
             what="the reject log line")
    code, text = send(mta, "discard me")
    assert code == 250
    qid = text.split()[-1]
    wait_for(lambda: f"{qid}: discard: header Subject: discard me from localhost" in
             mta.log(), what="the discard log line")
    code, text = send(mta, "hold me")
    assert code == 250
    held = text.split()[-1]
    assert f"{held}: hold: header Subject: hold me from localhost" in mta.log()
    code, text = send(mta, "redirect me", rcpts=["r1@mail.test.example", "r2@example.org"],
                      extra="X-Secret: 42\r\n")
    assert code == 250
    redirected = text.split()[-1]
    queued = mta.queued()
    assert qid not in queued and held not in queued
    assert set(mta.queued("hold")) == {held}
    m, content = queued[redirected]
    assert [r.address for r in m.recipients] == ["trap@mail.test.example"]
    # X-Secret comes first: after a REDIRECT no further header is checked, as Postfix
    assert "X-Secret" not in content and "Subject: redirect me\n" in content
    assert f"{redirected}: redirect: header Subject: redirect me from localhost" in mta.log()
    assert len(queued) == 1


def test_address_rewriting_on_a_real_message(mta):
    mta.start()
    code, text = send(mta, "aliases", rcpts=["a@example.com"], sender="old@example.net")
    assert code == 250
    m, _ = mta.queued()[text.split()[-1]]
    assert m.sender == "new@example.net"                 # sender_canonical_maps
    # a -> b -> c (virtual, recursively), and always_bcc
    assert [r.address for r in m.recipients] == ["c@mail.test.example",
                                                 "archive@mail.test.example"]
    # three addresses past virtual_alias_expansion_limit = 2: not accepted, try again
    code, text = send(mta, "too many", rcpts=["list@example.com"])
    assert (code, text) == (451, "4.6.0 Alias expansion error")
    assert "unreasonable virtual_alias_maps map expansion size for list@example.com" \
        in mta.log()


def test_missing_headers_in_the_local_rewrite_context(mta):
    # Postfix's cleanup_header_done_callback adds them wherever there is a header
    # rewrite context: 127.0.0.1 matches local_header_rewrite_clients's default
    # (permit_inet_interfaces); a client outside it, with remote_header_rewrite_domain
    # empty, gets none.
    remote = free_port()
    mta.master_lines.append(f"127.0.0.1:{remote} inet n - y - - smtpd"
                            " -o local_header_rewrite_clients=")
    mta.start()
    code, text = send(mta, "from smtp")
    qid = text.split()[-1]
    m, content = mta.queued()[qid]
    head = content.split("\n\n", 1)[0]
    assert f"\nMessage-Id: <" in head and f".{qid}@mail.test.example>" in head
    assert "\nDate: " in head and "\nFrom: s@example.org" in head
    assert f"{qid}: message-id=<" in mta.log()
    # Resent- headers: the Resent- forms are added instead
    code, text = send(mta, "resent", extra="Resent-To: x@example.org\r\n")
    qid = text.split()[-1]
    head = mta.queued()[qid][1].split("\n\n", 1)[0]
    assert "\nResent-Message-Id: <" in head and "\nResent-Date: " in head
    assert "\nResent-From: s@example.org" in head
    assert "\nMessage-Id:" not in head and "\nDate:" not in head
    assert f"{qid}: resent-message-id=<" in mta.log()
    assert f"{qid}: message-id=<>" in mta.log()
    mta.port = remote
    code, text = send(mta, "from a remote client")
    qid = text.split()[-1]
    head = mta.queued()[qid][1].split("\n\n", 1)[0]
    assert "Message-Id:" not in head and "Date:" not in head and "From:" not in head
    assert f"{qid}: message-id=<>" in mta.log()
    out = subprocess.run([POSTFIX_PY, "-c", str(mta.dir), "sendmail", "-f", "alice",
                          "-F", "Alice Smith", "bob@mail.test.example"],
                         input="Subject: local\nBcc: hidden@example.org\n\nhi\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    local = [(m, c) for m, c in mta.queued().values() if "Subject: local" in c]
    (m, content), = local
    head = content.split("\n\n", 1)[0]
    assert "Bcc:" not in head
    assert f"\nMessage-Id: <" in head and f".{m.queue_id}@mail.test.example>" in head
    assert "\nDate: " in head and "\nFrom: Alice Smith <alice@mail.test.example>" in head
    assert m.sender == "alice@mail.test.example"


def test_always_add_missing_headers_for_smtp(mta):
    mta.main["always_add_missing_headers"] = "yes"
    mta.start()
    code, text = send(mta, "from smtp", sender="")
    qid = text.split()[-1]
    m, content = mta.queued()[qid]
    head = content.split("\n\n", 1)[0]
    assert f"\nMessage-Id: <" in head and "\nDate: " in head
    assert "\nFrom: MAILER-DAEMON" in head
    assert f"{qid}: message-id=<" in mta.log()


def test_header_checks_reject_refuses_a_local_submission(mta):
    mta.start()
    out = subprocess.run([POSTFIX_PY, "-c", str(mta.dir), "sendmail", "-f", "alice",
                          "bob@mail.test.example"],
                         input="Subject: local reject me\n\nhi\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "5.7.1 no spam here" in out.stderr
    assert mta.queued() == {}
    log = mta.log()
    assert ": reject: header Subject: local reject me from local; " \
        "from=<alice@mail.test.example> to=<bob@mail.test.example>: 5.7.1 no spam here" in log


def test_header_addresses_by_client_context(mta):
    # 127.0.0.1 is an address of this host: local_header_rewrite_clients's default,
    # permit_inet_interfaces, makes it the local context, where header addresses are
    # qualified and sender_canonical_maps (header_sender by default) applies.
    remote = free_port()
    mta.master_lines.append(f"127.0.0.1:{remote} inet n - y - - smtpd"
                            " -o local_header_rewrite_clients=")
    mta.start()
    extra = "From: Old One <old@example.net>\r\nTo: bob, carl@example.org\r\n"
    code, text = send(mta, "local context", sender="old@example.net", extra=extra)
    _, content = mta.queued()[text.split()[-1]]
    head = content.split("\n\n", 1)[0]
    assert "\nFrom: Old One <new@example.net>\n" in head
    assert "\nTo: bob@mail.test.example, carl@example.org\n" in head
    # No client is local, and remote_header_rewrite_domain is empty: headers stay.
    mta.port = remote
    code, text = send(mta, "remote context", sender="old@example.net", extra=extra)
    m, content = mta.queued()[text.split()[-1]]
    assert m.sender == "new@example.net"                 # the envelope is rewritten
    assert content.split("\n\n", 1)[0].endswith(
        "\nFrom: Old One <old@example.net>\nTo: bob, carl@example.org\n"
        "Subject: remote context")


def test_body_checks_see_body_text_not_part_headers(mta):
    # Postfix's mime_state.c: the headers of a multipart part (mime_header_checks) and
    # of an attached message (nested_header_checks) are not body text, also when those
    # two are empty; body_checks see the text of every part.
    (mta.dir / "body_checks").write_text(
        "/^Content-(Type|Disposition):/ REJECT a part header\n"
        "/^Subject: forwarded/ REJECT a nested header\n"
        "/^secret text/ REJECT 5.7.1 body text\n")
    mta.main.update({"body_checks": f"regexp:{mta.dir}/body_checks",
                     "mime_header_checks": "", "nested_header_checks": ""})
    mta.start()
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner text\n")
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "s@example.org", "r@example.org", "mime"
    outer.set_content("hello\n")
    outer.add_attachment(b"MZ", maintype="application", subtype="octet-stream",
                         filename="a.exe")
    outer.add_attachment(inner)
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        assert s.send_message(outer, "s@example.org", ["r@mail.test.example"]) == {}
        inner.set_content("secret text\n")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.send_message(outer, "s@example.org", ["r@mail.test.example"])
    assert (refused.value.smtp_code, refused.value.smtp_error) == (550, b"5.7.1 body text")
    (m, content), = mta.queued().values()
    assert "\nContent-Disposition: attachment; filename=\"a.exe\"\n" in content


def test_long_to_list_rewritten_by_canonical_maps_is_folded_as_postfix(mta):
    # The case "long-to" of tests/data/header_rewrite: Debian's Postfix, given it from a
    # local client with the same canonical_maps, wrote the To: lines recorded there.
    data = Path(__file__).resolve().parent.parent / "data" / "header_rewrite"
    reference = json.loads((data / "postfix.json").read_text())["local/long-to"]
    (mta.dir / "long_canonical").write_text(
        "@short.example @a-considerably-longer-domain-name.example\n")
    mta.main["canonical_maps"] = f"texthash:{mta.dir}/long_canonical"
    mta.start()
    to = ", ".join(f"user{i}@short.example" for i in range(8))
    code, text = send(mta, "a long list", extra=f"To: {to}\r\n")
    assert code == 250
    _, content = mta.queued()[text.split()[-1]]
    head = content.split("\n\n", 1)[0].split("\n")
    start = head.index(next(line for line in head if line.startswith("To: ")))
    expected = reference[reference.index(next(
        line for line in reference if line.startswith("To: "))):][:8]
    assert expected[1].startswith("\tuser1@a-considerably-longer-domain-name.example")
    assert head[start:start + 8] == expected
    assert not head[start + 8].startswith(("\t", " "))


def test_receive_override_options_of_a_reinjection_service(mta):
    # FILTER_README's re-injection smtpd: what the first pass did (alias expansion,
    # always_bcc, header_checks, recipient validation) is not done a second time
    reinject = free_port()
    (mta.dir / "local_users").write_text("r local\n")
    mta.main["local_recipient_maps"] = f"texthash:{mta.dir}/local_users"
    mta.master_lines.append(
        f"127.0.0.1:{reinject} inet n - y - - smtpd -o content_filter= -o "
        "receive_override_options=no_unknown_recipient_checks,no_header_body_checks,"
        "no_milters,no_address_mappings")
    mta.start()
    rcpts = ("a@example.com", "nosuchuser@mail.test.example")
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.mail("s@example.org")
        assert s.rcpt(rcpts[1])[0] == 550              # the first pass validates
    mta.port = reinject
    code, text = send(mta, "please reject me", rcpts=rcpts, sender="old@example.net")
    assert code == 250
    m, content = mta.queued()[text.split()[-1]]
    assert sorted(r.address for r in m.recipients) == sorted(rcpts)
    assert m.sender == "old@example.net"
    assert "Subject: please reject me" in content
