"""The queue manager's state machine: active queue, per-destination scheduling, results.

This is qmgr's logic without its sockets. qmgr/service.py feeds it triggers and timers from
the event loop and gives it a dispatch function that sends a delivery request to an agent
(qmgr/dispatch.py); the agent's answer comes back through QueueManager.delivered(). Time comes
from an injectable wall clock (`now`) and timers from an injectable `loop` (call_later,
cancel), so unit tests drive backoff and expiry without sleeping.

LIFE OF A MESSAGE
    start()     as Postfix's qmgr: every file left in active/ by a crash or a stop goes back
                to incoming/; then incoming/ and deferred/ are scanned.
    feed        incoming/ and deferred/ are scanned alternately; a deferred file is taken
                only when its modification time (the next attempt time) has come, unless
                the scan was asked for with `A` (postqueue -f). A dot-file is skipped (being
                written); a file that lib/queue.read() refuses goes to corrupt/ with a
                warning once it is CORRUPT_GRACE seconds old. At most
                qmgr_message_active_limit messages, and about qmgr_message_recipient_limit
                recipients, are in memory. A file is opened once (lib/queue.OPEN_ACTIVE)
                and, for up to KEEP_OPEN messages, stays open until the end of its
                pass: recipients are marked done through it, so that a file moved
                meanwhile (postsuper -r, -h) keeps its results, as Postfix's agents
                write through the file they read; one removed (postsuper -d) is noticed
                at the end of the pass. Entering active/ resets the message's defer log
                and logs `ID: from=<s>, size=N, nrcpt=M (queue active)`. Files are taken
                FEED_BATCH at a time per pass of the event loop, so that agents' replies
                are served while a backlog is read. Flow control (lib/mail_flow.py,
                in_flow_delay): a token for smtpd per message that leaves the active
                queue, the pipe topped up to default_process_limit tokens while incoming/
                is empty and no job waits for a destination whose deliveries are quick
                (see _flow, _behind); the tokens of a pass of the event loop go at the
                start of the next, with one look at the pipe.
    resolve     each recipient not yet done gets a transport and next hop (lib/resolve.py;
                a message with a content_filter attribute goes to that transport and
                destination whatever its recipients, as Postfix's qmgr; without a
                destination, to default_filter_nexthop or the recipient domain);
                recipients with the same transport and next hop form jobs of at most
                <transport>_destination_recipient_limit recipients. With a limit of 1 (local)
                the destination is the recipient, as in Postfix.
    schedule    jobs wait per destination; a destination runs at most
                <transport>_destination_concurrency_limit jobs at once, starting at
                initial_destination_concurrency and growing by one per completed job; a
                transport runs at most its master.cf process limit. Destinations take turns.
    results     per recipient: sent -> mark_done, after an entry in trace/ID (fsync) when
                its NOTIFY has SUCCESS and the agent did not pass NOTIFY on to a next hop
                that announced DSN; bounced -> appended to bounce/ID (fsync),
                then mark_done; deferred -> appended to defer/ID (soft_bounce = yes: the
                agent has made its bounces deferrals, lib/delivery_agent.py). A reply in
                which every recipient is deferred with a 4.4.x status (no connection,
                routing) suspends the destination for minimal_backoff_time: its waiting
                jobs are deferred at once with "delivery temporarily suspended: REASON".
                An agent that cannot be reached, dies, times out or answers garbage
                defers the job's recipients and suspends the whole transport for
                transport_retry_time, with Postfix's warning `transport NAME
                failure -- see a previous warning/fatal/panic logfile record for the problem
                description`. `F` (postqueue -f) lifts every suspension.
    done        when no job of the message is left: a trace log becomes a success notice
                (`ID: sender delivery status notification: NEW`); a bounce log becomes a non-delivery
                notification (qmgr/bounce.py; `ID: sender non-delivery notification: NEW`);
                with deferred recipients, a message older than maximal_queue_lifetime
                (bounce_queue_lifetime for a bounce) is returned (`ID: from=<s>,
                status=expired, returned to sender`), otherwise it moves to deferred/ with
                its modification time set to now + its age, clamped to minimal_backoff_time
                .. maximal_backoff_time; with none, the file is removed (`ID: removed`).
                A deferred message that is not expired and has been queued for
                delay_warning_time (0: never) gets one delayed-mail warning to its sender
                (qmgr/bounce.py; `ID: sender delay notification: NEW`), once: the queue
                file records it (lib/queue.mark_warned, fsync) after the warning was
                committed, so a crash in between can repeat a warning but never lose one.
    expire      a file that postsuper -e marked (lib/queue.py STAT_EXPIRE) is not
                delivered: it is returned to the sender (`status=force-expired`) with the
                reasons of its defer log, or else "message is administratively expired".
    probes      a message whose trace_flags attribute has Postfix's
                DEL_REQ_FLAG_MTA_VRFY (256) is an address verification probe
                (verify/service.py): it is routed by the address_verify_* parameters
                (address_verify_relayhost, ...; lib/resolve.py PROBE_PARAMS), its
                requests carry the flag "verify", and the
                agents report to the verify service instead of delivering
                (lib/delivery_agent.py). What qmgr itself cannot deliver (no route, a
                suspended transport or destination, a failed agent) is reported there
                too (lib/verify_client.py report_probe, one blocking request per
                recipient, as Postfix's qmgr) and the recipient is done; a probe is
                never bounced and, expired, never returned. Past
                address_verify_pending_request_limit probes in the active queue, a
                probe's recipients are reported there at once as deferred ("4.3.2 Too
                many address verification requests"). sendmail -bv's message
                (trace_flags 512, DEL_REQ_FLAG_USR_VRFY) goes out with the flag
                "expand": every result, and what qmgr cannot deliver, goes to its trace
                log as deliverable or undeliverable, the recipient is done, and at the
                end the sender gets the report (qmgr/bounce.py report()).

    Every result is on disk (queue file or log) before the file moves on, so a crash
    repeats at most the deliveries that were in flight.

FUNCTIONS
    QueueManager(cfg, queue_root, dispatch, loop=None, now=time.time, maxproc=None,
                 resolver=None, probe_resolver=None)
        dispatch(job, request): start one delivery; its result must come back later (not
        from inside dispatch) through delivered(job, result).
        maxproc: {transport: process limit} (qmgr/service.py reads master.cf).
        resolver: a lib.resolve.AddressResolver (default: one made from cfg; TableError).
        probe_resolver: the one of probes (AddressResolver(cfg, probe=True); default: made
        from cfg when the address_verify_* routing differs, else resolver).
    start(); trigger(requests: bytes) for I, D, A, F, W; delivered(job, DeliveryStatus | Failure);
    deferred_scan() (the queue_run_delay timer); close().
    Failure(dsn, reason, throttle): a delivery that failed as a whole.

CONFIGURATION PARAMETERS
    in_flow_delay (1s), queue_run_delay (300s), minimal_backoff_time (300s), maximal_backoff_time (4000s),
    maximal_queue_lifetime (5d), bounce_queue_lifetime (5d), delay_warning_time (0h),
    qmgr_message_active_limit
    (20000), qmgr_message_recipient_limit (20000), default_destination_concurrency_limit
    (20), initial_destination_concurrency (5), default_destination_recipient_limit (50),
    address_verify_pending_request_limit (5000), default_process_limit (100),
    default_filter_nexthop (empty: the recipient domain, for a content_filter or FILTER
    transport without a destination); not yet in the parameter table, read with
    Postfix's defaults: <transport>_destination_concurrency_limit and
    <transport>_destination_recipient_limit (local: 2 and 1), transport_retry_time (60s);
    and those of lib/resolve.py and qmgr/bounce.py.

FILES
    incoming/, active/, deferred/, corrupt/, defer/ID, bounce/ID, trace/ID under
    queue_directory.

BUGS
    qmgr_message_recipient_limit is checked per message, not per recipient slice: a
    message's recipients all come into memory at once. Concurrency feedback is simple
    (slow start, then +1 per completed job; a site failure suspends the destination)
    rather than Postfix's cohort-based feedback.

SEE ALSO
    Postfix qmgr(8), qmgr_active.c; lib/deliver.py (the request); lib/bounce_log.py.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import stat
import time
from collections import deque
from dataclasses import dataclass, field

from ..lib import bounce_log, deliver, mail_flow, msg, verify_client
from ..lib import queue as Q
from ..lib.bounce_log import BOUNCE, DEFER, TRACE, LogEntry
from . import bounce
from ..lib.resolve import ResolveError, AddressResolver, Route, probe_routing_differs

CORRUPT_GRACE = 60.0          # an unreadable file younger than this may still be in flux
# Queue files taken in per pass of the event loop: agents' replies and triggers are served
# in between, so that deliveries start while a backlog is being read (Postfix: one).
FEED_BATCH = 16
# Active messages whose queue file stays open from the feed to the end of their pass, so
# that marking a recipient done is one pwrite(), not open, pwrite, close (further ones
# are opened by name, as before); at most a quarter of the descriptor limit.
KEEP_OPEN = 256
# open() errors that mean "not a regular file" (lstat would have said so): skipped quietly
_NOT_A_FILE = (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV)
# Postfix's own defaults for the local transport (local_destination_*_limit).
TRANSPORT_DEFAULTS = {"local": {"concurrency": 2, "recipients": 1}}
SUSPENDED = "delivery temporarily suspended: "
_ID = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass
class Failure:
    """A delivery request that failed as a whole: every recipient is deferred."""

    dsn: str
    reason: str
    throttle: bool = True      # suspend the transport


@dataclass
class Entry:
    address: str
    offset: int
    original: str = ""          # the original recipient (queue file's G record), "": same


@dataclass(eq=False)
class Message:
    queue_id: str
    path: str
    env: Q.QueueMessage
    started: float
    pending: int = 0
    deferred: list = field(default_factory=list)     # LogEntry of this pass
    gone: bool = False
    rescan: bool = False
    finished: bool = False
    expire: bool = False        # postsuper -e: return it to the sender at this attempt
    success: set | None = None  # offsets of the NOTIFY=SUCCESS recipients, when first needed
    fd: int = -1                # the queue file, open (Q.OPEN_ACTIVE) during the pass
    marked: bool = False        # a recipient was marked done through fd
    probe: bool = False         # an address verification probe (trace_flags 256)
    report: bool = False        # sendmail -bv: a report to the sender (trace_flags 512)


@dataclass(eq=False)
class Job:
    message: Message
    transport: "Transport"
    dest: "Destination"
    nexthop: str
    entries: list
    started: float = 0.0


@dataclass(eq=False)
class Destination:
    key: str
    window: float
    limit: int
    todo: deque = field(default_factory=deque)
    busy: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""
    dead_dsn: str = ""
    last_done: float = 0.0      # when a delivery here last ended (on-demand caching)
    conn_load: bool = False     # ask the agents to reuse cached connections
    conn_store: bool = False    # ... and to cache theirs
    took: float = 0.0           # how long its deliveries take (moving average, seconds)

    @property
    def capacity(self) -> int:
        return max(1, min(self.limit, int(self.window)))


@dataclass(eq=False)
class Transport:
    name: str
    limit: int                  # processes
    dest_limit: int
    rcpt_limit: int
    initial: int
    dests: dict = field(default_factory=dict)
    busy: int = 0
    dead_until: float = 0.0
    dead_reason: str = ""


class _Scan:
    """One queue directory being fed into the active queue."""

    def __init__(self, queue: str):
        self.queue = queue
        self.names: deque = deque()
        self.all = False
        self.restart = False
        self.restart_all = False


def _int(cfg, name: str, default: int) -> int:
    """A per-transport limit (<transport>_destination_...): Postfix knows one for every
    master.cf service, so it is not in the parameter table; main.cf may set it."""
    text = (cfg.get(name) if cfg.is_set(name) else str(default)).strip()
    try:
        value = int(text)
    except ValueError:
        msg.warn(f"bad numerical configuration: {name} = {text}; using {default}")
        return default
    return value if value > 0 else default


class QueueManager:
    """The active queue and its scheduling; see the module documentation."""

    def __init__(self, cfg, queue_root: str, dispatch, loop=None, now=time.time,
                 maxproc: dict | None = None, resolver: AddressResolver | None = None,
                 probe_resolver: AddressResolver | None = None):
        self.cfg = cfg
        self.root = queue_root
        self.dispatch = dispatch
        self.loop = loop
        self.now = now
        self.maxproc = maxproc or {}
        self.resolver = resolver or AddressResolver(cfg)
        # Probes are resolved as Postfix's resolve_clnt_verify(): by the address_verify_*
        # routing parameters, with a resolver of their own only when those differ.
        self.probe_resolver = probe_resolver or (
            AddressResolver(cfg, probe=True) if probe_routing_differs(cfg) else self.resolver)
        self.messages: dict[str, Message] = {}
        self.waiting = 0            # jobs queued on a destination, not yet started
        self.transports: dict[str, Transport] = {}
        self.rcpt_count = 0
        self.scans = {Q.INCOMING: _Scan(Q.INCOMING), Q.DEFERRED: _Scan(Q.DEFERRED)}
        self._turn = 0              # 0: incoming/ first, 1: deferred/ first
        self._turns = ((self.scans[Q.INCOMING], self.scans[Q.DEFERRED]),
                       (self.scans[Q.DEFERRED], self.scans[Q.INCOMING]))
        self._dirs: dict[str, str] = {}
        self._pumping = False
        self._moved = 0             # jobs released and scans requested: see _pump
        self._rescan_timer = None
        self._deferred_timer = None
        self._feed_timer = None
        self.active_limit = cfg["qmgr_message_active_limit"]
        self.probes = 0             # probes in the active queue (qmgr_vrfy_pend_count)
        self.probe_limit = cfg["address_verify_pending_request_limit"]
        self.rcpt_limit = cfg["qmgr_message_recipient_limit"]
        self.queue_run_delay = cfg["queue_run_delay"]
        self.min_backoff = cfg["minimal_backoff_time"]
        self.max_backoff = max(self.min_backoff, cfg["maximal_backoff_time"])
        self.max_lifetime = cfg["maximal_queue_lifetime"]
        self.bounce_lifetime = cfg["bounce_queue_lifetime"]
        self.delay_warning = cfg["delay_warning_time"]
        self.transport_retry = cfg["transport_retry_time"]
        self.double_bounce = bounce.double_bounce_address(cfg).lower()
        # Inbound flow control (lib/mail_flow.py): a token per message taken from incoming/.
        self.flow = cfg["in_flow_delay"] > 0 and mail_flow.active()
        self.flow_tokens = cfg["default_process_limit"]
        self.flow_slow = max(1.0, cfg["in_flow_delay"])
        # Messages that left the active queue since the last flow pass: their tokens go
        # with its top-up (every finished message is followed by a feed in the same pass
        # of the event loop, which asks for a flow pass at the start of the next one):
        # one look at the pipe, and one write, for all the replies of a pass.
        self._left = 0
        self._flow_timer = None
        self.keep_open = min(KEEP_OPEN, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self._open = 0              # messages with an open fd

    # --- entry points ----------------------------------------------------------------------
    def start(self) -> None:
        """Recover active/ into incoming/, scan both queues, arm the deferred-queue timer."""
        active = os.path.join(self.root, Q.ACTIVE)
        for name in _listdir(active):
            try:
                os.rename(self._path(Q.ACTIVE, name), self._path(Q.INCOMING, name))
            except OSError as exc:
                msg.warn(f"{name}: rename from active to incoming: {exc.strerror}")
        self._request_scan(Q.INCOMING)
        self._request_scan(Q.DEFERRED)
        self._arm_deferred_timer()
        self._pump()

    def trigger(self, requests: bytes) -> None:
        """Act on trigger bytes: I incoming, D deferred, A all, F flush dead, W wakeup."""
        for code in set(requests):
            if code in (ord("I"), ord("W")):
                self._request_scan(Q.INCOMING)
            elif code == ord("D"):
                self._request_scan(Q.DEFERRED)
            elif code == ord("A"):
                self._request_scan(Q.INCOMING, scan_all=True)
                self._request_scan(Q.DEFERRED, scan_all=True)
            elif code == ord("F"):
                self.flush_dead()
        self._pump()

    def deferred_scan(self) -> None:
        """The queue_run_delay timer: look for deferred mail whose time has come."""
        self._deferred_timer = None
        self._request_scan(Q.DEFERRED)
        self._arm_deferred_timer()
        self._pump()

    def flush_dead(self) -> None:
        """Lift every transport and destination suspension (postqueue -f)."""
        for t in self.transports.values():
            t.dead_until = 0.0
            for dest in t.dests.values():
                dest.dead_until = 0.0

    def close(self) -> None:
        """Release tables and timers."""
        if self.loop is not None:
            self.loop.cancel(self._deferred_timer)
            self.loop.cancel(self._rescan_timer)
            self.loop.cancel(self._feed_timer)
            self.loop.cancel(self._flow_timer)
        for m in self.messages.values():
            self._close_file(m)
        self.resolver.close()
        if self.probe_resolver is not self.resolver:
            self.probe_resolver.close()

    # --- scanning and feeding --------------------------------------------------------------
    def _path(self, queue: str, name: str) -> str:
        """A queue file's name, relative when the queue root is the working directory."""
        where = self._dirs.get(queue)
        if where is None:
            where = self._dirs[queue] = os.path.normpath(os.path.join(self.root, queue))
        return f"{where}/{name}"        # name: a directory entry, never . or .. (dot-files)

    def _arm_deferred_timer(self) -> None:
        if self.loop is not None:
            self.loop.cancel(self._deferred_timer)
            self._deferred_timer = self.loop.call_later(self.queue_run_delay, self.deferred_scan)

    def _request_scan(self, queue: str, scan_all: bool = False) -> None:
        self._moved += 1
        scan = self.scans[queue]
        if scan.names:
            scan.restart = True         # files newer than the listing: look again after it
            scan.restart_all |= scan_all
            return
        scan.names = deque(_listdir(os.path.join(self.root, queue)))
        scan.all = scan_all

    def _next_name(self):
        for scan in self._turns[self._turn]:
            self._turn ^= 1
            if not scan.names and scan.restart:
                scan.restart = False
                scan.names = deque(_listdir(os.path.join(self.root, scan.queue)))
                scan.all, scan.restart_all = scan.restart_all, False
            if scan.names:
                return scan, scan.names.popleft()
        return None, None

    def _feed(self) -> tuple[bool, bool]:
        """Take files into the active queue: (any taken, a batch was cut short)."""
        fed, looked = False, 0
        more = False
        # Room for one more: always for the first message, else within both limits.
        while not self.messages or (len(self.messages) < self.active_limit
                                    and self.rcpt_count < self.rcpt_limit):
            if looked >= FEED_BATCH and self.loop is not None:
                more = True
                break
            scan, name = self._next_name()
            if scan is None:
                break
            looked += 1
            fed |= self._activate(scan, name)
        if self.flow:
            if self.loop is None:
                self._flow_pass()
            elif self._flow_timer is None:
                self._flow_timer = self.loop.call_later(0, self._flow_pass)
        return fed, more

    def _flow_pass(self) -> None:
        """Flow control once per pass of the event loop, after every reply and feed of
        that pass: one look at the pipe and one write for all of them."""
        self._flow_timer = None
        self._flow(self._left)
        self._left = 0

    def _flow(self, done: int) -> None:
        """Flow control, after Postfix's qmgr_loop: a token per message that has left the
        active queue, and the pipe topped up to default_process_limit tokens while the
        pipeline keeps up (incoming/ scanned empty and no job waiting for an agent, see
        _behind).
        Postfix gives the token when a message enters the active queue; here the feed is
        cheap next to the delivery, so tokens follow deliveries, or the active queue
        would take the backlog that flow control keeps out of incoming/."""
        have = mail_flow.count()
        if have < 0:
            return
        if have < self.flow_tokens:
            scan = self.scans[Q.INCOMING]
            if not scan.names and not scan.restart and not self._behind():
                mail_flow.put(self.flow_tokens - have)
            elif done:
                mail_flow.put(min(done, self.flow_tokens - have))
        elif have > self.flow_tokens:
            mail_flow.get(have - self.flow_tokens)

    def _behind(self) -> bool:
        """Jobs wait for a destination whose deliveries are quick: the delivery side lacks
        processor time, not the far end's patience. Jobs that wait for a slow destination
        (deliveries that take in_flow_delay or more) do not slow down receiving, as in
        Postfix, where the active queue takes such mail without flow control."""
        if not self.waiting:
            return False
        for t in self.transports.values():
            for dest in t.dests.values():
                if dest.todo and dest.took < self.flow_slow:
                    return True
        return False

    def _pump(self) -> None:
        """Feed and schedule until nothing more can move; never re-entered. A long feed
        goes on in the next pass of the event loop."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                fed, more = self._feed()
                moved = self._moved
                started = self._schedule()
                if more:
                    if self._feed_timer is None:
                        self._feed_timer = self.loop.call_later(0, self._feed_again)
                    break
                # A feed ends when no file is left to take or there is no room for one;
                # scheduling changes neither, unless a job was released or a scan asked
                # for meanwhile (a dispatch that answered at once): then look again.
                if not (fed or started) or self._moved == moved:
                    break
        finally:
            self._pumping = False

    def _feed_again(self) -> None:
        self._feed_timer = None
        self._pump()

    def _corrupt(self, queue: str, name: str, why: str, mtime: float) -> None:
        """Move an unusable file to corrupt/, once it is old enough not to be in flux."""
        if self.now() - mtime < CORRUPT_GRACE:
            if self.loop is not None and self._rescan_timer is None:
                def again():
                    self._rescan_timer = None
                    self._request_scan(queue)
                    self._pump()
                self._rescan_timer = self.loop.call_later(CORRUPT_GRACE, again)
            return
        try:
            os.rename(self._path(queue, name), self._path(Q.CORRUPT, name))
        except FileNotFoundError:
            return
        except OSError as exc:
            msg.warn(f"save corrupt file queue {queue} id {name}: {exc.strerror}")
            return
        msg.warn(f"{why}")
        msg.warn(f"corrupt file queue {queue} id {name}")

    def _activate(self, scan: _Scan, name: str) -> bool:
        """Bring one queue file into the active queue; True when it was taken."""
        queue = scan.queue
        if name in self.messages:
            self.messages[name].rescan = True     # requeued while active: look again later
            return False
        src = self._path(queue, name)
        now = self.now()
        if queue == Q.DEFERRED and not scan.all:
            # Most deferred files are not due yet: their names are enough to tell.
            try:
                st = os.lstat(src)
            except OSError:
                return False
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > now + 1:
                return False
        # One open for the envelope and, while the file stays open, the recipients'
        # marks; its fstat says what lstat said (O_NOFOLLOW: a link is refused).
        try:
            fd = os.open(src, Q.OPEN_ACTIVE)
        except FileNotFoundError:
            return False
        except PermissionError:
            fd = -1                 # readable only: read by name, marked by name
        except OSError as exc:
            if exc.errno not in _NOT_A_FILE:
                msg.warn(f"open {queue}/{name}: {exc.strerror}")
            return False
        env = None
        try:
            if fd < 0:
                st = os.lstat(src)
                if not stat.S_ISREG(st.st_mode):
                    return False
            else:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    return False
            if not _id_ok(name):
                self._corrupt(queue, name, f"bad mail queue ID: {name}", 0.0)
            else:
                env = Q.read(src) if fd < 0 else Q.read_open(fd, src, st.st_size, name)
        except FileNotFoundError:
            pass
        except Q.QueueFileError as exc:
            self._corrupt(queue, name, str(exc), st.st_mtime)
        except OSError as exc:
            msg.warn(f"open {queue}/{name}: {exc.strerror}")
        if env is None:
            if fd >= 0:
                os.close(fd)
            return False
        dst = self._path(Q.ACTIVE, name)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            if not isinstance(exc, FileNotFoundError):
                msg.warn(f"{name}: rename from {queue} to active: {exc.strerror}")
            return False
        if fd >= 0 and self._open >= self.keep_open:
            os.close(fd)
            fd = -1
        expire = bool(st.st_mode & Q.STAT_EXPIRE)
        kept = bounce_log.read(self.root, DEFER, name) if expire else []
        if not kept:
            # The log describes the last attempt: a file from deferred/ nearly always
            # has one, removed without a look first.
            bounce_log.remove(self.root, DEFER, name, likely=queue == Q.DEFERRED)
        m = Message(name, dst, env, started=now, expire=expire, fd=fd)
        if verify_client.TRACE_FLAGS_ATTR in env.attrs:
            flags = verify_client.trace_flags(env.attrs[verify_client.TRACE_FLAGS_ATTR])
            m.probe = bool(flags & verify_client.TRACE_FLAG_VERIFY)
            self.probes += m.probe
            m.report = not m.probe and bool(flags & verify_client.TRACE_FLAG_REPORT)
        self._open += fd >= 0
        self.messages[name] = m
        sender = env.sender or ""
        msg.info(f"{name}: from=<{sender}>, size={env.size}, "
                 f"nrcpt={len(env.recipients)} (queue active)")
        if expire:
            self._force_expire(m, kept)
        else:
            self._resolve(m)
        if m.pending == 0:
            self._finish(m)
        return True

    # --- resolving and queueing --------------------------------------------------------------
    def _transport(self, name: str) -> Transport:
        t = self.transports.get(name)
        if t is None:
            own = TRANSPORT_DEFAULTS.get(name, {})
            limit = self.maxproc.get(name)
            if limit is None:
                limit = self.cfg["default_process_limit"]
            t = Transport(
                name, limit=limit if limit > 0 else 1 << 30,
                dest_limit=_int(self.cfg, f"{name}_destination_concurrency_limit",
                                own.get("concurrency",
                                        self.cfg["default_destination_concurrency_limit"])),
                rcpt_limit=_int(self.cfg, f"{name}_destination_recipient_limit",
                                own.get("recipients",
                                        self.cfg["default_destination_recipient_limit"])),
                initial=self.cfg["initial_destination_concurrency"])
            self.transports[name] = t
        return t

    def _destination(self, t: Transport, key: str) -> Destination:
        dest = t.dests.get(key)
        if dest is None:
            dest = Destination(key, window=min(t.initial, t.dest_limit), limit=t.dest_limit)
            t.dests[key] = dest
        return dest

    def _resolve(self, m: Message) -> None:
        """Group the message's open recipients into jobs on their destinations' queues."""
        if m.probe and self.probes > self.probe_limit:
            # the safety net behind the verify service's own pacing, as Postfix's
            self._defer(m, [Entry(r.address, r.offset) for r in m.env.recipients
                            if not r.done], "4.3.2", "Too many address verification requests",
                        log=True)
            return
        groups: dict[tuple, list[Entry]] = {}
        unresolved, discarded, grouped = [], [], 0
        content_filter = m.env.attrs.get("content_filter")
        resolver = self.probe_resolver if m.probe else self.resolver
        for rcpt in m.env.recipients:
            if rcpt.done:
                continue
            try:
                if content_filter:
                    route = _filter_route(content_filter, rcpt.address,
                                          self.cfg.get("default_filter_nexthop"),
                                          self.cfg.get("myhostname"))
                else:
                    route = resolver.resolve(rcpt.address, m.env.sender or "")
            except ResolveError as exc:
                msg.warn(f"{m.queue_id}: {exc}")
                unresolved.append(Entry(rcpt.address, rcpt.offset, rcpt.original))
                continue
            if route.local and rcpt.address.lower() == self.double_bounce:
                discarded.append(Entry(rcpt.address, rcpt.offset, rcpt.original))
                continue
            t = self._transport(route.transport)
            key = rcpt.address.lower() if t.rcpt_limit == 1 else route.nexthop.lower()
            groups.setdefault((route.transport, key, route.nexthop), []).append(
                Entry(rcpt.address, rcpt.offset, rcpt.original))
            grouped += 1
        # Mail to the double-bounce address ends here, as in Postfix's qmgr.
        for e in discarded:
            if not self._mark_done(m, e):
                return
            deliver.log_delivery(m.queue_id, e.address, "none", m.env.arrival, m.started,
                                 "2.0.0", "sent", "discarded", orig=e.original)
        self.rcpt_count += grouped
        if unresolved:
            self._defer(m, unresolved, "4.3.0", "address resolver failure", log=True)
        jobs = []
        for (tname, key, nexthop), entries in groups.items():
            t = self.transports[tname]
            dest = self._destination(t, key)
            for i in range(0, len(entries), t.rcpt_limit):
                jobs.append(Job(m, t, dest, nexthop, entries[i:i + t.rcpt_limit]))
        m.pending += len(jobs)
        now = self.now()
        for job in jobs:
            t, dest = job.transport, job.dest
            if t.dead_until > now:
                self._job_failed(job, "4.3.0", t.dead_reason)
            elif dest.dead_until > now:
                self._job_failed(job, dest.dead_dsn, SUSPENDED + dest.dead_reason)
            else:
                dest.todo.append(job)
                self.waiting += 1

    def _force_expire(self, m: Message, kept: list[LogEntry]) -> None:
        """postsuper -e, as Postfix's qmgr: no delivery; the defer log of the last attempt
        gives the reasons, or, without one, every open recipient is deferred with
        "message is administratively expired". _finish then returns the message."""
        if kept:
            m.deferred.extend(kept)
            return
        self._defer(m, [Entry(r.address, r.offset, r.original) for r in m.env.recipients
                     if not r.done],
                    "4.7.0", "message is administratively expired", log=True)

    # --- scheduling --------------------------------------------------------------------------
    def _schedule(self) -> bool:
        """Start waiting jobs within the limits, destinations taking turns."""
        started = False
        now = self.now()
        for t in self.transports.values():
            if t.dead_until > now:
                continue
            # One pass finds the destinations with jobs to start and the idle ones to
            # forget; starting jobs never makes a destination idle (dispatch answers
            # later), so the idle ones are the same before and after.
            ready, idle = [], []
            for key, d in t.dests.items():
                if d.dead_until <= now:
                    if d.todo:
                        ready.append(d)
                    elif not d.busy:
                        idle.append(key)
            while ready and t.busy < t.limit:
                more = []
                for dest in ready:
                    if t.busy >= t.limit:
                        break
                    capacity = dest.capacity        # starting a job does not change it
                    if dest.todo and dest.busy < capacity:
                        self.waiting -= 1
                        self._start(dest.todo.popleft())
                        started = True
                        if dest.todo and dest.busy < capacity:
                            more.append(dest)
                ready = more
            for key in idle:
                del t.dests[key]
        return started

    def _start(self, job: Job) -> None:
        m = job.message
        job.dest.busy += 1
        job.transport.busy += 1
        job.started = self.now()
        request = deliver.Request(
            queue_id=m.queue_id, queue_file=f"active/{m.queue_id}",
            transport=job.transport.name, nexthop=job.nexthop, sender=m.env.sender or "",
            arrival=m.env.arrival, recipients=[e.address for e in job.entries],
            offsets=[e.offset for e in job.entries],
            originals=[e.original for e in job.entries] if m.env.originals else (),
            flags=([] if m.env.sender else ["bounce"]) + self._conn_cache_flags(job.dest))
        if m.probe or m.report:
            request.flags.append("verify" if m.probe else "expand")
        self.dispatch(job, request)

    def _conn_cache_flags(self, dest: Destination) -> list[str]:
        """Postfix's on-demand connection caching (qmgr_entry_select): on with a delivery
        that starts within a second of the last one's end here, off for new connections
        when deliveries are neither concurrent nor back to back (cached ones are still
        used). The agent decides with smtp_connection_cache_on_demand."""
        back_to_back = dest.last_done + 1 >= self.now()
        if not dest.conn_store:
            if back_to_back:
                dest.conn_load = dest.conn_store = True
        elif not (dest.busy > 1 or back_to_back):
            dest.conn_store = False
        return ["conn_load"] * dest.conn_load + ["conn_store"] * dest.conn_store

    # --- results -----------------------------------------------------------------------------
    def delivered(self, job: Job, result) -> None:
        """A delivery agent's answer (deliver.DeliveryStatus) or a Failure, for one started job."""
        job.dest.busy -= 1
        job.transport.busy -= 1
        job.dest.last_done = now = self.now()
        job.dest.took += (max(0.0, now - job.started) - job.dest.took) / 4
        if isinstance(result, Failure):
            self._job_done(job, result.dsn, result.reason, log=True)
            if result.throttle:
                self._throttle_transport(job.transport, result.reason)
        elif result.status != deliver.attr.STATUS_OK:
            reason = result.reason or f"delivery agent status {result.status}"
            self._job_done(job, "4.3.0", reason, log=True)
        else:
            self._record(job, result)
        self._pump()

    def _record(self, job: Job, reply) -> None:
        """Write a reply's per-recipient results, durably, then release the job."""
        m = job.message
        if m.report:
            self._record_report(job, [(e, r.result, r.dsn, r.reason)
                                      for e, r in zip(job.entries, reply.results)],
                                reply.relay)
            return
        done, bounced, deferred, traced = [], [], [], []
        for entry, r in zip(job.entries, reply.results):
            if r.result == "sent":
                done.append(entry)
                if not r.passed and entry.offset in self._success(m):
                    traced.append(LogEntry(entry.address, entry.offset, r.dsn or "2.0.0",
                                           r.action or "delivered", r.reason, reply.relay))
            elif r.result == "bounced" and not m.probe:
                bounced.append(LogEntry(entry.address, entry.offset, r.dsn, "failed",
                                        r.reason, reply.relay))
            else:
                dsn = "4" + r.dsn[1:] if r.dsn[:1] == "5" else (r.dsn or "4.0.0")
                deferred.append(LogEntry(entry.address, entry.offset, dsn, "delayed",
                                         r.reason, reply.relay))
        if not m.gone:
            try:
                if bounced:
                    bounce_log.append(self.root, BOUNCE, m.queue_id, bounced)
            except OSError as exc:
                # Without the reason on disk the bounce could be lost: try again later.
                msg.warn(f"{m.queue_id}: append bounce log: {exc.strerror}")
                deferred += [LogEntry(b.recipient, b.offset, "4" + b.status[1:], "delayed",
                                      b.reason, b.relay) for b in bounced]
                bounced = []
            try:
                if traced:
                    bounce_log.append(self.root, TRACE, m.queue_id, traced)
            except OSError as exc:
                # As Postfix's sent(): a success that cannot be reported is deferred.
                msg.warn(f"{m.queue_id}: append trace log: {exc.strerror}")
                lost = {t.offset for t in traced}
                deferred += [LogEntry(t.recipient, t.offset, "4.3.0", "delayed",
                                      f"{m.queue_id}: trace service failed", t.relay)
                             for t in traced]
                done = [e for e in done if e.offset not in lost]
            # The last job of a message that is then removed: the marks need no fsync
            # (as Postfix, which never syncs them); a crash before the unlink repeats the
            # delivery, it loses nothing.
            removed_next = m.pending == 1 and not deferred and not m.deferred and not bounced
            for entry in done + bounced:
                if not self._mark_done(m, entry, sync=not removed_next):
                    break
            if deferred and not m.gone:
                self._defer_log(m, deferred)
        if deferred and not done and not bounced and all(d.status.startswith("4.4.")
                                                        for d in deferred):
            self._throttle_dest(job.dest, deferred[0].status, deferred[0].reason)
        elif done or bounced:
            dest = job.dest
            dest.window = min(dest.limit, dest.window + 1)
        self._release(job)

    def _record_report(self, job: Job, results, relay: str) -> None:
        """sendmail -bv: every recipient's result, whatever it is, goes to the trace log
        with the action deliverable or undeliverable (Postfix's trace_append with
        DEL_REQ_FLAG_USR_VRFY), and the recipient is done; _finish mails the report."""
        m = job.message
        self._report_entries(m, [LogEntry(e.address, e.offset, dsn, verify_client.status_name(
            verify_client.RCPT_OK if kind == "sent" else verify_client.RCPT_BOUNCE),
            reason, relay) for e, kind, dsn, reason in results])
        self._release(job)

    def _report_entries(self, m: Message, entries: list[LogEntry]) -> None:
        if m.gone:
            return
        try:
            bounce_log.append(self.root, TRACE, m.queue_id, entries)
        except OSError as exc:
            msg.warn(f"{m.queue_id}: append trace log: {exc.strerror}")
            self._defer_log(m, [LogEntry(t.recipient, t.offset, "4.3.0", "delayed",
                                         f"{m.queue_id}: trace service failed", t.relay)
                                for t in entries])
            return
        for entry in entries:
            if not self._mark_done(m, entry):
                break

    @staticmethod
    def _success(m: Message) -> set:
        """The offsets of m's recipients whose DSN NOTIFY asks for SUCCESS."""
        if m.success is None:
            m.success = {r.offset for r in m.env.recipients if "SUCCESS" in r.notify}
        return m.success

    def _mark_done(self, m: Message, entry, sync: bool = True) -> bool:
        """Record one recipient as done in the queue file; False when the file is gone.
        Through the open file, a removal (postsuper -d) shows only at the end of the
        pass (_finish), as in Postfix, whose agents write through the file they read."""
        try:
            Q.mark_done(m.path, entry.offset, sync, m.fd)
            m.marked |= m.fd >= 0
            return True
        except FileNotFoundError:
            self._vanished(m)
            return False
        except OSError as exc:
            msg.fatal(f"{m.queue_id}: update queue file {m.path}: {exc.strerror}")
            return False

    def _vanished(self, m: Message) -> None:
        if not m.gone:
            m.gone = True
            msg.warn(f"{m.queue_id}: queue file active/{m.queue_id} has gone away "
                     "(postsuper?); results of its deliveries in progress are dropped")

    def _defer_log(self, m: Message, entries: list[LogEntry]) -> None:
        m.deferred.extend(entries)
        try:
            bounce_log.append(self.root, DEFER, m.queue_id, entries, sync=False)
        except OSError as exc:
            msg.warn(f"{m.queue_id}: append defer log: {exc.strerror}")

    def _defer(self, m: Message, entries: list[Entry], dsn: str, reason: str,
               log: bool) -> None:
        """Defer recipients for a reason found by qmgr itself (the agent did not log it)."""
        if m.probe:
            entries = self._probe_deferred(m, entries, dsn, reason)
            if not entries:
                return
        elif m.report:
            for e in entries:
                deliver.log_delivery(m.queue_id, e.address, "none", m.env.arrival,
                                     m.started, dsn, "undeliverable", reason,
                                     orig=e.original)
            self._report_entries(m, [LogEntry(e.address, e.offset, dsn, "undeliverable",
                                              reason) for e in entries])
            return
        if log:
            for e in entries:
                deliver.log_delivery(m.queue_id, e.address, "none", m.env.arrival, m.started,
                                     dsn, "deferred", reason, orig=e.original)
        if not m.gone:
            self._defer_log(m, [LogEntry(e.address, e.offset, dsn, "delayed", reason)
                                for e in entries])

    def _probe_deferred(self, m: Message, entries: list[Entry], dsn: str,
                        reason: str) -> list[Entry]:
        """A probe's recipients that qmgr itself could not deliver (no route, the
        transport or destination suspended, the agent failed): their status goes to
        the verify service, as Postfix's qmgr_defer_recipient() with
        DEL_REQ_FLAG_MTA_VRFY, and they are done. Those the service could not be told
        about are returned, to be deferred as any other."""
        left = []
        for e in entries:
            told, status = verify_client.report_probe(
                self.cfg, (m.env.attrs.get(verify_client.ADDRESS_ATTR, ""), e.address),
                verify_client.RCPT_DEFER, reason)
            if not told:
                msg.warn(f"{m.queue_id}: "
                         f"{verify_client.client(self.cfg).service} service failure")
                left.append(e)
                continue
            deliver.log_delivery(m.queue_id, e.address, "none", m.env.arrival, m.started,
                                 dsn, status, reason, orig=e.original)
            if not m.gone and not self._mark_done(m, e):
                break
        return left

    def _job_done(self, job: Job, dsn: str, reason: str, log: bool) -> None:
        self._defer(job.message, job.entries, dsn, reason, log)
        self._release(job)

    def _job_failed(self, job: Job, dsn: str, reason: str) -> None:
        """Defer a job that never started (suspended destination or transport)."""
        self._job_done(job, dsn or "4.0.0", reason, log=True)

    def _release(self, job: Job) -> None:
        self._moved += 1
        m = job.message
        self.rcpt_count -= len(job.entries)
        m.pending -= 1
        if m.pending == 0:
            self._finish(m)

    def _throttle_transport(self, t: Transport, reason: str) -> None:
        """Suspend a transport whose agent failed; defer everything waiting for it."""
        now = self.now()
        if t.dead_until <= now:
            msg.warn(f"transport {t.name} failure -- see a previous warning/fatal/panic "
                     "logfile record for the problem description")
        t.dead_until = now + self.transport_retry
        t.dead_reason = reason
        self._later(self.transport_retry, self._pump)
        for dest in list(t.dests.values()):
            while dest.todo:
                self.waiting -= 1
                self._job_failed(dest.todo.popleft(), "4.3.0", reason)

    def _throttle_dest(self, dest: Destination, dsn: str, reason: str) -> None:
        """Suspend a destination that cannot be reached; defer what waits for it."""
        dest.dead_until = self.now() + self.min_backoff
        dest.dead_reason, dest.dead_dsn = reason, dsn
        dest.window = 1
        self._later(self.min_backoff, self._pump)
        while dest.todo:
            self.waiting -= 1
            self._job_failed(dest.todo.popleft(), dsn, SUSPENDED + reason)

    def _later(self, delay: float, fn) -> None:
        if self.loop is not None:
            self.loop.call_later(delay, fn)

    # --- the end of a pass -----------------------------------------------------------------
    def _finish(self, m: Message) -> None:
        """All jobs of a message are done: notify, then remove, defer or expire it."""
        if m.finished:
            return
        m.finished = True
        self.messages.pop(m.queue_id, None)
        self.probes -= m.probe
        if self.flow:
            self._left += 1
        if m.rescan:
            self._request_scan(Q.INCOMING)
        if m.gone:
            self._close_file(m)
            return
        qid, now = m.queue_id, self.now()
        # Only qmgr writes a message's bounce log, and not while it finishes the message:
        # looked for once, read and removed only when there is one (rarely).
        bounced = bounce_log.exists(self.root, BOUNCE, qid)
        # Marks made through the open file do not notice a file removed meanwhile
        # (postsuper -d), as marks by name did: before notices or a deferral, a look at
        # its link count; a plain removal learns it from unlink().
        marked = m.marked
        if marked and (bounced or m.deferred or self._success(m)) and \
                os.fstat(m.fd).st_nlink == 0:
            self._vanished(m)
        self._close_file(m)
        if m.gone:
            return
        retry = bool(m.deferred)
        traced = bounce_log.read(self.root, TRACE, qid) if m.report or self._success(m) \
            else []
        if traced:
            if self._report_success(m, traced, now):
                bounce_log.remove(self.root, TRACE, qid, likely=True)
                traced = None       # gone: not to be removed again below
            else:
                retry = True        # reported at the next pass (recipients are done)
        failed = bounce_log.read(self.root, BOUNCE, qid) if bounced else []
        if failed:
            if self._notify(m, failed, now):
                bounce_log.remove(self.root, BOUNCE, qid, likely=True)
                bounced = False     # gone
            else:
                retry = True
        if m.deferred:
            lifetime = self.max_lifetime if m.env.sender else self.bounce_lifetime
            if m.expire or now > m.env.arrival + lifetime:
                status = "force-expired" if m.expire else "expired"
                msg.info(f"{qid}: from=<{m.env.sender or ''}>, status={status}, "
                         "returned to sender")
                expired = [LogEntry(e.recipient, e.offset, e.status, "failed", e.reason,
                                    e.relay) for e in m.deferred]
                # a probe is never returned: it has no one to tell
                retry = not m.probe and not self._notify(m, expired, now)
            elif self.delay_warning and not m.env.warned and \
                    now >= m.env.arrival + self.delay_warning - 1:     # Postfix's slack
                self._warn(m, now)
        if retry:
            delay = min(self.max_backoff, max(self.min_backoff, now - m.env.arrival))
            try:
                os.utime(m.path, (now + delay, now + delay))
                os.rename(m.path, self._path(Q.DEFERRED, qid))
            except OSError as exc:
                msg.warn(f"{qid}: move from active to deferred: {exc.strerror}")
            return
        try:
            os.unlink(m.path)
        except OSError as exc:
            if marked and isinstance(exc, FileNotFoundError):
                self._vanished(m)
            else:
                msg.warn(f"{qid}: remove from active: {exc.strerror}")
            return
        if m.deferred:      # else there is none: entering active/ removed the last one
            bounce_log.remove(self.root, DEFER, qid, likely=True)
        if bounced:         # there, but without entries
            bounce_log.remove(self.root, BOUNCE, qid, likely=True)
        if m.success and traced is not None:
            bounce_log.remove(self.root, TRACE, qid)
        msg.info(f"{qid}: removed")

    def _close_file(self, m: Message) -> None:
        if m.fd >= 0:
            os.close(m.fd)
            m.fd = -1
            self._open -= 1

    def _warn(self, m: Message, now: float) -> None:
        """Send the delayed-mail warning for the deferred recipients, then record it."""
        try:
            sent = bounce.warn(self.cfg, self.root, m.queue_id, m.env, m.path, m.deferred,
                               now)
        except (OSError, Q.QueueFileError) as exc:
            msg.warn(f"{m.queue_id}: cannot send delayed mail notification: "
                     f"{getattr(exc, 'strerror', None) or exc}")
            return                      # the next pass tries again
        for kind, new_id in sent:
            msg.info(f"{m.queue_id}: {kind} delay notification: {new_id}")
        try:
            Q.mark_warned(m.path, m.env.arrival_offset)
            m.env.warned = True
        except FileNotFoundError:
            self._vanished(m)
        except (OSError, Q.QueueFileError) as exc:
            msg.warn(f"{m.queue_id}: update queue file {m.path}: "
                     f"{getattr(exc, 'strerror', None) or exc}")
        if sent:
            self._request_scan(Q.INCOMING)

    def _report_success(self, m: Message, entries: list[LogEntry], now: float) -> bool:
        """Send the success notice for NOTIFY=SUCCESS recipients; False to try again at
        the message's next pass (the trace log stays)."""
        try:
            sent = (bounce.report if m.report else bounce.success)(
                self.cfg, self.root, m.queue_id, m.env, m.path, entries, now)
        except (OSError, Q.QueueFileError) as exc:
            msg.warn(f"{m.queue_id}: cannot send delivery status notification: "
                     f"{getattr(exc, 'strerror', None) or exc}")
            return False
        for kind, new_id in sent:
            msg.info(f"{m.queue_id}: {kind} delivery status notification: {new_id}")
        if sent:
            self._request_scan(Q.INCOMING)
        return True

    def _notify(self, m: Message, entries: list[LogEntry], now: float) -> bool:
        """Send the notifications for failed recipients; False to try again later."""
        try:
            sent = bounce.notify(self.cfg, self.root, m.queue_id, m.env, m.path, entries, now)
        except (OSError, Q.QueueFileError) as exc:
            msg.warn(f"{m.queue_id}: cannot send non-delivery notification: "
                     f"{getattr(exc, 'strerror', None) or exc}")
            return False
        for kind, new_id in sent:
            msg.info(f"{m.queue_id}: {kind} non-delivery notification: {new_id}")
        if sent:
            self._request_scan(Q.INCOMING)
        return True


def _filter_route(spec: str, rcpt: str, default_nexthop: str, myhostname: str):
    """A content filter's route, bypassing the resolver as Postfix's qmgr: the
    transport:destination of the message's content_filter (lib/cleanup.py, a
    content_filter setting or a FILTER action); without a destination,
    default_filter_nexthop, and when that is empty the recipient's domain, else
    $myhostname (qmgr_message.c)."""
    transport, _, nexthop = spec.partition(":")
    if not nexthop:
        _, at, domain = rcpt.rpartition("@")
        nexthop = default_nexthop.strip() or (domain if at else "") or myhostname
    return Route(transport, nexthop)


def _id_ok(name: str) -> bool:
    """A plausible queue id: letters, digits and _, as Postfix's mail_queue_id_ok."""
    return _ID.fullmatch(name) is not None


def _listdir(path: str) -> list[str]:
    """The names in a queue directory, dot-files (files being written) excluded."""
    try:
        with os.scandir(path) as it:
            return [e.name for e in it if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        msg.warn(f"scan {path}: {exc.strerror}")
        return []
