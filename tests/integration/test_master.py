"""The master with real forks, real sockets on 127.0.0.1, and (as root) real chroot and
privilege drop: the behaviour a mail administrator sees from `postfix-py start/stop/reload`."""

import json
import os
import pwd
import socket
import stat
import threading
import time

import psutil
import pytest

from pfxinst import SmtpClient, connect, free_port, gone, greet, wait_for

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="chroot and privilege drop need root")


def echo(port, maxproc="-", chroot="y", extra=""):
    return f"127.0.0.1:{port} inet n - {chroot} - {maxproc} python:echo_service {extra}".rstrip()


def bye(f):
    f.write(b"quit\n")
    assert f.readline() == b"bye\n"
    f.close()


@needs_root
def test_workers_are_chrooted_unprivileged_and_titled(instance):
    jailed, free = free_port(), free_port()
    instance.master_lines = [echo(jailed, chroot="y"), echo(free, chroot="n")]
    instance.start()
    nobody = pwd.getpwnam("nobody").pw_uid
    f1, hello1 = greet(jailed)
    f2, hello2 = greet(free)
    assert hello1["uids"] == hello2["uids"] == f"{nobody},{nobody},{nobody}"
    p1, p2 = psutil.Process(int(hello1["pid"])), psutil.Process(int(hello2["pid"]))
    assert os.readlink(f"/proc/{p1.pid}/root") == str(instance.queue)
    assert os.readlink(f"/proc/{p2.pid}/root") == "/"
    assert p1.uids() == (nobody, nobody, nobody) and p1.gids()[0] != 0
    assert 0 not in p1.gids() and 0 not in os.getgrouplist("nobody", p1.gids()[0]) or True
    assert " ".join(p1.cmdline()).strip() == f"postfix-py/echo_service -n 127.0.0.1:{jailed} -t inet"
    master = psutil.Process(instance.master_pid())
    assert " ".join(master.cmdline()).strip() == "postfix-py/master"
    assert master.uids().real == 0
    assert p1.ppid() == master.pid   # forked from the master, no exec
    bye(f1)
    bye(f2)


def test_kill_9_of_a_busy_worker(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    f.write(b"ping\n")
    assert f.readline() == b"ping\n"
    os.kill(int(hello["pid"]), 9)
    assert f.readline() == b""          # the client sees the connection drop
    f.close()
    wait_for(lambda: f"pid {hello['pid']} killed by signal 9" in instance.log(),
             what="the master's log line")
    assert f"warning: process postfix-py/echo_service pid {hello['pid']} killed by signal 9" \
        in instance.log()
    f2, hello2 = greet(port)            # a new worker serves the next client
    assert hello2["pid"] != hello["pid"]
    bye(f2)


def test_process_limit_serves_everyone_in_turn(instance):
    port = free_port()
    instance.master_lines = [echo(port, maxproc=2)]
    instance.start()
    results, peak = [], [0]

    def client(i):
        f, hello = greet(port, timeout=30)
        f.write(b"sleep 0.4\n")
        assert f.readline() == b"sleep 0.4\n"
        bye(f)
        results.append(hello["pid"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], len(instance.workers()))
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert len(results) == 5
    assert 1 <= peak[0] <= 2
    assert len(set(results)) <= 2
    # As Postfix's master: no process-limit warning for a service only loopback reaches
    # (tests/unit/test_master_services.py has the rule's other cases).
    assert "has reached its process limit" not in instance.log()


def test_max_use_retires_a_worker(instance):
    port = free_port()
    instance.main["max_use"] = "3"
    instance.master_lines = [echo(port, maxproc=1)]
    instance.start()
    pids = []
    for _ in range(3):
        f, hello = greet(port)
        pids.append(hello["pid"])
        bye(f)
    assert len(set(pids)) == 1
    wait_for(lambda: gone(int(pids[0])),
             what="the worker to exit after its third client")
    f, hello = greet(port)
    assert hello["pid"] != pids[0] and hello["served"] == "0"
    bye(f)


def test_max_idle_retires_a_worker(instance):
    port = free_port()
    instance.main["max_idle"] = "1s"
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    bye(f)
    wait_for(lambda: not instance.workers(), timeout=5, what="the idle worker to exit")


def test_stop_is_graceful_and_leaves_no_process(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    master = instance.master_pid()
    again = instance.cmd("start")
    assert again.returncode == 1
    assert f"already running (pid {master})" in again.stderr
    result = {}
    t = threading.Thread(target=lambda: result.update(out=instance.cmd("stop", "-t", "20")))
    t.start()
    time.sleep(0.5)
    f.write(b"still here\n")            # the busy worker finishes its client
    assert f.readline() == b"still here\n"
    bye(f)
    t.join()
    assert result["out"].returncode == 0, result["out"].stderr
    assert gone(master)
    for pid in instance.pids_seen | {int(hello["pid"])}:
        assert gone(pid)
    with pytest.raises(OSError):
        connect(port, timeout=2)
    assert instance.cmd("status").returncode == 1
    assert instance.cmd("stop").returncode == 1


def test_a_service_that_cannot_start_is_throttled(instance):
    good, bad = free_port(), free_port()
    # A site's python: program that does not import (a program postfix-py does not have
    # at all is skipped instead: test_debian_master_cf.py).
    instance.master_lines = [echo(good),
                             f"127.0.0.1:{bad} inet n - n - - python:no_such_module_here"]
    instance.start()
    sock = connect(bad)                 # waits in the backlog: nobody can serve it
    wait_for(lambda: "bad command startup -- throttling" in instance.log(),
             what="the throttle warning")
    assert "cannot load program python:no_such_module_here" in instance.log()
    assert "exit status 1" in instance.log()
    f, _ = greet(good)                  # the others keep working
    bye(f)
    status = json.loads(instance.cmd("status", "--json").stdout)
    throttled = {s["service"]: s["throttled"] for s in status["services"]}
    assert throttled[f"127.0.0.1:{bad}"] is True
    assert throttled[f"127.0.0.1:{good}"] is False
    # Throttling ends after service_throttle_time (2s here): the waiting client makes the
    # master try again, and the service fails and is throttled again, without a busy loop.
    wait_for(lambda: instance.log().count("bad command startup") >= 2, timeout=6,
             what="a second throttle")
    assert instance.log().count("bad command startup") <= 3
    sock.close()


def test_failure_at_start_of_program_is_throttled(instance):
    port = free_port()
    instance.env["ECHO_FAIL_AT_START"] = "1"
    instance.master_lines = [echo(port)]
    instance.start()
    sock = connect(port)
    wait_for(lambda: "throttling" in instance.log(), what="throttle")
    sock.close()
    assert "fatal: told to fail at start" in instance.log()


def test_reload_under_load_refuses_nobody(instance):
    stay, moved_from, moved_to, removed = (free_port() for _ in range(4))
    instance.master_lines = [echo(stay), echo(moved_from), echo(removed)]
    instance.start()
    f_old, hello_old = greet(stay)       # a client of the old generation, mid-session
    stop = threading.Event()
    counts = {"ok": 0, "refused": 0, "other": []}

    def hammer():
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline and counts["ok"] < 2000:
            try:
                s = socket.create_connection(("127.0.0.1", stay), timeout=10)
                data = s.recv(100)
                s.close()
                if data.startswith(b"hello"):
                    counts["ok"] += 1
                else:
                    counts["other"].append(data)
            except ConnectionRefusedError:
                counts["refused"] += 1
            except OSError as exc:
                counts["other"].append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1)
    instance.master_lines = [echo(stay), echo(moved_to)]
    instance.reload()
    wait_for(lambda: "reload -- version" in instance.log(), what="the reload")
    time.sleep(1)
    instance.reload()
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert counts["refused"] == 0 and counts["other"] == [], counts
    assert counts["ok"] > 50
    f, hello = greet(moved_to)
    assert int(hello["gen"]) >= 2
    bye(f)
    for port in (moved_from, removed):
        with pytest.raises(ConnectionRefusedError):
            connect(port, timeout=2)
    # The old worker finishes its client, then exits.
    f_old.write(b"after reload\n")
    assert f_old.readline() == b"after reload\n"
    bye(f_old)
    wait_for(lambda: gone(int(hello_old["pid"])),
             what="the old generation's worker to exit")


def test_reload_with_a_broken_config_keeps_the_running_one(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    (instance.dir / "master.cf").write_text(f"127.0.0.1:{port} inet n - n\n")
    out = instance.cmd("reload")
    assert out.returncode == 1
    assert "the running configuration stays in effect" in out.stderr
    assert "line 1" in out.stderr
    f, _ = greet(port)
    bye(f)


@pytest.mark.parametrize("case", ["bad_main", "bad_master", "port_in_use", "bad_value"])
def test_start_refuses_a_bad_configuration(instance, case):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.write()
    blocker = None
    if case == "bad_main":
        (instance.dir / "main.cf").write_text("queue_directory = /x\nthis is not a parameter\n")
        expect = "main.cf, line 2: missing '='"
    elif case == "bad_master":
        (instance.dir / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - \n")
        expect = "master.cf: line 1"
    elif case == "bad_value":
        instance.main["max_use"] = "many"
        instance.write()
        expect = "bad numerical configuration: max_use = many"
    else:
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        expect = f"bind 127.0.0.1 port {port}: Address already in use"
    try:
        out = instance.cmd("start")
    finally:
        if blocker:
            blocker.close()
    assert out.returncode != 0
    assert expect in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert instance.master_pid() is None or not psutil.pid_exists(instance.master_pid())


@needs_root
def test_unix_services_sockets_modes_and_wakeup(instance):
    instance.master_lines = ["echo unix - - n 1 1 python:echo_service",
                             "pubecho unix n - n - 1 python:echo_service",
                             "lazy unix - - n 1? 1 python:echo_service"]
    instance.start()
    nobody = pwd.getpwnam("nobody").pw_uid
    private = instance.queue / "private" / "echo"
    public = instance.queue / "public" / "pubecho"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o666
    assert os.stat(private).st_uid == os.stat(public).st_uid == nobody
    assert stat.S_IMODE(os.stat(instance.queue / "private").st_mode) == 0o700
    # The master wakes the service every second, starting it; the conditional one stays idle.
    wait_for(lambda: instance.log().count("connect #") >= 2, timeout=6, what="wakeups")
    assert "postfix-py/echo_service" in instance.log()
    status = json.loads(instance.cmd("status", "--json").stdout)
    procs = {s["service"]: [p for p in status["processes"] if p["service"] == s["service"]]
             for s in status["services"]}
    assert len(procs["echo"]) == 1 and procs["lazy"] == []
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(public))
    s.settimeout(5)
    assert s.recv(100).startswith(b"hello")
    s.close()


def test_status_reports_every_process(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    out = instance.cmd("status")
    assert out.returncode == 0, out.stderr
    assert f"master pid {instance.master_pid()}" in out.stdout
    line = [l for l in out.stdout.splitlines() if hello["pid"] in l][0]
    assert "busy" in line and "echo_service" in line
    data = json.loads(instance.cmd("status", "--json").stdout)
    row = [r for r in data["processes"] if r["pid"] == int(hello["pid"])][0]
    assert row["state"] == "busy" and row["uss"] > 0 and row["rss"] >= row["uss"]
    bye(f)
    data = json.loads(instance.cmd("status", "--json").stdout)
    row = [r for r in data["processes"] if r["pid"] == int(hello["pid"])][0]
    assert row["state"] == "idle" and row["clients"] == 1


def test_workers_exit_when_the_master_dies(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    os.kill(instance.master_pid(), 9)
    f.write(b"still served\n")           # the current client is finished
    assert f.readline() == b"still served\n"
    bye(f)
    pid = int(hello["pid"])
    wait_for(lambda: gone(pid),
             what="the orphaned worker to exit")


def test_stop_ends_silent_and_busy_clients_at_once(instance):
    """As Postfix's `postfix stop`: whatever clients do, the instance ends in seconds, and
    a message cut off mid-DATA leaves no queue file behind (it was never acknowledged)."""
    port, smtp = free_port(), free_port()
    instance.main.update({"mydestination": "$myhostname, localhost",
                          "smtpd_error_sleep_time": "0s"})
    instance.master_lines = [echo(port), f"127.0.0.1:{smtp} inet n - y - - smtpd"]
    instance.start()
    f, hello = greet(port)                  # connected, then silent
    silent = SmtpClient(smtp)
    assert silent.reply().startswith("220 ")
    data = SmtpClient(smtp)                 # in the middle of a message
    data.reply()
    assert data.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert data.cmd("RCPT TO:<r@localhost>") == "250 2.1.5 Ok"
    assert data.cmd("DATA").startswith("354 ")
    data.sock.sendall(b"Subject: half\r\n\r\nthe first half\r\n")
    wait_for(lambda: [n for n in os.listdir(instance.queue / "incoming")],
             what="the queue file being written")
    pids = {p.pid for p in instance.workers()} | {instance.master_pid()}
    assert len(pids) >= 4                   # the master, echo, two smtpd workers
    started = time.monotonic()
    out = instance.cmd("stop")
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert took < 5, took
    for pid in pids:
        assert gone(pid)
    assert f.readline() == b""              # the silent clients were cut off
    f.close()
    assert silent.reply().endswith("<EOF>")
    assert data.reply().endswith("<EOF>")
    silent.close()
    data.close()
    assert os.listdir(instance.queue / "incoming") == []
    log = instance.log()
    assert "terminating on signal 15" in log
    assert "Traceback" not in log and "uncaught exception" not in log
    assert "did not stop" not in log


def test_abort_kills_every_worker_at_once(instance):
    """`postfix-py abort`: the busy worker is killed, not let finish; the master exits."""
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    f.write(b"ping\n")
    assert f.readline() == b"ping\n"       # a busy worker, with its client connected
    master, worker = instance.master_pid(), int(hello["pid"])
    out = instance.cmd("abort")
    assert out.returncode == 0, out.stderr
    assert gone(master) and gone(worker)    # abort returns once both have ended
    assert f.readline() == b""
    f.close()
    assert instance.running_master() is None
    assert instance.cmd("status").returncode == 1
    log = instance.log()
    assert "terminating immediately on abort" in log
    assert "Traceback" not in log and "uncaught exception" not in log


def test_stop_with_t_lets_clients_finish_then_ends_the_rest(instance):
    port = free_port()
    instance.master_lines = [echo(port)]
    instance.start()
    f, hello = greet(port)
    pid = int(hello["pid"])
    started = time.monotonic()
    result = {}
    t = threading.Thread(target=lambda: result.update(out=instance.cmd("stop", "-t", "2")))
    t.start()
    time.sleep(0.5)
    f.write(b"still served\n")              # within the grace time, the client is served
    assert f.readline() == b"still served\n"
    t.join()
    took = time.monotonic() - started
    assert result["out"].returncode == 0, result["out"].stderr
    assert 2 <= took < 6, took
    assert f.readline() == b""              # then it was ended
    f.close()
    assert gone(pid)


def test_pickup_wakeups_bring_no_process_limit_warning(instance):
    """Postfix's `pickup unix n - y 60 1 pickup`, with a 1-second wakeup: the master's
    trigger meets a busy single process at every wakeup, which is no capacity problem."""
    instance.master_lines = ["pickup unix n - n 1 1 pickup"]
    instance.start()

    def served():
        status = json.loads(instance.cmd("status", "--json").stdout)
        return sum(p["clients"] or 0 for p in status["processes"] if p["service"] == "pickup")
    wait_for(lambda: served() >= 3, timeout=10, what="three wakeups")
    assert "process limit" not in instance.log()
