"""Delivered-To: and X-Original-To: as local(8) and virtual(8) write them, against what
Debian's Postfix 3.7 wrote for the same recipients (tests/data/delivered_to/postfix.json,
recorded by make_reference.py there): the local part quoted when it is not a dot-string
(`"john doe"@example.org`, `"a,b"@...`, `"x\\"y"@...`), the case as given. Real deliveries
(as root: forked, with the mailbox owner's or default_privs' privileges) into one mbox
file per agent, as in the recording: virtual_mailbox_maps = static:sink, and local(8)
through an alias of every local part to a file."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from postfix_py.lib import maincf, mailbox, msg
from postfix_py.lib.tok822 import unquote_822_local
from postfix_py.local import service as local
from postfix_py.virtual.service import Agent

REFERENCE = json.loads((Path(__file__).resolve().parents[1] / "data" / "delivered_to"
                        / "postfix.json").read_text())
MESSAGE = b"Subject: hi\n\nbody\n"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="forked deliveries need root")


@pytest.fixture
def work():
    """A directory every user can reach (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="pfx-delivered-", dir="/tmp"))
    os.chmod(root, 0o1777)
    msg.init_cli("local")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def config(root: Path, **settings):
    (root / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return maincf.load(str(root))


def headers_by_recipient(mbox: Path) -> dict[str, list[str]]:
    """The X-Original-To: and Delivered-To: lines of each message, by its X-Case."""
    out = {}
    for message in mbox.read_text().split("\nFrom ")[0:]:
        lines = message.split("\n\n", 1)[0].split("\n")
        case = next(ln[8:] for ln in lines if ln.startswith("X-Case: "))
        out[case] = [ln for ln in lines if ln.startswith(("X-Original-To: ", "Delivered-To: "))]
    return out


def cases(agent: str) -> dict[str, list[str]]:
    out = {k.split(" ", 1)[1]: v for k, v in REFERENCE.items() if k.startswith(agent + " ")}
    assert len(out) >= 16
    return out


def test_virtual_writes_what_postfix_writes(work):
    os.chown(work, 5000, 5000)
    agent = Agent(config(work, virtual_mailbox_base=str(work),
                         virtual_mailbox_maps="static:sink",
                         virtual_uid_maps="static:5000", virtual_gid_maps="static:5000"))
    expected = cases("virtual")
    for case in expected:
        rcpt = unquote_822_local(case)          # the queue's (internal) form
        r = agent.deliver(rcpt, "sender@example.org", f"X-Case: {case}\n".encode() + MESSAGE)
        assert r.result == "sent", (case, r)
    agent.close()
    assert headers_by_recipient(work / "sink") == expected


def test_local_writes_what_postfix_writes(work):
    box = work / "file"
    box.touch()
    os.chmod(box, 0o666)
    cfg = config(work, myhostname="mx.test.example", mydestination="local.test, Local.TEST",
                 alias_maps=f"static:{box}")
    expected = cases("local")
    for case in expected:
        rcpt = unquote_822_local(case)
        job = local.LocalDelivery(cfg, "sender@example.org",
                                  f"X-Case: {case}\n".encode() + MESSAGE)
        r = job.deliver(rcpt)
        assert r.result == "sent", (case, r)
    assert headers_by_recipient(box) == expected


def test_a_quoted_delivered_to_is_a_loop():
    # Postfix's delivered_hdr_find: the recipient is quoted as mail_copy writes it, then
    # lower-cased, and so are the headers already in the message.
    seen = mailbox.delivered_to(b'Delivered-To: "John Doe"@Example.org\n\nx\n')
    assert mailbox.delivered_key("john doe@example.org") in seen
    assert mailbox.delivered_key("johndoe@example.org") not in seen
    assert mailbox.added_headers("s@x", "john doe@Example.org", "") == \
        b'Return-Path: <s@x>\nDelivered-To: "john doe"@Example.org\n'
