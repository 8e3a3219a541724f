"""DANE for the smtp/lmtp client (RFC 7672): TLSA lookups, the downgrade rules, matching.

NAME
    dane - from "smtp_tls_security_level = dane" and DNSSEC answers to a TLS policy

DESCRIPTION
    This module is postfix-py's part of smtp_tls_policy.c (dane_init) and tls_dane.c.
    The dane and dane-only levels need smtp_dns_support_level = dnssec and DNS host
    lookups; the DNSSEC status of every answer is the AD bit of the configured resolver
    (smtp/nexthop.py), which must validate, as with Postfix.

    policy_for(policy, dest, addr, resolver, ...) applies Postfix's rules to the policy
    of one server (level dane or dane-only), in this order:
        unix-domain destination                 invalid (warning)
        DNSSEC lookups disabled                 dane: may (warning); dane-only: invalid
        MX RRset not validated, at dane-only
        or with insecure_mx may                 dane: may; dane-only: defer 4.7.5
                                                "non DNSSEC destination"
        TLSA lookup fails (SERVFAIL: bogus)     defer 4.7.5 "TLSA lookup error for
                                                host:port" (warning "DANE TLSA lookup
                                                problem: ...")
        address records not validated, or no
        TLSA records (NXDOMAIN, NODATA)         dane: may; dane-only: defer
                                                "no TLSA records found"
        only unsupported TLSA records           dane: encrypt; dane-only: defer
                                                "TLSA records unusable"
        MX RRset not validated (level dane),
        TLSA records found: insecure_mx encrypt encrypt ("Verification not possible,
                                                MX RRset is insecure")
                            insecure_mx dane    level halfdane, below
        supported records, none usable (a       dane, halfdane: encrypt, warning "all TLSA
        disabled digest, a bad length)          records unusable, fallback to
                                                unauthenticated TLS", the records kept
                                                for TLSRPT (tlsa-invalid); dane-only:
                                                defer "TLSA records unusable"
        usable records                          level dane (halfdane), with the records,
                                                the names a DANE-TA certificate must match
                                                (the TLSA base domain, then the next-hop
                                                domain when it came from an MX lookup),
                                                SNI the base domain; source "DANE TLSA".
    The downgrades are logged only with -v (Postfix's dane_incompat(): msg_info when
    verbose), apart from the configuration problems, which are warnings.

    "half-dane" (Postfix's TLS_LEV_HALF_DANE, smtp_tls_dane_insecure_mx_policy = dane,
    the default): the next hop's MX RRset is not DNSSEC-validated (an unsigned zone, or
    a signed zone's insecure delegation) but the MX host's address and TLSA records
    are. The TLSA records are enforced exactly as at dane (a mismatch defers "Server
    certificate not verified"), but since a forged MX RRset could have named this host,
    a match makes the peer "Trusted", never "Verified": "Trusted TLS connection
    established to mx.example.net[192.0.2.1]:25: ..." (smtp/tls.py, lib/tls.py
    TLSInfo.never_secured). The level's name "halfdane" appears where Postfix prints
    str_tls_level() (REQUIRETLS bounce texts, `tls explain`); it cannot be configured.
    smtp_tls_dane_insecure_mx_policy = encrypt makes such a host encrypt, = may makes
    an insecure MX RRset "non DNSSEC destination" as above (Postfix before 3.1). The
    lmtp client has no MX lookups; Postfix reads the parameter only in smtp mode, and
    postfix-py passes "may" for lmtp (it never matters there).

    The other partial case, a validated MX RRset that names a host whose address records
    are not validated (the host is in an unsigned zone), is not half-dane: there is no
    TLSA lookup at all (Postfix's tls_dane_resolve() without
    smtp_tls_force_insecure_host_tlsa_lookup), so "no TLSA records found": dane is may,
    dane-only defers.

    TLSA records are looked up at _PORT._tcp.HOST, HOST the MX host name (or the CNAME
    target first when that is secure, as Postfix), PORT the port connected to. When the
    host's address records are not validated there is no TLSA lookup, unless the host
    name is a CNAME whose own record is validated (then at the host name only; Postfix's
    qname_secure(), and its warning "DNSSEC status lookup error for NAME: ..." makes it a
    TLSA lookup error), or smtp_tls_force_insecure_host_tlsa_lookup = yes (host name
    only; the TLSA RRset must still validate, e.g. in a child zone with its own trust
    anchor). Usages
    DANE-TA(2) and DANE-EE(3) are used; PKIX-TA(0) and PKIX-EE(1) are ignored with
    Postfix's warning (they do not apply to SMTP), as is the private-use matching
    type 255. Selectors 0 (certificate) and 1 (SubjectPublicKeyInfo) and matching types
    0 (full), 1 (SHA2-256) and 2 (SHA2-512) are supported; tls_dane_digests chooses the
    digests and their preference: of several records of one usage and selector only
    those of the most preferred matching type count (RFC 7671 section 9). A record with
    another selector, a disabled matching type or a digest of the wrong length is
    "unusable"; when all are, dane becomes encrypt.

    verify(chain, records, names) judges a server's certificate chain (leaf
    first): a DANE-EE(3) record that matches the leaf authenticates it without name or
    date checks (RFC 7672 section 3.1.1); a DANE-TA(2) record that matches a
    certificate of the chain makes that certificate the trust anchor: the chain below
    it must verify (signatures, dates, purpose) and the leaf must match one of names.

    Trust anchors (posttls-finger -A, Postfix's smtp_tls_trust_anchor_file, at the verify
    and secure levels) are Postfix's synthetic DANE: each certificate of a PEM file
    becomes the records "2 0 0" and "3 0 0" with its DER, each public key "2 1 0" and
    "3 1 0" with its SubjectPublicKeyInfo (trust_anchor_records()); verify_anchors()
    judges a chain as OpenSSL's DANE does with them: the leaf itself, a certificate of the
    chain, a certificate that issued the chain's last one, or a key that signed it, is
    the trust anchor, the chain below must verify, and the names are checked whatever
    matched (no RFC 7672 exception for the leaf: this is not DANE from DNS).

FUNCTIONS
    Tlsa(usage, selector, mtype, data); .text() as Postfix logs a record.
    trust_anchor_records(path, log=None) -> tuple of Tlsa; TrustAnchorError with
        Postfix's warning when the file cannot be read or holds no PEM object
    verify_anchors(chain, records, names, wildcard_multiple_labels) -> DaneMatch
    parse_digests(items, warn) -> {mtype: preference} (higher is preferred; 0 is full).
    tlsa_qname(host, port) -> "_25._tcp.mx.example.com"
    lookup(resolver, addr, port, warn, force=False) -> TlsaResult
    policy_for(policy, dest, addr, resolver, dnssec, digests, warn, insecure_mx="dane",
        force_tlsa=False) -> tls_policy.Policy:
        source "DANE TLSA" with records; "DANE TLSA (why)" after a downgrade (why: "no
        TLSA records found", "non DNSSEC destination", ...), for `tls explain`.
    match_names(found, addr, dest) -> names for DANE-TA certificates
    verify(chain, records, names, wildcard_multiple_labels) -> DaneMatch: records as
        usable() left them

CONFIGURATION PARAMETERS
    smtp_dns_support_level (empty: enabled), tls_dane_digests (sha512 sha256),
    smtp_tls_dane_insecure_mx_policy (dane; smtp only),
    smtp_tls_force_insecure_host_tlsa_lookup (no), smtp_tls_security_level and
    smtp_tls_policy_maps (the levels dane and dane-only).

SEE ALSO
    smtp/tls_policy.py, smtp/tls.py (where verify() runs), smtp/nexthop.py; RFC 6698,
    RFC 7671, RFC 7672; Postfix smtp_tls_policy.c, tls_dane.c, TLS_README (DANE).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import base64
import binascii
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import crypto

from ..lib import msg
from ..lib import tls as libtls
from . import nexthop, tls_policy

SOURCE = "DANE TLSA"
SOURCE_UNUSABLE = f"{SOURCE} (all TLSA records unusable)"
USAGE_DANE_TA, USAGE_DANE_EE = 2, 3
MAX_TLSA = 100                  # records of one RRset looked at (bounded work)
_DIGEST_LEN = {1: 32, 2: 64}
_HASHES = {1: hashlib.sha256, 2: hashlib.sha512}
_DIGEST_CODE = {"sha256": 1, "sha512": 2}

X509_V_ERR_DANE_NO_MATCH = 65


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        """"3 1 1 HEX" as Postfix's tlsa_info logs it (long data as head...tail)."""
        data = self.data
        if len(data) > 64:
            hexdata = data[:32].hex().upper() + "..." + data[-32:].hex().upper()
        else:
            hexdata = data.hex().upper() if data else "..."
        return f"{self.usage} {self.selector} {self.mtype} {hexdata}"


@dataclass
class TlsaResult:
    """A TLSA lookup: status ok, notfound, empty (none supported) or error."""

    status: str
    base_domain: str = ""
    records: tuple = ()
    why: str = ""


@dataclass
class DaneMatch:
    """What verify() found: matched, the record and depth, the name, or the error."""

    matched: bool
    record: Tlsa | None = None
    depth: int = -1
    name: str = ""
    error: int = 0
    error_depth: int = 0


def parse_digests(items, warn=msg.warn) -> dict[int, int]:
    """tls_dane_digests as {matching type: preference}; the first listed is preferred."""
    wanted: list[int] = []
    for item in items:
        name, eq, code = item.strip().partition("=")
        name = name.strip().lower()
        if eq:
            if not code.strip().isdigit() or not 0 < int(code) < 255:
                word = "Reserved" if code.strip() in ("0", "255") else "Invalid"
                warn(f"{word} matching type number in tls_dane_digests: {name}={code}")
                continue
            number = int(code)
            if _DIGEST_CODE.get(name) != number:
                if number in (1, 2):
                    warn(f"tls_dane_digests: matching type {number} can only be "
                         f"{'sha256' if number == 1 else 'sha512'}")
                else:
                    warn(f"tls_dane_digests: digest algorithm \"{name}\"({number}) unknown")
                continue
        elif not name:
            continue
        elif name not in _DIGEST_CODE:
            warn(f"tls_dane_digests: digest algorithm {name} needs an explicit number")
            continue
        else:
            number = _DIGEST_CODE[name]
        if number in wanted:
            warn(f"tls_dane_digests: matching type {number} specified more than once")
            continue
        wanted.append(number)
    prefs = {0: 0}
    for n, number in enumerate(wanted):
        prefs[number] = len(wanted) - n
    return prefs


def tlsa_qname(host: str, port: int) -> str:
    """The TLSA owner name for a server host name and TCP port."""
    return f"_{port}._tcp.{host.rstrip('.')}"


def _parse_rrset(answer, owner: str, warn) -> list[Tlsa]:
    """Supported records of a validated RRset, with Postfix's warnings for the rest."""
    out = []
    for rr in list(answer.rrset)[:MAX_TLSA]:
        rec = Tlsa(rr.usage, rr.selector, rr.mtype, bytes(rr.cert))
        if rec.usage not in (USAGE_DANE_TA, USAGE_DANE_EE):
            warn(f"{owner} unsupported TLSA certificate usage: {rec.text()}")
            continue
        if rec.mtype == 255:
            warn(f"{owner} reserved private-use matching type: {rec.text()}")
            continue
        out.append(rec)
    return out


def _qname_secure(resolver, qname: str, warn) -> bool | None:
    """Whether the CNAME record at qname is DNSSEC-validated (Postfix's qname_secure());
    None, with Postfix's warning, when that cannot be told."""
    answer, kind, secure = resolver.lookup(qname, "CNAME")
    if kind == "ok":
        return secure
    why = "no longer a CNAME" if kind in ("nodata", "nxdomain") else \
        nexthop._dns_why("again", qname, "CNAME").reason
    warn(f"DNSSEC status lookup error for {qname}: {why}")
    return None


def lookup(resolver, addr, port: int, warn=msg.warn, force: bool = False) -> TlsaResult:
    """The TLSA records of one server (Postfix's tls_dane_resolve). force:
    smtp_tls_force_insecure_host_tlsa_lookup."""
    cname = bool(addr.rname) and addr.rname.lower() != addr.name.lower()
    if addr.dnssec:
        # The CNAME target first (its address records are secure), then the MX name.
        names = [addr.rname, addr.name] if cname else [addr.name]
    else:
        # Address records in an unsigned zone: no TLSA lookup (Postfix's default), unless
        # forced, or the host name is a validated CNAME (then at that name only).
        if not force and cname:
            secure = _qname_secure(resolver, addr.name, warn)
            if secure is None:
                return TlsaResult("error", addr.name, why="DNSSEC status lookup error")
            force = secure
        if not force:
            return TlsaResult("notfound", addr.name)
        names = [addr.name]
    result = TlsaResult("notfound", addr.name)
    for host in names:
        qname = tlsa_qname(host, port)
        answer, kind, secure = resolver.lookup(qname, "TLSA")
        if kind == "again":
            why = nexthop._dns_why("again", qname, "TLSA").reason
            warn(f"DANE TLSA lookup problem: {why}")
            return TlsaResult("error", host, why=why)
        if kind != "ok" or not secure:
            continue
        records = _parse_rrset(answer, qname, warn)
        return TlsaResult("ok" if records else "empty", host, tuple(records))
    return result


def usable(records, digests: dict[int, int], namaddr: str, warn=msg.warn) -> tuple:
    """The records that can be used (tls_dane_enable), each unusable one warned about."""
    out = []
    for rec in records:
        ok = rec.selector in (0, 1) and rec.mtype in digests and (
            rec.mtype == 0 or len(rec.data) == _DIGEST_LEN[rec.mtype])
        if not ok:
            warn(f"{namaddr}: unusable TLSA RR: {rec.text()}")
            continue
        out.append(rec)
    # RFC 7671 section 9: per usage and selector, only the most preferred digest.
    best: dict[tuple[int, int], int] = {}
    for rec in out:
        key = (rec.usage, rec.selector)
        best[key] = max(best.get(key, -1), digests[rec.mtype])
    return tuple(r for r in out if digests[r.mtype] == best[(r.usage, r.selector)])


def match_names(found: TlsaResult, addr, dest) -> tuple[str, ...]:
    """The names a DANE-TA certificate may match: the TLSA base domain, then the next-hop
    domain when the server came from its MX records."""
    names = [found.base_domain.rstrip(".").lower()]
    if addr.mx_dnssec is not None and dest.host.rstrip(".").lower() not in names:
        names.append(dest.host.rstrip(".").lower())
    return tuple(names)


INSECURE_MX_POLICIES = ("may", "encrypt", "dane")


def policy_for(policy, dest, addr, resolver, dnssec: bool, digests: dict[int, int],
               warn=msg.warn, insecure_mx: str = "dane", force_tlsa: bool = False):
    """The policy for one server at level dane or dane-only (Postfix's dane_init).
    insecure_mx: smtp_tls_dane_insecure_mx_policy (may, encrypt or dane); force_tlsa:
    smtp_tls_force_insecure_host_tlsa_lookup."""
    level = policy.level

    def incompat(kind: str, text: str):
        if level == "dane":
            if kind == "config":
                warn(text)
            else:
                msg.verbose(1, text)
            return dataclasses.replace(policy, level="encrypt" if kind == "cantauth"
                                       else "may", source=f"{SOURCE} ({text})")
        if kind == "config":
            warn(text)
            return tls_policy.Policy(tls_policy.INVALID, dsn=tls_policy.DSN_CONFIG[0],
                                     reason=tls_policy.DSN_CONFIG[1], source=SOURCE)
        return tls_policy.Policy(tls_policy.INVALID, dsn="4.7.5", reason=text,
                                 source=SOURCE)

    if dest.unix:
        warn(f"{dest.text}: the \"dane\" security level is invalid for delivery via "
             f"unix-domain sockets")
        return tls_policy.Policy(tls_policy.INVALID, dsn=tls_policy.DSN_CONFIG[0],
                                 reason=tls_policy.DSN_CONFIG[1], source=SOURCE)
    if not dnssec or "dns" not in resolver.host_lookup:
        return incompat("config", f"{dest.text}: {level} configured with dnssec lookups "
                                  f"disabled")
    insecure = addr.mx_dnssec is False
    if insecure and (level == "dane-only" or insecure_mx == "may"):
        return incompat("dest", "non DNSSEC destination")
    found = lookup(resolver, addr, dest.port, warn, force_tlsa)
    if found.status == "error":
        return tls_policy.Policy(tls_policy.INVALID, dsn="4.7.5",
                                 reason=f"TLSA lookup error for {addr.name}:{dest.port}",
                                 source=SOURCE)
    if found.status == "notfound":
        return incompat("dest", "no TLSA records found")
    if found.status == "empty":
        return incompat("cantauth", "TLSA records unusable")
    if insecure:
        if insecure_mx == "encrypt":
            return incompat("cantauth", "Verification not possible, MX RRset is insecure")
        level = tls_policy.HALF_DANE        # enforced as dane, logged "Trusted"
    records = usable(found.records, digests, addr.namaddrport, warn)
    if not records:
        if level != "dane-only":
            warn(f"{addr.namaddrport}: all TLSA records unusable, fallback to "
                 f"unauthenticated TLS")
            # As Postfix's tls_client_start(): the records stay for TLSRPT (tlsa-invalid,
            # policy type tlsa), SNI is still the base domain; nothing is matched.
            return dataclasses.replace(policy, level="encrypt", tlsa=tuple(found.records),
                                       matches=match_names(found, addr, dest),
                                       servername=policy.servername or found.base_domain,
                                       source=SOURCE_UNUSABLE)
        warn(f"{addr.namaddrport}: all TLSA records unusable")
        return tls_policy.Policy(tls_policy.INVALID, dsn="4.7.5",
                                 reason="TLSA records unusable", source=SOURCE)
    return dataclasses.replace(policy, level=level, tlsa=records,
                               matches=match_names(found, addr, dest),
                               servername=policy.servername or found.base_domain,
                               source=SOURCE)


# --- matching ---------------------------------------------------------------------------

def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _matches(rec: Tlsa, cert: x509.Certificate) -> bool:
    data = _selected(cert, rec.selector)
    if rec.mtype == 0:
        return data == rec.data
    return _HASHES[rec.mtype](data).digest() == rec.data


def _chain_ok(chain: list, depth: int) -> tuple[bool, int, int]:
    """Whether chain[0..depth-1] verifies up to chain[depth] as the trust anchor."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(chain[depth]))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    leaf = crypto.X509.from_cryptography(chain[0])
    middle = [crypto.X509.from_cryptography(c) for c in chain[1:depth]]
    try:
        crypto.X509StoreContext(store, leaf, middle).verify_certificate()
    except crypto.X509StoreContextError as exc:
        return False, exc.errors[0] if exc.errors else 1, exc.errors[1] if \
            len(exc.errors) > 1 else 0
    return True, 0, 0


def verify(chain: list, records, names: list[str],
           wildcard_multiple_labels: bool = True) -> DaneMatch:
    """Judge a certificate chain (cryptography certificates, leaf first) by TLSA records."""
    if not chain:
        return DaneMatch(False, error=X509_V_ERR_DANE_NO_MATCH)
    for rec in records:
        if rec.usage == USAGE_DANE_EE and _matches(rec, chain[0]):
            return DaneMatch(True, rec, 0)
    error, error_depth = X509_V_ERR_DANE_NO_MATCH, 0
    for depth in range(1, len(chain)):
        for rec in records:
            if rec.usage != USAGE_DANE_TA or not _matches(rec, chain[depth]):
                continue
            ok, error, error_depth = _chain_ok(chain, depth)
            if not ok:
                return DaneMatch(False, rec, depth, error=error, error_depth=error_depth)
            matched, which = libtls.match_peername(chain[0], names, wildcard_multiple_labels)
            if not matched:
                return DaneMatch(False, rec, depth, error=libtls.X509_V_ERR_HOSTNAME_MISMATCH)
            return DaneMatch(True, rec, depth, name=which or "")
    return DaneMatch(False, error=error, error_depth=error_depth)


# --- trust anchors (posttls-finger -A) ---------------------------------------------------------

MAX_TA_FILE = 1 << 20           # bytes of one trust-anchor file read at most
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)


class TrustAnchorError(Exception):
    """A trust-anchor file that cannot be used; str() is Postfix's warning ("" if none)."""


def trust_anchor_records(path: str, log=None) -> tuple:
    """The synthetic records of one PEM trust-anchor file, as Postfix's
    tls_dane_load_trustfile(): certificates ("CERTIFICATE", "X509 CERTIFICATE") and
    public keys ("PUBLIC KEY"); other PEM objects count but add nothing. log(text) gets
    Postfix's "TA cert as TLSA record: FILE: 2 0 0 ..." lines (-L dane or verbose)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TA_FILE + 1)
    except OSError as exc:
        raise TrustAnchorError(f"error opening trust anchor file: {path}: "
                               f"{exc.strerror or exc}") from None
    if len(data) > MAX_TA_FILE:
        raise TrustAnchorError(f"error reading: {path}: larger than {MAX_TA_FILE} bytes")
    records: list[Tlsa] = []
    count = 0
    for m in _PEM.finditer(data):
        count += 1
        kind = m.group(1).decode("ascii")
        if kind not in ("CERTIFICATE", "X509 CERTIFICATE", "PUBLIC KEY"):
            continue
        what = "pkey" if kind == "PUBLIC KEY" else "cert"
        try:
            der = base64.b64decode(b"".join(m.group(2).split()), validate=True)
            if what == "cert":
                x509.load_der_x509_certificate(der)
            else:
                serialization.load_der_public_key(der)
        except (binascii.Error, ValueError, TypeError):
            raise TrustAnchorError(f"error reading: {path}: malformed trust-anchor "
                                   f"{what}") from None
        selector = 0 if what == "cert" else 1
        ta = Tlsa(USAGE_DANE_TA, selector, 0, der)
        if log is not None:
            log(f"TA {what} as TLSA record: {path}: {ta.text()}")
        records += [ta, Tlsa(USAGE_DANE_EE, selector, 0, der)]
    if count == 0:
        raise TrustAnchorError("")
    return tuple(records)


def _signed_by(cert: x509.Certificate, key) -> bool:
    """Whether key made cert's signature (a bare trust-anchor key, "2 1 0")."""
    try:
        params = cert.signature_algorithm_parameters
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params,
                       cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, params)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _anchor_match(chain: list, records) -> DaneMatch | None:
    """Where the chain meets a trust anchor (depth as OpenSSL's
    SSL_get0_dane_authority()), with the chain below it verified; None: nowhere."""
    for rec in records:
        if rec.usage == USAGE_DANE_EE and _matches(rec, chain[0]):
            return DaneMatch(True, rec, 0)
    for depth in range(1, len(chain)):
        for rec in records:
            if rec.usage == USAGE_DANE_TA and _matches(rec, chain[depth]):
                ok, error, error_depth = _chain_ok(chain, depth)
                return DaneMatch(ok, rec, depth, error=error, error_depth=error_depth)
    top = chain[-1]
    for rec in records:
        if rec.usage != USAGE_DANE_TA:
            continue
        if rec.selector == 0:
            # A certificate the server did not send: the issuer of its last one.
            ta = x509.load_der_x509_certificate(rec.data)
            try:
                top.verify_directly_issued_by(ta)
            except (InvalidSignature, ValueError, TypeError):
                continue
            ok, error, error_depth = _chain_ok([*chain, ta], len(chain))
            return DaneMatch(ok, rec, len(chain), error=error, error_depth=error_depth)
        if _signed_by(top, serialization.load_der_public_key(rec.data)):
            # A bare key: the certificate it signed is the anchor's depth.
            ok, error, error_depth = _chain_ok(chain, len(chain) - 1) if len(chain) > 1 \
                else (True, 0, 0)
            return DaneMatch(ok, rec, len(chain) - 1, error=error, error_depth=error_depth)
    return None


def verify_anchors(chain: list, records, names: list[str],
                   wildcard_multiple_labels: bool = True) -> DaneMatch:
    """Judge a chain (cryptography certificates, leaf first) by trust-anchor records at
    the verify and secure levels: a trust anchor, and then one of names."""
    if not chain:
        return DaneMatch(False, error=X509_V_ERR_DANE_NO_MATCH)
    found = _anchor_match(chain, records)
    if found is None:
        # OpenSSL reports the failure at the top of the chain.
        return DaneMatch(False, error=X509_V_ERR_DANE_NO_MATCH, error_depth=len(chain) - 1)
    if not found.matched:
        return found
    matched, which = libtls.match_peername(chain[0], names, wildcard_multiple_labels)
    if not matched:
        return DaneMatch(False, found.record, found.depth,
                         error=libtls.X509_V_ERR_HOSTNAME_MISMATCH, error_depth=0)
    return DaneMatch(True, found.record, found.depth, name=which or "")
