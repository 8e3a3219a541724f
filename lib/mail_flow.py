"""mail_flow - inbound mail flow control tokens, as Postfix's mail_flow.c.

A stiffer coupling between receiving and delivering mail. The master opens one pipe before
it forks any worker, and every worker inherits both ends. The queue manager produces one
token (a byte) for each message that it takes from incoming/, and tops the pipe up to
default_process_limit tokens whenever incoming/ has been scanned empty; smtpd consumes one
token for each message that it is about to add to incoming/. When no token is available
(mail arrives faster than it leaves) smtpd waits for one, at most in_flow_delay seconds,
before it goes on anyway, so that the queue manager and the delivery agents get the processor and the disk:
the incoming queue then stays bounded instead of growing until the load stops.

Both ends are non-blocking: an empty pipe never blocks a receiving process, a full one
never blocks the queue manager. Outside a master (tests, a command) there is no pipe and
every function does nothing.

FUNCTIONS
    init()          the master, once, before its first fork
    get(n) -> bool  take n tokens; False when there were fewer
    put(n)          add up to n tokens
    count() -> int  tokens in the pipe (-1 without a pipe)
    wait(delay)     a receiving process: take a token, waiting at most `delay` seconds

CONFIGURATION PARAMETERS
    in_flow_delay (1s; 0 turns flow control off), default_process_limit (100): the number
    of tokens the queue manager keeps available.

SEE ALSO
    Postfix mail_flow.c, master_flow.c, qmgr.c (qmgr_loop).
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
import time

_fds: tuple[int, int] | None = None
_ZEROS = bytes(1024)
_count_buf = array.array("i", [0])      # FIONREAD's answer (one thread per process)
WAIT_STEP = 0.02


def init() -> None:
    """Open the token pipe (the master, before its first fork); a second call keeps it."""
    global _fds
    if _fds is None:
        _fds = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)


def active() -> bool:
    return _fds is not None


def get(n: int = 1) -> bool:
    """Consume n tokens; False when fewer were there (those read are gone, as in Postfix)."""
    if _fds is None:
        return True
    try:
        return len(os.read(_fds[0], n)) == n
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True     # a broken pipe must not stop mail


def put(n: int = 1) -> None:
    """Produce n tokens; a full pipe takes what fits."""
    if _fds is None or n <= 0:
        return
    while n > 0:
        try:
            n -= os.write(_fds[1], _ZEROS[:min(n, len(_ZEROS))])
        except (BlockingIOError, InterruptedError, OSError):
            return


def count() -> int:
    """The tokens available now."""
    if _fds is None:
        return -1
    try:
        fcntl.ioctl(_fds[0], termios.FIONREAD, _count_buf, True)
    except OSError:
        return -1
    return _count_buf[0]


def wait(delay: float) -> None:
    """Take a token, waiting for one at most `delay` seconds, then go on anyway.

    Postfix's cleanup sleeps the whole in_flow_delay; this one looks again every
    WAIT_STEP and goes on as soon as the queue manager has produced a token, so that
    acceptance follows delivery without gaps. (Polling, not select(): a token would wake
    every waiting smtpd at once.)"""
    if _fds is None or delay <= 0 or get(1):
        return
    deadline = time.monotonic() + delay
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(WAIT_STEP, left))
        if get(1):
            return
