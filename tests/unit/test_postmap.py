"""`postfix-py postmap`: Postfix's flags, output and exit codes, in process and through the
real command, side by side with Debian's /usr/sbin/postmap where it is installed."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postfix_py.lib import maincf, msg, tables
from postfix_py.tools import postmap

POSTFIX_PY = str(Path(sys.executable).parent / "postfix-py")
DEBIAN_POSTMAP = shutil.which("postmap", path="/usr/sbin:/usr/bin")
USAGE = ("postmap: fatal: usage: postmap [-bfFhimnNoprsuUvw] [-c config_dir] [-d key] "
         "[-q key] [map_type:]file...")

SOURCE = """\
# test table
Foo bar
foo: baz
key:value
Dup one
dup two
multi line
  continued here
"""


@pytest.fixture
def confdir(tmp_path, monkeypatch):
    monkeypatch.delenv("MAIL_CONFIG", raising=False)
    d = tmp_path / "conf"
    d.mkdir()
    (d / "main.cf").write_text("# defaults\n")
    return d


@pytest.fixture
def pm(confdir, capsys, monkeypatch):
    """Run postmap.main in process: returns (status, stdout, stderr)."""
    def run(*args, stdin=None):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        status = postmap.main(["-c", str(confdir), *map(str, args)])
        out = capsys.readouterr()
        return status, out.out, out.err
    yield run
    msg.close()


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "t"
    path.write_text(SOURCE)
    return path


# --- building and querying -------------------------------------------------------------

@pytest.mark.parametrize("type_,suffix", [("lmdb", ".lmdb"), ("hash", ".db")])
def test_build_then_query(pm, src, type_, suffix):
    status, out, err = pm(f"{type_}:{src}")
    assert (status, out) == (0, "")
    assert err.splitlines() == [
        f'postmap: warning: {src}, line 3: record is in "key: value" format; is this an alias file?',
        f"postmap: warning: {src}, line 4: expected format: key whitespace value",
        f'postmap: warning: {src}{suffix}: duplicate entry: "dup"',
    ]
    assert os.path.exists(f"{src}{suffix}")
    assert pm("-q", "FOO", f"{type_}:{src}") == (0, "bar\n", "")
    assert pm("-q", "multi", f"{type_}:{src}") == (0, "line  continued here\n", "")
    assert pm("-q", "nope", f"{type_}:{src}") == (1, "", "")


def test_bare_file_uses_default_database_type(pm, src, confdir):
    assert pm(src)[0] == 0
    assert os.path.exists(f"{src}.db") and not os.path.exists(f"{src}.lmdb")
    (confdir / "main.cf").write_text("default_database_type = lmdb\n")
    assert pm(src)[0] == 0
    assert os.path.exists(f"{src}.lmdb")
    assert pm("-q", "foo", src)[:2] == (0, "bar\n")


def test_dump_query_stdin_and_delete(pm, src):
    ref = f"hash:{src}"
    pm(ref)
    assert pm("-s", ref) == (0, "dup\tone\nfoo\tbar\nfoo:\tbaz\nmulti\tline  continued here\n", "")
    assert pm("-q", "-", ref, "inline:{extra=1}", stdin="FOO\nnope\nExtra\n") == (
        0, "FOO\tbar\nExtra\t1\n", "")
    assert pm("-q", "-", ref, stdin="nope\n") == (1, "", "")
    assert pm("-d", "FOO", ref) == (0, "", "")
    assert pm("-d", "foo", ref) == (1, "", "")
    assert pm("-d", "-", ref, stdin="dup\nnope\n") == (0, "", "")
    assert pm("-d", "-", ref, stdin="nope\n") == (1, "", "")
    assert pm("-s", ref)[1] == "foo:\tbaz\nmulti\tline  continued here\n"


def test_incremental_from_stdin(pm, src):
    ref = f"lmdb:{src}"
    pm(ref)
    status, out, err = pm("-i", ref, stdin="New v\nfoo other\nnovalue\n")
    assert status == 0
    assert err.splitlines() == [
        f'postmap: warning: {src}.lmdb: duplicate entry: "foo"',
        "postmap: warning: stdin, line 3: expected format: key whitespace value",
    ]
    assert pm("-q", "new", ref)[1] == "v\n"
    assert pm("-q", "foo", ref)[1] == "bar\n"
    assert pm("-ri", ref, stdin="foo other\n")[2] == ""
    assert pm("-q", "foo", ref)[1] == "other\n"


@pytest.mark.parametrize("flags,query,expected", [
    ("-r", "dup", "two"), ("-w", "dup", "one"), ("-N", "dup", "one"), ("-f", "Foo", "bar")])
def test_build_flags(pm, src, flags, query, expected):
    ref = f"hash:{src}"
    status, _, err = pm(flags, ref)
    assert status == 0
    assert ("duplicate entry" in err) == (flags == "-N")   # -f: Dup and dup differ
    q = ["-f"] if flags == "-f" else []
    assert pm(*q, "-q", query, ref)[:2] == (0, expected + "\n")
    if flags == "-f":
        assert pm("-q", "Foo", ref)[0] == 1            # the query key is folded, as Postfix


def test_modes_follow_the_source(pm, src):
    os.chmod(src, 0o640)
    pm(f"hash:{src}")
    assert stat.S_IMODE(os.stat(f"{src}.db").st_mode) == 0o640
    os.unlink(f"{src}.db")
    pm("-p", f"hash:{src}")
    assert stat.S_IMODE(os.stat(f"{src}.db").st_mode) == 0o644


def test_query_every_table_type(pm, tmp_path, src):
    rx = tmp_path / "r"
    rx.write_text("/^(.*)@example\\.com$/\tlocal $1\n")
    assert pm("-q", "FOO", f"texthash:{src}")[:2] == (0, "bar\n")
    assert pm("-q", "Joe@example.com", f"regexp:{rx}") == (0, "local Joe\n", "")
    assert pm("-q", "x", "inline:{ {x = a b}, y=z }") == (0, "a b\n", "")
    assert pm("-q", "anything", "static:{ a  b }") == (0, "a  b\n", "")
    assert pm("-s", "inline:{B=2, a=1}") == (0, "b\t2\na\t1\n", "")
    assert pm("-q", "a", "inline:{a=}") == (0, "\n",
        "postmap: warning: table inline:{a=}: key a: empty string result is not allowed\n"
        "postmap: warning: table inline:{a=} should return NO RESULT in case of NOT FOUND\n")


@pytest.mark.parametrize("args,message", [
    ([], USAGE),
    (["-q", "a"], USAGE),
    (["-Z", "x"], "postmap: invalid option -- 'Z'\n" + USAGE),
    (["-q"], "postmap: option requires an argument -- 'q'\n" + USAGE),
    (["-q", "a", "-d", "b", "x"], "postmap: fatal: specify only one of -s -q or -d"),
    (["-q", "a", "-s", "x"], "postmap: fatal: specify only one of -s or -q or -d"),
    (["-b", "-q", "-", "x"], "postmap: fatal: option -b is not supported by postfix-py postmap"),
    (["{tmp}/none"], "postmap: fatal: open {tmp}/none: No such file or directory"),
    (["-q", "k", "hash:{tmp}/none"],
     "postmap: fatal: open database {tmp}/none.db: No such file or directory"),
    (["-q", "k", "texthash:{tmp}/none"],
     "postmap: fatal: open database {tmp}/none: No such file or directory"),
    (["-q", "k", "regexp:{tmp}/none"], "postmap: fatal: open {tmp}/none: No such file or directory"),
    (["-q", "k", "nosuch:{tmp}/x"], "postmap: fatal: unsupported dictionary type: nosuch"),
    (["-q", "k", "hash:"],
     'postmap: fatal: open dictionary: expecting "type:name" form instead of "hash:"'),
    (["-q", "k", "inline:{}"],
     'postmap: fatal: bad syntax: "inline:{}"; need "inline:{name=value...}"'),
    (["texthash:{tmp}/t"],
     "postmap: fatal: unsupported dictionary type: texthash does not support bulk-mode creation."),
    (["inline:{a=b}"], "postmap: fatal: open {a=b}: No such file or directory"),
    (["-s", "static:x"], "postmap: fatal: table static:x: sequence operation is not supported"),
    (["-d", "k", "texthash:{tmp}/t"],
     "postmap: fatal: texthash:{tmp}/t map requires O_RDONLY access mode"),
    (["-d", "k", "hash:{tmp}/none"],
     "postmap: fatal: open database {tmp}/none.db: No such file or directory"),
])
def test_errors_are_one_fatal_line(pm, tmp_path, src, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    status, out, err = pm(*args)
    assert (status, out) == (1, "")
    assert err == message.replace("{tmp}", str(tmp_path)) + "\n"


def test_config_directory(tmp_path, src, capsys, monkeypatch):
    monkeypatch.delenv("MAIL_CONFIG", raising=False)
    assert postmap.main(["-c", str(tmp_path / "nowhere"), f"hash:{src}"]) == 1
    assert capsys.readouterr().err == (
        f"postmap: fatal: open {tmp_path}/nowhere/main.cf: No such file or directory\n")
    # Without -c, a missing main.cf means the built-in defaults.
    monkeypatch.setattr(maincf, "default_config_dir", lambda: str(tmp_path / "nowhere"))
    assert postmap.main([f"{src}"]) == 0
    assert os.path.exists(f"{src}.db")
    msg.close()


def test_berkeley_db_from_postfix_gets_a_clear_error(pm, src):
    if not DEBIAN_POSTMAP:
        pytest.skip("Debian's postfix is not installed")
    subprocess.run([DEBIAN_POSTMAP, f"hash:{src}"], check=True, timeout=10,
                   capture_output=True)
    status, out, err = pm("-q", "foo", f"hash:{src}")
    assert (status, out) == (1, "")
    assert err == (f"postmap: fatal: open database {src}.db: Berkeley DB format, made by "
                   f"Postfix's postmap; postfix-py serves hash tables from LMDB files: run "
                   f'"postfix-py postmap hash:{src}" to rebuild it from the source file\n')
    assert pm(f"hash:{src}")[0] == 0
    assert pm("-q", "foo", f"hash:{src}")[:2] == (0, "bar\n")


# --- the real command ----------------------------------------------------------------

def test_command_end_to_end(postfix_py, confdir, src):
    c = ["-c", confdir]
    r = postfix_py("postmap", *c, f"lmdb:{src}")
    assert r.returncode == 0 and r.stdout == ""
    assert f'{src}.lmdb: duplicate entry: "dup"' in r.stderr
    r = postfix_py("postmap", *c, "-q", "FOO", f"lmdb:{src}")
    assert (r.returncode, r.stdout, r.stderr) == (0, "bar\n", "")
    r = postfix_py("postmap", *c, "-q", "-", f"lmdb:{src}", input="foo\nnope\nmulti\n")
    assert (r.returncode, r.stdout) == (0, "foo\tbar\nmulti\tline  continued here\n")
    r = postfix_py("postmap", *c, "-q", "nope", f"lmdb:{src}")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")
    # -c given before the verb is passed on.
    r = postfix_py("-c", confdir, "postmap", "-d", "foo", f"lmdb:{src}")
    assert (r.returncode, r.stderr) == (0, "")
    r = postfix_py("postmap", *c, "-s", f"lmdb:{src}")
    assert r.stdout == "dup\tone\nfoo:\tbaz\nmulti\tline  continued here\n"


@pytest.mark.parametrize("args", [
    ["{tmp}/none"], ["-q", "k", "nosuch:x"], ["-q", "k", "hash:{tmp}/none"],
    ["-s", "regexp:{tmp}/t"], ["-q", "k", "hash:{tmp}/junk"], ["-Q"],
])
def test_command_failures_have_no_traceback(postfix_py, confdir, tmp_path, src, args):
    (tmp_path / "junk.db").write_bytes(b"\0" * 64)
    r = postfix_py("postmap", "-c", confdir, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[-1].startswith("postmap: fatal: ")
    assert "Traceback" not in r.stderr


def test_rebuild_by_command_is_seen_by_open_table(postfix_py, confdir, src):
    ref = f"hash:{src}"
    assert postfix_py("postmap", "-c", confdir, ref).returncode == 0
    msg.init_cli("test")
    with tables.open_table(ref) as t:
        assert t.lookup("foo") == "bar"
        src.write_text("foo rebuilt\n")
        assert postfix_py("postmap", "-c", confdir, ref).returncode == 0
        assert t.lookup("foo") == "rebuilt"
        assert t.lookup("multi") is None
        assert postfix_py("postmap", "-c", confdir, "-d", "foo", ref).returncode == 0
        assert t.lookup("foo") is None
    msg.close()


# --- against Debian's postmap -----------------------------------------------------------

INTEROP_TEXTHASH = """\
  leading line with a very long text, longer than thirty
Foo  bar baz  
foo: colon
key:value
Dup one
dup two
multi line
  # comment inside
  continued here

novalue
"""

INTEROP_REGEXP = r"""# regexp table
/^ABC$/i	case-sensitive
/^(foo)-(bar)$/	got $2.$1 $$ ${1} $(2)
/^(a)@z$|^(b)@z$/	a=[$1] b=[$2]
if /example\.com$/
/^admin@/	admin
  continued
if !/^x/
/^y/	y not x
endif
endif
IF /^t/
/^t/!/^tx/	t-not-tx
ENDIF
/unclosed	foo
/x/q	badflag
/nr/	$0 zero
/nn/	$a nonnum
/oor/	$2 outofrange
endif
random text
/^empty@/
/a b/x	bre
/^\(d\)e\1$/x	bre-group $1
/^x{2}$/	two-x
/^[[:digit:]]+@/	digits
/^[]z]@$/	bracket
/^a**$/	stars
/\<word/	wordstart
/^(g)(h)(i)(j)(k)(l)(m)(n)(o)(p)@/	$10
/^*a/	bad
/^j{2,1}$/	bad
/[z-a]/	bad
/^k{1}{2}$/	stacked
!/@/	no-at-sign
if /^q/
"""

INTEROP_KEYS = [
    "foo", "FOO", "Foo", "foo:", "key", "dup", "DUP", "multi", "novalue", "nope", "ABC",
    "abc", "foo-bar", "FOO-BAR", "a@z", "b@z", "admin@example.com", "y@example.com",
    "x@example.com", "t@q", "tx@q", "empty@x", "a b@", "ded", "xx", "xxx", "123@", "]@",
    "z@", "aaaa", "a", "wordstart@", "the word@", "ghijklmnop@", "kk", "q", "a b", "",
]


def _backdate(*paths):
    """Postfix's postmap waits a second or two on a file modified just now; avoid that."""
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


def _run_all(jobs):
    """Run (argv, stdin, cwd) jobs at once; Postfix sleeps a second before each fatal exit."""
    procs = []
    try:
        for argv, _, cwd in jobs:
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, cwd=cwd))
        results = []
        for proc, (_, stdin, _) in zip(procs, jobs):
            out, err = proc.communicate(stdin, timeout=30)
            results.append((proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _ours(confdir, *args):
    return [POSTFIX_PY, "postmap", "-c", str(confdir), *args]


@pytest.mark.skipif(not DEBIAN_POSTMAP, reason="Debian's postfix is not installed")
def test_query_answers_match_debian_postmap(confdir, tmp_path):
    (tmp_path / "t").write_text(INTEROP_TEXTHASH)
    (tmp_path / "r").write_text(INTEROP_REGEXP)
    _backdate(tmp_path / "t", tmp_path / "r")
    refs = ["texthash:t", "regexp:r", "static:{ every key }",
            "inline:{ foo=1, {multi = a b, c}, {\"q\" = quoted}, A=x }"]
    keys = "\n".join(INTEROP_KEYS) + "\n"
    jobs = []
    for ref in refs:
        jobs.append((["-q", "-", ref], keys))
        jobs += [(["-q", key, ref], "") for key in ("foo", "nope", "ghijklmnop@")]
    results = _run_all([(_ours(confdir, *args), stdin, tmp_path) for args, stdin in jobs] +
                       [([DEBIAN_POSTMAP, *args], stdin, tmp_path) for args, stdin in jobs])
    for (args, _), ours, real in zip(jobs, results[:len(jobs)], results[len(jobs):]):
        assert ours[:2] == real[:2], args
        # Postfix reopens a texthash table per key, repeating its warnings: compare sets.
        assert sorted(set(ours[2].splitlines())) == sorted(set(real[2].splitlines())), args


@pytest.mark.skipif(not DEBIAN_POSTMAP, reason="Debian's postfix is not installed")
def test_build_and_dump_match_debian_postmap(confdir, tmp_path):
    for d in ("ours", "real"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t").write_text(INTEROP_TEXTHASH)
        _backdate(tmp_path / d / "t")
    ours, real = _run_all([(_ours(confdir, "hash:t"), "", tmp_path / "ours"),
                           ([DEBIAN_POSTMAP, "hash:t"], "", tmp_path / "real")])
    assert ours == real            # same warnings, in the same order, with the same names
    jobs = [(["-s", "hash:t"], "ours"), (["-s", "texthash:t"], "ours")]
    results = _run_all([(_ours(confdir, *a), "", tmp_path / d) for a, d in jobs] +
                       [([DEBIAN_POSTMAP, *a], "", tmp_path / "real") for a, _ in jobs])
    for ours, real in zip(results[:2], results[2:]):
        assert ours[0] == real[0]
        assert sorted(ours[1].splitlines()) == sorted(real[1].splitlines())


ERROR_CASES = [
    [], ["-q", "a", "-d", "b", "t"], ["-q", "a", "-s", "t"], ["nonexist"],
    ["texthash:t"], ["-q", "k", "hash:nonexist"], ["-q", "k", "texthash:nonexist"],
    ["-q", "k", "regexp:nonexist"], ["-q", "k", "inline:{a=b"], ["-q", "k", "inline:{ }"],
    ["-q", "k", "inline:{a}"], ["-q", "k", "static:{a}x"], ["-q", "k", "hash:"],
    ["-d", "k", "texthash:t"], ["-s", "static:x"], ["-d", "k", "static:x"],
    ["-s", "regexp:t"], ["-q", "k", "static:"],
]


@pytest.mark.skipif(not DEBIAN_POSTMAP, reason="Debian's postfix is not installed")
def test_error_messages_match_debian_postmap(confdir, tmp_path):
    (tmp_path / "t").write_text("a b\n")
    _backdate(tmp_path / "t")
    results = _run_all([(_ours(confdir, *a), "", tmp_path) for a in ERROR_CASES] +
                       [([DEBIAN_POSTMAP, *a], "", tmp_path) for a in ERROR_CASES])
    for args, ours, real in zip(ERROR_CASES, results, results[len(ERROR_CASES):]):
        assert ours == real, args
