"""postqueue: list the mail queue, or ask for its delivery, with Postfix's postqueue(1) flags.

    postfix-py postqueue [-v] [-c config_dir] -p | -j | -f | -i queue_id | -s site
    postfix-py flush                      (the same as postqueue -f)

FLAGS
    -p       list the queue in Postfix's mailq format: per message the queue id (`*`
             after it: in the active queue, being delivered; `!`: on hold; then `#`:
             forced to expire by postsuper -e), the size, the
             arrival time and the sender (MAILER-DAEMON for <>); then each recipient that
             is not done yet, below the reason of its last delivery attempt in
             parentheses. Ends with `-- N Kbytes in M Requests.`, or prints
             `Mail queue is empty`. Queues are read in the order maildrop, incoming,
             active, deferred, hold.
    -j       the same as JSON, one object a line, as Postfix 3.1 and later: queue_name,
             queue_id, arrival_time, message_size, forced_expire, sender, recipients
             (orig_address, as Postfix 3.11: the original recipient, as given before
             rewriting and alias expansion; address; and delay_reason when there is
             one). Addresses are quoted as in mail headers ("john doe"@example.org).
    -f       flush: make every deferred message due now and wake qmgr with `F` (lift
             suspended destinations) and `A` (scan everything, ignoring retry times).
    -i id    deliver one deferred message now: it is moved to incoming/ and qmgr woken,
             as Postfix's flush daemon does.
    -s site  the same for every deferred message with a recipient in domain site.
    -c dir   main.cf in dir; -v more verbose logging.

DIAGNOSTICS
    `postqueue: fatal: ...` on standard error with exit status 69 (EX_UNAVAILABLE) for a
    usage error or when qmgr cannot be reached (`Cannot flush mail queue - mail system is
    down`), 75 (EX_TEMPFAIL) when the queue cannot be read, as Postfix's postqueue.

SECURITY
    Reads (-p, -j) and renames (-f, -i, -s) queue files directly, so it needs the access
    of root or mail_owner; Postfix's set-gid postqueue goes through showq and flush
    daemons instead.

SEE ALSO
    Postfix postqueue(1), showq(8), flush(8); tools/postsuper.py; qmgr/service.py.
"""

from __future__ import annotations

import getopt
import json
import os
import sys
import time

from ..lib import maincf, msg, showq
from ..lib import queue as Q
from ..lib.address import split_address
from . import cmdline

USAGE = ("usage: postqueue -f | postqueue -i queueid | postqueue -j | postqueue -p | "
         "postqueue -s site")
EX_UNAVAILABLE, EX_TEMPFAIL = 69, 75
S_STRING_FORMAT = "%-11s %7s %-20s %s"
S_SENDER_FORMAT = "%-11s %7d %20.20s %s"


def _fatal(text: str, status: int = EX_UNAVAILABLE):
    cmdline.fatal("postqueue", text, status)


def _config(config_dir: str | None):
    try:
        return maincf.load(config_dir)
    except maincf.ConfigError as exc:
        _fatal(str(exc), EX_TEMPFAIL)


def show(queue_root: str):
    """Every queue file as a dict in Postfix's showq fields, queue by queue (lib/showq)."""
    try:
        yield from showq.messages(queue_root)
    except OSError as exc:
        _fatal(f"open {exc.filename}: {exc.strerror}", EX_TEMPFAIL)


def format_mailq(messages) -> str:
    """Postfix's mailq text (showq_compat.c) for show()'s records."""
    out, count, total = [], 0, 0
    for m in messages:
        out.append("" if count else S_STRING_FORMAT % (
            "-Queue ID-", "--Size--", "----Arrival Time----", "-Sender/Recipient-------"))
        mark = {Q.ACTIVE: "*", Q.HOLD: "!"}.get(m["queue_name"], "")
        mark += "#" if m["forced_expire"] else ""
        out.append(S_SENDER_FORMAT % (m["queue_id"] + mark, m["message_size"],
                                      time.asctime(time.localtime(m["arrival_time"])),
                                      m["sender"]))
        shown = ""
        for address, reason, _original in m["recipients"]:
            if reason != shown:
                shown = reason
                text = reason or "reason unavailable"
                out.append(" " * max(0, 76 - len(text)) + f"({text})")
            out.append(S_STRING_FORMAT % ("", "", "", address))
        count += 1
        total += m["message_size"]
    if not count:
        return "Mail queue is empty\n"
    out.append("")
    out.append(f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.")
    return "\n".join(out) + "\n"


def format_json(m) -> str:
    """One message as Postfix's postqueue -j prints it (orig_address: Postfix 3.11's)."""
    rcpts = []
    for address, reason, original in m["recipients"]:
        item = {"orig_address": original, "address": address}
        if reason:
            item["delay_reason"] = reason
        rcpts.append(item)
    return json.dumps({**{k: m[k] for k in ("queue_name", "queue_id", "arrival_time",
                                             "message_size", "forced_expire", "sender")},
                       "recipients": rcpts}, ensure_ascii=False)


def _write(text: str) -> None:
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.flush()


def _wake(queue_root: str, request: bytes) -> None:
    if not Q.wake(queue_root, request):
        _fatal("Cannot flush mail queue - mail system is down")


def _to_incoming(queue_root: str, name: str) -> bool:
    """Make one deferred message due now and hand it to qmgr through incoming/."""
    src = os.path.join(queue_root, Q.DEFERRED, name)
    try:
        now = time.time()
        os.utime(src, (now, now))
        os.rename(src, os.path.join(queue_root, Q.INCOMING, name))
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        msg.warn(f"{name}: move from deferred to incoming: {exc.strerror}")
        return False


def flush_all(queue_root: str) -> None:
    """postqueue -f: every deferred message due now; wake qmgr."""
    directory = os.path.join(queue_root, Q.DEFERRED)
    now = time.time()
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")]
    except OSError as exc:
        _fatal(f"open {directory}: {exc.strerror}", EX_TEMPFAIL)
    for name in names:
        try:
            os.utime(os.path.join(directory, name), (now, now))
        except OSError:
            pass
    _wake(queue_root, b"FA")


def flush_site(queue_root: str, site: str) -> None:
    """postqueue -s: deferred messages with a recipient in site, to incoming/."""
    site = site.lower().rstrip(".")
    directory = os.path.join(queue_root, Q.DEFERRED)
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")]
    except OSError as exc:
        _fatal(f"open {directory}: {exc.strerror}", EX_TEMPFAIL)
    for name in names:
        try:
            env = Q.read(os.path.join(directory, name))
        except (OSError, Q.QueueFileError):
            continue
        if any(split_address(r.address)[1] == site for r in env.recipients if not r.done):
            _to_incoming(queue_root, name)
    _wake(queue_root, Q.WAKE_INCOMING)


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:fi:jps:v")
    except getopt.GetoptError as exc:
        print(f"postqueue: {exc.msg}", file=sys.stderr)
        _fatal(USAGE)
    config_dir, action, arg, verbose = None, None, None, 0
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-v":
            verbose += 1
        else:
            if action is not None:
                _fatal(USAGE)
            action, arg = opt, val
    if action is None or args:
        _fatal(USAGE)
    msg.init_cli("postqueue", verbose)
    cfg = _config(config_dir)
    root = Q.queue_root(cfg)
    if action == "-p":
        _write(format_mailq(show(root)))
    elif action == "-j":
        for m in show(root):
            _write(format_json(m) + "\n")
    elif action == "-f":
        flush_all(root)
    elif action == "-i":
        if not Q.valid_id(arg):
            _fatal(f"invalid mail queue id: {arg}")
        _to_incoming(root, arg)
        _wake(root, Q.WAKE_INCOMING)
    elif action == "-s":
        flush_site(root, arg)
    return 0


def main(argv: list[str]) -> int:
    """Run postqueue with Postfix's flags; returns the exit status."""
    return cmdline.run(_run, argv, lib_fatal_status=EX_TEMPFAIL)


def flush(argv: list[str]) -> int:
    """`postfix-py [-c dir] flush`: postqueue -f."""
    return main([a for a in argv if a != "flush"] + ["-f"])
