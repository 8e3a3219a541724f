"""`tlsmgr [-c config_dir] [--socket path] status [--json]`: ask the running tlsmgr how it is.

NAME
    tlsmgr status - report on the running tlsmgr

DESCRIPTION
    Sends one `status` request to tlsmgr over $queue_directory/private/tlsmgr (or --socket)
    and prints a compact report for a person: process id, uptime and clients; the PRNG
    source, last and next reseed, bytes served and the last exchange-file write; for each
    session cache its database, entries, size, map use, lookups, hits, misses, updates,
    deletes, expired entries removed and hit ratio; and how server-side resumption is done.
    With --json it prints the same report as JSON (one object, tlsmgr's own field names).
    One request, no walk of the caches: cheap enough to run every second.

DIAGNOSTICS
    When tlsmgr is not running (no socket, connection refused, no answer) or the
    configuration cannot be read, one line on standard error (`tlsmgr: fatal: ...`) and
    exit status 1. Exit status 0 otherwise.

SEE ALSO
    tlsmgr/service.py, lib/tlsmgr_client.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from postfix_py.lib import attr, maincf, msg

TIMEOUT = 5.0


def _ago(stamp: float | None, now: float) -> str:
    """Return a wall-clock time as local time plus how long ago (or until) it is."""
    if stamp is None:
        return "never"
    local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    delta = stamp - now
    return f"{local} ({_duration(-delta)} ago)" if delta <= 0 else f"{local} (in {_duration(delta)})"


def _duration(seconds: float) -> str:
    """Return seconds as 2d3h, 4h5m, 6m7s or 8s."""
    s = int(max(0, seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{s}s"
    return f"{s}s"


def _size(n: int) -> str:
    """Return a byte count in B, KiB, MiB or GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_report(report: dict, now: float | None = None) -> str:
    """Return the status report as text for a person."""
    now = time.time() if now is None else now
    p = report.get("prng", {})
    lines = [
        f"tlsmgr: pid {report.get('pid')}, up {_duration(report.get('uptime', 0))},"
        f" {report.get('clients', 0)} client(s) connected",
        f"prng: source {p.get('source') or '(none)'}"
        f"{'' if p.get('source_open', True) or not p.get('source') else ' (closed after an error)'},"
        f" {p.get('bytes_served', 0)} bytes served in {p.get('seed_requests', 0)} seeds,"
        f" {p.get('reseeds', 0)} reseeds",
        f"  last reseed {_ago(p.get('last_reseed'), now)}, next {_ago(p.get('next_reseed'), now)}",
        f"  exchange file {p.get('exchange_file') or '(none)'},"
        f" last written {_ago(p.get('last_exchange_write'), now)}",
    ]
    for kind, c in report.get("caches", {}).items():
        if not c.get("enabled"):
            why = "not configured" if not c.get("database") else "disabled (see tlsmgr's log)"
            if c.get("database") and not c.get("timeout"):
                why = "disabled (timeout 0)"
            lines.append(f"cache {kind}: {why}")
            continue
        sharers = c.get("shared_by", kind).split(",")
        if sharers[0] != kind:
            lines.append(f"cache {kind}: same database as {sharers[0]} (counted there)")
            continue
        ratio = c.get("hit_ratio")
        lines.append(
            f"cache {kind}: {c['database']} ({c['file']}), timeout {c['timeout']}s")
        size = (f"shared store {'up' if c['store_up'] else 'DOWN'}, {c['store_errors']}"
                f" store errors, {c['backup_hits']} backup hits" if "store_up" in c else
                f"{c['entries']} entries, {_size(c['bytes'])} of {_size(c['map_size'])}"
                f" map ({100 * c['map_use']:.1f}%)")
        lines.append(
            f"  {size}; lookups {c['lookups']}, hits {c['hits']},"
            f" misses {c['misses']}, hit ratio {'-' if ratio is None else f'{100 * ratio:.1f}%'};"
            f" updates {c['updates']}, deletes {c['deletes']}, expired {c['expired']},"
            f" evicted {c['evicted']}")
    lines.append(f"server resumption: {report.get('server_resumption', '?')}")
    return "\n".join(lines)


def status(socket_path: str, as_json: bool) -> int:
    """Ask tlsmgr for its status and print it; fatal (exit 1) when it does not answer."""
    if not os.path.exists(socket_path):
        msg.fatal(f"tlsmgr is not running: {socket_path}: no such socket")
    try:
        with attr.AttrClient(socket_path, TIMEOUT) as clnt:
            reply = clnt.request({"request": attr.REQ_STATUS})
        code = attr.reply_status(reply)
        if code != attr.STATUS_OK:
            msg.fatal(f"tlsmgr refused the status request: {reply.get('reason', b'').decode('utf-8', 'replace')}")
        report = json.loads(reply["status_json"])
    except attr.AttrClientError as exc:
        cause = exc.__cause__
        why = getattr(cause, "strerror", None) or str(cause or exc)
        msg.fatal(f"tlsmgr is not running or not answering: {socket_path}: {why}")
    except (attr.AttrError, KeyError, ValueError) as exc:
        msg.fatal(f"bad status reply from tlsmgr at {socket_path}: {exc}")
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0


def main(argv=None) -> int:
    """Entry point of the `tlsmgr` console script."""
    msg.init_cli("tlsmgr")
    parser = argparse.ArgumentParser(prog="tlsmgr", description="report on the running tlsmgr")
    parser.add_argument("-c", dest="config_dir", help="configuration directory (default: $MAIL_CONFIG or /etc/postfix-py)")
    parser.add_argument("--socket", help="tlsmgr socket (default: $queue_directory/private/tlsmgr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="status")
    st = sub.add_parser("status", help="report pid, PRNG, caches and resumption")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        socket_path = args.socket
        if socket_path is None:
            cfg = maincf.load(args.config_dir)
            socket_path = os.path.join(cfg["queue_directory"], "private", "tlsmgr")
        return status(socket_path, args.json)
    except maincf.ConfigError as exc:
        msg.fatal(str(exc))
    except msg.FatalError as exc:
        return exc.code
    except BrokenPipeError:     # e.g. `tlsmgr status | head -1`
        return 0


if __name__ == "__main__":
    sys.exit(main())
