"""`postfix-py postconf` through the real command line, side by side with Postfix's postconf."""

import subprocess

import pytest

from test_params import SEED_DEFAULTS, seed_parameter_names

# A main.cf in Postfix's style: the seed's "quick and dirty" settings, continuations,
# $ references, an override, a user-defined parameter used by reference, and one unused.
MAIN_CF = """\
# /etc/postfix/main.cf, as an administrator might have it
myhostname = mail.example.com
mydomain = example.com
myorigin = $mydomain
mydestination = $myhostname, localhost.$mydomain,
    localhost
mynetworks = 127.0.0.0/8
\t[::1]/128
smtp_tls_CAfile = /etc/postfix/cacert.pem
smtp_tls_cert_file = /etc/postfix/FOO-cert.pem
smtp_tls_key_file = /etc/postfix/FOO-key.pem
smtp_tls_session_cache_database = btree:/var/run/smtp_tls_session_cache
smtp_use_tls = yes
smtpd_tls_CAfile = /etc/postfix/cacert.pem
smtpd_tls_cert_file = /etc/postfix/FOO-cert.pem
smtpd_tls_key_file = /etc/postfix/FOO-key.pem
smtpd_tls_received_header = yes
smtpd_tls_session_cache_database = btree:/var/run/smtpd_tls_session_cache
smtpd_use_tls = yes
tls_random_source = dev:/dev/urandom
smtpd_banner = $myhostname ESMTP ${stress?{under stress}:{$local_note}}
local_note = hello
unused_thing = 42
myhostname = mx.example.com
"""


@pytest.fixture
def confdir(tmp_path):
    (tmp_path / "main.cf").write_text(MAIN_CF)
    (tmp_path / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    return tmp_path


def test_n_prints_what_main_cf_sets(confdir, postfix_py):
    out = postfix_py("postconf", "-c", confdir, "-n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == sorted(lines)
    assert f"config_directory = {confdir}" in lines
    assert "mydestination = $myhostname, localhost.$mydomain, localhost" in lines
    assert "mynetworks = 127.0.0.0/8 [::1]/128" in lines
    assert "myhostname = mx.example.com" in lines
    assert "local_note = hello" in lines
    assert not any(l.startswith("unused_thing") for l in lines)
    assert f"{confdir}/main.cf, line 24: overriding earlier entry: myhostname=mail.example.com" \
        in out.stderr
    assert f"{confdir}/main.cf: unused parameter: unused_thing=42" in out.stderr


@pytest.mark.interop
def test_n_and_x_match_postfix(confdir, postfix_py, debian_postconf):
    for flags in (["-n"], ["-nh"], ["-x", "smtpd_banner", "mydestination", "myorigin"],
                  ["smtpd_tls_key_file", "local_note"]):
        ours = postfix_py("postconf", "-c", confdir, *flags)
        theirs = subprocess.run([debian_postconf, "-c", str(confdir), *flags],
                                capture_output=True, text=True)
        assert ours.stdout == theirs.stdout, flags
        assert ours.returncode == theirs.returncode == 0


def test_d_lists_every_seed_parameter(postfix_py):
    out = postfix_py("postconf", "-d")
    assert out.returncode == 0, out.stderr
    printed = dict(line.partition(" =")[::2] for line in out.stdout.splitlines())
    for name in seed_parameter_names():
        assert name in printed, name
    for name, default in SEED_DEFAULTS.items():
        assert printed[name].strip() == default, name


def test_named_parameters_h_and_x(confdir, postfix_py):
    out = postfix_py("postconf", "-c", confdir, "-h", "myorigin", "smtpd_tls_ccert_verifydepth")
    assert out.stdout == "$mydomain\n5\n"
    out = postfix_py("postconf", "-c", confdir, "-x", "smtpd_banner")
    assert out.stdout == "smtpd_banner = mx.example.com ESMTP hello\n"


def test_unknown_parameter_is_a_warning(confdir, postfix_py):
    out = postfix_py("postconf", "-c", confdir, "nosuch", "unused_thing", "relayhost")
    assert out.returncode == 0
    assert out.stdout == "relayhost =\n"
    assert "postconf: warning: nosuch: unknown parameter" in out.stderr
    assert "postconf: warning: unused_thing: unknown parameter" in out.stderr


def test_e_edits_in_place(confdir, postfix_py):
    out = postfix_py("postconf", "-c", confdir, "-e", "relayhost = [relay.example]:587",
                     "myhostname=new.example.com")
    assert out.returncode == 0, out.stderr
    text = (confdir / "main.cf").read_text()
    assert text.startswith("# /etc/postfix/main.cf, as an administrator might have it\n")
    assert text.count("myhostname = new.example.com") == 2
    assert text.endswith("relayhost = [relay.example]:587\n")
    assert postfix_py("postconf", "-c", confdir, "-h", "relayhost").stdout == \
        "[relay.example]:587\n"


def test_X_and_hash(confdir, postfix_py):
    assert postfix_py("postconf", "-c", confdir, "-X", "local_note").returncode == 0
    assert postfix_py("postconf", "-c", confdir, "-#", "unused_thing").returncode == 0
    text = (confdir / "main.cf").read_text()
    assert "local_note" not in text.replace("$local_note", "")
    assert "#unused_thing = 42" in text


@pytest.mark.parametrize("args,message", [
    (["-e", "no equals sign"], "postconf: fatal: missing '=' after attribute name"),
    (["-d", "-n"], "postconf: fatal: specify at most one of"),
    (["-q"], "postconf: fatal: option -q not recognized"),
    (["-e"], "postconf: fatal: no parameters specified"),
])
def test_usage_errors(confdir, postfix_py, args, message):
    out = postfix_py("postconf", "-c", confdir, *args)
    assert out.returncode == 1
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_broken_main_cf_is_fatal_with_file_and_line(tmp_path, postfix_py):
    (tmp_path / "main.cf").write_text("myhostname = x\nthis line is broken\n")
    out = postfix_py("postconf", "-c", tmp_path, "-n")
    assert out.returncode == 1
    assert out.stderr.strip() == (f"postconf: fatal: {tmp_path}/main.cf, line 2: missing '=' "
                                  'after attribute name: "this line is broken"')


def test_missing_config_directory(tmp_path, postfix_py):
    out = postfix_py("postconf", "-c", tmp_path / "nope", "-n")
    assert out.returncode == 1
    assert "main.cf: No such file or directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_output_to_a_closed_pipe_is_quiet(postfix_py):
    from helpers import POSTFIX_PY
    proc = subprocess.run(f"'{POSTFIX_PY}' postconf -d | head -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr


# An old main.cf that sets every former name postfix-py declares (params.FORMER_NAMES),
# and what each new name then is: Postfix 3.7's `postconf -x` for the same file,
# quirks included (postscreen_dnsbl_ttl counts hours; a set
# smtpd_client_connection_limit_exceptions empties smtpd_client_event_limit_exceptions).
FORMER_CF = """\
fallback_relay = [fallback.example]:2525
postscreen_blacklist_action = drop
postscreen_dnsbl_ttl = 3
postscreen_dnsbl_whitelist_threshold = -2
postscreen_whitelist_interfaces = !192.0.2.1 static:all
smtpd_client_connection_limit_exceptions = 192.0.2.9
smtpd_per_record_deadline = yes
virtual_maps = hash:/etc/postfix/virtual
"""
FORMER_EFFECT = {
    "smtp_fallback_relay": "[fallback.example]:2525",
    "postscreen_denylist_action": "drop",
    "postscreen_dnsbl_max_ttl": "3h",
    "postscreen_dnsbl_allowlist_threshold": "-2",
    "postscreen_allowlist_interfaces": "!192.0.2.1 static:all",
    "smtpd_client_event_limit_exceptions": "",
    "smtpd_per_request_deadline": "yes",
    "virtual_alias_maps": "hash:/etc/postfix/virtual",
}


@pytest.fixture
def former_confdir(tmp_path):
    (tmp_path / "main.cf").write_text(FORMER_CF)
    (tmp_path / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    return tmp_path


def test_former_names_set_their_new_names(former_confdir, postfix_py):
    from postfix_py.lib import params
    assert set(FORMER_EFFECT) == set(params.FORMER_NAMES.values())
    out = postfix_py("postconf", "-c", former_confdir, "-x", *FORMER_EFFECT)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.splitlines() == [f"{n} = {v}".rstrip() for n, v in FORMER_EFFECT.items()]
    # Without the former names, the new names have their own defaults.
    (former_confdir / "main.cf").write_text("")
    out = postfix_py("postconf", "-c", former_confdir, "-x", *FORMER_EFFECT)
    assert not set(out.stdout.splitlines()) & \
        {f"{n} = {v}".rstrip() for n, v in FORMER_EFFECT.items()}


def test_former_names_are_known_not_unused(former_confdir, postfix_py):
    out = postfix_py("postconf", "-c", former_confdir, "-n")
    assert out.returncode == 0 and out.stderr == ""
    printed = [l for l in out.stdout.splitlines() if not l.startswith("config_directory")]
    assert printed == sorted(FORMER_CF.splitlines())


@pytest.mark.interop
def test_former_names_match_postfix(former_confdir, postfix_py, debian_postconf):
    for flags in (["-n"], ["-x", *FORMER_EFFECT], ["-x", *params_former_names()]):
        ours = postfix_py("postconf", "-c", former_confdir, *flags)
        theirs = subprocess.run([debian_postconf, "-c", str(former_confdir), *flags],
                                capture_output=True, text=True)
        assert ours.stdout == theirs.stdout, flags
        assert ours.stderr == theirs.stderr == ""


def params_former_names():
    from postfix_py.lib import params
    return sorted(params.FORMER_NAMES)
