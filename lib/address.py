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
    header_address_spans(value, token_limit) -> [(start, end)]: where the addr-specs of
        an address-list header value are (RFC 5322: name <addr>, bare addr, groups,
        comments, quoted strings, [literals]), for cleanup's header address rewriting
        (Postfix's tok822_parse_limit + tok822_grep(TOK822_ADDR)). Only the first
        token_limit tokens (atoms, specials, quoted strings, comments) are looked at,
        as Postfix's header_address_token_limit; the empty address <> and a source route
        are not addresses to rewrite.
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


_SPECIALS = "()<>@,;:\\\".[]"


def header_address_spans(value: str, token_limit: int) -> list[tuple[int, int]]:
    """The (start, end) spans of the addresses in an address-list header value."""
    spans: list[tuple[int, int]] = []
    tokens = 0
    # Per item: the text positions outside comments, and the last top-level <...>.
    content: list[int] = []
    angle: tuple[int, int] | None = None
    angle_open = -1

    def end_item() -> None:
        nonlocal angle, content
        if angle is not None:
            start, end = angle
            text = value[start:end].strip()
            ok = bool(text) and not text.startswith("@")
        else:
            kept = [i for i in content if not value[i].isspace()]
            # a bare addr-spec: one run of text, no comment inside it
            if not kept or "(" in value[kept[0]:kept[-1]]:
                angle, content = None, []
                return
            start, end = kept[0], kept[-1] + 1
            text = value[start:end]
            ok = "@" in text and not text.startswith("@") or _is_word(text)
        if ok:
            lead = len(value[start:end]) - len(value[start:end].lstrip())
            spans.append((start + lead, start + lead + len(text)))
        angle, content = None, []

    i, n = 0, len(value)
    while i < n:
        if tokens > token_limit:         # a token past the limit: its item is cut
            return spans
        c = value[i]
        if c == "(":                            # a comment, nested
            depth, i = 1, i + 1
            while i < n and depth:
                if value[i] == "\\":
                    i += 1
                elif value[i] == "(":
                    depth += 1
                elif value[i] == ")":
                    depth -= 1
                i += 1
            tokens += 1
            continue
        if c == '"':                            # a quoted string
            start, i = i, i + 1
            while i < n and value[i] != '"':
                i += 2 if value[i] == "\\" else 1
            i = min(i + 1, n)
            content.extend(range(start, i))
            tokens += 1
            continue
        if c == "[":                            # a domain literal
            start = i
            close = value.find("]", i)
            i = n if close < 0 else close + 1
            content.extend(range(start, i))
            tokens += 1
            continue
        if angle_open >= 0:                     # inside <...>
            if c == ">":
                angle, angle_open = (angle_open + 1, i), -1
                tokens += 1
            elif c in _SPECIALS:
                tokens += 1
            i += 1
            continue
        if c == "<":
            angle_open = i
            tokens += 1
        elif c in ",;":
            end_item()
            tokens += 1
        elif c == ":":                          # a group's name ends
            tokens += 1
            angle, content = None, []
        elif c in _SPECIALS:
            tokens += 1
            content.append(i)
        else:
            if not c.isspace() and (i == 0 or value[i - 1].isspace()
                                    or value[i - 1] in _SPECIALS):
                tokens += 1
            content.append(i)
        i += 1
    if angle_open < 0 and tokens <= token_limit:
        end_item()
    return spans


def _is_word(text: str) -> bool:
    """A bare local part (no @): one atom or quoted string, to be qualified."""
    return not any(c.isspace() or c in "()<>,;:[]" for c in text) or \
        (text.startswith('"') and text.endswith('"'))
