"""Counters that postfix-py's daemons bump, and the JSON event log; read by the metrics service.

SYNOPSIS
    from postfix_py.lib import metrics

    metrics.worker_start(ctx)                  # lib/server.py, once per forked worker
    metrics.smtpd_connect()                    # one line at each place that counts
    metrics.tls_server(info)

DESCRIPTION
    Workers are forked processes, many of them short-lived, most of them chrooted: no one
    of them can hold the counters of the host. prometheus_client's multiprocess format
    is made for this: each process writes its values into memory-mapped files of its
    own in one directory, and the metrics service (metrics/service.py) sums the files
    at each scrape.

    A counting function adds to a dict of this process (_pending); flush() writes the
    sums into the mapped files. One prometheus_client increment costs about 14,000
    instructions (its lock, its fork check, a struct.pack_into), a plain SMTP session
    about 1.3 million, and a busy smtpd made eight per session: so writes wait, and a
    worker flushes at most once a second: between clients (lib/server.py, which also
    wakes an idle worker for it), after each message or delivery once the last flush is a
    second old, and when it exits (single_server's and multi_server's clean-up). A scrape
    therefore sees a count at most about a second late, and only a worker killed outright
    (SIGKILL, a crash) loses the counts of its last second.

    Each worker writes into the files of a free slot (counter_slotN.db,
    histogram_slotN.db), adding to what the slot's earlier holders wrote (open_files()).

    The files live on tmpfs, in /dev/shm/postfix-py-metrics.HASH (directory(): HASH
    names the queue_directory, so that instances do not mix), mail_owner's (0700),
    removed by the master when it starts and ends (counters start at zero with the
    master, as Postfix's own counters in its logs do), and made when it has a metrics
    service (collecting()). Not in the queue's file system: creating and first writing
    a mapped file there cost a worker about 3 ms of system time on ext4, on tmpfs a tenth
    of it, and a busy host starts a dozen workers a second. Being outside the jail, a
    worker's files are opened when it starts, before its chroot and privilege drop, as
    mail_owner's (open_files(), called by lib/server.py); the metrics service runs
    unjailed.

    Importing this module sets prometheus_client's value class to _MappedValue, which
    keeps values in those open files (prometheus_client's own multiprocess class opens
    its file at the first increment, by path, and checks the pid at each one); every
    metric here has labels, so that no value exists before a worker counts.

    Counting costs nothing when nobody reads it: the master calls collecting(on) with
    whether master.cf has a metrics service, at start and at each reload, before it forks
    that generation's workers, and a worker counts only when its master said so. The
    JSON event log does not depend on it.

    Every function here is safe to call anywhere: in a process that worker_start() has not
    set up (the master, a command-line tool, a unit test) it does nothing, and a failure
    to write (a full file system, a directory the process may not write) disables the
    counters of that process with one warning; it never raises into a mail session.

    Metric names are prometheus-postfix-exporter's where they count the same thing
    (postfix_smtpd_connects_total, postfix_smtpd_messages_processed_total,
    postfix_smtpd_messages_rejected_total, postfix_smtpd_sasl_authentication_failures_total,
    postfix_smtpd_tls_connections_total, postfix_smtp_tls_connections_total,
    postfix_smtp_delivery_delay_seconds, postfix_lmtp_delivery_delay_seconds), so that
    its dashboards work; each also has a `service` label (the master.cf service name),
    which sums away. The TLS connection counters have a `session` label, full or resumed.
    The per-destination ones (postfix_smtp_tls_destination_outcomes_total,
    postfix_smtp_tls_history_changes_total) have a `destination` label, the next hop: one
    series per destination and outcome, as many as the destinations the host sends to
    with TLS.

JSON EVENT LOG
    With tls_event_log = /path (a postfix-py extension), each worker opens the file for
    appending before its chroot and writes one JSON object per line, with one write(2)
    each: "event" is "tls" (a finished handshake, server or client side), "tls_failure"
    (a failed server handshake, with what the client offered), or "delivery".

FUNCTIONS
    directory(queue_root) - where the counter files of that instance are.
    remove_directory(queue_root) - the master, at its start and end.
    collecting(on, queue_root, owner_pw) - the master, per configuration generation:
        whether its workers count (master.cf has a metrics service); makes the directory.
    worker_start(ctx) - in each worker before the chroot: service name, event log;
        counting() says whether it counts, and then open_files(queue_root) opens its
        files (as mail_owner, before the chroot).
    smtpd_connect(), smtpd_session_end(counts), smtpd_reject(stage, reply),
    smtpd_restriction(restriction, code), smtpd_message(sasl_method), smtpd_auth(method,
    ok), tls_server(info), tls_server_failure(client, reason, offer), tls_client(info,
    destination, level), tls_history_change(destination, change), delivery(rcpt, relay,
    status, dsn, delay, stages).
    flush() - write what this process has counted into its files (lib/server.py).
    flush_due() - seconds until a flush is due, or None with nothing pending.
    COLLECTED: the metric objects, for the metrics service's help text.

SEE ALSO
    metrics/service.py; prometheus_client multiprocess mode; prometheus-postfix-exporter.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time

from prometheus_client import Counter, Histogram
from prometheus_client import values as _values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from . import msg

SHM = "/dev/shm"            # tmpfs on Linux; without it, the queue directory
MAX_LABEL = 64              # longest label value: bounded series, whatever a peer sends
MAX_EVENT = 16384           # longest JSON event line
FLUSH_INTERVAL = 1.0        # seconds between writes of a process's counts to its files
MAX_SLOTS = 100000          # counter files: far beyond any process limit

_files: dict = {}            # "counter", "histogram" -> this worker's MmapedDict


class _MappedValue:
    """One value of a metric child, kept in this process's file of its type (the
    interface prometheus_client's metrics expect of values.ValueClass)."""

    _multiprocess = True

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text,
                 multiprocess_mode="", **kwargs):
        self._file = _files[typ]            # KeyError without open_files(): flush() fails
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._value = self._file.read_value(self._key)[0]

    def inc(self, amount) -> None:
        self._value += amount
        self._file.write_value(self._key, self._value, 0.0)

    def set(self, value, timestamp=None) -> None:
        self._value = value
        self._file.write_value(self._key, value, timestamp or 0.0)

    def get(self):
        return self._value

    def set_exemplar(self, exemplar) -> None:
        pass

    def get_exemplar(self):
        return None


# Every metric of this module has labels, so that no value exists before a worker
# increments one; the master never does.
_values.ValueClass = _MappedValue

_DELAY_BUCKETS = (1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3)         # postfix_exporter's
_TOTAL_DELAY_BUCKETS = (0.1, 0.5, 1, 5, 10, 60, 300, 3600, 86400, 432000)

SMTPD_CONNECTS = Counter("postfix_smtpd_connects", "Total number of incoming connections.",
                         ["service"], registry=None)
SMTPD_DISCONNECTS = Counter("postfix_smtpd_disconnects",
                            "Total number of incoming disconnections.", ["service"],
                            registry=None)
SMTPD_COMMANDS = Counter("postfix_smtpd_commands", "SMTP commands received, by result.",
                         ["service", "command", "result"], registry=None)
SMTPD_PROCESSED = Counter("postfix_smtpd_messages_processed",
                          "Total number of messages processed.", ["service", "sasl_method"],
                          registry=None)
SMTPD_REJECTS = Counter("postfix_smtpd_messages_rejected", "Total number of NOQUEUE rejects.",
                        ["service", "code", "stage"], registry=None)
SMTPD_RESTRICTIONS = Counter("postfix_smtpd_restriction_rejects",
                             "Rejects and deferrals by the restriction that decided.",
                             ["service", "restriction", "code"], registry=None)
SMTPD_SASL_FAILURES = Counter("postfix_smtpd_sasl_authentication_failures",
                              "Total number of SASL authentication failures.",
                              ["service", "method"], registry=None)
SMTPD_SASL_SUCCESSES = Counter("postfix_smtpd_sasl_authentication_successes",
                               "Total number of SASL authentication successes.",
                               ["service", "method"], registry=None)
_TLS_LABELS = ["service", "trust", "protocol", "cipher", "secret_bits", "algorithm_bits",
               "session"]
SMTPD_TLS = Counter("postfix_smtpd_tls_connections", "Total number of incoming TLS "
                    "connections (session: full or resumed handshake).", _TLS_LABELS,
                    registry=None)
SMTPD_TLS_FAILURES = Counter("postfix_smtpd_tls_handshake_failures",
                             "Failed server TLS handshakes, by reason.",
                             ["service", "reason"], registry=None)
SMTP_TLS = Counter("postfix_smtp_tls_connections", "Total number of outgoing TLS "
                   "connections (session: full or resumed handshake).", _TLS_LABELS,
                   registry=None)
SMTP_TLS_DESTINATIONS = Counter(
    "postfix_smtp_tls_destination_outcomes", "Outgoing TLS handshakes by next hop: "
    "security level in force, peer verified or not, session full or resumed.",
    ["destination", "level", "verified", "session"], registry=None)
SMTP_TLS_HISTORY_CHANGES = Counter(
    "postfix_smtp_tls_history_changes", "Unexpected changes of a next hop's TLS "
    "(lib/tls_history.py): plaintext after TLS, a certificate of another issuer or of a "
    "lower status, a lower status.", ["destination", "change"], registry=None)
DELIVERIES = Counter("postfix_deliveries", "Delivery attempts by transport, status and DSN "
                     "class (2, 4 or 5).", ["transport", "status", "dsn_class"], registry=None)
DELIVERY_DELAY = Histogram("postfix_delivery_delay_seconds", "Time from arrival to the end "
                           "of the delivery attempt.", ["transport", "status"],
                           buckets=_TOTAL_DELAY_BUCKETS, registry=None)
SMTP_STAGES = Histogram("postfix_smtp_delivery_delay_seconds",
                        "SMTP message processing time in seconds.", ["stage"],
                        buckets=_DELAY_BUCKETS, registry=None)
LMTP_STAGES = Histogram("postfix_lmtp_delivery_delay_seconds",
                        "LMTP message processing time in seconds.", ["stage"],
                        buckets=_DELAY_BUCKETS, registry=None)
_STAGE_NAMES = ("before_queue_manager", "queue_manager", "connection_setup", "transmission")

COLLECTED = (SMTPD_CONNECTS, SMTPD_DISCONNECTS, SMTPD_COMMANDS, SMTPD_PROCESSED,
             SMTPD_REJECTS, SMTPD_RESTRICTIONS, SMTPD_SASL_FAILURES, SMTPD_SASL_SUCCESSES,
             SMTPD_TLS, SMTPD_TLS_FAILURES, SMTP_TLS, SMTP_TLS_DESTINATIONS,
             SMTP_TLS_HISTORY_CHANGES, DELIVERIES,
             DELIVERY_DELAY, SMTP_STAGES, LMTP_STAGES)


class _State:
    collect = False         # the master's word: a metrics service reads the counters
    enabled = False         # counters: set by worker_start, cleared after a write error
    service = ""
    program = ""
    event_fd = -1           # tls_event_log, opened before the chroot
    event_path = ""
    pid = 0                 # the worker's: a forked child never writes its parent's counts
    slot_fd = -1            # the flock that makes a slot's files this worker's
    flush_at = 0.0          # time.monotonic() when the next flush may run


_state = _State()


# --- set-up ------------------------------------------------------------------------------

def directory(queue_root: str) -> str:
    """The counter files' directory of the instance whose queue is queue_root."""
    if not os.path.isdir(SHM):
        return os.path.join(queue_root, "metrics")
    digest = hashlib.sha256(os.path.realpath(queue_root).encode()).hexdigest()[:16]
    return os.path.join(SHM, f"postfix-py-metrics.{digest}")


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)         # never follows a symbolic link inside
    else:
        os.unlink(path)             # a file or symbolic link someone put there


def collecting(on: bool, queue_root: str | None = None, owner_pw=None) -> None:
    """In the master, at start and at each reload, before it forks that generation's
    workers: whether they count (master.cf has a metrics service); with on, the directory
    of queue_root is made (mode 0700, owned by mail_owner) unless it is there. Forked
    workers inherit the value."""
    _state.collect = bool(on)
    if not on or queue_root is None:
        return
    path = directory(queue_root)
    uid = owner_pw.pw_uid if owner_pw is not None else os.geteuid()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        _remove(path)                   # not ours: a link, a file, another user's
        os.mkdir(path, 0o700)           # fails rather than follow a link put there
        if owner_pw is not None:
            os.chown(path, owner_pw.pw_uid, owner_pw.pw_gid)
        os.chmod(path, 0o700)


def remove_directory(queue_root: str) -> None:
    """The master starts, or ends: the counts of another life go. In world-writable
    /dev/shm the name is predictable: whatever is there is removed, never followed."""
    try:
        _remove(directory(queue_root))
    except OSError as exc:
        msg.warn(f"metrics: cannot remove {directory(queue_root)}: {exc.strerror}")


def worker_start(ctx) -> None:
    """Set up a freshly forked worker: what it counts as, and its event log (before the
    chroot); then the caller opens its files with open_files() if counting()."""
    _state.service = ctx.service.name
    _state.program = ctx.program
    _state.enabled = False
    _state.pid = os.getpid()
    _pending.clear()
    _sessions.clear()
    _files.clear()
    _state.slot_fd = -1     # a parent's, if any, closes on exec; never ours to unlock
    _state.event_fd = -1
    path = ctx.cfg.get("tls_event_log") if hasattr(ctx.cfg, "get") else ""
    if path:
        _state.event_path = path
        try:
            _state.event_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                      | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            msg.warn(f"cannot open tls_event_log {path}: {exc.strerror}")


def counting() -> bool:
    """Whether this worker's master has a metrics service (its files are to be opened)."""
    return _state.collect


def open_files(queue_root: str) -> None:
    """Open this worker's counter and histogram files (lib/server.py: before the chroot,
    with mail_owner's effective ids, so that they are mail_owner's, whom the metrics
    service runs as); counting starts. A failure leaves this worker without counters.

    The files are a slot's, not a pid's: the first counter_slotN.db whose flock no live
    process holds (the lock goes with its holder, however it ends). A worker adds to what
    the slot's earlier holders wrote, so the files stay as many as the workers alive at
    once, whether or not anyone scrapes them; on tmpfs, files per pid would pile up in
    memory for as long as nobody did."""
    path = directory(queue_root)
    try:
        for slot in range(MAX_SLOTS):
            name = os.path.join(path, f"counter_slot{slot}.db")
            # created here, 0600: MmapedDict would make it with the umask's mode
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _state.slot_fd = fd                 # held for life: the slot is ours
            break
        else:
            raise OSError(f"all {MAX_SLOTS} slots in {path} are taken")
        hist = os.path.join(path, f"histogram_slot{slot}.db")
        os.close(os.open(hist, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        _files["counter"], _files["histogram"] = MmapedDict(name), MmapedDict(hist)
    except (OSError, ValueError) as exc:
        _files.clear()
        msg.warn(f"metrics disabled in this process: {exc}")
        return
    _state.enabled = True


def _failed(exc: Exception) -> None:
    """Counters cannot be written in this process: say so once, stop trying."""
    _state.enabled = False
    _pending.clear()
    _sessions.clear()
    msg.warn(f"metrics disabled in this process: {exc}")


def _label(text) -> str:
    """A bounded, printable label value."""
    return msg.printable(str(text), limit=None)[:MAX_LABEL] if text else ""


_children: dict = {}        # (metric, labels) -> child: labels() costs as much as inc()

# (metric, labels) -> what is not yet in the files: a counter's amount, or a histogram's
# [sum, count per bucket] (prometheus_client's buckets are stored per bucket, not
# cumulated, and its Histogram keeps them as _sum and _buckets over _upper_bounds).
_pending: dict = {}
_sessions: list = []        # smtpd: each ended session's {verb: [good, all]}


def _child(metric, labels: tuple):
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def _inc(metric, *labels, amount: float = 1) -> None:
    if _state.enabled:
        key = (metric, labels)
        _pending[key] = _pending.get(key, 0) + amount


def _tick() -> None:
    """Flush if the last flush is a second old: once per message, so that a long session
    does not hold its counts (between clients lib/server.py flushes)."""
    if time.monotonic() >= _state.flush_at:
        flush()


def _observe(metric, value: float, *labels) -> None:
    if not _state.enabled:
        return
    key = (metric, labels)
    entry = _pending.get(key)
    if entry is None:
        entry = _pending[key] = [0.0, [0] * len(metric._upper_bounds)]
    entry[0] += value
    entry[1][bisect.bisect_left(metric._upper_bounds, value)] += 1   # first bound >= value


def flush() -> None:
    """Write this process's pending counts into its files."""
    _state.flush_at = time.monotonic() + FLUSH_INTERVAL
    if not _pending:
        return
    sessions = list(_sessions)
    pending = list(_pending.items())
    _sessions.clear()
    _pending.clear()
    if not _state.enabled or os.getpid() != _state.pid:
        return
    verbs: dict = {}                    # verb -> [good, all], over the ended sessions
    for counts in sessions:
        for verb, (good, total) in counts.items():
            sums = verbs.setdefault(verb, [0, 0])
            sums[0] += good
            sums[1] += total
    for verb, (good, total) in verbs.items():
        for result, amount in (("ok", good), ("error", total - good)):
            if amount:
                pending.append(((SMTPD_COMMANDS, (_state.service, _label(verb), result)),
                                amount))
    try:
        for (metric, labels), amount in pending:
            child = _child(metric, labels)
            if isinstance(amount, list):
                child._sum.inc(amount[0])
                for bucket, count in zip(child._buckets, amount[1]):
                    if count:
                        bucket.inc(count)
            else:
                child.inc(amount)
    except Exception as exc:    # noqa: BLE001 - counting never costs a mail session
        _failed(exc)


def flush_due() -> float | None:
    """Seconds until this process's pending counts are to be written (0: now); None when
    there are none."""
    if not _pending:
        return None
    return max(0.0, _state.flush_at - time.monotonic())


def _event(kind: str, fields: dict) -> None:
    """One line of the JSON event log, written with one write(2)."""
    if _state.event_fd < 0:
        return
    record = {"time": round(time.time(), 6), "event": kind, "service": _state.service,
              "program": _state.program, "pid": os.getpid(), **fields}
    line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    if len(line) >= MAX_EVENT:         # a peer's offer of thousands of names: drop lists
        record = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
        record["truncated"] = True
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
    try:
        os.write(_state.event_fd, (line + "\n").encode("ascii"))
    except OSError as exc:
        msg.warn(f"tls_event_log {_state.event_path}: {exc.strerror}; log disabled")
        os.close(_state.event_fd)
        _state.event_fd = -1


# --- smtpd -------------------------------------------------------------------------------

def smtpd_connect() -> None:
    """A client connected."""
    _inc(SMTPD_CONNECTS, _state.service)


def smtpd_session_end(counts: dict) -> None:
    """A client session ended; counts is the session's {verb: [good, all]}."""
    if not _state.enabled:
        return
    # Kept as the session counted them (the session is over: nothing changes them);
    # flush() sums them into the ok/error series.
    _sessions.append(counts)
    _inc(SMTPD_DISCONNECTS, _state.service)


def smtpd_reject(stage: str, reply) -> None:
    """A logged reject (Postfix's "reject: STAGE from ..." line)."""
    code = str(reply)[:3]
    _inc(SMTPD_REJECTS, _state.service, code if code.isdigit() else "", _label(stage))


def smtpd_restriction(restriction: str, code: int) -> None:
    """A restriction decided to reject (or defer) with code."""
    _inc(SMTPD_RESTRICTIONS, _state.service, _label(restriction), str(code))


def smtpd_message(sasl_method: str | None) -> None:
    """A message was queued."""
    if _state.enabled:
        _inc(SMTPD_PROCESSED, _state.service, _label(sasl_method) if sasl_method else "")
        _tick()


def smtpd_auth(method: str, ok: bool) -> None:
    """An AUTH exchange ended."""
    _inc(SMTPD_SASL_SUCCESSES if ok else SMTPD_SASL_FAILURES, _state.service, _label(method))


# --- TLS ---------------------------------------------------------------------------------

def _tls_labels(info) -> tuple:
    return (_state.service, info.status, _label(info.protocol), _label(info.cipher_name),
            str(info.cipher_usebits), str(info.cipher_algbits),
            "resumed" if info.session_reused else "full")


def _tls_fields(info) -> dict:
    return {"role": info.role, "peer": info.namaddr, "protocol": info.protocol,
            "cipher": info.cipher_name, "bits": info.cipher_usebits,
            "resumed": bool(info.session_reused), "trust": info.status,
            "verified": bool(info.peer_verified), "sni": info.peer_sni or None,
            "peer_cn": info.peer_CN or None, "issuer_cn": info.issuer_CN or None,
            "fingerprint": info.peer_fingerprint or None}


def tls_server(info) -> None:
    """smtpd finished a handshake (lib.tls.TLSInfo)."""
    # the labels and fields only when something takes them (most hosts: nothing)
    if _state.enabled:
        _inc(SMTPD_TLS, *_tls_labels(info))
    if _state.event_fd >= 0:
        _event("tls", _tls_fields(info))


def tls_server_failure(client: str, reason: str, offer: dict | None) -> None:
    """smtpd's handshake failed; offer is what the client's ClientHello said (or None)."""
    _inc(SMTPD_TLS_FAILURES, _state.service, _label(reason))
    _event("tls_failure", {"role": "server", "peer": client, "reason": reason,
                           "offer": offer})


def tls_client(info, destination: str, level: str) -> None:
    """The smtp client finished a handshake with a server of destination, at level."""
    if _state.enabled:
        _inc(SMTP_TLS, *_tls_labels(info))
        session = "resumed" if info.session_reused else "full"
        _inc(SMTP_TLS_DESTINATIONS, _label(destination), _label(level),
             "yes" if info.peer_verified else "no", session)
    if _state.event_fd >= 0:
        _event("tls", {**_tls_fields(info), "destination": destination, "level": level})


def tls_history_change(destination: str, change: str) -> None:
    """The smtp client warned of an unexpected TLS change at a server of destination
    (change: plaintext, certificate or status; lib/tls_history.py)."""
    _inc(SMTP_TLS_HISTORY_CHANGES, _label(destination), _label(change))


# --- deliveries --------------------------------------------------------------------------

def delivery(queue_id: str, rcpt: str, relay: str, status: str, dsn: str, delay: float,
             stages: tuple) -> None:
    """A delivery attempt was logged (lib/deliver.log_delivery's line)."""
    if _state.enabled:
        transport = _state.service
        _inc(DELIVERIES, transport, _label(status), dsn[:1] if dsn[:1] in "245" else "")
        _observe(DELIVERY_DELAY, delay, transport, _label(status))
        stage_metric = {"smtp": SMTP_STAGES, "lmtp": LMTP_STAGES}.get(_state.program)
        if stage_metric is not None:
            for name, value in zip(_STAGE_NAMES, stages):
                _observe(stage_metric, value, name)
        _tick()
    if _state.event_fd >= 0:        # the record is not built for a log that is off
        _event("delivery", {"queue_id": queue_id, "to": rcpt, "relay": relay, "dsn": dsn,
                            "status": status, "delay": round(delay, 3),
                            "delays": [round(s, 3) for s in stages]})
