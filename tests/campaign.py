"""The fault campaign: mail under load while processes are killed, and nothing may be lost.

    python tests/campaign.py --messages 20000 --clients 16 --kill-interval 0.5

A postfix-py instance (as root: chrooted smtpd, smtp and tlsmgr; qmgr) relays everything to
a counting sink on loopback (tests/sink.py). Clients send messages of mixed sizes, some over
STARTTLS with session resumption, each with a unique Message-ID, and note what smtpd
answered. Meanwhile a chaos loop SIGKILLs random smtpd, qmgr, smtp and tlsmgr processes (by
pid) at random moments, and once stops and restarts the whole instance. Afterwards the queue
is drained and the figures are checked:

    acknowledged   messages that got `250 ... queued as`
    delivered      acknowledged messages that reached the sink
    lost           acknowledged but never delivered (must be 0)
    duplicated     extra copies at the sink (a crash between delivery and recording)
    refused_but_delivered  messages smtpd refused (4xx/5xx) that arrived anyway (must be 0)
    unanswered     connections that broke before a final reply (either outcome is legal)
    kills          processes killed, by program

run_campaign() is what the CI test calls with small numbers; the command line runs it
longer by hand (RELIABILITY.md records such a run).

Every random choice (message sizes, STARTTLS or not, pauses, victims, kill times) comes
from generators seeded from one number: --seed, else the CAMPAIGN_SEED environment
variable, else a random one. The seed is printed at the start and is in the figures. Each
client thread and the chaos loop has a generator of its own, so a seed repeats every
thread's choices; how the threads and the processes interleave is the kernel's and may
differ between two runs with the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peers import free_port  # noqa: E402
from sink import Sink  # noqa: E402
from smtpclient import SmtpClient  # noqa: E402

POSTFIX_PY = str(Path(sys.executable).parent / "postfix-py")
PROGRAMS = ("smtpd", "qmgr", "smtp", "tlsmgr")
SIZES = (800, 5000, 5000, 20000, 150000)


class Campaign:
    def __init__(self, root: Path, messages: int, clients: int, kill_interval: float,
                 tls_fraction: float, restart: bool, seed: int, duration: float):
        self.root, self.messages, self.clients = root, messages, clients
        # Clients pace themselves so that the load lasts about `duration` seconds: long
        # enough for the chaos loop to hit every kind of process, and the restart.
        self.pause = duration * clients / max(1, messages)
        self.duration = duration
        self.kill_interval, self.tls_fraction, self.restart = kill_interval, tls_fraction, restart
        # One generator per thread, each derived from the seed: a thread's choices do not
        # depend on how the others interleave (the kernel's scheduling still does).
        self.seed = seed
        self.rng = random.Random(f"{seed}/chaos")
        self.port = free_port()
        self.outcomes: dict[str, str] = {}
        self.lock = threading.Lock()
        self.kills: Counter = Counter()
        self.restarts = 0
        self.stop_chaos = threading.Event()

    # --- the instance --------------------------------------------------------------------
    def configure(self, sink_port: int) -> None:
        from postfix_py.lib import tlsgen
        r = self.root
        tlsgen.write_server_cert(str(r / "key.pem"), str(r / "cert.pem"), "ecdsa",
                                 dns_names=("localhost",))
        (r / "main.cf").write_text(f"""\
queue_directory = {r}/queue
data_directory = {r}/data
mail_owner = nobody
maillog_file = {r}/maillog
inet_interfaces = 127.0.0.1
myhostname = campaign.test
mydestination = localhost
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_tls_cert_file = {r}/cert.pem
smtpd_tls_key_file = {r}/key.pem
smtpd_tls_security_level = may
smtp_tls_security_level = may
smtp_tls_session_cache_database = lmdb:${{data_directory}}/smtp_scache
minimal_backoff_time = 1s
maximal_backoff_time = 2s
queue_run_delay = 1s
smtpd_timeout = 20s
smtp_connect_timeout = 5s
service_throttle_time = 1s
""")
        (r / "master.cf").write_text(f"""\
127.0.0.1:{self.port} inet n - y - 20 smtpd
qmgr      unix n - n 1 1 qmgr
smtp      unix - - y - 10 smtp
tlsmgr    unix - - y 1000? 1 tlsmgr
""")

    def cmd(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX_PY, "-c", str(self.root), *args], capture_output=True,
                              text=True, timeout=timeout)

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text())
        except (OSError, ValueError):
            return None

    def queue_files(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.root / "queue" / sub
            if d.exists():
                n += sum(1 for f in os.listdir(d) if not f.startswith("."))
        return n

    # --- clients -------------------------------------------------------------------------
    def send_one(self, n: int, ctx: ssl.SSLContext, session_box: list, rng) -> None:
        msgid = f"<campaign-{n}@test>"
        size = rng.choice(SIZES)
        body = (f"Message-ID: {msgid}\r\nSubject: campaign {n}\r\n\r\n".encode()
                + (b"x" * 76 + b"\r\n") * (size // 78 + 1))
        outcome = "unanswered"
        c = None

        def reply(text: str) -> str:
            if text.endswith("<EOF>"):      # closed before a final reply: either outcome
                raise ConnectionError("closed")
            return text
        try:
            c = SmtpClient(self.port, timeout=30)
            if not reply(c.reply()).startswith("220"):
                outcome = "refused"
                return
            reply(c.cmd("EHLO campaign.client"))
            if rng.random() < self.tls_fraction:
                if reply(c.cmd("STARTTLS")).startswith("220"):
                    c.wrap(ctx, session=session_box[0])
                    reply(c.cmd("EHLO campaign.client"))
                    session_box[0] = c.sock.session
            c.send(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<sink@remote.example>\r\n"
                   b"DATA\r\n")
            codes = [reply(c.reply())[:1] for _ in range(3)]
            if codes[2] != "3":
                outcome = "refused"
                return
            c.send(body + b".\r\n")
            final = reply(c.reply())
            outcome = "ack" if final.startswith("250") else "refused"
            try:
                c.send(b"QUIT\r\n")
            except OSError:
                pass
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        finally:
            with self.lock:
                self.outcomes[msgid] = outcome
            if c is not None:
                c.close()

    def client(self, index: int, numbers: list[int]) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        box = [None]
        rng = random.Random(f"{self.seed}/client/{index}")
        for n in numbers:
            started = time.monotonic()
            self.send_one(n, ctx, box, rng)
            time.sleep(max(0.0, rng.uniform(0.5, 1.5) * self.pause -
                           (time.monotonic() - started)))

    # --- chaos ---------------------------------------------------------------------------
    def victims(self) -> list[psutil.Process]:
        pid = self.master_pid()
        if not pid:
            return []
        out = []
        try:
            for p in psutil.Process(pid).children():
                title = " ".join(p.cmdline())
                if any(f"postfix-py/{prog} " in title for prog in PROGRAMS):
                    out.append(p)
        except psutil.NoSuchProcess:
            pass
        return out

    def chaos(self, restart_after: float) -> None:
        started = time.monotonic()
        restarted = not self.restart
        while not self.stop_chaos.wait(self.rng.uniform(0.2, 2 * self.kill_interval)):
            if not restarted and time.monotonic() - started > restart_after:
                restarted = True
                self.cmd("stop", "-t", "60")
                out = self.cmd("start")
                if out.returncode != 0:
                    raise RuntimeError(f"restart failed: {out.stderr}")
                self.restarts += 1
                continue
            victims = self.victims()
            if not victims:
                continue
            v = self.rng.choice(victims)
            try:
                title = " ".join(v.cmdline())
                os.kill(v.pid, signal.SIGKILL)
                self.kills[next(p for p in PROGRAMS if f"postfix-py/{p} " in title)] += 1
            except (ProcessLookupError, psutil.NoSuchProcess, StopIteration):
                pass

    # --- the run -------------------------------------------------------------------------
    def run(self, drain_timeout: float = 180) -> dict:
        with Sink() as sink:
            self.configure(sink.port)
            out = self.cmd("start")
            if out.returncode != 0:
                raise RuntimeError(f"start failed: {out.stderr}")
            try:
                numbers = list(range(self.messages))
                shares = [numbers[i::self.clients] for i in range(self.clients)]
                workers = [threading.Thread(target=self.client, args=(i, s))
                           for i, s in enumerate(shares)]
                t0 = time.monotonic()
                for w in workers:
                    w.start()
                chaos = threading.Thread(target=self.chaos, args=(self.duration / 2,))
                chaos.start()
                for w in workers:
                    w.join()
                self.stop_chaos.set()
                chaos.join()
                load_seconds = time.monotonic() - t0
                deadline = time.monotonic() + drain_timeout
                while self.queue_files() and time.monotonic() < deadline:
                    self.cmd("flush", timeout=30)
                    time.sleep(1)
                left = self.queue_files()
            finally:
                self.cmd("stop", "-t", "60")
            delivered = Counter(sink.ids)
        acked = {m for m, o in self.outcomes.items() if o == "ack"}
        refused = {m for m, o in self.outcomes.items() if o == "refused"}
        return {
            "messages": self.messages, "clients": self.clients,
            "acknowledged": len(acked),
            "delivered": sum(1 for m in acked if delivered[m]),
            "lost": sorted(m for m in acked if not delivered[m]),
            "duplicated": sum(c - 1 for c in delivered.values() if c > 1),
            "refused": len(refused),
            "refused_but_delivered": sorted(m for m in refused if delivered[m]),
            "unanswered": sum(1 for o in self.outcomes.values() if o == "unanswered"),
            "unanswered_delivered": sum(1 for m, o in self.outcomes.items()
                                        if o == "unanswered" and delivered[m]),
            "kills": dict(self.kills), "restarts": self.restarts,
            "left_in_queue": left, "load_seconds": round(load_seconds, 1),
        }


def run_campaign(messages=300, clients=8, kill_interval=0.5, tls_fraction=0.3,
                 restart=True, seed=None, keep=False, duration=15.0) -> tuple[dict, Path]:
    """Run one campaign in a fresh directory; returns (figures, directory)."""
    root = Path(tempfile.mkdtemp(prefix="pfx-campaign-", dir="/tmp"))
    os.chmod(root, 0o755)
    if seed is None:
        env = os.environ.get("CAMPAIGN_SEED", "")
        seed = int(env) if env.isdigit() else random.randrange(1 << 30)
    # Printed first, so that a run that fails or hangs can be repeated with its choices.
    print(f"campaign seed {seed}: CAMPAIGN_SEED={seed} (or --seed) repeats its choices",
          file=sys.stderr, flush=True)
    try:
        figures = Campaign(root, messages, clients, kill_interval, tls_fraction, restart,
                           seed, duration).run()
        figures["seed"] = seed
        return figures, root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--kill-interval", type=float, default=0.5)
    p.add_argument("--tls-fraction", type=float, default=0.3)
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--duration", type=float, default=60.0,
                   help="about how long the load lasts, in seconds")
    p.add_argument("--keep", action="store_true", help="keep the instance directory")
    a = p.parse_args(argv)
    figures, root = run_campaign(a.messages, a.clients, a.kill_interval, a.tls_fraction,
                                 not a.no_restart, a.seed, a.keep, a.duration)
    print(json.dumps(figures, indent=2))
    if a.keep:
        print(f"instance kept in {root}", file=sys.stderr)
    ok = not figures["lost"] and not figures["refused_but_delivered"] and \
        not figures["left_in_queue"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
