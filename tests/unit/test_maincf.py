"""main.cf reading, expansion, typed access and in-place editing, checked against Postfix."""

import os
import subprocess

import pytest

from postfix_py.lib import maincf

POSTFIX_STYLE = """\
# A Postfix-style main.cf
myhostname = mail.example.com
mydomain = example.com

# continuation lines start with white space
mynetworks = 127.0.0.0/8
    10.0.0.0/8,
\t192.168.0.0/16
   # an indented comment does not continue anything
myorigin = $mydomain
smtpd_banner = ${myhostname} ESMTP $(mail_name) ${stress?{busy}:{calm}}
relayhost = [smarthost.example.com]:587 # a hash later in the line is data
smtpd_tls_cert_file = /etc/postfix/server.pem
smtpd_use_tls = yes
myhostname = override.example.com
custom_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = $custom_restrictions
"""


def write(tmp_path, text):
    (tmp_path / "main.cf").write_text(text)
    return str(tmp_path)


def load(tmp_path, text, warnings=None):
    warn = (warnings.append if warnings is not None else lambda _: None)
    return maincf.load(write(tmp_path, text), warn=warn)


def test_syntax_continuations_comments_and_overrides(tmp_path):
    warnings = []
    cfg = load(tmp_path, POSTFIX_STYLE, warnings)
    assert cfg.raw("mynetworks") == "127.0.0.0/8 10.0.0.0/8, 192.168.0.0/16"
    assert cfg["mynetworks"] == ["127.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"]
    assert cfg.raw("relayhost") == "[smarthost.example.com]:587 # a hash later in the line is data"
    assert cfg.get("myhostname") == "override.example.com"
    assert warnings == [f"{tmp_path}/main.cf, line 15: overriding earlier entry: "
                        "myhostname=mail.example.com"]
    assert cfg.entries["mynetworks"].line == 6


def test_expansion(tmp_path):
    cfg = load(tmp_path, POSTFIX_STYLE)
    assert cfg.get("myorigin") == "example.com"
    assert cfg.get("smtpd_banner") == "override.example.com ESMTP postfix-py calm"
    assert cfg.with_overrides({"stress": "yes"}).get("smtpd_banner").endswith(" busy")
    assert cfg["smtpd_recipient_restrictions"] == ["permit_mynetworks", "reject"]
    # Defaults expand through main.cf values: smtpd_tls_key_file = $smtpd_tls_cert_file.
    assert cfg.get("smtpd_tls_key_file") == "/etc/postfix/server.pem"
    assert cfg["smtpd_timeout"] == 300
    assert cfg.with_overrides({"stress": "yes"})["smtpd_timeout"] == 10


CONDITIONALS = "c = 1\ne =\nr = [${c:x}] [${e:x}] [${c?x}] [${e?x}] [${c?{A}:{B}}] " \
               "[${e?{A}:{B}}] [${c:{Z}}] [$(c)] [${e?{A}}] [$$c] [${nosuch}]\nused = $r\n"
CONDITIONALS_EXPANDED = "[] [x] [x] [] [A] [B] [] [1] [] [$c] []"


def test_conditional_expansion(tmp_path):
    assert load(tmp_path, CONDITIONALS).get("r") == CONDITIONALS_EXPANDED


@pytest.mark.interop
def test_conditional_expansion_as_postfix(tmp_path, debian_postconf):
    write(tmp_path, CONDITIONALS)
    out = subprocess.run([debian_postconf, "-c", str(tmp_path), "-xh", "r"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == CONDITIONALS_EXPANDED


@pytest.mark.parametrize("text,message", [
    ("a = $b\nb = $a\nused = $a\n", "unreasonable macro call nesting"),
    ("a = x $ y\nused = $a\n", "empty macro name"),
    ("a = ${b\nused = $a\n", "unmatched '{'"),
    ("a = ${b?{x}junk}\nused = $a\n", "bad conditional macro"),
])
def test_expansion_errors(tmp_path, text, message):
    cfg = load(tmp_path, text)
    with pytest.raises(maincf.ConfigError, match=message):
        cfg.get("a")


def test_missing_equals_names_file_and_line(tmp_path):
    with pytest.raises(maincf.ConfigError) as exc:
        load(tmp_path, "# ok\nmyhostname = x\nbad line here\n")
    assert str(exc.value) == (f"{tmp_path}/main.cf, line 3: missing '=' after attribute "
                              'name: "bad line here"')


def test_leading_whitespace_is_warned_and_ignored(tmp_path):
    warnings = []
    cfg = load(tmp_path, "  leading = x\nmyhostname = h.example\n", warnings)
    assert "leading" not in cfg.entries
    assert "logical line must not start with whitespace" in warnings[0]


def test_missing_main_cf(tmp_path):
    with pytest.raises(maincf.ConfigError, match="main.cf: No such file or directory"):
        maincf.load(str(tmp_path))


def test_bad_typed_value_names_file_line_and_parameter(tmp_path):
    cfg = load(tmp_path, "myhostname = h.example\nsmtpd_tls_loglevel = lots\n")
    with pytest.raises(maincf.ConfigError) as exc:
        cfg["smtpd_tls_loglevel"]
    assert str(exc.value) == (f"{tmp_path}/main.cf, line 2: bad numerical configuration: "
                              "smtpd_tls_loglevel = lots")
    assert maincf.check(cfg) == [str(exc.value)]


def test_warm_works_out_every_value_and_leaves_bad_ones_to_their_lookup(tmp_path):
    """What the master does before forking a service's workers: every declared
    parameter's typed value is cached, equal to a cold lookup's, and a bad value still
    raises where a worker looks it up."""
    text = "myhostname = h.example\nsmtpd_tls_loglevel = lots\nmyorigin = $mydomain\n"
    warm, cold = load(tmp_path, text).with_overrides({"smtpd_timeout": "7s"}), None
    warm.warm()
    cold = load(tmp_path, text).with_overrides({"smtpd_timeout": "7s"})
    assert "smtpd_tls_loglevel" not in warm._cache
    assert len(warm._cache) > 400
    for name in warm._cache:
        assert warm._cache[name] == cold[name], name
    assert warm["smtpd_timeout"] == 7 and warm["myorigin"] == "example"
    with pytest.raises(maincf.ConfigError, match="bad numerical configuration"):
        warm["smtpd_tls_loglevel"]


def test_unused_and_undefined(tmp_path):
    cfg = load(tmp_path, "foo = bar\nused = u\nsmtpd_banner = $used $nothing\n")
    assert cfg.unused() == ["foo"]
    assert cfg.unused({"foo"}) == []
    assert cfg.undefined_references() == ["nothing"]


def test_computed_defaults(tmp_path):
    cfg = load(tmp_path, "myhostname = mx.mail.example.org\n")
    assert cfg.get("mydomain") == "mail.example.org"
    assert cfg["mydestination"] == ["mx.mail.example.org", "localhost.mail.example.org",
                                    "localhost"]
    assert cfg["mynetworks"][:3] == ["127.0.0.0/8", "[::ffff:127.0.0.0]/104", "[::1]/128"]


def test_edit_keeps_comments_and_order_and_replaces_every_entry(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text("# top\nmyhostname = a\n  cont\n# mid\nmyhostname = b\nrelayhost = x\n")
    os.chmod(path, 0o640)
    warnings = []
    maincf.edit(str(path), {"myhostname": "new.example", "newp": "1", "relayhost": "[y]"},
                warn=warnings.append)
    assert path.read_text() == ("# top\nmyhostname = new.example\n# mid\n"
                                "myhostname = new.example\nrelayhost = [y]\nnewp = 1\n")
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert warnings == [f'{path}: multiple entries for "myhostname"']
    assert sorted(os.listdir(tmp_path)) == ["main.cf"]   # no temporary left behind


def test_edit_remove_and_comment(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text("a = 1\n  more\nb = 2\n  more\nc = 3\n")
    maincf.edit(str(path), {}, remove=["a"])
    assert path.read_text() == "b = 2\n  more\nc = 3\n"
    maincf.edit(str(path), {}, comment=["b"])
    assert path.read_text() == "#b = 2\n#  more\nc = 3\n"
    assert maincf.load(str(tmp_path)).entries.keys() == {"c"}


def test_split_macros_is_the_one_parser():
    Ref = maincf.Ref
    assert maincf.split_macros("a $b ${c?{x}} $(d) $$e") == [
        "a ", Ref("b"), " ", Ref("c?{x}"), " ", Ref("d"), " $e"]
    assert maincf.split_macros("no macro") == ["no macro"]
    for text, kind in (("x $", "empty"), ("${1", "unmatched"), ("$(a", "unmatched")):
        with pytest.raises(maincf.MacroSyntaxError) as info:
            maincf.split_macros(text)
        assert info.value.kind == kind
