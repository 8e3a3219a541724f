"""discard - throw mail away and say so, as Postfix's discard(8).

SYNOPSIS
    master.cf:  discard  unix  -  -  y  -  -  discard
    transport_maps:  example.com  discard:silently

DESCRIPTION
    discard takes one lib/deliver.py request at a time from qmgr and reports every
    recipient as delivered without delivering anything, logging
    `ID: to=<r>, relay=none, ..., dsn=2.0.0, status=sent (REASON)`, where REASON is the
    next-hop field of the transport (the text after `discard:`; the recipient domain when
    the table leaves it empty, as Postfix resolves it), or "discarded" when there is none.
    qmgr then marks the recipients done.

SECURITY
    discard never opens the queue file; it can run chrooted and unprivileged.

CONFIGURATION PARAMETERS
    ipc_timeout (3600s), soft_bounce (no: it has nothing to bounce).

SEE ALSO
    Postfix discard(8), error(8); lib/delivery_agent.py; lib/deliver.py.
"""

from __future__ import annotations

from ..lib import server
from ..lib.delivery_agent import decided, result, serve


def deliver_request(request, ctx):
    """Every recipient: sent, with the next hop as the reason."""
    # one result for all: decided() only reads it
    return "none", [result("sent", "2.0.0", request.nexthop or "discarded")] \
        * len(request.recipients)


def service(conn, ctx) -> None:
    """One connection from qmgr: one request."""
    serve(conn, ctx, decided(deliver_request))


def main(ctx) -> int:
    """Serve delivery requests until the master retires this process."""
    return server.single_server(ctx, service)
