"""master.cf: the services that the master runs, read as Postfix's master reads them.

This is the only module that reads master.cf. Each logical line defines one service: the
endpoint it listens on, how its workers run, and the command they run with its main.cf
overrides. The master (and `postfix-py postconf -M`) get a list of Service records; nothing
else in postfix-py parses this file.

SYNTAX (as Postfix, master(5))
    A logical line starts with non-white text; a line that starts with white space continues
    it. Empty lines, white-space-only lines and lines whose first non-blank character is `#`
    are ignored, also between a logical line and its continuations; a `#` later in a line is
    text. Continuation text that has no logical line to continue is dropped with Postfix's
    warning ("logical line must not start with whitespace").

    Eight white-space-separated fields, `-` meaning the built-in default:

        service type private unpriv chroot wakeup maxproc command [args...]

    service    The endpoint. inet: `port`, `host:port`, `[host]:port` or `[ipv6:addr]:port`
               (an IPv6 address may also go bare, `::1:2525`); port is a number (1..65535)
               or a name from /etc/services; host is an IP address or a host name, which
               the master resolves. Other types: a socket path relative to queue_directory,
               under private/ or public/ by the private column.
    type       inet, unix, unix-dgram, fifo or pass (Postfix's set; the master decides which
               it runs).
    private    y or n (default y). An inet service cannot be private: as Postfix's master,
               `-` or `y` there is an error, not silently turned into n.
    unpriv     y or n (default y): run as mail_owner rather than root.
    chroot     y or n (default n, as Postfix 3.x at compatibility level 1 and later).
    wakeup     seconds between wake-up requests (default 0, none); a trailing `?` sends none
               before the service is first used.
    maxproc    process limit; 0 is no limit (default: $default_process_limit, which the
               caller resolves: the record keeps None).
    command    the program; it has no default.
    args       the command line. `{` and `}` group words that contain white space, and are
               removed with the white space just inside them, as the master does.
               Leading options are read as the daemon's getopt reads them (Postfix stops at
               the first non-option word and at `--`): `-o name=value` (also `-oname=value`,
               `-vo name=value`, and the long form `-o { name = value }`, whose white space
               around `=` is dropped) overrides a main.cf parameter for this service; a later
               override of the same name wins. `-v` (repeatable) and `-D` stay in args and are
               also counted in `verbose` and `debug`. Everything else stays in args, in order.

    Two lines for the same endpoint and type (Postfix compares the master's internal names:
    `smtp` and `25` are one inet endpoint) are not an error: the master warns
    `duplicate master.cf entry for service "smtp" (25) -- using the last entry` and the later
    definition replaces the earlier one, keeping its place.

FUNCTIONS
    load(path, warn=msg.warn) -> list[Service]: read the file as the master does (duplicates
        merged, with the warning above). Raises MasterCfError.
    parse(text, path, warn=msg.warn) -> list[Service]: every entry in file order, duplicates
        included, as `postconf -M` lists them. Raises MasterCfError.
    merge_duplicates(services, warn=msg.warn) -> list[Service]: the master's view of parse().
    inet_endpoint(name) -> (host or None, port): split an inet service name; raises
        ValueError with Postfix's text ("missing \\"]\\"", "garbage after \\"]\\"", "missing
        service information", "valid hostname or network address required", "garbage after
        numerical service", "bad port number", "unknown service: NAME/tcp").
    format_service(service, fold=False) -> str (alias format_entry): the entry as
        `postconf -M` prints it, without a newline (columns as written, `-` kept; with fold,
        as `postconf -Mf`: each `-o` on its own line, other lines wrapped before 80
        columns, continuation lines indented by four spaces).

    Service fields: name, type, private, unpriv, chroot, wakeup, wakeup_conditional,
    maxproc (None: the default), command, args, overrides, path, line (first line of the
    entry), inet_host (None: every inet_interfaces address), inet_port, verbose, debug,
    fields (the first seven columns as written) and argv (the command line normalized as
    postconf shows it). Properties: key (`name/type`, as `postconf -M name/type`) and
    endpoint (the master's internal name: `25`, `[127.0.0.1]:25`, `private/smtp`).

DEVIATIONS FROM POSTCONF 3.7's DISPLAY
    Checked against Debian's Postfix 3.7: `postconf -M` and `-Mf` output is reproduced byte
    for byte (Debian's master.cf, and the tests' entries), except for two postconf bugs that
    lose information: it prints a first non-option argument that holds white space without
    its braces (`pipe {a b} c` as `pipe a b c`), and it splits `-ofoo=bar` into
    `-o f -o -o=bar`. Here they print as `pipe {a b} c` and `-o foo=bar`, which read back
    as the daemon reads the original.

ERRORS
    MasterCfError (a ValueError) has path, line and text; str() is `path: line N: text`, the
    master's format. Texts, Postfix's master's and daemons' wording:
        open PATH: REASON
        missing "transport type" field (likewise "private", "unprivileged", "chroot",
            "wakeup_time", "max_proc", "command")
        field "transport type" has no default value (likewise "command")
        bad transport type: TYPE
        HOST_PORT_ERROR in "NAME" (see inet_endpoint)
        inet service cannot be private
        field "private": bad value: "VALUE" (likewise "unprivileged", "chroot",
            "wakeup_time", "max_proc")
        missing '}' in "TEXT";  syntax error after '}' in "TEXT"
        invalid "-o TEXT" option value: missing '=' after attribute name (or: missing
            attribute name)
        option requires an argument -- 'o'
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field

from . import msg, tables

TYPES = ("inet", "unix", "unix-dgram", "fifo", "pass")
BLANKS = " \t\r\n"           # Postfix's CHARS_SPACE: field separators
_ISSPACE = " \t\n\v\f\r"     # C isspace(): what counts as white at the start of a line
COLUMN_GOAL = (0, 11, 17, 25, 33, 41, 49, 57)   # postconf -M column of each field
LINE_LIMIT = 80              # postconf -Mf wraps before this column
INDENT = "    "              # and indents continuation lines by this much
DEFAULTS = {"private": "y", "unprivileged": "y", "chroot": "n", "wakeup_time": "0"}


class MasterCfError(ValueError):
    """A master.cf that cannot be used; str() is `path: line N: text`."""

    def __init__(self, text: str, path: str = "", line: int | None = None):
        """Keep the parts; the message is `path: line N: text` when both are known."""
        self.text, self.path, self.line = text, path, line
        if path and line is not None:
            super().__init__(f"{path}: line {line}: {text}")
        else:
            super().__init__(text)


@dataclass
class Service:
    """One master.cf entry, with the defaults of `-` columns applied (maxproc excepted)."""

    name: str
    type: str
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: int
    wakeup_conditional: bool
    maxproc: int | None
    command: str
    args: list[str]
    overrides: dict[str, str]
    path: str
    line: int
    inet_host: str | None = None
    inet_port: int | None = None
    verbose: int = 0
    debug: bool = False
    fields: tuple[str, ...] = ()
    argv: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The service as `postconf -M` names it: `name/type`."""
        return f"{self.name}/{self.type}"

    @property
    def endpoint(self) -> str:
        """The master's internal name, which identifies duplicates: `25`, `private/smtp`."""
        if self.type == "inet":
            if self.inet_host is None:
                return str(self.inet_port)
            return f"[{self.inet_host}]:{self.inet_port}"
        return ("private/" if self.private else "public/") + self.name

    def process_limit(self, default: int) -> int:
        """The maxproc column, or default (the caller's $default_process_limit) for `-`."""
        return default if self.maxproc is None else self.maxproc


# --- logical lines --------------------------------------------------------------------

def logical_lines(text: str, path: str, warn=msg.warn) -> list[tuple[int, str]]:
    """Join text into (first line number, logical line), as Postfix's readllines()."""
    out: list[list] = []
    orphan: list | None = None     # continuation text with nothing to continue
    current: list | None = None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip(_ISSPACE)
        if not stripped or stripped[0] == "#":
            continue
        if line[0] in _ISSPACE:
            if current is not None:
                current[1] += line
            elif orphan is not None:
                orphan[1] += line
            else:
                orphan = [number, line]
            continue
        _warn_orphan(orphan, path, warn)
        orphan = None
        current = [number, line]
        out.append(current)
    _warn_orphan(orphan, path, warn)
    return [(number, body) for number, body in out]


def _warn_orphan(orphan, path, warn) -> None:
    """Warn about dropped continuation text, as Postfix (first 30 characters)."""
    if orphan is not None:
        body = orphan[1]
        warn(f"{path}: logical line must not start with whitespace: "
             f"\"{body[:30]}{'...' if len(body) > 30 else ''}\"")


# --- tokens ---------------------------------------------------------------------------

def _strtok(text: str, pos: int) -> tuple[str | None, int]:
    """The next blank-separated word from pos, and the position after it."""
    n = len(text)
    while pos < n and text[pos] in BLANKS:
        pos += 1
    if pos >= n:
        return None, pos
    start = pos
    while pos < n and text[pos] not in BLANKS:
        pos += 1
    return text[start:pos], pos


def _strtokq(text: str, pos: int) -> tuple[str | None, int]:
    """The next word from pos, where blanks inside {} do not separate (mystrtokq)."""
    n = len(text)
    while pos < n and text[pos] in BLANKS:
        pos += 1
    if pos >= n:
        return None, pos
    start, level = pos, 0
    while pos < n:
        c = text[pos]
        if c == "{":
            level += 1
        elif level > 0 and c == "}":
            level -= 1
        elif level == 0 and c in BLANKS:
            break
        pos += 1
    return text[start:pos], pos


def extract_braces(token: str) -> str:
    """Strip `{` `}` and the white space inside them (Postfix's extpar); ValueError if bad."""
    length = tables.balpar(token)      # Postfix's balpar, one home (lib/tables.py)
    if length == 0:
        raise ValueError(f"missing '}}' in \"{token}\"")
    if length != len(token):
        raise ValueError(f"syntax error after '}}' in \"{token}\"")
    return token[1:length - 1].strip(_ISSPACE)


def split_nameval(text: str) -> tuple[str, str]:
    """Split `name = value` as Postfix's split_nameval(); ValueError with its wording."""
    body = text.lstrip(_ISSPACE)
    if not body:
        raise ValueError("missing attribute name")
    m = re.match(r"[^=" + re.escape(_ISSPACE) + r"]*", body)
    name, rest = m.group(0), body[m.end():].lstrip(_ISSPACE)
    if not rest.startswith("="):
        raise ValueError("missing '=' after attribute name")
    if not name:
        raise ValueError("missing attribute name")
    return name, rest[1:].strip(_ISSPACE)


# --- inet endpoints -------------------------------------------------------------------

_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def valid_hostname(name: str) -> bool:
    """Whether name is a syntactically valid host name (Postfix's valid_hostname)."""
    if not name or len(name) > 255:
        return False
    labels = name.split(".")
    if not all(len(label) <= 63 and _LABEL_RE.fullmatch(label) for label in labels):
        return False
    return not all(label.isdigit() for label in labels)   # "1.2.3.999" is no host name


def _valid_hostaddr(text: str) -> bool:
    """Whether text is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def inet_endpoint(name: str) -> tuple[str | None, int]:
    """Split an inet service name into (host or None, port) as the master does."""
    if name.startswith("["):
        inner, bracket, rest = name[1:].partition("]")
        if not bracket:
            raise ValueError('missing "]"')
        if rest and not rest.startswith(":"):
            raise ValueError('garbage after "]"')
        host, port = inner, rest[1:]
        if host[:5].lower() == "ipv6:":
            host = host[5:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError("malformed IPv6 address") from None
    elif ":" in name:
        host, _, port = name.rpartition(":")
    else:
        host, port = "", name
    if not port:
        raise ValueError("missing service information")
    if host and not _valid_hostaddr(host) and not valid_hostname(host):
        raise ValueError("valid hostname or network address required")
    if port[0].isdigit():
        if not port.isdigit() or not port.isascii():
            raise ValueError("garbage after numerical service")
        number = int(port)
        if not 0 < number <= 65535:
            raise ValueError("bad port number")
    else:
        try:
            number = socket.getservbyname(port, "tcp")
        except OSError:
            raise ValueError(f"unknown service: {port}/tcp") from None
    if host and _valid_hostaddr(host):
        host = str(ipaddress.ip_address(host))   # canonical text: "::1", not "0::1"
    return (host or None), number


# --- entries --------------------------------------------------------------------------

def parse_entry(text: str, path: str, line: int) -> Service:
    """Parse one logical line into a Service; MasterCfError names path and line."""

    def fail(reason: str):
        """Raise MasterCfError for this entry."""
        raise MasterCfError(reason, path, line)

    pos = 0

    def get_str(label: str, default: str | None) -> tuple[str, str]:
        """The next column as (as written, with `-` replaced by default)."""
        nonlocal pos
        value, pos = _strtok(text, pos)
        if value is None:
            fail(f"missing \"{label}\" field")
        if value == "-":
            if default is None:
                fail(f"field \"{label}\" has no default value")
            return value, default
        return value, value

    def get_bool(label: str) -> tuple[str, bool]:
        """The next y/n column as (as written, value)."""
        raw, value = get_str(label, DEFAULTS[label])
        if value not in ("y", "n"):
            fail(f"field \"{label}\": bad value: \"{value}\"")
        return raw, value == "y"

    name, pos = _strtok(text, pos)
    raw_type, type_ = get_str("transport type", None)
    if type_ not in TYPES:
        fail(f"bad transport type: {type_}")
    host = port = None
    if type_ == "inet":
        try:
            host, port = inet_endpoint(name)
        except ValueError as exc:
            fail(f"{exc} in \"{name}\"")
    raw_private, private = get_bool("private")
    if type_ == "inet" and private:
        fail("inet service cannot be private")
    raw_unpriv, unpriv = get_bool("unprivileged")
    raw_chroot, chroot = get_bool("chroot")
    raw_wakeup, wakeup_text = get_str("wakeup_time", DEFAULTS["wakeup_time"])
    if not re.fullmatch(r"[0-9]+\??", wakeup_text):
        fail(f"field \"wakeup_time\": bad value: \"{wakeup_text}\"")
    wakeup = int(wakeup_text.rstrip("?"))
    conditional = wakeup > 0 and wakeup_text.endswith("?")
    raw_maxproc, maxproc_text = get_str("max_proc", "")
    if maxproc_text and not re.fullmatch(r"[0-9]+", maxproc_text):
        fail(f"field \"max_proc\": bad value: \"{maxproc_text}\"")
    maxproc = int(maxproc_text) if maxproc_text else None
    _, command = get_str("command", None)

    tokens = []
    while True:
        token, pos = _strtokq(text, pos)
        if token is None:
            break
        if token.startswith("{"):
            try:
                token = extract_braces(token)
            except ValueError as exc:
                fail(str(exc))
        tokens.append(token)

    args: list[str] = []
    argv: list[str] = [command]
    overrides: dict[str, str] = {}
    verbose, debug = 0, False
    i, in_options = 0, True
    while i < len(tokens):
        token = tokens[i]
        if in_options and token == "--":
            in_options = False
        elif in_options and token.startswith("-") and token != "-":
            at = token.find("o", 1)
            flags = token[1:] if at < 0 else token[1:at]
            verbose += flags.count("v")
            debug = debug or "D" in flags
            if at >= 0:
                if at > 1:
                    args.append(token[:at])
                    argv.append(token[:at])
                if at + 1 < len(token):
                    optarg = token[at + 1:]
                elif i + 1 < len(tokens):
                    i += 1
                    optarg = tokens[i]
                else:
                    fail("option requires an argument -- 'o'")
                try:
                    key, value = split_nameval(optarg)
                except ValueError as exc:
                    fail(f"invalid \"-o {optarg}\" option value: {exc}")
                overrides[key] = value
                argv += ["-o", f"{key}={value}"]
                i += 1
                continue
        else:
            in_options = False
        args.append(token)
        argv.append(token)
        i += 1

    return Service(
        name=name, type=type_, private=private, unpriv=unpriv, chroot=chroot,
        wakeup=wakeup, wakeup_conditional=conditional, maxproc=maxproc, command=command,
        args=args, overrides=overrides, path=path, line=line, inet_host=host,
        inet_port=port, verbose=verbose, debug=debug,
        fields=(name, raw_type, raw_private, raw_unpriv, raw_chroot, raw_wakeup,
                raw_maxproc),
        argv=argv)


def parse(text: str, path: str, warn=msg.warn) -> list[Service]:
    """Every entry of master.cf text, duplicates included, in file order."""
    return [parse_entry(body, path, number)
            for number, body in logical_lines(text, path, warn)]


def merge_duplicates(services: list[Service], warn=msg.warn) -> list[Service]:
    """Keep the last definition of each endpoint and type, in the first one's place."""
    out: list[Service] = []
    where: dict[tuple[str, str], int] = {}
    for svc in services:
        ident = (svc.endpoint, svc.type)
        if ident in where:
            old = out[where[ident]]
            warn(f"duplicate master.cf entry for service \"{old.name}\" ({svc.endpoint})"
                 " -- using the last entry")
            out[where[ident]] = svc
        else:
            where[ident] = len(out)
            out.append(svc)
    return out


def load(path: str, warn=msg.warn) -> list[Service]:
    """Read master.cf at path as the master does; MasterCfError when it cannot be used."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise MasterCfError(f"open {path}: {exc.strerror}", path) from None
    return merge_duplicates(parse(text, path, warn), warn)


# --- output ---------------------------------------------------------------------------

def format_service(service: Service, fold: bool = False) -> str:
    """Format the entry as `postconf -M` prints it (`-Mf` with fold), without newline."""
    out: list[str] = []
    line_len = 0
    for goal, text in zip(COLUMN_GOAL, (*service.fields, service.command)):
        if line_len > 0:
            pad = max(1, goal - line_len)
            out.append(" " * pad)
            line_len += pad
        out.append(text)
        line_len += len(text)
    argv = service.argv[1:]
    in_options = True
    i = 0
    while i < len(argv):
        arg = argv[i]
        aval = None
        need_parens = False
        arg_len = len(arg)
        if in_options:
            if not arg.startswith("-") or arg == "--":
                in_options = False
            elif arg == "-o" and i + 1 < len(argv):
                aval = argv[i + 1]
                line_len = LINE_LIMIT               # each -o starts a line when folding
                arg_len += len(aval) + 3
                need_parens = _has_blank(aval)
                arg_len += 2 if need_parens else 0
        if not in_options:
            need_parens = _has_blank(arg)
        if line_len > len(INDENT):
            if not fold or line_len + 1 + arg_len < LINE_LIMIT:
                out.append(" ")
                line_len += 1
            else:
                out.append("\n" + INDENT)
                line_len = len(INDENT)
        text = "{" + arg + "}" if (not in_options and need_parens) else arg
        out.append(text)
        line_len += len(text)
        if aval is not None:
            text = " " + ("{" + aval + "}" if need_parens else aval)
            out.append(text)
            i += 1
            line_len = LINE_LIMIT                   # and the next item too
        i += 1
    return "".join(out)


format_entry = format_service   # the name in earlier callers


def _has_blank(text: str) -> bool:
    """Whether text holds a field separator (and so needs braces in output)."""
    return any(c in BLANKS for c in text)
