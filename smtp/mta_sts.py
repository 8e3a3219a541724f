"""MTA-STS (RFC 8461) for the smtp client: discovery, policy fetch, cache, and the decision.

NAME
    mta_sts - SMTP MTA Strict Transport Security, natively in the smtp client

DESCRIPTION
    Postfix needs an external policy server for MTA-STS; postfix-py does it here, with
    smtp_tls_mta_sts_enable = yes (a postfix-py extension; default no). It applies to
    MX-based deliveries only (a next hop `domain` or `domain:port`, never `[host]`), the
    policy domain being the next-hop domain, as RFC 8461 section 4 describes. Hence the
    smtp client only: the lmtp client never applies it (LMTP does no MX lookups; its
    next hops are hosts and unix sockets), and warns when an lmtp service sets
    smtp_tls_mta_sts_enable with -o (smtp/service.py).

    Discovery: the TXT record of `_mta-sts.DOMAIN`, exactly one record that starts with
    `v=STSv1`, with an `id` of 1 to 32 letters and digits. Fetch: HTTPS GET of
    `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (lib/https.py), the host resolved
    through the smtp client's DNS servers, the certificate checked against the system CA
    bundle or smtp_tls_mta_sts_CAfile; status 200 only (no redirects), Content-Type
    text/plain, at most 64 KiB, within smtp_tls_mta_sts_fetch_timeout. The policy:
    `version: STSv1`, `mode: enforce | testing | none`, `max_age` (0 to 31557600
    seconds), and `mx` patterns (`mail.example.com`, or `*.example.com` for exactly
    one more label).

    Cache: one LMDB file (smtp_tls_mta_sts_cache, default $data_directory/mta_sts_cache.lmdb,
    outside the jail), opened before the chroot by each smtp process; LMDB's lock file
    lets the processes share it. A policy is re-fetched only when the TXT id differs
    from the cached one or the cached policy is older than its max_age; when DNS or the
    fetch fails, a cached policy that has not expired still applies (section 5.1). A
    failed fetch is not tried again for the same id for FETCH_RETRY seconds (5 minutes).
    (Why not in tlsmgr, beside the TLS session cache: tlsmgr's protocol carries opaque
    sessions under ids; a policy cache needs read-modify-write per domain, which LMDB
    gives every process directly. The files are written by the smtp processes through
    descriptors opened before the chroot and the privilege drop.)

    The decision, apply(): DANE wins (a policy at level dane or dane-only is left
    alone; one that fell back to may for want of usable TLSA records is not DANE), and so
    do an entry of smtp_tls_policy_maps or smtp_tls_per_site for the destination (the
    administrator's word, as static maps listed before an MTA-STS policy server in
    Postfix) and a policy that already authenticates (fingerprint, verify, secure).
    Half-dane (level halfdane: TLSA records of a host named by an MX RRset that DNSSEC
    did not validate, smtp/dane.py) is not DANE here: the TLSA records authenticate the
    host, but only MTA-STS can vouch for the MX name, so in mode enforce the host must
    match a pattern, and then keeps its TLSA records.
    Otherwise, in mode enforce, an MX host that matches no pattern is skipped (the
    caller logs Postfix 3.10.5's "MX name 'H' does not match STS MX pattern for 'D'"; the
    reason, if no host is left, is 4.7.5 "MX host H does not match the MTA-STS policy of
    D"), and a matching one gets level verify with match=hostname (a PKIX-valid
    certificate for the MX host name), SNI the MX host name, source "MTA-STS policy". In
    mode testing the level is at least may (source "MTA-STS policy (testing)"): the mail
    goes out whatever the certificate; the caller logs what enforce would have done and
    reports it (TLSRPT). Mode none: no policy.

FUNCTIONS
    parse_txt(strings) -> id or None (no usable record).
    parse_policy(text) -> (mode, mx patterns, max_age); StsError for a bad policy.
    mx_matches(pattern, host) -> bool; mx_allowed(policy, host) -> bool.
    apply(policy, sts, mx_host) -> (Policy, None) or (None, (dsn, reason)).
    MtaSts(dns_resolver, ctx, cache, port=443, timeout=10, clock=time.time)
        .lookup(domain) -> Lookup(policy, failure, detail): policy None when the domain
        has no (usable) MTA-STS policy; failure is the TLSRPT result type of a discovery
        problem (sts-policy-fetch-error, sts-policy-invalid, sts-webpki-invalid).
    PolicyCache(path, map_size).get(domain), .put(policy), .close().
    from_config(cfg, dns_resolver) -> MtaSts or None (disabled).

CONFIGURATION PARAMETERS
    smtp_tls_mta_sts_enable (no), smtp_tls_mta_sts_CAfile (empty: the system's CA
    bundle), smtp_tls_mta_sts_cache ($data_directory/mta_sts_cache.lmdb),
    smtp_tls_mta_sts_fetch_timeout (10s), smtp_tls_mta_sts_https_port (443: RFC 8461;
    another port is for tests), lmdb_map_size. All postfix-py extensions.

SEE ALSO
    smtp/service.py (the hook), smtp/tls_policy.py, lib/https.py, lib/tlsrpt.py;
    RFC 8461.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - server_hostname and dnspython encode with it
import json
import os
import pwd
import re
import ssl
import time
from dataclasses import dataclass, replace

import dns.exception
import dns.name
import dns.resolver
import lmdb

from ..lib import https, msg
from . import tls_policy

MAX_POLICY = 64 * 1024          # RFC 8461 section 3.3: 64 KiB at most
MAX_AGE_LIMIT = 31557600        # section 3.2: about one year
POLICY_PATH = "/.well-known/mta-sts.txt"
MODES = ("enforce", "testing", "none")
FETCH_RETRY = 300               # seconds before a failed fetch of the same id is tried again
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MAX_AGE_RE = re.compile(r"^[0-9]{1,10}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")

SOURCE_ENFORCE = "MTA-STS policy"
SOURCE_TESTING = "MTA-STS policy (testing)"
DSN_MX_MISMATCH = "4.7.5"

# TLSRPT result types of discovery problems (RFC 8460 section 4.3.2.1)
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


class StsError(ValueError):
    """A policy that cannot be used; kind is its TLSRPT result type."""

    def __init__(self, text: str, kind: str = POLICY_INVALID):
        super().__init__(text)
        self.kind = kind


@dataclass(frozen=True)
class StsPolicy:
    """One domain's policy, as fetched (or cached)."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched: float
    text: str = ""              # the policy as served (for TLSRPT's policy-string)

    def expired(self, now: float) -> bool:
        """Whether the policy is older than its max_age."""
        return now >= self.fetched + self.max_age

    def to_bytes(self) -> bytes:
        return json.dumps({"id": self.id, "mode": self.mode, "mx": list(self.mx),
                           "max_age": self.max_age, "fetched": self.fetched,
                           "text": self.text}).encode()

    @classmethod
    def from_bytes(cls, domain: str, data: bytes) -> "StsPolicy":
        d = json.loads(data)
        return cls(domain, str(d["id"]), str(d["mode"]), tuple(map(str, d["mx"])),
                   int(d["max_age"]), float(d["fetched"]), str(d.get("text", "")))


@dataclass
class Lookup:
    """What discovery found for a domain."""

    policy: StsPolicy | None
    failure: str = ""           # TLSRPT result type of a discovery failure
    detail: str = ""
    fetched: bool = False       # fetched now (not from the cache)


# --- parsing -------------------------------------------------------------------------------

def parse_txt(strings) -> str | None:
    """The id of the one `v=STSv1` TXT record; None when there is none, or several, or a
    malformed one (section 3.1: then the domain has no usable policy record)."""
    found = [s for s in strings if s.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            return None
        fields.setdefault(name.strip(" \t"), value.strip(" \t"))
    if fields.get("v") != "STSv1":
        return None
    ident = fields.get("id", "")
    return ident if _ID_RE.match(ident) else None


def _valid_pattern(pattern: str) -> bool:
    labels = pattern.removeprefix("*.").split(".")
    return len(labels) >= 1 and all(_LABEL_RE.match(lab) for lab in labels)


def parse_policy(text: str) -> tuple[str, tuple[str, ...], int]:
    """(mode, mx patterns, max_age) of a policy body; StsError when it is not valid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise StsError(f"malformed policy line: \"{line[:80]}\"")
        name, value = name.strip(), value.strip(" \t")
        if name == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(name, value)     # the first occurrence counts
    if fields.get("version") != "STSv1":
        raise StsError(f"bad or missing version: \"{fields.get('version', '')[:40]}\"")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise StsError(f"bad or missing mode: \"{mode[:40]}\"")
    age = fields.get("max_age", "")
    if not _MAX_AGE_RE.match(age) or int(age) > MAX_AGE_LIMIT:
        raise StsError(f"bad or missing max_age: \"{age[:40]}\"")
    bad = [p for p in mx if not _valid_pattern(p)]
    if bad:
        raise StsError(f"bad mx pattern: \"{bad[0][:80]}\"")
    if mode != "none" and not mx:
        raise StsError("no mx pattern")
    return mode, tuple(mx), int(age)


def mx_matches(pattern: str, host: str) -> bool:
    """Whether an MX host name matches one policy pattern (section 4.1)."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, dot, rest = host.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return host == pattern


def mx_allowed(policy: StsPolicy, host: str) -> bool:
    """Whether host matches any mx pattern of the policy."""
    return any(mx_matches(p, host) for p in policy.mx)


# --- the decision --------------------------------------------------------------------------

def _dane(policy: tls_policy.Policy) -> bool:
    """DANE is in force: its levels (a DANE policy that fell back to may for want of
    usable TLSA records is no DANE, and MTA-STS applies, RFC 8461 section 2)."""
    return policy.level in ("dane", "dane-only")


def apply(policy: tls_policy.Policy, sts: StsPolicy | None, mx_host: str):
    """The TLS policy for one MX host under an MTA-STS policy: (Policy, None), or
    (None, (dsn, reason)) when the host must not be used."""
    if sts is None or sts.mode == "none" or not policy.valid or _dane(policy) or \
            policy.source in ("policy", "per-site"):
        return policy, None
    if sts.mode == "testing":
        level = policy.level if tls_policy.rank(policy.level) >= tls_policy.rank("may") \
            else "may"
        return _replace(policy, level=level, source=SOURCE_TESTING), None
    if not mx_allowed(sts, mx_host):
        return None, (DSN_MX_MISMATCH, f"MX host {mx_host} does not match the MTA-STS "
                                       f"policy of {sts.domain}")
    if policy.level in ("fingerprint", tls_policy.HALF_DANE, "verify", "secure"):
        return policy, None     # already authenticated: at least as strong
    return _replace(policy, level="verify", matches=("hostname",),
                    servername=policy.servername or "hostname",
                    source=SOURCE_ENFORCE), None


def _replace(policy, **changes):
    return replace(policy, **changes)


# --- the cache -----------------------------------------------------------------------------

class PolicyCache:
    """Policies by domain in one LMDB file shared by the smtp processes."""

    def __init__(self, path: str, map_size: int = 1 << 20, warn=msg.warn):
        self.path = path
        self.warn = warn
        self.env = lmdb.open(path, subdir=False, map_size=map_size, max_dbs=0,
                             mode=0o600, metasync=False)

    def get(self, domain: str) -> StsPolicy | None:
        try:
            with self.env.begin() as txn:
                data = txn.get(domain.encode("ascii", "replace"))
            return None if data is None else StsPolicy.from_bytes(domain, data)
        except (lmdb.Error, ValueError, KeyError, TypeError) as exc:
            self.warn(f"MTA-STS policy cache {self.path}: {domain}: {exc}")
            return None

    def put(self, policy: StsPolicy) -> None:
        try:
            with self.env.begin(write=True) as txn:
                txn.put(policy.domain.encode("ascii", "replace"), policy.to_bytes())
        except lmdb.Error as exc:
            self.warn(f"MTA-STS policy cache {self.path}: cannot store {policy.domain}: "
                      f"{exc}")

    def close(self) -> None:
        self.env.close()


# --- discovery ------------------------------------------------------------------------------

def _query(resolver: dns.resolver.Resolver, name: str, rdtype: str):
    """(answer or None, kind): kind is ok, nodata, nxdomain or again."""
    try:
        qname = dns.name.from_text(name.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None, "nxdomain"
    try:
        answer = resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return None, "nxdomain"
    except Exception:       # noqa: BLE001 - timeouts, SERVFAIL, garbage: try again later
        return None, "again"
    if answer.rrset is None or len(answer.rrset) == 0:
        return None, "nodata"
    return answer, "ok"


class MtaSts:
    """Discovery and fetch of policies, with the cache (see the module's docstring)."""

    def __init__(self, resolver: dns.resolver.Resolver, ctx: ssl.SSLContext,
                 cache: PolicyCache | None, port: int = 443, timeout: float = 10.0,
                 clock=time.time, info=msg.info, warn=msg.warn):
        self.resolver = resolver
        self.ctx = ctx
        self.cache = cache
        self.port = port
        self.timeout = timeout
        self.clock = clock
        self.info = info
        self.warn = warn
        # domain -> (id, not before, failure Lookup): a policy server that is down costs
        # one fetch timeout per FETCH_RETRY and process, not one per delivery.
        self.failed: dict[str, tuple[str, float, Lookup]] = {}

    def _txt_id(self, domain: str) -> tuple[str | None, bool]:
        """(id or None, temporary failure)."""
        answer, kind = _query(self.resolver, f"_mta-sts.{domain}", "TXT")
        if kind != "ok":
            return None, kind == "again"
        strings = [b"".join(rr.strings).decode("utf-8", "replace")
                   for rr in list(answer.rrset)[:100]]
        return parse_txt(strings), False

    def _addresses(self, host: str) -> list[str]:
        out = []
        for rdtype in ("A", "AAAA"):
            answer, kind = _query(self.resolver, host, rdtype)
            if kind == "ok":
                out += [rr.address for rr in list(answer.rrset)[:20]]
        return out

    def fetch(self, domain: str, ident: str) -> StsPolicy:
        """The policy from mta-sts.DOMAIN; StsError (kind: the TLSRPT type) on failure."""
        host = f"mta-sts.{domain}"
        addresses = self._addresses(host)
        if not addresses:
            raise StsError(f"cannot find the address of {host}", FETCH_ERROR)
        try:
            resp = https.request("GET", host, self.port, POLICY_PATH, self.ctx, addresses,
                                 self.timeout, max_body=MAX_POLICY,
                                 headers={"Accept": "text/plain",
                                          "User-Agent": "postfix-py MTA-STS"})
        except https.HttpsError as exc:
            raise StsError(f"https://{host}{POLICY_PATH}: {exc}",
                           WEBPKI_INVALID if exc.kind == "webpki" else FETCH_ERROR) from None
        if resp.status != 200:
            raise StsError(f"https://{host}{POLICY_PATH}: HTTP status {resp.status}",
                           FETCH_ERROR)
        media = resp.content_type.split(";")[0].strip().lower()
        if media != "text/plain":
            raise StsError(f"https://{host}{POLICY_PATH}: Content-Type "
                           f"\"{resp.content_type[:60]}\" is not text/plain", POLICY_INVALID)
        try:
            text = resp.body.decode("utf-8")
        except UnicodeDecodeError:
            raise StsError(f"https://{host}{POLICY_PATH}: not UTF-8") from None
        try:
            mode, mx, max_age = parse_policy(text)
        except StsError as exc:
            raise StsError(f"https://{host}{POLICY_PATH}: {exc}") from None
        return StsPolicy(domain, ident, mode, mx, max_age, self.clock(), text)

    def lookup(self, domain: str) -> Lookup:
        """The policy that applies to domain now (see the module's docstring)."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        cached = self.cache.get(domain) if self.cache is not None else None
        if cached is not None and cached.expired(now):
            cached = None
        ident, _ = self._txt_id(domain)
        if ident is None:
            # No record, or DNS trouble (section 5.1): a cached policy that has not
            # expired still holds.
            return Lookup(cached)
        if cached is not None and cached.id == ident:
            return Lookup(cached)
        failed = self.failed.get(domain)
        if failed is not None and failed[0] == ident and now < failed[1]:
            return Lookup(cached, failed[2].failure, failed[2].detail)
        try:
            policy = self.fetch(domain, ident)
        except StsError as exc:
            self.warn(f"MTA-STS policy for {domain}: {exc}")
            if len(self.failed) > 1000:
                self.failed.clear()
            self.failed[domain] = (ident, now + FETCH_RETRY, Lookup(None, exc.kind, str(exc)))
            return Lookup(cached, exc.kind, str(exc))
        self.failed.pop(domain, None)
        if self.cache is not None:
            self.cache.put(policy)
        return Lookup(policy, fetched=True)


def from_config(cfg, resolver: dns.resolver.Resolver, warn=msg.warn) -> MtaSts | None:
    """MTA-STS as main.cf configures it, built before the chroot; None when disabled (or,
    with a warning, when the CA file or the cache cannot be opened)."""
    if not cfg["smtp_tls_mta_sts_enable"]:
        return None
    cafile = cfg.get("smtp_tls_mta_sts_CAfile").strip()
    try:
        ctx = https.client_context(cafile)
    except (ssl.SSLError, OSError) as exc:
        warn(f"smtp_tls_mta_sts_CAfile: cannot load {cafile or 'the system CA bundle'}: "
             f"{exc}; MTA-STS is disabled")
        return None
    path = cfg.get("smtp_tls_mta_sts_cache").strip()
    cache = None
    if path:
        try:
            cache = PolicyCache(path, cfg["lmdb_map_size"], warn)
            hand_over(cfg, path)
        except (lmdb.Error, OSError) as exc:
            warn(f"smtp_tls_mta_sts_cache: cannot open {path}: {exc}; policies are not "
                 f"cached")
    return MtaSts(resolver, ctx, cache, port=cfg["smtp_tls_mta_sts_https_port"],
                  timeout=cfg["smtp_tls_mta_sts_fetch_timeout"], warn=warn)


def hand_over(cfg, path: str) -> None:
    """An LMDB file (and its lock) created as root belongs to mail_owner, as the rest
    of data_directory (the TLSRPT store's too)."""
    if os.geteuid() != 0:
        return
    try:
        pw = pwd.getpwnam(cfg.get("mail_owner"))
    except KeyError:
        return
    for name in (path, path + "-lock"):
        try:
            os.chown(name, pw.pw_uid, pw.pw_gid)
        except OSError:
            pass
