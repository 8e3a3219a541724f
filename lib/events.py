"""A small single-threaded event loop: file descriptors and timers, as Postfix's events.c.

The multi-client skeleton (tlsmgr, qmgr) and the master run one of these. Callbacks run one
at a time in the loop's thread; a callback that raises is a bug of ours and stops the loop.

    loop = EventLoop()
    loop.add_reader(fd, callback)        callback() when fd is readable
    loop.add_writer(fd, callback)        callback() when fd is writable
    loop.remove(fd)                      forget fd (both directions); safe if unknown
    handle = loop.call_later(delay, fn)  fn() once, after delay seconds
    loop.cancel(handle)                  a timer that has not fired yet will not fire; its
                                         callback is released at once
    loop.run(until)                      run callbacks until until() is true
    loop.run_once(max_wait)              one pass: due timers, then I/O
    loop.fileno()                        the epoll descriptor; loop.close() releases it

Time comes from `clock` (time.monotonic unless given), so tests can inject their own.

A cancelled timer would otherwise stay in the heap, with everything its callback holds,
until its due time (qmgr cancels one delivery deadline of ipc_timeout per message): cancel()
drops the callback, and the heap is rebuilt without cancelled entries whenever they are
more than half of it, as asyncio does. Memory stays bounded by the timers that are live.

Readiness comes from epoll(7) directly (Linux), without the selectors module's layer of
key objects, which cost qmgr more per delivery than the system calls themselves.
"""

from __future__ import annotations

import heapq
import itertools
import select
import time


COMPACT_MIN = 64            # a heap this small is not worth rebuilding
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT


class TimerHandle:
    """One timer of call_later(); cancel() marks it and releases its callback."""

    __slots__ = ("when", "seq", "fn", "cancelled")

    def __init__(self, when: float, seq: int, fn):
        self.when, self.seq, self.fn, self.cancelled = when, seq, fn, False

    def __lt__(self, other: "TimerHandle") -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class EventLoop:
    """Readiness callbacks on file descriptors, plus one-shot timers."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._epoll = select.epoll()
        self._readers: dict[int, object] = {}
        self._writers: dict[int, object] = {}
        self._masks: dict[int, int] = {}    # fd -> events registered with epoll
        self._timers: list[tuple] = []      # (when, seq, TimerHandle), a heap
        self._seq = itertools.count()
        self._cancelled = 0         # cancelled handles still in the heap

    # --- file descriptors --------------------------------------------------------------
    def _update(self, fd: int) -> None:
        mask = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        old = self._masks.get(fd, 0)        # what epoll has
        if mask == old:
            return
        if mask and old:
            self._epoll.modify(fd, mask)
        elif mask:
            self._epoll.register(fd, mask)
        else:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass                        # closed already: the kernel forgot it
        if mask:
            self._masks[fd] = mask
        else:
            del self._masks[fd]

    def add_reader(self, fd: int, callback) -> None:
        """Call callback() whenever fd is readable."""
        fd = _fd(fd)
        self._readers[fd] = callback
        self._update(fd)

    def add_writer(self, fd: int, callback) -> None:
        """Call callback() whenever fd is writable."""
        fd = _fd(fd)
        self._writers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        """Stop watching fd for reading."""
        fd = _fd(fd)
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def remove_writer(self, fd: int) -> None:
        """Stop watching fd for writing."""
        fd = _fd(fd)
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

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
        # (when, seq, handle): the heap compares in C; seq is unique, so never the handle.
        heapq.heappush(self._timers, (handle.when, handle.seq, handle))
        return handle

    def cancel(self, handle: TimerHandle | None) -> None:
        """Cancel a timer; harmless when it already fired or was cancelled."""
        if handle is None or handle.fn is None:     # fired, or cancelled before
            return
        handle.cancelled = True
        handle.fn = None
        self._cancelled += 1
        if self._cancelled > COMPACT_MIN and 2 * self._cancelled > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def run_due_timers(self) -> float | None:
        """Fire every timer that is due; return seconds until the next one, or None.

        "Due" is judged once per pass, so a timer that re-arms itself with no delay runs
        again in the next pass, after I/O, instead of starving it.
        """
        now = self.clock()
        while self._timers:
            when, _, head = self._timers[0]
            if head.cancelled:
                heapq.heappop(self._timers)
                self._cancelled -= 1
                continue
            if when > now:
                return max(0.0, when - self.clock())
            heapq.heappop(self._timers)
            fn, head.fn = head.fn, None
            fn()
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
        # An error or hang-up wakes both directions, as the selectors module reports it.
        for fd, events in self._epoll.poll(-1 if wait is None else wait,
                                           max(len(self._masks), 1)):
            if events & ~select.EPOLLOUT and fd in self._readers:
                self._readers[fd]()
            if events & ~select.EPOLLIN and fd in self._writers:
                self._writers[fd]()

    def run(self, until, max_wait: float = 1.0) -> None:
        """Dispatch events until until() returns true (checked between passes)."""
        while not until():
            self.run_once(max_wait)

    def fileno(self) -> int:
        """The epoll descriptor (a forked child that runs a loop of its own closes it)."""
        return self._epoll.fileno()

    def close(self) -> None:
        """Release the epoll descriptor."""
        self._epoll.close()


def _fd(obj) -> int:
    """A descriptor number from a number or an object with fileno()."""
    return obj if isinstance(obj, int) else obj.fileno()
