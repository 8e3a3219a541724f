"""Delivery to a |command, as Postfix's local(8) does it (global/pipe_command.c).

run(command, data, uid, gid, env, time_limit) starts `/bin/sh -c command` in a new
session, with the given uid and gid set for good (groups: gid only) when the caller is
root, the environment env only, standard input the message (data: the `From ` line, the
headers local adds, the content) and standard output and error captured together; the
first OUTPUT_LIMIT bytes of that output are kept for the reason text (tabs and newlines
become spaces, other unprintable characters `_`), the rest is read and thrown away. A
command that does not read all its input is not an error (EPIPE), as in Postfix.

OUTCOMES (kind, dsn, reason), with Postfix's texts
    exit 0                          sent 2.0.0   delivered to command: CMD
    exit with a <sysexits.h> code   its dsn      e.g. 4.3.0 "temporary failure" (EX_TEMPFAIL,
                                                 75: deferred), 5.1.1 "user unknown" (67)
                                                 ... and ". Command output: OUTPUT"
    output starting "D.S.N text"    that status  the text (any non-zero exit)
    another exit status             5.3.0        Command died with status N: "CMD"
    a signal                        4.3.0        Command died with signal N: "CMD"
    command_time_limit exceeded     5.3.0        Command time limit exceeded: "CMD"
                                                 (the whole process group gets SIGKILL)
    the command cannot be started   4.3.0        system resource problem

SEE ALSO
    local/service.py; Postfix local(8) EXTERNAL COMMAND DELIVERY, pipe_command.c,
    sys_exits.c.
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import signal
import subprocess
import time

OUTPUT_LIMIT = 4096
_DSN_TEXT = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+(.*)$", re.S)

# <sysexits.h>: code -> (dsn, text), Postfix's sys_exits_table.
SYS_EXITS = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("4.3.0", "system resource problem"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace").replace("\t", " ").replace("\n", " ")
    return "".join(c if c.isprintable() else "_" for c in text)


def _kind(dsn: str) -> str:
    return "deferred" if dsn.startswith("4") else "bounced"


def run(command: str, data: bytes, uid: int, gid: int, env: dict[str, str],
        time_limit: float) -> tuple[str, str, str]:
    """Pipe data into command; (kind, dsn, reason) as listed above."""
    kw = {}
    if os.geteuid() == 0:
        kw = {"user": uid, "group": gid, "extra_groups": [gid]}
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd="/", start_new_session=True, close_fds=True, **kw)
    except (OSError, subprocess.SubprocessError) as exc:
        return "deferred", "4.3.0", f"system resource problem: {exc}"
    output = bytearray()
    view = memoryview(data)
    timed_out = False
    deadline = time.monotonic() + time_limit
    os.set_blocking(proc.stdin.fileno(), False)
    os.set_blocking(proc.stdout.fileno(), False)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if view:
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 1.0)):
                if key.fileobj is proc.stdin:
                    try:
                        view = view[os.write(proc.stdin.fileno(), view[:65536]):]
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EPIPE:
                            raise
                        view = view[:0]
                    if not view:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                else:
                    try:
                        chunk = os.read(proc.stdout.fileno(), 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(proc.stdout)
                        continue
                    if len(output) < OUTPUT_LIMIT:
                        output += chunk[:OUTPUT_LIMIT - len(output)]
    for stream in (proc.stdin, proc.stdout):
        if not stream.closed:
            stream.close()
    if not timed_out:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = _printable(bytes(output)).strip()
    tail = f". Command output: {text}" if text else ""
    if timed_out:
        return "bounced", "5.3.0", f'Command time limit exceeded: "{command}"{tail}'
    status = proc.returncode
    if status == 0:
        return "sent", "2.0.0", f"delivered to command: {command}"
    if status < 0:
        return "deferred", "4.3.0", f'Command died with signal {-status}: "{command}"{tail}'
    m = _DSN_TEXT.match(text)
    if m:
        dsn = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return _kind(dsn), dsn, m.group(4)
    if status in SYS_EXITS:
        dsn, what = SYS_EXITS[status]
        return _kind(dsn), dsn, what + tail
    return "bounced", "5.3.0", f'Command died with status {status}: "{command}"{tail}'
