"""Fuzzing the configuration readers: main.cf (lib/maincf.py, typed values through
lib/params.py) and master.cf (lib/mastercf.py).

Whatever the text (Postfix-shaped lines with hostile values, `$name` / `${name?x:y}`
macros nested and unbalanced, continuation lines, bytes that are not UTF-8, plain noise),
reading it either works or raises the reader's own error, ConfigError or MasterCfError,
whose text names the file; typed access to every parameter main.cf sets raises nothing
else; and warnings stay warnings (collected, never raised). bench/fuzz_long.py runs the
same properties longer.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postfix_py.lib import maincf, mastercf, params

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])

# --- main.cf ---------------------------------------------------------------------------------

PARAM_NAMES = params.names()
PIECES = st.sampled_from(["$", "${", "$(", "{", "}", "(", ")", "?", ":", "$$", ",", " ", "\t",
                          "#", "=", "\\", "yes", "no", "0", "-1", "10s", "5m", "1k", "9" * 30,
                          "9" * 5000, "${myhostname}", "$mydomain", "${x?{a}:{b}}",
                          "${myhostname:{", "$(queue_directory)", "inline:{a=b}", "\x00",
                          "\udcff", "\u00e9", "\r"])
VALUES = st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=12).map("".join)
NAME_TEXT = st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=12),
                      st.sampled_from(["a", "b", "x", "myorigin", "mydomain"]))


@st.composite
def main_cf(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 15))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.text(max_size=40)))                   # anything
        elif kind == 1:
            lines.append(" " + draw(VALUES))                            # continuation
        elif kind == 2:
            lines.append("# " + draw(st.text(max_size=20)))
        else:
            sep = draw(st.sampled_from(["=", " = ", "  =", "= ", ""]))
            lines.append(draw(NAME_TEXT) + sep + draw(VALUES))
    text = "\n".join(lines)
    data = text.encode("utf-8", "surrogateescape")
    if draw(st.booleans()):
        data += draw(st.binary(max_size=40))                             # not UTF-8
    return data


def load_main_cf(tmp: str, data: bytes):
    with open(os.path.join(tmp, "main.cf"), "wb") as f:
        f.write(data)
    warnings: list[str] = []
    return maincf.load(tmp, warn=warnings.append), warnings


def use_everything(cfg) -> None:
    """What the master and the programs do with a Config: typed values, checks, lists."""
    for name in list(cfg.entries):
        if params.lookup(name) is not None:
            try:
                cfg[name]
            except maincf.ConfigError as exc:
                assert str(exc)
        try:
            cfg.get(name)
        except maincf.ConfigError:
            pass
    problems = maincf.check(cfg)
    assert all(isinstance(p, str) and p for p in problems)
    for p in problems:
        if "line " in p:
            assert p.startswith(cfg.path + ", line "), p
    cfg.unused()
    cfg.undefined_references()
    cfg.references()


@FUZZ
@given(data=main_cf())
def test_main_cf_reader(tmp_path_factory, data):
    tmp = str(tmp_path_factory.mktemp("maincf", numbered=True))
    try:
        cfg, _ = load_main_cf(tmp, data)
    except maincf.ConfigError as exc:
        assert str(exc).startswith(f"{tmp}/main.cf, line ")
        return
    use_everything(cfg)


@FUZZ
@given(name=st.sampled_from(PARAM_NAMES), value=VALUES)
def test_every_parameter_type_takes_any_value(name, value):
    cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides={name: value})
    try:
        cfg[name]
    except maincf.ConfigError as exc:
        assert str(exc)


@FUZZ
@given(text=VALUES, other=VALUES)
def test_macro_expansion(text, other):
    cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf",
                        overrides={"x": other, "a": "$b", "b": text})
    for probe in (text, "$a", "${x?{$a}:{$b}}", "${x:" + text + "}"):
        try:
            assert isinstance(cfg.expand(probe), str)
        except maincf.ConfigError as exc:
            assert str(exc)


# --- master.cf -------------------------------------------------------------------------------

FIELDS = st.one_of(st.sampled_from(["-", "y", "n", "0", "1", "100", "60?", "?", "yes", "inet",
                                    "unix", "fifo", "pass", "unix-dgram", "tcp", "smtpd",
                                    "smtp", "qmgr", "{", "}", "{ a = b }", "-o", "-v",
                                    "-oa=b", "-o a=b", "-o {a = b}", "[::1]:25", "[::1",
                                    "127.0.0.1:smpt", "99999", "smtp:0", "host:25",
                                    "127.0.0.1:\udcff", "a\x00b", "\u00e9"]),
                  st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=10),
                  st.text(max_size=6))


@st.composite
def master_cf(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 5))
        words = draw(st.lists(FIELDS, max_size=12))
        if kind == 0:
            lines.append(draw(st.text(max_size=40)))
        elif kind == 1:
            lines.append("  " + " ".join(words))                       # continuation
        elif kind == 2:
            lines.append("#" + " ".join(words))
        else:
            name = draw(st.sampled_from(["smtp", "25", "127.0.0.1:2525", "qmgr", "x", "[::1]:25",
                                         "tlsmgr"]))
            typ = draw(st.sampled_from(["inet", "unix", "fifo", "pass", "x"]))
            lines.append(" ".join([name, typ, *words]))
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@FUZZ
@given(text=master_cf())
def test_master_cf_reader(text):
    warnings: list[str] = []
    path = "/etc/postfix-py/master.cf"
    try:
        services = mastercf.parse(text, path, warn=warnings.append)
    except mastercf.MasterCfError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    merged = mastercf.merge_duplicates(services, warn=warnings.append)
    assert len(merged) <= len(services)
    for svc in services:
        assert svc.command and svc.key and svc.endpoint
        text_back = mastercf.format_service(svc)
        mastercf.format_service(svc, fold=True)
        # What postconf -M prints reads back as the same service.
        again = mastercf.parse(text_back + "\n", path, warn=lambda _: None)
        assert [(s.key, s.command, s.overrides) for s in again] == \
            [(svc.key, svc.command, svc.overrides)]


@FUZZ
@given(name=st.text(max_size=30))
def test_inet_endpoint(name):
    try:
        host, port = mastercf.inet_endpoint(name)
    except ValueError as exc:
        assert str(exc)
        return
    assert 0 < port < 65536
