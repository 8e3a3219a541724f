"""smtp/mta_sts.py's pure parts: the TXT record, the policy body, mx patterns, the
decision against the TLS policy (DANE wins, enforce, testing, none), and the cache."""

import pytest

from postfix_py.smtp import mta_sts
from postfix_py.smtp.mta_sts import StsError, StsPolicy
from postfix_py.smtp.tls_policy import Policy

GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


def test_txt_record_id():
    assert mta_sts.parse_txt(["v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert mta_sts.parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert mta_sts.parse_txt(["v=STSv1; id=abc; ext=1"]) == "abc"
    # two STS records, none, a bad id, a missing id, a bad version: no usable record
    assert mta_sts.parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert mta_sts.parse_txt(["v=spf1 -all"]) is None
    assert mta_sts.parse_txt(["v=STSv1; id=not-alnum"]) is None
    assert mta_sts.parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert mta_sts.parse_txt(["v=STSv1;"]) is None
    assert mta_sts.parse_txt(["v=STSv10; id=a"]) is None


def test_policy_body():
    assert mta_sts.parse_policy(GOOD) == ("enforce", ("mail.example.com", "*.example.net"),
                                          86400)
    # LF line ends, extension fields ignored, the first occurrence of a field counts
    assert mta_sts.parse_policy("version: STSv1\nmode: testing\nfoo: bar\nmode: enforce\n"
                                "mx: MX.Example.COM.\nmax_age: 0\n") == \
        ("testing", ("mx.example.com",), 0)
    assert mta_sts.parse_policy("version: STSv1\nmode: none\nmax_age: 10\n")[0] == "none"
    for bad in ("version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 1\n",
                "version: STSv1\nmode: strict\nmx: a.b\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 31557601\n",
                "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",                 # no mx
                "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1\n",
                "<html>not a policy</html>\n"):
        with pytest.raises(StsError) as info:
            mta_sts.parse_policy(bad)
        assert info.value.kind == "sts-policy-invalid"


def test_mx_patterns():
    assert mta_sts.mx_matches("mail.example.com", "MAIL.example.com.")
    assert not mta_sts.mx_matches("mail.example.com", "mail2.example.com")
    assert mta_sts.mx_matches("*.example.net", "mx1.example.net")
    assert not mta_sts.mx_matches("*.example.net", "example.net")
    assert not mta_sts.mx_matches("*.example.net", "a.b.example.net")
    assert not mta_sts.mx_matches("*.example.net", "mx1.example.network")


def sts(mode="enforce", mx=("mx.example.com",)):
    return StsPolicy("example.com", "id1", mode, mx, 86400, 1000.0, "")


def test_enforce_requires_a_listed_mx_and_a_verified_name():
    p, why = mta_sts.apply(Policy("may"), sts(), "mx.example.com")
    assert why is None
    assert (p.level, p.matches, p.source, p.servername) == \
        ("verify", ("hostname",), "MTA-STS policy", "hostname")
    p, why = mta_sts.apply(Policy("none"), sts(), "other.example.org")
    assert p is None
    assert why == ("4.7.5", "MX host other.example.org does not match the MTA-STS policy "
                            "of example.com")
    # a stronger global policy stays as it is
    strong = Policy("secure")
    assert mta_sts.apply(strong, sts(), "mx.example.com") == (strong, None)
    # an entry of the administrator's tables for the destination wins, weaker or not
    for entry in (Policy("may", source="policy"), Policy("none", source="per-site")):
        assert mta_sts.apply(entry, sts(), "other.example.org") == (entry, None)


def test_testing_mode_delivers_and_none_is_no_policy():
    p, why = mta_sts.apply(Policy("none"), sts("testing"), "elsewhere.example.org")
    assert why is None and (p.level, p.source) == ("may", "MTA-STS policy (testing)")
    p, _ = mta_sts.apply(Policy("encrypt"), sts("testing"), "mx.example.com")
    assert p.level == "encrypt"
    base = Policy("may")
    assert mta_sts.apply(base, sts("none"), "x.example.org") == (base, None)
    assert mta_sts.apply(base, None, "x.example.org") == (base, None)


def test_dane_wins():
    for dane in (Policy("dane"), Policy("dane-only")):
        assert mta_sts.apply(dane, sts(), "not.listed.example") == (dane, None)
    # DANE that found no usable TLSA records fell back to may: MTA-STS applies
    p, why = mta_sts.apply(Policy("may", source="DANE (no TLSA)"), sts(), "mx.example.com")
    assert (p.level, p.source) == ("verify", "MTA-STS policy")


def test_half_dane_host_must_match_the_mx_patterns():
    """halfdane: TLSA records authenticate the host, MTA-STS the (insecure) MX name."""
    half = Policy("halfdane", source="DANE TLSA")
    assert mta_sts.apply(half, sts(), "mx.example.com") == (half, None)
    p, why = mta_sts.apply(half, sts(), "not.listed.example")
    assert p is None and why[0] == "4.7.5"


def test_invalid_policy_is_left_for_the_caller():
    bad = Policy("invalid", dsn="4.3.0", reason="Temporary lookup error")
    assert mta_sts.apply(bad, sts(), "mx.example.com") == (bad, None)


def test_cache_round_trip_and_expiry(tmp_path):
    cache = mta_sts.PolicyCache(str(tmp_path / "cache"))
    p = StsPolicy("example.com", "id7", "enforce", ("mx.example.com",), 60, 1000.0, GOOD)
    cache.put(p)
    got = cache.get("example.com")
    assert got == p
    assert not got.expired(1059.0) and got.expired(1060.0)
    assert cache.get("other.example") is None
    cache.close()


class FakeSts(mta_sts.MtaSts):
    """MtaSts with the TXT answer and the fetch replaced: lookup()'s rules alone."""

    def __init__(self, cache, clock):
        super().__init__(None, None, cache, clock=clock, warn=self.warned.append)
        self.txt = "v1"         # the id the TXT record has; None: no record
        self.fail = None        # StsError the fetch raises
        self.fetched = 0

    warned: list = []

    def _txt_id(self, domain):
        return self.txt, False

    def fetch(self, domain, ident):
        self.fetched += 1
        if self.fail is not None:
            raise self.fail
        return StsPolicy(domain, ident, "enforce", ("mx.example.com",), 100, self.clock(),
                         GOOD)


def test_lookup_fetches_on_new_id_or_expiry_and_keeps_a_live_policy(tmp_path):
    now = [1000.0]
    s = FakeSts(mta_sts.PolicyCache(str(tmp_path / "c")), lambda: now[0])
    first = s.lookup("Example.COM.")
    assert first.fetched and first.policy.id == "v1" and s.fetched == 1
    assert s.lookup("example.com").policy == first.policy and s.fetched == 1   # cached
    s.txt = "v2"
    assert s.lookup("example.com").policy.id == "v2" and s.fetched == 2       # new id
    now[0] += 100                                                               # max_age
    assert s.lookup("example.com").fetched and s.fetched == 3
    # no TXT record (or DNS trouble): the cached policy holds until it expires
    s.txt = None
    assert s.lookup("example.com").policy.id == "v2" and s.fetched == 3
    now[0] += 100
    assert s.lookup("example.com").policy is None
    # a new id whose fetch fails: the live cached policy, and the failure to report
    s.txt = "v3"
    s.lookup("example.com")
    s.txt, s.fail = "v4", StsError("HTTP status 500", mta_sts.FETCH_ERROR)
    found = s.lookup("example.com")
    assert (found.policy.id, found.failure) == ("v3", "sts-policy-fetch-error")
    # ... and nothing when there is no cached policy
    found = s.lookup("other.example")
    assert (found.policy, found.failure) == (None, "sts-policy-fetch-error")
    # a failed fetch is not repeated for the same id for five minutes, but a new id is
    fetched = s.fetched
    assert s.lookup("other.example").failure == "sts-policy-fetch-error"
    assert s.fetched == fetched
    s.fail = None
    now[0] += mta_sts.FETCH_RETRY
    assert s.lookup("other.example").policy.id == "v4" and s.fetched == fetched + 1
    s.cache.close()
