"""smtp/dane.py: tls_dane_digests, usable records and digest agility, chain matching."""

import hashlib

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postfix_py.smtp import dane

DER = serialization.Encoding.DER


def _chain():
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.com")
    load = x509.load_pem_x509_certificate
    return ca, [load(leaf.cert_chain_pems[0].bytes()), load(ca.cert_pem.bytes())]


def _spki(cert):
    return cert.public_key().public_bytes(DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_parse_digests_preference_and_warnings():
    warnings = []
    assert dane.parse_digests(["sha512", "sha256"], warnings.append) == {0: 0, 2: 2, 1: 1}
    assert dane.parse_digests(["sha256", "sha512"], warnings.append) == {0: 0, 1: 2, 2: 1}
    assert warnings == []
    assert dane.parse_digests(["sha256", "md5", "sha256", "sha512=1"], warnings.append) == \
        {0: 0, 1: 1}
    assert warnings == ["tls_dane_digests: digest algorithm md5 needs an explicit number",
                        "tls_dane_digests: matching type 1 specified more than once",
                        "tls_dane_digests: matching type 1 can only be sha256"]


def test_record_text_is_truncated_as_postfix():
    rec = dane.Tlsa(3, 0, 0, bytes(range(100)))
    text = rec.text()
    assert text.startswith("3 0 0 000102") and "..." in text and text.endswith("60616263")
    assert dane.Tlsa(3, 1, 1, b"\xab" * 32).text() == "3 1 1 " + "AB" * 32


def test_usable_keeps_the_most_preferred_digest_per_usage_and_selector():
    digests = dane.parse_digests(["sha512", "sha256"])
    r256 = dane.Tlsa(3, 1, 1, b"\1" * 32)
    r512 = dane.Tlsa(3, 1, 2, b"\2" * 64)
    ta256 = dane.Tlsa(2, 0, 1, b"\3" * 32)
    short = dane.Tlsa(3, 1, 1, b"\4" * 31)
    badsel = dane.Tlsa(3, 2, 1, b"\5" * 32)
    warnings = []
    out = dane.usable([r256, r512, ta256, short, badsel], digests, "h[a]:25", warnings.append)
    assert out == (r512, ta256)
    assert [w.split(":")[2].strip() for w in warnings] == ["unusable TLSA RR"] * 2
    # sha512 disabled: the sha256 record counts, the sha512 one is unusable.
    assert dane.usable([r256, r512], dane.parse_digests(["sha256"]), "h", lambda w: None) == \
        (r256,)


def test_verify_ee_ta_and_mismatch():
    ca, chain = _chain()
    leaf, root = chain
    ee = dane.Tlsa(3, 1, 1, hashlib.sha256(_spki(leaf)).digest())
    ta = dane.Tlsa(2, 0, 1, hashlib.sha256(root.public_bytes(DER)).digest())
    full = dane.Tlsa(3, 0, 0, leaf.public_bytes(DER))
    wrong = dane.Tlsa(3, 1, 1, b"\0" * 32)
    got = dane.verify(chain, [wrong, ee], ["ignored.example"])
    assert got.matched and got.record == ee and got.depth == 0
    assert dane.verify(chain, [full], []).matched
    got = dane.verify(chain, [ta], ["mx.example.com", "example.com"])
    assert got.matched and got.depth == 1 and got.name == "mx.example.com"
    got = dane.verify(chain, [ta], ["other.example.com"])
    assert not got.matched and got.error == 62
    got = dane.verify(chain, [wrong], ["mx.example.com"])
    assert not got.matched and got.error == dane.X509_V_ERR_DANE_NO_MATCH
    # A TA record for a CA that did not sign the leaf: the chain does not verify.
    _, other = _chain()
    got = dane.verify([leaf, other[1]], [dane.Tlsa(2, 0, 1, hashlib.sha256(
        other[1].public_bytes(DER)).digest())], ["mx.example.com"])
    assert not got.matched and got.error not in (0, 62)


def test_tlsa_qname():
    assert dane.tlsa_qname("mx.example.com.", 25) == "_25._tcp.mx.example.com"


def test_tls_required_no_header():
    from postfix_py.smtp.session import tls_required_no
    assert tls_required_no(iter([b"Subject: x\nTLS-Required: No\n\nbody\n"]))
    assert tls_required_no(iter([b"Subject: x\ntls-required:no \n", b"\nbody\n"]))
    assert not tls_required_no(iter([b"Subject: x\nTLS-Required: yes\n\nbody\n"]))
    # In the body it does not count.
    assert not tls_required_no(iter([b"Subject: x\n\nTLS-Required: No\n"]))
    assert not tls_required_no(iter([b"\nTLS-Required: No\n"]))


# --- policy_for: Postfix's dane_init() decisions, half-dane ----------------------------------

class _Answer:
    def __init__(self, records):
        self.rrset = [type("RR", (), {"usage": r.usage, "selector": r.selector,
                                      "mtype": r.mtype, "cert": r.data})() for r in records]


class _Resolver:
    """resolver.lookup() as smtp/nexthop.py answers it: (answer, kind, secure)."""

    host_lookup = ["dns"]

    def __init__(self, records=(), kind="ok", secure=True):
        self.records, self.kind, self.secure = records, kind, secure
        self.asked = []

    def lookup(self, name, rdtype):
        self.asked.append((name, rdtype))
        if self.kind != "ok":
            return None, self.kind, False
        return _Answer(self.records), "ok", self.secure


def _policy_for(level, mx_dnssec, insecure_mx="dane", records=None, addr_dnssec=True,
                kind="ok"):
    from postfix_py.smtp import nexthop, tls_policy
    dest = nexthop.parse("example.net")
    addr = nexthop.Address("mx.example.net", "192.0.2.1", 25, 10, dnssec=addr_dnssec,
                           mx_dnssec=mx_dnssec)
    if records is None:
        records = (dane.Tlsa(3, 1, 1, b"\1" * 32),)
    resolver = _Resolver(records, kind)
    warnings = []
    got = dane.policy_for(tls_policy.Policy(level), dest, addr, resolver, True,
                          dane.parse_digests(["sha512", "sha256"]), warnings.append,
                          insecure_mx=insecure_mx)
    return got, resolver.asked, warnings


def test_secure_mx_and_records_is_dane():
    got, asked, _ = _policy_for("dane", True)
    assert (got.level, got.source) == ("dane", "DANE TLSA")
    assert got.matches == ("mx.example.net", "example.net")
    assert asked == [("_25._tcp.mx.example.net", "TLSA")]


def test_insecure_mx_with_secure_tlsa_is_half_dane():
    """Postfix's TLS_LEV_HALF_DANE: enforced like dane, its level named halfdane."""
    from postfix_py.smtp import tls_policy
    got, asked, _ = _policy_for("dane", False)
    assert got.level == "halfdane" and got.tlsa and got.source == "DANE TLSA"
    assert got.matches == ("mx.example.net", "example.net")
    assert tls_policy.must_match(got.level) and tls_policy.requires_tls(got.level)
    assert tls_policy.dane_based(got.level) and tls_policy.never_secured(got.level)
    assert not tls_policy.never_secured("dane")
    # Output only: no table or main.cf setting can ask for it.
    assert tls_policy.level_lookup("halfdane") is None


def test_insecure_mx_policies():
    got, asked, _ = _policy_for("dane", False, insecure_mx="encrypt")
    assert got.level == "encrypt"
    assert got.source == "DANE TLSA (Verification not possible, MX RRset is insecure)"
    got, asked, _ = _policy_for("dane", False, insecure_mx="may")
    assert (got.level, got.source) == ("may", "DANE TLSA (non DNSSEC destination)")
    assert asked == []                      # no TLSA lookup at all
    # dane-only never goes half-dane.
    got, asked, _ = _policy_for("dane-only", False)
    assert (got.level, got.dsn, got.reason) == ("invalid", "4.7.5", "non DNSSEC destination")
    assert asked == []


def test_insecure_mx_without_usable_records():
    # No TLSA records (or the host's addresses are not validated): may, as at dane.
    got, _, _ = _policy_for("dane", False, records=())
    assert got.level == "encrypt"           # an empty secure RRset: "TLSA records unusable"
    got, asked, _ = _policy_for("dane", False, addr_dnssec=False)
    assert (got.level, got.source) == ("may", "DANE TLSA (no TLSA records found)")
    assert asked == []
    got, _, _ = _policy_for("dane", False, kind="nxdomain")
    assert got.level == "may"
    # Records that are all unusable: encrypt, with Postfix's warning.
    got, _, warnings = _policy_for("dane", False, records=(dane.Tlsa(3, 1, 1, b"\1" * 5),))
    assert got.level == "encrypt"
    assert warnings[-1] == ("mx.example.net[192.0.2.1]:25: all TLSA records unusable, "
                            "fallback to unauthenticated TLS")
    # A failed TLSA lookup defers, whatever the MX.
    got, _, _ = _policy_for("dane", False, kind="again")
    assert (got.level, got.dsn, got.reason) == \
        ("invalid", "4.7.5", "TLSA lookup error for mx.example.net:25")


def test_secure_mx_insecure_host_is_no_tlsa():
    """A validated MX RRset naming a host in an unsigned zone: not half-dane, no TLSA."""
    got, asked, _ = _policy_for("dane", True, addr_dnssec=False)
    assert (got.level, got.source) == ("may", "DANE TLSA (no TLSA records found)")
    assert asked == []
    got, _, _ = _policy_for("dane-only", True, addr_dnssec=False)
    assert (got.level, got.reason) == ("invalid", "no TLSA records found")


class _CnameResolver(_Resolver):
    """A TLSA RRset, and the CNAME record of the host name (kind, secure)."""

    def __init__(self, records, cname=("ok", True)):
        super().__init__(records)
        self.cname = cname

    def lookup(self, name, rdtype):
        if rdtype == "CNAME":
            self.asked.append((name, rdtype))
            kind, secure = self.cname
            return (object() if kind == "ok" else None), kind, secure
        return super().lookup(name, rdtype)


def _addr(dnssec, rname=""):
    from postfix_py.smtp import nexthop
    return nexthop.Address("mx.example.net", "192.0.2.1", 25, 10, dnssec=dnssec,
                           mx_dnssec=True, rname=rname)


def test_lookup_names_as_tls_dane_resolve():
    rec = (dane.Tlsa(3, 1, 1, b"\1" * 32),)
    # Secure addresses behind a CNAME: the target first.
    r = _Resolver(rec)
    found = dane.lookup(r, _addr(True, "host.example.org"), 25, lambda w: None)
    assert (found.status, found.base_domain) == ("ok", "host.example.org")
    assert r.asked == [("_25._tcp.host.example.org", "TLSA")]
    # Insecure addresses behind a validated CNAME: the MX name only.
    r = _CnameResolver(rec)
    found = dane.lookup(r, _addr(False, "host.unsigned.example"), 25, lambda w: None)
    assert (found.status, found.base_domain) == ("ok", "mx.example.net")
    assert r.asked == [("mx.example.net", "CNAME"), ("_25._tcp.mx.example.net", "TLSA")]
    # ... behind an unvalidated CNAME: nothing.
    r = _CnameResolver(rec, ("ok", False))
    assert dane.lookup(r, _addr(False, "host.unsigned.example"), 25).status == "notfound"
    assert r.asked == [("mx.example.net", "CNAME")]
    # ... when the CNAME is gone or cannot be looked up: an error, Postfix's warning.
    for kind, why in (("nodata", "no longer a CNAME"), ("again", "try again")):
        warnings = []
        r = _CnameResolver(rec, (kind, False))
        assert dane.lookup(r, _addr(False, "h.unsigned.example"), 25,
                           warnings.append).status == "error"
        assert warnings[0].startswith("DNSSEC status lookup error for mx.example.net: ")
        assert warnings[0].endswith(why)
    # No CNAME, insecure addresses: no lookup, unless forced.
    r = _Resolver(rec)
    assert dane.lookup(r, _addr(False), 25).status == "notfound" and r.asked == []
    found = dane.lookup(r, _addr(False), 25, force=True)
    assert found.status == "ok" and r.asked == [("_25._tcp.mx.example.net", "TLSA")]
    # Forced, but the TLSA RRset itself is not validated: nothing.
    r = _Resolver(rec, secure=False)
    assert dane.lookup(r, _addr(False), 25, force=True).status == "notfound"


def test_trust_anchor_file_records(tmp_path):
    """posttls-finger -A: certificates give "2 0 0" and "3 0 0" with their DER, public
    keys "2 1 0" and "3 1 0" with their SPKI; other PEM objects count but add nothing."""
    ca, chain = _chain()
    leaf = chain[0]
    cert_pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = chain[1].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    path = tmp_path / "ta.pem"
    path.write_text("comment\n" + cert_pem.replace("CERTIFICATE", "X509 CERTIFICATE")
                    + key_pem + "-----BEGIN DH PARAMETERS-----\nAAAA\n"
                    "-----END DH PARAMETERS-----\n")
    logged = []
    records = dane.trust_anchor_records(str(path), logged.append)
    der = leaf.public_bytes(DER)
    assert [(r.usage, r.selector, r.mtype, r.data) for r in records] == [
        (2, 0, 0, der), (3, 0, 0, der), (2, 1, 0, _spki(chain[1])), (3, 1, 0, _spki(chain[1]))]
    assert [line.split(": ")[0] for line in logged] == ["TA cert as TLSA record",
                                                         "TA pkey as TLSA record"]
    only_dh = tmp_path / "dh.pem"
    only_dh.write_text("-----BEGIN DH PARAMETERS-----\nAAAA\n-----END DH PARAMETERS-----\n")
    assert dane.trust_anchor_records(str(only_dh)) == ()


def test_verify_anchors_names_count_at_every_depth():
    ca, chain = _chain()
    ee = dane.Tlsa
    leaf_der = chain[0].public_bytes(DER)
    records = (ee(2, 0, 0, leaf_der), ee(3, 0, 0, leaf_der))
    ok = dane.verify_anchors(chain, records, ["mx.example.com"])
    assert (ok.matched, ok.depth, ok.name) == (True, 0, "mx.example.com")
    bad = dane.verify_anchors(chain, records, ["other.example.com"])
    assert (bad.matched, bad.error, bad.error_depth) == (False, 62, 0)
    # the CA's key signed the leaf: depth 0 with the CA not sent, 1 when it is
    key = (ee(2, 1, 0, _spki(chain[1])),)
    assert dane.verify_anchors(chain[:1], key, ["mx.example.com"]).depth == 0
    assert dane.verify_anchors(chain, key, ["mx.example.com"]).depth == 1
    other = trustme.CA()
    none = dane.verify_anchors(chain, (ee(2, 0, 0, x509.load_pem_x509_certificate(
        other.cert_pem.bytes()).public_bytes(DER)),), ["mx.example.com"])
    assert (none.matched, none.error, none.error_depth) == (False, 65, 1)
