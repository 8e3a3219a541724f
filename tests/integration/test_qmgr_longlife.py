"""qmgr over a long life: thousands of messages through a real instance to discard:, and
qmgr's memory must stay flat (Postfix's qmgr stays at a few MB whatever it has moved)."""

import socket
import threading

import psutil

from pfxinst import free_port, wait_for

MESSAGES = 4000             # a leak of ~1 KB per message shows as 3 MB
CLIENTS = 4
PER_SESSION = 100
MARGIN = 2 * 1024 * 1024    # RSS growth allowed between N/4 and N messages: this, or 10%
BODY = (b"From: <a@example.org>\r\nTo: <b@example.net>\r\nSubject: long life\r\n\r\n"
        + b"x" * 70 + b"\r\n.\r\n")


def client(port: int, count: int, errors: list) -> None:
    """Send count messages, PER_SESSION per connection, MAIL/RCPT/DATA pipelined."""
    sent = 0
    try:
        while sent < count:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                f = sock.makefile("rb")

                def reply() -> bytes:
                    while True:
                        line = f.readline()
                        if not line:
                            raise ConnectionError("server closed the connection")
                        if line[3:4] != b"-":
                            return line
                reply()
                sock.sendall(b"EHLO client.example\r\n")
                reply()
                for _ in range(min(PER_SESSION, count - sent)):
                    sock.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                                 b"DATA\r\n")
                    replies = [reply() for _ in range(3)]
                    sock.sendall(BODY)
                    replies.append(reply())
                    if [r[:3] for r in replies] != [b"250", b"250", b"354", b"250"]:
                        raise AssertionError(replies)
                    sent += 1
                sock.sendall(b"QUIT\r\n")
                reply()
    except (OSError, AssertionError) as exc:
        errors.append(repr(exc))


def send(port: int, count: int) -> None:
    errors: list = []
    threads = [threading.Thread(target=client,
                                args=(port, count // CLIENTS + (i < count % CLIENTS), errors))
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_qmgr_memory_stays_flat(instance):
    port = free_port()
    instance.main.update({"default_transport": "discard", "mydestination": "",
                          "mynetworks": "127.0.0.0/8", "smtpd_error_sleep_time": "0s"})
    instance.master_lines = [f"127.0.0.1:{port} inet n - n - - smtpd",
                             "qmgr unix n - n 300 1 qmgr",
                             "discard unix - - y - - discard"]
    instance.start()

    def qmgr():
        for p in instance.workers():
            try:
                if "qmgr" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                pass
    proc = wait_for(qmgr, what="qmgr")
    rss = {}
    done = 0
    for step in (MESSAGES // 4, MESSAGES):
        send(port, step - done)
        done = step
        wait_for(lambda: instance.log().count(": removed") >= done, timeout=120,
                 interval=0.2, what=f"{done} messages delivered")
        rss[step] = proc.memory_info().rss
    # Each process writes its own log lines: discard's may land after qmgr's "removed".
    wait_for(lambda: instance.log().count("status=sent") == MESSAGES, what="status=sent")
    # The active queue's high-water mark may rise a little with the machine's load;
    # a leak of the size this test was written for (4 KB a message) adds 12 MB.
    grown = rss[MESSAGES] - rss[MESSAGES // 4]
    assert grown <= max(MARGIN, rss[MESSAGES // 4] // 10), \
        f"qmgr RSS grew {grown / 1e6:.1f} MB over {MESSAGES - MESSAGES // 4} messages: {rss}"
