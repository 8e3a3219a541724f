"""lib/metrics.py, metrics/service.py's pure parts, and the ClientHello reader of lib/tls.py."""

import json
import os
from types import SimpleNamespace
import socket
import ssl
import subprocess
import sys
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from postfix_py.lib import metrics, tls, tls_session
from postfix_py.metrics import service


def _client_hello(**settings) -> bytes:
    """The first record a Python ssl client sends, taken from a socket pair."""
    a, b = socket.socketpair()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if "ciphers" in settings:
        ctx.set_ciphers(settings["ciphers"])
    if "maximum" in settings:
        ctx.maximum_version = settings["maximum"]

    def handshake():
        try:
            with ctx.wrap_socket(a, server_hostname=settings.get("sni")):
                pass
        except (OSError, ssl.SSLError):
            pass
    t = threading.Thread(target=handshake)
    t.start()
    data = b.recv(tls.HELLO_PEEK_LIMIT)
    b.close()
    t.join()
    a.close()
    return data


def test_offer_of_a_modern_client():
    offer = tls.client_hello_offer(_client_hello(sni="mx.example.org"))
    assert offer["protocols"][0] == "TLSv1.3" and "TLSv1.2" in offer["protocols"]
    assert "TLS_AES_128_GCM_SHA256" in offer["ciphers"]
    assert offer["sni"] == "mx.example.org"
    assert not any(c.startswith("0x") for c in offer["ciphers"])


def test_offer_of_a_legacy_client_names_its_suite():
    data = _client_hello(ciphers="AES128-SHA:@SECLEVEL=0", maximum=ssl.TLSVersion.TLSv1_2)
    offer = tls.client_hello_offer(data)
    assert offer == {"protocols": ["TLSv1.2"], "ciphers": ["AES128-SHA"], "sni": None}
    assert tls.offer_text(offer) == "protocols=TLSv1.2 ciphers=AES128-SHA sni=none"


def test_offer_of_truncated_and_foreign_input():
    data = _client_hello(sni="mx.example.org")
    for cut in range(11, len(data), 7):
        offer = tls.client_hello_offer(data[:cut])      # never raises
        assert offer is not None and offer["protocols"]
    assert tls.client_hello_offer(b"EHLO client.example\r\n") is None
    assert tls.client_hello_offer(b"") is None
    assert tls.offer_text(None) == "no TLS ClientHello"


def test_cipher_name_canary():
    assert tls_session.cipher_name(0x1301) == "TLS_AES_128_GCM_SHA256"
    assert tls_session.cipher_name(0xC02F) == "ECDHE-RSA-AES128-GCM-SHA256"
    assert tls_session.cipher_name(0xFAFA) is None
    assert tls_session.missing_symbols() == []


def test_counters_do_nothing_outside_a_worker(tmp_path):
    assert not metrics._state.enabled and not metrics._files
    metrics.smtpd_connect()
    metrics.delivery("ABC", "a@b", "none", "sent", "2.0.0", 0.1, (0, 0, 0, 0))
    metrics.flush()
    assert not metrics._pending and not os.path.exists(metrics.directory(str(tmp_path)))


def test_event_log_lines_are_json(tmp_path, monkeypatch):
    path = tmp_path / "events.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    monkeypatch.setattr(metrics._state, "event_fd", fd)
    metrics.delivery("ABC", "bob@example.org", "mx[192.0.2.1]:25", "sent", "2.0.0", 1.25,
                     (0.1, 0.2, 0.3, 0.65))
    metrics.tls_server_failure("c[192.0.2.9]", "no shared cipher",
                               {"protocols": ["TLSv1"], "ciphers": ["x" * 100] * 400,
                                "sni": None})
    os.close(fd)
    lines = path.read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "delivery" and first["status"] == "sent"
    assert first["delays"] == [0.1, 0.2, 0.3, 0.65]
    assert second["event"] == "tls_failure" and second["truncated"]
    assert second["peer"] == "c[192.0.2.9]" and len(lines[1]) < metrics.MAX_EVENT


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _scrape(directory):
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_queue_metrics_of_an_empty_queue(tmp_path):
    families = {f.name: f for f in service.queue_metrics(str(tmp_path))}
    assert {s.value for s in families["postfix_queue_messages"].samples} == {0}
    assert "postfix_showq_message_size_bytes" in families


def test_tlsmgr_metrics_from_a_status_report():
    report = {"caches": {"smtp": {"enabled": True, "entries": 3, "lookups": 5, "hits": 2,
                                  "misses": 3, "evicted": 1},
                         "smtpd": {"enabled": False}}}
    values = {(f.name, s.labels["cache"]): s.value for f in service.tlsmgr_metrics(report)
              for s in f.samples if not s.name.endswith("_created")}
    assert values == {("postfix_tlsmgr_cache_entries", "smtp"): 3,
                      ("postfix_tlsmgr_cache_lookups", "smtp"): 5,
                      ("postfix_tlsmgr_cache_hits", "smtp"): 2,
                      ("postfix_tlsmgr_cache_misses", "smtp"): 3,
                      ("postfix_tlsmgr_cache_evictions", "smtp"): 1}
    assert service.tlsmgr_metrics(None) == []


def test_process_metrics_of_this_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import setproctitle, time; "
                              "setproctitle.setproctitle('postfix-py/smtpd -n 127.0.0.1:25 "
                              "-t inet'); print(1, flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"
        families = {f.name: f for f in service.process_metrics(os.getpid())}
        procs = {tuple(sorted(s.labels.items())): s.value
                 for s in families["postfix_processes"].samples}
        assert procs == {(("program", "smtpd"), ("service", "127.0.0.1:25")): 1}
        assert families["postfix_process_uss_bytes"].samples[0].value > 0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert service.process_metrics(_dead_pid())[0].samples == []


SLOT_WORKER = """
import os, sys, time
from types import SimpleNamespace
queue, ehlos, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
from postfix_py.lib import metrics
metrics.collecting(True)
ctx = SimpleNamespace(service=SimpleNamespace(name="smtp", chroot=False), program="smtpd",
                      run_as_root=False, queue_root=queue, cfg={})
metrics.worker_start(ctx)
metrics.open_files(queue)
metrics.smtpd_session_end({"ehlo": [ehlos, ehlos]})
metrics.delivery("ABC", "a@b", "none", "sent", "2.0.0", 0.5, (0, 0, 0, 0.5))
metrics.flush()
print(os.path.basename(os.readlink(f"/proc/self/fd/{metrics._state.slot_fd}")), flush=True)
time.sleep(hold)
"""


def test_workers_share_slots_one_at_a_time_and_their_counts_add_up(tmp_path):
    """Two workers alive at once write different slots; a later one takes a free slot
    and adds to it: the files stay as many as the workers that ran at once."""
    script = tmp_path / "worker.py"
    script.write_text(SLOT_WORKER)
    queue = str(tmp_path / "q")
    metrics.collecting(True, queue)
    path = metrics.directory(queue)
    run = [sys.executable, str(script), queue]
    try:
        holder = subprocess.Popen(run + ["1", "30"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "counter_slot0.db"
            second = subprocess.run(run + ["2", "0"], capture_output=True, text=True,
                                    check=True)
            assert second.stdout.strip() == "counter_slot1.db"
        finally:
            holder.kill()                   # SIGKILL: the lock goes with the process
            holder.wait()
            holder.stdout.close()
        for n in (4, 8):
            again = subprocess.run(run + [str(n), "0"], capture_output=True, text=True,
                                   check=True)
            assert again.stdout.strip() == "counter_slot0.db"
        assert sorted(os.listdir(path)) == ["counter_slot0.db", "counter_slot1.db",
                                            "histogram_slot0.db", "histogram_slot1.db"]
        counts = _scrape(path)
        ok = ("postfix_smtpd_commands_total",
              (("command", "ehlo"), ("result", "ok"), ("service", "smtp")))
        assert counts[ok] == 1 + 2 + 4 + 8
        assert counts[("postfix_delivery_delay_seconds_count",
                       (("status", "sent"), ("transport", "smtp")))] == 4
    finally:
        metrics.collecting(False)
        metrics.remove_directory(queue)


def test_the_directory_is_made_by_collecting_and_removed_by_the_master(tmp_path):
    """The directory is on tmpfs, one per queue directory, made when the master has a
    metrics service and removed when it starts and ends; what another user put at its
    (predictable) name is removed, never followed."""
    queue = str(tmp_path)
    path = metrics.directory(queue)
    assert path.startswith("/dev/shm/postfix-py-metrics.")
    assert path != metrics.directory(str(tmp_path / "other"))
    try:
        metrics.collecting(False, queue)
        assert not os.path.exists(path)
        metrics.collecting(True, queue)
        assert os.listdir(path) == [] and os.stat(path).st_mode & 0o777 == 0o700
        with open(os.path.join(path, "counter_1.db"), "wb") as f:
            f.write(b"x")
        metrics.collecting(True, queue)             # a reload keeps the counts
        assert os.listdir(path) == ["counter_1.db"]
        metrics.remove_directory(queue)
        assert not os.path.lexists(path)
        os.symlink(str(tmp_path), path)
        (tmp_path / "keep").write_text("x")
        metrics.collecting(True, queue)
        assert not os.path.islink(path) and (tmp_path / "keep").exists()
    finally:
        metrics.collecting(False)
        metrics.remove_directory(queue)
    assert not os.path.lexists(path)


def test_a_worker_counts_only_when_its_master_has_a_metrics_service(tmp_path, monkeypatch):
    """Without a metrics service nobody reads the counters: a worker opens no file."""
    ctx = SimpleNamespace(service=SimpleNamespace(name="smtp", chroot=False), program="smtpd",
                          run_as_root=False, queue_root=str(tmp_path), cfg={})
    monkeypatch.setattr(metrics, "_state", metrics._State())
    monkeypatch.setattr(metrics, "_files", {})
    path = metrics.directory(str(tmp_path))
    metrics.collecting(True, str(tmp_path))
    try:
        metrics.collecting(False)
        metrics.worker_start(ctx)
        assert not metrics.counting()
        metrics.smtpd_connect()
        metrics.flush()
        assert os.listdir(path) == []
        metrics.collecting(True)
        metrics.worker_start(ctx)
        assert metrics.counting()
        metrics.open_files(ctx.queue_root)
        metrics.smtpd_connect()
        metrics.flush()
        assert sorted(os.listdir(path)) == ["counter_slot0.db", "histogram_slot0.db"]
        assert _scrape(path)[("postfix_smtpd_connects_total", (("service", "smtp"),))] == 1
        assert os.stat(os.path.join(path, "counter_slot0.db")).st_mode & 0o777 == 0o600
    finally:
        for f in metrics._files.values():
            f.close()
        os.close(metrics._state.slot_fd)
        metrics.remove_directory(str(tmp_path))


BUFFERED = """
import os, sys, time
from types import SimpleNamespace
queue, mode = sys.argv[1], sys.argv[2]
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from postfix_py.lib import metrics
metrics.collecting(True)
ctx = SimpleNamespace(service=SimpleNamespace(name="smtp", chroot=False), program="smtp",
                      run_as_root=False, queue_root=queue, cfg={})
metrics.worker_start(ctx)
metrics.open_files(queue)
# on the bounds, between them, past the last, and zero: each bucket edge case
delays = [0.0, 1e-3, 0.0011, 0.01, 0.1, 0.5, 1.0, 2.5, 1e3, 5e3, 0.1]

def written():          # the sum of every sample in the files
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics.directory(queue))
    return sum(s.value for m in registry.collect() for s in m.samples)

if mode == "direct":            # prometheus_client's own calls, as before the buffer
    for d in delays:
        for stage, value in zip(metrics._STAGE_NAMES, (0, 0, 0, d)):
            metrics._child(metrics.SMTP_STAGES, (stage,)).observe(value)
        metrics._child(metrics.DELIVERY_DELAY, ("smtp", "sent")).observe(d * 100)
        metrics._child(metrics.DELIVERIES, ("smtp", "sent", "2")).inc()
    metrics._child(metrics.SMTPD_COMMANDS, ("smtp", "ehlo", "ok")).inc(3)
    metrics._child(metrics.SMTPD_DISCONNECTS, ("smtp",)).inc(2)
    sys.exit(0)
metrics.smtpd_session_end({"ehlo": [1, 1]})     # counts wait in the process
assert written() == 0 and metrics.flush_due() == 0
metrics.smtpd_message(None)                     # the first message flushes at once
first = written()
assert first == 3, first                        # ehlo, the disconnect, the message
metrics.smtpd_session_end({"ehlo": [2, 2]})
for d in delays:
    metrics.delivery("ABC", "a@b", "none", "sent", "2.0.0", d * 100, (0, 0, 0, d))
assert written() == first                       # nothing more written yet
due = metrics.flush_due()
assert due is not None and 0 < due <= metrics.FLUSH_INTERVAL, due
if mode == "fork":              # a forked child never writes its parent's counts
    pid = os.fork()
    if pid == 0:
        metrics.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    assert written() == first
if mode == "due":               # a second later, the next count writes them all
    time.sleep(due + 0.05)
    metrics.smtpd_connect()                     # a count alone does not look at the time
    assert metrics.flush_due() == 0
    metrics.smtpd_message(None)                 # a message does
    assert metrics.flush_due() is None
else:
    metrics.flush()
assert metrics.flush_due() is None and written() > first
"""


def test_buffered_counts_reach_the_files_as_direct_increments_would(tmp_path):
    """Counts wait in the process until a flush, then add up to exactly what
    prometheus_client's own increments write (also a canary of the Histogram internals
    that flush() uses)."""
    script = tmp_path / "buffered.py"
    script.write_text(BUFFERED)
    results = {}
    for mode in ("direct", "flush", "fork", "due"):
        queue = str(tmp_path / mode)
        metrics.collecting(True, queue)
        directory = metrics.directory(queue)
        try:
            subprocess.run([sys.executable, str(script), queue, mode], check=True)
            results[mode] = {k: v for k, v in _scrape(directory).items()
                             if k[0] not in ("postfix_smtpd_connects_total",
                                             "postfix_smtpd_messages_processed_total")}
        finally:
            metrics.remove_directory(queue)
    assert results["direct"][("postfix_smtp_delivery_delay_seconds_count",
                              (("stage", "transmission"),))] == 11
    assert results["flush"] == results["direct"]
    assert results["fork"] == results["direct"]
    assert results["due"] == results["direct"]
