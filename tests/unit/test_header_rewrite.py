"""Header address rewriting byte for byte as Debian's Postfix 3.7 does it, and lib/tok822.py.

tests/data/header_rewrite/postfix.json holds what Postfix wrote for each case of
tests/data/header_rewrite/cases.py in five settings (the local and remote header rewrite
contexts, trivial-rewrite's defaults and append_dot_mydomain = yes, swap_bangpath = no,
allow_percent_hack = no; the local context with header_address_token_limit = 5);
make_reference.py there records it again.
"""

import importlib.util
import json
import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
import pytest

from postfix_py.lib import cleanup, maincf, tok822
from postfix_py.lib import queue as Q
from postfix_py.lib.resolve import LOCAL, REMOTE, Rewriter

DATA = Path(__file__).resolve().parent.parent / "data" / "header_rewrite"
_spec = importlib.util.spec_from_file_location("header_rewrite_cases", DATA / "cases.py")
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
CASES, MAIN, SCENARIOS, TABLES = _cases.CASES, _cases.MAIN, _cases.SCENARIOS, _cases.TABLES
strip_added = _cases.strip_added

REFERENCE = json.loads((DATA / "postfix.json").read_text())


def settings(tmp_path, main: dict) -> tuple[cleanup.Settings, str]:
    for name, text in TABLES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "main.cf").write_text("".join(
        f"{k} = {v.replace('@DIR@', str(tmp_path))}\n" for k, v in main.items()))
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    return cleanup.Settings(maincf.load(str(tmp_path))), root


def header_section(s, root, context: str, content: bytes) -> list[str]:
    c = cleanup.Cleanup(s, root, origin="localhost[127.0.0.1]", proto="ESMTP",
                        header_rewrite=context)
    c.set_sender("sender@sink.test")
    c.add_recipient("sink@sink.test")
    c.write(content)
    result = c.finish()
    assert result.status == "queued"
    path = os.path.join(root, "incoming", result.queue_id)
    data = b"".join(Q.read(path).content(path))
    return data.split(b"\n\n", 1)[0].decode("utf-8", "surrogateescape").split("\n")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_header_output_is_postfixs(tmp_path, scenario):
    context, rewrite, cleanup_settings = SCENARIOS[scenario]
    s, root = settings(tmp_path, {**MAIN, **rewrite, **cleanup_settings})
    for case, header in CASES.items():
        name = f"{scenario}/{case}"
        content = f"X-Case: {name}\n{header}\n\nbody\n".encode()
        assert strip_added(header_section(s, root, context, content)) == REFERENCE[name], \
            name


def test_reference_covers_folding_and_routing_forms():
    # the reference data shows what the tests above hold us to
    lines = REFERENCE["local/long-to"]
    to = next(i for i, line in enumerate(lines) if line.startswith("To:"))
    assert lines[to:to + 2] == [
        "To: user0@a-considerably-longer-domain-name.example,",
        "\tuser1@a-considerably-longer-domain-name.example,"]
    assert "To: user@modern.example" in REFERENCE["local/percent-bang"]
    assert "To: user%legacy.example@origin.example" in REFERENCE["local-alt/percent-bang"]
    assert "To: user@modern.example" in REFERENCE["remote/percent-bang"]
    assert "To: user%legacy.example@remote.example" in REFERENCE["remote-alt/percent-bang"]


@pytest.mark.parametrize("value", [
    " a@b.example", ' "Alice E" <a@b.example>, Bob <x@y.example>', " a@b.example, d@e.example",
    " a@b.example d@e.example", ' "a@b" <c@d.example>', " a@b.example.", " .a@b.example",
    " a@b.example (x)", " <a@b.example>", " Alice <a..b@c.example>", " a@localhost",
    " a@b.example,\n\tc@d.example", " a%b@c.example", " x!y@c.example", " joe",
])
@pytest.mark.parametrize("dot", ["no", "yes"])
def test_fast_path_agrees_with_the_parse(tmp_path, value, dot):
    # a header value that _unchanged passes is one the full rewrite leaves alone
    s, root = settings(tmp_path, {"myhostname": "mx.test.example",
                                  "append_dot_mydomain": dot})
    c = cleanup.Cleanup(s, root, header_rewrite="local")
    raw = bytearray(b"To:" + value.encode())
    expected = raw if c._unchanged(value) else None
    c._unchanged = lambda value: False
    result = c._rewrite_header(bytearray(raw), cleanup.HEADER_RECIPIENT)
    if expected is not None:
        assert result == expected
    c.abort()


def test_fast_path_takes_plain_lists_only(tmp_path):
    s, root = settings(tmp_path, {"myhostname": "mx.test.example"})
    c = cleanup.Cleanup(s, root, header_rewrite="local")
    fast = [v for v in (" a@b.example", ' "Alice E" <a@b.example>, Bob <x@y.example>',
                        " a@b.example,\n\tc@d.example", " a@localhost", " a@b.example.",
                        " joe", " a@b.example (x)", ' "a@b" <c@d.example>')
            if c._unchanged(v)]
    assert fast == [" a@b.example", ' "Alice E" <a@b.example>, Bob <x@y.example>',
                    " a@b.example,\n\tc@d.example", " a@localhost"]
    c.abort()


# --- trivial-rewrite's rules in both contexts (lib/resolve.Rewriter) --------------------

def rewriter(tmp_path, **extra) -> Rewriter:
    conf = {"myhostname": "mx.test.example", "mydomain": "test.example",
            "myorigin": "origin.example", "remote_header_rewrite_domain": "remote.example",
            **extra}
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    return Rewriter(maincf.load(str(tmp_path)))


_ATOM = st.text("abcXYZ019_+=-", min_size=1, max_size=6)
_LABEL = st.text("abz09-", min_size=1, max_size=6)


@given(local=st.lists(_ATOM, min_size=1, max_size=3),
       labels=st.lists(_LABEL, min_size=2, max_size=4),
       dot=st.booleans(), context=st.sampled_from([LOCAL, REMOTE]))
def test_the_common_address_fast_path_agrees_with_the_rules(tmp_path_factory, local,
                                                            labels, dot, context):
    """A dot-string local part @ a dotted domain takes the fast path; the full rules
    must give the same text (and do leave it alone)."""
    r = rewriter(tmp_path_factory.mktemp("rw"), append_dot_mydomain="yes" if dot else "no")
    address = ".".join(local) + "@" + ".".join(labels)
    origin, domain = r.contexts[context]
    slow = tok822.quote_822_local(r._rewrite_plain(address, origin, domain))
    assert r.rewrite(address, context) == slow == address


@pytest.mark.parametrize("address, local, remote", [
    ("user", "user@origin.example", "user@remote.example"),
    ("user%host.example", "user@host.example", "user@host.example"),
    ("a%b%c", "a%b@c", "a%b@c"),
    ("host.example!user", "user@host.example", "user@host.example"),
    ("a!b!user", "b!user@a", "b!user@a"),
    ("a!user%b", "user%b@a", "user%b@a"),             # the bang path wins
    ("user%x@host.example", "user%x@host.example", "user%x@host.example"),
    ("@relay.example:user@host.example", "user@host.example", "user@host.example"),
    ("user@host.example.", "user@host.example", "user@host.example"),
    ("user@host", "user@host", "user@host"),
    ('"joe smith"', '"joe smith"@origin.example', '"joe smith"@remote.example'),
    ('"a@b"@host.example', '"a@b"@host.example', '"a@b"@host.example'),
    ('""', '""', '""'),
    ("@", '""', '""'),
])
def test_rewrite_contexts_with_the_defaults(tmp_path, address, local, remote):
    r = rewriter(tmp_path)
    assert (r.rewrite(address, LOCAL), r.rewrite(address, REMOTE)) == (local, remote)


@pytest.mark.parametrize("address, local, remote", [
    ("user%host.example", "user%host.example@origin.example",
     "user%host.example@remote.example"),
    ("host.example!user", "host.example!user@origin.example",
     "host.example!user@remote.example"),
    ("user@host", "user@host.test.example", "user@host.remote.example"),
    ("user@[192.0.2.1]", "user@[192.0.2.1]", "user@[192.0.2.1]"),
    ("user", "user@origin.example", "user@remote.example"),
])
def test_rewrite_contexts_without_routing_operators(tmp_path, address, local, remote):
    r = rewriter(tmp_path, append_dot_mydomain="yes", swap_bangpath="no",
                 allow_percent_hack="no")
    assert (r.rewrite(address, LOCAL), r.rewrite(address, REMOTE)) == (local, remote)


def test_no_origin_no_qualification(tmp_path):
    r = rewriter(tmp_path, append_at_myorigin="no", remote_header_rewrite_domain="")
    assert r.rewrite("user", LOCAL) == "user"
    assert r.rewrite("user", REMOTE) == "user"


# --- lib/tok822.py ----------------------------------------------------------------------

@pytest.mark.parametrize("value, addresses, regenerated", [
    ("Name <user@x>", ["user@x"], "Name <user@x>"),
    ("(c) joe@x", ["joe@x"], "joe@x (c)"),                   # comments move right
    ("joe smith@x", ["joe", "smith@x"], "joe,\nsmith@x"),    # a missing comma
    ("grp: a@b, c@d;, e", ["a@b", "c@d", "e"], "grp: a@b,\nc@d;,\ne"),
    ('"Carl, C." <c@x> (work)', ["c@x"], '"Carl, C." <c@x>(work)'),
    ("<@a,@b:u@c>", ["@a,@b:u@c"], "<@a,@b:u@c>"),
    ("<>", [], "<>"),
    ("Joe <joe(c)@x>", ["joe@x"], "Joe <joe@x (c)>"),
    ('"a b"@x', ["a b@x"], '"a b"@x'),
    ("a\\ b@x", ["a b@x"], '"a b"@x'),
])
def test_parse_and_externalize(value, addresses, regenerated):
    tree = tok822.parse(value)
    assert [tok822.internalize(a.head) for a in tok822.addresses(tree)] == addresses
    assert tok822.externalize(tree, tok822.STR_HEAD) == regenerated


def test_token_limit_cuts_the_list():
    tree = tok822.parse("a@b.c, d@e.f", 5)
    assert [tok822.internalize(a.head) for a in tok822.addresses(tree)] == ["a@b.c"]


def test_too_much_comment_text_is_stripped(capsys):
    tree = tok822.parse("x@y (" + "c" * 300 + "), z@w")
    assert tok822.externalize(tree, tok822.STR_HEAD) == "<x@y>,\nz@w"
    assert "stripping too many comments from address" in capsys.readouterr().err


def test_folding():
    # joined while a line stays under 70 bytes; continuation lines start with a tab
    text = "To: " + ",\n".join(f"u{i}@example.com" for i in range(8))
    assert tok822.fold_header(text) == [
        "To: u0@example.com, u1@example.com, u2@example.com, u3@example.com,",
        "\tu4@example.com, u5@example.com, u6@example.com, u7@example.com"]
    assert tok822.fold_header("To: " + "x" * 80 + "@y,\nz@w") == [
        "To: " + "x" * 80 + "@y,", "\tz@w"]


def test_folded_header_within_header_size_limit():
    text = "To: " + ",\n".join(f"user{i}@a-long-domain-name.example" for i in range(10))
    lines = tok822.fold_header(text)
    assert lines[:2] == ["To: user0@a-long-domain-name.example,",       # 37 bytes
                         "\tuser1@a-long-domain-name.example, user2@a-long-domain-name"
                         ".example,"]                                 # 38 + 67 bytes
    # the last line boundary before the limit, when that keeps 90% of it
    assert tok822.fold_header(text, 110) == lines[:2]
    # else the unkind cut at the limit (offsets without the tabs)
    assert tok822.fold_header(text, 60) == [lines[0], "\tuser1@a-long-domain-na"]


@pytest.mark.parametrize("internal, external", [
    ("joe@x", "joe@x"), ("joe smith@x", '"joe smith"@x'), ("a@b@x", '"a@b"@x'),
    (".joe@x", '".joe"@x'), ("a..b@x", '"a..b"@x'), ('a"b@x', '"a\\"b"@x'),
    ("@r:a b@x", '@r:"a b"@x'), ("j\u00f6rg@x", "j\u00f6rg@x"), ("@x", '""@x'),
])
def test_quote_822_local(internal, external):
    assert tok822.quote_822_local(internal) == external
    assert tok822.unquote_822_local(external) == internal


def _slow_scan(text: str) -> list[tuple[int, str]]:
    """tok822_scan_limit character by character, to hold scan()'s shortcuts to."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if c in " \t\r\n":
            continue
        if c == "(":
            body, i = tok822._comment(text, i)
            out.append((tok822.COMMENT, body))
        elif c in '["':
            body, i = tok822._collect(text, i, lambda ch, end="]" if c == "[" else '"':
                                      ch == end)
            i += i < n
            out.append((tok822.DOMLIT if c == "[" else tok822.QSTRING, body))
        elif c != "\\" and c in tok822._OPCHAR:
            out.append((ord(c), ""))
        else:
            body, i = tok822._collect(text, i - 1, tok822._is_atom_stop)
            quote = any(ch == " " or ch < " " or ch == "\x7f" or ch in tok822._OPCHAR
                        for ch in body)
            out.append((tok822.QSTRING if quote else tok822.ATOM, body))
    return out


@given(st.text(alphabet='ab.@ \t\n"\\()<>,;:[]%!|\x01\x7f\u00e9', max_size=40))
def test_scan_shortcuts_agree_with_the_character_loop(text):
    assert [(t.type, t.text) for t in tok822.tokens(tok822.scan(text)[0])] == \
        _slow_scan(text)


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory):
    return settings(tmp_path_factory.mktemp("fuzz"), {
        **MAIN, "append_dot_mydomain": "yes", "header_address_token_limit": "7"})


@given(st.text(alphabet='ab.@ \t\n"\\()<>,;:[]%!|\x00\x01\x7f\u00e9\udce9', max_size=60))
def test_any_header_value_is_rewritten_without_error(fuzz_settings, value):
    # header values and addresses come from the network: whatever they hold, the
    # rewrite ends with a header (or the one it was given), never an exception
    s, root = fuzz_settings
    c = cleanup.Cleanup(s, root, header_rewrite="local")
    raw = bytearray(("To:" + value).encode("utf-8", "surrogateescape"))
    out = c._rewrite_header(raw, cleanup.HEADER_RECIPIENT)
    assert out.startswith(b"To:")
    # and as an envelope address (cleanup_rewrite_internal)
    assert isinstance(c._qualify(value), str)
    c.abort()
