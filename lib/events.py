"""A small single-threaded event loop: file descriptors and timers, as Postfix's events.c.

The multi-client skeleton (tlsmgr, qmgr) and the master run one of these. Callbacks run one
at a time in the loop's thread; a callback that raises is a bug of ours and stops the loop.

    loop = EventLoop()
    loop.add_reader(fd, callback)        callback() when fd is readable
    loop.add_writer(fd, callback)        callback() when fd is writable
    loop.remove(fd)                      forget fd (both directions); safe if unknown
    handle = loop.call_later(delay, fn)  fn() once, after delay seconds
    loop.cancel(handle)                  a timer that has not fired yet will not fire
    loop.run(until)                      run callbacks until until() is true
    loop.run_once(max_wait)              one pass: due timers, then I/O

Time comes from `clock` (time.monotonic unless given), so tests can inject their own.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time


class TimerHandle:
    """One timer of call_later(); cancel() marks it, the heap drops it when it comes up."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn):
        self.when, self.seq, self.fn, self.cancelled = when, seq, fn, False

    def __lt__(self, other: "TimerHandle") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventLoop:
    """Readiness callbacks on file descriptors, plus one-shot timers."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._sel = selectors.DefaultSelector()
        self._readers: dict[int, object] = {}
        self._writers: dict[int, object] = {}
        self._timers: list[TimerHandle] = []
        self._seq = itertools.count()

    # --- file descriptors --------------------------------------------------------------
    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | \
               (selectors.EVENT_WRITE if fd in self._writers else 0)
        try:
            key = self._sel.get_key(fd)
        except KeyError:
            key = None
        if mask and key:
            self._sel.modify(fd, mask)
        elif mask:
            self._sel.register(fd, mask)
        elif key:
            self._sel.unregister(fd)

    def add_reader(self, fd: int, callback) -> None:
        """Call callback() whenever fd is readable."""
        self._readers[_fd(fd)] = callback
        self._update(_fd(fd))

    def add_writer(self, fd: int, callback) -> None:
        """Call callback() whenever fd is writable."""
        self._writers[_fd(fd)] = callback
        self._update(_fd(fd))

    def remove_reader(self, fd: int) -> None:
        """Stop watching fd for reading."""
        if self._readers.pop(_fd(fd), None) is not None:
            self._update(_fd(fd))

    def remove_writer(self, fd: int) -> None:
        """Stop watching fd for writing."""
        if self._writers.pop(_fd(fd), None) is not None:
            self._update(_fd(fd))

    def remove(self, fd: int) -> None:
        """Stop watching fd at all (call before closing it)."""
        fd = _fd(fd)
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._update(fd)

    # --- timers ------------------------------------------------------------------------
    def call_later(self, delay: float, fn) -> TimerHandle:
        """Call fn() once, delay seconds from now."""
        handle = TimerHandle(self.clock() + max(0.0, delay), next(self._seq), fn)
        heapq.heappush(self._timers, handle)
        return handle

    def cancel(self, handle: TimerHandle | None) -> None:
        """Cancel a timer; harmless when it already fired or was cancelled."""
        if handle is not None:
            handle.cancelled = True

    def run_due_timers(self) -> float | None:
        """Fire every timer that is due; return seconds until the next one, or None.

        "Due" is judged once per pass, so a timer that re-arms itself with no delay runs
        again in the next pass, after I/O, instead of starving it.
        """
        now = self.clock()
        while self._timers:
            head = self._timers[0]
            if head.cancelled:
                heapq.heappop(self._timers)
                continue
            delay = head.when - now
            if delay > 0:
                return max(0.0, head.when - self.clock())
            heapq.heappop(self._timers)
            head.fn()
        return None

    # --- running -----------------------------------------------------------------------
    def run_once(self, max_wait: float | None = None) -> None:
        """Fire due timers, then wait for I/O (at most max_wait) and dispatch it."""
        wait = self.run_due_timers()
        if max_wait is not None:
            wait = max_wait if wait is None else min(wait, max_wait)
        if not self._readers and not self._writers:
            if wait:
                time.sleep(wait)
            return
        for key, mask in self._sel.select(wait):
            fd = key.fd
            if mask & selectors.EVENT_READ and fd in self._readers:
                self._readers[fd]()
            if mask & selectors.EVENT_WRITE and fd in self._writers:
                self._writers[fd]()

    def run(self, until, max_wait: float = 1.0) -> None:
        """Dispatch events until until() returns true (checked between passes)."""
        while not until():
            self.run_once(max_wait)

    def close(self) -> None:
        """Release the selector."""
        self._sel.close()


def _fd(obj) -> int:
    return obj if isinstance(obj, int) else obj.fileno()
