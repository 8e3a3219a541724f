"""The fault campaign: mail under load while processes are killed, and nothing may be lost.

    python tests/campaign.py --messages 20000 --clients 16 --kill-interval 0.5 \
        --duration 600 --write RELIABILITY.md

A postfix-py instance (as root: chrooted smtpd, smtp, tlsmgr and pickup; qmgr; local) with
its queue on a tmpfs of its own relays mail to a counting sink on loopback (tests/sink.py)
and delivers some locally. Clients send messages of mixed sizes, some over STARTTLS with
session resumption, some through the pickup service (as `postfix-py sendmail` does), each
with a unique Message-ID, and note what they were answered. The mail is of three kinds:
relayed to the sink, delivered by local(8) into a maildir, and addressed to a sink
recipient that the sink refuses with 550 (so it must come back as a bounce). Meanwhile:

    kills        a chaos loop SIGKILLs random smtpd, qmgr, smtp, tlsmgr, pickup and local
                 processes (by pid) at random moments
    master       the master itself is SIGKILLed twice; `postfix-py start` is retried until
                 it succeeds (its orphaned workers hold the listeners for a moment)
    restart      once, `postfix-py stop -t 60` and `start`
    disk full    the queue file system is filled for a few seconds
    sink         answers 451 after the final dot at random (tempfail), and sometimes
                 stalls past smtp_data_done_timeout and hangs up (stall)

Afterwards the queue is drained and the figures are checked:

    acknowledged   messages that got `250 ... queued as` (or a queue id from pickup)
    delivered      acknowledged messages that reached the sink or the maildir
    bounced        acknowledged messages of the refused kind that came back as a bounce
    lost           acknowledged but neither delivered nor bounced (must be 0)
    duplicated     extra copies (a crash between delivery and recording)
    refused_but_delivered  messages that were refused (4xx/5xx) and arrived anyway (must be 0)
    unanswered     connections that broke before a final reply (either outcome is legal)
    kills          processes killed, by program

run_campaign() is what the CI test calls with small numbers; the command line runs it
longer by hand and, with --write, puts its own table into RELIABILITY.md.
The random generator is seeded; the seed is printed, and --seed repeats a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
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
PROGRAMS = ("smtpd", "qmgr", "smtp", "tlsmgr", "pickup", "local")
SIZES = (800, 5000, 5000, 20000, 150000)
LOCAL_SHARE, BOUNCE_SHARE, PICKUP_SHARE = 0.10, 0.03, 0.05
SMTP_DATA_DONE_TIMEOUT = 4          # the sink's stall outlasts it
QUEUE_FS_SIZE = "1g"            # room for the backlog a long run builds while kills go on


class Campaign:
    def __init__(self, root: Path, messages: int, clients: int, kill_interval: float,
                 tls_fraction: float, restart: bool, seed: int, duration: float,
                 master_kills: int = 2, disk_full: float = 4.0, tempfail: float = 0.02,
                 stall: float = 0.002):
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
        self.master_kills, self.disk_full = master_kills, disk_full
        self.tempfail, self.stall = tempfail, stall
        # Each message's kind and path are drawn up front, so a seed repeats a run.
        draw = random.Random(f"{seed}/kinds")
        self.kind = {n: ("bounce" if x < BOUNCE_SHARE else
                         "local" if x < BOUNCE_SHARE + LOCAL_SHARE else "relay")
                     for n, x in ((n, draw.random()) for n in range(messages))}
        self.via_pickup = {n for n in range(messages) if draw.random() < PICKUP_SHARE}
        self.events: Counter = Counter()
        self.mounted = False
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
mydestination = localhost, campaign.test
local_delivery_any_user = yes
alias_maps =
local_recipient_maps =
mail_spool_directory = {r}/mail/
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
smtp_data_done_timeout = {SMTP_DATA_DONE_TIMEOUT}s
service_throttle_time = 1s
transport_retry_time = 1s
""")
        (r / "master.cf").write_text(f"""\
127.0.0.1:{self.port} inet n - y - 20 smtpd
qmgr      unix n - n 1 1 qmgr
smtp      unix - - y - 10 smtp
tlsmgr    unix - - y 1000? 1 tlsmgr
pickup    unix n - y - 4 pickup
local     unix - n n - 4 local
""")
        mail = r / "mail"
        mail.mkdir(exist_ok=True)
        os.chmod(mail, 0o1777)      # a world-writable spool: local writes as the user
        queue = r / "queue"
        queue.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            # A file system of its own, so that filling it fills nothing else.
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={QUEUE_FS_SIZE},mode=755",
                            "tmpfs", str(queue)], check=True)
            self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root / "queue")], check=False)
            self.mounted = False

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
    def recipient(self, n: int) -> str:
        return {"relay": "sink@remote.example", "bounce": "sink+bounce@remote.example",
                "local": "camp@campaign.test"}[self.kind[n]]

    def submit_pickup(self, n: int, msgid: str, size: int) -> None:
        """One message through public/pickup, as `postfix-py sendmail` hands it over."""
        from postfix_py.tools import sendmail
        body = (f"Message-ID: {msgid}\nSubject: campaign {n}\n\n".encode()
                + (b"x" * 76 + b"\n") * (size // 78 + 1))
        outcome = "unanswered"
        try:
            sendmail.submit(self.cfg, "load@example.org", "", [self.recipient(n)], body)
            outcome = "ack"
        except sendmail.Failure as exc:
            # A refusal is a status frame; a broken connection is not an answer.
            outcome = "unanswered" if "lost connection" in str(exc) or \
                "cannot connect" in str(exc) else "refused"
        finally:
            with self.lock:
                self.outcomes[msgid] = outcome

    def send_one(self, n: int, ctx: ssl.SSLContext, session_box: list, rng) -> None:
        msgid = f"<campaign-{n}@test>"
        size = rng.choice(SIZES)
        if n in self.via_pickup:
            return self.submit_pickup(n, msgid, size)
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
            c.send(b"MAIL FROM:<load@example.org>\r\nRCPT TO:<"
                   + self.recipient(n).encode() + b">\r\nDATA\r\n")
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

    def start_until_up(self, timeout: float = 90) -> float:
        """`postfix-py start`, retried while the old workers still hold the listeners."""
        t0 = time.monotonic()
        while True:
            out = self.cmd("start")
            if out.returncode == 0:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"start failed: {out.stderr}")
            time.sleep(0.5)

    def kill_master(self) -> None:
        pid = self.master_pid()
        if not pid:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.kills["master"] += 1
        wait = self.start_until_up()
        self.events["master restart seconds"] = max(self.events["master restart seconds"],
                                                    round(wait, 1))

    def fill_queue_fs(self) -> None:
        """Fill the queue's file system for self.disk_full seconds, then free it."""
        if not self.mounted or self.disk_full <= 0:
            return
        filler = self.root / "queue" / "filler"
        chunk = b"\0" * (1 << 20)
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass            # ENOSPC: the file system is full
        self.events["disk full"] += 1
        time.sleep(self.disk_full)
        filler.unlink()

    def chaos(self, restart_after: float) -> None:
        started = time.monotonic()
        # One-off events at fixed shares of the load time, the kills in between.
        plan = sorted([(self.duration * (i + 1) / (self.master_kills + 1), "master")
                       for i in range(self.master_kills)]
                      + ([(restart_after, "restart")] if self.restart else [])
                      + ([(self.duration * 0.4, "disk")] if self.disk_full > 0 else []))
        while not self.stop_chaos.wait(self.rng.uniform(0.2, 2 * self.kill_interval)):
            if plan and time.monotonic() - started > plan[0][0]:
                event = plan.pop(0)[1]
                if event == "restart":
                    self.cmd("stop", "-t", "60")
                    self.start_until_up()
                    self.restarts += 1
                elif event == "master":
                    self.kill_master()
                else:
                    self.fill_queue_fs()
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

    def local_ids(self) -> Counter:
        """Message-IDs delivered by local(8) into the campaign maildir."""
        found: Counter = Counter()
        new = self.root / "mail" / "camp" / "new"
        if new.is_dir():
            for name in os.listdir(new):
                with open(new / name, "rb") as f:
                    head = f.read(8192)
                m = re.search(rb"^message-id:\s*(<[^>\r\n]*>)", head, re.I | re.M)
                if m:
                    found[m.group(1).decode("latin-1")] += 1
        return found

    # --- the run -------------------------------------------------------------------------
    def run(self, drain_timeout: float = 180) -> dict:
        with Sink(tempfail=self.tempfail, stall=self.stall,
                  stall_seconds=SMTP_DATA_DONE_TIMEOUT + 2, seed=self.seed) as sink:
            try:
                self.configure(sink.port)
                from postfix_py.lib import maincf
                self.cfg = maincf.load(str(self.root))
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
                    sink.tempfail = sink.stall = 0.0     # let the queue drain
                    deadline = time.monotonic() + drain_timeout
                    while self.queue_files() and time.monotonic() < deadline:
                        self.cmd("flush", timeout=30)
                        time.sleep(1)
                    left = self.queue_files()
                finally:
                    self.cmd("stop", "-t", "60")
                    self.reap_orphans()
            finally:
                self.unmount()
            delivered = Counter(sink.ids) + self.local_ids()
            bounced = Counter(sink.bounced)
            sink_faults = dict(sink.faults)
        acked = {m for m, o in self.outcomes.items() if o == "ack"}
        refused = {m for m, o in self.outcomes.items() if o == "refused"}
        kind = {f"<campaign-{n}@test>": k for n, k in self.kind.items()}
        arrived = {m for m in acked if delivered[m] or (kind[m] == "bounce" and bounced[m])}
        return {
            "messages": self.messages, "clients": self.clients, "seed": self.seed,
            "acknowledged": len(acked),
            "delivered": sum(1 for m in acked if delivered[m]),
            "bounced": sum(1 for m in acked if kind[m] == "bounce" and bounced[m]),
            "via_pickup": sum(1 for n in self.via_pickup
                              if f"<campaign-{n}@test>" in acked),
            "local": sum(1 for m in acked if kind[m] == "local" and delivered[m]),
            "lost": sorted(m for m in acked if m not in arrived),
            "duplicated": sum(c - 1 for c in delivered.values() if c > 1),
            "refused": len(refused),
            "refused_but_delivered": sorted(m for m in refused if delivered[m]),
            "unanswered": sum(1 for o in self.outcomes.values() if o == "unanswered"),
            "unanswered_delivered": sum(1 for m, o in self.outcomes.items()
                                        if o == "unanswered" and delivered[m]),
            "kills": dict(self.kills), "restarts": self.restarts,
            "events": dict(self.events), "sink": sink_faults,
            "left_in_queue": left, "load_seconds": round(load_seconds, 1),
        }

    def reap_orphans(self) -> None:
        """End workers orphaned by a killed master that are still around, by pid."""
        queue = str(self.root / "queue")
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if (p.info["cmdline"] or [""])[0].startswith("postfix-py/") and \
                        p.info["cwd"] in (queue, "/") and self._ours(p):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def _ours(self, p: psutil.Process) -> bool:
        """A process whose open files or root lie in this campaign's directory."""
        try:
            return os.readlink(f"/proc/{p.pid}/root").startswith(str(self.root)) or \
                os.readlink(f"/proc/{p.pid}/cwd").startswith(str(self.root))
        except OSError:
            return False


def run_campaign(messages=300, clients=8, kill_interval=0.5, tls_fraction=0.3,
                 restart=True, seed=None, keep=False, duration=15.0, master_kills=2,
                 disk_full=4.0, tempfail=0.02, stall=0.002) -> tuple[dict, Path]:
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
                           seed, duration, master_kills, disk_full, tempfail, stall).run()
        return figures, root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


BEGIN, END = "<!-- campaign table: begin -->", "<!-- campaign table: end -->"


def table(figures: dict, command: str) -> str:
    """RELIABILITY.md's campaign table, from one run's figures."""
    import platform
    kills = figures["kills"]
    rows = [
        ("messages sent", figures["messages"]),
        ("acknowledged (`250 ... queued as`, or a queue id from pickup)",
         figures["acknowledged"]),
        ("  of those submitted through pickup", figures["via_pickup"]),
        ("delivered (sink or local maildir), of those", figures["delivered"]),
        ("  delivered by local(8)", figures["local"]),
        ("bounced as they should (the sink refused the recipient)", figures["bounced"]),
        ("**lost**", f"**{len(figures['lost'])}**"),
        ("duplicated (extra copies delivered)", figures["duplicated"]),
        ("refused but delivered anyway", len(figures["refused_but_delivered"])),
        ("refused (4xx/5xx to the client: disk full, kills mid-session)", figures["refused"]),
        ("connections broken before a final reply",
         f"{figures['unanswered']} ({figures['unanswered_delivered']} of them delivered)"),
        ("processes SIGKILLed", f"{sum(kills.values())}: " + ", ".join(
            f"{k} {v}" for k, v in sorted(kills.items(), key=lambda kv: -kv[1]))),
        ("stop and start of the whole instance", figures["restarts"]),
        ("longest wait for `start` after a master SIGKILL (s)",
         figures["events"].get("master restart seconds", 0)),
        ("queue file system full (4 s each)", figures["events"].get("disk full", 0)),
        ("sink answers: stored / 451 tempfail / stalled and hung up",
         " / ".join(str(figures["sink"].get(k, 0)) for k in ("stored", "tempfail", "stall"))),
        ("left in the queue afterwards", figures["left_in_queue"]),
        ("load duration (s)", figures["load_seconds"]),
        ("seed", figures["seed"]),
    ]
    out = [BEGIN, "",
           f"Written by the campaign itself on {time.strftime('%Y-%m-%d %H:%M %Z')}, "
           f"{os.cpu_count()} cores, Python {platform.python_version()}:", "",
           "```", command, "```", "", "| figure | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    out += ["", END]
    return "\n".join(out)


def write_table(path: str, text: str) -> None:
    """Replace the campaign table in path (between the markers), or append it."""
    try:
        old = Path(path).read_text()
    except FileNotFoundError:
        old = ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    Path(path).write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--kill-interval", type=float, default=0.5)
    p.add_argument("--tls-fraction", type=float, default=0.3)
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--master-kills", type=int, default=2)
    p.add_argument("--disk-full", type=float, default=4.0,
                   help="seconds the queue file system stays full (0: not at all)")
    p.add_argument("--tempfail", type=float, default=0.02,
                   help="share of sink answers that are 451 after the final dot")
    p.add_argument("--stall", type=float, default=0.002,
                   help="share of sink sessions that stall and hang up")
    p.add_argument("--seed", type=int, help="repeat a run's choices (also CAMPAIGN_SEED)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="about how long the load lasts, in seconds")
    p.add_argument("--keep", action="store_true", help="keep the instance directory")
    p.add_argument("--write", metavar="FILE", help="put the figures into FILE (RELIABILITY.md)")
    a = p.parse_args(argv)
    figures, root = run_campaign(a.messages, a.clients, a.kill_interval, a.tls_fraction,
                                 not a.no_restart, a.seed, a.keep, a.duration,
                                 a.master_kills, a.disk_full, a.tempfail, a.stall)
    print(json.dumps(figures, indent=2))
    if a.keep:
        print(f"instance kept in {root}", file=sys.stderr)
    ok = not figures["lost"] and not figures["refused_but_delivered"] and \
        not figures["left_in_queue"]
    if a.write:
        args = [x for x in (argv if argv is not None else sys.argv[1:])
                if not x.startswith("--write") and x != a.write]
        command = ".venv/bin/python tests/campaign.py " + " ".join(args) + \
            f" --seed {figures['seed']} --write {a.write}"
        write_table(a.write, table(figures, command))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
