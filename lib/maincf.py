"""main.cf: reading, `$name` expansion, typed access, and editing in place.

This is the only module that reads main.cf. A Config holds what main.cf sets (and, for a
master.cf service, its `-o name=value` overrides) and answers typed values through the
parameter table in params.py; values expand lazily, when asked for.

SYNTAX (as Postfix)
    `name = value`; white space around `=` and at the end of the value is dropped. A line
    that starts with white space continues the previous logical line (joined by one space).
    Empty lines and lines whose first non-blank character is `#` are ignored; a `#` later in
    a line is part of the value. A later entry overrides an earlier one, with Postfix's
    warning. A line without `=` is an error naming the file and line.

EXPANSION
    `$name`, `${name}` and `$(name)` give the value of name (empty when undefined);
    `${name?text}` gives text when name is non-empty, `${name:text}` when it is empty;
    `{text}` may enclose text, as in `${stress?{10}:{300}}`; `$$` is a literal `$`.
    Nesting deeper than MAX_DEPTH is an error ("unreasonable macro call nesting").
    split_macros(text) is the one parser of this syntax (Postfix's mac_parse()): it
    returns the literal pieces (str) and the references (Ref, whose name is what stands
    after `$` or between the brackets), or raises MacroSyntaxError (kind "unmatched" for
    a bracket without its closing one, "empty" for a `$` without a name). Config.expand
    evaluates its result against main.cf; lib/tables uses it for `$N` in regexp results.

FUNCTIONS
    load(config_dir=None, overrides=None) -> Config: read config_dir/main.cf (default: the
        MAIL_CONFIG environment variable, else params' config_directory default); raises
        ConfigError (file and line in the message).
    Config[name] -> typed value; Config.get(name) -> expanded text; Config.raw(name) ->
        unexpanded text or None; Config.expand(text); Config.with_overrides(dict);
        Config.unused() -> main.cf names neither declared nor referenced.
    edit(path, set_values, remove=(), comment=()) rewrites main.cf atomically, keeping
        comments and order (postconf -e, -X, -#).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import msg, params
from .safeio import atomic_write

MAX_DEPTH = 100
NAME_RE = re.compile(r"[A-Za-z0-9_]+")


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file and line."""


class MacroSyntaxError(ValueError):
    """A `$` reference that cannot be parsed; kind is "unmatched" or "empty"."""

    def __init__(self, kind: str, text: str, bracket: str = ""):
        super().__init__(f"{kind} macro reference in \"{text}\"")
        self.kind, self.text, self.bracket = kind, text, bracket


@dataclass(frozen=True)
class Ref:
    """One `$name`, `${inner}` or `$(inner)` reference of split_macros()."""
    name: str


def split_macros(text: str) -> list:
    """Split text into literal str pieces and Ref references; `$$` is a literal `$`."""
    out: list = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("$", i)
        if j < 0:
            literal.append(text[i:])
            break
        literal.append(text[i:j])
        i = j
        if text[i + 1:i + 2] == "$":
            literal.append("$")
            i += 2
            continue
        if text[i + 1:i + 2] in ("{", "("):
            close = "}" if text[i + 1] == "{" else ")"
            end = _matching(text, i + 1, close)
            if end < 0:
                raise MacroSyntaxError("unmatched", text, text[i + 1])
            name, i = text[i + 2:end], end + 1
        else:
            m = NAME_RE.match(text, i + 1)
            if not m:
                raise MacroSyntaxError("empty", text)
            name, i = m.group(0), m.end()
        if "".join(literal):
            out.append("".join(literal))
        literal = []
        out.append(Ref(name))
    if "".join(literal):
        out.append("".join(literal))
    return out


@dataclass
class Entry:
    value: str
    path: str
    line: int


def parse_lines(text: str, path: str, warn=msg.warn) -> list[tuple[int, str, str]]:
    """Split main.cf text into (line number, name, value) for each logical line."""
    logical: list[list] = []   # [first line number, text]
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not logical:
                warn(f"{path}: logical line must not start with whitespace: \"{line}\"")
                continue
            logical[-1][1] = logical[-1][1].rstrip() + " " + stripped
        else:
            logical.append([number, line])
    out = []
    for number, line in logical:
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ConfigError(f"{path}, line {number}: missing '=' after attribute name: "
                              f"\"{line.strip()}\"")
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{path}, line {number}: bad parameter name: \"{name}\"")
        out.append((number, name, value.strip()))
    return out


@dataclass
class Config:
    """What main.cf sets, plus per-service overrides, with typed, lazily expanded access."""

    config_dir: str
    path: str
    entries: dict[str, Entry] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)      # typed values
    _texts: dict = field(default_factory=dict, repr=False)      # expanded texts (get)
    _derived: dict = field(default_factory=dict, repr=False)    # made by derived()
    _computing: set = field(default_factory=set, repr=False)   # computed defaults under way

    # --- raw values ------------------------------------------------------------------
    def raw(self, name: str) -> str | None:
        """The unexpanded value: override, else main.cf, else default, else None."""
        if name in self.overrides:
            return self.overrides[name]
        if name in self.entries:
            return self.entries[name].value
        if name == "config_directory":
            return self.config_dir
        return self.default(name)

    def default(self, name: str) -> str | None:
        """The default of a declared parameter (computed where Postfix computes it)."""
        row = params.lookup(name)
        if row is None:
            return None
        if not row.default:
            if name in self._computing:     # myhostname = $mydomain: mydomain's default
                raise ConfigError(f"unreasonable macro call nesting: \"${name}\" "
                                  "depends on itself")
            self._computing.add(name)
            try:
                computed = _computed(self, name)
            finally:
                self._computing.discard(name)
            if computed is not None:
                return computed
        return row.default

    def is_set(self, name: str) -> bool:
        """Whether main.cf or an override sets name."""
        return name in self.overrides or name in self.entries

    # --- expansion -------------------------------------------------------------------
    def expand(self, text: str, _depth: int = 0, _undefined: set | None = None) -> str:
        """Expand $name, ${name}, $(name), ${name?x}, ${name:x} and $$ in text."""
        if "$" not in text:
            return text
        if _depth > MAX_DEPTH:
            raise ConfigError(f"unreasonable macro call nesting: \"{text[:60]}\"")
        try:
            parts = split_macros(text)
        except MacroSyntaxError as exc:
            if exc.kind == "unmatched":
                raise ConfigError(f"unmatched '{exc.bracket}' in \"{text}\"") from None
            raise ConfigError(f"empty macro name: \"{text}\"") from None
        return "".join(p if isinstance(p, str) else self._expand_ref(p.name, _depth, _undefined)
                       for p in parts)

    def _expand_ref(self, inner: str, depth: int, undefined) -> str:
        m = NAME_RE.match(inner)
        if not m:
            raise ConfigError(f"unsupported macro expression: \"${{{inner}}}\"")
        name, rest = m.group(0), inner[m.end():]
        if not rest:
            return self._value_of(name, depth, undefined)
        op, rest = rest[0], rest[1:]
        if op not in "?:":
            raise ConfigError(f"unsupported macro expression: \"${{{inner}}}\"")
        first, second = rest, ""
        if rest.startswith("{"):
            # ${name?{a}:{b}}: a when name is non-empty, else b.
            end = _matching(rest, 0, "}")
            tail = rest[end + 1:].strip() if end >= 0 else ""
            if end < 0 or (tail and not (tail[:1] == ":" and tail[1:].strip()[:1] == "{"
                                         and tail.endswith("}"))):
                raise ConfigError(f"bad conditional macro: \"${{{inner}}}\"")
            first = rest[1:end]
            second = tail[1:].strip()[1:-1] if tail else ""
        value = self._value_of(name, depth, undefined)
        chosen = first if bool(value) == (op == "?") else second
        return self.expand(chosen, depth + 1, undefined)

    def _value_of(self, name: str, depth: int, undefined) -> str:
        text = self.raw(name)
        if text is None:
            if undefined is not None:
                undefined.add(name)
            return ""
        return self.expand(text, depth + 1, undefined)

    # --- typed access ----------------------------------------------------------------
    def get(self, name: str) -> str:
        """The expanded text of a parameter ("" when it is neither declared nor set).
        Cached, as the typed values are: a Config does not change once loaded."""
        text = self._texts.get(name)
        if text is None:
            text = self.raw(name) or ""
            if name not in params.RAW:      # a raw parameter's $names are its program's
                text = self.expand(text)
            self._texts[name] = text
        return text

    def __getitem__(self, name: str):
        """The typed value of a declared parameter; ConfigError for a bad value."""
        if name in self._cache:
            return self._cache[name]
        row = params.lookup(name)
        if row is None:
            raise KeyError(f"undeclared parameter: {name}")
        try:
            value = params.convert(row, self.get(name))
        except (params.ParamError, ConfigError) as exc:     # a bad value or a bad $macro
            where = self.entries.get(name)
            prefix = f"{where.path}, line {where.line}: " if where and name not in self.overrides else ""
            raise ConfigError(prefix + str(exc)) from None
        self._cache[name] = value
        return value

    def derived(self, key: str, make):
        """make(self), made once per Config and kept with it: what a program works out
        from the configuration alone (smtpd's per-session values and EHLO replies), for
        as long as the Config lives, since a Config does not change once loaded."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make(self)
        return value

    def warm(self) -> None:
        """Work out every declared parameter's value now. The master does this for each
        service's view before it forks: its workers then inherit the values instead of
        each expanding and converting them again (mynetworks asks the kernel for the
        interfaces). A bad value is left for the worker's own lookup to report."""
        for name in params.names():
            try:
                self[name]
            except Exception:   # noqa: BLE001 - the worker's own lookup raises it again
                pass

    def with_overrides(self, overrides: dict[str, str]) -> "Config":
        """A copy with master.cf `-o name=value` overrides on top."""
        return Config(self.config_dir, self.path, self.entries,
                      {**self.overrides, **overrides})

    def references(self) -> set[str]:
        """Names that some value in main.cf or the overrides refers to with $."""
        found: set[str] = set()
        for text in [e.value for e in self.entries.values()] + list(self.overrides.values()):
            found.update(m.group(1) or m.group(2) or m.group(3)
                         for m in _REF_RE.finditer(text))
        return found

    def unused(self, extra_known: set[str] = frozenset()) -> list[str]:
        """main.cf names that are neither declared, nor referenced, nor known otherwise."""
        used = self.references() | set(extra_known)
        return [n for n in self.entries if params.lookup(n) is None and n not in used]

    def undefined_references(self) -> list[str]:
        """Names referenced with $ that are neither declared nor set (Postfix warns)."""
        out = set()
        values = [e.value for n, e in self.entries.items() if n not in params.RAW]
        for text in values + [v for n, v in self.overrides.items() if n not in params.RAW]:
            try:
                self.expand(text, 0, out)
            except ConfigError:
                pass
        return sorted(out)


_REF_RE = re.compile(r"\$(?:([A-Za-z0-9_]+)|\{([A-Za-z0-9_]+)|\(([A-Za-z0-9_]+))")


def _matching(text: str, start: int, close: str) -> int:
    """Index of the bracket that closes text[start], counting nested pairs."""
    opener = text[start]
    level = 0
    for j in range(start, len(text)):
        if text[j] == opener:
            level += 1
        elif text[j] == close:
            level -= 1
            if level == 0:
                return j
    return -1


def _computed(cfg: Config, name: str) -> str | None:
    if name == "myhostname":
        return params.computed_default(name)
    if name == "mydomain":
        host = cfg.get("myhostname")
        return host.split(".", 1)[1] if "." in host else "localdomain"
    if name == "mynetworks":
        return _mynetworks(cfg.get("mynetworks_style"))
    return None


def _mynetworks(style: str) -> str:
    """mynetworks from mynetworks_style: loopback plus this host's addresses or subnets."""
    import ipaddress

    import psutil

    nets = ["127.0.0.0/8", "[::ffff:127.0.0.0]/104", "[::1]/128"]
    try:
        addrs = psutil.net_if_addrs()
    except OSError:
        addrs = {}
    for entries in addrs.values():
        for a in entries:
            if a.family not in (2, 10) or not a.address:
                continue
            try:
                ip = ipaddress.ip_address(a.address.split("%")[0])
            except ValueError:
                continue
            if ip.is_loopback:
                continue
            if style == "host" or not a.netmask:
                net = ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
            else:
                net = ipaddress.ip_network(f"{ip}/{a.netmask}", strict=False)
            text = f"[{net}]" if ip.version == 6 else str(net)
            if ip.version == 6:
                text = f"[{net.network_address}]/{net.prefixlen}"
            if text not in nets:
                nets.append(text)
    return " ".join(nets)


def default_config_dir() -> str:
    """The configuration directory when none is given: $MAIL_CONFIG, else the default."""
    return os.environ.get("MAIL_CONFIG") or params.lookup("config_directory").default


def load(config_dir: str | None = None, overrides: dict[str, str] | None = None,
         warn=msg.warn) -> Config:
    """Read config_dir/main.cf into a Config; ConfigError when it cannot be used."""
    config_dir = config_dir or default_config_dir()
    path = os.path.join(config_dir, "main.cf")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"open {path}: No such file or directory") from None
    except OSError as exc:
        raise ConfigError(f"open {path}: {exc.strerror}") from None
    cfg = Config(config_dir, path, overrides=dict(overrides or {}))
    for number, name, value in parse_lines(text, path, warn):
        old = cfg.entries.get(name)
        if old is not None:
            warn(f"{path}, line {number}: overriding earlier entry: {name}={old.value}")
        cfg.entries[name] = Entry(value, path, number)
    return cfg


def check(cfg: Config) -> list[str]:
    """Every problem with the values of declared parameters, as error lines."""
    problems = []
    for name in list(cfg.entries) + list(cfg.overrides):
        if params.lookup(name) is None:
            continue
        try:
            cfg[name]
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def edit(path: str, set_values: dict[str, str], remove=(), comment=(), warn=msg.warn) -> None:
    """Rewrite main.cf atomically: set, remove (-X) or comment out (-#) parameters."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        lines, mode = [], 0o644
    out: list[str] = []
    done: set[str] = set()
    counts: dict[str, int] = {}
    action = None   # what happens to the logical line being read: None, "drop" or "comment"
    for line in lines:
        stripped = line.strip()
        if line[:1].isspace() and stripped and not stripped.startswith("#"):
            # A continuation line shares the fate of its logical line.
            if action is None:
                out.append(line)
            elif action == "comment":
                out.append("#" + line)
            continue
        action = None
        if stripped and not stripped.startswith("#"):
            name = line.partition("=")[0].strip()
            if name in set_values or name in remove or name in comment:
                counts[name] = counts.get(name, 0) + 1
                if name in set_values:
                    out.append(f"{name} = {set_values[name]}")
                    done.add(name)
                    action = "drop"
                elif name in remove:
                    action = "drop"
                else:
                    out.append("#" + line)
                    action = "comment"
                continue
        out.append(line)
    for name, n in counts.items():
        if n > 1:
            warn(f"{path}: multiple entries for \"{name}\"")
    for name, value in set_values.items():
        if name not in done:
            out.append(f"{name} = {value}")
    text = "\n".join(out) + ("\n" if out else "")
    atomic_write(path, text.encode("utf-8", "surrogateescape"), mode)
