"""Benchmark tlsmgr: requests per second and latency, next to raw in-process LMDB.

Starts a real tlsmgr (`python -m postfix_py.tlsmgr.service`) on a private socket in a
temporary directory, fills its smtp cache, then for each request type (seed, lookup that
hits, update) and each client count (1 and 16 client processes) runs the clients for a
fixed time. Each client keeps one connection and does request, reply, request, ... with
pre-encoded frames, as a worker would, timing every round trip. The same run also
measures a raw LMDB get and put loop in this process, with the same keys and value size,
as the floor that tlsmgr's IPC is added to.

    .venv/bin/python bench/tlsmgr_bench.py [--duration 3] [--runs 1] [--json]

Output: one line per case with requests/s, p50 and p99 latency in microseconds; with
--runs N, the median of N runs per case.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

import lmdb

from postfix_py.lib import attr

KEYS = 1000
SESSION = 1500          # bytes: a typical serialised TLS 1.3 client session
CLIENTS = (1, 16)


def _recv_frame(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one reply frame (the whole thing) from sock."""
    view = memoryview(buf)
    got = 0
    need = 4
    while got < need:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("tlsmgr closed the connection")
        got += n
        if got >= 4:
            need = 4 + int.from_bytes(buf[:4], "big")
    return bytes(buf[:need])


def _client(path: str, frames: list[bytes], start, stop_at_box, out) -> None:
    """One client process: connect, wait for the start, loop until the deadline."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    buf = bytearray(1 << 20)
    lat = array("d")
    start.wait()
    deadline = stop_at_box.value
    i, n = 0, len(frames)
    clock = time.perf_counter
    while True:
        t0 = clock()
        if t0 >= deadline:
            break
        sock.sendall(frames[i])
        reply = _recv_frame(sock, buf)
        lat.append(clock() - t0)
        if reply[15:16] != b"0":    # length 4, name_len 1, "status" 6, value_len 4, value
            raise RuntimeError(f"bad reply {attr.decode(reply)}")
        i = (i + 1) % n
    sock.close()
    out.put(lat.tobytes())


def run_case(path: str, frames: list[bytes], clients: int, duration: float) -> dict:
    """Run clients processes for duration seconds; return rate and latency percentiles."""
    ctx = mp.get_context("fork")
    start = ctx.Event()
    stop_at = ctx.Value("d", 0.0)
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(path, frames, start, stop_at, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.3)                     # let them connect
    stop_at.value = time.perf_counter() + duration
    start.set()
    lat = array("d")
    for _ in procs:
        lat.frombytes(out.get(timeout=duration + 30))
    for p in procs:
        p.join(timeout=10)
    lat = sorted(lat)
    return {"rps": len(lat) / duration,
            "p50_us": 1e6 * lat[len(lat) // 2],
            "p99_us": 1e6 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def raw_lmdb(directory: str, duration: float) -> dict:
    """Measure in-process LMDB get (hits) and put loops with the cache's settings."""
    env = lmdb.open(os.path.join(directory, "raw.lmdb"), subdir=False, map_size=1 << 28,
                    sync=False, metasync=False, readahead=False, meminit=False)
    keys = [b"smtp&host%d.example&192.0.2.%d&25&policy" % (i, i % 250) for i in range(KEYS)]
    value = os.urandom(SESSION + 8)
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k, value)
    results = {}
    for name in ("get", "put"):
        n, i, end = 0, 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            for _ in range(100):
                k = keys[i]
                i = (i + 1) % KEYS
                if name == "get":
                    with env.begin() as txn:
                        txn.get(k)
                else:
                    with env.begin(write=True) as txn:
                        txn.put(k, value)
            n += 100
        results[name] = n / duration
    env.close()
    return results


def start_tlsmgr(directory: str) -> tuple[subprocess.Popen, str]:
    """Start tlsmgr on a socket in directory; return the process and the socket path."""
    for sub in ("queue/private", "data"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    with open(os.path.join(directory, "main.cf"), "w") as f:
        f.write(f"queue_directory = {directory}/queue\n"
                f"data_directory = {directory}/data\n"
                f"mail_owner = {os.environ.get('USER', 'root') if os.geteuid() else 'root'}\n"
                f"maillog_file = {directory}/maillog\n"
                "smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache\n"
                "lmdb_map_size = 268435456\n")
    path = os.path.join(directory, "queue/private/tlsmgr")
    proc = subprocess.Popen([sys.executable, "-m", "postfix_py.tlsmgr.service", "-c", directory,
                             "--socket", path])
    for _ in range(200):
        if os.path.exists(path):
            break
        time.sleep(0.02)
    return proc, path


def measure(cases=("seed", "lookup", "update"), clients=CLIENTS, duration: float = 3.0,
            runs: int = 1, raw: bool = True, progress=None) -> dict:
    """Start a private tlsmgr, fill its smtp cache, run each case at each client count
    (median of `runs`), stop it (always) and return {"tlsmgr": rows,
    "raw_lmdb_ops_per_s": {...} or None}."""
    directory = tempfile.mkdtemp(prefix="tlsmgr-bench-")
    proc = None
    try:
        proc, path = start_tlsmgr(directory)
        keys = [b"smtp&host%d.example&192.0.2.%d&25&policy" % (i, i % 250) for i in range(KEYS)]
        session = os.urandom(SESSION)
        updates = [attr.encode({"request": "update", "cache_type": "smtp", "cache_id": k,
                                "session": session}) for k in keys]
        with attr.AttrClient(path) as clnt:
            for k in keys:
                clnt.request({"request": "update", "cache_type": "smtp", "cache_id": k,
                              "session": session})
        frames = {
            "seed": [attr.encode({"request": "seed", "size": 32})],
            "lookup": [attr.encode({"request": "lookup", "cache_type": "smtp", "cache_id": k}) for k in keys],
            "update": updates,
        }
        rows = []
        for name in cases:
            for n in clients:
                results = [run_case(path, frames[name], n, duration) for _ in range(runs)]
                row = {"case": name, "clients": n,
                       **{k: statistics.median(r[k] for r in results) for k in results[0]}}
                rows.append(row)
                if progress:
                    progress(row)
        lmdb_raw = None
        if raw:
            raws = [raw_lmdb(directory, min(duration, 2.0)) for _ in range(runs)]
            lmdb_raw = {k: statistics.median(r[k] for r in raws) for k in raws[0]}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()             # by its pid: the Popen we started
                proc.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
    return {"tlsmgr": rows, "raw_lmdb_ops_per_s": lmdb_raw}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per case")
    parser.add_argument("--runs", type=int, default=1, help="runs per case (median reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def show(row):
        if not args.json:
            print(f"{row['case']:7} {row['clients']:3} clients: {row['rps']:9.0f} req/s"
                  f"  p50 {row['p50_us']:7.0f} us  p99 {row['p99_us']:7.0f} us", flush=True)
    got = measure(duration=args.duration, runs=args.runs, progress=show)
    raw = got["raw_lmdb_ops_per_s"]
    if args.json:
        print(json.dumps(got, indent=2))
    else:
        print(f"raw LMDB in-process: get {raw['get']:.0f}/s, put {raw['put']:.0f}/s"
              f" ({SESSION}-byte values, {KEYS} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
