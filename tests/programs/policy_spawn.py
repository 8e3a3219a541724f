"""A minimal stand-in for Postfix's spawn(8), for the policy tests: listen on a UNIX
socket and run one command per connection with the connection as its stdin and stdout
(as master.cf's `policy unix - n n - 0 spawn user=nobody argv=/usr/bin/policyd-spf`).

    python3 policy_spawn.py SOCKET COMMAND [ARG...]

The socket is made mode 0666 so that the chrooted, unprivileged smtpd can connect.
SIGTERM ends the listener and the commands it started (by their pids).
"""

import os
import signal
import socket
import sys


def main() -> int:
    path, argv = sys.argv[1], sys.argv[2:]
    children: set[int] = set()

    def stop(signum, frame):
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os._exit(0)

    def reap(signum, frame):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGCHLD, reap)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(16)
    while True:
        try:
            conn, _ = listener.accept()
        except InterruptedError:
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            os.dup2(conn.fileno(), 0)
            os.dup2(conn.fileno(), 1)
            conn.close()
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        children.add(pid)
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
