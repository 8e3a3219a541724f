"""The smtp client's XFORWARD: the original client of a message, to the next hop.

SYNOPSIS
    client = xforward.client_attributes(queue_message.attrs, queue_id)
    for where, what, line in xforward.commands(announced, client): ...

DESCRIPTION
    With smtp_send_xforward_command = yes, when the server announces XFORWARD (as a
    content filter or an internal relay does to its authorized clients), the client
    sends the attributes of the message's original client before MAIL FROM, as Postfix's
    smtp_proto.c: one `XFORWARD NAME= ADDR= PORT=` command and one `XFORWARD PROTO= HELO=
    IDENT= SOURCE=` command, each with the attributes the server announced and the
    message has, values in xtext. A command that has nothing to send is not sent (a
    local submission has no client). A reply other than 2xx is logged as Postfix's
    `warning: host HOST said: TEXT (in reply to XFORWARD name/address command)` and the
    delivery goes on.

    The attributes come from the queue file: the forwarded ones smtpd recorded for an
    XFORWARD (log_client_name, log_client_address, log_client_port,
    log_protocol_name, log_helo_name, log_ident, rewrite_context), else the client's
    own (client_name, client_address, client_port, protocol, helo_name) with the queue
    ID as IDENT; SOURCE is REMOTE for mail from a network client.

CONFIGURATION PARAMETERS
    smtp_send_xforward_command (no), smtp_xforward_timeout (300s).

SEE ALSO
    smtp/session.py, smtpd/xclient.py; Postfix XFORWARD_README, smtp(8).
"""

from __future__ import annotations

NAME_ADDR = ("NAME", "ADDR", "PORT")
PROTO_HELO = ("PROTO", "HELO", "IDENT", "SOURCE")
# (what the client was doing, the request), as Postfix's xfer_states and xfer_request
WHERE = {NAME_ADDR: ("sending XFORWARD name/address", "XFORWARD name/address"),
         PROTO_HELO: ("sending XFORWARD protocol/helo_name", "XFORWARD helo/protocol")}


def xtext(value: str) -> str:
    """RFC 3461 xtext: + = and characters outside ! to ~ as +XX."""
    return "".join(f"+{ord(c):02X}" if c in "+=" or not "!" <= c <= "~" else c
                   for c in value)


def client_attributes(attrs: dict, queue_id: str) -> dict:
    """The original client of a queued message, as XFORWARD attribute -> value."""
    remote = "client_address" in attrs or "log_client_address" in attrs
    addr = attrs.get("log_client_address")
    if addr is None:
        addr = attrs.get("client_address")
        if addr and ":" in addr:
            addr = "IPv6:" + addr           # the form of Postfix's rfc_addr
    out = {"NAME": attrs.get("log_client_name", attrs.get("client_name")),
           "ADDR": addr,
           "PORT": attrs.get("log_client_port", attrs.get("client_port")),
           "PROTO": attrs.get("log_protocol_name", attrs.get("protocol")),
           "HELO": attrs.get("log_helo_name", attrs.get("helo_name")),
           "IDENT": attrs.get("log_ident", queue_id),
           "SOURCE": attrs.get("rewrite_context", "remote" if remote else "local")}
    return {k: v for k, v in out.items() if v}


def _sendable(key: str, value: str | None) -> bool:
    """Postfix's CAN_FORWARD_*: NAME, ADDR, PORT and PROTO only when known."""
    if value is None:
        return False
    return key not in ("NAME", "ADDR", "PORT", "PROTO") or value.lower() != "unknown"


def commands(announced: set[str], client: dict) -> list[tuple[str, str, str]]:
    """(where, what, command line) for the XFORWARD commands to send before MAIL."""
    out = []
    for group in (NAME_ADDR, PROTO_HELO):
        words = []
        for key in group:
            value = client.get(key)
            if key in announced and _sendable(key, value):
                if key == "SOURCE":
                    value = "LOCAL" if value == "local" else "REMOTE"
                words.append(f"{key}={xtext(value)}")
        if words:
            out.append((*WHERE[group], "XFORWARD " + " ".join(words)))
    return out
