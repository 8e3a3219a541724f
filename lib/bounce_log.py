"""Per-message status logs: why recipients were deferred (defer/ID) or bounced (bounce/ID).

The queue file records only whether a recipient is done. The reasons live beside it, as in
Postfix's bounce_log(3): qmgr appends one entry per deferred recipient to
queue_directory/defer/ID, one per bounced recipient to queue_directory/bounce/ID, and one
per recipient delivered with DSN NOTIFY=SUCCESS to queue_directory/trace/ID (action
`delivered` or `relayed`), which becomes a success notice at the end of the pass.
`postqueue -p` shows the defer reasons; when the message leaves the active queue, a bounce
log becomes a non-delivery notification and is removed, and on expiry the defer log does.
The defer log is reset each time the message enters the active queue (Postfix's qmgr does
the same), so it always describes the latest delivery attempt.

FORMAT
    Text, one entry per recipient: `name=value` lines ending with an empty line.

        recipient=bob@example.com
        offset=650
        status=4.4.1
        action=delayed
        relay=mx.example.com[192.0.2.1]:25
        reason=connect to mx.example.com[192.0.2.1]:25: Connection refused

    offset is the recipient record's offset in the queue file; action is `delayed` (defer
    log) or `failed` (bounce log). Values never hold a line break (replaced by a space).
    A reader ignores lines it does not understand and entries without a recipient; a later
    entry for the same recipient record replaces an earlier one.

FUNCTIONS
    path(queue_root, log, queue_id) -> str; log is DEFER, BOUNCE or TRACE.
    append(queue_root, log, queue_id, entries, sync=True): one write (and one fsync with
        sync) for all entries; OSError propagates.
    read(queue_root, log, queue_id) -> list[LogEntry] in file order ([] when there is no log).
    remove(queue_root, log, queue_id, likely=False) -> bool: whether a log was removed.
    exists(queue_root, log, queue_id) -> bool.
    read() and remove() look with access(2) first: most messages have no log, and a
    missing file costs an exception to raise and catch (qmgr asks about every message).
    remove(likely=True) does not: for a log that the caller knows is there (one system
    call instead of two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .queue import BOUNCE, DEFER, TRACE   # the logs live in these queue directories

MAX_LOG = 16 * 1024 * 1024        # a larger log is read only this far


@dataclass
class LogEntry:
    recipient: str
    offset: int
    status: str            # enhanced status code, e.g. 4.4.1
    action: str            # delayed or failed
    reason: str
    relay: str = "none"


def path(queue_root: str, log: str, queue_id: str) -> str:
    """Where a message's defer or bounce log lives."""
    if queue_root[-1:] not in ("/", "") and queue_id[:1] != "/":
        return f"{queue_root}/{log}/{queue_id}"     # os.path.join's answer, sooner
    return os.path.join(queue_root, log, queue_id)


def _clean(text: str) -> str:
    return str(text).replace("\r", " ").replace("\n", " ")


def format_entry(entry: LogEntry) -> str:
    """One entry as it is stored."""
    return (f"recipient={_clean(entry.recipient)}\noffset={int(entry.offset)}\n"
            f"status={_clean(entry.status)}\naction={_clean(entry.action)}\n"
            f"relay={_clean(entry.relay)}\nreason={_clean(entry.reason)}\n\n")


def append(queue_root: str, log: str, queue_id: str, entries: list[LogEntry],
           sync: bool = True) -> None:
    """Append entries with one write; fsync when sync (a bounce log must survive a crash)."""
    if not entries:
        return
    data = "".join(format_entry(e) for e in entries).encode("utf-8", "surrogateescape")
    fd = os.open(path(queue_root, log, queue_id),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def exists(queue_root: str, log: str, queue_id: str) -> bool:
    """Whether the message has such a log."""
    return os.access(path(queue_root, log, queue_id), os.F_OK)


def read(queue_root: str, log: str, queue_id: str) -> list[LogEntry]:
    """The entries of a log, latest per recipient record, in file order."""
    name = path(queue_root, log, queue_id)
    if not os.access(name, os.F_OK):   # most messages have none: answered without an error
        return []
    try:
        with open(name, "rb") as f:
            text = f.read(MAX_LOG).decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return []
    found: dict[tuple, LogEntry] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, eq, value = line.partition("=")
            if eq:
                fields.setdefault(name, value)
        if not fields.get("recipient"):
            continue
        try:
            offset = int(fields.get("offset", "0"))
        except ValueError:
            offset = 0
        entry = LogEntry(fields["recipient"], offset, fields.get("status", ""),
                         fields.get("action", ""), fields.get("reason", ""),
                         fields.get("relay", "none") or "none")
        key = (entry.offset, entry.recipient)
        found.pop(key, None)            # keep file order of the latest entries
        found[key] = entry
    return list(found.values())


def remove(queue_root: str, log: str, queue_id: str, likely: bool = False) -> bool:
    """Remove a message's log; False when there was none. With likely (the caller
    knows the log is there, or nearly always is) without the look first."""
    name = path(queue_root, log, queue_id)
    if not likely and not os.access(name, os.F_OK):    # the usual case, without an error
        return False
    try:
        os.unlink(name)
        return True
    except FileNotFoundError:
        return False
