"""smtp, lmtp - the SMTP and LMTP delivery agents, as master.cf services.

SYNOPSIS
    smtp      unix  -       -       y       -       -       smtp
    relay     unix  -       -       y       -       -       smtp
    lmtp      unix  -       -       y       -       -       lmtp

DESCRIPTION
    The queue manager connects to private/smtp (or relay, lmtp) and sends one delivery
    request (lib/deliver.py): a queue file, a next hop and the recipients. The agent reads
    the message from the queue file, finds the servers of the next hop (smtp/nexthop.py:
    MX records in preference order, or the [host], host:port, unix:/path of the request),
    and tries them in turn: at most smtp_mx_address_limit addresses and
    smtp_mx_session_limit sessions that got past the greeting. A server that cannot be
    reached, or that fails temporarily, passes the recipients on to the next one; the
    last one's answer is final. smtp_fallback_relay (lmtp_fallback_relay) names more next
    hops, tried after those of the request, as Postfix 3.7's smtp_connect.c does for any
    TCP destination, relayhost included (not for unix: LMTP, which warns): a hard host
    lookup error of the primary does not bounce while they remain, and a hard error left
    by a fallback relay is reported as 4.3.5 with the warning `smtp_fallback_relay
    configuration problem`, so that a bad fallback never bounces mail. Each recipient's outcome is logged in Postfix's words

        4C1A21F3E8B: to=<bob@example.com>, relay=mx.example.com[192.0.2.1]:25,
            delay=0.2, delays=0.01/0/0.15/0.04, dsn=2.0.0, status=sent (250 2.0.0 Ok)

    and reported to the queue manager in one reply frame; the agent never writes the
    queue file, so a crash repeats at most the delivery in flight and loses nothing. The
    request loop, the log line and soft_bounce are every agent's: lib/delivery_agent.py.

    TLS follows smtp/tls_policy.py (levels, legacy parameters, per-site table, policy
    maps) and smtp/tls.py (STARTTLS, certificate checks, session cache). The client
    TLS engine is built in pre_init, before the chroot, from the smtp_tls_* parameters;
    when it cannot be built, TLS is unavailable: opportunistic TLS goes on in plain text
    and mandatory TLS defers ("TLS is required, but our TLS engine is unavailable").

SECURITY
    Talks to untrusted servers over the network; runs chrooted in queue_directory (the
    master.cf chroot column) as mail_owner. Certificates, keys, CAfile, lookup tables
    and the resolver configuration are read in pre_init, before the chroot;
    smtp_tls_CApath and policy-table protocol/cipher variants are read later and must
    be reachable inside the jail. Every read from the network is bounded in size and
    time; nothing a server sends can raise past the session.

CONFIGURATION PARAMETERS
    smtp_connect_timeout (30s), smtp_helo_timeout (300s), smtp_mail_timeout (300s),
    smtp_rcpt_timeout (300s), smtp_data_init_timeout (120s), smtp_data_xfer_timeout
    (180s), smtp_data_done_timeout (600s), smtp_quit_timeout (300s),
    smtp_starttls_timeout (300s), smtp_helo_name ($myhostname), smtp_bind_address,
    smtp_mx_address_limit (5), smtp_mx_session_limit (2), smtp_skip_5xx_greeting (yes),
    smtp_always_send_ehlo (yes), smtp_line_length_limit (998), smtp_host_lookup (dns),
    smtp_cname_overrides_servername (no), smtp_address_preference (any),
    inet_protocols (all), soft_bounce (no), line_length_limit (2048),
    smtp_send_xforward_command (no), smtp_xforward_timeout (300s) (smtp/xforward.py),
    smtp_address_verify_target (rcpt; data: a probe ends after DATA's 354).
    TLS: smtp_tls_security_level, smtp_use_tls, smtp_enforce_tls,
    smtp_tls_enforce_peername, smtp_tls_per_site, smtp_tls_policy_maps,
    smtp_tls_cert_file, smtp_tls_key_file, smtp_tls_dcert_file, smtp_tls_dkey_file,
    smtp_tls_eccert_file, smtp_tls_eckey_file, smtp_tls_CAfile, smtp_tls_CApath,
    smtp_tls_scert_verifydepth (5), smtp_tls_loglevel (0), smtp_tls_note_starttls_offer
    (no), smtp_tls_cipherlist, smtp_tls_protocols, smtp_tls_ciphers, smtp_tls_servername,
    smtp_tls_wrappermode, smtp_tls_session_cache_database, smtp_tls_session_cache_timeout
    (3600s), smtp_tls_block_early_mail_reply (no: with yes, a reply that arrives in the
    STARTTLS session before MAIL FROM defers the delivery, as Postfix against
    CVE-2009-3555). minimal_backoff_time (300s): at smtp_tls_security_level = may, a
    request that waited this long before delivery retries the same server in plain text
    when the TLS handshake (or the TLS session) fails (smtp/session.py). The lmtp program reads lmtp_* where postfix-py declares it, else smtp_*.
    smtp_dns_nameservers (empty: the system's resolv.conf), smtp_dns_timeout (10s).
    smtp_dns_support_level (empty: enabled; disabled: no DNS, as smtp_host_lookup =
    native; dnssec: DNSSEC status from the resolver's AD bit, which the dane and
    dane-only TLS levels need: smtp/dane.py), tls_dane_digests (sha512 sha256),
    smtp_tls_dane_insecure_mx_policy (dane: TLSA records of an MX host found through
    an insecure MX RRset are enforced, the peer logged "Trusted"; smtp/dane.py; the
    smtp client only, as Postfix), smtp_tls_force_insecure_host_tlsa_lookup (no).
    requiretls_enable (yes): a message received with MAIL FROM ... REQUIRETLS goes only
    to a server with a matched certificate that announces REQUIRETLS (smtp/session.py);
    tls_required_enable (yes): with a "TLS-Required: No" header (and no REQUIRETLS) the
    TLS level is at most may, without policy tables or DANE (RFC 8689).
    smtp_fallback_relay ($fallback_relay; fallback_relay: empty), lmtp_fallback_relay (empty).
    MTA-STS (smtp/mta_sts.py; the smtp client only): smtp_tls_mta_sts_enable (no), with it
    an MX next hop's policy decides each MX host's TLS policy, and the log says
    "MTA-STS policy for DOMAIN: mode MODE, id ID"; TLSRPT (lib/tlsrpt.py):
    smtp_tlsrpt_enable (no), each session's TLS outcome counted in tlsrpt_database
    for the domains with a `_smtp._tls` TXT record (none with smtp_dns_support_level =
    disabled: Postfix's warning "Cannot enable TLSRPT support: DNS is disabled")
    (smtp_tlsrpt_skip_reused_handshakes (no): not those that resumed a TLS session).
    Both files are LMDB in data_directory, opened in pre_init, before the chroot.
    The lmtp client applies neither: RFC 8461 and RFC 8460 are about MX-based SMTP
    delivery, and LMTP has no MX lookups (its next hops are hosts and unix sockets), as
    Postfix's lmtp has no TLSRPT ("TLSRPT support is not implemented for LMTP") and no
    MTA-STS. An lmtp service that sets either parameter with -o in master.cf gets
    Postfix's warning for TLSRPT, and the like for MTA-STS, and goes on without it.
    smtp_tls_history_database (empty; postfix-py extension): each new connection's TLS
    outcome goes to the next hop's history in tlsmgr, and an unexpected change (plain
    text after TLS, another issuer, a lower status) is a warning (lib/tls_history.py).
    Connection cache: smtp/conncache.py (smtp_connection_cache_*, smtp_connection_reuse_*,
    smtp_tls_connection_reuse, smtp_rset_timeout).

FILES
    queue_directory/private/smtp, relay, lmtp: the service sockets
    queue_directory/private/tlsmgr: seeds and the client session cache
    queue_directory/etc/resolv.conf: the resolver configuration inside the jail (the
        master copies it; pre_init reads the real one first)

SEE ALSO
    smtp/session.py, smtp/tls.py, smtp/nexthop.py, smtp/tls_policy.py, lib/deliver.py,
    lib/delivery_agent.py, lib/tls.py;
    Postfix smtp(8), lmtp(8).
"""

from __future__ import annotations

import dataclasses
import socket
import time

from ..lib import deliver, delivery_agent, msg, server, tables, tls_history, tls_session
from ..lib import tlsmgr_client, tlsrpt, verify_client
from ..lib import queue as Q
from ..lib import tls as libtls
from ..lib.smtpio import SmtpStream
from ..lib.maincf import ConfigError
from . import conncache, dane, mta_sts, nexthop, session, tls, tls_policy, xforward
from . import sasl as smtp_sasl

REQUEST_TIMEOUT_CAP = 300       # seconds to wait for the request frame


def _prefix(ctx) -> str:
    return "lmtp" if ctx.program == "lmtp" else "smtp"


def dns_support_level(cfg) -> str:
    """smtp_dns_support_level: disabled, enabled (the default) or dnssec."""
    return cfg.get("smtp_dns_support_level").strip().lower() or "enabled"


def make_resolver(cfg) -> nexthop.NexthopResolver:
    """The resolver, configured now (before the chroot) from main.cf."""
    servers = cfg["smtp_dns_nameservers"]
    timeout = cfg["smtp_dns_timeout"]
    support = dns_support_level(cfg)
    host_lookup = ["native"] if support == "disabled" else cfg["smtp_host_lookup"]
    try:
        resolver = nexthop.NexthopResolver(
            servers, timeout=timeout, host_lookup=host_lookup,
            protocols=[p.lower() for p in cfg["inet_protocols"]],
            cname_overrides=cfg["smtp_cname_overrides_servername"],
            preference=cfg.get("smtp_address_preference").strip().lower(),
            dnssec=support == "dnssec")
    except ValueError as exc:
        msg.fatal(f"smtp_dns_nameservers: {exc}")
    if resolver.problem:
        msg.warn(resolver.problem)
    return resolver


def pre_init(ctx) -> None:
    """As root, before the jail: TLS engine, policy tables, resolver."""
    cfg = ctx.cfg
    prefix = _prefix(ctx)
    st = ctx.state
    st["prefix"] = prefix
    try:
        finder = tls_policy.PolicyFinder(cfg, prefix)
    except tls_policy.PolicyError as exc:
        msg.fatal(str(exc))
    except tables.TableError as exc:
        msg.fatal(str(exc))
    st["finder"] = finder
    st["tls"] = None
    st["tls_variants"] = {}
    st["resolver"] = make_resolver(cfg)
    # MTA-STS and TLSRPT (smtp/mta_sts.py, lib/tlsrpt.py): the smtp client's, not lmtp's.
    st["mta_sts"] = mta_sts.from_config(cfg, st["resolver"].dns) if prefix == "smtp" else None
    st["tlsrpt"] = _tlsrpt_store(cfg) if prefix == "smtp" else None
    # Whether a domain asks for reports (its _smtp._tls record), cached per process.
    st["tlsrpt_policies"] = tlsrpt.Policies(st["resolver"].dns) \
        if st["tlsrpt"] is not None else None
    if prefix == "lmtp":
        _lmtp_ignored(cfg)
    if finder.global_level != "none" or finder.tables_in_use or st["mta_sts"] is not None:
        try:
            st["tls"] = libtls.client_tls(cfg, prefix)
        except libtls.TLSConfigError as exc:
            msg.warn(f"TLS library problem: {exc}; TLS is not available")
    st["history"] = bool(cfg.get("smtp_tls_history_database").strip())
    st["dane_digests"] = dane.parse_digests(cfg["tls_dane_digests"])
    # Postfix reads it in smtp mode only; lmtp has no MX lookups.
    st["insecure_mx"] = cfg["smtp_tls_dane_insecure_mx_policy"].lower() \
        if prefix == "smtp" else "may"
    st["options"] = session.Options.from_config(cfg, prefix)
    try:
        # smtp_sasl_password_maps: opened here, before the chroot (Postfix's
        # smtp_sasl_initialize); the session authenticates with it after EHLO.
        st["options"].sasl = smtp_sasl.from_config(cfg, prefix)
    except (ConfigError, tables.TableError) as exc:
        msg.fatal(str(exc))
    nexthop.prepare_for_chroot()
    tls_session.missing_symbols()   # loads the bindings the session cache needs


def _lmtp_ignored(cfg) -> None:
    """Warn about an lmtp service's own (-o) MTA-STS or TLSRPT setting: MX-based SMTP
    only. main.cf's values are the smtp client's and say nothing about lmtp."""
    own = {name for name in ("smtp_tlsrpt_enable", "smtp_tls_mta_sts_enable")
           if name in cfg.overrides and cfg[name]}
    if "smtp_tlsrpt_enable" in own:
        msg.warn("TLSRPT support is not implemented for LMTP")
    if "smtp_tls_mta_sts_enable" in own:
        msg.warn("MTA-STS support is not implemented for LMTP: RFC 8461 applies to "
                 "MX-based SMTP delivery")


def _tlsrpt_store(cfg) -> tlsrpt.Store | None:
    """The TLSRPT store, opened before the chroot (None: smtp_tlsrpt_enable = no)."""
    if not cfg["smtp_tlsrpt_enable"]:
        return None
    if dns_support_level(cfg) == "disabled":
        # Postfix's smtp_tlsrpt_post_jail(): no DNS, no TLSRPT policy lookups.
        msg.warn("Cannot enable TLSRPT support: DNS is disabled")
        return None
    path = cfg.get("tlsrpt_database").strip()
    try:
        store = tlsrpt.Store(path, cfg["lmdb_map_size"])
    except Exception as exc:        # noqa: BLE001 - lmdb.Error, OSError: reports only
        msg.warn(f"tlsrpt_database: cannot open {path}: {exc}; no TLSRPT records")
        return None
    mta_sts.hand_over(cfg, path)
    return store


def post_init(ctx) -> None:
    """In the jail: a seed from tlsmgr for OpenSSL, when TLS is in use."""
    if ctx.state.get("tls") is not None:
        tlsmgr_client.configure(cfg=ctx.cfg)
        tlsmgr_client.mix_seed()


def _client_for(ctx, policy) -> object | None:
    """The TLS engine for a policy: main.cf's, or a variant for its protocols/ciphers."""
    st = ctx.state
    base = st["tls"]
    if base is None or not (policy.protocols or policy.ciphers or policy.exclude):
        return base
    key = (policy.protocols, policy.ciphers, policy.exclude)
    if key not in st["tls_variants"]:
        p = st["prefix"]
        overrides = {}
        if policy.protocols:
            overrides[f"{p}_tls_protocols"] = policy.protocols
            overrides[f"{p}_tls_mandatory_protocols"] = policy.protocols
        if policy.ciphers:
            overrides[f"{p}_tls_ciphers"] = policy.ciphers
            overrides[f"{p}_tls_mandatory_ciphers"] = policy.ciphers
        if policy.exclude:
            overrides[f"{p}_tls_exclude_ciphers"] = policy.exclude
            overrides[f"{p}_tls_mandatory_exclude_ciphers"] = policy.exclude
        try:
            st["tls_variants"][key] = libtls.client_tls(ctx.cfg.with_overrides(overrides), p)
        except libtls.TLSConfigError as exc:
            msg.warn(f"TLS library problem: {exc}")
            st["tls_variants"][key] = None
    return st["tls_variants"][key]


def connect(addr: nexthop.Address, timeout: float, bind_address: str = ""):
    """A connected socket, or (None, reason) with Postfix's "connect to ..." text."""
    where = f"connect to {addr.namaddrport}"
    if addr.family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = addr.addr
    else:
        sock = socket.socket(addr.family, socket.SOCK_STREAM)
        target = (addr.addr, addr.port)
        if bind_address and addr.family == socket.AF_INET:
            try:
                sock.bind((bind_address.strip("[]"), 0))
            except OSError as exc:
                msg.warn(f"smtp_connect_addr: bind {bind_address}: {exc.strerror}")
    sock.settimeout(timeout if timeout > 0 else None)
    try:
        sock.connect(target)
    except (TimeoutError, socket.timeout):
        sock.close()
        return None, f"{where}: Connection timed out"
    except OSError as exc:
        sock.close()
        return None, f"{where}: {exc.strerror or exc}"
    return sock, None


def _starter(ctx, dest, addr, policy, client) -> tls.TlsStarter:
    cfg = ctx.cfg
    p = ctx.state["prefix"]
    cache = None
    if cfg.get(f"{p}_tls_session_cache_database").strip() and \
            cfg[f"{p}_tls_session_cache_timeout"] > 0 and client is not None:
        cache = tls.TlsmgrCache(p)
    domain = dest.host if not dest.unix else cfg.get("myhostname")
    sni_setting = policy.servername or cfg.get(f"{p}_tls_servername")
    return tls.TlsStarter(
        client, policy, cfg=cfg, prefix=p, service=ctx.service.name,
        nexthop_text=dest.text, nexthop_domain=domain, cache=cache,
        fingerprints=tls_policy.fingerprints(cfg, p, policy)
        if policy.level == "fingerprint" else None,
        sni=libtls.sni_name(sni_setting, domain, addr.name))


def _policy_for(ctx, dest, addr, d: session.Delivery, sts=None):
    """The TLS policy for addr, or None (why recorded) when the server must be skipped.
    sts: the next hop's MTA-STS lookup (smtp/mta_sts.py), or None."""
    st = ctx.state
    p = st["prefix"]
    finder = st["finder"]
    if d.tls_not_required:
        # "TLS-Required: No": no policy lookup, no DANE; at most may (encrypt in
        # wrapper mode), as Postfix's policy_create().
        cap = "encrypt" if ctx.cfg[f"{p}_tls_wrappermode"] else "may"
        level = finder.global_level
        if tls_policy.dane_based(level) or tls_policy.rank(level) > tls_policy.rank(cap):
            level = cap
        policy = tls_policy.Policy(level, source="TLS-Required: no")
    elif dest.unix:
        policy = finder.find(dest.host, ctx.cfg.get("myhostname"), True, addr.name)
        if policy.valid and policy.level == "may":
            msg.warn("smtp_connect_local: opportunistic TLS encryption is not appropriate "
                     "for unix-domain destinations.")
            policy = tls_policy.Policy("none", source=policy.source)
    else:
        policy = finder.find(dest.text, dest.host, dest.literal, addr.name)
    if policy.level in ("dane", "dane-only") and not d.tls_not_required:
        resolver = st["resolver"]
        policy = dane.policy_for(policy, dest, addr, resolver, resolver.dnssec,
                                 st["dane_digests"], insecure_mx=st["insecure_mx"],
                                 force_tlsa=ctx.cfg["smtp_tls_force_insecure_host_tlsa_lookup"])
    if not policy.valid:
        msg.warn(f"TLS policy lookup for {dest.text}/{addr.name}: {policy.reason}")
        d.why = (policy.dsn, policy.reason)
        return None
    if sts is not None and not d.tls_not_required:     # RFC 8689: not even MTA-STS
        policy, why = mta_sts.apply(policy, sts.policy, addr.name)
        if policy is None:
            # Postfix 3.10.5's warning (smtp_tls_authorize_mx_hostname); the host is skipped.
            msg.warn(f"MX name '{addr.name}' does not match STS MX pattern for "
                     f"'{sts.policy.domain}'")
            d.why = why
            _tlsrpt_record(ctx, dest, addr, sts, tlsrpt.VALIDATION_FAILURE)
            return None
    if d.requiretls and not tls_policy.must_match(policy.level):
        # REQUIRETLS needs a matched certificate (Postfix's enforce mode).
        d.why = ("5.7.10", f"Sender requested REQUIRETLS, but my configured TLS security "
                           f"level '{policy.level}' disables certificate matching. The last "
                           f"attempted server was {addr.name}")
        return None
    if policy.level == "fingerprint" and not tls_policy.fingerprints(ctx.cfg, p, policy):
        msg.warn(f"nexthop domain {dest.host}: configured at fingerprint security level, "
                 f"but with no fingerprints to match.")
        d.why = tls_policy.DSN_CONFIG
        return None
    if ctx.cfg[f"{p}_tls_wrappermode"] and not tls_policy.requires_tls(policy.level):
        msg.warn(f"{p}_tls_wrappermode requires \"{p}_tls_security_level = encrypt\" "
                 f"(or stronger)")
        d.why = tls_policy.DSN_CONFIG
        return None
    return policy


def _mta_sts_for(ctx, dest, d: session.Delivery):
    """The MTA-STS lookup of an MX next hop (None: MTA-STS off, not an MX delivery, or
    "TLS-Required: No", which ignores it: RFC 8689, no lookup and nothing for TLSRPT)."""
    sts = ctx.state.get("mta_sts")
    if sts is None or not dest.mx or dest.unix or dest.numeric or d.tls_not_required:
        return None
    found = sts.lookup(dest.host)
    if found.failure:
        _tlsrpt_record(ctx, dest, None, found, found.failure)
    p = found.policy
    if p is not None:
        msg.info(f"{d.queue_id}: MTA-STS policy for {p.domain}: mode {p.mode}, id {p.id}"
                 f"{'' if found.fetched else ' (cached)'}")
    return found


def _tlsrpt_policy(dest, policy, sts) -> dict:
    """The RFC 8460 policy object of a session: sts, tlsa (DANE) or no-policy-found."""
    p = sts.policy if sts is not None else None
    if p is not None and p.mode != "none" and (policy is None or
                                               policy.source.startswith("MTA-STS")):
        return tlsrpt.policy_dict("sts", dest.host, p.text, p.mx)
    if policy is not None and policy.tlsa:     # dane, halfdane, or all records unusable
        # As Postfix: the records, and the TLSA base domain (the first DANE-TA name);
        # sorted, since DNS servers rotate an RRset and one policy is one entry.
        records = "\n".join(sorted(f"{r.usage} {r.selector} {r.mtype} {r.data.hex().upper()}"
                                    for r in policy.tlsa))
        return tlsrpt.policy_dict("tlsa", policy.matches[0] if policy.matches else
                                  dest.host, records)
    return tlsrpt.policy_dict("no-policy-found", dest.host)


def _tlsrpt_record(ctx, dest, addr, sts, result: str, policy=None, local_ip="") -> None:
    """Count one outcome for TLSRPT (smtp_tlsrpt_enable), for MX deliveries to a domain
    that publishes a TLSRPT record only (lib/tlsrpt.py's Policies)."""
    store = ctx.state.get("tlsrpt")
    if store is None or not dest.mx or dest.unix or dest.numeric:
        return
    if not ctx.state["tlsrpt_policies"].wanted(dest.host):
        return
    store.record(dest.host, _tlsrpt_policy(dest, policy, sts), result, local_ip,
                 addr.name if addr else "", addr.addr if addr else "")


def _tls_outcome(dest, addr, policy, sess) -> str | None:
    """The TLSRPT result of a session after greeting and STARTTLS ("" success), or None
    when there is nothing to say (no EHLO, or TLS neither wanted nor attempted)."""
    starter = sess.tls
    sts_policy = policy.source.startswith("MTA-STS")
    if starter is None or starter.conn is None:
        if not sess.server_helo or "STARTTLS" in sess.features:
            return None
        if not sts_policy and not tls_policy.requires_tls(policy.level):
            return None
        return tlsrpt.STARTTLS_NOT_SUPPORTED
    if policy.source == dane.SOURCE_UNUSABLE:
        # Postfix's tls_client_start(): "all-TLSA-records-unusable", then encrypt.
        return tlsrpt.TLSA_INVALID
    info = starter.tls_info
    matched = bool(info and info.peer_matched)
    if info is not None and not matched and sts_policy:
        # testing mode runs at may: the name check RFC 8461 asks for, done here.
        try:
            cert = starter.conn.get_peer_certificate()
            matched = cert is not None and libtls.match_peername(cert, [addr.name])[0]
        except Exception:       # noqa: BLE001 - no certificate to judge
            matched = False
    return tlsrpt.classify(True, info is not None, info, matched,
                           sts_policy or tls_policy.must_match(policy.level))


def _tlsrpt_session(ctx, dest, addr, policy, sts, sess, sock) -> None:
    """Judge one session for MTA-STS testing mode (logged) and TLSRPT (recorded)."""
    testing = policy.source == mta_sts.SOURCE_TESTING
    if (ctx.state.get("tlsrpt") is None and not testing) or not dest.mx or dest.unix:
        return
    if sess.d.tls_not_required:
        # "TLS-Required: No" ignores the recipient's policies, TLSRPT too (Postfix's
        # smtp_connect.c): such a session is no policy result (a mailed TLSRPT report
        # carries the header: RFC 8460 section 3, not counted in the next report).
        return
    result = _tls_outcome(dest, addr, policy, sess)
    if result is None:
        return
    info = sess.tls.tls_info if sess.tls is not None else None
    skip_reused = info is not None and info.session_reused and \
        ctx.cfg["smtp_tlsrpt_skip_reused_handshakes"]
    if testing and result:
        msg.info(f"MTA-STS policy for {dest.host}: mode testing: would defer delivery to "
                 f"{addr.namaddrport}: {result}")
    if skip_reused:
        return
    try:
        local_ip = sock.getsockname()[0]
    except OSError:
        local_ip = ""
    _tlsrpt_record(ctx, dest, addr, sts, result, policy, local_ip)


def deliver_request(req: deliver.Request, ctx, report: delivery_agent.Report) -> str:
    """Deliver one request; every recipient gets a result, whatever happens. The relay."""
    recipients = [session.Rcpt(a, i) for i, a in enumerate(req.recipients)]
    d = session.Delivery(req.queue_id, req.sender, recipients, started=report.started,
                         report=report)
    relay = "none"
    try:
        try:
            qmsg = Q.read(req.queue_file)
        except (Q.QueueFileError, OSError) as exc:
            problem = (str(exc) if isinstance(exc, Q.QueueFileError)
                       else f"open {req.queue_file}: {exc.strerror or exc}")
            msg.warn(f"{req.queue_id}: {problem}")
            d.final_server = True
            d.bulk_fail("4.3.0", "unreadable mail queue entry", "none")
            return relay
        d.size = qmsg.size
        d.smtputf8 = qmsg.attrs.get("smtputf8") == "1"
        d.requiretls = ctx.cfg["requiretls_enable"] and qmsg.attrs.get("requiretls") == "1"
        # RFC 8689 section 5; REQUIRETLS wins over the header, as Postfix.
        d.tls_not_required = (ctx.cfg["tls_required_enable"] and not d.requiretls
                              and session.tls_required_no(qmsg.content(req.queue_file)))
        d.dsn_ret = qmsg.attrs.get("dsn_ret", "")
        d.dsn_envid = qmsg.attrs.get("dsn_envid", "")
        stored = {r.offset: r for r in qmsg.recipients}
        for r, offset in zip(recipients, req.offsets):
            if offset in stored:
                r.notify, r.orcpt = stored[offset].notify, stored[offset].orcpt
                r.original = stored[offset].original
        d.client = xforward.client_attributes(qmsg.attrs, req.queue_id)
        d.request_flags = tuple(req.flags)
        d.verify = verify_client.trace_only(d.request_flags)
        d.content = lambda: qmsg.content(req.queue_file)
        if not req.arrival:
            report.arrival = qmsg.arrival
        # Postfix's PREACTIVE_DELAY >= var_min_backoff_time: not on the first attempt.
        d.plaintext_fallback = (report.started - report.arrival
                                >= ctx.cfg["minimal_backoff_time"])
        relay = _deliver(ctx, req, d)
    except Exception as exc:        # noqa: BLE001 - our own bug must not lose the reply
        msg.error(f"{req.queue_id}: internal error during delivery: "
                  f"{type(exc).__name__}: {exc}")
        d.why = ("4.3.0", "mail system internal error")
    if d.left():
        # Whatever is left: the last reason there was, final now (Postfix smtp_connect).
        d.final_server = True
        d.unkeep()
        dsn, reason = d.why or ("4.3.0", "server unavailable or unable to receive mail")
        d.bulk_fail(dsn, reason, "none")
    return relay


def _deliver(ctx, req: deliver.Request, d: session.Delivery) -> str:
    """Postfix's smtp_connect(): next hops, addresses, sessions. Returns the last relay."""
    cfg = ctx.cfg
    st = ctx.state
    p = st["prefix"]
    lmtp = p == "lmtp"
    try:
        dests = nexthop.parse_list(req.nexthop, lmtp)
    except nexthop.NexthopError as exc:
        msg.warn(f"{exc}")
        d.why = ("4.3.5", "mail system configuration error")
        return "none"
    if not dests:
        d.why = ("4.3.5", "mail system configuration error")
        return "none"
    primary = len(dests)
    fallback = cfg[f"{p}_fallback_relay"]
    if fallback and any(dest.unix for dest in dests):
        msg.warn(f'ignoring "{p}_fallback_relay = {cfg.get(f"{p}_fallback_relay")}" '
                 "setting for non-TCP connections")
    elif fallback:
        try:
            dests += nexthop.parse_list(" ".join(fallback), lmtp)
        except nexthop.NexthopError as exc:
            msg.warn(f"{p}_fallback_relay: {exc}")
            d.why = ("4.3.5", "mail system configuration error")
            return "none"
    addr_limit = cfg["smtp_mx_address_limit"]
    sess_limit = cfg["smtp_mx_session_limit"]
    relay = "none"
    for n, dest in enumerate(dests):
        if not d.left():
            break
        final_nexthop = n == len(dests) - 1
        addrs, why = st["resolver"].addresses(dest)
        if dest.unix:
            addrs[0].name = cfg.get("myhostname")
        if not addrs:
            d.why = (why.dsn, why.reason)
            continue
        best_pref = addrs[0].pref
        addr_count = sess_count = 0
        sts = _mta_sts_for(ctx, dest, d)
        for i, addr in enumerate(addrs):
            if not d.todo():
                break
            addr_count += 1
            last = i == len(addrs) - 1 or addr_count == addr_limit
            policy = _policy_for(ctx, dest, addr, d, sts)
            if policy is None:
                if last:
                    break
                continue
            while True:
                d.final_server = final_nexthop and last
                got_past_greeting, relay_here, retry_plain = _run_session(
                    ctx, d, dest, addr, policy, best_pref, req.nexthop, sess_limit,
                    sess_count, final_nexthop, last, sts)
                if relay_here != "none":
                    relay = relay_here
                d.unkeep()
                d.conn_setup_done = 0.0
                if not retry_plain or not d.todo():
                    break
                # Opportunistic TLS failed: the same address again with TLS disabled, not
                # counted towards the address or session limits (smtp_connect.c).
                policy = dataclasses.replace(policy, level="none")
            if got_past_greeting and not retry_plain:
                sess_count += 1
                if sess_count == sess_limit:
                    last = True
            if last:
                break
    if d.left() and n >= primary and d.why and d.why[0].startswith("5"):
        # The fallback relay did not resolve, or refused us: a configuration problem,
        # not a reason to bounce (smtp_connect.c).
        msg.warn("smtp_fallback_relay configuration problem")     # lmtp too, as Postfix
        d.why = ("4.3.5", d.why[1])
    return relay


def _run_session(ctx, d, dest, addr, policy, best_pref, request_nexthop, sess_limit,
                 sess_count, final_nexthop, last, sts=None) -> tuple[bool, str, bool]:
    """Connect, greet, transfer, quit: one server's part of the delivery. (got past the
    greeting, the relay, retry the same address in plain text)."""
    cfg = ctx.cfg
    st = ctx.state
    p = st["prefix"]
    cache = st.get("conncache")
    key, store = None, False
    if cache is not None:
        load, store = cache.policy(d.request_flags, dest.host)
        key = cache.key(dest.text, addr, policy)
        if load:
            done = _reuse(ctx, d, cache, key, store, policy, last, sess_limit, sess_count,
                          final_nexthop)
            if done is not None:
                return done
    client = _client_for(ctx, policy)
    if client is None and st["tls"] is not None:
        # A policy table's protocols or ciphers that OpenSSL refused (already warned).
        d.why = tls_policy.DSN_CONFIG
        return False, "none", False
    sock, reason = connect(addr, cfg[f"{p}_connect_timeout"], cfg.get("smtp_bind_address"))
    if sock is None:
        msg.info(reason)
        d.why = ("4.4.1", reason)
        return False, "none", False
    made = time.monotonic()
    options = st["options"]
    stream = SmtpStream(sock, options.timeouts["helo"])
    starter = _starter(ctx, dest, addr, policy, client)
    sess = session.ClientSession(stream, d, addr, options, tls=starter,
                                 port25=addr.port == 25 and not options.lmtp,
                                 best_pref=best_pref, request_nexthop=request_nexthop)
    sess.sasl_dest = dest.text      # the next hop this session serves: a SASL lookup key
    d.conn_use = 1
    kept = False
    try:
        helo_ok = sess.helo()
        _tlsrpt_session(ctx, dest, addr, policy, sts, sess, sock)
        _note_history(ctx, dest, addr, policy, sess, helo_ok)
        if not helo_ok:
            sess.quit()
            return False, sess.relay, sess.retry_plain
        # Handshake errors do not count towards the session limit; deliveries do.
        if sess_limit and sess_count + 1 == sess_limit:
            last = True
        d.final_server = final_nexthop and last
        sess.xfer()
        kept = _keep(cache, key, sess, store, policy, made, 1)
        if not kept:
            sess.quit()
        return True, sess.relay, sess.retry_plain
    finally:
        if not kept:
            sess.close()


def _note_history(ctx, dest, addr, policy, sess, helo_ok: bool) -> None:
    """Add this connection's TLS outcome to the next hop's history in tlsmgr, and warn
    of an unexpected change (lib/tls_history.py): with smtp_tls_history_database, for
    a policy that allows TLS, after a handshake or a session that went on in plain text."""
    if not ctx.state.get("history") or policy.level == "none" or sess.tls is None \
            or not sess.tls.available:
        return
    info = sess.tls.tls_info
    if info is None and not (helo_ok and not sess.tls_active):
        return              # no handshake and no plaintext session: nothing was seen
    record = tls_history.record_of(addr.namaddrport, policy.level, info)
    before = tlsmgr_client.history_update(dest.text, record)
    if before is None:
        return
    tls_history.report(dest.text, record, before)


def _reuse(ctx, d, cache, key, store, policy, last, sess_limit, sess_count,
           final_nexthop) -> tuple[bool, str, bool] | None:
    """A delivery over the cached connection under key (smtp/conncache.py), or None when
    there is none that passes the RSET probe."""
    entry = cache.take(key)
    if entry is None:
        return None
    sess = entry.session
    if not sess.rset_probe(cache.rset_timeout):
        sess.quit()
        sess.close()
        return None
    sess.reuse(d)
    d.conn_use = entry.uses + 1
    kept = False
    try:
        if sess_limit and sess_count + 1 == sess_limit:
            last = True
        d.final_server = final_nexthop and last
        sess.xfer()
        kept = _keep(cache, key, sess, store, policy, entry.made, d.conn_use)
        if not kept:
            sess.quit()
        return True, sess.relay, False
    finally:
        if not kept:
            sess.close()


def _keep(cache, key, sess, store: bool, policy, made: float, uses: int) -> bool:
    """Cache sess instead of QUIT, where the rules of smtp/conncache.py allow it."""
    if cache is None or not store or not sess.usable or not sess.quit_ok or sess.retry_plain \
            or sess.d.verify:       # a probe's session ends with QUIT, mid-transaction
        return False
    if sess.tls_active and not cache.may_store_tls(policy):
        return False
    if cache.expired(made, uses):
        return False
    cache.store(key, sess, made, uses)
    return True


def smtp_service(conn: socket.socket, ctx) -> None:
    """One delivery request from the queue manager, and its reply."""
    delivery_agent.serve(conn, ctx, deliver_request,
                         timeout=min(ctx.cfg["ipc_timeout"], REQUEST_TIMEOUT_CAP))


def prepare(cfg, service) -> conncache.Board:
    """In the master, per generation: the board on which the workers show who holds
    cached connections (smtp/conncache.py)."""
    return conncache.Board()


def main(ctx) -> int:
    """The smtp and lmtp programs: one delivery request per connection; connections
    that may serve the next request stay in the connection cache meanwhile."""
    board = ctx.prepared if isinstance(ctx.prepared, conncache.Board) else None
    cache = conncache.ConnectionCache(ctx.cfg, _prefix(ctx), board)
    ctx.state["conncache"] = cache
    return server.single_server(ctx, smtp_service, pre_init=pre_init, post_init=post_init,
                                on_exit=cache.close_all, idle=cache)
