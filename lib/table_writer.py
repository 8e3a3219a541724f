"""Building and editing indexed tables (lmdb:, hash:, btree:), as Postfix's postmap(1).

The reading side, the source format and the file names are lib/tables.py's; this module
writes the database files that it reads.

FILES AND CONCURRENCY
    A database file is never changed in place. build() and delete() write a complete new
    LMDB file beside the old one (a temporary name in the same directory), sync it, give it
    the mode and owner that Postfix's postmap would (the existing file's mode; for a new
    file the source file's permissions under umask 022, or 0644 when inherit_mode=False;
    as root, the owner of the source file unless as_owner=False), rename it over the old
    name and sync the directory. Writers of one table exclude each other with flock(2) on
    the current file. Readers (lib/tables.py) open the file read-only without a lock
    file: nothing ever writes to a file they have mapped, so they never see a half-built
    table, and they open the new file at their next lookup.

FUNCTIONS
    build(ref, source_path=None, fold=True, *, cfg=None, stream=None, incremental=False,
          duplicates="warn", null=False, inherit_mode=True, as_owner=True, pairs=None) -> int
        Build an lmdb/hash/btree table from source_path (default: the table's name), or
        from the text of stream (postmap -i reads standard input); incremental=True keeps
        the entries already in the table. null=True stores keys and values with a
        terminating NUL (postmap -N); lookups find both forms. cfg supplies
        lmdb_map_size (the first map size; the map grows when full). Returns the number of
        entries. pairs(text, path) yields (line number, key, value) from the source text
        (default tables.source_pairs; lib/aliases.source_pairs for postalias). Raises TableError: "unsupported dictionary type: T does not support
        bulk-mode creation." for other types, "open SOURCE: reason", a key longer than
        LMDB's 511 bytes (naming file and line; the old table stays), and the errors of
        open_table for an existing file that is not LMDB (incremental only).
    delete(ref, keys, fold=True, cfg=None) -> list[str]
        Remove keys (folded unless fold=False); returns those that were present. Raises
        TableError: "open database FILE: ...", "T:NAME map requires O_RDONLY access mode"
        (texthash, inline, regexp, pcre), "table static:NAME: delete operation is not
        supported".

SEE ALSO
    lib/tables.py (open_table, the source format, key folding, duplicates), postmap(1).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat as stat_mod
import tempfile

import lmdb

from . import msg
from .tables import (DEFAULT_MAP_SIZE, INDEXED, MAX_KEY, TableError, _acquire_env, _check_type,
                     _dec, _enc, _read_source, _release_env, _strip_nul, db_path, source_pairs,
                     split_ref)


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
