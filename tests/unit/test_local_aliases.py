"""local(8)'s aliases, .forward, :include:, /file and |command destinations, postalias
and newaliases (lib/aliases.py, local/service.py, local/command.py, tools/postalias.py).
Deliveries run for real, in forked children with the right uid; run as root."""

import io
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from types import SimpleNamespace

import pytest

from postfix_py.lib import aliases, mailbox, maincf, msg, table_writer, tables
from postfix_py.lib import queue as Q
from postfix_py.local import command
from postfix_py.local import service as local
from postfix_py.tools import postalias

from helpers import POSTFIX_PY

HOST = "mail.example.com"
MESSAGE = b"Subject: hi\nFrom: a@example.org\n\nbody\n"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(autouse=True)
def cli_log():
    msg.init_cli("local")
    yield
    close_alias_tables()


def close_alias_tables():
    """local keeps alias tables open for the life of its process; a test ends them."""
    for table in local._ALIAS_TABLES.values():
        table.close()
    local._ALIAS_TABLES.clear()


@pytest.fixture
def area():
    """A directory every user can reach and write (pytest's tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="local-alias-", dir="/tmp")
    os.chmod(path, 0o1777)
    os.mkdir(os.path.join(path, "mail"))
    os.chmod(os.path.join(path, "mail"), 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(area, aliases_text=None, **settings):
    conf = {"myhostname": HOST, "mydestination": "$myhostname, localhost",
            "mail_spool_directory": f"{area}/mail/", "alias_maps": "",
            "forward_path": f"{area}/$user.forward", **settings}
    if aliases_text is not None:
        with open(f"{area}/aliases", "w") as f:
            f.write(aliases_text)
        table_writer.build(f"hash:{area}/aliases", pairs=aliases.source_pairs)
        conf["alias_maps"] = f"hash:{area}/aliases"
    with open(f"{area}/main.cf", "w") as f:
        f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))
    close_alias_tables()
    return maincf.load(area)


def job(cfg, area):
    os.makedirs(f"{area}/queue/incoming", exist_ok=True)
    return local.LocalDelivery(cfg, "a@example.org", MESSAGE, queue_root=f"{area}/queue")


def read(path, mode="rb"):
    with open(path, mode) as f:
        return f.read()


def maildir(area, user):
    d = f"{area}/mail/{user}/new"
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        with open(os.path.join(d, name), "rb") as f:
            out.append(f.read())
    return out


def test_alias_source_format(capsys):
    text = ('postmaster: root\nabuse:   a ,b,\n  c@example.com\n# c\n'
            '"Quoted Name": "|/bin/cat > /tmp/x", /var/x, :include:/etc/y\n'
            'x@y: z\nnovalue:\nbad\nlist: a (comment) b\n')
    pairs = [(k, v) for _, k, v in aliases.source_pairs(text, "aliases")]
    # What Debian's postalias 3.7 stores for the same file (postalias -s).
    assert pairs == [("postmaster", "root"), ("abuse", "a, b, c@example.com"),
                     ("Quoted Name", '"|/bin/cat > /tmp/x", /var/x, :include:/etc/y'),
                     ("list", "a (comment) b"), ("@", "@")]
    err = capsys.readouterr().err
    assert "aliases, line 6: name must be local" in err
    assert "aliases, line 7: need name:value pair" in err
    assert "aliases, line 8: need name:value pair" in err
    assert aliases.destinations('"|/bin/cat > /tmp/x", /var/x, :include:/etc/y') == \
        ["|/bin/cat > /tmp/x", "/var/x", ":include:/etc/y"]
    assert aliases.destinations("Joe <joe@example.com>, \\bob") == \
        ["joe@example.com", "\\bob"]
    assert aliases.token_lines("# comment\na@b.c, d\n\n  , e\n") == ["a@b.c", "d", "e"]


def test_postalias_build_query_and_list(area, capsys, monkeypatch):
    with open(f"{area}/aliases", "w") as f:
        f.write("Postmaster: nobody\nabuse: nobody, \"|/bin/true\"\n")
    with open(f"{area}/main.cf", "w") as f:
        f.write(f"alias_database = hash:{area}/aliases\n")
    assert postalias.newaliases(["-c", area]) == 0
    assert os.path.exists(f"{area}/aliases.db")
    capsys.readouterr()
    assert postalias.main(["-c", area, "-q", "POSTMASTER", f"{area}/aliases"]) == 0
    assert capsys.readouterr().out == "nobody\n"
    assert postalias.main(["-c", area, "-q", "nothere", f"{area}/aliases"]) == 1
    assert postalias.main(["-c", area, "-s", f"hash:{area}/aliases"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "@:\t@", 'abuse:\tnobody, "|/bin/true"', "postmaster:\tnobody"]
    assert postalias.main(["-c", area, f"{area}/missing"]) == 1
    assert "open " in capsys.readouterr().err


def test_sendmail_bi_is_newaliases(area, capsys):
    """Postfix's sendmail -bi: newaliases' code on alias_database, or on -oA's file."""
    with open(f"{area}/aliases", "w") as f:
        f.write("postmaster: nobody\n")
    with open(f"{area}/other", "w") as f:
        f.write("abuse: root\n")
    with open(f"{area}/main.cf", "w") as f:
        f.write(f"alias_database = hash:{area}/aliases\n")
    run = [POSTFIX_PY, "-c", area, "sendmail"]
    out = subprocess.run(run + ["-bi"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    assert postalias.main(["-c", area, "-q", "postmaster", f"{area}/aliases"]) == 0
    assert capsys.readouterr().out == "nobody\n"
    assert not os.path.exists(f"{area}/other.db")
    out = subprocess.run(run + ["-bi", f"-oA{area}/other"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert postalias.main(["-c", area, "-q", "abuse", f"hash:{area}/other"]) == 0
    assert capsys.readouterr().out == "root\n"
    # as Postfix's: no recipients; -oA needs a path; a failure is postalias's status 1
    out = subprocess.run(run + ["-bi", "x@example.com"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 64
    assert out.stderr == "sendmail: fatal: alias initialization mode requires no recipient\n"
    out = subprocess.run(run + ["-bi", "-oA"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 64 and "-oA requires pathname" in out.stderr
    out = subprocess.run(run + ["-bi", f"-oA{area}/missing"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith(f"newaliases: fatal: open {area}/missing")
    # an empty alias_database is nothing to do
    with open(f"{area}/main.cf", "w") as f:
        f.write("alias_database =\n")
    out = subprocess.run(run + ["-bi"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")


def test_required_alias_without_aliases(area, capsys):
    cfg = config(area)
    r = job(cfg, area).deliver(f"postmaster@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("sent", "2.0.0", "discarded")
    assert "warning: required alias not found: postmaster" in capsys.readouterr().err
    cfg = config(area, "abuse: nobody\n")        # aliases, but none for postmaster
    r = job(cfg, area).deliver(f"postmaster@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("sent", "2.0.0", "discarded")
    assert "warning: required alias not found: postmaster" in capsys.readouterr().err


def test_commands_of_a_user_owned_alias_run_as_its_owner(area):
    daemon = pwd.getpwnam("daemon")
    with open(f"{area}/aliases", "w") as f:
        f.write(f'who: "|id -u > {area}/who"\n')
    os.chown(f"{area}/aliases", daemon.pw_uid, daemon.pw_gid)
    table_writer.build(f"hash:{area}/aliases", pairs=aliases.source_pairs)
    assert os.stat(f"{area}/aliases.db").st_uid == daemon.pw_uid
    cfg = config(area, alias_maps=f"hash:{area}/aliases")
    r = job(cfg, area).deliver(f"who@{HOST}")
    assert r.result == "sent"
    assert read(f"{area}/who", "r").strip() == str(daemon.pw_uid)    # not default_privs


def test_alias_to_an_account_and_recursion(area):
    cfg = config(area, "postmaster: abuse\nabuse: nobody\nself: self, nobody\n",
                 recipient_delimiter="+")
    r = job(cfg, area).deliver(f"postmaster@{HOST}")
    assert (r.result, r.reason) == ("sent", "delivered to maildir")
    (got,) = maildir(area, "nobody")
    assert got.startswith(b"Return-Path: <a@example.org>\nX-Original-To: postmaster@"
                          + HOST.encode() + b"\nDelivered-To: postmaster@")
    r = job(cfg, area).deliver(f"abuse+tag@{HOST}")      # user+ext, then user
    assert r.result == "sent" and len(maildir(area, "nobody")) == 2


def test_alias_loop_and_unavailable_table(area, capsys):
    cfg = config(area, "a: b\nb: a\n")
    r = job(cfg, area).deliver(f"a@{HOST}")
    assert (r.result, r.dsn) == ("bounced", "5.4.6")
    cfg = config(area, alias_maps=f"hash:{area}/none")
    r = job(cfg, area).deliver(f"nobody@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("deferred", "4.3.0", "alias database unavailable")
    assert f"hash:{area}/none: lookup of 'nobody' failed" in capsys.readouterr().err


def test_command_file_and_include(area):
    script = f"{area}/save.sh"
    with open(script, "w") as f:
        f.write(f'#!/bin/sh\nid -u > {area}/cmd.uid\nenv > {area}/cmd.env\n'
                f'cat > {area}/cmd.out\n')
    os.chmod(script, 0o755)
    with open(f"{area}/list", "w") as f:
        f.write("# members\nnobody\n")
    cfg = config(area, f'pipe: "|{script}"\nfile: {area}/file.mbox\n'
                 f'dir: {area}/md/\nincl: :include:{area}/list\nnull: /dev/null\n'
                 f'temp: "|exit 75"\nfail: "|echo 5.1.1 no such list; exit 1"\n')
    r = job(cfg, area).deliver(f"pipe@{HOST}")
    assert (r.result, r.reason) == ("sent", f"delivered to command: {script}")
    assert read(f"{area}/cmd.uid", "r").strip() == str(NOBODY.pw_uid)   # default_privs
    with open(f"{area}/cmd.out", "rb") as f:
        out = f.read()
    assert out.startswith(b"From a@example.org  ") and out.endswith(MESSAGE)
    env = read(f"{area}/cmd.env", "r").splitlines()
    for line in ("SENDER=a@example.org", f"RECIPIENT=pipe@{HOST}", "LOCAL=pipe",
                 f"DOMAIN={HOST}", f"ORIGINAL_RECIPIENT=pipe@{HOST}", "USER=pipe"):
        assert line in env
    r = job(cfg, area).deliver(f"file@{HOST}")
    assert (r.result, r.reason) == ("sent", f"delivered to file: {area}/file.mbox")
    st = os.stat(f"{area}/file.mbox")
    assert st.st_uid == NOBODY.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    assert read(f"{area}/file.mbox").startswith(b"From a@example.org  ")
    r = job(cfg, area).deliver(f"dir@{HOST}")
    assert (r.result, r.reason) == ("sent", "delivered to maildir")
    assert len(os.listdir(f"{area}/md/new")) == 1
    r = job(cfg, area).deliver(f"null@{HOST}")
    assert (r.result, r.reason) == ("sent", "delivered to file: /dev/null")
    r = job(cfg, area).deliver(f"incl@{HOST}")     # include members go through the queue
    assert r.result == "sent" and r.reason.startswith("forwarded as ")
    qid = r.reason.split()[-1]
    m = Q.read(f"{area}/queue/incoming/{qid}")
    assert m.sender == "a@example.org" and [x.address for x in m.recipients] == \
        [f"nobody@{HOST}"]
    assert m.recipients[0].original == f"incl@{HOST}"    # the original goes with it
    content = b"".join(m.content(f"{area}/queue/incoming/{qid}"))
    assert content == f"Delivered-To: incl@{HOST}\n".encode() + MESSAGE
    r = job(cfg, area).deliver(f"incl@{HOST}", original=f"Given@{HOST}")
    m = Q.read(f"{area}/queue/incoming/{r.reason.split()[-1]}")
    assert m.recipients[0].original == f"Given@{HOST}"
    r = job(cfg, area).deliver(f"temp@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("deferred", "4.3.0", "temporary failure")
    r = job(cfg, area).deliver(f"fail@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("bounced", "5.1.1", "no such list")


def test_every_destination_is_logged(area, capsys):
    cfg = config(area, f"both: nobody, {area}/both.mbox\n")
    request = SimpleNamespace(queue_id="ABC123", arrival=0.0)
    r = local.LocalDelivery(cfg, "a@example.org", MESSAGE, request).deliver(f"both@{HOST}")
    assert (r.result, r.reason) == ("sent", f"delivered to file: {area}/both.mbox")
    err = capsys.readouterr().err        # the one returned is logged by the Report
    # the address the alias expanded to, and the original (Postfix's local)
    assert f"ABC123: to=<nobody@{HOST}>, orig_to=<both@{HOST}>, relay=local, delay=" in err
    assert "dsn=2.0.0, status=sent (delivered to maildir)" in err


def test_postalias_incremental(area, capsys, monkeypatch):
    with open(f"{area}/aliases", "w") as f:
        f.write("a: b\n")
    with open(f"{area}/main.cf", "w") as f:
        f.write("")
    assert postalias.main(["-c", area, f"{area}/aliases"]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"c: d, e\n")))
    assert postalias.main(["-c", area, "-i", f"{area}/aliases"]) == 0
    assert "duplicate" not in capsys.readouterr().err
    assert postalias.main(["-c", area, "-s", f"{area}/aliases"]) == 0
    assert capsys.readouterr().out.splitlines() == ["@:\t@", "a:\tb", "c:\td, e"]


def test_forbidden_destinations(area):
    cfg = config(area, f'pipe: "|/bin/true"\nfile: {area}/f\n',
                 allow_mail_to_commands="forward", allow_mail_to_files="forward")
    r = job(cfg, area).deliver(f"pipe@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("bounced", "5.7.1", "mail to command is restricted")
    r = job(cfg, area).deliver(f"file@{HOST}")
    assert (r.result, r.dsn, r.reason) == ("bounced", "5.7.1", "mail to file is restricted")
    assert not os.path.exists(f"{area}/f")


def test_bad_allow_mail_to_value_defers(area, capsys):
    cfg = config(area, "pipe: nobody\n", allow_mail_to_files="alias, forwards")
    r = job(cfg, area).deliver(f"pipe@{HOST}")
    assert (r.result, r.dsn) == ("deferred", "4.3.5")
    assert 'unknown allow_mail_to_files value "forwards" in "alias, forwards"' in \
        capsys.readouterr().err


def test_remote_alias_is_forwarded_as_a_new_queue_file(area):
    cfg = config(area, "ext: someone@remote.example, nobody\n")
    r = job(cfg, area).deliver(f"ext@{HOST}")
    assert r.result == "sent" and r.reason.startswith("forwarded as ")
    assert len(maildir(area, "nobody")) == 1
    (name,) = os.listdir(f"{area}/queue/incoming")
    m = Q.read(f"{area}/queue/incoming/{name}")
    assert [x.address for x in m.recipients] == ["someone@remote.example"]


def test_owner_alias_becomes_the_sender(area):
    cfg = config(area, f"list: nobody, {area}/list.mbox\nowner-list: nobody\n")
    r = job(cfg, area).deliver(f"list@{HOST}")
    assert r.result == "sent"
    first = read(f"{area}/list.mbox").split(b"\n")[1]
    assert first == f"Return-Path: <owner-list@{HOST}>".encode()
    assert maildir(area, "nobody") == []         # members go through the queue, as owner-list
    (name,) = os.listdir(f"{area}/queue/incoming")
    m = Q.read(f"{area}/queue/incoming/{name}")
    assert m.sender == f"owner-list@{HOST}"
    assert [x.address for x in m.recipients] == [f"nobody@{HOST}"]


def test_dot_forward(area, capsys):
    fwd = f"{area}/nobody.forward"
    with open(fwd, "w") as f:
        f.write(f"\\nobody, {area}/fwd.mbox\n")
    os.chown(fwd, NOBODY.pw_uid, NOBODY.pw_gid)
    cfg = config(area)
    r = job(cfg, area).deliver(f"nobody@{HOST}")
    assert r.result == "sent"
    assert len(maildir(area, "nobody")) == 1                       # \nobody: the mailbox
    assert os.stat(f"{area}/fwd.mbox").st_uid == NOBODY.pw_uid     # as the user
    # A .forward that is world writable, or owned by someone else, is ignored.
    os.chmod(fwd, 0o666)
    r = job(cfg, area).deliver(f"nobody@{HOST}")
    assert r.reason == "delivered to maildir" and len(maildir(area, "nobody")) == 2
    assert f"file {fwd} is world writable" in capsys.readouterr().err
    os.chmod(fwd, 0o644)
    os.chown(fwd, 1, 1)
    r = job(cfg, area).deliver(f"nobody@{HOST}")
    assert r.reason == "delivered to maildir"
    assert f"file {fwd} has bad owner uid 1" in capsys.readouterr().err


def test_mailbox_command(area):
    cfg = config(area, mailbox_command=f"cat > {area}/mc.$user.$$USER")
    r = job(cfg, area).deliver(f"nobody@{HOST}")
    assert r.result == "sent" and r.reason.startswith("delivered to command: ")
    assert read(f"{area}/mc.nobody.nobody").endswith(MESSAGE)
    assert os.stat(f"{area}/mc.nobody.nobody").st_uid == NOBODY.pw_uid


def test_command_time_limit_and_signal():
    assert command.run("sleep 30", b"x", NOBODY.pw_uid, NOBODY.pw_gid, {}, 1) == \
        ("bounced", "5.3.0", 'Command time limit exceeded: "sleep 30"')
    kind, dsn, reason = command.run("echo oops; kill -9 $$", b"", NOBODY.pw_uid,
                                    NOBODY.pw_gid, {}, 10)
    assert (kind, dsn) == ("deferred", "4.3.0")
    assert reason == 'Command died with signal 9: "echo oops; kill -9 $$". Command output: oops'
    assert command.run("exit 3", b"", NOBODY.pw_uid, NOBODY.pw_gid, {}, 10) == \
        ("bounced", "5.3.0", 'Command died with status 3: "exit 3"')
    big = b"x" * (1 << 20)       # a command that reads nothing: not an error
    assert command.run("exit 0", big, NOBODY.pw_uid, NOBODY.pw_gid, {}, 10)[0] == "sent"


DEBIAN_POSTALIAS = shutil.which("postalias", path="/usr/sbin:/usr/bin")
INTEROP_ALIASES = ('postmaster: root\nAbuse:   a ,b,\n  c@example.com\n# comment\n'
                   '"Quoted Name": "|/bin/cat > /tmp/x", /var/x, :include:/etc/y\n'
                   'x@y: z\nnovalue:\nbad\nlist: a (comment) b\nfoo bar: x\n'
                   'owner-list: me\n')


@pytest.mark.skipif(not DEBIAN_POSTALIAS, reason="Debian's postfix is not installed")
def test_postalias_matches_debian(area):
    for name in ("ours", "theirs"):
        with open(f"{area}/{name}", "w") as f:
            f.write(INTEROP_ALIASES)
    with open(f"{area}/main.cf", "w") as f:
        f.write("")
    theirs = subprocess.run([DEBIAN_POSTALIAS, f"hash:{area}/theirs"], capture_output=True,
                            text=True, timeout=10)
    ours = subprocess.run([POSTFIX_PY, "-c", area, "postalias", f"hash:{area}/ours"],
                          capture_output=True, text=True, timeout=30)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stderr.replace("/ours", "/theirs") == theirs.stderr
    listing = subprocess.run([DEBIAN_POSTALIAS, "-s", f"hash:{area}/theirs"],
                             capture_output=True, text=True, timeout=10).stdout
    expected = sorted(line for line in listing.splitlines() if not line.startswith("YP_"))
    ours = subprocess.run([POSTFIX_PY, "-c", area, "postalias", "-s", f"hash:{area}/ours"],
                          capture_output=True, text=True, timeout=30)
    assert sorted(ours.stdout.splitlines()) == expected


def test_raw_parameters_are_not_expanded_by_main_cf(area):
    cfg = config(area, forward_path="$home/.forward${recipient_delimiter}${extension}",
                 mailbox_command='procmail -a "$EXTENSION"', other="$nothere")
    assert cfg.undefined_references() == ["nothere"]     # as Postfix's postconf
    assert local._local_expand(cfg, cfg.raw("forward_path"),
                               {"home": "/h", "recipient_delimiter": "+",
                                "extension": "x"}) == "/h/.forward+x"
    assert local._local_expand(cfg, cfg.raw("forward_path"), {"home": "/h"}) is None


def test_expansion_dsn_action_and_forwarded_notify(area):
    # Postfix's alias.c, dotforward.c and forward.c: the outermost expansion decides the
    # DSN action ("expanded"; "delivered" for a list with an owner- alias); forwarded
    # copies get NOTIFY without SUCCESS (NEVER when SUCCESS was all), the ORCPT, ENVID
    # and RET of the original, and none of those three under an owner- alias.
    cfg = config(area, "team: nobody, far@remote.example\nlist: far@remote.example\n"
                       "owner-list: nobody\n")

    def run(rcpt, notify, **kw):
        j = local.LocalDelivery(cfg, "a@example.org", MESSAGE,
                                queue_root=f"{area}/queue", envid="E1", ret="HDRS")
        os.makedirs(f"{area}/queue/incoming", exist_ok=True)
        r = j.deliver(rcpt, notify, "rfc822;Orig@example.org")
        assert r.result == "sent" and r.reason.startswith("forwarded as "), r
        path = f"{area}/queue/incoming/{r.reason.split()[-1]}"
        return j.expansion, Q.read(path)

    expansion, m = run(f"team@{HOST}", "SUCCESS,FAILURE")
    assert expansion == "expanded"
    (far,) = m.recipients
    assert (far.address, far.notify, far.orcpt) == (
        "far@remote.example", "FAILURE", "rfc822;Orig@example.org")
    assert (m.attrs["dsn_envid"], m.attrs["dsn_ret"]) == ("E1", "HDRS")
    expansion, m = run(f"team@{HOST}", "SUCCESS")
    assert m.recipients[0].notify == "NEVER"
    expansion, m = run(f"team@{HOST}", "")
    assert m.recipients[0].notify == ""             # none given: the default applies
    expansion, m = run(f"list@{HOST}", "SUCCESS,DELAY")
    assert expansion == "delivered" and m.sender == f"owner-list@{HOST}"
    (far,) = m.recipients
    assert (far.notify, far.orcpt) == ("DELAY", "")
    assert "dsn_envid" not in m.attrs and "dsn_ret" not in m.attrs
    # .forward: expanded too; a plain mailbox delivery: no expansion
    with open(f"{area}/nobody.forward", "w") as f:
        f.write("far@remote.example\n")
    expansion, m = run(f"nobody@{HOST}", "SUCCESS")
    assert expansion == "expanded" and m.recipients[0].notify == "NEVER"
    os.unlink(f"{area}/nobody.forward")
    j = job(cfg, area)
    assert j.deliver(f"nobody@{HOST}", "SUCCESS").reason == "delivered to maildir"
    assert j.expansion is None
