"""`tlsmgr status` through the installed console script, against a live tlsmgr."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postfix_py.lib import attr
from postfix_py.tlsmgr import cli

TLSMGR = str(Path(sys.executable).parent / "tlsmgr")


def run(*args):
    return subprocess.run([TLSMGR, *map(str, args)], capture_output=True, text=True, timeout=30)


def write_config(base: Path, **extra):
    settings = {"queue_directory": base / "queue", "data_directory": base / "data",
                "mail_owner": "root", "maillog_file": base / "maillog",
                "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
                "lmtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache", **extra}
    (base / "queue" / "private").mkdir(parents=True, exist_ok=True)
    (base / "data").mkdir(exist_ok=True)
    (base / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))


@pytest.fixture
def daemon(tmp_path):
    """tlsmgr on the default socket, $queue_directory/private/tlsmgr; stopped by pid."""
    write_config(tmp_path)
    sock = tmp_path / "queue" / "private" / "tlsmgr"
    proc = subprocess.Popen([sys.executable, "-m", "postfix_py.tlsmgr.service", "-c", str(tmp_path)],
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "tlsmgr did not start"
            time.sleep(0.02)
        with attr.AttrClient(str(sock)) as clnt:      # something to count
            clnt.request({"request": "update", "cache_type": "smtp", "cache_id": "k", "session": "s"})
            clnt.request({"request": "lookup", "cache_type": "smtp", "cache_id": "k"})
            clnt.request({"request": "lookup", "cache_type": "smtp", "cache_id": "nope"})
            clnt.request({"request": "seed", "size": 100})
        yield tmp_path, sock, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_status_for_a_person(daemon):
    config_dir, _, proc = daemon
    result = run("-c", config_dir, "status")
    assert result.returncode == 0 and result.stderr == ""
    out = result.stdout
    assert out.startswith(f"tlsmgr: pid {proc.pid}, up ")
    assert "prng: source dev:/dev/urandom, 100 bytes served in 1 seeds" in out
    assert f"exchange file {config_dir}/data/prng_exch, last written " in out
    assert f"cache smtp: btree:{config_dir}/data/smtp_scache ({config_dir}/data/smtp_scache.lmdb)" in out
    assert "1 entries" in out and "lookups 2, hits 1, misses 1, hit ratio 50.0%" in out
    assert "cache lmtp: same database as smtp (counted there)" in out
    assert "cache smtpd: not configured" in out
    assert "server resumption: session tickets shared by all smtpd workers" in out
    assert len(out.splitlines()) <= 12


def test_status_json(daemon):
    config_dir, sock, proc = daemon
    result = run("-c", config_dir, "--socket", sock, "status", "--json")
    assert result.returncode == 0 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["pid"] == proc.pid and report["clients"] >= 1
    assert report["prng"]["bytes_served"] == 100 and report["prng"]["last_reseed"] > 0
    smtp = report["caches"]["smtp"]
    assert (smtp["entries"], smtp["lookups"], smtp["hits"], smtp["misses"], smtp["updates"]) == (1, 2, 1, 1, 1)
    assert smtp["hit_ratio"] == 0.5 and 0 < smtp["map_use"] < 1
    assert report["caches"]["smtpd"]["enabled"] is False
    assert "session tickets" in report["server_resumption"]


def test_status_is_cheap(daemon):
    config_dir, _, _ = daemon
    t0 = time.monotonic()
    for _ in range(3):
        assert run("-c", config_dir, "status").returncode == 0
    assert (time.monotonic() - t0) / 3 < 1.0


def test_not_running_is_one_line_and_exit_1(tmp_path):
    write_config(tmp_path)
    result = run("-c", tmp_path, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"tlsmgr: fatal: tlsmgr is not running:"
                             f" {tmp_path}/queue/private/tlsmgr: no such socket\n")


def test_refused_connection_is_one_line_and_exit_1(tmp_path):
    import socket
    path = str(tmp_path / "stale")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)                           # a socket file nobody listens on
    result = run("--socket", path, "status", "--json")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"tlsmgr: fatal: tlsmgr is not running or not answering: {path}:"
                             " Connection refused\n")


def test_broken_configuration_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "main.cf").write_text("queue_directory\n")
    result = run("-c", tmp_path, "status")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"tlsmgr: fatal: {tmp_path}/main.cf, line 1: missing '='")
    missing = run("-c", tmp_path / "nowhere", "status")
    assert missing.returncode == 1 and missing.stderr.startswith("tlsmgr: fatal: open ")


def test_usage_errors_exit_2(tmp_path):
    result = run("-c", tmp_path)
    assert result.returncode == 2 and "usage: tlsmgr" in result.stderr


def test_format_report_handles_an_empty_cache_and_no_source():
    report = {"pid": 1, "uptime": 3700, "clients": 0,
              "prng": {"source": "", "bytes_served": 0, "seed_requests": 0, "reseeds": 0,
                       "last_reseed": 1000.0, "next_reseed": None, "exchange_file": "",
                       "last_exchange_write": None},
              "caches": {"smtpd": {"database": "btree:/x", "enabled": False, "timeout": 0}},
              "server_resumption": "off (smtpd_tls_session_cache_timeout = 0)"}
    text = cli.format_report(report, now=1060.0)
    assert "up 1h1m" in text and "source (none)" in text and "(1m0s ago)" in text
    assert "next never" in text and "cache smtpd: disabled (timeout 0)" in text
    assert text.endswith("server resumption: off (smtpd_tls_session_cache_timeout = 0)")
