"""error, retry - fail mail on purpose, as Postfix's error(8).

SYNOPSIS
    master.cf:  error  unix  -  -  y  -  -  error
                retry  unix  -  -  y  -  -  error
    transport_maps:  old.example.com  error:5.1.2 this domain is gone

DESCRIPTION
    error takes one lib/deliver.py request at a time from qmgr and fails every recipient
    with the next-hop field as the reason, logging `ID: to=<r>, relay=none, ...,
    dsn=X, status=bounced (REASON)`. The text may start with an RFC 3463 status code
    (`5.1.2 text`), which becomes the DSN; the default is 5.0.0. Run under the service
    name `retry`, it defers instead (default 4.0.0; a 5.x.x code given becomes 4.x.x), as
    Postfix's retry service does. soft_bounce = yes turns bounces into deferrals.

SECURITY
    error never opens the queue file; it can run chrooted and unprivileged.

CONFIGURATION PARAMETERS
    ipc_timeout (3600s), soft_bounce (no).

SEE ALSO
    Postfix error(8), discard(8); lib/delivery_agent.py; lib/deliver.py.
"""

from __future__ import annotations

import re

from ..lib import server
from ..lib.delivery_agent import decided, result, serve

DSN = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def parse(text: str, default: str) -> tuple[str, str]:
    """A next-hop text as (dsn, reason): a leading status code is taken off."""
    m = DSN.match(text)
    if m and m.group(1) in "45":
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():] or text
    return default, text or "delivery failed"


def deliver_request(request, ctx):
    """Every recipient: bounced (error) or deferred (retry), with the next-hop text."""
    retry = ctx.service.name == "retry"
    dsn, reason = parse(request.nexthop, "4.0.0" if retry else "5.0.0")
    if retry:
        dsn = "4" + dsn[1:]
    kind = "deferred" if retry or dsn.startswith("4") else "bounced"
    return "none", [result(kind, dsn, reason) for _ in request.recipients]


def service(conn, ctx) -> None:
    """One connection from qmgr: one request."""
    serve(conn, ctx, decided(deliver_request))


def main(ctx) -> int:
    """Serve delivery requests until the master retires this process."""
    return server.single_server(ctx, service)
