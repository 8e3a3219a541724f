"""showq on public/showq through the real master: Postfix 3.x's queue listing protocol,
read raw and by prometheus-postfix-exporter (--postfix.showq_path) for queue sizes."""

import json
import os
import smtplib
import socket
import subprocess
import time

import pytest

from peers import scrape_metrics
from pfxinst import free_port, wait_for

EXPORTER = "/usr/bin/prometheus-postfix-exporter"


@pytest.fixture
def mta(instance):
    """smtpd, qmgr, showq and the fake smtp agent, which defers defer+x@ recipients."""
    instance.port = free_port()
    instance.record_fake_agent()
    instance.main.update({
        "mydestination": "$myhostname",
        "queue_run_delay": "300s",
        "minimal_backoff_time": "300s",
        "maximal_backoff_time": "600s",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - n - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "anvil unix - - n - 1 anvil",
        "showq unix n - y - - showq",       # chrooted, as Debian's master.cf runs it
        "smtp unix - - n - - python:fake_agent",
    ]
    instance.showq = instance.queue / "public" / "showq"
    return instance


def send(port, sender, rcpts, body="hello\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, text = s.data(f"From: <{sender}>\r\nSubject: t\r\n\r\n{body}".encode())
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[-1]


def deferred(mta, count):
    """Send count messages that the agent defers; their queue ids once all are deferred."""
    ids = [send(mta.port, "" if i == 0 else "alice@example.org",
                [f"defer+{i}@remote.example", f"ok+{i}@remote.example"], body="x" * 2000 * i)
           for i in range(count)]
    wait_for(lambda: sorted(os.listdir(mta.queue / "deferred" / ""))
             and all(os.path.exists(p) for p in _paths(mta, ids)), what="deferred files")
    return ids


def _paths(mta, ids):
    return [mta.queue / "deferred" / i for i in ids]


def read_showq(path):
    """The raw listing, split as attr_print0 records: [[(name, value), ...], ...]."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.endswith(b"\0")
    fields = data[:-1].split(b"\0")
    records, current, i = [], [], 0
    while i < len(fields):
        name = fields[i].decode()
        if name == "":
            records.append(current)
            current = []
            i += 1
            continue
        current.append((name, fields[i + 1].decode()))
        i += 2
    assert current == [], "the stream ends with an end of record"
    return records


def test_showq_protocol(mta):
    mta.start()
    ids = deferred(mta, 2)
    before = time.time()
    records = read_showq(mta.showq)
    assert records[0] == [("protocol", "mail_queue_list_protocol")]
    assert records[-1] == []                        # the empty record ends the list
    messages = {dict(r)["queue_id"]: r for r in records[1:-1]}
    assert sorted(messages) == sorted(ids)
    for n, qid in enumerate(ids):
        r = messages[qid]
        head = dict(r[:6])
        assert [k for k, _ in r[:6]] == ["queue_name", "queue_id", "time", "size",
                                          "forced_expire", "sender"]
        assert head["queue_name"] == "deferred" and head["forced_expire"] == "0"
        assert head["sender"] == ("MAILER-DAEMON" if n == 0 else "alice@example.org")
        assert before - 60 < int(head["time"]) <= before
        assert 2000 * n < int(head["size"]) < 2000 * n + 1000
        # Only the deferred recipient is pending, with its reason from the defer log.
        assert r[6:] == [("recipient", f"defer+{n}@remote.example"),
                         ("reason", "fake: deferred as told")]
    # postqueue -j reads the queue files itself: the same messages, sizes and times.
    out = mta.cmd("postqueue", "-j")
    assert out.returncode == 0, out.stderr
    listed = {j["queue_id"]: (str(j["message_size"]), str(j["arrival_time"]))
              for j in map(json.loads, out.stdout.splitlines())}
    assert listed == {qid: (dict(r)["size"], dict(r)["time"]) for qid, r in messages.items()}


def test_prometheus_exporter_reads_queue_sizes(mta):
    if not os.access(EXPORTER, os.X_OK):
        pytest.skip("prometheus-postfix-exporter is not installed")
    mta.master_lines[3] = "showq unix n - n - - showq"     # as conf/master.cf ships it
    mta.start()
    deferred(mta, 3)
    port = free_port()
    with open(mta.dir / "exporter.log", "ab") as errors:
        proc = subprocess.Popen(
            [EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
             f"--postfix.logfile_path={mta.maillog}", f"--postfix.showq_path={mta.showq}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        def scraped():
            try:
                return scrape_metrics(port)
            except OSError:
                return None
        m = wait_for(scraped, what="the exporter's /metrics")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert m[f'postfix_up{{path="{mta.showq}"}}'] == 1
    assert m['postfix_showq_message_size_bytes_count{queue="deferred"}'] == 3
    assert m['postfix_showq_message_age_seconds_count{queue="deferred"}'] == 3
    assert m['postfix_showq_message_size_bytes_count{queue="active"}'] == 0
    assert 4000 < m['postfix_showq_message_size_bytes_sum{queue="deferred"}'] < 20000
    assert 0 <= m['postfix_showq_message_age_seconds_sum{queue="deferred"}'] < 3 * 60


POSTQUEUE = "/usr/sbin/postqueue"


@pytest.mark.skipif(not os.access(POSTQUEUE, os.X_OK), reason="Postfix is not installed")
def test_postfix_postqueue_reads_our_showq(mta):
    """Postfix's own postqueue (a strict attr_scan client) lists the queue through showq
    exactly as postfix-py's postqueue lists it from the files."""
    mta.start()
    deferred(mta, 2)
    # Postfix's postqueue reads main.cf for queue_directory only; give it a file of its own
    # (ours has settings Postfix refuses, such as mail_owner = default_privs = nobody).
    conf = mta.dir / "postfix-conf"
    conf.mkdir()
    (conf / "main.cf").write_text(f"compatibility_level = 3.6\nqueue_directory = {mta.queue}\n")
    theirs = subprocess.run([POSTQUEUE, "-c", str(conf), "-p"], capture_output=True,
                            text=True, timeout=30)
    assert (theirs.returncode, theirs.stderr) == (0, "")
    ours = mta.cmd("postqueue", "-p")
    assert ours.returncode == 0 and "-- 2 Kbytes in 2 Requests." in ours.stdout
    assert theirs.stdout == ours.stdout
    theirs = subprocess.run([POSTQUEUE, "-c", str(conf), "-j"], capture_output=True,
                            text=True, timeout=30)
    assert theirs.returncode == 0, theirs.stderr
    ours = [json.loads(line) for line in mta.cmd("postqueue", "-j").stdout.splitlines()]
    for m in ours:              # Postfix 3.11's, which Debian's 3.7 does not print
        for r in m["recipients"]:
            assert r.pop("orig_address") == r["address"]
    assert [json.loads(line) for line in theirs.stdout.splitlines()] == ours
