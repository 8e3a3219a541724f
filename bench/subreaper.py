"""Run a command as a child subreaper, so that every process it leaves behind stays below us.

    python bench/subreaper.py COMMAND [ARG...]

bench/sustained.py starts each mail system through this: the process marks itself a child
subreaper (prctl PR_SET_CHILD_SUBREAPER), runs COMMAND as its child, and then reaps every
child that ends until none is left, when it exits with COMMAND's status. A daemon that
detaches (`postfix start` forks the master into the background; Exim double-forks its
delivery processes) is then re-parented to this process rather than to init, so

  * the benchmark finds every process of the system below one pid (this one), and can end
    every one of them by its pid;
  * the CPU time of every process that has ended is in this process's cumulative children
    times (/proc/PID/stat cutime + cstime), because this process is the one that waits for
    the orphans, and each parent's cumulative times already hold those of the children it
    waited for. Busy time of the whole system = those + the times of the live processes.

SIGTERM and SIGINT are ignored here: the benchmark stops the system itself, and this
process exits once the last of its descendants has gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv) -> int:
    if not argv:
        print("usage: subreaper.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"subreaper: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"subreaper: {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(127)
    status = 0
    while True:
        try:
            got, code = os.waitpid(-1, 0)
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if got == pid:
            status = os.waitstatus_to_exitcode(code)
            status = status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
