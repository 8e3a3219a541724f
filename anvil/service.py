"""anvil - session count and request rate control.

SYNOPSIS
    anvil unix  -  -  y  -  1  anvil        (master.cf; run by the master)

DESCRIPTION
    The anvil server keeps, for each (service, client) pair, the number of simultaneous
    connections and the rates of connections, messages (MAIL FROM), recipients (RCPT TO),
    new TLS sessions and AUTH commands; it is postfix-py's counterpart of Postfix's
    anvil(8). smtpd reports each event and enforces its own smtpd_client_*_limit
    parameters with the numbers anvil returns (lib/anvil_client.py, smtpd/limits.py);
    anvil itself limits nothing. One process serves every smtpd worker from one event
    loop over private/anvil; each worker keeps one connection for its whole life.

    A (service, client) pair is named by an ident, `service:address` as Postfix writes it
    (`smtp:192.0.2.1`; an inet service without a name is `127.0.0.1:2525`, so that ident is
    `127.0.0.1:2525:192.0.2.1`). Every request is one frame (DESIGN.md) with exactly the
    attributes `request` and `ident`; every reply carries `status` (0 ok, 2 bad request,
    3 server error, with `reason` when not 0) and the numbers below, ASCII decimal:

    request=connect         count, rate     register a connection (count and rate go up)
    request=disconnect      (status only)   the connection that this anvil client last
                                            registered for ident has ended
    request=message         rate            register a message delivery request
    request=recipient       rate            register a recipient
    request=newtls          rate            register a new (not resumed) TLS session
    request=newtls_status   rate            the new TLS session rate, not counting
    request=auth            rate            register an AUTH command
    request=lookup          count, rate, mail, rcpt, newtls, auth   everything, unchanged

    As in Postfix, rates are plain counters that start over when a request arrives more
    than anvil_rate_time_unit after the first event of the current count (simpler than a
    moving average, and quicker to catch a trespasser). An anvil client registers one
    client connection at a time: a new connect from the same anvil client ends the
    previous one, and when an anvil client goes away (an smtpd worker exits or dies) its
    registered connection ends with it. An entry without connections is forgotten
    anvil_rate_time_unit after its last disconnect (checked every half unit, 30s at most).

    A bad frame, a missing, repeated or unknown attribute, an unknown request or an ident
    that is empty, longer than MAX_IDENT bytes or not printable ASCII gets status 2 and
    one warning per connection; a bad length prefix also closes the connection. When the
    table holds MAX_REMOTES entries, a request for a new ident gets status 3 (smtpd then
    goes on without a limit for it) and a warning at most once a minute.

DIAGNOSTICS
    Every anvil_status_update_time, and when anvil exits, the peak values since the last
    report are logged, as Postfix does:

    statistics: max connection rate 3/60s for (smtp:192.0.2.1) at Dec  5 10:00:00
    statistics: max connection count 2 for (smtp:192.0.2.1) at Dec  5 10:00:00
    statistics: max message rate, max recipient rate, max newtls rate, max auth rate
    statistics: max cache size 7 at Dec  5 10:00:00

SECURITY
    anvil talks only to local clients over private/anvil (access is controlled by the
    private/ directory). It runs chrooted in queue_directory as mail_owner and opens
    nothing. Its state is in memory only, bounded by MAX_REMOTES entries and, per client,
    one incomplete frame and OUTPUT_HIGH bytes of unread replies.

CONFIGURATION PARAMETERS
    anvil_rate_time_unit (60s)       the time unit over which rates are counted
    anvil_status_update_time (600s)  how often peak usage is logged
    ipc_timeout (3600s)              how long a client may leave a frame unfinished or
                                     replies unread before it is disconnected
    syslog_name, syslog_facility, maillog_file   where log lines go

FILES
    $queue_directory/private/anvil   the service socket

SEE ALSO
    lib/anvil_client.py (the client side), smtpd/limits.py (enforcement), lib/attr.py
    (framing), lib/frame_server.py (the request loop); Postfix anvil(8), smtpd(8).

HOOKS
    AnvilTable(time_unit, clock=time.monotonic, wallclock=time.time) is the pure counter
    table (unit tests drive it with their own clock). Anvil(cfg, clock, wallclock) has the
    multi-client skeleton's hooks: post_init(loop), on_client(conn, loop), client_count(),
    on_exit(); main(ctx) runs it under the master through lib/server.multi_server.
"""

from __future__ import annotations

import functools
import socket
import time

from postfix_py.lib import attr, frame_server, maincf, msg, server

MAX_IDENT = 512             # bytes of one ident: a service name, ':' and an address
MAX_REMOTES = 100_000       # (service, client) entries kept at most
FULL_WARN_INTERVAL = 60.0   # at most one "table full" warning per interval
INT_MAX = 2**31 - 1         # counters stop here, as Postfix's ints

RATES = ("rate", "mail", "rcpt", "ntls", "auth")
# statistics lines, in Postfix's order: (counter, name in the line, rate or count)
REPORTS = (("rate", "connection", True), ("count", "connection", False),
           ("mail", "message", True), ("rcpt", "recipient", True),
           ("ntls", "newtls", True), ("auth", "auth", True))


class TableFull(Exception):
    """No room for another (service, client) entry."""


class Remote:
    """The counters of one (service, client) pair."""

    __slots__ = ("ident", "count", "rate", "mail", "rcpt", "ntls", "auth", "start")

    def __init__(self, ident: str, now: float):
        self.ident = ident
        self.count = 1          # a new entry is made by a connection (Postfix's FIRST_CONN)
        self.rate = 1
        self.mail = self.rcpt = self.ntls = self.auth = 0
        self.start = now        # time of the first event of the current rate counts

    def reset_rates(self, start: float | None) -> None:
        """Start the rate counts over (start None: stale counts, nothing new yet)."""
        self.rate = self.mail = self.rcpt = self.ntls = self.auth = 0
        self.start = start


class Local:
    """What anvil knows of one of its clients: the connection it registered last."""

    __slots__ = ("remote", "warned")

    def __init__(self):
        self.remote: Remote | None = None
        self.warned = False     # one warning per connection, however bad it gets


class AnvilTable:
    """The (service, client) table with Postfix anvil's counting rules."""

    def __init__(self, time_unit: float, clock=time.monotonic, wallclock=time.time,
                 max_remotes: int = MAX_REMOTES):
        self.unit = time_unit
        self.clock, self.wallclock = clock, wallclock
        self.max_remotes = max_remotes
        self.remotes: dict[str, Remote] = {}
        self.idle: dict[str, float] = {}    # ident -> when its count fell to 0, oldest first
        self.peaks: dict[str, tuple[int, str, float]] = {}   # counter -> (value, ident, when)
        self.peak_cache = (0, 0.0)          # (size, when)

    # --- the rules ---------------------------------------------------------------------
    def _stale(self, remote: Remote, now: float) -> bool:
        return remote.start is not None and now > remote.start + self.unit

    def _incr(self, remote: Remote, what: str) -> int:
        """Count one event (starting the counts over when they are stale); the new rate."""
        now = self.clock()
        if remote.start is None or self._stale(remote, now):
            remote.reset_rates(now)
        value = getattr(remote, what)
        if value < INT_MAX:
            value += 1
            setattr(remote, what, value)
        self._peak(what, value, remote.ident)
        return value

    def _peak(self, what: str, value: int, ident: str) -> None:
        if value > self.peaks.get(what, (0,))[0]:
            self.peaks[what] = (value, ident, self.wallclock())

    def _conn_update(self, local: Local, ident: str) -> Remote:
        """Register a connection for ident and link it to local (Postfix conn_update)."""
        remote = self.remotes.get(ident)
        if remote is None:
            if len(self.remotes) >= self.max_remotes:
                self.expire()
                if len(self.remotes) >= self.max_remotes:
                    raise TableFull(f"table full ({self.max_remotes} entries)")
            remote = self.remotes[ident] = Remote(ident, self.clock())
            self._peak("rate", 1, ident)
            if len(self.remotes) > self.peak_cache[0]:
                self.peak_cache = (len(self.remotes), self.wallclock())
        else:
            self._incr(remote, "rate")
            if remote.count == 0:
                self.idle.pop(ident, None)
            remote.count += 1
        # One registered connection per anvil client: a new one ends the previous one.
        if local.remote is not None:
            self._drop_one(local.remote)
        local.remote = remote
        self._peak("count", remote.count, ident)
        return remote

    def _drop_one(self, remote: Remote) -> None:
        if remote.count > 0:
            remote.count -= 1
            if remote.count == 0:
                self.idle.pop(remote.ident, None)     # keep the dict in time order
                self.idle[remote.ident] = self.clock()

    # --- requests ----------------------------------------------------------------------
    def connect(self, local: Local, ident: str) -> tuple[int, int]:
        """Register a connection; return (count, rate)."""
        remote = self._conn_update(local, ident)
        return remote.count, remote.rate

    def disconnect(self, local: Local, ident: str) -> None:
        """End local's connection for ident, when that is the one it registered."""
        remote = self.remotes.get(ident)
        if remote is not None and local.remote is remote:
            self._drop_one(remote)
            local.remote = None

    def event(self, local: Local, ident: str, what: str) -> int:
        """Count a message, recipient, new TLS session or AUTH (what: mail, rcpt, ntls,
        auth); return its rate. An unknown ident (anvil restarted) counts as connected."""
        remote = self.remotes.get(ident)
        if remote is None:
            remote = self._conn_update(local, ident)
        return self._incr(remote, what)

    def _fresh(self, ident: str) -> Remote | None:
        """The entry for ident with stale rates zeroed, without counting anything."""
        remote = self.remotes.get(ident)
        if remote is not None and self._stale(remote, self.clock()):
            remote.reset_rates(None)
        return remote

    def newtls_status(self, ident: str) -> int:
        """The new TLS session rate, not counting."""
        remote = self._fresh(ident)
        return remote.ntls if remote is not None else 0

    def lookup(self, ident: str) -> dict[str, int]:
        """Every counter of ident (zeros for an unknown one)."""
        remote = self._fresh(ident)
        if remote is None:
            return dict.fromkeys(("count", "rate", "mail", "rcpt", "newtls", "auth"), 0)
        return {"count": remote.count, "rate": remote.rate, "mail": remote.mail,
                "rcpt": remote.rcpt, "newtls": remote.ntls, "auth": remote.auth}

    def drop_local(self, local: Local) -> None:
        """An anvil client went away: end the connection it had registered."""
        if local.remote is not None:
            self._drop_one(local.remote)
            local.remote = None

    def expire(self) -> int:
        """Forget entries idle for a time unit or more; return how many."""
        limit = self.clock() - self.unit
        gone = 0
        for ident, since in list(self.idle.items()):
            if since > limit:
                break               # insertion order is time order
            del self.idle[ident]
            if self.remotes[ident].count == 0:
                del self.remotes[ident]
                gone += 1
        return gone

    def report(self) -> list[str]:
        """The statistics lines of the peaks since the last report; start the peaks over."""
        lines = []
        unit = int(self.unit)
        for what, name, is_rate in REPORTS:
            value, ident, when = self.peaks.pop(what, (0, "", 0.0))
            if value > 0:
                amount = f"rate {value}/{unit}s" if is_rate else f"count {value}"
                lines.append(f"statistics: max {name} {amount} for ({ident}) at {_stamp(when)}")
        size, when = self.peak_cache
        if size > 0:
            lines.append(f"statistics: max cache size {size} at {_stamp(when)}")
            self.peak_cache = (0, 0.0)
        return lines


def _stamp(when: float) -> str:
    """Time of day as Postfix prints it here: ctime() without weekday and year."""
    return time.strftime("%b %e %H:%M:%S", time.localtime(when))


# --- the server ------------------------------------------------------------------------

def _reply(status: str, reason: str | None = None, **numbers: int) -> bytes:
    """Encode a reply frame: status, reason (when given), then the numbers."""
    attrs: dict[str, object] = {"status": status}
    if reason is not None:
        attrs["reason"] = reason
    attrs.update(numbers)
    return attr.encode(attrs)


_OK = _reply(attr.STATUS_OK)
_REQUEST_ATTRS = frozenset({"request", "ident"})


class _Client(frame_server.FrameClient):
    """One anvil client connection (an smtpd worker), with the connection it registered."""

    __slots__ = ("remote",)

    def __init__(self, sock: socket.socket, now: float):
        super().__init__(sock, now)
        self.remote: Remote | None = None


class Anvil(frame_server.FrameServer):
    """The anvil service, shaped for the multi-client skeleton's hooks."""

    RECV_SIZE = 16384           # bytes read from a client per readiness event
    OUTPUT_HIGH = 64 * 1024     # stop reading from a client with this much unsent
    OUTPUT_LOW = 16 * 1024      # ... and start again below this
    client_class = _Client

    def __init__(self, cfg, clock=time.monotonic, wallclock=time.time):
        """Read the parameters; ConfigError (from cfg) when one is unusable."""
        self.table = AnvilTable(cfg["anvil_rate_time_unit"], clock, wallclock)
        self.status_time = cfg["anvil_status_update_time"]
        super().__init__(cfg["ipc_timeout"], clock)
        self._full_warned: float | None = None
        self._handlers = {
            b"connect": self._connect,
            b"disconnect": self._disconnect,
            b"message": functools.partial(self._event, "mail"),
            b"recipient": functools.partial(self._event, "rcpt"),
            b"newtls": functools.partial(self._event, "ntls"),
            b"auth": functools.partial(self._event, "auth"),
            b"newtls_status": self._newtls_status,
            b"lookup": self._lookup,
        }

    # --- hooks (on_client and client_count: FrameServer's) -------------------------------
    def post_init(self, loop) -> None:
        """Arm the timers: statistics, expiry of idle entries, stalled clients."""
        self.loop = loop
        self._timers["status"] = loop.call_later(self.status_time, self._status_update)
        self._timers["expire"] = loop.call_later(self._expire_period(), self._expire)
        self.arm_reaper(loop)

    def on_exit(self) -> None:
        """Log the statistics, as Postfix's anvil does at exit; close every client."""
        self.cancel_timers()
        self.close_clients()
        for line in self.table.report():
            msg.info(line)

    def closed(self, client: _Client) -> None:
        """An smtpd worker went away: end the connection it had registered."""
        self.table.drop_local(client)

    # --- timers --------------------------------------------------------------------------
    def _status_update(self) -> None:
        for line in self.table.report():
            msg.info(line)
        self._timers["status"] = self.loop.call_later(self.status_time, self._status_update)

    def _expire_period(self) -> float:
        return max(0.5, min(self.table.unit / 2, 30.0))

    def _expire(self) -> None:
        self.table.expire()
        self._timers["expire"] = self.loop.call_later(self._expire_period(), self._expire)

    # --- requests ------------------------------------------------------------------------
    def answer(self, client: Local, request: dict[str, bytes]) -> bytes:
        """Return the reply frame to one decoded request."""
        name = request.get("request")
        handler = self._handlers.get(name) if name is not None else None
        if handler is None:
            reason = ("missing attribute \"request\"" if name is None
                      else f"unrecognized request: \"{_show(name)}\"")
            return self.bad(client, reason)
        if request.keys() != _REQUEST_ATTRS:
            missing = _REQUEST_ATTRS - request.keys()
            if missing:
                return self.bad(client, f"request \"{_show(name)}\": missing attribute"
                                         f" \"{min(missing)}\"")
            unknown = min(request.keys() - _REQUEST_ATTRS)
            return self.bad(client, f"request \"{_show(name)}\": unknown attribute"
                                     f" \"{_show(unknown.encode())}\"")
        ident = request["ident"]
        if not 1 <= len(ident) <= MAX_IDENT or not ident.isascii() or \
                not all(0x21 <= b <= 0x7e for b in ident):
            return self.bad(client, f"bad ident \"{_show(ident)}\" (1..{MAX_IDENT}"
                                     f" printable ASCII bytes)")
        try:
            return handler(client, ident.decode("ascii"))
        except TableFull as exc:
            now = self.clock()
            if self._full_warned is None or now - self._full_warned >= FULL_WARN_INTERVAL:
                self._full_warned = now
                msg.warn(f"{exc}: not counting new clients until entries expire")
            return _reply(attr.STATUS_ERROR, str(exc))

    def _connect(self, client: Local, ident: str) -> bytes:
        count, rate = self.table.connect(client, ident)
        return _reply(attr.STATUS_OK, count=count, rate=rate)

    def _disconnect(self, client: Local, ident: str) -> bytes:
        self.table.disconnect(client, ident)
        return _OK

    def _event(self, what: str, client: Local, ident: str) -> bytes:
        return _reply(attr.STATUS_OK, rate=self.table.event(client, ident, what))

    def _newtls_status(self, client: Local, ident: str) -> bytes:
        return _reply(attr.STATUS_OK, rate=self.table.newtls_status(ident))

    def _lookup(self, client: Local, ident: str) -> bytes:
        return _reply(attr.STATUS_OK, **self.table.lookup(ident))


def _show(value: bytes, limit: int = 40) -> str:
    """Return peer-supplied bytes as short, printable text for replies and logs."""
    text = repr(bytes(value[:limit]))[2:-1]
    return text + ("..." if len(value) > limit else "")


def main(ctx) -> int:
    """Run as the master's anvil service: one call to the multi-client skeleton."""
    try:
        anvil = Anvil(ctx.cfg)
    except (maincf.ConfigError, ValueError) as exc:
        msg.fatal(str(exc))
    return server.multi_server(ctx, anvil.on_client,
                               post_init=lambda _ctx, loop: anvil.post_init(loop),
                               on_exit=lambda _ctx: anvil.on_exit(),
                               client_count=anvil.client_count,
                               long_running=True)     # state lives in memory
