"""cidr: tables (lib/tables.CidrTable) as Postfix's dict_cidr: first match wins, IPv4 and
IPv6, !pattern, if/endif, Postfix's warnings for bad rules; the same answers as Debian's
postmap (Postfix 3.7) where it is installed, and through `postfix-py postmap -q`."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import pytest

from postfix_py.lib import msg
from postfix_py.lib.tables import open_table
from postfix_py.tools import postmap

DEBIAN_POSTMAP = shutil.which("postmap", path="/usr/sbin:/usr/bin")

TABLE = textwrap.dedent("""\
    # Rule order matters.
    192.168.1.1             OK
    192.168.0.0/16          REJECT
    2001:db8::1             OK
    2001:db8::/32           REJECT no
      v6 here
    [198.51.100.0]/24       BRACKETED
    [203.0.113.7]           ONE
    10.0.0.1/8              bad host bits
    1.2.3.4
    bogus                   X
    1.2.3.0/33              too long
    if 127.0.0.0/8
    127.0.0.2               LISTED
    if !127.0.0.0/24
    127.1.0.0/16            INNER
    endif
    endif
    !172.16.0.0/12          NOT-PRIVATE
    """)

CASES = [("192.168.1.1", "OK"), ("192.168.3.4", "REJECT"), ("2001:db8::1", "OK"),
         ("2001:DB8:0::5", "REJECT no  v6 here"), ("198.51.100.9", "BRACKETED"),
         ("203.0.113.7", "ONE"), ("127.0.0.2", "LISTED"), ("127.1.2.3", "INNER"),
         ("127.0.0.9", "NOT-PRIVATE"), ("172.16.0.1", None), ("8.8.8.8", "NOT-PRIVATE"),
         ("::1", None), ("foo.example", None), ("[8.8.8.8]", None),
         ("::ffff:192.168.1.1", None), ("10.1.1.1", "NOT-PRIVATE")]

WARNINGS = [
    'line 9: non-null host address bits in "10.0.0.1/8", perhaps you should use '
    '"10.0.0.0/8" instead: skipping this rule',
    "line 10: no lookup result: skipping this rule",
    'line 11: bad address pattern: "bogus": skipping this rule',
    'line 12: bad mask length in "1.2.3.0/33": skipping this rule']


@pytest.fixture(autouse=True)
def cli_messages():
    msg.init_cli("postmap")
    yield
    msg.close()


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "client.cidr"
    path.write_text(TABLE)
    return str(path)


def test_lookups_and_warnings(source, capsys):
    table = open_table(f"cidr:{source}")
    assert [table.lookup(k) for k, _ in CASES] == [v for _, v in CASES]
    err = capsys.readouterr().err
    for warning in WARNINGS:
        assert f"postmap: warning: cidr map {source}, {warning}" in err


@pytest.mark.skipif(not DEBIAN_POSTMAP, reason="Debian's postfix is not installed")
def test_same_answers_and_warnings_as_postfix(source, capsys):
    for key, value in CASES:
        out = subprocess.run([DEBIAN_POSTMAP, "-q", key, f"cidr:{source}"],
                             capture_output=True, text=True, timeout=10)
        assert (out.stdout.rstrip("\n") or None) == value, key
    for warning in WARNINGS:
        assert f"cidr map {source}, {warning}" in out.stderr


def test_unclosed_if_and_stray_endif(tmp_path, capsys):
    path = tmp_path / "t.cidr"
    path.write_text("endif\nif 10.0.0.0/8\n10.1.0.0/16 IN\n")
    table = open_table(f"cidr:{path}")
    assert table.lookup("10.1.2.3") == "IN"
    assert table.lookup("11.1.2.3") is None
    err = capsys.readouterr().err
    assert f"cidr map {path}, line 1: ENDIF without IF: skipping this rule" in err
    assert f"cidr map {path}, line 2: IF has no matching ENDIF" in err


def test_a_changed_file_is_reloaded(source):
    table = open_table(f"cidr:{source}")
    assert table.lookup("192.0.2.1") == "NOT-PRIVATE"
    with open(source, "w") as f:
        f.write("192.0.2.0/24 CHANGED\n")
    assert table.lookup("192.0.2.1") == "CHANGED"


def test_postmap_query(source, tmp_path, capsys):
    (tmp_path / "main.cf").write_text("")
    assert postmap.main(["-c", str(tmp_path), "-q", "192.168.7.7", f"cidr:{source}"]) == 0
    assert capsys.readouterr().out == "REJECT\n"
    assert postmap.main(["-c", str(tmp_path), "-q", "172.16.0.1", f"cidr:{source}"]) == 1
