"""Lookup tables named `type:name`, as Postfix's dict_* layer and postmap(1) know them.

Every postfix-py program that looks something up in a table that main.cf names (alias,
transport, access, canonical, TLS policy, header_checks ...) goes through open_table();
`postfix-py postmap` queries and lists them through this module, and builds and edits
them through lib/table_writer.py. Keys, values, warnings and errors follow Postfix 3.7,
so that an administrator's main.cf and table sources keep working unchanged.

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
    regexp:{ {rule}, {rule}, ... }, pcre:{...}, cidr:{...}
        The same rules inline (Postfix 3.7's dict_stream_open): each rule in braces,
        separated by comma or white space; such a table is never reloaded.
    pcre:/path
        pcre_table(5) syntax with Python's `re` as the engine (close to PCRE): flags i, m, s,
        x toggle IGNORECASE, MULTILINE, DOTALL, VERBOSE; A anchors at the start of the key;
        X is accepted and ignored; E and U are refused (the rule is skipped with a warning).
        `(?<name>...)` is accepted as `(?P<name>...)`.
    cidr:/path
        cidr_table(5): `network/prefix result`, `address result` (IPv4 or IPv6, optionally
        in [ ]), `!pattern result` (matches an address of the same family outside the
        network), `if pattern` / `if !pattern` ... `endif` (nesting allowed); the first
        rule that matches wins. A key that is not an address matches nothing. A bad rule
        is the warning "cidr map PATH, line N: REASON: skipping this rule" (Postfix's
        reasons: bad address pattern, non-null host address bits ..., no lookup result).
    memcache:/path, redis:/path
        A shared store with a local LMDB backup, read-write (lib/table_store.py; the file
        is memcache_table(5)'s configuration). Besides lookup(), these tables have
        update(key, value) and delete(key), for caches (TLS sessions, postscreen).
    unix:passwd.byname
        The password file (Postfix's dict_unix): the key is a user name, the value the
        passwd line `name:x:uid:gid:gecos:home:shell`. The accounts are read when the
        table is opened (before a chroot, where /etc/passwd is out of reach: Postfix
        uses proxymap for that, which postfix-py lacks) and asked again with getpwnam
        where /etc/passwd is visible. Only passwd.byname is known.
    Anything else (mysql:, proxy: ...) is "unsupported dictionary type: NAME".

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
    Database files are written by lib/table_writer.py (build, delete), never in place,
    so a reader never sees a half-built table. Readers open the file read-only without
    an LMDB lock file (lock=False). (A cache opened writable is the exception: see
    open_table(writable=True).)
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
    open_table(ref, fold=..., writable=True) -> a table for a cache (Postfix's O_RDWR |
        O_CREAT open), with update(key, value) -> bool and delete(key) -> bool besides
        lookup(): memcache: and redis: as always; lmdb:, hash: and btree: as a CacheTable
        (the LMDB file created when missing, written in place under an LMDB lock file,
        no fsync: several processes may write it; read and write errors are TableError;
        a full map is a warning and update() gives False); any other type is the
        TableError "TYPE:NAME map requires O_RDONLY access mode".
    Table.lookup(key) -> str | None
        The value, or None when the key is not in the table. Raises TableError when the
        file was replaced by one that cannot be opened (a caller defers the mail, as with
        Postfix's "temporary lookup failure"); the next lookup tries again.
    Table.items() -> list[(key, value)]
        Every entry, as stored (postmap -s). TableError "table REF: sequence operation is
        not supported" for static, regexp, pcre, cidr, unix, memcache and redis: those
        have Table.iterable False (a cache cleanup that walks the table cannot run).
    Table.close(); a Table is also a context manager.
    split_ref(ref) -> (type, name); db_path(type, name) -> str | None;
    logical_lines(text, path) -> [(line number, text)]; source_pairs(text, path) yields
    (line number, key, value): the pieces above, for other readers of Postfix's formats.

SEE ALSO
    lib/posix_regex.py: the POSIX regular expressions of regexp: tables (posix_to_python).
    lib/table_writer.py: building and editing indexed tables (build, delete; postmap).
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import threading
import time
import warnings

import lmdb

from . import maincf, msg, table_store
from .posix_regex import RegexError, posix_to_python

INDEXED = {"lmdb": ".lmdb", "hash": ".db", "btree": ".db"}
OTHER_TYPES = ("texthash", "inline", "static", "regexp", "pcre", "cidr", "unix",
               *table_store.STORE_TYPES)
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

    iterable = False            # whether items() lists the entries (Postfix: "sequence")

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

    iterable = True

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
    inline = False          # regexp:, pcre:, cidr: also take {{rule}, {rule}} (dict_stream)

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        if self.inline and name.startswith("{"):
            text, self._sig = _inline_rules(type_, name), None    # never reloaded
        else:
            text, self._sig = _read_source(name, self.missing)
        self._load(text)

    def _load(self, text: str) -> None:
        raise NotImplementedError

    def _refresh(self) -> None:
        if self._sig is None:
            return                 # inline rules
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

    iterable = True

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

def balpar(text: str, start: int = 0) -> int:
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
    length = balpar(text)
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


def _inline_rules(type_: str, name: str) -> str:
    """The rules of `{ {rule}, {rule} ... }`, one a line, as Postfix's dict_stream_open()."""
    inside, err = _extpar(name)
    rules = []
    for token in [] if err else _tokens(inside, ", \t\r\n"):
        if token.startswith("{"):
            token, err = _extpar(token)
            if err:
                break
        rules.append(token)
    if err:
        raise TableError(f"{type_} map: {err}")
    return "".join(rule + "\n" for rule in rules)


class InlineTable(Table):
    """inline:{key=value, { key = value with spaces }}; folded; later keys win."""

    iterable = True

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        need = f'"inline:{name}"; need "inline:{{name=value...}}"'
        if balpar(name) != len(name) or len(name) <= 2:
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


class UnixTable(Table):
    """unix:passwd.byname: user name -> passwd line."""

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        if name != "passwd.byname":
            raise TableError(f"unknown table: {type_}:{name}")
        self._known = {p.pw_name: self._line(p) for p in pwd.getpwall()}

    @staticmethod
    def _line(p) -> str:
        return ":".join((p.pw_name, p.pw_passwd, str(p.pw_uid), str(p.pw_gid), p.pw_gecos,
                         p.pw_dir, p.pw_shell))

    def lookup(self, key: str) -> str | None:
        """The passwd line of the (folded) user name, or None."""
        key = self._key(key)
        if not key or "\0" in key:
            return None
        if os.path.exists("/etc/passwd"):     # outside a chroot: the current accounts
            try:
                return self._line(pwd.getpwnam(key))
            except (KeyError, ValueError):
                return None
        return self._known.get(key)


# --- regexp: and pcre: ---------------------------------------------------------------------

def _parse_replacement(text: str, where: str) -> tuple[list, int] | None:
    """Split a result into literal text and $N indexes (Postfix's mac_parse); None if bad."""
    try:
        pieces = maincf.split_macros(text)
    except maincf.MacroSyntaxError as exc:
        msg.warn(f'truncated macro reference: "{text}"' if exc.kind == "unmatched"
                 else f'empty macro name: "{text}"')
        return None
    parts: list = []
    max_sub = 0
    for piece in pieces:
        if isinstance(piece, str):
            parts.append(piece)
            continue
        name = piece.name
        if not name:
            msg.warn(f'empty macro name: "{text}"')
            return None
        if not name.isascii() or not name.isdigit():
            msg.warn(f'{where}: non-numeric replacement index "{name}"')
            return None
        if int(name) < 1:
            msg.warn(f'{where}: out-of-range replacement index "{name}"')
            return None
        parts.append(int(name))
        max_sub = max(max_sub, int(name))
    return parts, max_sub


class _Rule:
    __slots__ = ("op", "nesting", "lineno", "first", "first_match", "second",
                 "second_match", "parts", "max_sub", "anchored")


class RegexpTable(_ReloadingTable):
    """regexp: and pcre: tables: rules tried in order; if/endif; $N in the result."""

    inline = True

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
        except RegexError as exc:
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


# --- cidr: (Postfix's dict_cidr.c and cidr_match.c) ----------------------------------------

def _cidr_family(text: str) -> int:
    return socket.AF_INET6 if ":" in text else socket.AF_INET


def _cidr_pattern(pattern: str) -> tuple[int, bytes, int]:
    """(family, network bytes, prefix length) of a cidr pattern; ValueError with Postfix's
    reason when it is not one."""
    mask_search = pattern
    if pattern.startswith("["):
        inner, close, tail = pattern[1:].partition("]")
        if not close:
            raise ValueError(f'missing \']\' character after "[{inner}"')
        if tail and not tail.startswith("/"):
            raise ValueError(f'garbage after "[{inner}]"')
        pattern, mask_search = inner + tail, inner + tail
    net, slash, mask = mask_search.partition("/")
    family = _cidr_family(net)
    bits = 128 if family == socket.AF_INET6 else 32
    if not slash:
        try:
            return family, socket.inet_pton(family, net), bits
        except OSError:
            raise ValueError(f'bad address pattern: "{net}"') from None
    if not (mask.isascii() and mask.isdigit()):
        raise ValueError(f'bad mask value in "{net}/{mask}"')
    if int(mask) > bits:
        raise ValueError(f'bad mask length in "{net}/{mask}"')
    try:
        raw = socket.inet_pton(family, net)
    except OSError:
        raise ValueError(f'bad network value in "{net}/{mask}"') from None
    prefix = int(mask)
    value = int.from_bytes(raw, "big")
    host_bits = (1 << (bits - prefix)) - 1
    if value & host_bits:
        fixed = socket.inet_ntop(family, (value & ~host_bits).to_bytes(len(raw), "big"))
        raise ValueError(f'non-null host address bits in "{net}/{mask}", perhaps you '
                         f'should use "{fixed}/{prefix}" instead')
    return family, raw, prefix


class CidrTable(_ReloadingTable):
    """cidr: tables: address patterns tried in order; !pattern; if/endif."""

    missing = "open {path}: {reason}"
    inline = True

    def _load(self, text: str) -> None:
        # rules: (op, family, network int, prefix, positive, value, nesting)
        rules: list[tuple] = []
        nesting = 0
        open_ifs: list[int] = []
        for lineno, line in logical_lines(text, self.name):
            try:
                rule = self._parse(line.strip(_SPACE), nesting)
            except ValueError as exc:
                msg.warn(f"cidr map {self.name}, line {lineno}: {exc}: skipping this rule")
                continue
            if rule[0] == "if":
                nesting += 1
                open_ifs.append(lineno)
            elif rule[0] == "endif":
                nesting -= 1
                open_ifs.pop()
            rules.append(rule)
        for lineno in reversed(open_ifs):
            msg.warn(f"cidr map {self.name}, line {lineno}: IF has no matching ENDIF")
        self._rules = rules

    @staticmethod
    def _parse(line: str, nesting: int) -> tuple:
        word = line[:5].lower()
        if word[:2] == "if" and not line[2:3].isalnum():
            rest, positive = line[2:], True
            while rest and (rest[0] == "!" or rest[0] in _SPACE):
                if rest[0] == "!":
                    positive = not positive
                rest = rest[1:]
            if not rest:
                raise ValueError("no address pattern")
            family, raw, prefix = _cidr_pattern(rest.rstrip(_SPACE))
            return "if", family, int.from_bytes(raw, "big"), prefix, positive, "", nesting
        if word == "endif" and not line[5:6].isalnum():
            if line[5:].strip(_SPACE):
                raise ValueError("garbage after ENDIF")
            if nesting == 0:
                raise ValueError("ENDIF without IF")
            return "endif", 0, 0, 0, True, "", nesting
        positive, pos = True, 0
        while pos < len(line) and (line[pos] == "!" or line[pos] in _SPACE):
            if line[pos] == "!":
                positive = not positive
            pos += 1
        end = pos
        while end < len(line) and line[end] not in _SPACE:
            end += 1
        pattern, value = line[pos:end], line[end:].strip(_SPACE)
        if not pattern:
            raise ValueError("no address pattern")
        family, raw, prefix = _cidr_pattern(pattern)
        if not value:
            raise ValueError("no lookup result")
        return "match", family, int.from_bytes(raw, "big"), prefix, positive, value, nesting

    def lookup(self, key: str) -> str | None:
        """The result of the first rule that matches the address key (never folded)."""
        with self._lock:
            self._refresh()
            rules = self._rules
        family = _cidr_family(key)
        try:
            addr = int.from_bytes(socket.inet_pton(family, key), "big")
        except (OSError, ValueError):
            return None            # not an address: no pattern can match
        bits = 128 if family == socket.AF_INET6 else 32
        skip_to = None             # inside an IF that did not match: its nesting level
        for op, fam, net, prefix, positive, value, nesting in rules:
            if skip_to is not None:
                if op == "endif" and nesting == skip_to + 1:
                    skip_to = None
                continue
            if op == "endif":
                continue
            hit = fam == family and \
                (addr >> (bits - prefix) == net >> (bits - prefix)) == positive
            if op == "if":
                if not hit:
                    skip_to = nesting
                continue
            if hit:
                return value
        return None


# --- opening ------------------------------------------------------------------------------

class CacheTable(Table):
    """lmdb:, hash: and btree: opened writable, for a cache that a program updates in
    place (postscreen_cache_map): the file is created when missing and shared through
    lib/table_store.py's acquire_cache_env() (LMDB lock file, no fsync)."""

    iterable = True

    def __init__(self, type_: str, name: str, fold: bool = True):
        super().__init__(type_, name, fold)
        self.path = os.path.abspath(db_path(type_, name))
        try:
            if os.path.getsize(self.path) > 0 and _file_kind(self.path) != "lmdb":
                raise TableError(f"open database {self.path}: not an LMDB file (a "
                                 "Berkeley DB file from Postfix?): remove it, it is a cache")
        except OSError:
            pass                            # missing: created below
        try:
            self._env = table_store.acquire_cache_env(self.path)
        except (OSError, lmdb.Error) as exc:
            raise TableError(f"open database {self.path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None

    def _txn(self, write: bool = False):
        if self._env is None:
            raise TableError(f"table {self.ref}: access after close")
        return self._env.begin(write=write)

    def lookup(self, key: str) -> str | None:
        k = _enc(self._key(key))
        if not k or len(k) > MAX_KEY:
            return None
        with self._lock:
            try:
                with self._txn() as txn:
                    value = txn.get(k)
            except lmdb.Error as exc:
                raise TableError(f"read database {self.path}: {exc}") from None
        return None if value is None else _dec(value)

    def update(self, key: str, value: str) -> bool:
        """Store value under key; False (warned) when the key is too long or the map is
        full."""
        k = _enc(self._key(key))
        if not k or len(k) > MAX_KEY:
            msg.warn(f"{self.ref}: key too long for LMDB; entry for {key!r} not saved")
            return False
        with self._lock:
            try:
                with self._txn(write=True) as txn:
                    txn.put(k, _enc(value))
            except lmdb.MapFullError:
                msg.warn(f"{self.ref}: database is full; entry for {key} not saved")
                return False
            except lmdb.Error as exc:
                raise TableError(f"write database {self.path}: {exc}") from None
        return True

    def delete(self, key: str) -> bool:
        """Remove key; True when it was there."""
        k = _enc(self._key(key))
        if not k or len(k) > MAX_KEY:
            return False
        with self._lock:
            try:
                with self._txn(write=True) as txn:
                    return txn.delete(k)
            except lmdb.Error as exc:
                raise TableError(f"write database {self.path}: {exc}") from None

    def items(self) -> list[tuple[str, str]]:
        with self._lock:
            try:
                with self._txn() as txn:
                    return [(_dec(k), _dec(v)) for k, v in txn.cursor()]
            except lmdb.Error as exc:
                raise TableError(f"read database {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            if self._env is not None:
                table_store.release_cache_env(self.path)
                self._env = None


class StoreTable(table_store.StoreTable):
    """memcache: and redis: (lib/table_store.py), read-write, with Table's errors."""

    iterable = False

    def items(self) -> list[tuple[str, str]]:
        raise TableError(f"table {self.ref}: sequence operation is not supported")


_CLASSES_BY_TYPE = {"lmdb": LmdbTable, "hash": LmdbTable, "btree": LmdbTable,
                    "texthash": TexthashTable, "inline": InlineTable,
                    "static": StaticTable, "regexp": RegexpTable, "pcre": RegexpTable,
                    "cidr": CidrTable, "unix": UnixTable}


def open_table(ref: str, cfg=None, fold: bool = True, writable: bool = False) -> Table:
    """Open the table `type:name`; TableError when it cannot be used (see FUNCTIONS)."""
    type_, name = split_ref(ref)
    _check_type(type_)
    if type_ in table_store.STORE_TYPES:
        try:
            return StoreTable(type_, name, fold)
        except table_store.StoreConfigError as exc:
            raise TableError(str(exc)) from None
    if writable:
        if type_ not in INDEXED:
            raise TableError(f"{type_}:{name} map requires O_RDONLY access mode")
        return CacheTable(type_, name, fold)
    return _CLASSES_BY_TYPE[type_](type_, name, fold)


