"""Delivery side by side: postfix-py and Debian's Postfix emptying a full queue to one TLS destination.

    python bench/delivery_compare.py                  # 500 messages, cache on and off, 3 runs
    python bench/delivery_compare.py -n 300 --runs 5 --loglevel 2

One destination: a private Debian Postfix on loopback (tests/peers.py) with a certificate,
`smtpd_tls_security_level = may`, discarding what it accepts. Two senders, each a full mail
system on loopback relaying everything to `[127.0.0.1]:DESTPORT` with
`smtp_tls_security_level = may`:

    postfix-py  master + smtpd + qmgr + smtp (chroot) + tlsmgr, session cache
                `lmdb:${data_directory}/smtp_scache` (on) or empty (off)
    Postfix     a second private Debian Postfix, `btree:${data_directory}/smtp_scache` or
                empty; Postfix's defaults otherwise (it does not reuse TLS connections
                without smtp_tls_connection_reuse, so both do one handshake a message)

For every round the sender's queue is filled with N messages of 5 KB through its own smtpd
(bench/smtp_load.py, plain SMTP) while delivery is held: Postfix with
`defer_transports = smtp` (qmgr moves them to deferred/); postfix-py with no qmgr in
master.cf (smtpd commits to incoming/ and nothing picks the files up). Then, off the
clock, each system's own postsuper puts them on hold (`postsuper -h ALL`) and delivery is
turned back on (Postfix: `postconf -e defer_transports=`, `postfix reload`; postfix-py:
qmgr back in master.cf, `postfix-py reload`), so that no reload is timed. The timed
release is the same for both: `postsuper -H ALL` then `postqueue -f`, and the clock stops
when the sender's log holds N `status=sent` lines.

The clock starts before the release commands (msg/s = N / that time); a second rate runs
from the first `status=sent` line seen to the last, leaving out the release itself
(postsuper and postqueue, the queue scan, qmgr's first deliveries). Handshakes and
resumptions are counted in the sender's log at `smtp_tls_loglevel = 2` by default (both log `TLS connection
established to` for each handshake and `Reusing old session` for each resumed one;
Postfix logs the latter only at level 2). Rounds alternate the systems and the cache
setting; the table shows medians over --runs and the ratio postfix-py / Postfix.

Needs root and Debian's postfix. Every instance it starts is stopped (by its master's pid
when `stop` is not enough) and its directories are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
POSTCONF = shutil.which("postconf", path="/usr/sbin:/usr/bin") or "postconf"
POSTQUEUE = shutil.which("postqueue", path="/usr/sbin:/usr/bin") or "postqueue"
POSTSUPER = shutil.which("postsuper", path="/usr/sbin:/usr/bin") or "postsuper"
POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin") or "postfix"
SIZE = 5 * 1024


def count_files(directory: Path) -> int:
    n = 0
    for _, _, files in os.walk(directory):
        n += sum(1 for f in files if not f.startswith("."))
    return n


def wait_until(cond, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise RuntimeError(f"timed out waiting for {what}")


class LogTail:
    """Reads what a log file gained since a mark, incrementally (whole lines only)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = self.pos = 0
        self.partial = b""

    def mark(self) -> None:
        try:
            self.offset = self.path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self.pos, self.partial = self.offset, b""

    def new_lines(self) -> str:
        """Complete lines added since the previous call (or the mark)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return ""
        self.pos += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode("utf-8", "replace")

    def since(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class Sender:
    name = ""

    def submit(self, n: int) -> None:
        """Fill the queue with n messages while delivery is held."""
        r = smtp_load.run(argparse.Namespace(host="127.0.0.1", port=self.port, mode="plain",
                                             clients=4, messages=n, size=SIZE))
        if r["failures"]:
            raise RuntimeError(f"{self.name}: {r['failures']} submissions failed")


class PySender(Sender):
    name = "postfix-py"

    def __init__(self, root: Path, dport: int, loglevel: int):
        self.dir = root
        self.port = free_port()
        self.dport, self.loglevel = dport, loglevel
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        self.queue = root / "queue"
        self.log = LogTail(root / "maillog")

    def configure(self, cache: bool, qmgr: bool) -> None:
        root = self.dir
        db = "lmdb:${data_directory}/smtp_scache" if cache else ""
        (root / "main.cf").write_text(
            f"queue_directory = {root}/queue\ndata_directory = {root}/data\n"
            f"mail_owner = nobody\nmaillog_file = {root}/maillog\n"
            f"inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
            f"myhostname = sender.py.test\n"
            f"mydestination = $myhostname, localhost\nmynetworks = 127.0.0.0/8\n"
            f"relayhost = [127.0.0.1]:{self.dport}\ndefault_transport = smtp\n"
            f"smtp_tls_security_level = may\nsmtp_tls_loglevel = {self.loglevel}\n"
            f"smtp_tls_session_cache_database = {db}\n")
        lines = [f"127.0.0.1:{self.port} inet n - y - - smtpd",
                 "tlsmgr unix - - y 1000? 1 tlsmgr",
                 "smtp unix - - y - - smtp"]
        if qmgr:
            lines.append("qmgr unix n - n 300 1 qmgr")
        (root / "master.cf").write_text("\n".join(lines) + "\n")

    def _cli(self, *args) -> None:
        out = subprocess.run([POSTFIX_PY, "-c", str(self.dir), *args], capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"postfix-py {' '.join(args)}: {out.stderr.strip()}")

    def start(self) -> None:
        self.configure(cache=True, qmgr=False)
        self._cli("start")
        wait_until(self._listening, 20, "postfix-py smtpd")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def hold(self, cache: bool) -> None:
        self.configure(cache, qmgr=False)
        self._cli("reload")
        wait_until(lambda: not _connects(self.queue / "public" / "qmgr"), 20,
                   "postfix-py qmgr to go")

    def queued(self) -> int:
        return count_files(self.queue / "incoming")

    def park(self, cache: bool) -> None:
        """Submitted mail to hold/, then qmgr back (off the clock)."""
        self._cli("postsuper", "-h", "ALL")
        self.configure(cache, qmgr=True)
        self._cli("reload")
        wait_until(lambda: _connects(self.queue / "public" / "qmgr"), 20, "postfix-py qmgr")
        time.sleep(0.5)

    def parked(self) -> int:
        return count_files(self.queue / "hold")

    def release(self, cache: bool) -> None:
        self._cli("postsuper", "-H", "ALL")
        self._cli("postqueue", "-f")

    def pending(self) -> int:
        return sum(count_files(self.queue / d) for d in ("incoming", "active", "deferred"))

    def master_pid(self) -> int | None:
        for name in ("pid/master.pid", "master.pid"):
            try:
                return int((self.queue / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return None

    def stop(self) -> None:
        pid = self.master_pid()
        subprocess.run([POSTFIX_PY, "-c", str(self.dir), "stop"], capture_output=True,
                       timeout=60)
        reap(pid)


class PfSender(Sender):
    name = "postfix"

    def __init__(self, root: Path, dport: int, loglevel: int):
        self.port = free_port()
        self.peer = PostfixPeer(self.port, directory=root, main={
            "myhostname": "sender.pf.test", "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{dport}", "default_transport": "smtp",
            "relay_transport": "smtp", "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": str(loglevel),
            "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
            "defer_transports": "smtp"})
        self.dir = root
        self.queue = root / "queue"
        self.log = LogTail(root / "maillog")

    def start(self) -> None:
        self.peer.start()

    def _postconf(self, setting: str) -> None:
        subprocess.run([POSTCONF, "-c", str(self.dir), "-e", setting], check=True,
                       capture_output=True, timeout=60)

    def _reload(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.dir), "reload"], check=True,
                       capture_output=True, timeout=60)

    def hold(self, cache: bool) -> None:
        db = "btree:${data_directory}/smtp_scache" if cache else ""
        self._postconf(f"smtp_tls_session_cache_database={db}")
        self._postconf("defer_transports=smtp")
        self._reload()
        time.sleep(1.0)         # the new qmgr and smtp processes

    def queued(self) -> int:
        # Held messages have gone through qmgr to deferred/ (defer_transports).
        if count_files(self.queue / "incoming") or count_files(self.queue / "active"):
            return 0
        return count_files(self.queue / "deferred")

    def park(self, cache: bool) -> None:
        """Deferred mail to hold/, then delivery back on (off the clock)."""
        subprocess.run([POSTSUPER, "-c", str(self.dir), "-h", "ALL", "deferred"], check=True,
                       capture_output=True, timeout=60)
        self._postconf("defer_transports=")
        self._reload()
        time.sleep(1.0)

    def parked(self) -> int:
        return count_files(self.queue / "hold")

    def release(self, cache: bool) -> None:
        subprocess.run([POSTSUPER, "-c", str(self.dir), "-H", "ALL"], check=True,
                       capture_output=True, timeout=60)
        subprocess.run([POSTQUEUE, "-c", str(self.dir), "-f"], check=True,
                       capture_output=True, timeout=60)

    def pending(self) -> int:
        return sum(count_files(self.queue / d) for d in ("incoming", "active", "deferred"))

    def stop(self) -> None:
        self.peer.stop()


def _connects(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def one_round(s: Sender, cache: bool, n: int, timeout: float) -> dict:
    s.hold(cache)
    s.submit(n)
    wait_until(lambda: s.queued() >= n, 60, f"{s.name}: {n} submitted messages", 0.1)
    s.park(cache)
    wait_until(lambda: s.parked() >= n, 60, f"{s.name}: {n} messages on hold", 0.1)
    s.log.mark()
    start = time.monotonic()
    s.release(cache)
    sent = failed = 0
    first = None
    deadline = start + timeout
    while time.monotonic() < deadline:
        text = s.log.new_lines()
        sent += text.count("status=sent")
        failed += text.count("status=bounced") + text.count("status=deferred")
        if sent and first is None:
            first, first_sent = time.monotonic(), sent
        if sent + failed >= n:
            break
        time.sleep(0.02)
    end = time.monotonic()
    elapsed = end - start
    time.sleep(0.3)             # the last log lines
    text = s.log.since()
    handshakes = len(re.findall(r"TLS connection established to ", text))
    resumed = len(re.findall(r": Reusing old session", text))
    reasons = re.findall(r"status=(?:deferred|bounced) \(([^)]*)", text)[:3]
    if sent + failed < n:
        raise RuntimeError(f"{s.name}: only {sent} of {n} sent after {timeout:.0f}s "
                           f"({s.pending()} pending)")
    # From the first `status=sent` seen to the last: the rate without the release itself.
    steady = ((sent - first_sent) / (end - first)
              if first is not None and sent > first_sent and end > first else 0.0)
    return {"rate": sent / elapsed, "steady": steady, "elapsed": elapsed, "sent": sent,
            "failed": failed,            "handshakes": handshakes, "resumed": resumed,
            "resumed_share": resumed / handshakes if handshakes else 0.0,
            "reasons": reasons}


def compare(messages: int, runs: int, caches=(True, False), loglevel: int = 2,
            timeout: float = 120.0, keep: bool = False, progress=None) -> tuple[list, dict]:
    """Start the destination and both senders, run `runs` rounds of `messages` per system
    and cache setting (alternating), stop everything (always) and return (rows, raw):
    rows hold one dict per cache setting with medians per system and the ratios; raw maps
    (system, cache) to the list of one_round results."""
    top = Path(tempfile.mkdtemp(prefix="pfx-delivery-compare-"))
    os.chmod(top, 0o755)
    started = []
    senders = []
    got = {}
    try:
        cert = make_cert(top)
        dport = free_port()
        dest = PostfixPeer(dport, directory=top / "dest", main={
            "myhostname": "dest.pf.test", "mynetworks": "127.0.0.0/8",
            "smtpd_tls_cert_file": str(cert), "smtpd_tls_security_level": "may",
            "smtpd_tls_loglevel": "1"})
        senders = [PySender(top / "py", dport, loglevel),
                   PfSender(top / "pf", dport, loglevel)]
        got = {(s.name, c): [] for s in senders for c in caches}
        started.append(dest)
        dest.start()
        for s in senders:
            started.append(s)
            s.start()
        time.sleep(1)
        for s in senders:                       # warm-up: processes, caches, tickets
            one_round(s, caches[0], 20, timeout)
        for run in range(runs):
            order = senders if run % 2 == 0 else senders[::-1]
            for cache in (caches if run % 2 == 0 else caches[::-1]):
                for s in order:
                    r = one_round(s, cache, messages, timeout)
                    got[(s.name, cache)].append(r)
                    if progress:
                        progress({"run": run + 1, "system": s.name,
                                  "cache": "on" if cache else "off",
                                  **{k: (round(v, 3) if isinstance(v, float) else v)
                                     for k, v in r.items()}})
    finally:
        for s in reversed(started):
            try:
                s.stop()
            except Exception as exc:            # keep cleaning up
                print(f"stop: {exc}", file=sys.stderr)
        if keep:
            print(f"kept: {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    rows = []
    for cache in caches:
        row = {"cache": "on" if cache else "off"}
        for s in senders:
            rs = got[(s.name, cache)]
            row[s.name] = {
                "rate": statistics.median(r["rate"] for r in rs),
                "steady": statistics.median(r["steady"] for r in rs),
                "resumed": statistics.median(r["resumed_share"] for r in rs),
                "handshakes": statistics.median(r["handshakes"] for r in rs),
                "failed": sum(r["failed"] for r in rs)}
        pf, pfs = row["postfix"]["rate"], row["postfix"]["steady"]
        row["ratio"] = row["postfix-py"]["rate"] / pf if pf else 0.0
        row["steady_ratio"] = row["postfix-py"]["steady"] / pfs if pfs else 0.0
        rows.append(row)
    return rows, got


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", "--messages", type=int, default=500, help="queued messages per round")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--loglevel", type=int, default=2, help="smtp_tls_loglevel of both senders")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per delivery round")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the directories (stopped)")
    args = p.parse_args(argv)
    if not available():
        print("Debian's postfix is needed (apt-get install postfix), and root", file=sys.stderr)
        return 2
    rows, _ = compare(args.messages, args.runs, (True, False), args.loglevel, args.timeout,
                      args.keep, progress=lambda r: print(json.dumps(r), file=sys.stderr))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.messages} queued messages of {SIZE} bytes per round, one TLS destination, "
          f"medians of {args.runs} runs, smtp_tls_loglevel {args.loglevel}\n")
    print("| session cache | postfix-py msg/s | Postfix msg/s | ratio "
          "| first to last sent, msg/s (py / Postfix) | ratio | resumed (py / Postfix) "
          "| TLS handshakes per round (py / Postfix) | not sent (py / Postfix) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["postfix-py"], r["postfix"]
        print(f"| {r['cache']} | {a['rate']:.0f} | {b['rate']:.0f} | {r['ratio']:.2f} | "
              f"{a['steady']:.0f} / {b['steady']:.0f} | {r['steady_ratio']:.2f} | "
              f"{a['resumed']:.0%} / {b['resumed']:.0%} | {a['handshakes']:.0f} / "
              f"{b['handshakes']:.0f} | {a['failed']} / {b['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
