"""tls_history - what the smtp client remembers of each next hop's TLS, and what it warns of.

NAME
    tls_history - TLS outcomes per next hop: records, changes, and their display

DESCRIPTION
    With smtp_tls_history_database (a postfix-py extension), the smtp client records the
    outcome of every new connection to a server of a next hop whose policy allows TLS,
    in tlsmgr (tlsmgr/history.py keeps the last smtp_tls_history_size per next hop). A
    record is a small JSON object:

        t         time (seconds since the epoch)
        server    host[addr]:port
        level     the TLS security level of the policy (may, encrypt, verify, ...)
        tls       whether the session was encrypted
        status    Postfix's word for it: Anonymous, Untrusted, Trusted, Verified
                  (empty in plain text)
        protocol, cipher, fingerprint (smtp_tls_fingerprint_digest of the server
                  certificate), subject and issuer (CommonNames), resumed

    tlsmgr answers an update with the history before it, and changes() compares the
    new record with the last one of the same server. The smtp client logs a warning
    for each change that is not routine:

        warning: TLS history: mx.example.com[192.0.2.1]:25 for example.com: was TLS
            (Verified TLSv1.3) on 2026-12-05 20:01:02 UTC, now plaintext
        warning: TLS history: ... certificate changed: fingerprint AB:.. -> CD:..,
            issuer "Old CA" -> "New CA", Verified -> Untrusted

    Plain text after TLS, a certificate of another issuer, and a lower status
    (Verified > Trusted > Untrusted > Anonymous) are warned of, and counted in the
    metric postfix_smtp_tls_history_changes_total; a new certificate of the same issuer
    with the same or a better status is a renewal, logged as info.

FUNCTIONS
    record_of(server, level, info, now) -> dict (info: lib/tls.TLSInfo, None in plain text)
    changes(before, record) -> (warnings, notes): texts without the "TLS history:" prefix
    report(nexthop, record, before): log them (warning or info), and count each warning
        in postfix_smtp_tls_history_changes_total{destination, change} (lib/metrics.py;
        change: plaintext, certificate or status)
    format_history(history) -> lines for `postfix-py tls history`

SEE ALSO
    tlsmgr/history.py, smtp/service.py, tools/postfix_tls.py, lib/metrics.py.
"""

from __future__ import annotations

import time

from . import metrics, msg

_RANK = {"": -1, "Anonymous": 0, "Untrusted": 1, "Trusted": 2, "Verified": 3}


def record_of(server: str, level: str, info, now: float | None = None) -> dict:
    """The record of one connection: info is the handshake's TLSInfo, or None."""
    record = {"t": int(time.time() if now is None else now), "server": server,
              "level": level, "tls": info is not None}
    if info is None:
        record["status"] = ""
        return record
    record.update({
        "status": info.status, "protocol": info.protocol, "cipher": info.cipher_name,
        "fingerprint": info.peer_fingerprint, "subject": info.peer_CN,
        "issuer": info.issuer_CN, "resumed": bool(info.session_reused)})
    return record


def _when(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(t)))
    except (TypeError, ValueError, OverflowError):
        return "?"


def _what(record: dict) -> str:
    if not record.get("tls"):
        return "plaintext"
    return f"TLS ({record.get('status', '?')} {record.get('protocol', '?')})"


def _compare(before: list, record: dict) -> list[tuple[str, str, bool]]:
    """(kind, text, warn) for each change of record against the last record of its
    server; kind: plaintext, certificate, status (the metric's label) or tls, renewal."""
    last = None
    for old in reversed(before):
        if isinstance(old, dict) and old.get("server") == record.get("server"):
            last = old
            break
    if last is None:
        return []
    if last.get("tls") and not record.get("tls"):
        return [("plaintext", f"was {_what(last)} on {_when(last.get('t'))}, now plaintext",
                 True)]
    if not record.get("tls"):
        return []
    if not last.get("tls"):
        return [("tls", f"was plaintext on {_when(last.get('t'))}, now {_what(record)}",
                 False)]
    found: list[tuple[str, str, bool]] = []
    old_status, new_status = last.get("status", ""), record.get("status", "")
    lower = _RANK.get(new_status, -1) < _RANK.get(old_status, -1)
    old_fp, new_fp = last.get("fingerprint", ""), record.get("fingerprint", "")
    if old_fp and new_fp and old_fp != new_fp:
        text = f"certificate changed: fingerprint {old_fp} -> {new_fp}"
        other_issuer = last.get("issuer", "") != record.get("issuer", "")
        if other_issuer:
            text += f", issuer \"{last.get('issuer', '')}\" -> \"{record.get('issuer', '')}\""
        if old_status != new_status:
            text += f", {old_status} -> {new_status}"
        unexpected = other_issuer or lower
        found.append(("certificate" if unexpected else "renewal", text, unexpected))
    elif lower:
        found.append(("status", f"security status changed: {old_status} -> {new_status}",
                      True))
    return found


def changes(before: list, record: dict) -> tuple[list[str], list[str]]:
    """(warnings, notes) about record against the last record of its server."""
    found = _compare(before, record)
    return ([text for _, text, warn in found if warn],
            [text for _, text, warn in found if not warn])


def report(nexthop: str, record: dict, before: list) -> None:
    """Log the changes of record against before, the next hop's history: a warning and
    the metric postfix_smtp_tls_history_changes_total{destination, change} for each
    unexpected one, an info line for a routine one."""
    for kind, text, warn in _compare(before, record):
        line = f"TLS history: {record.get('server', '?')} for {nexthop}: {text}"
        if warn:
            msg.warn(line)
            metrics.tls_history_change(nexthop, kind)
        else:
            msg.info(line)


def format_history(history: dict) -> list[str]:
    """Lines for `postfix-py tls history`: per next hop, newest first."""
    lines: list[str] = []
    for nexthop in sorted(history):
        records = [r for r in history[nexthop] if isinstance(r, dict)]
        lines.append(f"{nexthop}:")
        for r in reversed(records):
            if r.get("tls"):
                detail = (f"{r.get('status', '')} {r.get('protocol', '')} "
                          f"{r.get('cipher', '')}"
                          f"{' resumed' if r.get('resumed') else ''}")
                cert = (f"    fingerprint {r.get('fingerprint', '') or '-'} "
                        f"subject \"{r.get('subject', '')}\" issuer \"{r.get('issuer', '')}\"")
            else:
                detail, cert = "plaintext", ""
            lines.append(f"  {_when(r.get('t'))} {r.get('server', '?')} "
                         f"level={r.get('level', '?')} {detail}")
            if cert:
                lines.append(cert)
    return lines
