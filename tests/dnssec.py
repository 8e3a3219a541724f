"""A real DNSSEC stack on loopback for tests: ldns signs, nsd serves, unbound validates.

DnssecStack(directory) takes zones with add_zone(name, records, signed=True, tamper=())
and start() then:
  * for each signed zone, makes one ECDSAP256SHA256 key with ldns-keygen (a KSK that
    also signs the zone: small and fast) and signs the zone with ldns-signzone; the
    lines of `tamper` (owner names) get their record data changed after signing, so
    that their RRSIGs no longer verify: a bogus answer;
  * runs nsd (foreground, by pid) on 127.0.0.1:port with every zone;
  * runs unbound (foreground, by pid) on 127.0.0.1:resolver_port with a stub-zone per
    zone pointing at nsd, `do-not-query-localhost: no`, and the signed zones' DNSKEY as
    trust anchors (no root: an unsigned zone is simply insecure, no AD bit).
stop() ends both by pid. query(name, rdtype) asks unbound (DO and AD set) and returns the
dnspython answer message, for readiness checks and tests.

The tools are Debian's ldnsutils, nsd and unbound; available() says whether they are there.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
from peers import free_port, reap

LDNS_KEYGEN = shutil.which("ldns-keygen", path="/usr/bin:/usr/sbin")
LDNS_SIGNZONE = shutil.which("ldns-signzone", path="/usr/bin:/usr/sbin")
NSD = shutil.which("nsd", path="/usr/sbin:/usr/bin")
UNBOUND = shutil.which("unbound", path="/usr/sbin:/usr/bin")


def available() -> bool:
    """Whether ldns, nsd and unbound are installed."""
    return all((LDNS_KEYGEN, LDNS_SIGNZONE, NSD, UNBOUND))


def _run(args, cwd):
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {out.stderr.strip()}")
    return out.stdout


class DnssecStack:
    """nsd and unbound on loopback with test zones (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.zones: list[tuple[str, list[str], bool, tuple]] = []
        self.port = free_port()
        self.resolver_port = free_port()
        self.pids: list[int] = []
        self.anchors: list[Path] = []

    def add_zone(self, name: str, records: list[str], signed: bool = True, tamper=()):
        """A zone: records as zone-file lines with absolute owner names."""
        self.zones.append((name.rstrip(".") + ".", records, signed, tuple(tamper)))

    def _zone_file(self, name: str, records: list[str], signed: bool, tamper) -> Path:
        path = self.dir / f"{name}zone"
        head = [f"$ORIGIN {name}", "$TTL 300",
                f"{name} IN SOA ns.{name} hostmaster.{name} 1 3600 600 86400 300",
                f"{name} IN NS ns.{name}", f"ns.{name} IN A 127.0.0.1"]
        path.write_text("\n".join(head + records) + "\n")
        if not signed:
            return path
        keyname = _run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", name], self.dir).strip()
        anchor = self.dir / f"{keyname}.key"
        self.anchors.append(anchor)
        _run([LDNS_SIGNZONE, "-o", name, "-f", str(path) + ".signed", str(path), keyname],
             self.dir)
        signed_path = Path(str(path) + ".signed")
        if tamper:
            lines = []
            for line in signed_path.read_text().splitlines():
                fields = line.split()
                if fields and fields[0].rstrip(".") in [t.rstrip(".") for t in tamper] \
                        and len(fields) > 4 and fields[3] not in ("RRSIG", "NSEC", "NSEC3"):
                    # Flip the last hex digit of the data: the signature no longer fits.
                    last = fields[-1]
                    fields[-1] = last[:-1] + ("0" if last[-1] != "0" else "1")
                    line = "\t".join(fields)
                lines.append(line)
            signed_path.write_text("\n".join(lines) + "\n")
        return signed_path

    def start(self) -> None:
        """Sign, serve and validate; wait until unbound answers."""
        files = [(name, self._zone_file(name, recs, signed, tamper))
                 for name, recs, signed, tamper in self.zones]
        nsd_conf = self.dir / "nsd.conf"
        nsd_conf.write_text(
            "server:\n"
            f"  ip-address: 127.0.0.1@{self.port}\n"
            "  username: \"\"\n  chroot: \"\"\n"
            f"  zonesdir: \"{self.dir}\"\n"
            f"  database: \"\"\n  zonelistfile: \"{self.dir}/zone.list\"\n"
            f"  xfrdfile: \"{self.dir}/xfrd.state\"\n  pidfile: \"{self.dir}/nsd.pid\"\n"
            f"  logfile: \"{self.dir}/nsd.log\"\n  server-count: 1\n  verbosity: 1\n"
            "remote-control:\n  control-enable: no\n"
            + "".join(f"zone:\n  name: \"{name}\"\n  zonefile: \"{path}\"\n"
                      for name, path in files))
        nsd = subprocess.Popen([NSD, "-d", "-c", str(nsd_conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        self.pids.append(nsd.pid)
        self._procs = [nsd]
        ub_conf = self.dir / "unbound.conf"
        ub_conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1\n  port: {self.resolver_port}\n"
            "  do-ip6: no\n  do-not-query-localhost: no\n"
            "  username: \"\"\n  chroot: \"\"\n"
            f"  directory: \"{self.dir}\"\n  pidfile: \"{self.dir}/unbound.pid\"\n"
            f"  logfile: \"{self.dir}/unbound.log\"\n  use-syslog: no\n  verbosity: 1\n"
            "  module-config: \"validator iterator\"\n"
            "  num-threads: 1\n  so-reuseport: no\n  val-log-level: 2\n"
            "  cache-max-ttl: 0\n  cache-max-negative-ttl: 0\n"
            + "".join(f"  trust-anchor-file: \"{a}\"\n" for a in self.anchors)
            # unbound answers test., invalid. etc. itself (RFC 6761) unless told not to.
            + "".join(f"  local-zone: \"{tld}\" nodefault\n"
                      for tld in sorted({n.rstrip(".").rsplit(".", 1)[-1] + "."
                                         for n, _ in files}))
            + "remote-control:\n  control-enable: no\n"
            + "".join(f"stub-zone:\n  name: \"{name}\"\n  stub-addr: 127.0.0.1@{self.port}\n"
                      for name, _ in files))
        ub = subprocess.Popen([UNBOUND, "-d", "-c", str(ub_conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        self.pids.append(ub.pid)
        self._procs.append(ub)
        first = self.zones[0][0]
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = self.query(f"ns.{first}", "A")
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    return
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._procs):
                self.stop()
                raise RuntimeError("the DNSSEC stack did not come up: see "
                                   f"{self.dir}/nsd.log, {self.dir}/unbound.log")
            time.sleep(0.1)

    def query(self, name: str, rdtype: str):
        """unbound's reply to name/rdtype, with DO and AD set."""
        q = dns.message.make_query(name, rdtype, want_dnssec=True)
        q.flags |= dns.flags.AD
        return dns.query.udp(q, "127.0.0.1", timeout=2, port=self.resolver_port)

    def stop(self) -> None:
        """End nsd and unbound, by pid."""
        for proc in getattr(self, "_procs", []):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                reap(proc.pid, 0)
                proc.wait(5)
