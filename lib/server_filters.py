"""What smtpd and postscreen share between the client and their replies: macro expansion
of reply templates, reject footers, the command filter and per-client EHLO keywords.

One home, used by both servers (and by smtpd's DNS list replies), as Postfix's
mac_expand.c, smtp_reply_footer.c, smtpd_expand.c / postscreen_expand.c, ehlo_mask.c and
the command filter of smtpd.c / postscreen_smtpd.c.

FUNCTIONS
    expand(template, values, allowed=DEFAULT_FILTER, strict=False) -> text: Postfix's mac_expand() of a
        reply template: $name, ${name}, $(name), ${name?text}, ${name:text},
        ${name?{text}:{text}}, $$. values maps names to text (None: not known here);
        sender and recipient also give NAME_name and NAME_domain (`<>` for the null
        address), localtime is the time now (`%b %d %H:%M:%S`). An unknown name is
        Postfix's warning `unknown macro name "NAME" in expansion request` and expands to
        nothing; bad syntax raises ValueError, and with strict (where Postfix wants
        mac_expand's status 0: DNS list replies) so does an unknown name. Each character of
        an expanded value that is not in allowed (the expansion filter) becomes `_`.
    unescape(text) -> text: Postfix's unescape() (\\t, \\n, \\ooo octal, \\\\ ...), for the
        *_expansion_filter parameters.
    reply_footer(reply, template, values, allowed) -> reply: smtp_reply_footer(): the
        footer template appended to a 4XX/5XX reply (lines joined by CRLF, no CRLF at the
        end). Each `\\n` (backslash, n) in the template starts a new line with the reply
        code and the enhanced status code of the reply's last line; a template that starts
        with `\\c` continues the last line instead. A reply that is not a reply, or a
        template that does not expand, leaves the reply as it was.
    smtpd_values(server_name, client, port, sender, recipient) -> smtpd's macro values
        (server_name, client, client_port, client_address, client_name,
        reverse_client_name, helo_name, sender, recipient); postscreen has server_name,
        client_address and client_port; both have localtime.
    soft_bounce(reply) -> reply: the soft_bounce safety net of smtpd_chat.c and
        psc_send_reply(): a 5XX reply line (and its 5.X.X status) as 4XX.
    ehlo_mask_text(words) -> Postfix's str_ehlo_mask(): the known keywords among words,
        upper case, in Postfix's order ("" when none).
    ServerFilters(cfg, prefix): the values of one server (prefix "smtpd" or
        "postscreen"), with its tables opened (before the jail: ConfigError when one
        cannot be). Attributes None when the feature is off, so that a server pays one
        attribute test for it:
            footer: self, when PREFIX_reject_footer or PREFIX_reject_footer_maps is set;
            command_filter: self, when PREFIX_command_filter is set;
            ehlo_maps: the PREFIX_discard_ehlo_keyword_address_maps tables.
        add_footer(reply, values, key=None) -> reply with its footer (the maps' template for the
            reply's text, else PREFIX_reject_footer), for a 4XX or 5XX reply.
        filter_command(line) -> (replacement or None); lookup problems raise TableError.
        ehlo_discard(addr) -> the keywords the maps give for a client address, or None;
            lookup problems raise TableError.
        non_smtp(command) -> whether a command name (the first word of a command line that
            is no SMTP command) ends the session: Postfix's is_header() (a `Label:`), or
            a PREFIX_forbidden_commands match.
    is_header(word) -> whether a word is a header label and its colon (Postfix's
        is_header() of one word).
    CommandList(param, words, open_table): Postfix's string_list (match_list.c with
        match_string) of command names: words compared without regard to case, type:table
        entries looked up with the lower-case name (any result matches), /file/name
        for the words in a file (TableError when it cannot be read), `!word` excludes,
        the first entry that matches decides. .match(name) -> bool; a lookup
        problem is Postfix's warning `PARAM: type:name: table lookup problem` and no match
        (smtpd and postscreen ignore it: a non-critical feature).

CONFIGURATION PARAMETERS
    smtpd_reject_footer (empty), smtpd_reject_footer_maps (empty), smtpd_expansion_filter
    (printable ASCII, tab and space), smtpd_command_filter (empty),
    smtpd_discard_ehlo_keyword_address_maps (empty), smtpd_forbidden_commands (CONNECT GET
    POST regexp:{{/^[^A-Z]/ Bogus}}); postscreen_reject_footer
    ($smtpd_reject_footer), postscreen_reject_footer_maps ($smtpd_reject_footer_maps),
    postscreen_expansion_filter ($smtpd_expansion_filter), postscreen_command_filter
    (empty), postscreen_discard_ehlo_keyword_address_maps
    ($smtpd_discard_ehlo_keyword_address_maps), postscreen_forbidden_commands
    ($smtpd_forbidden_commands). The footers and filters are Postfix's raw
    parameters: main.cf's $name expansion leaves them alone (their $names are the
    client's, expanded per reply), except a value that is only `$parameter`, which is
    that parameter's value (postscreen's defaults), as Postfix's postscreen does.

SEE ALSO
    smtpd/session.py, postscreen/service.py, postscreen/dummy.py, smtpd/check.py
    (rbl_reply_maps); Postfix postconf(5) smtpd_reject_footer.
"""

from __future__ import annotations

import re
import time

from . import msg, tables
from .maincf import NAME_RE, MacroSyntaxError, split_macros
from .params import split_list

# Postfix's DEF_SMTPD_EXP_FILTER, unescaped: tab and printable ASCII.
DEFAULT_FILTER = frozenset("\t" + "".join(chr(c) for c in range(0x20, 0x7f)))
MAX_DEPTH = 100                 # mac_expand's "unreasonable macro call nesting"
_ONLY_PARAM = re.compile(r"\$(?:([A-Za-z0-9_]+)|\{([A-Za-z0-9_]+)\}|\(([A-Za-z0-9_]+)\))")
_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?=\s|$)")
_REPLY_LINE = re.compile(r"\d\d\d[ -]")
_HEADER = re.compile(r"[!-9;-~]+:")     # a header label and its colon, as is_header()
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
# ehlo_mask.c's table, in its order (str_ehlo_mask lists the bits in this order)
EHLO_KEYWORDS = ("8BITMIME", "AUTH", "ETRN", "PIPELINING", "SIZE", "VERP", "VRFY",
                 "XCLIENT", "XFORWARD", "STARTTLS", "ENHANCEDSTATUSCODES", "DSN",
                 "SMTPUTF8", "CHUNKING", "REQUIRETLS", "silent-discard")


def unescape(text: str) -> str:
    """Postfix's unescape(): C escapes, \\ooo octal (at most three digits), \\x -> x."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if c == "\\":
            if i >= n:
                break
            c = text[i]
            i += 1
            if c in _ESCAPES:
                c = _ESCAPES[c]
            elif "0" <= c <= "7":
                val, digits = int(c), 0
                while digits < 2 and i < n and "0" <= text[i] <= "7":
                    val, i, digits = val * 8 + int(text[i]), i + 1, digits + 1
                c = chr(val & 0xff)
        out.append(c)
    return "".join(out)


def _address_part(addr: str | None, suffix: str, name: str) -> str | None:
    """smtpd_expand_addr(): sender, sender_name, sender_domain (recipient likewise)."""
    if addr is None:                # no MAIL (RCPT) yet
        return ""
    if suffix not in ("", "_name", "_domain"):
        return _unknown(name)
    if not addr:
        return "" if suffix == "_domain" else "<>"
    local, at, domain = addr.rpartition("@")
    if suffix == "_name":
        return local if at else addr
    if suffix == "_domain":
        return domain if at else ""
    return addr


def _unknown(name: str) -> None:
    msg.warn(f"unknown macro name \"{name}\" in expansion request")
    return None


def _lookup(values: dict, name: str) -> str | None:
    """smtpd_expand_lookup(): values' text for name (None in values: empty)."""
    for base in ("sender", "recipient"):
        if name.startswith(base) and base in values:
            return _address_part(values[base], name[len(base):], name)
    if name in values:
        return values[name] or ""
    if name == "localtime":
        return time.strftime("%b %d %H:%M:%S")
    return _unknown(name)


def _filtered(value: str, allowed: frozenset) -> str:
    if allowed is DEFAULT_FILTER and value.isascii() and value.isprintable():
        return value
    return "".join(c if c in allowed else "_" for c in value)


def expand(template: str, values: dict, allowed: frozenset = DEFAULT_FILTER,
           strict: bool = False, _depth: int = 0) -> str:
    """Expand a reply template (see FUNCTIONS); ValueError when its syntax is bad, or
    with strict when a $name is unknown."""
    if "$" not in template:
        return template
    if _depth > MAX_DEPTH:
        raise ValueError("unreasonable macro call nesting")
    try:
        parts = split_macros(template)
    except MacroSyntaxError as exc:
        raise ValueError(str(exc)) from None
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        inner = part.name.strip(" \t")
        m = NAME_RE.match(inner)
        if not m:
            raise ValueError(f"attribute name syntax error: ${{{part.name}}}")
        name, rest = m.group(0), inner[m.end():].lstrip(" \t")
        value = _lookup(values, name)
        if not rest:
            if value is None and strict:
                raise ValueError(f"undefined macro: ${name}")
            if value:
                out.append(_filtered(value, allowed))
            continue
        op, rest = rest[0], rest[1:]
        if op not in "?:":
            raise ValueError(f"\"?\" or \":\" expected: ${{{part.name}}}")
        first, second = rest, ""
        if rest.lstrip(" \t").startswith("{"):
            rest = rest.lstrip(" \t")
            end = tables.balpar(rest) - 1      # -1: not balanced
            tail = rest[end + 1:].strip(" \t") if end >= 0 else ""
            if end < 0 or tail and (op != "?" or tail[0] != ":"):
                raise ValueError(f"bad conditional: ${{{part.name}}}")
            first = rest[1:end]
            if tail:
                tail = tail[1:].strip(" \t")
                if tail.startswith("{"):
                    close = tables.balpar(tail) - 1
                    if close != len(tail) - 1:
                        raise ValueError(f"bad conditional: ${{{part.name}}}")
                    tail = tail[1:-1]
                second = tail
        chosen = first if bool(value) == (op == "?") else second
        out.append(expand(chosen, values, allowed, strict, _depth + 1))
    return "".join(out)


def reply_footer(reply: str, template: str, values: dict,
                 allowed: frozenset = DEFAULT_FILTER) -> str:
    """smtp_reply_footer() (see FUNCTIONS)."""
    lines = reply.split("\r\n")
    if not all(_REPLY_LINE.match(line) for line in lines):
        return reply
    last = lines[-1]
    code = last[:3]
    m = _DSN.match(last, 4)
    dsn = m.group(0) + " " if m else ""
    pieces = template.split("\\n")
    out = []
    added = False
    for i, piece in enumerate(pieces):
        if i == 0 and piece.startswith("\\c"):
            piece = piece[2:]
        else:
            out.append(f"\r\n{code}{'-' if i < len(pieces) - 1 else ' '}{dsn}")
            added = True
        try:
            out.append(expand(piece, values, allowed))
        except ValueError:
            return reply
    if added:           # the reply's last line is no longer the last
        reply = reply[:len(reply) - len(last) + 3] + "-" + last[4:]
    return reply + "".join(out)


def smtpd_values(server_name: str, client, port: str = "", sender: str | None = None,
                 recipient: str | None = None) -> dict:
    """smtpd's macros (smtpd_expand_lookup) for a client state (smtpd/check.ClientState:
    name, addr, reverse_name, helo)."""
    return {"server_name": server_name, "client": f"{client.name}[{client.addr}]",
            "client_port": port, "client_address": client.addr,
            "client_name": client.name, "reverse_client_name": client.reverse_name,
            "helo_name": client.helo or "", "sender": sender, "recipient": recipient}


def ehlo_mask_text(words) -> str:
    """str_ehlo_mask(ehlo_mask(words)): known keywords, Postfix's order and case."""
    low = {w.lower() for w in words}
    return " ".join(k for k in EHLO_KEYWORDS if k.lower() in low)


def is_header(word: str) -> bool:
    """Whether a word starts with a header label and its colon (Postfix's is_header())."""
    return _HEADER.match(word) is not None


class CommandList:
    """Command names, as Postfix's string_list (see FUNCTIONS)."""

    def __init__(self, param: str, words: list[str], open_table):
        self.param = param
        self.entries: list[tuple[bool, object]] = []    # (matches, word or table)
        self._add(words, open_table, True)

    def _add(self, words: list[str], open_table, init: bool, depth: int = 0) -> None:
        for word in words:
            item = word.lstrip("!")
            matches = init == ((len(word) - len(item)) % 2 == 0)
            if not item:
                raise tables.TableError(f"{self.param}: no pattern after '!'")
            if item.startswith("/") and depth < 10:     # /file/name: its words, in place
                try:
                    with open(item, encoding="utf-8", errors="replace") as f:
                        text = "\n".join(line for line in f.read().splitlines()
                                         if not line.lstrip().startswith("#"))
                except OSError as exc:
                    raise tables.TableError(f"{self.param}: open {item}: "
                                            f"{exc.strerror}") from None
                self._add(split_list(text), open_table, matches, depth + 1)
            else:
                self.entries.append((matches, open_table(item) if ":" in item
                                     else item.lower()))

    def match(self, name: str) -> bool:
        name = name.lower()
        for matches, entry in self.entries:
            if isinstance(entry, str):
                if entry == name:
                    return matches
                continue
            try:
                if entry.lookup(name) is not None:
                    return matches
            except tables.TableError:
                msg.warn(f"{self.param}: {entry.type}:{entry.name}: table lookup problem")
                return False
        return False


def raw_param(cfg, name: str) -> str:
    """A raw parameter's text; a value that is only `$parameter` is that parameter's
    (raw) value, as postscreen's mail_conf_eval_once() workaround."""
    text = cfg.raw(name) or ""
    m = _ONLY_PARAM.fullmatch(text.strip())
    if m:
        text = cfg.raw(next(g for g in m.groups() if g)) or ""
    return text


class ServerFilters:
    """One server's footer, expansion filter, command filter and EHLO maps (see FUNCTIONS)."""

    footer = command_filter = ehlo_maps = None

    def __init__(self, cfg, prefix: str):
        self.prefix = prefix
        self.template = raw_param(cfg, f"{prefix}_reject_footer")
        self.allowed = self.expansion_filter(cfg, prefix)
        self.footer_maps = self._open(cfg, f"{prefix}_reject_footer_maps")
        if self.template or self.footer_maps:
            self.footer = self
        ref = cfg.get(f"{prefix}_command_filter").strip()
        if ref:
            self.cmd_table = self._open_one(ref, f"{prefix}_command_filter", cfg)
            self.command_filter = self
        self.ehlo_maps = self._open(cfg, f"{prefix}_discard_ehlo_keyword_address_maps") \
            or None
        param = f"{prefix}_forbidden_commands"
        self.forbidden = CommandList(param, cfg[param],
                                     lambda ref: self._open_one(ref, param, cfg))

    @staticmethod
    def expansion_filter(cfg, prefix: str) -> frozenset:
        """PREFIX_expansion_filter's characters."""
        allowed = frozenset(unescape(raw_param(cfg, f"{prefix}_expansion_filter")))
        return DEFAULT_FILTER if allowed == DEFAULT_FILTER else allowed   # its fast path

    def _open(self, cfg, param: str) -> list:
        return [self._open_one(ref, param, cfg) for ref in cfg[param]]

    @staticmethod
    def _open_one(ref: str, param: str, cfg):
        try:
            return tables.open_table(ref, cfg)
        except tables.TableError as exc:
            raise tables.TableError(f"{param}: {exc}") from None

    def add_footer(self, reply: str, values, key: str | None = None) -> str:
        """The reply with its footer; values is the macro dict, or a function that
        makes it (called only when a template applies); key: the maps' key, when not
        the reply itself (postscreen's reply before soft_bounce)."""
        template = None
        for table in self.footer_maps:
            try:
                template = table.lookup(reply if key is None else key)
            except tables.TableError as exc:
                msg.warn(f"{self.prefix}_reject_footer_maps: {exc}")
                template = None
                break
            if template is not None:
                break
        if template is None:
            template = self.template
        if not template:
            return reply
        return reply_footer(reply, template, values() if callable(values) else values,
                            self.allowed)

    def filter_command(self, line: str) -> str | None:
        """The replacement of a command line (leading blanks do not count), or None."""
        return self.cmd_table.lookup(line.lstrip(" \t"))

    def non_smtp(self, command: str) -> bool:
        """A header label, or a PREFIX_forbidden_commands name: the session ends."""
        return _HEADER.match(command) is not None or self.forbidden.match(command)

    def ehlo_discard(self, addr: str) -> list[str] | None:
        """The EHLO keywords to hide from a client address, or None: no entry."""
        for table in self.ehlo_maps:
            words = table.lookup(addr)
            if words is not None:
                return [w for w in re.split(r"[\s,]+", words) if w]
        return None


def soft_bounce(reply: str) -> str:
    """soft_bounce: a 5XX reply line, and its 5.X.X status, as 4XX; others unchanged."""
    if reply[:1] == "5":
        reply = "4" + reply[1:]
        if reply[4:5] == "5":
            reply = reply[:4] + "4" + reply[5:]
    return reply
