"""Master benchmarks, postfix-py next to Debian's Postfix in the same run.

    python bench/master_bench.py --runs 5

Both systems start like for like: postfix-py with its default master.cf (conf/master.cf:
smtp inet, pickup, qmgr, tlsmgr, smtp, relay, lmtp, error, discard, local), Postfix with
the same services from Debian's master.cf plus the ones Postfix cannot work without, which
postfix-py does inside its own daemons (POSTFIX_ONLY: cleanup, trivial-rewrite, and the
bounce daemon as bounce, defer and trace; postlogd for maillog_file); both discard mail.
--services smtpd gives each one smtpd service only (the old comparison). Measures, for each
system, with the smtp inet service on a loopback port:
  start        `start` until the SMTP port accepts (seconds)
  first        connect to 220 greeting with no worker running: fork + worker start (ms)
  warm         connect to 220 greeting with an idle worker waiting (ms)
  idle_uss     USS of an idle smtpd worker (MiB, psutil)
  busy_uss     USS of an smtpd worker in the middle of a session, after a message (MiB)
  instance_uss the whole idle instance: the USS of the master and every process below it,
               after start and before any client (MiB), and their count (procs)
Prints a table of medians and the postfix-py/Postfix ratios; --json for machine output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from peers import PostfixPeer, available, free_port, reap  # noqa: E402

POSTFIX_PY = str(Path(sys.executable).parent / "postfix-py")
PY_MASTER_CF = HERE.parent / "conf" / "master.cf"      # postfix-py's default services
# Postfix services that postfix-py has no counterpart for, because its smtpd, qmgr and
# daemons do that work themselves; Postfix's smtpd, qmgr and maillog_file need them.
POSTFIX_ONLY = (("cleanup", "unix"), ("rewrite", "unix"), ("bounce", "unix"),
                ("defer", "unix"), ("trace", "unix"), ("postlog", "unix-dgram"))


def services(text: str) -> list[tuple[str, str]]:
    """The (name, type) of every service line of a master.cf text."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8 and not line[0].isspace() and not line.startswith("#"):
            out.append((fields[0], fields[1]))
    return out


def matched(text: str, keep: set[tuple[str, str]]) -> str:
    """A master.cf text with only the services in keep (an inet service is kept when
    ("smtp", "inet") is), their continuation lines with them, and no comments."""
    out, keeping = [], False
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            if keeping:
                out.append(line)
            continue
        fields = line.split()
        key = ("smtp", "inet") if len(fields) > 1 and fields[1] == "inet" else tuple(fields[:2])
        keeping = key in keep
        if keeping:
            out.append(line)
    return "\n".join(out) + "\n"


def py_services() -> set[tuple[str, str]]:
    return set(services(PY_MASTER_CF.read_text()))


def services_note(mode: str = "matched") -> str:
    """One sentence: which services each system starts with."""
    if mode == "smtpd":
        return ("Each system starts with one smtpd service only (postfix-py's master.cf has "
                "that line alone; Postfix's master.cf is Debian's).")
    listed = services(PY_MASTER_CF.read_text())
    names = [n for n, _ in listed]
    py = [f"{n} {t}" if t == "inet" or names.count(n) > 1 else n for n, t in listed]
    pf_only = [n for n, _ in POSTFIX_ONLY]
    return (f"Both systems start with the same services: postfix-py's default master.cf "
            f"({', '.join(py)}) and, for Postfix, the same services from "
            f"Debian's master.cf plus {len(pf_only)} that Postfix needs and postfix-py has "
            f"no counterpart for, because its own daemons do that work ({', '.join(pf_only)}: "
            "cleanup writes the queue file that postfix-py's smtpd writes itself; rewrite is "
            "trivial-rewrite; bounce, defer and trace are the bounce daemon; postlog is "
            "postlogd, for maillog_file); both discard mail.")


def wait_listen(port: int, timeout: float = 20) -> None:
    """Wait until something listens on the port, without connecting (no worker starts)."""
    needle = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(needle.strip()) and fields[3] == "0A":
                    return
        time.sleep(0.002)
    raise RuntimeError(f"port {port} never listened")


def greet_ms(port: int) -> float:
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    f.readline()
    elapsed = (time.perf_counter() - start) * 1000
    s.sendall(b"QUIT\r\n")
    f.readline()
    f.close()
    s.close()
    return elapsed


def smtpd_workers(master_pid: int, name: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(master_pid).children():
        try:
            if name in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def uss(proc: psutil.Process) -> float:
    return proc.memory_full_info().uss / 1048576


def instance_uss(master_pid: int) -> tuple[float, int]:
    """The USS sum (MiB) of master_pid and every process below it, and their count."""
    root = psutil.Process(master_pid)
    total, n = 0.0, 0
    for p in [root] + root.children(recursive=True):
        try:
            total += uss(p)
            n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, n


def busy_session(port: int):
    """A session in the middle of a transaction, after one message: (socket, file)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")

    def reply():
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line
    reply()
    for cmd in (b"EHLO bench\r\n", b"MAIL FROM:<a@example.org>\r\n",
                b"RCPT TO:<b@localhost>\r\n", b"DATA\r\n"):
        s.sendall(cmd)
        reply()
    s.sendall(b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n")
    reply()
    s.sendall(b"MAIL FROM:<a@example.org>\r\n")
    reply()
    return s, f


class PyInstance:
    def __init__(self, root: Path, port: int, mode: str = "matched"):
        self.dir, self.port = root, port
        root.mkdir(parents=True, exist_ok=True)
        (root / "main.cf").write_text(
            f"queue_directory = {root}/queue\ndata_directory = {root}/data\n"
            f"mail_owner = nobody\nmaillog_file = {root}/maillog\n"
            f"inet_interfaces = 127.0.0.1\nmyhostname = bench.test\n"
            f"mydestination = $myhostname, localhost\n"
            f"default_transport = discard\nlocal_transport = discard\n"
            f"relay_transport = discard\n")
        smtpd = f"127.0.0.1:{port} inet n - y - - smtpd\n"
        if mode == "smtpd":
            (root / "master.cf").write_text(smtpd)
        else:
            lines = [smtpd.rstrip() if line.split()[:2] == ["smtp", "inet"] else line
                     for line in matched(PY_MASTER_CF.read_text(), py_services()).splitlines()]
            (root / "master.cf").write_text("\n".join(lines) + "\n")

    def start(self):
        subprocess.run([POSTFIX_PY, "-c", str(self.dir), "start"], check=True,
                       capture_output=True)

    def master_pid(self) -> int:
        return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def stop(self):
        """postfix-py stop, then SIGKILL to the master by pid if it lingers."""
        try:
            pid = self.master_pid()
        except (OSError, ValueError, IndexError):
            pid = None
        subprocess.run([POSTFIX_PY, "-c", str(self.dir), "stop"], capture_output=True,
                       timeout=60)
        reap(pid)


class MatchedPostfix(PostfixPeer):
    """A private Postfix whose master.cf holds only postfix-py's services + POSTFIX_ONLY."""

    def write(self) -> None:
        super().write()
        keep = py_services() | set(POSTFIX_ONLY)
        cf = self.dir / "master.cf"
        cf.write_text(matched(cf.read_text(), keep))


def measure(system: str, root: Path, mode: str = "matched") -> dict:
    """Start one system afresh in root, measure it, stop it. mode: "matched" (the same
    services on both, see services_note) or "smtpd" (one smtpd service each)."""
    port = free_port()
    if system == "postfix-py":
        inst = PyInstance(root, port, mode)
    else:
        inst = (MatchedPostfix if mode == "matched" else PostfixPeer)(port, directory=root)
        inst.write()
    cf = (root / "master.cf").read_text()
    t0 = time.perf_counter()
    try:
        inst.start()
        wait_listen(port)
        start_s = time.perf_counter() - t0
        time.sleep(0.5)
        master = inst.master_pid()
        whole, procs = instance_uss(master)
        name = "smtpd"
        first = greet_ms(port)      # no smtpd runs yet: this one is forked for us
        time.sleep(0.2)
        warm = statistics.median(greet_ms(port) for _ in range(5))
        time.sleep(0.2)
        idle = statistics.median(uss(w) for w in smtpd_workers(master, name))
        s, f = busy_session(port)
        busy = max(uss(w) for w in smtpd_workers(master, name))
        f.close()
        s.close()
    finally:
        inst.stop()         # also when a measurement fails: never leave a mail system behind
    return {"start": start_s, "first": first, "warm": warm, "idle_uss": idle,
            "busy_uss": busy, "instance_uss": whole, "procs": procs,
            "services": len(services(cf))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--services", choices=("matched", "smtpd"), default="matched",
                   help="the same services on both (matched) or one smtpd each")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    systems = ["postfix-py"] + (["postfix"] if available() else [])
    results = {s: [] for s in systems}
    top = Path(tempfile.mkdtemp(prefix="pfx-bench-"))
    os.chmod(top, 0o755)   # the peers' unprivileged users must reach their files
    try:
        for run in range(args.runs):
            for system in systems:          # alternate, so drift hits both
                results[system].append(measure(system, top / f"{system}-{run}",
                                               args.services))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    med = {s: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
           for s, rows in results.items()}
    if args.json:
        print(json.dumps(med, indent=2))
        return 0
    print(services_note(args.services))
    keys = [("services", "n", 0), ("start", "s", 3), ("first", "ms", 2), ("warm", "ms", 2),
            ("idle_uss", "MiB", 2), ("busy_uss", "MiB", 2), ("instance_uss", "MiB", 1),
            ("procs", "n", 0)]
    print(f"{'metric':<10}" + "".join(f"{s:>14}" for s in systems) +
          ("   ratio" if len(systems) == 2 else ""))
    for key, unit, nd in keys:
        row = f"{key + ' (' + unit + ')':<16}" + "".join(
            f"{round(med[s][key], nd):>14}" for s in systems)
        if len(systems) == 2 and med["postfix"][key]:
            row += f"   {med['postfix-py'][key] / med['postfix'][key]:.2f}"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
