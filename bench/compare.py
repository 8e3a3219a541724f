"""Side-by-side acceptance benchmark: postfix-py against Debian's Postfix, same machine, same run.

    python bench/compare.py                       # the full matrix, 3 runs, a markdown table
    python bench/compare.py --modes plain --clients 8 --runs 5 --messages 400

Both systems get equivalent settings: one smtpd service on a loopback port (chrooted), one
smtps service, the same self-signed ECDSA certificate, `smtpd_tls_security_level = may`,
session resumption by tickets, and no relay restrictions in the way (the client is in
mynetworks). Postfix discards mail after queueing; postfix-py queues it (and its qmgr, when
present, discards it too). For each mode and client count the systems alternate, run after
run, so that drift of the machine hits both; the table shows medians and the ratio
postfix-py / Postfix. Load comes from bench/smtp_load.py (one message per connection);
before the first case each system gets 40 untimed messages over plain SMTP and over smtps.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from peers import PostfixPeer, available, free_port, make_cert, reap  # noqa: E402
import smtp_load  # noqa: E402

POSTFIX_PY = str(Path(sys.executable).parent / "postfix-py")


class PyInstance:
    """postfix-py with smtpd (and smtps), tlsmgr, and qmgr/discard when they exist."""

    def __init__(self, root: Path, cert: Path):
        self.dir = root
        self.queue = root / "queue"
        self.port, self.smtps = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        (root / "main.cf").write_text(
            f"queue_directory = {root}/queue\ndata_directory = {root}/data\n"
            f"mail_owner = nobody\nmaillog_file = {root}/maillog\n"
            f"inet_interfaces = 127.0.0.1\nmyhostname = bench.test\n"
            f"mydestination = $myhostname, localhost\nmynetworks = 127.0.0.0/8\n"
            f"smtpd_tls_cert_file = {cert}\nsmtpd_tls_security_level = may\n"
            f"default_transport = discard\n")
        lines = [f"127.0.0.1:{self.port} inet n - y - - smtpd",
                 f"127.0.0.1:{self.smtps} inet n - y - - smtpd -o smtpd_tls_wrappermode=yes",
                 "tlsmgr unix - - y 1000? 1 tlsmgr"]
        try:
            import postfix_py.qmgr.service  # noqa: F401
            import postfix_py.local.discard  # noqa: F401
            lines += ["qmgr unix n - n 300 1 qmgr", "discard unix - - y - - discard"]
        except ImportError:
            pass
        (root / "master.cf").write_text("\n".join(lines) + "\n")

    def start(self):
        subprocess.run([POSTFIX_PY, "-c", str(self.dir), "start"], check=True,
                       capture_output=True)

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self):
        """postfix-py stop, then SIGKILL to the master by pid if it lingers."""
        pid = self.master_pid()
        subprocess.run([POSTFIX_PY, "-c", str(self.dir), "stop"], capture_output=True,
                       timeout=60)
        reap(pid)


def wait_drained(queue: Path, timeout: float = 60) -> None:
    """Until the mail of earlier runs has left incoming/ and active/: a queue manager
    still working through a backlog would take CPU from the next measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(f for sub in ("incoming", "active")
                   for _, _, f in os.walk(queue / sub)):
            return
        time.sleep(0.05)


def _wait_accepting(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on port {port}")


class PfInstance:
    def __init__(self, root: Path, cert: Path):
        self.queue = root / "queue"
        self.port, self.smtps = free_port(), free_port()
        self.peer = PostfixPeer(self.port, directory=root, main={
            "smtpd_tls_cert_file": str(cert), "smtpd_tls_security_level": "may",
            "mynetworks": "127.0.0.0/8"},
            services=[f"127.0.0.1:{self.smtps} inet n - y - - smtpd "
                      "-o smtpd_tls_wrappermode=yes"])

    def start(self):
        self.peer.start()

    def stop(self):
        self.peer.stop()


def run_load(port: int, mode: str, clients: int, messages: int) -> dict:
    args = argparse.Namespace(host="127.0.0.1", port=port, mode=mode, clients=clients,
                              messages=messages, size=5000)
    return smtp_load.run(args)


def summarize(results: list[dict]) -> dict:
    """Medians of a list of smtp_load results (one per run)."""
    return {
        "rate": statistics.median(r["rate"] for r in results),
        "p50_ms": statistics.median(r["p50_ms"] for r in results if r["p50_ms"] is not None)
        if any(r["p50_ms"] is not None for r in results) else None,
        "p99_ms": statistics.median(r["p99_ms"] for r in results if r["p99_ms"] is not None)
        if any(r["p99_ms"] is not None for r in results) else None,
        "failures": sum(r["failures"] for r in results),
        "resumed": (statistics.median(r["resumed"] for r in results
                                      if r["resumed"] is not None)
                    if any(r["resumed"] is not None for r in results) else None),
    }


def matrix(modes, clients_list, runs: int, messages: int, progress=None,
           warmup: int = 40) -> list[dict]:
    """Start both systems, run every mode x client count `runs` times alternating the
    systems, stop both (always) and return one row per case: medians per system
    ("postfix-py", "postfix"), "ratio" of the rates, and the raw results under "runs".
    Before the first case each system gets `warmup` untimed messages over plain SMTP and
    as many over smtps (worker processes forked, TLS state and tickets set up)."""
    top = Path(tempfile.mkdtemp(prefix="pfx-compare-"))
    os.chmod(top, 0o755)
    rows = []
    systems = {}
    try:
        cert = make_cert(top)
        systems = {"postfix-py": PyInstance(top / "py", cert),
                   "postfix": PfInstance(top / "pf", cert)}
        for s in systems.values():
            s.start()
        for s in systems.values():
            _wait_accepting(s.port)
            _wait_accepting(s.smtps)
        time.sleep(1)
        if warmup:
            for s in systems.values():
                run_load(s.port, "plain", 4, warmup)
                run_load(s.smtps, "smtps", 4, warmup)
        for mode in modes:
            for clients in clients_list:
                got = {name: [] for name in systems}
                for run in range(runs):
                    # alternate which system goes first, so drift hits both
                    order = list(systems.items())
                    if run % 2:
                        order.reverse()
                    for name, s in order:
                        port = s.smtps if mode == "smtps" else s.port
                        for each in systems.values():
                            wait_drained(each.queue)
                        got[name].append(run_load(port, mode, clients, messages))
                row = {"mode": mode, "clients": clients}
                for name, results in got.items():
                    row[name] = summarize(results)
                py, pf = row["postfix-py"]["rate"], row["postfix"]["rate"]
                row["ratio"] = round(py / pf, 2) if pf else None
                row["runs"] = got
                rows.append(row)
                if progress:
                    progress({k: v for k, v in row.items() if k != "runs"})
    finally:
        for s in systems.values():
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                print(f"stop: {exc}", file=sys.stderr)
        shutil.rmtree(top, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="plain,starttls,starttls-resume,smtps")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not available():
        print("Debian's postfix is needed (apt-get install postfix), and root", file=sys.stderr)
        return 2
    rows = matrix(args.modes.split(","), [int(c) for c in args.clients.split(",")],
                  args.runs, args.messages,
                  progress=lambda row: print(json.dumps(row), file=sys.stderr))
    for r in rows:
        del r["runs"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| mode | clients | postfix-py msg/s | Postfix msg/s | ratio | postfix-py p50/p99 ms "
          "| Postfix p50/p99 ms | resumed (py / Postfix) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["postfix-py"], r["postfix"]
        res = "" if a["resumed"] is None else f"{a['resumed']:.0%} / {b['resumed']:.0%}"
        print(f"| {r['mode']} | {r['clients']} | {a['rate']:.0f} | {b['rate']:.0f} | "
              f"{r['ratio']:.2f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
              f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {res} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
