"""postconf: show or edit the postfix-py configuration, with Postfix's flags.

    postfix-py postconf [-c config_dir] [-d | -n] [-h] [-x] [name ...]
    postfix-py postconf [-c config_dir] -e name=value ...
    postfix-py postconf [-c config_dir] -X name ...   |   -# name ...
    postfix-py postconf [-c config_dir] -M [-f] [service[/type] ...]

Without flags, every parameter in effect (main.cf over the defaults), sorted by name;
-d the defaults (params.py's table), -n only what main.cf sets, -h values without names,
-x values with `$name` expanded. -e sets parameters in main.cf, keeping comments and order;
-X removes them; -# comments them out; each edit replaces main.cf atomically. -M prints
master.cf services as Postfix does (-f folds long lines).

Warnings as Postfix's: `name: unknown parameter` for a name that is neither declared nor
set; `main.cf: unused parameter: name=value` for a main.cf name that nothing declares or
refers to. Exit status 0, or 1 with `postconf: fatal: ...` for a configuration that cannot
be read or an edit that is malformed.
"""

from __future__ import annotations

import getopt
import os
import sys

from ..lib import maincf, msg, params

# Per-transport parameters Postfix derives from master.cf service names.
_TRANSPORT_SUFFIXES = (
    "_destination_concurrency_limit", "_destination_recipient_limit",
    "_initial_destination_concurrency", "_destination_rate_delay",
    "_destination_concurrency_failed_cohort_limit", "_extra_recipient_limit",
    "_recipient_limit", "_time_limit", "_delivery_slot_cost",
)


def _print(name: str, value: str, hide_name: bool) -> None:
    line = value if hide_name else (f"{name} = {value}" if value else f"{name} =")
    sys.stdout.write(line + "\n")


def _services(cfg: maincf.Config):
    """master.cf services, or [] when it is missing (postconf works without it)."""
    from ..lib import mastercf
    path = os.path.join(cfg.config_dir, "master.cf")
    if not os.path.exists(path):
        msg.warn(f"open {path}: No such file or directory")
        return []
    return mastercf.load(path)


def _known_from_master(cfg: maincf.Config) -> set[str]:
    """Names master.cf makes legitimate: `-o` targets and references, per-transport limits."""
    known: set[str] = set()
    try:
        services = _services(cfg)
    except Exception:   # master.cf trouble is reported by -M and by `check`, not here
        return known
    for svc in services:
        known.update(svc.overrides)
        for value in svc.overrides.values():
            known.update(m.group(1) or m.group(2) or m.group(3)
                         for m in maincf._REF_RE.finditer(value))
        known.update(svc.name + s for s in _TRANSPORT_SUFFIXES)
    return known


def _warn_unused(cfg: maincf.Config, unused: list[str]) -> None:
    for name in cfg.undefined_references():
        if params.lookup(name) is None:
            msg.warn(f"{cfg.path}: undefined parameter: {name}")
    for name in unused:
        msg.warn(f"{cfg.path}: unused parameter: {name}={cfg.entries[name].value}")


def _parse_assignment(arg: str) -> tuple[str, str]:
    name, eq, value = arg.partition("=")
    name = name.strip()
    if not eq or not name:
        msg.fatal(f"missing '=' after attribute name: \"{arg.strip()}\"")
    if not maincf.NAME_RE.fullmatch(name):
        msg.fatal(f"bad parameter name: \"{name}\"")
    return name, value.strip()


def _show_master(cfg: maincf.Config, selectors: list[str], fold: bool) -> int:
    from ..lib import mastercf
    path = os.path.join(cfg.config_dir, "master.cf")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            # Every entry as written, duplicates included, as Postfix's postconf -M.
            services = mastercf.parse(f.read(), path)
    except OSError as exc:
        msg.fatal(f"open {path}: {exc.strerror}")
    except mastercf.MasterCfError as exc:
        msg.fatal(str(exc))
    status = 0
    for svc in services:
        if selectors and not any(_selected(svc, s) for s in selectors):
            continue
        sys.stdout.write(mastercf.format_service(svc, fold=fold) + "\n")
    return status


def _selected(svc, selector: str) -> bool:
    name, _, type_ = selector.partition("/")
    return (not name or name == svc.name) and (not type_ or type_ == svc.type)


def main(argv: list[str]) -> int:
    """Run postconf with Postfix's flags; returns the exit status."""
    msg.init_cli("postconf")
    try:
        opts, args = getopt.getopt(argv, "c:dnhxeX#Mfv")
    except getopt.GetoptError as exc:
        msg.fatal(f"{exc.msg}; usage: postconf [-c config_dir] [-dnhxeX#Mf] [name ...]")
    flags = {o for o, _ in opts}
    config_dir = None
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
    modes = flags & {"-e", "-X", "-#", "-M"}
    if len(modes) > 1 or (modes and flags & {"-d", "-n"}) or {"-d", "-n"} <= flags:
        msg.fatal("specify at most one of -d, -n, -e, -X, -#, -M")

    explicit_dir = config_dir is not None
    config_dir = config_dir or maincf.default_config_dir()
    main_cf = os.path.join(config_dir, "main.cf")
    if flags & {"-e", "-X", "-#"}:
        if not args:
            msg.fatal("no parameters specified")
        try:
            if "-e" in flags:
                maincf.edit(main_cf, dict(_parse_assignment(a) for a in args))
            elif "-X" in flags:
                maincf.edit(main_cf, {}, remove=[a.strip() for a in args])
            else:
                maincf.edit(main_cf, {}, comment=[a.strip() for a in args])
        except OSError as exc:
            msg.fatal(f"edit {main_cf}: {exc.strerror}")
        return 0

    try:
        if "-d" in flags:
            cfg = maincf.Config(config_dir, main_cf)   # defaults only
        else:
            cfg = maincf.load(config_dir)
    except maincf.ConfigError as exc:
        msg.fatal(str(exc))

    if "-M" in flags:
        return _show_master(cfg, args, "-f" in flags)

    hide, expand = "-h" in flags, "-x" in flags
    default_dir = params.lookup("config_directory").default
    # As Postfix: a main.cf name that nothing declares or uses is "unused", not shown.
    unused = [] if "-d" in flags else cfg.unused(_known_from_master(cfg))
    if args:
        names = args
    elif "-n" in flags:
        names = sorted(set(cfg.entries) - set(unused))
        if explicit_dir and os.path.abspath(config_dir) != default_dir:
            names = sorted(set(names) | {"config_directory"})
    else:
        names = sorted(set(params.names()) | set(cfg.entries) - set(unused))

    try:
        for name in names:
            raw = cfg.default(name) if "-d" in flags else cfg.raw(name)
            if name == "config_directory" and "-d" in flags:
                raw = default_dir
            if raw is None or name in unused:
                msg.warn(f"{name}: unknown parameter")
                continue
            _print(name, cfg.expand(raw) if expand else raw, hide)
    except maincf.ConfigError as exc:
        msg.fatal(str(exc))
    if "-d" not in flags:
        _warn_unused(cfg, unused)
    return 0
