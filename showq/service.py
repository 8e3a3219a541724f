"""showq - list the mail queue on public/showq, as Postfix's showq(8).

SYNOPSIS
    master.cf:  showq  unix  n  -  n  -  -  showq

DESCRIPTION
    Each client that connects to queue_directory/public/showq gets the whole queue in
    Postfix 3.0-3.10's showq protocol (lib/showq.py: attr_print0 records, the protocol
    record first, then one record per message of maildrop, incoming, active, deferred and
    hold, with each pending recipient and its defer reason, then an empty record), and
    the connection is closed. Nothing is read from the client. Postfix's own postqueue -p
    (3.7, as Debian ships it) and prometheus-postfix-exporter (--postfix.showq_path) read
    it, the latter for queue sizes and ages.

SECURITY
    showq reads queue files and defer logs only; it runs as mail_owner and may run
    chrooted in queue_directory. The socket is public (world-writable), as Postfix's: the
    listing shows senders and recipients to every local user, as mailq does with Postfix.

CONFIGURATION PARAMETERS
    ipc_timeout (3600s): time limit for writing the listing to one client.
    queue_directory: where the queue is (the working directory after the privilege drop).

SEE ALSO
    Postfix showq(8), postqueue(1); lib/showq.py; tools/postqueue.py.
"""

from __future__ import annotations

from ..lib import msg, server, showq

BATCH = 65536           # bytes of listing gathered before one sendall


def service(conn, ctx) -> None:
    """One client: the whole queue, then close."""
    conn.settimeout(ctx.cfg["ipc_timeout"])
    with conn:
        out = bytearray(showq.PROTOCOL_RECORD)
        try:
            # The working directory is queue_directory, chrooted or not.
            for m in showq.messages("."):
                out += showq.message_record(m)
                if len(out) >= BATCH:
                    conn.sendall(out)
                    out.clear()
        except OSError as exc:
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise ConnectionError(str(exc)) from exc
            msg.warn(f"open {exc.filename}: {exc.strerror}")
            return          # no end record: the client sees a truncated listing
        out += showq.END
        conn.sendall(out)


def main(ctx) -> int:
    """Serve queue listings until the master retires this process."""
    return server.single_server(ctx, service)
