"""Hand a client connection to another process: the descriptor and its endpoints.

postscreen, which owns the public SMTP port, passes each client it lets through to an
smtpd process of a master.cf `pass` service, as Postfix's postscreen_send.c and
pass_accept.c do: it connects to that service's socket (private/smtpd), sends the client's
socket as SCM_RIGHTS ancillary data, then the endpoint attributes, and waits until the
receiver closes the connection (which tells it the hand-off is complete).

WIRE FORMAT
    One byte `F` carrying the descriptor (SCM_RIGHTS), then one lib/attr.py frame with
    client_address, client_port, server_address and server_port (Postfix's attribute
    names: MAIL_ATTR_ACT_CLIENT_ADDR ...). The endpoints are those postscreen logged,
    which behind a load balancer (postscreen_upstream_proxy_protocol) are the original
    client's, not the socket's peer.

FUNCTIONS
    send(sock, fd, endpoints) -> None: on a connected unix socket, in one sendmsg (it
        does not block on a fresh connection); OSError when it cannot.
    receive(conn, timeout) -> (client socket, endpoints dict of str): on the accepted
        connection; PassError with Postfix's warning text when nothing usable came.
    check(endpoints) -> the endpoints when the addresses and ports are valid, as
        smtpd_peer_from_pass_attr(); PassError otherwise.

SEE ALSO
    postscreen/service.py, smtpd/service.py, master/services.py (the pass type);
    Postfix pass_accept.c, postscreen_send.c, smtpd_peer.c.
"""

from __future__ import annotations

import array
import ipaddress
import select
import socket

from . import attr

PASS_ACCEPT_TIMEOUT = 100           # Postfix's PASS_ACCEPT_TMOUT
NAMES = ("client_address", "client_port", "server_address", "server_port")


class PassError(Exception):
    """Nothing usable arrived; the text is Postfix's warning."""


def send(sock: socket.socket, fd: int, endpoints: dict) -> None:
    """Send the descriptor and its endpoints over a connected unix socket."""
    frame = attr.encode({name: str(endpoints[name]) for name in NAMES})
    data = b"F" + frame
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [fd]))])
    if sent != len(data):
        raise OSError(0, "short write")


def receive(conn: socket.socket, timeout: float = PASS_ACCEPT_TIMEOUT):
    """The passed client socket and its endpoints (PassError when none came)."""
    if not select.select([conn], [], [], timeout)[0]:
        raise PassError("pass_accept_attr: timeout receiving file descriptor")
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    except OSError as exc:
        raise PassError(f"pass_accept_attr: cannot receive file descriptor: "
                        f"{exc.strerror}") from None
    if not fds:
        raise PassError("pass_accept_attr: cannot receive file descriptor: no descriptor")
    client = socket.socket(fileno=fds[0])
    try:
        try:
            raw = attr.read_frame(conn, timeout)
        except (OSError, attr.AttrError) as exc:
            raise PassError(f"pass_accept_attr: cannot receive connection attributes: "
                            f"{exc}") from None
        endpoints = check({k: v.decode("ascii", "replace") for k, v in raw.items()})
    except BaseException:
        client.close()
        raise
    return client, endpoints


def check(endpoints: dict) -> dict:
    """Valid endpoints, or PassError with smtpd_peer.c's warning."""
    for name, what in (("client_address", "client address"),
                       ("client_port", "client port"),
                       ("server_address", "server address"),
                       ("server_port", "server port")):
        value = endpoints.get(name)
        if value is None:
            raise PassError(f"missing {what} from proxy")
        try:
            if name.endswith("address"):
                ipaddress.ip_address(value)
            elif not (value.isdigit() and 0 <= int(value) <= 65535):
                raise ValueError
        except ValueError:
            raise PassError(f"bad {what} syntax from proxy: {value}") from None
    return endpoints
