"""Address parts: the local part, the domain and the address extension of a recipient.

qmgr's resolver, local delivery and postqueue's listing split addresses the same way,
as Postfix's trivial-rewrite and local(8) do: at the last `@`, and the extension at the
first recipient_delimiter character that is not the first character of the local part.

FUNCTIONS
    split_address(address) -> (localpart, domain); the domain lower-cased without a
        final dot, "" when the address has no `@`.
    strip_extension(localpart, delimiters) -> localpart without its extension (user+ext
        -> user, for any of the characters in delimiters; unchanged when delimiters is "").
    addr_find(tables, address, delimiters) -> (value, table) or None: Postfix's
        mail_addr_find() search order for a domain that is not local, as virtual(8)
        documents it: user+ext@domain, then user@domain, then @domain (the catch-all);
        regexp: and pcre: tables see the full address only. The first table with an
        answer wins. A table failure raises (lib/tables.py's TableError). localpart=True
        (a local domain: Postfix's MA_FIND_LOCALPART_IF_LOCAL) also tries user+ext and
        user before @domain.
    virtual_mailbox_known(maps, address, delimiters) -> bool: whether
        virtual_mailbox_maps (the opened tables) has the recipient (full address, any
        case), by addr_find; smtpd's "User unknown in virtual mailbox table" check.

SEE ALSO
    lib/resolve.py, local/service.py, virtual/service.py, tools/postqueue.py; Postfix postconf(5)
    recipient_delimiter.
"""

from __future__ import annotations


def split_address(address: str) -> tuple[str, str]:
    """Split at the last @: (localpart, domain); the domain lower-cased, without a final dot."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def strip_extension(local: str, delimiters: str) -> str:
    """user+ext -> user, for any of the recipient_delimiter characters."""
    cut = [i for i in (local.find(c) for c in delimiters) if i > 0]
    return local[:min(cut)] if cut else local


PATTERN_TABLES = ("regexp", "pcre")


def addr_find(tables, address: str, delimiters: str, localpart: bool = False):
    """(value, table) of the first table that knows the address, in Postfix's order."""
    local, domain = split_address(address)
    keys = [address]
    base = strip_extension(local, delimiters) if delimiters else local
    if domain and base != local:
        keys.append(f"{base}@{domain}")
    if localpart:
        keys += [local] if base == local else [local, base]
    if domain:
        keys.append(f"@{domain}")
    for table in tables:
        for key in keys[:1] if table.type in PATTERN_TABLES else keys:
            value = table.lookup(key)
            if value is not None:
                return value, table
    return None


def virtual_mailbox_known(maps, address: str, delimiters: str) -> bool:
    """Whether the virtual_mailbox_maps tables have a mailbox for address."""
    return addr_find(maps, address.lower(), delimiters) is not None
