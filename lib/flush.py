"""Fast flush: deliver the deferred mail of one site now (smtpd's ETRN).

Postfix's flush(8) keeps one log file of queue ids per site in fast_flush_domains, and
on `ETRN site` moves the files it lists from deferred/ to incoming/ and triggers qmgr.
postfix-py keeps no per-site logs: flush_site() reads the envelopes in deferred/ (the
envelope records only; the content is skipped) and makes every message with a recipient
not yet done at that site due now, by setting its modification time (qmgr's next-attempt
time) to now; then it triggers qmgr with `F` (lift the suspension of dead destinations,
as Postfix's flush does) and `D` (scan deferred/: a file whose time has come is taken).
So qmgr needs no request of its own, and a file that qmgr moves meanwhile is simply
skipped. The cost is one envelope read per deferred message per ETRN; ETRN counts
against smtpd_junk_command_limit, as in Postfix.

A site is the domain of a recipient address, compared without case and trailing dot,
as Postfix's flush_add() records it when a recipient is deferred.

FUNCTIONS
    flush_site(queue_root, site) -> int: the number of messages made due; OSError when
        deferred/ cannot be listed. qmgr is triggered when the number is not zero.

SEE ALSO
    smtpd/session.py (etrn_cmd), qmgr/manager.py (the deferred scan), lib/queue.py;
    Postfix flush(8), ETRN_README.
"""

from __future__ import annotations

import os
import time

from . import queue as Q


def _site(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def flush_site(queue_root: str, site: str) -> int:
    """Make the deferred mail for site due now and wake qmgr; the number of messages."""
    site = site.lower().rstrip(".")
    directory = os.path.join(queue_root, "deferred")
    count = 0
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if not e.name.startswith(".")]
    for name in names:
        path = os.path.join(directory, name)
        try:
            env = Q.read(path)
        except (OSError, Q.QueueFileError):
            continue            # moved by qmgr meanwhile, or qmgr's to handle (corrupt)
        if not any(not r.done and "@" in r.address and _site(r.address) == site
                   for r in env.recipients):
            continue
        now = time.time()
        try:
            os.utime(path, (now, now))
        except OSError:
            continue
        count += 1
    if count:
        Q.wake(queue_root, b"F" + Q.WAKE_DEFERRED)
    return count
