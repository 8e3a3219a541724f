"""smtpd: the Postfix-compatible SMTP server, as a master.cf service.

    smtp      inet  n  -  y  -  -  smtpd
    smtps     inet  n  -  y  -  -  smtpd -o smtpd_tls_wrappermode=yes

DESCRIPTION
    Each worker serves one client at a time (lib/server.single_server) with the session in
    smtpd/session.py, and writes accepted mail as queue files into incoming/ (lib/queue.py).
    prepare() runs once per configuration generation in the master, before any worker is
    forked: it checks the restriction lists and builds the server TLS contexts, so that all
    workers of a generation share one set of session-ticket keys (DESIGN.md). Every
    smtpd_tls_session_cache_timeout the master calls rekey() and starts a new generation:
    new ticket keys, with the previous period's still accepted (lib/tls.py SESSION TICKET
    KEYS).

SECURITY
    Talks to untrusted clients. Runs chrooted in queue_directory (master.cf) as mail_owner;
    keys, certificates, CAfile, lookup tables and the builtin SASL passwd-file are opened
    before the chroot. The Dovecot auth socket is connected on first use, from the jail
    (smtpd_sasl_path relative to queue_directory, such as private/auth).

CONFIGURATION PARAMETERS
    The smtpd_* parameters of lib/params.py; among them smtpd_banner, smtpd_timeout (300s),
    smtpd_per_request_deadline (no; the former smtpd_per_record_deadline when set) with
    smtpd_min_data_rate (500) for DATA and BDAT,
    smtpd_tls_security_level, smtpd_use_tls, smtpd_enforce_tls, smtpd_tls_wrappermode,
    smtpd_*_restrictions, message_size_limit (10240000), line_length_limit (2048),
    smtpd_recipient_limit (1000), smtpd_recipient_overshoot_limit (1000),
    smtpd_noop_commands (empty), header_size_limit (102400), smtpd_peername_lookup (yes);
    SASL: smtpd_sasl_auth_enable (no), smtpd_sasl_type (dovecot, or builtin),
    smtpd_sasl_path (smtpd/sasl.py). Extensions: smtputf8_enable (yes), strict_smtputf8
    (no), fast_flush_domains ($relay_domains) and smtpd_etrn_restrictions (empty) for
    ETRN. Behind a load balancer: smtpd_upstream_proxy_protocol (empty, or haproxy),
    smtpd_upstream_proxy_timeout (5s) (lib/proxy.py); smtpd_authorized_xclient_hosts
    and smtpd_authorized_xforward_hosts (empty; smtpd/xclient.py).
    Milters: smtpd_milters (empty), smtpd_milter_maps (empty) and the milter_*
    parameters (smtpd/milters.py, lib/milter.py). smtpd_reject_footer, smtpd_reject_footer_maps,
    smtpd_expansion_filter, smtpd_command_filter,
    smtpd_discard_ehlo_keyword_address_maps (empty) and smtpd_forbidden_commands
    (CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}) (lib/server_filters.py, its tables
    opened before the jail).
    Behind postscreen, a `pass` service (`smtpd pass - - y - - smtpd`) receives each
    client's socket and its endpoints from postscreen (lib/passfd.py) and uses those
    endpoints, never a PROXY header of its own.
    smtpd_tls_security_level is computed once, in
    prepare(), by lib/tls.server_security_level (verify, secure and fingerprint act as
    encrypt, with Postfix's warning), and every session uses that value.

Everything a worker imports must be imported at the top of a module: the master imports
this module before it forks, and inside the chroot jail nothing else can be imported.

SEE ALSO
    smtpd/session.py, smtpd/check.py, lib/queue.py, lib/tls.py; Postfix smtpd(8).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass

from ..lib import cleanup, msg, passfd, proxy, server, tables, tlsmgr_client
from ..lib import server_filters as SF
from ..lib import tls as T
from ..lib.maincf import ConfigError
from ..lib.smtpio import SmtpStream
from . import milters, sasl
from .check import Checker, ClientState
from .limits import Limits
from .session import Session
from .tls import TlsServer


@dataclass
class Prepared:
    level: str = "none"         # the TLS security level: none, may or encrypt
    tls: object = None          # TlsServer, or None when TLS is off or broken
    tls_problem: str | None = None
    # Seconds between session ticket key periods (smtpd_tls_session_cache_timeout; 0:
    # never): the master then calls rekey() and starts a new generation of the service.
    rekey_interval: int = 0


def rekey(cfg, prepared: Prepared) -> Prepared:
    """Run in the master each ticket key period: the TLS contexts of the next period,
    which still decrypt the tickets of this one (lib/tls.py SESSION TICKET KEYS)."""
    return dataclasses.replace(prepared, tls=prepared.tls.rekeyed(cfg))


def prepare(cfg, service) -> Prepared:
    """Run in the master per generation: validate restrictions, build TLS contexts.

    The TLS security level is computed here, once (lib/tls.server_security_level, with
    Postfix's warning for verify, secure and fingerprint), and every session uses it."""
    Checker(cfg)    # ConfigError: the service will not start, and says why
    try:
        SF.ServerFilters(cfg, "smtpd")
    except tables.TableError as exc:
        raise ConfigError(str(exc)) from None
    sasl.check_config(cfg)
    try:
        prepared = Prepared(level=T.server_security_level(cfg))
    except T.TLSConfigError as exc:
        raise ConfigError(str(exc)) from None
    if prepared.level == "none":
        return prepared
    try:
        prepared.tls = TlsServer.build(cfg, prepared.level)
    except ConfigError as exc:
        prepared.tls_problem = str(exc)
        return prepared
    prepared.rekey_interval = cfg["smtpd_tls_session_cache_timeout"]
    return prepared


def client_name(addr: str, lookup: bool) -> tuple[str, str, str, str]:
    """(name, name_status, reverse_name, reverse_status), as Postfix's smtpd_peer.c.

    The reverse name is what the PTR lookup gave; the name is that name only when it
    resolves back to the address ("unknown" otherwise). A status is ok, temp (the lookup
    failed for now), perm (no name, or no lookup with smtpd_peername_lookup = no) or
    forged (the name does not resolve to the address): reject_unknown_client_hostname and
    reject_unknown_reverse_client_hostname use them."""
    if not lookup:
        return "unknown", "perm", "unknown", "perm"
    try:
        # NI_NUMERICSERV: no service name wanted, so /etc/services is not read each time
        name = socket.getnameinfo((addr, 0), socket.NI_NAMEREQD | socket.NI_NUMERICSERV)[0]
    except socket.gaierror as exc:
        status = "temp" if exc.errno in _TEMP_AI_ERRORS else "perm"
        return "unknown", status, "unknown", status
    except (OSError, UnicodeError):
        return "unknown", "perm", "unknown", "perm"
    if _numeric(name):
        # a PTR record that looks like an address could bypass access rules: refused
        return "unknown", "perm", "unknown", "perm"
    try:
        infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        msg.warn(f"hostname {name} does not resolve to address {addr}: {exc.strerror}")
        return "unknown", "temp" if exc.errno in _TEMP_AI_ERRORS else "forged", name, "ok"
    except (OSError, UnicodeError):
        msg.warn(f"hostname {name} does not resolve to address {addr}")
        return "unknown", "forged", name, "ok"
    if any(info[4][0] == addr for info in infos):
        return name, "ok", name, "ok"
    msg.warn(f"hostname {name} does not resolve to address {addr}")
    return "unknown", "forged", name, "ok"


_TEMP_AI_ERRORS = (socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM)


def _numeric(name: str) -> bool:
    if ":" not in name and name.strip("0123456789."):
        return False        # not IPv6, and a letter: no address (the common case, cheaply)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def upstream_endpoints(conn: socket.socket, cfg, addr: str,
                       port: str) -> tuple[str, str, str | None, bool]:
    """(client address, client port, server address, hang up) from the PROXY header.

    A header that cannot be used leaves Postfix's warning, and the client is
    unknown[unknown] with a hang-up (smtpd_peer_fall_back_and_hangup); a v2 LOCAL
    header keeps the connection's own endpoints."""
    try:
        endpoints = proxy.receive(conn, cfg["smtpd_upstream_proxy_timeout"],
                                  proxy.families(cfg["inet_protocols"]))
    except proxy.ProxyError as exc:
        msg.warn(str(exc))
        return "unknown", "unknown", None, True
    if endpoints is None:
        return addr, port, None, False
    return endpoints.client_addr, endpoints.client_port, endpoints.server_addr, False


def pre_init(ctx) -> None:
    """As root, before the jail: open the restriction and cleanup tables."""
    try:
        ctx.state["checker"] = Checker(ctx.cfg)
        ctx.state["limits"] = Limits(ctx.cfg)
        ctx.state["cleanup"] = cleanup.Settings(ctx.cfg)    # its tables, before the jail
        ctx.state["milters"] = milters.prepare(ctx.cfg)
        ctx.state["filters"] = SF.ServerFilters(ctx.cfg, "smtpd")
    except (ConfigError, tables.TableError) as exc:
        msg.fatal(str(exc))
    try:
        ctx.state["sasl"] = sasl.from_config(ctx.cfg)
    except ConfigError as exc:
        msg.fatal(str(exc))
    prepared = ctx.prepared or Prepared()
    if prepared.tls_problem:
        msg.warn(f"TLS library problem: {prepared.tls_problem}; "
                 "TLS is not available to clients")


def post_init(ctx) -> None:
    """In the jail: extra entropy for OpenSSL from tlsmgr, when TLS is in use."""
    prepared = ctx.prepared or Prepared()
    if prepared.tls is not None:
        tlsmgr_client.configure(cfg=ctx.cfg)
        tlsmgr_client.mix_seed()


def smtpd_service(conn: socket.socket, ctx) -> None:
    """One client, from connect to disconnect; on a pass service (behind postscreen) the
    connection carries the client's socket and endpoints (lib/passfd.py)."""
    if ctx.service.type != "pass":
        _session(conn, ctx)
        return
    try:
        client, endpoints = passfd.receive(conn)
    except passfd.PassError as exc:
        msg.warn(str(exc))
        return
    finally:
        conn.close()            # tells postscreen that the hand-off is complete
    try:
        _session(client, ctx, endpoints)
    finally:
        client.close()


def _session(conn: socket.socket, ctx, passed: dict | None = None) -> None:
    cfg = ctx.cfg
    if passed is not None:
        # The endpoints postscreen logged: behind its PROXY header, the original client's.
        addr, port, local = passed["client_address"], passed["client_port"], \
            passed["server_address"]
        hangup = False
    else:
        try:
            addr, port = conn.getpeername()[:2]
        except OSError:
            return
        port, local, hangup = str(port), None, False
    if addr.startswith("::ffff:"):
        addr = addr[7:]
    if passed is None and cfg["smtpd_upstream_proxy_protocol"]:
        addr, port, local, hangup = upstream_endpoints(conn, cfg, addr, port)
    if hangup:
        name, status, reverse, reverse_status = "unknown", "perm", "unknown", "perm"
    else:
        name, status, reverse, reverse_status = client_name(addr, cfg["smtpd_peername_lookup"])
    client = ClientState(name=name, addr=addr, name_status=status, reverse_name=reverse,
                         reverse_status=reverse_status)
    stream = SmtpStream(conn, cfg["smtpd_timeout"])
    prepared = ctx.prepared or Prepared()
    backend = ctx.state.get("sasl")
    sasl_session = None
    if backend is not None:
        if local is None:           # not given by a PROXY header or postscreen
            try:
                local = conn.getsockname()[0]
            except OSError:
                local = ""
        sasl_session = backend.session(addr, local[7:] if local.startswith("::ffff:")
                                       else local)
    session = Session(stream, cfg, client, ctx.queue_root, ctx.state["checker"],
                      level=prepared.level, tls=prepared.tls,
                      wrapper=cfg["smtpd_tls_wrappermode"],
                      stopping=lambda: ctx.stopping, sasl=sasl_session)
    session.limits = ctx.state["limits"].session(client, ctx.service.name)
    session.hangup, session.client_port = hangup, port
    session.limits_for = lambda c: ctx.state["limits"].session(c, ctx.service.name)
    session.cleanup_settings = ctx.state["cleanup"]
    milters.setup(session, ctx.state["milters"])
    session.use_filters(ctx.state["filters"])
    try:
        session.run()
    finally:
        stream.close()
        if backend is not None and backend.needs_restart():
            ctx.stopping = True     # a file it read has changed: let a new worker read it


def on_exit(ctx) -> None:
    """Close the SASL backend (the Dovecot connection, the passwd-file)."""
    backend = ctx.state.pop("sasl", None)
    if backend is not None:
        backend.close()


def main(ctx) -> int:
    """The smtpd program: a single-client server."""
    return server.single_server(ctx, smtpd_service, pre_init=pre_init, post_init=post_init,
                                on_exit=on_exit)
