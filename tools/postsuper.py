"""postsuper: delete, expire, hold, release and requeue mail, with Postfix's postsuper(1) flags.

    postfix-py postsuper [-psSv] [-c config_dir] [-d queue_id] [-e queue_id] [-f queue_id]
                         [-h queue_id] [-H queue_id] [-r queue_id] [queue...]

FLAGS (each of -d, -e, -f, -h, -H, -r may be given more than once; `ALL` means every
message, `-` reads queue ids from standard input, one a line)
    -d id    delete the message and its defer and bounce logs.
             Default queues: hold, incoming, active, deferred.
    -e id    request forced expiration: the message is returned to its sender when qmgr
             next takes it into the active queue (never while it is on hold). A deferred
             message is returned with the reasons of its last attempt, any other with
             "message is administratively expired". As Postfix, the mark is a mode bit of
             the queue file (lib/queue.py STAT_EXPIRE). Default queues: hold, incoming,
             active, deferred.
    -f id    as -e, and release the message if it is on hold. Default queues: as -e.
    -h id    put the message on hold (move it to hold/): qmgr leaves it alone.
             Default queues: incoming, active, deferred.
    -H id    release it from hold: back to deferred/, due now, and qmgr is woken.
             Default queue: hold.
    -r id    requeue it: to incoming/ with its defer log and any forced-expiry mark
             removed, and qmgr is woken, so that its recipients are resolved again
             (Postfix requeues through pickup and cleanup for the same purpose).
             Default queues: hold, incoming, active, deferred.
    -p       purge temporary files that a crash left behind: dot-files (files still being
             written) older than 7 days in the message queues, and anything that is not
             a regular file there. Done before the other operations.
    -s, -S   structure check: accepted, nothing to do (postfix-py's queue is not hashed,
             and queue file names match their inodes by construction).
    -c dir   main.cf in dir; -v more verbose logging.
    Without any flag, postsuper does -s and -p, as Postfix's.
    Queue names after the flags restrict the operations to those queues.
    The operations run in command-line order, as Postfix's, after -p.

    A message in active/ may be in delivery: acting on it while qmgr runs drops the results
    of deliveries still in progress (qmgr warns), so those recipients may get a second copy,
    as with Postfix.

DIAGNOSTICS
    Postfix's lines, on standard error and in the mail log: `postsuper: ID: removed`,
    `ID: expired`, `ID: placed on hold`, `ID: released from hold`, `ID: requeued` (for
    ids given by name), then, in Postfix's order, `Requeued: N messages`, `Deleted: N
    messages`, `Force-expired: N messages`, `Placed on hold: N messages`, `Released from
    hold: N messages`; `warning: invalid mail queue id: X`. A usage error is
    `postsuper: fatal: usage: ...` with exit status 1.

SECURITY
    Renames, removes and marks queue files directly: run it as root or as mail_owner.

SEE ALSO
    Postfix postsuper(1); tools/postqueue.py; qmgr/manager.py (forced expiry).
"""

from __future__ import annotations

import getopt
import os
import stat
import sys
import time

from ..lib import bounce_log, maincf, msg
from ..lib import queue as Q
from . import cmdline

USAGE = ("usage: postsuper [-c config_dir] [-d queue_id (delete)] "
         "[-e queue_id (expire)] [-f queue_id (expire and/or un-hold)] "
         "[-h queue_id (hold)] [-H queue_id (un-hold)] "
         "[-p (purge temporary files)] [-r queue_id (requeue)] "
         "[-s (structure fix)] [-S (redundant structure fix)] "
         "[-v (verbose)] [queue...]")
QUEUES = (Q.INCOMING, Q.ACTIVE, Q.DEFERRED, Q.HOLD, Q.MAILDROP)
MESSAGE_QUEUES = (Q.INCOMING, Q.ACTIVE, Q.DEFERRED, Q.HOLD)   # -e: not maildrop
DEFAULTS = {"-d": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-r": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-e": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-f": (Q.HOLD, Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-h": (Q.INCOMING, Q.ACTIVE, Q.DEFERRED),
            "-H": (Q.HOLD,)}
OPS = tuple(DEFAULTS)
# The summary lines, in Postfix's order, and the operations that ask for each.
SUMMARY = (("Requeued", ("-r",)), ("Deleted", ("-d",)), ("Force-expired", ("-e", "-f")),
           ("Placed on hold", ("-h",)), ("Released from hold", ("-H", "-f")))
MAX_TEMP_AGE = 7 * 86400            # Postfix's: a dot-file older than this is debris


_LOG = {"on": False}


def say(text: str, severity: str = "info") -> None:
    """A line on standard error and in the mail log, as Postfix's postsuper reports."""
    prefix = "" if severity == "info" else f"{severity}: "
    print(f"postsuper: {prefix}{text}", file=sys.stderr)
    if _LOG["on"]:
        {"info": msg.info, "warning": msg.warn}[severity](text)


def _fatal(text: str):
    cmdline.fatal("postsuper", text)


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
        self.counts = {name: 0 for name, _ in SUMMARY}

    def _path(self, queue: str, qid: str) -> str:
        return os.path.join(self.root, queue, qid)

    def _move(self, op: str, queue: str, qid: str) -> bool:
        """-d, -r, -h, -H on qid in one queue; False when it is not there."""
        if op == "-d":
            try:
                os.unlink(self._path(queue, qid))
            except FileNotFoundError:
                return False
            bounce_log.remove(self.root, bounce_log.DEFER, qid)
            bounce_log.remove(self.root, bounce_log.BOUNCE, qid)
            bounce_log.remove(self.root, bounce_log.TRACE, qid)
            return True
        target = {"-r": Q.INCOMING, "-h": Q.HOLD, "-H": Q.DEFERRED}[op]
        if queue == target and op != "-r":
            return False
        src = self._path(queue, qid)
        try:
            if op in ("-r", "-H"):
                now = time.time()
                os.utime(src, (now, now))
            if op == "-r":
                # Postfix's requeue makes a new queue file: no forced-expiry mark survives.
                mode = stat.S_IMODE(os.lstat(src).st_mode)
                if mode & Q.STAT_EXPIRE:
                    os.chmod(src, mode & ~Q.STAT_EXPIRE)
            os.rename(src, self._path(target, qid))
        except FileNotFoundError:
            return False
        if op == "-r":
            bounce_log.remove(self.root, bounce_log.DEFER, qid)
        self.moved_to.add(target)
        return True

    def _expire(self, queue: str, qid: str) -> bool:
        """Set the forced-expiry mark on qid in one queue (Postfix's postexpire)."""
        path = self._path(queue, qid)
        try:
            return Q.force_expire(path)
        except OSError as exc:
            say(f"expire file {path}: {exc.strerror or exc}", "warning")
            return False

    def one(self, op: str, qid: str, queues: tuple) -> None:
        """One operation on a message named by its id, in the first queue that holds it."""
        if not Q.valid_id(qid):
            say(f"invalid mail queue id: {qid}", "warning")
            return
        if op in ("-e", "-f"):
            for queue in queues:
                if queue in MESSAGE_QUEUES and self._expire(queue, qid):
                    say(f"{qid}: expired")
                    self.counts["Force-expired"] += 1
                    break
            if op == "-f" and Q.HOLD in queues and self._move("-H", Q.HOLD, qid):
                say(f"{qid}: released from hold")
                self.counts["Released from hold"] += 1
            return
        done = {"-d": "removed", "-r": "requeued", "-h": "placed on hold",
                "-H": "released from hold"}[op]
        for queue in queues:
            if self._move(op, queue, qid):
                say(f"{qid}: {done}")
                self._count(op)
                return

    def all(self, op: str, queues: tuple) -> None:
        """One operation on every message of the queues (`ALL`)."""
        for queue in queues:
            for qid in _names(os.path.join(self.root, queue)):
                if op in ("-e", "-f"):
                    if queue in MESSAGE_QUEUES and self._expire(queue, qid):
                        self.counts["Force-expired"] += 1
                    if op == "-f" and queue == Q.HOLD and self._move("-H", queue, qid):
                        self.counts["Released from hold"] += 1
                elif self._move(op, queue, qid):
                    self._count(op)

    def _count(self, op: str) -> None:
        for name, ops in SUMMARY:
            if op in ops:
                self.counts[name] += 1

    def purge(self, queues: tuple, now: float) -> None:
        """-p: remove what a crash left: old dot-files, and anything not a regular file.

        A dot-file is a queue file being written (lib/queue.QueueWriter); Postfix removes
        such "not ready" files after MAX_TEMP_AGE. Directories are left alone.
        """
        for queue in queues:
            directory = os.path.join(self.root, queue)
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue
                if stat.S_ISREG(st.st_mode) and not (name.startswith(".")
                                                     and now > st.st_mtime + MAX_TEMP_AGE):
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    say(f"remove file {path}: {exc.strerror}", "warning")
                    continue
                msg.verbose(1, f"removed file {path}")


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:d:e:f:h:H:pr:sSv")
    except getopt.GetoptError as exc:
        print(f"postsuper: {exc.msg}", file=sys.stderr)
        _fatal(USAGE)
    config_dir, verbose = None, 0
    purge = repair = False
    work_list: list[tuple[str, str]] = []        # (op, queue id), in command-line order
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-v":
            verbose += 1
        elif opt == "-p":
            purge = True
        elif opt in ("-s", "-S"):
            repair = True
        else:
            work_list.append((opt, val))
    if not work_list and not purge and not repair:
        purge = repair = True                     # Postfix's default action: -s -p
    for name in args:
        if name not in QUEUES:
            _fatal(f"unknown queue name: {name}")
    try:
        cfg = maincf.load(config_dir)
    except maincf.ConfigError as exc:
        _fatal(str(exc))
    _init_log(cfg, verbose)
    stdin: list[str] | None = None
    work = Super(Q.queue_root(cfg))
    if purge:
        work.purge(tuple(args) or QUEUES, time.time())
    for op, qid in work_list:
        queues = tuple(args) or DEFAULTS[op]
        if qid == "ALL":
            work.all(op, queues)
        elif qid == "-":
            if stdin is None:
                stdin = [line.strip() for line in sys.stdin if line.strip()]
            for name in stdin:
                work.one(op, name, queues)
        else:
            work.one(op, qid, queues)
    asked = {op for op, _ in work_list}
    for name, ops in SUMMARY:
        if asked.intersection(ops):
            count = work.counts[name]
            say(f"{name}: {count} message{'' if count == 1 else 's'}")
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
    def log_off():
        _LOG["on"] = False
    return cmdline.run(_run, argv, cleanup=log_off)
