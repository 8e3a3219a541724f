"""delivery_bench - smtp agent throughput to one TLS destination, with and without the session cache.

USAGE
    .venv/bin/python bench/delivery_bench.py [-n 300] [-c 4] [--peer postfix|postfix-py]
                                             [--rounds 2] [--keep]

DESCRIPTION
    Starts a receiving peer on loopback (Debian's Postfix with smtpd TLS and a discard
    transport, or a postfix-py smtpd with TLS), and a postfix-py instance with two smtp
    services that differ only in smtp_tls_session_cache_database (tlsmgr runs in both
    cases). For each service it queues N messages of 5 KB, sends the delivery requests
    from C threads as a queue manager would (one request per connection to
    private/SERVICE), and reports delivered messages per second, the share of TLS
    handshakes that resumed a session ("Reusing old session" at smtp_tls_loglevel 2, set
    for both services), and the CPU seconds the smtp workers used. Rounds alternate
    between the services so that warm-up and machine noise are shared.

    Needs root (the master chroots and drops privileges), trustme, and for --peer postfix
    Debian's postfix. Every process it starts is ended by pid.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import psutil  # noqa: E402
import trustme  # noqa: E402
from pfxinst import Instance, free_port, wait_for  # noqa: E402
from test_smtp_delivery import PostfixPeer, open_path, queue_message, wait_port  # noqa: E402

from postfix_py.lib import attr, deliver  # noqa: E402
from postfix_py.lib import queue as Q  # noqa: E402

SIZE = 5 * 1024


def make_certs(root: Path):
    d = root / "certs"
    d.mkdir()
    ca = trustme.CA()
    good = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    good.private_key_and_cert_chain_pem.write_to_path(str(d / "good.pem"))
    os.chmod(d / "good.pem", 0o644)
    return SimpleNamespace(ca=d / "ca.pem", good=d / "good.pem", other=d / "good.pem",
                           client_fp="00")


def start_peer(kind: str, root: Path, certs):
    """(port, stop function) of the receiving server."""
    if kind == "postfix":
        ports = SimpleNamespace(tls=free_port(), plain=free_port(), ccert=free_port(),
                                other=free_port())
        peer = PostfixPeer(root / "peer", certs, ports)
        # A sink that costs the peer as little as possible.
        main = (peer.etc / "main.cf").read_text().replace(
            "transport_maps = inline:{relay.test.example=discard:}",
            "transport_maps = inline:{sink.test.example=discard:}")
        (peer.etc / "main.cf").write_text(main + "smtpd_tls_loglevel = 0\n")
        peer.start()
        return ports.tls, peer.stop
    inst = Instance(root / "peer")
    inst.dir.mkdir()
    port = free_port()
    inst.main.update({"myhostname": "peer.test.example", "mydestination": "sink.test.example",
                      "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(certs.good),
                      "smtpd_error_sleep_time": "0s"})
    inst.master_lines = [f"127.0.0.1:{port} inet n - y - - smtpd"]
    inst.start()
    wait_port(port)
    return port, inst.cleanup


def smtp_cpu(inst) -> float:
    """CPU seconds of the instance's smtp workers so far (user + system)."""
    total = 0.0
    for p in inst.workers():
        try:
            if "smtp" in " ".join(p.cmdline()) and "tlsmgr" not in " ".join(p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def request(inst, service: str, nexthop: str, content: bytes) -> deliver.DeliveryStatus:
    """Queue one message and hand it to private/SERVICE as qmgr would."""
    qid, path, _ = queue_message(inst, ["bench@sink.test.example"], content)
    m = Q.read(str(path))
    req = deliver.Request(qid, f"active/{qid}", service, nexthop, m.sender, m.arrival,
                          ["bench@sink.test.example"], [r.offset for r in m.recipients])
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(inst.queue / "private" / service))
        s.sendall(deliver.encode_request(req))
        reply = deliver.decode_reply(attr.read_frame(s, 60), 1)
    os.unlink(path)
    return reply


def log_size(inst) -> int:
    try:
        return inst.maillog.stat().st_size
    except FileNotFoundError:
        return 0


def log_since(inst, offset: int) -> str:
    with open(inst.maillog, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def run_round(inst, service: str, port: int, n: int, conc: int):
    """Deliver n messages with conc request senders; (rate, resumed share, failures)."""
    body = ("Subject: bench\n\n" + ("x" * 75 + "\n") * (SIZE // 76)).encode()
    todo: queue.Queue = queue.Queue()
    for _ in range(n):
        todo.put(body)
    failures = []
    before = log_size(inst)
    cpu0 = smtp_cpu(inst)

    def worker():
        while True:
            try:
                content = todo.get_nowait()
            except queue.Empty:
                return
            reply = request(inst, service, f"[127.0.0.1]:{port}", content)
            if reply.results[0].result != "sent":
                failures.append(reply.results[0].reason)
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    time.sleep(0.2)                 # the last log lines
    log = log_since(inst, before)
    handshakes = len(re.findall(r"TLS connection established to ", log))
    resumed = len(re.findall(r": Reusing old session", log))
    cpu = smtp_cpu(inst) - cpu0
    return n / elapsed, (resumed / handshakes if handshakes else 0.0), failures, cpu, handshakes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=300, help="messages per round and service")
    ap.add_argument("-c", type=int, default=4, help="concurrent deliveries")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer", choices=("postfix", "postfix-py"),
                    default="postfix" if shutil.which("postfix") else "postfix-py")
    ap.add_argument("--keep", action="store_true", help="keep the directory for inspection")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("delivery_bench: needs root", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="delivery-bench-", dir="/tmp"))
    open_path(root)
    certs = make_certs(root)
    port, stop_peer = start_peer(args.peer, root, certs)
    inst = Instance(root / "pfx")
    inst.dir.mkdir()
    inst.main.update({"inet_protocols": "ipv4", "smtp_tls_security_level": "may",
                      "smtp_tls_loglevel": "2", "smtp_tls_CAfile": str(certs.ca),
                      "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
                      "default_process_limit": "50", "max_use": "1000000", "max_idle": "3600s"})
    inst.master_lines = ["tlsmgr unix - - y 1000? 1 tlsmgr",
                         "cache unix - - y - - smtp",
                         "nocache unix - - y - - smtp -o smtp_tls_session_cache_database="]
    import pwd
    pw = pwd.getpwnam(inst.main["mail_owner"])
    inst.uid_gid = (pw.pw_uid, pw.pw_gid)
    results: dict = {"cache": [], "nocache": []}
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "private" / "cache").exists(), 10, what="services")
        for service in ("cache", "nocache"):          # warm-up: workers, sessions
            run_round(inst, service, port, 2 * args.c, args.c)
        for _ in range(args.rounds):
            for service in ("nocache", "cache"):
                results[service].append(run_round(inst, service, port, args.n, args.c))
    finally:
        inst.cleanup()
        stop_peer()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept: {root}")
    print(f"peer: {args.peer}; {args.n} messages of {SIZE} bytes per round, "
          f"{args.c} concurrent deliveries, {args.rounds} rounds")
    for service, rows in results.items():
        rates = [r[0] for r in rows]
        shares = [r[1] for r in rows]
        cpu = sum(r[3] for r in rows) / sum(args.n for _ in rows)
        fails = sum(len(r[2]) for r in rows)
        print(f"{service:8s} {sum(rates) / len(rates):7.1f} msg/s (rounds: "
              f"{', '.join(f'{r:.1f}' for r in rates)}), resumed "
              f"{100 * sum(shares) / len(shares):5.1f}% of handshakes, "
              f"{1000 * cpu:5.2f} ms smtp CPU per message, {fails} failures")
        for r in rows:
            for reason in r[2][:3]:
                print(f"    failure: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
