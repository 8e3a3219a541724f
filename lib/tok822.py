"""tok822: RFC 822 address lists as token trees, and Postfix's quoting of local parts.

cleanup rewrites the addresses in From:, To: and the other address headers as Postfix's
cleanup does: the header value is parsed into a token tree (Postfix's tok822_parse_limit),
each address node is rewritten, and a header in which an address changed is generated
again from the tree (tok822_externalize with TOK822_STR_HEAD: one address per line) and
folded (cleanup_fold_header). This module is a port of those routines (global/tok822_*.c,
global/quote_822_local.c) so that the result is the bytes Postfix writes: comments move
after the address they follow or precede, white space between tokens is normalised, a
missing comma between two addresses is added, a quoted string is written with Postfix's
escapes.

Text is a str whose characters are the header's bytes (latin-1 decoded), so that lengths,
the 250-byte limit on non-address text and the 70-column folding count bytes as Postfix's
do; to_bytes()/from_bytes() convert an address between that and UTF-8 text.

FUNCTIONS
    Token(type, text=""): one token; type is an operator character's code or ATOM,
        QSTRING, COMMENT, DOMLIT, ADDR (a group with head/tail members), STARTGRP.
    scan(text, limit=0) -> (head, tail): the tokens of text (tok822_scan_limit); at most
        limit tokens when limit > 0. (None, None) for text without tokens.
    parse(text, limit=0) -> head: the parse tree of an address list (tok822_parse_limit):
        each address is an ADDR node in the top-level list, comments moved aside.
    addresses(head) -> [Token]: the top-level ADDR nodes (tok822_grep).
    externalize(head, flags=STR_DEFL) -> str: the tree as text with addresses quoted
        (quote_822_local); STR_LINE puts a newline after each comma, STR_TRNC replaces an
        address expression by <address> when its other text exceeds 250 bytes.
    internalize(head) -> str: the tree as text, addresses unquoted.
    set_address(node, text): replace an ADDR node's members by the tokens of text.
    tokens(head) -> [Token], relink([Token]) -> head: a linked list as a Python list and
        back.
    is_dot_string(local) -> bool: whether a local part needs no quotes.
    quote_822_local(address) -> str: the local part (before the last @, after a source
        route) as a quoted-string when it is not a dot-string (8-bit clean).
    unquote_822_local(address) -> str: quotes and backslashes removed before the last
        unquoted @.
    fold_header(text, limit=0) -> [str]: cleanup_fold_header and cleanup_out_header: the
        lines of a regenerated header ("Name: a,\\nb,\\nc"), addresses joined while a
        line stays under 70 bytes, continuation lines starting with a tab, the whole
        within limit bytes (header_size_limit) when given.

SEE ALSO
    lib/cleanup.py, lib/resolve.py; Postfix global/tok822_parse.c, tok822_tree.c,
    quote_822_local.c, cleanup/cleanup_message.c.
"""

from __future__ import annotations

import re

from . import msg

ATOM, QSTRING, COMMENT, DOMLIT, ADDR, STARTGRP = 256, 257, 258, 259, 260, 261
STR_NONE, STR_WIPE, STR_TERM, STR_LINE, STR_TRNC = 0, 1, 2, 4, 8
STR_DEFL = STR_WIPE | STR_TERM
STR_HEAD = STR_TERM | STR_LINE | STR_TRNC
MAX_NONADDR_LENGTH = 250
FOLD_WIDTH = 70

_SPACE = " \t\r\n"
# Postfix's tok822_opchar: "|%!" and RFC 822's specials
_OPCHAR = frozenset("|%!()<>@,;:\\\".[]")
_DO_WORD, _DO_GROUP = 1, 2
# what scan takes in one step when no backslash is in the way
_ATOM_RUN = re.compile(r'[^ \t\r\n|%!()<>@,;:\\".\[\]]+')
_QSTRING_RUN = re.compile(r'([^"\\]*)"')
_SPACES = str.maketrans("\t\r\n", "   ")
_NON_OPERATOR = frozenset((ATOM, QSTRING, COMMENT, DOMLIT, ADDR))


class Token:
    """One token; an ADDR token's members are the list head..tail."""

    __slots__ = ("type", "text", "prev", "next", "head", "tail", "owner")

    def __init__(self, type_: int, text: str = ""):
        self.type = type_
        self.text = text
        self.prev = self.next = self.head = self.tail = self.owner = None

    def __repr__(self) -> str:
        kind = {ATOM: "atom", QSTRING: "qstring", COMMENT: "comment", DOMLIT: "domlit",
                ADDR: "addr", STARTGRP: "group"}.get(self.type, chr(self.type or 32))
        inner = internalize(self.head) if self.type == ADDR else self.text
        return f"<{kind} {inner!r}>"


# --- list operations (tok822_tree.c) ---------------------------------------------------

def _append(t1: Token, t2: Token) -> Token:
    """Insert the list t2 after t1; the end of the inserted list."""
    nxt = t1.next
    t1.next, t2.prev = t2, t1
    t2.owner = t1.owner
    while t2.next:
        t2 = t2.next
        t2.owner = t1.owner
    t2.next = nxt
    if nxt:
        nxt.prev = t2
    return t2


def _prepend(t1: Token, t2: Token) -> Token:
    """Insert the list t2 before t1; the end of the inserted list."""
    prev = t1.prev
    if prev:
        prev.next = t2
    t2.prev = prev
    t2.owner = t1.owner
    while t2.next:
        t2 = t2.next
        t2.owner = t1.owner
    t2.next, t1.prev = t1, t2
    return t2


def _cut_before(tp: Token):
    prev = tp.prev
    if prev:
        prev.next = None
        tp.prev = None
    return prev


def _unlink(tp: Token):
    prev, nxt = tp.prev, tp.next
    if prev:
        prev.next = nxt
    if nxt:
        nxt.prev = prev
    tp.prev = tp.next = None
    return prev


def _sub_append(t1: Token, t2: Token) -> Token:
    if t1.head:
        t1.tail = _append(t1.tail, t2)
        return t1.tail
    t1.head = t2
    t2.owner = t1
    while t2.next:
        t2 = t2.next
        t2.owner = t1
    t1.tail = t2
    return t2


# --- scanning and parsing (tok822_parse.c) ----------------------------------------------

def _collect(text: str, i: int, stop) -> tuple[str, int]:
    """Postfix's COLLECT: characters up to one in stop (a backslash escapes the next
    one; white space becomes a space)."""
    out, n = [], len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 1
            if i >= n:
                break
            c = text[i]
        elif stop(c):
            break
        out.append(" " if c in _SPACE else c)
        i += 1
    return "".join(out), i


def _comment(text: str, i: int) -> tuple[str, int]:
    """A comment from after its "(": kept in external form, nesting and escapes."""
    out, level, n = ["("], 1, len(text)
    while i < n:
        c = text[i]
        out.append(c)
        i += 1
        if c == "(":
            level += 1
        elif c == ")":
            level -= 1
            if level == 0:
                break
        elif c == "\\":
            if i >= n:
                break
            out.append(text[i])
            i += 1
    return "".join(out), i


def _is_atom_stop(c: str) -> bool:
    return c in _SPACE or c in _OPCHAR


def scan(text: str, limit: int = 0):
    """The tokens of text, as (head, tail); at most limit tokens when limit > 0."""
    head = tail = None
    count, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if c in _SPACE:
            continue
        if c == "(":
            body, i = _comment(text, i)
            tp = Token(COMMENT, body)
        elif c == "[":
            body, i = _collect(text, i, lambda ch: ch == "]")
            i += i < n
            tp = Token(DOMLIT, body)
        elif c == '"':
            m = _QSTRING_RUN.match(text, i)         # no backslash (nearly always)
            if m:
                body, i = m.group(1).translate(_SPACES), m.end()
            else:
                body, i = _collect(text, i, lambda ch: ch == '"')
                i += i < n
            tp = Token(QSTRING, body)
        elif c != "\\" and c in _OPCHAR:
            tp = Token(ord(c))
        else:
            m = _ATOM_RUN.match(text, i - 1)
            if m and (m.end() == n or text[m.end()] != "\\"):
                body, i = m.group(), m.end()
            else:
                body, i = _collect(text, i - 1, _is_atom_stop)
            # an atom with a space, a control or an operator in it (escaped) is quoted
            quote = any(ch == " " or ch < " " or ch == "\x7f" or ch in _OPCHAR
                        for ch in body)
            tp = Token(QSTRING if quote else ATOM, body)
        if head is None:
            head = tail = tp
        else:
            tail = _append(tail, tp)
        count += 1
        if 0 < limit <= count:
            break
    return head, tail


def _group(group_type: int, left: Token, right: Token, sync_type: int) -> Token:
    """Put the tokens between left and right under a new node; optionally add a
    resync token (a comma) after left."""
    first = left.next
    if left is not right and first is not right:
        _cut_before(right)
        _cut_before(first)
        group = Token(group_type)
        _sub_append(group, first)
        _append(left, group)
        _append(group, right)
        if sync_type:
            _append(left, Token(sync_type))
    return left


def parse(text: str, limit: int = 0):
    """The parse tree of an address list: the first top-level token, or None."""
    first, last = scan(text, limit)
    if first is None:
        return None
    head, tail = Token(0), Token(0)
    head.next, first.prev = first, head
    last.next, tail.prev = tail, last
    comma, colon, semi, lt, gt = (ord(c) for c in ",:;<>")
    state, right, tp = _DO_WORD, tail, tail.prev
    while tp.type:
        t = tp.type
        if t == COMMENT:                        # move the comment to the side
            prev = _unlink(tp)
            right = _prepend(right, tp)
            tp = prev
            continue
        if t == semi:                           # right-hand side of a named group
            right = _group(ADDR, tp, right, comma)
            state = _DO_GROUP | _DO_WORD
        elif t == colon and state & _DO_GROUP:
            tp.type = STARTGRP
            _group(ADDR, tp, right, 0)
            while tp.type and tp.type != comma:
                tp = tp.prev
            right = tp
            continue
        elif t == gt:                           # right-hand side of <route>
            right = _group(ADDR, tp, right, comma)
            while tp.type and tp.type != lt:
                if tp.type == COMMENT:
                    prev = _unlink(tp)
                    right = _prepend(right, tp)
                    tp = prev
                    continue
                tp = tp.prev
            _group(ADDR, tp, right, 0)
            while tp.type and (tp.type > 0xff or chr(tp.type) not in ">;,:"):
                tp = tp.prev
            right = tp
            state |= _DO_WORD
            continue
        elif t in (ATOM, QSTRING, DOMLIT):
            if not state & _DO_WORD:
                right = _group(ADDR, tp, right, comma).next
            state &= ~_DO_WORD
        elif t == comma:
            right = _group(ADDR, tp, right, 0)
            state |= _DO_WORD
        else:
            state |= _DO_WORD
        tp = tp.prev
    _group(ADDR, tp, right, 0)
    result = head.next if head.next is not tail else None
    _cut_before(head.next)
    _cut_before(tail)
    return result


def addresses(head) -> list[Token]:
    """The top-level ADDR nodes of a parse tree."""
    out = []
    while head is not None:
        if head.type == ADDR:
            out.append(head)
        head = head.next
    return out


def set_address(node: Token, text: str) -> None:
    """Replace the members of an ADDR node by the tokens of text (without an owner, as
    Postfix's tok822_scan leaves them: they are spaced as top-level tokens)."""
    node.head, node.tail = scan(text)


def relink(tokens: list[Token]):
    """A Python list of tokens as a linked list; its head (None when empty)."""
    prev = None
    for tp in tokens:
        tp.prev, tp.next, tp.owner = prev, None, None
        if prev is not None:
            prev.next = tp
        prev = tp
    return tokens[0] if tokens else None


def tokens(head) -> list[Token]:
    """A linked list of tokens as a Python list."""
    out = []
    while head is not None:
        out.append(head)
        head = head.next
    return out


# --- back to text ----------------------------------------------------------------------

def _append_space(tp: Token) -> bool:
    nxt = tp.next
    if nxt is None or tp.owner is not None:
        return False
    if tp.type in (ord(","), STARTGRP) or nxt.type == ord("<"):
        return True
    return tp.type in _NON_OPERATOR and nxt.type in _NON_OPERATOR


def internalize(head) -> str:
    """The tree as text, addresses in internal (unquoted) form."""
    out = []
    tp = head
    while tp is not None:
        t = tp.type
        if t == ADDR:
            out.append(internalize(tp.head))
        elif t in (COMMENT, ATOM, QSTRING):
            out.append(tp.text)
        elif t == DOMLIT:
            out.append(f"[{tp.text}]")
        elif t == STARTGRP:
            out.append(":")
        else:
            out.append(chr(t))
        if _append_space(tp):
            out.append(" ")
        tp = tp.next
    return "".join(out)


def _copy_quoted(text: str, quote_set: str) -> str:
    return "".join("\\" + c if c in quote_set else c for c in text)


def externalize(head, flags: int = STR_DEFL) -> str:
    """The tree as text, addresses quoted as RFC 822 wants (tok822_externalize)."""
    out: list[str] = []
    size = 0                    # of out, in characters (= bytes)
    start, addr, addr_len = 0, None, 0

    def enforce() -> None:
        nonlocal size
        if addr is not None and size - addr_len > start + MAX_NONADDR_LENGTH:
            _strip_address(out, start, addr.head if addr.type == ADDR else None)
            size = sum(map(len, out))

    tp = head
    while tp is not None:
        t = tp.type
        if t == ord(","):
            if flags & STR_TRNC:
                enforce()
            piece = ",\n" if flags & STR_LINE else ", "
            out.append(piece)
            size += 2
            if flags & STR_TRNC:
                start, addr, addr_len = size, None, 0
            tp = tp.next
            continue
        if t == ADDR:
            addr = tp
            piece = quote_822_local(internalize(tp.head))
            addr_len = len(piece)
        elif t in (ATOM, COMMENT):
            piece = tp.text
        elif t == QSTRING:
            piece = '"' + _copy_quoted(tp.text, '"\\\r\n') + '"'
        elif t == DOMLIT:
            piece = "[" + _copy_quoted(tp.text, "\\\r\n") + "]"
        elif t == STARTGRP:
            piece = ":"
        else:
            if t == ord("<") and tp.next is not None and tp.next.type == ord(">"):
                addr, addr_len = tp, 0          # <>: an address too
            piece = chr(t)
        if _append_space(tp):
            piece += " "
        out.append(piece)
        size += len(piece)
        tp = tp.next
    if flags & STR_TRNC:
        enforce()
    return "".join(out)


def _strip_address(out: list[str], start: int, members) -> None:
    """Replace the text from start by <address>: Postfix's guard against too much
    non-address text in one address expression (CERT CA-2003-07)."""
    text = "".join(out)
    shown = "".join(c if " " <= c < "\x7f" else "?" for c in text[start:start + 100])
    msg.warn(f"stripping too many comments from address: {shown}...")
    address = quote_822_local(internalize(members)) if members is not None else ""
    out[:] = [text[:start], f"<{address}>"]


# --- local part quoting (quote_822_local.c) --------------------------------------------

_ATOM_RE = r'[^. ()<>@,;:\\"\[\]\x00-\x1f\x7f]+'
_DOT_STRING = re.compile(rf"{_ATOM_RE}(?:\.{_ATOM_RE})*")


def is_dot_string(local: str) -> bool:
    """Atoms separated by single dots, 8-bit characters allowed (QUOTE_FLAG_8BITCLEAN)."""
    return _DOT_STRING.fullmatch(local) is not None


def _local_bounds(address: str) -> tuple[int, int]:
    """Where the local part is: after a source route, up to the last @."""
    start = 0
    if address.startswith("@"):
        colon = address.find(":")
        if colon >= 0:
            start = colon + 1
    end = address.rfind("@", start)
    return start, (len(address) if end < 0 else end)


def quote_822_local(address: str) -> str:
    """The address with its local part quoted when it is not a dot-string."""
    start, end = _local_bounds(address)
    local = address[start:end]
    if is_dot_string(local):
        return address
    quoted = "".join("\\" + c if c in '"\\\r' else c for c in local)
    return f'{address[:start]}"{quoted}"{address[end:]}'


def unquote_822_local(address: str) -> str:
    """The address with quotes and escapes removed before its last unquoted @."""
    if '"' not in address and "\\" not in address:
        return address                          # nothing quoted (nearly every address)
    start = 0
    if address.startswith("@"):
        colon = address.find(":")
        if colon >= 0:
            start = colon + 1
    out, quoted, at_out, at_src = [address[:start]], False, -1, -1
    i, n = start, len(address)
    while i < n:
        c = address[i]
        if c == '"':
            quoted = not quoted
            i += 1
            continue
        if c == "@":
            if not quoted:
                at_out, at_src = len(out), i
        elif c == "\\":
            if i + 1 < n:
                i += 1
                c = address[i]
        out.append(c)
        i += 1
    if at_out >= 0:
        return "".join(out[:at_out]) + address[at_src:]
    return "".join(out)


# --- output of a regenerated header (cleanup_message.c, cleanup_out.c) -----------------

def fold_header(text: str, limit: int = 0) -> list[str]:
    """The output lines of a regenerated address header (one address per input line):
    addresses joined on a line while it stays under 70 bytes (a tab counts as one),
    continuation lines that do not start with white space get a tab. With a limit
    (header_size_limit), the header ends at the last line boundary before it, or is
    cut at it when that would lose more than 10% (cleanup_out_header)."""
    lines, current = [], None
    for line in text.split("\n"):
        if current is None:
            current = line
        elif len(current) + 1 + len(line) < FOLD_WIDTH:
            current += " " + line
        else:
            lines.append(current)
            current = line
    lines.append(current)
    if limit:
        kept, offset = [], 0
        for line in lines:
            if offset + len(line) > limit:
                if offset <= 0.9 * limit:
                    kept.append(line[:limit - offset])      # the unkind cut
                break
            kept.append(line)
            offset += len(line) + 1
        lines = kept
    return [lines[0]] + [ln if ln[:1] in (" ", "\t") else "\t" + ln for ln in lines[1:]]


def to_bytes(text: str) -> str:
    """UTF-8 text (surrogate-escaped) -> the byte-per-character form of this module."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def from_bytes(text: str) -> str:
    """The byte-per-character form -> UTF-8 text (surrogate-escaped)."""
    return text.encode("latin-1").decode("utf-8", "surrogateescape")
