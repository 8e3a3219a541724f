"""The tools Postfix administrators run over the mail log, over postfix-py's: Debian's
pflogsumm, fail2ban's postfix filter and prometheus-postfix-exporter, with
`syslog_name = postfix` (scripts/install --test installs them)."""

import os
import re
import shutil
import signal
import smtplib
import subprocess
import time

import pytest

from peers import scrape_metrics
from pfxinst import free_port, wait_for

HOST = "mail.test.example"
EXPORTER = "/usr/bin/prometheus-postfix-exporter"


def send(port, sender, rcpts, subject="test"):
    """Submit one message; (queue id, {rejected recipient: (code, text)})."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        refused = {}
        for r in rcpts:
            code, text = s.rcpt(r)
            if code != 250:
                refused[r] = (code, text.decode())
        if len(refused) == len(rcpts):
            s.rset()
            return None, refused
        code, text = s.data(f"From: <{sender}>\r\nSubject: {subject}\r\n"
                            f"Message-ID: <{time.monotonic_ns()}@client.example>\r\n"
                            "\r\nhello\r\n".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1], refused


@pytest.fixture
def postfix_named(instance):
    """An instance logging as Postfix, with smtpd, qmgr and local."""
    instance.port = free_port()
    instance.spool = str(instance.dir / "mail")
    os.mkdir(instance.spool)
    os.chmod(instance.spool, 0o1777)
    instance.main.update({
        "syslog_name": "postfix",
        "myhostname": HOST,
        "mydestination": "$myhostname",
        "mynetworks": "192.0.2.0/24",       # not the test client: remote mail is relaying
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_error_sleep_time": "0s",
        "mail_spool_directory": instance.spool + "/",
        # a rewritten recipient: its delivery line has orig_to=<...>, as Postfix's
        "virtual_alias_maps": f"inline:{{postmaster@{HOST}=nobody@{HOST}}}",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "anvil unix - - n - 1 anvil",
        "local unix - n n - - local",
    ]
    return instance


def traffic(inst):
    """Three connections, two messages in, three deliveries (one to a virtual alias,
    logged with orig_to=), one recipient rejected; the log once all is done."""
    q1, _ = send(inst.port, "alice@example.org", [f"postmaster@{HOST}"])
    q2, _ = send(inst.port, "alice@example.org", [f"nobody@{HOST}", f"root@{HOST}"])
    # Alone in its transaction, as NOQUEUE: Postfix logs a reject after an accepted
    # recipient with the queue id, and the tools count only NOQUEUE rejects.
    q3, refused = send(inst.port, "alice@example.org", ["bob@remote.example"])
    assert q3 is None and refused == {
        "bob@remote.example": (554, "5.7.1 <bob@remote.example>: Relay access denied")}
    wait_for(lambda: f"{q1}: removed" in inst.log() and f"{q2}: removed" in inst.log(),
             what="both messages delivered")
    return inst.log()


def test_log_lines_read_as_postfix(postfix_named):
    postfix_named.start()
    log = traffic(postfix_named)
    lines = log.splitlines()
    assert lines and all(" postfix/" in line for line in lines), log
    assert not [line for line in lines if "postfix-py/" in line.split(": ", 1)[0]]
    # The message-id line is cleanup's, in Postfix's log, with the smtpd's pid here.
    assert len(re.findall(r" postfix/cleanup\[\d+\]: \w+: message-id=<\d+@client\.example>$",
                          log, re.M)) == 2, log
    assert len(re.findall(rf" postfix/local\[\d+\]: \w+: to=<nobody@{HOST}>, "
                          rf"orig_to=<postmaster@{HOST}>, relay=local, ", log)) == 1, log
    reject = [line for line in lines if "NOQUEUE: reject: RCPT from" in line]
    assert len(reject) == 1 and " postfix/smtpd[" in reject[0]
    titles = {" ".join(p.cmdline()).strip() for p in postfix_named.workers()}
    assert f"postfix/smtpd -n 127.0.0.1:{postfix_named.port} -t inet" in titles
    assert "postfix/qmgr -n qmgr -t unix" in titles
    # The master names its workers with the same name.
    smtpd = [p for p in postfix_named.workers()
             if " ".join(p.cmdline()).startswith("postfix/smtpd ")][0]
    os.kill(smtpd.pid, signal.SIGKILL)
    wait_for(lambda: f"warning: process postfix/smtpd pid {smtpd.pid} killed by signal 9"
             in postfix_named.log(), what="the master's warning")


@pytest.mark.skipif(not shutil.which("pflogsumm"), reason="pflogsumm is not installed")
def test_pflogsumm_counts(postfix_named):
    postfix_named.start()
    traffic(postfix_named)
    out = subprocess.run(["pflogsumm", str(postfix_named.maillog)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    totals = {}
    for line in out.stdout.split("Grand Totals", 1)[1].split("Per-Hour", 1)[0].splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit():
            totals[" ".join(w for w in words[1:] if not w.startswith("("))] = int(words[0])
    assert totals["received"] == 2 and totals["delivered"] == 3, out.stdout
    assert totals["rejected"] == 1 and totals["deferred"] == 0 and totals["bounced"] == 0


@pytest.mark.skipif(not shutil.which("fail2ban-regex"), reason="fail2ban is not installed")
def test_fail2ban_postfix_filter_matches_the_reject(postfix_named):
    postfix_named.start()
    traffic(postfix_named)
    # The filter's default mode ("more": normal and rbl) bans on RCPT rejects.
    out = subprocess.run(["fail2ban-regex", "--print-all-matched", "--print-no-missed",
                          str(postfix_named.maillog), "/etc/fail2ban/filter.d/postfix.conf"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^Lines: \d+ lines, 0 ignored, 1 matched, ", out.stdout, re.M), out.stdout
    matched = out.stdout.split("Matched line(s):", 1)[1].splitlines()[1]
    assert " postfix/smtpd[" in matched and "NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 554 " \
        in matched, out.stdout


@pytest.fixture
def exporter(postfix_named):
    """prometheus-postfix-exporter on a loopback port, tailing the instance's maillog."""
    if not os.access(EXPORTER, os.X_OK):
        pytest.skip("prometheus-postfix-exporter is not installed")
    port = free_port()
    postfix_named.exporter_port = port
    procs = []
    # What it says (unsupported lines, showq errors) stays with the kept instance directory.
    errors = open(postfix_named.dir / "exporter.log", "ab")

    def start(showq=None):
        proc = subprocess.Popen(
            [EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--log.unsupported",
             f"--postfix.logfile_path={postfix_named.maillog}",
             f"--postfix.showq_path={showq or postfix_named.queue / 'public' / 'showq'}"],
            stdout=subprocess.DEVNULL, stderr=errors, stdin=subprocess.DEVNULL)
        procs.append(proc)
        wait_for(lambda: _serving(port), what="the exporter's /metrics")
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
    errors.close()


def _serving(port):
    try:
        return scrape_metrics(port)
    except OSError:
        return None


def test_prometheus_exporter_counts_our_log(postfix_named, exporter):
    postfix_named.start()
    exporter()                  # it reads from the end of the log: start it before the mail
    traffic(postfix_named)
    port = postfix_named.exporter_port

    def counted():
        m = scrape_metrics(port)
        return m if m.get("postfix_qmgr_messages_removed_total", 0) >= 2 else None
    m = wait_for(counted, what="the exporter's counters")
    assert m["postfix_smtpd_connects_total"] == 3
    assert m["postfix_smtpd_disconnects_total"] == 3
    assert m['postfix_smtpd_messages_processed_total{sasl_method=""}'] == 2
    assert m['postfix_smtpd_messages_rejected_total{code="554"}'] == 1
    assert m["postfix_qmgr_messages_inserted_receipients_count"] == 2
    assert m["postfix_cleanup_messages_processed_total"] == 2
    # Every smtpd, cleanup and qmgr line is one the exporter knows (as it knows Postfix's).
    unsupported = {k: v for k, v in m.items()
                   if k.startswith("postfix_unsupported_log_entries_total") and v}
    assert not [k for k in unsupported if re.search(r'service="(smtpd|cleanup|qmgr|)"', k)], \
        unsupported
