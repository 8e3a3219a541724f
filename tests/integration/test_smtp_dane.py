"""DANE (RFC 7672) in the smtp client, end to end against real DNSSEC on loopback.

The DNSSEC stack (tests/dnssec.py): a zone dane.test signed with ldns, served by nsd,
validated by unbound with the zone's key as trust anchor; an unsigned zone plain.test
beside it. The receiving MX is a postfix-py smtpd with STARTTLS on one port, its
certificate issued by a test CA and sent with the CA in its chain; every MX host name of
the zones points at it, and the TLSA records (at _PORT._tcp.HOST, PORT the receiver's)
match its certificate (3 1 1), its CA (2 0 1), or nothing. The postfix-py instance under
test delivers through smtp services with smtp_tls_security_level = dane or dane-only and
smtp_dns_support_level = dnssec, to next hops `domain:PORT` (MX lookup, that port).

Half-dane (Postfix's TLS_LEV_HALF_DANE): MX records in the unsigned zone plain.test
that name hosts of the signed zone dane.test, so that the MX RRset is insecure but the
host's address and TLSA records are validated; and the converse, a signed MX RRset
naming a host of the unsigned zone.
"""

import hashlib
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

import dnssec
from pfxinst import Instance, free_port, wait_for
from postfix_py.lib import queue as Q

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)"),
              pytest.mark.skipif(not dnssec.available(), reason="needs ldnsutils, nsd, unbound")]

HOSTS = ("mx-ee", "mx-ta", "mx-bad", "mx-bogus", "mx-none", "mx-pkix", "mx-cname")


def _open_path(path: Path) -> None:
    for p in [path, *path.parents]:
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, 0o755)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dane")
    _open_path(root)
    return root


@pytest.fixture(scope="module")
def certs(base):
    d = base / "certs"
    d.mkdir()
    ca = trustme.CA()
    leaf = ca.issue_cert(*[f"{h}.dane.test" for h in HOSTS], "mx.plain.test")
    # The chain file: key, leaf, and the CA itself, so that a DANE-TA(2) record for the
    # CA finds it in the chain.
    chain = d / "chain.pem"
    chain.write_bytes(leaf.private_key_and_cert_chain_pem.bytes() + ca.cert_pem.bytes())
    os.chmod(chain, 0o644)
    _open_path(d)
    from cryptography import x509
    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    spki = leaf_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ca_file = d / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    os.chmod(ca_file, 0o644)
    return SimpleNamespace(
        chain=chain, ca=ca, ca_file=ca_file,
        ee_311=hashlib.sha256(spki).hexdigest(),
        ee_302=hashlib.sha512(leaf_cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        ta_201=hashlib.sha256(ca_cert.public_bytes(serialization.Encoding.DER)).hexdigest())


@pytest.fixture(scope="module")
def receiver(base, certs):
    """A postfix-py smtpd with STARTTLS; mail stays in its incoming queue."""
    inst = Instance(base / "rcv")
    inst.dir.mkdir()
    port = free_port()
    inst.port2 = free_port()        # the same, without REQUIRETLS
    inst.main.update({"myhostname": "rcv.test", "smtpd_error_sleep_time": "0s",
                      "mydestination": "$myhostname, dane.test, plain.test, ok.test, "
                                       "noreq.test, tlsno.test",
                      "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(certs.chain)})
    inst.master_lines = [f"127.0.0.1:{port} inet n - y - - smtpd",
                         f"127.0.0.1:{inst.port2} inet n - y - - smtpd -o requiretls_enable=no"]
    inst.port = port
    try:
        inst.start()
        wait_for(lambda: _listening(port), 15, what="receiver smtpd")
        yield inst
    finally:
        inst.cleanup()


def _listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def dns(base, certs, receiver):
    P = receiver.port
    zone = ["dane.test. MX 10 mx-ee.dane.test."]
    for host in HOSTS:
        zone.append(f"{host}.dane.test. A 127.0.0.1")
    for name in ("ee", "ta", "bad", "bogus", "none", "pkix"):
        zone.append(f"{name}.dane.test. MX 10 mx-{name}.dane.test.")
    zone += [
        f"_{P}._tcp.mx-ee.dane.test. TLSA 3 1 1 {certs.ee_311}",
        f"_{P}._tcp.mx-ee.dane.test. TLSA 3 1 1 {'00' * 32}",     # another key, unused
        f"_{receiver.port2}._tcp.mx-ee.dane.test. TLSA 3 1 1 {certs.ee_311}",
        f"_{P}._tcp.mx-ta.dane.test. TLSA 2 0 1 {certs.ta_201}",
        f"_{P}._tcp.mx-bad.dane.test. TLSA 3 1 1 {'ab' * 32}",
        f"_{P}._tcp.mx-bogus.dane.test. TLSA 3 1 1 {certs.ee_311}",
        f"_{P}._tcp.mx-pkix.dane.test. TLSA 1 0 1 {certs.ta_201}",
        # A DANE-TA record whose CA signed the certificate, at a host name that the
        # certificate does not carry: the name check fails.
        "wrongname.dane.test. MX 10 mx-wrong.dane.test.",
        "mx-wrong.dane.test. A 127.0.0.1",
        f"_{P}._tcp.mx-wrong.dane.test. TLSA 2 0 1 {certs.ta_201}",
        # Matching type 2 (SHA2-512) of the full certificate.
        "sha512.dane.test. MX 10 mx-cname.dane.test.",
        f"_{P}._tcp.mx-cname.dane.test. TLSA 3 0 2 {certs.ee_302}",
    ]
    stack = dnssec.DnssecStack(base / "dns")
    # Half-dane: a validated MX RRset naming an unvalidated host ...
    zone.append("unsignedmx.dane.test. MX 10 mx.plain.test.")
    # A validated CNAME to an unvalidated host: TLSA records at the CNAME's owner count
    # (Postfix's qname_secure()); and an unvalidated host whose TLSA records are in a
    # signed child zone with its own trust anchor (smtp_tls_force_insecure_host_tlsa_lookup).
    zone += ["cnamesec.dane.test. MX 10 host-cname.dane.test.",
             "host-cname.dane.test. CNAME mx.plain.test.",
             f"_{P}._tcp.host-cname.dane.test. TLSA 3 1 1 {certs.ee_311}",
             "forced.dane.test. MX 10 mx-forced.plain.test.",
             # MTA-STS beside DANE (the policies: STS_POLICIES)
             '_mta-sts.ee.dane.test. TXT "v=STSv1; id=1"', "mta-sts.ee.dane.test. A 127.0.0.1"]
    # TLSRPT records only for the domains that ask (test_tlsrpt_records_...)
    zone += [f'_smtp._tls.{d}.dane.test. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{d}.dane.test"'
             for d in ("ee", "bad", "sha512")]
    stack.add_zone("dane.test", zone, tamper=[f"_{P}._tcp.mx-bogus.dane.test."])
    stack.add_zone("_tcp.mx-forced.plain.test",
                   [f"_{P}._tcp.mx-forced.plain.test. TLSA 3 1 1 {certs.ee_311}"])
    # ... and unvalidated MX RRsets naming hosts with validated TLSA records.
    stack.add_zone("plain.test", ["plain.test. MX 10 mx.plain.test.",
                                  "mx.plain.test. A 127.0.0.1",
                                  "half.plain.test. MX 10 mx-ee.dane.test.",
                                  "halfbad.plain.test. MX 10 mx-bad.dane.test.",
                                  "mx-forced.plain.test. A 127.0.0.1",
                                  "halfok.plain.test. MX 10 mx-ee.dane.test.",
                                  *(line for d in ("half", "halfok") for line in (
                                      f'_mta-sts.{d}.plain.test. TXT "v=STSv1; id=1"',
                                      f"mta-sts.{d}.plain.test. A 127.0.0.1"))],
                   signed=False)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# Enforced MTA-STS policies that list no MX host of the domain, but one.
STS_POLICIES = {d: f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: 86400\n"
                for d, mx in (("ee.dane.test", "nowhere.example"),
                              ("half.plain.test", "nowhere.example"),
                              ("halfok.plain.test", "mx-ee.dane.test"))}


@pytest.fixture(scope="module")
def sts_https(certs):
    """The policy server of STS_POLICIES (by Host header), on a free port."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certs.ca.issue_cert(*(f"mta-sts.{d}" for d in STS_POLICIES)).configure_cert(ctx)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            domain = (self.headers.get("Host") or "").split(":")[0].removeprefix("mta-sts.")
            body = STS_POLICIES.get(domain)
            if self.path != "/.well-known/mta-sts.txt" or body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def mta(base, dns, receiver, certs, sts_https):
    P = receiver.port
    inst = Instance.make(base / "mta")
    common = (f" -o smtp_dns_support_level=dnssec -o smtp_dns_nameservers=127.0.0.1:"
              f"{dns.resolver_port} -o smtp_tls_loglevel=1")
    inst.main.update({"inet_protocols": "ipv4", "smtp_dns_timeout": "3s",
                      "smtp_connect_timeout": "3s", "smtp_helo_timeout": "5s",
                      "smtp_starttls_timeout": "5s",
                      # tlsmgr reads it from main.cf: every service caches its sessions.
                      "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache"})
    inst.master_lines = [
        f"dane unix - - y - - smtp -o smtp_tls_security_level=dane{common}",
        f"daneonly unix - - y - - smtp -o smtp_tls_security_level=dane-only{common}",
        f"danelog2 unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tls_loglevel=2",
        f"sha256only unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o tls_dane_digests=sha256",
        f"danecache unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tls_loglevel=2",
        "tlsmgr unix - - y 1000? 1 tlsmgr",
        "nodnssec unix - - y - - smtp -o smtp_tls_security_level=dane"
        f" -o smtp_dns_nameservers=127.0.0.1:{dns.resolver_port} -o smtp_tls_loglevel=1",
        # dane and dane-only from the policy table, over a global may
        f"mapdane unix - - y - - smtp -o smtp_tls_security_level=may{common}"
        f" -o smtp_tls_policy_maps=inline:{{none.dane.test:{P}=dane-only,ee.dane.test:{P}=dane}}",
        f"danerpt unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tlsrpt_enable=yes",
        f"danerpt256 unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tlsrpt_enable=yes -o tls_dane_digests=sha256",
        f"danests unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        f" -o smtp_tls_mta_sts_enable=yes -o smtp_tls_mta_sts_CAfile={certs.ca_file}"
        f" -o smtp_tls_mta_sts_https_port={sts_https}",
        f"forcetlsa unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tls_force_insecure_host_tlsa_lookup=yes",
        f"halfencrypt unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tls_dane_insecure_mx_policy=encrypt",
        f"halfmay unix - - y - - smtp -o smtp_tls_security_level=dane{common}"
        " -o smtp_tls_dane_insecure_mx_policy=may",
    ]
    with inst.running("dane"):
        yield inst


_count = [0]


def deliver_via(inst, service, nexthop, recipient="bob@dane.test", timeout=60):
    """qmgr's request for one new queue file to private/SERVICE: (result, dsn, reason, log)."""
    _count[0] += 1
    before = len(inst.log())
    content = (f"Subject: dane {_count[0]}\nMessage-ID: <dane-{_count[0]}-{time.time()}@t>\n\n"
               f"body\n".encode())
    r = inst.deliver(service, nexthop, rcpt=recipient, content=content,
                     sender="alice@example.org", timeout=timeout, keep=True).results[0]
    return SimpleNamespace(result=r.result, dsn=r.dsn, reason=r.reason,
                           log=inst.log()[before:])


def established(status, host, port):
    return f"{status} TLS connection established to {host}[127.0.0.1]:{port}: TLSv1.3 with cipher "


def test_dane_ee_match_delivers_verified(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "danelog2", f"ee.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-ee.dane.test", P) in out.log
    assert (f"mx-ee.dane.test[127.0.0.1]:{P}: Matched DANE EE certificate at depth 0: "
            f"3 1 1 {receiver_hex(out.log)}") in out.log
    assert "matched peername" not in out.log     # no name checks for DANE-EE


def receiver_hex(log):
    """The hex digits logged after "3 1 1 " (the matched record's data)."""
    return log.split("at depth 0: 3 1 1 ", 1)[1].split()[0]


def test_dane_ee_record_data_is_the_leaf_spki_digest(mta, receiver, certs):
    out = deliver_via(mta, "danelog2", f"ee.dane.test:{receiver.port}")
    assert receiver_hex(out.log) == certs.ee_311.upper()


def test_dane_ta_with_name_check_delivers(mta, receiver, certs):
    P = receiver.port
    out = deliver_via(mta, "danelog2", f"ta.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-ta.dane.test", P) in out.log
    peername = f"mx-ta.dane.test[127.0.0.1]:{P}: matched peername: mx-ta.dane.test\n"
    assert peername in out.log
    # Postfix's order: the name, then the record that matched.
    assert out.log.split(peername, 1)[1].split("\n", 1)[0].endswith(
        f"mx-ta.dane.test[127.0.0.1]:{P}: Matched DANE TA certificate at depth 1: 2 0 1 "
        f"{certs.ta_201.upper()}")


def test_dane_sessions_are_cached_and_resumed(mta, receiver):
    """A resumed session (no chain sent again) stays Verified under the same TLSA records."""
    P = receiver.port
    for host in ("ta", "ee"):
        first = deliver_via(mta, "danecache", f"{host}.dane.test:{P}")
        second = deliver_via(mta, "danecache", f"{host}.dane.test:{P}")
        for out in (first, second):
            assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
            assert established("Verified", f"mx-{host}.dane.test", P) in out.log
        assert f"mx-{host}.dane.test[127.0.0.1]:{P}: Reusing old session" in second.log


def test_dane_ta_wrong_name_defers(mta, receiver):
    out = deliver_via(mta, "dane", f"wrongname.dane.test:{receiver.port}")
    assert (out.result, out.dsn) == ("deferred", "4.7.5")
    assert out.reason == "Server certificate not verified"
    assert "num=62:hostname mismatch" in out.log


def test_dane_sha512_full_certificate(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"sha512.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-cname.dane.test", P) in out.log
    # Without sha512 in tls_dane_digests the only record is unusable: encrypt.
    out = deliver_via(mta, "sha256only", f"sha512.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert f"mx-cname.dane.test[127.0.0.1]:{P}: unusable TLSA RR: 3 0 2 " in out.log
    assert "all TLSA records unusable, fallback to unauthenticated TLS" in out.log
    assert established("Untrusted", "mx-cname.dane.test", P) in out.log


def test_dane_mismatch_defers(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"bad.dane.test:{P}")
    assert (out.result, out.dsn) == ("deferred", "4.7.5")
    assert out.reason == "Server certificate not verified"
    assert (f"server certificate verification failed for mx-bad.dane.test[127.0.0.1]:{P}: "
            f"num=65:") in out.log
    assert established("Untrusted", "mx-bad.dane.test", P) in out.log


def test_bogus_tlsa_signature_defers(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"bogus.dane.test:{P}")
    assert (out.result, out.dsn) == ("deferred", "4.7.5")
    assert out.reason == f"TLSA lookup error for mx-bogus.dane.test:{P}"
    assert (f"warning: DANE TLSA lookup problem: Host or domain name not found. Name "
            f"service error for name=_{P}._tcp.mx-bogus.dane.test type=TLSA: Host not "
            f"found, try again") in out.log
    assert "TLS connection established" not in out.log      # no connection at all


def test_unsigned_zone_falls_back_to_may(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Untrusted", "mx.plain.test", P) in out.log
    out = deliver_via(mta, "daneonly", f"plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "non DNSSEC destination")


def test_no_tlsa_records(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"none.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Untrusted", "mx-none.dane.test", P) in out.log
    out = deliver_via(mta, "daneonly", f"none.dane.test:{P}")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "no TLSA records found")


def test_pkix_usages_are_ignored(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"pkix.dane.test:{P}")
    # Only a PKIX-EE record: "TLSA records unusable", and dane becomes encrypt.
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert (f"warning: _{P}._tcp.mx-pkix.dane.test unsupported TLSA certificate usage: "
            f"1 0 1 {receiver_ta(out.log)}") in out.log
    out = deliver_via(mta, "daneonly", f"pkix.dane.test:{P}")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "TLSA records unusable")


def receiver_ta(log):
    return log.split("certificate usage: 1 0 1 ", 1)[1].split()[0]


def test_dane_only_with_records_delivers(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "daneonly", f"ee.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-ee.dane.test", P) in out.log


def test_dane_without_dnssec_lookups_is_may(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "nodnssec", f"ee.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert (f"warning: ee.dane.test:{P}: dane configured with dnssec lookups disabled"
            in out.log)
    assert established("Untrusted", "mx-ee.dane.test", P) in out.log


def test_policy_table_dane_levels(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "mapdane", f"ee.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-ee.dane.test", P) in out.log
    out = deliver_via(mta, "mapdane", f"none.dane.test:{P}")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "no TLSA records found")
    # Not in the table: the global may, no TLSA lookup.
    out = deliver_via(mta, "mapdane", f"ta.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Untrusted", "mx-ta.dane.test", P) in out.log


def test_half_dane_insecure_mx_secure_tlsa(mta, receiver, certs):
    """Postfix's half-dane: the TLSA records are enforced, the peer is only "Trusted"."""
    P = receiver.port
    out = deliver_via(mta, "danelog2", f"half.plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Trusted", "mx-ee.dane.test", P) in out.log
    assert "Verified TLS connection" not in out.log
    assert (f"mx-ee.dane.test[127.0.0.1]:{P}: Matched DANE EE certificate at depth 0: "
            f"3 1 1 {certs.ee_311.upper()}") in out.log
    # A record that does not match defers, as at dane.
    out = deliver_via(mta, "dane", f"halfbad.plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn, out.reason) == \
        ("deferred", "4.7.5", "Server certificate not verified")
    assert (f"server certificate verification failed for mx-bad.dane.test[127.0.0.1]:{P}: "
            f"num=65:") in out.log
    # dane-only wants a validated MX RRset.
    out = deliver_via(mta, "daneonly", f"half.plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "non DNSSEC destination")


def test_half_dane_insecure_mx_policy_encrypt_and_may(mta, receiver):
    P = receiver.port
    # encrypt: the records only make TLS mandatory; a mismatch is no reason to defer.
    for service in ("halfencrypt", "halfmay"):
        out = deliver_via(mta, service, f"halfbad.plain.test:{P}", recipient="bob@plain.test")
        assert (out.result, out.dsn) == ("sent", "2.0.0"), (service, out.reason)
        assert established("Untrusted", "mx-bad.dane.test", P) in out.log


def test_secure_mx_naming_an_unsigned_host_has_no_tlsa(mta, receiver):
    P = receiver.port
    out = deliver_via(mta, "dane", f"unsignedmx.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Untrusted", "mx.plain.test", P) in out.log
    out = deliver_via(mta, "daneonly", f"unsignedmx.dane.test:{P}")
    assert (out.result, out.dsn, out.reason) == ("deferred", "4.7.5", "no TLSA records found")


def test_tlsrpt_records_the_tlsa_policy_and_its_outcomes(mta, receiver, certs):
    """TLSRPT for DANE, as Postfix reports it: policy type tlsa with the records and the
    TLSA base domain; a record that does not match is certificate-not-trusted."""
    import json
    P = receiver.port
    assert deliver_via(mta, "danerpt", f"ee.dane.test:{P}").result == "sent"
    assert deliver_via(mta, "danerpt", f"bad.dane.test:{P}").result == "deferred"
    out = mta.cmd("tlsrpt", "show")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    [ee] = [v for k, v in shown.items() if k.endswith(" ee.dane.test")]
    [bad] = [v for k, v in shown.items() if k.endswith(" bad.dane.test")]
    assert [e["policy"] for e in ee] == [{
        "policy-type": "tlsa", "policy-domain": "mx-ee.dane.test",
        "policy-string": sorted([f"3 1 1 {certs.ee_311.upper()}", f"3 1 1 {'00' * 32}"])}]
    assert (ee[0]["success"], ee[0]["failures"]) == (1, [])
    assert bad[0]["policy"]["policy-string"] == [f"3 1 1 {'AB' * 32}"]
    assert bad[0]["success"] == 0
    [failure] = bad[0]["failures"]
    assert failure["detail"]["result-type"] == "certificate-not-trusted"
    assert failure["detail"]["receiving-mx-hostname"] == "mx-bad.dane.test"
    # All records unusable (sha512 disabled): delivered at encrypt, reported tlsa-invalid.
    assert deliver_via(mta, "danerpt256", f"sha512.dane.test:{P}").result == "sent"
    shown = json.loads(mta.cmd("tlsrpt", "show").stdout)
    [unusable] = [v for k, v in shown.items() if k.endswith(" sha512.dane.test")]
    assert unusable[0]["policy"] == {"policy-type": "tlsa",
                                     "policy-domain": "mx-cname.dane.test",
                                     "policy-string": [f"3 0 2 {certs.ee_302.upper()}"]}
    assert unusable[0]["success"] == 0
    assert [f["detail"]["result-type"] for f in unusable[0]["failures"]] == ["tlsa-invalid"]


def test_validated_cname_to_an_unsigned_host(mta, receiver):
    """The MX host name is a validated CNAME into an unsigned zone: its TLSA records,
    at the CNAME's own name, apply (Postfix's tls_dane_resolve)."""
    P = receiver.port
    out = deliver_via(mta, "danelog2", f"cnamesec.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "host-cname.dane.test", P) in out.log
    assert "Matched DANE EE certificate at depth 0" in out.log


def test_forced_tlsa_lookup_for_an_unsigned_host(mta, receiver):
    P = receiver.port
    # By default no TLSA lookup for a host in an unsigned zone: may.
    out = deliver_via(mta, "dane", f"forced.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Untrusted", "mx-forced.plain.test", P) in out.log
    # Forced: the records of the signed child zone are found and enforced.
    out = deliver_via(mta, "forcetlsa", f"forced.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Verified", "mx-forced.plain.test", P) in out.log


def test_posttls_finger_forced_tlsa_lookup(dns, receiver):
    P = receiver.port
    text = finger(dns, f"forced.dane.test:{P}")
    assert f"posttls-finger: {established('Untrusted', 'mx-forced.plain.test', P)}" in text
    text = finger(dns, "-f", f"forced.dane.test:{P}")
    assert f"posttls-finger: {established('Verified', 'mx-forced.plain.test', P)}" in text


def test_mta_sts_beside_dane(mta, receiver):
    """DANE wins over an enforced MTA-STS policy (RFC 8461 section 2); at half-dane the
    insecure MX name must match the policy, and the TLSA records still decide."""
    P = receiver.port
    out = deliver_via(mta, "danests", f"ee.dane.test:{P}")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert "MTA-STS policy for ee.dane.test: mode enforce, id 1" in out.log
    assert "does not match STS MX pattern" not in out.log
    assert established("Verified", "mx-ee.dane.test", P) in out.log
    out = deliver_via(mta, "danests", f"half.plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn, out.reason) == (
        "deferred", "4.7.5",
        "MX host mx-ee.dane.test does not match the MTA-STS policy of half.plain.test")
    assert ("warning: MX name 'mx-ee.dane.test' does not match STS MX pattern for "
            "'half.plain.test'") in out.log
    # Listed: still half-dane (the test CA is in no CAfile: "verify" would defer).
    out = deliver_via(mta, "danests", f"halfok.plain.test:{P}", recipient="bob@plain.test")
    assert (out.result, out.dsn) == ("sent", "2.0.0"), out.reason
    assert established("Trusted", "mx-ee.dane.test", P) in out.log


def test_no_tracebacks(mta):
    assert "Traceback" not in mta.log()


# --- posttls-finger -------------------------------------------------------------------------

def finger(dns, *args):
    from helpers import run
    out = run("posttls-finger", "-c", "-o", f"smtp_dns_nameservers=127.0.0.1:{dns.resolver_port}",
              *args, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_posttls_finger_dane_ee(dns, receiver, certs):
    P = receiver.port
    text = finger(dns, "-L", "routine,certmatch,dane", f"ee.dane.test:{P}")
    assert (f"posttls-finger: DNSSEC-signed TLSA record: _{P}._tcp.mx-ee.dane.test: "
            f"3 1 1 {certs.ee_311.upper()}\n") in text
    assert (f"posttls-finger: mx-ee.dane.test[127.0.0.1]:{P}: Matched DANE EE certificate "
            f"at depth 0: 3 1 1 {certs.ee_311.upper()}\n") in text
    assert f"posttls-finger: {established('Verified', 'mx-ee.dane.test', P)}" in text


def test_posttls_finger_dane_ta_and_mismatch(dns, receiver, certs):
    P = receiver.port
    text = finger(dns, "-l", "dane", f"ta.dane.test:{P}")
    lines = text.splitlines()
    at = lines.index(f"posttls-finger: mx-ta.dane.test[127.0.0.1]:{P}: matched peername: "
                     f"mx-ta.dane.test")
    assert lines[at + 1] == (f"posttls-finger: mx-ta.dane.test[127.0.0.1]:{P}: Matched DANE "
                             f"TA certificate at depth 1: 2 0 1 {certs.ta_201.upper()}")
    assert f"posttls-finger: {established('Verified', 'mx-ta.dane.test', P)}" in text
    text = finger(dns, f"bad.dane.test:{P}")
    assert f"posttls-finger: {established('Untrusted', 'mx-bad.dane.test', P)}" in text


def test_posttls_finger_dane_fallbacks(dns, receiver):
    P = receiver.port
    text = finger(dns, "-l", "dane-only", f"none.dane.test:{P}")
    assert 'posttls-finger: no TLSA records found, resorting to "secure"' in text
    assert f"posttls-finger: {established('Untrusted', 'mx-none.dane.test', P)}" in text
    # An insecure MX RRset naming an unsigned host: no TLSA records, "secure" (-M dane,
    # the default); -M may stops before the TLSA lookup.
    text = finger(dns, f"plain.test:{P}")
    assert "MX RRset is insecure" not in text
    assert f"posttls-finger: {established('Untrusted', 'mx.plain.test', P)}" in text
    text = finger(dns, "-M", "may", f"plain.test:{P}")
    assert "posttls-finger: MX RRset is insecure: try to encrypt" in text
    text = finger(dns, f"bogus.dane.test:{P}")
    assert f"posttls-finger: TLSA lookup error for mx-bogus.dane.test:{P}" in text
    assert "TLS connection established" not in text


def test_posttls_finger_half_dane(dns, receiver, certs):
    P = receiver.port
    text = finger(dns, f"half.plain.test:{P}")
    lines = text.splitlines()
    assert "posttls-finger: MX RRset insecure: log verified as trusted" in lines
    assert (f"posttls-finger: mx-ee.dane.test[127.0.0.1]:{P}: Matched DANE EE certificate "
            f"at depth 0: 3 1 1 {certs.ee_311.upper()}") in lines
    assert f"posttls-finger: {established('Trusted', 'mx-ee.dane.test', P)}" in text
    text = finger(dns, "-M", "encrypt", f"half.plain.test:{P}")
    assert "posttls-finger: TLSA RRs found, MX RRset insecure: just encrypt" in text
    assert f"posttls-finger: {established('Untrusted', 'mx-ee.dane.test', P)}" in text
    text = finger(dns, "-M", "may", f"half.plain.test:{P}")
    assert "posttls-finger: MX RRset is insecure: try to encrypt" in text
    assert f"posttls-finger: {established('Untrusted', 'mx-ee.dane.test', P)}" in text


def test_posttls_finger_bad_insecure_mx_policy(dns):
    from helpers import run
    out = run("posttls-finger", "-M", "verify", "half.plain.test", timeout=60)
    assert out.returncode == 1
    assert "posttls-finger: bad '-M' option value: verify" in out.stderr


# --- REQUIRETLS (RFC 8689): a postfix-py relay in front of the receiver ----------------------

@pytest.fixture(scope="module")
def relay(base, certs, dns, receiver):
    """smtpd (STARTTLS) -> qmgr -> smtp at level dane, routed by recipient domain."""
    inst = Instance(base / "relay")
    inst.dir.mkdir()
    inst.port = free_port()
    P, P2 = receiver.port, receiver.port2
    inst.main.update({
        "myhostname": "relay.test", "mydestination": "localhost", "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8", "smtpd_error_sleep_time": "0s",
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(certs.chain),
        "smtp_tls_security_level": "dane", "smtp_dns_support_level": "dnssec",
        "smtp_dns_nameservers": f"127.0.0.1:{dns.resolver_port}", "smtp_tls_loglevel": "1",
        "smtp_dns_timeout": "3s", "smtp_connect_timeout": "3s",
        "transport_maps": "inline:{"
                          f"ok.test=smtp:ee.dane.test:{P}, noreq.test=smtp:ee.dane.test:{P2}, "
                          f"weak.test=maysmtp:[127.0.0.1]:{P}, tlsno.test=smtp:bad.dane.test:{P}, "
                          f"half.test=smtp:half.plain.test:{P}"
                          "}",
    })
    inst.master_lines = [
        f"127.0.0.1:{inst.port} inet n - y - - smtpd",
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - - smtp",
        "maysmtp unix - - y - - smtp -o smtp_tls_security_level=may",
    ]
    try:
        inst.start()
        wait_for(lambda: _listening(inst.port), 15, what="relay smtpd")
        yield inst
    finally:
        inst.cleanup()


def _client_tls():
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _submit(relay, rcpt, requiretls=True, headers=""):
    from smtpclient import SmtpClient
    c = SmtpClient(relay.port)
    try:
        assert c.reply().startswith("220")
        ehlo = c.cmd("EHLO client.test")
        assert "REQUIRETLS" not in ehlo          # only inside TLS
        c.starttls(_client_tls())
        assert "REQUIRETLS" in [line[4:] for line in c.cmd("EHLO client.test").splitlines()]
        tag = f"reqtls-{time.monotonic_ns()}"
        assert c.cmd(f"MAIL FROM:<alice@example.org>{' REQUIRETLS' * requiretls}") == \
            "250 2.1.0 Ok"
        assert c.cmd(f"RCPT TO:<bob@{rcpt}>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        reply = c.cmd(f"Subject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n{headers}\r\n"
                      "body\r\n.")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        c.cmd("QUIT")
        return reply.split()[-1]
    finally:
        c.close()


def _outcome(relay, qid):
    """The relay's delivery log line for queue id qid."""
    return wait_for(lambda: next((line for line in relay.log().splitlines()
                                  if f": {qid}: to=<" in line and "status=" in line), None),
                    30, what=f"the outcome of {qid}")


def test_requiretls_not_accepted_without_tls(relay):
    from smtpclient import SmtpClient
    c = SmtpClient(relay.port)
    try:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<alice@example.org> REQUIRETLS") == \
            "555 5.5.4 Unsupported option: REQUIRETLS"
    finally:
        c.close()


def test_requiretls_relayed_over_dane_to_a_requiretls_server(relay, receiver):
    qid = _submit(relay, "ok.test")
    line = _outcome(relay, qid)
    assert "status=sent" in line, line
    assert f"relay=mx-ee.dane.test[127.0.0.1]:{receiver.port}" in line
    # The receiver got MAIL FROM ... REQUIRETLS and keeps it in its queue file.
    queued = line.split("queued as ")[1].rstrip(")")
    m = Q.read(str(receiver.queue / "incoming" / queued))
    assert m.attrs.get("requiretls") == "1"


def test_requiretls_bounces_without_server_support(relay, receiver):
    qid = _submit(relay, "noreq.test")
    line = _outcome(relay, qid)
    assert "status=bounced" in line and "dsn=5.7.30" in line, line
    assert ("(Sender requested REQUIRETLS, but no server was found that supports "
            f"REQUIRETLS. The last attempted server was mx-ee.dane.test[127.0.0.1])") in line


def test_requiretls_bounces_at_a_level_without_certificate_matching(relay):
    qid = _submit(relay, "weak.test")
    line = _outcome(relay, qid)
    assert "status=bounced" in line and "dsn=5.7.10" in line, line
    assert ("Sender requested REQUIRETLS, but my configured TLS security level 'may' "
            "disables certificate matching. The last attempted server was 127.0.0.1") in line


def test_tls_required_no_header_ignores_dane_failure(relay, receiver):
    # bad.dane.test has a TLSA record that does not match: deferred under DANE ...
    qid = _submit(relay, "tlsno.test", requiretls=False)
    line = _outcome(relay, qid)
    assert "status=deferred" in line and "Server certificate not verified" in line, line
    # ... delivered at "may" with "TLS-Required: No".
    qid = _submit(relay, "tlsno.test", requiretls=False, headers="TLS-Required: No\r\n")
    line = _outcome(relay, qid)
    assert "status=sent" in line, line
    # REQUIRETLS wins over the header (RFC 8689 section 5; Postfix).
    qid = _submit(relay, "tlsno.test", headers="TLS-Required: No\r\n")
    line = _outcome(relay, qid)
    assert "status=bounced" in line and "dsn=5.7.10" in line, line
    assert ("(Sender requested REQUIRETLS, but no trusted server certificate was found. "
            "The last attempted server was mx-bad.dane.test[127.0.0.1])") in line


# --- postfix-py tls explain: the DANE TLSA policy source ----------------------------------

def explain(inst, destination):
    from helpers import POSTFIX_PY
    import subprocess
    out = subprocess.run([POSTFIX_PY, "-c", str(inst.dir), "tls", "explain", destination],
                         capture_output=True, text=True, env=inst.env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


def test_tls_explain_names_the_dane_tlsa_records(relay, receiver, certs):
    P = receiver.port
    text = explain(relay, "bob@ok.test")
    assert f"ok.test: transport smtp, next hop ee.dane.test:{P}" in text
    assert "global TLS level dane" in text
    lines = text.splitlines()
    at = lines.index(f"  mx-ee.dane.test[127.0.0.1]:{P} (preference 10)")
    assert lines[at + 1] == ("    TLS policy: level=dane, source=DANE TLSA, "
                             "match=mx-ee.dane.test:ee.dane.test, servername=mx-ee.dane.test")
    assert sorted(lines[at + 2:at + 4]) == sorted([
        f"    TLSA record: 3 1 1 {certs.ee_311.upper()}", f"    TLSA record: 3 1 1 {'00' * 32}"])


def test_tls_explain_names_a_dane_downgrade(relay):
    # An unsigned zone: the MX RRset is insecure, and (smtp_tls_dane_insecure_mx_policy =
    # dane) its host has no validated TLSA records either: may.
    text = explain(relay, "plain.test")
    assert "plain.test: transport smtp, next hop plain.test" in text
    assert "  mx.plain.test[127.0.0.1]:25 (preference 10)" in text
    assert "    TLS policy: level=may, source=DANE TLSA (no TLSA records found)" in text
    # A signed zone without TLSA records at the MX host: may as well, for another reason.
    text = explain(relay, "none.dane.test")
    assert "    TLS policy: level=may, source=DANE TLSA (no TLSA records found)" in text
    assert "TLSA record:" not in text


def test_tls_explain_names_the_half_dane_level(relay, receiver):
    P = receiver.port
    text = explain(relay, "bob@half.test")
    lines = text.splitlines()
    at = lines.index(f"  mx-ee.dane.test[127.0.0.1]:{P} (preference 10)")
    assert lines[at + 1] == ("    TLS policy: level=halfdane, source=DANE TLSA, "
                             "match=mx-ee.dane.test:half.plain.test, servername=mx-ee.dane.test")
