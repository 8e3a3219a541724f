"""The measuring pieces of the benchmarks: master.cf matching, and CPU time of a process tree.

bench/master_bench.py starts Postfix with only the services postfix-py has (plus the ones
Postfix cannot do without); bench/sustained.py counts the CPU of every process of a mail
system, also of processes that ended or detached, through bench/subreaper.py. These run
real processes (a shell that burns CPU in children), no mail system.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import master_bench  # noqa: E402
import sustained  # noqa: E402

DEBIAN_LIKE = """\
# comment
smtp      inet  n       -       y       -       -       smtpd
#submission inet n       -       y       -       -       smtpd
#  -o syslog_name=postfix/submission
pickup    unix  n       -       y       60      1       pickup
cleanup   unix  n       -       y       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
verify    unix  -       -       y       -       1       verify
smtp      unix  -       -       y       -       -       smtp
maildrop  unix  -       n       n       -       -       pipe
  flags=DRXhu user=vmail argv=/usr/bin/maildrop -d ${recipient}
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def test_services_lists_name_and_type_of_service_lines_only():
    assert master_bench.services(DEBIAN_LIKE) == [
        ("smtp", "inet"), ("pickup", "unix"), ("cleanup", "unix"), ("qmgr", "unix"),
        ("verify", "unix"), ("smtp", "unix"), ("maildrop", "unix"),
        ("postlog", "unix-dgram")]


def test_matched_keeps_the_listed_services_with_their_continuations():
    keep = {("smtp", "inet"), ("qmgr", "unix"), ("maildrop", "unix"),
            ("postlog", "unix-dgram")}
    text = master_bench.matched(DEBIAN_LIKE.replace("smtp      inet",
                                                    "127.0.0.1:2525 inet"), keep)
    assert master_bench.services(text) == [
        ("127.0.0.1:2525", "inet"), ("qmgr", "unix"), ("maildrop", "unix"),
        ("postlog", "unix-dgram")]
    assert "  flags=DRXhu user=vmail" in text       # the continuation stays with its service
    assert "#" not in text and "verify" not in text and "pickup" not in text


def test_postfix_gets_postfix_py_services_plus_the_ones_it_needs():
    py = master_bench.py_services()
    assert ("smtp", "inet") in py and ("qmgr", "unix") in py
    # none of Postfix's extra services is one postfix-py already has
    assert not py & set(master_bench.POSTFIX_ONLY)
    assert "cleanup" in master_bench.services_note()


BURN = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"


def _start(script: str) -> tuple[subprocess.Popen, psutil.Process]:
    proc = subprocess.Popen([sys.executable, str(BENCH / "subreaper.py"), "sh", "-c", script],
                            start_new_session=True)
    return proc, psutil.Process(proc.pid)


def _end(proc: subprocess.Popen, root: psutil.Process) -> None:
    for p in root.children(recursive=True):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


def _burners_gone(root: psutil.Process, timeout: float = 60) -> None:
    """Until only the sleeping shell is left below root."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = root.children(recursive=True)
            if len(kids) <= 2 and all(p.status() != psutil.STATUS_RUNNING for p in kids):
                if all("sleep" in " ".join(p.cmdline()) or p.name() == "sh" for p in kids):
                    return
        except psutil.NoSuchProcess:        # a burner ending between listing and asking
            pass
        time.sleep(0.05)
    pytest.fail("the CPU burners did not end")


def test_instance_uss_sums_every_process_of_the_tree():
    """The whole-instance memory figure counts the root and all its descendants."""
    root = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        proc = psutil.Process(root.pid)
        deadline = time.monotonic() + 10
        while len(proc.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        total, n = master_bench.instance_uss(root.pid)
        each = [master_bench.uss(p) for p in [proc] + proc.children(recursive=True)]
        assert n == 3
        assert total == pytest.approx(sum(each), rel=0.2) and total > 0
    finally:
        for p in psutil.Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()
        root.wait(10)


@pytest.mark.parametrize("script", [
    # children that end and are waited for by their parent (the shell)
    f"({BURN}) & ({BURN}) & wait; exec sleep 30",
    # orphans: the intermediate shell exits at once, the burner is re-parented to the
    # subreaper, which waits for it when it ends
    f"( ({BURN}) & ) ; ( ({BURN}) & ) ; exec sleep 30",
])
def test_tree_cpu_counts_processes_that_ended(script):
    proc, root = _start(script)
    try:
        t0 = time.monotonic()
        before = sustained.tree_cpu(root)
        cpu_wall0 = psutil.cpu_times()
        time.sleep(0.2)
        _burners_gone(root)
        after = sustained.tree_cpu(root)
        wall = time.monotonic() - t0
        busy = sum(getattr(psutil.cpu_times(), f) - getattr(cpu_wall0, f)
                   for f in ("user", "system"))
        # two burners of a few hundred ms each, all of them ended before the second reading
        assert after - before > 0.1
        assert after - before <= wall * psutil.cpu_count() + 0.05
        assert after - before <= busy + 0.05       # never more than the machine did
        assert all(p.status() != psutil.STATUS_RUNNING for p in root.children(recursive=True))
    finally:
        _end(proc, root)


def test_subreaper_exits_with_the_status_of_its_command_once_all_are_gone():
    proc = subprocess.run([sys.executable, str(BENCH / "subreaper.py"), "sh", "-c",
                           "(sleep 0.3 &) ; exit 3"], timeout=30)
    assert proc.returncode == 3
