"""Lookup tables named `type:name`, as Postfix's dict_* layer and postmap(1) know them.

Every postfix-py program that looks something up in a table that main.cf names (alias,
transport, access, canonical, TLS policy, header_checks ...) goes through open_table();
`postfix-py postmap` builds, queries, lists and edits them through this module. Keys,
values, warnings and errors follow Postfix 3.7, so that an administrator's main.cf and
table sources keep working unchanged.

TABLE TYPES
    lmdb:/path
        An indexed table in /path.lmdb (Postfix's file name for lmdb), built by postmap from
        the text file /path.
    hash:/path, btree:/path
        Served by LMDB too, under Postfix's file name /path.db, so that main.cf keeps its
        spelling. The file is in LMDB format, not Berkeley DB: a /path.db left by Postfix's
        own postmap is refused with a message that says to run `postfix-py postmap` on the
        source, which replaces it.
    texthash:/path
        The postmap source /path, read into memory; no database file.
    inline:{key=value, { key = text with spaces }, ...}
        Postfix's inline syntax: elements separated by comma or white space; an element in
        braces may hold white space and commas in its value; a key may be quoted with "..."
        (the quotes stay part of the key). A later key replaces an earlier one.
    static:value, static:{text with spaces}
        Every key gives value.
    regexp:/path
        regexp_table(5): `/pattern/flags result`, `!/pattern/ result`,
        `/pattern1/!/pattern2/ result`, `if /pattern/` ... `endif` (nesting allowed), `$1`
        .. `$N`, `${1}`, `$(1)` and `$$` in the result. Any non-alphanumeric character may
        delimit a pattern. Matching is case-insensitive unless the flag `i` toggles it; `m`
        toggles REG_NEWLINE; `x` toggles REG_EXTENDED (so `x` gives a POSIX *basic* regular
        expression, as with Postfix). A bad rule is a warning naming the file and line, and
        the rule is skipped, as Postfix does.
    pcre:/path
        pcre_table(5) syntax with Python's `re` as the engine (close to PCRE): flags i, m, s,
        x toggle IGNORECASE, MULTILINE, DOTALL, VERBOSE; A anchors at the start of the key;
        X is accepted and ignored; E and U are refused (the rule is skipped with a warning).
        `(?<name>...)` is accepted as `(?P<name>...)`.
    Anything else (cidr:, mysql:, proxy: ...) is "unsupported dictionary type: NAME".

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

SOURCE FORMAT (postmap input, texthash)
    `key whitespace value`. A line whose first character is white space continues the
    previous logical line (the text is joined as is, newline removed). Empty lines, lines
    of white space and lines whose first non-blank character is `#` are ignored, also
    between continued lines. A logical line at the top of the file that starts with white
    space is a warning ("logical line must not start with whitespace") and is skipped. A
    line without value: warning "expected format: key whitespace value", skipped. A key
    ending in `:` is kept, with the warning "record is in "key: value" format; is this an
    alias file?". Trailing white space is dropped from the value. Warnings name the source
    file and the first line of the logical line.

KEY FOLDING
    lmdb, hash, btree, texthash and inline tables are folded: keys are lower-cased when a
    table is built and a query key is lower-cased before the lookup (fold=False turns
    both off: postmap -f). regexp and pcre keys are never folded; their patterns are
    case-insensitive by default instead.

DUPLICATES
    Building an indexed table keeps the first of duplicate keys with the warning
    `FILE.db: duplicate entry: "key"` (duplicates="replace": the last one wins silently,
    postmap -r; duplicates="ignore": the first, silently, postmap -w). texthash keeps the
    first, warning `FILE, line N: duplicate entry: "Key"`. inline keeps the last, silently.

FILES AND CONCURRENCY
    A database file is never changed in place. build() and delete() write a complete new
    LMDB file beside the old one (a temporary name in the same directory), sync it, give it
    the mode and owner that Postfix's postmap would (the existing file's mode; for a new
    file the source file's permissions under umask 022, or 0644 when inherit_mode=False;
    as root, the owner of the source file unless as_owner=False), rename it over the old
    name and sync the directory. Writers of one table exclude each other with flock(2) on
    the current file. Readers open the file read-only without an LMDB lock file
    (lock=False): nothing ever writes to a file they have mapped, so they need no lock and
    no write access to the directory, and never see a half-built table.
    An open Table checks its file with one stat(2) per lookup (device, inode, size,
    mtime); when the file was replaced it opens the new one and closes the old one, so a
    daemon sees a rebuilt table at its next lookup without a restart. texthash, regexp
    and pcre tables reload their source file the same way. A file that has disappeared
    keeps serving the data already open. No write transaction is ever left open; a read
    transaction lasts one lookup. Tables of one process that use the same file share one
    LMDB environment (LMDB allows a file to be opened once per process).
    When an indexed table is opened and its source file is more than 100 seconds newer,
    the warning "database X.db is older than source file X" is logged, as Postfix does.

FUNCTIONS
    open_table(ref, cfg=None, fold=True) -> Table
        Open `type:name`. Raises TableError: "open dictionary: expecting "type:name" form
        instead of "REF"" (no type or no name), "unsupported dictionary type: T", "open
        database FILE: No such file or directory" (or another reason), a Berkeley DB or
        otherwise non-LMDB file, "bad syntax: "inline:..."; need ..." and the other inline
        and static syntax errors of Postfix. Warnings (source lines, regexp rules) go to
        msg.warn.
    Table.lookup(key) -> str | None
        The value, or None when the key is not in the table. Raises TableError when the
        file was replaced by one that cannot be opened (a caller defers the mail, as with
        Postfix's "temporary lookup failure"); the next lookup tries again.
    Table.items() -> list[(key, value)]
        Every entry, as stored (postmap -s). TableError "table REF: sequence operation is
        not supported" for static, regexp and pcre.
    Table.close(); a Table is also a context manager.
    build(ref, source_path=None, fold=True, *, cfg=None, stream=None, incremental=False,
          duplicates="warn", null=False, inherit_mode=True, as_owner=True, pairs=None) -> int
        Build an lmdb/hash/btree table from source_path (default: the table's name), or
        from the text of stream (postmap -i reads standard input); incremental=True keeps
        the entries already in the table. null=True stores keys and values with a
        terminating NUL (postmap -N); lookups find both forms. cfg supplies
        lmdb_map_size (the first map size; the map grows when full). Returns the number of
        entries. pairs(text, path) yields (line number, key, value) from the source text
        (default source_pairs; lib/aliases.source_pairs for postalias). Raises TableError:
        "unsupported dictionary type: T does not support bulk-mode creation." for other types, "open SOURCE: reason", a key longer than
        LMDB's 511 bytes (naming file and line; the old table stays), and the errors of
        open_table for an existing file that is not LMDB (incremental only).
    delete(ref, keys, fold=True, cfg=None) -> list[str]
        Remove keys (folded unless fold=False); returns those that were present. Raises
        TableError: "open database FILE: ...", "T:NAME map requires O_RDONLY access mode"
        (texthash, inline, regexp, pcre), "table static:NAME: delete operation is not
        supported".
    split_ref(ref) -> (type, name); db_path(type, name) -> str | None;
    logical_lines(text, path) -> [(line number, text)]; source_pairs(text, path) yields
    (line number, key, value): the pieces above, for other readers of Postfix's formats.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat as stat_mod
import string
import tempfile
import threading
import time
import warnings

import lmdb

from . import msg

INDEXED = {"lmdb": ".lmdb", "hash": ".db", "btree": ".db"}
OTHER_TYPES = ("texthash", "inline", "static", "regexp", "pcre")
MAX_KEY = 511                  # LMDB's compiled-in key limit (mdb_env_get_maxkeysize)
DEFAULT_MAP_SIZE = 16 * 1024 * 1024
STALE_GRACE = 100              # seconds; Postfix's slack for "older than source file"
_SPACE = " \t\n\r\v\f"         # C's isspace(), as Postfix's ISSPACE

# First bytes of a data file: LMDB's meta page magic after the page header (16 bytes on
# 64-bit builds, 12 on 32-bit), Berkeley DB's hash and btree magic at offset 12.
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little"), (0xBEEFC0DE).to_bytes(4, "big")
_BDB_MAGIC = tuple(m.to_bytes(4, order) for m in (0x061561, 0x053162)
                   for order in ("little", "big"))


class TableError(ValueError):
    """A table that cannot be opened, built or changed; the message names the table."""


# --- references ---------------------------------------------------------------------------

def split_ref(ref: str) -> tuple[str, str]:
    """Split `type:name` at the first colon; TableError when either part is missing."""
    type_, colon, name = ref.partition(":")
    if not colon or not type_ or not name:
        raise TableError(f'open dictionary: expecting "type:name" form instead of "{ref}"')
    return type_, name


def db_path(type_: str, name: str) -> str | None:
    """The database file of an indexed table (name.lmdb or name.db), else None."""
    suffix = INDEXED.get(type_)
    return None if suffix is None else name + suffix


def _check_type(type_: str) -> None:
    if type_ not in INDEXED and type_ not in OTHER_TYPES:
        raise TableError(f"unsupported dictionary type: {type_}")


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _dec(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _sig(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# --- source files -------------------------------------------------------------------------

def _read_source(path: str, missing: str = "open {path}: {reason}") -> tuple[str, tuple]:
    """Read a text file (surrogate-escaped UTF-8) and the stat signature of what was read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise TableError(missing.format(path=path, reason=exc.strerror or exc)) from None
    return _dec(data), _sig(st)


def logical_lines(text: str, path: str, warn=None) -> list[tuple[int, str]]:
    """Join continuation lines as Postfix's readllines(): (first line number, text)."""
    warn = warn or msg.warn
    out: list[list] = []
    orphan: list | None = None     # white space before the first logical line

    def drop_orphan():
        line = orphan[1]
        warn(f'{path}: logical line must not start with whitespace: '
             f'"{line[:30]}{"..." if len(line) > 30 else ""}"')

    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip(_SPACE)
        if not stripped or stripped.startswith("#"):
            continue               # neither ends nor continues a logical line
        if line[0] in _SPACE:
            if out and orphan is None:
                out[-1][1] += line
            elif orphan is None:
                orphan = [number, line]
            else:
                orphan[1] += line
            continue
        if orphan is not None:
            drop_orphan()
            orphan = None
        out.append([number, line])
    if orphan is not None:
        drop_orphan()
    return [(n, t) for n, t in out]


def source_pairs(text: str, path: str, warn=None, ignoring: str = ""):
    """Yield (line number, key, value) for each usable `key whitespace value` line."""
    warn = warn or msg.warn
    for number, line in logical_lines(text, path, warn):
        end = 0
        while end < len(line) and line[end] not in _SPACE:
            end += 1
        key, value = line[:end], line[end:].strip(_SPACE)
        if not key or not value:
            warn(f"{path}, line {number}: expected format: key whitespace value{ignoring}")
            continue
        if key.endswith(":"):
            warn(f'{path}, line {number}: record is in "key: value" format; '
                 f"is this an alias file?")
        yield number, key, value   # lazily: warnings come out in line order


# --- tables -------------------------------------------------------------------------------

class Table:
    """An open lookup table; lookup() is safe to call from several threads."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        self.type, self.name, self.fold = type_, name, fold
        self.ref = f"{type_}:{name}"
        self._lock = threading.Lock()

    def lookup(self, key: str) -> str | None:
        """The value of key, or None when the table has no entry for it."""
        raise NotImplementedError

    def items(self) -> list[tuple[str, str]]:
        """Every (key, value) as stored; not every type can list its entries."""
        raise TableError(f"table {self.ref}: sequence operation is not supported")

    def close(self) -> None:
        """Release the table's file and memory."""

    def _key(self, key: str) -> str:
        return key.lower() if self.fold else key

    def __enter__(self) -> "Table":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.ref}>"


def _file_kind(path: str) -> str:
    """'lmdb', 'bdb' or 'other', from the first bytes of a database file."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[16:20] in _LMDB_MAGIC or head[12:16] in _LMDB_MAGIC:
        return "lmdb"
    if head[12:16] in _BDB_MAGIC:
        return "bdb"
    return "other"


def _open_env(path: str, ref: str) -> lmdb.Environment:
    """Open an LMDB file read-only and lock-free; TableError with the admin's remedy."""
    type_, name = ref.split(":", 1)
    try:
        kind = _file_kind(path)
    except OSError as exc:
        raise TableError(f"open database {path}: {exc.strerror}") from None
    rebuild = f'run "postfix-py postmap {ref}" to rebuild it from the source file'
    if kind == "bdb":
        raise TableError(f"open database {path}: Berkeley DB format, made by Postfix's "
                         f"postmap; postfix-py serves {type_} tables from LMDB files: "
                         f"{rebuild}")
    if kind != "lmdb":
        raise TableError(f"open database {path}: not an LMDB file: {rebuild}")
    try:
        # lock=False: files are replaced, never written in place (see FILES above).
        return lmdb.open(path, subdir=False, readonly=True, lock=False, max_dbs=0,
                         create=False)
    except lmdb.Error as exc:
        raise TableError(f"open database {path}: {exc}") from None


def _strip_nul(data: bytes) -> bytes:
    return data[:-1] if data.endswith(b"\0") else data


# LMDB (and py-lmdb) forbid opening one file twice in a process, yet two Tables, or a
# reader and postmap's delete(), may want the same file: share one environment per file.
_ENVS: dict[tuple[int, int], list] = {}     # (st_dev, st_ino) -> [Environment, users]
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str, ref: str) -> tuple[tuple[int, int], lmdb.Environment,
                                                os.stat_result]:
    """The shared environment of the file now at path, its identity and its stat."""
    for _ in range(10):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TableError(f"open database {path}: {exc.strerror}") from None
        ident = (st.st_dev, st.st_ino)
        with _ENVS_LOCK:
            entry = _ENVS.get(ident)
            if entry is not None:
                entry[1] += 1
                return ident, entry[0], st
            env = _open_env(path, ref)
            try:
                now = os.stat(path)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == ident:
                _ENVS[ident] = [env, 1]
                return ident, env, st
            env.close()            # replaced while we opened it: which one we got is unsure
    raise TableError(f"open database {path}: the file keeps being replaced")


def _release_env(ident: tuple[int, int]) -> None:
    """Give back an environment; the last user closes it."""
    with _ENVS_LOCK:
        entry = _ENVS[ident]
        entry[1] -= 1
        if entry[1] == 0:
            del _ENVS[ident]
            entry[0].close()


class LmdbTable(Table):
    """lmdb:, hash: and btree: tables: an LMDB file, reopened when it is replaced."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        self.path = db_path(type_, name)
        self._ident, self._env, st = _acquire_env(self.path, self.ref)
        self._sig = _sig(st)
        self._warn_if_stale(st)

    def _warn_if_stale(self, st: os.stat_result) -> None:
        try:
            src = os.stat(self.name)
        except OSError:
            return
        if st.st_mtime < src.st_mtime < time.time() - STALE_GRACE:
            msg.warn(f"database {self.path} is older than source file {self.name}")

    def _refresh(self) -> None:
        """Switch to the current file when postmap has replaced it since the last look."""
        if self._env is None:
            raise TableError(f"table {self.ref}: lookup after close")
        try:
            st = os.stat(self.path)
        except OSError:
            return                 # gone or unreachable: the open snapshot stays valid
        if _sig(st) == self._sig:
            return
        if (st.st_dev, st.st_ino) != self._ident:
            ident, env, st = _acquire_env(self.path, self.ref)
            old, self._ident, self._env = self._ident, ident, env
            _release_env(old)
        self._sig = _sig(st)
        self._warn_if_stale(st)

    def lookup(self, key: str) -> str | None:
        """The value of key (lower-cased unless fold=False), with or without a NUL."""
        k = _enc(self._key(key))
        if not k or len(k) > MAX_KEY:
            return None            # LMDB cannot hold such a key, so it is not there
        with self._lock:
            self._refresh()
            try:
                with self._env.begin() as txn:
                    value = txn.get(k)
                    if value is None and len(k) < MAX_KEY:
                        value = txn.get(k + b"\0")   # built with postmap -N
            except lmdb.Error as exc:
                raise TableError(f"read database {self.path}: {exc}") from None
        return None if value is None else _dec(_strip_nul(value))

    def items(self) -> list[tuple[str, str]]:
        """Every entry, in key order."""
        with self._lock:
            self._refresh()
            with self._env.begin() as txn:
                return [(_dec(_strip_nul(k)), _dec(_strip_nul(v))) for k, v in txn.cursor()]

    def close(self) -> None:
        """Give back the LMDB environment (closed when no other Table uses it)."""
        with self._lock:
            if self._env is not None:
                _release_env(self._ident)
                self._env = None


class _ReloadingTable(Table):
    """A table held in memory from a text file, reloaded when the file changes."""

    missing = "open {path}: {reason}"

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        text, self._sig = _read_source(name, self.missing)
        self._load(text)

    def _load(self, text: str) -> None:
        raise NotImplementedError

    def _refresh(self) -> None:
        try:
            st = os.stat(self.name)
        except OSError:
            return                 # keep what was loaded
        if _sig(st) != self._sig:
            text, sig = _read_source(self.name, self.missing)
            self._load(text)
            self._sig = sig


class TexthashTable(_ReloadingTable):
    """texthash: the postmap source itself, in memory; first of duplicate keys wins."""

    missing = "open database {path}: {reason}"

    def _load(self, text: str) -> None:
        entries: dict[str, str] = {}
        for number, key, value in source_pairs(text, self.name,
                                               ignoring=" -- ignoring this line"):
            folded = self._key(key)
            if folded in entries:
                msg.warn(f'{self.name}, line {number}: duplicate entry: "{key}"')
                continue
            entries[folded] = value
        self._entries = entries

    def lookup(self, key: str) -> str | None:
        """The value of the (folded) key."""
        with self._lock:
            self._refresh()
            return self._entries.get(self._key(key))

    def items(self) -> list[tuple[str, str]]:
        """Every entry, in file order."""
        with self._lock:
            self._refresh()
            return list(self._entries.items())


# --- inline: and static: (Postfix's balpar, mystrtokq, extpar, split_qnameval) -------------

def _balpar(text: str, start: int = 0) -> int:
    """Length of the balanced {...} at text[start], or 0 when it is not balanced."""
    if text[start:start + 1] != "{":
        return 0
    level = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            level += 1
        elif text[i] == "}":
            level -= 1
            if level == 0:
                return i - start + 1
    return 0


def _extpar(text: str) -> tuple[str, str | None]:
    """The inside of `{text}`, stripped of white space, and Postfix's error, if any."""
    length = _balpar(text)
    if length == 0:
        return text[1:].strip(_SPACE), f"missing '}}' in \"{text}\""
    err = None if length == len(text) else f"syntax error after '}}' in \"{text}\""
    return text[1:length - 1].strip(_SPACE), err


def _tokens(text: str, seps: str) -> list[str]:
    """Split at separators outside {} (Postfix's mystrtokq)."""
    out, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in seps:
            i += 1
        if i >= n:
            return out
        start, level = i, 0
        while i < n:
            c = text[i]
            if c == "{":
                level += 1
            elif c == "}" and level > 0:
                level -= 1
            elif level == 0 and c in seps:
                break
            i += 1
        out.append(text[start:i])


def _split_qnameval(text: str) -> tuple[str, str]:
    """Split `key = value`; the key may be "quoted" or \\-escaped; ValueError as Postfix."""
    i, n = 0, len(text)
    while i < n and text[i] in _SPACE:
        i += 1
    if i >= n:
        raise ValueError("no key found; expected format: key = value")
    key_start, quoted = i, False
    while i < n:
        c = text[i]
        if c == "\\":
            i += 1
            if i >= n:
                break
        elif c in _SPACE or c == "=":
            if not quoted:
                break
        elif c == '"':
            quoted = not quoted
        i += 1
    if quoted:
        raise ValueError("unbalanced '\"'")
    key = text[key_start:i]
    while i < n and text[i] in _SPACE:
        i += 1
    if i >= n or text[i] != "=":
        raise ValueError("missing '=' after attribute name")
    return key, text[i + 1:].strip(_SPACE)


class InlineTable(Table):
    """inline:{key=value, { key = value with spaces }}; folded; later keys win."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        need = f'"inline:{name}"; need "inline:{{name=value...}}"'
        if _balpar(name) != len(name) or len(name) <= 2:
            raise TableError(f"bad syntax: {need}")
        self._entries: dict[str, str] = {}
        for token in _tokens(name[1:-1], ", \t\r\n"):
            err = None
            if token.startswith("{"):
                token, err = _extpar(token)
            try:
                if err:
                    raise ValueError(err)
                key, value = _split_qnameval(token)
            except ValueError as exc:
                raise TableError(f"{exc}: {need}") from None
            self._entries[self._key(key)] = value
        if not self._entries:
            raise TableError(f"empty table: {need}")

    def lookup(self, key: str) -> str | None:
        """The value of the (folded) key."""
        return self._entries.get(self._key(key))

    def items(self) -> list[tuple[str, str]]:
        """Every entry, in the order written."""
        return list(self._entries.items())


class StaticTable(Table):
    """static:value: the same value for every key."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        self.value = name
        if name.startswith("{"):
            self.value, err = _extpar(name)
            if err:
                raise TableError(f"bad static:name syntax: {err}")

    def lookup(self, key: str) -> str | None:
        """The table's value, whatever the key."""
        return self.value


# --- regexp: and pcre: ---------------------------------------------------------------------

class _RegexError(Exception):
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
                raise _RegexError(_BRACKET_ERR)
            name = p[j + 2:end]
            if kind == ":":
                if name not in _CLASSES:
                    raise _RegexError("Invalid character class name")
                return None, name, end + 2
            if len(name) != 1:
                raise _RegexError("Invalid collation character")
            return name, None, end + 2
        return p[j], None, j + 1

    while True:
        if j >= n:
            raise _RegexError(_BRACKET_ERR)
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
                raise _RegexError("Invalid range end")
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
        raise _RegexError("Unmatched \\{")
    body = p[i:end]
    m = re.fullmatch(r"(\d*)(,?)(\d*)", body)
    if not m or not (m.group(1) or (m.group(2) and m.group(3))):
        raise _RegexError("Invalid content of \\{\\}")
    low = int(m.group(1) or 0)
    high = int(m.group(3)) if m.group(3) else None
    if low > _DUP_MAX or (high is not None and (high < low or high > _DUP_MAX)):
        raise _RegexError("Invalid content of \\{\\}")
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
            raise _RegexError("Invalid preceding regular expression")
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
                raise _RegexError("Trailing backslash")
            d = pattern[i + 1]
            i += 2
            if not extended and d == "(":
                open_group()
            elif not extended and d == ")":
                if not close_group():
                    raise _RegexError("Unmatched ) or \\)")
            elif not extended and d == "{":
                if at_start:
                    raise _RegexError("Invalid preceding regular expression")
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
                    raise _RegexError("Invalid back reference")
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
        raise _RegexError("Unmatched ( or \\(")
    return "".join(out)


def _parse_replacement(text: str, where: str) -> tuple[list, int] | None:
    """Split a result into literal text and $N indexes (Postfix's mac_parse); None if bad."""
    parts: list = []
    literal: list[str] = []
    max_sub = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c != "$":
            literal.append(c)
            i += 1
            continue
        if text[i + 1:i + 2] == "$":
            literal.append("$")
            i += 2
            continue
        if text[i + 1:i + 2] in ("{", "("):
            opener = text[i + 1]
            closer = "}" if opener == "{" else ")"
            level, j = 0, i + 1
            while j < n:
                if text[j] == opener:
                    level += 1
                elif text[j] == closer:
                    level -= 1
                    if level == 0:
                        break
                j += 1
            if j >= n:
                msg.warn(f'truncated macro reference: "{text}"')
                return None
            name, i = text[i + 2:j], j + 1
        else:
            m = re.compile(r"[A-Za-z0-9_]*").match(text, i + 1)
            name, i = m.group(0), m.end()
        if not name:
            msg.warn(f'empty macro name: "{text}"')
            return None
        if not name.isascii() or not name.isdigit():
            msg.warn(f'{where}: non-numeric replacement index "{name}"')
            return None
        if int(name) < 1:
            msg.warn(f'{where}: out-of-range replacement index "{name}"')
            return None
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(int(name))
        max_sub = max(max_sub, int(name))
    if literal:
        parts.append("".join(literal))
    return parts, max_sub


class _Rule:
    __slots__ = ("op", "nesting", "lineno", "first", "first_match", "second",
                 "second_match", "parts", "max_sub", "anchored")


class RegexpTable(_ReloadingTable):
    """regexp: and pcre: tables: rules tried in order; if/endif; $N in the result."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        self.label = f"{type_} map {name}"
        self._flag_letters = "imsxAEUX" if type_ == "pcre" else "imx"
        super().__init__(type_, name, fold)

    # -- parsing
    def _pattern(self, line: str, pos: int, where: str):
        """(regexp text, flags text, positive, next pos) of the pattern at line[pos]."""
        positive = True
        while pos < len(line) and line[pos] == "!":
            positive = not positive
            pos += 1
        while pos < len(line) and line[pos] in _SPACE:
            pos += 1
        if pos >= len(line):
            msg.warn(f"{where}: no regexp: skipping this rule")
            return None
        delim = line[pos]
        pos += 1
        start = pos
        while pos < len(line):
            if line[pos] == "\\":
                if pos + 1 < len(line):
                    pos += 1
                else:
                    break
            elif line[pos] == delim:
                break
            pos += 1
        if pos >= len(line) or line[pos] != delim:
            msg.warn(f'{where}: no closing regexp delimiter "{delim}": skipping this rule')
            return None
        body = line[start:pos]
        pos += 1
        flags_start = pos
        while pos < len(line) and line[pos] not in _SPACE and line[pos] != "!":
            if line[pos] not in self._flag_letters:
                msg.warn(f'{where}: unknown regexp option "{line[pos]}": skipping this rule')
                return None
            pos += 1
        return body, line[flags_start:pos], positive, pos

    def _compile(self, body: str, flags: str, where: str):
        """A compiled pattern (and whether it is anchored), or None after a warning."""
        if self.type == "pcre":
            return self._compile_pcre(body, flags, where)
        icase, newline, extended = True, False, True
        for f in flags:
            if f == "i":
                icase = not icase
            elif f == "m":
                newline = not newline
            elif f == "x":
                extended = not extended
        try:
            text = posix_to_python(body, extended, newline)
            options = (re.IGNORECASE if icase else 0) | (re.MULTILINE if newline else re.DOTALL)
            return re.compile(text, options), False
        except _RegexError as exc:
            msg.warn(f"{where}: {exc}")
        except re.error as exc:
            msg.warn(f"{where}: {exc.msg}")
        return None

    def _compile_pcre(self, body: str, flags: str, where: str):
        options, anchored = re.IGNORECASE, False
        for f in flags:
            if f == "i":
                options ^= re.IGNORECASE
            elif f == "m":
                options ^= re.MULTILINE
            elif f == "s":
                options ^= re.DOTALL
            elif f == "x":
                options ^= re.VERBOSE
            elif f == "A":
                anchored = not anchored
            elif f in "EU":
                msg.warn(f'{where}: regexp option "{f}" is not supported by postfix-py: '
                         f"skipping this rule")
                return None
        body = re.sub(r"\(\?<(?=[A-Za-z_])", "(?P<", body)
        try:
            with warnings.catch_warnings():
                # "Possible nested set" and the like: valid PCRE, not worth a log line.
                warnings.simplefilter("ignore", FutureWarning)
                return re.compile(body, options), anchored
        except re.error as exc:
            pos = exc.pos if exc.pos is not None else 0
            msg.warn(f"{where}: error in regex at offset {pos}: {exc.msg}")
            return None

    def _load(self, text: str) -> None:
        rules: list[_Rule] = []
        nesting = 0
        open_ifs: list[int] = []
        for lineno, line in logical_lines(text, self.name):
            line = line.rstrip(_SPACE)
            rule = self._parse_rule(line, lineno, nesting)
            if rule is None:
                continue
            if rule.op == "if":
                nesting += 1
                open_ifs.append(lineno)
            elif rule.op == "endif":
                nesting -= 1
                open_ifs.pop()
            rules.append(rule)
        for lineno in open_ifs:
            msg.warn(f"{self.label}, line {lineno}: IF has no matching ENDIF")
        self._rules = rules

    def _parse_rule(self, line: str, lineno: int, nesting: int) -> _Rule | None:
        where = f"{self.label}, line {lineno}"
        rule = _Rule()
        rule.nesting, rule.lineno = nesting, lineno
        if not (line[0].isascii() and line[0].isalnum()):
            got = self._pattern(line, 0, where)
            if got is None:
                return None
            body, flags, positive, pos = got
            second = None
            if line[pos:pos + 1] == "!":
                second = self._pattern(line, pos, where)
                if second is None:
                    return None
                pos = second[3]
            result = line[pos:].lstrip(_SPACE)
            if not result:
                msg.warn(f"{where}: no replacement text: using empty string")
            parsed = _parse_replacement(result, where)
            if parsed is None:
                msg.warn(f"{where}: bad replacement syntax: skipping this rule")
                return None
            rule.parts, rule.max_sub = parsed
            if rule.max_sub and not positive:
                msg.warn(f"{where}: $number found in negative match replacement text: "
                         f"skipping this rule")
                return None
            compiled = self._compile(body, flags, where)
            if compiled is None:
                return None
            (rule.first, rule.anchored), rule.first_match = compiled, positive
            if rule.max_sub > rule.first.groups:
                msg.warn(f'{where}: out of range replacement index "{rule.max_sub}": '
                         f"skipping this rule")
                return None
            rule.second = None
            if second is not None:
                compiled2 = self._compile(second[0], second[1], where)
                if compiled2 is None:
                    return None
                rule.second, rule.second_match = compiled2, second[2]
            rule.op = "match"
            return rule
        word = re.match(r"[A-Za-z0-9]*", line).group(0).lower()
        if word == "if":
            pos = 2
            while pos < len(line) and line[pos] in _SPACE:
                pos += 1
            got = self._pattern(line, pos, where)
            if got is None:
                return None
            body, flags, positive, pos = got
            extra = line[pos:].strip(_SPACE)
            if extra:
                msg.warn(f'{where}: ignoring extra text after IF statement: "{extra}"')
                msg.warn(f"{where}: do not prepend whitespace to statements between "
                         f"IF and ENDIF")
            compiled = self._compile(body, flags, where)
            if compiled is None:
                return None
            (rule.first, rule.anchored), rule.first_match = compiled, positive
            rule.op = "if"
            return rule
        if word == "endif":
            if nesting == 0:
                msg.warn(f"{where}: ignoring ENDIF without matching IF")
                return None
            if line[5:].strip(_SPACE):
                msg.warn(f"{where}: ignoring extra text after ENDIF")
            rule.op = "endif"
            return rule
        msg.warn(f"{where}: ignoring unrecognized request")
        return None

    # -- lookup
    @staticmethod
    def _match(compiled: re.Pattern, anchored: bool, key: str):
        return (compiled.match if anchored else compiled.search)(key)

    def lookup(self, key: str) -> str | None:
        """The result of the first rule that matches key (never folded), expanded."""
        with self._lock:
            self._refresh()
            rules = self._rules
        nesting = 0
        for rule in rules:
            if nesting < rule.nesting:
                continue           # inside an IF that did not match
            if rule.op == "endif":
                nesting -= 1
                continue
            m = self._match(rule.first, rule.anchored, key)
            if (m is not None) != rule.first_match:
                continue
            if rule.op == "if":
                nesting += 1
                continue
            if rule.second is not None and \
                    (self._match(*rule.second, key) is not None) != rule.second_match:
                continue
            return "".join(p if isinstance(p, str) else (m.group(p) or "")
                           for p in rule.parts)
        return None


# --- opening ------------------------------------------------------------------------------

_CLASSES_BY_TYPE = {"lmdb": LmdbTable, "hash": LmdbTable, "btree": LmdbTable,
                    "texthash": TexthashTable, "inline": InlineTable,
                    "static": StaticTable, "regexp": RegexpTable, "pcre": RegexpTable}


def open_table(ref: str, cfg=None, fold: bool = True) -> Table:
    """Open the table `type:name`; TableError when it cannot be used (see FUNCTIONS)."""
    type_, name = split_ref(ref)
    _check_type(type_)
    return _CLASSES_BY_TYPE[type_](type_, name, fold)


# --- building and editing -----------------------------------------------------------------

@contextlib.contextmanager
def _writer_lock(path: str):
    """Hold flock(2) on the current file at path, so that writers take turns.

    While there is no file yet, the directory is locked instead, and the file is looked
    for again once the lock is held: the writer that waited then locks what the first
    one created.
    """
    directory = os.path.dirname(path) or "."
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            missing = False
        except FileNotFoundError:
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise TableError(f"open database {path}: {exc.strerror}") from None
            missing = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if missing and now is None:
                yield
                return
            held = os.fstat(fd)
            if not missing and now is not None and \
                    (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                yield
                return
            # Another writer replaced or created the file while we waited: start again.
        finally:
            os.close(fd)


def _read_all(path: str, ref: str) -> dict[bytes, bytes]:
    """Every raw entry of an existing LMDB table file."""
    ident, env, _ = _acquire_env(path, ref)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        _release_env(ident)


def _attributes(dest: str, source: os.stat_result | None, inherit_mode: bool,
                as_owner: bool) -> tuple[int, int | None, int | None]:
    """Mode and owner for the new file, as Postfix's postmap would leave them."""
    try:
        old = os.stat(dest)
    except FileNotFoundError:
        old = None
    if old is not None:
        mode = stat_mod.S_IMODE(old.st_mode)     # Postfix truncates in place: mode stays
    elif inherit_mode and source is not None and stat_mod.S_ISREG(source.st_mode):
        mode = 0o666 & ~(0o022 | (~source.st_mode & 0o077))
    else:
        mode = 0o644
    uid = gid = None
    if os.geteuid() == 0:
        if as_owner and source is not None and stat_mod.S_ISREG(source.st_mode):
            uid, gid = source.st_uid, source.st_gid
        elif old is not None:
            uid, gid = old.st_uid, old.st_gid
    return mode, uid, gid


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _initial_map_size(items: list, map_size: int) -> int:
    """lmdb_map_size, or more when the entries clearly need more (saves retries)."""
    return max(map_size, 2 * sum(len(k) + len(v) + 32 for k, v in items) + (1 << 20))


def _write_lmdb(dest: str, entries: dict[bytes, bytes], map_size: int,
                attrs: tuple[int, int | None, int | None]) -> None:
    """Write entries to a new LMDB file and rename it over dest."""
    directory = os.path.dirname(dest) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(dest) + ".", dir=directory)
    except OSError as exc:
        raise TableError(f"open database {dest}: {exc.strerror}") from None
    os.close(fd)
    try:
        items = sorted(entries.items())
        size = _initial_map_size(items, map_size)
        while True:
            env = lmdb.open(tmp, subdir=False, lock=False, map_size=size, max_dbs=0)
            try:
                with env.begin(write=True) as txn:
                    # Sorted input: LMDB appends without page splits.
                    txn.cursor().putmulti(items, append=True)
                env.sync(True)
                break
            except lmdb.MapFullError:
                size *= 2          # grow and start again on an empty file
            except lmdb.Error as exc:
                raise TableError(f"error writing LMDB database {dest}: {exc}") from None
            finally:
                env.close()
            os.truncate(tmp, 0)
        mode, uid, gid = attrs
        os.chmod(tmp, mode)
        if uid is not None:
            os.chown(tmp, uid, gid)
        _fsync_path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(directory, directory=True)


def _writable(ref: str, what: str) -> tuple[str, str, str]:
    """(type, name, database file) of an indexed table; TableError for other types."""
    type_, name = split_ref(ref)
    _check_type(type_)
    if type_ not in INDEXED:
        if what == "build":
            raise TableError(f"unsupported dictionary type: {type_} does not support "
                             f"bulk-mode creation.")
        if type_ == "static":
            raise TableError(f"table {ref}: delete operation is not supported")
        raise TableError(f"{ref} map requires O_RDONLY access mode")
    return type_, name, db_path(type_, name)


def _map_size(cfg) -> int:
    if cfg is None:
        return DEFAULT_MAP_SIZE
    return int(cfg["lmdb_map_size"])


def build(ref: str, source_path: str | None = None, fold: bool = True, *, cfg=None,
          stream=None, incremental: bool = False, duplicates: str = "warn",
          null: bool = False, inherit_mode: bool = True, as_owner: bool = True,
          pairs=None) -> int:
    """Build (or with incremental=True, extend) an indexed table; returns its size."""
    if duplicates not in ("warn", "replace", "ignore"):
        raise ValueError(f"duplicates must be warn, replace or ignore: {duplicates!r}")
    type_, name = split_ref(ref)
    if stream is None:
        # As Postfix: an unreadable source is reported before an unsuitable type.
        path = source_path or name
        text, _ = _read_source(path)
        try:
            source = os.stat(path)
        except OSError:
            source = None
    else:
        path = "stdin"
        data = stream.read()
        text = _dec(data) if isinstance(data, bytes) else data
        try:
            source = os.fstat(stream.fileno())
        except (OSError, AttributeError, ValueError):
            source = None          # not a real file (tests pass StringIO)
    type_, name, dest = _writable(ref, "build")
    nul = b"\0" if null else b""
    with _writer_lock(dest):
        entries: dict[bytes, bytes] = {}
        if incremental and os.path.exists(dest):
            entries = _read_all(dest, ref)
        for number, key, value in (pairs or source_pairs)(text, path):
            folded = key.lower() if fold else key
            k = _enc(folded) + nul
            if len(k) > MAX_KEY:
                raise TableError(f"{path}, line {number}: key is longer than LMDB's "
                                 f"{MAX_KEY} bytes: \"{key[:30]}...\"")
            if k in entries or _strip_nul(k) in entries or k + b"\0" in entries:
                if duplicates == "warn":
                    msg.warn(f'{dest}: duplicate entry: "{folded}"')
                if duplicates != "replace":
                    continue
                entries.pop(_strip_nul(k), None)
                entries.pop(_strip_nul(k) + b"\0", None)
            entries[k] = _enc(value) + nul
        _write_lmdb(dest, entries, _map_size(cfg),
                    _attributes(dest, source, inherit_mode, as_owner))
    return len(entries)


def delete(ref: str, keys, fold: bool = True, cfg=None) -> list[str]:
    """Remove keys from an indexed table; returns the keys that were there."""
    type_, name, dest = _writable(ref, "delete")
    with _writer_lock(dest):
        entries = _read_all(dest, ref)
        deleted = []
        for key in keys:
            k = _enc(key.lower() if fold else key)
            found = False
            for variant in (k, k + b"\0"):
                if variant in entries:
                    del entries[variant]
                    found = True
            if found:
                deleted.append(key)
        if deleted:
            _write_lmdb(dest, entries, _map_size(cfg),
                        _attributes(dest, None, True, False))
    return deleted
