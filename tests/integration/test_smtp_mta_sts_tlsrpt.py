"""MTA-STS (RFC 8461) and TLSRPT (RFC 8460) end to end, through a real master.

A postfix-py instance (chrooted smtp service with smtp_tls_mta_sts_enable and
smtp_tlsrpt_enable, pickup, qmgr, local) delivers MX-based next hops (`domain:port`, so
that the MX semantics stay and the port is the sink's) to:

* dnsmasq on 127.0.0.1 serving the MX, A, `_mta-sts` and `_smtp._tls` TXT records
  (restarted on the same port with another policy id to test the refresh);
* one HTTPS server (http.server with a trustme certificate) serving the policies at
  mta-sts.DOMAIN/.well-known/mta-sts.txt and taking TLSRPT POSTs;
* two STARTTLS SMTP sinks: one with a certificate for the MX names, one with a
  certificate for another name.

Then `postfix-py tlsrpt send -a` posts one report and mails another, into a local
mailbox through pickup, qmgr and local.
"""

import email
import glob
import gzip
import json
import os
import socket
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from peers import DNSMASQ, Dnsmasq, loopback_resolver
from pfxinst import Instance, wait_for
from postfix_py.lib import https as libhttps
from postfix_py.lib import tlsrpt
from postfix_py.smtp import mta_sts
from sink import FakeServer

pytestmark = pytest.mark.skipif(not DNSMASQ or os.geteuid() != 0,
                                reason="needs dnsmasq and root (chroot)")

DOMAINS = ("enforce.test", "mismatch.test", "testing.test", "unlisted.test")
BROKEN = ("redirect.test", "html.test", "big.test")     # policy servers that misbehave
POLICIES = {
    "enforce.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.enforce.test\r\n"
                    "max_age: 86400\r\n",
    "mismatch.test": "version: STSv1\r\nmode: enforce\r\nmx: *.mismatch.test\r\n"
                     "max_age: 86400\r\n",
    "testing.test": "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n",
    "unlisted.test": "version: STSv1\nmode: enforce\nmx: mx.elsewhere.test\n"
                     "max_age: 86400\n",
}


# --- peers ----------------------------------------------------------------------------------

class Dns:
    """tests/peers.py's dnsmasq with the records of these tests; restart() serves them
    again with other policy ids."""

    def __init__(self, root: Path, https_port: int, silent_port: int):
        self.https_port = https_port
        self.silent_port = silent_port      # _smtp._tls.flaky.test's server: no answer
        self.ids = {d: "20261205T000000" for d in DOMAINS}
        self.server = Dnsmasq(self.records(), root / "dnsmasq.log", ready=self.ready)
        self.port = self.server.port

    def ready(self, r):
        txt = r.resolve("_mta-sts.enforce.test", "TXT")
        return self.ids["enforce.test"] in txt.rrset.to_text()

    def records(self):
        out = ["--host-record=rua.report.test,127.0.0.1",
               "--txt-record=_smtp._tls.enforce.test,v=TLSRPTv1; "
               f"rua=https://rua.report.test:{self.https_port}/tlsrpt",
               "--txt-record=_smtp._tls.testing.test,v=TLSRPTv1; rua=mailto:nobody@localhost"]
        out += [f"--host-record=mta-sts.{d},127.0.0.1" for d in BROKEN]
        out += ["--mx-host=reuse.test,mx.reuse.test,10", "--host-record=mx.reuse.test,127.0.0.1",
                "--txt-record=_smtp._tls.reuse.test,v=TLSRPTv1; "
                f"rua=https://rua.report.test:{self.https_port}/tlsrpt-reuse"]
        # TLSRPT scope: norpt.test publishes no _smtp._tls record, the lookup of
        # flaky.test's goes to a server that never answers (until restart(flaky=False))
        for d in ("norpt.test", "flaky.test"):
            out += [f"--mx-host={d},mx.{d},10", f"--host-record=mx.{d},127.0.0.1"]
        if self.silent_port:
            out.append(f"--server=/_smtp._tls.flaky.test/127.0.0.1#{self.silent_port}")
        for d in DOMAINS:
            out += [f"--mx-host={d},mx.{d},10", f"--host-record=mx.{d},127.0.0.1",
                    f"--host-record=mta-sts.{d},127.0.0.1",
                    f"--txt-record=_mta-sts.{d},v=STSv1; id={self.ids[d]}"]
        return out

    def restart(self, flaky=True, **ids):
        self.ids.update(ids)
        if not flaky:
            self.silent_port = 0
        self.server.restart(self.records(), ready=self.ready)

    def close(self):
        self.server.close()


class Https:
    """Policies by Host header, TLSRPT POSTs kept; counts the policy fetches."""

    def __init__(self, ca):
        self.fetches = Counter()
        self.posts = []
        cert = ca.issue_cert(*(f"mta-sts.{d}" for d in DOMAINS + BROKEN), "rua.report.test")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host = (self.headers.get("Host") or "").split(":")[0]
                domain = host.removeprefix("mta-sts.")
                outer.fetches[domain] += 1
                if domain == "redirect.test":
                    self.send_response(301)
                    self.send_header("Location", "https://mta-sts.enforce.test" + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = {"html.test": POLICIES["enforce.test"],
                        "big.test": POLICIES["enforce.test"] + "#" * 70000 + "\n"
                        }.get(domain, POLICIES.get(domain))
                if self.path != "/.well-known/mta-sts.txt" or body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if domain == "html.test"
                                 else "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                outer.posts.append((self.path, self.headers.get("Content-Type"),
                                    self.rfile.read(n)))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def starttls_sink(ctx, got, name="sink.test"):
    """A FakeServer handler: EHLO with STARTTLS, then TLS, and every message accepted."""
    def play(sock):
        state = {"conn": sock}
        try:
            converse(sock, state)
        finally:
            if state["conn"] is not sock:
                state["conn"].close()

    def converse(sock, state):
        conn, buf, tls = sock, bytearray(), False

        def fill():
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError
            buf.extend(chunk)

        def readline():
            while b"\n" not in buf:
                fill()
            i = buf.index(b"\n")
            line = bytes(buf[:i]).rstrip(b"\r").decode("latin-1")
            del buf[:i + 1]
            return line.upper()
        conn.sendall(f"220 {name} ESMTP\r\n".encode())
        while True:
            line = readline()
            if line.startswith(("EHLO", "LHLO")):       # one recipient: LMTP as well
                conn.sendall(f"250-{name}\r\n{'' if tls else '250-STARTTLS' + chr(13) + chr(10)}"
                             f"250 8BITMIME\r\n".encode())
            elif line.startswith("STARTTLS"):
                conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                conn, tls = ctx.wrap_socket(sock, server_side=True), True
                state["conn"] = conn
                buf.clear()
            elif line.startswith(("MAIL", "RCPT")):
                conn.sendall(b"250 2.1.0 Ok\r\n")
            elif line.startswith("DATA"):
                conn.sendall(b"354 go ahead\r\n")
                while b"\r\n.\r\n" not in buf:
                    fill()
                i = buf.index(b"\r\n.\r\n")
                got.append(bytes(buf[:i]))
                del buf[:i + 5]
                conn.sendall(b"250 2.0.0 Ok: queued as SINK1\r\n")
            elif line.startswith("QUIT"):
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"502 5.5.2 what\r\n")
    return play


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("mtasts"))
    for p in [root, *root.parents]:
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o755)
    ca = trustme.CA()
    (root / "ca.pem").write_bytes(ca.cert_pem.bytes())
    os.chmod(root / "ca.pem", 0o644)
    https = Https(ca)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)     # takes queries, never answers
    silent.bind(("127.0.0.1", 0))
    dnsd = Dns(root, https.port, silent.getsockname()[1])
    sinks = {}
    for kind, names in (("good", [f"mx.{d}" for d in DOMAINS]), ("bad", ["wrong.name.test"])):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(ctx)
        got = []
        server = FakeServer(starttls_sink(ctx, got), concurrent=True)
        server.got = got
        sinks[kind] = server
    inst = Instance.make(root / "pfx")
    inst.spool = inst.add_mail_spool(maildir=True)
    ca_file = root / "ca.pem"
    inst.main.update({
        "inet_protocols": "ipv4", "smtp_dns_nameservers": f"127.0.0.1:{dnsd.port}",
        "smtp_dns_timeout": "2s", "smtp_connect_timeout": "3s", "smtp_helo_timeout": "5s",
        "smtp_starttls_timeout": "5s", "mydestination": "$myhostname, localhost",
        "queue_run_delay": "1s",
        "tlsrpt_https_CAfile": str(ca_file), "tlsrpt_organization_name": "mail.test.example",
        "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
    })
    sts = (f" -o smtp_tls_mta_sts_enable=yes -o smtp_tls_mta_sts_CAfile={ca_file}"
           f" -o smtp_tls_mta_sts_https_port={https.port} -o smtp_tls_CAfile={ca_file}"
           f" -o smtp_tlsrpt_enable=yes -o smtp_tls_loglevel=1")
    reuse = (" -o smtp_tls_security_level=may -o smtp_tlsrpt_enable=yes -o smtp_tls_loglevel=2"
             " -o smtp_tlsrpt_skip_reused_handshakes=yes")
    inst.master_lines = [
        "tlsmgr unix - - y 1000? 1 tlsmgr",
        f"sts unix - - y - - smtp{sts} -o smtp_tls_session_cache_database=",
        f"reuse unix - - y - - smtp{reuse}",
        # may, TLSRPT, no session cache: each delivery a new handshake, counted
        "rpt unix - - y - - smtp -o smtp_tls_security_level=may -o smtp_tlsrpt_enable=yes"
        " -o smtp_tls_session_cache_database=",
        "rptnodns unix - - y - - smtp -o smtp_tlsrpt_enable=yes -o smtp_dns_support_level=disabled",
        # MTA-STS and TLSRPT are MX-based SMTP's: lmtp warns and goes on without them.
        f"stslmtp unix - - y - - lmtp{sts}",
        "pickup unix n - y - - pickup",
        "qmgr unix n - n 300 1 qmgr",
        "local unix - n n - - local",
        "error unix - - n - - error",
        "discard unix - - n - - discard",
    ]
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "private" / "sts").exists(), 10, what="private/sts")
        yield type("Env", (), {"inst": inst, "dns": dnsd, "https": https, "sinks": sinks,
                               "sent": Counter(), "ca_file": ca_file})
    finally:
        inst.cleanup()
        for s in sinks.values():
            s.stop()
        dnsd.close()
        https.stop()
        silent.close()


_counter = [0]


def deliver_via(inst, nexthop, rcpt, service="sts"):
    """qmgr's request for one queued message to private/sts; (reply, log lines, marker)."""
    _counter[0] += 1
    marker = f"sts-{os.getpid()}-{_counter[0]}-{time.monotonic_ns()}"
    before = len(inst.log())
    reply = inst.deliver(service, nexthop, rcpt=rcpt, content=f"Subject: {marker}\n\nbody\n".encode(),
                         sender="alice@example.org", timeout=60, keep=True)
    return reply.results[0], inst.log()[before:], marker


def delivered(sink, marker):
    return any(marker.encode() in m for m in sink.got)


# --- MTA-STS --------------------------------------------------------------------------------

def test_enforce_with_a_listed_mx_and_a_valid_certificate_delivers(env):
    good = env.sinks["good"]
    r, log, marker = deliver_via(env.inst, f"enforce.test:{good.port}", "bob@enforce.test")
    assert (r.result, r.dsn) == ("sent", "2.0.0"), (r.reason, log)
    assert delivered(good, marker)
    assert "MTA-STS policy for enforce.test: mode enforce, id 20261205T000000\n" in log
    assert f"Verified TLS connection established to mx.enforce.test[127.0.0.1]:{good.port}" \
        in log
    assert env.https.fetches["enforce.test"] == 1
    env.sent["enforce.test"] += 1


def test_unchanged_id_uses_the_cache_and_a_new_id_fetches_again(env):
    good = env.sinks["good"]
    r, log, _ = deliver_via(env.inst, f"enforce.test:{good.port}", "bob@enforce.test")
    assert r.result == "sent", r.reason
    assert "MTA-STS policy for enforce.test: mode enforce, id 20261205T000000 (cached)" in log
    assert env.https.fetches["enforce.test"] == 1
    env.sent["enforce.test"] += 1
    env.dns.restart(**{"enforce.test": "20261205T120000"})
    r, log, _ = deliver_via(env.inst, f"enforce.test:{good.port}", "bob@enforce.test")
    assert r.result == "sent", r.reason
    assert "MTA-STS policy for enforce.test: mode enforce, id 20261205T120000\n" in log
    assert env.https.fetches["enforce.test"] == 2
    env.sent["enforce.test"] += 1


def test_enforce_with_a_certificate_for_another_name_defers(env):
    bad = env.sinks["bad"]
    r, log, marker = deliver_via(env.inst, f"mismatch.test:{bad.port}", "bob@mismatch.test")
    assert (r.result, r.dsn, r.reason) == ("deferred", "4.7.5",
                                           "Server certificate not verified"), log
    assert not delivered(bad, marker)
    assert "MTA-STS policy for mismatch.test: mode enforce" in log
    assert f"Untrusted TLS connection established to mx.mismatch.test[127.0.0.1]:{bad.port}" \
        in log or "Trusted TLS connection established" not in log


def test_tls_required_no_ignores_mta_sts_and_tlsrpt(env):
    """RFC 8689 "TLS-Required: No" (which mailed TLSRPT reports carry): no MTA-STS
    lookup, delivery despite the certificate, and nothing counted for TLSRPT."""
    bad = env.sinks["bad"]
    before = env.inst.cmd("tlsrpt", "show").stdout
    fetches = env.https.fetches["mismatch.test"]
    r = env.inst.deliver("sts", f"mismatch.test:{bad.port}", rcpt="bob@mismatch.test",
                         content=b"Subject: tlsno\nTLS-Required: No\n\nbody\n",
                         sender="alice@example.org", timeout=60)
    log = env.inst.log()
    assert (r.results[0].result, r.results[0].dsn) == ("sent", "2.0.0"), r.results[0].reason
    assert any(b"Subject: tlsno" in m for m in bad.got)
    assert env.https.fetches["mismatch.test"] == fetches
    assert env.inst.cmd("tlsrpt", "show").stdout == before
    assert "Untrusted TLS connection established to mx.mismatch.test" in log


def test_lmtp_applies_neither_mta_sts_nor_tlsrpt(env):
    good = env.sinks["good"]
    before = env.inst.cmd("tlsrpt", "show").stdout
    fetches = sum(env.https.fetches.values())
    r, log, marker = deliver_via(env.inst, f"inet:mx.enforce.test:{good.port}",
                                 "bob@enforce.test", service="stslmtp")
    assert (r.result, r.dsn) == ("sent", "2.0.0"), (r.reason, log)
    assert delivered(good, marker)
    assert "MTA-STS policy" not in log
    assert sum(env.https.fetches.values()) == fetches
    assert env.inst.cmd("tlsrpt", "show").stdout == before
    whole = env.inst.log()
    for text in ("warning: TLSRPT support is not implemented for LMTP",
                 "warning: MTA-STS support is not implemented for LMTP: RFC 8461 applies "
                 "to MX-based SMTP delivery"):
        assert text in whole
        # only lmtp says so: the smtp service "sts" with the same settings does not
        assert all("postfix-py/lmtp[" in line for line in whole.splitlines() if text in line)


def test_enforce_skips_an_mx_host_that_the_policy_does_not_list(env):
    good = env.sinks["good"]
    before = good.connections
    r, log, _ = deliver_via(env.inst, f"unlisted.test:{good.port}", "bob@unlisted.test")
    assert (r.result, r.dsn) == ("deferred", "4.7.5"), log
    assert r.reason == ("MX host mx.unlisted.test does not match the MTA-STS policy of "
                        "unlisted.test")
    assert good.connections == before
    assert "warning: MX name 'mx.unlisted.test' does not match STS MX pattern for " \
        "'unlisted.test'" in log


def test_testing_mode_delivers_despite_the_certificate_and_says_so(env):
    bad = env.sinks["bad"]
    r, log, marker = deliver_via(env.inst, f"testing.test:{bad.port}", "bob@testing.test")
    assert r.result == "sent", (r.reason, log)
    assert delivered(bad, marker)
    assert "MTA-STS policy for testing.test: mode testing, id 20261205T000000" in log
    assert (f"MTA-STS policy for testing.test: mode testing: would defer delivery to "
            f"mx.testing.test[127.0.0.1]:{bad.port}: certificate-host-mismatch") in log
    env.sent["testing.test"] += 1


def test_policy_fetches_that_must_fail(env):
    """No redirects, text/plain only, 64 KiB at most, a certificate from a trusted CA."""
    ctx = libhttps.client_context(str(env.ca_file))
    sts = mta_sts.MtaSts(env.dns.server.resolver(), ctx, None, port=env.https.port,
                         timeout=5)
    assert sts.fetch("enforce.test", "x").mx == ("mx.enforce.test",)
    fetched = env.https.fetches["enforce.test"]
    for domain, kind, text in (("redirect.test", "sts-policy-fetch-error", "HTTP status 301"),
                               ("html.test", "sts-policy-invalid", "is not text/plain"),
                               ("big.test", "sts-policy-fetch-error", "larger than 65536")):
        with pytest.raises(mta_sts.StsError) as info:
            sts.fetch(domain, "x")
        assert (info.value.kind, text in str(info.value)) == (kind, True), str(info.value)
    # the redirect was not followed
    assert (env.https.fetches["redirect.test"], env.https.fetches["enforce.test"]) == \
        (1, fetched)
    stranger = Https(trustme.CA())          # a certificate no configured CA vouches for
    try:
        sts.port = stranger.port
        with pytest.raises(mta_sts.StsError) as info:
            sts.fetch("enforce.test", "x")
        assert info.value.kind == "sts-webpki-invalid", str(info.value)
        assert stranger.fetches["enforce.test"] == 0
    finally:
        stranger.stop()


# --- TLSRPT ---------------------------------------------------------------------------------

def test_tlsrpt_skips_resumed_sessions_when_asked(env):
    """smtp_tlsrpt_skip_reused_handshakes = yes: a resumed TLS session is not counted."""
    good = env.sinks["good"]
    logs = []
    for _ in range(2):
        r, log, _ = deliver_via(env.inst, f"reuse.test:{good.port}", "bob@reuse.test",
                                service="reuse")
        assert r.result == "sent", (r.reason, log)
        logs.append(log)
    assert "Reusing old session" not in logs[0] and "Reusing old session" in logs[1], logs
    out = env.inst.cmd("tlsrpt", "show")
    [entry] = [v for k, v in json.loads(out.stdout).items() if k.endswith(" reuse.test")][0:1]
    assert [(e["policy"]["policy-type"], e["success"], e["failures"]) for e in entry] == \
        [("no-policy-found", 1, [])]


def test_tlsrpt_reports_by_https_and_by_mail(env):
    inst = env.inst
    out = inst.cmd("tlsrpt", "show")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert any(k.endswith(" enforce.test") for k in shown), shown
    out = inst.cmd("tlsrpt", "send", "-a")
    assert out.returncode == 0, out.stderr
    # https: one POST for enforce.test, gzipped JSON with the sessions counted (and one
    # for reuse.test, at its own path)
    posts = [p for p in env.https.posts if p[0] == "/tlsrpt"]
    assert len(posts) == 1, out.stderr
    assert [p[0] for p in env.https.posts].count("/tlsrpt-reuse") == 1, out.stderr
    path, ctype, body = posts[0]
    assert (path, ctype) == ("/tlsrpt", "application/tlsrpt+gzip")
    rep = json.loads(gzip.decompress(body))
    assert rep["organization-name"] == "mail.test.example"
    [pol] = rep["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["policy"]["policy-domain"] == "enforce.test"
    assert pol["policy"]["mx-host"] == ["mx.enforce.test"]
    assert pol["policy"]["policy-string"] == ["version: STSv1", "mode: enforce",
                                              "mx: mx.enforce.test", "max_age: 86400"]
    assert pol["summary"] == {"total-successful-session-count": env.sent["enforce.test"],
                              "total-failure-session-count": 0}
    # mailto: the testing.test report, through pickup, qmgr and local into nobody's maildir
    files = wait_for(lambda: glob.glob(str(inst.spool / "nobody" / "new" / "*")), 20,
                     what="the mailed report")
    m = email.message_from_bytes(Path(files[0]).read_bytes())
    assert m["TLS-Report-Domain"] == "testing.test"
    assert m.get_content_type() == "multipart/report"
    part = [p for p in m.walk() if p.get_content_type() == "application/tlsrpt+gzip"][0]
    rep = json.loads(gzip.decompress(part.get_payload(decode=True)))
    [pol] = rep["policies"]
    assert pol["policy"]["policy-type"] == "sts"
    assert pol["summary"] == {"total-successful-session-count": 0,
                              "total-failure-session-count": env.sent["testing.test"]}
    [detail] = pol["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx.testing.test"
    assert detail["receiving-ip"] == detail["sending-mta-ip"] == "127.0.0.1"
    # sent reports are gone (mismatch.test and unlisted.test publish no TLSRPT record:
    # never recorded)
    out = inst.cmd("tlsrpt", "show")
    assert json.loads(out.stdout) == {}


def test_tls_explain_names_the_mta_sts_policy(env):
    """`tls explain` resolves the policy where the client does: the MTA-STS policy shows
    as its source, and the dry run counts nothing for TLSRPT."""
    good = env.sinks["good"]
    inst = env.inst
    inst.main["transport_maps"] = f"inline:{{ enforce.test=sts:enforce.test:{good.port} }}"
    inst.write()
    try:
        before = inst.cmd("tlsrpt", "show").stdout
        out = inst.cmd("tls", "explain", "bob@enforce.test")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"enforce.test: transport sts, next hop enforce.test:{good.port}" in out.stdout
        assert "source=MTA-STS policy" in out.stdout, out.stdout
        assert "level=verify" in out.stdout
        assert inst.cmd("tlsrpt", "show").stdout == before
    finally:
        del inst.main["transport_maps"]
        inst.write()


def _shown(inst) -> set:
    out = inst.cmd("tlsrpt", "show")
    assert out.returncode == 0, out.stderr
    return {k.split(" ", 1)[1] for k in json.loads(out.stdout)}


def test_tlsrpt_records_only_for_domains_that_publish_a_policy(env):
    """RFC 8460 reports go to domains that ask: no _smtp._tls record, nothing recorded
    (Postfix's smtp_tlsrpt_create_wrapper()); with one, the session counts."""
    good = env.sinks["good"]
    for domain in ("norpt.test", "reuse.test"):
        r, log, marker = deliver_via(env.inst, f"{domain}:{good.port}", f"bob@{domain}",
                                     service="rpt")
        assert r.result == "sent", (r.reason, log)
        assert delivered(good, marker)
    shown = _shown(env.inst)
    assert "reuse.test" in shown and "norpt.test" not in shown, shown
    # the MTA-STS failures of mismatch.test and unlisted.test (no TLSRPT record) neither
    assert not shown & {"mismatch.test", "unlisted.test"}, shown


def test_tlsrpt_keeps_the_outcome_when_the_policy_lookup_fails(env):
    """A TLSRPT lookup without answer: Postfix's warning, delivery delayed by at most
    POLICY_TIMEOUT (2 s), the outcome recorded all the same; `tlsrpt send` keeps it while
    the lookup fails, and drops it once DNS says there is no record."""
    good = env.sinks["good"]
    inst = env.inst
    assert "flaky.test" not in _shown(inst)
    started = time.monotonic()
    r, log, marker = deliver_via(inst, f"flaky.test:{good.port}", "bob@flaky.test",
                                 service="rpt")
    elapsed = time.monotonic() - started
    assert r.result == "sent", (r.reason, log)
    assert delivered(good, marker)
    assert "warning: TLSRPT support: policy lookup failed for flaky.test: " in log, log
    assert elapsed < 6, elapsed
    assert "flaky.test" in _shown(inst)
    out = inst.cmd("tlsrpt", "send", "-a")
    assert out.returncode == 0, out.stderr
    assert "kept for DNS: 1" in out.stderr, out.stderr
    assert "flaky.test" in _shown(inst)
    env.dns.restart(flaky=False)          # now NXDOMAIN: the domain asks for no report
    out = inst.cmd("tlsrpt", "send", "-a")
    assert out.returncode == 0, out.stderr
    assert "no rua: 1" in out.stderr, out.stderr
    assert "flaky.test" not in _shown(inst)


def test_tlsrpt_policy_cache_holds_answers_and_failures(env):
    """lib/tlsrpt.Policies against the real dnsmasq: its answers (TTL 0: dnsmasq's
    local-ttl) are asked again each time; a server that does not answer costs one
    timeout, and then POLICY_RETRY seconds of "record it" without asking."""
    now = [1000.0]
    warned = []
    policies = tlsrpt.Policies(env.dns.server.resolver(), timeout=0.5,
                               clock=lambda: now[0], warn=warned.append)
    assert (policies.wanted("reuse.test"), policies.wanted("norpt.test")) == (True, False)
    assert policies.wanted("Reuse.Test.") is True
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        policies.resolver = loopback_resolver(silent.getsockname()[1], 0.5)
        started = time.monotonic()
        assert policies.wanted("reuse.test") is True        # TTL 0: asked, no answer
        assert 0.4 < time.monotonic() - started < 2
        assert warned == ["TLSRPT support: policy lookup failed for reuse.test: Host or "
                          "domain name not found. Name service error for "
                          "name=_smtp._tls.reuse.test type=TXT: Host not found, try again"]
        now[0] += tlsrpt.POLICY_RETRY - 1
        started = time.monotonic()
        assert policies.wanted("reuse.test") is True        # remembered: not asked
        assert time.monotonic() - started < 0.1 and len(warned) == 1
        now[0] += 2
        assert policies.wanted("reuse.test") is True and len(warned) == 2
    finally:
        silent.close()


def test_tlsrpt_needs_dns(env):
    """smtp_dns_support_level = disabled: no TLSRPT policy lookups, so no TLSRPT (Postfix's
    smtp_tlsrpt_post_jail() warning), and delivery goes on."""
    good = env.sinks["good"]
    r, log, marker = deliver_via(env.inst, f"[127.0.0.1]:{good.port}", "bob@sink.test",
                                 service="rptnodns")
    assert r.result == "sent", (r.reason, log)
    assert "warning: Cannot enable TLSRPT support: DNS is disabled" in log, log
