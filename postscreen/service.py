"""postscreen: the SMTP connection screen in front of smtpd, as Postfix's postscreen(8).

    smtp      inet  n  -  y  -  1  postscreen
    smtpd     pass  -  -  y  -  -  smtpd

DESCRIPTION
    One process owns the public SMTP port and looks at every new client before any smtpd
    process is spent on it. A client that passes is handed to an smtpd process of the
    pass service (its socket and endpoints, lib/passfd.py); a client that fails is
    refused by postscreen itself, and a zombie that trickles or hangs ties up only a few
    bytes of postscreen's memory, never an smtpd process.

    For each connection, in Postfix's order:
        the PROXY header, with postscreen_upstream_proxy_protocol = haproxy;
        `CONNECT from [addr]:port to [addr]:port`;
        postscreen_client_connection_count_limit (421 4.7.0 Error: too many connections)
        and postscreen_post_queue_limit (421 4.3.2 All server ports are busy);
        postscreen_access_list, the permanent allow and deny list: permit_mynetworks,
        permit, reject, dunno and type:table lookups of the address whose result is one
        of those (`ALLOWLISTED [addr]:port`: straight to smtpd; `DENYLISTED
        [addr]:port`: postscreen_denylist_action, whose old name is
        postscreen_blacklist_action);
        the temporary allowlist, postscreen_cache_map: a client whose tests have not
        expired goes straight to smtpd (`PASS OLD [addr]:port`);
        postscreen_allowlist_interfaces: a client of another server address (a backup
        MX) cannot earn the allowlist: `ALLOWLIST VETO [addr]:port`, and it is refused
        after the tests (450 at RCPT in the engine) without a cache update;
        postscreen_pre_queue_limit (421 4.3.2 All screening ports are busy);
        the tests before the SMTP handshake, for postscreen_greet_wait: the pregreet test
        sends the teaser `220-postscreen_greet_banner` and a client that talks before the
        greeting is done is logged `PREGREET N after T from [addr]:port: TEXT` and
        handled by postscreen_greet_action; the DNSBL test scores the client in
        postscreen_dnsbl_sites (postscreen/dnsbl.py) and a score at or above
        postscreen_dnsbl_threshold is logged `DNSBL rank N for [addr]:port` and handled
        by postscreen_dnsbl_action; a score at or below a negative
        postscreen_dnsbl_allowlist_threshold passes the pregreet test too, and ends the
        wait at once;
        then `PASS NEW [addr]:port` (and the cache updated) and the hand-off (when
        it fails: `421 4.3.2 All server ports are busy`, or after the teaser the
        dummy engine's greeting and 421 at the first command), or the
        refusal: drop (`521 ...` now, then `DISCONNECT [addr]:port`), or enforce (the
        after-220 engine of postscreen/dummy.py answers every RCPT with 550 and logs
        `NOQUEUE: reject: RCPT from ...`), or ignore (the failure is noted and the
        client goes on; the test is repeated next time).

    A test's pass is remembered in the cache for its TTL (postscreen_greet_ttl; the
    DNS TTL within postscreen_dnsbl_min_ttl and postscreen_dnsbl_max_ttl). The deep
    protocol tests after the greeting (pipelining, non_smtp_command, bare_newline: off
    by default, as Postfix) run in postscreen/dummy.py; a client that takes them is
    refused with 450 at RCPT and let through when it comes back (PASS OLD).

TLS
    postscreen's engine (postscreen/dummy.py) offers STARTTLS as Postfix's does, with
    postscreen_tls_security_level (default $smtpd_tls_security_level; empty: the legacy
    postscreen_use_tls and postscreen_enforce_tls, whose defaults are smtpd's): may
    announces it, encrypt also answers 530 5.7.0 Must issue a STARTTLS command first to
    every command but HELO, EHLO, STARTTLS, NOOP and QUIT until TLS is up.
    Postfix's postscreen hands the client to a tlsproxy(8) process for the handshake and
    then talks plaintext to tlsproxy: its C event loop cannot suspend an OpenSSL call that
    needs more input, and it keeps the TLS library out of postscreen. postfix-py runs
    the handshake in postscreen's own event loop instead, with pyOpenSSL on the
    non-blocking socket (lib/tls.handshake_step: WantRead and WantWrite become read and
    write events), because
        * lib/tls.py is the one home of the server contexts: prepare() builds them in the
          master from the smtpd_tls_* parameters (certificates, protocols, ciphers,
          tls_server_sni_maps, loglevel), exactly as smtpd's prepare() does, and rekeys
          them every smtpd_tls_session_cache_timeout as smtpd's (a new generation of
          postscreen, as after a reload); a tlsproxy service would be a second server,
          a third protocol over a unix socket and a descriptor hand-off per client, for
          the few clients that reach this engine at all (those that failed a test, or
          take the deep tests, which Postfix leaves off by default);
        * the isolation tlsproxy buys in C (a library bug does not take the screen down)
          is what guard() gives here: an exception in one client's TLS ends that client.
    Postfix's tlsproxy uses the tlsproxy_tls_* parameters, whose defaults are the
    smtpd_tls_* ones; postfix-py has no tlsproxy, and postscreen reads the smtpd_tls_*
    parameters directly. Its tickets are under postscreen's own keys: a client that
    comes back to smtpd does a full handshake there. The handshake has
    postscreen_command_time_limit (as tlsproxy is given); the log lines are smtpd's, for
    [addr]:port: the smtpd_tls_loglevel lines, or `SSL_accept error from [addr]:port:
    REASON` and then `HANGUP after T from [addr]:port in tests after SMTP handshake`.
    No certificate (or another TLS setup error): a warning at start, STARTTLS is not
    announced and gets 502 5.5.1 Error: command not implemented, as in Postfix.

SECURITY
    Talks to untrusted clients. With TLS on, postscreen holds the server's private keys
    in memory (read by the master, before the fork), as smtpd does. Runs chrooted in queue_directory as mail_owner; the cache
    (data_directory, outside the jail; opened with mail_owner's effective uid and gid, so
    that the file is mail_owner's; or a memcache:/redis: store, whose unix: socket must
    then be inside the jail) and the access tables are opened before the chroot. Every client costs a bounded buffer (the dummy engine's line limit) and is
    ended by postscreen_greet_wait, postscreen_command_time_limit or
    postscreen_command_count_limit.

CONFIGURATION PARAMETERS
    postscreen_access_list (permit_mynetworks), postscreen_allowlist_interfaces
    (static:all, or the former postscreen_whitelist_interfaces when set),
    postscreen_denylist_action (ignore, or the former postscreen_blacklist_action when
    set), postscreen_greet_wait (${stress?{2}:{6}}s),
    postscreen_greet_banner ($smtpd_banner), postscreen_greet_action (ignore),
    postscreen_greet_ttl (1d), postscreen_dnsbl_sites (empty), postscreen_dnsbl_threshold
    (1), postscreen_dnsbl_allowlist_threshold (0, or the former
    postscreen_dnsbl_whitelist_threshold when set), postscreen_dnsbl_action (ignore),
    postscreen_dnsbl_min_ttl (60s), postscreen_dnsbl_max_ttl (1h, or the former
    postscreen_dnsbl_ttl hours when set),
    postscreen_dnsbl_timeout (10s), postscreen_dnsbl_reply_map (empty: the list's name
    in the 550 reply is its domain; the map hides a domain that holds a secret),
    postscreen_cache_map
    (btree:$data_directory/postscreen_cache; memcache: and redis: share it across hosts),
    postscreen_cache_retention_time (7d), postscreen_cache_cleanup_interval (12h;
    ignored for memcache: and redis:), postscreen_post_queue_limit and
    postscreen_pre_queue_limit ($default_process_limit),
    postscreen_client_connection_count_limit ($smtpd_client_connection_count_limit),
    postscreen_upstream_proxy_protocol (empty, or haproxy),
    postscreen_upstream_proxy_timeout (5s), postscreen_command_time_limit
    (${stress?{10}:{300}}s), postscreen_command_count_limit (20),
    postscreen_pipelining_enable (no), postscreen_pipelining_action (enforce),
    postscreen_pipelining_ttl (30d), postscreen_non_smtp_command_enable (no),
    postscreen_non_smtp_command_action (drop), postscreen_non_smtp_command_ttl (30d),
    postscreen_bare_newline_enable (no), postscreen_bare_newline_action (ignore),
    postscreen_bare_newline_ttl (30d), postscreen_forbidden_commands
    ($smtpd_forbidden_commands),
    postscreen_discard_ehlo_keywords ($smtpd_discard_ehlo_keywords),
    postscreen_discard_ehlo_keyword_address_maps
    ($smtpd_discard_ehlo_keyword_address_maps), postscreen_command_filter (empty),
    postscreen_reject_footer ($smtpd_reject_footer), postscreen_reject_footer_maps
    ($smtpd_reject_footer_maps), postscreen_expansion_filter ($smtpd_expansion_filter)
    (lib/server_filters.py; $server_name, $client_address, $client_port and $localtime
    expand in a footer),
    postscreen_watchdog_timeout (10s: one pass of the event loop, or the process is
    killed, as Postfix's watchdog),
    postscreen_disable_vrfy_command ($disable_vrfy_command), postscreen_helo_required
    ($smtpd_helo_required),
    postscreen_tls_security_level ($smtpd_tls_security_level), postscreen_use_tls
    ($smtpd_use_tls), postscreen_enforce_tls ($smtpd_enforce_tls), and the smtpd_tls_*
    parameters for the TLS contexts (see TLS),
    smtpd_service_name
    (smtpd: the pass service, private/smtpd), smtpd_dns_nameservers (the DNS servers),
    mynetworks, smtpd_banner, myhostname, soft_bounce (5XX replies sent as 4XX).

SEE ALSO
    postscreen/dnsbl.py, postscreen/cache.py, postscreen/dummy.py, lib/passfd.py,
    lib/proxy.py; Postfix postscreen(8), POSTSCREEN_README.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
import time
from dataclasses import dataclass

from OpenSSL import SSL

from ..lib import msg, passfd, proxy, server, tables
from ..lib import server_filters as SF
from ..lib import tls as T
from ..lib.maincf import ConfigError
from ..lib.netlist import NetworkList
from . import dummy
from .cache import Cache, parse as parse_stamps
from .dnsbl import Score, Sites, servers

PREGR, DNSBL, PIPEL, NSMTP, BARLF = range(5)   # index of a test in the cache entry
DEEP = {"pipelining": PIPEL, "non_smtp": NSMTP, "bare_newline": BARLF}
NEW, DISABLED = 0, 1                # Postfix's PSC_TIME_STAMP_NEW, _DISABLED
ACTIONS = ("ignore", "enforce", "drop")
NOTIFY_TIMEOUT = 100                # PSC_SEND_SOCK_NOTIFY_TIMEOUT
PEEK = 1024                         # PSC_READ_BUF_SIZE


@dataclass
class Prepared:
    """What prepare() builds in the master, before the fork (as smtpd's)."""
    level: str = "none"         # postscreen_tls_security_level: none, may or encrypt
    tls: object = None          # lib/tls.ServerTLS, or None: no STARTTLS
    tls_problem: str | None = None
    rekey_interval: int = 0     # smtpd_tls_session_cache_timeout: new ticket keys


class Settings:
    """What postscreen reads from its configuration, once, before the chroot."""

    def __init__(self, cfg, prepared: Prepared | None = None):
        self.cfg = cfg
        self._tables: dict = {}
        self.greet_wait = cfg["postscreen_greet_wait"]
        banner = cfg.get("postscreen_greet_banner")
        self.teaser = f"220-{banner}\r\n" if banner else None
        self.greet_action = _action(cfg, "postscreen_greet_action")
        self.greet_ttl = cfg["postscreen_greet_ttl"]
        reply_map = cfg.get("postscreen_dnsbl_reply_map").strip()
        self.sites = Sites(cfg["postscreen_dnsbl_sites"],
                           self._table(reply_map, "postscreen_dnsbl_reply_map")
                           if reply_map else None)
        self.dns_servers = servers(cfg["smtpd_dns_nameservers"]) if self.sites else []
        self.dnsbl_threshold = cfg["postscreen_dnsbl_threshold"]
        self.dnsbl_allow = cfg["postscreen_dnsbl_allowlist_threshold"]
        self.dnsbl_action = _action(cfg, "postscreen_dnsbl_action")
        self.dnsbl_min_ttl = cfg["postscreen_dnsbl_min_ttl"]
        self.dnsbl_max_ttl = cfg["postscreen_dnsbl_max_ttl"]
        self.dnsbl_timeout = cfg["postscreen_dnsbl_timeout"]
        self.deny_action = _action(cfg, "postscreen_denylist_action")
        self.cconn_limit = cfg["postscreen_client_connection_count_limit"]
        self.post_limit = cfg["postscreen_post_queue_limit"]
        self.pre_limit = cfg["postscreen_pre_queue_limit"]
        self.proxy = cfg["postscreen_upstream_proxy_protocol"]
        self.proxy_timeout = cfg["postscreen_upstream_proxy_timeout"]
        self.proxy_families = proxy.families(cfg["inet_protocols"])
        self.smtpd_service = "private/" + cfg.get("smtpd_service_name")
        self.deep = {name: (cfg[f"postscreen_{key}_enable"],
                            _action(cfg, f"postscreen_{key}_action"),
                            cfg[f"postscreen_{key}_ttl"])
                     for name, key in (("pipelining", "pipelining"),
                                       ("non_smtp", "non_smtp_command"),
                                       ("bare_newline", "bare_newline"))}
        self.min_ttl = min([self.greet_ttl, self.dnsbl_min_ttl] +
                           [ttl for _, _, ttl in self.deep.values()])
        self.soft_bounce = cfg["soft_bounce"]
        self.retention = cfg["postscreen_cache_retention_time"]
        self.cleanup_interval = cfg["postscreen_cache_cleanup_interval"]
        self.acl = self._acl(cfg["postscreen_access_list"])
        self.allowlist_if = NetworkList(
            "postscreen_allowlist_interfaces", cfg["postscreen_allowlist_interfaces"],
            lambda ref: self._table(ref, "postscreen_allowlist_interfaces"), False)
        prepared = prepared or Prepared()
        self.engine = dummy.Engine(cfg, prepared.level, prepared.tls)
        try:
            self.filters = SF.ServerFilters(cfg, "postscreen")
        except tables.TableError as exc:
            raise ConfigError(str(exc)) from None
        self.footer = self.filters.footer
        self.engine.cmd_filter = self.filters.command_filter
        if self.filters.ehlo_maps is not None:
            self.engine.ehlo_maps = self.filters
        self.host = cfg.get("myhostname")
        self.cache = None

    def _table(self, ref: str, param: str = "postscreen_access_list"):
        if ref not in self._tables:
            try:
                self._tables[ref] = tables.open_table(ref, self.cfg)
            except tables.TableError as exc:
                raise ConfigError(f"{param}: {exc}") from None
        return self._tables[ref]

    def _acl(self, words: list[str]) -> list:
        """postscreen_access_list as (kind, value) pairs, as server_acl_parse()."""
        out = []
        for word in words:
            low = word.lower()
            if low == "permit_mynetworks":
                out.append(("mynetworks", NetworkList("mynetworks", self.cfg["mynetworks"],
                                                      self._table, False)))
            elif low in ("permit", "reject", "dunno"):
                out.append((low, None))
            elif ":" in word:
                out.append(("table", self._table(word)))
            else:
                raise ConfigError(f"postscreen_access_list: unknown command: {word}")
        return out

    def acl_eval(self, addr: str, acl: list | None = None, depth: int = 0) -> str:
        """permit, reject or dunno for a client address (server_acl_eval())."""
        for kind, value in self.acl if acl is None else acl:
            if kind == "mynetworks":
                if value.match(addr):
                    return "permit"
            elif kind == "table":
                try:
                    result = value.lookup(addr)
                except tables.TableError as exc:
                    msg.warn(f"postscreen_access_list: table lookup problem: {exc}")
                    return "dunno"
                if result is not None:
                    words = result.replace(",", " ").split()
                    if depth > 0 or not words or any(
                            w.lower() not in ("permit", "reject", "dunno") for w in words):
                        msg.warn(f"{value.type}:{value.name}: unknown action: {result}")
                        return "dunno"
                    return self.acl_eval(addr, [(w.lower(), None) for w in words], depth + 1)
            else:
                return kind
        return "dunno"

    def enabled(self) -> list[bool]:
        return [self.teaser is not None, bool(self.sites)] + \
            [self.deep[name][0] for name in DEEP]


def _action(cfg, name: str) -> str:
    value = cfg.get(name).strip().lower()
    if value not in ACTIONS:
        raise ConfigError(f"bad {name} value: {value}")
    return value


class ClientInfo:
    """What concurrent sessions of one client address share (PSC_CLIENT_INFO)."""

    def __init__(self):
        self.concurrency = 0
        self.expire = [NEW] * 5
        self.pass_new_count = 0


class Screen:
    """postscreen's state: settings, clients, queue lengths."""

    def __init__(self, settings: Settings, loop):
        self.s = settings
        self.loop = loop
        self.clients: dict[str, ClientInfo] = {}
        self.check_queue = 0            # sessions in postscreen, hand-offs included
        self.post_queue = 0             # hand-offs waiting for smtpd
        self.sessions = 0

    def on_client(self, conn: socket.socket, loop) -> None:
        try:
            Session(self, conn)
        except Exception as exc:  # noqa: BLE001 - one client's problem, not all
            msg.warn(f"unexpected error with a new client: {type(exc).__name__}: {exc}")
            conn.close()


class Session:
    """One client connection, from accept to hand-off or refusal."""

    def __init__(self, screen: Screen, conn: socket.socket):
        self.screen, self.s, self.loop, self.conn = screen, screen.s, screen.loop, conn
        self.fd = conn.fileno()
        self.start = time.monotonic()
        self.timer = None
        self.info: ClientInfo | None = None
        self.todo: set[str] = set()
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.done: set[str] = set()
        self.skipped: set[str] = set()      # after-greeting tests decided this session
        self.x21 = False                    # the dummy engine answers 421 and hangs up
        self.new = False
        self.noforward = False
        self.hangup = False
        self.final_reply = "421 4.3.2 Service currently unavailable\r\n"
        self.rcpt_reply = "450 4.3.2 Service currently unavailable\r\n"
        self.test_name = "tests before SMTP handshake"
        self.score: Score | None = None
        self.server: socket.socket | None = None
        self.tls: SSL.Connection | None = None     # after STARTTLS in the dummy engine
        self.tls_broken = False
        self.closed = False
        screen.sessions += 1
        screen.check_queue += 1
        if self.s.proxy:
            self.proxy_buf = b""
            self.loop.add_reader(self.fd, self.guard(self._proxy_event))
            self.timer = self.loop.call_later(self.s.proxy_timeout,
                                              self.guard(self._proxy_timeout))
            return
        try:
            client = conn.getpeername()[:2]
            local = conn.getsockname()[:2]
        except OSError as exc:
            msg.warn(f"getpeername: {exc.strerror} -- dropping this connection")
            self._close()
            return
        self._connected(_unmap(client[0]), str(client[1]), _unmap(local[0]), str(local[1]))

    def guard(self, fn):
        """fn as an event callback that cannot take postscreen down: an unexpected error
        ends this client's session with a warning, and every other client goes on."""
        def run():
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - one client's problem, not all
                msg.warn(f"unexpected error for {getattr(self, 'where', 'a client')}: "
                         f"{type(exc).__name__}: {exc}; dropping this connection")
                self.hangup = True
                self._close()
        return run

    # --- the PROXY header ------------------------------------------------------------------
    def _proxy_timeout(self) -> None:
        self.timer = None
        self._proxy_failed("haproxy read: time limit exceeded")

    def _proxy_failed(self, warning: str) -> None:
        msg.warn(warning)
        self.loop.remove(self.fd)
        self._write("421 4.3.2 No system resources\r\n")
        self._close()

    def _proxy_event(self) -> None:
        try:
            data = self.conn.recv(proxy.HEADER_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._proxy_failed(f"haproxy read: {exc.strerror}")
            return
        if not data:
            self._proxy_failed("haproxy read: EOF")
            return
        try:
            endpoints, length = proxy.parse(data, self.s.proxy_families)
        except proxy.Incomplete:
            if data == self.proxy_buf:      # nothing new: wait for the rest, not spin
                self.loop.remove_reader(self.fd)
                self.loop.call_later(0.01, lambda: self.closed or self.loop.add_reader(
                    self.fd, self.guard(self._proxy_event)))
            self.proxy_buf = data
            return
        except proxy.ProxyError as exc:
            _drop(self.conn, len(data))
            self._proxy_failed(f"haproxy read: {exc}: {proxy.escape(data)}")
            return
        try:
            got = self.conn.recv(length)
        except OSError:
            got = b""
        if len(got) != length:
            self._proxy_failed("haproxy read: EOF")
            return
        self.loop.remove(self.fd)
        self.loop.cancel(self.timer)
        self.timer = None
        if endpoints is None:               # v2 LOCAL: the connection's own endpoints
            try:
                client, local = self.conn.getpeername()[:2], self.conn.getsockname()[:2]
            except OSError:
                self._close()
                return
            self._connected(_unmap(client[0]), str(client[1]), _unmap(local[0]),
                            str(local[1]))
            return
        self._connected(endpoints.client_addr, endpoints.client_port,
                        endpoints.server_addr, endpoints.server_port)

    # --- connect -------------------------------------------------------------------------
    def _connected(self, addr: str, port: str, saddr: str, sport: str) -> None:
        """psc_endpt_lookup_done(): the limits, the lists, the cache, then the tests."""
        self.addr, self.port, self.saddr, self.sport = addr, port, saddr, sport
        self.where = f"[{addr}]:{port}"
        msg.info(f"CONNECT from [{addr}]:{port} to [{saddr}]:{sport}")
        self.info = self.screen.clients.setdefault(addr, ClientInfo())
        self.info.concurrency += 1
        s = self.s
        if s.cconn_limit > 0 and self.info.concurrency > s.cconn_limit:
            msg.info(f"NOQUEUE: reject: CONNECT from {self.where}: too many connections")
            self.drop("421 4.7.0 Error: too many connections\r\n")
            return
        if s.post_limit > 0 and self.screen.post_queue >= s.post_limit:
            msg.info(f"NOQUEUE: reject: CONNECT from {self.where}: all server ports busy")
            self.drop("421 4.3.2 All server ports are busy\r\n")
            return
        verdict = s.acl_eval(addr) if s.acl else "dunno"
        if verdict == "reject":
            msg.info(f"DENYLISTED {self.where}")
            self.failed.add("denylist")
            if s.deny_action == "drop":
                self.drop("521 5.3.2 Service currently unavailable\r\n")
                return
            if s.deny_action == "enforce":
                self.enforce("550 5.3.2 Service currently unavailable\r\n")
            else:
                self.failed.discard("denylist")     # ignore: repeated next time
        elif verdict == "permit":
            msg.info(f"ALLOWLISTED {self.where}")
            self.conclude()
            return
        now = time.time()
        cached = None
        if not self.failed and self.info.concurrency == 1 and s.cache is not None:
            cached = s.cache.lookup(addr)
        if cached is not None:
            self.info.expire = parse_stamps(cached)
            self._todo(now)
            if not self.todo and not self.failed:
                msg.info(f"PASS OLD {self.where}")
                self.conclude()
                return
        elif self.info.concurrency > 1:
            self._todo(now)
        else:
            self.info.expire = [NEW] * 5
            self._todo(now)
        if not s.allowlist_if.match(saddr):
            # a backup MX address: the tests run, but pass nothing (fail closed)
            self.failed.add("allowlist")
            self.noforward = True
            msg.info(f"ALLOWLIST VETO {self.where}")
        if s.pre_limit > 0 and self.screen.check_queue - self.screen.post_queue >= \
                s.pre_limit:                    # as Postfix: this session counts too
            msg.info(f"reject: connect from {self.where}: all screening ports busy")
            self.drop("421 4.3.2 All screening ports are busy\r\n")
            return
        if self.todo & {"pregreet", "dnsbl"}:
            self._early_tests()
        elif self.noforward or self.deep_todo():
            self.screen_after_greeting()
        else:
            self.conclude()

    def deep_todo(self) -> set:
        """The tests after the greeting still to pass (they need the dummy engine, and a
        client that takes them cannot be handed to smtpd in the same session)."""
        return (self.todo & set(DEEP)) - self.passed

    def _todo(self, now: float) -> None:
        """psc_todo_tests(): which enabled tests have expired."""
        expire = self.info.expire
        self.new = NEW in expire
        enabled = self.s.enabled()
        self.todo = set()
        if enabled[PREGR] and now > expire[PREGR]:
            self.todo.add("pregreet")
        if enabled[DNSBL] and now > expire[DNSBL]:
            self.todo.add("dnsbl")
        for name, index in DEEP.items():
            if enabled[index] and now > expire[index]:
                self.todo.add(name)

    # --- the tests before the greeting -----------------------------------------------------
    def _early_tests(self) -> None:
        """psc_early_tests(): the teaser, the DNSBL queries, then wait greet_wait."""
        if "pregreet" in self.todo and self.s.teaser and not self._write(self.s.teaser):
            self.hangup_event()
            return
        if "dnsbl" in self.todo:
            self.score = Score(self.loop, self.s.sites, self.s.dns_servers, self.addr,
                               self.s.dnsbl_timeout, self.guard(self._dnsbl_done))
        if "pregreet" in self.todo:
            self.loop.add_reader(self.fd, self.guard(self._pregreet_event))
        self.timer = self.loop.call_later(self.s.greet_wait, self.guard(self._early_time))

    def _dnsbl_done(self) -> None:
        """psc_early_dnsbl_event(): all replies are in."""
        self.done.add("dnsbl")
        if self.closed:
            return
        if self.s.dnsbl_allow < 0 and self.score.total <= self.s.dnsbl_allow:
            self._allowlist_non_dnsbl()
        if "pregreet" not in self.todo or "pregreet" in self.done:
            self._early_now()

    def _allowlist_non_dnsbl(self) -> None:
        """psc_allowlist_non_dnsbl(): a good DNS allow-list score passes the pregreet
        test too, for its TTL, unless it has failed already."""
        if "pregreet" in self.todo and "pregreet" not in self.failed \
                and "pregreet" not in self.done:
            self.info.expire[PREGR] = int(time.time()) + self.s.greet_ttl
            self.passed.add("pregreet")
            self.done.add("pregreet")
            self.loop.remove_reader(self.fd)

    def _early_now(self) -> None:
        self.loop.cancel(self.timer)
        self.timer = None
        self._early_time()

    def _pregreet_event(self) -> None:
        """The client talked before its turn, or hung up."""
        try:
            data = self.conn.recv(PEEK - 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.loop.remove_reader(self.fd)
        if not data:
            self.hangup_event()
            return
        elapsed = time.monotonic() - self.start
        text = proxy.escape(data)[:100]
        msg.info(f"PREGREET {len(data)} after {delta_time(elapsed)} from {self.where}: "
                 f"{text}")
        self.failed.add("pregreet")
        action = self.s.greet_action
        if action == "drop":
            if self.score is not None:
                self.score.cancel()
            self.drop("521 5.5.1 Protocol error\r\n")
            return
        if action == "enforce":
            self.enforce("550 5.5.1 Protocol error\r\n")
        self.done.add("pregreet")
        if elapsed >= self.s.greet_wait or "dnsbl" not in self.todo \
                or "dnsbl" in self.done:
            self._early_now()

    def _early_time(self) -> None:
        """psc_early_event(EVENT_TIME): conclude the tests before the greeting."""
        self.timer = None
        if self.closed:
            return
        self.loop.remove_reader(self.fd)
        if "pregreet" in self.todo and "pregreet" not in self.failed \
                and "pregreet" not in self.done:
            self.info.expire[PREGR] = int(time.time()) + self.s.greet_ttl
            self.passed.add("pregreet")
        if "pregreet" in self.failed and self.s.greet_action == "ignore":
            self.failed.discard("pregreet")     # not passed: repeated next time
        if "dnsbl" in self.todo:
            score = self.score
            total = score.total if score is not None else 0
            if score is not None:
                score.cancel()                  # a partial score when time ran out
                if self.s.dnsbl_allow < 0 and total <= self.s.dnsbl_allow:
                    self._allowlist_non_dnsbl()
            if total < self.s.dnsbl_threshold:
                ttl = score.ttl(self.s.dnsbl_min_ttl, self.s.dnsbl_max_ttl) if score \
                    else self.s.dnsbl_min_ttl
                self.info.expire[DNSBL] = int(time.time()) + ttl
                self.passed.add("dnsbl")
            else:
                msg.info(f"DNSBL rank {total} for {self.where}")
                self.failed.add("dnsbl")
                reply = (f"5.7.1 Service unavailable; client [{self.addr}] blocked using "
                         f"{score.name}\r\n")
                if self.s.dnsbl_action == "drop":
                    self.drop("521 " + reply)
                    return
                if self.s.dnsbl_action == "enforce":
                    self.enforce("550 " + reply)
                else:
                    self.failed.discard("dnsbl")
        if self.noforward or self.deep_todo():
            self.screen_after_greeting()
        else:
            self.conclude()

    # --- outcomes ----------------------------------------------------------------------------
    def drop(self, reply: str) -> None:
        """PSC_DROP_SESSION_STATE: reply, log DISCONNECT, close."""
        self.noforward = True
        self.final_reply = reply
        self.conclude()

    def enforce(self, reply: str) -> None:
        """PSC_ENFORCE_SESSION_STATE: the dummy engine rejects every RCPT with reply."""
        self.rcpt_reply = reply
        self.noforward = True

    def screen_after_greeting(self) -> None:
        """psc_smtpd_tests(): a client that failed a test gets every after-greeting
        test too, whether enabled or not (Postfix's opportunistic rule)."""
        self.test_name = "tests after SMTP handshake"
        self.noforward = True
        if self.failed and not self.x21:
            self.todo |= set(DEEP)
        self.s.engine.start(self)

    def deep_pass(self, name: str, ttl: int) -> None:
        """An after-greeting test passed (or was failed under `ignore`): remember it."""
        self.passed.add(name)
        self.info.expire[DEEP[name]] = int(time.time()) + ttl

    def deep_fail(self, name: str) -> str:
        """An after-greeting test failed: the action to take, as Postfix (the test is
        not repeated in this session; its cache stamp becomes 1)."""
        self.skipped.add(name)
        self.passed.discard(name)
        self.info.expire[DEEP[name]] = DISABLED
        action = self.s.deep[name][1]
        if action == "ignore":
            self.deep_pass(name, self.s.min_ttl)
        else:
            self.failed.add(name)
        return action

    def deep_testing(self, name: str) -> bool:
        return name in self.todo and name not in self.skipped

    def hangup_event(self) -> None:
        """psc_hangup_event(): the client went away during the tests."""
        self.hangup = True
        msg.info(f"HANGUP after {delta_time(time.monotonic() - self.start)} from "
                 f"{self.where} in {self.test_name}")
        self.noforward = True
        self.conclude()

    def conclude(self) -> None:
        """psc_conclude(): log the verdict, update the cache, hand off or hang up."""
        if self.closed:
            return
        self.loop.cancel(self.timer)
        self.timer = None
        if self.score is not None:
            self.score.cancel()
        if self.failed:
            self.passed.clear()
        if self.passed and self.passed == self.todo:
            old = not self.new or self.info.pass_new_count > 0
            self.info.pass_new_count += 1
            msg.info(f"PASS {'OLD' if old else 'NEW'} {self.where}")
        if self.passed and self.s.cache is not None:
            self.s.cache.update(self.addr, self._stamps())
        if not self.noforward:
            self._send_socket()
            return
        if not self.hangup:
            self._write(self.final_reply)
        msg.info(f"DISCONNECT {self.where}")
        self._close()

    def _stamps(self) -> str:
        """psc_print_tests(): disabled tests that never passed get the stamp 1."""
        expire = self.info.expire
        enabled = self.s.enabled()
        for i, on in enumerate(enabled):
            if not on and expire[i] == NEW:
                expire[i] = DISABLED
        return ";".join(str(int(t)) for t in expire)

    # --- the hand-off ----------------------------------------------------------------------
    def _send_socket(self) -> None:
        """psc_send_socket(): the client's socket and endpoints to an smtpd process."""
        service = self.s.smtpd_service
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(service)
        except OSError as exc:
            sock.close()
            msg.warn(f"cannot connect to service {service}: {exc.strerror}")
            self._not_sent("421 4.3.2 All server ports are busy\r\n")
            return
        try:
            passfd.send(sock, self.fd, {"client_address": self.addr,
                                        "client_port": self.port,
                                        "server_address": self.saddr,
                                        "server_port": self.sport})
        except OSError as exc:
            sock.close()
            msg.warn(f"cannot pass connection to service {service}: {exc.strerror}")
            self._not_sent("421 4.3.2 No system resources\r\n")
            return
        self.server = sock
        self.screen.post_queue += 1
        self.loop.add_reader(sock, self.guard(self._sent))
        self.timer = self.loop.call_later(NOTIFY_TIMEOUT, self.guard(self._send_timeout))

    def _not_sent(self, reply: str) -> None:
        """The hand-off failed: 421 now, or, when the 220- teaser went out (a 421 after
        it would not parse), the dummy engine greets and answers the first command
        with 421 (Postfix's PSC_SMTPD_X21)."""
        if "pregreet" not in self.todo:
            self._write(reply)
            self._close()
            return
        self.x21 = True
        self.final_reply = "421 4.3.2 No system resources\r\n"
        self.passed.clear()                 # logged and cached already
        self.todo -= set(DEEP)
        self.screen_after_greeting()

    def _sent(self) -> None:
        """The smtpd process closed the channel: it has the client now."""
        self._close()

    def _send_timeout(self) -> None:
        self.timer = None
        msg.warn(f"timeout sending connection to service {self.s.smtpd_service}")
        self._close()

    # --- plumbing --------------------------------------------------------------------------
    def recv(self, size: int) -> bytes | None:
        """What the client sent (decrypted after STARTTLS): b"" at EOF or on an error,
        None when nothing is there yet."""
        if self.tls is None:
            try:
                return self.conn.recv(size)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return b""
        data = b""
        try:
            data = self.tls.recv(size)
            while self.tls.pending():       # decrypted already: epoll will not say so
                data += self.tls.recv(self.tls.pending())
        except (SSL.WantReadError, SSL.WantWriteError):
            return data or None
        except SSL.ZeroReturnError:
            return data
        except (SSL.Error, OSError):
            self.tls_broken = True
            return data
        return data

    def _write(self, text: str) -> bool:
        """psc_send_reply(): best effort, never blocks; False when the client is gone.
        With soft_bounce, 5XX replies go out as 4XX; 4XX and 5XX replies end with
        postscreen_reject_footer (the maps' key is the reply as given)."""
        original = text
        if self.s.soft_bounce:
            text = SF.soft_bounce(text)
        if self.s.footer is not None and text[:1] in ("4", "5"):
            text = self.s.footer.add_footer(text[:-2], self._macro_values,
                                            original[:-2]) + "\r\n"
        if self.tls is not None:
            return self._write_tls(text.encode("utf-8", "replace"))
        try:
            self.conn.send(text.encode("utf-8", "replace"))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                msg.warn(f"write {getattr(self, 'where', '')}: {exc.strerror}")
            return False
        return True

    def _macro_values(self) -> dict:
        """psc_expand_lookup(): what postscreen's footers may expand."""
        return {"server_name": self.s.host, "client_address": self.addr,
                "client_port": self.port}

    def _write_tls(self, data: bytes) -> bool:
        """A reply in TLS. A record cannot be dropped halfway as a plaintext reply can:
        a client that does not read until the socket is full is hung up on."""
        if self.tls_broken:
            return False
        try:
            while data:
                data = data[self.tls.send(data):]
            return True
        except (SSL.Error, OSError):
            self.tls_broken = True
            self.loop.call_later(0, self.guard(lambda: self.closed or self.hangup_event()))
            return False

    def _close(self) -> None:
        """psc_free_session_state()."""
        if self.closed:
            return
        self.closed = True
        if self.tls is not None and not self.tls_broken:
            try:
                self.tls.shutdown()         # close_notify, best effort, never waits
            except (SSL.Error, OSError):
                pass
        handed_off = self.server is not None    # smtpd owns the client's input now
        self.loop.cancel(self.timer)
        self.timer = None
        if self.score is not None:
            self.score.cancel()
        if self.server is not None:
            self.loop.remove(self.server)
            self.server.close()
            self.server = None
            self.screen.post_queue -= 1
        self.loop.remove(self.fd)
        if not handed_off and not self.hangup:
            # Unread input (a pregreeting client's) would turn the close into a reset
            # that can overtake the last reply.
            _drop(self.conn, PEEK)
        try:
            self.conn.close()
        except OSError:
            pass
        self.screen.sessions -= 1
        self.screen.check_queue -= 1
        if self.info is not None:
            self.info.concurrency -= 1
            if self.info.concurrency <= 0:
                self.screen.clients.pop(self.addr, None)


def delta_time(seconds: float) -> str:
    """psc_format_delta_time(): two significant digits, at most two decimals."""
    if seconds >= 10:
        return str(int(seconds))
    if seconds <= 0:
        return "0"
    decimals = min(2, max(0, 1 - math.floor(math.log10(seconds))))
    text = f"{seconds:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text and decimals else text


def _unmap(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def _drop(conn: socket.socket, length: int) -> None:
    try:
        conn.recv(length, socket.MSG_DONTWAIT)
    except OSError:
        pass


# --- the program ---------------------------------------------------------------------------
def prepare(cfg, service) -> Prepared:
    """Run in the master per generation: a bad setting stops the service from starting,
    and says why; the TLS contexts are built here, before the fork, as smtpd's are."""
    Settings(cfg)
    try:
        prepared = Prepared(level=T.server_security_level(cfg, "postscreen"))
    except T.TLSConfigError as exc:
        raise ConfigError(str(exc)) from None
    if prepared.level == "none":
        return prepared
    try:
        prepared.tls = T.server_tls(cfg, level=prepared.level)
    except T.TLSConfigError as exc:
        prepared.tls_problem = str(exc)
        return prepared
    prepared.rekey_interval = cfg["smtpd_tls_session_cache_timeout"]
    return prepared


def rekey(cfg, prepared: Prepared) -> Prepared:
    """Run in the master each session ticket key period, as smtpd's rekey()."""
    try:
        return dataclasses.replace(prepared, tls=T.rotate_server_tls(cfg, prepared.tls))
    except T.TLSConfigError as exc:
        raise ConfigError(str(exc)) from None


def pre_init(ctx) -> None:
    """As root, before the jail: settings, tables, the DNS servers, the cache."""
    prepared = ctx.prepared if isinstance(ctx.prepared, Prepared) else None
    try:
        settings = Settings(ctx.cfg, prepared)
    except ConfigError as exc:
        msg.fatal(str(exc))
    if prepared is not None and prepared.tls_problem:
        msg.warn(f"TLS library problem: {prepared.tls_problem}; "
                 "TLS is not available to clients")
    ref = ctx.cfg.get("postscreen_cache_map")
    if ref:
        with server.as_mail_owner(ctx.cfg):
            settings.cache = Cache(ref)
        if not settings.cache.enabled:
            settings.cache = None
    ctx.state["settings"] = settings


def post_init(ctx, loop) -> None:
    settings = ctx.state["settings"]
    screen = ctx.state["screen"] = Screen(settings, loop)
    interval = settings.cleanup_interval
    # memcache: and redis: cannot be walked: their ttl ages entries out (postscreen/cache.py)
    if settings.cache is not None and settings.cache.iterable and interval > 0:
        def cleanup():
            if settings.cache is None:
                return
            steps = settings.cache.cleanup_steps(settings.retention, settings.enabled())

            def step():                 # a batch per turn: clients are served between
                try:
                    next(steps)
                except StopIteration:
                    loop.call_later(interval, cleanup)
                    return
                loop.call_later(0, step)
            step()
        loop.call_later(interval, cleanup)
    ctx.state["on_client"] = screen.on_client


def on_exit(ctx) -> None:
    settings = ctx.state.get("settings")
    if settings is not None and settings.cache is not None:
        settings.cache.close()


def main(ctx) -> int:
    """The postscreen program: one event loop for every client."""
    def on_client(conn, loop):
        ctx.state["on_client"](conn, loop)

    def count():
        screen = ctx.state.get("screen")
        return screen.sessions if screen else 0
    return server.multi_server(ctx, on_client, pre_init=pre_init, post_init=post_init,
                               on_exit=on_exit, client_count=count,
                               watchdog=ctx.cfg["postscreen_watchdog_timeout"])
