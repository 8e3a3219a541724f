"""Scaling study: postfix-py next to Debian's Postfix as concurrency and message size grow.

    .venv/bin/python bench/scaling.py                        # full sweep, 3 runs, markdown
    .venv/bin/python bench/scaling.py --quick                # clients 1,10,50; 1 KB,100 KB,10 MB
    .venv/bin/python bench/scaling.py --write BENCHMARKS.md  # between the scaling markers
    .venv/bin/python bench/scaling.py --json                 # raw results

Two sweeps, both systems on loopback with the settings of bench/compare.py (one chrooted
smtpd service, ECDSA certificate, `smtpd_tls_security_level = may`, mail discarded after
queueing) plus, on both, `default_process_limit = 100` and `message_size_limit = 20000000`:

  concurrency   1, 10, 25, 50, 100 clients; modes plain and starttls-resume; 5 KB messages,
                max(300, 10 x clients) per point (each client sends at least ten, so the
                sessions overlap long enough to be sampled). Throughput, p99 latency, and
                memory sampled with psutil every 0.2 s during the load: the peak of the
                summed USS of the service's smtpd processes, their peak count, and the peak
                of the summed USS of every process of the mail system (master and daemons).
  message size  1 KB, 10 KB, 100 KB, 1 MB, 10 MB; one client, plain. MB/s of message data
                accepted (10^6 bytes), and the peak memory of the smtpd process serving the
                connection: USS sampled every 25 ms during the transfers, RSS as the kernel's
                high-water mark (VmHWM); plus the summed USS of all processes of the system,
                and every daemon's VmHWM, to see whether another one holds the message.

Every point starts both systems afresh (so no idle worker of an earlier point is counted),
warms them up with one connection per client, and is measured `--runs` times; the systems
alternate and the one that goes first swaps every run. The tables show medians. Every
instance is stopped (and its processes killed by pid if they linger) and its directory
removed, also when something fails; every load is bounded in messages and in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import smtp_load  # noqa: E402
from master_bench import wait_listen  # noqa: E402
from peers import MASTER_CF, POSTFIX, make_cert  # noqa: E402
from report import command_line, machine_description, md_table, write_section  # noqa: E402

EXTRA_MAIN = {"default_process_limit": "100", "message_size_limit": "20000000"}
CLIENTS, CLIENTS_QUICK = [1, 10, 25, 50, 100], [1, 10, 50]
MODES = ["plain", "starttls-resume"]
SIZES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
SIZES_QUICK = [1_000, 100_000, 10_000_000]
CONC_SIZE = 5_000
CONC_INTERVAL, SIZE_INTERVAL = 0.2, 0.025
LIST_EVERY = 0.2            # seconds between scans for new and gone processes
LOAD_DEADLINE = 600.0       # seconds for one load; beyond it the clients are terminated
MIB = 1048576
SYSTEMS = ("postfix-py", "postfix")


# --- the two systems -------------------------------------------------------------------

class PyScaling(compare.PyInstance):
    """compare.py's postfix-py instance with the extra main.cf settings."""

    name = "postfix-py"

    def __init__(self, root: Path, cert: Path):
        super().__init__(root, cert)
        with open(root / "main.cf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in EXTRA_MAIN.items()))

    def master_pid(self) -> int | None:
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


class PfScaling(compare.PfInstance):
    """compare.py's Postfix instance with the extra main.cf settings."""

    name = "postfix"

    def __init__(self, root: Path, cert: Path):
        super().__init__(root, cert)
        self.peer.main.update(EXTRA_MAIN)
        self.dir = root

    def master_pid(self) -> int | None:
        return self.peer.master_pid()


def start(inst) -> psutil.Process:
    """Start an instance and wait until its SMTP port listens; its master process."""
    try:
        inst.start()
    except subprocess.CalledProcessError as exc:    # say why: start's output is captured
        out = (exc.stderr or b"") + (exc.stdout or b"")
        raise RuntimeError(f"{inst.name} start failed ({exc.returncode}): "
                           f"{out.decode(errors='replace').strip()[-2000:]}") from None
    wait_listen(inst.port)
    pid = None
    deadline = time.monotonic() + 20
    while pid is None and time.monotonic() < deadline:
        pid = inst.master_pid()
        if pid is None:
            time.sleep(0.05)
    if pid is None:
        raise RuntimeError(f"{inst.name}: no master.pid in {inst.dir}")
    time.sleep(0.5)     # let the other daemons (qmgr, tlsmgr, ...) come up
    return psutil.Process(pid)


def stop(inst, master: psutil.Process | None) -> None:
    """Stop an instance; then kill, by pid, any process of it that is still there."""
    procs = []
    try:
        if master is None and inst.master_pid():    # started, but start() failed later
            master = psutil.Process(inst.master_pid())
        if master is not None:
            procs = [master] + master.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    try:
        inst.stop()
    finally:
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:         # psutil checks the pid was not reused
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


# --- memory sampling --------------------------------------------------------------------

def vm_hwm(pid: int) -> int:
    """The kernel's high-water mark of a process's RSS (VmHWM), in bytes; 0 if gone.
    Exact, unlike a sampled peak, but it covers the process's whole life."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def prog_name(cmdline: list[str]) -> str:
    """The daemon's name: "smtpd" for both `smtpd -n ...` and `postfix-py/smtpd -n ...`."""
    first = next((a for a in cmdline if a), "")
    return first.split()[0].rsplit("/", 1)[-1] if first.strip() else "?"


class Sampler(threading.Thread):
    """Samples the memory of a mail system's processes every `interval` seconds."""

    def __init__(self, master: psutil.Process, port: int, interval: float):
        super().__init__(daemon=True)
        self.master, self.interval = master, interval
        self.tag = f"127.0.0.1:{port}"
        self.halt = threading.Event()
        self.samples = 0
        self.cost = 0.0                 # seconds spent sampling
        self._procs: list = []          # (process, name, is a worker of the service)
        self._listed = -1e9
        self.smtpd_uss_sum = 0          # peak of the summed USS of the service's smtpd
        self.smtpd_workers = 0          # peak count of those
        self.workers_at_peak = 0        # their count in the sample of the USS peak
        self.smtpd_max_uss = 0          # the largest single smtpd process, USS and RSS
        self.smtpd_max_rss = 0
        self.smtpd_hwm = 0              # the largest kernel high-water mark of RSS (VmHWM)
        self.all_uss_sum = 0            # peak of the summed USS of every process
        self.by_name: dict[str, dict] = {}

    def _list(self) -> None:
        """(Re)list the system's processes with their names, at most every LIST_EVERY
        seconds (memory is read every interval); a process already known keeps its name."""
        self._listed = time.monotonic()
        known = {p.pid: (p, name, w) for p, name, w in self._procs}
        self._procs = []
        for pid in [self.master.pid] + self._child_pids():
            if pid in known and known[pid][0].is_running():   # is_running: not reused
                self._procs.append(known[pid])
                continue
            try:
                proc = self.master if pid == self.master.pid else psutil.Process(pid)
                cmd = proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            name = prog_name(cmd)
            self._procs.append((proc, name, name == "smtpd" and self.tag in " ".join(cmd)))

    def _child_pids(self) -> list[int]:
        """The master's children (every daemon of both systems is one), from
        /proc/PID/task/TID/children: much cheaper than psutil's scan of all of /proc."""
        pid = self.master.pid
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        pids = []
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    pids += map(int, fh.read().split())
            except OSError:
                pass
        return pids

    def sample(self) -> None:
        t0 = time.thread_time()
        if time.monotonic() - self._listed >= LIST_EVERY:
            self._list()
        uss_sum = all_sum = workers = 0
        names: dict[str, list] = {}
        for p, name, is_worker in self._procs:
            try:
                mem = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            hwm = vm_hwm(p.pid)
            all_sum += mem.uss
            n = names.setdefault(name, [0, 0, 0, 0, 0])  # count, USS sum, max USS, RSS, HWM
            n[0] += 1
            n[1] += mem.uss
            n[2] = max(n[2], mem.uss)
            n[3] = max(n[3], mem.rss)
            n[4] = max(n[4], hwm)
            if is_worker:
                workers += 1
                uss_sum += mem.uss
                self.smtpd_max_uss = max(self.smtpd_max_uss, mem.uss)
                self.smtpd_max_rss = max(self.smtpd_max_rss, mem.rss)
                self.smtpd_hwm = max(self.smtpd_hwm, hwm)
        self.cost += time.thread_time() - t0     # CPU time of this thread
        self.samples += 1
        if uss_sum > self.smtpd_uss_sum:
            self.smtpd_uss_sum, self.workers_at_peak = uss_sum, workers
        self.smtpd_workers = max(self.smtpd_workers, workers)
        self.all_uss_sum = max(self.all_uss_sum, all_sum)
        for name, (count, total, top_uss, top_rss, top_hwm) in names.items():
            b = self.by_name.setdefault(name, {"count": 0, "uss_sum_mib": 0.0,
                                               "max_uss_mib": 0.0, "max_rss_mib": 0.0,
                                               "hwm_mib": 0.0})
            b["hwm_mib"] = max(b["hwm_mib"], round(top_hwm / MIB, 2))
            b["count"] = max(b["count"], count)
            b["uss_sum_mib"] = max(b["uss_sum_mib"], round(total / MIB, 2))
            b["max_uss_mib"] = max(b["max_uss_mib"], round(top_uss / MIB, 2))
            b["max_rss_mib"] = max(b["max_rss_mib"], round(top_rss / MIB, 2))

    def run(self) -> None:
        self.sample()
        while not self.halt.wait(self.interval):
            self.sample()

    def finish(self) -> dict:
        self.halt.set()
        self.join()
        self.sample()
        return {
            "samples": self.samples,
            "sample_ms": round(self.cost / max(1, self.samples) * 1000, 2),
            "sampler_cpu_s": round(self.cost, 3),
            "smtpd_uss_mib": round(self.smtpd_uss_sum / MIB, 2),
            "smtpd_workers": self.smtpd_workers,
            "workers_at_peak": self.workers_at_peak,
            "smtpd_max_uss_mib": round(self.smtpd_max_uss / MIB, 2),
            "smtpd_max_rss_mib": round(self.smtpd_max_rss / MIB, 2),
            "smtpd_hwm_mib": round(self.smtpd_hwm / MIB, 2),
            "all_uss_mib": round(self.all_uss_sum / MIB, 2),
            "by_name": self.by_name,
        }


# --- one measurement --------------------------------------------------------------------

def load(port: int, mode: str, clients: int, messages: int, size: int) -> dict:
    args = argparse.Namespace(host="127.0.0.1", port=port, mode=mode, clients=clients,
                              messages=messages, size=size, deadline=LOAD_DEADLINE)
    return smtp_load.run(args)


def measure(cls, root: Path, cert: Path, mode: str, clients: int, messages: int,
            size: int, interval: float) -> dict:
    """Start a fresh instance, warm it up, run one sampled load, stop and remove it."""
    inst = cls(root, cert)
    master = None
    try:
        master = start(inst)
        warm = load(inst.port, mode, clients, clients, min(size, CONC_SIZE))
        time.sleep(0.3)
        sampler = Sampler(master, inst.port, interval)
        sampler.sample()    # in this thread first: psutil's lazy set-up before the clients fork
        sampler.start()
        try:
            got = load(inst.port, mode, clients, messages, size)
        finally:
            mem = sampler.finish()
    finally:
        try:
            stop(inst, master)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    got.update(mem)
    got["warmup_failures"] = warm["failures"]
    got["sampler_cpu_pct"] = round(100 * got["sampler_cpu_s"] / got["seconds"], 1) \
        if got["seconds"] else None
    got["size"] = size
    msg_bytes = len(smtp_load._message(size))
    got["message_bytes"] = msg_bytes
    got["mb_s"] = round(got["messages"] * msg_bytes / got["seconds"] / 1e6, 3) \
        if got["seconds"] else 0
    return got


def sweep(points, runs: int, top: Path, cert: Path, interval: float, progress) -> list[dict]:
    """points: dicts with mode, clients, messages, size. One row per point, raw runs kept."""
    classes = {"postfix-py": PyScaling, "postfix": PfScaling}
    rows = []
    n = 0
    for point in points:
        got = {name: [] for name in SYSTEMS}
        for run in range(runs):
            order = list(SYSTEMS) if run % 2 == 0 else list(reversed(SYSTEMS))
            for name in order:
                n += 1
                r = measure(classes[name], top / f"{name}-{n}", cert, point["mode"],
                            point["clients"], point["messages"], point["size"], interval)
                got[name].append(r)
                progress(name, point, run, r)
        row = dict(point)
        for name, results in got.items():
            row[name] = summarize(results)
        row["runs"] = got
        rows.append(row)
    return rows


def summarize(results: list[dict]) -> dict:
    keys = ["rate", "mb_s", "p50_ms", "p99_ms", "smtpd_uss_mib", "smtpd_workers",
            "smtpd_max_uss_mib", "smtpd_max_rss_mib", "smtpd_hwm_mib", "all_uss_mib",
            "sample_ms",
            "sampler_cpu_pct"]
    out = {}
    for k in keys:
        vals = [r[k] for r in results if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    names = {n for r in results for n in r.get("by_name", {})}
    for key, field in (("max_uss_by_name_mib", "max_uss_mib"), ("hwm_by_name_mib", "hwm_mib")):
        out[key] = {n: statistics.median(r["by_name"][n][field] for r in results
                                         if n in r.get("by_name", {})) for n in sorted(names)}
    out["failures"] = sum(r["failures"] + r["warmup_failures"] for r in results)
    res = [r["resumed"] for r in results if r["resumed"] is not None]
    out["resumed"] = statistics.median(res) if res else None
    return out


# --- the report --------------------------------------------------------------------------

def f(v, spec=".1f") -> str:
    return "–" if v is None else f"{v:{spec}}"


def ratio(a, b) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def size_label(size: int) -> str:
    if size >= 1_000_000:
        return f"{size // 1_000_000} MB"
    return f"{size // 1_000} KB"


def concurrency_table(rows) -> str:
    headers = ["mode", "clients", "msg/s py / Pf", "ratio", "p99 ms py / Pf",
               "smtpd USS MiB py / Pf (workers)", "ratio", "all USS MiB py / Pf",
               "failures py / Pf"]
    out = []
    for r in rows:
        a, b = r["postfix-py"], r["postfix"]
        out.append([
            r["mode"], r["clients"],
            f"{f(a['rate'], '.0f')} / {f(b['rate'], '.0f')}", ratio(a["rate"], b["rate"]),
            f"{f(a['p99_ms'])} / {f(b['p99_ms'])}",
            f"{f(a['smtpd_uss_mib'])} ({f(a['smtpd_workers'], '.0f')}) / "
            f"{f(b['smtpd_uss_mib'])} ({f(b['smtpd_workers'], '.0f')})",
            ratio(a["smtpd_uss_mib"], b["smtpd_uss_mib"]),
            f"{f(a['all_uss_mib'])} / {f(b['all_uss_mib'])}",
            f"{a['failures']} / {b['failures']}",
        ])
    return md_table(headers, out, align="lrrrrrrrr")


def size_table(rows) -> str:
    headers = ["size", "messages", "MB/s py / Pf", "ratio", "smtpd RSS HWM MiB py / Pf",
               "smtpd peak USS MiB py / Pf", "ratio", "all USS MiB py / Pf",
               "failures py / Pf"]
    out = []
    for r in rows:
        a, b = r["postfix-py"], r["postfix"]
        out.append([
            size_label(r["size"]), r["messages"],
            f"{f(a['mb_s'], '.2f')} / {f(b['mb_s'], '.2f')}", ratio(a["mb_s"], b["mb_s"]),
            f"{f(a['smtpd_hwm_mib'])} / {f(b['smtpd_hwm_mib'])}",
            f"{f(a['smtpd_max_uss_mib'])} / {f(b['smtpd_max_uss_mib'])}",
            ratio(a["smtpd_max_uss_mib"], b["smtpd_max_uss_mib"]),
            f"{f(a['all_uss_mib'])} / {f(b['all_uss_mib'])}",
            f"{a['failures']} / {b['failures']}",
        ])
    return md_table(headers, out, align="lrrrrrrrr")


def per_worker(rows, system: str) -> list[float]:
    return [r[system]["smtpd_uss_mib"] / r[system]["smtpd_workers"] for r in rows
            if r[system]["smtpd_uss_mib"] and r[system]["smtpd_workers"]]


def concurrency_sentence(rows) -> str:
    """One sentence, from the numbers, on how rate and memory grow with the clients."""
    plain = [r for r in rows if r["mode"] == "plain"] or rows
    lo, hi = plain[0], plain[-1]
    parts = []
    for name, label in (("postfix-py", "postfix-py"), ("postfix", "Postfix")):
        a, b = lo[name], hi[name]
        pw = per_worker(rows, name)
        if not pw:
            parts.append(f"{label}: no memory figures")
            continue
        shape = ("a roughly constant" if max(pw) <= 1.5 * min(pw) else "a varying")
        parts.append(
            f"{label} went from {f(a['rate'], '.0f')} to {f(b['rate'], '.0f')} msg/s and its "
            f"smtpd memory from {f(a['smtpd_uss_mib'])} MiB ({f(a['smtpd_workers'], '.0f')} "
            f"workers) to {f(b['smtpd_uss_mib'])} MiB ({f(b['smtpd_workers'], '.0f')}), "
            f"{shape} {min(pw):.1f}–{max(pw):.1f} MiB USS per worker over all points")
    return (f"From {lo['clients']} to {hi['clients']} clients (plain) "
            + "; ".join(parts) + ".")


def size_sentence(rows) -> str:
    """One sentence, from the numbers, on whether memory grows with the message size."""
    lo, hi = rows[0], rows[-1]
    grow_mib = (hi["size"] - lo["size"]) / MIB
    parts, verdicts = [], []
    for name, label in (("postfix-py", "postfix-py"), ("postfix", "Postfix")):
        a, b = lo[name]["smtpd_max_uss_mib"], hi[name]["smtpd_max_uss_mib"]
        ta, tb = lo[name]["all_uss_mib"], hi[name]["all_uss_mib"]
        if a is None or b is None:
            parts.append(f"{label}: no memory figures")
            continue
        d = b - a
        flat = d < max(2.0, 0.05 * grow_mib)
        verdicts.append(flat)
        parts.append(f"{label}'s smtpd peak USS went from {a:.1f} to {b:.1f} MiB "
                     f"({d:+.1f} MiB; all processes {f(ta)} → {f(tb)} MiB)")
    if verdicts and all(verdicts):
        tail = ("smtpd memory stays bounded — both stream the message to the queue file, so "
                "it does not grow with the message size")
    elif verdicts and not any(verdicts):
        tail = "smtpd memory grows with the message size for both"
    else:
        tail = ("smtpd memory grows with the message size for "
                + " and ".join(lbl for (lbl, v) in zip(("postfix-py", "Postfix"), verdicts)
                               if not v) + " only")
    # Another daemon of the system may hold the message (e.g. to read its envelope): the
    # kernel's RSS high-water marks catch that even between two samples.
    for name, label in (("postfix-py", "postfix-py"), ("postfix", "Postfix")):
        a, b = lo[name]["hwm_by_name_mib"], hi[name]["hwm_by_name_mib"]
        growth = sorted(((b[n] - a[n], n) for n in a.keys() & b.keys() if n != "smtpd"),
                        reverse=True)
        if growth and growth[0][0] >= max(2.0, 0.05 * grow_mib):
            d, daemon = growth[0]
            tail += (f"; but {label}'s {daemon} reaches a {d:.1f} MiB higher RSS high-water "
                     f"mark at {size_label(hi['size'])} than at {size_label(lo['size'])}, "
                     f"i.e. it holds about {min(100, 100 * d / (hi['size'] / MIB)):.0f}% of "
                     "the message in memory at once")
    return (f"From {size_label(lo['size'])} to {size_label(hi['size'])} messages "
            + "; ".join(parts) + f": {tail}.")


def sample_cost(rows) -> str:
    """How much CPU the memory sampling took, in words."""
    ms = [r[s]["sample_ms"] for r in rows for s in SYSTEMS if r[s]["sample_ms"] is not None]
    pct = [r[s]["sampler_cpu_pct"] for r in rows for s in SYSTEMS
           if r[s]["sampler_cpu_pct"] is not None]
    if not ms or not pct:
        return "an unknown amount of CPU"
    return (f"{min(ms):.1f}–{max(ms):.1f} ms of CPU per sample, at most {max(pct):.0f}% of "
            "one core during a load")


def markdown(result: dict) -> str:
    conc, sizes = result["concurrency"], result["size"]
    text = [
        "## Scaling: concurrency and message size — `bench/scaling.py`",
        "",
        machine_description(),
        "",
        "```",
        result["command"],
        "```",
        "",
        f"{result['runs']} run(s) per point, medians; quick sweep: "
        f"{'yes' if result['quick'] else 'no'}; wall time {result['seconds'] / 60:.1f} min. "
        "Both systems as in `bench/compare.py` (loopback, chrooted smtpd, the same ECDSA "
        "certificate, `smtpd_tls_security_level = may`, ticket resumption, mail discarded "
        "after queueing), plus `default_process_limit = 100` and "
        "`message_size_limit = 20000000` on both. Every point starts both systems afresh and "
        "warms them up with one connection per client; the systems alternate and the one "
        "that goes first swaps every run. Memory is sampled with psutil during the load: "
        "*smtpd USS* is the peak of the summed unique set size of the service's smtpd "
        "processes (workers: their peak count), *all USS* the same over every process of "
        "the system (master and all daemons). Postfix's smtpd hands the message to "
        "`cleanup`, which writes the queue file, while postfix-py's smtpd writes it itself, "
        "so *all USS* is the fairer memory comparison. Ratios are postfix-py / Postfix. "
        f"Sampling cost the benchmark process {sample_cost(conc + sizes)}.",
        "",
        f"### Concurrency ({CONC_SIZE // 1000} KB messages, max(300, 10 × clients) per point, "
        f"memory sampled every {CONC_INTERVAL} s)",
        "",
        concurrency_table(conc),
        "",
        concurrency_sentence(conc),
        "",
        f"### Message size (one client, plain; memory sampled every "
        f"{int(SIZE_INTERVAL * 1000)} ms)",
        "",
        "MB/s counts message data accepted (10^6 bytes/s). *smtpd RSS HWM* is the largest "
        "kernel high-water mark of RSS (VmHWM, exact, over the process's life) and *smtpd "
        "peak USS* the largest sampled USS among the smtpd processes, i.e. of the one serving "
        "the connection; *all USS* is sampled, so a short peak of another daemon can fall "
        "between two samples (the sentence below checks every daemon's VmHWM instead).",
        "",
        size_table(sizes),
        "",
        size_sentence(sizes),
    ]
    return "\n".join(text) + "\n"


# --- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs per point (3; --quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="clients 1,10,50; sizes 1 KB,100 KB,10 MB; 1 run")
    p.add_argument("--write", metavar="FILE",
                   help="write the section between the scaling markers of FILE")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("scaling.py must run as root (it starts mail systems)", file=sys.stderr)
        return 2
    if not POSTFIX or not os.path.exists(MASTER_CF):
        print("Debian's postfix is needed (apt-get install postfix)", file=sys.stderr)
        return 2
    runs = args.runs or (1 if args.quick else 3)
    clients = CLIENTS_QUICK if args.quick else CLIENTS
    sizes = SIZES_QUICK if args.quick else SIZES
    conc_points = [{"mode": m, "clients": c, "messages": max(300, 10 * c), "size": CONC_SIZE}
                   for m in MODES for c in clients]
    size_points = [{"mode": "plain", "clients": 1, "size": s,
                    "messages": max(5, min(200, 20_000_000 // s))} for s in sizes]

    def progress(name, point, run, r):
        print(json.dumps({"system": name, "run": run, **{k: point[k] for k in point},
                          **{k: v for k, v in r.items() if k != "by_name"}}),
              file=sys.stderr, flush=True)

    t0 = time.monotonic()
    top = Path(tempfile.mkdtemp(prefix="pfx-scaling-"))
    os.chmod(top, 0o755)    # the systems' unprivileged users must reach their files
    try:
        cert = make_cert(top)
        conc = sweep(conc_points, runs, top, cert, CONC_INTERVAL, progress)
        size = sweep(size_points, runs, top, cert, SIZE_INTERVAL, progress)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    result = {"command": command_line(), "runs": runs, "quick": args.quick,
              "seconds": round(time.monotonic() - t0, 1),
              "concurrency": conc, "size": size}
    if args.json:
        print(json.dumps(result, indent=2))
    text = markdown(result)
    if args.write:
        write_section(args.write, "scaling", text)
        print(f"wrote the scaling section of {args.write}", file=sys.stderr)
    elif not args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
