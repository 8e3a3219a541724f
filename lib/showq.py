"""The mail queue as Postfix's showq(8) lists it: the records, and their wire format.

SYNOPSIS
    from postfix_py.lib import showq

    for m in showq.messages(queue_root):        # dicts, queue by queue
        ...
    sock.sendall(showq.PROTOCOL_RECORD)
    sock.sendall(showq.message_record(m))
    sock.sendall(showq.END)

DESCRIPTION
    messages(queue_root) reads every queue file of maildrop, incoming, active, deferred and
    hold (Postfix's postqueue order), with the defer log's reason for each recipient that is
    not done yet. Each message is a dict of Postfix's showq/postqueue -j fields:
    queue_name, queue_id, arrival_time, message_size, forced_expire, sender
    (MAILER-DAEMON for <>), recipients [(address, reason, original)]: the address and
    its original address (the G record; the address itself without one), each with its
    local part quoted as Postfix's showq quotes it (quote_822_local: "john doe"@example).
    A file that vanishes or is not
    a queue file is skipped, as showq skips it; a queue directory that cannot be listed
    raises OSError (with its filename).

    The wire format is Postfix 3.0 to 3.10's showq protocol in attr_print0 form
    (attr_print0.c): each attribute is its name, a NUL, its value, a NUL; a record ends
    with an empty name (one NUL). showq.c sends:

        protocol=mail_queue_list_protocol                      then end of record
        per message: queue_name, queue_id, time, size, forced_expire (0/1), sender,
            per recipient: recipient, reason ("" when none)    then end of record
            (the original address is not sent: 3.0-3.10 have no field for it)
        end of record (the empty list ends the stream)

    Both ends read strictly, so the version matters: this is what Debian's Postfix 3.7
    postqueue reads. (Postfix 3.11 adds original_recipient and log_class to each
    recipient, and its postqueue requires them; a 3.10 postqueue refuses them.)
    Postfix's postqueue and prometheus-postfix-exporter (--postfix.showq_path) read it.
    Values never hold a NUL: addresses and reasons go through msg.printable().

SEE ALSO
    Postfix showq(8), postqueue(1); showq/service.py; tools/postqueue.py.
"""

from __future__ import annotations

import os

from . import bounce_log
from . import queue as Q
from .msg import printable
from .tok822 import quote_822_local

SHOW_QUEUES = (Q.MAILDROP, Q.INCOMING, Q.ACTIVE, Q.DEFERRED, Q.HOLD)
END = b"\0"


def messages(queue_root: str):
    """Every queue file as a dict in Postfix's showq fields, queue by queue."""
    for queue in SHOW_QUEUES:
        directory = os.path.join(queue_root, queue)
        try:
            names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
        except FileNotFoundError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                env = Q.read(path)
                forced = bool(os.stat(path).st_mode & Q.STAT_EXPIRE)     # postsuper -e
            except (OSError, Q.QueueFileError):
                continue            # gone meanwhile, or not a queue file: showq skips it
            reasons = {}
            for e in bounce_log.read(queue_root, bounce_log.DEFER, name):
                reasons[e.offset] = e.reason
                reasons.setdefault(e.recipient, e.reason)
            yield {
                "queue_name": queue, "queue_id": name, "arrival_time": int(env.arrival),
                "message_size": env.size, "forced_expire": forced,
                "sender": env.sender or "MAILER-DAEMON",
                "recipients": [(quote_822_local(r.address),
                                reasons.get(r.offset, reasons.get(r.address, "")),
                                quote_822_local(r.original or r.address))
                               for r in env.recipients if not r.done],
            }


def _attr(name: str, value) -> bytes:
    """One attr_print0 attribute: name NUL value NUL."""
    text = printable(str(value), limit=None)
    return name.encode() + b"\0" + text.encode("utf-8", "replace") + b"\0"


PROTOCOL_RECORD = _attr("protocol", "mail_queue_list_protocol") + END


def message_record(m: dict) -> bytes:
    """One message of messages() as showq sends it, end of record included."""
    out = [_attr("queue_name", m["queue_name"]), _attr("queue_id", m["queue_id"]),
           _attr("time", m["arrival_time"]), _attr("size", m["message_size"]),
           _attr("forced_expire", int(m["forced_expire"])), _attr("sender", m["sender"])]
    for address, reason, _original in m["recipients"]:
        out += [_attr("recipient", address), _attr("reason", reason)]
    out.append(END)
    return b"".join(out)
