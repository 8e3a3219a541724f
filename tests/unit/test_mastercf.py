"""Unit tests for postfix_py.lib.mastercf: syntax, defaults, errors, duplicates, output.

The interop tests compare with Debian's Postfix (`/usr/sbin/postconf -M`, `-Mf`, `-F`) and
are skipped where it is not installed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from postfix_py.lib import mastercf
from postfix_py.lib.mastercf import MasterCfError

REPO = pathlib.Path(__file__).resolve().parents[2]
BAD_CONFIGS = REPO / "tests" / "data" / "bad_configs"
POSTCONF = "/usr/sbin/postconf"
DEBIAN_MASTER_CF = "/etc/postfix/master.cf"
needs_postconf = pytest.mark.skipif(not os.access(POSTCONF, os.X_OK),
                                    reason="Postfix's postconf is not installed")


def parse(text: str, path: str = "master.cf") -> list[mastercf.Service]:
    """Parse text, failing the test on any warning."""
    warnings: list[str] = []
    services = mastercf.parse(text, path, warn=warnings.append)
    assert warnings == []
    return services


def one(text: str) -> mastercf.Service:
    """The single service defined by text."""
    services = parse(text)
    assert len(services) == 1
    return services[0]


def error_of(text: str, path: str = "/etc/postfix-py/master.cf") -> MasterCfError:
    """The MasterCfError raised for text."""
    with pytest.raises(MasterCfError) as info:
        mastercf.parse(text, path, warn=lambda _: None)
    return info.value


def postconf(config_dir, *args: str) -> subprocess.CompletedProcess:
    """Run Debian's postconf with -c config_dir."""
    # Postfix waits until a file it reads is older than the current second (it might
    # still be written); date the files back so that the test does not wait.
    for name in ("main.cf", "master.cf"):
        path = os.path.join(config_dir, name)
        if os.path.exists(path):
            os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime - 10))
    return subprocess.run([POSTCONF, "-c", str(config_dir), *args], capture_output=True,
                          text=True, timeout=30)


def postfix_dir(tmp_path, master_text: str) -> pathlib.Path:
    """A configuration directory for postconf: an empty main.cf and master_text."""
    (tmp_path / "main.cf").write_text("")
    (tmp_path / "master.cf").write_text(master_text)
    return tmp_path


# --- columns and defaults -----------------------------------------------------------

def test_dash_means_postfix_defaults():
    svc = one("x unix - - - - - cmd\n")
    assert (svc.private, svc.unpriv, svc.chroot) == (True, True, False)  # chroot n: 3.x
    assert (svc.wakeup, svc.wakeup_conditional, svc.maxproc) == (0, False, None)
    assert svc.process_limit(100) == 100
    assert svc.fields == ("x", "unix", "-", "-", "-", "-", "-")


def test_explicit_columns():
    svc = one("qmgr unix n y y 300 1 qmgr\n")
    assert (svc.name, svc.type, svc.command) == ("qmgr", "unix", "qmgr")
    assert (svc.private, svc.unpriv, svc.chroot) == (False, True, True)
    assert (svc.wakeup, svc.wakeup_conditional, svc.maxproc) == (300, False, 1)
    assert svc.process_limit(100) == 1
    assert one("cleanup unix n - y - 0 cleanup\n").process_limit(100) == 0


def test_conditional_wakeup():
    svc = one("tlsmgr unix - - y 1000? 1 tlsmgr\n")
    assert (svc.wakeup, svc.wakeup_conditional) == (1000, True)
    assert one("x unix - - - 0? - x\n").wakeup_conditional is False  # as master: only > 0


@pytest.mark.parametrize("type_", mastercf.TYPES)
def test_every_postfix_type(type_):
    name = "2525" if type_ == "inet" else "svc"
    private = "n" if type_ == "inet" else "-"
    assert one(f"{name} {type_} {private} - - - - cmd\n").type == type_


def test_key_and_endpoint():
    assert one("smtp inet n - y - - smtpd\n").key == "smtp/inet"
    assert one("smtp inet n - y - - smtpd\n").endpoint == "25"
    assert one("127.0.0.1:smtp inet n - y - - smtpd\n").endpoint == "[127.0.0.1]:25"
    assert one("tlsmgr unix - - y 1000? 1 tlsmgr\n").endpoint == "private/tlsmgr"
    assert one("pickup unix n - y 60 1 pickup\n").endpoint == "public/pickup"


# --- logical lines --------------------------------------------------------------------

def test_continuation_comments_and_blank_lines():
    text = ("# header\n"
            "\n"
            "relay unix - - y - - smtp\n"
            "        -o syslog_name=postfix/$service_name\n"
            "#       -o smtp_helo_timeout=5\n"
            "\n"
            "   \t \n"
            "\t-o smtp_connect_timeout=5 # not a comment\n"
            "showq unix n - y - - showq\n")
    relay, showq = parse(text)
    assert relay.line == 3 and showq.line == 9
    assert relay.overrides == {"syslog_name": "postfix/$service_name",
                               "smtp_connect_timeout": "5"}
    assert relay.args == ["#", "not", "a", "comment"]   # `#` inside a line is text
    assert showq.args == [] and showq.overrides == {}


def test_crlf_line_ends():
    svc = one("smtp inet n - y - - smtpd\r\n  -o a=b\r\n")
    assert svc.command == "smtpd" and svc.overrides == {"a": "b"}


def test_orphan_continuation_is_dropped_with_postfix_warning():
    warnings: list[str] = []
    text = ("   smtp inet n - y - - smtpd -o aaaaaaaaaaaaaaaaaaaaaaaaaaa=1\n"
            "  -o more=text\n"
            "x unix - - - - - y\n")
    services = mastercf.parse(text, "/p/master.cf", warn=warnings.append)
    assert [s.name for s in services] == ["x"]
    assert warnings == ['/p/master.cf: logical line must not start with whitespace: '
                        '"   smtp inet n - y - - smtpd -..."']


def test_empty_file():
    assert parse("") == [] and parse("# only\n\n  # comments\n") == []


# --- command line ---------------------------------------------------------------------

def test_override_forms():
    svc = one("smtp inet n - y - - smtpd -o a=b -o { c = d e } -of=g -vo h=i "
              "-o j= -o k=l=m -o {a=late}\n")
    assert svc.overrides == {"a": "late", "c": "d e", "f": "g", "h": "i", "j": "",
                             "k": "l=m"}
    assert list(svc.overrides) == ["a", "c", "f", "h", "j", "k"]
    assert svc.args == ["-v"] and svc.verbose == 1


def test_long_form_keeps_inner_white_space():
    svc = one("x unix - - - - - smtpd -o {  smtpd_banner =  $myhostname  ESMTP  }\n")
    assert svc.overrides == {"smtpd_banner": "$myhostname  ESMTP"}


def test_verbose_debug_and_other_args():
    svc = one("x unix - - - - - smtpd -v -v -D -o a=b -x -- -o c=d foo\n")
    assert (svc.verbose, svc.debug) == (2, True)
    assert svc.args == ["-v", "-v", "-D", "-x", "--", "-o", "c=d", "foo"]
    assert svc.overrides == {"a": "b"}    # options end at `--`, as the daemon's getopt


def test_options_end_at_first_non_option():
    svc = one("maildrop unix - n n - - pipe flags=DRXhu user=vmail "
              "argv=/usr/bin/maildrop -d ${recipient} -o x=y\n")
    assert svc.args == ["flags=DRXhu", "user=vmail", "argv=/usr/bin/maildrop", "-d",
                        "${recipient}", "-o", "x=y"]
    assert svc.overrides == {} and svc.verbose == 0


def test_braces_group_arguments():
    svc = one("x unix - - - - - pipe argv=/bin/prog { a b } {c}  ${user} x={y z}\n")
    assert svc.args == ["argv=/bin/prog", "a b", "c", "${user}", "x={y z}"]


# --- inet endpoints -------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("smtp", (None, 25)),
    ("2525", (None, 2525)),
    ("submission", (None, 587)),
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    (":2525", (None, 2525)),
    ("[::1]:2525", ("::1", 2525)),
    ("[0:0::1]:smtp", ("::1", 25)),
    ("::1:2525", ("::1", 2525)),
    ("[ipv6:::1]:25", ("::1", 25)),
    ("localhost:smtp", ("localhost", 25)),
    ("mail.example.com:465", ("mail.example.com", 465)),
])
def test_inet_endpoint(name, expected):
    assert mastercf.inet_endpoint(name) == expected
    svc = one(f"{name} inet n - y - - smtpd\n")
    assert (svc.inet_host, svc.inet_port) == expected


@pytest.mark.parametrize("name, reason", [
    ("[::1", 'missing "]"'),
    ("[::1]25", 'garbage after "]"'),
    ("[::1]", "missing service information"),
    ("127.0.0.1:", "missing service information"),
    ("25x", "garbage after numerical service"),
    ("127.0.0.1:70000", "bad port number"),
    ("0", "bad port number"),
    ("no-such-service-here", "unknown service: no-such-service-here/tcp"),
    ("bad!host:25", "valid hostname or network address required"),
    ("1.2.3.999:25", "valid hostname or network address required"),
    ("[ipv6:1.2.3.4]:25", "malformed IPv6 address"),
])
def test_bad_inet_endpoint(name, reason):
    with pytest.raises(ValueError, match=f"^{reason}$"):
        mastercf.inet_endpoint(name)
    err = error_of(f"{name} inet n - y - - smtpd\n")
    assert err.text == f'{reason} in "{name}"'


def test_unix_service_has_no_inet_endpoint():
    svc = one("smtp unix - - y - - smtp\n")
    assert (svc.inet_host, svc.inet_port) == (None, None)


# --- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("line, text", [
    ("smtp", 'missing "transport type" field'),
    ("smtp - n - y - - smtpd", 'field "transport type" has no default value'),
    ("smtp tcp n - y - - smtpd", "bad transport type: tcp"),
    ("smtp inet", 'missing "private" field'),
    ("smtp inet - - y - - smtpd", "inet service cannot be private"),
    ("smtp inet y - y - - smtpd", "inet service cannot be private"),
    ("x unix yes - y - - x", 'field "private": bad value: "yes"'),
    ("x unix - N y - - x", 'field "unprivileged": bad value: "N"'),
    ("x unix - - 1 - - x", 'field "chroot": bad value: "1"'),
    ("x unix - - y", 'missing "wakeup_time" field'),
    ("x unix - - y 10x - x", 'field "wakeup_time": bad value: "10x"'),
    ("x unix - - y -? - x", 'field "wakeup_time": bad value: "-?"'),
    ("x unix - - y -1 - x", 'field "wakeup_time": bad value: "-1"'),
    ("x unix - - y - 1x x", 'field "max_proc": bad value: "1x"'),
    ("x unix - - y - -1 x", 'field "max_proc": bad value: "-1"'),
    ("x unix - - y - -", 'missing "command" field'),
    ("x unix - - y - - -", 'field "command" has no default value'),
    ("x unix - - y - - x -o", "option requires an argument -- 'o'"),
    ("x unix - - y - - x -o name", "invalid \"-o name\" option value: "
     "missing '=' after attribute name"),
    ("x unix - - y - - x -o a = b", "invalid \"-o a\" option value: "
     "missing '=' after attribute name"),
    ("x unix - - y - - x -o =b", "invalid \"-o =b\" option value: missing attribute name"),
    ("x unix - - y - - x -o {}", "invalid \"-o \" option value: missing attribute name"),
    ("x unix - - y - - x -o {a=b", "missing '}' in \"{a=b\""),
    ("x unix - - y - - x -o {a=b}x", "syntax error after '}' in \"{a=b}x\""),
    ("x unix - - y - - x arg {a b", "missing '}' in \"{a b\""),
])
def test_errors_name_file_and_line(line, text):
    err = error_of("# comment\n\nok unix - - - - - ok\n" + line + "\n  \n")
    assert isinstance(err, ValueError)
    assert (err.text, err.line, err.path) == (text, 4, "/etc/postfix-py/master.cf")
    assert str(err) == f"/etc/postfix-py/master.cf: line 4: {text}"


def test_error_in_continuation_names_first_line_of_entry():
    err = error_of("x unix - - y - - x\n  -o a=b\n  -o broken\n")
    assert err.line == 1 and "broken" in err.text


def test_load_missing_file(tmp_path):
    path = str(tmp_path / "master.cf")
    with pytest.raises(MasterCfError) as info:
        mastercf.load(path)
    assert str(info.value) == f"open {path}: No such file or directory"
    assert info.value.line is None


def bad_config_cases():
    """The tests/data/bad_configs/<case>/ folders that hold a master.cf."""
    return sorted(p.name for p in BAD_CONFIGS.iterdir() if (p / "master.cf").exists())


@pytest.mark.parametrize("case", bad_config_cases())
def test_bad_config_folder(case):
    folder = BAD_CONFIGS / case
    path = str(folder / "master.cf")
    expected = (folder / "expected-error").read_text().strip()
    with pytest.raises(MasterCfError) as info:
        mastercf.load(path, warn=lambda _: None)
    assert str(info.value) == f"{path}: {expected}"


def test_bad_config_folder_is_populated():
    assert len(bad_config_cases()) >= 5


# --- duplicates -----------------------------------------------------------------------

def test_duplicates_last_entry_wins_in_first_place(tmp_path):
    text = ("smtp inet n - y - - smtpd -o first=1\n"
            "pickup unix n - y 60 1 pickup\n"
            "25 inet n - y - 5 smtpd -o second=2\n"
            "smtp unix - - y - - smtp\n"
            "smtp unix n - y - - smtp\n")
    path = tmp_path / "master.cf"
    path.write_text(text)
    assert len(mastercf.parse(text, str(path), warn=lambda _: None)) == 5  # postconf -M
    warnings: list[str] = []
    services = mastercf.load(str(path), warn=warnings.append)
    assert warnings == ['duplicate master.cf entry for service "smtp" (25) '
                        '-- using the last entry']
    assert [(s.name, s.endpoint) for s in services] == [
        ("25", "25"), ("pickup", "public/pickup"), ("smtp", "private/smtp"),
        ("smtp", "public/smtp")]
    assert services[0].overrides == {"second": "2"} and services[0].maxproc == 5


# --- postconf -M output ---------------------------------------------------------------

def test_format_entry_columns():
    svc = one("smtp inet n - y - - smtpd\n")
    assert mastercf.format_service(svc) == (
        "smtp       inet  n       -       y       -       -       smtpd")
    svc = one("scalemail-backend unix - n n - 2 pipe\n  flags=R user=scalemail\n")
    assert mastercf.format_service(svc) == (
        "scalemail-backend unix - n       n       -       2       pipe flags=R "
        "user=scalemail")


def test_format_entry_overrides_and_fold():
    svc = one("submission inet n - y - - smtpd\n  -o syslog_name=postfix/submission\n"
              "  -o { smtpd_banner = $myhostname ESMTP }\n  -v\n")
    assert mastercf.format_service(svc) == (
        "submission inet  n       -       y       -       -       smtpd "
        "-o syslog_name=postfix/submission -o {smtpd_banner=$myhostname ESMTP} -v")
    assert mastercf.format_service(svc, fold=True) == (
        "submission inet  n       -       y       -       -       smtpd\n"
        "    -o syslog_name=postfix/submission\n"
        "    -o {smtpd_banner=$myhostname ESMTP}\n"
        "    -v")


def test_format_keeps_braces_of_first_argument():
    # Postfix 3.7's postconf -M prints "pipe bar baz foo" here, losing the grouping;
    # postfix-py prints what parses back to the same entry.
    svc = one("x unix - - - - - pipe {bar baz} foo\n")
    assert mastercf.format_service(svc).endswith("pipe {bar baz} foo")


@pytest.mark.parametrize("text", [
    "smtp inet n - y - - smtpd -o a={b c} -vo x=y -D -- -o c=d {e f}\n",
    "x unix - n n 10? 0 pipe flags=R argv=/bin/p ${user} {a b}\n",
    "[::1]:2525 inet n - n - - smtpd -o { smtpd_banner = a  b }\n",
])
def test_format_round_trip(text):
    for fold in (False, True):
        first = one(text)
        again = one(mastercf.format_service(first, fold) + "\n")
        assert (again.fields, again.argv, again.args, again.overrides) == (
            first.fields, first.argv, first.args, first.overrides)


# --- interop with Debian's Postfix ----------------------------------------------------

@needs_postconf
@pytest.mark.skipif(not os.path.exists(DEBIAN_MASTER_CF), reason="no /etc/postfix/master.cf")
def test_debian_master_cf_matches_postconf(tmp_path):
    # Debian's master.cf in a directory of its own: with "No configuration" chosen at
    # install time there is no /etc/postfix/main.cf, and postconf would refuse to run.
    (tmp_path / "main.cf").write_text("")
    shutil.copy(DEBIAN_MASTER_CF, tmp_path / "master.cf")
    services = mastercf.parse(pathlib.Path(DEBIAN_MASTER_CF).read_text(), DEBIAN_MASTER_CF)
    assert services
    for flag, fold in (("-M", False), ("-Mf", True)):
        theirs = subprocess.run([POSTCONF, "-c", str(tmp_path), flag], capture_output=True,
                                text=True, timeout=30).stdout
        ours = "".join(mastercf.format_service(s, fold) + "\n" for s in services)
        assert ours == theirs, flag
    # Field by field, as postconf -F reports them.
    fields = subprocess.run([POSTCONF, "-c", str(tmp_path), "-F"], capture_output=True,
                            text=True, timeout=30).stdout.splitlines()
    names = ("service", "type", "private", "unprivileged", "chroot", "wakeup",
             "process_limit")
    expected = []
    for svc in services:
        expected += [f"{svc.key}/{n} = {v}" for n, v in zip(names, svc.fields)]
        expected.append(f"{svc.key}/command = {' '.join(svc.argv)}")
    assert fields == expected


SYNTHETIC = [
    "x unix n - y - - smtpd -o a={b c d e f g h i j k l m n o p q r s t u v w x y z} "
    "-o x=y foo bar {baz qux} -o z=1\n",
    "smtp inet n - y - - smtpd -o { a = b c } -vo x=y -D\n",
    "verylongservicename-here unix-dgram n - y 1000? 100 smtpd -v\n",
    "smtp inet n - y - - smtpd -v -v -D -o a=b -- -o c=d foo\n",
    "submission inet n - y - - smtpd\n  -o syslog_name=postfix/submission\n"
    "#  -o commented=out\n\n  -o smtpd_client_restrictions=$mua_client_restrictions\n",
    "pipe unix - n n - - pipe flags=DRXhu user=vmail argv=/usr/bin/maildrop -d "
    "${recipient} aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " + "b" * 70 + " c\n",
    "fifo fifo - - - - - x\npass pass - - - - - x\n127.0.0.1:smtp inet n - - - - x\n",
]


@needs_postconf
@pytest.mark.parametrize("text", SYNTHETIC)
def test_synthetic_entries_match_postconf(tmp_path, text):
    services = parse(text)
    directory = postfix_dir(tmp_path, text)
    for flag, fold in (("-M", False), ("-Mf", True)):
        result = postconf(directory, flag)
        assert result.returncode == 0, result.stderr
        assert "".join(mastercf.format_service(s, fold) + "\n" for s in services) == \
            result.stdout


@needs_postconf
@pytest.mark.parametrize("line", [
    "smtp bogus n - y - - smtpd",
    "x unix x - y - - x",
    "x unix - - y 10x - x",
    "x unix - - y - 1x x",
    "x unix - - y - -",
])
def test_postconf_rejects_what_we_reject(tmp_path, line):
    with pytest.raises(MasterCfError):
        mastercf.parse(line + "\n", "master.cf")
    result = postconf(postfix_dir(tmp_path, line + "\n"), "-M")
    assert result.returncode == 1 and "fatal:" in result.stderr


def shipped(name: str) -> str:
    """The text of conf/name."""
    return (REPO / "conf" / name).read_text()


def uncomment_inet_examples(text: str) -> str:
    """The shipped master.cf with its commented submission and smtps entries enabled."""
    out = []
    for line in text.splitlines():
        if line.startswith(("#submission", "#smtps", "#  -o")):
            line = line[1:]
        out.append(line)
    return "\n".join(out) + "\n"


def test_shipped_master_cf():
    services = parse(shipped("master.cf"), "conf/master.cf")
    by_key = {s.key: s for s in services}
    assert list(by_key) == ["smtp/inet", "pickup/unix", "qmgr/unix", "tlsmgr/unix",
                            "anvil/unix", "showq/unix", "verify/unix", "smtp/unix",
                            "relay/unix", "lmtp/unix",
                            "error/unix", "discard/unix", "local/unix", "virtual/unix"]
    showq = by_key["showq/unix"]        # public/showq, for mailq readers and exporters
    assert (showq.command, showq.private, showq.chroot) == ("showq", False, False)
    assert by_key["smtp/inet"].command == "smtpd" and by_key["smtp/inet"].inet_port == 25
    assert by_key["smtp/inet"].chroot and not by_key["smtp/inet"].private
    qmgr = by_key["qmgr/unix"]
    assert (qmgr.private, qmgr.chroot, qmgr.wakeup, qmgr.maxproc) == (False, False, 300, 1)
    tlsmgr = by_key["tlsmgr/unix"]
    assert (tlsmgr.wakeup, tlsmgr.wakeup_conditional, tlsmgr.maxproc) == (1000, True, 1)
    local = by_key["local/unix"]
    assert (local.unpriv, local.chroot) == (False, False)
    virtual = by_key["virtual/unix"]
    assert (virtual.unpriv, virtual.chroot, virtual.command) == (False, False, "virtual")
    anvil = by_key["anvil/unix"]
    assert (anvil.chroot, anvil.unpriv, anvil.maxproc) == (True, True, 1)
    verify = by_key["verify/unix"]      # private/verify, as Postfix's verify(8)
    assert (verify.private, verify.unpriv, verify.chroot, verify.maxproc) == (True, True,
                                                                             False, 1)
    assert {s.command for s in services} <= {"smtpd", "smtp", "qmgr", "tlsmgr", "local",
                                             "discard", "error", "lmtp", "pickup", "anvil",
                                             "virtual", "showq", "verify"}


def test_shipped_master_cf_examples():
    services = parse(uncomment_inet_examples(shipped("master.cf")))
    by_key = {s.key: s for s in services}
    assert by_key["submission/inet"].inet_port == 587
    assert by_key["submission/inet"].overrides == {
        "syslog_name": "postfix-py/submission", "smtpd_tls_security_level": "encrypt",
        "smtpd_sasl_auth_enable": "yes", "smtpd_tls_auth_only": "yes",
        "smtpd_relay_restrictions": "permit_sasl_authenticated,reject"}
    assert by_key["smtps/inet"].inet_port == 465
    assert by_key["smtps/inet"].overrides == {
        "syslog_name": "postfix-py/smtps", "smtpd_tls_wrappermode": "yes",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_relay_restrictions": "permit_sasl_authenticated,reject"}


@needs_postconf
@pytest.mark.parametrize("enable_examples", [False, True])
def test_shipped_files_parse_with_postconf(tmp_path, enable_examples):
    master = shipped("master.cf")
    if enable_examples:
        master = uncomment_inet_examples(master)
    shutil.copy(REPO / "conf" / "main.cf", tmp_path / "main.cf")
    (tmp_path / "master.cf").write_text(master)
    result = postconf(tmp_path, "-M")
    assert result.returncode == 0 and result.stderr == ""
    ours = "".join(mastercf.format_service(s) + "\n" for s in parse(master))
    assert ours == result.stdout
    result = postconf(tmp_path, "-n")
    assert result.returncode == 0 and result.stderr == ""
