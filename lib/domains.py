"""Domain lists as main.cf writes them (mydestination, relay_domains,
virtual_mailbox_domains): the one matcher of smtpd's restrictions and qmgr's routing.

A list holds domain names, /file/names (whose words are more names; `#` starts a comment)
and type:table references (the domain is the key; any result is a match). A name matches
itself; ".example.com" matches the subdomains of example.com; "example.com" matches its
subdomains too when the list's parameter is in parent_domain_matches_subdomains, as
Postfix's match_list. A string list (Postfix's string_list, such as
virtual_mailbox_domains: `exact`) matches names as they are, nothing more.

FUNCTIONS
    DomainList(words, subdomains, open_table=tables.open_table, exact=False) opens files
        and tables now (before a chroot); TableError (or the opener's error) when one
        cannot be opened.
    DomainList.for_param(cfg, name, open_table) -> the list of a parameter, with
        subdomains from parent_domain_matches_subdomains.
    match(domain) -> bool; a table that cannot be read raises tables.TableError.
    close() releases the tables.

SEE ALSO
    lib/resolve.py, smtpd/check.py; Postfix match_list(3), string_list(3).
"""

from __future__ import annotations

from . import params, tables


class DomainList:
    """Domain names, /file/names and type:table references, matched as Postfix does."""

    def __init__(self, words: list[str], subdomains: bool, open_table=tables.open_table,
                 exact: bool = False):
        self.names: set[str] = set()
        self.tables: list[tables.Table] = []
        self.subdomains = subdomains and not exact
        self.exact = exact
        for word in words:
            if word.startswith("/"):
                try:
                    with open(word, encoding="utf-8", errors="replace") as f:
                        self.names.update(w.lower().rstrip(".") for w in params.split_list(
                            "\n".join(line.split("#", 1)[0] for line in f)))
                except OSError as exc:
                    raise tables.TableError(f"open {word}: {exc.strerror}") from None
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
        if not self.names and not self.tables:
            return False        # an empty list (most of them, per message): nothing to do
        domain = domain.lower().rstrip(".")
        if not domain:
            return False
        if self._one(domain):
            return True
        if self.exact:
            return False
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            if self._one("." + parent) or self.subdomains and self._one(parent):
                return True
        return False

    def close(self) -> None:
        """Release the tables."""
        for table in self.tables:
            table.close()
