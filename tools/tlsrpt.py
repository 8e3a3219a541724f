"""`postfix-py tlsrpt`: send the TLSRPT (RFC 8460) reports that are due, or show them.

SYNOPSIS
    postfix-py [-c config_dir] tlsrpt send [-a]
    postfix-py [-c config_dir] tlsrpt show

DESCRIPTION
    The smtp client records outbound TLS outcomes in tlsrpt_database when
    smtp_tlsrpt_enable = yes (lib/tlsrpt.py). `send` sends the aggregate report of every
    complete UTC day (with -a, the current day's too, so far) to each policy domain's
    `_smtp._tls` rua: https: by POST, mailto: as a message submitted through the local
    pickup service (the mail system must be running, as for sendmail), where the DKIM
    signing milter of non_smtpd_milters signs it (RFC 8460 wants it signed; see
    lib/tlsrpt.py). Run it once a day,
    shortly after midnight UTC, from cron or with conf/postfix-py-tlsrpt.timer: a command rather than a timer in a daemon, so
    that no long-lived postfix-py process talks HTTPS to the internet and a report run
    can be retried, or run by hand, at any time. `show` prints what is stored, as JSON.

    DNS lookups use smtp_dns_nameservers (else the system's resolv.conf), as the smtp
    client's do; https: receivers are authenticated with tlsrpt_https_CAfile (empty: the
    system's CA bundle).

EXIT STATUS
    0 done (reports that failed are kept and retried, and warned about); 1 the store or
    the configuration cannot be used; 64 usage.

SEE ALSO
    lib/tlsrpt.py, smtp/service.py; RFC 8460.
"""

from __future__ import annotations

import json
import os
import ssl
import sys

import dns.resolver
import lmdb

from ..lib import dnsbl, https, maincf, msg, tlsrpt
from . import sendmail

USAGE = "usage: postfix-py tlsrpt send [-a] | show"


def _resolver(cfg) -> dns.resolver.Resolver:
    servers = cfg["smtp_dns_nameservers"]
    lookup = dnsbl.DnsLookup(nameservers=servers)
    resolver = lookup.resolver
    resolver.lifetime = resolver.timeout = float(cfg["smtp_dns_timeout"])
    if lookup.problem:
        msg.warn(lookup.problem)
    return resolver


def main(argv: list[str]) -> int:
    """`tlsrpt send [-a]` or `tlsrpt show`; returns the exit status."""
    msg.init_cli("tlsrpt")
    argv = list(argv)
    config = None
    while len(argv) >= 2 and argv[0] == "-c":
        config, argv = argv[1], argv[2:]
    if not argv or argv[0] not in ("send", "show") or \
            [a for a in argv[1:] if a != "-a"] or (argv[0] == "show" and len(argv) > 1):
        print(USAGE, file=sys.stderr)
        return 64
    try:
        cfg = maincf.load(config)
    except maincf.ConfigError as exc:
        msg.error(str(exc))
        return 1
    path = cfg.get("tlsrpt_database").strip()
    if not os.path.exists(path):
        if argv[0] == "show":
            print("{}")
        return 0                    # nothing was ever recorded
    try:
        store = tlsrpt.Store(path, cfg["lmdb_map_size"], readonly=argv[0] == "show")
    except lmdb.Error as exc:
        msg.error(f"tlsrpt_database: cannot open {path}: {exc}")
        return 1
    try:
        if argv[0] == "show":
            days = store.days()
            out = {f"{day} {domain}": entries for (day, domain), entries in sorted(days.items())}
            print(json.dumps(out, indent=2))
            return 0
        cafile = cfg.get("tlsrpt_https_CAfile").strip()
        try:
            ctx = https.client_context(cafile)
        except (ssl.SSLError, OSError) as exc:
            msg.error(f"tlsrpt_https_CAfile: cannot load {cafile}: {exc}")
            return 1

        def submit(sender: str, rcpts: list[str], message: bytes) -> str:
            try:
                return sendmail.submit(cfg, sender, "", rcpts, message)
            except sendmail.Failure as exc:
                raise RuntimeError(str(exc)) from None

        sender = tlsrpt.Sender(cfg, store, _resolver(cfg), submit, ctx)
        counts = sender.send_due(include_today="-a" in argv[1:])
        msg.info(f"reports sent: {counts['sent']}, failed: {counts['failed']}, "
                 f"no rua: {counts['no_rua']}, kept for DNS: {counts['kept']}")
        return 0
    finally:
        store.close()
