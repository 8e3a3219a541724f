"""Where a busy smtpd worker's memory goes: postfix-py next to Debian's Postfix, same run.

    python bench/worker_memory.py --write BENCHMARKS.md

Each system runs with its smtp service limited to one process (maxproc 1, max_use 1000),
so that one worker serves every session, one after another, from one client. The worker's
unique set size (USS, psutil: the pages no other process maps) is read when it is fresh
(it has sent its first greeting) and after 1, 10, 100 and 300 whole sessions (connect,
EHLO, [STARTTLS, EHLO,] MAIL, RCPT, DATA with 5 KB, QUIT; bench/smtp_load.py), in plain
SMTP and with resumed STARTTLS. The private pages are split by where they lie
(/proc/PID/smaps): the C heap (malloc: OpenSSL's allocations, Python objects over 512
bytes), anonymous mappings (Python's object arenas: pages of the master's objects that the
worker wrote to, refcounts included, and its own new objects), and the data pages of
shared libraries and the interpreter. A table of these figures, medians of --runs runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import smtp_load  # noqa: E402
from report import machine_description, md_table, write_section  # noqa: E402

MIB = 1048576
POINTS = (1, 10, 100, 300)
MODES = ("plain", "starttls-resume")
MAX_USE = 1000


class OneWorkerPy(compare.PyInstance):
    """postfix-py whose smtp service has one process, reused for MAX_USE sessions."""

    def __init__(self, root: Path, cert: Path):
        super().__init__(root, cert)
        cf = root / "master.cf"
        cf.write_text(cf.read_text().replace(f"127.0.0.1:{self.port} inet n - y - - smtpd",
                                             f"127.0.0.1:{self.port} inet n - y - 1 smtpd"))
        with open(root / "main.cf", "a") as f:
            f.write(f"max_use = {MAX_USE}\n")


class OneWorkerPostfix(compare.PfInstance):
    """Debian's Postfix, its smtp service likewise limited to one process."""

    def __init__(self, root: Path, cert: Path):
        super().__init__(root, cert)
        self.peer.main["max_use"] = str(MAX_USE)
        write = self.peer.write

        def write_one_worker():
            write()
            cf = self.peer.dir / "master.cf"
            cf.write_text(cf.read_text().replace(
                f"127.0.0.1:{self.port} inet n - y - - smtpd",
                f"127.0.0.1:{self.port} inet n - y - 1 smtpd"))
        self.peer.write = write_one_worker

    def master_pid(self) -> int | None:
        return self.peer.master_pid()


def private_split(pid: int) -> dict:
    """Private kB of pid by kind of mapping: heap, anon, data (files), stack."""
    out = {"heap": 0, "anon": 0, "data": 0, "stack": 0}
    kind = "anon"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                name = fields[5] if len(fields) > 5 else ""
                kind = ("heap" if name == "[heap]" else "stack" if name == "[stack]"
                        else "anon" if not name or name.startswith("[anon") else "data")
            elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
                out[kind] += int(fields[1])
    return {k: v / 1024 for k, v in out.items()}


def the_worker(master_pid: int) -> psutil.Process:
    """The one smtpd process (only the plain port gets clients here)."""
    for p in psutil.Process(master_pid).children():
        try:
            if "smtpd" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError("no smtpd worker found")


def sample(proc: psutil.Process) -> dict:
    return {"uss": proc.memory_full_info().uss / MIB, **private_split(proc.pid)}


def measure(system: str, root: Path, cert: Path, mode: str) -> list[dict]:
    inst = (OneWorkerPy if system == "postfix-py" else OneWorkerPostfix)(root, cert)
    rows = []
    try:
        inst.start()
        compare._wait_accepting(inst.port)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", inst.port), timeout=10) as s:
            s.recv(512)
            time.sleep(0.2)
            worker = the_worker(inst.master_pid())
            rows.append({"point": "fresh", **sample(worker)})
            s.sendall(b"QUIT\r\n")
            s.recv(512)
        done = 0
        for point in POINTS:
            smtp_load.run(argparse.Namespace(host="127.0.0.1", port=inst.port, mode=mode,
                                             clients=1, messages=point - done, size=5000))
            done = point
            time.sleep(0.1)
            now = the_worker(inst.master_pid())
            if now.pid != worker.pid:
                raise RuntimeError(f"{system}: the worker changed after {done} sessions")
            rows.append({"point": str(point), **sample(now)})
    finally:
        inst.stop()
    return rows


def render(res: dict, runs: int, elapsed: float) -> str:
    out = [
        "## Worker memory: one smtpd worker, session by session — `bench/worker_memory.py`",
        "",
        "```",
        f".venv/bin/python bench/worker_memory.py --runs {runs} --write BENCHMARKS.md",
        "```",
        "",
        machine_description(),
        "",
        f"Took {elapsed / 60:.1f} min; medians of {runs} run{'s' if runs != 1 else ''}. "
        + __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(),
        "",
    ]
    for mode in MODES:
        rows = []
        for point in ["fresh"] + [str(p) for p in POINTS]:
            cells = [point if point == "fresh" else f"after {point}"]
            for system in ("postfix-py", "postfix"):
                r = res.get(system, {}).get(mode, {}).get(point)
                if r is None:
                    cells += ["–"] * 4
                    continue
                cells += [f"{r['uss']:.1f}", f"{r['heap']:.1f}", f"{r['anon']:.1f}",
                          f"{r['data']:.1f}"]
            rows.append(cells)
        out += [f"### {mode}", "",
                md_table(["worker", "postfix-py USS MiB", "C heap", "anon (arenas)",
                          "library data", "Postfix USS MiB", "C heap", "anon",
                          "library data"], rows, align="lrrrrrrrr"), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--write", metavar="FILE", help="write the worker-memory section of FILE")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    systems = ["postfix-py"] + (["postfix"] if compare.available() else [])
    top = Path(tempfile.mkdtemp(prefix="pfx-bench-wmem-"))
    top.chmod(0o755)
    t0 = time.monotonic()
    raw: dict = {s: {m: [] for m in MODES} for s in systems}
    try:
        cert = compare.make_cert(top)
        for run in range(args.runs):
            for mode in MODES:
                for system in (systems if run % 2 == 0 else systems[::-1]):
                    raw[system][mode].append(measure(system, top / f"{system}-{mode}-{run}",
                                                     cert, mode))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    res = {s: {m: {row["point"]: {k: statistics.median(r[i][k] for r in runs_)
                                  for k in ("uss", "heap", "anon", "data")}
                   for i, row in enumerate(runs_[0])}
               for m, runs_ in by_mode.items()}
           for s, by_mode in raw.items()}
    if args.json:
        print(json.dumps(res, indent=2))
    text = render(res, args.runs, time.monotonic() - t0)
    if args.write:
        write_section(args.write, "worker-memory", text)
    elif not args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
