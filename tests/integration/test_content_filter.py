"""Content filtering through a real master: the FILTER action of header_checks and the
content_filter parameter (lib/cleanup.py) make qmgr send the message to the filter's
transport:destination, here a counting SMTP sink, whatever its recipients' routes; a
filter without a destination goes to default_filter_nexthop."""

import os
import smtplib

import pytest

from pfxinst import free_port, wait_for
from sink import Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)")


def send(port, rcpt, subject):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("alice@example.org")
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def test_filter_action_and_content_filter_route_to_the_filter(instance):
    with Sink() as scanner:
        instance.port, filtered = free_port(), free_port()
        (instance.dir / "header_checks").write_text(
            f"/^Subject: scan me/ FILTER smtp:[127.0.0.1]:{scanner.port}\n"
            "/^Subject: no nexthop/ FILTER smtp:\n")
        instance.main.update({
            "mydestination": "$myhostname, localhost", "smtpd_error_sleep_time": "0s",
            "header_checks": f"regexp:{instance.dir}/header_checks",
            "mail_spool_directory": str(instance.dir / "mail"),
            "queue_run_delay": "1s",
            # the next hop of a filter that names none (else the recipient domain)
            "default_filter_nexthop": f"[127.0.0.1]:{scanner.port}",
        })
        os.mkdir(instance.dir / "mail")
        os.chmod(instance.dir / "mail", 0o1777)
        instance.master_lines = [
            f"127.0.0.1:{instance.port} inet n - n - - smtpd",
            f"127.0.0.1:{filtered} inet n - n - - smtpd"
            f" -o content_filter=smtp:[127.0.0.1]:{scanner.port}",
            "qmgr unix n - n 300 1 qmgr",
            "smtp unix - - y - - smtp",
            "local unix - n n - - local",
        ]
        instance.start()
        host = instance.main["myhostname"]
        plain = send(instance.port, f"nobody@{host}", "plain")
        scanned = send(instance.port, f"nobody@{host}", "scan me")
        by_param = send(filtered, "someone@remote.example", "any")
        default = send(instance.port, f"other@{host}", "no nexthop")
        for qid in (plain, scanned, by_param, default):
            wait_for(lambda: f"{qid}: removed" in instance.log(), timeout=30, what=qid)
        log = instance.log()
        got = sorted(r for _, rcpts, _ in scanner.messages for r in rcpts)
    assert got == [f"nobody@{host}", f"other@{host}", "someone@remote.example"]
    assert f"{default}: to=<other@{host}>, relay=127.0.0.1[127.0.0.1]:{scanner.port}," \
        in log
    assert f"{scanned}: filter: header Subject: scan me from localhost[127.0.0.1];" in log
    assert f"{scanned}: to=<nobody@{host}>, relay=127.0.0.1[127.0.0.1]:{scanner.port}," in log
    assert f"{by_param}: to=<someone@remote.example>, relay=127.0.0.1[127.0.0.1]:" \
           f"{scanner.port}," in log
    assert f"{plain}: to=<nobody@{host}>, relay=local," in log
    assert "Subject: plain" in (instance.dir / "mail" / "nobody").read_text()
