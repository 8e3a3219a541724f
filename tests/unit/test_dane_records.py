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
