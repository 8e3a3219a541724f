"""smtpd's XCLIENT and XFORWARD commands, as Postfix 3.7's xclient_cmd and xforward_cmd.

SYNOPSIS
    XCLIENT attribute=value ...     (from smtpd_authorized_xclient_hosts)
    XFORWARD attribute=value ...    (from smtpd_authorized_xforward_hosts)

DESCRIPTION
    XCLIENT lets an authorized SMTP proxy or test tool stand in for another client: NAME,
    REVERSE_NAME, ADDR, PORT, PROTO, HELO, LOGIN, DESTADDR and DESTPORT replace the
    session's client attributes, and the session starts over as Postfix's does: the
    transaction, HELO (unless given), the protocol (unless given) and AUTH (unless LOGIN
    is given) are forgotten, the connect restrictions run again for the new client, and
    the answer is a new `220` greeting. Whether the new client may use XCLIENT is
    decided again from its own attributes. LOGIN=user is an authentication with
    sasl_method XCLIENT, even with smtpd_sasl_auth_enable = no.

    XFORWARD lets an authorized content filter or relay pass on the original client of
    the next message: NAME, ADDR, PORT, PROTO, HELO, IDENT and SOURCE are recorded in
    the queue file (log_client_name, log_client_address, log_client_port,
    log_message_origin, log_helo_name, log_protocol_name, log_ident, rewrite_context) and
    logged as `ID: client=NAME[ADDR], orig_queue_id=IDENT, orig_client=NAME[ADDR]`; they
    last until the end of the transaction (as Postfix's smtpd_xforward_reset).

    Attribute values are xtext (RFC 3461; a value that is not valid xtext is taken as
    written, as Postfix 2.2 sent them), at most 255 characters; characters that are not
    printable become `?`, and those that could break a header (space < > ( ) \\ " ; @)
    too where Postfix neuters them. `[UNAVAILABLE]` and `[TEMPUNAVAIL]` mean unknown.
    Both commands are announced in EHLO only to the clients that may use them.

REPLIES
    503 5.5.1 Error: MAIL transaction in progress
    501 5.5.4 Syntax: XCLIENT attribute=value...
    550 5.7.0 Error: insufficient authorization
    501 5.5.4 Error: attribute=value expected / Error: attribute value too long
    501 5.5.4 Bad NAME syntax: VALUE (and ADDR, PORT, HELO, PROTO, ...)
    501 5.5.4 Bad XCLIENT attribute name: NAME
    250 2.0.0 Ok (XFORWARD)

CONFIGURATION PARAMETERS
    smtpd_authorized_xclient_hosts (empty), smtpd_authorized_xforward_hosts (empty):
    client lists as mynetworks (smtpd/check.py's NetworkList).

SEE ALSO
    smtpd/session.py; Postfix XCLIENT_README, XFORWARD_README, smtpd(8).
"""

from __future__ import annotations

import ipaddress
import re

from ..lib import msg

UNAVAILABLE, TEMPORARY = "[UNAVAILABLE]", "[TEMPUNAVAIL]"
XCLIENT_KEYWORDS = "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT"
XFORWARD_KEYWORDS = "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"
NEUTER = str.maketrans({c: "?" for c in " <>()\\\";@"})
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")


def xtext_unquote(raw: str) -> str:
    """RFC 3461 xtext to text; raw as it is when it is not valid xtext (Postfix 2.2)."""
    out, i = [], 0
    while i < len(raw):
        if raw[i] == "+":
            code = raw[i + 1:i + 3]
            if len(code) != 2 or not all(ch in "0123456789ABCDEFabcdef" for ch in code):
                return raw
            out.append(chr(int(code, 16)))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return "".join(out)


def masked(text: str) -> str:
    """Postfix's printable(value, '?')."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname: labels of letters, digits, - and _, 255 at most, not
    all-numeric."""
    if not name or len(name) > 255:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if not all(_LABEL.match(label) and len(label) <= 63 for label in labels):
        return False
    return not all(label.isdigit() for label in labels)


def mailhost_addr(text: str) -> tuple[str, str] | None:
    """Postfix's normalize_mailhost_addr: (bare address, address as in a Received
    header: IPv6:...), a v4-mapped IPv6 address as IPv4; None when it is no address."""
    try:
        if text[:5].lower() == "ipv6:":
            ip = ipaddress.IPv6Address(text[5:])
        else:
            ip = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    bare = str(ip)
    return bare, ("IPv6:" + bare if ip.version == 6 else bare)


def valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def parse_attributes(session, arg: str, verb: str):
    """The attribute=value pairs of XCLIENT/XFORWARD after the common checks, or None
    after the error reply (as the start of Postfix's xclient_cmd/xforward_cmd)."""
    if session.sender is not None:
        session.reply("503 5.5.1 Error: MAIL transaction in progress")
        return None
    words = arg.split()
    if not words:
        session.reply(f"501 5.5.4 Syntax: {verb} attribute=value...")
        return None
    param = f"smtpd_authorized_{verb.lower()}_hosts"
    if not session._in_list(param):
        session.reply("550 5.7.0 Error: insufficient authorization")
        return None
    pairs = []
    for word in words:
        name, eq, raw = word.partition("=")
        if not eq or not raw:
            session.reply("501 5.5.4 Error: attribute=value expected")
            return None
        if len(raw) > 255:
            session.reply("501 5.5.4 Error: attribute value too long")
            return None
        pairs.append((name.upper(), name, masked(xtext_unquote(raw))))
    return pairs


def ehlo_keywords(session) -> list[str]:
    """XCLIENT and XFORWARD, for the clients that may use them."""
    words = []
    if session._in_list("smtpd_authorized_xclient_hosts"):
        words.append(XCLIENT_KEYWORDS)
    if session._in_list("smtpd_authorized_xforward_hosts"):
        words.append(XFORWARD_KEYWORDS)
    return words


def xclient_cmd(session, arg: str) -> bool:
    """XCLIENT: the session becomes the given client's, and greets it anew."""
    pairs = parse_attributes(session, arg, "XCLIENT")
    if pairs is None:
        return False
    c = session.client
    new = {}
    got_helo = got_proto = got_login = False
    for key, name, value in pairs:
        if key in ("NAME", "REVERSE_NAME"):
            status = {UNAVAILABLE: "perm", TEMPORARY: "temp"}.get(value, "ok")
            if status != "ok":
                value = "unknown"
            elif not valid_hostname(value):
                return _bad(session, key, value)
            if key == "NAME":
                new["name"], new["name_status"] = value, status
                if status == "ok":
                    new["reverse_name"], new["reverse_status"] = value, status
            else:
                new["reverse_name"], new["reverse_status"] = value, status
        elif key == "ADDR":
            if value == UNAVAILABLE:
                new["addr"] = "unknown"
            else:
                value = value.translate(NEUTER)
                norm = mailhost_addr(value)
                if norm is None:
                    return _bad(session, key, value)
                new["addr"] = norm[0]
        elif key in ("PORT", "DESTPORT"):
            if value == UNAVAILABLE:
                value = "unknown"
            elif not valid_port(value):
                return _bad(session, key, value)
            new[key] = value
        elif key == "HELO":
            if value == UNAVAILABLE:
                value = None
            elif len(value) > 255:
                return _bad(session, key, value)
            else:
                value = value.translate(NEUTER)
            new["helo"], got_helo = value, True
        elif key == "PROTO":
            if value.upper() not in ("SMTP", "ESMTP"):
                return _bad(session, key, value)
            new["esmtp"], got_proto = value.upper() == "ESMTP", True
        elif key == "LOGIN":
            if value != UNAVAILABLE:
                new["login"], got_login = value, True
        elif key == "DESTADDR":
            if value == UNAVAILABLE:
                new[key] = "unknown"
            else:
                value = value.translate(NEUTER)
                norm = mailhost_addr(value)
                if norm is None:
                    return _bad(session, key, value)
                new[key] = norm[0]
        else:
            session.reply(f"501 5.5.4 Bad XCLIENT attribute name: {name}")
            return False
    # The connection's anvil registration belongs to the old client (smtpd/limits.py).
    session.limits.disconnect()
    for field in ("name", "name_status", "reverse_name", "reverse_status", "addr"):
        if field in new:
            setattr(c, field, new[field])
    if "PORT" in new:
        session.client_port = new["PORT"]
    if "DESTADDR" in new:
        session.server_addr = new["DESTADDR"]
    if "DESTPORT" in new:
        session.server_port = new["DESTPORT"]
    c.deferred = {}
    session.reset()
    session.xforward = {}
    session.helo = c.helo = new.get("helo") if got_helo else None
    session.esmtp = new.get("esmtp", False) if got_proto else False
    session.pipelining_ok = session.esmtp
    c.sasl_username = new["login"] if got_login else None
    session.sasl_method = "XCLIENT" if got_login else None
    session.bare_lf = session._bare_newline_mode()
    session.sasl_exempt = session._sasl_exempt()
    session.access_denied = None
    if session.limits_for is not None:
        session.limits = session.limits_for(c)
    msg.verbose(1, f"XCLIENT: client is now {c.client}")
    session.greet()
    return True


def _bad(session, key: str, value: str) -> bool:
    session.reply(f"501 5.5.4 Bad {key} syntax: {value}")
    return False


# XFORWARD attribute -> the session.xforward key and how the value is checked.
_XFORWARD_CLIENT = ("NAME", "ADDR", "PORT", "PROTO", "HELO")


def xforward_cmd(session, arg: str) -> bool:
    """XFORWARD: remember the original client of the next message (Postfix's
    xforward_cmd); the attributes last until the end of the transaction."""
    pairs = parse_attributes(session, arg, "XFORWARD")
    if pairs is None:
        return False
    xf = session.xforward
    if not xf:      # smtpd_xforward_preset: unknown, HELO and IDENT absent
        xf.update(NAME="unknown", ADDR="unknown", RFC_ADDR="unknown", PORT="unknown",
                  PROTO="unknown")
    for key, name, value in pairs:
        if key == "NAME":
            if value == UNAVAILABLE:
                value = "unknown"
            else:
                value = value.translate(NEUTER)
                if not valid_hostname(value):
                    return _bad(session, key, value)
        elif key == "ADDR":
            if value == UNAVAILABLE:
                xf["RFC_ADDR"] = value = "unknown"
            else:
                value = value.translate(NEUTER)
                norm = mailhost_addr(value)
                if norm is None:
                    return _bad(session, key, value)
                value, xf["RFC_ADDR"] = norm
        elif key == "PORT":
            if value == UNAVAILABLE:
                value = "unknown"
            elif not valid_port(value):
                return _bad(session, key, value)
        elif key in ("HELO", "IDENT"):
            value = None if value == UNAVAILABLE else value.translate(NEUTER)
        elif key == "PROTO":
            if value == UNAVAILABLE:
                value = "unknown"
            elif len(value) > 64:
                return _bad(session, key, value)
            else:
                value = value.translate(NEUTER)
        elif key == "SOURCE":
            if value == UNAVAILABLE:
                value = "LOCAL"
            if value.upper() not in ("LOCAL", "REMOTE"):
                return _bad(session, key, value)
            value = value.lower()
        else:
            session.reply(f"501 5.5.4 Bad XFORWARD attribute name: {name}")
            return False
        xf[key] = value
        xf.setdefault("given", set()).add(key)
    session.reply("250 2.0.0 Ok")
    return True


def _forwarded_namaddr(xf: dict) -> str:
    """name[addr], or the name alone without an address (Postfix's xforward.namaddr)."""
    if xf["ADDR"] != "unknown":
        return f"{xf['NAME']}[{xf['ADDR']}]"
    return xf["NAME"]


def queue_attrs(session, writer) -> None:
    """The client port and the XFORWARD attributes of this transaction into the queue
    file, as Postfix's mail_open_stream (log_client_* for logging and for XFORWARD on
    the next hop)."""
    if session.client_port:
        writer.add_attr("client_port", session.client_port)
    xf = session.xforward
    given = xf.get("given", set()) if xf else set()
    if given & set(_XFORWARD_CLIENT):
        writer.add_attr("log_client_name", xf["NAME"])
        writer.add_attr("log_client_address", xf["RFC_ADDR"])
        writer.add_attr("log_client_port", xf["PORT"])
        writer.add_attr("log_message_origin", _forwarded_namaddr(xf))
        if xf.get("HELO"):
            writer.add_attr("log_helo_name", xf["HELO"])
        writer.add_attr("log_protocol_name", xf["PROTO"])
    if xf.get("IDENT"):
        writer.add_attr("log_ident", xf["IDENT"])
    if "SOURCE" in given:
        writer.add_attr("rewrite_context", xf["SOURCE"])


def log_suffix(session) -> str:
    """`, orig_queue_id=ID, orig_client=NAME[ADDR]` for the `ID: client=` log line."""
    xf = session.xforward
    if not xf:
        return ""
    text = f", orig_queue_id={xf['IDENT']}" if xf.get("IDENT") else ""
    if xf.get("given", set()) & set(_XFORWARD_CLIENT):
        text += f", orig_client={_forwarded_namaddr(xf)}"
    return text
