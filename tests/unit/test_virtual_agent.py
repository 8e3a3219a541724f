"""virtual/service.py Agent: lookups, ownership, outcomes and Postfix's texts, with real
forked deliveries (as root: the child takes the mailbox owner's uid and gid)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib.address import addr_find, virtual_mailbox_known
from postfix_py.lib import tables
from postfix_py.virtual.service import Agent

ROOT = os.geteuid() == 0
UID = 5000 if ROOT else os.getuid()
GID = 5000 if ROOT else os.getgid()
MESSAGE = b"Subject: hi\n\nFrom the start\nbody\n"


def agent(tmp_path, **settings):
    base = tmp_path / "vmail"
    if not base.exists():
        base.mkdir()
        os.chown(base, UID, GID)
    maps = tmp_path / "vmailbox"
    maps.write_text("ann@hosted.example  hosted/ann/\nbob@hosted.example  hosted/bob\n"
                    "@catch.example  catch/\nevil@hosted.example  hosted/../../etc/x\n"
                    "dev@hosted.example  dev\n")
    settings = {"virtual_mailbox_base": str(base), "recipient_delimiter": "+",
                "virtual_mailbox_maps": f"texthash:{maps}",
                "virtual_uid_maps": f"static:{UID}", "virtual_gid_maps": f"static:{GID}",
                "virtual_minimum_uid": str(min(UID, 100)), **settings}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return Agent(maincf.load(str(tmp_path)))


@pytest.fixture
def tmp_path():
    """A directory the mailbox owner can reach (pytest's own is 0700, root's)."""
    root = Path(tempfile.mkdtemp(prefix="pfx-virtual-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(msg, "warn", seen.append)
    return seen


def outcome(r):
    return (r.result, r.dsn, r.reason)


def test_addr_find_order_and_pattern_tables(tmp_path):
    rx = tmp_path / "rx"
    rx.write_text("/^x\\+y@/ pattern\n")
    maps = [tables.open_table("inline:{ann+x@a.example=ext, ann@a.example=plain, @a.example=all}"),
            tables.open_table(f"regexp:{rx}")]
    assert addr_find(maps, "ann+x@a.example", "+")[0] == "ext"
    assert addr_find(maps, "ann+y@a.example", "+")[0] == "plain"
    assert addr_find(maps, "ann+y@a.example", "")[0] == "all"
    assert addr_find(maps, "zed@a.example", "+")[0] == "all"
    assert addr_find(maps, "x+y@b.example", "+")[0] == "pattern"
    assert addr_find(maps[1:], "x@b.example", "+") is None   # regexp: the full address only
    assert virtual_mailbox_known(maps, "ANN@A.Example", "+")
    assert not virtual_mailbox_known(maps, "ann@c.example", "+")


def test_maildir_mbox_and_catch_all(tmp_path):
    a = agent(tmp_path)
    base = tmp_path / "vmail"
    assert outcome(a.deliver("Ann+x@Hosted.Example", "s@example.org", MESSAGE)) == (
        "sent", "2.0.0", "delivered to maildir")
    (new,) = (base / "hosted" / "ann" / "new").iterdir()
    assert new.read_bytes() == (b"Return-Path: <s@example.org>\nX-Original-To: "
                                b"Ann+x@Hosted.Example\nDelivered-To: Ann+x@Hosted.Example\n"
                                + MESSAGE)
    st = new.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, GID, 0o600)
    assert outcome(a.deliver("bob@hosted.example", "", MESSAGE)) == (
        "sent", "2.0.0", "delivered to mailbox")
    text = (base / "hosted" / "bob").read_bytes()
    assert text.startswith(b"From MAILER-DAEMON  ") and b"\n>From the start\n" in text
    assert (base / "hosted" / "bob").stat().st_uid == UID
    assert outcome(a.deliver("x@catch.example", "s@example.org", MESSAGE))[0] == "sent"
    assert len(list((base / "catch" / "new").iterdir())) == 1
    a.close()


def test_unknown_user_and_bad_settings(tmp_path, warnings):
    a = agent(tmp_path)
    assert outcome(a.deliver("Carol@Hosted.Example", "", MESSAGE)) == (
        "bounced", "5.1.1", 'unknown user: "carol@hosted.example"')
    assert outcome(a.deliver("evil@hosted.example", "", MESSAGE)) == (
        "deferred", "4.3.5", "mail system configuration error")
    assert warnings.pop() == ("recipient evil@hosted.example: bad mailbox path "
                              "hosted/../../etc/x in virtual_mailbox_maps")
    a.close()
    for settings, warning in [
            ({"virtual_uid_maps": "static:0"}, "bad uid 0 in virtual_uid_maps"),
            ({"virtual_uid_maps": "static:x1"}, "bad uid x1 in virtual_uid_maps"),
            ({"virtual_gid_maps": "static:0"}, "bad gid 0 in virtual_gid_maps"),
            ({"virtual_uid_maps": "inline:{a@b=1}"}, "not found in virtual_uid_maps")]:
        a = agent(tmp_path, **settings)
        assert outcome(a.deliver("ann@hosted.example", "", MESSAGE)) == (
            "deferred", "4.3.5", "mail system configuration error")
        assert warnings.pop() == f"recipient ann@hosted.example: {warning}"
        a.close()


def test_configuration_that_cannot_start(tmp_path):
    with pytest.raises(ValueError, match="^do not specify relative pathname: "
                                         "virtual_mailbox_base = vmail$"):
        agent(tmp_path, virtual_mailbox_base="vmail")
    with pytest.raises(ValueError, match="virtual_mailbox_limit is smaller than "
                                         "message_size_limit"):
        agent(tmp_path, virtual_mailbox_limit="1000")
    with pytest.raises(ValueError, match="is limited but message_size_limit is unlimited"):
        agent(tmp_path, message_size_limit="0")
    with pytest.raises(tables.TableError):
        agent(tmp_path, virtual_uid_maps="bogus:/x")


def test_mailbox_limit_not_a_file_and_foreign_owner(tmp_path, warnings):
    a = agent(tmp_path, virtual_mailbox_limit="2000", message_size_limit="1000")
    big = b"Subject: big\n\n" + b"x" * 3000 + b"\n"
    r = a.deliver("ann@hosted.example", "", big)
    assert (r.result, r.dsn) == ("bounced", "5.2.2")
    assert r.reason.startswith("maildir delivery failed: ") and "File too large" in r.reason
    assert outcome(a.deliver("bob@hosted.example", "", MESSAGE))[0] == "sent"
    r = a.deliver("bob@hosted.example", "", big)
    assert (r.result, r.dsn) == ("bounced", "5.2.2")
    assert r.reason == (f"delivery failed to mailbox {tmp_path}/vmail/hosted/bob: "
                        "error writing message: File too large")
    size = (tmp_path / "vmail" / "hosted" / "bob").stat().st_size
    assert size < 2000                                    # truncated back
    (tmp_path / "vmail" / "dev").mkdir()
    assert outcome(a.deliver("dev@hosted.example", "", MESSAGE))[0:2] == ("deferred", "4.2.0")
    a.close()


@pytest.mark.skipif(not ROOT, reason="needs root to own a file as someone else")
def test_mbox_of_someone_else_is_refused(tmp_path):
    a = agent(tmp_path)
    (tmp_path / "vmail" / "hosted").mkdir()
    os.chown(tmp_path / "vmail" / "hosted", UID, GID)
    mbox = tmp_path / "vmail" / "hosted" / "bob"
    mbox.write_bytes(b"")
    os.chown(mbox, UID + 1, GID)
    os.chmod(mbox, 0o666)
    assert outcome(a.deliver("bob@hosted.example", "", MESSAGE)) == (
        "deferred", "4.2.0", f"destination {mbox} is not owned by recipient")
    assert mbox.read_bytes() == b""
    os.unlink(mbox)
    os.mkfifo(mbox)                       # no reader: fails at once, never hangs
    r = a.deliver("bob@hosted.example", "", MESSAGE)
    assert (r.result, r.dsn) == ("deferred", "4.2.0") and "cannot open file" in r.reason
    a.close()
