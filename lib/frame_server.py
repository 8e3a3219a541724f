"""frame_server - many clients, one event loop, one attribute frame per request.

DESCRIPTION
    The request loop shared by the daemons that answer attribute frames (lib/attr.py,
    DESIGN.md) from many long-lived local clients over a UNIX-domain socket, from one
    event loop (lib/events.py): tlsmgr and anvil. A daemon subclasses FrameServer and
    writes answer(); FrameServer reads, decodes, queues the replies and sends them, all
    without blocking and bounded per client, so that a slow or hostile client never
    stalls the others.

    Each client has at most one incomplete frame buffered (the frame limit of lib/attr)
    and at most OUTPUT_HIGH bytes of replies queued: past that the server stops answering
    and reading until the client has read its replies down to OUTPUT_LOW. A frame that
    cannot be parsed but keeps the stream in step gets a status 2 reply; a bad length
    prefix gets status 2 and the connection is closed once that reply is sent, since the
    stream can no longer be read. A client that leaves replies unread, or a frame
    unfinished, for ipc_timeout seconds is disconnected with a warning (arm_reaper()).
    Only the first bad request of a connection is logged.

SECURITY
    Client input reaches the log only as one warning per connection (the daemon's own
    reason text) and the client's process and user id (SO_PEERCRED).

INTERFACE
    FrameClient(sock, now): one connection: sock, fd, decoder, out (unsent replies),
        more, reading, writing, closing, last_io, warned. A daemon may subclass it
        (client_class) to keep its own per-connection state.
    FrameServer(ipc_timeout, clock): clients (fd -> FrameClient), loop, timers (name ->
        timer handle; cancel_timers() cancels them all).
        answer(client, request) -> bytes   the daemon's: the reply frame to one decoded
                                           request (a dict of str -> bytes)
        on_client(conn, loop)              the multi-client skeleton's hook
        client_count()                     how many clients are connected
        arm_reaper(loop)                   start looking for stalled clients
        cancel_timers(); close_clients()   for the daemon's on_exit
        closed(client)                     the daemon's: called once as a client goes
        bad(client, reason) -> bytes       a status 2 reply; warns once per connection
        peer(client) -> str                `client pid=N uid=N` for logs

SEE ALSO
    lib/server.py (multi_server, which accepts the connections), lib/attr.py,
    lib/events.py, tlsmgr/service.py, anvil/service.py.
"""

from __future__ import annotations

import functools
import socket
import struct
import time

from . import attr, msg
from .attr import AttrError


class FrameClient:
    """One client connection: its socket, input decoder and reply queue."""

    __slots__ = ("sock", "fd", "decoder", "out", "more", "reading", "writing", "closing",
                 "last_io", "warned")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = attr.FrameDecoder()
        self.out = bytearray()      # encoded replies not yet sent
        self.more = False           # answering stopped at OUTPUT_HIGH; frames may be waiting
        self.reading = True
        self.writing = False
        self.closing = False        # close once the queued replies are sent
        self.last_io = now
        self.warned = False         # one warning per connection, however bad it gets


class FrameServer:
    """The request loop; a daemon subclasses it and writes answer()."""

    RECV_SIZE = 65536           # bytes read from a client per readiness event
    OUTPUT_HIGH = 256 * 1024    # stop answering and reading with this much unsent
    OUTPUT_LOW = 64 * 1024      # ... and start again below this
    client_class = FrameClient

    def __init__(self, ipc_timeout: float, clock=time.monotonic):
        self.ipc_timeout = ipc_timeout
        self.clock = clock
        self.clients: dict[int, FrameClient] = {}
        self.loop = None
        self._timers: dict[str, object] = {}

    # --- the daemon's part ---------------------------------------------------------------
    def answer(self, client, request: dict[str, bytes]) -> bytes:
        """Return the reply frame to one decoded request."""
        raise NotImplementedError

    def closed(self, client: FrameClient) -> None:
        """A client went away (called once, before its socket is closed)."""

    # --- hooks ---------------------------------------------------------------------------
    def on_client(self, conn: socket.socket, loop) -> None:
        """Take a newly accepted connection and serve it from loop."""
        if self.loop is None:
            self.loop = loop
        conn.setblocking(False)
        client = self.client_class(conn, self.clock())
        self.clients[client.fd] = client
        loop.add_reader(client.fd, functools.partial(self._readable, client))

    def client_count(self) -> int:
        """Return the number of connected clients."""
        return len(self.clients)

    def cancel_timers(self) -> None:
        """Cancel every timer in self._timers."""
        if self.loop is not None:
            for timer in self._timers.values():
                self.loop.cancel(timer)
        self._timers.clear()

    def close_clients(self) -> None:
        """Disconnect every client."""
        for client in list(self.clients.values()):
            self._close(client)

    # --- stalled clients -----------------------------------------------------------------
    def arm_reaper(self, loop) -> None:
        """Look for stalled clients from now on, every quarter ipc_timeout (30s at most)."""
        self.loop = loop
        self._timers["reap"] = loop.call_later(self._reap_period(), self._reap)

    def _reap_period(self) -> float:
        return max(0.25, min(self.ipc_timeout / 4, 30.0))

    def _reap(self) -> None:
        """Disconnect clients that left replies unread or a frame unfinished too long."""
        now = self.clock()
        for client in list(self.clients.values()):
            if (client.out or client.decoder.pending) and now - client.last_io > self.ipc_timeout:
                what = "does not read its replies" if client.out else "left a request unfinished"
                msg.warn(f"{self.peer(client)} {what} for {self.ipc_timeout}s: disconnecting")
                self._close(client)
        self._timers["reap"] = self.loop.call_later(self._reap_period(), self._reap)

    # --- client I/O ----------------------------------------------------------------------
    def _readable(self, client: FrameClient) -> None:
        """Read what the client sent, answer every complete frame, send the replies."""
        try:
            data = client.sock.recv(self.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            if client.decoder.pending:
                msg.verbose(1, f"{self.peer(client)} closed the connection inside a frame")
            self._close(client)
            return
        client.last_io = self.clock()
        client.decoder.feed(data)
        self._serve(client)

    def _writable(self, client: FrameClient) -> None:
        """Send queued replies; answer waiting frames once the queue is short again."""
        if not self._send(client):
            return
        if client.more and len(client.out) < self.OUTPUT_LOW:
            self._serve(client)
        else:
            self._interest(client)

    def _serve(self, client: FrameClient) -> None:
        """Answer decoded frames and send, until the queue is long or no frame is left."""
        while True:
            client.more = self._answer_frames(client)
            if not self._send(client):
                return
            if not (client.more and len(client.out) < self.OUTPUT_LOW):
                break
        self._interest(client)

    def _answer_frames(self, client: FrameClient) -> bool:
        """Queue replies to decoded frames; True when stopped because the queue is long."""
        out, decoder, answer, high = client.out, client.decoder, self.answer, self.OUTPUT_HIGH
        while len(out) < high:
            try:
                request = decoder.next_frame()
            except AttrError as exc:
                out += self.bad(client, str(exc))
                if not exc.recoverable:
                    client.closing = True       # the stream is out of step: nothing more
                    return False
                continue
            if request is None:
                return False
            out += answer(client, request)
        return True

    def _send(self, client: FrameClient) -> bool:
        """Send what the socket takes now; False when the connection had to be closed."""
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._close(client)
                return False
            del client.out[:sent]
            client.last_io = self.clock()
        return True

    def _interest(self, client: FrameClient) -> None:
        """Watch the client for reading and writing as its state needs; close when done."""
        if client.closing and not client.out:
            self._close(client)
            return
        want_read = not client.closing and not client.more
        want_write = bool(client.out)
        if want_read != client.reading:
            client.reading = want_read
            if want_read:
                self.loop.add_reader(client.fd, functools.partial(self._readable, client))
            else:
                self.loop.remove_reader(client.fd)
        if want_write != client.writing:
            client.writing = want_write
            if want_write:
                self.loop.add_writer(client.fd, functools.partial(self._writable, client))
            else:
                self.loop.remove_writer(client.fd)

    def _close(self, client: FrameClient) -> None:
        """Forget the client, tell the daemon, close its socket."""
        if self.clients.pop(client.fd, None) is None:
            return
        self.closed(client)
        if self.loop is not None:
            self.loop.remove(client.fd)
        client.sock.close()

    # --- replies and logs ----------------------------------------------------------------
    def bad(self, client, reason: str) -> bytes:
        """Return a status 2 reply; log the first bad request of a connection."""
        if not client.warned:
            client.warned = True
            msg.warn(f"bad request from {self.peer(client)}: {reason}")
        return attr.encode({"status": attr.STATUS_BAD,
                            "reason": reason.encode("utf-8", "backslashreplace")})

    @staticmethod
    def peer(client) -> str:
        """Name a client for logs by its process id and user id (SO_PEERCRED)."""
        if not isinstance(client, FrameClient):
            return "client"         # a caller's own object (in-process tests)
        try:
            pid, uid, _ = struct.unpack("3i", client.sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return "client"
        return f"client pid={pid} uid={uid}"
