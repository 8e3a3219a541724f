"""DSN (RFC 3461) parameter syntax: NOTIFY, RET, ENVID and ORCPT, as Postfix's dsn_mask.c,
xtext.c and uxtext.c.

smtpd parses the parameters a client gives with MAIL and RCPT into their internal forms,
which the queue file keeps; the smtp client turns them back into parameters for a next hop
that announces DSN.

FUNCTIONS
    notify_mask(text) -> str | None: `NEVER` or a comma list of SUCCESS, FAILURE, DELAY
        (any case, NEVER alone) in Postfix's canonical order; None for bad syntax.
    ret_code(text) -> str | None: FULL or HDRS; None for bad syntax.
    xtext_unquote(text) -> bytes | None; xtext_quote(data: bytes, special) -> str.
    uxtext_unquote(text) -> str | None; uxtext_quote(text, special) -> str (RFC 6533).
    envid(text) -> str | None: an ENVID value decoded (printable ASCII and TAB only).
    orcpt(text) -> str | None: `type;address` decoded (xtext, or uxtext for utf-8).
    orcpt_param(orcpt, address, utf8) -> str: the ORCPT value the smtp client sends:
        the stored one re-encoded, else rfc822;address (utf-8;address when the sender
        asked for SMTPUTF8 and the address is not ASCII), as Postfix's smtp_proto.c.
"""

from __future__ import annotations

import re

NOTIFY_WORDS = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
_UX = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def notify_mask(text: str) -> str | None:
    words = text.upper().split(",")
    if not all(w in NOTIFY_WORDS for w in words) or len(set(words)) != len(words):
        return None
    if "NEVER" in words and len(words) > 1:
        return None
    return ",".join(w for w in NOTIFY_WORDS if w in words)


def ret_code(text: str) -> str | None:
    return text.upper() if text.upper() in ("FULL", "HDRS") else None


def xtext_unquote(text: str) -> bytes | None:
    """xtext: printable ASCII but + and =, with +HH for any other byte."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "+":
            hexpair = text[i + 1:i + 3]
            if len(hexpair) != 2 or not all(h in "0123456789ABCDEFabcdef" for h in hexpair):
                return None
            out.append(int(hexpair, 16))
            i += 3
            continue
        if not "!" <= c <= "~" or c == "=":
            return None
        out.append(ord(c))
        i += 1
    return bytes(out)


def xtext_quote(data: bytes, special: str = "+=") -> str:
    return "".join(chr(b) if 0x21 <= b <= 0x7e and chr(b) not in special + "+"
                   else f"+{b:02X}" for b in data)


def uxtext_unquote(text: str) -> str | None:
    """RFC 6533 utf-8-addr-xtext/unitext: \\x{HEX} for a code point, UTF-8 as it is."""
    out, i = [], 0
    while i < len(text):
        m = _UX.match(text, i)
        if m:
            cp = int(m.group(1), 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                return None
            out.append(chr(cp))
            i = m.end()
            continue
        c = text[i]
        if c in "+=\\" or (c.isascii() and not "!" <= c <= "~") or not c.isprintable():
            return None
        out.append(c)
        i += 1
    return "".join(out)


def uxtext_quote(text: str, special: str = "+=") -> str:
    """As Postfix: every code point but printable ASCII (and \\ and special) is \\x{HEX}."""
    return "".join(c if "!" <= c <= "~" and c not in special + "\\"
                   else f"\\x{{{ord(c):02X}}}" for c in text)


def envid(text: str) -> str | None:
    raw = xtext_unquote(text)
    if raw is None or not all(0x20 <= b <= 0x7e or b == 9 for b in raw):
        return None
    return raw.decode("ascii")


def orcpt(text: str) -> str | None:
    kind, sep, coded = text.partition(";")
    if not sep or not kind or not coded:
        return None
    if kind.lower() == "utf-8":
        addr = uxtext_unquote(coded)
    else:
        raw = xtext_unquote(coded)
        addr = None if raw is None or b"\0" in raw else raw.decode("utf-8", "surrogateescape")
    if addr is None or "\0" in addr:
        return None
    return f"{kind};{addr}"


def orcpt_param(stored: str, address: str, utf8: bool) -> str:
    if not stored:
        kind = "utf-8" if utf8 and not address.isascii() else "rfc822"
        stored = f"{kind};{address}"
    kind, _, addr = stored.partition(";")
    if kind.lower() == "utf-8":
        return f"{kind};{uxtext_quote(addr)}"
    return f"{kind};{xtext_quote(addr.encode('utf-8', 'surrogateescape'), '=')}"
