"""postalias, newaliases: build and query alias databases, as Postfix's postalias(1).

    postfix-py postalias [-finNoprsuUvw] [-c config_dir] [-d key] [-q key] [type:]file ...
    postfix-py newaliases [-c config_dir] [-v]

Without -q, -d or -s, each `[type:]file` is built from the alias file `file` (the
format of aliases(5); lib/aliases.py), the type defaulting to default_database_type
(hash). Keys are stored without quotes and folded to lower case; values are stored as
written, the values of one entry joined with ", ". As Postfix, the entry `@` = `@` is
added (Sendmail's mark of a complete database). The file is an LMDB file, replaced
atomically; the flags -c -d -f -i -n -N -o -p -q -r -s -u -U -v -w mean what they mean
for postmap (tools/postmap.py). -s prints `key:<TAB>value` lines, as postalias does.

newaliases builds every table of alias_database; `sendmail -bi` (tools/sendmail.py) is
the same command, and its -oA/path builds that file instead, as Postfix's sendmail does
(it runs `postalias -- $alias_database`). An empty alias_database is nothing to do.

DIAGNOSTICS
    `postalias: warning: FILE, line N: need name:value pair`, `... name must be local`
    (the line is skipped); `postalias: fatal: ...` with exit status 1.

SEE ALSO
    lib/aliases.py, tools/postmap.py, local/service.py; Postfix postalias(1), aliases(5),
    newaliases(1).
"""

from __future__ import annotations

import getopt
import sys

from ..lib import aliases, maincf, msg, params, table_writer, tables
from . import postmap

USAGE = "usage: postalias [-Nfinoprsuvw] [-c config_dir] [-d key] [-q key] [map_type:]file..."


def _dump(refs: list[str], cfg, fold: bool) -> int:
    for ref in refs:
        with tables.open_table(ref, cfg, fold=fold) as table:
            for key, value in table.items():
                postmap._out(f"{key}:\t{value}")
    return 0


def _query(refs: list[str], cfg, fold: bool, key: str) -> int:
    opened = postmap._Tables(refs, cfg, fold)
    try:
        keys = postmap._stdin_lines() if key == "-" else [key]
        found = False
        for k in keys:
            hit = opened.find(k)
            if hit is not None:
                postmap._out(f"{k}:\t{hit[1]}" if key == "-" else hit[1])
                found = True
        return 0 if found else 1
    finally:
        opened.close()


def _build(refs: list[str], cfg, fold: bool, incremental: bool = False, **kw) -> None:
    # Incremental: the table has its `@` entry already (Postfix replaces it silently).
    pairs = (lambda text, path: (p for p in aliases.source_pairs(text, path) if p[1] != "@")) \
        if incremental else aliases.source_pairs
    for ref in refs:
        count = table_writer.build(ref, fold=fold, cfg=cfg, pairs=pairs,
                             stream=postmap._stdin() if incremental else None,
                             incremental=incremental, **kw)
        msg.verbose(1, f"{ref}: {count} entries")


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:d:finNopq:rsuUvw")
    except getopt.GetoptError as exc:
        what = "option requires an argument" if "requires argument" in exc.msg \
            else "invalid option"
        sys.stderr.write(f"postalias: {what} -- '{exc.opt}'\n")
        msg.fatal(USAGE)
    config_dir = query = delkey = None
    sequence = incremental = False
    fold, verbose = True, 0
    kw = {"null": False, "inherit_mode": True, "as_owner": True, "duplicates": "warn"}
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt in ("-d", "-q", "-s"):
            if sequence or query is not None or delkey is not None:
                msg.fatal("specify only one of -s -q or -d")
            if opt == "-d":
                delkey = val
            elif opt == "-q":
                query = val
            else:
                sequence = True
        elif opt == "-f":
            fold = False
        elif opt == "-i":
            incremental = True
        elif opt in ("-n", "-N"):
            kw["null"] = opt == "-N"
        elif opt == "-o":
            kw["as_owner"] = False
        elif opt == "-p":
            kw["inherit_mode"] = False
        elif opt == "-r":
            kw["duplicates"] = "replace"
        elif opt == "-w":
            kw["duplicates"] = "ignore"
        elif opt == "-v":
            verbose += 1
    if verbose:
        msg.init_cli("postalias", verbose=verbose)
    if not args:
        msg.fatal(USAGE)
    cfg = postmap._config(config_dir)
    try:
        refs = [postmap._with_type(a, cfg["default_database_type"]) for a in args]
        if query is not None:
            return _query(refs, cfg, fold, query)
        if sequence:
            return _dump(refs, cfg, fold)
        if delkey is not None:
            return postmap._delete(refs, cfg, fold, delkey)
        _build(refs, cfg, fold, incremental, **kw)
        return 0
    except (tables.TableError, maincf.ConfigError, OSError) as exc:
        postmap.fatal_error(exc)


def main(argv: list[str]) -> int:
    """Run postalias with Postfix's flags; returns the exit status (fatal errors: 1)."""
    msg.init_cli("postalias")
    try:
        return _run(list(argv))
    except msg.FatalError:
        return 1


def newaliases(argv: list[str]) -> int:
    """Build every table of alias_database, as `sendmail -bi`."""
    msg.init_cli("newaliases")
    try:
        return _newaliases(list(argv))
    except msg.FatalError:
        return 1


def alias_init(config_dir: str | None, maps: list[str] | None = None) -> int:
    """newaliases and sendmail -bi: build maps (default: the tables of alias_database)
    as postalias builds its arguments; fatal errors (msg.FatalError) as postalias's."""
    cfg = postmap._config(config_dir)
    try:
        if maps is None:
            maps = params.split_list(cfg.get("alias_database"))
        _build([postmap._with_type(a, cfg["default_database_type"]) for a in maps],
               cfg, True)
        return 0
    except (tables.TableError, maincf.ConfigError, OSError) as exc:
        postmap.fatal_error(exc)


def _newaliases(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:v")
    except getopt.GetoptError as exc:
        sys.stderr.write(f"newaliases: invalid option -- '{exc.opt}'\n")
        msg.fatal("usage: newaliases [-c config_dir] [-v]")
    if args:
        msg.fatal("usage: newaliases [-c config_dir] [-v]")
    config_dir = None
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        else:
            msg.init_cli("newaliases", verbose=1)
    return alias_init(config_dir)
