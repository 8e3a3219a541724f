"""qmgr/manager.py with a fake clock, fake timers and a fake dispatcher: scheduling, limits,
deferral with backoff, bounces, expiry, suspensions, recovery, bad files. No processes."""

import email
import email.policy
import os
import re
import time

import pytest

from postfix_py.lib import deliver, maincf, msg
from postfix_py.lib import queue as Q
from postfix_py.lib import bounce_log
from postfix_py.qmgr import bounce
from postfix_py.qmgr.manager import CORRUPT_GRACE, Failure, QueueManager
from postfix_py.lib.resolve import ResolveError, Route

HOST = "mail.example.com"
DAY = 86400


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


class FakeLoop:
    """call_later/cancel on the fake clock; advance() fires what falls due."""

    def __init__(self, clock):
        self.clock = clock
        self.timers = []

    def call_later(self, delay, fn):
        handle = [self.clock.t + delay, fn, False]
        self.timers.append(handle)
        return handle

    def cancel(self, handle):
        if handle is not None:
            handle[2] = True

    def advance(self, seconds):
        end = self.clock.t + seconds
        while True:
            due = sorted((h for h in self.timers if not h[2] and h[0] <= end),
                         key=lambda h: h[0])
            if not due:
                break
            due[0][2] = True
            self.clock.t = max(self.clock.t, due[0][0])
            due[0][1]()
        self.clock.t = end
        self.timers = [h for h in self.timers if not h[2]]


class Harness:
    def __init__(self, tmp_path, resolver=None, maxproc=None, **settings):
        self.root = str(tmp_path / "queue")
        for sub in Q.SUBDIRS:
            os.makedirs(os.path.join(self.root, sub))
        conf = {"myhostname": HOST, "mydestination": "$myhostname, localhost",
                "queue_directory": self.root, **settings}
        (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self.cfg = maincf.load(str(tmp_path))
        self.clock = Clock(time.time())
        self.loop = FakeLoop(self.clock)
        self.calls = []
        self.mgr = QueueManager(self.cfg, self.root, lambda j, r: self.calls.append((j, r)),
                                loop=self.loop, now=self.clock, maxproc=maxproc or {},
                                resolver=resolver)

    def submit(self, sender, rcpts, arrival=None, body=b"Subject: hi\n\nbody\n"):
        w = Q.QueueWriter(self.root, now=self.clock.t if arrival is None else arrival)
        w.set_sender(sender)
        for r in rcpts:
            w.add_recipient(r)
        w.write(body)
        return w.commit()

    def answer(self, call, *kinds, relay="mx.example[192.0.2.1]:25"):
        job, request = call
        self.calls.remove(call)
        table = {"sent": ("2.0.0", "250 ok"), "deferred": ("4.0.0", "try later"),
                 "bounced": ("5.1.1", "host mx.example[192.0.2.1] said: 550 5.1.1 no such "
                                       "user (in reply to RCPT TO command)"),
                 "dead": ("4.4.1", "connect to mx.example[192.0.2.1]:25: Connection refused")}
        results = []
        for kind in kinds:
            dsn, reason = table[kind]
            results.append(deliver.RcptResult("deferred" if kind == "dead" else kind, dsn,
                                              reason))
        self.mgr.delivered(job, deliver.DeliveryStatus(relay=relay, results=results))

    def files(self, queue):
        return sorted(n for n in os.listdir(os.path.join(self.root, queue))
                      if not n.startswith("."))

    def mtime(self, queue, qid):
        return os.stat(os.path.join(self.root, queue, qid)).st_mtime


@pytest.fixture
def make(tmp_path):
    msg.init_cli("qmgr")
    made = []

    def factory(**kw):
        h = Harness(tmp_path, **kw)
        made.append(h)
        return h
    yield factory
    for h in made:
        h.mgr.close()


def test_local_and_remote_deliveries_then_removed(make, capsys):
    h = make()
    qid = h.submit("alice@example.org", [f"bob@{HOST}", "carol@remote.example"])
    h.mgr.start()
    assert h.files("active") == [qid] and h.files("incoming") == []
    by_transport = {r.transport: (j, r) for j, r in h.calls}
    local = by_transport["local"][1]
    assert (local.nexthop, local.recipients, local.queue_file) == (HOST, [f"bob@{HOST}"],
                                                                  f"active/{qid}")
    assert by_transport["smtp"][1].nexthop == "remote.example"
    assert by_transport["smtp"][1].sender == "alice@example.org"
    for call in list(h.calls):
        h.answer(call, "sent")
    assert h.files("active") == [] and h.files("deferred") == []
    err = capsys.readouterr().err
    assert f"{qid}: from=<alice@example.org>, size=18, nrcpt=2 (queue active)" in err
    assert err.endswith(f"qmgr: {qid}: removed\n")


def test_recipient_grouping_and_recipient_limits(make):
    h = make(default_destination_recipient_limit="2")
    h.submit("a@example.org", [f"r{i}@remote.example" for i in range(5)]
             + [f"u{i}@{HOST}" for i in range(2)] + ["x@other.example"])
    h.mgr.start()
    sizes = sorted((r.transport, r.nexthop, len(r.recipients)) for _, r in h.calls)
    assert sizes == [("local", HOST, 1), ("local", HOST, 1), ("smtp", "other.example", 1),
                     ("smtp", "remote.example", 1), ("smtp", "remote.example", 2),
                     ("smtp", "remote.example", 2)]
    offsets = [o for _, r in h.calls for o in r.offsets]
    assert len(set(offsets)) == 8


def test_destination_and_transport_concurrency(make):
    h = make(default_destination_concurrency_limit="2", maxproc={"smtp": 3})
    ids = [h.submit("a@example.org", ["x@slow.example"]) for _ in range(5)]
    other = h.submit("a@example.org", ["x@other.example"])
    more = h.submit("a@example.org", ["x@third.example"])
    h.mgr.start()
    # Three processes; destinations take turns, so each gets one first.
    dests = sorted(r.nexthop for _, r in h.calls)
    assert dests == ["other.example", "slow.example", "third.example"]
    h.answer(next(c for c in h.calls if c[1].nexthop == "other.example"), "sent")
    assert sorted(r.nexthop for _, r in h.calls) == ["slow.example", "slow.example",
                                                     "third.example"]
    h.answer(next(c for c in h.calls if c[1].nexthop == "third.example"), "sent")
    # slow.example stays at its limit of 2, although a process is free.
    assert sorted(r.nexthop for _, r in h.calls) == ["slow.example", "slow.example"]
    h.answer(next(c for c in h.calls if c[1].nexthop == "slow.example"), "sent")
    assert sorted(r.nexthop for _, r in h.calls) == ["slow.example", "slow.example"]
    assert len(h.mgr.messages) == 4 and other not in h.mgr.messages and ids and more


def test_slow_start_and_local_per_recipient_queues(make):
    h = make(initial_destination_concurrency="2", default_destination_concurrency_limit="10")
    for _ in range(6):
        h.submit("a@example.org", ["x@busy.example"])
    h.submit("a@example.org", [f"u1@{HOST}"] * 3 + [f"u2@{HOST}"])
    h.mgr.start()
    smtp = [c for c in h.calls if c[1].transport == "smtp"]
    local = [c for c in h.calls if c[1].transport == "local"]
    assert len(smtp) == 2                       # initial_destination_concurrency
    assert len(local) == 3                      # two for u1 (limit 2), one for u2
    h.answer(smtp[0], "sent")                   # success widens the window by one
    assert len([c for c in h.calls if c[1].transport == "smtp"]) == 3


def test_active_queue_limit(make):
    h = make(qmgr_message_active_limit="2")
    ids = [h.submit("a@example.org", [f"x@d{i}.example"]) for i in range(4)]
    h.mgr.start()
    assert len(h.mgr.messages) == 2 and len(h.files("incoming")) == 2
    h.answer(h.calls[0], "sent")
    assert len(h.mgr.messages) == 2 and len(h.files("incoming")) == 1
    while h.calls:
        h.answer(h.calls[0], "sent")
    assert h.files("incoming") == h.files("active") == [] and ids


def test_deferral_backoff_and_retry(make, capsys):
    h = make(queue_run_delay="100s", minimal_backoff_time="300s",
             maximal_backoff_time="4000s")
    t0 = h.clock.t
    qid = h.submit("a@example.org", ["x@remote.example", "y@remote.example"])
    h.mgr.start()
    h.answer(h.calls[0], "deferred", "sent")
    assert h.files("deferred") == [qid]
    assert abs(h.mtime("deferred", qid) - (t0 + 300)) < 1          # age < minimal
    (entry,) = bounce_log.read(h.root, "defer", qid)
    assert (entry.recipient, entry.status, entry.action, entry.reason) == (
        "x@remote.example", "4.0.0", "delayed", "try later")
    h.loop.advance(200)                         # two scans, not yet due
    assert h.calls == [] and h.files("deferred") == [qid]
    h.loop.advance(120)                         # due, and a scan came
    assert h.files("active") == [qid] and len(h.calls) == 1
    assert h.calls[0][1].recipients == ["x@remote.example"]        # y is done
    assert bounce_log.read(h.root, "defer", qid) == []             # reset on activation
    h.answer(h.calls[0], "deferred")
    age = h.clock.t - t0
    assert abs(h.mtime("deferred", qid) - (h.clock.t + age)) < 1   # backoff = age
    h.loop.advance(5 * DAY - (h.clock.t - t0) - 10)
    h.mgr.trigger(b"A")
    h.answer(h.calls[0], "deferred")
    assert abs(h.mtime("deferred", qid) - (h.clock.t + 4000)) < 1  # maximal_backoff_time
    assert capsys.readouterr().err.count(f"{qid}: from=<a@example.org>") == 3


def test_scan_requests(make):
    h = make()
    qid = h.submit("a@example.org", ["x@remote.example"])
    h.mgr.start()
    h.answer(h.calls[0], "deferred")
    h.mgr.trigger(b"D")
    assert h.calls == []                        # not due
    h.mgr.trigger(b"I")
    assert h.calls == []
    h.mgr.trigger(b"A")                         # postqueue -f: ignore retry times
    assert len(h.calls) == 1 and h.files("active") == [qid]


def _notification(h, qid_new):
    path = os.path.join(h.root, "incoming", qid_new)
    if not os.path.exists(path):
        path = os.path.join(h.root, "active", qid_new)
    env = Q.read(path)
    return env, email.message_from_bytes(b"".join(env.content(path)),
                                         policy=email.policy.default)


def test_bounce_sends_a_notification(make, capsys):
    h = make()
    qid = h.submit("alice@example.org", ["x@remote.example", "y@remote.example"],
                   body=b"Subject: original\n\nbody\n")
    h.mgr.start()
    h.answer(h.calls[0], "bounced", "sent")
    err = capsys.readouterr().err
    new = err.split(f"{qid}: sender non-delivery notification: ")[1].split()[0]
    assert f"{qid}: removed" in err
    assert not os.path.exists(bounce_log.path(h.root, "bounce", qid))
    env, m = _notification(h, new)
    assert (env.sender, [r.address for r in env.recipients]) == ("", ["alice@example.org"])
    assert m["To"] == "alice@example.org" and m.get_content_type() == "multipart/report"
    text, report, original = m.get_payload()
    assert "<x@remote.example>: host mx.example[192.0.2.1] said: 550 5.1.1 no such" in \
        text.get_content()
    rcpt = report.get_payload()[1]
    assert (rcpt["Status"], rcpt["Remote-MTA"]) == ("5.1.1", "dns; mx.example")
    assert original.get_payload()[0]["Subject"] == "original"
    # The notification itself goes out at once, from <>, flagged as a bounce.
    (job, request) = h.calls[0]
    assert (request.queue_id, request.sender, request.flags) == (new, "", ["bounce"])


def test_soft_bounce_deferral_recorded(make, capsys):
    # soft_bounce is the agents' (lib/delivery_agent.Report): with it, an agent reports a
    # 550 as deferred 4.1.1, and qmgr records exactly that.
    h = make(soft_bounce="yes")
    qid = h.submit("alice@example.org", ["x@remote.example"])
    h.mgr.start()
    job, _ = h.calls.pop(0)
    h.mgr.delivered(job, deliver.DeliveryStatus(relay="mx.example[192.0.2.1]:25", results=[
        deliver.RcptResult("deferred", "4.1.1", "host mx.example[192.0.2.1] said: 550 5.1.1 "
                                                "no such user (in reply to RCPT TO command)")]))
    assert h.files("deferred") == [qid]
    (entry,) = bounce_log.read(h.root, "defer", qid)
    assert (entry.status, entry.action) == ("4.1.1", "delayed")
    assert "non-delivery" not in capsys.readouterr().err


def test_failed_bounce_dropped_by_default(make, capsys):
    h = make()
    qid = h.submit("", ["x@remote.example"])
    h.mgr.start()
    h.answer(h.calls[0], "bounced")
    err = capsys.readouterr().err
    assert "non-delivery notification" not in err and f"{qid}: removed" in err
    assert h.files("incoming") == h.files("active") == [] and h.calls == []


def test_failed_bounce_to_postmaster_once(make, capsys):
    h = make(notify_classes="resource, software, 2bounce")
    qid = h.submit("", ["x@remote.example"])
    h.mgr.start()
    h.answer(h.calls[0], "bounced")
    err = capsys.readouterr().err
    new = err.split(f"{qid}: postmaster non-delivery notification: ")[1].split()[0]
    (job, request) = h.calls[0]
    assert request.queue_id == new and request.sender == f"double-bounce@{HOST}"
    assert request.recipients == [f"postmaster@{HOST}"] and request.transport == "local"
    env, m = _notification(h, new)
    assert m["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert "I'm sorry" not in m.get_payload()[0].get_content()
    h.answer(h.calls[0], "bounced")             # the postmaster notice fails too
    err = capsys.readouterr().err
    assert f"warning: {new}: undeliverable postmaster notification discarded" in err
    assert "non-delivery notification" not in err
    assert h.files("incoming") == h.files("active") == [] and h.calls == []


def test_mail_to_the_double_bounce_address_is_discarded(make, capsys):
    h = make()
    qid = h.submit("", [f"double-bounce@{HOST}"])
    h.mgr.start()
    assert h.calls == [] and h.files("active") == []
    err = capsys.readouterr().err
    assert f"{qid}: to=<double-bounce@{HOST}>, relay=none" in err
    assert "status=sent (discarded)" in err


def test_expiry_returns_deferred_mail(make, capsys):
    h = make(maximal_queue_lifetime="1d")
    qid = h.submit("alice@example.org", ["x@remote.example"], arrival=h.clock.t - 2 * DAY)
    h.mgr.start()
    h.answer(h.calls[0], "deferred")
    err = capsys.readouterr().err
    assert f"{qid}: from=<alice@example.org>, status=expired, returned to sender" in err
    new = err.split(f"{qid}: sender non-delivery notification: ")[1].split()[0]
    assert f"{qid}: removed" in err and h.files("deferred") == []
    _, m = _notification(h, new)
    rcpt = m.get_payload()[1].get_payload()[1]
    assert (rcpt["Action"], rcpt["Status"], rcpt["Diagnostic-Code"]) == (
        "failed", "4.0.0", "X-Postfix; try later")


def test_bounce_queue_lifetime_applies_to_bounces(make, capsys):
    h = make(maximal_queue_lifetime="5d", bounce_queue_lifetime="1d")
    young = h.submit("a@example.org", ["x@remote.example"], arrival=h.clock.t - 2 * DAY)
    old = h.submit("", ["y@remote.example"], arrival=h.clock.t - 2 * DAY)
    h.mgr.start()
    while h.calls:
        h.answer(h.calls[0], "deferred")
    err = capsys.readouterr().err
    assert h.files("deferred") == [young]
    assert f"{old}: from=<>, status=expired, returned to sender" in err
    assert f"{old}: removed" in err


def test_zero_lifetime_bounces_on_first_deferral(make, capsys):
    h = make(maximal_queue_lifetime="0")
    qid = h.submit("alice@example.org", ["x@remote.example"])
    h.mgr.start()
    h.clock.t += 1
    h.answer(h.calls[0], "deferred")
    assert "status=expired, returned to sender" in capsys.readouterr().err
    assert qid not in h.files("deferred")


def test_agent_failure_suspends_the_transport(make, capsys):
    h = make(transport_retry_time="60s", maxproc={"smtp": 1})
    a = h.submit("a@example.org", ["x@one.example"])
    b = h.submit("a@example.org", ["x@two.example"])
    h.mgr.start()
    (call,) = h.calls
    h.calls.clear()
    h.mgr.delivered(call[0], Failure("4.3.0", "mail transport unavailable"))
    err = capsys.readouterr().err
    assert "warning: transport smtp failure -- see a previous warning" in err
    assert err.count("dsn=4.3.0, status=deferred (mail transport unavailable)") == 2
    assert h.files("deferred") == sorted([a, b]) and h.calls == []
    c = h.submit("a@example.org", ["x@three.example"])
    h.mgr.trigger(b"I")
    assert h.calls == [] and c in h.files("deferred")
    h.loop.advance(61)
    h.mgr.trigger(b"A")
    assert len(h.calls) == 1                    # one process again


def test_site_failure_suspends_the_destination(make, capsys):
    h = make(default_destination_concurrency_limit="1")
    a = h.submit("a@example.org", ["x@down.example"])
    b = h.submit("a@example.org", ["y@down.example"])
    c = h.submit("a@example.org", ["z@up.example"])
    h.mgr.start()
    down = next(x for x in h.calls if x[1].nexthop == "down.example")
    waiting = ({"x@down.example", "y@down.example"} - set(down[1].recipients)).pop()
    h.answer(down, "dead")
    err = capsys.readouterr().err
    assert f"to=<{waiting}>, relay=none" in err
    assert (f"dsn=4.4.1, status=deferred (delivery temporarily suspended: connect to "
            "mx.example[192.0.2.1]:25: Connection refused)") in err
    assert [x[1].nexthop for x in h.calls] == ["up.example"]
    assert sorted(h.files("deferred")) == sorted([a, b])
    h.mgr.trigger(b"FA")                         # postqueue -f lifts it
    assert sorted(x[1].nexthop for x in h.calls) == ["down.example", "up.example"] and c


def test_recovery_of_active_and_done_recipients(make):
    h = make()
    qid = h.submit("a@example.org", ["x@remote.example", "y@remote.example"])
    os.rename(os.path.join(h.root, "incoming", qid), os.path.join(h.root, "active", qid))
    env = Q.read(os.path.join(h.root, "active", qid))
    Q.mark_done(os.path.join(h.root, "active", qid), env.recipients[0].offset)
    h.mgr.start()
    (call,) = h.calls
    assert call[1].recipients == ["y@remote.example"]
    h.answer(call, "sent")
    assert h.files("active") == [] and h.files("incoming") == []


def test_corrupt_files(make, capsys):
    h = make()
    young = os.path.join(h.root, "incoming", "ABC123")
    with open(young, "wb") as f:
        f.write(Q.MAGIC + b"truncated")
    with open(os.path.join(h.root, "incoming", "bad name!"), "wb") as f:
        f.write(b"x")
    with open(os.path.join(h.root, "incoming", ".being-written"), "wb") as f:
        f.write(b"x")
    good = h.submit("a@example.org", ["x@remote.example"])
    h.mgr.start()
    assert len(h.calls) == 1 and h.files("active") == [good]
    assert h.files("corrupt") == ["bad name!"]
    assert "ABC123" in h.files("incoming")     # too young to judge
    old = time.time() - 2 * CORRUPT_GRACE
    os.utime(young, (old, old))
    h.loop.advance(CORRUPT_GRACE + 1)
    assert sorted(h.files("corrupt")) == ["ABC123", "bad name!"]
    err = capsys.readouterr().err
    assert "warning: corrupt file queue incoming id ABC123" in err
    assert "warning: bad mail queue ID: bad name!" in err
    assert os.path.exists(os.path.join(h.root, "incoming", ".being-written"))


def test_queue_file_vanishes_during_delivery(make, capsys):
    h = make()
    qid = h.submit("a@example.org", ["x@remote.example"])
    h.mgr.start()
    os.unlink(os.path.join(h.root, "active", qid))       # postsuper -d
    h.answer(h.calls[0], "sent")
    assert "has gone away" in capsys.readouterr().err
    assert h.mgr.messages == {}


def test_queue_file_removed_before_a_bounce(make, capsys):
    h = make()
    qid = h.submit("a@example.org", ["x@remote.example"])
    h.mgr.start()
    os.unlink(os.path.join(h.root, "active", qid))       # postsuper -d
    h.answer(h.calls[0], "bounced")
    err = capsys.readouterr().err
    assert "has gone away" in err and "non-delivery notification" not in err
    assert h.mgr.messages == {} and h.files("incoming") == []


def test_marks_go_to_the_file_wherever_it_moved(make, capsys):
    # postsuper -r while a delivery is in progress: its result is not lost with the
    # name, and the recipient is not delivered a second time.
    h = make()
    qid = h.submit("a@example.org", ["x@remote.example", "y@other.example"])
    h.mgr.start()
    os.rename(os.path.join(h.root, "active", qid), os.path.join(h.root, "incoming", qid))
    for call in list(h.calls):
        h.answer(call, "sent")
    assert "has gone away" in capsys.readouterr().err
    assert all(r.done for r in Q.read(os.path.join(h.root, "incoming", qid)).recipients)
    h.mgr.trigger(b"I")
    assert h.calls == [] and h.files("incoming") == [] and h.files("active") == []
    assert f"{qid}: removed" in capsys.readouterr().err


def test_queue_files_kept_open_up_to_the_limit(make):
    h = make()
    h.mgr.keep_open = 1
    qids = [h.submit("a@example.org", ["x@remote.example"]) for _ in range(2)]
    h.mgr.start()
    assert sorted(m.fd >= 0 for m in h.mgr.messages.values()) == [False, True]
    for call in list(h.calls):
        h.answer(call, "sent")
    assert h.files("active") == [] and h.mgr._open == 0 and len(qids) == 2


def test_resolver_failure_defers(make, capsys):
    class Broken:
        def resolve(self, address, sender=None):
            if address.startswith("bad"):
                raise ResolveError("transport_maps: lookup error")
            return Route("smtp", "fine.example")

        def close(self):
            pass
    h = make(resolver=Broken())
    qid = h.submit("a@example.org", ["bad@x.example", "good@x.example"])
    h.mgr.start()
    assert [r.recipients for _, r in h.calls] == [["good@x.example"]]
    h.answer(h.calls[0], "sent")
    assert h.files("deferred") == [qid]
    assert "dsn=4.3.0, status=deferred (address resolver failure)" in capsys.readouterr().err


def test_delay_warning_once_and_recorded_in_the_queue_file(make, capsys):
    h = make(delay_warning_time="4h", maximal_queue_lifetime="5d",
             minimal_backoff_time="300s", maximal_backoff_time="4000s")
    qid = h.submit("alice@example.org", ["x@remote.example", "y@remote.example"],
                   arrival=h.clock.t - 3 * 3600, body=b"Subject: original\n\nbody text\n")
    h.mgr.start()
    h.answer(h.calls[0], "deferred", "sent")        # 3 hours old: no warning yet
    assert "delay notification" not in capsys.readouterr().err
    assert not Q.read(os.path.join(h.root, "deferred", qid)).warned
    h.loop.advance(3600)
    h.mgr.trigger(b"A")
    h.answer(h.calls[0], "deferred")                 # 4 hours old: the warning
    err = capsys.readouterr().err
    new = err.split(f"{qid}: sender delay notification: ")[1].split()[0]
    assert "postmaster delay notification" not in err
    assert Q.read(os.path.join(h.root, "deferred", qid)).warned
    env, m = _notification(h, new)
    assert (env.sender, [r.address for r in env.recipients]) == ("", ["alice@example.org"])
    assert m["Subject"] == "Delayed Mail (still being retried)"
    assert m["Auto-Submitted"] == "auto-replied"
    text, report, original = m.get_payload()
    body = text.get_content()
    assert "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #" in body
    assert "could not be delivered for more than 4 hour(s)." in body
    assert "It will be retried until it is 5 day(s) old." in body
    assert "<x@remote.example>: try later" in body and "y@remote.example" not in body
    rcpt = report.get_payload()[1]
    assert (rcpt["Final-Recipient"], rcpt["Action"], rcpt["Status"]) == (
        "rfc822; x@remote.example", "delayed", "4.0.0")
    assert rcpt["Will-Retry-Until"] == bounce.mail_date(Q.read(
        os.path.join(h.root, "deferred", qid)).arrival + 5 * DAY)
    assert original.get_content_type() == "text/rfc822-headers"
    assert "body text" not in original.as_string()
    h.calls.clear()                                   # the notice's own delivery
    # Later passes (even by a new qmgr: the flag is in the file) warn no more.
    h.mgr.close()
    h.mgr = QueueManager(h.cfg, h.root, lambda j, r: h.calls.append((j, r)), loop=h.loop,
                         now=h.clock)
    h.mgr.start()
    h.calls[:] = [c for c in h.calls if c[1].queue_id == qid]
    h.mgr.trigger(b"A")
    h.answer(h.calls[0], "deferred")
    assert "delay notification" not in capsys.readouterr().err


def test_delay_warning_off_by_default(make, capsys):
    h = make()
    h.submit("alice@example.org", ["x@remote.example"], arrival=h.clock.t - 4 * DAY)
    h.mgr.start()
    h.answer(h.calls[0], "deferred")
    assert "delay notification" not in capsys.readouterr().err


def test_delay_warning_for_a_bounce_goes_to_the_postmaster(make, capsys):
    h2 = make(delay_warning_time="1h", notify_classes="resource, software, delay")
    qid = h2.submit("", ["x@remote.example"], arrival=h2.clock.t - 2 * 3600)
    h2.mgr.start()
    h2.answer(h2.calls[0], "deferred")
    err = capsys.readouterr().err
    # A bounce that is delayed: only the postmaster hears of it, with notify_classes delay.
    new = err.split(f"{qid}: postmaster delay notification: ")[1].split()[0]
    assert "sender delay notification" not in err
    env, m = _notification(h2, new)
    assert env.sender == f"double-bounce@{HOST}" and m["To"] == f"postmaster@{HOST}"
    assert m["Subject"] == "Postmaster Warning: Delayed Mail"


def test_delay_warning_copy_to_the_postmaster_with_notify_classes_delay(make, capsys):
    h = make(delay_warning_time="1h", notify_classes="delay", delay_notice_recipient="pm")
    qid = h.submit("alice@example.org", ["x@remote.example"], arrival=h.clock.t - 7200,
                   body=b"Subject: original\n\nthe body\n")
    h.mgr.start()
    h.answer(h.calls[0], "deferred")
    err = capsys.readouterr().err
    assert err.count(f"{qid}: sender delay notification: ") == 1
    new = err.split(f"{qid}: postmaster delay notification: ")[1].split()[0]
    env, m = _notification(h, new)
    assert env.sender == f"double-bounce@{HOST}" and m["To"] == f"pm@{HOST}"
    assert m["Subject"] == "Postmaster Warning: Delayed Mail"
    text, report, original = m.get_payload()
    assert "THIS IS A WARNING ONLY" not in text.get_content()      # no boilerplate
    assert original.get_content_type() == "text/rfc822-headers"


def test_forced_expiry_with_and_without_a_defer_log(make, capsys):
    h = make()
    qid = h.submit("alice@example.org", ["x@remote.example", "y@remote.example"])
    h.mgr.start()
    h.answer(h.calls[0], "deferred", "sent")
    assert h.files("deferred") == [qid]
    assert Q.force_expire(os.path.join(h.root, "deferred", qid))      # postsuper -e
    assert not Q.force_expire(os.path.join(h.root, "deferred", qid))  # already marked
    h.mgr.trigger(b"A")
    # No delivery attempt for a marked message (the one call is its bounce).
    assert [r.queue_id for _, r in h.calls] != [qid] and len(h.calls) == 1
    err = capsys.readouterr().err
    assert f"{qid}: from=<alice@example.org>, status=force-expired, returned to sender" in err
    new = err.split(f"{qid}: sender non-delivery notification: ")[1].split()[0]
    assert f"{qid}: removed" in err and h.files("deferred") == []
    rcpt = _notification(h, new)[1].get_payload()[1].get_payload()[1]
    assert (rcpt["Final-Recipient"], rcpt["Diagnostic-Code"]) == (
        "rfc822; x@remote.example", "X-Postfix; try later")     # the last attempt's reason
    # A new message, marked before any attempt: Postfix's "administratively expired".
    q2 = h.submit("bob@example.org", ["z@remote.example"])
    Q.force_expire(os.path.join(h.root, "incoming", q2))
    h.mgr.trigger(b"I")
    assert q2 not in [r.queue_id for _, r in h.calls]
    err = capsys.readouterr().err
    assert (f"{q2}: to=<z@remote.example>, relay=none, delay=" in err
            and "dsn=4.7.0, status=deferred (message is administratively expired)" in err)
    assert f"{q2}: from=<bob@example.org>, status=force-expired, returned to sender" in err
    assert f"{q2}: removed" in err


@pytest.fixture
def flow_pipe():
    """A real flow control pipe, as the master opens it, for this test only."""
    from postfix_py.lib import mail_flow
    mail_flow.init()
    yield mail_flow
    for fd in mail_flow._fds:
        os.close(fd)
    mail_flow._fds = None


def test_flow_tokens_follow_deliveries(make, flow_pipe):
    h = make(default_process_limit="5", maxproc={"smtp": 1})
    h.mgr.start()                     # nothing queued: the pipe is topped up
    assert flow_pipe.count() == 0     # ... at the start of the loop's next pass
    h.loop.advance(0)
    assert flow_pipe.count() == 5
    assert flow_pipe.get(5) and flow_pipe.count() == 0      # five messages being received
    qids = [h.submit("a@example.org", ["b@remote.example"]) for _ in range(3)]
    h.mgr.trigger(b"I")
    h.loop.advance(0)
    assert len(h.calls) == 1 and h.mgr.waiting == 2
    assert flow_pipe.count() == 0     # jobs wait for an agent: no top-up
    h.answer(h.calls[0], "sent")
    h.loop.advance(0)
    assert flow_pipe.count() == 1     # one message left the active queue: one token
    h.answer(h.calls[0], "sent")
    h.answer(h.calls[0], "sent")      # the pipeline has caught up: topped up again
    h.loop.advance(0)
    assert flow_pipe.count() == 5 and h.mgr.waiting == 0
    assert h.files("active") == [] and len(qids) == 3


def test_flow_wait_goes_on_without_a_token(flow_pipe):
    flow_pipe.get(flow_pipe.count() or 1)
    start = time.monotonic()
    flow_pipe.wait(0.2)
    assert 0.15 < time.monotonic() - start < 2
    flow_pipe.put(1)
    start = time.monotonic()
    flow_pipe.wait(5)
    assert time.monotonic() - start < 1 and flow_pipe.count() == 0


def test_a_backlog_is_fed_in_batches(make):
    from postfix_py.qmgr.manager import FEED_BATCH
    h = make(default_destination_concurrency_limit="100", initial_destination_concurrency="100")
    for _ in range(FEED_BATCH + 5):
        h.submit("a@example.org", ["b@remote.example"])
    h.mgr.start()
    assert len(h.calls) == FEED_BATCH         # the first batch is dispatched at once
    h.loop.advance(0)                         # the next pass of the event loop: the rest
    assert len(h.calls) == FEED_BATCH + 5


def test_a_slow_destination_does_not_hold_back_receiving(make, flow_pipe):
    h = make(default_process_limit="5", maxproc={"smtp": 1})
    h.mgr.start()
    for _ in range(2):
        h.submit("a@example.org", ["b@remote.example"])
    h.mgr.trigger(b"I")
    h.clock.t += 30                   # the far end takes its time
    h.answer(h.calls[0], "sent")      # its deliveries are known to be slow now
    h.loop.advance(0)
    flow_pipe.get(flow_pipe.count())
    h.submit("a@example.org", ["b@remote.example"])
    h.mgr.trigger(b"I")
    h.loop.advance(0)
    assert h.mgr.waiting == 1 and flow_pipe.count() == 5


# --- address verification probes and sendmail -bv (trace_flags) -----------------------------

def _submit_traced(h, flags, rcpts, sender="double-bounce@example.org"):
    w = Q.QueueWriter(h.root, now=h.clock.t)
    w.add_attr("trace_flags", str(flags))
    w.add_attr("verify_address", rcpts[0])
    w.set_sender(sender)
    for r in rcpts:
        w.add_recipient(r)
    w.write(b"")
    return w.commit()


def test_normal_mail_has_no_probe_flag(make):
    h = make()
    h.submit("a@example.org", ["x@remote.example"])
    h.mgr.start()
    assert h.calls[0][1].flags == []


def test_a_probe_goes_out_with_the_verify_flag_and_is_never_bounced(make):
    h = make()
    qid = _submit_traced(h, 256, ["x@remote.example", "y@other.example"])
    h.mgr.start()
    assert all("verify" in r.flags for _, r in h.calls)
    # the agent reported one to the verify service ("sent"); the other it could not
    by_dest = {r.nexthop: c for c in h.calls for r in [c[1]]}
    h.answer(by_dest["remote.example"], "sent")
    h.answer(by_dest["other.example"], "bounced")
    assert not bounce_log.exists(h.root, bounce_log.BOUNCE, qid)
    assert h.files("deferred") == [qid] and h.files("incoming") == []     # no notice


def test_what_qmgr_cannot_deliver_for_a_probe_goes_to_the_verify_service(make, monkeypatch):
    told = []
    monkeypatch.setattr("postfix_py.lib.verify_client.report_probe",
                        lambda cfg, addrs, status, text: told.append(
                            (tuple(addrs), status, text)) or (True, "undeliverable"))
    h = make()
    qid = _submit_traced(h, 256, ["x@remote.example"])
    h.mgr.start()
    job, _ = h.calls.pop()
    h.mgr.delivered(job, Failure("4.3.0", "mail transport unavailable"))
    assert told == [(("x@remote.example", "x@remote.example"), 1,
                     "mail transport unavailable")]
    assert h.files("active") == [] and h.files("deferred") == []
    assert not bounce_log.exists(h.root, bounce_log.DEFER, qid)


def test_sendmail_bv_results_become_a_report_to_the_sender(make, capsys):
    h = make()
    qid = _submit_traced(h, 512, ["good@remote.example", "bad@remote.example"],
                         sender="alice@example.org")
    h.mgr.start()
    job, request = h.calls[0]
    assert "expand" in request.flags and "verify" not in request.flags
    h.answer(h.calls[0], "sent", "bounced")
    assert qid not in h.files("active") and h.files("deferred") == []
    (report,) = h.files("active")           # the report, taken in at once
    path = os.path.join(h.root, "active", report)
    env = Q.read(path)
    text = b"".join(env.content(path)).decode()
    assert env.sender == "" and [r.address for r in env.recipients] == ["alice@example.org"]
    assert "Subject: Mail Delivery Status Report" in text
    assert "Final-Recipient: rfc822; good@remote.example\nOriginal-Recipient: " \
        "rfc822;good@remote.example\nAction: deliverable" in text
    assert "Final-Recipient: rfc822; bad@remote.example\nOriginal-Recipient: " \
        "rfc822;bad@remote.example\nAction: undeliverable" in text
    err = capsys.readouterr().err
    assert f"{qid}: sender delivery status notification: {report}" in err
    assert "non-delivery notification" not in err


def test_probes_past_address_verify_pending_request_limit_are_deferred_at_once(
        make, monkeypatch, capsys):
    told = []
    monkeypatch.setattr("postfix_py.lib.verify_client.report_probe",
                        lambda cfg, addrs, status, text: told.append(
                            (tuple(addrs), status, text)) or (True, "undeliverable"))
    h = make(address_verify_pending_request_limit="1")
    ids = {_submit_traced(h, 256, ["x@remote.example"]): "x@remote.example",
           _submit_traced(h, 256, ["y@remote.example"]): "y@remote.example"}
    h.submit("a@example.org", ["z@remote.example"])       # normal mail is not counted
    h.mgr.start()
    sent = sorted(r.recipients[0] for _, r in h.calls)
    assert len(sent) == 2 and "z@remote.example" in sent
    (gone,) = [a for a in ids.values() if a not in sent]
    (gone_id,) = [q for q, a in ids.items() if a == gone]
    assert told == [((gone, gone), 1, "Too many address verification requests")]
    assert gone_id not in h.files("active") + h.files("deferred")
    # (the delays depend on how long the file waited: a busy test machine)
    assert re.search(rf"{gone_id}: to=<{re.escape(gone)}>, relay=none, delay=[\d.]+, "
                     r"delays=[\d./]+, dsn=4\.3\.2, status=undeliverable \(Too many "
                     r"address verification requests\)", capsys.readouterr().err)
    # once the probe in flight is done, the count is down and the next probe goes out
    h.answer(next(c for c in h.calls if c[1].recipients[0] != "z@remote.example"), "sent")
    assert h.mgr.probes == 0
    _submit_traced(h, 256, ["w@remote.example"])
    h.mgr.trigger(b"I")
    assert any(r.recipients[0] == "w@remote.example" for _, r in h.calls)
    assert len(told) == 1


def test_a_probe_is_routed_by_address_verify_relayhost_and_normal_mail_is_not(make):
    h = make(relayhost="[127.0.0.1]:1025", address_verify_relayhost="[127.0.0.1]:2025")
    assert h.mgr.probe_resolver is not h.mgr.resolver
    _submit_traced(h, 256, ["x@remote.example"])
    h.submit("a@example.org", ["x@remote.example"])
    _submit_traced(h, 512, ["x@remote.example"], sender="a@example.org")     # sendmail -bv
    h.mgr.start()
    routes = sorted((r.nexthop, "verify" in r.flags) for _, r in h.calls)
    assert routes == [("[127.0.0.1]:1025", False), ("[127.0.0.1]:1025", False),
                      ("[127.0.0.1]:2025", True)]


def test_without_address_verify_routing_probes_share_the_resolver(make):
    h = make(relayhost="[127.0.0.1]:1025")
    assert h.mgr.probe_resolver is h.mgr.resolver
