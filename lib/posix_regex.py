"""POSIX regular expressions for regexp: tables, translated to Python's `re`.

Postfix's regexp_table(5) compiles its patterns with the C library's regcomp(); this
module gives lib/tables.py the same language and the same refusals.

POSIX REGULAR EXPRESSIONS
    regexp: patterns are translated from POSIX ERE (or BRE with `x`) to Python `re`, with
    glibc's error messages for what glibc refuses: bracket expressions with `[:class:]`,
    `[.c.]`, `[=c=]`, a leading `]`, and a literal backslash inside brackets; intervals
    `{m}`, `{m,}`, `{,n}`, `{m,n}`; stacked repetition (`a**`); back references; GNU's
    `\\w \\W \\s \\S \\b \\B \\< \\> \\`` \\'`; in BRE `\\( \\) \\{ \\} \\| \\+ \\?`. Limits:
    alternation and captures follow Python's leftmost-first rule, not POSIX's
    leftmost-longest, so `$N` can differ for ambiguous alternations such as `(a|ab)(c|bcd)`;
    `\\` before another letter means that letter; character classes are ASCII; matching
    backtracks, so a pathological pattern is slow where glibc would not be.

FUNCTIONS
    posix_to_python(pattern, extended=True, newline=False) -> str
        The Python `re` text for a POSIX ERE (BRE when extended is False). newline is
        REG_NEWLINE: a negated bracket expression does not match a newline and `$` is
        Python's `$`; the caller compiles with re.MULTILINE then, re.DOTALL otherwise (as
        lib/tables.py does). Raises RegexError, whose text is glibc's regerror() message.

SEE ALSO
    lib/tables.py (regexp: tables), regexp_table(5), regex(7).
"""

from __future__ import annotations

import re
import string

class RegexError(Exception):
    """A pattern that glibc's regcomp() would refuse; the text is glibc's message."""


_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "0-9a-zA-Z", "upper": "A-Z",
    "lower": "a-z", "space": " \\t\\n\\r\\f\\v", "blank": " \\t",
    "punct": "".join("\\" + c for c in string.punctuation), "print": "\\x20-\\x7e",
    "graph": "\\x21-\\x7e", "cntrl": "\\x00-\\x1f\\x7f", "xdigit": "0-9A-Fa-f",
}
_BRACKET_ERR = "Unmatched [, [^, [:, [., or [="
_DUP_MAX = 0x7FFF


def _class_char(c: str) -> str:
    # Escape all ASCII punctuation inside [...]: Python warns about "[[", "--", "&&" ...
    return "\\" + c if c.isascii() and not c.isalnum() and c != " " else c


def _bracket(p: str, i: int, newline: bool) -> tuple[str, int]:
    """Translate the POSIX bracket expression at p[i] == '['; returns (python, next i)."""
    n = len(p)
    j = i + 1
    negate = j < n and p[j] == "^"
    if negate:
        j += 1
    parts: list[str] = []
    first = True

    def element(j: int) -> tuple[str | None, str | None, int]:
        """(single character, class name, next j) of the element at p[j]."""
        if p[j] == "[" and j + 1 < n and p[j + 1] in ":.=":
            kind = p[j + 1]
            end = p.find(kind + "]", j + 2)
            if end < 0:
                raise RegexError(_BRACKET_ERR)
            name = p[j + 2:end]
            if kind == ":":
                if name not in _CLASSES:
                    raise RegexError("Invalid character class name")
                return None, name, end + 2
            if len(name) != 1:
                raise RegexError("Invalid collation character")
            return name, None, end + 2
        return p[j], None, j + 1

    while True:
        if j >= n:
            raise RegexError(_BRACKET_ERR)
        if p[j] == "]" and not first:
            j += 1
            break
        first = False
        char, cls, j = element(j)
        if cls is not None:
            parts.append(_CLASSES[cls])
            continue
        if j + 1 < n and p[j] == "-" and p[j + 1] != "]":
            end_char, end_cls, j = element(j + 1)
            if end_cls is not None or ord(end_char) < ord(char):
                raise RegexError("Invalid range end")
            parts.append(f"{_class_char(char)}-{_class_char(end_char)}")
        else:
            parts.append(_class_char(char))
    if negate and newline:
        parts.append("\\n")        # REG_NEWLINE: [^...] never matches a newline
    return "[" + ("^" if negate else "") + "".join(parts) + "]", j


def _interval(p: str, i: int, close: str) -> tuple[str, int]:
    """Translate `{m,n}` (close is '}' or '\\}'); p[i] is just after the opening brace."""
    end = p.find(close, i)
    if end < 0:
        raise RegexError("Unmatched \\{")
    body = p[i:end]
    m = re.fullmatch(r"(\d*)(,?)(\d*)", body)
    if not m or not (m.group(1) or (m.group(2) and m.group(3))):
        raise RegexError("Invalid content of \\{\\}")
    low = int(m.group(1) or 0)
    high = int(m.group(3)) if m.group(3) else None
    if low > _DUP_MAX or (high is not None and (high < low or high > _DUP_MAX)):
        raise RegexError("Invalid content of \\{\\}")
    text = f"{{{low}}}" if not m.group(2) else f"{{{low},{'' if high is None else high}}}"
    return text, end + len(close)


def posix_to_python(pattern: str, extended: bool = True, newline: bool = False) -> str:
    """Translate a POSIX ERE (BRE when not extended) into Python `re` syntax."""
    out: list[str] = []
    n = len(pattern)
    i = 0
    atom: int | None = None        # index in out where the last repeatable atom starts
    quantified = False             # the last item was a repetition operator
    opens: list[int] = []          # out indexes of open groups
    groups = 0                     # groups opened so far (for back references)
    closed = 0                     # groups closed so far
    at_start = True                # BRE: where '*' is literal and '^' an anchor

    def add_atom(text: str) -> None:
        nonlocal atom, quantified, at_start
        atom, quantified, at_start = len(out), False, False
        out.append(text)

    def add_quant(text: str) -> None:
        nonlocal quantified, at_start
        if atom is None:
            raise RegexError("Invalid preceding regular expression")
        if quantified:
            # a** is (a*)*: wrap, else Python reads *? as lazy and *+ as possessive.
            out[atom:] = ["(?:" + "".join(out[atom:]) + ")"]
        out.append(text)
        quantified, at_start = True, False

    def add_anchor(text: str) -> None:
        nonlocal atom, quantified, at_start
        out.append(text)
        atom, quantified, at_start = None, False, False

    def open_group() -> None:
        nonlocal atom, quantified, at_start, groups
        opens.append(len(out))
        out.append("(")
        groups += 1
        atom, quantified, at_start = None, False, True

    def close_group() -> bool:
        nonlocal atom, quantified, at_start, closed
        if not opens:
            return False
        start = opens.pop()
        out.append(")")
        closed += 1
        atom, quantified, at_start = start, False, False
        return True

    def alternation() -> None:
        nonlocal atom, quantified, at_start
        out.append("|")
        atom, quantified, at_start = None, False, True

    dollar = "$" if newline else r"\Z"
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise RegexError("Trailing backslash")
            d = pattern[i + 1]
            i += 2
            if not extended and d == "(":
                open_group()
            elif not extended and d == ")":
                if not close_group():
                    raise RegexError("Unmatched ) or \\)")
            elif not extended and d == "{":
                if at_start:
                    raise RegexError("Invalid preceding regular expression")
                text, i = _interval(pattern, i, "\\}")
                add_quant(text)
            elif not extended and d == "|":
                alternation()
            elif not extended and d in "+?":
                if at_start:
                    add_atom(re.escape(d))
                else:
                    add_quant(d)
            elif d in "123456789":
                if int(d) > closed:
                    raise RegexError("Invalid back reference")
                add_atom(f"(?:\\{d})")
            elif d in "wWsS":
                add_atom("\\" + d)
            elif d in "bB":
                add_anchor("\\" + d)
            elif d == "<":
                add_anchor(r"\b(?=\w)")
            elif d == ">":
                add_anchor(r"\b(?<=\w)")
            elif d == "`":
                add_anchor(r"\A")
            elif d == "'":
                add_anchor(r"\Z")
            else:
                add_atom(re.escape(d))
            continue
        i += 1
        if c == "[":
            text, i = _bracket(pattern, i - 1, newline)
            add_atom(text)
        elif c == ".":
            add_atom(".")
        elif extended and c == "(":
            open_group()
        elif extended and c == ")":
            if not close_group():
                add_atom(r"\)")        # glibc: an unmatched ')' is literal
        elif extended and c == "|":
            alternation()
        elif c == "*" and (extended or not at_start):
            add_quant("*")
        elif extended and c in "+?":
            add_quant(c)
        elif extended and c == "{":
            text, i = _interval(pattern, i, "}")
            add_quant(text)
        elif c == "^" and (extended or at_start):
            add_anchor("^")
            at_start = not extended
        elif c == "$" and (extended or i == n or pattern.startswith(("\\)", "\\|"), i)):
            add_anchor(dollar)
        else:
            add_atom(re.escape(c))
    if opens:
        raise RegexError("Unmatched ( or \\(")
    return "".join(out)
