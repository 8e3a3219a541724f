"""The parameter table: complete for the seed document, documented, and self-consistent."""

import re
import subprocess
from pathlib import Path

import pytest

from postfix_py.lib import maincf, params

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "000_e5e5137b3d38c068.txt"

# Defaults the seed document gives (the specification), and the examples.
SEED_DEFAULTS = {
    "smtpd_tls_ccert_verifydepth": "5",
    "smtp_tls_scert_verifydepth": "5",
    "smtpd_tls_session_cache_timeout": "3600s",
    "smtp_tls_session_cache_timeout": "3600s",
    "tls_daemon_random_bytes": "32",
    "tls_random_bytes": "32",
    "tls_random_source": "dev:/dev/urandom",
    "tls_random_exchange_name": "${data_directory}/prng_exch",
    "tls_random_reseed_period": "3600s",
    "tls_random_prng_update_period": "3600s",
    "smtpd_tls_key_file": "$smtpd_tls_cert_file",
    "smtpd_tls_dkey_file": "$smtpd_tls_dcert_file",
    "smtp_tls_key_file": "$smtp_tls_cert_file",
    "smtp_tls_dkey_file": "$smtp_tls_dcert_file",
    "smtp_tls_enforce_peername": "yes",
    "smtpd_tls_loglevel": "0",
    "smtp_tls_loglevel": "0",
    "smtpd_tls_ask_ccert": "no",
    "smtpd_tls_req_ccert": "no",
    "smtpd_tls_auth_only": "no",
    "smtp_starttls_timeout": "300s",
}

# Where postfix-py knowingly differs from Postfix 3.7's `postconf -d` (see params.py).
DEVIATIONS = {
    "config_directory", "queue_directory", "data_directory", "syslog_name", "mail_name",
    "mail_version", "smtpd_tls_ccert_verifydepth", "smtp_tls_scert_verifydepth",
    "lmtp_tls_scert_verifydepth", "smtpd_tls_fingerprint_digest",
    "smtp_tls_fingerprint_digest", "lmtp_tls_fingerprint_digest",
    "smtpd_forbid_bare_newline", "smtpd_sasl_type", "smtp_sasl_type", "lmtp_sasl_type",
    "mynetworks_style", "relay_domains", "smtpd_relay_restrictions",
    "smtpd_client_event_limit_exceptions",    # $mynetworks, without the pre-2.9 name
    "myhostname", "mydomain", "mynetworks",   # computed from the host
    # envelope classes only: header address rewriting is not implemented (lib/cleanup.py)
    "canonical_classes", "sender_canonical_classes", "recipient_canonical_classes",
    "masquerade_classes",
    "virtual_alias_maps",                     # empty, without the pre-2.0 name virtual_maps
}


def seed_parameter_names():
    text = SEED.read_text()
    return sorted(set(re.findall(r"\b(?:smtpd?|tls|relay)_[A-Za-z0-9_]*[A-Za-z0-9]\b", text))
                  - {"smtpd_scache", "smtp_scache", "tls_per_site", "relay_transport"})


def test_seed_document_is_present():
    assert SEED.exists(), SEED


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
