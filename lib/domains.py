"""Domain lists as main.cf writes them (mydestination, relay_domains): one matcher.

A list holds domain names, /file/names (whose words are more names) and type:table
references (any result is a match). A name matches itself; ".example.com" matches the
subdomains of example.com; "example.com" matches its subdomains too when the list's
parameter is in parent_domain_matches_subdomains, as Postfix's match_list.

FUNCTIONS
    DomainList(words, subdomains, open_table=tables.open_table) opens files and tables now
        (before a chroot); OSError or the opener's error when one cannot be opened.
    DomainList.for_param(cfg, name, open_table) -> the list of a parameter, with
        subdomains from parent_domain_matches_subdomains.
    match(domain) -> bool; a table that cannot be read raises tables.TableError.

SEE ALSO
    qmgr/resolve.py (its DomainList is the same rule; one home is the aim), smtpd/check.py.
"""

from __future__ import annotations

from . import params, tables


class DomainList:
    """Domain names, /file/names and type:table references, matched as Postfix does."""

    def __init__(self, words: list[str], subdomains: bool, open_table=tables.open_table):
        self.names: set[str] = set()
        self.tables: list[tables.Table] = []
        self.subdomains = subdomains
        for word in words:
            if word.startswith("/"):
                with open(word, encoding="utf-8", errors="replace") as f:
                    self.names.update(w.lower().rstrip(".") for w in params.split_list(
                        "\n".join(line.split("#", 1)[0] for line in f)))
            elif ":" in word and not word.startswith("["):
                self.tables.append(open_table(word))
            else:
                self.names.add(word.lower().rstrip("."))

    @classmethod
    def for_param(cls, cfg, name: str, open_table=tables.open_table) -> "DomainList":
        return cls(cfg[name], name in cfg["parent_domain_matches_subdomains"], open_table)

    def _one(self, name: str) -> bool:
        if name in self.names:
            return True
        for table in self.tables:
            try:
                found = table.lookup(name)
            except tables.TableError:
                raise
            except Exception as exc:    # noqa: BLE001 - a backend error is not "not found"
                raise tables.TableError(f"{getattr(table, 'ref', 'table')}: {exc}") from None
            if found is not None:
                return True
        return False

    def match(self, domain: str) -> bool:
        """Whether domain, or (by the rules above) a parent of it, is listed."""
        domain = domain.lower().rstrip(".")
        if not domain:
            return False
        if self._one(domain):
            return True
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if self._one("." + parent) or self.subdomains and self._one(parent):
                return True
        return False
