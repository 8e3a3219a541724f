"""Fuzzing every table reader of lib/tables.py: texthash:, regexp: and pcre: sources,
inline: and static: names, and lmdb:/hash: tables built by postmap's build() from any
source text.

Whatever the source, opening a table and looking keys up raises nothing but TableError;
bad lines and bad rules are warnings that name the file and line (collected here, never
raised); a lookup answers a string or None. bench/fuzz_long.py runs the same properties
longer.
"""

from __future__ import annotations

import contextlib
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import msg, posix_regex, table_writer, tables
from postfix_py.lib.tables import TableError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])
KEYS = st.lists(st.one_of(st.sampled_from(["", "a", "user@example.com", "example.com", "A",
                                           "127.0.0.1", "\u00e9", "aaaaaaaaaa", "x" * 600]),
                          st.text(max_size=10)), min_size=1, max_size=6)


@contextlib.contextmanager
def warnings_collected():
    """Log lines (formatted) instead of stderr."""
    lines: list[str] = []
    saved = msg._write
    msg.init_cli("postmap")
    msg._write = lambda stream, line: lines.append(line)
    try:
        yield lines
    finally:
        msg._write = saved
        msg.close()


def check_warnings(lines: list[str], path: str | None = None) -> None:
    for line in lines:
        assert line.startswith("postmap: warning: "), line
        assert "Traceback" not in line


def look_up(table, keys) -> None:
    for key in keys:
        value = table.lookup(key)
        assert value is None or isinstance(value, str)


# --- source files: texthash, regexp, pcre ----------------------------------------------------

REGEX_PIECES = st.sampled_from([
    "/", "!", "/i", "/m", "/x", "/s", "/A", "/E", "/U", "/X", "/q", "(", ")", "[", "]", "[:alpha:]",
    "[[:digit:]]", "[.a.]", "[=a=]", "{", "}", "{2}", "{,3}", "{2,1}", "{99999}", "*", "+", "?",
    "**", "|", "^", "$", "\\", "\\1", "\\(", "\\)", "\\{", "\\w", "\\<", "(?<n>a)", "(?P<x>",
    "$1", "${1}", "$(2)", "$$", "$9", "$", "a", ".", " ", "\t", "OK", "REJECT x", "if", "endif",
    "IF", "ENDIF", "#"])
RULE = st.lists(st.one_of(REGEX_PIECES, st.text(max_size=4)), max_size=12).map("".join)


@st.composite
def regexp_source(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            lines.append("if " + draw(RULE))
        elif kind == 1:
            lines.append("endif" + draw(st.sampled_from(["", " x", "  "])))
        elif kind == 2:
            lines.append(draw(st.sampled_from([" ", "\t", "#"])) + draw(RULE))
        elif kind == 3:
            lines.append(draw(st.text(max_size=30)))
        else:
            delim = draw(st.sampled_from(["/", "|", "#", "!", "a"]))
            lines.append(draw(st.sampled_from(["", "!"])) + delim + draw(RULE) + delim +
                         draw(st.sampled_from(["", "i", "x", "m", "s", "A", "q", "!/b/"])) +
                         " " + draw(RULE))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@st.composite
def map_source(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(st.text(max_size=30)))
        elif kind == 1:
            lines.append(" " + draw(st.text(max_size=10)))                 # continuation
        elif kind == 2:
            lines.append(draw(st.sampled_from(["a:", "user@example.com", "x" * 600,
                                               "127.0.0.1"])) + " " + draw(st.text(max_size=9)))
        else:
            key = draw(st.text(st.characters(blacklist_characters=" \t\n\r\x0b\x0c"),
                               min_size=1, max_size=12))
            lines.append(key + draw(st.sampled_from([" ", "\t", "  "])) + draw(st.text(max_size=12)))
    return "\n".join(lines)


def write_source(tmp_path_factory, text: str, raw: bytes = b"") -> str:
    path = str(tmp_path_factory.mktemp("tab", numbered=True) / "source")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8", "surrogatepass") + raw)
    return path


@FUZZ
@given(text=regexp_source(), kind=st.sampled_from(["regexp", "pcre"]), keys=KEYS)
def test_regexp_and_pcre_sources(tmp_path_factory, text, kind, keys):
    path = write_source(tmp_path_factory, text)
    with warnings_collected() as lines:
        try:
            table = tables.open_table(f"{kind}:{path}")
        except TableError as exc:
            assert str(exc)
            return
        with table:
            look_up(table, keys)
            try:
                table.items()
            except TableError:
                pass
    check_warnings(lines)
    for line in lines:
        if " line " in line:                     # a rule's warning names file and line
            assert re.search(rf"{kind} map {re.escape(path)}, line \d+: ", line) or \
                line.startswith(f"postmap: warning: {path}: "), line


@FUZZ
@given(text=map_source(), raw=st.binary(max_size=30), keys=KEYS)
def test_texthash_source(tmp_path_factory, text, raw, keys):
    path = write_source(tmp_path_factory, text, raw)
    with warnings_collected() as lines:
        try:
            table = tables.open_table(f"texthash:{path}")
        except TableError as exc:
            assert str(exc)
            return
        with table:
            look_up(table, keys)
            assert all(isinstance(k, str) for k, _ in table.items())
    check_warnings(lines)


@FUZZ
@given(text=map_source(), raw=st.binary(max_size=30), keys=KEYS,
       kind=st.sampled_from(["hash", "lmdb", "btree"]), null=st.booleans())
def test_indexed_tables_built_from_any_source(tmp_path_factory, text, raw, keys, kind, null):
    path = write_source(tmp_path_factory, text, raw)
    with warnings_collected() as lines:
        try:
            count = table_writer.build(f"{kind}:{path}", null=null, as_owner=False)
        except TableError as exc:
            assert str(exc)
            return
        assert count >= 0
        with tables.open_table(f"{kind}:{path}") as table:
            look_up(table, keys)
            assert len(table.items()) == count
    check_warnings(lines)


@FUZZ
@given(data=st.binary(max_size=5000), keys=KEYS)
def test_a_database_file_that_is_anything(tmp_path_factory, data, keys):
    """A .db file of any content (garbage, truncated, Berkeley DB): TableError or a table."""
    path = write_source(tmp_path_factory, "")
    with open(path + ".db", "wb") as f:
        f.write(data)
    with warnings_collected():
        try:
            table = tables.open_table(f"hash:{path}")
        except TableError as exc:
            assert str(exc)
            return
        with table:
            try:
                look_up(table, keys)
            except TableError as exc:
                assert str(exc)


# --- inline: and static: ---------------------------------------------------------------------

INLINE = st.lists(st.one_of(st.sampled_from(["{", "}", "=", ",", " ", '"', "\\", "a", "b=c",
                                             "{ k = v w }", "{x}", "=="]),
                            st.text(max_size=4)), max_size=14).map("".join)


@FUZZ
@given(name=INLINE, kind=st.sampled_from(["inline", "static"]), keys=KEYS)
def test_inline_and_static(name, kind, keys):
    with warnings_collected() as lines:
        try:
            table = tables.open_table(f"{kind}:{name}")
        except TableError as exc:
            assert str(exc)
            return
        with table:
            look_up(table, keys)
    check_warnings(lines)


@FUZZ
@given(ref=st.text(max_size=30))
def test_any_table_reference(ref):
    """open_table() on any text: a table or TableError (types, syntax, missing files)."""
    with warnings_collected():
        try:
            table = tables.open_table(ref)
        except TableError as exc:
            assert str(exc)
            return
        table.close()


@FUZZ
@given(pattern=RULE, extended=st.booleans(), newline=st.booleans())
def test_posix_regular_expressions(pattern, extended, newline):
    try:
        text = posix_regex.posix_to_python(pattern, extended, newline)
    except posix_regex.RegexError as exc:
        assert str(exc)
        return
    try:
        re.compile(text)
    except re.error:
        pass
