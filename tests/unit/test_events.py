"""lib/events.py: timers fire in order, cancelled ones never fire and do not pile up."""

import gc
import weakref

from postfix_py.lib.events import COMPACT_MIN, EventLoop


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_timers_fire_in_order_and_cancel_stops_one():
    clock = Clock()
    loop = EventLoop(clock=clock)
    fired = []
    loop.call_later(2, lambda: fired.append("b"))
    handle = loop.call_later(1.5, lambda: fired.append("x"))
    loop.call_later(1, lambda: fired.append("a"))
    loop.cancel(handle)
    loop.cancel(handle)                 # twice: harmless
    clock.now = 5
    assert loop.run_due_timers() is None
    assert fired == ["a", "b"]
    loop.cancel(handle)                 # after the others fired: harmless


def test_cancel_after_firing_is_harmless():
    clock = Clock()
    loop = EventLoop(clock=clock)
    fired = []
    handle = loop.call_later(0, lambda: fired.append(1))
    loop.run_due_timers()
    loop.cancel(handle)
    later = loop.call_later(1, lambda: fired.append(2))
    clock.now = 2
    loop.run_due_timers()
    assert fired == [1, 2] and later.fn is None


def test_cancelled_timers_release_their_callbacks_and_the_heap_stays_small():
    """qmgr arms an ipc_timeout deadline per delivery and cancels it when the agent
    answers: the cancelled deadlines must not keep their deliveries alive for an hour."""
    loop = EventLoop(clock=Clock())
    live = loop.call_later(10, lambda: None)

    class Call:
        def timeout(self):
            pass

    refs = []
    for _ in range(10000):
        call = Call()
        refs.append(weakref.ref(call))
        loop.cancel(loop.call_later(3600, call.timeout))
        del call
    gc.collect()
    assert not any(r() for r in refs)
    assert len(loop._timers) <= 2 * COMPACT_MIN + 2
    assert not live.cancelled and live in [t[2] for t in loop._timers]
