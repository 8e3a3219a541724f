"""verify - the address verification server, as Postfix's verify(8).

SYNOPSIS
    verify  unix  -  -  n  -  1  verify         (master.cf; run by the master)

DESCRIPTION
    The verify server keeps a record of which addresses are known to be deliverable or
    undeliverable. smtpd asks it about an address (reject_unverified_recipient,
    reject_unverified_sender: `request=query addr=ADDRESS`, lib/verify_client.py); when
    nothing is known, or what is known is due for a refresh, it answers what it has
    ("Address verification in progress" the first time) and injects a probe message into
    the queue: through the cleanup stage (lib/cleanup.py: canonical and virtual alias
    maps apply, as to any message), from address_verify_sender (with
    address_verify_sender_ttl, its local part ends in a time stamp: lib/verify_client.py
    ProbeSender) to the address, with
    Postfix's queue file attribute `trace_flags=256` (DEL_REQ_FLAG_MTA_VRFY) and the
    address as asked in `verify_address`, and without content. qmgr routes the probe as
    any other message but hands it to the agents with the request flag "verify"; they do
    not deliver: the smtp client ends the session after RCPT, local and virtual find
    the mailbox, alias or command without using it, and each reports the recipient's
    status here (`request=update addr=ADDRESS addr_status=N why=TEXT`) instead of a
    bounce or defer log, so no notice is ever sent for a probe
    (lib/delivery_agent.py). The cache and its rules are verify/cache.py's.

    The cache, address_verify_map, is a table opened writable by lib/tables.py:
    btree:, hash:, lmdb: (an LMDB file of this host, created when missing), or
    memcache: and redis: (lib/table_store.py), a store that the verify servers of several
    hosts share, with a local LMDB backup: a result that one host's probe found answers
    the other hosts' queries without a probe of their own. An empty address_verify_map
    keeps the cache in this process's memory. A table that cannot be opened is fatal (a
    bad configuration); one that fails later makes queries answer "Address
    verification status unavailable" (smtpd defers) until it works again.

    Every address_verify_cache_cleanup_interval the cache is walked and expired entries
    dropped, logged as Postfix's dict_cache does (`cache btree:PATH full cleanup:
    retained=N dropped=M entries`); memcache: and redis: cannot be walked: their ttl ages
    entries out.

PROTOCOL
    lib/verify_client.py. A bad request (an unknown request, a missing or unknown
    attribute, an address that is empty, longer than MAX_ADDR bytes or not UTF-8, a
    status that is not a number) gets status 2 and one warning per connection; an update
    with a status that is not a probe result gets status 2 and Postfix's warning `bad
    recipient status N for recipient ADDR`.

SECURITY
    The server talks only to local clients over private/verify. It opens the cache as
    mail_owner, before any chroot (Postfix: "the verify server no longer uses root
    privileges when opening the address_verify_map cache file"), then runs as mail_owner.
    It can be made to store unlimited garbage: the expiry times bound it.

CONFIGURATION PARAMETERS
    address_verify_map (btree:$data_directory/verify_cache), address_verify_sender
    ($double_bounce_sender), address_verify_sender_ttl (0s), address_verify_positive_expire_time (31d),
    address_verify_positive_refresh_time (7d), address_verify_negative_cache (yes),
    address_verify_negative_expire_time (3d), address_verify_negative_refresh_time (3h),
    address_verify_cache_cleanup_interval (12h), myorigin, ipc_timeout, and those of
    lib/cleanup.py for the probes.

SEE ALSO
    verify/cache.py, lib/verify_client.py, smtpd/check.py, lib/delivery_agent.py,
    qmgr/manager.py; Postfix verify(8), ADDRESS_VERIFICATION_README.
"""

from __future__ import annotations

import os
import time

from ..lib import attr, cleanup, frame_server, maincf, msg, server, tables, verify_client
from ..lib import queue as Q
from .cache import MemoryCache, Settings, TableCache, Verifier

MAX_ADDR = 500              # bytes of an address (an LMDB key holds 511)
_QUERY = frozenset({"request", "addr"})
_UPDATE = frozenset({"request", "addr", "addr_status", "why"})
_OK = attr.encode({"status": attr.STATUS_OK})


class VerifyServer(frame_server.FrameServer):
    """The verify service, shaped for the multi-client skeleton's hooks."""

    def __init__(self, cfg, cache, settings: cleanup.Settings, queue_root: str):
        super().__init__(cfg["ipc_timeout"])
        self.cfg = cfg
        self.cache = cache
        self.cleanup_settings = settings
        self.queue_root = queue_root
        self.sender = verify_client.ProbeSender(cfg)
        self.verifier = Verifier(cache, Settings.from_config(cfg), self.probe)
        self.interval = cfg["address_verify_cache_cleanup_interval"]

    def post_init(self, loop) -> None:
        self.loop = loop
        if self.interval > 0 and self.cache.iterable:
            self._timers["cleanup"] = loop.call_later(self.interval, self._cleanup)
        self.arm_reaper(loop)

    def on_exit(self) -> None:
        self.cancel_timers()
        self.close_clients()
        self.cache.close()

    def _cleanup(self) -> None:
        retained, dropped = self.verifier.cleanup()
        msg.info(f"cache {self.cache.ref} full cleanup: retained={retained} "
                 f"dropped={dropped} entries")
        self._timers["cleanup"] = self.loop.call_later(self.interval, self._cleanup)

    # --- probes --------------------------------------------------------------------------
    def probe(self, addr: str) -> bool:
        """Queue a probe message to addr (Postfix's post_mail_fopen_async with
        DEL_REQ_FLAG_MTA_VRFY); False (warned) when it could not be queued."""
        writer = None
        try:
            writer = cleanup.Cleanup(self.cleanup_settings, self.queue_root, checks=False)
            writer.add_attr(verify_client.TRACE_FLAGS_ATTR,
                            str(verify_client.TRACE_FLAG_VERIFY))
            writer.add_attr(verify_client.ADDRESS_ATTR, addr)
            writer.set_sender(self.sender.make(time.time()))
            writer.add_recipient(addr)
            result = writer.finish()
        except (OSError, cleanup.LookupProblem) as exc:
            if writer is not None:
                writer.abort()
            msg.warn(f"cannot send address verification probe to {addr}: "
                     f"{getattr(exc, 'strerror', None) or exc}")
            return False
        if result.status != "queued":
            msg.warn(f"{result.queue_id}: address verification probe to {addr}: "
                     f"{result.status}{': ' + result.reply if result.reply else ''}")
            return False
        msg.verbose(1, f"{result.queue_id}: PROBE {addr}")
        Q.wake(self.queue_root)
        return True

    # --- requests ------------------------------------------------------------------------
    def answer(self, client, request: dict[str, bytes]) -> bytes:
        name = request.get("request")
        expected = _QUERY if name == b"query" else _UPDATE if name == b"update" else None
        if expected is None:
            return self.bad(client, "missing attribute \"request\"" if name is None else
                            f"unrecognized request: \"{msg.printable(name, 40)}\"")
        if request.keys() != expected:
            missing = expected - request.keys()
            what = f"missing attribute \"{min(missing)}\"" if missing else \
                f"unknown attribute \"{msg.printable(min(request.keys() - expected), 40)}\""
            return self.bad(client, f"request \"{name.decode()}\": {what}")
        raw = request["addr"]
        try:
            addr = raw.decode("utf-8")
        except UnicodeDecodeError:
            addr = ""
        if not addr or len(raw) > MAX_ADDR:
            return self.bad(client, f"bad address \"{msg.printable(raw, 40)}\" "
                                    f"(1..{MAX_ADDR} bytes of UTF-8)")
        if name == b"query":
            status, text = self.verifier.query(addr)
            return attr.encode({"status": attr.STATUS_OK, "addr_status": status,
                                "why": text})
        value = request["addr_status"]
        if not value.isdigit() or len(value) > 9:
            return self.bad(client, f"bad addr_status \"{msg.printable(value, 20)}\"")
        why = request["why"].decode("utf-8", "replace")
        if not self.verifier.update(addr, int(value), why):
            return attr.encode({"status": attr.STATUS_BAD,
                                "reason": "bad recipient status"})
        return _OK


def open_cache(ref: str):
    """The cache of address_verify_map (empty: in memory); TableError."""
    return TableCache(ref) if ref else MemoryCache()


def pre_init(ctx) -> None:
    """Before the jail: the cache (as mail_owner) and cleanup's tables."""
    cfg = ctx.cfg
    ref = (cfg.get("address_verify_map") or "").strip()
    try:
        with server.as_mail_owner(cfg):
            cache = open_cache(ref)
    except tables.TableError as exc:
        msg.fatal(f"address_verify_map: {exc}")
    if verify_client.ProbeSender.error(cfg):
        msg.fatal(verify_client.ProbeSender.error(cfg))
    try:
        settings = cleanup.Settings(cfg)
    except (tables.TableError, maincf.ConfigError) as exc:
        msg.fatal(str(exc))
    ctx.state["server"] = VerifyServer(cfg, cache, settings, ctx.queue_root)


def prepare(cfg, service):
    """Run in the master: a bad setting stops the service from starting, and says why."""
    Settings.from_config(cfg)
    problem = verify_client.ProbeSender.error(cfg)
    if problem:
        raise maincf.ConfigError(problem)


def main(ctx) -> int:
    """The verify program: one event loop for every client."""
    def on_client(conn, loop):
        ctx.state["server"].on_client(conn, loop)

    def count():
        srv = ctx.state.get("server")
        return srv.client_count() if srv else 0

    def on_exit(ctx_):
        srv = ctx_.state.get("server")
        if srv is not None:
            srv.on_exit()
    return server.multi_server(ctx, on_client, pre_init=pre_init,
                               post_init=lambda ctx_, loop: ctx_.state["server"].post_init(
                                   loop),
                               on_exit=on_exit, client_count=count, long_running=True)
