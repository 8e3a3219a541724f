"""postmap: build, query, list and edit lookup tables, with Postfix's postmap(1) flags.

    postfix-py postmap [-finNoprsuUvw] [-c config_dir] [-d key] [-q key] [type:]file ...

Without -q, -d or -s, each `[type:]file` is built from the text file `file` by
lib/table_writer.py (see lib/tables.py for the format and the file names); the type
defaults to default_database_type from main.cf (hash). Only lmdb, hash and btree can be built; all are
LMDB files. A rebuilt table replaces the old file atomically: running daemons see it at
their next lookup.

FLAGS
    -c dir   read dir/main.cf; without -c (and without MAIL_CONFIG) a missing main.cf
             means built-in defaults, with -c it is fatal, as in Postfix.
    -d key   remove key from each table; `-d -` reads keys from standard input, one a line.
             Exit 0 when at least one key was removed, 1 when none was.
    -f       no case folding: keys are stored and queried as written.
    -i       incremental: add the entries read from standard input to the table instead
             of building it anew from the file.
    -n, -N   store keys and values without (default) / with a terminating NUL.
    -o       as root, leave the table owned by root instead of the source file's owner.
    -p       new files get mode 0644 instead of the source file's permissions.
    -q key   print the value from the first table that has key; exit 1 when none has it.
             `-q -` reads keys from standard input and prints `key<TAB>value` for each
             key found; exit 0 when at least one was found. Works for every table type.
    -r       on duplicate keys the last entry wins, silently.
    -s       print every entry as `key<TAB>value` (lmdb, hash, btree, texthash, inline).
    -u, -U   accepted for compatibility; UTF-8 is always allowed.
    -v       more verbose logging (repeat for more).
    -w       on duplicate keys the first entry wins, silently.
    -b, -h, -m and -F (header/body queries, base64 values) are not supported: fatal.

DIAGNOSTICS
    Warnings and errors on standard error as `postmap: warning: ...` and
    `postmap: fatal: ...` (exit status 1), in Postfix's words.
"""

from __future__ import annotations

import getopt
import os
import sys

from ..lib import maincf, msg, table_writer, tables

USAGE = "usage: postmap [-bfFhimnNoprsuUvw] [-c config_dir] [-d key] [-q key] [map_type:]file..."


def _out(line: str) -> None:
    """Write one line to standard output, passing undecodable bytes through."""
    data = (line + "\n").encode("utf-8", "surrogateescape")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", "replace"))
    else:
        sys.stdout.flush()
        buffer.write(data)
        buffer.flush()


def _stdin_lines() -> list[str]:
    """Lines of standard input without their newlines."""
    buffer = getattr(sys.stdin, "buffer", None)
    text = buffer.read().decode("utf-8", "surrogateescape") if buffer else sys.stdin.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _config(config_dir: str | None):
    """main.cf from -c (strict, as Postfix) or the default place (defaults if missing)."""
    explicit = config_dir is not None or bool(os.environ.get("MAIL_CONFIG"))
    directory = config_dir or maincf.default_config_dir()
    path = os.path.join(directory, "main.cf")
    try:
        if not explicit and not os.path.exists(path):
            return maincf.Config(directory, path)
        return maincf.load(directory)
    except maincf.ConfigError as exc:
        msg.fatal(str(exc))


def _with_type(arg: str, default_type: str) -> str:
    """`[type:]file` with the default type filled in."""
    return arg if ":" in arg else f"{default_type}:{arg}"


def _print_value(table: tables.Table, key: str, value: str, with_key: bool) -> None:
    if value == "":
        # Postfix's postmap complains about a table that answers "" instead of nothing.
        msg.warn(f"table {table.ref}: key {key}: empty string result is not allowed")
        msg.warn(f"table {table.ref} should return NO RESULT in case of NOT FOUND")
    _out(f"{key}\t{value}" if with_key else value)


class _Tables:
    """Tables opened on first use, in command-line order, closed at the end."""

    def __init__(self, refs: list[str], cfg, fold: bool):
        self.refs, self.cfg, self.fold = refs, cfg, fold
        self.opened: dict[str, tables.Table] = {}

    def get(self, ref: str) -> tables.Table:
        if ref not in self.opened:
            self.opened[ref] = tables.open_table(ref, self.cfg, fold=self.fold)
        return self.opened[ref]

    def find(self, key: str) -> tuple[tables.Table, str] | None:
        for ref in self.refs:
            table = self.get(ref)
            value = table.lookup(key)
            if value is not None:
                return table, value
        return None

    def close(self) -> None:
        for table in self.opened.values():
            table.close()


def _query(refs: list[str], cfg, fold: bool, key: str) -> int:
    opened = _Tables(refs, cfg, fold)
    try:
        if key == "-":
            found = False
            for line in _stdin_lines():
                hit = opened.find(line)
                if hit is not None:
                    _print_value(hit[0], line, hit[1], True)
                    found = True
            return 0 if found else 1
        hit = opened.find(key)
        if hit is None:
            return 1
        _print_value(hit[0], key, hit[1], False)
        return 0
    finally:
        opened.close()


def _dump(refs: list[str], cfg, fold: bool) -> int:
    for ref in refs:
        with tables.open_table(ref, cfg, fold=fold) as table:
            for key, value in table.items():
                _out(f"{key}\t{value}")
    return 0


def _delete(refs: list[str], cfg, fold: bool, key: str) -> int:
    keys = _stdin_lines() if key == "-" else [key]
    found = False
    for ref in refs:
        if table_writer.delete(ref, keys, fold=fold, cfg=cfg):
            found = True
    return 0 if found else 1


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "bc:d:fFhimnNopq:rsuUvw")
    except getopt.GetoptError as exc:
        if "requires argument" in exc.msg:
            sys.stderr.write(f"postmap: option requires an argument -- '{exc.opt}'\n")
        else:
            sys.stderr.write(f"postmap: invalid option -- '{exc.opt}'\n")
        msg.fatal(USAGE)
    config_dir = query = delkey = None
    sequence = incremental = False
    fold, null, inherit_mode, as_owner = True, False, True, True
    duplicates, verbose = "warn", 0
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt in ("-d", "-q"):
            if sequence or query is not None or delkey is not None:
                msg.fatal("specify only one of -s -q or -d")
            if opt == "-d":
                delkey = val
            else:
                query = val
        elif opt == "-s":
            if query is not None or delkey is not None:
                msg.fatal("specify only one of -s or -q or -d")
            sequence = True
        elif opt == "-f":
            fold = False
        elif opt == "-i":
            incremental = True
        elif opt in ("-n", "-N"):
            null = opt == "-N"
        elif opt == "-o":
            as_owner = False
        elif opt == "-p":
            inherit_mode = False
        elif opt == "-r":
            duplicates = "replace"
        elif opt == "-w":
            duplicates = "ignore"
        elif opt == "-v":
            verbose += 1
        elif opt in ("-b", "-h", "-m", "-F"):
            msg.fatal(f"option {opt} is not supported by postfix-py postmap")
        # -u, -U: accepted, nothing to do
    if verbose:
        msg.init_cli("postmap", verbose=verbose)
    if not args:
        msg.fatal(USAGE)
    cfg = _config(config_dir)
    try:
        default_type = cfg["default_database_type"]
        refs = [_with_type(a, default_type) for a in args]
        if query is not None:
            return _query(refs, cfg, fold, query)
        if sequence:
            return _dump(refs, cfg, fold)
        if delkey is not None:
            return _delete(refs, cfg, fold, delkey)
        for ref in refs:
            if incremental:
                count = table_writer.build(ref, fold=fold, cfg=cfg, stream=_stdin(),
                                           incremental=True, duplicates=duplicates,
                                           null=null, inherit_mode=inherit_mode,
                                           as_owner=as_owner)
            else:
                count = table_writer.build(ref, fold=fold, cfg=cfg,
                                           duplicates=duplicates, null=null,
                                           inherit_mode=inherit_mode, as_owner=as_owner)
            msg.verbose(1, f"{ref}: {count} entries")
        return 0
    except (tables.TableError, maincf.ConfigError, OSError) as exc:
        fatal_error(exc)


def fatal_error(exc: Exception) -> None:
    """A table, configuration or file system error as the tool's fatal error (an OSError
    with the file it is about), as Postfix's postmap and postalias report them."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        msg.fatal(f"{where}{exc.strerror or exc}")
    msg.fatal(str(exc))


def _stdin():
    """Standard input for -i: the byte stream when there is one (keeps odd bytes)."""
    return getattr(sys.stdin, "buffer", None) or sys.stdin


def main(argv: list[str]) -> int:
    """Run postmap with Postfix's flags; returns the exit status (fatal errors: 1)."""
    msg.init_cli("postmap")
    try:
        return _run(list(argv))
    except msg.FatalError:
        return 1
