"""metrics - postfix-py's counters, queue and processes in Prometheus text format over HTTP.

SYNOPSIS
    master.cf:  127.0.0.1:9154  inet  n  -  n  -  1  metrics

DESCRIPTION
    A small HTTP server: `GET /metrics` answers with every metric in the Prometheus text
    exposition format (version 0.0.4, prometheus_client's generate_latest), which
    Prometheus and `curl` read; any other path is 404, any other method 405. One request
    per connection (the answer carries "Connection: close").

    What is served:
    * the counters and histograms that the daemons bump (lib/metrics.py): the files of
      prometheus_client's multiprocess format in metrics.directory() (on tmpfs, outside
      the queue), summed over every process, with MultiProcessCollector;
    * the queue, read at each request as showq reads it (lib/showq.py):
      postfix_showq_message_size_bytes{queue} and postfix_showq_message_age_seconds{queue}
      (postfix_exporter's histograms and buckets), postfix_queue_messages{queue} and
      postfix_queue_oldest_age_seconds{queue};
    * tlsmgr's session caches, from its status report: postfix_tlsmgr_cache_entries,
      postfix_tlsmgr_cache_lookups_total, _hits_total, _misses_total, _evictions_total,
      each with a cache label (smtpd, smtp, lmtp);
    * the processes of this master: postfix_processes{service,program} and
      postfix_process_uss_bytes{service,program} (psutil: the master's children by their process
      title, `postfix-py/smtpd -n smtp -t inet`; USS where smaps can be read, else
      resident minus shared pages);
    * postfix_up 1.

    Worker processes come and go (max_use, max_idle); their counts stay in the slot files
    they wrote (lib/metrics.py), as many as the workers that ran at once, so that the
    directory and the work of a scrape stay in proportion to the process limits, not to
    every process since the start.

SECURITY
    The counters carry no addresses and no message content, but client names, next hops
    and queue sizes are an operator's business: listen on loopback (the shipped line does),
    or let a firewall decide. The service runs as mail_owner without chroot: it reads
    /proc for the process counts and the counter files outside the queue; jailed, it
    stops with a fatal error. It reads at most 8192 bytes of request.

CONFIGURATION PARAMETERS
    queue_directory: the queue (and the name of the counter files' directory).
    ipc_timeout (3600s) bounds nothing here; a request must arrive within 10 seconds.

SEE ALSO
    lib/metrics.py, lib/showq.py; prometheus_client multiprocess mode;
    prometheus-postfix-exporter (whose metric names are kept).
"""

from __future__ import annotations

import glob
import os
import time

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from ..lib import metrics, msg, server, showq, tlsmgr_client

REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 10.0
SIZE_BUCKETS = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9)              # postfix_exporter's
AGE_BUCKETS = (1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
# --- what is read at each request -----------------------------------------------------------

def _histogram(name: str, doc: str, buckets, by_queue: dict) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["queue"])
    for queue, values in by_queue.items():
        counts = [sum(1 for v in values if v <= b) for b in buckets]
        family.add_metric([queue], [(repr(float(b)), c) for b, c in zip(buckets, counts)]
                          + [("+Inf", len(values))], sum(values))
    return family


def queue_metrics(queue_root: str, now: float | None = None) -> list:
    """The showq histograms and the per-queue gauges."""
    now = time.time() if now is None else now
    sizes = {q: [] for q in showq.SHOW_QUEUES}
    ages = {q: [] for q in showq.SHOW_QUEUES}
    for m in showq.messages(queue_root):
        sizes[m["queue_name"]].append(m["message_size"])
        ages[m["queue_name"]].append(max(0.0, now - m["arrival_time"]))
    count = GaugeMetricFamily("postfix_queue_messages", "Messages in each queue.",
                              labels=["queue"])
    oldest = GaugeMetricFamily("postfix_queue_oldest_age_seconds",
                               "Age of the oldest message of each queue (0 when empty).",
                               labels=["queue"])
    for q in showq.SHOW_QUEUES:
        count.add_metric([q], len(sizes[q]))
        oldest.add_metric([q], max(ages[q], default=0.0))
    return [_histogram("postfix_showq_message_size_bytes",
                       "Size of messages in Postfix's message queue, in bytes",
                       SIZE_BUCKETS, sizes),
            _histogram("postfix_showq_message_age_seconds",
                       "Age of messages in Postfix's message queue, in seconds",
                       AGE_BUCKETS, ages),
            count, oldest]


def tlsmgr_metrics(report: dict | None) -> list:
    """tlsmgr's session cache counters, from its status report."""
    if not report:
        return []
    entries = GaugeMetricFamily("postfix_tlsmgr_cache_entries",
                                "Sessions in each TLS session cache.", labels=["cache"])
    families = {name: CounterMetricFamily(f"postfix_tlsmgr_cache_{name}",
                                          f"TLS session cache {name}.", labels=["cache"])
                for name in ("lookups", "hits", "misses", "evictions")}
    for kind, stats in sorted(report.get("caches", {}).items()):
        if not stats.get("enabled"):
            continue
        entries.add_metric([kind], stats.get("entries", 0))
        for name, family in families.items():
            source = "evicted" if name == "evictions" else name
            family.add_metric([kind], stats.get(source, 0))
    return [entries, *families.values()]


def _service_of(cmdline: list[str]) -> tuple[str, str] | None:
    """(service, program) of a worker from its title: `x/smtpd -n submission -t inet`."""
    words = " ".join(cmdline).split()
    if len(words) >= 3 and "-n" in words[1:] and words.index("-n") + 1 < len(words):
        return words[words.index("-n") + 1], words[0].rsplit("/", 1)[-1]
    return None


def _private_bytes(proc) -> float:
    """USS from smaps; where smaps is closed to us, resident minus shared pages (statm).

    A worker that dropped privileges is not dumpable, so its smaps belongs to root even
    when it runs as mail_owner; statm stays readable, and its RSS minus the pages shared
    with other processes is the private part, which is what USS counts (less the private
    pages of mapped files).
    """
    try:
        return proc.memory_full_info().uss
    except psutil.AccessDenied:
        mem = proc.memory_info()
        return max(0, mem.rss - mem.shared)


def process_metrics(master_pid: int) -> list:
    """Process counts and USS per service, for the master's children."""
    counts: dict[tuple, int] = {}
    uss: dict[tuple, float] = {}
    try:
        children = psutil.Process(master_pid).children()
    except (psutil.Error, OSError):
        children = []           # no /proc (a chrooted metrics service): no process counts
    for proc in children:
        try:
            service = _service_of(proc.cmdline())
        except (psutil.Error, OSError):
            continue
        if service is None:
            continue
        counts[service] = counts.get(service, 0) + 1
        try:
            uss[service] = uss.get(service, 0.0) + _private_bytes(proc)
        except (psutil.Error, OSError):
            pass                # gone meanwhile: counted, not measured
    procs = GaugeMetricFamily("postfix_processes", "Worker processes of each service.",
                              labels=["service", "program"])
    memory = GaugeMetricFamily("postfix_process_uss_bytes", "Unique set size of the "
                               "workers of each service that this process may read.",
                               labels=["service", "program"])
    for service in sorted(counts):
        procs.add_metric(list(service), counts[service])
        if service in uss:
            memory.add_metric(list(service), uss[service])
    return [procs, memory]


class _Files:
    """MultiProcessCollector's sum, over the files this process may read (workers make
    them mail_owner's; one that is not must not make the whole answer fail)."""

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self):
        files = [f for f in glob.glob(os.path.join(self.directory, "*.db"))
                 if os.access(f, os.R_OK)]
        return MultiProcessCollector.merge(files, accumulate=True)


class _Live:
    """A collector of what is read at each request."""

    def __init__(self, queue_root: str, master_pid: int):
        self.queue_root = queue_root
        self.master_pid = master_pid

    def collect(self):
        up = GaugeMetricFamily("postfix_up", "Whether postfix-py's master answers (1).",
                               labels=["path"])
        up.add_metric([self.queue_root], 1)
        yield up
        try:
            yield from queue_metrics(self.queue_root)
        except OSError as exc:
            msg.warn(f"metrics: queue: {exc.filename}: {exc.strerror}")
        yield from tlsmgr_metrics(tlsmgr_client.status())
        yield from process_metrics(self.master_pid)


def exposition(ctx) -> bytes:
    """Everything, in the Prometheus text format."""
    directory = metrics.directory(server.queue_root(ctx.cfg))
    registry = CollectorRegistry(auto_describe=False)
    if os.path.isdir(directory):
        registry.register(_Files(directory))
    registry.register(_Live(ctx.queue_root, os.getppid()))
    return generate_latest(registry)


# --- HTTP ------------------------------------------------------------------------------

def _read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < REQUEST_LIMIT:
        chunk = conn.recv(REQUEST_LIMIT - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _answer(conn, status: str, body: bytes, content_type: str = "text/plain",
            head_only: bool = False) -> None:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    conn.sendall(head.encode("ascii") + (b"" if head_only else body))


def service(conn, ctx) -> None:
    """One HTTP request."""
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        request = _read_request(conn)
    except TimeoutError:
        return
    words = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(words) != 3 or not words[2].startswith(b"HTTP/"):
        _answer(conn, "400 Bad Request", b"bad request\n")
        return
    method, target = words[0], words[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        _answer(conn, "405 Method Not Allowed", b"GET /metrics\n")
        return
    if target != b"/metrics":
        _answer(conn, "404 Not Found", b"GET /metrics\n")
        return
    body = exposition(ctx)
    _answer(conn, "200 OK", body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")


def pre_init(ctx) -> None:
    if ctx.run_as_root and ctx.service.chroot:
        msg.fatal(f"service {ctx.service.name}: the metrics service cannot run chrooted "
                  f"(master.cf chroot column: n): it reads /proc and "
                  f"{metrics.directory(server.queue_root(ctx.cfg))}")


def post_init(ctx) -> None:
    tlsmgr_client.configure(cfg=ctx.cfg)


def main(ctx) -> int:
    """Serve scrapes until the master retires this process."""
    return server.single_server(ctx, service, pre_init=pre_init, post_init=post_init)
