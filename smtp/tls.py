"""TLS for the smtp and lmtp client: STARTTLS (or wrapper mode) under one policy, and the
client session caches; the client's counterpart of smtpd/tls.py.

DESCRIPTION
    TlsStarter does the handshake for a ClientSession (smtp/session.py): it looks the
    session up in the cache under a key of service, next hop, host, address, port and a
    digest of the policy (tls_policy.cache_key; a caller may give its own key function),
    offers it, checks the certificate as the level demands (lib/tls.py: trust, names,
    fingerprints), logs Postfix's lines at smtp_tls_loglevel, and after the first read
    that follows the handshake (the EHLO reply: a TLS 1.3 ticket arrives after the
    handshake) stores the session it got (save()). A handshake that fails raises
    TLSStartError and leaves the connection unusable: no QUIT, no plaintext.

    At the dane level (a Policy that smtp/dane.py gave its TLSA records) the chain is
    judged by smtp/dane.py's verify() instead of the CAfile: a match makes the peer
    "Verified" and logs, at smtp_tls_loglevel 2, Postfix's "Matched DANE EE
    certificate at depth 0: 3 1 1 ..." (or "TA certificate at depth N"); no match is
    OpenSSL's X509_V_ERR_DANE_NO_MATCH. The TLSA records are part of the session cache
    key, and only a verified DANE session is saved: a resumed session (the server sends
    no chain again) was verified under the same records. At Postfix's halfdane level
    (TLSA records of a host behind an insecure MX RRset, smtp/dane.py) the same checks
    are enforced, but a match is "Trusted", never "Verified" (TLSInfo.never_secured).
    At verify and secure, a Policy with records holds trust anchors (posttls-finger -A):
    smtp/dane.py's verify_anchors() judges the chain instead of the CAfile, a match logs
    Postfix's "Matched trust anchor at depth N" where a DANE match is logged, and only a
    verified session is saved.

CLASSES AND FUNCTIONS
    TlsStarter(client_tls, policy, *, cfg, prefix, service, nexthop_text, nexthop_domain,
        cache, cache_key, info, warn, loglevel, match, fingerprints, sni, log_cache,
        log_certmatch): start(stream, addr, server_helo) -> lib.tls.TLSInfo or
        TLSStartError; acceptable() -> bool; save(). cache_key(addr, digest) -> str
        replaces the smtp client's key (posttls-finger keys by address and policy only).
    TlsmgrCache(cache_type): the smtp or lmtp session cache in tlsmgr; never raises.
    MemoryCache(): a process-private cache (posttls-finger's "memory" cache).
    stream_timeout(starter) -> smtp_starttls_timeout (lmtp_ falls back to smtp_).

CONFIGURATION PARAMETERS
    smtp_tls_loglevel, smtp_starttls_timeout, smtp_tls_CAfile, smtp_tls_CApath,
    smtp_tls_cert_file, smtp_tls_eccert_file, smtp_tls_dcert_file, smtp_tls_protocols,
    smtp_tls_mandatory_protocols (and lmtp_* where declared); the rest through
    smtp/tls_policy.py and lib/tls.py.

SEE ALSO
    smtp/session.py, smtp/tls_policy.py, smtp/service.py, lib/tls.py, lib/tls_session.py,
    lib/tlsmgr_client.py, smtpd/tls.py; Postfix smtp_proto.c, tls_client.c.
"""

from __future__ import annotations

from OpenSSL import SSL

from ..lib import metrics, msg, params, tls_session, tlsmgr_client
from ..lib import tls as libtls
from . import dane, tls_policy

X509_V_ERR_DANE_NO_MATCH = 65


# --- the TLS starter --------------------------------------------------------------------------

class TLSStartError(Exception):
    """The handshake failed: the connection is in an unknown state and must be dropped."""


class TlsStarter:
    """STARTTLS for a ClientSession, under one TLS policy, with a session cache."""

    def __init__(self, client_tls, policy, *, cfg, prefix: str = "smtp",
                 service: str = "smtp", nexthop_text: str = "", nexthop_domain: str = "",
                 cache=None, cache_key=None, info=msg.info, warn=msg.warn,
                 loglevel: int | None = None, match: list[str] | None = None,
                 fingerprints: list[str] | None = None, sni: str | None = None,
                 log_cache: bool | None = None, log_certmatch: bool | None = None):
        self.client = client_tls            # lib.tls.ClientTLS, or None: TLS unavailable
        self.policy = policy
        self.cfg = cfg
        self.prefix = prefix
        self.service = service
        self.nexthop_text = nexthop_text
        self.nexthop_domain = nexthop_domain
        self.cache = cache
        self.make_key = cache_key or self._cache_key
        self.info = info
        self.warn = warn
        self.loglevel = client_tls.loglevel if loglevel is None and client_tls else (loglevel or 0)
        # Cache lookups and saves are logged at loglevel 2, as Postfix's TLS_LOG_CACHE.
        self.log_cache = self.loglevel >= 2 if log_cache is None else log_cache
        self.log_certmatch = self.loglevel >= 2 if log_certmatch is None else log_certmatch
        self.match = match
        self.fingerprints = fingerprints
        self.sni = sni
        self.cache_key = None
        self.loaded: bytes | None = None
        self.conn = None
        self.tls_info = None
        self.saved = False
        self.dane_line = ""             # "Matched DANE ...", logged with log_certmatch

    @property
    def available(self) -> bool:
        """Whether there is a TLS engine at all."""
        return self.client is not None

    @property
    def level(self) -> str:
        """The security level in force."""
        return self.policy.level

    def _match_names(self, hostname: str) -> list[str] | None:
        if self.level not in ("verify", "secure"):
            return None
        strategies = self.match if self.match is not None else \
            tls_policy.match_strategies(self.cfg, self.prefix, self.policy)
        return libtls.match_names(strategies, self.nexthop_domain, hostname)

    def _cache_key(self, addr, digest: str) -> str:
        """The smtp client's key: service, next hop, server and the policy's digest."""
        return tls_policy.cache_key(self.service, self.nexthop_text, addr.name, addr.addr,
                                    addr.port, digest)

    def _digest(self, hostname: str, server_helo: str) -> str:
        cfg = self.cfg
        p = self.prefix
        files = [cfg.get(f"{p}_tls_{n}") for n in ("CAfile", "CApath", "cert_file",
                                                   "eccert_file", "dcert_file")]
        mandatory = tls_policy.requires_tls(self.level)
        authenticated = tls_policy.must_match(self.level)
        protocols = cfg.get(f"{p}_tls_mandatory_protocols" if mandatory else f"{p}_tls_protocols")
        # As Postfix salts its key with protocols, cipher list and library version: a
        # cached session is always one this configuration would negotiate.
        return tls_policy.policy_digest(
            self.level, self._match_names(hostname) or [], self.fingerprints or [],
            self.policy.protocols or protocols, self.client.cipher_list(mandatory, authenticated),
            self.policy.ciphers, self.policy.exclude, self.sni, files, server_helo,
            SSL.OpenSSL_version(SSL.OPENSSL_VERSION),
            # Sorted: DNS servers rotate the order of an RRset.
            sorted(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in self.policy.tlsa),
            self.policy.matches if self.policy.tlsa else ())

    def start(self, stream, addr, server_helo: str = "") -> object:
        """Handshake on stream; returns lib.tls.TLSInfo; TLSStartError when it fails."""
        mandatory = tls_policy.requires_tls(self.level)
        # OpenSSL security level 1 where the certificate must match, as Postfix.
        authenticated = tls_policy.must_match(self.level)
        ctx = self.client.context(mandatory, authenticated)
        session = None
        if self.cache is not None:
            self.cache_key = self.make_key(addr, self._digest(addr.name, server_helo))
            if self.log_cache:
                self.info(f"looking for session {self.cache_key} in {self.cache.name} cache")
            data = self.cache.lookup(self.cache_key)
            if data:
                try:
                    session = tls_session.deserialize(data, ctx)
                    self.loaded = data
                    if self.log_cache:
                        self.info(f"reloaded session {self.cache_key} from "
                                  f"{self.cache.name} cache")
                except ValueError:
                    self.cache.delete(self.cache_key)
        stream.flush()
        discarded = stream.purge()
        if discarded:
            # Bytes that came with or after the 220 are plaintext injection: drop them.
            msg.verbose(1, f"{addr.namaddrport}: discarding {discarded} bytes of "
                           f"pipelined input before the TLS handshake")
        conn = self.client.connection(stream.sock, addr.namaddrport, mandatory,
                                      servername=self.sni, session=session,
                                      authenticated=authenticated)
        stream.tls = conn
        self.conn = conn
        try:
            libtls.handshake(conn, stream_timeout(self))
        except libtls.TLSHandshakeError as exc:
            self.info(str(exc))
            for reason in exc.reasons:
                self.warn(reason)
            if session is not None and self.cache is not None:
                self.cache.delete(self.cache_key)
            raise TLSStartError(str(exc)) from None
        info = self.client.info(conn, match=self._match_names(addr.name), warn=self.warn)
        if self.level == "fingerprint":
            self._check_fingerprint(info)
        elif tls_policy.dane_based(self.level):
            self._check_dane(conn, info)
        elif self.policy.tlsa and self.level in ("verify", "secure"):
            self._check_anchors(conn, info, addr.name)
        lines = libtls.log_lines(info, self.loglevel,
                                 require_trust=tls_policy.must_match(self.level))
        if self.dane_line and self.log_certmatch:
            # As Postfix: after "matched peername", before the certificate details.
            at = next((i + 1 for i, line in enumerate(lines)
                       if ": matched peername: " in line), None)
            if at is None:
                at = 1 if lines and lines[0].endswith(": Reusing old session") else 0
            lines.insert(at, self.dane_line)
        for line in lines:
            if line:
                self.info(line)
        self.tls_info = info
        metrics.tls_client(info, self.nexthop_text or self.nexthop_domain, self.level)
        return info

    def _check_fingerprint(self, info) -> None:
        """The fingerprint level: the certificate or its key must be one of those listed."""
        wanted = set(self.fingerprints or [])
        which = None
        if info.peer_cert_present:
            if info.peer_fingerprint in wanted:
                which = ("fingerprint", info.peer_fingerprint)
            elif info.peer_pkey_fingerprint in wanted:
                which = ("pkey fingerprint", info.peer_pkey_fingerprint)
        if which is not None:
            # The chain does not matter here; the listed fingerprint is the trust anchor.
            info.peer_trusted = info.peer_matched = True
            info.matched_name = ""
            info.verify_error, info.verify_error_text = libtls.X509_V_OK, ""
            if self.log_certmatch:
                self.info(f"{info.namaddr}: Matched {which[0]}: {which[1].replace(':', '')}")
        else:
            # Postfix (through its DANE code) reports X509_V_ERR_DANE_NO_MATCH.
            info.peer_trusted = info.peer_matched = False
            info.verify_error, info.verify_error_depth = X509_V_ERR_DANE_NO_MATCH, 0
            info.verify_error_text = "no matching DANE TLSA records"

    def _check_dane(self, conn, info) -> None:
        """The dane level: the chain must match a usable TLSA record (smtp/dane.py)."""
        info.peer_trusted = info.peer_matched = False
        info.matched_name = ""
        info.never_secured = tls_policy.never_secured(self.level)
        if not info.peer_cert_present:
            return
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        if not chain:
            chain = [conn.get_peer_certificate(as_cryptography=True)]
        found = dane.verify(chain, self.policy.tlsa, list(self.policy.matches),
                            self.client.wildcard_multiple_labels)
        if not found.matched and info.session_reused and len(chain) == 1 and \
                any(r.usage == dane.USAGE_DANE_TA for r in self.policy.tlsa):
            # Only verified DANE sessions are cached, under a key with these records.
            found = dane.DaneMatch(True, None, -1)
        if self._judged(info, found) and found.record is not None:
            kind = "TA certificate" if found.depth else "EE certificate"
            self.dane_line = (f"{info.namaddr}: Matched DANE {kind} at depth "
                              f"{found.depth}: {found.record.text()}")

    @staticmethod
    def _judged(info, found) -> bool:
        """Record a DANE or trust-anchor verdict (dane.DaneMatch) in info; whether the
        peer matched."""
        if found.matched:
            info.peer_trusted = info.peer_matched = True
            info.matched_name = found.name
            info.verify_error, info.verify_error_text = libtls.X509_V_OK, ""
            info.verify_error_depth = -1
            return True
        info.verify_error, info.verify_error_depth = found.error, found.error_depth
        info.verify_error_text = tls_session.verify_error_string(found.error)
        return False

    def _check_anchors(self, conn, info, hostname: str) -> None:
        """verify or secure with trust anchors (posttls-finger -A): they replace the
        CAfile and CApath, as Postfix's synthetic DANE (smtp/dane.py)."""
        info.peer_trusted = info.peer_matched = False
        info.matched_name = ""
        if not info.peer_cert_present:
            return
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        if not chain:
            chain = [conn.get_peer_certificate(as_cryptography=True)]
        found = dane.verify_anchors(chain, self.policy.tlsa, self._match_names(hostname) or [],
                                    self.client.wildcard_multiple_labels)
        if not found.matched and info.session_reused and len(chain) == 1:
            # Only verified sessions are cached (save()), under a key with these anchors.
            found = dane.DaneMatch(True, None, -1)
        if self._judged(info, found) and found.record is not None:
            self.dane_line = f"{info.namaddr}: Matched trust anchor at depth {found.depth}"

    def acceptable(self) -> bool:
        """Whether the peer certificate satisfies the level (after start())."""
        info = self.tls_info
        if not tls_policy.must_match(self.level):
            return True
        return bool(info and info.peer_cert_present and info.peer_verified)

    def save(self) -> None:
        """Store the session after the first read past the handshake (TLS 1.3 tickets)."""
        if self.saved or self.cache is None or self.conn is None:
            return
        if (tls_policy.dane_based(self.level) or self.policy.tlsa) and not self.acceptable():
            return
        self.saved = True
        try:
            session = self.conn.get_session()
            if session is None:
                return
            data = tls_session.serialize(session)
        except Exception:       # noqa: BLE001 - a cache is never worth a failed delivery
            return
        if data == self.loaded:
            return
        if self.log_cache:
            self.info(f"save session {self.cache_key} to {self.cache.name} cache")
        self.cache.update(self.cache_key, data)


def stream_timeout(starter: TlsStarter) -> float:
    """smtp_starttls_timeout (lmtp_ falls back to smtp_), for the handshake."""
    name = f"{starter.prefix}_starttls_timeout"
    return float(starter.cfg[name if params.lookup(name) else "smtp_starttls_timeout"])


# --- session caches -----------------------------------------------------------------------

class TlsmgrCache:
    """Client TLS sessions in tlsmgr's cache (smtp or lmtp); never raises."""

    def __init__(self, cache_type: str):
        self.name = cache_type

    def lookup(self, key: str) -> bytes | None:
        return tlsmgr_client.lookup(self.name, key)

    def update(self, key: str, data: bytes) -> bool:
        return tlsmgr_client.update(self.name, key, data)

    def delete(self, key: str) -> None:
        tlsmgr_client.delete(self.name, key)


class MemoryCache:
    """A process-private session cache (posttls-finger's "memory" cache; tests)."""

    name = "memory"

    def __init__(self):
        self.entries: dict[str, bytes] = {}

    def lookup(self, key: str) -> bytes | None:
        return self.entries.get(key)

    def update(self, key: str, data: bytes) -> bool:
        self.entries[key] = data
        return True

    def delete(self, key: str) -> None:
        self.entries.pop(key, None)
