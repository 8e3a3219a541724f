"""TLS policy of the smtp/lmtp client: security levels, legacy spellings, per-site tables.

NAME
    tls_policy - decide, per destination and server, how the SMTP client uses TLS

DESCRIPTION
    This module is postfix-py's smtp_tls_policy.c. Its functions are pure, apart from
    PolicyFinder, which consults the lookup tables that main.cf names.

    Security levels, weakest first: none, may, encrypt, fingerprint, halfdane, dane,
    dane-only, verify, secure. dane and dane-only are resolved per server by smtp/dane.py
    (TLSA records, or a downgrade); a Policy at level dane then carries its TLSA records
    (tlsa) and the names a DANE-TA certificate must match (matches), with source
    "DANE TLSA". halfdane is Postfix's output-only level (TLS_LEV_HALF_DANE): TLSA
    records of an MX host found through an MX RRset that is not DNSSEC-validated
    (smtp_tls_dane_insecure_mx_policy = dane); the records are enforced as at dane, but
    the peer is logged "Trusted", never "Verified". No table or main.cf setting may
    name it (level_lookup() refuses it, as Postfix's tls_level_lookup()).
    "may" uses STARTTLS when the server offers it; "encrypt" and up refuse to deliver
    without TLS; "fingerprint" wants a listed certificate or public-key fingerprint;
    "verify" and "secure" want a trusted certificate whose names match (the server host
    name at "verify", the next-hop domain at "secure").

    The legacy parameters (the seed's "SMTP Client specific settings") are spellings of a
    level: smtp_use_tls = yes is "may"; smtp_enforce_tls = yes (which implies
    smtp_use_tls) is "verify", or "encrypt" with smtp_tls_enforce_peername = no. When
    smtp_tls_security_level is set, it wins over them.

    smtp_tls_per_site (only when smtp_tls_policy_maps is empty, as in Postfix) is looked
    up with the next-hop destination as given (`example.com`, `[mailhost]`,
    `[mailhost]:587`, `host:port`) and with the server host name; values are NONE, MAY,
    MUST_NOPEERMATCH and MUST. The two results combine by SPEC-NOTES.md's rules: a more
    specific entry (NONE, MUST_NOPEERMATCH, MUST) beats MAY, and a more secure one beats
    a less secure one (MUST over MUST_NOPEERMATCH over NONE). The combined entry then
    overrides the global level, except that a per-site MAY never weakens a global
    enforced level.

    smtp_tls_policy_maps holds the modern per-destination policy: `level attr=value ...`
    with the attributes ciphers, protocols, match, exclude and servername (and
    connection_reuse=yes|no, which overrides smtp_tls_connection_reuse for the destination). Bracketed or ported next hops are looked up
    as given; a domain is looked up, then its parent domains as `.example.com`, `.com`.

FUNCTIONS
    legacy_level(use_tls, enforce_tls, enforce_peername) -> level
    global_level(cfg, prefix="smtp") -> level; PolicyError for a bad
        smtp_tls_security_level (Postfix: fatal "invalid tls security level").
    combine_per_site(host_entry, nexthop_entry) -> combined entry or None (absent);
        PolicyError for a value that is not one of the four.
    apply_per_site(global_lvl, combined) -> level
    per_site_level(use_tls, enforce_tls, enforce_peername, host_entry, nexthop_entry)
        -> level: the whole legacy rule, for the truth table.
    parse_policy(text, where, dest, warn) -> Policy; PolicyError for what Postfix
        refuses (the warning names the table and destination).
    requires_tls(level), must_match(level), must_trust(level), dane_based(level),
        never_secured(level) -> bool (Postfix's TLS_DANE_BASED, TLS_NEVER_SECURED)
    match_strategies(cfg, prefix, policy) -> names or strategies for verify/secure
    cache_key(service, nexthop, hostname, addr, port, digest) -> tlsmgr cache id
    policy_digest(*parts) -> upper-case hex SHA-256 of the policy's particulars
    PolicyFinder(cfg, prefix="smtp", open_table=tables.open_table, warn=msg.warn)
        .find(nexthop_text, domain, literal, hostname) -> Policy. Lookup problems do not
        raise: they give Policy(level="invalid", dsn=..., reason=...), and the caller
        skips that server, as Postfix does ("client TLS configuration problem" 4.7.5,
        "Temporary lookup error" 4.3.0).
        .close()

CONFIGURATION PARAMETERS
    smtp_tls_security_level (empty), smtp_use_tls (no), smtp_enforce_tls (no),
    smtp_tls_enforce_peername (yes), smtp_tls_per_site (empty),
    smtp_tls_policy_maps (empty), smtp_tls_verify_cert_match (hostname),
    smtp_tls_secure_cert_match (nexthop, dot-nexthop), smtp_tls_fingerprint_cert_match
    (empty). lmtp_* for the lmtp client.

SEE ALSO
    SPEC-NOTES.md (the per-site rules), smtp/session.py and smtp/tls.py (where the level is
    enforced), lib/tls.py; Postfix smtp_tls_policy.c, TLS_README, TLS_LEGACY_README.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from ..lib import msg, params, tables

# Postfix's order (tls_level_table): the dane levels between fingerprint and verify.
LEVELS = ("none", "may", "encrypt", "fingerprint", "halfdane", "dane", "dane-only", "verify",
          "secure")
HALF_DANE = "halfdane"          # output only: never configured (tls_level_lookup)
_RANK = {name: rank for rank, name in enumerate(LEVELS)}
INVALID = "invalid"

PER_SITE_VALUES = ("NONE", "MAY", "MUST_NOPEERMATCH", "MUST")
# Precedence of per-site results when host and next hop both have one: Postfix's
# permutation of the enforcement order (MUST, MUST_NOPEERMATCH, NONE, MAY, absent).
_PER_SITE_PRECEDENCE = {None: 0, "MAY": 1, "NONE": 2, "MUST_NOPEERMATCH": 3, "MUST": 4}
_PER_SITE_LEVEL = {"NONE": "none", "MAY": "may", "MUST_NOPEERMATCH": "encrypt",
                   "MUST": "verify"}

DSN_CONFIG = ("4.7.5", "client TLS configuration problem")
DSN_LOOKUP = ("4.3.0", "Temporary lookup error")


class PolicyError(ValueError):
    """A TLS policy that Postfix would refuse; str() is the warning text."""


@dataclass(frozen=True)
class Policy:
    """The TLS policy for one server of one destination."""

    level: str
    matches: tuple[str, ...] = ()   # policy "match": names/strategies or fingerprints
    protocols: str | None = None    # policy "protocols", else main.cf's
    ciphers: str | None = None      # policy "ciphers" (a grade), else main.cf's
    exclude: str | None = None      # policy "exclude", else main.cf's
    servername: str | None = None   # policy "servername" (SNI)
    # global, per-site, policy; "DANE TLSA" or "DANE TLSA (why it was downgraded)" from
    # smtp/dane.py; "MTA-STS policy" or "MTA-STS policy (testing)" from smtp/mta_sts.py;
    # "TLS-Required: no" (smtp/service.py, RFC 8689).
    source: str = "global"
    dsn: str = ""                   # level "invalid" only
    reason: str = ""
    tlsa: tuple = ()                # level dane: the usable smtp/dane.py Tlsa records
    # policy "connection_reuse=yes|no": overrides smtp_tls_connection_reuse for this
    # destination (smtp/conncache.py); None: main.cf's
    connection_reuse: bool | None = None

    @property
    def valid(self) -> bool:
        """Whether the policy can be used (not a lookup or syntax failure)."""
        return self.level != INVALID


def rank(level: str) -> int:
    """The position of a level in the order none < may < ... < secure."""
    return _RANK[level]


def requires_tls(level: str) -> bool:
    """Whether mail must not go out without TLS at this level."""
    return level in _RANK and _RANK[level] >= _RANK["encrypt"]


def must_match(level: str) -> bool:
    """Whether the certificate must match names, fingerprints or TLSA records."""
    return level in ("fingerprint", HALF_DANE, "dane", "dane-only", "verify", "secure")


def dane_based(level: str) -> bool:
    """Whether TLSA records decide (halfdane, dane, dane-only: TLS_DANE_BASED)."""
    return level in (HALF_DANE, "dane", "dane-only")


def never_secured(level: str) -> bool:
    """Whether a match is logged "Trusted", not "Verified" (TLS_NEVER_SECURED): halfdane,
    where the MX host name itself was not DNSSEC-validated and could be forged."""
    return level == HALF_DANE


def must_trust(level: str) -> bool:
    """Whether the certificate must chain to a trusted CA at this level."""
    return level in ("verify", "secure")


def legacy_level(use_tls: bool, enforce_tls: bool, enforce_peername: bool) -> str:
    """The level that smtp_use_tls, smtp_enforce_tls, smtp_tls_enforce_peername spell."""
    if enforce_tls:
        return "verify" if enforce_peername else "encrypt"
    return "may" if use_tls else "none"


def level_lookup(text: str) -> str | None:
    """A level name as written in main.cf or a policy table; None when unknown."""
    name = text.strip().lower()
    return name if name in _RANK and name != HALF_DANE else None


def global_level(cfg, prefix: str = "smtp") -> str:
    """The level when no table says otherwise; PolicyError for a bad level name."""
    text = cfg.get(f"{prefix}_tls_security_level").strip()
    if text:
        level = level_lookup(text)
        if level is None:
            raise PolicyError(f"invalid tls security level: \"{text}\"")
        # dane and dane-only stay: smtp/dane.py decides per server (and warns when
        # DNSSEC lookups are disabled, as Postfix's dane_init).
        return level
    return legacy_level(cfg[f"{prefix}_use_tls"], cfg[f"{prefix}_enforce_tls"],
                        cfg[f"{prefix}_tls_enforce_peername"])


def _per_site_value(value: str | None) -> str | None:
    if value is None:
        return None
    word = value.strip().upper()
    if word not in PER_SITE_VALUES:
        raise PolicyError(f"unknown TLS policy '{value.strip()}'")
    return word


def combine_per_site(host_entry: str | None, nexthop_entry: str | None) -> str | None:
    """The per-site result when host and next hop were both looked up (None: absent)."""
    host = _per_site_value(host_entry)
    nexthop = _per_site_value(nexthop_entry)
    return max((host, nexthop), key=lambda v: _PER_SITE_PRECEDENCE[v])


def apply_per_site(global_lvl: str, combined: str | None) -> str:
    """The effective level: the per-site result overrides, but MAY never weakens."""
    if combined is None:
        return global_lvl
    if combined == "MAY" and _RANK[global_lvl] > _RANK["may"]:
        return global_lvl
    return _PER_SITE_LEVEL[combined]


def per_site_level(use_tls: bool, enforce_tls: bool, enforce_peername: bool,
                   host_entry: str | None, nexthop_entry: str | None) -> str:
    """The legacy rule in full: globals, then the combined per-site entries."""
    return apply_per_site(legacy_level(use_tls, enforce_tls, enforce_peername),
                          combine_per_site(host_entry, nexthop_entry))


# --- policy table entries ----------------------------------------------------------------

def _tokens(text: str) -> list[str]:
    """Split at commas and white space; `{ ... }` stays one token (Postfix's mystrtokq)."""
    try:
        return params.split_list(text, strict=True)
    except ValueError as exc:
        raise PolicyError(str(exc)) from None


def _name_value(token: str) -> tuple[str, str]:
    if token.startswith("{"):
        token = re.sub(r"\s+", " ", token[1:-1]).strip()
    name, eq, value = token.partition("=")
    if not eq or not name.strip():
        raise ValueError("missing '=' after attribute name")
    return name.strip().lower(), value.strip()


def parse_policy(text: str, where: str, dest: str = "", warn=msg.warn) -> Policy:
    """A smtp_tls_policy_maps value; PolicyError (already warned) when unusable."""
    def bad(problem: str):
        warn(f"{where}: {problem}")
        raise PolicyError(problem)

    try:
        tokens = _tokens(text)
    except PolicyError as exc:
        bad(str(exc))
    if not tokens:
        bad("invalid empty policy")
    level = level_lookup(tokens[0])
    if level is None:
        bad(f"invalid security level \"{tokens[0]}\"")
    if _RANK[level] < _RANK["may"]:
        for tok in tokens[1:]:
            warn(f"{where}: ignoring attribute \"{tok}\" with TLS disabled")
        return Policy("none", source="policy")
    attrs: dict[str, str] = {}
    matches: list[str] = []
    for tok in tokens[1:]:
        try:
            name, value = _name_value(tok)
        except ValueError as exc:
            bad(f"malformed attribute/value pair \"{tok}\": {exc}")
        if name == "match":
            if not value:
                bad(f"attribute \"{name}\" has empty value")
            if level == "fingerprint":
                matches += [v for v in value.split("|") if v]
            elif level in ("verify", "secure"):
                matches += [v for v in value.split(":") if v]
            else:
                bad(f"attribute \"{name}\" invalid at security level \"{level}\"")
            continue
        if name == "connection_reuse":
            if value.lower() not in ("yes", "no"):
                bad(f"attribute \"{name}\" has bad value: \"{value}\"")
            attrs[name] = value.lower()
            continue
        if name in ("ciphers", "protocols", "exclude", "servername"):
            if name in attrs:
                bad(f"attribute \"{name}\" is specified multiple times")
            if name == "ciphers" and not value:
                bad(f"attribute \"{name}\" has empty value")
            if name == "servername" and not _valid_hostname(value):
                bad(f"\"{name}={value}\" specifies an invalid hostname")
            attrs[name] = value
            continue
        if name == "tafile":
            bad(f"attribute \"{name}\" is not supported (no DANE trust anchors)")
        bad(f"invalid attribute name: \"{name}\"")
    reuse = attrs.get("connection_reuse")
    return Policy(level, tuple(matches), attrs.get("protocols"), attrs.get("ciphers"),
                  attrs.get("exclude"), attrs.get("servername"), source="policy",
                  connection_reuse=None if reuse is None else reuse == "yes")


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                          r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _valid_hostname(name: str) -> bool:
    return bool(_HOSTNAME_RE.match(name))


def match_strategies(cfg, prefix: str, policy: Policy) -> list[str]:
    """What the certificate must match at verify/secure: the policy's, else main.cf's."""
    if policy.matches:
        return list(policy.matches)
    if policy.level == "verify":
        return params.split_list(cfg.get(f"{prefix}_tls_verify_cert_match"))
    if policy.level == "secure":
        return params.split_list(cfg.get(f"{prefix}_tls_secure_cert_match"))
    return []


_FPRINT_RE = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2})*$")


def clean_fingerprints(items, warn=msg.warn) -> list[str]:
    """Fingerprints as AB:CD:...; malformed ones are dropped with Postfix's warning."""
    out = []
    for item in items:
        text = item.strip().upper()
        if not text:
            continue
        if not _FPRINT_RE.match(text):
            warn(f"malformed fingerprint value: {item.strip()}")
            continue
        out.append(text)
    return out


def fingerprints(cfg, prefix: str, policy: Policy, warn=msg.warn) -> list[str]:
    """The fingerprints acceptable at the fingerprint level (upper case, with colons)."""
    items = list(policy.matches) or params.split_list(
        cfg.get(f"{prefix}_tls_fingerprint_cert_match"))
    return clean_fingerprints(items, warn)


# --- the session cache key --------------------------------------------------------------

def _key_field(text: str) -> str:
    """One cache key field; base64 when it holds the separator, as Postfix's smtp_key."""
    if not text:
        return ""
    if "&" in text:
        return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")
    return text


def policy_digest(*parts) -> str:
    """Upper-case hex SHA-256 of what makes a cached session acceptable."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (list, tuple)):
            part = ",".join(str(p) for p in part)
        h.update(str(part if part is not None else "").encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest().upper()


def cache_key(service: str, nexthop: str, hostname: str, addr: str, port: int,
              digest: str) -> str:
    """The tlsmgr cache id: service, next hop, host, address, port and policy digest."""
    key = "&".join(_key_field(f) for f in (service, nexthop, hostname, addr,
                                           str(port) if port else "", digest))
    if len(key.encode()) > 500:
        # tlsmgr takes ids up to 511 bytes; a hash of the fields is as unique.
        key = "&".join((_key_field(service), policy_digest(key)))
    return key


# --- table lookups ------------------------------------------------------------------------

class PolicyFinder:
    """The per-destination policy from smtp_tls_policy_maps or smtp_tls_per_site."""

    def __init__(self, cfg, prefix: str = "smtp", open_table=tables.open_table,
                 warn=msg.warn):
        """Open the tables (TableError propagates); PolicyError for a bad global level."""
        self.cfg = cfg
        self.prefix = prefix
        self.warn = warn
        self.global_level = global_level(cfg, prefix)
        self.policy_param = f"{prefix}_tls_policy_maps"
        self.per_site_param = f"{prefix}_tls_per_site"
        self.policy_maps = [open_table(ref, cfg) for ref in cfg[self.policy_param]]
        self.per_site = []
        if cfg[self.per_site_param]:
            if self.policy_maps:
                warn(f"{self.per_site_param} ignored when {self.policy_param} is not empty.")
            else:
                self.per_site = [open_table(ref, cfg) for ref in cfg[self.per_site_param]]

    @property
    def tables_in_use(self) -> bool:
        """Whether any table can raise the level above the global one."""
        return bool(self.policy_maps or self.per_site)

    def close(self) -> None:
        """Close the tables."""
        for table in self.policy_maps + self.per_site:
            table.close()

    @staticmethod
    def _lookup(maps, key: str) -> str | None:
        for table in maps:
            value = table.lookup(key)
            if value is not None:
                return value
        return None

    def find(self, nexthop_text: str, domain: str, literal: bool, hostname: str) -> Policy:
        """The policy for server hostname of next hop nexthop_text (never raises)."""
        try:
            if self.policy_maps:
                return self._find_policy(nexthop_text, domain, literal)
            if self.per_site:
                return self._find_per_site(nexthop_text, hostname)
        except tables.TableError as exc:
            table = self.policy_param if self.policy_maps else self.per_site_param
            self.warn(f"{table}: next-hop destination \"{nexthop_text}\": table lookup "
                      f"error: {exc}")
            return Policy(INVALID, dsn=DSN_LOOKUP[0], reason=DSN_LOOKUP[1])
        except PolicyError:
            return Policy(INVALID, dsn=DSN_CONFIG[0], reason=DSN_CONFIG[1])
        return Policy(self.global_level)

    def _find_policy(self, nexthop_text: str, domain: str, literal: bool) -> Policy:
        keys = [nexthop_text]
        if not literal:
            # Parent domains match as ".example.com", ".com" (Postfix's walk).
            name = domain
            keys = [name]
            dot = name.find(".", 1)
            while dot >= 0:
                keys.append(name[dot:])
                dot = name.find(".", dot + 1)
        for key in keys:
            value = self._lookup(self.policy_maps, key)
            if value is not None:
                where = f"{self.policy_param}, next-hop destination \"{key}\""
                return parse_policy(value, where, nexthop_text, self.warn)
        return Policy(self.global_level)

    def _find_per_site(self, nexthop_text: str, hostname: str) -> Policy:
        def one(key: str, what: str) -> str | None:
            value = self._lookup(self.per_site, key)
            if value is not None and value.strip().upper() not in PER_SITE_VALUES:
                self.warn(f"{self.per_site_param}: unknown TLS policy '{value.strip()}' "
                          f"for {what} {key}")
                raise PolicyError(value)
            return value
        nexthop_entry = one(nexthop_text, "next-hop destination")
        host_entry = None
        if hostname and hostname.lower() != nexthop_text.lower():
            host_entry = one(hostname, "server hostname")
        combined = combine_per_site(host_entry, nexthop_entry)
        if combined is None:
            return Policy(self.global_level)
        return Policy(apply_per_site(self.global_level, combined), source="per-site")
