"""The parameter table: every main.cf parameter of postfix-py, declared once.

Each row is a Param: the name (Postfix's spelling), the default as main.cf would write it
(`$name` references and `${name?value}` conditionals allowed; they expand lazily), the type,
and a one-line description. Programs never read main.cf themselves: they ask a
`maincf.Config` for a typed value, and the Config converts the text with the row's type.
`postconf -d` prints this table.

TYPES
    BOOL   yes or no (any case).
    INT    a decimal integer, within the row's bounds.
    TIME   an integer with an optional unit s, m, h, d or w; without one, the row's unit.
           The typed value is in seconds.
    SIZE   a byte count (decimal integer).
    LIST   words separated by commas or white space.
    TABLE  a LIST whose words are lookup tables (`type:name`).
    STR    text, as written; a row with `values` allows only those words (any case).

FUNCTIONS
    lookup(name) -> Param or None; convert(param, text) -> typed value, raising ParamError
    with a message that names the parameter; split_list(text) -> list of words.
    RAW: the names whose values their program expands itself (no main.cf expansion).
    FORMER_NAMES: Postfix's former names of renamed parameters, each with its new name.

FORMER NAMES
    As Postfix (postconf_builtin.c's legacy table): a former name is declared with an
    empty default, and the new name's default refers to it, so an old main.cf that sets
    the former name still works and postconf does not call it unused. Programs read
    only the new name. Postfix's expressions are kept as they are, quirks included:
    postscreen_dnsbl_ttl is a number of hours (`h` is appended), and a non-empty
    smtpd_client_connection_limit_exceptions makes smtpd_client_event_limit_exceptions
    empty (`${name:text}` is empty when name is set).

Defaults are the seed document's where it gives one (the legacy TLS README), otherwise
Postfix 3.7's `postconf -d`, except where DEVIATIONS below says why not.

DEVIATIONS
    config_directory, queue_directory, data_directory: postfix-py's own paths, so that it
    can run beside a Postfix on the same host. syslog_name, mail_name: postfix-py.
    smtpd_tls_ccert_verifydepth, smtp_tls_scert_verifydepth: 5 as the seed says.
    *_tls_fingerprint_digest: sha256 (Postfix 3.7 at compatibility level 3.6 and later).
    smtpd_forbid_bare_newline: normalize (SPEC-NOTES.md: SMTP smuggling).
    smtpd_sasl_type: dovecot; postfix-py has no Cyrus SASL. smtp_sasl_type and
    smtp_sasl_path are not declared: the client's SASL (PLAIN, LOGIN) is built in.
    mynetworks_style, relay_domains, smtpd_relay_restrictions: Postfix's values at
    compatibility level 2 and later (no compatibility_level parameter here).
    alias_maps: hash:/etc/aliases (Postfix on Linux adds nis:mail.aliases; there is no nis:
    table type here).
    smtputf8_enable: yes, Postfix's value at compatibility level 1 and later.
    smtp_tls_dane_insecure_mx_policy: dane, the default of Postfix 3.7.13, 3.8.8, 3.9.2
    and 3.10 (earlier 3.7 releases wrote a default that depends on
    smtp_tls_security_level, which Postfix's documentation calls a mistake).
    unverified_recipient_tempfail_action, unverified_sender_tempfail_action:
    defer_if_permit, the value of Postfix's $reject_tempfail_action, which is not here.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

BOOL, INT, TIME, SIZE, LIST, TABLE, STR = "bool", "int", "time", "size", "list", "table", "str"

_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TIME_RE = re.compile(r"^(\d{1,19})([smhdw]?)$", re.IGNORECASE)   # 64 bits at most
_LIST_SEP = re.compile(r"[\s,]+")


class ParamError(ValueError):
    """A parameter value that does not convert to the parameter's type."""


@dataclass(frozen=True)
class Param:
    name: str
    default: str
    type: str
    doc: str
    min: int | None = None
    max: int | None = None
    unit: str = "s"          # TIME only: the unit of a bare number
    values: tuple = ()       # STR only: the words allowed (any case), when not free text


def _p(name, default, type_, doc, **kw):
    return Param(name, default, type_, doc, **kw)


_SMTP_CLIENT_TLS = [
    # (suffix, default, type, doc, extra) shared by smtp_ and lmtp_ (lmtp_ differs where noted)
    ("tls_CAfile", "", STR, "file of trusted CA certificates (PEM), read before chroot"),
    ("tls_CApath", "", STR, "directory of trusted CA certificates (c_rehash style), read inside the jail"),
    ("tls_cert_file", "", STR, "RSA client certificate (PEM), presented when set"),
    ("tls_key_file", "$%s_tls_cert_file", STR, "RSA private key of the client certificate"),
    ("tls_dcert_file", "", STR, "DSA client certificate (PEM)"),
    ("tls_dkey_file", "$%s_tls_dcert_file", STR, "DSA private key of the client certificate"),
    ("tls_eccert_file", "", STR, "ECDSA client certificate (PEM)"),
    ("tls_eckey_file", "$%s_tls_eccert_file", STR, "ECDSA private key of the client certificate"),
    ("tls_chain_files", "", LIST, "files of keys each followed by its certificate chain"),
    ("tls_loglevel", "0", INT, "TLS logging: 0 none, 1 handshake and certificate, 2 negotiation levels, 3 hex dump, 4 full dump", {"min": 0, "max": 4}),
    ("tls_session_cache_database", "", STR, "tlsmgr's client session cache (type:path; btree, hash and lmdb are all LMDB)"),
    ("tls_session_cache_timeout", "3600s", TIME, "lifetime of a cached client TLS session", {"min": 0, "max": 8640000}),
    ("tls_enforce_peername", "yes", BOOL, "with enforced TLS, require the server name to match its certificate"),
    ("tls_note_starttls_offer", "no", BOOL, "log `Host offered STARTTLS: [hostname]` when TLS is not used"),
    ("tls_scert_verifydepth", "5", INT, "verification depth of server certificate chains", {"min": 1}),
    ("tls_cipherlist", "", STR, "legacy OpenSSL cipher string, passed to OpenSSL as written"),
    ("tls_per_site", "", TABLE, "per-site TLS policy by server host name or next-hop destination: NONE, MAY, MUST_NOPEERMATCH, MUST"),
    ("tls_policy_maps", "", TABLE, "per-destination TLS security levels (the modern per_site)"),
    ("tls_security_level", "", STR, "client TLS level: none, may, encrypt, dane, dane-only, fingerprint, verify, secure (empty: the legacy parameters decide)"),
    ("tls_protocols", ">=TLSv1", STR, "TLS protocols with opportunistic TLS"),
    ("tls_mandatory_protocols", ">=TLSv1", STR, "TLS protocols with mandatory TLS"),
    ("tls_ciphers", "medium", STR, "minimum cipher grade with opportunistic TLS"),
    ("tls_mandatory_ciphers", "medium", STR, "minimum cipher grade with mandatory TLS"),
    ("tls_exclude_ciphers", "", LIST, "ciphers excluded with any TLS"),
    ("tls_mandatory_exclude_ciphers", "", LIST, "ciphers excluded with mandatory TLS"),
    ("tls_fingerprint_digest", "sha256", STR, "digest of certificate fingerprints: md5, sha1, sha256"),
    ("tls_fingerprint_cert_match", "", LIST, "fingerprints accepted at the fingerprint level"),
    ("tls_verify_cert_match", "hostname", LIST, "names matched at the verify level"),
    ("tls_secure_cert_match", "nexthop, dot-nexthop", LIST, "names matched at the secure level"),
    ("tls_servername", "", STR, "SNI name sent to the server (empty: none)"),
    ("tls_wrappermode", "no", BOOL, "speak TLS from the first byte (SMTPS) instead of STARTTLS"),
    ("tls_connection_reuse", "no", BOOL, "let TLS connections into the connection cache, kept in the delivery process (smtp/conncache.py)"),
    ("tls_block_early_mail_reply", "no", BOOL, "defer the delivery when a server reply arrives in the STARTTLS session before our MAIL FROM (CVE-2009-3555)"),
    ("use_tls", "no", BOOL, "legacy: use STARTTLS when the server offers it"),
    ("enforce_tls", "no", BOOL, "legacy: deliver only over TLS with a verified, matching server certificate"),
    ("starttls_timeout", "300s", TIME, "time limit of reads and writes during the TLS handshake and shutdown", {"min": 1}),
    ("sasl_auth_enable", "no", BOOL, "authenticate to the server with SASL"),
    ("sasl_password_maps", "", TABLE, "SASL user:password per next hop or host"),
    ("sasl_security_options", "noplaintext, noanonymous", LIST, "SASL mechanism properties refused without TLS"),
    ("sasl_tls_security_options", "$%s_sasl_security_options", LIST, "SASL mechanism properties refused with TLS"),
    ("sasl_mechanism_filter", "", LIST, "SASL mechanisms the client may use"),
]

PARAMS: list[Param] = [
    # --- files, users, identity ---------------------------------------------------------
    _p("config_directory", "/etc/postfix-py", STR, "directory of main.cf and master.cf"),
    _p("queue_directory", "/var/spool/postfix-py", STR, "the queue, and the chroot jail of chrooted services"),
    _p("data_directory", "/var/lib/postfix-py", STR, "writable data outside the jail: caches, the PRNG exchange file"),
    _p("process_id_directory", "pid", STR, "lock and pid files, relative to queue_directory"),
    _p("mail_owner", "postfix", STR, "the user that owns the queue and that daemons run as"),
    _p("mail_name", "postfix-py", STR, "the mail system's name in the SMTP greeting and bounces"),
    _p("mail_version", "0.1.0", STR, "the version of postfix-py (read-only)"),
    _p("myhostname", "", STR, "this host's fully qualified name (default: from the system)"),
    _p("mydomain", "", STR, "this host's domain (default: myhostname without its first label)"),
    _p("myorigin", "$myhostname", STR, "the domain of locally posted mail"),
    _p("mydestination", "$myhostname, localhost.$mydomain, localhost", LIST, "domains delivered locally"),
    _p("mynetworks_style", "host", STR, "trusted networks when mynetworks is empty: host, subnet or class"),
    _p("mynetworks", "", LIST, "trusted client networks (default: per mynetworks_style; loopback always)"),
    _p("relay_domains", "", LIST, "domains this host relays to"),
    _p("relayhost", "", STR, "next hop for non-local mail: host, [host], host:port or [host]:port"),
    _p("inet_interfaces", "all", LIST, "addresses that inet services listen on"),
    _p("inet_protocols", "all", LIST, "ipv4, ipv6 or all"),
    _p("stress", "", STR, "set by the master under overload; selects stress defaults"),
    _p("default_database_type", "hash", STR, "table type when postmap is given a bare file name"),
    _p("lmdb_map_size", "16777216", SIZE, "initial size of an LMDB map (tables and caches); grown when full", min=65536),
    # --- logging ------------------------------------------------------------------------
    _p("syslog_name", "postfix-py", STR, "the name before /service[pid] in log lines"),
    _p("syslog_facility", "mail", STR, "syslog facility of the mail log"),
    _p("maillog_file", "", STR, "log to this file (or /dev/stdout) instead of syslog"),
    # --- master and worker skeleton -----------------------------------------------------
    _p("default_process_limit", "100", INT, "default maxproc of a master.cf service", min=1),
    _p("max_idle", "100s", TIME, "a worker exits after this long without a client", min=1),
    _p("max_use", "100", INT, "a worker exits after this many clients", min=1),
    _p("service_throttle_time", "60s", TIME, "pause of a service whose workers fail at start", min=1),
    _p("daemon_timeout", "18000s", TIME, "watchdog limit of one worker loop pass", min=1),
    _p("ipc_timeout", "3600s", TIME, "time limit of one internal request", min=1),
    _p("in_flow_delay", "1s", TIME, "pause of smtpd before a new message when no flow control token is available (the queue manager falls behind); 0: off", min=0, max=10),
    _p("tls_certificate_reload_interval", "0s", TIME, "postfix-py extension: how often the master looks for changed certificate and key files and then reloads, validated as 'postfix-py reload' (0: never)", min=0),
    _p("anvil_rate_time_unit", "60s", TIME, "anvil: the time unit over which client connection and event rates are counted", min=1),
    _p("anvil_status_update_time", "600s", TIME, "anvil: how often peak usage statistics are logged", min=1),
    # --- smtpd: session and limits ------------------------------------------------------
    _p("smtpd_banner", "$myhostname ESMTP $mail_name", STR, "text of the 220 greeting"),
    _p("smtpd_timeout", "${stress?{10}:{300}}s", TIME, "time limit of one client read or write", min=1),
    _p("smtpd_per_record_deadline", "", STR, "the former name of smtpd_per_request_deadline (its default refers to it)"),
    _p("smtpd_per_request_deadline", "${smtpd_per_record_deadline?{$smtpd_per_record_deadline}:{${stress?{yes}:{no}}}}", BOOL, "yes: the content of a DATA or BDAT request must arrive within smtpd_timeout, extended by smtpd_min_data_rate (a trickling client is cut off); command lines always have smtpd_timeout as a deadline in postfix-py"),
    _p("smtpd_min_data_rate", "500", INT, "with smtpd_per_request_deadline: bytes per second of content that extend the deadline by one second", min=1),
    _p("smtpd_starttls_timeout", "${stress?{10}:{300}}s", TIME, "time limit of reads and writes during the server TLS handshake and shutdown", min=1),
    _p("message_size_limit", "10240000", SIZE, "largest message accepted, in bytes (0: no limit)", min=0),
    _p("header_size_limit", "102400", SIZE, "largest message header kept, in bytes", min=1),
    _p("line_length_limit", "2048", INT, "longest SMTP command or message line kept in one piece", min=80),
    _p("smtpd_recipient_limit", "1000", INT, "recipients accepted per message", min=1),
    _p("smtpd_recipient_overshoot_limit", "1000", INT, "recipients past smtpd_recipient_limit answered 452 before those replies count as errors", min=0),
    _p("smtpd_soft_error_limit", "10", INT, "errors after which each reply is delayed", min=0),
    _p("smtpd_hard_error_limit", "${stress?{1}:{20}}", INT, "errors after which the connection is closed", min=1),
    _p("smtpd_error_sleep_time", "1s", TIME, "delay of each reply past the soft error limit", min=0),
    _p("smtpd_junk_command_limit", "${stress?{1}:{100}}", INT, "NOOP, VRFY, ETRN and RSET commands before they count as errors", min=1),
    _p("smtpd_client_connection_count_limit", "50", INT, "simultaneous connections from one client per service (anvil; 0: no limit)", min=0),
    _p("smtpd_client_connection_rate_limit", "0", INT, "connections from one client per service and anvil_rate_time_unit (0: no limit)", min=0),
    _p("smtpd_client_message_rate_limit", "0", INT, "MAIL FROM requests from one client per service and anvil_rate_time_unit (0: no limit)", min=0),
    _p("smtpd_client_recipient_rate_limit", "0", INT, "RCPT TO requests from one client per service and anvil_rate_time_unit (0: no limit)", min=0),
    _p("smtpd_client_new_tls_session_rate_limit", "0", INT, "new (not resumed) TLS sessions of one client per service and anvil_rate_time_unit (0: no limit)", min=0),
    _p("smtpd_client_auth_rate_limit", "0", INT, "AUTH commands from one client per service and anvil_rate_time_unit (0: no limit)", min=0),
    _p("smtpd_client_connection_limit_exceptions", "", STR, "the former name of smtpd_client_event_limit_exceptions (its default refers to it)"),
    _p("smtpd_client_event_limit_exceptions", "${smtpd_client_connection_limit_exceptions:$mynetworks}", LIST, "clients never held to the smtpd_client_*_limit limits (host names, addresses, networks, tables)"),
    _p("disable_vrfy_command", "no", BOOL, "refuse the VRFY command"),
    _p("smtpd_helo_required", "no", BOOL, "require HELO or EHLO before MAIL"),
    _p("smtpd_discard_ehlo_keywords", "", LIST, "EHLO keywords not announced"),
    _p("smtpd_noop_commands", "", LIST, "commands answered 250 without action"),
    _p("smtpd_forbidden_commands", "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}", LIST, "commands (words or type:table) that, like a header line, end the session with 221"),
    _p("smtpd_discard_ehlo_keyword_address_maps", "", TABLE, "client address -> EHLO keywords not announced to it (instead of smtpd_discard_ehlo_keywords)"),
    _p("smtpd_reject_footer", "", STR, "text appended to every 4XX/5XX reply (\\n: a new line, \\c at the start: same line; $client_address ... expanded per reply)"),
    _p("smtpd_reject_footer_maps", "", TABLE, "reply text -> its footer (else smtpd_reject_footer)"),
    _p("smtpd_expansion_filter", "\\t\\40!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\\\]^_`abcdefghijklmnopqrstuvwxyz{|}~", STR, "characters allowed in $name values expanded into replies; others become _"),
    _p("smtpd_command_filter", "", STR, "table that replaces an SMTP command line before smtpd parses it"),
    _p("smtpd_peername_lookup", "yes", BOOL, "look up the client's host name"),
    _p("smtpd_upstream_proxy_protocol", "", STR, "the proxy protocol before the greeting: empty (none) or haproxy (PROXY v1 and v2)",
       values=("", "haproxy")),
    _p("smtpd_upstream_proxy_timeout", "5s", TIME, "time limit for the PROXY header", min=1),
    # --- postscreen (postscreen/service.py) --------------------------------------------
    _p("postscreen_access_list", "permit_mynetworks", LIST, "postscreen's permanent allow and deny list: permit_mynetworks, permit, reject, dunno, type:table (address lookups whose result is permit, reject or dunno)"),
    _p("postscreen_blacklist_action", "", STR, "the former name of postscreen_denylist_action (its default refers to it)", values=("", "ignore", "enforce", "drop")),
    _p("postscreen_denylist_action", "${postscreen_blacklist_action?{$postscreen_blacklist_action}:{ignore}}", STR, "a client that postscreen_access_list denies: ignore, enforce (reject its recipients) or drop (521 now)", values=("ignore", "enforce", "drop")),
    _p("postscreen_greet_wait", "${stress?{2}:{6}}s", TIME, "how long postscreen waits for a client to talk before its turn, and for the DNSBL replies", min=1),
    _p("postscreen_greet_banner", "$smtpd_banner", STR, "the teaser 220- line postscreen sends before the real greeting (empty: no pregreet test)"),
    _p("postscreen_greet_action", "ignore", STR, "a client that talks before its turn: ignore, enforce or drop", values=("ignore", "enforce", "drop")),
    _p("postscreen_greet_ttl", "1d", TIME, "how long a passed pregreet test is remembered", min=1),
    _p("postscreen_dnsbl_sites", "", LIST, "DNS lists that postscreen asks: domain[=d.d.d.d][*weight]"),
    _p("postscreen_dnsbl_threshold", "1", INT, "the DNSBL score at which postscreen_dnsbl_action applies", min=1),
    _p("postscreen_dnsbl_whitelist_threshold", "", STR, "the former name of postscreen_dnsbl_allowlist_threshold (its default refers to it)"),
    _p("postscreen_dnsbl_allowlist_threshold", "${postscreen_dnsbl_whitelist_threshold?{$postscreen_dnsbl_whitelist_threshold}:{0}}", INT, "a DNSBL score at or below this negative value passes the other tests too (0: off)"),
    _p("postscreen_dnsbl_action", "ignore", STR, "a client whose DNSBL score reaches the threshold: ignore, enforce or drop", values=("ignore", "enforce", "drop")),
    _p("postscreen_dnsbl_min_ttl", "60s", TIME, "least time a DNSBL result is remembered", min=1),
    _p("postscreen_dnsbl_ttl", "", STR, "the former name of postscreen_dnsbl_max_ttl, a number of hours (its default refers to it)"),
    _p("postscreen_dnsbl_max_ttl", "${postscreen_dnsbl_ttl?{$postscreen_dnsbl_ttl}:{1}}h", TIME, "most time a DNSBL result is remembered", min=1),
    _p("postscreen_dnsbl_timeout", "10s", TIME, "time limit of postscreen's DNSBL queries", min=1),
    _p("postscreen_whitelist_interfaces", "", STR, "the former name of postscreen_allowlist_interfaces (its default refers to it)"),
    _p("postscreen_allowlist_interfaces", "${postscreen_whitelist_interfaces?{$postscreen_whitelist_interfaces}:{static:all}}", LIST, "server addresses on which a client may pass postscreen's tests (elsewhere, as on a backup MX: ALLOWLIST VETO)"),
    _p("postscreen_watchdog_timeout", "10s", TIME, "time one pass of postscreen's event loop (a client command, a cache operation) may take before the process is killed", min=10),
    _p("postscreen_discard_ehlo_keywords", "$smtpd_discard_ehlo_keywords", LIST, "EHLO keywords that postscreen's engine does not announce"),
    _p("postscreen_discard_ehlo_keyword_address_maps", "$smtpd_discard_ehlo_keyword_address_maps", TABLE, "client address -> EHLO keywords postscreen's engine does not announce to it"),
    _p("postscreen_reject_footer", "$smtpd_reject_footer", STR, "text appended to postscreen's 4XX/5XX replies, as smtpd_reject_footer"),
    _p("postscreen_reject_footer_maps", "$smtpd_reject_footer_maps", TABLE, "reply text -> its footer in postscreen (else postscreen_reject_footer)"),
    _p("postscreen_expansion_filter", "$smtpd_expansion_filter", STR, "characters allowed in $name values expanded into postscreen's replies"),
    _p("postscreen_command_filter", "", STR, "table that replaces an SMTP command line before postscreen's engine parses it"),
    _p("postscreen_disable_vrfy_command", "$disable_vrfy_command", BOOL, "postscreen's engine answers VRFY with 502 (its EHLO follows disable_vrfy_command, as Postfix)"),
    _p("postscreen_helo_required", "$smtpd_helo_required", BOOL, "postscreen's engine wants HELO or EHLO before MAIL and ETRN"),
    _p("postscreen_tls_security_level", "$smtpd_tls_security_level", STR, "TLS in postscreen's SMTP engine: none, may (announce STARTTLS) or encrypt (MAIL needs STARTTLS first); empty: postscreen_use_tls and postscreen_enforce_tls decide"),
    _p("postscreen_use_tls", "$smtpd_use_tls", BOOL, "legacy: postscreen's engine announces STARTTLS (postscreen_tls_security_level = may)"),
    _p("postscreen_enforce_tls", "$smtpd_enforce_tls", BOOL, "legacy: postscreen's engine requires STARTTLS before MAIL (postscreen_tls_security_level = encrypt)"),
    _p("postscreen_dnsbl_reply_map", "", STR, "DNS list domain (with its secret) -> the name postscreen's reply shows (empty: the domain itself)"),
    _p("postscreen_cache_map", "btree:$data_directory/postscreen_cache", STR, "postscreen's temporary allowlist (lmdb, btree and hash: LMDB files; memcache:, redis: a store shared by several hosts; empty: no cache)"),
    _p("postscreen_cache_retention_time", "7d", TIME, "how long an expired cache entry is kept", min=0),
    _p("postscreen_cache_cleanup_interval", "12h", TIME, "how often the cache is swept (0: never; ignored for memcache: and redis:, whose ttl ages entries out)", min=0),
    _p("postscreen_post_queue_limit", "$default_process_limit", INT, "connections waiting to be handed to smtpd before new clients get 421 (0: no limit)", min=0),
    _p("postscreen_pre_queue_limit", "$default_process_limit", INT, "connections being screened before new clients get 421 (0: no limit)", min=0),
    _p("postscreen_client_connection_count_limit", "$smtpd_client_connection_count_limit", INT, "simultaneous connections from one client in postscreen (0: no limit)", min=0),
    _p("postscreen_upstream_proxy_protocol", "", STR, "postscreen's proxy protocol before the greeting: empty (none) or haproxy (PROXY v1 and v2)", values=("", "haproxy")),
    _p("postscreen_upstream_proxy_timeout", "5s", TIME, "time limit for the PROXY header at postscreen", min=1),
    _p("postscreen_command_time_limit", "${stress?{10}:{300}}s", TIME, "time limit of one command in postscreen's after-greeting engine", min=1),
    _p("postscreen_command_count_limit", "20", INT, "commands in postscreen's after-greeting engine before it hangs up", min=1),
    _p("postscreen_pipelining_enable", "no", BOOL, "postscreen's after-greeting test: a client that sends a command before the reply to the last one"),
    _p("postscreen_pipelining_action", "enforce", STR, "a client that fails the pipelining test: ignore, enforce or drop", values=("ignore", "enforce", "drop")),
    _p("postscreen_pipelining_ttl", "30d", TIME, "how long a passed pipelining test is remembered", min=1),
    _p("postscreen_non_smtp_command_enable", "no", BOOL, "postscreen's after-greeting test: a client that sends a header line or a postscreen_forbidden_commands command"),
    _p("postscreen_non_smtp_command_action", "drop", STR, "a client that fails the non_smtp_command test: ignore, enforce or drop", values=("ignore", "enforce", "drop")),
    _p("postscreen_non_smtp_command_ttl", "30d", TIME, "how long a passed non_smtp_command test is remembered", min=1),
    _p("postscreen_bare_newline_enable", "no", BOOL, "postscreen's after-greeting test: a client that ends a command with a bare newline"),
    _p("postscreen_bare_newline_action", "ignore", STR, "a client that fails the bare_newline test: ignore, enforce or drop", values=("ignore", "enforce", "drop")),
    _p("postscreen_bare_newline_ttl", "30d", TIME, "how long a passed bare_newline test is remembered", min=1),
    _p("postscreen_forbidden_commands", "$smtpd_forbidden_commands", LIST, "commands that fail the non_smtp_command test (words or type:table)"),
    _p("smtpd_service_name", "smtpd", STR, "the pass service postscreen hands clients to (private/NAME)"),
    _p("smtpd_forbid_bare_newline", "normalize", STR, "bare LF in DATA: no (accept), normalize or yes (treat as CRLF, end only at CRLF.CRLF), note (log, reply and go on), reject (reply and disconnect)",
       values=("no", "normalize", "yes", "note", "reject")),
    _p("smtpd_forbid_bare_newline_exclusions", "$mynetworks", LIST, "clients exempt from smtpd_forbid_bare_newline"),
    _p("smtpd_forbid_bare_newline_reject_code", "550", INT, "reply code for a bare newline", min=400, max=599),
    _p("smtputf8_enable", "yes", BOOL, "SMTPUTF8 support (RFC 6531): announced in EHLO, UTF-8 addresses after MAIL FROM ... SMTPUTF8, malformed UTF-8 in a command refused"),
    _p("requiretls_enable", "yes", BOOL, "REQUIRETLS (RFC 8689): smtpd announces it after STARTTLS and takes MAIL FROM ... REQUIRETLS; the smtp client then delivers only over TLS with a matched certificate to a server that announces it"),
    _p("tls_required_enable", "yes", BOOL, "honour the \"TLS-Required: no\" message header (RFC 8689): the smtp client limits its TLS level to may and ignores DANE and policy tables"),
    _p("strict_smtputf8", "no", BOOL, "refuse a non-ASCII address in MAIL or RCPT without the SMTPUTF8 parameter"),
    _p("strict_rfc821_envelopes", "no", BOOL, "require <> around MAIL FROM and RCPT TO addresses"),
    _p("hopcount_limit", "50", INT, "Received: headers after which a message is bounced as looping", min=1),
    _p("recipient_delimiter", "", STR, "separators of address extensions"),
    # --- address verification (verify/service.py, lib/verify_client.py, smtpd/check.py) --
    _p("address_verify_service_name", "verify", STR, "the master.cf name of the address verification service (private/NAME)"),
    _p("address_verify_map", "btree:$data_directory/verify_cache", STR, "the address verification cache (lmdb, btree and hash: LMDB files; memcache:, redis: a store shared by several hosts; empty: in memory only)"),
    _p("address_verify_sender", "$double_bounce_sender", STR, "sender of address verification probes (empty or <>: the null sender; without @, @$myorigin is added)"),
    _p("address_verify_sender_ttl", "0s", TIME, "time after which the probe sender's local part gets a new time stamp, so that probes are not greylisted or blocked forever (0: a fixed sender)", min=0),
    _p("address_verify_pending_request_limit", "5000", INT, "probes in the active queue beyond which qmgr defers a probe's recipients with \"4.3.2 Too many address verification requests\" (Postfix: qmgr_message_active_limit's default / 4)", min=1),
    _p("address_verify_positive_expire_time", "31d", TIME, "time after which a successful probe result expires from the cache", min=1),
    _p("address_verify_positive_refresh_time", "7d", TIME, "time after which a successful probe result is refreshed by a new probe", min=1),
    _p("address_verify_negative_cache", "yes", BOOL, "cache the results of failed probes"),
    _p("address_verify_negative_expire_time", "3d", TIME, "time after which a failed probe result expires from the cache", min=1),
    _p("address_verify_negative_refresh_time", "3h", TIME, "time after which a failed probe result is refreshed by a new probe", min=1),
    _p("address_verify_cache_cleanup_interval", "12h", TIME, "how often the cache is swept of expired entries (0: never; ignored for memcache: and redis:, whose ttl ages entries out)", min=0),
    # trivial-rewrite's "verify" class: how qmgr routes a probe (lib/resolve.py PROBE_PARAMS)
    _p("address_verify_relayhost", "$relayhost", STR, "relayhost of address verification probes"),
    _p("address_verify_transport_maps", "$transport_maps", TABLE, "transport_maps of address verification probes"),
    _p("address_verify_default_transport", "$default_transport", STR, "default_transport of address verification probes"),
    _p("address_verify_local_transport", "$local_transport", STR, "local_transport of address verification probes"),
    _p("address_verify_virtual_transport", "$virtual_transport", STR, "virtual_transport of address verification probes"),
    _p("address_verify_relay_transport", "$relay_transport", STR, "relay_transport of address verification probes"),
    _p("address_verify_sender_dependent_relayhost_maps", "$sender_dependent_relayhost_maps", TABLE, "sender_dependent_relayhost_maps of address verification probes"),
    _p("address_verify_sender_dependent_default_transport_maps", "$sender_dependent_default_transport_maps", TABLE, "sender_dependent_default_transport_maps of address verification probes"),
    _p("address_verify_poll_count", "${stress?{1}:{3}}", INT, "how many times smtpd asks the verify service about an address that is being probed (1: no waiting)", min=1),
    _p("address_verify_poll_delay", "3s", TIME, "delay between smtpd's queries about an address that is being probed", min=1),
    _p("unverified_recipient_reject_code", "450", INT, "reply code of reject_unverified_recipient for an address that bounces", min=400, max=599),
    _p("unverified_sender_reject_code", "450", INT, "reply code of reject_unverified_sender for an address that bounces", min=400, max=599),
    _p("unverified_recipient_defer_code", "450", INT, "reply code of reject_unverified_recipient while the address is unknown or its probe failed for now", min=200, max=599),
    _p("unverified_sender_defer_code", "450", INT, "reply code of reject_unverified_sender while the address is unknown or its probe failed for now", min=200, max=599),
    _p("unverified_recipient_reject_reason", "", STR, "text that replaces the probe's reason in reject_unverified_recipient's rejections (empty: the probe's)"),
    _p("unverified_sender_reject_reason", "", STR, "text that replaces the probe's reason in reject_unverified_sender's rejections (empty: the probe's)"),
    _p("unverified_recipient_tempfail_action", "defer_if_permit", STR, "reject_unverified_recipient when the address is not yet known: defer_if_permit (unless a later restriction rejects) or defer", values=("defer_if_permit", "defer")),
    _p("unverified_sender_tempfail_action", "defer_if_permit", STR, "reject_unverified_sender when the address is not yet known: defer_if_permit (unless a later restriction rejects) or defer", values=("defer_if_permit", "defer")),
    # --- cleanup (lib/cleanup.py): every message on its way into the queue ---------------
    _p("always_add_missing_headers", "no", BOOL, "add a missing Message-Id:, Date: and From: to all mail, not only to mail in a header rewrite context (local_header_rewrite_clients, remote_header_rewrite_domain)"),
    _p("canonical_maps", "", TABLE, "address mapping of envelope senders and recipients (canonical(5))"),
    _p("sender_canonical_maps", "", TABLE, "address mapping of envelope senders, before canonical_maps"),
    _p("recipient_canonical_maps", "", TABLE, "address mapping of envelope recipients, before canonical_maps"),
    _p("canonical_classes", "envelope_sender, envelope_recipient, header_sender, header_recipient", LIST, "address classes canonical_maps applies to"),
    _p("sender_canonical_classes", "envelope_sender, header_sender", LIST, "address classes sender_canonical_maps applies to"),
    _p("recipient_canonical_classes", "envelope_recipient, header_recipient", LIST, "address classes recipient_canonical_maps applies to"),
    _p("local_header_rewrite_clients", "permit_inet_interfaces", LIST, "SMTP clients whose message headers are rewritten as local mail (permit_inet_interfaces, permit_mynetworks, permit_sasl_authenticated, type:table of client addresses)"),
    _p("remote_header_rewrite_domain", "", STR, "domain that qualifies header addresses of other SMTP clients; empty: their headers are not rewritten"),
    _p("receive_override_options", "", LIST, "what smtpd and pickup leave out of the mail they receive: no_unknown_recipient_checks, no_address_mappings, no_header_body_checks, no_milters (for a content filter's re-injection service)"),
    _p("message_drop_headers", "bcc, content-length, resent-bcc, return-path", LIST, "message headers that cleanup removes, after header_checks"),
    _p("header_address_token_limit", "10240", INT, "tokens of one header that address rewriting looks at", min=1),
    _p("virtual_maps", "", STR, "the former name of virtual_alias_maps (its default refers to it)"),
    _p("virtual_alias_maps", "$virtual_maps", TABLE, "aliases of envelope recipients, expanded recursively (virtual(5))"),
    _p("virtual_alias_expansion_limit", "1000", INT, "addresses one recipient may expand into through virtual_alias_maps", min=1),
    _p("virtual_alias_recursion_limit", "1000", INT, "nesting depth of virtual_alias_maps expansion", min=1),
    _p("enable_original_recipient", "yes", BOOL, "keep each recipient's original address (as given, before rewriting and alias expansion) for X-Original-To:, orig_to= and notices"),
    _p("masquerade_domains", "", LIST, "domains whose subdomains are stripped from addresses (! excludes)"),
    _p("masquerade_classes", "envelope_sender, header_sender, header_recipient", LIST, "address classes masquerading applies to"),
    _p("masquerade_exceptions", "", LIST, "local parts never masqueraded"),
    _p("always_bcc", "", STR, "an address that gets a copy of every message"),
    _p("default_filter_nexthop", "", STR, "next hop of a content_filter or FILTER transport that names none; empty: the recipient domain"),
    _p("content_filter", "", STR, "transport:destination that qmgr sends every new message to, instead of its recipients' routes (FILTER_README)"),
    _p("sender_bcc_maps", "", TABLE, "blind copy address by envelope sender"),
    _p("recipient_bcc_maps", "", TABLE, "blind copy address by envelope recipient"),
    _p("header_checks", "", TABLE, "patterns matched against each primary message header (header_checks(5))"),
    _p("mime_header_checks", "$header_checks", TABLE, "patterns matched against MIME headers: Content-* and MIME-Version anywhere, and every header of a multipart part"),
    _p("nested_header_checks", "$header_checks", TABLE, "patterns matched against the non-MIME headers of attached messages (message/rfc822)"),
    _p("body_checks", "", TABLE, "patterns matched against each body line (header_checks(5))"),
    _p("body_checks_size_limit", "51200", SIZE, "body bytes that body_checks looks at", min=0),
    # --- address parsing and recipient validation (lib/resolve.py, smtpd/check.py) -------
    _p("allow_percent_hack", "yes", BOOL, "rewrite user%domain to user@domain"),
    _p("swap_bangpath", "yes", BOOL, "rewrite site!user to user@site"),
    _p("append_at_myorigin", "yes", BOOL, "append @$myorigin to an address without a domain"),
    _p("append_dot_mydomain", "no", BOOL, "append .$mydomain to a domain without a dot (Postfix's default at compatibility level 1 and later)"),
    _p("resolve_dequoted_address", "yes", BOOL, "look for routing operators (@ % !) inside a quoted local part"),
    _p("resolve_null_domain", "no", BOOL, "resolve user@ as user (no: an error)"),
    _p("smtpd_reject_unlisted_recipient", "yes", BOOL, "reject a recipient unknown in its address class's recipient table at RCPT"),
    _p("smtpd_reject_unlisted_sender", "no", BOOL, "reject a sender unknown in its address class's recipient table at MAIL"),
    _p("local_recipient_maps", "unix:passwd.byname $alias_maps", TABLE, "known local recipients: the accounts and the aliases; empty: any (Postfix reads the accounts through proxy:)"),
    _p("relay_recipient_maps", "", TABLE, "known relay_domains recipients; empty: any"),
    _p("unknown_local_recipient_reject_code", "550", INT, "reply code for a recipient not in local_recipient_maps", min=400, max=599),
    _p("unknown_relay_recipient_reject_code", "550", INT, "reply code for a recipient not in relay_recipient_maps", min=400, max=599),
    _p("unknown_virtual_mailbox_reject_code", "550", INT, "reply code for a recipient not in virtual_mailbox_maps", min=400, max=599),
    _p("unknown_virtual_alias_reject_code", "550", INT, "reply code for a virtual_alias_domains recipient not in virtual_alias_maps", min=400, max=599),
    # --- smtpd: access control ----------------------------------------------------------
    _p("smtpd_client_restrictions", "", LIST, "restrictions at connect"),
    _p("smtpd_helo_restrictions", "", LIST, "restrictions at HELO/EHLO"),
    _p("smtpd_sender_restrictions", "", LIST, "restrictions at MAIL FROM"),
    _p("smtpd_relay_restrictions", "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", LIST, "relay restrictions at RCPT TO"),
    _p("smtpd_recipient_restrictions", "", LIST, "spam restrictions at RCPT TO"),
    _p("smtpd_data_restrictions", "", LIST, "restrictions at DATA"),
    _p("smtpd_end_of_data_restrictions", "", LIST, "restrictions at end of DATA"),
    _p("smtpd_etrn_restrictions", "", LIST, "restrictions at ETRN"),
    _p("fast_flush_domains", "$relay_domains", LIST, "domains whose deferred mail ETRN may flush"),
    _p("smtpd_delay_reject", "yes", BOOL, "apply client, HELO and sender restrictions at RCPT TO"),
    _p("smtpd_policy_service_timeout", "100s", TIME, "time limit to connect to, write to or read from a check_policy_service server", min=1),
    _p("smtpd_policy_service_max_idle", "300s", TIME, "time after which an idle policy server connection is closed", min=1),
    _p("smtpd_policy_service_max_ttl", "1000s", TIME, "time after which a policy server connection is closed, busy or not", min=1),
    _p("smtpd_policy_service_request_limit", "0", INT, "requests per policy server connection (0: no limit)", min=0),
    _p("smtpd_policy_service_try_limit", "2", INT, "tries of one policy request before the default action", min=1),
    _p("smtpd_policy_service_retry_delay", "1s", TIME, "delay before a policy request is tried again", min=1),
    _p("smtpd_policy_service_default_action", "451 4.3.5 Server configuration problem", STR, "access(5) action when the policy server cannot be asked"),
    _p("smtpd_policy_service_policy_context", "", STR, "the policy_context attribute sent with each policy request"),
    # milters (lib/milter.py), as Postfix's milter8
    _p("smtpd_milters", "", STR, "milter applications for mail that arrives by SMTP (inet:host:port, unix:path, { name attr=value ... })"),
    _p("smtpd_milter_maps", "", TABLE, "client IP address -> milters for it instead of smtpd_milters (same syntax; DISABLE: none)"),
    _p("non_smtpd_milters", "", STR, "milter applications for mail that arrives other than by smtpd (pickup)"),
    _p("milter_protocol", "6", STR, "the Sendmail milter protocol version (2, 3, 4 or 6, optionally with no_header_reply)"),
    _p("milter_default_action", "tempfail", STR, "what happens when a milter is not available or misbehaves: accept, reject, tempfail or quarantine"),
    _p("milter_connect_timeout", "30s", TIME, "time limit to connect to a milter and to negotiate", min=1),
    _p("milter_command_timeout", "30s", TIME, "time limit to send a command to a milter and to read its reply", min=1),
    _p("milter_content_timeout", "300s", TIME, "time limit to send message content to a milter and to read its reply", min=1),
    _p("milter_connect_macros", "j {daemon_name} {daemon_addr} v _", STR, "macros sent to milters with the connect event"),
    _p("milter_helo_macros", "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}", STR, "macros sent to milters with HELO and EHLO"),
    _p("milter_mail_macros", "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}", STR, "macros sent to milters with MAIL FROM"),
    _p("milter_rcpt_macros", "i {rcpt_addr} {rcpt_host} {rcpt_mailer}", STR, "macros sent to milters with RCPT TO"),
    _p("milter_data_macros", "i", STR, "macros sent to milters with DATA"),
    _p("milter_end_of_header_macros", "i", STR, "macros sent to milters with the end of the message headers"),
    _p("milter_end_of_data_macros", "i", STR, "macros sent to milters with the end of the message"),
    _p("milter_unknown_command_macros", "", STR, "macros sent to milters with an unknown SMTP command"),
    _p("milter_macro_daemon_name", "$myhostname", STR, "the {daemon_name} macro value"),
    _p("milter_macro_v", "$mail_name $mail_version", STR, "the {v} macro value"),
    _p("milter_header_checks", "", TABLE, "header_checks(5) patterns for the headers that milters add or change"),
    _p("relay_clientcerts", "", TABLE, "fingerprints of client certificates that may relay (permit_tls_clientcerts)"),
    _p("access_map_reject_code", "554", INT, "reply code of REJECT in an access table", min=400, max=599),
    _p("relay_domains_reject_code", "554", INT, "reply code of reject_unauth_destination", min=400, max=599),
    _p("defer_code", "450", INT, "reply code of defer and defer_unauth_destination", min=400, max=599),
    _p("reject_code", "554", INT, "reply code of reject", min=400, max=599),
    _p("unknown_client_reject_code", "450", INT, "reply code for a client without a host name", min=400, max=599),
    _p("unknown_address_reject_code", "450", INT, "reply code for an address whose domain does not resolve", min=400, max=599),
    _p("unknown_hostname_reject_code", "450", INT, "reply code of reject_unknown_helo_hostname", min=400, max=599),
    _p("invalid_hostname_reject_code", "501", INT, "reply code of reject_invalid_helo_hostname", min=400, max=599),
    _p("non_fqdn_reject_code", "504", INT, "reply code of reject_non_fqdn_helo_hostname, reject_non_fqdn_sender and reject_non_fqdn_recipient", min=400, max=599),
    _p("maps_rbl_reject_code", "554", INT, "reply code of a DNS list rejection ($rbl_code)", min=400, max=599),
    _p("rbl_reply_maps", "", TABLE, "reply templates of DNS list rejections, looked up by list domain (as written, with =d.d.d.d)"),
    _p("default_rbl_reply", "$rbl_code Service unavailable; $rbl_class [$rbl_what] blocked using $rbl_domain${rbl_reason?; $rbl_reason}", STR, "reply template of a DNS list rejection; $rbl_code, $rbl_class, $rbl_what, $rbl_domain, $rbl_reason are expanded at the time"),
    _p("smtpd_dns_nameservers", "", LIST, "postfix-py extension: DNS servers of smtpd's DNS restrictions and postscreen's DNSBL queries (address, address:port or [address]:port); empty: the system's resolv.conf, read before the chroot"),
    # --- smtpd: TLS (seed: SMTP Server specific settings) -------------------------------
    _p("smtpd_use_tls", "no", BOOL, "legacy: announce STARTTLS (smtpd_tls_security_level = may)"),
    _p("smtpd_enforce_tls", "no", BOOL, "legacy: require STARTTLS before MAIL (smtpd_tls_security_level = encrypt)"),
    _p("smtpd_tls_security_level", "", STR, "server TLS level: none, may or encrypt; verify, secure and fingerprint act as encrypt, with a warning (empty: the legacy parameters decide)",
       values=("", "none", "may", "encrypt", "verify", "secure", "fingerprint")),
    _p("smtpd_tls_wrappermode", "no", BOOL, "speak TLS from the first byte (SMTPS, port 465); set with -o in master.cf"),
    _p("smtpd_tls_cert_file", "", STR, "RSA server certificate (PEM, server certificate first, then its CAs)"),
    _p("smtpd_tls_key_file", "$smtpd_tls_cert_file", STR, "RSA private key of the server certificate (unencrypted)"),
    _p("smtpd_tls_dcert_file", "", STR, "DSA server certificate (PEM)"),
    _p("smtpd_tls_dkey_file", "$smtpd_tls_dcert_file", STR, "DSA private key of the server certificate"),
    _p("smtpd_tls_eccert_file", "", STR, "ECDSA server certificate (PEM)"),
    _p("smtpd_tls_eckey_file", "$smtpd_tls_eccert_file", STR, "ECDSA private key of the server certificate"),
    _p("smtpd_tls_chain_files", "", LIST, "files of keys each followed by its certificate chain"),
    _p("smtpd_tls_CAfile", "", STR, "trusted CAs for client certificates, read before chroot and sent as the acceptable-CA list"),
    _p("smtpd_tls_CApath", "", STR, "directory of trusted CAs (c_rehash style), read inside the jail"),
    _p("smtpd_tls_loglevel", "0", INT, "TLS logging: 0 none, 1 handshake and certificate, 2 negotiation levels, 3 hex dump, 4 full dump", min=0, max=4),
    _p("smtpd_tls_received_header", "no", BOOL, "record protocol, cipher and client certificate in the Received: header"),
    _p("smtpd_tls_ask_ccert", "no", BOOL, "ask the client for a certificate"),
    _p("smtpd_tls_req_ccert", "no", BOOL, "require a client certificate (only with enforced TLS; otherwise ask_ccert, with a warning)"),
    _p("smtpd_tls_ccert_verifydepth", "5", INT, "verification depth of client certificate chains", min=1),
    _p("smtpd_tls_auth_only", "no", BOOL, "offer and accept AUTH only over TLS"),
    _p("smtpd_tls_session_cache_database", "", STR, "accepted, not used: server sessions resume with session tickets shared by all smtpd workers; clients without ticket support are not resumed (postfix-py check warns)"),
    _p("smtpd_tls_session_cache_timeout", "3600s", TIME, "lifetime of server TLS sessions; ticket keys rotate every period and decrypt one period more (0: no resumption)", min=0, max=8640000),
    _p("smtpd_tls_always_issue_session_ids", "yes", BOOL, "issue session ids when server resumption is off (smtpd_tls_session_cache_timeout = 0)"),
    _p("smtpd_tls_cipherlist", "", STR, "legacy OpenSSL cipher string, passed to OpenSSL as written"),
    _p("smtpd_tls_protocols", ">=TLSv1", STR, "TLS protocols with opportunistic TLS"),
    _p("smtpd_tls_mandatory_protocols", ">=TLSv1", STR, "TLS protocols with mandatory TLS"),
    _p("smtpd_tls_ciphers", "medium", STR, "minimum cipher grade with opportunistic TLS"),
    _p("smtpd_tls_mandatory_ciphers", "medium", STR, "minimum cipher grade with mandatory TLS"),
    _p("smtpd_tls_exclude_ciphers", "", LIST, "ciphers excluded with any TLS"),
    _p("smtpd_tls_mandatory_exclude_ciphers", "", LIST, "ciphers excluded with mandatory TLS"),
    _p("smtpd_tls_eecdh_grade", "auto", STR, "ECDHE curve choice: auto, strong, ultra or none"),
    _p("smtpd_tls_dh1024_param_file", "", STR, "DH parameters (PEM) for DHE ciphers; built-in safe groups when empty"),
    _p("smtpd_tls_dh512_param_file", "", STR, "accepted and ignored with a warning: export ciphers no longer exist"),
    _p("smtpd_tls_fingerprint_digest", "sha256", STR, "digest of client certificate fingerprints: md5, sha1, sha256"),
    # --- smtpd: SASL --------------------------------------------------------------------
    _p("smtpd_sasl_auth_enable", "no", BOOL, "offer SASL AUTH"),
    _p("smtpd_sasl_type", "dovecot", STR, "SASL implementation: dovecot, or builtin (a passwd-file)"),
    _p("smtpd_sasl_path", "smtpd", STR, "the Dovecot auth socket, or the builtin passwd-file"),
    _p("smtpd_sasl_service", "smtp", STR, "service name passed to the SASL implementation"),
    _p("smtpd_sasl_security_options", "noanonymous", LIST, "SASL mechanism properties refused without TLS"),
    _p("smtpd_sasl_tls_security_options", "$smtpd_sasl_security_options", LIST, "SASL mechanism properties refused with TLS"),
    _p("smtpd_sasl_authenticated_header", "no", BOOL, "put the SASL login name in the Received: header"),
    _p("smtpd_sasl_local_domain", "", STR, "realm appended to SASL login names"),
    _p("smtpd_sasl_exceptions_networks", "", LIST, "clients to which AUTH is not offered"),
    _p("smtpd_authorized_xclient_hosts", "", LIST, "clients that may use XCLIENT (networks, host names, tables, as mynetworks)"),
    _p("smtpd_authorized_xforward_hosts", "", LIST, "clients that may use XFORWARD (networks, host names, tables, as mynetworks)"),
    _p("smtpd_sasl_response_limit", "12288", INT, "longest SASL response accepted", min=1),
    _p("smtpd_sasl_builtin_failure_delay", "2s", TIME, "builtin SASL: delay of each failed authentication, as Dovecot's auth_failure_delay", min=0),
    # --- queue manager ------------------------------------------------------------------
    _p("queue_run_delay", "300s", TIME, "interval of deferred queue scans", min=1),
    _p("minimal_backoff_time", "300s", TIME, "least time a deferred message waits", min=1),
    _p("maximal_backoff_time", "4000s", TIME, "most time a deferred message waits", min=1),
    _p("maximal_queue_lifetime", "5d", TIME, "time in the queue before a message is bounced", min=0, unit="d"),
    _p("bounce_queue_lifetime", "5d", TIME, "time in the queue before a bounce is given up", min=0, unit="d"),
    _p("delay_warning_time", "0h", TIME, "delay after which the sender is warned (0: never)", min=0, unit="h"),
    _p("queue_minfree", "0", SIZE, "free space the queue file system must keep (0: none)", min=0),
    _p("qmgr_message_active_limit", "20000", INT, "messages in the active queue", min=1),
    _p("qmgr_message_recipient_limit", "20000", INT, "recipients in memory", min=1),
    _p("default_destination_concurrency_limit", "20", INT, "parallel deliveries per destination", min=1),
    _p("initial_destination_concurrency", "5", INT, "parallel deliveries to a new destination", min=1),
    _p("default_destination_recipient_limit", "50", INT, "recipients per delivery", min=1),
    _p("transport_maps", "", TABLE, "recipient or domain to transport:nexthop"),
    _p("default_transport", "smtp", STR, "transport of mail for remote domains"),
    _p("relay_transport", "relay", STR, "transport of mail for relay_domains"),
    _p("local_transport", "local:$myhostname", STR, "transport of mail for mydestination"),
    _p("sender_dependent_relayhost_maps", "", TABLE, "envelope sender or @domain to a relayhost override (DUNNO: none)"),
    _p("sender_dependent_default_transport_maps", "", TABLE, "envelope sender or @domain to a default_transport override (DUNNO: none)"),
    _p("empty_address_relayhost_maps_lookup_key", "<>", STR, "sender_dependent_relayhost_maps key of the null sender"),
    _p("empty_address_default_transport_maps_lookup_key", "<>", STR, "sender_dependent_default_transport_maps key of the null sender"),
    _p("home_mailbox", "", STR, "mailbox path relative to the home directory (Maildir/ for Maildir)"),
    _p("mail_spool_directory", "/var/mail", STR, "directory of mailbox files"),
    _p("soft_bounce", "no", BOOL, "turn permanent delivery failures into temporary ones"),
    _p("bounce_notice_recipient", "postmaster", STR, "recipient of bounce notices to the postmaster"),
    _p("2bounce_notice_recipient", "postmaster", STR, "recipient of undeliverable bounces"),
    _p("delay_notice_recipient", "postmaster", STR, "recipient of delayed mail notices to the postmaster"),
    _p("notify_classes", "resource, software", LIST, "problems reported to the postmaster"),
    _p("transport_retry_time", "60s", TIME, "how long a transport whose delivery agent failed stays suspended", min=1),
    _p("bounce_size_limit", "50000", INT, "largest original returned in full in a bounce; larger ones return headers only", min=1),
    _p("double_bounce_sender", "double-bounce", STR, "sender of postmaster notices; mail to it is discarded"),
    _p("default_privs", "nobody", STR, "rights of deliveries that have no account of their own"),
    _p("local_delivery_any_user", "no", BOOL, "postfix-py extension: any safe local part gets a mailbox under mail_spool_directory"),
    _p("alias_maps", "hash:/etc/aliases", TABLE, "alias tables that local(8) looks local parts up in"),
    _p("alias_database", "hash:/etc/aliases", TABLE, "alias tables that newaliases builds"),
    _p("forward_path", "$home/.forward${recipient_delimiter}${extension}, $home/.forward", STR, "per-user .forward files that local(8) looks for (local attributes expanded)"),
    _p("allow_mail_to_commands", "alias, forward", LIST, "where |command destinations are allowed: alias, forward, include"),
    _p("allow_mail_to_files", "alias, forward", LIST, "where /file destinations are allowed: alias, forward, include"),
    _p("command_time_limit", "1000s", TIME, "time limit of a local |command delivery", min=1),
    _p("mailbox_command", "", STR, "command that delivers to an account's mailbox instead of local(8)"),
    _p("local_destination_concurrency_limit", "2", INT, "parallel local deliveries per recipient", min=1),
    _p("local_destination_recipient_limit", "1", INT, "recipients per local delivery", min=1),
    # --- virtual mailbox domains (lib/resolve.py, virtual/service.py) ----------------
    _p("virtual_alias_domains", "$virtual_alias_maps", LIST, "domains whose addresses exist only as virtual_alias_maps keys (names, /files, type:tables)"),
    _p("virtual_mailbox_domains", "$virtual_mailbox_maps", LIST, "domains whose mail goes to virtual_transport (names, /files, type:tables)"),
    _p("virtual_transport", "virtual", STR, "transport of mail for virtual_mailbox_domains"),
    _p("virtual_mailbox_maps", "", TABLE, "virtual recipient to mailbox path under virtual_mailbox_base (ending in /: maildir)"),
    _p("virtual_mailbox_base", "", STR, "absolute directory that virtual_mailbox_maps paths are relative to"),
    _p("virtual_uid_maps", "", TABLE, "virtual recipient to the numeric user ID of its mailbox"),
    _p("virtual_gid_maps", "", TABLE, "virtual recipient to the numeric group ID of its mailbox"),
    _p("virtual_minimum_uid", "100", INT, "lowest user ID that virtual_uid_maps may give", min=1),
    _p("virtual_mailbox_limit", "51200000", SIZE, "largest mailbox or maildir file virtual writes (0: no limit)", min=0),
    _p("parent_domain_matches_subdomains", "debug_peer_list,fast_flush_domains,mynetworks,permit_mx_backup_networks,qmqpd_authorized_clients,relay_domains,smtpd_access_maps", LIST, "parameters whose domain patterns also match subdomains"),
    # --- smtp client --------------------------------------------------------------------
    _p("smtp_connect_timeout", "30s", TIME, "time limit of a TCP connection", min=0),
    _p("smtp_helo_timeout", "300s", TIME, "time limit of the greeting and the HELO/EHLO reply", min=1),
    _p("smtp_mail_timeout", "300s", TIME, "time limit of the MAIL FROM reply", min=1),
    _p("smtp_rcpt_timeout", "300s", TIME, "time limit of an RCPT TO reply", min=1),
    _p("smtp_data_init_timeout", "120s", TIME, "time limit of the DATA reply", min=1),
    _p("smtp_data_xfer_timeout", "180s", TIME, "time limit of each write of message content", min=1),
    _p("smtp_data_done_timeout", "600s", TIME, "time limit of the reply after the final dot", min=1),
    _p("smtp_quit_timeout", "300s", TIME, "time limit of the QUIT reply", min=1),
    _p("smtp_helo_name", "$myhostname", STR, "name sent in HELO/EHLO"),
    _p("smtp_bind_address", "", STR, "local address of outgoing connections"),
    _p("smtp_host_lookup", "dns", LIST, "how host addresses are found: dns, native"),
    _p("smtp_mx_address_limit", "5", INT, "addresses tried per delivery (0: no limit)", min=0),
    _p("smtp_mx_session_limit", "2", INT, "SMTP sessions per delivery (0: no limit)", min=0),
    _p("smtp_fallback_relay", "$fallback_relay", LIST, "next hops tried after the request's own have failed temporarily"),
    _p("fallback_relay", "", LIST, "the former name of smtp_fallback_relay (its default refers to it)"),
    _p("lmtp_fallback_relay", "", LIST, "lmtp's smtp_fallback_relay (TCP destinations only)"),
    _p("smtp_address_verify_target", "rcpt", STR, "the SMTP stage at which an address verification probe ends: rcpt, or data (for a server that rejects recipients only after DATA)", values=("rcpt", "data")),
    _p("lmtp_address_verify_target", "rcpt", STR, "lmtp's smtp_address_verify_target", values=("rcpt", "data")),
    _p("smtp_line_length_limit", "998", INT, "longest line sent before it is folded", min=0),
    _p("smtp_skip_5xx_greeting", "yes", BOOL, "try the next server after a 5xx greeting"),
    _p("smtp_always_send_ehlo", "yes", BOOL, "greet with EHLO"),
    _p("smtp_send_xforward_command", "no", BOOL, "send the original client of a message with XFORWARD when the server announces it"),
    _p("smtp_xforward_timeout", "300s", TIME, "time limit for the reply to an XFORWARD command", min=1),
    _p("smtp_cname_overrides_servername", "no", BOOL, "let a CNAME change the server name used for TLS policy and certificate checks"),
    _p("smtp_address_preference", "any", STR, "address family preferred: ipv4, ipv6 or any"),
    _p("smtp_dns_nameservers", "", LIST, "DNS servers for MX and address lookups (address, address:port or [address]:port); empty: the system's resolv.conf, read before the chroot"),
    _p("smtp_dns_timeout", "10s", TIME, "time limit of one DNS lookup of the smtp/lmtp client", min=1),
    _p("smtp_dns_support_level", "", STR, "DNS features of the smtp/lmtp client: disabled, enabled, dnssec (DNSSEC status from the resolver's AD bit, needed by the dane levels); empty: enabled", values=("", "disabled", "enabled", "dnssec")),
    _p("smtp_tls_dane_insecure_mx_policy", "dane", STR, "TLS level for an MX host with DNSSEC-validated TLSA records found through an MX RRset that is not validated, at level dane: may (ignore the records), encrypt, dane (enforce them; a match is logged Trusted, not Verified); smtp only", values=("may", "encrypt", "dane")),
    _p("smtp_tls_force_insecure_host_tlsa_lookup", "no", BOOL, "at the dane levels, look up TLSA records also for a host whose address records are not DNSSEC-validated (they must still validate)"),
    _p("tls_dane_digests", "sha512 sha256", LIST, "DANE TLSA matching types, most preferred first: sha512 (2), sha256 (1)"),
    # --- MTA-STS (RFC 8461, smtp/mta_sts.py) and TLSRPT (RFC 8460, lib/tlsrpt.py) ----
    _p("smtp_tls_mta_sts_enable", "no", BOOL, "postfix-py extension: apply the MTA-STS policies (RFC 8461) of next-hop domains to MX deliveries of the smtp client (never lmtp: no MX lookups)"),
    _p("smtp_tls_mta_sts_CAfile", "", STR, "postfix-py extension: CA certificates that authenticate MTA-STS policy servers (empty: the system's bundle), read before chroot"),
    _p("smtp_tls_mta_sts_cache", "${data_directory}/mta_sts_cache.lmdb", STR, "postfix-py extension: the MTA-STS policy cache, an LMDB file outside the jail (empty: no cache)"),
    _p("smtp_tls_mta_sts_fetch_timeout", "10s", TIME, "postfix-py extension: time limit of an MTA-STS policy fetch", min=1, max=300),
    _p("smtp_tls_mta_sts_https_port", "443", INT, "postfix-py extension: port of MTA-STS policy servers (RFC 8461 says 443; other values are for tests)", min=1, max=65535),
    _p("smtp_tlsrpt_enable", "no", BOOL, "record outbound TLS outcomes for TLSRPT (RFC 8460) reports, for domains that publish a _smtp._tls record (Postfix 3.10; reports sent by postfix-py tlsrpt send); smtp client only, not lmtp, as Postfix"),
    _p("smtp_tlsrpt_skip_reused_handshakes", "no", BOOL, "with TLSRPT, count only sessions that did a full TLS handshake (Postfix 3.11's default; 3.10's was yes)"),
    _p("tlsrpt_database", "${data_directory}/tlsrpt.lmdb", STR, "postfix-py extension: the TLSRPT outcome store, an LMDB file outside the jail"),
    _p("tlsrpt_organization_name", "$myhostname", STR, "postfix-py extension: organization-name of TLSRPT reports"),
    _p("tlsrpt_contact_info", "postmaster@$myhostname", STR, "postfix-py extension: contact-info of TLSRPT reports"),
    _p("tlsrpt_sender", "postmaster@$myhostname", STR, "postfix-py extension: envelope and From: address of mailed TLSRPT reports"),
    _p("tlsrpt_https_CAfile", "", STR, "postfix-py extension: CA certificates that authenticate https: TLSRPT receivers (empty: the system's bundle)"),
    _p("tlsrpt_https_timeout", "30s", TIME, "postfix-py extension: time limit of one https: TLSRPT report upload", min=1),
    _p("lmtp_connect_timeout", "0s", TIME, "time limit of an LMTP connection (0: none)", min=0),
    _p("lmtp_lhlo_name", "$myhostname", STR, "name sent in LHLO"),
    _p("lmtp_data_done_timeout", "600s", TIME, "time limit of the reply after the final dot", min=1),
    _p("smtp_tls_history_database", "", STR, "postfix-py extension: the TLS history per next hop of smtp and lmtp, kept by tlsmgr (lmdb:path; empty: none)"),
    _p("smtp_tls_history_size", "10", INT, "postfix-py extension: TLS outcomes kept per next hop", min=1, max=100),
    # connection cache (smtp/conncache.py: per delivery process, no scache service)
    *[_p(f"{w}_{name}", default, type_, doc, **kw) for w in ("smtp", "lmtp") for name, default, type_, doc, kw in (
        ("connection_cache_on_demand", "yes", BOOL, "cache connections to a destination while qmgr has back-to-back deliveries for it", {}),
        ("connection_cache_destinations", "", LIST, "destinations whose connections are always cached", {}),
        ("connection_cache_time_limit", "2s", TIME, "how long an unused connection stays cached", {"min": 1}),
        ("connection_reuse_time_limit", "300s", TIME, "how long a connection may be reused after it was made", {"min": 1}),
        ("connection_reuse_count_limit", "0", INT, "how many times a connection may be used (0: no limit)", {"min": 0}),
        ("rset_timeout", "20s", TIME, "time limit of the RSET that checks a cached connection", {"min": 1}),
    )],
    # --- TLS manager (seed: TLS manager specific settings) ------------------------------
    _p("tls_daemon_random_bytes", "32", INT, "bytes of seed smtpd and smtp ask tlsmgr for at start", min=1, max=1024),
    _p("tls_random_source", "dev:/dev/urandom", STR, "entropy source: dev:/path, egd:/path or a plain file"),
    _p("tls_random_bytes", "32", INT, "bytes read from the source at each seeding", min=1),
    _p("tls_random_reseed_period", "3600s", TIME, "longest time between reseeds (a random time up to it)", min=1),
    _p("tls_random_exchange_name", "${data_directory}/prng_exch", STR, "the PRNG exchange file"),
    _p("tls_event_log", "", STR, "append one JSON object per TLS handshake, failed server handshake and delivery to this file (postfix-py extension; empty: none)"),
    _p("tls_random_prng_update_period", "3600s", TIME, "interval of exchange file updates", min=1),
    _p("tls_high_cipherlist", "aNULL:-aNULL:HIGH:@STRENGTH", STR, "OpenSSL ciphers of grade high"),
    _p("tls_medium_cipherlist", "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH", STR, "OpenSSL ciphers of grade medium"),
    _p("tls_low_cipherlist", "aNULL:-aNULL:HIGH:MEDIUM:LOW:+RC4:@STRENGTH", STR, "OpenSSL ciphers of grade low"),
    _p("tls_export_cipherlist", "aNULL:-aNULL:HIGH:MEDIUM:LOW:EXPORT:+RC4:@STRENGTH", STR, "OpenSSL ciphers of grade export"),
    _p("tls_null_cipherlist", "eNULL:!aNULL", STR, "OpenSSL ciphers of grade null"),
    _p("tls_eecdh_auto_curves", "X25519 X448 prime256v1 secp521r1 secp384r1", LIST, "ECDHE groups offered"),
    _p("tls_preempt_cipherlist", "no", BOOL, "the server's cipher order wins"),
    _p("tls_ssl_options", "", LIST, "extra OpenSSL options by name"),
    _p("tls_disable_workarounds", "", LIST, "OpenSSL bug workarounds turned off"),
    _p("tls_append_default_CA", "no", BOOL, "trust the system's default CAs as well"),
    _p("tls_wildcard_matches_multiple_labels", "yes", BOOL, "a wildcard certificate name matches more than one label"),
    _p("tls_server_sni_maps", "", TABLE, "SNI name (or .parent domain) of the client's TLS handshake to files of keys and certificate chains"),
    _p("tls_fast_shutdown_enable", "yes", BOOL, "send close_notify without waiting for the peer's (no: wait up to the stream timeout)"),
]
_LMTP_DEFAULTS = {"tls_secure_cert_match": "nexthop"}   # where Postfix's lmtp_ differs
for _suffix, _default, _type, _doc, *_extra in _SMTP_CLIENT_TLS:
    for _prefix in ("smtp", "lmtp"):
        if _prefix == "lmtp":
            _default = _LMTP_DEFAULTS.get(_suffix, _default)
        PARAMS.append(Param(f"{_prefix}_{_suffix}", _default.replace("%s", _prefix), _type,
                            _doc, **(_extra[0] if _extra else {})))

# Values that the program expands itself, with names of its own ($home, $user, ...), as
# Postfix's "raw" parameters: main.cf's $name expansion and its undefined-name warnings
# leave them alone (local/service.py reads them with Config.raw()).
RAW = frozenset({"forward_path", "mailbox_command", "default_rbl_reply",
                 "smtpd_reject_footer", "postscreen_reject_footer",
                 "smtpd_expansion_filter", "postscreen_expansion_filter"})

# Former name -> new name (see FORMER NAMES above).
FORMER_NAMES = {
    "fallback_relay": "smtp_fallback_relay",
    "postscreen_blacklist_action": "postscreen_denylist_action",
    "postscreen_dnsbl_ttl": "postscreen_dnsbl_max_ttl",
    "postscreen_dnsbl_whitelist_threshold": "postscreen_dnsbl_allowlist_threshold",
    "postscreen_whitelist_interfaces": "postscreen_allowlist_interfaces",
    "smtpd_client_connection_limit_exceptions": "smtpd_client_event_limit_exceptions",
    "smtpd_per_record_deadline": "smtpd_per_request_deadline",
    "virtual_maps": "virtual_alias_maps",
}

_BY_NAME: dict[str, Param] = {}
for _row in PARAMS:
    if _row.name in _BY_NAME:
        raise AssertionError(f"parameter declared twice: {_row.name}")
    _BY_NAME[_row.name] = _row


def lookup(name: str) -> Param | None:
    """The table row of a parameter, or None for a name postfix-py does not know."""
    return _BY_NAME.get(name)


def names() -> list[str]:
    """All declared parameter names, sorted as postconf prints them."""
    return sorted(_BY_NAME)


def split_list(text: str, strict: bool = False) -> list[str]:
    """Split a list value at commas and white space, as Postfix does; `{...}` stays whole.

    With strict, an unclosed `{` is a ValueError (Postfix's mystrtokq refuses it)."""
    if "{" not in text:
        return [w for w in _LIST_SEP.split(text) if w]
    words, word, depth = [], [], 0
    for c in text:
        if c == "{":
            depth += 1
        elif c == "}" and depth:
            depth -= 1
        if depth == 0 and (c == "," or c.isspace()):
            if word:
                words.append("".join(word))
                word = []
            continue
        word.append(c)
    if depth and strict:
        raise ValueError(f"missing '}}' in \"{text.strip()}\"")
    if word:
        words.append("".join(word))
    return words


def computed_default(name: str) -> str | None:
    """Defaults Postfix computes from the system rather than writes as text."""
    if name == "myhostname":
        # As Postfix: the kernel's host name, made "fully qualified" when it is not.
        host = socket.gethostname() or "localhost"
        return host if "." in host else host + ".localdomain"
    return None


def convert(param: Param, text: str):
    """Convert an expanded value to the parameter's type; ParamError names the parameter."""
    t = param.type
    text = text.strip()
    if t == BOOL:
        low = text.lower()
        if low in ("yes", "true"):
            return True
        if low in ("no", "false"):
            return False
        raise ParamError(f"bad boolean configuration: {param.name} = {text}")
    if t in (INT, SIZE):
        if not re.fullmatch(r"-?\d{1,19}", text):      # longer is no 64-bit number
            raise ParamError(f"bad numerical configuration: {param.name} = {text}")
        return _bounded(param, int(text), text)
    if t == TIME:
        m = _TIME_RE.match(text)
        if not m:
            raise ParamError(f"invalid {param.name} parameter value: \"{text}\"")
        unit = (m.group(2) or param.unit).lower()
        return _bounded(param, int(m.group(1)) * _TIME_UNITS[unit], text)
    if t in (LIST, TABLE):
        return split_list(text)
    if param.values and text.lower() not in param.values:
        raise ParamError(f"invalid {param.name} parameter value: \"{text}\" "
                         f"(one of: {', '.join(v for v in param.values if v)})")
    return text


def _bounded(param: Param, value: int, text: str) -> int:
    if param.min is not None and value < param.min:
        raise ParamError(f"invalid {param.name} parameter value {text} < {param.min}")
    if param.max is not None and value > param.max:
        raise ParamError(f"invalid {param.name} parameter value {text} > {param.max}")
    return value
