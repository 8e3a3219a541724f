"""The parameter table: complete for the seed document, documented, and self-consistent."""

import subprocess
from pathlib import Path

import pytest

from postfix_py.lib import maincf, params

# The seed document's parameter names and the defaults it gives, extracted into the
# repository (the file says how).
SEED_DATA = Path(__file__).resolve().parents[1] / "data" / "seed_parameters.txt"


def _seed_rows() -> list[tuple[str, str | None]]:
    rows = []
    for line in SEED_DATA.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, default = line.partition(" = ")
            rows.append((name.strip(), default.strip() if _ else None))
    return rows


SEED_DEFAULTS = {name: default for name, default in _seed_rows() if default is not None}

# Where postfix-py knowingly differs from Postfix 3.7's `postconf -d` (see params.py).
DEVIATIONS = {
    "config_directory", "queue_directory", "data_directory", "syslog_name", "mail_name",
    "mail_version", "smtpd_tls_ccert_verifydepth", "smtp_tls_scert_verifydepth",
    "lmtp_tls_scert_verifydepth", "smtpd_tls_fingerprint_digest",
    "smtp_tls_fingerprint_digest", "lmtp_tls_fingerprint_digest",
    "smtpd_forbid_bare_newline", "smtpd_sasl_type", "smtp_sasl_type", "lmtp_sasl_type",
    "mynetworks_style", "relay_domains", "smtpd_relay_restrictions",
    "smtputf8_enable",                        # yes: compatibility level 1 and later
    "myhostname", "mydomain", "mynetworks",   # computed from the host
    "alias_maps",                             # no nis: table type
    "append_dot_mydomain",                    # no compatibility_level: level >= 1's value
    "local_recipient_maps",                   # no proxymap: unix:passwd.byname read directly
    "smtp_tls_dane_insecure_mx_policy",       # dane: Postfix 3.7.13 and later
    # defer_if_permit: the value of $reject_tempfail_action, which is not a parameter here
    "unverified_recipient_tempfail_action", "unverified_sender_tempfail_action",
}


def seed_parameter_names():
    return sorted(name for name, _ in _seed_rows())


def test_seed_data_is_present():
    assert len(seed_parameter_names()) >= 40, SEED_DATA
    assert len(SEED_DEFAULTS) >= 20, SEED_DATA


@pytest.mark.parametrize("name", seed_parameter_names())
def test_every_seed_parameter_is_declared(name):
    assert params.lookup(name) is not None, f"{name} is named in the seed but not declared"


@pytest.mark.parametrize("name,default", sorted(SEED_DEFAULTS.items()))
def test_seed_defaults(name, default):
    assert params.lookup(name).default == default


def test_every_row_is_documented_and_its_default_converts():
    cfg = maincf.Config("/nonexistent", "/nonexistent/main.cf")
    for row in params.PARAMS:
        assert row.doc and len(row.doc) > 10, row.name
        assert row.type in (params.BOOL, params.INT, params.TIME, params.SIZE,
                            params.LIST, params.TABLE, params.STR), row.name
        cfg[row.name]   # raises ConfigError if the default does not fit its own type


def test_names_are_unique_and_sorted():
    names = params.names()
    assert len(names) == len(set(names)) == len(params.PARAMS)
    assert names == sorted(names)


@pytest.mark.parametrize("text,seconds", [("300s", 300), ("5m", 300), ("2h", 7200),
                                          ("1d", 86400), ("1w", 604800), ("42", 42),
                                          ("10S", 10)])
def test_time_units(text, seconds):
    assert params.convert(params.lookup("smtpd_timeout"), text) == seconds


def test_time_without_unit_uses_the_rows_unit():
    assert params.convert(params.lookup("maximal_queue_lifetime"), "3") == 3 * 86400
    assert params.convert(params.lookup("delay_warning_time"), "4") == 4 * 3600


@pytest.mark.parametrize("name,text,message", [
    ("smtpd_use_tls", "maybe", "bad boolean configuration: smtpd_use_tls = maybe"),
    ("max_use", "abc", "bad numerical configuration: max_use = abc"),
    ("smtpd_timeout", "10x", 'invalid smtpd_timeout parameter value: "10x"'),
    ("smtpd_tls_loglevel", "5", "invalid smtpd_tls_loglevel parameter value 5 > 4"),
    ("tls_daemon_random_bytes", "0", "invalid tls_daemon_random_bytes parameter value 0 < 1"),
])
def test_bad_values_name_the_parameter(name, text, message):
    with pytest.raises(params.ParamError) as exc:
        params.convert(params.lookup(name), text)
    assert str(exc.value) == message


def test_bool_and_list():
    assert params.convert(params.lookup("smtpd_use_tls"), "YES") is True
    assert params.convert(params.lookup("smtpd_use_tls"), "no") is False
    assert params.split_list("a, b,c\td\n e,,") == ["a", "b", "c", "d", "e"]
    assert params.split_list("check_recipient_access inline:{{x@y=550 no such, user}}, permit") \
        == ["check_recipient_access", "inline:{{x@y=550 no such, user}}", "permit"]


@pytest.mark.interop
def test_defaults_match_postfix_37(debian_postconf):
    """Every parameter Postfix knows has Postfix's default, but for the documented deviations."""
    names = [n for n in params.names() if n not in DEVIATIONS]
    out = subprocess.run([debian_postconf, "-d", *names], capture_output=True, text=True)
    theirs = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition(" =")
        theirs[name] = value.strip()
    assert len(theirs) > 200   # Postfix knows nearly all of ours
    wrong = {n: (params.lookup(n).default, v) for n, v in theirs.items()
             if params.lookup(n).default != v}
    assert wrong == {}
