"""postsuper: delete, hold, release and requeue mail, with Postfix's postsuper(1) flags.

    postfix-py postsuper [-v] [-c config_dir] [-d queue_id] [-h queue_id] [-H queue_id]
                         [-r queue_id] [-s] [queue...]

FLAGS (each of -d, -h, -H, -r may be given more than once; `ALL` means every message,
`-` reads queue ids from standard input, one a line)
    -d id    delete the message and its defer and bounce logs.
             Default queues: hold, incoming, active, deferred.
    -h id    put the message on hold (move it to hold/): qmgr leaves it alone.
             Default queues: incoming, active, deferred.
    -H id    release it from hold: back to deferred/, due now, and qmgr is woken.
             Default queue: hold.
    -r id    requeue it: to incoming/ with its defer log removed, and qmgr is woken, so
             that its recipients are resolved again (Postfix requeues through pickup and
             cleanup for the same purpose). Default queues: hold, incoming, active,
             deferred.
    -s       structure check: accepted, nothing to do (postfix-py's queue is not hashed).
    -c dir   main.cf in dir; -v more verbose logging.
    Queue names after the flags restrict the operations to those queues.
    The operations run in Postfix's order: delete, requeue, hold, release.

    A message in active/ may be in delivery: acting on it while qmgr runs drops the results
    of deliveries still in progress (qmgr warns), so those recipients may get a second copy,
    as with Postfix.

DIAGNOSTICS
    Postfix's lines, on standard error and in the mail log: `postsuper: ID: removed`,
    `ID: placed on hold`, `ID: released from hold`, `ID: requeued` (for ids given by name),
    then `Deleted: N messages`, `Placed on hold: N messages`, `Released from hold: N
    messages`, `Requeued: N messages`; `warning: invalid mail queue id: X`. A usage error
    is `postsuper: fatal: usage: ...` with exit status 1.

SECURITY
    Renames and removes queue files directly: run it as root or as mail_owner.

SEE ALSO
    Postfix postsuper(1); tools/postqueue.py; qmgr/service.py.
"""

from __future__ import annotations

import getopt
import os
import sys
import time

from ..lib import bounce_log, maincf, msg
from ..lib import queue as Q

USAGE = ("usage: postsuper [-c config_dir] [-d queue_id (delete)] [-h queue_id (hold)] "
         "[-H queue_id (un-hold)] [-r queue_id (requeue)] [-s (structure fix)] "
         "[-v (verbose)] [queue...]")
QUEUES = (Q.INCOMING, Q.ACTIVE, Q.DEFERRED, Q.HOLD, Q.MAILDROP)
DEFAULTS = {"-d": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-r": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-h": (Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-H": (Q.HOLD,)}
ORDER = ("-d", "-r", "-h", "-H")
SUMMARY = {"-d": "Deleted", "-r": "Requeued", "-h": "Placed on hold",
           "-H": "Released from hold"}
DONE = {"-d": "removed", "-r": "requeued", "-h": "placed on hold",
        "-H": "released from hold"}


_LOG = {"on": False}


class _Exit(Exception):
    def __init__(self, status: int):
        self.status = status


def say(text: str, severity: str = "info") -> None:
    """A line on standard error and in the mail log, as Postfix's postsuper reports."""
    prefix = "" if severity == "info" else f"{severity}: "
    print(f"postsuper: {prefix}{text}", file=sys.stderr)
    if _LOG["on"]:
        {"info": msg.info, "warning": msg.warn}[severity](text)


def _fatal(text: str):
    print(f"postsuper: fatal: {text}", file=sys.stderr)
    raise _Exit(1)


def _id_ok(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c == "_")
                                       for c in name)


def _names(directory: str) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if not n.startswith(".")]
    except FileNotFoundError:
        return []


class Super:
    """The operations on one queue directory tree."""

    def __init__(self, queue_root: str):
        self.root = queue_root
        self.moved_to = set()          # queues that got messages (whom to wake)

    def _path(self, queue: str, qid: str) -> str:
        return os.path.join(self.root, queue, qid)

    def apply(self, op: str, qid: str, queues: tuple) -> bool:
        """Apply one operation to qid in the first of queues that holds it."""
        for queue in queues:
            if op == "-d":
                try:
                    os.unlink(self._path(queue, qid))
                except FileNotFoundError:
                    continue
                bounce_log.remove(self.root, bounce_log.DEFER, qid)
                bounce_log.remove(self.root, bounce_log.BOUNCE, qid)
                return True
            target = {"-r": Q.INCOMING, "-h": Q.HOLD, "-H": Q.DEFERRED}[op]
            if queue == target and op != "-r":
                continue
            src = self._path(queue, qid)
            try:
                if op in ("-r", "-H"):
                    now = time.time()
                    os.utime(src, (now, now))
                os.rename(src, self._path(target, qid))
            except FileNotFoundError:
                continue
            if op == "-r":
                bounce_log.remove(self.root, bounce_log.DEFER, qid)
            self.moved_to.add(target)
            return True
        return False

    def run(self, op: str, ids: list[str], queues: tuple) -> int:
        """One operation over its ids (or ALL); the number of messages it affected."""
        count = 0
        if "ALL" in ids:
            for queue in queues:
                for qid in _names(os.path.join(self.root, queue)):
                    if self.apply(op, qid, (queue,)):
                        count += 1
            return count
        for qid in ids:
            if not _id_ok(qid):
                say(f"invalid mail queue id: {qid}", "warning")
                continue
            if self.apply(op, qid, queues):
                say(f"{qid}: {DONE[op]}")
                count += 1
        return count


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:d:h:H:r:sv")
    except getopt.GetoptError as exc:
        print(f"postsuper: {exc.msg}", file=sys.stderr)
        _fatal(USAGE)
    config_dir, verbose = None, 0
    wanted: dict[str, list[str]] = {}
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-v":
            verbose += 1
        elif opt in ORDER:
            wanted.setdefault(opt, []).append(val)
    for name in args:
        if name not in QUEUES:
            _fatal(f"unknown queue name: {name}")
    try:
        cfg = maincf.load(config_dir)
    except maincf.ConfigError as exc:
        _fatal(str(exc))
    _init_log(cfg, verbose)
    if any("-" in ids for ids in wanted.values()):
        stdin = [line.strip() for line in sys.stdin if line.strip()]
        for op, ids in wanted.items():
            if "-" in ids:
                wanted[op] = [i for i in ids if i != "-"] + stdin
    work = Super(Q.queue_root(cfg))
    for op in ORDER:
        if op not in wanted:
            continue
        queues = tuple(args) or DEFAULTS[op]
        count = work.run(op, wanted[op], queues)
        say(f"{SUMMARY[op]}: {count} message{'' if count == 1 else 's'}")
    if Q.INCOMING in work.moved_to:
        Q.wake(work.root, Q.WAKE_INCOMING)
    if Q.DEFERRED in work.moved_to:
        Q.wake(work.root, Q.WAKE_DEFERRED)
    return 0


def _init_log(cfg, verbose: int) -> None:
    """Log to the mail log as the daemons do; standard error gets its own copy (say)."""
    try:
        msg.init("postsuper", syslog_name=cfg.get("syslog_name"),
                 maillog_file=cfg.get("maillog_file"),
                 syslog_facility=cfg.get("syslog_facility"), verbose=verbose)
        _LOG["on"] = True
    except (OSError, ValueError):
        msg.init_cli("postsuper", verbose)


def main(argv: list[str]) -> int:
    """Run postsuper with Postfix's flags; returns the exit status."""
    try:
        return _run(list(argv))
    except _Exit as exc:
        return exc.status
    except msg.FatalError:
        return 1
    finally:
        _LOG["on"] = False
        msg.close()
