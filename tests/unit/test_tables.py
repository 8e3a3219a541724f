"""Unit tests for postfix_py.lib.tables: every table type, postmap's source format, the
LMDB files (atomic replacement, modes, Berkeley DB refusal) and readers that see a rebuilt
table without reopening it, also from another process."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from postfix_py.lib import msg, posix_regex, table_writer, tables
from postfix_py.lib.tables import TableError, open_table

DEBIAN_POSTMAP = shutil.which("postmap", path="/usr/sbin:/usr/bin")


@pytest.fixture(autouse=True)
def cli_messages():
    """Warnings go to stderr as `postmap: warning: ...`, where capsys sees them."""
    msg.init_cli("postmap")
    yield
    msg.close()


def warnings_of(capsys) -> list[str]:
    return [l for l in capsys.readouterr().err.splitlines() if l]


def write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def lookup(ref: str, *keys, **kw):
    with open_table(ref, **kw) as t:
        return [t.lookup(k) for k in keys]


# --- postmap source format -----------------------------------------------------------

def test_logical_lines_join_continuations_across_comments_and_blank_lines(tmp_path, capsys):
    text = "k1 v\n  more\n\n  # note\n   \n\tcont after blank\nk2 x\r\n# end\n"
    assert tables.logical_lines(text, "src") == [
        (1, "k1 v  more\tcont after blank"), (7, "k2 x\r")]
    assert warnings_of(capsys) == []


def test_leading_whitespace_at_top_is_warned_and_skipped(capsys):
    text = "  leading cont with a very long text here that exceeds thirty\n  more\nk v\n"
    assert tables.logical_lines(text, "src") == [(3, "k v")]
    assert warnings_of(capsys) == [
        'postmap: warning: src: logical line must not start with whitespace: '
        '"  leading cont with a very lon..."']


def test_source_pairs_warn_like_postfix(capsys):
    text = "Foo  bar  baz  \t\nfoo: x\nkey:value\nnovalue\n\nalone\n  value on next line\n"
    assert list(tables.source_pairs(text, "t")) == [
        (1, "Foo", "bar  baz"), (2, "foo:", "x"), (6, "alone", "value on next line")]
    assert warnings_of(capsys) == [
        'postmap: warning: t, line 2: record is in "key: value" format; is this an alias file?',
        "postmap: warning: t, line 3: expected format: key whitespace value",
        "postmap: warning: t, line 4: expected format: key whitespace value",
    ]


# --- indexed tables: lmdb, hash, btree -------------------------------------------------

SOURCE = """\
# aliases-like test table
Foo bar
foo: baz
key:value
Dup one
dup two
multi line
  continued here
"""


@pytest.mark.parametrize("type_,suffix", [("lmdb", ".lmdb"), ("hash", ".db"), ("btree", ".db")])
def test_build_and_lookup_folds_keys(tmp_path, capsys, type_, suffix):
    src = write(tmp_path / "t", SOURCE)
    assert table_writer.build(f"{type_}:{src}") == 4
    path = src + suffix
    with open(path, "rb") as f:
        assert f.read(20)[16:20] == (0xBEEFC0DE).to_bytes(4, "little")   # LMDB, not BDB
    assert lookup(f"{type_}:{src}", "foo", "FOO", "dup", "multi", "key", "nope") == [
        "bar", "bar", "one", "line  continued here", None, None]
    err = warnings_of(capsys)
    assert f'postmap: warning: {path}: duplicate entry: "dup"' in err
    assert f"postmap: warning: {src}, line 4: expected format: key whitespace value" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temp files


def test_fold_false_keeps_case_and_folded_queries_miss(tmp_path):
    src = write(tmp_path / "t", "MiXed v\n")
    table_writer.build(f"lmdb:{src}", fold=False)
    assert lookup(f"lmdb:{src}", "MiXed", fold=False) == ["v"]
    assert lookup(f"lmdb:{src}", "MiXed", "mixed") == [None, None]    # as Postfix's -f


@pytest.mark.parametrize("mode,expected,warned", [
    ("warn", "one", True), ("replace", "two", False), ("ignore", "one", False)])
def test_duplicate_policies(tmp_path, capsys, mode, expected, warned):
    src = write(tmp_path / "t", "dup one\nDUP two\n")
    table_writer.build(f"hash:{src}", duplicates=mode)
    assert lookup(f"hash:{src}", "dup") == [expected]
    assert bool(warnings_of(capsys)) == warned


def test_items_and_null_terminated_entries(tmp_path):
    src = write(tmp_path / "t", "b 2\na 1\n")
    table_writer.build(f"lmdb:{src}", null=True)
    with open_table(f"lmdb:{src}") as t:
        assert t.items() == [("a", "1"), ("b", "2")]
        assert t.lookup("A") == "1"


def test_incremental_and_delete(tmp_path, capsys):
    import io
    src = write(tmp_path / "t", "a 1\nb 2\n")
    ref = f"lmdb:{src}"
    table_writer.build(ref)
    table_writer.build(ref, stream=io.StringIO("c 3\nA 9\n"), incremental=True)
    assert f'{src}.lmdb: duplicate entry: "a"' in capsys.readouterr().err
    assert lookup(ref, "a", "b", "c") == ["1", "2", "3"]
    assert table_writer.delete(ref, ["B", "nope"]) == ["B"]
    assert table_writer.delete(ref, ["b"]) == []
    assert lookup(ref, "a", "b", "c") == ["1", None, "3"]


def test_incremental_creates_a_missing_table(tmp_path):
    import io
    ref = f"hash:{tmp_path / 'new'}"
    assert table_writer.build(ref, stream=io.StringIO("k v\n"), incremental=True) == 1
    assert lookup(ref, "k") == ["v"]


def test_long_key_fails_and_keeps_the_old_table(tmp_path):
    src = write(tmp_path / "t", "k old\n")
    table_writer.build(f"hash:{src}")
    write(tmp_path / "t", "k new\n" + "x" * 600 + " v\n")
    with pytest.raises(TableError, match=r"t, line 2: key is longer than LMDB's 511 bytes"):
        table_writer.build(f"hash:{src}")
    assert lookup(f"hash:{src}", "k", "x" * 600) == ["old", None]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_map_grows_when_full(tmp_path, monkeypatch):
    src = tmp_path / "t"
    src.write_text("".join(f"key{i} {'v' * 200}{i}\n" for i in range(2000)))
    monkeypatch.setattr(table_writer, "_initial_map_size", lambda items, size: 65536)
    assert table_writer.build(f"lmdb:{src}", cfg={"lmdb_map_size": 65536}) == 2000
    assert lookup(f"lmdb:{src}", "KEY1999") == ["v" * 200 + "1999"]


def test_new_file_takes_source_permissions_and_keeps_existing_mode(tmp_path):
    src = write(tmp_path / "t", "k v\n")
    os.chmod(src, 0o640)
    table_writer.build(f"hash:{src}")
    assert stat.S_IMODE(os.stat(src + ".db").st_mode) == 0o640
    os.chmod(src + ".db", 0o600)
    table_writer.build(f"hash:{src}")
    assert stat.S_IMODE(os.stat(src + ".db").st_mode) == 0o600     # replaced, mode kept
    os.unlink(src + ".db")
    table_writer.build(f"hash:{src}", inherit_mode=False)
    assert stat.S_IMODE(os.stat(src + ".db").st_mode) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_gives_the_table_to_the_source_owner(tmp_path):
    src = write(tmp_path / "t", "k v\n")
    os.chown(src, 65534, 65534)
    table_writer.build(f"lmdb:{src}")
    st = os.stat(src + ".lmdb")
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    os.unlink(src + ".lmdb")
    table_writer.build(f"lmdb:{src}", as_owner=False)
    assert os.stat(src + ".lmdb").st_uid == 0


def test_missing_database_and_source(tmp_path):
    with pytest.raises(TableError, match=r"^open database .*/none\.db: No such file or directory$"):
        open_table(f"hash:{tmp_path}/none")
    with pytest.raises(TableError, match=r"^open .*/none: No such file or directory$"):
        table_writer.build(f"hash:{tmp_path}/none")


def test_not_lmdb_file_is_refused_with_the_remedy(tmp_path):
    (tmp_path / "junk.lmdb").write_bytes(b"garbage" * 10)
    with pytest.raises(TableError, match=r'not an LMDB file: run "postfix-py postmap lmdb:'):
        open_table(f"lmdb:{tmp_path}/junk")


@pytest.mark.skipif(not DEBIAN_POSTMAP, reason="Debian's postfix is not installed")
@pytest.mark.parametrize("type_", ["hash", "btree"])
def test_berkeley_db_from_postfix_is_refused_clearly(tmp_path, type_):
    src = write(tmp_path / "t", "k v\n")
    subprocess.run([DEBIAN_POSTMAP, f"{type_}:{src}"], check=True, timeout=10)
    ref = f"{type_}:{src}"
    with pytest.raises(TableError) as info:
        open_table(ref)
    assert str(info.value) == (
        f"open database {src}.db: Berkeley DB format, made by Postfix's postmap; postfix-py "
        f'serves {type_} tables from LMDB files: run "postfix-py postmap {ref}" to rebuild '
        f"it from the source file")
    with pytest.raises(TableError, match="Berkeley DB"):
        table_writer.delete(ref, ["k"])
    table_writer.build(ref)                      # the remedy: replaces the Berkeley DB file
    assert lookup(ref, "k") == ["v"]


def test_stale_database_is_warned(tmp_path, capsys):
    src = write(tmp_path / "t", "k v\n")
    table_writer.build(f"hash:{src}")
    old = time.time() - 1000
    os.utime(src + ".db", (old, old))
    os.utime(src, (old + 500, old + 500))
    lookup(f"hash:{src}", "k")
    assert warnings_of(capsys) == [
        f"postmap: warning: database {src}.db is older than source file {src}"]


# --- a reader sees a rebuilt table -----------------------------------------------------

def test_open_table_sees_rebuilt_file(tmp_path):
    src = write(tmp_path / "t", "k old\n")
    ref = f"lmdb:{src}"
    table_writer.build(ref)
    with open_table(ref) as t:
        assert t.lookup("k") == "old"
        old_env = t._env
        write(tmp_path / "t", "k new\nextra 1\n")
        table_writer.build(ref)
        assert t.lookup("k") == "new"
        assert t.lookup("extra") == "1"
        assert t._env is not old_env
        table_writer.delete(ref, ["extra"])
        assert t.lookup("extra") is None
        os.unlink(src + ".lmdb")           # gone: the open snapshot keeps answering
        assert t.lookup("k") == "new"


def test_replacement_by_bad_file_is_a_lookup_error_then_recovers(tmp_path):
    src = write(tmp_path / "t", "k v\n")
    table_writer.build(f"hash:{src}")
    with open_table(f"hash:{src}") as t:
        (tmp_path / "bad").write_bytes(b"x" * 100)
        os.replace(tmp_path / "bad", src + ".db")
        with pytest.raises(TableError, match="not an LMDB file"):
            t.lookup("k")
        table_writer.build(f"hash:{src}")
        assert t.lookup("k") == "v"


def test_texthash_and_regexp_reload_on_change(tmp_path):
    src = write(tmp_path / "t", "k old\n")
    rx = write(tmp_path / "r", "/^k/ old\n")
    with open_table(f"texthash:{src}") as t, open_table(f"regexp:{rx}") as r:
        assert (t.lookup("k"), r.lookup("k")) == ("old", "old")
        write(tmp_path / "t", "k new, longer\n")
        write(tmp_path / "r", "/^k/ new, longer\n")
        assert (t.lookup("k"), r.lookup("k")) == ("new, longer", "new, longer")


READER = r"""
import os, sys, time
from postfix_py.lib import tables
ref, stop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen, lookups = set(), 0
deadline = time.monotonic() + 20
with tables.open_table(ref) as t:
    print("ready", flush=True)
    while True:
        done = os.path.exists(stop)
        for i in range(0, n, 7):
            value = t.lookup(f"key{i}")
            if value is None or not value.startswith(f"v{i}."):
                print(f"BAD key{i} {value!r}", flush=True)
                sys.exit(1)
            seen.add(value.split(".", 1)[1])
            lookups += 1
        if done or time.monotonic() > deadline:
            break
    print("last", t.lookup("key0").split(".", 1)[1], len(seen), lookups, flush=True)
"""


def test_reader_process_never_misses_during_rebuilds(tmp_path):
    n, rebuilds = 300, 30
    src = tmp_path / "t"
    ref = f"hash:{src}"

    def generation(gen):
        src.write_text("".join(f"key{i} v{i}.{gen}\n" for i in range(n)))
        table_writer.build(ref)

    generation(0)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    stop = tmp_path / "stop"
    with subprocess.Popen([sys.executable, str(script), ref, str(stop), str(n)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "ready"
            for gen in range(1, rebuilds + 1):
                generation(gen)
            stop.touch()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out + err
    last, seen, lookups = out.split()[1:]
    assert last == str(rebuilds)           # the final table, seen without reopening
    assert int(seen) >= 2 and int(lookups) > 0, out


def test_concurrent_writers_lose_no_update(tmp_path):
    import io
    import threading
    ref = f"lmdb:{tmp_path / 't'}"
    errors = []

    def writer(name):
        try:
            for i in range(15):
                table_writer.build(ref, stream=io.StringIO(f"{name}{i} v\n"), incremental=True)
        except Exception as exc:          # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open_table(ref) as t:
        assert len(t.items()) == 30


def test_two_tables_on_one_file_share_it(tmp_path):
    src = write(tmp_path / "t", "k v\n")
    table_writer.build(f"btree:{src}")
    with open_table(f"btree:{src}") as a, open_table(f"hash:{src}") as b:
        assert a.lookup("k") == b.lookup("k") == "v"
        assert table_writer.delete(f"hash:{src}", ["k"]) == ["k"]
        assert a.lookup("k") is None
    assert tables._ENVS == {}


# --- texthash --------------------------------------------------------------------------

def test_texthash_folds_keeps_first_and_warns_like_postfix(tmp_path, capsys):
    src = write(tmp_path / "t", "foo bar\nFoo baz\nfoo: x\nnovalue\nMixed Case Value\n")
    with open_table(f"texthash:{src}") as t:
        assert [t.lookup(k) for k in ("FOO", "mixed", "foo:", "novalue")] == [
            "bar", "Case Value", "x", None]
        assert t.items() == [("foo", "bar"), ("foo:", "x"), ("mixed", "Case Value")]
    assert warnings_of(capsys) == [
        f'postmap: warning: {src}, line 2: duplicate entry: "Foo"',
        f'postmap: warning: {src}, line 3: record is in "key: value" format; is this an alias file?',
        f"postmap: warning: {src}, line 4: expected format: key whitespace value -- ignoring this line",
    ]


def test_texthash_missing_file():
    with pytest.raises(TableError, match='^open database /nonexistent/x: No such file'):
        open_table("texthash:/nonexistent/x")


# --- inline and static -----------------------------------------------------------------

@pytest.mark.parametrize("ref,key,value", [
    ("inline:{a=b}", "A", "b"),
    ("inline:{A=b}", "a", "b"),
    ("inline:{ {a = text with  spaces } }", "a", "text with  spaces"),
    ("inline:{ { a = b } }", "a", "b"),
    ("inline:{ {a = b,c}, d=e }", "a", "b,c"),
    ("inline:{ {a = b,c}, d=e }", "d", "e"),
    ("inline:{a=b c=d}", "c", "d"),
    ("inline:{a=b;c=d}", "a", "b;c=d"),
    ("inline:{a=b=c}", "a", "b=c"),
    ("inline:{a=b,a=c}", "a", "c"),
    ("inline:{a=b,,c=d}", "c", "d"),
    ("inline:{a={x}}", "a", "{x}"),
    ('inline:{{"x y" = z}}', '"x y"', "z"),
    ("inline:{\ta=b\t}", "a", "b"),
    ("inline:{=b}", "a", None),
    ("inline:{a=b}", "b", None),
    ("static:foo", "anything", "foo"),
    ("static:{ a  b }", "x", "a  b"),
    ("static:a b", "x", "a b"),
    ("static:}", "x", "}"),
])
def test_inline_and_static_lookups_match_postfix(ref, key, value):
    assert lookup(ref, key) == [value]


@pytest.mark.parametrize("ref,key,value", [
    ("regexp:{{/^[^A-Z]/ Bogus}}", "1abc", "Bogus"),    # smtpd_forbidden_commands
    ("regexp:{{/^[^A-Z]/ Bogus}}", "bogus", None),       # case-insensitive by default
    ("regexp:{ {/^a(.)/ x$1}, {/c/ y} }", "abz", "xb"),
    ("regexp:{ {/^a(.)/ x$1}, {/c/ y} }", "c", "y"),
    ("pcre:{ {/^(?<n>b)/ p$1} ,{/q/ r}}", "bz", "pb"),
    ("cidr:{ {127.0.0.0/8 lo}, {::1 lo6} }", "127.1.2.3", "lo"),
    ("cidr:{ {127.0.0.0/8 lo}, {::1 lo6} }", "::1", "lo6"),
    ("regexp:{}", "x", None),
])
def test_inline_rule_tables(ref, key, value):
    """Postfix 3.7's regexp:{ {rule}, ... } (dict_stream_open), also pcre: and cidr:."""
    assert lookup(ref, key) == [value]


@pytest.mark.parametrize("ref,error", [
    ("regexp:{{/a/ b}", "regexp map: missing '}' in \"{{/a/ b}\""),
    ("pcre:{ {/a/ b}x }", "pcre map: syntax error after '}' in \"{/a/ b}x\""),
])
def test_inline_rule_table_errors(ref, error):
    with pytest.raises(TableError) as info:
        open_table(ref)
    assert str(info.value) == error


NEED = '; need "inline:{name=value...}"'


@pytest.mark.parametrize("ref,error", [
    ("inline:{}", 'bad syntax: "inline:{}"' + NEED),
    ("inline:{a=b", 'bad syntax: "inline:{a=b"' + NEED),
    ("inline:a=b", 'bad syntax: "inline:a=b"' + NEED),
    ("inline:{a=b}x", 'bad syntax: "inline:{a=b}x"' + NEED),
    ("inline:{ }", 'empty table: "inline:{ }"' + NEED),
    ("inline:{ , }", 'empty table: "inline:{ , }"' + NEED),
    ("inline:{a}", "missing '=' after attribute name: \"inline:{a}\"" + NEED),
    ("inline:{ a = b }", "missing '=' after attribute name: \"inline:{ a = b }\"" + NEED),
    ("inline:{ { } }", 'no key found; expected format: key = value: "inline:{ { } }"' + NEED),
    ("inline:{{x}={y}}", "syntax error after '}' in \"{x}={y}\": \"inline:{{x}={y}}\"" + NEED),
    ('inline:{"a=b}', "unbalanced '\"': \"inline:{\"a=b}\"" + NEED),
    ("static:{a b", "bad static:name syntax: missing '}' in \"{a b\""),
    ("static:{a}x", "bad static:name syntax: syntax error after '}' in \"{a}x\""),
    ("static:", 'open dictionary: expecting "type:name" form instead of "static:"'),
    (":x", 'open dictionary: expecting "type:name" form instead of ":x"'),
    ("hash", 'open dictionary: expecting "type:name" form instead of "hash"'),
    ("nosuchtype:x", "unsupported dictionary type: nosuchtype"),
    ("mysql:/etc/x.cf", "unsupported dictionary type: mysql"),
    ("proxy:hash:/etc/x", "unsupported dictionary type: proxy"),
])
def test_reference_errors(ref, error):
    with pytest.raises(TableError) as info:
        open_table(ref)
    assert str(info.value) == error
    assert isinstance(info.value, ValueError)


def test_items_not_supported_and_read_only_types(tmp_path):
    with open_table("static:x") as t, pytest.raises(
            TableError, match=r"^table static:x: sequence operation is not supported$"):
        t.items()
    with pytest.raises(TableError, match=r"^table static:x: delete operation is not supported$"):
        table_writer.delete("static:x", ["k"])
    with pytest.raises(TableError, match=r"^inline:\{a=b\} map requires O_RDONLY access mode$"):
        table_writer.delete("inline:{a=b}", ["a"])
    src = write(tmp_path / "t", "a b\n")
    with pytest.raises(TableError, match="^unsupported dictionary type: texthash does not "
                                         "support bulk-mode creation.$"):
        table_writer.build(f"texthash:{src}")


# --- regexp ----------------------------------------------------------------------------

REGEXP = r"""
# comment
/^ABC$/i	case-sensitive
/^(foo)-(bar)$/	got $2.$1 $$ ${1} $(2)
/^(a)@z$|^(b)@z$/	a=[$1] b=[$2]
if /example\.com$/
/^admin@/	admin of
  example
if !/^x/
/^y/	y not x
endif
endif
IF /^t/
/^t/!/^tx/	t-not-tx
/^t/ !/^tx/ t-space
ENDIF
!/@/	no-at-sign
/a b/x	bre-literal
/^\(d\)e\1$/x	bre $1
/^c\+$/x	bre-plus
/^x{2}$/	two-x
/^[[:digit:]]+@/	digits
/^[]z]@$/	bracket
/^m@/m	multi
/^(g)(h)(i)(j)(k)(l)(m)(n)(o)(p)@/	$10
/^empty@/
"""


@pytest.mark.parametrize("key,value", [
    ("ABC", "case-sensitive"), ("abc", "no-at-sign"),
    ("foo-bar", "got bar.foo $ foo bar"), ("FOO-BAR", "got BAR.FOO $ FOO BAR"),
    ("a@z", "a=[a] b=[]"), ("b@z", "a=[] b=[b]"),
    ("admin@example.com", "admin of  example"), ("y@example.com", "y not x"),
    ("x@example.com", None), ("yx@example.org", None),
    ("t@q", "t-not-tx"), ("tx@q", "!/^tx/ t-space"),
    ("noat", "no-at-sign"), ("xa b@", "bre-literal"), ("ded@", None),
    ("ccc@", None), ("xx@", None), ("123@", "digits"), ("]@", "bracket"), ("z@", "bracket"),
    ("m@", "multi"), ("ghijklmnop@", "p"), ("empty@x", "")
])
def test_regexp_semantics(tmp_path, capsys, key, value):
    rx = write(tmp_path / "r", REGEXP)
    assert lookup(f"regexp:{rx}", key) == [value]
    line = REGEXP.splitlines().index("/^empty@/") + 1
    assert warnings_of(capsys) == [
        f"postmap: warning: regexp map {rx}, line {line}: no replacement text: using empty string"]


def test_regexp_bre_and_anchors(tmp_path):
    rx = write(tmp_path / "r", r"""
        /^\(d\)e\1$/x	bre $1
        /^c\+$/x	bre-plus
        /^x{2}$/	two-x
        /^o{2}$/x	o-brace
        /^r$s$/x	bre-dollar
        /\<word/	wordstart
        """)
    assert lookup(f"regexp:{rx}", "ded", "ccc", "xx", "o{2}", "r$s", "a word") == [
        "bre d", "bre-plus", "two-x", "o-brace", "bre-dollar", "wordstart"]


def test_regexp_key_is_not_folded(tmp_path):
    rx = write(tmp_path / "r", "/^ABC$/i upper\n/^abc$/i lower\n")
    assert lookup(f"regexp:{rx}", "ABC", "abc", "Abc") == ["upper", "lower", None]


@pytest.mark.parametrize("line,warning", [
    ("/unclosed foo", 'no closing regexp delimiter "/": skipping this rule'),
    ("/x/q badflag", 'unknown regexp option "q": skipping this rule'),
    ("/nr/ $0 zero", 'out-of-range replacement index "0"'),
    ("/nn/ $a nonnum", 'non-numeric replacement index "a"'),
    ("/oor/ $2 x", 'out of range replacement index "2": skipping this rule'),
    ("!/(a)/ $1", "$number found in negative match replacement text: skipping this rule"),
    ("!", "no regexp: skipping this rule"),
    ("endif", "ignoring ENDIF without matching IF"),
    ("random text", "ignoring unrecognized request"),
    ("/bad(/ x", r"Unmatched ( or \("),
    ("/^*a/ x", "Invalid preceding regular expression"),
    ("/a{2,1}/ x", r"Invalid content of \{\}"),
    ("/x{/ x", r"Unmatched \{"),
    ("/[[:foo:]]/ x", "Invalid character class name"),
    ("/[z-a]/ x", "Invalid range end"),
    ("/[abc/ x", "Unmatched [, [^, [:, [., or [="),
    (r"/a\1/ x", "Invalid back reference"),
    ("if /o/", "IF has no matching ENDIF"),
])
def test_regexp_bad_lines_warn_with_file_and_line(tmp_path, capsys, line, warning):
    rx = write(tmp_path / "r", f"# first\n{line}\n/^good$/ ok\n")
    with open_table(f"regexp:{rx}") as t:
        assert t.lookup("good") == "ok"
    assert f"postmap: warning: regexp map {rx}, line 2: {warning}" in warnings_of(capsys)


def test_regexp_replacement_syntax_warnings(tmp_path, capsys):
    rx = write(tmp_path / "r", "/(a)/ x$\n/(b)/ ${1\n")
    lookup(f"regexp:{rx}", "a")
    assert warnings_of(capsys) == [
        'postmap: warning: empty macro name: "x$"',
        f"postmap: warning: regexp map {rx}, line 1: bad replacement syntax: skipping this rule",
        'postmap: warning: truncated macro reference: "${1"',
        f"postmap: warning: regexp map {rx}, line 2: bad replacement syntax: skipping this rule",
    ]


def test_regexp_if_extra_text_and_endif_junk(tmp_path, capsys):
    rx = write(tmp_path / "r", "if /^a/ junk\n/b/ ab\nendif junk\n")
    assert lookup(f"regexp:{rx}", "ab", "b") == ["ab", None]
    assert warnings_of(capsys) == [
        f'postmap: warning: regexp map {rx}, line 1: ignoring extra text after IF statement: "junk"',
        f"postmap: warning: regexp map {rx}, line 1: do not prepend whitespace to statements between IF and ENDIF",
        f"postmap: warning: regexp map {rx}, line 3: ignoring extra text after ENDIF",
    ]


@pytest.mark.parametrize("posix,extended,python", [
    (r"a**", True, r"(?:a*)*"),
    (r"a*?", True, r"(?:a*)?"),
    (r"[\.]", True, r"[\\\.]"),
    (r"[]a-]", True, r"[\]a\-]"),
    (r"[^[:digit:]x]", True, r"[^0-9x]"),
    (r"a{,2}", True, r"a{0,2}"),
    (r"(a)\1$", True, r"(a)(?:\1)\Z"),
    (r"f)", True, r"f\)"),
    (r"\(a\)*\{2\}", False, r"(?:(a)*){2}"),
    (r"*a^b$c$", False, r"\*a\^b\$c\Z"),
    (r"a|b+?", False, r"a\|b\+\?"),
])
def test_posix_translation(posix, extended, python):
    assert posix_regex.posix_to_python(posix, extended) == python


# --- pcre ------------------------------------------------------------------------------

def test_pcre_uses_python_re(tmp_path, capsys):
    rx = write(tmp_path / "p", r"""
        /^(?<user>[^@]+)@example\.com$/	user $1
        /^\d+$/	digits
        /^CASE$/i	exact
        /^a.b$/s	dotall
        /^anch/A	anchored
        /x/U	ungreedy
        /(unclosed/	bad
        """)
    assert lookup(f"pcre:{rx}", "joe@example.com", "123", "CASE", "case", "a\nb", "anchor") == [
        "user joe", "digits", "exact", None, "dotall", "anchored"]
    err = warnings_of(capsys)
    assert err[0] == (f'postmap: warning: pcre map {rx}, line 7: regexp option "U" is not '
                      f"supported by postfix-py: skipping this rule")
    assert err[1].startswith(f"postmap: warning: pcre map {rx}, line 8: error in regex at "
                             f"offset 0: missing ), unterminated subpattern")


def test_writable_open_is_a_cache_file_shared_in_place(tmp_path):
    """open_table(writable=True): created when missing, with a lock file; two tables of
    one file in a process share it; a write is seen at once by the other; read-only
    types are refused as Postfix refuses O_RDWR."""
    a = open_table(f"btree:{tmp_path}/cache", fold=False, writable=True)
    b = open_table(f"btree:{tmp_path}/cache", fold=False, writable=True)
    try:
        assert (tmp_path / "cache.db").exists() and (tmp_path / "cache.db-lock").exists()
        assert stat.S_IMODE((tmp_path / "cache.db").stat().st_mode) == 0o600
        assert a.iterable and a.lookup("2001:DB8::1") is None
        assert a.update("2001:DB8::1", "v1") and b.lookup("2001:DB8::1") == "v1"
        assert b.lookup("2001:db8::1") is None                      # fold=False
        assert a.update("k" * 512, "x") is False                    # LMDB's key limit
        assert b.items() == [("2001:DB8::1", "v1")]
        assert b.delete("2001:DB8::1") and not a.delete("2001:DB8::1")
    finally:
        a.close()
        b.close()
    with open_table(f"btree:{tmp_path}/cache", writable=True) as again:
        assert again.items() == []
    for ref in (f"regexp:{tmp_path}/r", "static:x", f"cidr:{tmp_path}/c", "inline:{a=b}"):
        with pytest.raises(TableError, match="map requires O_RDONLY access mode"):
            open_table(ref, writable=True)
    assert not open_table("static:x").iterable
    (tmp_path / "bdb.db").write_bytes(b"\0" * 12 + (0x053162).to_bytes(4, "little") +
                                      b"\0" * 64)
    with pytest.raises(TableError, match="not an LMDB file"):
        open_table(f"hash:{tmp_path}/bdb", writable=True)
