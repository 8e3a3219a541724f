"""SASL pieces that the server (smtpd) and the client (smtp, lmtp) share, and init uses.

Security options: the words of smtpd_sasl_security_options, smtpd_sasl_tls_security_options,
smtp_sasl_security_options, smtp_sasl_tls_security_options (and lmtp_*), and the mechanism
properties each refuses (noplaintext, noactive, nodictionary, noanonymous) or requires
(forward_secrecy, mutual_auth), with Dovecot's names for those properties
(xsasl_dovecot_server.c), as both sides check a mechanism against them.

Password schemes: the password fields of a Dovecot-style passwd-file, as smtpd's builtin
SASL checks them and `postfix-py init` writes them. Schemes: SHA512-CRYPT, SHA256-CRYPT
(crypt(3) `$6$`, `$5$`, computed here with hashlib), BLF-CRYPT (bcrypt `$2y$`/`$2b$`/`$2a$`,
with the bcrypt package), CRYPT (one of those, told by its `$id$`), PLAIN and CLEARTEXT; a
field without `{SCHEME}` is CRYPT, as Dovecot's default.

FUNCTIONS
    security_options(words, name) -> frozenset of option words; ConfigError naming the
        parameter `name` for an unknown one.
    allowed(props, options) -> bool: whether a mechanism with these (Dovecot-named)
        properties passes the options.
    verify_password(password, stored) -> bool, for one passwd-file password field; an
        unsupported scheme or hash format is False, with a warning.
    sha_crypt(password, setting) -> the crypt(3) string of a `$5$`/`$6$` setting;
        ValueError for anything else.
    hash_password(password) -> `{SHA512-CRYPT}$6$salt$hash` with 16 random salt characters.

SECURITY
    Passwords and hashes are never logged; comparisons take constant time (hmac).

SEE ALSO
    smtpd/sasl.py (server), smtp/sasl.py (client), master/init.py; Postfix SASL_README,
    Dovecot's password schemes documentation.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import bcrypt

from . import msg
from .maincf import ConfigError

# Security options (main.cf) and the mechanism properties they refuse or require, with
# Dovecot's names for those properties (xsasl_dovecot_server.c).
NEGATIVE = {"noplaintext": "plaintext", "noactive": "active",
            "nodictionary": "dictionary", "noanonymous": "anonymous"}
POSITIVE = {"forward_secrecy": "forward-secrecy", "mutual_auth": "mutual-auth"}


def security_options(words: list[str], name: str) -> frozenset[str]:
    """The properties named by a *_sasl_*security_options list; ConfigError if unknown."""
    out = set()
    for word in words:
        low = word.lower()
        if low not in NEGATIVE and low not in POSITIVE:
            raise ConfigError(f"unknown {name} value \"{word}\" in \"{' '.join(words)}\"")
        out.add(low)
    return frozenset(out)


def allowed(props: frozenset[str], options: frozenset[str]) -> bool:
    """Whether a mechanism with these (Dovecot-named) properties passes the options."""
    if any(NEGATIVE[o] in props for o in options if o in NEGATIVE):
        return False
    return all(POSITIVE[o] in props for o in options if o in POSITIVE)


# --- password schemes ---------------------------------------------------------------------
_SCHEME = re.compile(r"^\{([A-Za-z0-9._-]+)\}(.*)$", re.S)


def verify_password(password: bytes, stored: str) -> bool:
    """Whether password matches one passwd-file password field ({SCHEME}hash)."""
    m = _SCHEME.match(stored)
    scheme, value = (m.group(1).upper(), m.group(2)) if m else ("CRYPT", stored)
    if scheme in ("PLAIN", "CLEARTEXT"):
        return hmac.compare_digest(password, value.encode("utf-8", "surrogateescape"))
    if scheme not in ("CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT"):
        msg.warn(f"SASL builtin: unsupported password scheme {{{scheme}}}")
        return False
    if value.startswith(("$5$", "$6$")):
        if scheme not in ("CRYPT", "SHA512-CRYPT" if value[1] == "6" else "SHA256-CRYPT"):
            return False
        try:
            computed = sha_crypt(password, value)
        except ValueError:
            return False
        return hmac.compare_digest(computed.encode(), value.encode())
    if value.startswith(("$2y$", "$2b$", "$2a$")) and scheme in ("CRYPT", "BLF-CRYPT"):
        # crypt_blowfish (Dovecot) uses the first 72 bytes; the bcrypt package refuses more.
        try:
            return bcrypt.checkpw(password[:72], value.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
    if scheme != "CRYPT" or value:
        msg.warn(f"SASL builtin: unsupported {scheme} hash format")
    return False


_CRYPT64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROUNDS_DEFAULT, _ROUNDS_MIN, _ROUNDS_MAX = 5000, 1000, 999999999


def _b64_from_24bit(b2: int, b1: int, b0: int, n: int) -> str:
    w = (b2 << 16) | (b1 << 8) | b0
    out = []
    for _ in range(n):
        out.append(_CRYPT64[w & 0x3F])
        w >>= 6
    return "".join(out)


def sha_crypt(password: bytes, setting: str) -> str:
    """crypt(3) with `$5$` (SHA-256) or `$6$` (SHA-512), as Ulrich Drepper specified it.

    setting is `$6$salt`, `$6$rounds=N$salt` or a whole hash (whose tail is ignored);
    ValueError for anything else.
    """
    if setting.startswith("$6$"):
        algo, size = hashlib.sha512, 64
    elif setting.startswith("$5$"):
        algo, size = hashlib.sha256, 32
    else:
        raise ValueError("not a SHA-crypt setting")
    rest = setting[3:]
    rounds, explicit = _ROUNDS_DEFAULT, False
    if rest.startswith("rounds="):
        text, sep, rest = rest[7:].partition("$")
        if not sep or not text.isdigit():
            raise ValueError("bad rounds")
        rounds = min(max(int(text), _ROUNDS_MIN), _ROUNDS_MAX)
        explicit = True
    salt_text = rest.split("$", 1)[0][:16]
    salt = salt_text.encode("ascii", "strict")
    pw = password
    b = algo(pw + salt + pw).digest()
    a = algo(pw + salt)
    n = len(pw)
    while n > size:
        a.update(b)
        n -= size
    a.update(b[:n])
    n = len(pw)
    while n:
        a.update(b if n & 1 else pw)
        n >>= 1
    a_digest = a.digest()
    dp = algo(pw * len(pw)).digest()
    p = (dp * (len(pw) // size + 1))[:len(pw)]
    ds = algo(salt * (16 + a_digest[0])).digest()
    s = (ds * (len(salt) // size + 1))[:len(salt)]
    c = a_digest
    for i in range(rounds):
        h = algo(p if i & 1 else c)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    out = []
    if size == 64:
        for i in range(21):
            x, y, z = i, i + 21, i + 42
            order = ((x, y, z), (y, z, x), (z, x, y))[i % 3]
            out.append(_b64_from_24bit(c[order[0]], c[order[1]], c[order[2]], 4))
        out.append(_b64_from_24bit(0, 0, c[63], 2))
    else:
        for i in range(10):
            x, y, z = i, i + 10, i + 20
            order = ((x, y, z), (z, x, y), (y, z, x))[i % 3]
            out.append(_b64_from_24bit(c[order[0]], c[order[1]], c[order[2]], 4))
        out.append(_b64_from_24bit(0, c[31], c[30], 3))
    head = setting[:3] + (f"rounds={rounds}$" if explicit else "")
    return f"{head}{salt_text}${''.join(out)}"


def hash_password(password: str) -> str:
    """A passwd-file password field for password: SHA512-CRYPT, 16 random salt chars."""
    salt = "".join(secrets.choice(_CRYPT64) for _ in range(16))
    return "{SHA512-CRYPT}" + sha_crypt(password.encode("utf-8"), "$6$" + salt)
