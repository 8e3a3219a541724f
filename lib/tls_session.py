"""The only user of pyOpenSSL's internal bindings: what its public API does not offer.

pyOpenSSL exposes sessions only as opaque objects, and says nothing of whether a session was
resumed, of the signature algorithms of a TLS 1.3 handshake, or of the verification result
that OpenSSL recorded. Postfix needs all of these (session caching through tlsmgr, and its
log lines), so this module reaches into `OpenSSL.SSL._lib` / `_ffi`, the cffi bindings that
`cryptography` ships. Nothing else in postfix-py may do so: no ctypes into libssl, no struct
offsets. tests/unit/test_tls_session.py is the canary that fails, naming the symbol, when a
dependency upgrade removes one of them.

FUNCTIONS
    missing_symbols() -> list[str]: the names of REQUIRED_SYMBOLS that the bindings lack
        (empty when all is well).
    serialize(session) -> bytes: DER of an SSL.Session (i2d_SSL_SESSION); ValueError for a
        session without content.
    deserialize(data, ctx) -> SSL.Session: the reverse (d2i_SSL_SESSION), for connections
        of Context ctx (pyOpenSSL accepts a session only on the context it belongs to);
        ValueError when data is not a session. The result goes to Connection.set_session()
        before the handshake.
    session_reused(conn) -> bool: whether the handshake resumed a session.
    cipher_bits(conn) -> (used_bits, algorithm_bits) of the current cipher, (0, 0) if none.
    local_certificate_id(conn) -> int: the address of conn's own certificate (0: none),
        which names it while a reference to it is held (lib/tls.py caches the facts of
        its key by it).
    verify_result(conn) -> int: OpenSSL's X509_V_* result of peer verification (0 is OK),
        as recorded even when our callback let the handshake go on.
    verify_error_string(code) -> str: OpenSSL's text for an X509_V_* code.
    peer_names(conn) -> (subject, issuer): X509_NAME_oneline() of the peer certificate's
        subject and issuer, as Postfix logs them ("/O=Example/CN=mx.example.com"); empty
        strings without a peer certificate.
    set_groups(ctx, names) -> None: the key-exchange groups of a Context
        (SSL_CTX_set1_groups_list); ValueError names the list when OpenSSL refuses it.
    set_verify(ctx, mode, observer) -> None: verify peer certificates on connections of ctx
        with OpenSSL's checks, calling observer(conn, ok, error, depth, subject, issuer) for
        each step; the handshake always goes on, and OpenSSL records the first failure as
        the connection's (and its session's) verification result. The observer may return
        an X509_V_* code to impose on that step (Postfix's chain-length rule), or None.
    capture_signatures(ctx) -> None: record, for every connection of ctx, the TLS signature
        scheme of each CertificateVerify message sent and received.
    signature_schemes(conn) -> (local, peer): the schemes recorded for conn (ints, or None
        when that side did not sign in this handshake, as in a resumption).
    cipher_name(code) -> str or None: OpenSSL's name of the cipher suite with the 16-bit
        TLS code (SSL_CIPHER_find; "ECDHE-RSA-AES128-GCM-SHA256", "TLS_AES_128_GCM_SHA256"),
        None for a suite this OpenSSL does not know.

Every function that takes a Connection or Context takes pyOpenSSL's objects; none raises
pyOpenSSL's own errors except where noted.
"""

from __future__ import annotations

import weakref

from OpenSSL import SSL
from OpenSSL.SSL import _ffi, _lib

REQUIRED_SYMBOLS = (
    "i2d_SSL_SESSION",
    "d2i_SSL_SESSION",
    "SSL_SESSION_free",
    "SSL_session_reused",
    "SSL_get_current_cipher",
    "SSL_CIPHER_get_bits",
    "SSL_get_certificate",
    "SSL_get_verify_result",
    "X509_verify_cert_error_string",
    "X509_NAME_oneline",
    "SSL_get_peer_certificate",
    "X509_free",
    "SSL_CTX_set1_curves_list",
    "SSL_CTX_set_msg_callback",
    "OPENSSL_free",
    "SSL_CTX_set_verify",
    "X509_STORE_CTX_get_error",
    "X509_STORE_CTX_set_error",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_get_ex_data",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "X509_get_subject_name",
    "X509_get_issuer_name",
    "ERR_get_error",
    "SSL_CIPHER_find",
    "SSL_CIPHER_get_name",
)

_HANDSHAKE = 22             # SSL3_RT_HANDSHAKE: msg_callback content type of handshake messages
_CLIENT_HELLO = 1
_CERTIFICATE_VERIFY = 15


def missing_symbols() -> list[str]:
    """Names in REQUIRED_SYMBOLS that pyOpenSSL's bindings no longer offer."""
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(_lib, name)]
    # pyOpenSSL's own internals that deserialize() and the callback rely on.
    if not hasattr(SSL.Connection, "_reverse_mapping"):
        missing.append("OpenSSL.SSL.Connection._reverse_mapping")
    return missing


# --- sessions ----------------------------------------------------------------------------

def serialize(session: SSL.Session) -> bytes:
    """The DER encoding of a session (i2d_SSL_SESSION), for tlsmgr's cache."""
    ptr = getattr(session, "_session", None)
    if ptr is None or ptr == _ffi.NULL:
        raise ValueError("no session to serialize")
    length = _lib.i2d_SSL_SESSION(ptr, _ffi.NULL)
    if length <= 0:
        raise ValueError("cannot serialize TLS session")
    buf = _ffi.new("unsigned char[]", length)
    cursor = _ffi.new("unsigned char **", buf)
    # i2d advances the cursor; buf keeps the start.
    if _lib.i2d_SSL_SESSION(ptr, cursor) != length:
        raise ValueError("cannot serialize TLS session")
    return bytes(_ffi.buffer(buf, length))


def deserialize(data: bytes, ctx: SSL.Context) -> SSL.Session:
    """A session for connections of ctx from its DER encoding; ValueError if it is not one."""
    if not data:
        raise ValueError("empty TLS session data")
    buf = _ffi.new("unsigned char[]", data)
    cursor = _ffi.new("unsigned char **", buf)
    ptr = _lib.d2i_SSL_SESSION(_ffi.NULL, cursor, len(data))
    if ptr == _ffi.NULL:
        _clear_errors()
        raise ValueError("malformed TLS session data")
    # Built the way pyOpenSSL's Connection.get_session() builds its result.
    session = SSL.Session.__new__(SSL.Session)
    session._session = _ffi.gc(ptr, _lib.SSL_SESSION_free)
    session._context = ctx
    return session


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the last handshake on conn resumed a session."""
    return bool(_lib.SSL_session_reused(conn._ssl))


def local_certificate_id(conn: SSL.Connection) -> int:
    """The address of conn's own certificate, 0 when it has none: it names that
    certificate for as long as a reference to it is held (lib/tls.py's cache)."""
    cert = _lib.SSL_get_certificate(conn._ssl)      # no new reference
    return 0 if cert == _ffi.NULL else int(_ffi.cast("uintptr_t", cert))


def cipher_bits(conn: SSL.Connection) -> tuple[int, int]:
    """(bits used, bits of the algorithm) of the negotiated cipher, as Postfix logs them."""
    cipher = _lib.SSL_get_current_cipher(conn._ssl)
    if cipher == _ffi.NULL:
        return 0, 0
    alg = _ffi.new("int *")
    used = _lib.SSL_CIPHER_get_bits(cipher, alg)
    return int(used), int(alg[0])


def verify_result(conn: SSL.Connection) -> int:
    """OpenSSL's verification result for the peer certificate (0 = X509_V_OK)."""
    return int(_lib.SSL_get_verify_result(conn._ssl))


def verify_error_string(code: int) -> str:
    """OpenSSL's description of an X509_V_* code."""
    text = _lib.X509_verify_cert_error_string(code)
    return _ffi.string(text).decode("utf-8", "replace") if text != _ffi.NULL else str(code)


def peer_names(conn: SSL.Connection) -> tuple[str, str]:
    """(subject, issuer) of the peer certificate in X509_NAME_oneline() form."""
    cert = _lib.SSL_get_peer_certificate(conn._ssl)     # a new reference
    if cert == _ffi.NULL:
        return "", ""
    try:
        return (_oneline_of(_lib.X509_get_subject_name(cert)),
                _oneline_of(_lib.X509_get_issuer_name(cert)))
    finally:
        _lib.X509_free(cert)


# --- context settings --------------------------------------------------------------------

def set_groups(ctx: SSL.Context, names: list[str]) -> None:
    """Offer exactly these key-exchange groups (ECDHE curves, X25519, ...), in this order."""
    text = ":".join(names).encode("ascii")
    if not names or _lib.SSL_CTX_set1_curves_list(ctx._context, text) != 1:
        _clear_errors()
        raise ValueError(f"unsupported key-exchange group list: {' '.join(names)}")


# --- peer certificate verification -------------------------------------------------------
#
# pyOpenSSL's own verify callback resets the X509 error to "ok" whenever the Python callback
# lets the handshake continue, so OpenSSL would record every certificate as verified, in the
# connection and in the session that a later handshake resumes. Postfix asks for client
# certificates without failing the handshake on a bad one, and judges trust afterwards; this
# callback does the same: it always continues, and leaves OpenSSL's error in place.

_verify_observers: "weakref.WeakKeyDictionary[SSL.Context, object]" = weakref.WeakKeyDictionary()


def _oneline_of(name_ptr) -> str:
    """X509_NAME_oneline() of a name pointer, or "<unknown>"."""
    if name_ptr == _ffi.NULL:
        return "<unknown>"
    text = _lib.X509_NAME_oneline(name_ptr, _ffi.NULL, 0)
    if text == _ffi.NULL:
        return "<unknown>"
    try:
        return _ffi.string(text).decode("utf-8", "replace")
    finally:
        _lib.OPENSSL_free(text)


@_ffi.callback("int(int, X509_STORE_CTX *)")
def _verify_callback(ok, store):
    """OpenSSL's verify callback: report to the observer, always continue."""
    # Never abort the handshake from here; trust is judged after it (Postfix tls_verify.c).
    try:
        ssl = _lib.X509_STORE_CTX_get_ex_data(store, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
        conn = SSL.Connection._reverse_mapping.get(_ffi.cast("SSL *", ssl))
        observer = _verify_observers.get(conn.get_context()) if conn is not None else None
        if observer is not None:
            cert = _lib.X509_STORE_CTX_get_current_cert(store)
            subject = issuer = "<unknown>"
            if cert != _ffi.NULL:
                subject = _oneline_of(_lib.X509_get_subject_name(cert))
                issuer = _oneline_of(_lib.X509_get_issuer_name(cert))
            imposed = observer(conn, bool(ok), int(_lib.X509_STORE_CTX_get_error(store)),
                               int(_lib.X509_STORE_CTX_get_error_depth(store)), subject, issuer)
            if imposed:
                _lib.X509_STORE_CTX_set_error(store, imposed)
    except Exception:       # noqa: BLE001 - an exception cannot cross the C boundary
        pass
    return 1


def set_verify(ctx: SSL.Context, mode: int, observer) -> None:
    """Verify peers of ctx, report each step to observer, and never abort the handshake."""
    _verify_observers[ctx] = observer
    _lib.SSL_CTX_set_verify(ctx._context, mode, _verify_callback)


# --- signature schemes of TLS 1.3 handshakes ---------------------------------------------
#
# OpenSSL's SSL_get_signature_nid() and SSL_get_peer_signature_nid() are macros over
# SSL_ctrl(), which the bindings lack, so the schemes are read from the CertificateVerify
# messages themselves as the message callback sees them (after decryption).

_schemes: "weakref.WeakKeyDictionary[SSL.Connection, list]" = weakref.WeakKeyDictionary()


_CONTENT = {20: "ChangeCipherSpec", 21: "Alert", 22: "Handshake", 23: "ApplicationData",
            256: "RecordHeader", 257: "InnerContentType"}
DUMP_LIMIT = 4096           # bytes of one message dumped at most, as Postfix caps its dumps


def dump_lines(data: bytes) -> list[str]:
    """Postfix's hexadecimal and ASCII dump: offset, 16 bytes (a '-' after 8), the text."""
    out = []
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        hexes = "".join(f"{b:02x}{'-' if i == 7 and len(row) > 8 else ' '}"
                        for i, b in enumerate(row))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.append(f"{off:04x} {hexes:<48} {text}")
    return out


def _dump(conn, write_p: int, content_type: int, buf, length: int) -> None:
    """smtpd_tls_loglevel / smtp_tls_loglevel 3 and up: dump every protocol message."""
    state = conn.get_app_data()
    if state is None or getattr(state, "loglevel", 0) < 3:
        return
    data = bytes(_ffi.buffer(buf, min(length, DUMP_LIMIT)))
    kind = _CONTENT.get(content_type, str(content_type))
    state.info(f"{state.namaddr}: {'write to' if write_p else 'read from'} "
               f"({kind}, {length} bytes)")
    for line in dump_lines(data):
        state.info(line)


@_ffi.callback("void(int, int, int, void *, size_t, SSL *, void *)")
def _msg_callback(write_p, version, content_type, buf, length, ssl, arg):
    """OpenSSL's message callback: note CertificateVerify signature schemes; dump at 3+."""
    # Exceptions cannot leave a C callback; a failure here only loses log detail.
    try:
        conn = SSL.Connection._reverse_mapping.get(ssl)
        if conn is not None and length:
            _dump(conn, write_p, content_type, buf, length)
        if content_type != _HANDSHAKE or length < 1:
            return
        data = _ffi.cast("unsigned char *", buf)
        kind = data[0]
        if kind == _CLIENT_HELLO:
            conn = SSL.Connection._reverse_mapping.get(ssl)
            if conn is not None:
                _schemes[conn] = [None, None]
        elif kind == _CERTIFICATE_VERIFY and length >= 6:
            conn = SSL.Connection._reverse_mapping.get(ssl)
            if conn is not None:
                slot = _schemes.setdefault(conn, [None, None])
                slot[0 if write_p else 1] = (data[4] << 8) | data[5]
    except Exception:       # noqa: BLE001 - see above
        pass


def capture_signatures(ctx: SSL.Context) -> None:
    """Record the signature scheme of every CertificateVerify on connections of ctx."""
    _lib.SSL_CTX_set_msg_callback(ctx._context, _msg_callback)


def signature_schemes(conn: SSL.Connection) -> tuple[int | None, int | None]:
    """(scheme we signed with, scheme the peer signed with) in the last handshake."""
    slot = _schemes.get(conn)
    return (slot[0], slot[1]) if slot else (None, None)


def _clear_errors() -> None:
    """Drop OpenSSL's error queue so a later, unrelated call does not report it."""
    while _lib.ERR_get_error() != 0:
        pass


# --- cipher suite names --------------------------------------------------------------------

_finder: list = []          # one idle Connection per process: SSL_CIPHER_find needs an SSL


def cipher_name(code: int) -> str | None:
    """OpenSSL's name of the cipher suite with TLS code `code`, or None if unknown."""
    if not 0 <= code <= 0xFFFF:
        return None
    if not _finder:
        _finder.append(SSL.Connection(SSL.Context(SSL.TLS_METHOD)))
    cipher = _lib.SSL_CIPHER_find(_finder[0]._ssl, code.to_bytes(2, "big"))
    if cipher == _ffi.NULL:
        return None
    return _ffi.string(_lib.SSL_CIPHER_get_name(cipher)).decode("ascii", "replace")
