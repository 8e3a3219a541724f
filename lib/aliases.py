"""The alias file format, as Postfix's aliases(5) and postalias(1) read it.

An alias file has one entry per logical line:

    name: value, value, ...

Continuation lines start with white space; empty lines and lines whose first non-blank
character is `#` are ignored (lib/tables.logical_lines, as Postfix's readllines). The name
may be quoted ("a name": ...); it must be local (no `@` or `%`). The values are RFC 822
address tokens separated by commas: an address, `/file/name`, `|command`,
`:include:/file/name`; a value with white space or commas is quoted ("|cmd arg").
Comments in parentheses are kept, as postalias keeps them.

postalias stores each entry as key = the name without quotes (folded to lower case by
the table), value = the values joined with ", " (quoted as written), plus Sendmail's `@`
entry that marks a complete database. local(8) splits a stored value (and the lines of
.forward and :include: files) back into destinations with destinations().

WARNINGS (postalias, in Postfix's words)
    FILE, line N: need name:value pair
    FILE, line N: name must be local

FUNCTIONS
    source_pairs(text, path, warn=None) -> yields (line number, key, value), then
        (0, "@", "@"): the entries postalias stores (lib/tables.build's pairs argument).
    destinations(text) -> [str]: the destinations of a value, in internal form (quotes
        and comments removed, `<addr>` reduced to addr).
    token_lines(text) -> [str]: the destinations of a .forward or :include: file (lines,
        `#` comment lines ignored; continuation lines joined).

SEE ALSO
    tools/postalias.py, local/service.py, lib/tables.py; Postfix aliases(5), postalias(1).
"""

from __future__ import annotations

from . import msg
from .tables import logical_lines

_SPACE = " \t\n\r\v\f"
MAX_VALUE = 100000            # one entry's value; larger is not an alias, it is an attack


def _scan(text: str) -> list[tuple[str, str]]:
    """Tokens: (kind, text); kind is "q" quoted, "c" comment, "<" ">" "," ":" "@" "%" or
    "a" for other text (an atom, with its white space collapsed)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
            if out and out[-1][0] != "sp":
                out.append(("sp", " "))
            continue
        if c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            out.append(("q", "".join(buf)))
            i = j + 1
            continue
        if c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            out.append(("c", text[i:j]))
            i = j
            continue
        if c in "<>,:@%":
            out.append((c, c))
            i += 1
            continue
        j = i
        while j < n and text[j] not in _SPACE and text[j] not in '"(<>,:@%':
            if text[j] == "\\" and j + 1 < n:
                j += 1
            j += 1
        out.append(("a", text[i:j]))
        i = j
    return out


def _external(tokens: list[tuple[str, str]]) -> str:
    """The tokens written back as text (quotes kept, white space collapsed)."""
    parts = []
    for kind, text in tokens:
        if kind == "q":
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            parts.append(text)
    return "".join(parts).strip()


def _internal(tokens: list[tuple[str, str]]) -> str:
    """One destination in internal form: no quotes, no comments, <addr> reduced."""
    kinds = [k for k, _ in tokens]
    if "<" in kinds:
        start = kinds.index("<") + 1
        end = kinds.index(">", start) if ">" in kinds[start:] else len(tokens)
        tokens = tokens[start:end]
    text = "".join(t for k, t in tokens if k != "c")
    return " ".join(text.split()) if not any(k == "q" for k, _ in tokens) else text.strip()


def _split(tokens: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Tokens into comma-separated groups (empty groups dropped)."""
    groups: list[list] = [[]]
    for tok in tokens:
        if tok[0] == ",":
            groups.append([])
        else:
            groups[-1].append(tok)
    return [g for g in groups if any(k not in ("sp", "c") for k, _ in g)]


def source_pairs(text: str, path: str, warn=None):
    """Yield (line number, key, value) for each alias entry, then the `@` entry."""
    warn = warn or msg.warn
    for number, line in logical_lines(text, path, warn):
        tokens = _scan(line)
        kinds = [k for k, _ in tokens]
        colon = kinds.index(":") if ":" in kinds else -1
        before = [t for t in tokens[:colon] if t[0] not in ("sp", "c")] if colon >= 0 else []
        after = [t for t in tokens[colon + 1:] if t[0] not in ("sp", "c")] if colon >= 0 else []
        if colon < 0 or not before or not after or "," in kinds[:colon]:
            warn(f"{path}, line {number}: need name:value pair")
            continue
        if "@" in kinds[:colon] or "%" in kinds[:colon]:
            warn(f"{path}, line {number}: name must be local")
            continue
        key = _internal(tokens[:colon])
        value = ", ".join(_external(g) for g in _split(tokens[colon + 1:]))
        if not key or not value:
            warn(f"{path}, line {number}: need name:value pair")
            continue
        yield number, key, value
    yield 0, "@", "@"


def destinations(text: str) -> list[str]:
    """The destinations of an alias value or a line of a .forward file."""
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE]
    return [d for d in (_internal(g) for g in _split(_scan(text))) if d]


def token_lines(text: str) -> list[str]:
    """The destinations of a .forward or :include: file."""
    out: list[str] = []
    for _, line in logical_lines(text, "", warn=lambda _w: None):
        out.extend(destinations(line))
    return out
