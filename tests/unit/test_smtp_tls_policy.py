"""smtp/tls_policy.py: levels, the legacy parameters, smtp_tls_per_site, policy maps, cache keys.

The per-site truth table is written out literally from SPEC-NOTES.md's rules, so that the
code is checked against the rules and not against itself.
"""

import itertools

import pytest

from postfix_py.lib import maincf
from postfix_py.smtp import tls_policy as P

ENTRIES = (None, "NONE", "MAY", "MUST_NOPEERMATCH", "MUST")

# Rule 2: a more specific entry beats MAY; a more secure one beats a less secure one.
# Rows: server host name result; columns: next-hop result (order of ENTRIES).
COMBINED = {
    None:               (None,               "NONE",             "MAY",              "MUST_NOPEERMATCH", "MUST"),
    "NONE":             ("NONE",             "NONE",             "NONE",             "MUST_NOPEERMATCH", "MUST"),
    "MAY":              ("MAY",              "NONE",             "MAY",              "MUST_NOPEERMATCH", "MUST"),
    "MUST_NOPEERMATCH": ("MUST_NOPEERMATCH", "MUST_NOPEERMATCH", "MUST_NOPEERMATCH", "MUST_NOPEERMATCH", "MUST"),
    "MUST":             ("MUST",             "MUST",             "MUST",             "MUST",             "MUST"),
}

# Rule 1: the global settings (smtp_use_tls, smtp_enforce_tls, smtp_tls_enforce_peername);
# enforce implies use.
GLOBAL = {
    (False, False, False): "none",
    (False, False, True): "none",
    (True, False, False): "may",
    (True, False, True): "may",
    (False, True, False): "encrypt",
    (False, True, True): "verify",
    (True, True, False): "encrypt",
    (True, True, True): "verify",
}

# Rule 3: the combined per-site result overrides the global level, except that MAY does
# not weaken an enforced one. Columns: global none, may, encrypt, verify.
FINAL = {
    None:               {"none": "none",    "may": "may",     "encrypt": "encrypt", "verify": "verify"},
    "NONE":             {"none": "none",    "may": "none",    "encrypt": "none",    "verify": "none"},
    "MAY":              {"none": "may",     "may": "may",     "encrypt": "encrypt", "verify": "verify"},
    "MUST_NOPEERMATCH": {"none": "encrypt", "may": "encrypt", "encrypt": "encrypt", "verify": "encrypt"},
    "MUST":             {"none": "verify",  "may": "verify",  "encrypt": "verify",  "verify": "verify"},
}


@pytest.mark.parametrize("use,enforce,peername", sorted(GLOBAL))
def test_per_site_truth_table(use, enforce, peername):
    for host, nexthop in itertools.product(ENTRIES, ENTRIES):
        combined = COMBINED[host][ENTRIES.index(nexthop)]
        assert P.combine_per_site(host, nexthop) == combined, (host, nexthop)
        expected = FINAL[combined][GLOBAL[(use, enforce, peername)]]
        got = P.per_site_level(use, enforce, peername, host, nexthop)
        assert got == expected, (use, enforce, peername, host, nexthop)


def test_truth_table_covers_every_pair_under_every_global():
    assert len(list(itertools.product(GLOBAL, ENTRIES, ENTRIES))) == 200


def test_postfix_2_2_quirks_are_gone():
    # NONE+MAY is NONE whatever the globals say (was global-dependent in Postfix 2.2).
    for g in GLOBAL:
        assert P.per_site_level(*g, "NONE", "MAY") == "none"
        assert P.per_site_level(*g, "MAY", "NONE") == "none"
    # MUST_NOPEERMATCH overrides smtp_tls_enforce_peername = yes with enforced TLS.
    assert P.per_site_level(True, True, True, None, "MUST_NOPEERMATCH") == "encrypt"


def test_per_site_values_are_case_insensitive_and_checked():
    assert P.combine_per_site("must", " may ") == "MUST"
    with pytest.raises(P.PolicyError, match="unknown TLS policy 'SOMETIMES'"):
        P.combine_per_site("SOMETIMES", None)


def test_level_predicates():
    assert [lvl for lvl in P.LEVELS if P.requires_tls(lvl)] == \
        ["encrypt", "fingerprint", "halfdane", "dane", "dane-only", "verify", "secure"]
    assert [lvl for lvl in P.LEVELS if P.must_match(lvl)] == \
        ["fingerprint", "halfdane", "dane", "dane-only", "verify", "secure"]
    assert [lvl for lvl in P.LEVELS if P.must_trust(lvl)] == ["verify", "secure"]


def _cfg(tmp_path, text=""):
    (tmp_path / "main.cf").write_text(text)
    return maincf.load(str(tmp_path))


def test_global_level_modern_wins_over_legacy(tmp_path):
    assert P.global_level(_cfg(tmp_path)) == "none"
    assert P.global_level(_cfg(tmp_path, "smtp_use_tls = yes\n")) == "may"
    assert P.global_level(_cfg(tmp_path, "smtp_enforce_tls = yes\n")) == "verify"
    assert P.global_level(_cfg(tmp_path, "smtp_enforce_tls = yes\n"
                                         "smtp_tls_enforce_peername = no\n")) == "encrypt"
    assert P.global_level(_cfg(tmp_path, "smtp_enforce_tls = yes\n"
                                         "smtp_tls_security_level = may\n")) == "may"
    assert P.global_level(_cfg(tmp_path, "lmtp_tls_security_level = secure\n"),
                          "lmtp") == "secure"
    with pytest.raises(P.PolicyError, match='invalid tls security level: "strict"'):
        P.global_level(_cfg(tmp_path, "smtp_tls_security_level = strict\n"))


def test_parse_policy_attributes():
    warnings = []
    pol = P.parse_policy("secure match=nexthop:dot-nexthop protocols=>=TLSv1.2 "
                         "ciphers=high servername=mx.example.com", "t", "d", warnings.append)
    assert pol.level == "secure" and pol.matches == ("nexthop", "dot-nexthop")
    assert (pol.protocols, pol.ciphers, pol.servername) == (">=TLSv1.2", "high", "mx.example.com")
    pol = P.parse_policy("fingerprint match=AA:BB|CC:DD", "t", "d", warnings.append)
    assert pol.matches == ("AA:BB", "CC:DD")
    pol = P.parse_policy("none ciphers=high", "t", "d", warnings.append)
    assert pol.level == "none" and 'ignoring attribute "ciphers=high" with TLS disabled' in warnings[-1]
    pol = P.parse_policy("encrypt { protocols = !SSLv3, !TLSv1 }", "t", "d", warnings.append)
    assert pol.protocols == "!SSLv3, !TLSv1"
    # dane and dane-only stay for smtp/dane.py, which knows whether DNSSEC is on.
    assert P.parse_policy("dane", "t", "d", warnings.append).level == "dane"
    assert P.parse_policy("dane-only protocols=>=TLSv1.2", "t", "d",
                          warnings.append).protocols == ">=TLSv1.2"


@pytest.mark.parametrize("text,problem", [
    ("", "invalid empty policy"),
    ("sometimes", 'invalid security level "sometimes"'),
    ("may match=example.com", 'attribute "match" invalid at security level "may"'),
    ("verify bogus=1", 'invalid attribute name: "bogus"'),
    ("verify ciphers=high ciphers=low", 'attribute "ciphers" is specified multiple times'),
    ("verify servername=-bad-", '"servername=-bad-" specifies an invalid hostname'),
    ("verify protocols", "malformed attribute/value pair"),
    ("dane match=nexthop", 'attribute "match" invalid at security level "dane"'),
])
def test_parse_policy_refusals(text, problem):
    warnings = []
    with pytest.raises(P.PolicyError):
        P.parse_policy(text, "smtp_tls_policy_maps, next-hop destination \"x\"", "x",
                       warnings.append)
    assert problem in warnings[-1]
    assert warnings[-1].startswith("smtp_tls_policy_maps, next-hop destination \"x\": ")


def test_per_site_table_by_host_and_nexthop(tmp_path):
    table = tmp_path / "tls_per_site"
    # The seed's example, plus a host entry.
    table.write_text("[msa.example.net]:587 MUST\n"
                     "example.org NONE\n"
                     "[smtp.example.com] NONE\n"
                     "mx1.example.org MUST\n"
                     "relaxed.example MAY\n"
                     "broken.example SOMETIMES\n")
    cfg = _cfg(tmp_path, f"smtp_tls_per_site = texthash:{table}\n"
                         "smtp_use_tls = yes\n")
    warnings = []
    finder = P.PolicyFinder(cfg, warn=warnings.append)
    try:
        assert finder.find("[msa.example.net]:587", "msa.example.net", True,
                           "msa.example.net").level == "verify"
        # The bracketed key does not match the unbracketed form, nor another port.
        assert finder.find("[msa.example.net]:25", "msa.example.net", True,
                           "msa.example.net").level == "may"
        assert finder.find("example.org", "example.org", False, "mx2.example.org").level == "none"
        # NONE for the next hop, MUST for this MX host: the more secure wins.
        assert finder.find("example.org", "example.org", False, "mx1.example.org").level == "verify"
        assert finder.find("[smtp.example.com]", "smtp.example.com", True,
                           "smtp.example.com").level == "none"
        assert finder.find("other.example", "other.example", False, "mx.other").level == "may"
        pol = finder.find("broken.example", "broken.example", False, "mx.broken")
        assert not pol.valid and (pol.dsn, pol.reason) == P.DSN_CONFIG
        assert "unknown TLS policy 'SOMETIMES' for next-hop destination broken.example" in warnings[-1]
    finally:
        finder.close()
    cfg = _cfg(tmp_path, f"smtp_tls_per_site = texthash:{table}\nsmtp_enforce_tls = yes\n")
    finder = P.PolicyFinder(cfg)
    try:
        # A per-site MAY does not weaken the global enforcement.
        assert finder.find("relaxed.example", "relaxed.example", False, "mx").level == "verify"
    finally:
        finder.close()


def test_policy_maps_parent_domains_and_literal_keys(tmp_path):
    table = tmp_path / "tls_policy"
    table.write_text(".example.com secure\n"
                     "example.com encrypt\n"
                     "[mail.example.net]:587 verify match=mail.example.net\n"
                     "bad.example verify bogus=1\n")
    per_site = tmp_path / "per_site"
    per_site.write_text("example.com NONE\n")
    warnings = []
    cfg = _cfg(tmp_path, f"smtp_tls_policy_maps = texthash:{table}\n"
                         f"smtp_tls_per_site = texthash:{per_site}\n")
    finder = P.PolicyFinder(cfg, warn=warnings.append)
    try:
        assert "smtp_tls_per_site ignored when smtp_tls_policy_maps is not empty." in warnings
        assert finder.find("example.com", "example.com", False, "mx").level == "encrypt"
        assert finder.find("sub.example.com", "sub.example.com", False, "mx").level == "secure"
        assert finder.find("example.comx", "example.comx", False, "mx").level == "none"
        pol = finder.find("[mail.example.net]:587", "mail.example.net", True, "mail.example.net")
        assert pol.level == "verify" and pol.matches == ("mail.example.net",)
        # Literal next hops match only as written: no parent-domain walk.
        assert finder.find("[sub.example.com]", "sub.example.com", True, "x").level == "none"
        assert not finder.find("bad.example", "bad.example", False, "mx").valid
    finally:
        finder.close()


def test_match_strategies_defaults(tmp_path):
    cfg = _cfg(tmp_path)
    assert P.match_strategies(cfg, "smtp", P.Policy("verify")) == ["hostname"]
    assert P.match_strategies(cfg, "smtp", P.Policy("secure")) == ["nexthop", "dot-nexthop"]
    assert P.match_strategies(cfg, "lmtp", P.Policy("secure")) == ["nexthop"]
    assert P.match_strategies(cfg, "smtp", P.Policy("verify", matches=("a",))) == ["a"]
    assert P.match_strategies(cfg, "smtp", P.Policy("encrypt")) == []


def test_cache_key_carries_every_field():
    d = P.policy_digest("may", [], None)
    base = P.cache_key("smtp", "[mx.example]:25", "mx.example", "192.0.2.1", 25, d)
    assert base == f"smtp&[mx.example]:25&mx.example&192.0.2.1&25&{d}"
    others = {
        P.cache_key("relay", "[mx.example]:25", "mx.example", "192.0.2.1", 25, d),
        P.cache_key("smtp", "example", "mx.example", "192.0.2.1", 25, d),
        P.cache_key("smtp", "[mx.example]:25", "mx2.example", "192.0.2.1", 25, d),
        P.cache_key("smtp", "[mx.example]:25", "mx.example", "192.0.2.2", 25, d),
        P.cache_key("smtp", "[mx.example]:25", "mx.example", "192.0.2.1", 587, d),
        P.cache_key("smtp", "[mx.example]:25", "mx.example", "192.0.2.1", 25,
                    P.policy_digest("encrypt", [], None)),
    }
    assert base not in others and len(others) == 6
    # A field with the separator is encoded, as Postfix's smtp_key does.
    assert "a&b" not in P.cache_key("smtp", "a&b", "h", "1", 25, d)
    long_key = P.cache_key("smtp", "x" * 600, "h", "1", 25, d)
    assert len(long_key) <= 511 and long_key.startswith("smtp&")
