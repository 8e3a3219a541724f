"""Address parts: the local part, the domain and the address extension of a recipient.

qmgr's resolver, local delivery and postqueue's listing split addresses the same way,
as Postfix's trivial-rewrite and local(8) do: at the last `@`, and the extension at the
first recipient_delimiter character that is not the first character of the local part.

FUNCTIONS
    split_address(address) -> (localpart, domain); the domain lower-cased without a
        final dot, "" when the address has no `@`.
    strip_extension(localpart, delimiters) -> localpart without its extension (user+ext
        -> user, for any of the characters in delimiters; unchanged when delimiters is "").

SEE ALSO
    qmgr/resolve.py, local/service.py, tools/postqueue.py; Postfix postconf(5)
    recipient_delimiter.
"""

from __future__ import annotations


def split_address(address: str) -> tuple[str, str]:
    """Split at the last @: (localpart, domain); the domain lower-cased, without a final dot."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain.lower().rstrip(".")


def strip_extension(local: str, delimiters: str) -> str:
    """user+ext -> user, for any of the recipient_delimiter characters."""
    cut = [i for i in (local.find(c) for c in delimiters) if i > 0]
    return local[:min(cut)] if cut else local
