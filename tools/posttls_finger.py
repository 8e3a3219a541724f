"""posttls-finger - probe the TLS properties of an ESMTP or LMTP server.

SYNOPSIS
    postfix-py posttls-finger [options] [inet:]domain[:port] [match ...]
    postfix-py posttls-finger -S [options] unix:pathname [match ...]

DESCRIPTION
    Connects to the destination as the smtp client would (MX lookup for a domain, none
    for [host] or [host]:port; LMTP with -S), sends EHLO (LHLO), STARTTLS when the server
    offers it, and reports the TLS session, the server certificate and its chain, whether
    the chain is trusted, and which name matched, in the words of Postfix's
    posttls-finger(1) and its smtp client. Everything is printed on standard output, each
    line starting with "posttls-finger: ", as Postfix's tool does; the exit status is 0
    once the destination was probed (1 for bad options), also as Postfix's.

    With -r delay, a session the server lets us cache is kept in memory; after delay
    seconds the tool reconnects to the same address and reports whether the session was
    resumed ("Reusing old session", then "Found a previously used server.  Done
    reconnecting."), up to -m count times when the server keeps changing.

OPTIONS (Postfix's)
    -a family       ipv4, ipv6 or any (default)
    -A tafile       PEM trust anchors (certificates, public keys) that replace -F and
                    -P at the verify and secure levels; repeatable. Any certificate of
                    the chain, its issuer, or a key that signed it can be the anchor;
                    the names are matched as usual ("Matched trust anchor at depth N")
    -c              no SMTP chat logging: only TLS information is printed
    -C              print the server's certificate chain, with digests, in PEM
    -d mdalg        digest of fingerprints (default: $smtp_tls_fingerprint_digest)
    -f              look up TLSA records also for hosts in unsigned zones
                    (smtp_tls_force_insecure_host_tlsa_lookup)
    -F CAfile       trusted CAs (default: none, so nothing is trusted)
    -g grade        minimum cipher grade (default: medium)
    -h host_lookup  dns (default), native, or "dns, native"
    -H chainfiles   client key and certificate chains (not with -k/-K)
    -k certfile     client certificate (key too, unless -K)
    -K keyfile      client private key
    -l level        none, may, encrypt, fingerprint, dane, dane-only, verify, secure
                    (default: dane)
    -L logopts      0|none, 1|routine|summary, 2|debug, certmatch, peercert, cache,
                    dane, verbose, untrusted (default: routine,certmatch)
    -m count        most reconnections with -r (default: 5)
    -M policy       insecure MX policy: may, encrypt or dane (default: dane), as
                    smtp_tls_dane_insecure_mx_policy
    -o name=value   override a main.cf parameter (myhostname for the EHLO name, ...)
    -p protocols    TLS protocols (default: >=TLSv1)
    -P CApath       directory of trusted CAs
    -r delay        reconnect after delay seconds and report session reuse
    -s servername   SNI name to send (default: none)
    -S              LMTP instead of SMTP
    -t timeout      connect (and greeting) timeout in seconds (default: 30)
    -T timeout      EHLO, STARTTLS, handshake and QUIT timeout (default: 30)
    -v              more verbose
    -w              TLS wrapper mode (SMTPS, port 465)
    match ...       names to match at verify/secure (default: hostname; nexthop,
                    dot-nexthop), fingerprints at the fingerprint level
    Not supported, each with an error: -X (Postfix 3.7's tlsproxy(8) mode: postfix-py
    has no tlsproxy), -R (SRV lookups, Postfix 3.8) and -x (raw public keys, Postfix
    3.9), which came after 3.7 and which postfix-py's smtp client does not implement.

DANE
    At the dane and dane-only levels (dane is the default, as Postfix's) lookups ask
    for DNSSEC (smtp/nexthop.py; the resolver is smtp_dns_nameservers, settable with
    -o, else resolv.conf's, and must validate). For each server, as Postfix's
    dane_host_level(): validated TLSA records (smtp/dane.py) make the level dane, the
    chain is matched against them and the match logged ("Matched DANE EE certificate at
    depth 0: 3 1 1 ...", with certmatch); no TLSA records, or none usable, fall back to
    "secure" (logged at dane-only: 'no TLSA records found, resorting to "secure"'); a
    failed TLSA lookup ends the probe ("TLSA lookup error for host:port"). -L dane logs
    each record: "DNSSEC-signed TLSA record: _25._tcp.mx.example.com: 3 1 1 ...".
    An MX RRset that is not DNSSEC-validated depends on -M: with dane (the default) the
    host's TLSA records are still looked up and, when there are some, enforced at
    Postfix's half-dane level ("MX RRset insecure: log verified as trusted"; a match is
    "Trusted TLS connection established ..."); with encrypt they only make TLS
    mandatory ("TLSA RRs found, MX RRset insecure: just encrypt"); with may the level is
    may ("MX RRset is insecure: try to encrypt").

    `postfix-py -c DIR posttls-finger ...` reads DIR/main.cf, as the other tools do; a
    leading "-c DIR" is taken as that when DIR is a directory with a main.cf, since
    posttls-finger's own -c takes no argument.

SEE ALSO
    smtp/session.py (the dialogue), smtp/tls.py (TlsStarter), smtp/nexthop.py, lib/tls.py;
    Postfix posttls-finger(1).
"""

from __future__ import annotations

import os
import sys
import time

from ..lib import maincf, params
from ..lib import tls as libtls
from ..lib.smtpio import SmtpStream, StreamEOF, StreamTimeout
from ..smtp import dane, nexthop, session, tls, tls_policy

PROG = "posttls-finger"
USAGE = (f"usage: {PROG} [-acCfSvw] [-t conn_tmout] [-T cmd_tmout] [-L logopts] \\\n"
         "\t[-h host_lookup] [-l level] [-d mdalg] [-g grade] [-p protocols] \\\n"
         "\t[-A tafile] [-F CAfile.pem] [-P CApath/] [-s servername] \\\n"
         "\t[ [-H chainfiles] | [-k certfile [-K keyfile]] ] \\\n"
         "\t[-m count] [-M insecure_mx_policy] [-r delay] [-o name=value] \\\n"
         "\tdestination [match ...]\n")
WITH_ARG = set("aAdFghHkKlLmMopPrstT")
FLAGS = set("cCfSvw")
# Postfix 3.7's -X needs tlsproxy(8); -R (3.8) and -x (3.9) came after 3.7, and need
# SRV lookups and raw public keys, which postfix-py's smtp client does not have.
UNSUPPORTED = {"X": "tlsproxy(8) mode needs tlsproxy(8), which postfix-py does not have",
               "R": "SRV lookups (Postfix 3.8) are not implemented",
               "x": "raw public keys (RFC 7250, Postfix 3.9) are not implemented"}
LOGOPTS = {"0": set(), "none": set(),
           "1": {"summary"}, "routine": {"summary"}, "summary": {"summary"},
           "2": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "debug": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "3": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "ssl-expert": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "4": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "ssl-developer": {"summary", "debug", "cache", "verbose", "certmatch", "peercert"},
           "ssl-debug": {"debug"}, "ssl-handshake-packet-dump": {"debug"},
           "ssl-session-packet-dump": {"debug"}, "untrusted": {"untrusted"},
           "peercert": {"peercert"}, "certmatch": {"certmatch"}, "cache": {"cache"},
           "dane": {"dane"},
           "verbose": {"verbose", "peercert", "certmatch", "cache", "dane"}}


def _cache_key(addr, digest: str) -> str:
    """posttls-finger's session cache key, as Postfix's: the server's address and the policy."""
    return f"[{addr.addr}]:{addr.port}&{digest}"


class Usage(Exception):
    """Bad command line: print the message and the usage text."""


class Fatal(Exception):
    """Postfix's msg_fatal(): "fatal: TEXT" on standard output, exit status 1."""


def out(text: str) -> None:
    """One line of output, as Postfix's tool prints it."""
    sys.stdout.write(f"{PROG}: {text}\n")
    sys.stdout.flush()


def warn(text: str) -> None:
    """A warning line."""
    out(f"warning: {text}")


def parse_args(argv: list[str]):
    """(options dict, destination, match list, config dir or None); Usage on errors."""
    argv = list(argv)
    config_dir = None
    if len(argv) >= 2 and argv[0] == "-c" and os.path.isfile(os.path.join(argv[1], "main.cf")):
        config_dir = argv[1]
        argv = argv[2:]
    opts: dict = {"o": [], "H": [], "A": []}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        j = 1
        while j < len(word):
            c = word[j]
            if c in WITH_ARG:
                value = word[j + 1:]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise Usage(f"option requires an argument -- '{c}'")
                    value = argv[i]
                if c in ("o", "H", "A"):
                    opts[c].append(value)
                else:
                    opts[c] = value
                break
            if c in FLAGS:
                opts[c] = opts.get(c, 0) + 1
            elif c in UNSUPPORTED:
                raise Usage(f"option -{c} is not supported by postfix-py: {UNSUPPORTED[c]}")
            else:
                raise Usage(f"invalid option -- '{c}'")
            j += 1
        i += 1
    rest = argv[i:]
    if not rest:
        raise Usage("missing destination")
    return opts, rest[0], rest[1:], config_dir


def _config(config_dir: str | None, overrides: dict):
    """main.cf when there is one (it is optional for this tool), plus overrides."""
    config_dir = config_dir or maincf.default_config_dir()
    try:
        cfg = maincf.load(config_dir)
    except maincf.ConfigError:
        cfg = maincf.Config(config_dir, os.path.join(config_dir, "main.cf"))
    return cfg.with_overrides(overrides)


def _log_mask(text: str) -> set:
    mask: set = set()
    for word in params.split_list(text):
        key = word.lower()
        if key not in LOGOPTS:
            raise Usage(f"-L option: unknown TLS log option \"{word}\"")
        mask |= LOGOPTS[key]
    return mask


def _oneline(name) -> str:
    """X509_NAME_oneline() of a cryptography Name: /O=.../CN=..."""
    parts = []
    for rdn in name.rdns:
        for a in rdn:
            value = a.value if isinstance(a.value, str) else a.value.decode("latin-1")
            parts.append(f"{a.rfc4514_attribute_name}={value}")
    return "/" + "/".join(parts)


def print_trust(conn, mdalg: str) -> None:
    """The -C report: every certificate the server sent, with digests and PEM."""
    from cryptography.hazmat.primitives import serialization
    chain = conn.get_peer_cert_chain(as_cryptography=True) or []
    sys.stdout.write("\n---\nCertificate chain\n")
    for n, cert in enumerate(chain):
        sys.stdout.write(f"{n:2d} subject: {_oneline(cert.subject)}\n")
        sys.stdout.write(f"    issuer: {_oneline(cert.issuer)}\n")
        sys.stdout.write(f"   cert digest={libtls.fingerprint(cert, mdalg)}\n")
        sys.stdout.write(f"   pkey digest={libtls.pkey_fingerprint(cert, mdalg)}\n")
        sys.stdout.write(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    sys.stdout.flush()


class Finger:
    """One run of posttls-finger: options, then passes over the same address."""

    def __init__(self, opts, dest_text, match, config_dir):
        self.opts = opts
        self.lmtp = bool(opts.get("S"))
        self.nochat = bool(opts.get("c"))
        self.wrapper = bool(opts.get("w"))
        self.conn_timeout = float(opts.get("t", 30))
        self.cmd_timeout = float(opts.get("T", 30))
        overrides = {}
        for item in opts["o"]:
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise Usage(f"bad -o option: {item}")
            overrides[name.strip()] = value.strip()
        level = tls_policy.level_lookup(opts.get("l") or "dane")
        if level is None:
            raise Usage(f"Invalid TLS level \"{opts.get('l')}\"")
        self.mxinsec = tls_policy.level_lookup(opts.get("M") or "dane")
        if self.mxinsec not in dane.INSECURE_MX_POLICIES:
            raise Usage(f"bad '-M' option value: {opts.get('M')}")
        if level == "none" and self.wrapper:
            raise Usage("SSL wrapper mode requires that TLS not be disabled")
        self.level = level
        self.mask = _log_mask(opts.get("L", "routine,certmatch"))
        self.anchors = self._anchors(opts.get("A", ()))
        if opts["H"] and ("k" in opts or "K" in opts):
            raise Usage("When the '-H' option is used, neither the '-k', nor the '-K' "
                        "options may be used")
        tls_over = {"smtp_tls_CAfile": opts.get("F", ""), "smtp_tls_CApath": opts.get("P", ""),
                    "smtp_tls_loglevel": "2" if "debug" in self.mask else "0",
                    "smtp_starttls_timeout": f"{max(1, int(self.cmd_timeout))}s",
                    "smtp_tls_scert_verifydepth": "5"}
        protocols = opts.get("p", ">=TLSv1")
        grade = opts.get("g", "medium")
        for kind in ("", "mandatory_"):
            tls_over[f"smtp_tls_{kind}protocols"] = protocols
            tls_over[f"smtp_tls_{kind}ciphers"] = grade
        if "d" in opts:
            tls_over["smtp_tls_fingerprint_digest"] = opts["d"]
        certfile, keyfile = opts.get("k", ""), opts.get("K", "")
        tls_over["smtp_tls_cert_file"] = certfile or keyfile
        tls_over["smtp_tls_key_file"] = keyfile or certfile
        tls_over["smtp_tls_chain_files"] = ", ".join(opts["H"])
        for name in ("eccert_file", "eckey_file", "dcert_file", "dkey_file"):
            tls_over[f"smtp_tls_{name}"] = ""
        tls_over.update(overrides)
        self.cfg = _config(config_dir, tls_over)
        self.mdalg = self.cfg.get("smtp_tls_fingerprint_digest").strip().lower() or "sha256"
        self.helo = self.cfg.get("smtp_helo_name") or self.cfg.get("myhostname")
        try:
            self.dest = nexthop.parse(dest_text, lmtp=self.lmtp)
        except nexthop.NexthopError as exc:
            raise Usage(f"{exc}") from None
        if self.dest.unix and not self.lmtp:
            raise Usage("unix: destinations need -S (LMTP)")
        self.dest_text = dest_text
        self.match, self.fingerprints = self._match(match)
        self.client = None
        if level != "none":
            try:
                self.client = libtls.client_tls(self.cfg, "smtp", warn=warn, info=out)
            except libtls.TLSConfigError as exc:
                warn(f"TLS library problem: {exc}")
        self.cache = tls.MemoryCache() if int(opts.get("r", -1)) > 0 else None
        self.cache_hits = 0
        self.reconnect = int(opts.get("r", -1))
        self.max_reconnect = int(opts.get("m", 5))
        family = (opts.get("a") or "any").lower()
        if family not in ("ipv4", "ipv6", "any"):
            raise Usage(f"bad '-a' option value: {family}")
        protocols = ("ipv4",) if family == "ipv4" else ("ipv6",) if family == "ipv6" else \
            ("ipv4", "ipv6")
        servers = params.split_list(self.cfg.get("smtp_dns_nameservers") or "")
        try:
            self.resolver = nexthop.NexthopResolver(
                servers, timeout=self.conn_timeout,
                host_lookup=params.split_list(opts.get("h", "dns")), protocols=protocols,
                preference=family if family != "any" else "any",
                dnssec=level in ("dane", "dane-only"))
        except ValueError as exc:
            raise Usage(str(exc)) from None
        self.addr = None
        self.policy = None              # the policy for self.addr (dane_host_level)
        self.pass_no = 1

    def _anchors(self, files) -> tuple:
        """-A: trust anchors that replace -F and -P, at verify and secure only (Postfix's
        parse_tas(): other levels ignore them, unread)."""
        if self.level not in ("verify", "secure"):
            return ()
        log = out if self.mask & {"dane", "verbose"} else None
        records: list = []
        for path in files:
            try:
                records += dane.trust_anchor_records(path, log)
            except dane.TrustAnchorError as exc:
                if str(exc):
                    warn(str(exc))
                raise Fatal(f"Failed to load trust anchor file: {path}") from None
        return tuple(records)

    def _match(self, args):
        if self.level in ("dane", "dane-only"):
            # With TLSA records the names are the TLSA base domain and the MX domain;
            # without them the fallback level is secure.
            self.secure_match = list(args) or ["nexthop", "dot-nexthop"]
            return None, None
        if self.level in ("verify", "secure"):
            return (list(args) or (["hostname"] if self.level == "verify"
                                   else ["nexthop", "dot-nexthop"])), None
        if self.level == "fingerprint":
            return None, tls_policy.clean_fingerprints(args, warn)
        if args:
            warn(f"TLS level '{self.level}' does not implement certificate matching")
        return None, None

    # --- chat ---------------------------------------------------------------------------
    def _chat(self, direction: str, text: str) -> None:
        if not self.nochat:
            out(f"{direction} {text}")

    def _command(self, stream, line: str):
        self._chat(">", line)
        stream.write(line.encode() + b"\r\n")
        stream.flush(self.cmd_timeout)

    def _reply(self, stream, timeout: float):
        return session.read_reply(stream, timeout, 4096, chat=self._chat)

    # --- connecting ---------------------------------------------------------------------------
    def _connect(self):
        """A connected socket to the destination (the same address on later passes)."""
        from ..smtp import service
        if self.addr is None:
            addrs, why = self.resolver.addresses(self.dest)
            if self.dest.unix:
                addrs[0].name = self.cfg.get("myhostname")
            if not addrs:
                out(f"Destination address lookup failed: {why.reason}")
                return None
            candidates = addrs
        else:
            candidates = [self.addr]
        for addr in candidates:
            if self.addr is None or self.policy is None:
                self.policy = self._host_policy(addr)
                if self.policy is None:
                    continue
            sock, reason = service.connect(addr, self.conn_timeout)
            if sock is None:
                out(f"Failed to establish session to {self.dest_text} via {addr.name}: {reason}")
                continue
            self.addr = addr
            return sock
        return None

    def _host_policy(self, addr):
        """The level for one server: Postfix's dane_host_level(); None: skip it."""
        if self.level not in ("dane", "dane-only"):
            return tls_policy.Policy(self.level, tlsa=self.anchors)
        insecure = addr.mx_dnssec is False
        if insecure and self.mxinsec == "may":
            out("MX RRset is insecure: try to encrypt")
            return tls_policy.Policy("may")
        log = out if "dane" in self.mask else (lambda text: None)
        found = dane.lookup(self.resolver, addr, self.dest.port, warn, bool(self.opts.get("f")))
        if found.status == "error":
            out(f"TLSA lookup error for {addr.name}:{self.dest.port}")
            return None
        owner = dane.tlsa_qname(found.base_domain, self.dest.port)
        for rec in found.records:
            log(f"DNSSEC-signed TLSA record: {owner}: {rec.text()}")
        digests = dane.parse_digests(self.cfg["tls_dane_digests"], warn)
        records = dane.usable(found.records, digests, addr.namaddrport, warn) \
            if found.status == "ok" else ()
        if not records:
            if "verbose" in self.mask or self.level == "dane-only":
                usable = "usable " if found.status != "notfound" else ""
                out(f"no {usable}TLSA records found, resorting to \"secure\"")
            self.match = self.secure_match
            return tls_policy.Policy("secure")
        level = "dane"
        if insecure and self.mxinsec == "encrypt":
            out("TLSA RRs found, MX RRset insecure: just encrypt")
            return tls_policy.Policy("encrypt")
        if insecure:
            out("MX RRset insecure: log verified as trusted")
            level = tls_policy.HALF_DANE
        return tls_policy.Policy(level, matches=dane.match_names(found, addr, self.dest),
                                 tlsa=records,
                                 servername=found.base_domain, source=dane.SOURCE)

    def _starter(self):
        domain = self.dest.host if not self.dest.unix else self.cfg.get("myhostname")
        policy = self.policy or tls_policy.Policy(self.level, tlsa=self.anchors)
        certmatch = "certmatch" in self.mask and self.pass_no == 1
        return tls.TlsStarter(
            self.client, policy, cfg=self.cfg, prefix="smtp",
            nexthop_text=self.dest_text, nexthop_domain=domain, cache=self.cache,
            cache_key=_cache_key,
            info=out, warn=warn, loglevel=0,
            match=self.match if not tls_policy.dane_based(policy.level) else None,
            fingerprints=self.fingerprints, log_cache="cache" in self.mask and self.pass_no > 1,
            # The DANE (or trust anchor) match is reported by _report(), after the peer
            # name, as Postfix.
            log_certmatch=certmatch and not tls_policy.dane_based(policy.level)
            and not policy.tlsa,
            # With TLSA records the SNI name is their base domain, whatever -s says.
            sni=policy.servername if tls_policy.dane_based(policy.level)
            else self.opts.get("s") or None)

    def _report(self, starter) -> None:
        """Postfix's certificate and summary lines for the finished handshake."""
        info = starter.tls_info
        first = self.pass_no == 1
        if info.peer_cert_present and first:
            # Postfix's tls_client.c: "verbose" is any of certmatch, peercert, verbose.
            verbose = bool(self.mask & {"certmatch", "peercert", "verbose"})
            if verbose and info.peer_matched and info.matched_name:
                out(f"{info.namaddr}: matched peername: {info.matched_name}")
            if verbose and info.peer_matched and starter.dane_line:
                out(starter.dane_line)
            if verbose:
                out(f"{info.namaddr}: subject_CN={info.peer_CN}, issuer_CN={info.issuer_CN}, "
                    f"fingerprint={info.peer_fingerprint}, "
                    f"pkey_fingerprint={info.peer_pkey_fingerprint}")
        if not first and info.session_reused and "cache" in self.mask:
            out(f"{info.namaddr}: Reusing old session")
        if "summary" in self.mask:
            out(libtls.summary_line(info))

    def _starttls(self, stream, starter) -> bool:
        """STARTTLS (unless wrapper mode) and the handshake; False when it failed."""
        if not self.wrapper:
            self._command(stream, "STARTTLS")
            reply = self._reply(stream, self.cmd_timeout)
            if reply.klass != 2:
                return True
        try:
            starter.start(stream, self.addr, self.server_helo)
        except tls.TLSStartError:
            stream.tls = None
            return False
        if self.cache is not None and starter.tls_info.session_reused:
            self.cache_hits += 1
        self._report(starter)
        return True

    def one_pass(self) -> bool:
        """Connect, EHLO, STARTTLS, QUIT; False when the destination could not be probed."""
        sock = self._connect()
        if sock is None:
            return False
        if self.pass_no == 1 and not self.nochat:
            out(f"Connected to {self.addr.namaddrport}")
        stream = SmtpStream(sock, self.cmd_timeout)
        starter = self._starter() if self.client is not None else None
        self.server_helo = ""
        hello = "LHLO" if self.lmtp else "EHLO"
        ok = True
        try:
            if self.wrapper and starter is not None:
                if not self._starttls(stream, starter):
                    return False
            greeting = self._reply(stream, self.conn_timeout)
            if greeting.klass != 2:
                return self._quit(stream)
            self._command(stream, f"{hello} {self.helo}")
            reply = self._reply(stream, self.cmd_timeout)
            if starter is not None and starter.conn is not None:
                starter.save()
            if reply.klass != 2:
                return self._quit(stream)
            words = [line[4:].split() for line in reply.lines]
            self.server_helo = words[0][0] if words and words[0] else ""
            offered = any(w and w[0].upper() == "STARTTLS" for w in words[1:])
            if starter is not None and offered and not self.wrapper:
                if not self._starttls(stream, starter):
                    return False
                if starter.conn is not None and self.pass_no == 1:
                    self._command(stream, f"{hello} {self.helo}")
                    self._reply(stream, self.cmd_timeout)
                    starter.save()
            if starter is not None and starter.tls_info is not None and self.pass_no == 1:
                if not starter.tls_info.peer_cert_present:
                    out("Server is anonymous")
                elif self.opts.get("C"):
                    print_trust(starter.conn, self.mdalg)
            self._quit(stream)
            if starter is not None:
                starter.save()
        except StreamTimeout as exc:
            warn(f"read timeout while talking to {self.addr.namaddrport}: {exc}")
            ok = False
        except StreamEOF:
            warn(f"lost connection with {self.addr.namaddrport}")
            ok = False
        finally:
            stream.close(timeout=min(2.0, self.cmd_timeout))
        return ok

    def _quit(self, stream) -> bool:
        try:
            self._command(stream, "QUIT")
            self._reply(stream, self.cmd_timeout)
        except StreamTimeout:
            warn("timeout while sending QUIT command")
        except StreamEOF:
            pass
        return True

    def run(self) -> int:
        """All passes: the first, and with -r the reconnections."""
        while True:
            if not self.one_pass():
                break
            if self.reconnect <= 0 or self.cache is None:
                break
            if not self.cache.entries:
                out("Server declined session caching. Done reconnecting.")
                break
            if self.cache_hits > 0 and self.pass_no > 1:
                out("Found a previously used server.  Done reconnecting.")
                break
            self.max_reconnect -= 1
            if self.max_reconnect < 0:
                out("Maximum reconnect count reached.")
                break
            out(f"Reconnecting after {self.reconnect} seconds")
            self.pass_no += 1
            self.mask |= {"cache", "summary"}
            self.mask -= {"certmatch", "peercert", "verbose"}
            time.sleep(self.reconnect)
        return 0


def main(argv: list[str] | None = None) -> int:
    """posttls-finger [options] destination [match ...]: returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts, dest, match, config_dir = parse_args(argv)
        finger = Finger(opts, dest, match, config_dir)
    except Usage as exc:
        sys.stderr.write(f"{PROG}: {exc}\n{USAGE}")
        return 1
    except Fatal as exc:
        out(f"fatal: {exc}")
        return 1
    return finger.run()


if __name__ == "__main__":
    sys.exit(main())
