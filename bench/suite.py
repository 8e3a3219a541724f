"""All side-by-side benchmarks in one command: postfix-py against a private Debian Postfix.

    .venv/bin/python bench/suite.py                          # 3 runs, print the markdown
    .venv/bin/python bench/suite.py --runs 3 --write BENCHMARKS.md
    .venv/bin/python bench/suite.py --quick                  # a smoke test, about 2 minutes
    .venv/bin/python bench/suite.py --parts delivery,master --json

Parts (all by default, in this order):
  acceptance  5 KB messages, one per connection, modes plain, starttls, starttls-resume
              and smtps at 1, 8 and 32 clients (bench/compare.py's instances and load);
              the systems alternate run after run; medians of rate, p50/p99, resumed share
  delivery    a queued batch emptied to one TLS destination with the client session cache
              on (bench/delivery_compare.py's senders and rounds), msg/s and % resumed
  tlsmgr      postfix-py's tlsmgr, cache lookups from 16 client processes
              (bench/tlsmgr_bench.py); Postfix's tlsmgr cannot be queried this way
  master      `start` until the SMTP port listens (both systems with the same services),
              and the USS of an smtpd worker in the
              middle of a session, both systems (bench/master_bench.py's measure)

The report is a markdown section: the machine, the date, the command line, the number of
runs, then tables of medians with the ratio postfix-py / Postfix, the target of each row
and whether it was met. With --write FILE it replaces the text between
`<!-- suite:begin -->` and `<!-- suite:end -->` in FILE (appending the markers when
absent); without it the section goes to stdout. --json dumps the raw results to stdout.

Needs root and Debian's postfix (exit code 2 otherwise). Every instance started is stopped,
by its master's pid when `stop` is not enough, and its directory removed. Exit code 1 when
a part failed (the section then says which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from report import (command_line, fmt, machine_description, md_table, median,  # noqa: E402
                    pct, ratio, verdict, write_section)

PARTS = ("acceptance", "delivery", "tlsmgr", "master")
MODES = ("plain", "starttls", "starttls-resume", "smtps")

# Targets: the minimum ratio postfix-py / Postfix of the acceptance rate per mode, and
# whether the mode offers the previous TLS session (then at least 99% must be resumed).
ACCEPT_TARGET = {"plain": 0.7, "starttls": 0.9, "starttls-resume": 0.8, "smtps": 0.8}
RESUMED_TARGET = 0.99
DELIVERY_RATIO_TARGET = 0.7
DELIVERY_RESUMED_TARGET = 0.95
TLSMGR_LOOKUPS_TARGET = 20000           # lookups/s from 16 clients (issue 4)
TLSMGR_P99_TARGET_US = 2000             # and p99 under 2 ms
BUSY_USS_TARGET = 2.5                   # MiB, postfix-py's busy smtpd worker (issue 14)
INSTANCE_USS_RATIO = 2.0                # the whole idle instance, at most this x Postfix's
TLSMGR_CLIENTS = 16


def log(msg) -> None:
    if not isinstance(msg, str):
        msg = json.dumps(msg, default=str)
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM arrived: unwind so that every finally block stops what it started (a
    BaseException, so that no `except Exception` on the way swallows it)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # a second one must not cut the clean-up
    raise Terminated(f"signal {signum}")


# --- the parts -------------------------------------------------------------------------------

def run_acceptance(args) -> dict:
    import compare
    rows = compare.matrix(args.modes, args.clients, args.runs, args.messages, progress=log)
    return {"messages": args.messages, "rows": rows}


def run_delivery(args) -> dict:
    import delivery_compare
    rows, raw = delivery_compare.compare(args.delivery_messages, args.runs, caches=(True,),
                                         loglevel=2, timeout=args.delivery_timeout,
                                         progress=log)
    return {"messages": args.delivery_messages, "row": rows[0],
            "runs": {f"{name} cache={'on' if c else 'off'}": rs
                     for (name, c), rs in raw.items()}}


def run_tlsmgr(args) -> dict:
    import tlsmgr_bench
    got = tlsmgr_bench.measure(cases=("lookup",), clients=(TLSMGR_CLIENTS,),
                               duration=args.tlsmgr_duration, runs=args.runs, raw=False,
                               progress=log)
    return {"duration": args.tlsmgr_duration, "row": got["tlsmgr"][0]}


def run_master(args) -> dict:
    import master_bench
    top = Path(tempfile.mkdtemp(prefix="pfx-suite-master-"))
    os.chmod(top, 0o755)   # the peers' unprivileged users must reach their files
    systems = ["postfix-py", "postfix"]
    got = {s: [] for s in systems}
    try:
        for run in range(args.runs):
            for system in (systems if run % 2 == 0 else systems[::-1]):
                r = master_bench.measure(system, top / f"{system}-{run}")
                got[system].append(r)
                log({"run": run + 1, "system": system,
                     **{k: round(v, 3) for k, v in r.items()}})
    finally:
        shutil.rmtree(top, ignore_errors=True)
    med = {s: {k: median(r[k] for r in rs) for k in rs[0]} for s, rs in got.items()}
    return {"median": med, "runs": got}


RUNNERS = {"acceptance": run_acceptance, "delivery": run_delivery, "tlsmgr": run_tlsmgr,
           "master": run_master}


# --- the report --------------------------------------------------------------------------------

class Tally:
    def __init__(self):
        self.met, self.missed = 0, []

    def __call__(self, what: str, result: str) -> str:
        if result == "met":
            self.met += 1
        elif result.startswith("missed"):
            self.missed.append(what)
        return result


def _ms(d) -> str:
    if d["p50_ms"] is None:
        return "–"
    return f"{d['p50_ms']:.1f} / {d['p99_ms']:.1f}"


def acceptance_md(res: dict, runs: int, tally: Tally) -> str:
    rows, failures = [], []
    for r in res["rows"]:
        a, b = r["postfix-py"], r["postfix"]
        target = ACCEPT_TARGET.get(r["mode"])
        offers = a["resumed"] is not None
        tgt_text = f"≥ {target}" + (f", ≥ {RESUMED_TARGET:.0%} resumed" if offers else "")
        why = []
        if verdict(r["ratio"], target) != "met":
            why.append("rate")
        if offers and verdict(a["resumed"], RESUMED_TARGET) != "met":
            why.append("resumption")
        if a["failures"]:
            why.append(f"{a['failures']} failed")
        result = "met" if not why else f"missed ({', '.join(why)})"
        tally(f"acceptance {r['mode']} at {r['clients']} client"
              f"{'s' if r['clients'] != 1 else ''}", result)
        res_text = f"{pct(a['resumed'])} / {pct(b['resumed'])}" if offers else ""
        rows.append([r["mode"], r["clients"], fmt(a["rate"]), fmt(b["rate"]),
                     fmt(r["ratio"], ".2f"), _ms(a), _ms(b), res_text, tgt_text, result])
        if a["failures"] or b["failures"]:
            failures.append(f"{r['mode']} at {r['clients']} clients: {a['failures']} "
                            f"(postfix-py) / {b['failures']} (Postfix)")
    text = [
        "### Accepting mail (smtpd)",
        "",
        f"One {5000 // 1000} KB message per connection (connect, EHLO, [STARTTLS, EHLO], MAIL, "
        f"RCPT, DATA, QUIT), {res['messages']} messages per run and system, clients are "
        "processes (`bench/smtp_load.py`, stdlib ssl). Both systems: a chrooted smtpd and an "
        "smtps service on loopback, the same ECDSA certificate, `smtpd_tls_security_level = "
        "may`, resumption by session tickets, mail discarded after queueing. "
        "After 40 untimed messages per system over plain SMTP and over smtps, "
        f"medians of {runs} run{'s' if runs != 1 else ''}, the systems alternating, each run "
        "starting once both queues have drained; "
        "\"resumed\" is the share of offered sessions that the server resumed (smtps offers "
        "the previous session too, so it is held to the resumed targets).",
        "",
        md_table(["mode", "clients", "postfix-py msg/s", "Postfix msg/s", "ratio",
                  "postfix-py p50 / p99 ms", "Postfix p50 / p99 ms", "resumed (py / Postfix)",
                  "target", "result"], rows,
                 align="lrrrrrrrll"),
    ]
    if failures:
        text += ["", "Failed sessions: " + "; ".join(failures) + "."]
    return "\n".join(text)


def delivery_md(res: dict, runs: int, tally: Tally) -> str:
    r = res["row"]
    a, b = r["postfix-py"], r["postfix"]
    rate_result = tally("delivery msg/s", verdict(r["ratio"], DELIVERY_RATIO_TARGET))
    res_result = tally("delivery resumed", verdict(a["resumed"], DELIVERY_RESUMED_TARGET))
    rows = [
        ["msg/s, release to last `status=sent`", fmt(a["rate"]), fmt(b["rate"]),
         fmt(r["ratio"], ".2f"), f"≥ {DELIVERY_RATIO_TARGET}", rate_result],
        ["msg/s, first to last `status=sent`", fmt(a["steady"]), fmt(b["steady"]),
         fmt(r["steady_ratio"], ".2f"), "", ""],
        ["TLS handshakes resumed", pct(a["resumed"]), pct(b["resumed"]), "",
         f"≥ {DELIVERY_RESUMED_TARGET:.0%} (postfix-py)", res_result],
        ["TLS handshakes per round", fmt(a["handshakes"]), fmt(b["handshakes"]), "", "", ""],
        ["not sent (all rounds)", a["failed"], b["failed"], "", "", ""],
    ]
    return "\n".join([
        "### Delivery (smtp) with the TLS session cache",
        "",
        f"{res['messages']} queued messages of 5 KB per round emptied by each whole mail "
        "system (`bench/delivery_compare.py`: postfix-py's master, smtpd, qmgr, smtp, tlsmgr; "
        "a second private Debian Postfix with its defaults) to one TLS destination, a private "
        "Debian Postfix on loopback that discards; `smtp_tls_security_level = may`, "
        "`smtp_tls_loglevel = 2`, session cache `lmdb:` / `btree:${data_directory}/"
        "smtp_scache`. Mail is submitted while delivery is held, put on hold, then released "
        "by `postsuper -H ALL` and `postqueue -f`; the clock runs from the release to the "
        f"last `status=sent` log line. Medians of {runs} round{'s' if runs != 1 else ''} "
        "per system, alternating, after a 20-message warm-up.",
        "",
        md_table(["measure", "postfix-py", "Postfix", "ratio", "target", "result"], rows,
                 align="lrrrll"),
    ])


def tlsmgr_md(res: dict, runs: int, tally: Tally) -> str:
    r = res["row"]
    rate_result = tally("tlsmgr lookups/s", verdict(r["rps"], TLSMGR_LOOKUPS_TARGET))
    p99_result = tally("tlsmgr p99", verdict(r["p99_us"], TLSMGR_P99_TARGET_US, higher=False))
    pf = "not measured¹"
    rows = [
        [f"cache lookups (hits) per second, {TLSMGR_CLIENTS} clients", fmt(r["rps"], ",.0f"),
         pf, f"≥ {TLSMGR_LOOKUPS_TARGET:,}/s", rate_result],
        ["lookup latency p50", fmt(r["p50_us"], ",.0f", " µs"), pf, "", ""],
        ["lookup latency p99", fmt(r["p99_us"], ",.0f", " µs"), pf,
         f"< {TLSMGR_P99_TARGET_US / 1000:g} ms", p99_result],
    ]
    return "\n".join([
        "### tlsmgr (postfix-py only)",
        "",
        f"A private postfix-py tlsmgr with 1,000 cached 1,500-byte sessions; {TLSMGR_CLIENTS} "
        "client processes, each on one connection to its unix socket, doing lookup after "
        f"lookup for {res['duration']:g} s (`bench/tlsmgr_bench.py`); median of {runs} "
        f"run{'s' if runs != 1 else ''}.",
        "",
        md_table(["measure", "postfix-py", "Postfix", "target", "result"], rows,
                 align="lrrll"),
        "",
        "¹ Postfix's tlsmgr cannot be queried this way: it speaks Postfix's own attribute "
        "encoding on its private socket and is reached only through its daemons, while this "
        "client speaks postfix-py's length-prefixed frames.",
    ])


def master_md(res: dict, runs: int, tally: Tally) -> str:
    a, b = res["median"]["postfix-py"], res["median"]["postfix"]
    busy_result = tally("busy smtpd USS", verdict(a["busy_uss"], BUSY_USS_TARGET, higher=False))
    rows = [
        ["`start` until the SMTP port listens", fmt(a["start"], ".2f", " s"),
         fmt(b["start"], ".2f", " s"), fmt(ratio(a["start"], b["start"]), ".2f"), "", ""],
        ["USS of a busy smtpd worker (mid-transaction, after a message)",
         fmt(a["busy_uss"], ".1f", " MiB"), fmt(b["busy_uss"], ".1f", " MiB"),
         fmt(ratio(a["busy_uss"], b["busy_uss"]), ".2f"),
         f"≤ {BUSY_USS_TARGET:g} MiB (postfix-py)", busy_result],
        ["USS of an idle smtpd worker", fmt(a["idle_uss"], ".1f", " MiB"),
         fmt(b["idle_uss"], ".1f", " MiB"), fmt(ratio(a["idle_uss"], b["idle_uss"]), ".2f"),
         "", ""],
    ]
    if "instance_uss" in a and "instance_uss" in b:
        r = ratio(a["instance_uss"], b["instance_uss"])
        rows.append([
            "USS of the whole idle instance (all its processes, after start)",
            f"{fmt(a['instance_uss'], '.1f', ' MiB')} ({fmt(a['procs'], '.0f')})",
            f"{fmt(b['instance_uss'], '.1f', ' MiB')} ({fmt(b['procs'], '.0f')})",
            fmt(r, ".2f"), f"≤ {INSTANCE_USS_RATIO:g}× Postfix",
            tally("idle instance USS", verdict(r, INSTANCE_USS_RATIO, higher=False))])
    import master_bench
    rows.insert(0, ["services in master.cf", fmt(a.get("services")), fmt(b.get("services")),
                    "", "", ""])
    return "\n".join([
        "### The master: start time and worker memory",
        "",
        "A fresh instance of each system, its smtp service on a loopback port "
        "(`bench/master_bench.py`): the time from `start` until the port listens, then the "
        "unique set size (psutil) of smtpd workers, idle and in the middle of a session after "
        "one 5 KB message, and of the whole instance (every process, their count in "
        f"parentheses) before the first client. Medians of {runs} run{'s' if runs != 1 else ''}, alternating. "
        + master_bench.services_note(),
        "",
        md_table(["measure", "postfix-py", "Postfix", "ratio", "target", "result"], rows,
                 align="lrrrll"),
    ])


RENDER = {"acceptance": acceptance_md, "delivery": delivery_md, "tlsmgr": tlsmgr_md,
          "master": master_md}


def render(results: dict, errors: dict, args, started: float, elapsed: float) -> str:
    tally = Tally()
    body = []
    for part in args.parts:
        if part in results:
            body.append(RENDER[part](results[part], args.runs, tally))
        elif part in errors:
            body.append(f"### {part}\n\nNot measured: this part failed — {errors[part]}")
    summary = f"Targets: {tally.met} met, {len(tally.missed)} missed"
    summary += (" (" + "; ".join(tally.missed) + ")." if tally.missed else ".")
    if errors:
        summary += " Failed parts: " + ", ".join(errors) + "."
    head = [
        "## Burst figures, queues drained between runs — `bench/suite.py`",
        "",
        "Short bursts (a fixed number of messages per run), each run starting once both "
        "systems' queues have drained, so work a queue manager has left over falls outside "
        "the timed runs: these figures show the SMTP servers, the sustained table above "
        "(`bench/sustained.py`) the whole pipeline under continuous load.",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_description(),
        "",
        f"Took {elapsed / 60:.1f} min; {args.runs} run{'s' if args.runs != 1 else ''} "
        "per measurement, postfix-py and a private Debian Postfix started side by side on "
        "loopback, alternating run by run. Ratios are postfix-py / Postfix. "
        + ("A quick smoke run (--quick): small counts, not for conclusions. " if args.quick
           else "")
        + "Other processes may share the machine, so absolute rates are noisy; the ratios "
        "come from the same conditions for both systems.",
        "",
        summary,
    ]
    return "\n".join(head + [""] + ["\n\n".join(body)]) + "\n"


# --- the command -------------------------------------------------------------------------------

def preflight() -> str | None:
    """Why the suite cannot run here, or None."""
    if os.geteuid() != 0:
        return "bench/suite.py must run as root (the mail systems chroot and change users)"
    from peers import POSTFIX, MASTER_CF
    if not POSTFIX:
        return "Debian's postfix is not installed (apt-get install postfix)"
    if not os.path.exists(MASTER_CF):
        return f"{MASTER_CF} is missing: Debian's postfix package is not fully installed"
    if not os.access(str(Path(sys.executable).parent / "postfix-py"), os.X_OK):
        return (f"postfix-py is not installed next to {sys.executable} "
                "(run the suite with the project's venv: .venv/bin/python bench/suite.py)")
    for mod in ("psutil", "lmdb", "postfix_py"):
        try:
            __import__(mod)
        except ImportError as exc:
            return f"a module is missing: {exc}"
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs per measurement (3; --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test: 1 run, 100 messages, clients 1 and 8, short tlsmgr run")
    p.add_argument("--write", metavar="FILE",
                   help="put the section between <!-- suite:begin/end --> in FILE")
    p.add_argument("--json", action="store_true", help="dump the raw results to stdout")
    p.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    p.add_argument("--modes", default=",".join(MODES), help="acceptance modes")
    p.add_argument("--clients", default=None, help="acceptance client counts (1,8,32)")
    p.add_argument("--messages", type=int, default=None,
                   help="acceptance messages per run and system (300)")
    p.add_argument("--delivery-messages", type=int, default=None,
                   help="queued messages per delivery round (500)")
    p.add_argument("--delivery-timeout", type=float, default=180.0,
                   help="seconds allowed per delivery round")
    p.add_argument("--tlsmgr-duration", type=float, default=None,
                   help="seconds per tlsmgr run (3)")
    args = p.parse_args(argv)
    q = args.quick
    args.runs = args.runs if args.runs is not None else (1 if q else 3)
    args.clients = [int(c) for c in (args.clients or ("1,8" if q else "1,8,32")).split(",")]
    args.messages = args.messages or (100 if q else 300)
    args.delivery_messages = args.delivery_messages or (100 if q else 500)
    args.tlsmgr_duration = args.tlsmgr_duration or (1.0 if q else 3.0)
    args.modes = [m for m in args.modes.split(",") if m]
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in args.parts if x not in PARTS] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown part or mode: {', '.join(bad)}")
    if args.runs < 1 or args.messages < 1 or args.delivery_messages < 1 or not args.clients:
        p.error("--runs, --messages, --delivery-messages and --clients must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = preflight()
    if why:
        print(f"suite: {why}", file=sys.stderr)
        return 2
    if args.write and not Path(args.write).parent.is_dir():
        print(f"suite: cannot write {args.write}: no such directory", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    t0 = time.monotonic()
    results, errors = {}, {}
    try:
        for part in args.parts:
            log(f"{part}: starting")
            t = time.monotonic()
            try:
                results[part] = RUNNERS[part](args)
            except (KeyboardInterrupt, Terminated):
                raise
            except Exception as exc:  # noqa: BLE001 - report it and go on with the others
                errors[part] = f"{type(exc).__name__}: {exc}".strip()
                log(f"{part}: FAILED: {errors[part]}")
            else:
                log(f"{part}: done in {time.monotonic() - t:.0f} s")
    except (KeyboardInterrupt, Terminated) as exc:
        print(f"suite: interrupted ({exc or 'Ctrl-C'}); every instance was stopped",
              file=sys.stderr)
        return 130
    elapsed = time.monotonic() - t0
    text = render(results, errors, args, started, elapsed)
    if args.write:
        write_section(args.write, "suite", text)
        log(f"wrote the suite section of {args.write}")
    if args.json:
        print(json.dumps({"args": {k: v for k, v in vars(args).items()},
                          "results": results, "errors": errors}, indent=2, default=str))
    elif not args.write:
        print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
