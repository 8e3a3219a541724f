"""Client lists: which clients a list of networks, tables and names matches (namadr_list).

The one matcher of client lists, as Postfix's namadr_list: mynetworks and the smtpd
parameters of its kind (smtpd/check.py), and postscreen's permit_mynetworks.

FUNCTIONS
    client_ip(addr) -> (ip, its text) of a client address, an IPv4-mapped IPv6 address
        as IPv4; None when addr is not one. Memoised (a session asks about one client
        many times).

CLASSES
    NetworkList(param, words, open_table, parent_matches)
        .match(addr, name="unknown") -> whether the client is in the list. open_table(ref)
        opens a type:table (before a chroot); ConfigError for a bad net/mask or an
        unreadable /file/name.

SEE ALSO
    smtpd/check.py; Postfix namadr_list.c, match_list.c.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from . import msg
from .maincf import ConfigError
from .params import split_list


class NetworkList:
    """A list of clients, as Postfix's namadr_list (mynetworks and its kind).

    Words, in order, the first that matches decides: an address or network (a.b.c.d/len,
    IPv6 with or without [ ], as [::1]/128), a type:table (looked up with the client name,
    then its address; any result matches), a /file/name of more such words, a host name or
    .domain matched against the client's verified name (a bare domain matches subdomains
    too where parent_domain_matches_subdomains names the parameter), and !word, which
    excludes what word matches."""

    def __init__(self, param: str, words: list[str], open_table, parent_matches: bool):
        self.param = param
        self.parent_matches = parent_matches
        self.entries: list[tuple[bool, str, object]] = []   # (negated, kind, value)
        self._add(words, open_table)

    def _add(self, words, open_table, depth: int = 0) -> None:
        for word in words:
            negated = word.startswith("!")
            word = word.lstrip("!")
            if not word:
                continue
            if word.startswith("/") and depth == 0:
                try:
                    with open(word, encoding="utf-8", errors="replace") as f:
                        text = "\n".join(line.split("#", 1)[0] for line in f)
                except OSError as exc:
                    raise ConfigError(f"{self.param}: open {word}: {exc.strerror}") from None
                sub = NetworkList(self.param, [], open_table, self.parent_matches)
                sub._add(split_list(text), open_table, depth + 1)
                self.entries.append((negated, "list", sub))
                continue
            text = word
            if word.startswith("["):        # [address] or [address]/len
                m = re.fullmatch(r"\[([^\]]*)\](/\d+)?", word)
                text = m.group(1) + (m.group(2) or "") if m else ""
            try:
                self.entries.append((negated, "net", ipaddress.ip_network(text,
                                                                          strict=False)))
                continue
            except ValueError:
                pass
            if "/" in word and ":" not in word.partition("/")[0] or word.startswith("["):
                # a net/mask that is not one: Postfix's smtpd stops here too
                raise ConfigError(f"{self.param}: bad net/mask pattern: \"{word}\"")
            if ":" in word:
                self.entries.append((negated, "table", open_table(word)))
            elif re.fullmatch(r"\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", word):
                self.entries.append((negated, "name", word.lower().rstrip(".")))
            else:
                msg.warn(f"{self.param}: ignoring entry that is not an address, network, "
                         f"host name or table: {word}")

    def match(self, addr: str, name: str = "unknown") -> bool:
        """Whether the client (address, verified name or "unknown") is in the list."""
        if not self.entries:
            return False            # an empty list (most of them): nothing to parse
        parsed = client_ip(addr)
        if parsed is None:
            return False
        return bool(self._match(*parsed, name.lower().rstrip(".")))

    def _match(self, ip, addr: str, name: str) -> bool | None:
        """True or False from the first entry that matches; None when none does."""
        for negated, kind, value in self.entries:
            if kind == "net":
                hit = ip.version == value.version and ip in value
            elif kind == "table":
                hit = (name != "unknown" and value.lookup(name) is not None) or \
                    value.lookup(addr) is not None
            elif kind == "name":
                hit = name != "unknown" and (
                    name == value.lstrip(".") and not value.startswith(".")
                    or (value.startswith(".") or self.parent_matches)
                    and name.endswith("." + value.lstrip(".")))
            else:
                inner = value._match(ip, addr, name)
                if inner is not None:
                    return inner != negated
                continue
            if hit:
                return not negated
        return None


@functools.lru_cache(maxsize=64)
def client_ip(addr: str):
    """(ip, its text) of a client address, an IPv4-mapped IPv6 one as IPv4; None when
    addr is not an address. Cached: a session asks several lists about one client."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, str(ip)
