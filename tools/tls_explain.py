"""postfix-py tls explain: what the smtp client would do with TLS for a destination.

SYNOPSIS
    postfix-py [-c config_dir] tls explain [--connect] destination

DESCRIPTION
    A dry run of the smtp client's decisions for mail to destination (a domain, or an
    address whose domain is used), each taken where the client itself takes it, so
    that the answer cannot differ from what delivery does:
    * transport and next hop: lib/resolve.py (trivial-rewrite: address classes,
      relayhost, transport_maps), as qmgr resolves a recipient;
    * the master.cf service of that transport, its program (smtp or lmtp) and -o
      overrides; the smtp client's own set-up (smtp/service.py pre_init: policy
      tables, TLS engine, resolver, from that service's configuration);
    * the MX hosts and addresses of the next hop (smtp/nexthop.py), in the order the
      client tries them, within smtp_mx_address_limit;
    * for each address, the TLS policy as the client resolves it (smtp/service.py
      _policy_for): its source (global, per-site, policy; and whatever source later
      resolution steps give, such as DANE or MTA-STS), its level, its match rules or
      fingerprints, protocols, ciphers and SNI name; at level dane the usable TLSA
      records (usage selector matching-type data, as Postfix logs them) and the names a
      DANE-TA certificate must match;
    * with --connect, the first reachable address is probed as posttls-finger probes
      (tools/posttls_finger.py), with the smtp client's own TLS engine, policy and
      session cache key: whether a cached session existed and was resumed, the TLS
      summary line, and whether the policy is met ("policy met: yes" or "no: why").
      The session cache is only read. Without --connect the cache cannot be asked: the
      client's cache key includes the server's EHLO name.
    Nothing is delivered and nothing is written. Exit status 0 when the answer could be
    given (and, with --connect, the policy is met), 1 otherwise.

SEE ALSO
    smtp/service.py, smtp/tls_policy.py, smtp/nexthop.py, lib/resolve.py,
    tools/posttls_finger.py, tools/postfix_tls.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from ..lib import mastercf, resolve, tables, tlsmgr_client
from ..lib.queue import queue_root
from ..smtp import nexthop, service, session, tls, tls_policy
from . import posttls_finger


class Usage(Exception):
    """Bad arguments; the text is the usage line."""


USAGE = "usage: postfix-py tls explain [--connect] destination"


def _transport_service(cfg, transport: str):
    """The master.cf service of transport (unix), or None."""
    path = os.path.join(cfg.config_dir, "master.cf")
    try:
        services = mastercf.load(path, warn=lambda text: None)
    except (OSError, mastercf.MasterCfError):
        return None
    for svc in services:
        if svc.name == transport and svc.type == "unix":
            return svc
    return None


class _ReadOnlyCache(tls.TlsmgrCache):
    """The client's session cache, looked up but never changed by a dry run."""

    def update(self, key, data):
        return False

    def delete(self, key):
        return None


def describe_policy(cfg, prefix: str, policy) -> str:
    """The policy in one line: level, source and the rules it carries."""
    parts = [f"level={policy.level}", f"source={policy.source}"]
    if policy.level in ("verify", "secure"):
        parts.append("match=" + ":".join(tls_policy.match_strategies(cfg, prefix, policy)))
    elif policy.level == "fingerprint":
        parts.append("match=" + "|".join(tls_policy.fingerprints(cfg, prefix, policy)))
    elif tls_policy.dane_based(policy.level) and policy.matches:
        parts.append("match=" + ":".join(policy.matches))       # names for DANE-TA
    for name in ("protocols", "ciphers", "exclude", "servername"):
        value = getattr(policy, name, None)
        if value:
            parts.append(f"{name}={value}")
    if getattr(policy, "connection_reuse", None) is not None:
        parts.append(f"connection_reuse={'yes' if policy.connection_reuse else 'no'}")
    return ", ".join(parts)


class _Probe(posttls_finger.Finger):
    """posttls-finger's pass, with the smtp client's own TLS starter."""

    def __init__(self, opts, dest_text, ctx, dest, config_dir, sts=None):
        super().__init__(opts, dest_text, [], config_dir)
        self.ctx = ctx
        self.sts = sts
        self.smtp_dest = dest
        self.last_starter = None
        self.policy = None

    def _starter(self):
        d = session.Delivery("explain", "", [])
        self.policy = service._policy_for(self.ctx, self.smtp_dest, self.addr, d, self.sts)
        if self.policy is None:
            posttls_finger.out(f"{self.addr.namaddrport}: no usable TLS policy: "
                               f"{d.why[1] if d.why else 'unknown'}")
            return None
        client = service._client_for(self.ctx, self.policy)
        starter = service._starter(self.ctx, self.smtp_dest, self.addr, self.policy, client)
        if starter.cache is not None:
            starter.cache = _ReadOnlyCache(starter.cache.name)
        self.last_starter = starter
        return starter if client is not None else None


def _verdict(policy, starter) -> tuple[bool, str]:
    """Whether the probe met the policy, and why not."""
    info = starter.tls_info if starter is not None else None
    if policy is None:
        return False, "no usable TLS policy"
    if info is None:
        if tls_policy.requires_tls(policy.level):
            return False, f"TLS is required at level {policy.level}, but no TLS session"
        return True, "plaintext" if policy.level != "none" else "TLS disabled"
    if not starter.acceptable():
        return False, f"certificate: {info.status} at level {policy.level}"
    return True, f"{info.status} {info.protocol}"


def explain(cfg, args: list[str], out=print) -> int:
    """Run `tls explain`; returns the exit status (Usage for bad arguments)."""
    connect = "--connect" in args
    rest = [a for a in args if a != "--connect"]
    if len(rest) != 1 or rest[0].startswith("-"):
        raise Usage(USAGE)
    destination = rest[0]
    address = destination if "@" in destination else f"postmaster@{destination}"
    try:
        resolver = resolve.AddressResolver(cfg)
        route = resolver.resolve(address)
    except (tables.TableError, resolve.ResolveError) as exc:
        out(f"{destination}: address resolution failed: {exc}")
        return 1
    out(f"{destination}: transport {route.transport}, next hop {route.nexthop} "
        f"(address class {route.addr_class})")
    svc = _transport_service(cfg, route.transport)
    if svc is None:
        out(f"transport {route.transport}: no such unix service in master.cf")
        return 1
    if svc.command not in ("smtp", "lmtp"):
        out(f"transport {route.transport}: program {svc.command}, not the smtp or lmtp "
            f"client: no outbound TLS")
        return 0
    scfg = cfg.with_overrides(svc.overrides)
    ctx = SimpleNamespace(cfg=scfg, program=svc.command, state={},
                          service=SimpleNamespace(name=svc.name), prepared=None)
    service.pre_init(ctx)               # the client's own tables, TLS engine and resolver
    ctx.state["tlsrpt"] = None          # a dry run is no TLS outcome to report
    prefix = ctx.state["prefix"]
    out(f"service {svc.key}: program {svc.command}, global TLS level "
        f"{ctx.state['finder'].global_level}")
    try:
        dests = nexthop.parse_list(route.nexthop, prefix == "lmtp")
    except nexthop.NexthopError as exc:
        out(f"next hop {route.nexthop}: {exc}")
        return 1
    limit = scfg["smtp_mx_address_limit"]
    first = None
    sts_of = {}
    for dest in dests:
        sts = sts_of[dest.text] = service._mta_sts_for(
            ctx, dest, session.Delivery("explain", "", []))
        addrs, why = ctx.state["resolver"].addresses(dest)
        if not addrs:
            out(f"next hop {dest.text}: no address: {why.reason}")
            continue
        out(f"next hop {dest.text}:")
        for addr in addrs[:limit] if limit else addrs:
            out(f"  {addr.namaddrport} (preference {addr.pref})")
            d = session.Delivery("explain", "", [])
            policy = service._policy_for(ctx, dest, addr, d, sts)
            if policy is None:
                out(f"    TLS policy: unusable: {d.why[1] if d.why else 'unknown'}")
                continue
            out(f"    TLS policy: {describe_policy(scfg, prefix, policy)}")
            for record in policy.tlsa:
                out(f"    TLSA record: {record.text()}")
            if first is None:
                first = dest
    if not connect:
        return 0 if first is not None else 1
    if first is None:
        out("--connect: no address to probe")
        return 1
    tlsmgr_client.configure(path=os.path.join(queue_root(scfg), "private", "tlsmgr"),
                            cfg=scfg)
    opts = {"o": [f"smtp_dns_nameservers={scfg.get('smtp_dns_nameservers')}"], "H": [],
            "c": 1, "l": "may", "L": "summary", "t": str(scfg[f"{prefix}_connect_timeout"]
                                                       or 30)}
    if prefix == "lmtp":
        opts["S"] = 1
    try:
        probe = _Probe(opts, first.text, ctx, first, cfg.config_dir, sts_of[first.text])
    except posttls_finger.Usage as exc:
        out(f"--connect: {exc}")
        return 1
    probe.run()
    starter = probe.last_starter
    if probe.addr is None:
        out("policy met: no: no server could be reached")
        return 1
    if starter is not None and starter.cache is not None:
        out(f"cached TLS session: {'yes' if starter.loaded else 'no'}"
            + (", resumed" if starter.tls_info is not None and starter.tls_info.session_reused
               else ""))
    met, why = _verdict(probe.policy, starter)
    out(f"policy met: {'yes' if met else 'no'}: {why}")
    return 0 if met else 1


__all__ = ["explain", "Usage", "describe_policy"]
