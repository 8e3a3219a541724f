"""delay_warning_time through a real instance: mail that cannot leave gets one "Delayed
Mail (still being retried)" notice to its sender, and only one, across retries and a
restart of the mail system (the queue file records that it was sent)."""

import email
import email.policy
import smtplib

from pfxinst import free_port, wait_for
from sink import Sink


def test_one_delay_warning_per_message(instance):
    port, closed = free_port(), free_port()        # nothing listens on `closed`
    with Sink(keep_bodies=True) as sink:
        instance.main.update({
            "mydestination": "localhost", "smtpd_error_sleep_time": "0s",
            "relayhost": f"[127.0.0.1]:{closed}", "smtp_connect_timeout": "2s",
            "transport_maps": f"inline:{{example.org=smtp:[127.0.0.1]:{sink.port}}}",
            "delay_warning_time": "1s", "queue_run_delay": "1s",
            "minimal_backoff_time": "1s", "maximal_backoff_time": "2s"})
        instance.master_lines = [f"127.0.0.1:{port} inet n - y - - smtpd",
                                 "qmgr unix n - n 300 1 qmgr", "smtp unix - - y - - smtp"]
        instance.start()
        with smtplib_session(port) as s:
            s.sendmail("alice@example.org", ["bob@remote.example"],
                       b"From: <alice@example.org>\r\nSubject: stuck\r\n"
                       b"Message-ID: <stuck@client.example>\r\n\r\nthe body\r\n")
        qid = wait_for(lambda: _qid(instance.log()), what="the message's queue id")
        deferred = f"{qid}: to=<bob@remote.example>, relay=none"

        wait_for(lambda: sink.messages, timeout=20, what="the delay notice")
        log = instance.log()
        assert f"{qid}: sender delay notification: " in log
        (msgid, rcpts, body) = sink.messages[0]
        assert rcpts == ["alice@example.org"]
        m = email.message_from_bytes(body.replace(b"\r\n", b"\n"),
                                     policy=email.policy.default)
        assert m["Subject"] == "Delayed Mail (still being retried)"
        text, report, original = m.get_payload()
        assert "THIS IS A WARNING ONLY" in text.get_content()
        assert f"<bob@remote.example>: connect to 127.0.0.1[127.0.0.1]:{closed}: " \
               "Connection refused" in text.get_content()
        rcpt = report.get_payload()[1]
        assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.4.1")
        assert rcpt["Will-Retry-Until"]
        assert original.get_content_type() == "text/rfc822-headers"
        assert "the body" not in original.as_string()

        # More attempts, and a restart of the whole system: no second warning.
        before = instance.log().count(deferred)
        wait_for(lambda: instance.log().count(deferred) >= before + 2, timeout=30,
                 what="two more attempts")
        assert instance.cmd("stop").returncode == 0
        instance.start()
        after = instance.log().count(deferred)
        wait_for(lambda: instance.log().count(deferred) >= after + 2, timeout=30,
                 what="two attempts after the restart")
        log = instance.log()
        assert log.count("delay notification: ") == 1
        assert len(sink.messages) == 1
        assert "Traceback" not in log
        # 1s is 0 hours: Postfix's bounce(8) says so when it fills in the template.
        warnings = {line.split("warning: ", 1)[1] for line in log.splitlines()
                    if "qmgr[" in line and "warning: " in line}
        assert warnings == {
            '[built-in]: zero result in delay template conversion of parameter '
            '"delay_warning_time_hours"',
            'please reduce time unit "hours" of "delay_warning_time_hours" in delay template',
            "for instructions see the bounce(5) manual"}


def smtplib_session(port):
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.example")
    return s


def _qid(log):
    for line in log.splitlines():
        if "qmgr[" in line and "from=<alice@example.org>" in line:
            return line.split("]: ", 1)[1].split(":", 1)[0]
    return None
