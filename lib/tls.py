"""TLS for smtpd and smtp: contexts from main.cf, peer facts, and Postfix's TLS log lines.

This is postfix-py's counterpart of Postfix's src/tls (tls_server.c, tls_client.c,
tls_misc.c, tls_verify.c, tls_fprint.c, tls_certkey.c) on top of pyOpenSSL. It turns the TLS
parameters into SSL contexts, creates connections that carry the per-connection state that
Postfix keeps in its TLScontext, and describes a finished handshake in the words Postfix
uses in the mail log and in the Received: header. What pyOpenSSL's public API lacks comes
from lib/tls_session.py, the only user of its internal bindings.

SERVER
    server_tls(cfg, prefix="smtpd", level=None, warn=msg.warn, info=msg.info) -> ServerTLS
        Builds the server contexts. smtpd calls it in the master, before it forks workers,
        so that every worker of a configuration generation shares one SSL_CTX and hence one
        set of session-ticket keys: any worker resumes a session that another issued.
        level is the effective security level (default: server_security_level()).
        Raises TLSConfigError, whose text names the parameter,
        when TLS cannot be set up: no certificate, an unreadable or malformed file, an
        encrypted private key, a key that does not match its certificate, an unusable CA
        file, a bad protocol list or cipher grade. Postfix then logs a warning and offers
        plaintext service (or answers 4xx where TLS is enforced); that choice is the
        caller's. Warnings (expired certificate, ignored 512-bit DH file, unknown curve or
        option names, DSA where OpenSSL refuses it) go to warn().
    server_security_level(cfg, prefix) -> "none" | "may" | "encrypt": "encrypt" in
        wrapper mode, else from smtpd_tls_security_level, else the legacy
        smtpd_enforce_tls / smtpd_use_tls (prefix "postscreen": postscreen's own three,
        which have no wrapper mode). "verify"/"secure"/"fingerprint" become "encrypt"
        with a warning, as in Postfix; anything else (dane too) raises TLSConfigError.
    ccert_policy(cfg, level, prefix, warn) -> (ask, require): the seed's rule for
        smtpd_tls_ask_ccert and smtpd_tls_req_ccert: requiring a client certificate takes
        effect only with enforced TLS; otherwise it means asking, with Postfix's warning
        "Can't require client certs unless TLS is required".
    ServerTLS fields: opportunistic and mandatory (SSL.Context; the same object when the
        parameters make them identical), level, ask_ccert, require_ccert, loglevel,
        fingerprint_digest, received_header, cipher_lists, fast_shutdown, sni (SniMap or
        None: tls_server_sni_maps). Methods: context(mandatory),
        connection(sock, namaddr, mandatory=False) -> SSL.Connection in accept state,
        info(conn) -> TLSInfo, log_lines(info), received_lines(info).

CLIENT
    client_tls(cfg, prefix="smtp", warn=msg.warn, info=msg.info) -> ClientTLS, for smtp,
        lmtp and posttls-finger. Raises TLSConfigError as server_tls() does; a client
        certificate is presented only when one is configured.
    ClientTLS fields: opportunistic, mandatory, authenticated (the mandatory context at
        OpenSSL security level 1), loglevel, fingerprint_digest, cipher_lists (may,
        encrypt, authenticated: cipher_list(mandatory, authenticated) picks one),
        session_timeout, fast_shutdown. Methods: context(mandatory=False, authenticated=False);
        connection(sock, namaddr, mandatory=False, servername=None, session=None,
        authenticated=False) -> SSL.Connection in connect state (servername is the SNI hook:
        see sni_name(); authenticated for the fingerprint, verify and secure levels);
        info(conn, match=None) -> TLSInfo; log_lines(info, require_trust=False).
    The handshake never fails because a certificate is not trusted or does not match: the
    policy layer decides afterwards (may/encrypt go on with an untrusted certificate,
    verify/secure need TLSInfo.peer_verified).
    sni_name(setting, nexthop, hostname) -> str or None: smtp_tls_servername semantics
        (empty: no SNI; "hostname"; "nexthop"; else the name given).
    match_names(strategies, nexthop, hostname) -> list of reference names for the
        nexthop / dot-nexthop / hostname strategies of smtp_tls_secure_cert_match and
        smtp_tls_verify_cert_match (a leading "." means "any subdomain of").
    match_peername(cert, names, wildcard_multiple_labels=True) -> (matched, which): Postfix's
        name check: every dNSName of the subjectAltName, the CommonName only when there is
        no dNSName; IP address references against iPAddress names only; "*" is a whole
        leftmost label and covers one label, or several with
        tls_wildcard_matches_multiple_labels; case does not matter, a trailing dot on the
        reference name is ignored. which is the certificate name that matched, or None.

BOTH SIDES
    handshake(conn, timeout) runs the handshake within timeout seconds (the socket is
        non-blocking meanwhile and gets its own timeout mode back); TLSHandshakeError
        carries Postfix's "SSL_accept error from host[addr]: ..." / "SSL_connect error to
        ..." text ("-1", "lost connection", "Connection timed out") and .reasons, OpenSSL's
        error texts. handshake_loop(conn, timeout) is its loop alone (the socket already
        non-blocking; TimeoutError, or OpenSSL's exception as raised), for lib/smtpio.py;
        handshake_step(conn) is one turn of it for an event loop (postscreen): None when
        the handshake is done, "read" or "write" for what it waits for;
        ssl_error_text(exc) is the one-line form of an OpenSSL error that smtpio reports
        (the last reason; "unexpected EOF" for an EOF). shutdown(conn, timeout, fast=None)
        sends close_notify (fast=False also waits for the peer's; None: the
        tls_fast_shutdown_enable of the ServerTLS or ClientTLS that made conn); it never
        raises. Always call it before dropping a
        connection: OpenSSL marks the session of a connection freed without a TLS shutdown
        as not resumable. Note that pyOpenSSL on a socket with a timeout raises
        WantReadError instead of blocking: read with select(), as handshake() does.
    peer_info(conn, digest="sha256", match=None, wildcard_multiple_labels=True,
        warn=msg.warn) -> TLSInfo (see the dataclass below); ValueError for a connection
        that ServerTLS/ClientTLS did not make. Certificate text that Postfix refuses (a
        CommonName with control characters, NUL, or 256 bytes and more) becomes "" with
        Postfix's "tls_text_name: host[addr]: ..." warning.
    log_lines(info, loglevel, require_trust=False) -> list of Postfix 3.7's TLS log lines
        for that smtpd_tls_loglevel / smtp_tls_loglevel, in Postfix's order:
        1: "Anonymous|Untrusted|Trusted|Verified TLS connection established from|to
        host[addr]: TLSv1.3 with cipher ... key-exchange ... server-signature ...";
        2: also "host[addr]: Reusing old session", the subject=/issuer= lines and the
        peer-certificate line (server: "subject_CN=, issuer=, fingerprint=,
        pkey_fingerprint="; client: "subject_CN=, issuer_CN=, ..."), "matched peername".
        With require_trust, an untrusted peer adds Postfix's "certificate verification
        failed for ..." line at any level.
    check_certificates(cfg, prefix, warn=msg.warn) -> number of key pairs: loads every
        certificate and key that prefix's *_tls_cert_file/key_file, dcert/dkey,
        eccert/eckey or *_tls_chain_files name, as server_tls()/client_tls() would, and
        raises TLSConfigError (naming the parameter and the file) for an unreadable file,
        a malformed object, a key without its certificate or a key that does not match
        it; warns about an expired certificate or a chain out of order. For
        `postfix-py check`, `start` and `reload`, which refuse what it refuses.
    certificate_files(cfg, prefix) -> the files those parameters name.
    summary_line(info, usage="established") -> the level-1 line alone.
    received_lines(info, ask_ccert) -> the physical lines of smtpd's Received: header
        clause for smtpd_tls_received_header (each starts with a tab);
        received_clause(info, ask_ccert) -> the same joined with newlines.
    fingerprint(cert, digest) and pkey_fingerprint(cert, digest) -> "AB:CD:..." (Postfix's
        format, for relay_clientcerts and check_ccert_access); cert is a cryptography
        Certificate, a pyOpenSSL X509, or PEM/DER bytes; ValueError for an unknown digest.
    parse_protocols(text) -> tuple of protocol names that the list enables ("TLSv1.2",
        "TLSv1.3"); Postfix's syntax: ">=TLSv1.2", "<=TLSv1.3", "!SSLv3, !TLSv1",
        "TLSv1.2 TLSv1.3". ValueError for an unknown name.
    cipher_list(cfg, prefix, mandatory, ask_ccert) -> the OpenSSL cipher string (TLS 1.2
        and below) for the grade and exclusions, or the legacy *_tls_cipherlist as written.
    config_warnings(cfg) -> warnings for `postfix-py check` about TLS settings that are
        accepted but not honoured as Postfix would (smtpd_tls_session_cache_database).

CONFIGURATION PARAMETERS (server; the client reads the smtp_/lmtp_ counterparts)
    smtpd_tls_cert_file (empty), smtpd_tls_key_file ($smtpd_tls_cert_file): RSA certificate
        chain (server certificate first, then its CAs) and key; one file may hold both.
    smtpd_tls_dcert_file, smtpd_tls_dkey_file: DSA, loaded where OpenSSL still takes it.
    smtpd_tls_eccert_file, smtpd_tls_eckey_file: ECDSA. RSA and ECDSA load into the same
        SSL_CTX; OpenSSL presents the one that the client's signature algorithms allow.
    smtpd_tls_chain_files (empty): files of keys each followed by its chain; when set, the
        three pairs above are ignored, as in Postfix. As Postfix reads them, the files
        are one stream: "key.pem, fullchain.pem" is the same as their concatenation.
    smtpd_tls_CAfile (empty): trusted CAs, read now (before chroot); with
        smtpd_tls_ask_ccert its CAs are the acceptable-CA list sent to clients.
    smtpd_tls_CApath (empty): trusted CAs in a c_rehash directory, read by OpenSSL when
        needed; for a chrooted smtpd the path must exist inside queue_directory.
    tls_append_default_CA (no): also trust OpenSSL's default CAs.
    smtpd_tls_ask_ccert (no), smtpd_tls_req_ccert (no): see ccert_policy().
    smtpd_tls_ccert_verifydepth (5): as Postfix, OpenSSL's limit is set one higher and a
        certificate deeper than the limit is an error ("certificate chain too long").
    smtpd_tls_protocols (>=TLSv1), smtpd_tls_mandatory_protocols (>=TLSv1). Every listed
        protocol is really served: as Postfix, contexts run at OpenSSL security level 0
        (the bundled OpenSSL's default level refuses TLS 1.0 and 1.1), and at level 1
        (which has no TLS 1.0 or 1.1) only where the peer is authenticated: a server that
        requires client certificates, a client at the fingerprint, verify or secure level.
        An "@SECLEVEL=n" in the cipher list parameters overrides this.
    smtpd_tls_ciphers (medium), smtpd_tls_mandatory_ciphers (medium): grades high,
        medium, low, export, null, mapped through tls_high_cipherlist ...
        tls_null_cipherlist; smtpd_tls_exclude_ciphers, smtpd_tls_mandatory_exclude_ciphers
        are appended as "!name"; "aNULL" too when a client certificate is asked for.
    smtpd_tls_cipherlist (empty): when set, passed to OpenSSL as written, and it wins.
    Every list, the legacy one too, is given to OpenSSL with LEGACY_SUITES excluded
    (SEED, IDEA, RC4, 3DES, single DES, RC2): Postfix 3.7 on an OpenSSL 3 has none of
    them (its default provider dropped SEED, IDEA and RC4; 3DES and DES are gone from
    libssl), while the OpenSSL bundled with pyOpenSSL still offers SEED and IDEA in
    MEDIUM. Security level 0 (above) adds no suite of these grades: it admits short keys
    and SHA-1 signatures, as it does for Postfix. The client excludes "eNULL" at the
    encrypt level and "aNULL" at fingerprint, verify and secure, as smtp_tls_policy.c;
    at may it offers the anonymous suites of the grade, as Postfix.
    tls_preempt_cipherlist (no): the server's cipher order wins.
    smtpd_tls_eecdh_grade (auto): auto offers tls_eecdh_auto_curves (X25519 X448
        prime256v1 secp521r1 secp384r1), strong prime256v1, ultra secp384r1, none leaves
        OpenSSL's defaults.
    smtpd_tls_dh1024_param_file (empty): DH parameters for DHE; OpenSSL's built-in safe
        groups (RFC 7919) otherwise; a file that does not load is a warning, as in Postfix.
        smtpd_tls_dh512_param_file: ignored with a warning. The bundled OpenSSL follows RFC
        7919: a TLS 1.2 client that lists FFDHE groups gets no DHE suite from a server
        whose groups are EC only (Debian's OpenSSL 3.0 under Postfix 3.7 still chose DHE);
        such clients all do ECDHE, so only the cipher name differs.
    smtpd_tls_session_cache_timeout (3600s): lifetime of sessions and tickets; 0 turns
        resumption off (no tickets, no session cache). Sessions are resumed with tickets
        only (DESIGN.md), with the session id context "Postfix/TLS": the bindings have no
        external session cache callbacks (SSL_CTX_sess_set_new_cb and friends), so
        smtpd_tls_session_cache_database is not used, and a client that does not support
        tickets gets a full handshake every time (config_warnings() says so).
    smtpd_tls_always_issue_session_ids (yes): with resumption off, still put a session id
        in the ServerHello (with resumption on there always is one).
    tls_fast_shutdown_enable (yes): no makes shutdown() wait for the peer's close_notify.
    tls_server_sni_maps (empty): the client's SNI name, then its parent domains as
        ".example.com", ".com", to files of keys each followed by its chain (the
        smtpd_tls_chain_files format; "key.pem, chain.pem" read as one stream). See
        SniMap: every table entry is read and gets a context when server_tls() runs
        (before forking and chroot), so the table must be of a type that can list its
        entries (texthash, inline, hash/lmdb; Postfix's postmap -F is not needed), and a
        changed file takes effect on reload. No match: "TLS SNI name from host[addr] not
        matched, using default chain"; a name that is no host name: "TLS SNI from
        host[addr] is invalid: name", default chain. The summary line then reads
        "... established from host[addr] to name: ...". Unlike Postfix, the server
        acknowledges every SNI (pyOpenSSL's callback cannot answer "no ack").
    smtpd_tls_loglevel (0), smtpd_tls_fingerprint_digest (sha256),
    smtpd_tls_received_header (no), smtpd_tls_security_level, smtpd_use_tls,
    smtpd_enforce_tls, smtpd_tls_wrappermode.
    tls_ssl_options, tls_disable_workarounds: OpenSSL option names (unknown ones warned).
    smtp_tls_servername, smtp_tls_scert_verifydepth, tls_wildcard_matches_multiple_labels
        on the client side.
    WORDS: TLS 1.3 key exchange and signatures are named as Postfix 3.7 names them with
    OpenSSL 3: "key-exchange X25519", "ECDHE (prime256v1)", "ECDHE (secp384r1)",
    "server-signature ECDSA (prime256v1)", "RSA-PSS (2048 bits)"; the digest comes from
    the CertificateVerify actually sent (lib/tls_session.py), so a client that prefers
    rsa_pss_rsae_sha384 gets "server-digest SHA384". TLS 1.2 lines carry none of these.
    A resumed TLS 1.3 session logs the server-signature of the last certificate loaded
    and no digest, as Postfix does.
    Not implemented: tls_session_ticket_cipher (not declared: OpenSSL's own ticket keys and
    cipher are used, see SESSION TICKET KEYS), a server-side session-id cache (see
    smtpd_tls_session_cache_timeout), Postfix's "Issuing session ticket"
    line (Postfix's own ticket-key callback), the "SSL3 alert" lines of loglevel 2
    (pyOpenSSL cannot name alerts), and the numeric codes and source positions in "TLS
    library problem" texts. Loglevel 3 dumps each TLS protocol message (OpenSSL's message
    callback, lib/tls_session.py) rather than Postfix's raw BIO records; loglevel 4 adds the
    plaintext inside TLS for smtpd (lib/smtpio.py's trace hook).

SESSION TICKET KEYS (design note)
    Postfix's tlsmgr makes a new ticket key every smtpd_tls_session_cache_timeout; a key
    encrypts for one period and still decrypts for one more, and every smtpd process
    asks tlsmgr for the keys. pyOpenSSL and cryptography's bindings have no way to set or
    read a ticket key (no SSL_CTX_set_tlsext_ticket_key_evp_cb, no SSL_CTX_ctrl); each
    SSL_CTX makes its own random key when it is created, and decrypts only under it.
    So a key period is a set of contexts:
    * The master builds the contexts (server_tls, in smtpd's prepare()) before it forks
      the workers, so every worker of a generation holds the same key.
    * Every period (smtpd_tls_session_cache_timeout; master/master.py _arm_rekey) the
      master calls smtpd's rekey(): rotate_server_tls() builds new contexts (a new key)
      and keeps those of the period before as ServerTLS.previous, and the master starts a
      new generation of the service on the same listening sockets, as a reload does: old
      workers finish their client and exit, new ones fork with both periods' contexts.
    * The name of each context's key (the first 16 bytes of every ticket it issues) is
      learnt once, by a handshake in memory with a throwaway client
      (context_ticket_key_name).
    * Before a handshake, smtpd peeks at the client's ClientHello without reading it
      (MSG_PEEK, within smtpd_starttls_timeout; peek_ticket_key_name): a ticket, in the
      TLS 1.2 SessionTicket extension or as the first TLS 1.3 pre_shared_key identity,
      whose key name is the previous period's gets a connection on the previous
      period's context, which decrypts it; everything else gets the current context.
      Contexts older than that are dropped: their tickets get a full handshake.
    Tickets issued under the previous key are renewed under it, and a session lives
    smtpd_tls_session_cache_timeout from its full handshake (OpenSSL's session timeout),
    so nothing resumes beyond Postfix's two periods. SNI contexts belong to their period
    (OpenSSL decrypts with the context the connection started on). Cost: one context set
    more per worker, and a rebuild of the contexts (files re-read) in the master once a
    period. tests/integration/test_ticket_rotation.py measures resumption across a
    rotation with several workers.

SEE ALSO
    lib/tls_session.py (sessions, signature schemes, verification internals), tools/postfix_tls.py
    (postfix-py tls), DESIGN.md "TLS resumption".
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import select
import socket
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh, dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto

from . import mastercf, msg, tables, tls_session


class TLSConfigError(Exception):
    """TLS cannot be set up as configured; the text names the parameter."""


class TLSHandshakeError(Exception):
    """A handshake failed; str() is Postfix's line, .reasons OpenSSL's error texts."""

    def __init__(self, text: str, reasons: list[str] | None = None):
        super().__init__(text)
        self.reasons = list(reasons or [])


# --- X509_V_* codes that Postfix words specially ------------------------------------------
X509_V_OK = 0
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD = 13
X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD = 14
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_CERT_CHAIN_TOO_LONG = 22
X509_V_ERR_INVALID_PURPOSE = 26
X509_V_ERR_CERT_UNTRUSTED = 27
X509_V_ERR_HOSTNAME_MISMATCH = 62
X509_V_ERR_IP_ADDRESS_MISMATCH = 64

SERVER_LEVELS = ("none", "may", "encrypt")
DIGESTS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
SESSION_ID_CONTEXT = b"Postfix/TLS"
GRADES = ("high", "medium", "low", "export", "null")
_EECDH_GRADES = {"strong": ["prime256v1"], "ultra": ["secp384r1"]}

# --- protocols ----------------------------------------------------------------------------
_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
_VERSION = {"TLSv1": SSL.TLS1_VERSION, "TLSv1.1": SSL.TLS1_1_VERSION,
            "TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
_NO_PROTOCOL = {"TLSv1": SSL.OP_NO_TLSv1, "TLSv1.1": SSL.OP_NO_TLSv1_1,
                "TLSv1.2": SSL.OP_NO_TLSv1_2, "TLSv1.3": SSL.OP_NO_TLSv1_3}
_LIST_SEP = re.compile(r"[\s,:]+")
_LIST_SEP_FILES = re.compile(r"[\s,]+")
# Suites that Postfix on OpenSSL 3 never negotiates, because that library no longer has
# them; pyOpenSSL's bundled OpenSSL still has SEED and IDEA (appended to every list).
LEGACY_SUITES = "!SEED:!IDEA:!RC4:!3DES:!DES:!RC2"


def parse_protocols(text: str) -> tuple[str, ...]:
    """The protocols a Postfix protocol list enables, oldest first; ValueError if invalid."""
    include: set[str] = set()
    exclude: set[str] = set()
    floor, ceiling = 0, len(_PROTOCOLS) - 1
    for token in _LIST_SEP.split(text.strip()):
        if not token:
            continue
        if token.startswith((">=", "<=")):
            name = token[2:]
            if name not in _PROTOCOLS:
                raise ValueError(f"unknown TLS protocol: \"{name}\"")
            if token[0] == ">":
                floor = _PROTOCOLS.index(name)
            else:
                ceiling = _PROTOCOLS.index(name)
        elif token.startswith("!"):
            if token[1:] not in _PROTOCOLS:
                raise ValueError(f"unknown TLS protocol: \"{token[1:]}\"")
            exclude.add(token[1:])
        else:
            if token not in _PROTOCOLS:
                raise ValueError(f"unknown TLS protocol: \"{token}\"")
            include.add(token)
    # As tls_proto_mask_lims(): an include list excludes every protocol it does not name.
    return tuple(p for i, p in enumerate(_PROTOCOLS)
                 if floor <= i <= ceiling and p not in exclude and (not include or p in include))


def _apply_protocols(ctx: SSL.Context, param: str, text: str) -> None:
    """Set the context's protocol range from a Postfix protocol list."""
    try:
        enabled = [p for p in parse_protocols(text) if p in _VERSION]
    except ValueError as exc:
        raise TLSConfigError(f"Invalid TLS protocol list \"{text}\" in {param}: {exc}; "
                             f"disabling TLS support") from None
    if not enabled:
        raise TLSConfigError(f"{param} = {text}: no TLS protocol version is left enabled; "
                             f"disabling TLS support")
    ctx.set_min_proto_version(_VERSION[enabled[0]])
    ctx.set_max_proto_version(_VERSION[enabled[-1]])
    # A hole in the range ("TLSv1 TLSv1.2") is closed with OpenSSL's per-protocol options.
    holes = 0
    for name in _VERSION:
        if _VERSION[enabled[0]] < _VERSION[name] < _VERSION[enabled[-1]] and name not in enabled:
            holes |= _NO_PROTOCOL[name]
    if holes:
        ctx.set_options(holes)


# --- ciphers ------------------------------------------------------------------------------

def cipher_list(cfg, prefix: str, mandatory: bool, ask_ccert: bool = False,
                also_exclude: str = "") -> str:
    """The OpenSSL cipher string for grade and exclusions (or the legacy cipherlist);
    also_exclude: the level's own exclusion ("eNULL", "aNULL": smtp_tls_policy.c)."""
    legacy = cfg.get(f"{prefix}_tls_cipherlist").strip()
    if legacy:
        return legacy
    grade_param = f"{prefix}_tls_mandatory_ciphers" if mandatory else f"{prefix}_tls_ciphers"
    grade = cfg.get(grade_param).strip().lower()
    if grade not in GRADES:
        raise TLSConfigError(f"invalid {grade_param} cipher grade: \"{grade}\"")
    text = cfg.get(f"tls_{grade}_cipherlist").strip()
    if not text:
        raise TLSConfigError(f"empty \"{grade}\" cipherlist: tls_{grade}_cipherlist")
    exclusions = [(f"{prefix}_tls_exclude_ciphers", cfg.get(f"{prefix}_tls_exclude_ciphers"))]
    if mandatory:
        name = f"{prefix}_tls_mandatory_exclude_ciphers"
        exclusions.append((name, cfg.get(name)))
    if ask_ccert:
        # Anonymous ciphers cannot carry a client certificate (Postfix smtpd.c).
        exclusions.append(("", "aNULL"))
    if also_exclude:
        exclusions.append(("", also_exclude))
    for name, value in exclusions:
        for token in _LIST_SEP.split(value.strip()):
            if not token:
                continue
            if token[0] in "!+-@":
                raise TLSConfigError(f"invalid unary '!+-@' in {name} cipher exclusion: "
                                     f"\"{token}\"")
            text += ":!" + token
    return text


# --- what the configuration cannot have ---------------------------------------------------

def config_warnings(cfg) -> list[str]:
    """Settings that postfix-py accepts but cannot honour as Postfix does, for check."""
    warnings = []
    if cfg.get("smtpd_tls_session_cache_database").strip():
        # The bindings offer no SSL_CTX_sess_set_new_cb/get_cb/remove_cb (tls_session.py).
        warnings.append("smtpd_tls_session_cache_database is set but postfix-py resumes TLS "
                        "server sessions with session tickets only; clients without ticket "
                        "support are not resumed")
    return warnings


# --- certificates and keys ----------------------------------------------------------------

_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


@dataclass
class _KeyPair:
    """One private key and its certificate chain, as validated before loading."""
    key: object
    chain: list
    cert_param: str
    key_param: str
    cert_path: str
    key_path: str


def _read(path: str, param: str) -> bytes:
    """The bytes of a file that a parameter names; TLSConfigError when unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"{param}: cannot read file {path}: "
                             f"{exc.strerror or exc}") from None


def _pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, block) for every PEM object in data, in order."""
    return [(m.group(1).decode("ascii"), m.group(0)) for m in _PEM_RE.finditer(data)]


def _load_private_key(label: str, block: bytes, path: str, param: str):
    """An unencrypted private key from one PEM block; TLSConfigError otherwise."""
    if label == "ENCRYPTED PRIVATE KEY" or b"ENCRYPTED" in block.split(b"\n\n", 1)[0]:
        raise TLSConfigError(f"{param}: the private key in {path} is encrypted; Postfix "
                             f"needs a private key without a passphrase")
    try:
        return serialization.load_pem_private_key(block, password=None)
    except TypeError:
        raise TLSConfigError(f"{param}: the private key in {path} is encrypted; Postfix "
                             f"needs a private key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TLSConfigError(f"{param}: cannot load the private key in {path}: "
                             f"{exc}") from None


def _load_certificates(blocks, path: str, param: str) -> list:
    """The certificates among PEM blocks, in order."""
    certs = []
    for label, block in blocks:
        if label not in ("CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"):
            continue
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            raise TLSConfigError(f"{param}: cannot load a certificate in {path}: "
                                 f"{exc}") from None
    return certs


def _spki(public_key) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_pair(pair: _KeyPair, warn) -> None:
    """The key must belong to the first certificate; an expired one is only worth a warning."""
    leaf = pair.chain[0]
    if _spki(leaf.public_key()) != _spki(pair.key.public_key()):
        raise TLSConfigError(f"{pair.key_param}: the private key in {pair.key_path} does not "
                             f"match the certificate in {pair.cert_path} ({pair.cert_param})")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        warn(f"{pair.cert_param}: the certificate in {pair.cert_path} expired on "
             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    elif leaf.not_valid_before_utc > now:
        warn(f"{pair.cert_param}: the certificate in {pair.cert_path} is not valid before "
             f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def _legacy_pair(cfg, prefix: str, cert_suffix: str, key_suffix: str) -> _KeyPair | None:
    """The key pair of one cert_file/key_file parameter pair, or None if unset."""
    cert_param, key_param = f"{prefix}_{cert_suffix}", f"{prefix}_{key_suffix}"
    cert_path = cfg.get(cert_param).strip()
    if not cert_path or cert_path == "none":
        return None
    key_path = cfg.get(key_param).strip() or cert_path
    chain = _load_certificates(_pem_blocks(_read(cert_path, cert_param)), cert_path, cert_param)
    if not chain:
        raise TLSConfigError(f"{cert_param}: no certificate in file {cert_path}")
    blocks = [b for b in _pem_blocks(_read(key_path, key_param)) if b[0].endswith("PRIVATE KEY")]
    if not blocks:
        raise TLSConfigError(f"{key_param}: no private key in file {key_path}")
    key = _load_private_key(blocks[0][0], blocks[0][1], key_path, key_param)
    return _KeyPair(key, chain, cert_param, key_param, cert_path, key_path)


def _chain_file_pairs(cfg, prefix: str) -> list[_KeyPair]:
    """Keys each followed by their chain, across the files of *_tls_chain_files.

    As Postfix's load_chain_files(), the files are one stream, as if concatenated: a key
    may end one file and its certificates fill the next (key.pem, fullchain.pem).
    """
    return _chain_pairs(f"{prefix}_tls_chain_files", cfg[f"{prefix}_tls_chain_files"])


def _chain_pairs(param: str, paths) -> list[_KeyPair]:
    """Keys each followed by their chain, in files read as one stream; param names them."""
    pairs: list[_KeyPair] = []
    for path in paths:
        blocks = _pem_blocks(_read(path, param))
        if not blocks:
            raise TLSConfigError(f"{param}: no PEM data in file {path}")
        for label, block in blocks:
            if label.endswith("PRIVATE KEY"):
                if pairs and not pairs[-1].chain:
                    raise TLSConfigError(f"{param}: private key in {pairs[-1].key_path} is "
                                         f"not followed by its certificate")
                key = _load_private_key(label, block, path, param)
                pairs.append(_KeyPair(key, [], param, param, "", path))
            elif label in ("CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"):
                if not pairs:
                    raise TLSConfigError(f"{param}: certificate in {path} is not preceded "
                                         f"by its private key")
                if not pairs[-1].chain:
                    pairs[-1].cert_path = path
                pairs[-1].chain += _load_certificates([(label, block)], path, param)
    if pairs and not pairs[-1].chain:
        raise TLSConfigError(f"{param}: private key in {pairs[-1].key_path} is not "
                             f"followed by its certificate")
    return pairs


def _key_pairs(cfg, prefix: str, warn) -> list[_KeyPair]:
    """Every configured key with its chain, validated, in Postfix's loading order."""
    if cfg[f"{prefix}_tls_chain_files"]:
        pairs = _chain_file_pairs(cfg, prefix)
    else:
        pairs = [p for p in (_legacy_pair(cfg, prefix, "tls_cert_file", "tls_key_file"),
                             _legacy_pair(cfg, prefix, "tls_dcert_file", "tls_dkey_file"),
                             _legacy_pair(cfg, prefix, "tls_eccert_file", "tls_eckey_file"))
                 if p is not None]
    for pair in pairs:
        _check_pair(pair, warn)
    return pairs


def _chain_order_warnings(pair: _KeyPair, warn) -> None:
    """A chain whose certificates do not each issue the one before: worth a warning.

    OpenSSL sends the chain as loaded and Postfix does not check its order, so an odd
    chain (a cross-signed extra, an unrelated CA) is not refused; clients that cannot
    build a path from it will not trust the server, and the administrator should know.
    """
    for n, (cert, issuer) in enumerate(zip(pair.chain, pair.chain[1:]), start=1):
        if cert.issuer != issuer.subject:
            warn(f"{pair.cert_param}: certificate {n + 1} in {pair.cert_path} is not the "
                 f"issuer of certificate {n} (issuer {cert.issuer.rfc4514_string()}, "
                 f"next subject {issuer.subject.rfc4514_string()})")
            return


def check_certificates(cfg, prefix: str, warn=msg.warn) -> int:
    """Load and validate every key and certificate of one side; the count of pairs.

    For `postfix-py check`, `start` and `reload`, with prefix smtpd, smtp or lmtp: every
    file that *_tls_cert_file / key_file, dcert / dkey, eccert / eckey or *_tls_chain_files
    names is read and parsed, each key must match the first certificate of its chain, and
    OpenSSL must accept the pair. TLSConfigError (naming the parameter and the file) for
    an unreadable file, a malformed object, a key without certificate or a mismatch;
    warnings for an expired chain or one out of order.
    """
    pairs = _key_pairs(cfg, prefix, warn)
    if pairs:
        method = SSL.TLS_SERVER_METHOD if prefix == "smtpd" else SSL.TLS_CLIENT_METHOD
        _load_pairs(SSL.Context(method), pairs, warn, set())
    for pair in pairs:
        _chain_order_warnings(pair, warn)
    return len(pairs)


def certificate_files(cfg, prefix: str) -> list[str]:
    """The certificate and key files that one side's parameters name (for change checks)."""
    if cfg[f"{prefix}_tls_chain_files"]:
        return list(cfg[f"{prefix}_tls_chain_files"])
    files = []
    for cert_suffix, key_suffix in (("tls_cert_file", "tls_key_file"),
                                    ("tls_dcert_file", "tls_dkey_file"),
                                    ("tls_eccert_file", "tls_eckey_file")):
        cert = cfg.get(f"{prefix}_{cert_suffix}").strip()
        if cert and cert != "none":
            files += [cert, cfg.get(f"{prefix}_{key_suffix}").strip() or cert]
    return files


def _memfd_path(data: bytes, name: str):
    """An anonymous in-memory file and a path to it, for OpenSSL's file-only loaders."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
    except OSError:
        os.close(fd)
        raise
    return fd, f"/proc/self/fd/{fd}"


def _ssl_reasons(exc: Exception, last: bool = False) -> str:
    """OpenSSL's reason texts from a pyOpenSSL error, joined with "; "; with last, only
    the last one (a SysCallError: its errno text, "unexpected EOF" for -1), for one line."""
    args = getattr(exc, "args", ())
    if last and isinstance(exc, SSL.SysCallError):
        if args and args[0] == -1:
            return "unexpected EOF"
        return args[1] if len(args) > 1 else str(exc)
    if args and isinstance(args[0], list) and (args[0] or not last):
        if last:
            return (list(args[0][-1]) + ["", "", ""])[2] or str(exc)   # (lib, func, reason)
        return "; ".join(str(r[2]) for r in args[0] if len(r) > 2 and r[2]) or str(exc)
    return str(exc) or type(exc).__name__ if last else str(exc)


def ssl_error_text(exc: Exception) -> str:
    """One line for a pyOpenSSL error: the last OpenSSL reason (lib/smtpio.py's reasons)."""
    return _ssl_reasons(exc, last=True)


def _load_pairs(ctx: SSL.Context, pairs: list[_KeyPair], warn, warned: set) -> int:
    """Load each pair into ctx (each key type fills its own slot); the count loaded."""
    loaded = 0
    for pair in pairs:
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pair.chain)
        fd, path = _memfd_path(pem, "postfix-py-chain")
        try:
            ctx.use_certificate_chain_file(path)
            ctx.use_privatekey(pair.key)
            ctx.check_privatekey()
        except SSL.Error as exc:
            if isinstance(pair.key, dsa.DSAPrivateKey):
                # DSA is gone from TLS 1.3 and from some OpenSSL builds: skip, don't fail.
                if (pair.cert_param, pair.cert_path) not in warned:
                    warned.add((pair.cert_param, pair.cert_path))
                    warn(f"{pair.cert_param}: cannot use the DSA certificate in "
                         f"{pair.cert_path}: {_ssl_reasons(exc)}; DSA skipped")
                continue
            raise TLSConfigError(f"{pair.cert_param}: cannot load the certificate and key "
                                 f"in {pair.cert_path}, {pair.key_path}: "
                                 f"{_ssl_reasons(exc)}") from None
        finally:
            os.close(fd)
        loaded += 1
    return loaded


def _load_ca(ctx: SSL.Context, cfg, prefix: str, client_ca_list: bool) -> None:
    """Trusted CAs from CAfile/CApath, and the CA list sent to clients."""
    cafile = cfg.get(f"{prefix}_tls_CAfile").strip()
    capath = cfg.get(f"{prefix}_tls_CApath").strip()
    if cafile:
        param = f"{prefix}_tls_CAfile"
        data = _read(cafile, param)
        if not _load_certificates(_pem_blocks(data), cafile, param):
            raise TLSConfigError(f"{param}: no CA certificate in file {cafile}")
    try:
        if cafile or capath:
            # CApath is read by OpenSSL only when needed, inside the chroot jail.
            ctx.load_verify_locations(cafile.encode() if cafile else None,
                                      capath.encode() if capath else None)
        if cfg["tls_append_default_CA"]:
            ctx.set_default_verify_paths()
        if cafile and client_ca_list:
            ctx.load_client_ca(cafile.encode())
    except SSL.Error as exc:
        raise TLSConfigError(f"cannot load Certification Authority data, "
                             f"{prefix}_tls_CAfile={cafile}, {prefix}_tls_CApath={capath}: "
                             f"{_ssl_reasons(exc)}; disabling TLS support") from None


def _options(cfg, server: bool, warn) -> int:
    """OpenSSL options: bug workarounds (minus tls_disable_workarounds), tls_ssl_options."""
    options = SSL.OP_ALL | SSL.OP_NO_COMPRESSION | SSL.OP_SINGLE_DH_USE | SSL.OP_SINGLE_ECDH_USE
    for name in cfg["tls_disable_workarounds"]:
        bit = _option_bit(name)
        if bit is None:
            warn(f"tls_disable_workarounds: unknown value \"{name}\" ignored")
        else:
            options &= ~bit
    for name in cfg["tls_ssl_options"]:
        bit = _option_bit(name)
        if bit is None:
            warn(f"tls_ssl_options: unknown value \"{name}\" ignored")
        else:
            options |= bit
    if server and cfg["tls_preempt_cipherlist"]:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    return options


def _option_bit(name: str) -> int | None:
    """The OpenSSL option bit for a Postfix option name or hex value, or None."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", name):
        return int(name, 16)
    aliases = {"CVE-2010-4180": "NETSCAPE_REUSE_CIPHER_CHANGE_BUG",
               "CVE-2005-2969": "MSIE_SSLV2_RSA_PADDING"}
    value = getattr(SSL, "OP_" + aliases.get(name.upper(), name.upper()), None)
    return value if isinstance(value, int) else None


def _groups(cfg, grade_param: str | None, warn) -> list[str] | None:
    """The key-exchange groups to offer, or None for OpenSSL's defaults."""
    grade = cfg.get(grade_param).strip().lower() if grade_param else "auto"
    if grade == "none":
        return None
    if grade in _EECDH_GRADES:
        return _EECDH_GRADES[grade]
    if grade != "auto":
        warn(f"Invalid TLS eecdh grade \"{grade}\" in {grade_param}: using OpenSSL's defaults")
        return None
    wanted = cfg["tls_eecdh_auto_curves"]
    usable = []
    for name in wanted:
        probe = SSL.Context(SSL.TLS_METHOD)
        try:
            tls_session.set_groups(probe, [name])
            usable.append(name)
        except ValueError:
            warn(f"tls_eecdh_auto_curves: ignoring unknown ECDHE curve \"{name}\"")
    if not usable:
        warn("tls_eecdh_auto_curves: no usable curve; using OpenSSL's defaults")
        return None
    return usable


def _dh_file(cfg, prefix: str, warn) -> str | None:
    """The DH parameter file to load, or None (a bad file is only a warning)."""
    param = f"{prefix}_tls_dh1024_param_file"
    path = cfg.get(param).strip()
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            loaded = serialization.load_pem_parameters(f.read())
        if not isinstance(loaded, dh.DHParameters):
            raise ValueError("not DH parameters")
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        warn(f"cannot load DH parameters from file {path} ({param}): "
             f"{getattr(exc, 'strerror', None) or exc} -- using built-in groups")
        return None
    return path


def _digest_name(cfg, param: str) -> str:
    """The fingerprint digest a parameter names; TLSConfigError if unsupported."""
    name = cfg.get(param).strip().lower()
    if name not in DIGESTS:
        raise TLSConfigError(f"{param}: unsupported digest \"{name}\"; use one of "
                             f"{', '.join(DIGESTS)}")
    return name


# --- per-connection state -----------------------------------------------------------------

class ConnState:
    """What Postfix keeps in its TLScontext: the connection's app data in pyOpenSSL."""

    __slots__ = ("role", "namaddr", "loglevel", "max_depth", "error", "error_depth",
                 "error_issuer", "info", "user", "fast_shutdown", "peer_sni")

    def __init__(self, role: str, namaddr: str, loglevel: int, max_depth: int, info,
                 fast_shutdown: bool = True):
        self.role, self.namaddr, self.loglevel = role, namaddr, loglevel
        self.fast_shutdown = fast_shutdown      # tls_fast_shutdown_enable
        self.max_depth = max_depth
        self.error = X509_V_OK
        self.error_depth = -1
        self.error_issuer = ""
        self.info = info
        self.user = None            # free for the caller
        self.peer_sni = None        # the client's SNI name, with tls_server_sni_maps


def _verify_observer(conn, ok: bool, error: int, depth: int, subject: str, issuer: str):
    """Collect the lowest-depth verification error as Postfix's callback does."""
    state = conn.get_app_data()
    if not isinstance(state, ConnState):
        return None
    imposed = None
    if depth > state.max_depth:
        # Postfix: OpenSSL's own depth limit is one higher, so that a too-long chain is
        # reported as such and not as an incomplete one.
        ok, error, imposed = False, X509_V_ERR_CERT_CHAIN_TOO_LONG, X509_V_ERR_CERT_CHAIN_TOO_LONG
    if state.loglevel >= 2:
        state.info(f"{state.namaddr}: depth={depth} verify={int(ok)} "
                   f"subject={_printable(subject)}")
    if not ok and (state.error_depth < 0 or depth < state.error_depth):
        state.error, state.error_depth, state.error_issuer = error, depth, issuer
    if depth == 0 and imposed is None and state.error != X509_V_OK:
        # As Postfix, the lowest-depth error becomes OpenSSL's verdict, which the
        # session keeps for resumed handshakes.
        imposed = state.error
    return imposed


def _info_callback(conn, where: int, ret: int) -> None:
    """Loglevel 2: OpenSSL's handshake states, as Postfix's tls_info_callback."""
    try:
        state = conn.get_app_data()
        if not isinstance(state, ConnState) or state.loglevel < 2:
            return
        w = where & ~SSL.SSL_ST_MASK
        side = ("SSL_connect" if w & SSL.SSL_ST_CONNECT else
                "SSL_accept" if w & SSL.SSL_ST_ACCEPT else "unknown")
        text = conn.get_state_string().decode("ascii", "replace")
        if where & SSL.SSL_CB_LOOP:
            state.info(f"{side}:{text}")
        elif where & SSL.SSL_CB_EXIT and ret == 0:
            state.info(f"{side}:failed in {text}")
    except Exception:       # noqa: BLE001 - a logging callback must not break the handshake
        pass


def _printable(text: str) -> str:
    """Text with non-printable characters replaced, as Postfix's printable()."""
    return msg.printable(text, None, utf8=False)


# --- contexts -----------------------------------------------------------------------------

def _base_context(method, cfg, prefix: str, protocols_param: str, ciphers: str,
                  options: int, groups, loglevel: int, server: bool,
                  capture: bool = True, security_level: int = 0) -> SSL.Context:
    """A context with protocols, ciphers, groups and callbacks, no keys yet."""
    ctx = SSL.Context(method)
    ctx.set_options(options)
    _apply_protocols(ctx, protocols_param, cfg.get(protocols_param))
    try:
        # OpenSSL's security level, as Postfix sets it (tls_server.c, tls_client.c): 0 for
        # opportunistic and encrypted TLS, so that the protocols the *_tls_protocols list
        # enables are really offered (at level 1 and up OpenSSL 3 and later refuse TLS 1.0
        # and 1.1); 1 where the peer is authenticated. The bindings lack
        # SSL_CTX_set_security_level; the cipher string's "@SECLEVEL=" sets the same
        # value (at the end: OpenSSL takes "DEFAULT" only first). As in Postfix, an
        # "@SECLEVEL=" in the configured cipher list replaces level 0, not level 1.
        # LEGACY_SUITES go before "@SECLEVEL": a "!" removes a suite for good.
        text = f"{ciphers}:{LEGACY_SUITES}"
        if security_level > 0 or "@SECLEVEL=" not in ciphers.upper():
            text = f"{text}:@SECLEVEL={security_level}"
        ctx.set_cipher_list(text.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        param = (f"{prefix}_tls_cipherlist" if cfg.get(f"{prefix}_tls_cipherlist").strip()
                 else f"{prefix}_tls_ciphers")
        raise TLSConfigError(f"invalid {param} cipher list: \"{ciphers}\"") from None
    if groups:
        tls_session.set_groups(ctx, groups)
    if capture or loglevel >= 3:
        tls_session.capture_signatures(ctx)
    if loglevel >= 2:
        ctx.set_info_callback(_info_callback)
    return ctx


def server_security_level(cfg, prefix: str = "smtpd", warn=msg.warn) -> str:
    """The server's TLS level: none, may or encrypt (Postfix's smtpd rules).

    The one computation of it: smtpd's prepare() calls it once per generation and hands the
    value to server_tls() and to every session. Wrapper mode is TLS from the first byte:
    encrypt, whatever the level says (Postfix looks the level up only without it)."""
    if prefix != "postscreen" and cfg[f"{prefix}_tls_wrappermode"]:
        return "encrypt"
    level = cfg.get(f"{prefix}_tls_security_level").strip().lower()
    if level:
        if level in SERVER_LEVELS:
            return level
        if level in ("verify", "secure", "fingerprint"):
            warn(f"{prefix}_tls_security_level: unsupported TLS level \"{level}\", "
                 f"using \"encrypt\"")
            return "encrypt"
        # dane and dane-only too: Postfix's smtpd refuses them (msg_fatal)
        raise TLSConfigError(f"Invalid TLS level \"{level}\" in {prefix}_tls_security_level")
    if cfg[f"{prefix}_enforce_tls"]:
        return "encrypt"
    return "may" if cfg[f"{prefix}_use_tls"] else "none"


def ccert_policy(cfg, level: str, prefix: str = "smtpd", warn=msg.warn) -> tuple[bool, bool]:
    """(ask, require) for client certificates: require only with enforced TLS."""
    ask = cfg[f"{prefix}_tls_ask_ccert"]
    if cfg[f"{prefix}_tls_req_ccert"]:
        if level != "encrypt":
            warn("Can't require client certs unless TLS is required")
            return True, False
        return True, True
    return ask, False


# --- server name indication ---------------------------------------------------------------

class SniMap:
    """tls_server_sni_maps, resolved before forking: name -> a context of its own chain.

    Postfix looks the client's SNI name up, then its parent domains with a leading dot
    (mail.example.com, .example.com, .com); no match keeps the default chain. The table
    values name files of keys each followed by its chain (smtpd_tls_chain_files format,
    several files read as one stream); they are read when the contexts are built, before
    the chroot, so every table type that can list its entries works (texthash, inline,
    hash/lmdb built by postfix-py's postmap: Postfix's postmap -F is not needed)."""

    def __init__(self, contexts: dict, warn=msg.warn, info=msg.info):
        self.contexts = contexts    # folded name or .parent -> SSL.Context
        self.warn = warn
        self.info = info

    def find(self, name: str) -> SSL.Context | None:
        """The context for name or its nearest listed parent domain, or None."""
        key = name.lower()
        while True:
            ctx = self.contexts.get(key)
            if ctx is not None:
                return ctx
            dot = key.find(".", 1)
            if dot < 0:
                return None
            key = key[dot:]

    def callback(self, conn: SSL.Connection) -> None:
        """OpenSSL's servername callback: switch conn to the chain of the name."""
        state = conn.get_app_data()
        raw = conn.get_servername()
        if not isinstance(state, ConnState) or not raw:
            return
        sni = raw.decode("ascii", "replace")
        if not mastercf.valid_hostname(sni):
            self.warn(f"TLS SNI from {state.namaddr} is invalid: {_printable(sni)}")
            return
        if state.peer_sni is not None:
            # A TLS 1.3 HelloRetryRequest runs this twice; the chain is already chosen.
            if sni != state.peer_sni:
                self.warn(f"TLS SNI changed from {state.namaddr} initially "
                          f"{state.peer_sni}, {sni} after hello retry")
            return
        state.peer_sni = sni
        ctx = self.find(sni)
        if ctx is None:
            self.info(f"TLS SNI {sni} from {state.namaddr} not matched, using default chain")
            return
        conn.set_context(ctx)


def _sni_pairs(cfg, param: str = "tls_server_sni_maps") -> dict[str, list[_KeyPair]]:
    """Every name of the SNI tables with the key pairs of its files (first table wins)."""
    refs = cfg[param]
    entries: dict[str, list[_KeyPair]] = {}
    by_files: dict[tuple, list[_KeyPair]] = {}
    for ref in refs:
        try:
            table = tables.open_table(ref, cfg)
            items = table.items()
        except tables.TableError as exc:
            raise TLSConfigError(f"{param}: {exc}") from None
        for key, value in items:
            key = key.strip().lower()
            if not key or key in entries:
                continue
            files = tuple(f for f in _LIST_SEP_FILES.split(value.strip()) if f)
            if not files:
                raise TLSConfigError(f"{param}: {ref}: no file named for \"{key}\"")
            if files not in by_files:
                by_files[files] = _chain_pairs(param, files)
                if not by_files[files]:
                    raise TLSConfigError(f"{param}: no key and certificate in "
                                         f"{', '.join(files)}")
            entries[key] = by_files[files]
    return entries


@dataclass
class ServerTLS:
    """The server contexts of one configuration generation, built before forking."""

    opportunistic: SSL.Context
    mandatory: SSL.Context
    level: str
    ask_ccert: bool
    require_ccert: bool
    loglevel: int
    fingerprint_digest: str
    received_header: bool
    cipher_lists: tuple[str, str]
    verify_depth: int
    info_fn: object = field(default=msg.info, repr=False)
    fast_shutdown: bool = True
    sni: SniMap | None = None       # tls_server_sni_maps
    # Session ticket keys (SESSION TICKET KEYS above): the key name of each context's
    # OpenSSL ticket key, and the contexts of the previous key period, still good for
    # decryption (their own previous dropped).
    ticket_names: tuple = (None, None)
    previous: "ServerTLS | None" = field(default=None, repr=False)

    def context(self, mandatory: bool = False) -> SSL.Context:
        """The context for opportunistic (may) or mandatory (encrypt) TLS."""
        return self.mandatory if mandatory else self.opportunistic

    def connection(self, sock, namaddr: str, mandatory: bool = False,
                   peek_timeout: float = 0.0) -> SSL.Connection:
        """A server-side connection on sock, ready for handshake(); logs level-2 setup.

        With contexts of a previous key period and peek_timeout > 0, the client's
        ClientHello is peeked at (not read) first: a ticket under the previous period's
        key gets the previous context, which decrypts it."""
        if self.loglevel >= 2:
            self.info_fn(f"setting up TLS connection from {namaddr}")
            self.info_fn(f"{namaddr}: TLS cipher list \"{self.cipher_lists[int(mandatory)]}\"")
        ctx = self.context(mandatory)
        old = self.previous
        if old is not None and peek_timeout > 0 and old.ticket_names[mandatory]:
            name = peek_ticket_key_name(sock, peek_timeout)
            if name is not None and name == old.ticket_names[mandatory] \
                    and name != self.ticket_names[mandatory]:
                ctx = old.context(mandatory)
        conn = SSL.Connection(ctx, sock)
        conn.set_app_data(ConnState("server", namaddr, self.loglevel, self.verify_depth,
                                    self.info_fn, self.fast_shutdown))
        conn.set_accept_state()
        return conn

    def info(self, conn: SSL.Connection, warn=msg.warn) -> "TLSInfo":
        """The facts of conn's finished handshake."""
        return peer_info(conn, self.fingerprint_digest, warn=warn)

    def log_lines(self, info: "TLSInfo") -> list[str]:
        """Postfix's lines for this handshake at smtpd_tls_loglevel."""
        return log_lines(info, self.loglevel, require_trust=self.require_ccert)

    def received_lines(self, info: "TLSInfo") -> list[str]:
        """The Received: header clause for smtpd_tls_received_header."""
        return received_lines(info, self.ask_ccert)


def server_tls(cfg, prefix: str = "smtpd", level: str | None = None, warn=msg.warn,
               info=msg.info) -> ServerTLS:
    """Build the server contexts from parameters; TLSConfigError when TLS is unusable."""
    loglevel = cfg[f"{prefix}_tls_loglevel"]
    if loglevel >= 2:
        info("initializing the server-side TLS engine")
    if level is None:
        level = server_security_level(cfg, prefix, warn)
    ask, require = ccert_policy(cfg, level, prefix, warn)
    digest = _digest_name(cfg, f"{prefix}_tls_fingerprint_digest")
    pairs = _key_pairs(cfg, prefix, warn)
    if not pairs:
        raise TLSConfigError(f"No server certs available. TLS won't be enabled "
                             f"(set {prefix}_tls_cert_file, {prefix}_tls_eccert_file or "
                             f"{prefix}_tls_chain_files)")
    if cfg.get(f"{prefix}_tls_dh512_param_file").strip():
        warn(f"{prefix}_tls_dh512_param_file is ignored: export ciphers no longer exist")
    dh_path = _dh_file(cfg, prefix, warn)
    groups = _groups(cfg, f"{prefix}_tls_eecdh_grade", warn)
    options = _options(cfg, True, warn)
    depth = cfg[f"{prefix}_tls_ccert_verifydepth"]
    timeout = cfg[f"{prefix}_tls_session_cache_timeout"]
    lists = (cipher_list(cfg, prefix, False, ask), cipher_list(cfg, prefix, True, ask))
    protocols = (f"{prefix}_tls_protocols", f"{prefix}_tls_mandatory_protocols")
    warned: set = set()
    # OpenSSL's message callback (a Python call for every TLS record, about 40 a session)
    # is what shows the signature digests of TLS 1.3 handshakes. A server needs it for a
    # client certificate's signature, or when its own key does not fix the digest (RSA-PSS
    # signs with the digest the client prefers); an EC or EdDSA key does (_own_digest).
    sni_pairs = _sni_pairs(cfg)
    capture = bool(ask) or not all(_own_digest(pair.chain[0].public_key()) is not None
                                   for pair in [*pairs, *(p for ps in sni_pairs.values()
                                                          for p in ps)])

    always_issue = cfg[f"{prefix}_tls_always_issue_session_ids"]

    def build(mandatory: bool, pairs: list[_KeyPair] = pairs) -> SSL.Context:
        """One context of this configuration: mandatory or opportunistic."""
        # Security level 1 (80 bits) only where a client certificate is required, as
        # Postfix's tls_server.c; otherwise 0, so that the configured protocols are served.
        ctx = _base_context(SSL.TLS_SERVER_METHOD, cfg, prefix, protocols[mandatory],
                            lists[mandatory], options, groups, loglevel, server=True,
                            capture=capture, security_level=1 if require else 0)
        if not _load_pairs(ctx, pairs, warn, warned):
            raise TLSConfigError(f"No server certs available. TLS won't be enabled "
                                 f"(no usable certificate in {pairs[0].cert_param})")
        _load_ca(ctx, cfg, prefix, client_ca_list=True)
        if dh_path:
            ctx.load_tmp_dh(dh_path.encode())
        mode = SSL.VERIFY_NONE
        if ask:
            mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
            if require:
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        tls_session.set_verify(ctx, mode, _verify_observer)
        ctx.set_verify_depth(depth + 1)
        if timeout > 0:
            # Tickets only: every worker forked from this context holds the same ticket
            # keys, while a per-process session cache would resume only by chance.
            ctx.set_session_id(SESSION_ID_CONTEXT)
            ctx.set_timeout(timeout)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL)
        else:
            ctx.set_options(SSL.OP_NO_TICKET)
            if always_issue:
                # Postfix's smtpd_tls_always_issue_session_ids: a session id in every
                # ServerHello, though nothing is cached under it.
                ctx.set_session_id(SESSION_ID_CONTEXT)
                ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL)
            else:
                ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        return ctx

    opportunistic = build(False)
    same = (lists[0] == lists[1]
            and parse_protocols(cfg.get(protocols[0])) == parse_protocols(cfg.get(protocols[1])))
    mandatory = opportunistic if same else build(True)
    sni = None
    if sni_pairs:
        # One context per chain: OpenSSL's SSL_set_SSL_CTX takes the certificates (and
        # the client CA list) from it; protocols, ciphers and the session ticket keys stay
        # those of the default context, so resumption works whatever the name.
        built: dict[int, SSL.Context] = {}
        contexts = {}
        for name, chain in sni_pairs.items():
            if id(chain) not in built:
                built[id(chain)] = build(False, chain)
            contexts[name] = built[id(chain)]
        sni = SniMap(contexts, warn, info)
        for ctx in {id(opportunistic): opportunistic, id(mandatory): mandatory}.values():
            ctx.set_tlsext_servername_callback(sni.callback)
    names = (None, None)
    if timeout > 0:
        names = (context_ticket_key_name(opportunistic),
                 context_ticket_key_name(mandatory))
    return ServerTLS(opportunistic, mandatory, level, ask, require, loglevel, digest,
                     cfg[f"{prefix}_tls_received_header"], lists, depth, info,
                     cfg["tls_fast_shutdown_enable"], sni, names)


def rotate_server_tls(cfg, current: ServerTLS, prefix: str = "smtpd") -> ServerTLS:
    """The contexts of the next ticket key period: new keys for encryption, and
    current's contexts kept for decryption (theirs dropped). Warnings are not repeated:
    prepare() gave them for this configuration. TLSConfigError as server_tls()."""
    new = server_tls(cfg, prefix, level=current.level, warn=lambda text: None,
                     info=current.info_fn)
    new.previous = dataclasses.replace(current, previous=None)
    return new


# --- session ticket keys ------------------------------------------------------------------

TICKET_KEY_NAME_LEN = 16        # OpenSSL's stateless ticket: key name, IV, data, HMAC
_TLS_RECORD_MAX = 5 + 16384
_EXT_SESSION_TICKET = 35
_EXT_PRE_SHARED_KEY = 41


def _der_children(data: bytes, pos: int, end: int):
    """(tag, value start, value end) of the DER elements in data[pos:end]."""
    while pos + 2 <= end:
        tag, n = data[pos], data[pos + 1]
        pos += 2
        if n & 0x80:
            size = n & 0x7F
            if size == 0 or size > 4 or pos + size > end:
                return
            n = int.from_bytes(data[pos:pos + size], "big")
            pos += size
        if pos + n > end:
            return
        yield tag, pos, pos + n
        pos += n


def session_ticket(der: bytes) -> bytes | None:
    """The ticket inside a DER SSL_SESSION (i2d_SSL_SESSION's [10] tlsext_tick)."""
    for tag, start, end in _der_children(der, 0, len(der)):
        if tag != 0x30:
            return None
        for inner, istart, iend in _der_children(der, start, end):
            if inner == 0xAA:           # [10] EXPLICIT OCTET STRING
                for otag, ostart, oend in _der_children(der, istart, iend):
                    if otag == 0x04:
                        return der[ostart:oend]
        return None
    return None


def ticket_key_name(session: SSL.Session) -> bytes | None:
    """The key name of a client session's ticket, or None without a ticket."""
    try:
        ticket = session_ticket(tls_session.serialize(session))
    except ValueError:
        return None
    if ticket is None or len(ticket) < TICKET_KEY_NAME_LEN:
        return None
    return ticket[:TICKET_KEY_NAME_LEN]


def context_ticket_key_name(ctx: SSL.Context) -> bytes | None:
    """The name of ctx's ticket key, learnt from one handshake in memory with a
    throwaway client (the bindings cannot read the key). None when that handshake does
    not complete (a client certificate required, no common cipher)."""
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    client_ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    server = SSL.Connection(ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    try:
        for _ in range(20):
            for conn in (client, server):
                try:
                    conn.do_handshake()
                except SSL.WantReadError:
                    pass
            for src, dst in ((client, server), (server, client)):
                try:
                    dst.bio_write(src.bio_read(1 << 16))
                except SSL.WantReadError:
                    pass
            if client.get_peer_finished() is not None:
                try:
                    client.recv(1)      # TLS 1.3: the tickets follow the handshake
                except SSL.WantReadError:
                    pass
                session = client.get_session()
                name = ticket_key_name(session) if session is not None else None
                if name is not None:
                    return name
    except SSL.Error:
        return None
    return None


def client_hello_ticket_key_name(record: bytes) -> bytes | None:
    """The ticket key name of a ClientHello record: the TLS 1.2 session_ticket
    extension, or the first TLS 1.3 pre_shared_key identity. None when there is none
    or the record is not a whole ClientHello."""
    if len(record) < 9 or record[0] != 22 or record[5] != 1:
        return None
    end = min(len(record), 5 + int.from_bytes(record[3:5], "big"))
    pos = 9 + 2 + 32                    # record and handshake headers, version, random
    try:
        pos += 1 + record[pos]                                  # session id
        pos += 2 + int.from_bytes(record[pos:pos + 2], "big")  # cipher suites
        pos += 1 + record[pos]                                  # compression methods
        ext_end = min(end, pos + 2 + int.from_bytes(record[pos:pos + 2], "big"))
        pos += 2
        while pos + 4 <= ext_end:
            kind = int.from_bytes(record[pos:pos + 2], "big")
            size = int.from_bytes(record[pos + 2:pos + 4], "big")
            data = record[pos + 4:pos + 4 + size]
            pos += 4 + size
            if kind == _EXT_SESSION_TICKET and data:    # empty: "send me one" (or TLS 1.3)
                ticket = data
            elif kind == _EXT_PRE_SHARED_KEY and len(data) >= 4:
                ticket = data[4:4 + int.from_bytes(data[2:4], "big")]
            else:
                continue
            return ticket[:TICKET_KEY_NAME_LEN] if len(ticket) >= TICKET_KEY_NAME_LEN else None
    except IndexError:
        return None
    return None


def peek_ticket_key_name(sock, timeout: float) -> bytes | None:
    """Wait (at most timeout) for the client's first TLS record, and read the ticket key
    name from it without taking it off the socket (MSG_PEEK): the handshake then reads
    it as usual. None for no ticket, no ClientHello in time, or a socket error."""
    deadline = time.monotonic() + timeout
    have = -1
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        try:
            if not select.select([sock], [], [], wait)[0]:
                return None
            data = sock.recv(_TLS_RECORD_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except (OSError, ValueError):
            return None
        if not data:
            return None
        if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"):
            return client_hello_ticket_key_name(data)
        if len(data) >= _TLS_RECORD_MAX:
            return None
        if len(data) == have:
            time.sleep(0.005)   # the rest of the record is on its way: peeking again now
        have = len(data)        # would find the same bytes


@dataclass
class ClientTLS:
    """The client contexts of smtp, lmtp or posttls-finger."""

    opportunistic: SSL.Context
    mandatory: SSL.Context
    loglevel: int
    fingerprint_digest: str
    cipher_lists: tuple[str, str, str]     # may, encrypt, fingerprint/verify/secure
    session_timeout: int
    verify_depth: int
    wildcard_multiple_labels: bool = True
    info_fn: object = field(default=msg.info, repr=False)
    authenticated: SSL.Context | None = None
    fast_shutdown: bool = True

    def context(self, mandatory: bool = False, authenticated: bool = False) -> SSL.Context:
        """The context for opportunistic (may) or mandatory (encrypt and up) TLS;
        authenticated (the mandatory one at OpenSSL security level 1) for the levels
        that match the peer certificate: fingerprint, verify, secure."""
        if authenticated and self.authenticated is not None:
            return self.authenticated
        return self.mandatory if mandatory or authenticated else self.opportunistic

    def cipher_list(self, mandatory: bool = False, authenticated: bool = False) -> str:
        """The cipher list of the context that context() returns, as Postfix logs it."""
        return self.cipher_lists[2 if authenticated else int(mandatory)]

    def connection(self, sock, namaddr: str, mandatory: bool = False,
                   servername: str | None = None, session=None,
                   authenticated: bool = False) -> SSL.Connection:
        """A client-side connection on sock, with SNI and a cached session if given."""
        mandatory = mandatory or authenticated
        if self.loglevel >= 2:
            self.info_fn(f"setting up TLS connection to {namaddr}")
            self.info_fn(f"{namaddr}: TLS cipher list "
                         f"\"{self.cipher_list(mandatory, authenticated)}\"")
        conn = SSL.Connection(self.context(mandatory, authenticated), sock)
        conn.set_app_data(ConnState("client", namaddr, self.loglevel, self.verify_depth,
                                    self.info_fn, self.fast_shutdown))
        if servername:
            conn.set_tlsext_host_name(servername.encode("idna"))
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        return conn

    def info(self, conn: SSL.Connection, match: list[str] | None = None,
             warn=msg.warn) -> "TLSInfo":
        """The facts of conn's finished handshake; match: names for verify/secure."""
        return peer_info(conn, self.fingerprint_digest, match=match,
                         wildcard_multiple_labels=self.wildcard_multiple_labels, warn=warn)

    def log_lines(self, info: "TLSInfo", require_trust: bool = False) -> list[str]:
        """Postfix's lines for this handshake at smtp_tls_loglevel."""
        return log_lines(info, self.loglevel, require_trust=require_trust)


def client_tls(cfg, prefix: str = "smtp", warn=msg.warn, info=msg.info) -> ClientTLS:
    """Build the client contexts from parameters; TLSConfigError when TLS is unusable."""
    loglevel = cfg[f"{prefix}_tls_loglevel"]
    if loglevel >= 2:
        info("initializing the client-side TLS engine")
    digest = _digest_name(cfg, f"{prefix}_tls_fingerprint_digest")
    pairs = _key_pairs(cfg, prefix, warn)
    groups = _groups(cfg, None, warn)
    options = _options(cfg, False, warn)
    depth = cfg[f"{prefix}_tls_scert_verifydepth"]
    timeout = cfg[f"{prefix}_tls_session_cache_timeout"]
    # may, encrypt, and the levels that match the certificate (smtp_tls_policy.c).
    lists = (cipher_list(cfg, prefix, False), cipher_list(cfg, prefix, True, also_exclude="eNULL"),
             cipher_list(cfg, prefix, True, also_exclude="aNULL"))
    protocols = (f"{prefix}_tls_protocols", f"{prefix}_tls_mandatory_protocols")
    warned: set = set()

    def build(mandatory: bool, security_level: int = 0) -> SSL.Context:
        """One context of this configuration: opportunistic, mandatory, or (security
        level 1) authenticated."""
        ciphers = lists[2] if security_level else lists[int(mandatory)]
        ctx = _base_context(SSL.TLS_CLIENT_METHOD, cfg, prefix, protocols[mandatory],
                            ciphers, options, groups, loglevel, server=False,
                            security_level=security_level)
        if pairs:
            _load_pairs(ctx, pairs, warn, warned)
        _load_ca(ctx, cfg, prefix, client_ca_list=False)
        # Verification never stops the handshake; the TLS policy judges afterwards.
        tls_session.set_verify(ctx, SSL.VERIFY_PEER, _verify_observer)
        ctx.set_verify_depth(depth + 1)
        # Sessions live in tlsmgr's cache (serialised by the caller), not in OpenSSL's.
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT | SSL.SESS_CACHE_NO_INTERNAL_STORE)
        if timeout > 0:
            ctx.set_timeout(timeout)
        return ctx

    opportunistic = build(False)
    same = (lists[0] == lists[1]
            and parse_protocols(cfg.get(protocols[0])) == parse_protocols(cfg.get(protocols[1])))
    mandatory = opportunistic if same else build(True)
    # Security level 1 where the peer is authenticated, as Postfix's tls_client.c
    # (TLS_MUST_MATCH); per context, since the bindings cannot set it per connection.
    authenticated = build(True, security_level=1)
    return ClientTLS(opportunistic, mandatory, loglevel, digest, lists, timeout, depth,
                     cfg["tls_wildcard_matches_multiple_labels"], info, authenticated,
                     cfg["tls_fast_shutdown_enable"])


# --- handshake and shutdown ---------------------------------------------------------------

def _wait(conn, want_write: bool, deadline: float) -> None:
    """Wait until conn is readable (or writable) or raise TimeoutError at deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    r, w = ([], [conn]) if want_write else ([conn], [])
    if not any(select.select(r, w, [], left)):
        raise TimeoutError


def _socket_of(conn: SSL.Connection):
    """The socket under conn (pyOpenSSL hands unknown attributes to it), or None."""
    try:
        conn.fileno()
        return conn
    except (AttributeError, OSError):
        return None


def handshake_loop(conn: SSL.Connection, timeout: float) -> None:
    """do_handshake() on a non-blocking socket until done; TimeoutError after timeout
    seconds; OpenSSL's errors propagate as raised (for callers with their own words)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.do_handshake()
            return
        except SSL.WantReadError:
            _wait(conn, False, deadline)
        except SSL.WantWriteError:
            _wait(conn, True, deadline)


def handshake_step(conn: SSL.Connection) -> str | None:
    """One do_handshake() on a non-blocking socket, for an event loop: None when the
    handshake is done, else "read" or "write", what it waits for; OpenSSL's errors
    propagate as raised (ssl_error_text() words them)."""
    try:
        conn.do_handshake()
        return None
    except SSL.WantReadError:
        return "read"
    except SSL.WantWriteError:
        return "write"


def handshake(conn: SSL.Connection, timeout: float) -> None:
    """Complete the TLS handshake within timeout seconds, or raise TLSHandshakeError."""
    state = conn.get_app_data()
    namaddr = state.namaddr if isinstance(state, ConnState) else "peer"
    verb = ("SSL_accept error from" if isinstance(state, ConnState) and state.role == "server"
            else "SSL_connect error to")
    sock = _socket_of(conn)
    old_timeout = sock.gettimeout() if sock is not None else None
    if sock is not None:
        # Non-blocking, with select() below, so that timeout holds.
        sock.setblocking(False)
    try:
        handshake_loop(conn, timeout)
    except TimeoutError:
        raise TLSHandshakeError(f"{verb} {namaddr}: Connection timed out") from None
    except SSL.SysCallError as exc:
        code = exc.args[0] if exc.args else -1
        if code in (-1, 0):
            raise TLSHandshakeError(f"{verb} {namaddr}: lost connection") from None
        raise TLSHandshakeError(f"{verb} {namaddr}: {os.strerror(code)}") from None
    except SSL.ZeroReturnError:
        raise TLSHandshakeError(f"{verb} {namaddr}: lost connection") from None
    except SSL.Error as exc:
        reasons = [f"TLS library problem: {_ssl_reasons(exc)}"]
        raise TLSHandshakeError(f"{verb} {namaddr}: -1", reasons) from None
    finally:
        if sock is not None:
            sock.settimeout(old_timeout)


def shutdown(conn: SSL.Connection, timeout: float = 10.0, fast: bool | None = None) -> None:
    """Send close_notify (and with fast=False wait for the peer's); never raises.

    fast=None takes tls_fast_shutdown_enable from the ServerTLS/ClientTLS that made conn."""
    if fast is None:
        state = conn.get_app_data()
        fast = state.fast_shutdown if isinstance(state, ConnState) else True
    deadline = time.monotonic() + timeout
    sock = _socket_of(conn)
    try:
        old_timeout = sock.gettimeout() if sock is not None else None
        if old_timeout == 0.0:
            sock = None         # non-blocking already (SmtpStream's): nothing to restore
        if sock is not None:
            # A blocking socket could hang here on a peer that never reads or writes.
            sock.setblocking(False)
    except OSError:
        return
    try:
        while True:
            try:
                done = conn.shutdown()
            except SSL.WantReadError:
                _wait(conn, False, deadline)
                continue
            except SSL.WantWriteError:
                _wait(conn, True, deadline)
                continue
            if done or fast:
                return
            # Our close_notify is out; wait for the peer's.
            _wait(conn, False, deadline)
    except (SSL.Error, OSError, TimeoutError):
        return
    finally:
        if sock is not None:
            try:
                sock.settimeout(old_timeout)
            except OSError:
                pass


# --- what a handshake established ---------------------------------------------------------

@dataclass
class TLSInfo:
    """The facts of one finished handshake, with Postfix's TLScontext field names."""

    role: str                       # "server" (smtpd) or "client" (smtp)
    namaddr: str                    # host[addr] or host[addr]:port, as logged
    protocol: str                   # "TLSv1.3"
    cipher_name: str                # OpenSSL's name: "TLS_AES_256_GCM_SHA384"
    cipher_usebits: int
    cipher_algbits: int
    session_reused: bool
    peer_sni: str = ""              # server: the client's SNI name (tls_server_sni_maps)
    kex_name: str = ""              # TLS 1.3 only, as Postfix: "X25519", "ECDHE", "DHE"
    kex_curve: str = ""             # "prime256v1" for ECDHE
    kex_bits: int = 0               # DHE group size
    srvr_sig_name: str = ""         # "ECDSA", "RSA-PSS", "ED25519"
    srvr_sig_curve: str = ""
    srvr_sig_bits: int = 0
    srvr_sig_dgst: str = ""         # "SHA256"; empty on resumption and for EdDSA
    clnt_sig_name: str = ""
    clnt_sig_curve: str = ""
    clnt_sig_bits: int = 0
    clnt_sig_dgst: str = ""
    peer_cert_present: bool = False
    peer_CN: str = ""               # subject CommonName ("" if none or unprintable)
    issuer_CN: str = ""             # issuer CommonName, else its Organization
    peer_subject: str = ""          # X509_NAME_oneline() of the subject
    peer_issuer: str = ""
    peer_fingerprint: str = ""      # certificate digest, AB:CD:... (fingerprint())
    peer_pkey_fingerprint: str = ""  # public-key digest (pkey_fingerprint())
    peer_trusted: bool = False      # the chain verified (and, with match, the name matched)
    peer_matched: bool = False      # a reference name matched (verify/secure, client)
    matched_name: str = ""          # the certificate name that matched
    verify_error: int = X509_V_OK   # X509_V_* code of the first failure (0: none)
    verify_error_text: str = ""     # OpenSSL's text for it
    verify_error_depth: int = -1
    verify_error_issuer: str = ""   # issuer (oneline) of the certificate that failed
    # A match that satisfies the policy but is logged "Trusted" (the smtp client's
    # half-dane level: Postfix's TLS_NEVER_SECURED, no TLS_CERT_FLAG_SECURED).
    never_secured: bool = False

    @property
    def peer_verified(self) -> bool:
        """Trusted and name-matched: what verify and secure require ("Verified")."""
        return self.peer_trusted and self.peer_matched

    @property
    def status(self) -> str:
        """Anonymous, Untrusted, Trusted or Verified, as in Postfix's summary line."""
        if not self.peer_cert_present:
            return "Anonymous"
        if self.peer_verified and not self.never_secured:
            return "Verified"
        return "Trusted" if self.peer_trusted else "Untrusted"


# TLS 1.3 signature schemes -> the digest OpenSSL names (None: no separate digest).
_SCHEME_DIGEST = {
    0x0201: "SHA1", 0x0203: "SHA1",
    0x0401: "SHA256", 0x0403: "SHA256", 0x0804: "SHA256", 0x0809: "SHA256", 0x081A: "SHA256",
    0x0501: "SHA384", 0x0503: "SHA384", 0x0805: "SHA384", 0x080A: "SHA384", 0x081B: "SHA384",
    0x0601: "SHA512", 0x0603: "SHA512", 0x0806: "SHA512", 0x080B: "SHA512", 0x081C: "SHA512",
}
# The TLS 1.3 ECDSA schemes tie the digest to the curve.
_EC_DIGEST = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}
# cryptography's curve names -> OpenSSL short names, which Postfix logs.
_CURVE_SN = {"secp256r1": "prime256v1", "secp192r1": "prime192v1"}
# pyOpenSSL's group names -> Postfix's key-exchange words.
_KEX = {"x25519": ("X25519", ""), "x448": ("X448", ""),
        "secp256r1": ("ECDHE", "prime256v1"), "prime256v1": ("ECDHE", "prime256v1"),
        "secp384r1": ("ECDHE", "secp384r1"), "secp521r1": ("ECDHE", "secp521r1")}


def _sig_of(public_key) -> tuple[str, str, int]:
    """(name, curve, bits) that Postfix logs for a TLS 1.3 signature with this key."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA-PSS", "", public_key.key_size      # TLS 1.3 signs with PSS only
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ECDSA", _CURVE_SN.get(public_key.curve.name, public_key.curve.name), 0
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ED25519", "", 0
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ED448", "", 0
    if isinstance(public_key, dsa.DSAPublicKey):
        return "DSA", "", 0
    return type(public_key).__name__, "", 0


# Own certificate (tls_session.local_certificate_id) -> (its X509, held so that the
# address names it, _sig_of and _own_digest of its key): a server hands out the same few
# certificates on every handshake, so their key facts are worked out once.
_LOCAL_SIG: dict[int, tuple] = {}
_LOCAL_SIG_MAX = 64


def _local_sig(conn: SSL.Connection) -> tuple[tuple[str, str, int], str | None] | None:
    """(_sig_of, _own_digest) of conn's own certificate's key; None without one."""
    key = tls_session.local_certificate_id(conn)
    if not key:
        return None
    hit = _LOCAL_SIG.get(key)
    if hit is None:
        cert = conn.get_certificate()       # a reference: the address stays this cert's
        if cert is None:
            return None
        public_key = cert.to_cryptography().public_key()
        if len(_LOCAL_SIG) >= _LOCAL_SIG_MAX:
            _LOCAL_SIG.clear()
        hit = _LOCAL_SIG[key] = (cert, _sig_of(public_key), _own_digest(public_key))
    return hit[1], hit[2]


def _own_digest(public_key) -> str | None:
    """The digest a TLS 1.3 signature with this key uses, when the key alone decides it:
    ECDSA's curve names it (RFC 8446 4.2.3), EdDSA has none (""); None for RSA and DSA."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _EC_DIGEST.get(public_key.curve.name)
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ""
    return None


def _kex_of(group: str | None) -> tuple[str, str, int]:
    """(name, curve, bits) Postfix logs for a negotiated group."""
    if not group:
        return "", "", 0
    key = group.lower()
    if key in _KEX:
        return (*_KEX[key], 0)
    m = re.fullmatch(r"ffdhe(\d+)", key)
    if m:
        return "DHE", "", int(m.group(1))
    if key.startswith("brainpool"):
        return "ECDHE", re.sub(r"tls13$", "", group), 0
    return group, "", 0


def _text_name(name: x509.Name, oid, label: str, namaddr: str, warn) -> str | None:
    """The first attribute oid of name, or None; warns as Postfix's tls_text_name."""
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = value.rstrip("\0")
    if len(value.encode("utf-8")) >= 256:        # Postfix's CCERT_BUFSIZ
        warn(f"tls_text_name: {namaddr}: peer {label} too long: {len(value.encode('utf-8'))}")
        return None
    if "\0" in value:
        warn(f"tls_text_name: {namaddr}: NULL character in peer {label}")
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        warn(f"tls_text_name: {namaddr}: non-printable content in peer {label}")
        return None
    return value


def _as_certificate(cert) -> x509.Certificate:
    """A cryptography Certificate from any of the accepted forms."""
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, crypto.X509):
        return cert.to_cryptography()
    if isinstance(cert, (bytes, bytearray)):
        data = bytes(cert)
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    raise TypeError(f"not a certificate: {type(cert).__name__}")


def _colon_hex(data: bytes) -> str:
    """Upper-case hex bytes joined by colons, as Postfix prints digests."""
    return ":".join(f"{b:02X}" for b in data)


def fingerprint(cert, digest: str = "sha256") -> str:
    """Postfix's certificate fingerprint: the digest of the DER, as AB:CD:..."""
    if digest.lower() not in DIGESTS:
        raise ValueError(f"unsupported digest: {digest}")
    der = _as_certificate(cert).public_bytes(serialization.Encoding.DER)
    return _colon_hex(hashlib.new(digest.lower(), der).digest())


def pkey_fingerprint(cert, digest: str = "sha256") -> str:
    """Postfix's public-key fingerprint: the digest of the SubjectPublicKeyInfo DER."""
    if digest.lower() not in DIGESTS:
        raise ValueError(f"unsupported digest: {digest}")
    spki = _spki(_as_certificate(cert).public_key())
    return _colon_hex(hashlib.new(digest.lower(), spki).digest())


def peer_info(conn: SSL.Connection, digest: str = "sha256", match: list[str] | None = None,
              wildcard_multiple_labels: bool = True, warn=msg.warn) -> TLSInfo:
    """What conn's finished handshake established, in Postfix's terms.

    match, on the client at the verify and secure levels, lists the reference names (see
    match_names()); a trusted certificate that matches none of them becomes untrusted
    with OpenSSL's "hostname mismatch" error, as Postfix 3.7 reports it.
    """
    state = conn.get_app_data()
    if not isinstance(state, ConnState):
        raise ValueError("connection was not made by ServerTLS or ClientTLS")
    server = state.role == "server"
    used, alg = tls_session.cipher_bits(conn)
    info = TLSInfo(state.role, state.namaddr, conn.get_protocol_version_name(),
                   conn.get_cipher_name() or "", used, alg, tls_session.session_reused(conn),
                   peer_sni=state.peer_sni or "" if server else "")
    peer = conn.get_peer_certificate(as_cryptography=True)

    if info.protocol == "TLSv1.3":
        # As tls_get_signature_params(): only TLS 1.3 names these apart from the cipher.
        info.kex_name, info.kex_curve, info.kex_bits = _kex_of(conn.get_group_name())
        local_scheme, peer_scheme = tls_session.signature_schemes(conn)
        local = _local_sig(conn)
        if local is not None and (server or local_scheme is not None):
            (name, curve, bits), own = local
            dgst = _SCHEME_DIGEST.get(local_scheme, "") if local_scheme else ""
            if server and local_scheme is None and not info.session_reused:
                dgst = own or ""   # not captured: see server_tls
            _set_sig(info, server, name, curve, bits, dgst)
        if peer is not None:
            name, curve, bits = _sig_of(peer.public_key())
            dgst = _SCHEME_DIGEST.get(peer_scheme, "") if peer_scheme else ""
            _set_sig(info, not server, name, curve, bits, dgst)

    if peer is None:
        return info
    info.peer_cert_present = True
    info.peer_CN = _text_name(peer.subject, NameOID.COMMON_NAME, "subject CN",
                              state.namaddr, warn) or ""
    info.issuer_CN = (_text_name(peer.issuer, NameOID.COMMON_NAME, "issuer CN",
                                 state.namaddr, warn)
                      or _text_name(peer.issuer, NameOID.ORGANIZATION_NAME,
                                    "issuer Organization", state.namaddr, warn) or "")
    info.peer_subject, info.peer_issuer = tls_session.peer_names(conn)
    info.peer_fingerprint = fingerprint(peer, digest)
    info.peer_pkey_fingerprint = pkey_fingerprint(peer, digest)

    result = tls_session.verify_result(conn)
    # OpenSSL keeps the last error; Postfix reports the first one at the lowest depth,
    # which only a full handshake's callback saw.
    if state.error != X509_V_OK:
        info.verify_error, info.verify_error_depth = state.error, state.error_depth
        info.verify_error_issuer = state.error_issuer
    elif result != X509_V_OK:
        info.verify_error = result
    info.peer_trusted = info.verify_error == X509_V_OK
    if match is not None and info.peer_trusted:
        matched, which = match_peername(peer, match, wildcard_multiple_labels)
        if matched:
            info.peer_matched, info.matched_name = True, which or ""
        else:
            info.peer_trusted = False
            info.verify_error_depth = 0
            info.verify_error = (X509_V_ERR_IP_ADDRESS_MISMATCH if any(_ip(n) for n in match)
                                 else X509_V_ERR_HOSTNAME_MISMATCH)
    if info.verify_error != X509_V_OK:
        info.verify_error_text = tls_session.verify_error_string(info.verify_error)
    return info


def _set_sig(info: TLSInfo, server_side: bool, name: str, curve: str, bits: int,
             dgst: str) -> None:
    """Store signature facts on the server or client side of info."""
    if server_side:
        info.srvr_sig_name, info.srvr_sig_curve = name, curve
        info.srvr_sig_bits, info.srvr_sig_dgst = bits, dgst
    else:
        info.clnt_sig_name, info.clnt_sig_curve = name, curve
        info.clnt_sig_bits, info.clnt_sig_dgst = bits, dgst


# --- Postfix's words ----------------------------------------------------------------------

def _sig_text(label: str, name: str, curve: str, bits: int, dgst: str) -> str:
    """"server-signature NAME (CURVE) server-digest DGST" and the like."""
    text = f"{label}-signature {name}"
    if curve:
        text += f" ({curve})"
    elif bits > 0:
        text += f" ({bits} bits)"
    if dgst:
        text += f" {label}-digest {dgst}"
    return text


def _kex_text(info: TLSInfo) -> str:
    """"key-exchange NAME (CURVE)" or "(N bits)"."""
    text = f"key-exchange {info.kex_name}"
    if info.kex_curve:
        text += f" ({info.kex_curve})"
    elif info.kex_bits > 0:
        text += f" ({info.kex_bits} bits)"
    return text


def summary_line(info: TLSInfo, usage: str = "established") -> str:
    """Postfix's loglevel-1 line (tls_log_summary); usage is "established" or "reused"."""
    direction = "to" if info.role == "client" else "from"
    # As Postfix 3.4 and later: "from host[addr] to sni-name" when SNI was accepted.
    sni = f" to {info.peer_sni}" if info.peer_sni else ""
    text = (f"{info.status} TLS connection {usage} {direction} {info.namaddr}{sni}: "
            f"{info.protocol} with cipher {info.cipher_name} "
            f"({info.cipher_usebits}/{info.cipher_algbits} bits)")
    if info.kex_name:
        text += " " + _kex_text(info)
    if info.srvr_sig_name:
        text += " " + _sig_text("server", info.srvr_sig_name, info.srvr_sig_curve,
                                info.srvr_sig_bits, info.srvr_sig_dgst)
    if info.clnt_sig_name:
        text += " " + _sig_text("client", info.clnt_sig_name, info.clnt_sig_curve,
                                info.clnt_sig_bits, info.clnt_sig_dgst)
    return text


def verify_error_line(info: TLSInfo) -> str:
    """Postfix's tls_log_verify_error() text for an untrusted peer ("" if none)."""
    err, depth, who = info.verify_error, info.verify_error_depth, info.namaddr
    if err == X509_V_OK:
        return ""
    purpose = "CA" if depth > 0 else ("client" if info.role == "server" else "server")
    if err == X509_V_ERR_CERT_UNTRUSTED:
        return f"certificate verification failed for {who}: not trusted by local or TLSA policy"
    if err == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
        return f"certificate verification failed for {who}: self-signed certificate"
    if err in (X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN):
        # Not sent, or sent but not trusted: Postfix makes no difference.
        issuer = _printable(info.verify_error_issuer) or "<unknown>"
        return f"certificate verification failed for {who}: untrusted issuer {issuer}"
    if err in (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_ERROR_IN_CERT_NOT_BEFORE_FIELD):
        return f"{purpose} certificate verification failed for {who}: certificate not yet valid"
    if err in (X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_ERROR_IN_CERT_NOT_AFTER_FIELD):
        return f"{purpose} certificate verification failed for {who}: certificate has expired"
    if err == X509_V_ERR_INVALID_PURPOSE:
        return (f"certificate verification failed for {who}: not designated for use as a "
                f"{purpose} certificate")
    if err == X509_V_ERR_CERT_CHAIN_TOO_LONG:
        return (f"certificate verification failed for {who}: certificate chain longer than "
                f"limit({depth - 1})")
    text = info.verify_error_text or tls_session.verify_error_string(err)
    return f"{purpose} certificate verification failed for {who}: num={err}:{text}"


def log_lines(info: TLSInfo, loglevel: int, require_trust: bool = False) -> list[str]:
    """Postfix 3.7's TLS lines for a finished handshake at this loglevel, in order."""
    lines: list[str] = []
    who = info.namaddr
    if loglevel >= 2 and info.session_reused:
        lines.append(f"{who}: Reusing old session")
    if require_trust and info.peer_cert_present and not info.peer_trusted:
        if info.session_reused and info.verify_error_depth < 0:
            lines.append(f"{who}: re-using session with untrusted certificate, look for "
                         f"details earlier in the log")
        else:
            lines.append(verify_error_line(info))
    if info.peer_cert_present and loglevel >= 2:
        if info.role == "client":
            if info.peer_matched and info.matched_name:
                lines.append(f"{who}: matched peername: {info.matched_name}")
            lines.append(f"{who}: subject_CN={info.peer_CN}, issuer_CN={info.issuer_CN}, "
                         f"fingerprint={info.peer_fingerprint}, "
                         f"pkey_fingerprint={info.peer_pkey_fingerprint}")
        else:
            lines.append(f"subject={_printable(info.peer_subject)}")
            lines.append(f"issuer={_printable(info.peer_issuer)}")
            lines.append(f"{who}: subject_CN={info.peer_CN}, issuer={info.issuer_CN}, "
                         f"fingerprint={info.peer_fingerprint}, "
                         f"pkey_fingerprint={info.peer_pkey_fingerprint}")
    if loglevel >= 1:
        lines.append(summary_line(info))
    return lines


def comment_sanitize(text: str) -> str:
    """Postfix's comment_sanitize(): safe inside a header comment."""
    out = []
    depth = 0
    for byte in text.encode("utf-8", "replace"):
        ch = chr(byte)
        if byte >= 128 or not ch.isprintable() or ch == "\\":
            out.append("?")
        elif ch == "(":
            depth += 1
            out.append(ch)
        elif ch == ")":
            if depth > 0:
                depth -= 1
                out.append(ch)
            else:
                out.append("?")
        else:
            out.append(ch)
    return "".join(out) + ")" * depth


def received_lines(info: TLSInfo, ask_ccert: bool) -> list[str]:
    """smtpd's Received: header lines for TLS, each starting with a tab (Postfix 3.7)."""
    lines = []
    current = (f"\t(using {info.protocol} with cipher {info.cipher_name} "
               f"({info.cipher_usebits}/{info.cipher_algbits} bits)")
    cont = False
    if info.kex_name:
        lines.append(current)
        current = "\t " + _kex_text(info)
        cont = True
    if info.srvr_sig_name:
        sig = _sig_text("server", info.srvr_sig_name, info.srvr_sig_curve,
                        info.srvr_sig_bits, info.srvr_sig_dgst)
        if cont:
            current += " " + sig
        else:
            lines.append(current)
            current = "\t " + sig
    if info.clnt_sig_name:
        lines.append(current)
        current = "\t " + _sig_text("client", info.clnt_sig_name, info.clnt_sig_curve,
                                    info.clnt_sig_bits, info.clnt_sig_dgst)
    lines.append(current + ")")
    if info.peer_cert_present:
        verdict = "verified OK" if info.peer_trusted else "not verified"
        lines.append(f"\t(Client CN \"{comment_sanitize(info.peer_CN)}\", Issuer "
                     f"\"{comment_sanitize(info.issuer_CN)}\" ({verdict}))")
    elif ask_ccert:
        lines.append("\t(Client did not present a certificate)")
    else:
        lines.append("\t(No client certificate requested)")
    return lines


def received_clause(info: TLSInfo, ask_ccert: bool) -> str:
    """received_lines() joined into one folded header fragment."""
    return "\n".join(received_lines(info, ask_ccert))


# --- peer names ---------------------------------------------------------------------------

def _ip(name: str):
    """The IP address in name (brackets allowed), or None."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


_DNS_NAME_RE = re.compile(r"[A-Za-z0-9*_.-]+")


def cert_names(cert) -> tuple[list[str], list, str | None]:
    """(dNSNames, iPAddresses, first CommonName) of a certificate."""
    cert = _as_certificate(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        dns, ips = [], []
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return list(dns), list(ips), (cn if isinstance(cn, str) else None)


def _name_matches(certid: str, ref: str, multi: bool) -> bool:
    """One certificate name against one reference name (Postfix's match_servername)."""
    certid = certid.lower()
    ref = ref.lower()
    if ref.startswith(".") and len(ref) > 1:
        domain = ref[1:].removesuffix(".")
        return len(certid) > len(domain) + 1 and certid.endswith("." + domain)
    ref = ref.removesuffix(".")
    if not ref:
        return False
    if certid == ref:
        return True
    if certid.startswith("*.") and len(certid) > 2:
        rest = certid[1:]                       # ".example.com"
        if rest.count(".") < 2 or "*" in rest:  # OpenSSL: "*.com" is no wildcard
            return False
        dot = ref.find(".")
        if dot <= 0:
            return False
        parent = ref[dot:]
        return parent.endswith(rest) if multi else parent == rest
    return False


def match_peername(cert, names, wildcard_multiple_labels: bool = True) -> tuple[bool, str | None]:
    """Whether cert is valid for any of names; (True, certificate name) on a match."""
    dns, ips, cn = cert_names(cert)
    for ref in names:
        address = _ip(ref)
        if address is not None:
            for ip in ips:
                if ip == address:
                    return True, str(ip)
            continue
        # Any dNSName, even a malformed one, means the CommonName is not consulted.
        candidates = [d for d in dns if _DNS_NAME_RE.fullmatch(d)] if dns else \
            ([cn] if cn and _DNS_NAME_RE.fullmatch(cn) else [])
        for certid in candidates:
            if _name_matches(certid, ref, wildcard_multiple_labels):
                return True, certid
    return False, None


def match_names(strategies, nexthop: str, hostname: str) -> list[str]:
    """Reference names for smtp_tls_{verify,secure}_cert_match strategies."""
    def clean(name: str) -> str:
        """A next-hop or host name as certificates spell it."""
        return name.strip().strip("[]").removesuffix(".").lower()
    out: list[str] = []
    for item in strategies:
        key = item.lower()
        if key == "nexthop":
            name = clean(nexthop)
        elif key == "dot-nexthop":
            name = "." + clean(nexthop)
        elif key == "hostname":
            name = clean(hostname)
        else:
            name = item.strip().lower()
        if name and name not in out:
            out.append(name)
    return out


def sni_name(setting: str, nexthop: str, hostname: str) -> str | None:
    """The SNI name for smtp_tls_servername: none, hostname, nexthop, or a literal."""
    value = setting.strip()
    if not value:
        return None
    name = {"hostname": hostname, "nexthop": nexthop}.get(value.lower(), value)
    name = name.strip().strip("[]").removesuffix(".")
    # SNI carries host names only, never addresses.
    return None if not name or _ip(name) is not None else name


# --- what a client offered: its ClientHello, parsed from a peek -----------------------------

HELLO_PEEK_LIMIT = 16389        # one TLS record: 5 bytes of header, at most 2^14 of data
_TLS_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2",
                 0x0304: "TLSv1.3"}
_GREASE = frozenset(0x0A0A + 0x1010 * i for i in range(16))     # RFC 8701 values


def _version_name(code: int) -> str:
    return _TLS_VERSIONS.get(code, f"0x{code:04X}")


def client_hello_offer(data: bytes) -> dict | None:
    """What a ClientHello in the first bytes of a connection offers, or None.

    Returns {"protocols": [...], "ciphers": [...], "sni": name or None}: the protocol
    versions (supported_versions, else the legacy client_version), the cipher suites by
    OpenSSL's names (0xXXXX for one OpenSSL does not know; GREASE values left out), and
    the server name. A truncated hello gives what its bytes hold. Data that is not a TLS
    handshake record holding a ClientHello gives None (an SSLv2 hello, plain text).
    """
    if len(data) < 9 or data[0] != 22 or data[5] != 1:
        return None
    body = data[9:5 + int.from_bytes(data[3:5], "big")]
    out = {"protocols": [], "ciphers": [], "sni": None}
    try:
        legacy = int.from_bytes(body[0:2], "big")
        pos = 2 + 32
        pos += 1 + body[pos]                                    # session id
        n = int.from_bytes(body[pos:pos + 2], "big")
        suites = body[pos + 2:pos + 2 + n]
        for i in range(0, len(suites) - 1, 2):
            code = int.from_bytes(suites[i:i + 2], "big")
            if code in _GREASE or code in (0x00FF, 0x5600):     # SCSVs: not suites
                continue
            out["ciphers"].append(tls_session.cipher_name(code) or f"0x{code:04X}")
        pos += 2 + n
        pos += 1 + body[pos]                                    # compression methods
        end = min(len(body), pos + 2 + int.from_bytes(body[pos:pos + 2], "big"))
        pos += 2
        versions = []
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos:pos + 2], "big")
            size = int.from_bytes(body[pos + 2:pos + 4], "big")
            ext = body[pos + 4:pos + 4 + size]
            pos += 4 + size
            if kind == 0 and len(ext) >= 5 and ext[2] == 0:     # server_name, host_name
                name = ext[5:5 + int.from_bytes(ext[3:5], "big")]
                out["sni"] = msg.printable(name, limit=255)
            elif kind == 43 and ext:                            # supported_versions
                vlist = ext[1:1 + ext[0]]
                versions = [int.from_bytes(vlist[i:i + 2], "big")
                            for i in range(0, len(vlist) - 1, 2)]
        versions = [v for v in versions if v not in _GREASE] or [legacy]
        out["protocols"] = [_version_name(v) for v in versions]
    except IndexError:
        pass                                                    # truncated: what we have
    if not out["protocols"] and len(body) >= 2:
        out["protocols"] = [_version_name(int.from_bytes(body[0:2], "big"))]
    return out


def offer_text(offer: dict | None, max_ciphers: int = 40) -> str:
    """The offer as one log line's words: protocols, cipher suites and SNI."""
    if offer is None:
        return "no TLS ClientHello"
    ciphers = offer["ciphers"]
    shown = ":".join(ciphers[:max_ciphers])
    if len(ciphers) > max_ciphers:
        shown += f":... ({len(ciphers)} suites)"
    return (f"protocols={','.join(offer['protocols']) or 'none'} "
            f"ciphers={shown or 'none'} sni={offer['sni'] or 'none'}")
