"""The smtp/lmtp delivery agent through a real master, against real peers on loopback.

One postfix-py instance (chrooted smtp services, one per client configuration, with
master.cf -o overrides, plus tlsmgr and an lmtp service) delivers to:

* a private Debian Postfix instance with four smtpd ports: TLS, plain, TLS asking for a
  client certificate (permit_tls_clientcerts for relaying), and TLS with a certificate
  for another name; its virtual(8) mailbox shows what arrived;
* dnsmasq serving MX, A and CNAME records, and UDP servers that never answer or answer
  garbage;
* Dovecot's LMTP server (unix socket and TCP);
* a postfix-py smtpd instance;
* small scripted servers that misbehave: garbage, a 10 MB reply line, a stall mid-DATA,
  a 5xx greeting, a TLS handshake that breaks.

Each test queues a message with lib/queue.QueueWriter (incoming/, then active/), sends a
lib/deliver.py request to queue_directory/private/SERVICE as qmgr would, and checks the
reply, the log lines and the peer's mailbox.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import trustme

from pfxinst import Instance, free_port, wait_for
from postfix_py.lib import attr, deliver, tlsmgr_client
from postfix_py.lib import queue as Q
from postfix_py.lib import tls as libtls
from sink import FakeServer, lines_of

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
DNSMASQ = shutil.which("dnsmasq", path="/usr/sbin:/usr/bin")
DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, peers)")


def open_path(path: Path) -> None:
    """Let unprivileged daemons (postfix, nobody) traverse from / down to path."""
    for p in [path, *path.parents]:
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, 0o755)


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15) -> None:
    def up():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(up, timeout, what=f"{host}:{port} to listen")


def stop_pid(pid: int, timeout: float = 10) -> None:
    """End one process we started, by its pid: TERM, then KILL."""
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.NoSuchProcess:
        pass


# --- peers --------------------------------------------------------------------------------

class PostfixPeer:
    """A private Debian Postfix: smtpd ports on 127.0.0.1, virtual(8) mailbox sink."""

    def __init__(self, root: Path, certs, ports):
        self.root = root
        self.etc = root / "etc"
        self.queue = root / "queue"
        self.mail = root / "mail"
        self.maillog = root / "maillog"
        self.ports = ports
        pw = pwd.getpwnam("postfix")
        for d in (self.etc, self.queue, root / "data", self.mail):
            d.mkdir(parents=True, exist_ok=True)
        for d in (root / "data", self.mail):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        (root / "relay_clientcerts").write_text(f"{certs.client_fp} client.test.example\n")
        main = {
            "compatibility_level": "3.6", "queue_directory": self.queue,
            "data_directory": root / "data", "mail_owner": "postfix",
            "setgid_group": "postdrop", "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4", "myhostname": "peer.test.example", "mydestination": "",
            "maillog_file": self.maillog, "maillog_file_prefixes": "/tmp",
            "virtual_mailbox_domains": "sink.test.example", "virtual_mailbox_base": self.mail,
            "virtual_mailbox_maps": "static:sink", "virtual_uid_maps": f"static:{pw.pw_uid}",
            "virtual_gid_maps": f"static:{pw.pw_gid}", "mynetworks": "127.0.0.0/8",
            "transport_maps": "inline:{relay.test.example=discard:}",
            "smtpd_tls_cert_file": certs.good, "smtpd_tls_security_level": "may",
            "smtpd_tls_CAfile": certs.ca, "smtpd_tls_loglevel": "1",
            "relay_clientcerts": f"texthash:{root / 'relay_clientcerts'}",
            "smtp_dns_support_level": "disabled", "smtpd_peername_lookup": "no",
            "smtpd_error_sleep_time": "0", "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix", "command_directory": "/usr/sbin",
            "meta_directory": "/etc/postfix",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        services = [
            f"127.0.0.1:{ports.tls} inet n - n - - smtpd",
            f"127.0.0.1:{ports.plain} inet n - n - - smtpd -o smtpd_tls_security_level=none",
            f"127.0.0.1:{ports.ccert} inet n - n - - smtpd -o smtpd_tls_ask_ccert=yes"
            " -o smtpd_relay_restrictions=permit_tls_clientcerts,reject_unauth_destination",
            f"127.0.0.1:{ports.other} inet n - n - - smtpd -o smtpd_tls_cert_file={certs.other}",
        ]
        for line in ("cleanup unix n - n - 0 cleanup", "qmgr unix n - n 300 1 qmgr",
                     "tlsmgr unix - - n 1000? 1 tlsmgr", "rewrite unix - - n - - trivial-rewrite",
                     "bounce unix - - n - 0 bounce", "defer unix - - n - 0 bounce",
                     "trace unix - - n - 0 bounce", "proxymap unix - - n - - proxymap",
                     "error unix - - n - - error", "retry unix - - n - - error",
                     "discard unix - - n - - discard", "virtual unix - n n - - virtual",
                     "anvil unix - - n - 1 anvil", "scache unix - - n - 1 scache",
                     "postlog unix-dgram n - n - 1 postlogd", "showq unix n - n - - showq",
                     "pickup unix n - n 60 1 pickup", "smtp unix - - n - - smtp"):
            services.append(line)
        (self.etc / "master.cf").write_text("\n".join(services) + "\n")

    def start(self):
        out = subprocess.run([POSTFIX, "-c", str(self.etc), "start"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        for port in vars(self.ports).values():
            wait_port(port)

    def stop(self):
        pid_file = self.queue / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        stop_pid(pid, 20)

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mailbox(self) -> str:
        try:
            return (self.mail / "sink").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def received(self, marker: str, timeout: float = 10) -> str:
        """The message with marker in it, once virtual(8) has written it."""
        def find():
            box = self.mailbox()
            return box if marker in box else ""
        return wait_for(find, timeout, what=f"{marker} in the peer's mailbox")


class DnsServer:
    """dnsmasq on 127.0.0.1:port with the records of these tests."""

    RECORDS = [
        "--mx-host=mx.test,a.mx.test,10", "--mx-host=mx.test,b.mx.test,20",
        "--host-record=a.mx.test,127.0.0.2", "--host-record=b.mx.test,127.0.0.1",
        "--mx-host=tls.test,mx.tls.test,10", "--host-record=mx.tls.test,127.0.0.1",
        "--mx-host=cname.test,cn.mx.test,10", "--cname=cn.mx.test,real.test",
        "--host-record=real.test,127.0.0.1", "--host-record=nomx.test,127.0.0.1",
        "--host-record=localhost,127.0.0.1",
    ]

    def __init__(self, root: Path):
        self.port = free_port()
        self.log = open(root / "dnsmasq.log", "w")
        self.proc = subprocess.Popen(
            [DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
             "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={self.port}",
             "--pid-file=", "--user=nobody", "--group=nogroup", "--local=/test/",
             *self.RECORDS], stdout=self.log, stderr=subprocess.STDOUT)
        import dns.resolver
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.lifetime = 0.5

        def answers():
            try:
                return r.resolve("b.mx.test", "A")
            except Exception:       # noqa: BLE001 - not up yet
                return None
        wait_for(answers, 10, what="dnsmasq")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class UdpJunk:
    """A UDP "DNS server" that answers nothing (dead) or garbage (junk)."""

    def __init__(self, junk: bool):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.junk = junk
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            if self.junk:
                self.sock.sendto(data[:2] + b"\x85\x80\x00\x01\xff\xff nonsense" * 3, peer)

    def stop(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


def simple_smtp(conn, greeting=b"220 fake.test ESMTP\r\n", rcpt_reply=b"250 2.1.5 Ok\r\n",
                got=None):
    """A minimal well-behaved SMTP server dialogue after greeting."""
    readline, read_data = lines_of(conn)
    conn.sendall(greeting)
    while True:
        line = readline().upper()
        if line.startswith(("EHLO", "HELO")):
            conn.sendall(b"250-fake.test\r\n250 8BITMIME\r\n")
        elif line.startswith("MAIL"):
            conn.sendall(b"250 2.1.0 Ok\r\n")
        elif line.startswith("RCPT"):
            conn.sendall(rcpt_reply)
        elif line.startswith("DATA"):
            conn.sendall(b"354 go ahead\r\n")
            data = read_data()
            if got is not None:
                got.append(data)
            conn.sendall(b"250 2.0.0 Ok: queued as FAKE1\r\n")
        elif line.startswith("QUIT"):
            conn.sendall(b"221 2.0.0 Bye\r\n")
            return
        else:
            conn.sendall(b"502 5.5.2 what\r\n")


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("smtpdeliv")
    open_path(root)
    return root


@pytest.fixture(scope="module")
def certs(base):
    d = base / "certs"
    d.mkdir()
    ca = trustme.CA()
    good = ca.issue_cert("mx.test.example", "localhost", "127.0.0.1", "mx.tls.test",
                         "b.mx.test", "cn.mx.test")
    other = ca.issue_cert("other.test.example")
    client = ca.issue_cert("client.test.example")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    for name, cert in (("good", good), ("other", other), ("client", client)):
        cert.private_key_and_cert_chain_pem.write_to_path(str(d / f"{name}.pem"))
        os.chmod(d / f"{name}.pem", 0o644)
    open_path(d)
    return SimpleNamespace(
        dir=d, ca=d / "ca.pem", good=d / "good.pem", other=d / "other.pem",
        client=d / "client.pem", ca_obj=ca,
        client_fp=libtls.fingerprint(client.cert_chain_pems[0].bytes(), "sha256"),
        other_fp=libtls.fingerprint(other.cert_chain_pems[0].bytes(), "sha256"))


@pytest.fixture(scope="module")
def peer(base, certs):
    if not POSTFIX:
        pytest.skip("Debian's postfix is not installed")
    ports = SimpleNamespace(tls=free_port(), plain=free_port(), ccert=free_port(),
                            other=free_port())
    p = PostfixPeer(base / "peer", certs, ports)
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def dns(base):
    if not DNSMASQ:
        pytest.skip("dnsmasq is not installed")
    server = DnsServer(base)
    dead, junk = UdpJunk(False), UdpJunk(True)
    server.dead, server.junk = dead, junk
    try:
        yield server
    finally:
        server.stop()
        dead.stop()
        junk.stop()


SERVICES = {
    # name: -o overrides (CA and table paths filled in by the fixture)
    "smtp": {},
    "tlsmay": {"smtp_tls_security_level": "may", "smtp_tls_loglevel": "1",
               "smtp_tls_CAfile": "{ca}"},
    "tlsverify": {"smtp_tls_security_level": "verify", "smtp_tls_loglevel": "1",
                  "smtp_tls_CAfile": "{ca}"},
    "tlssecure": {"smtp_tls_security_level": "secure", "smtp_tls_loglevel": "1",
                  "smtp_tls_CAfile": "{ca}"},
    "legacyuse": {"smtp_use_tls": "yes", "smtp_tls_loglevel": "1"},
    "legacyenforce": {"smtp_enforce_tls": "yes", "smtp_tls_loglevel": "1",
                      "smtp_tls_CAfile": "{ca}"},
    "legacynopeer": {"smtp_enforce_tls": "yes", "smtp_tls_enforce_peername": "no",
                     "smtp_tls_loglevel": "1"},
    "noteoffer": {"smtp_tls_note_starttls_offer": "yes"},
    "persite": {"smtp_tls_per_site": "texthash:{per_site}", "smtp_tls_loglevel": "1",
                "smtp_tls_CAfile": "{ca}"},
    "policy": {"smtp_tls_policy_maps": "texthash:{policy}", "smtp_tls_loglevel": "1"},
    "cnameno": {"smtp_tls_security_level": "verify", "smtp_tls_CAfile": "{ca}"},
    "cnameyes": {"smtp_tls_security_level": "verify", "smtp_tls_CAfile": "{ca}",
                 "smtp_cname_overrides_servername": "yes"},
    "clientcert": {"smtp_tls_security_level": "may", "smtp_tls_cert_file": "{client}",
                   "smtp_tls_loglevel": "1"},
    "cache": {"smtp_tls_security_level": "may", "smtp_tls_loglevel": "2",
              "smtp_tls_CAfile": "{ca}"},
    "tlsmaysasl": {"smtp_tls_security_level": "may", "smtp_sasl_auth_enable": "yes",
                   "smtp_sasl_password_maps": "texthash:{sasl}"},
    "cacheenc": {"smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "2",
                 "smtp_tls_CAfile": "{ca}"},
    "limit1": {"smtp_mx_session_limit": "1"},
    "addrlimit1": {"smtp_mx_address_limit": "1"},
    "no5xxskip": {"smtp_skip_5xx_greeting": "no"},
    "fast": {"smtp_helo_timeout": "2s", "smtp_data_xfer_timeout": "1s",
             "smtp_data_done_timeout": "2s"},
    "dnsdead": {"smtp_dns_nameservers": "127.0.0.1:{dead}", "smtp_dns_timeout": "1s"},
    "dnsjunk": {"smtp_dns_nameservers": "127.0.0.1:{junk}", "smtp_dns_timeout": "1s"},
}


@pytest.fixture(scope="module")
def mta(base, certs, peer, dns):
    """The postfix-py instance under test, with one smtp service per configuration."""
    P = peer.ports
    per_site = base / "tls_per_site"
    per_site.write_text(
        f"[127.0.0.1]:{P.plain} MUST\n"               # TLS demanded, not offered
        f"[localhost]:{P.tls} MUST\n"                 # the DNS loophole closed: [host] key
        f"[127.0.0.1]:{P.other} MUST_NOPEERMATCH\n"   # another name: fine without a match
        f"[127.0.0.1]:{P.tls} NONE\n"                 # offered, but not used
        "mx.tls.test MUST\n")                         # by MX host name
    policy = base / "tls_policy"
    policy.write_text(
        f"[127.0.0.1]:{P.tls} encrypt protocols=<=TLSv1.2\n"
        f"[127.0.0.1]:{P.plain} encrypt\n"
        f"[127.0.0.1]:{P.other} fingerprint match={certs.other_fp}\n"
        f"[localhost]:{P.other} fingerprint match=AA:BB\n"
        f"nomx.test verify bogus=1\n")
    sasl = base / "sasl_passwd"
    sasl.write_text("127.0.0.3 user:secret\n")
    values = {"ca": certs.ca, "client": certs.client, "per_site": per_site, "sasl": sasl,
              "policy": policy, "dead": dns.dead.port, "junk": dns.junk.port}
    inst = Instance(base / "pfx")
    inst.dir.mkdir(exist_ok=True)
    inst.main.update({
        "inet_protocols": "ipv4", "smtp_dns_nameservers": f"127.0.0.1:{dns.port}",
        "smtp_dns_timeout": "2s", "smtp_connect_timeout": "3s", "smtp_helo_timeout": "5s",
        "smtp_mail_timeout": "5s", "smtp_rcpt_timeout": "5s", "smtp_data_init_timeout": "5s",
        "smtp_data_xfer_timeout": "5s", "smtp_data_done_timeout": "5s",
        "smtp_quit_timeout": "5s", "smtp_starttls_timeout": "5s",
        "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
    })
    lines = ["tlsmgr unix - - y 1000? 1 tlsmgr", "lmtp unix - - n - - lmtp"]
    for name, overrides in SERVICES.items():
        opts = "".join(f" -o {k}={v.format(**values)}" for k, v in overrides.items())
        lines.append(f"{name} unix - - y - - smtp{opts}")
    inst.master_lines = lines
    inst.uid_gid = (pwd.getpwnam(inst.main["mail_owner"]).pw_uid,
                    pwd.getpwnam(inst.main["mail_owner"]).pw_gid)
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "private" / "smtp").exists(), 10, what="private/smtp")
        yield inst
    finally:
        inst.cleanup()


# --- delivering -------------------------------------------------------------------------------

@dataclass
class Outcome:
    reply: deliver.DeliveryStatus
    qid: str
    log: str
    path: Path

    @property
    def results(self):
        return [(r.result, r.dsn) for r in self.reply.results]

    def reason(self, i=0):
        return self.reply.results[i].reason


_counter = [0]


def queue_message(inst, recipients, content=None, sender="alice@example.org"):
    """A committed queue file in active/, owned by mail_owner; (qid, path, marker)."""
    _counter[0] += 1
    marker = f"marker-{os.getpid()}-{_counter[0]}-{time.monotonic_ns()}"
    if content is None:
        content = (f"Subject: {marker}\nMessage-ID: <{marker}@test>\n\n"
                   f".leading dot\nbody\n").encode()
    w = Q.QueueWriter(str(inst.queue))
    w.set_sender(sender)
    for r in recipients:
        w.add_recipient(r)
    w.write(content)
    qid = w.commit()
    path = inst.queue / "active" / qid
    os.rename(inst.queue / "incoming" / qid, path)
    os.chown(path, *getattr(inst, "uid_gid", (0, 0)))
    return qid, path, marker


def deliver_via(inst, service, nexthop, recipients=("bob@sink.test.example",), content=None,
                timeout=60, arrival=None):
    """Send qmgr's request to private/SERVICE; the reply, the log lines it caused.
    arrival: the request's arrival time, when not the queue file's (a deferred message)."""
    qid, path, marker = queue_message(inst, recipients, content)
    m = Q.read(str(path))
    req = deliver.Request(qid, f"active/{qid}", service, nexthop, m.sender,
                          m.arrival if arrival is None else arrival,
                          list(recipients), [r.offset for r in m.recipients])
    before = len(inst.log())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(inst.queue / "private" / service))
        s.sendall(deliver.encode_request(req))
        attrs = attr.read_frame(s, timeout)
    reply = deliver.decode_reply(attrs, len(recipients))
    out = Outcome(reply, qid, inst.log()[before:], path)
    out.marker = marker
    return out


# --- plain SMTP, DNS, MX -------------------------------------------------------------------

def test_plain_delivery_to_postfix(mta, peer):
    out = deliver_via(mta, "smtp", f"[127.0.0.1]:{peer.ports.plain}")
    assert out.results == [("sent", "2.0.0")]
    assert out.reason().startswith("250 2.0.0 Ok: queued as ")
    assert out.reply.relay == f"127.0.0.1[127.0.0.1]:{peer.ports.plain}"
    assert (f"{out.qid}: to=<bob@sink.test.example>, relay=127.0.0.1[127.0.0.1]:"
            f"{peer.ports.plain}, delay=") in out.log
    assert ", dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as " in out.log
    box = peer.received(out.marker)
    # Dot-stuffing undone by the receiving side: the line arrived as written.
    assert "\n.leading dot\n" in box
    assert out.path.exists()       # the agent never touches the queue file


def test_mx_order_connection_refused_then_next(mta, peer):
    out = deliver_via(mta, "smtp", f"mx.test:{peer.ports.plain}")
    assert out.results == [("sent", "2.0.0")]
    assert (f"connect to a.mx.test[127.0.0.2]:{peer.ports.plain}: Connection refused"
            in out.log)
    assert out.reply.relay == f"b.mx.test[127.0.0.1]:{peer.ports.plain}"


def test_no_mx_record_uses_the_address(mta, peer):
    out = deliver_via(mta, "smtp", f"nomx.test:{peer.ports.plain}")
    assert out.results == [("sent", "2.0.0")]
    assert out.reply.relay == f"nomx.test[127.0.0.1]:{peer.ports.plain}"


def test_unknown_domain_bounces(mta):
    out = deliver_via(mta, "smtp", "nowhere.test")
    assert out.results == [("bounced", "5.4.4")]
    assert out.reason() == ("Host or domain name not found. Name service error for "
                            "name=nowhere.test type=A: Host not found")
    assert "relay=none" in out.log and "status=bounced" in out.log


@pytest.mark.parametrize("service", ["dnsdead", "dnsjunk"])
def test_dns_timeout_or_nonsense_defers(mta, service):
    out = deliver_via(mta, service, "mx.test")
    assert out.results == [("deferred", "4.4.3")]
    assert out.reason() == ("Host or domain name not found. Name service error for "
                            "name=mx.test type=MX: Host not found, try again")
    assert out.path.exists()


def test_all_servers_refuse_connections(mta):
    port = free_port()
    out = deliver_via(mta, "smtp", f"mx.test:{port}")
    assert out.results == [("deferred", "4.4.1")]
    assert out.reason() == f"connect to b.mx.test[127.0.0.1]:{port}: Connection refused"
    assert f"connect to a.mx.test[127.0.0.2]:{port}: Connection refused" in out.log


def test_mx_address_limit(mta, peer):
    # Only the first address is tried: a.mx.test refuses, b.mx.test is never reached.
    out = deliver_via(mta, "addrlimit1", f"mx.test:{peer.ports.plain}")
    assert out.results == [("deferred", "4.4.1")]
    assert out.reason() == (f"connect to a.mx.test[127.0.0.2]:{peer.ports.plain}: "
                            f"Connection refused")
    assert "b.mx.test" not in out.log


def test_5xx_greeting_tries_the_next_server(mta, peer):
    fake = FakeServer(lambda c: c.sendall(b"554 5.7.1 not you\r\n") or c.recv(100),
                      host="127.0.0.2", port=peer.ports.plain)
    try:
        out = deliver_via(mta, "smtp", f"mx.test:{peer.ports.plain}")
        assert out.results == [("sent", "2.0.0")]
        assert (f"{out.qid}: host a.mx.test[127.0.0.2] refused to talk to me: "
                f"554 5.7.1 not you") in out.log
        out = deliver_via(mta, "no5xxskip", f"mx.test:{peer.ports.plain}")
        assert out.results == [("bounced", "5.7.1")]
    finally:
        fake.stop()


def test_soft_rcpt_failure_moves_on_and_session_limit(mta, peer):
    fake = FakeServer(lambda c: simple_smtp(c, rcpt_reply=b"450 4.2.0 greylisted\r\n"),
                      host="127.0.0.2", port=peer.ports.plain)
    try:
        out = deliver_via(mta, "smtp", f"mx.test:{peer.ports.plain}")
        assert out.results == [("sent", "2.0.0")]
        assert (f"{out.qid}: host a.mx.test[127.0.0.2] said: 450 4.2.0 greylisted "
                f"(in reply to RCPT TO command)") in out.log
        # smtp_mx_session_limit = 1: the first session was the last.
        out = deliver_via(mta, "limit1", f"mx.test:{peer.ports.plain}")
        assert out.results == [("deferred", "4.2.0")]
        assert out.reason() == ("host a.mx.test[127.0.0.2] said: 450 4.2.0 greylisted "
                                "(in reply to RCPT TO command)")
    finally:
        fake.stop()


def test_per_recipient_results_from_postfix(mta, peer):
    out = deliver_via(mta, "smtp", f"[127.0.0.1]:{peer.ports.ccert}",
                      recipients=("bob@sink.test.example", "eve@relay.test.example"))
    assert out.results == [("sent", "2.0.0"), ("bounced", "5.7.1")]
    assert out.reason(1) == ("host 127.0.0.1[127.0.0.1] said: 554 5.7.1 "
                             "<eve@relay.test.example>: Relay access denied (in reply to "
                             "RCPT TO command)")


# --- misbehaving servers ------------------------------------------------------------------

def test_garbage_server(mta):
    fake = FakeServer(lambda c: c.sendall(b"\x00\x01\x02garbage\r\n" * 100))
    try:
        out = deliver_via(mta, "fast", f"[127.0.0.1]:{fake.port}")
    finally:
        fake.stop()
    assert out.results == [("deferred", "4.4.2")]
    assert out.reason() == ("lost connection with 127.0.0.1[127.0.0.1] while receiving the "
                            "initial server greeting")
    assert "Traceback" not in mta.log()


def test_ten_megabyte_reply_line(mta):
    got = []
    huge = b"220-" + b"x" * (10 * 1024 * 1024) + b"\r\n"
    fake = FakeServer(lambda c: simple_smtp(c, greeting=huge + b"220 ok\r\n", got=got))
    try:
        out = deliver_via(mta, "fast", f"[127.0.0.1]:{fake.port}")
    finally:
        fake.stop()
    assert out.results == [("sent", "2.0.0")], out.reason()
    assert got and b"..leading dot" in got[0]


def test_server_stalls_mid_data(mta):
    def stall(conn):
        readline, _ = lines_of(conn)
        conn.sendall(b"220 stall ESMTP\r\n")
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
            readline()
            conn.sendall(reply)
        time.sleep(4)
    fake = FakeServer(stall, rcvbuf=4096)
    content = b"Subject: big\n\n" + (b"y" * 76 + b"\n") * (8 * 1024 * 1024 // 77)
    try:
        out = deliver_via(mta, "fast", f"[127.0.0.1]:{fake.port}", content=content)
    finally:
        fake.stop()
    assert out.results == [("deferred", "4.4.2")]
    assert out.reason() == ("conversation with 127.0.0.1[127.0.0.1] timed out while "
                            "sending message body")
    assert out.path.exists()


def test_unreadable_queue_file_defers(mta):
    req = deliver.Request("ABCDE", "active/ABCDE", "smtp", "[127.0.0.1]:1", "", time.time(),
                          ["x@example.org"], [0])
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(mta.queue / "private" / "smtp"))
        s.sendall(deliver.encode_request(req))
        reply = deliver.decode_reply(attr.read_frame(s, 30), 1)
    assert [(r.result, r.dsn, r.reason) for r in reply.results] == \
        [("deferred", "4.3.0", "unreadable mail queue entry")]


def test_bad_request_frame_gets_status_2(mta):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(mta.queue / "private" / "smtp"))
        s.sendall(attr.encode({"request": "deliver", "queue_id": "X"}))
        reply = attr.read_frame(s, 30)
    assert reply["status"] == b"2" and b"missing attribute" in reply["reason"]


# --- TLS ------------------------------------------------------------------------------------

def tls_line(status, relay, proto="TLSv1.3"):
    return f"{status} TLS connection established to {relay}: {proto} with cipher "


def test_tls_may_with_postfix(mta, peer):
    out = deliver_via(mta, "tlsmay", f"[127.0.0.1]:{peer.ports.tls}")
    relay = f"127.0.0.1[127.0.0.1]:{peer.ports.tls}"
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Trusted", relay) in out.log
    assert "with ESMTPS id" in peer.received(out.marker)
    # Not offered: plain text at "may".
    out = deliver_via(mta, "tlsmay", f"[127.0.0.1]:{peer.ports.plain}")
    assert out.results == [("sent", "2.0.0")] and "TLS connection" not in out.log


def test_tls_verify_and_secure(mta, peer):
    P = peer.ports
    out = deliver_via(mta, "tlsverify", f"[localhost]:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"localhost[127.0.0.1]:{P.tls}") in out.log
    out = deliver_via(mta, "tlsverify", f"[127.0.0.1]:{P.other}")
    assert out.results == [("deferred", "4.7.5")]
    assert out.reason() == "Server certificate not verified"
    assert (f"server certificate verification failed for 127.0.0.1[127.0.0.1]:{P.other}: "
            "num=64:IP address mismatch") in out.log
    out = deliver_via(mta, "tlssecure", f"tls.test:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"mx.tls.test[127.0.0.1]:{P.tls}") in out.log
    out = deliver_via(mta, "tlssecure", f"[127.0.0.1]:{P.other}")
    assert out.results == [("deferred", "4.7.5")]


def test_legacy_parameters(mta, peer):
    P = peer.ports
    out = deliver_via(mta, "legacyuse", f"[127.0.0.1]:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Untrusted", f"127.0.0.1[127.0.0.1]:{P.tls}") in out.log
    assert deliver_via(mta, "legacyuse", f"[127.0.0.1]:{P.plain}").results == [("sent", "2.0.0")]
    out = deliver_via(mta, "legacyenforce", f"[127.0.0.1]:{P.plain}")
    assert out.results == [("deferred", "4.7.4")]
    assert out.reason() == "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]"
    assert out.path.exists()
    out = deliver_via(mta, "legacyenforce", f"[localhost]:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"localhost[127.0.0.1]:{P.tls}") in out.log
    out = deliver_via(mta, "legacyenforce", f"[127.0.0.1]:{P.other}")
    assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                           "Server certificate not verified")
    out = deliver_via(mta, "legacynopeer", f"[127.0.0.1]:{P.other}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Untrusted", f"127.0.0.1[127.0.0.1]:{P.other}") in out.log


def test_note_starttls_offer(mta, peer):
    out = deliver_via(mta, "noteoffer", f"[127.0.0.1]:{peer.ports.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert "Host offered STARTTLS: [127.0.0.1]" in out.log
    assert "TLS connection established" not in out.log


def test_per_site_table(mta, peer):
    P = peer.ports
    out = deliver_via(mta, "persite", f"[127.0.0.1]:{P.plain}")
    assert (out.results, out.reason()) == (
        [("deferred", "4.7.4")], "TLS is required, but was not offered by host 127.0.0.1[127.0.0.1]")
    out = deliver_via(mta, "persite", f"[localhost]:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"localhost[127.0.0.1]:{P.tls}") in out.log
    out = deliver_via(mta, "persite", f"[127.0.0.1]:{P.other}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Trusted", f"127.0.0.1[127.0.0.1]:{P.other}") in out.log
    out = deliver_via(mta, "persite", f"[127.0.0.1]:{P.tls}")
    assert out.results == [("sent", "2.0.0")] and "TLS connection" not in out.log
    # By MX host name: tls.test has no entry, its MX host mx.tls.test has MUST.
    out = deliver_via(mta, "persite", f"tls.test:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"mx.tls.test[127.0.0.1]:{P.tls}") in out.log
    # No entry at all: the global settings (no TLS).
    out = deliver_via(mta, "persite", f"nomx.test:{P.tls}")
    assert out.results == [("sent", "2.0.0")] and "TLS connection" not in out.log


def test_policy_maps(mta, peer):
    P = peer.ports
    out = deliver_via(mta, "policy", f"[127.0.0.1]:{P.tls}")
    assert out.results == [("sent", "2.0.0")]
    # At OpenSSL security level 0, as Postfix, TLS 1.2 between Postfix-style cipher lists
    # picks an anonymous suite (ADH-...), as Debian's Postfix logs it too.
    assert tls_line("Anonymous", f"127.0.0.1[127.0.0.1]:{P.tls}", "TLSv1.2") in out.log
    out = deliver_via(mta, "policy", f"[127.0.0.1]:{P.plain}")
    assert out.results == [("deferred", "4.7.4")]
    out = deliver_via(mta, "policy", f"[127.0.0.1]:{P.other}")
    assert out.results == [("sent", "2.0.0")]
    assert tls_line("Verified", f"127.0.0.1[127.0.0.1]:{P.other}") in out.log
    out = deliver_via(mta, "policy", f"[localhost]:{P.other}")
    assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                           "Server certificate not verified")
    out = deliver_via(mta, "policy", "nomx.test")     # domain key: no port, no brackets
    assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                           "client TLS configuration problem")
    assert 'invalid attribute name: "bogus"' in out.log


def test_cname_does_not_override_servername(mta, peer):
    out = deliver_via(mta, "cnameno", f"cname.test:{peer.ports.tls}")
    assert out.results == [("sent", "2.0.0")]
    assert out.reply.relay == f"cn.mx.test[127.0.0.1]:{peer.ports.tls}"
    out = deliver_via(mta, "cnameyes", f"cname.test:{peer.ports.tls}")
    assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                           "Server certificate not verified")
    assert out.reply.relay == f"real.test[127.0.0.1]:{peer.ports.tls}"


def test_client_certificate_only_when_configured(mta, peer):
    rcpt = ("carol@relay.test.example",)
    out = deliver_via(mta, "tlsmay", f"[127.0.0.1]:{peer.ports.ccert}", recipients=rcpt)
    assert out.results == [("bounced", "5.7.1")] and "Relay access denied" in out.reason()
    out = deliver_via(mta, "clientcert", f"[127.0.0.1]:{peer.ports.ccert}", recipients=rcpt)
    assert out.results == [("sent", "2.0.0")]
    assert "Trusted TLS connection established from" in peer.log()


def test_handshake_failure_tries_next_mx_then_defers(mta, peer, certs):
    def broken(conn):
        readline, _ = lines_of(conn)
        conn.sendall(b"220 broken ESMTP\r\n")
        readline()
        conn.sendall(b"250-broken\r\n250 STARTTLS\r\n")
        readline()
        conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
        time.sleep(0.2)
        conn.sendall(b"this is no TLS server hello\r\n" * 10)
        after = b""
        while len(after) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            after += chunk
        # A ClientHello and perhaps an alert, but no plaintext after a failed handshake.
        for word in (b"EHLO", b"MAIL FROM", b"QUIT", b"RCPT"):
            assert word not in after, after
    fake = FakeServer(broken, host="127.0.0.2", port=peer.ports.tls)
    try:
        out = deliver_via(mta, "tlsmay", f"mx.test:{peer.ports.tls}")
        assert out.results == [("sent", "2.0.0")]
        assert f"{out.qid}: Cannot start TLS: handshake failure" in out.log
        assert tls_line("Trusted", f"b.mx.test[127.0.0.1]:{peer.ports.tls}") in out.log
        out = deliver_via(mta, "tlsmay", f"[127.0.0.2]:{peer.ports.tls}")
        assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                               "Cannot start TLS: handshake failure")
        assert out.path.exists()
        assert fake.errors == []
    finally:
        fake.stop()


def starttls_breaks(seen, got):
    """A server whose STARTTLS handshake always fails; plain SMTP works (seen: how each
    connection went, got: the messages)."""
    def handler(conn):
        readline, read_data = lines_of(conn)
        conn.sendall(b"220 broken ESMTP\r\n")
        while True:
            line = readline().upper()
            if line.startswith("EHLO"):
                conn.sendall(b"250-broken\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
            elif line.startswith("STARTTLS"):
                seen.append("tls")
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                conn.recv(4096)                             # the ClientHello
                conn.sendall(b"this is no TLS server hello\r\n" * 10)
                while conn.recv(4096):
                    pass
                return
            elif line.startswith("MAIL"):
                seen.append("plain")
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif line.startswith("RCPT"):
                conn.sendall(b"250 2.1.5 Ok\r\n")
            elif line.startswith("DATA"):
                conn.sendall(b"354 go ahead\r\n")
                got.append(read_data())
                conn.sendall(b"250 2.0.0 Ok: queued as PLAIN1\r\n")
            elif line.startswith("QUIT"):
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 what\r\n")
    return handler


def test_may_falls_back_to_plaintext_on_the_same_server(mta):
    seen, got = [], []
    fake = FakeServer(starttls_breaks(seen, got), host="127.0.0.3")
    dest = f"[127.0.0.3]:{fake.port}"
    relay = f"127.0.0.3[127.0.0.3]:{fake.port}"
    deferred = time.time() - 3600           # waited longer than minimal_backoff_time
    try:
        # Postfix's first attempt defers (PREACTIVE_DELAY < minimal_backoff_time).
        out = deliver_via(mta, "tlsmay", dest)
        assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                               "Cannot start TLS: handshake failure")
        assert seen == ["tls"] and got == []
        # A deferred message: the handshake fails, then the same server in plain text.
        seen.clear()
        out = deliver_via(mta, "tlsmay", dest, arrival=deferred)
        assert out.results == [("sent", "2.0.0")]
        assert seen == ["tls", "plain"] and len(got) == 1 and out.marker.encode() in got[0]
        assert f"{out.qid}: Cannot start TLS: handshake failure" in out.log
        assert f"relay={relay}" in out.log and "status=sent (250 2.0.0 Ok: queued as PLAIN1)" \
            in out.log
        # Never above may, and never with SASL credentials for the server.
        for service in ("cacheenc", "tlsmaysasl"):
            seen.clear()
            out = deliver_via(mta, service, dest, arrival=deferred)
            assert (out.results, out.reason()) == ([("deferred", "4.7.5")],
                                                   "Cannot start TLS: handshake failure")
            assert seen == ["tls"] and len(got) == 1, service
        assert fake.errors == []
    finally:
        fake.stop()


def test_session_cache_resumes_with_tlsmgr(mta, peer):
    P = peer.ports
    relay = f"127.0.0.1[127.0.0.1]:{P.tls}"
    first = deliver_via(mta, "cache", f"[127.0.0.1]:{P.tls}")
    assert first.results == [("sent", "2.0.0")]
    key_prefix = f"cache&[127.0.0.1]:{P.tls}&127.0.0.1&127.0.0.1&{P.tls}&"
    assert f"looking for session {key_prefix}" in first.log
    assert f"save session {key_prefix}" in first.log
    assert "Reusing old session" not in first.log
    second = deliver_via(mta, "cache", f"[127.0.0.1]:{P.tls}")
    assert second.results == [("sent", "2.0.0")]
    assert f"reloaded session {key_prefix}" in second.log
    assert f"{relay}: Reusing old session" in second.log
    assert tls_line("Trusted", relay) in second.log
    # Another host name for the same server, another policy: no session offered.
    other = deliver_via(mta, "cache", f"[localhost]:{P.tls}")
    assert "Reusing old session" not in other.log and "reloaded session" not in other.log
    enc = deliver_via(mta, "cacheenc", f"[127.0.0.1]:{P.tls}")
    assert enc.results == [("sent", "2.0.0")] and "Reusing old session" not in enc.log
    clnt = tlsmgr_client.TlsmgrClient(str(mta.queue / "private" / "tlsmgr"))
    try:
        report = clnt.status()
    finally:
        clnt.close()
    assert report["caches"]["smtp"]["hits"] >= 1
    assert report["prng"]["seed_requests"] >= 1      # smtp processes asked for seeds


def test_deliveries_go_on_without_tlsmgr(instance, peer, certs):
    instance.main.update({"smtp_tls_security_level": "may", "smtp_tls_loglevel": "1",
                          "inet_protocols": "ipv4",
                          "smtp_tls_session_cache_database": "btree:${data_directory}/scache"})
    instance.master_lines = ["smtp unix - - y - - smtp"]
    instance.start()
    instance.uid_gid = (pwd.getpwnam(instance.main["mail_owner"]).pw_uid,
                        pwd.getpwnam(instance.main["mail_owner"]).pw_gid)
    wait_for(lambda: (instance.queue / "private" / "smtp").exists(), 10, what="private/smtp")
    for _ in range(2):
        out = deliver_via(instance, "smtp", f"[127.0.0.1]:{peer.ports.tls}")
        assert out.results == [("sent", "2.0.0")]
    assert "warning: problem talking to server private/tlsmgr" in instance.log()


def test_postfix_py_smtpd_as_peer(mta, instance):
    port = free_port()
    instance.main.update({"mydestination": "$myhostname, localhost, peer.test",
                          "myhostname": "pypeer.test.example", "smtpd_error_sleep_time": "0s"})
    instance.master_lines = [f"127.0.0.1:{port} inet n - y - - smtpd"]
    instance.start()
    wait_port(port)
    content = b"Subject: to postfix-py\n\n.one\n..two\nlast line without newline"
    out = deliver_via(mta, "smtp", f"[127.0.0.1]:{port}", recipients=("u@peer.test",),
                      content=content)
    assert out.results == [("sent", "2.0.0")]
    assert "Ok: queued as" in out.reason()
    incoming = wait_for(lambda: [p for p in (instance.queue / "incoming").iterdir()
                                 if not p.name.startswith(".")], 10, what="queued mail")
    m = Q.read(str(incoming[0]))
    assert [r.address for r in m.recipients] == ["u@peer.test"]
    body = b"".join(m.content(str(incoming[0])))
    assert b"\n.one\n..two\nlast line without newline\n" in body


def test_tls_to_postfix_py_smtpd_with_resumption(mta, instance, certs):
    """Two postfix-py instances: STARTTLS, verification, and a resumed second session."""
    import importlib.util
    if importlib.util.find_spec("postfix_py.smtpd.tls") is None:
        pytest.skip("postfix-py smtpd has no TLS yet")
    port = free_port()
    instance.main.update({"myhostname": "pypeer.test.example", "smtpd_error_sleep_time": "0s",
                          "mydestination": "$myhostname, localhost, peer.test",
                          "smtpd_tls_security_level": "may", "smtpd_tls_loglevel": "1",
                          "smtpd_tls_cert_file": str(certs.good)})
    instance.master_lines = [f"127.0.0.1:{port} inet n - y - - smtpd"]
    instance.start()
    wait_port(port)
    relay = f"localhost[127.0.0.1]:{port}"
    out = deliver_via(mta, "tlsverify", f"[localhost]:{port}", recipients=("u@peer.test",))
    assert out.results == [("sent", "2.0.0")], out.reason()
    assert tls_line("Verified", relay) in out.log
    first = deliver_via(mta, "cache", f"[localhost]:{port}", recipients=("u@peer.test",))
    second = deliver_via(mta, "cache", f"[localhost]:{port}", recipients=("u@peer.test",))
    assert first.results == second.results == [("sent", "2.0.0")]
    assert "Reusing old session" not in first.log
    assert f"{relay}: Reusing old session" in second.log
    assert "TLS connection established from" in instance.log()


# --- LMTP ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dovecot(base):
    if not DOVECOT:
        pytest.skip("dovecot is not installed")
    d = base / "dovecot"
    for sub in ("run", "state", "mail"):
        (d / sub).mkdir(parents=True)
    os.chmod(d / "mail", 0o777)
    port = free_port()
    users = d / "users"
    users.write_text(f"bob::65534:65534::{d / 'mail' / 'bob'}::\n")
    sock = d / "lmtp.sock"
    (d / "dovecot.conf").write_text(f"""
protocols = lmtp
base_dir = {d / 'run'}
state_dir = {d / 'state'}
listen = 127.0.0.1
log_path = {d / 'dovecot.log'}
ssl = no
mail_location = maildir:{d / 'mail'}/%n
default_login_user = nobody
default_internal_user = nobody
default_internal_group = nogroup
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    path = {sock}
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
""")
    open_path(d)
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(d / "dovecot.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        wait_for(sock.exists, 10, what="dovecot lmtp socket")
        yield SimpleNamespace(port=port, sock=sock, mail=d / "mail")
    finally:
        proc.terminate()
        proc.wait(10)


def test_lmtp_to_dovecot_over_unix_socket(mta, dovecot):
    out = deliver_via(mta, "lmtp", f"unix:{dovecot.sock}",
                      recipients=("bob@lmtp.test", "ghost@lmtp.test"))
    assert out.results == [("sent", "2.0.0"), ("bounced", "5.1.1")]
    assert out.reason(0).startswith("250 2.0.0 <bob@lmtp.test> ") and "Saved" in out.reason(0)
    assert out.reason(1) == (f"host mail.test.example[{dovecot.sock}] said: 550 5.1.1 "
                             f"<ghost@lmtp.test> User doesn't exist: ghost@lmtp.test "
                             f"(in reply to RCPT TO command)")
    assert f"relay=mail.test.example[{dovecot.sock}]," in out.log
    assert "postfix-py/lmtp[" in out.log
    mails = list((dovecot.mail / "bob" / "new").iterdir())
    assert any(out.marker in p.read_text() for p in mails)


def test_lmtp_to_dovecot_over_tcp(mta, dovecot):
    out = deliver_via(mta, "lmtp", f"inet:127.0.0.1:{dovecot.port}",
                      recipients=("bob@lmtp.test",))
    assert out.results == [("sent", "2.0.0")]
    assert out.reply.relay == f"127.0.0.1[127.0.0.1]:{dovecot.port}"


def test_no_tracebacks_in_the_log(mta):
    text = mta.log()
    assert "Traceback" not in text and "panic:" not in text and "fatal:" not in text
