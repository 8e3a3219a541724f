"""Long life: memory of every long-lived process of postfix-py over a long run of mail.

    .venv/bin/python bench/longlife.py --messages 200000 --write BENCHMARKS.md
    .venv/bin/python bench/longlife.py --messages 20000 --checkpoints 4      # a quick look

One postfix-py instance as bench/compare.py sets it up (chrooted smtpd and smtps, tlsmgr,
qmgr, discard, and anvil when postfix-py has it), fed without pauses by bench/smtp_load.py
with 8 clients, batches alternating between plain SMTP and STARTTLS with resumption, 5 KB
messages, one per connection. After each batch (one checkpoint per --messages/--checkpoints
messages) the RSS and USS of the master, qmgr, tlsmgr and anvil are sampled with psutil,
with the queue backlog (files in incoming/ and active/). The run never waits for the
queue to drain: qmgr works under load, as on a busy host.

anvil is in master.cf and counts every client (smtpd_client_event_limit_exceptions is
empty, so the loopback clients are not exempt, with limits high enough never to refuse).

The verdict per process compares its RSS at the last checkpoint with the one at half of the
run: "flat" when it grew by at most 2 MiB or 10%, whichever is larger. The first half is
warm-up: qmgr's RSS is the high-water mark of its active queue, which follows the largest
backlog the load builds (shown per checkpoint), so growth from the quarter mark is shown
too. With --write, the table goes between the `longlife` markers of the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import smtp_load  # noqa: E402
from peers import make_cert  # noqa: E402
from report import command_line, machine_description, md_table, write_section  # noqa: E402

LONG_LIVED = ("master", "qmgr", "tlsmgr", "anvil")


def processes(master_pid: int) -> dict[str, psutil.Process]:
    """The long-lived processes of an instance, by program name."""
    out = {"master": psutil.Process(master_pid)}
    for child in out["master"].children():
        try:
            title = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        for name in LONG_LIVED[1:]:
            if title.startswith(f"postfix-py/{name} "):
                out[name] = child
    return out


def sample(master_pid: int) -> dict:
    """RSS and USS in MiB of each long-lived process."""
    figures = {}
    for name, proc in processes(master_pid).items():
        try:
            mem = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        figures[name] = {"rss": mem.rss / 1048576, "uss": mem.uss / 1048576, "pid": proc.pid}
    return figures


def backlog(queue: Path) -> int:
    return sum(1 for sub in ("incoming", "active") if (queue / sub).is_dir()
               for name in (queue / sub).iterdir() if not name.name.startswith("."))


def run(messages: int, checkpoints: int, clients: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pfx-longlife-", dir="/tmp"))
    tmp.chmod(0o755)
    cert = make_cert(tmp)
    inst = compare.PyInstance(tmp / "py", cert)
    try:
        import postfix_py.anvil.service  # noqa: F401
        with open(inst.dir / "master.cf", "a") as f:
            f.write("anvil unix - - y - 1 anvil\n")
        with open(inst.dir / "main.cf", "a") as f:
            f.write("smtpd_client_event_limit_exceptions =\n"
                    "smtpd_client_connection_count_limit = 1000\n"
                    "smtpd_client_connection_rate_limit = 1000000\n"
                    "smtpd_client_message_rate_limit = 1000000\n")
    except ImportError:
        pass
    inst.start()
    rows, started = [], time.monotonic()
    try:
        compare._wait_accepting(inst.port)
        pid = inst.master_pid()
        per = messages // checkpoints
        sent = 0
        for i in range(checkpoints):
            mode = "plain" if i % 2 == 0 else "starttls-resume"
            args = argparse.Namespace(host="127.0.0.1", port=inst.port, mode=mode,
                                       clients=clients, messages=per, size=5000,
                                       deadline=3600)
            result = smtp_load.run(args)
            sent += result["messages"]
            rows.append({"messages": sent, "failures": result["failures"],
                         "rate": result["rate"], "backlog": backlog(inst.queue),
                         "elapsed": round(time.monotonic() - started),
                         "processes": sample(pid)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        inst.stop()
    return {"rows": rows, "clients": clients}


def verdicts(rows: list[dict]) -> dict[str, str]:
    """flat / grows, per process: RSS at the end against RSS at half of the run (and,
    for the record, the growth since a quarter of the run)."""
    out = {}
    quarter = rows[max(0, len(rows) // 4 - 1)]
    half = rows[max(0, len(rows) // 2 - 1)]
    last = rows[-1]
    for name in LONG_LIVED:
        q = quarter["processes"].get(name, {}).get("rss")
        a = half["processes"].get(name, {}).get("rss")
        b = last["processes"].get(name, {}).get("rss")
        if a is None or b is None:
            continue
        growth = b - a
        flat = growth <= max(2.0, 0.10 * a)
        out[name] = (f"{'flat' if flat else 'GROWS'} ({growth:+.1f} MiB since half of the "
                     f"run, {b - q:+.1f} since a quarter)" if q is not None else
                     f"{'flat' if flat else 'GROWS'} ({growth:+.1f} MiB)")
    return out


def markdown(result: dict) -> str:
    rows = result["rows"]
    present = [n for n in LONG_LIVED if any(n in r["processes"] for r in rows)]
    headers = ["messages", "elapsed s", "msg/s", "backlog"] + \
        [f"{n} RSS / USS MiB" for n in present]
    table = []
    for r in rows:
        cells = [f"{r['messages']:,}", r["elapsed"], f"{r['rate']:.0f}", r["backlog"]]
        for n in present:
            p = r["processes"].get(n)
            cells.append(f"{p['rss']:.1f} / {p['uss']:.1f}" if p else "–")
        table.append(cells)
    v = verdicts(rows)
    lines = [f"Command: `{command_line()}`", "",
             f"{machine_description()}; {result['clients']} clients, 5 KB messages, "
             "plain and STARTTLS batches alternating, mail discarded after queueing; "
             "the queue is never drained between batches.", "",
             md_table(headers, table), "",
             f"Largest backlog: {max(r['backlog'] for r in rows):,} messages. "
             "RSS at the end against half of the run: " +
             ", ".join(f"{n} {t}" for n, t in v.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=200000)
    p.add_argument("--checkpoints", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--write", metavar="FILE")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = run(a.messages, a.checkpoints, a.clients)
    if a.json:
        print(json.dumps(result, indent=2))
    text = markdown(result)
    print(text)
    if a.write:
        write_section(a.write, "longlife", "### Long life\n\n" + text)
    return 0 if all(t.startswith("flat") for t in verdicts(result["rows"]).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
