"""Domain lists as main.cf writes them: mydestination, relay_domains,
virtual_mailbox_domains.

A list holds domain names, /file/names (whose words are more names; `#` words are
skipped) and type:table references (the domain is looked up as a key; any value means
"listed"). With subdomain matching (Postfix's parent_domain_matches_subdomains, e.g.
relay_domains) `example.com` also matches its subdomains and `.example.com` matches only
them; without it (mydestination, and virtual_mailbox_domains, a string list in Postfix)
only the name itself matches.

FUNCTIONS
    DomainList(words, subdomains): TableError when a file or table cannot be opened.
    DomainList.match(domain) -> bool; TableError when a table lookup fails (a temporary
        condition: not "not listed").
    DomainList.close()

SEE ALSO
    qmgr/resolve.py (the address classes); Postfix postconf(5), match_list(3).
"""

from __future__ import annotations

from . import params, tables


class DomainList:
    """A list of domains as main.cf writes them: names, /file/names and type:table refs."""

    def __init__(self, words: list[str], subdomains: bool):
        self.names: set[str] = set()
        self.tables: list[tables.Table] = []
        self.subdomains = subdomains
        for word in words:
            if word.startswith("/"):
                try:
                    with open(word, encoding="utf-8") as f:
                        self.names.update(w.lower() for w in params.split_list(f.read())
                                          if not w.startswith("#"))
                except OSError as exc:
                    raise tables.TableError(f"open {word}: {exc.strerror}") from None
            elif ":" in word and not word.startswith("["):
                self.tables.append(tables.open_table(word))
            else:
                self.names.add(word.lower().rstrip("."))

    def _one(self, name: str) -> bool:
        if name in self.names:
            return True
        for table in self.tables:
            try:
                if table.lookup(name) is not None:
                    return True
            except Exception as exc:     # a table backend error: not "not found"
                raise tables.TableError(f"{table.ref}: {exc}") from None
        return False

    def match(self, domain: str) -> bool:
        """Whether domain (or, with subdomain matching, a parent of it) is listed."""
        if not domain:
            return False
        if self._one(domain):
            return True
        if self.subdomains:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                # Postfix: "example.com" matches its subdomains; ".example.com" only them.
                if self._one(parent) or self._one("." + parent):
                    return True
        return False

    def close(self) -> None:
        for table in self.tables:
            table.close()
