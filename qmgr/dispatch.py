"""qmgr's side of a delivery: requests to the agents over private/TRANSPORT, never blocking.

One AgentCall is one lib/deliver.py conversation: connect to
queue_directory/private/TRANSPORT, send the request frame, read one reply frame, close.
Every step is non-blocking and the whole conversation has one deadline. The result goes to
the done callback, always from the event loop and never from inside dispatch(), as either
a lib.deliver.DeliveryStatus or a qmgr.manager.Failure:

    connect fails (no socket, refused)  "mail transport unavailable" (4.3.0), with the
                                        warning `connect to transport private/NAME: REASON`
    the agent closes without a reply    "unknown mail transport error" (4.3.0), with a
                                        warning naming the transport
    a reply that breaks the protocol    "unknown mail transport error" (4.3.0), with a
                                        warning that says what was wrong
    no reply before the deadline        "delivery agent timeout" (4.3.0)

All of them suspend the transport (see qmgr/manager.py). A full listen queue (EAGAIN on
connect) is retried until the deadline.

FUNCTIONS
    AgentPool(loop, queue_root, timeout, done): dispatch(job, request) starts a call;
        done(job, result) receives its outcome; close() abandons the calls in progress.

SEE ALSO
    lib/deliver.py, lib/attr.py, Postfix qmgr_deliver.c.
"""

from __future__ import annotations

import os
import socket

from ..lib import attr, deliver, msg
from .manager import Failure

RETRY_CONNECT = 0.1          # seconds between connects while the listen queue is full
READ_SIZE = 65536


class AgentCall:
    """One request/reply conversation with a delivery agent."""

    def __init__(self, pool: "AgentPool", job, request: deliver.Request):
        self.pool = pool
        self.loop = pool.loop
        self.job = job
        self.transport = request.transport
        self.rcpt_count = len(request.recipients)
        self.frame = memoryview(deliver.encode_request(request))
        self.path = pool.socket_path(request.transport)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.writing = False        # waiting for room to send the rest of the request
        self.decoder: attr.FrameDecoder | None = None    # when the reply comes in pieces
        self.timer = None
        self.finished = False

    def start(self) -> None:
        """Begin: arm the deadline and connect."""
        self.timer = self.loop.call_later(self.pool.timeout, self._timeout)
        self._connect()

    def _connect(self) -> None:
        if self.finished:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except (BlockingIOError, InterruptedError):
            sock.close()             # the agents' listen queue is full: try again shortly
            self.loop.call_later(RETRY_CONNECT, self._connect)
            return
        except OSError as exc:
            sock.close()
            msg.warn(f"connect to transport private/{self.transport}: "
                     f"{exc.strerror or exc}")
            self._finish(Failure("4.3.0", "mail transport unavailable"), later=True)
            return
        self.sock, self.fd = sock, sock.fileno()
        # A UNIX-domain connect completes at once and the request fits the socket buffer:
        # send it now, and wait for writability only for what is left.
        self._writable()
        if self.sock is not None and self.frame:
            self.writing = True
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            n = self.sock.send(self.frame)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            msg.warn(f"private/{self.transport}: send delivery request: "
                     f"{exc.strerror or exc}")
            self._finish(Failure("4.3.0", "unknown mail transport error"), later=True)
            return
        self.frame = self.frame[n:]
        if not self.frame:
            if self.writing:
                self.writing = False
                self.loop.remove_writer(self.fd)
            self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data = b""
            msg.warn(f"private/{self.transport}: read delivery status: {exc.strerror or exc}")
        if not data:
            msg.warn(f"private/{self.transport}: delivery agent closed the connection "
                     "without a status")
            self._finish(Failure("4.3.0", "unknown mail transport error"))
            return
        try:
            if self.decoder is None and len(data) > attr.LENGTH_SIZE and \
                    int.from_bytes(data[:attr.LENGTH_SIZE], "big") == \
                    len(data) - attr.LENGTH_SIZE:
                # The whole reply in one read (nearly always): the same checks as the
                # FrameDecoder's, without one.
                frame = attr.decode(data)
            else:
                if self.decoder is None:
                    self.decoder = attr.FrameDecoder()
                self.decoder.feed(data)
                frame = self.decoder.next_frame()
                if frame is None:
                    return
            reply = deliver.decode_reply(frame, self.rcpt_count)
        except attr.AttrError as exc:
            msg.warn(f"private/{self.transport}: malformed delivery status: {exc}")
            self._finish(Failure("4.3.0", "unknown mail transport error"))
            return
        self._finish(reply)

    def _timeout(self) -> None:
        self.timer = None
        if not self.finished:
            msg.warn(f"private/{self.transport}: no delivery status after "
                     f"{self.pool.timeout}s")
            self._finish(Failure("4.3.0", "delivery agent timeout"))

    def _finish(self, result, later: bool = False) -> None:
        """Report the outcome: at once from a callback of the loop (a reply, the
        deadline); with later, from the next pass of the loop, for the paths that
        dispatch() itself can reach (the manager may be mid-pass then)."""
        if self.finished:
            return
        self.finished = True
        self.close()
        self.pool.calls.discard(self)
        if later:
            self.loop.call_later(0, lambda: self.pool.done(self.job, result))
        else:
            self.pool.done(self.job, result)

    def close(self) -> None:
        """Drop the connection and the deadline."""
        self.loop.cancel(self.timer)
        self.timer = None
        if self.sock is not None:
            self.loop.remove(self.fd)
            self.sock.close()
            self.sock = None


class AgentPool:
    """The delivery conversations in progress."""

    def __init__(self, loop, queue_root: str, timeout: float, done=None):
        self.loop = loop
        self.queue_root = queue_root
        self.timeout = timeout
        self.done = done
        self.calls: set[AgentCall] = set()
        self._paths: dict[str, str] = {}

    def socket_path(self, transport: str) -> str:
        """queue_root/private/TRANSPORT, the agent's socket."""
        path = self._paths.get(transport)
        if path is None:
            path = self._paths[transport] = os.path.join(self.queue_root, "private",
                                                         transport)
        return path

    def dispatch(self, job, request: deliver.Request) -> None:
        """Start delivering one job."""
        call = AgentCall(self, job, request)
        self.calls.add(call)
        call.start()

    def close(self) -> None:
        """Abandon every call (qmgr is exiting; the files stay in active/)."""
        for call in list(self.calls):
            call.finished = True
            call.close()
        self.calls.clear()

