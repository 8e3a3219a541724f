"""postcat: show queue file contents in human-readable form, as Postfix's postcat(1).

    postfix-py postcat [-behqv] [-c config_dir] [files...]

DESCRIPTION
    Prints each named queue file (lib/queue.py FORMAT), or standard input when none is
    named, in Postfix's layout:

        *** ENVELOPE RECORDS deferred/4C1A21F3E8B ***
        message_size:             332             210               1               0             332               0
        message_arrival_time: Sat Dec  5 17:49:12 2026
        named_attribute: client_name=client.example
        sender: alice@example.org
        recipient: bob@example.com
        done_recipient: carol@example.com
        *** MESSAGE CONTENTS deferred/4C1A21F3E8B ***
        Subject: hello
        (the header and the body as queued)
        *** HEADER EXTRACTED deferred/4C1A21F3E8B ***
        *** MESSAGE FILE END deferred/4C1A21F3E8B ***

    message_size has Postfix's six fields: the content size, the offset of the content in
    the file, the number of recipients, 0 (queue manager flags), the content size again,
    and 0 (SMTPUTF8). A recipient already delivered or bounced is a done_recipient.

FLAGS
    -e       show the envelope records (and the section markers).
    -h       show the message header: from the start of the content up to, not
             including, the first line that is neither a header line nor a continuation.
    -b       show the body: from that line to the end.
    Without -e, -h or -b: all three, as -beh.
    -q       take each name as a queue id and look for it in the maildrop, incoming,
             active, deferred and hold queues, in that order; the file is shown as
             queue/ID (relative to queue_directory), as Postfix does.
    -c dir   main.cf in dir (for queue_directory); -v more verbose.

DIAGNOSTICS
    On standard error, as Postfix's: `postcat: warning: NAME: input is not a valid queue
    file` (the next file is shown), `postcat: fatal: open queue file ID: No such file or
    directory`, `postcat: fatal: bad mail queue ID: X`, `postcat: fatal: record read
    error` (a file cut short); a fatal error exits with status 1.

BUGS
    Postfix's -d, -o, -r and -s show record types, offsets and pointer records of
    Postfix's own file format, which postfix-py's queue files do not have: they are
    refused as usage errors.

SECURITY
    Reads queue files directly: -q needs the access of root or mail_owner.

SEE ALSO
    Postfix postcat(1); lib/queue.py; tools/postqueue.py.
"""

from __future__ import annotations

import getopt
import os
import re
import shutil
import sys
import tempfile
import time

from ..lib import maincf, msg
from ..lib import queue as Q
from . import cmdline

USAGE = ("usage: postcat [-b (body text)] [-c config_dir] [-e (envelope records)] "
         "[-h (header text)] [-q (access queue)] [-v] [file(s)...]")
SEARCH_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
# A header line (Postfix's is_header): printable ASCII but space and colon, then a colon.
IS_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
DECIDE = 1000            # bytes of a line start enough to tell a header line from the body
NAMES = {b"S": "sender", b"R": "recipient", b"D": "done_recipient",
         b"G": "original_recipient"}


def _fatal(text: str):
    cmdline.fatal("postcat", text)


class _Text:
    """The content, split into header and body as postcat's state machine does."""

    def __init__(self, out, header: bool, body: bool):
        self.out, self.show = out, {"header": header, "body": body}
        self.state = "header"
        self.pending = bytearray()      # the start of a line not yet classified
        self.in_line = False            # inside a header line already classified
        self.last = b"\n"               # the last byte written

    def _write(self, data: bytes) -> None:
        if data and self.show[self.state]:
            self.out.write(data)
            self.last = data[-1:]

    def feed(self, data: bytes) -> None:
        while data:
            if self.state == "body":
                self._write(data)
                return
            if self.in_line:
                nl = data.find(b"\n")
                if nl < 0:
                    self._write(data)
                    return
                self._write(data[:nl + 1])
                data, self.in_line = data[nl + 1:], False
                continue
            self.pending += data
            if b"\n" not in self.pending and len(self.pending) < DECIDE:
                return
            data = self._classify()

    def _classify(self) -> bytes:
        line = bytes(self.pending)
        self.pending.clear()
        if IS_HEADER.match(line) or line[:1] in (b" ", b"\t"):
            self.in_line = True
        else:
            self.state = "body"
        return line

    def end(self) -> None:
        """The end of the content: flush, and end an unterminated last line."""
        if self.pending:
            self.feed(self._classify())
        if self.last != b"\n" and self.show[self.state]:
            self.out.write(b"\n")
        self.last = b"\n"


def _summary(f) -> tuple[int, int, int]:
    """(content size, content offset, recipients) of a queue file: message_size."""
    size, offset, rcpts = 0, 0, 0
    for pos, kind, data in Q.records(f):
        if kind in (b"R", b"D"):
            rcpts += 1
        elif kind == b"M":
            offset = pos + Q.HEADER.size
        elif kind == b"X" and data.isdigit():
            size = int(data)
    return size, offset, rcpts


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def postcat(f, name: str, show: set, out) -> None:
    """Print one queue file open for binary reading (seekable), as Postfix's postcat."""
    if not f.read(1):
        if "env" in show:
            out.write(f"*** ENVELOPE RECORDS {name} ***\n".encode())
        return
    f.seek(0)
    try:
        size, offset, rcpts = _summary(f)
    except Q.QueueFileError as exc:
        if str(exc).startswith("input is not"):
            out.flush()
            msg.warn(f"{name}: input is not a valid queue file")
            return
        size = offset = rcpts = 0       # cut short: shown up to the damage, below
    f.seek(0)
    env = "env" in show

    def line(text: str) -> None:
        if env:
            out.write(text.encode("utf-8", "surrogateescape") + b"\n")

    line(f"*** ENVELOPE RECORDS {name} ***")
    line("message_size: " + " ".join(f"{v:15d}" for v in (size, offset, rcpts, 0, size, 0)))
    text = _Text(out, "header" in show, "body" in show)
    try:
        for _, kind, data in Q.records(f):
            if kind == b"T":
                try:
                    stamp = time.asctime(time.localtime(float(data)))
                except (ValueError, OverflowError, OSError):
                    stamp = _text(data)
                line(f"message_arrival_time: {stamp}")
            elif kind == b"A":
                line(f"named_attribute: {_text(data)}")
            elif kind in NAMES:
                line(f"{NAMES[kind]}: {_text(data)}")
            elif kind == b"M":
                line(f"*** MESSAGE CONTENTS {name} ***")
            elif kind == b"B":
                text.feed(data)
            elif kind == b"X":
                text.end()
                line(f"*** HEADER EXTRACTED {name} ***")
            elif kind == b"E":
                line(f"*** MESSAGE FILE END {name} ***")
                break
            else:
                line(f"unknown_record_type: {_text(data)}")
    except Q.QueueFileError:
        text.end()
        out.flush()
        msg.fatal("record read error")
    out.flush()


def _open_in_queue(root: str, qid: str):
    """The file of queue id in the first queue that has it: (file, queue/ID)."""
    if not Q.valid_id(qid):
        _fatal(f"bad mail queue ID: {qid}")
    for _ in range(2):          # it may move between queues while we look, as Postfix
        for queue in SEARCH_QUEUES:
            try:
                return open(os.path.join(root, queue, qid), "rb"), f"{queue}/{qid}"
            except FileNotFoundError:
                continue
            except OSError as exc:
                _fatal(f"open queue file {qid}: {exc.strerror}")
    _fatal(f"open queue file {qid}: No such file or directory")


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "bc:ehqv")
    except getopt.GetoptError as exc:
        print(f"postcat: {exc.msg}", file=sys.stderr)
        _fatal(USAGE)
    config_dir, verbose, search = None, 0, False
    show: set[str] = set()
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-v":
            verbose += 1
        elif opt == "-q":
            search = True
        else:
            show.add({"-b": "body", "-e": "env", "-h": "header"}[opt])
    show = show or {"body", "env", "header"}
    msg.init_cli("postcat", verbose)
    try:
        cfg = maincf.load(config_dir)
    except maincf.ConfigError as exc:
        _fatal(str(exc))
    out = sys.stdout.buffer
    if not args:
        with tempfile.TemporaryFile() as copy:      # seekable: message_size comes first
            shutil.copyfileobj(sys.stdin.buffer, copy)
            copy.seek(0)
            postcat(copy, "stdin", show, out)
        return 0
    for name in args:
        if search:
            f, shown = _open_in_queue(cfg.get("queue_directory"), name)
        else:
            try:
                f, shown = open(name, "rb"), name
            except OSError as exc:
                _fatal(f"open {name}: {exc.strerror}")
        with f:
            postcat(f, shown, show, out)
    return 0


def main(argv: list[str]) -> int:
    """Run postcat with Postfix's flags; returns the exit status."""
    return cmdline.run(_run, argv)
