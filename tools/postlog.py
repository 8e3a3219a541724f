"""postlog: write to the mail log from shell scripts, as Postfix's postlog(1).

    postfix-py postlog [-iv] [-c config_dir] [-p priority] [-t tag] [text...]

DESCRIPTION
    Logs the text of the command line as one record; without text, each line of standard
    input as one record. The records go where the daemons' go (lib/msg.py): to
    maillog_file when it is set, else to syslog with syslog_facility, under the tag
    syslog_name/postlog, with the process id:

        Dec  5 17:49:12 mail postfix-py/postlog[4242]: backup done

    When standard error is a terminal, each record is written there too, as
    `tag: text`.

FLAGS
    -p priority  info (the default), warn or warning, error or err, fatal or crit, panic
                 (any case): the record gets Postfix's `warning: `, `error: `, `fatal: `
                 or `panic: ` prefix. After fatal or panic postlog pauses one second,
                 like the other Postfix programs; the exit status stays 0.
    -t tag       log under tag instead of syslog_name/postlog (characters that are not
                 printable become `?`).
    -i           accepted and ignored (the process id is always logged).
    -c dir       main.cf in dir; -v more verbose.

DIAGNOSTICS
    `postlog: fatal: bad severity: "X"` or a usage line, with exit status 1.

CONFIGURATION PARAMETERS
    syslog_name (postfix-py), syslog_facility (mail), maillog_file (empty).

SEE ALSO
    Postfix postlog(1); lib/msg.py.
"""

from __future__ import annotations

import getopt
import sys
import time

from ..lib import maincf, msg
from . import cmdline

USAGE = "usage: postlog [-c config_dir] [-i] [-p priority] [-t tag] [-v] [text]"
LEVELS = {"info": "info", "warn": "warning", "warning": "warning", "error": "error",
          "err": "error", "fatal": "fatal", "crit": "fatal", "panic": "panic"}
MAX_INPUT_LINE = 65536          # a longer input line is logged in pieces of this size


def _fatal(text: str):
    cmdline.fatal("postlog", text)


def _printable(text: str) -> str:
    return msg.printable(text, limit=None)


def _log(level: str, text: str, tag: str, tty: bool) -> None:
    """One record at level, without the exit that msg.fatal and msg.panic make."""
    if tty:
        prefix = "" if level == "info" else f"{level}: "
        print(f"{tag}: {prefix}{_printable(text)}", file=sys.stderr)
    try:
        {"info": msg.info, "warning": msg.warn, "error": msg.error, "fatal": msg.fatal,
         "panic": msg.panic}[level](text)
    except (msg.FatalError, msg.PanicError):
        pass


def _run(argv: list[str]) -> int:
    try:
        opts, args = getopt.getopt(argv, "c:ip:t:v")
    except getopt.GetoptError as exc:
        print(f"postlog: {exc.msg}", file=sys.stderr)
        _fatal(USAGE)
    config_dir, verbose, level, tag = None, 0, "info", None
    for opt, val in opts:
        if opt == "-c":
            config_dir = val
        elif opt == "-v":
            verbose += 1
        elif opt == "-p":
            if val.lower() not in LEVELS:
                _fatal(f'bad severity: "{val}"')
            level = LEVELS[val.lower()]
        elif opt == "-t":
            tag = _printable(val)
    try:
        cfg = maincf.load(config_dir)
        msg.init("postlog", syslog_name=cfg.get("syslog_name"),
                 maillog_file=cfg.get("maillog_file"),
                 syslog_facility=cfg.get("syslog_facility"), verbose=verbose)
    except maincf.ConfigError as exc:
        _fatal(str(exc))
    except (OSError, ValueError) as exc:
        _fatal(f"open the mail log: {getattr(exc, 'strerror', None) or exc}")
    if tag is not None:
        msg.set_tag(tag)
    shown = tag if tag is not None else f"{cfg.get('syslog_name')}/postlog"
    tty = sys.stderr.isatty()
    if args:
        _log(level, " ".join(args), shown, tty)
    else:
        stdin = sys.stdin.buffer
        while True:
            line = stdin.readline(MAX_INPUT_LINE)
            if not line:
                break
            _log(level, line.rstrip(b"\n").decode("utf-8", "replace"), shown, tty)
    if level in ("fatal", "panic"):
        time.sleep(1)
    return 0


def main(argv: list[str]) -> int:
    """Run postlog with Postfix's flags; returns the exit status."""
    return cmdline.run(_run, argv)
