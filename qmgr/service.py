"""qmgr - the queue manager: moves mail from the queue to the delivery agents.

SYNOPSIS
    master.cf:  qmgr  unix  n  -  n  300  1  qmgr

DESCRIPTION
    qmgr is one long-running process (lib/server.multi_server) that owns the active queue.
    It is woken through public/qmgr: a client connects and sends request bytes, which qmgr
    reads once before it closes the connection (Postfix's trigger protocol):

        I   look in incoming/ (smtpd and local submission, after committing a file)
        D   look in deferred/ for messages whose retry time has come
        A   look in incoming/ and deferred/, ignoring retry times (postqueue -f)
        F   lift the suspension of dead transports and destinations (postqueue -f)
        W   wakeup (the master, every `wakeup` seconds of master.cf): look in incoming/

    Independently it scans deferred/ every queue_run_delay. What it does with a message,
    how it schedules deliveries, records their results, defers, expires and bounces, is
    described in qmgr/manager.py; next hops come from lib/resolve.py, notifications from
    qmgr/bounce.py, and the delivery requests travel as lib/deliver.py describes, through
    qmgr/dispatch.py, to the agents' private/TRANSPORT sockets.

    At start, every file left in active/ (after a crash, or a stop with mail in flight) is
    moved back to incoming/ and delivered again: a recipient is never lost, and is
    delivered twice only when qmgr stopped between a delivery and its recording.

SECURITY
    qmgr talks only to local processes over UNIX sockets, runs unchrooted as mail_owner
    (master.cf: unprivileged) with queue_directory as its working directory, and never
    reads message content except to copy it into a bounce.

DIAGNOSTICS
    Postfix's mail log lines: `ID: from=<s>, size=N, nrcpt=M (queue active)`,
    `ID: removed`, `ID: sender non-delivery notification: NEW`, `ID: sender delay
    notification: NEW` (delay_warning_time), `ID: from=<s>,
    status=expired, returned to sender`, `ID: to=<r>, relay=none, ..., status=deferred
    (mail transport unavailable)` for deferrals qmgr decides itself; warnings for corrupt
    queue files and failing transports.

CONFIGURATION PARAMETERS
    Those of qmgr/manager.py, lib/resolve.py and qmgr/bounce.py, and
    ipc_timeout (3600s): the most time one delivery request may take before its recipients
    are deferred ("delivery agent timeout"), capped at daemon_timeout.

FILES
    queue_directory/public/qmgr      trigger socket
    queue_directory/private/*        delivery agents
    config_directory/master.cf       read for each transport's process limit

SEE ALSO
    Postfix qmgr(8), master(5); tools/postqueue.py, tools/postsuper.py.
"""

from __future__ import annotations

import os

from ..lib import mastercf, msg, server
from ..lib.tables import TableError
from .dispatch import AgentPool
from .manager import QueueManager
from ..lib.resolve import AddressResolver, probe_routing_differs

TRIGGER_TIMEOUT = 10.0       # a trigger client that says nothing is dropped after this
TRIGGER_MAX = 1024


def transport_limits(cfg) -> dict[str, int]:
    """Process limits of master.cf's unix services, by name (0: unlimited)."""
    try:
        services = mastercf.load(os.path.join(cfg.config_dir, "master.cf"))
    except (OSError, mastercf.MasterCfError) as exc:
        msg.warn(f"cannot read master.cf for transport process limits: {exc}")
        return {}
    default = cfg["default_process_limit"]
    return {s.name: default if s.maxproc is None else s.maxproc
            for s in services if s.type == "unix"}


def main(ctx) -> int:
    """Run the queue manager until the master retires or stops it."""
    state: dict = {}

    def pre_init(ctx):
        # As root, before the drop: master.cf and the lookup tables may not be readable
        # by mail_owner (Postfix opens its tables before dropping privileges, too).
        state["maxproc"] = transport_limits(ctx.cfg)
        try:
            state["resolver"] = AddressResolver(ctx.cfg)
            # probes' own routing (address_verify_relayhost, ...), when it differs
            state["probe_resolver"] = AddressResolver(ctx.cfg, probe=True) \
                if probe_routing_differs(ctx.cfg) else None
        except TableError as exc:
            msg.fatal(f"open transport or domain table: {exc}")

    def post_init(ctx, loop):
        cfg = ctx.cfg
        timeout = min(cfg["ipc_timeout"], cfg["daemon_timeout"])
        # The skeleton's working directory is queue_directory (or / in the jail): relative
        # names, as Postfix's daemons use, work whatever the modes of its parents are.
        pool = AgentPool(loop, ".", timeout)
        mgr = QueueManager(cfg, ".", pool.dispatch, loop=loop, maxproc=state["maxproc"],
                           resolver=state["resolver"],
                           probe_resolver=state["probe_resolver"])
        pool.done = mgr.delivered
        state.update(pool=pool, mgr=mgr)
        ctx.state["qmgr"] = mgr
        mgr.start()

    def on_client(conn, loop):
        # The client sent its request bytes right after connecting: usually they are here
        # already, and the connection needs no watching and no timer.
        try:
            data = conn.recv(TRIGGER_MAX)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data is not None:
            conn.close()
            if data:
                state["mgr"].trigger(data)
            return
        timer = None

        def close():
            if conn.fileno() < 0:
                return
            loop.cancel(timer)
            loop.remove(conn)
            conn.close()

        def readable():
            try:
                data = conn.recv(TRIGGER_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            close()
            if data:
                state["mgr"].trigger(data)

        loop.add_reader(conn, readable)
        timer = loop.call_later(TRIGGER_TIMEOUT, close)

    def on_exit(ctx):
        if "pool" in state:
            state["pool"].close()
            state["mgr"].close()

    return server.multi_server(ctx, on_client, pre_init=pre_init, post_init=post_init,
                               on_exit=on_exit, long_running=True)
