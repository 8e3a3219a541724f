"""lib/server_filters: reply template expansion, reject footers, the expansion filter, the
command filter and per-client EHLO keywords, as Postfix's mac_expand.c,
smtp_reply_footer.c and smtpd_expand.c."""

import pytest

from postfix_py.lib import maincf, server_filters as SF


def cfg(**main):
    c = maincf.Config("/nonexistent", "/nonexistent/main.cf")
    c.overrides.update(main)
    return c


class Client:
    name, addr, reverse_name, helo = "host.example", "192.0.2.1", "host.example", None


def test_expansion():
    values = {"rbl_code": "554", "rbl_reason": "", "rbl_what": "1.2.3.4", "x": "a\x01b"}
    assert SF.expand("$rbl_code [${rbl_what}]${rbl_reason?; $rbl_reason}$$", values) == \
        "554 [1.2.3.4]$"
    assert SF.expand("${rbl_reason:none} $x", values) == "none a_b"
    assert SF.expand("${rbl_what?{yes}:{no}} ${rbl_reason?{yes}:{no}}", values) == "yes no"
    assert SF.expand("$(rbl_code)", values) == "554"
    for bad in ("${rbl_code", "${rbl_code!x}", "$", "${rbl_what?{a}x}"):
        with pytest.raises(ValueError):
            SF.expand(bad, values)


def test_unknown_name_is_a_warning_and_nothing(capsys):
    assert SF.expand("a${nosuch}b", {}) == "ab"
    assert 'unknown macro name "nosuch" in expansion request' in capsys.readouterr().err
    with pytest.raises(ValueError):         # a DNS list reply template is then bad
        SF.expand("a${nosuch}b", {}, strict=True)
    assert SF.expand("a${nosuch:c}b", {}, strict=True) == "acb"


def test_smtpd_macros():
    values = SF.smtpd_values("mx.example", Client, "4321", "user@dom.example")
    assert SF.expand("$server_name $client $client_port $client_address $client_name "
                     "$reverse_client_name <$helo_name> $sender $sender_name "
                     "$sender_domain <$recipient>", values) == \
        "mx.example host.example[192.0.2.1] 4321 192.0.2.1 host.example host.example <> " \
        "user@dom.example user dom.example <>"
    null = SF.smtpd_values("mx", Client, "", "")
    assert SF.expand("$sender $sender_name <$sender_domain>", null) == "<> <> <>"
    assert SF.expand("<$sender>", SF.smtpd_values("mx", Client)) == "<>"
    assert len(SF.expand("$localtime", {})) == len("Dec 06 08:12:18")


def test_expansion_filter():
    # Postfix's default: tab and printable ASCII; the rest of a value becomes _
    allowed = SF.ServerFilters.expansion_filter(cfg(), "smtpd")
    assert allowed is SF.DEFAULT_FILTER
    assert SF.expand("[$x]", {"x": "a\tb c\x7f\xe9\r\n"}, allowed) == "[a\tb c____]"
    narrow = SF.ServerFilters.expansion_filter(cfg(smtpd_expansion_filter=r"abc\40\056"),
                                               "smtpd")
    assert narrow == frozenset("abc .")
    assert SF.expand("$x!", {"x": "a.b-c d"}, narrow) == "a.b_c _!"
    # postscreen's default is smtpd's value, then its own
    assert SF.ServerFilters.expansion_filter(cfg(smtpd_expansion_filter="ab"),
                                             "postscreen") == frozenset("ab")
    assert SF.unescape(r"\t\n\101\\\x\1234") == "\t\nA\\xS4"


def test_footer_lines():
    reply = "550 5.7.1 <a@b.example>: Recipient address rejected: Access denied"
    out = SF.reply_footer(reply, r"For assistance, call 800-555-0101.\nReference $client_address",
                          {"client_address": "192.0.2.1"})
    assert out.split("\r\n") == [
        "550-5.7.1 <a@b.example>: Recipient address rejected: Access denied",
        "550-5.7.1 For assistance, call 800-555-0101.",
        "550 5.7.1 Reference 192.0.2.1"]
    # \c continues the last line; a reply without enhanced status code gets none
    assert SF.reply_footer("421 mx Error: too many errors", r"\c (see $server_name)",
                           {"server_name": "mx"}) == "421 mx Error: too many errors (see mx)"
    assert SF.reply_footer("503 Error: x", r"\c!\nmore", {}) == \
        "503-Error: x!\r\n503 more"
    # a multi-line reply: the code and status of its last line
    assert SF.reply_footer("451-4.7.1 one\r\n451 4.7.1 two", "three", {}) == \
        "451-4.7.1 one\r\n451-4.7.1 two\r\n451 4.7.1 three"
    # not a reply, or a template that does not expand: unchanged
    assert SF.reply_footer("oops", "x", {}) == "oops"
    assert SF.reply_footer("550 5.0.0 no", "${x", {}) == "550 5.0.0 no"


def test_server_filters_from_main_cf(tmp_path):
    footers = tmp_path / "footers"
    # in a regexp table $$ is a $ (a $name would be a replacement index)
    footers.write_text("/^550 5\\.7\\.1 .*Access denied/ See http://x/?$$client_address\n")
    f = SF.ServerFilters(cfg(smtpd_reject_footer="call $server_name",
                             smtpd_reject_footer_maps=f"regexp:{footers}"), "smtpd")
    values = {"client_address": "192.0.2.1", "server_name": "mx"}
    assert f.footer is f and f.command_filter is None and f.ehlo_maps is None
    assert f.add_footer("550 5.7.1 <a>: Access denied", values) == \
        "550-5.7.1 <a>: Access denied\r\n550 5.7.1 See http://x/?192.0.2.1"
    assert f.add_footer("450 4.1.1 <a>: later", lambda: values) == \
        "450-4.1.1 <a>: later\r\n450 4.1.1 call mx"
    # postscreen takes smtpd's values by default (a value that is only $parameter)
    p = SF.ServerFilters(cfg(smtpd_reject_footer="call $server_name"), "postscreen")
    assert p.template == "call $server_name"
    off = SF.ServerFilters(cfg(), "smtpd")
    assert off.footer is None and off.command_filter is None and off.ehlo_maps is None


def test_command_and_ehlo_tables(tmp_path):
    (tmp_path / "cmd").write_text("/^RCPT TO:<a>$/ RCPT TO:<b>\n")
    f = SF.ServerFilters(cfg(smtpd_command_filter=f"regexp:{tmp_path}/cmd",
                             smtpd_discard_ehlo_keyword_address_maps=(
                                 "inline:{{192.0.2.1 = silent-discard, dsn auth}}")), "smtpd")
    assert f.command_filter is f
    assert f.filter_command(" \tRCPT TO:<a>") == "RCPT TO:<b>"
    assert f.filter_command("RCPT TO:<c>") is None
    assert f.ehlo_discard("192.0.2.1") == ["silent-discard", "dsn", "auth"]
    assert f.ehlo_discard("192.0.2.2") is None
    assert SF.ehlo_mask_text(["dsn", "auth", "nonesuch", "STARTTLS"]) == "AUTH STARTTLS DSN"


def test_soft_bounce_softens_5xx_lines_only():
    assert SF.soft_bounce("550 5.7.1 Service unavailable\r\n") == \
        "450 4.7.1 Service unavailable\r\n"
    assert SF.soft_bounce("521 5.5.1 Protocol error") == "421 4.5.1 Protocol error"
    assert SF.soft_bounce("554-5.7.1 first line") == "454-4.7.1 first line"
    assert SF.soft_bounce("550 Not a 5.X.X status") == "450 Not a 5.X.X status"
    assert SF.soft_bounce("452 4.3.1 Insufficient system storage") == \
        "452 4.3.1 Insufficient system storage"
    assert SF.soft_bounce("250 2.0.0 Ok\r\n") == "250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("command, ends", [
    ("GET", True), ("get", True), ("Connect", True), ("POST", True),
    ("Subject:", True), ("X-Header:value", True),       # is_header()
    ("1bogus", True), ("/", True),                      # regexp:{{/^[^A-Z]/ Bogus}}
    ("bogus", False), ("HELP", False), (":x", True), ("", False),
])
def test_forbidden_commands_default(command, ends):
    """smtpd_forbidden_commands' default (Postfix 3.7) and is_header()."""
    assert SF.ServerFilters(cfg(), "smtpd").non_smtp(command) is ends


def test_forbidden_commands_list_and_postscreen_default(capsys):
    filters = SF.ServerFilters(cfg(smtpd_forbidden_commands="!get, inline:{{foo=1}} get"),
                               "smtpd")
    assert [filters.forbidden.match(w) for w in ("GET", "FOO", "POST")] == \
        [False, True, False]                 # the first entry that matches decides
    # postscreen_forbidden_commands = $smtpd_forbidden_commands
    ps = SF.ServerFilters(cfg(smtpd_forbidden_commands="xyzzy"), "postscreen")
    assert ps.non_smtp("XYZZY") and not ps.non_smtp("GET")
    empty = SF.ServerFilters(cfg(smtpd_forbidden_commands=""), "smtpd")
    assert not empty.non_smtp("GET") and empty.non_smtp("From:")


def test_forbidden_commands_file(tmp_path):
    """A /file/name in the list stands for its words; !/file/name negates each."""
    (tmp_path / "cmds").write_text("# web\nGET, post\n  head\n")
    filters = SF.ServerFilters(cfg(smtpd_forbidden_commands=f"connect !{tmp_path}/cmds"),
                               "smtpd")
    assert [filters.forbidden.match(w) for w in ("connect", "get", "HEAD", "x")] == \
        [True, False, False, False]
    assert SF.ServerFilters(cfg(smtpd_forbidden_commands=f"{tmp_path}/cmds"),
                            "smtpd").non_smtp("HEAD")
    with pytest.raises(SF.tables.TableError, match="smtpd_forbidden_commands: open /nonexistent"):
        SF.ServerFilters(cfg(smtpd_forbidden_commands="/nonexistent/x"), "smtpd")
