"""smtp/nexthop.py: next-hop syntax, and MX/address lookups against a real DNS server.

The DNS server is a small UDP responder in this process (dnspython builds its answers),
so that every outcome can be produced on demand: records, NXDOMAIN, no data, CNAME chains,
a null MX, a server that never answers, and one that answers with garbage.
"""

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from postfix_py.smtp import nexthop as N


@pytest.mark.parametrize("text,host,port,mx,literal", [
    ("example.com", "example.com", 25, True, False),
    ("example.com:587", "example.com", 587, True, True),
    ("[mail.example.com]", "mail.example.com", 25, False, True),
    ("[mail.example.com]:2525", "mail.example.com", 2525, False, True),
    ("[192.0.2.1]", "192.0.2.1", 25, False, True),
    ("[ipv6:2001:db8::1]:26", "2001:db8::1", 26, False, True),
    ("[::1]", "::1", 25, False, True),
    ("[mail.example.com]:smtp", "mail.example.com", 25, False, True),
    ("192.0.2.7", "192.0.2.7", 25, False, False),
])
def test_parse_smtp_forms(text, host, port, mx, literal):
    d = N.parse(text)
    assert (d.host, d.port, d.mx, d.literal, d.unix) == (host, port, mx, literal, False)
    assert d.text == text


def test_parse_lmtp_forms():
    d = N.parse("unix:/var/run/dovecot/lmtp", lmtp=True)
    assert d.unix and d.host == "/var/run/dovecot/lmtp" and d.port == 0
    d = N.parse("inet:mail.example.com", lmtp=True)
    assert (d.host, d.port, d.mx) == ("mail.example.com", 24, False)
    d = N.parse("inet:[127.0.0.1]:2424", lmtp=True)
    assert (d.host, d.port, d.text) == ("127.0.0.1", 2424, "[127.0.0.1]:2424")
    assert N.parse("mail.example.com", lmtp=True).mx is False


@pytest.mark.parametrize("text,problem", [
    ("[mail.example.com", 'missing "]"'),
    ("[mail.example.com]x", 'garbage after "]"'),
    ("example.com:0", "bad network port: 0"),
    ("example.com:99999", "bad network port"),
    ("example.com:nosuchservice", "unknown service: nosuchservice/tcp"),
    ("2001:db8::1", "IPv6 addresses need [ ]"),
    ("[]", "empty host name"),
    ("", "empty destination"),
])
def test_parse_refusals(text, problem):
    with pytest.raises(N.NexthopError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        N.parse(text)


def test_parse_list():
    assert [d.text for d in N.parse_list("a.example, [b.example]:26  c.example")] == \
        ["a.example", "[b.example]:26", "c.example"]


class FakeDNS:
    """A UDP DNS server on 127.0.0.1: records, rcodes, silence or garbage on demand."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records = {}       # (name, type) -> list of rdata text
        self.rcodes = {}        # name -> rcode
        self.mode = "answer"    # answer, silent, garbage
        self.queries = []
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, name, rdtype, *rdatas):
        self.records.setdefault((name.lower().rstrip(".") + ".", rdtype), []).extend(rdatas)

    def run(self):
        while not self.stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            if self.mode == "silent":
                continue
            if self.mode == "garbage":
                self.sock.sendto(data[:2] + b"\x81\x80\xff\xff garbage", peer)
                continue
            query = dns.message.from_wire(data)
            q = query.question[0]
            name, rdtype = q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype)
            self.queries.append((name, rdtype))
            resp = dns.message.make_response(query)
            resp.flags |= dns.flags.AA
            if name in self.rcodes:
                resp.set_rcode(self.rcodes[name])
            else:
                cname = self.records.get((name, "CNAME"))
                if cname and rdtype != "CNAME":
                    resp.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", *cname))
                    name = cname[0].lower()
                rdatas = self.records.get((name, rdtype))
                if rdatas:
                    resp.answer.append(dns.rrset.from_text(name, 60, "IN", rdtype, *rdatas))
                elif not any(k[0] == name for k in self.records):
                    resp.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(resp.to_wire(), peer)

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def fakedns():
    server = FakeDNS()
    yield server
    server.close()


def resolver(fakedns, **kw):
    kw.setdefault("timeout", 1.0)
    kw.setdefault("protocols", ("ipv4",))
    kw.setdefault("randomize", False)
    return N.NexthopResolver([f"127.0.0.1:{fakedns.port}"], **kw)


def test_mx_preference_order_and_hosts(fakedns):
    fakedns.add("example.test", "MX", "20 mx2.example.test.", "10 mx1.example.test.")
    fakedns.add("mx1.example.test", "A", "127.0.0.2", "127.0.0.3")
    fakedns.add("mx2.example.test", "A", "127.0.0.4")
    addrs, why = resolver(fakedns).addresses(N.parse("example.test:2525"))
    assert why is None
    # Preference order; the order of one host's addresses is the DNS server's.
    assert [(a.name, a.port, a.pref) for a in addrs] == [
        ("mx1.example.test", 2525, 10), ("mx1.example.test", 2525, 10),
        ("mx2.example.test", 2525, 20)]
    assert {a.addr for a in addrs[:2]} == {"127.0.0.2", "127.0.0.3"}
    assert addrs[2].namaddrport == "mx2.example.test[127.0.0.4]:2525"


def test_equal_preferences_are_shuffled(fakedns):
    fakedns.add("example.test", "MX", *[f"10 mx{i}.example.test." for i in range(6)])
    for i in range(6):
        fakedns.add(f"mx{i}.example.test", "A", f"127.0.0.{i + 10}")
    orders = {tuple(a.name for a in resolver(fakedns, randomize=True).addresses(
        N.parse("example.test"))[0]) for _ in range(20)}
    assert len(orders) > 1


def test_no_mx_falls_back_to_address(fakedns):
    fakedns.add("nomx.test", "A", "127.0.0.5")
    addrs, why = resolver(fakedns).addresses(N.parse("nomx.test"))
    assert why is None and [(a.name, a.addr) for a in addrs] == [("nomx.test", "127.0.0.5")]


def test_bracketed_next_hop_skips_mx(fakedns):
    fakedns.add("mail.test", "MX", "10 elsewhere.test.")
    fakedns.add("mail.test", "A", "127.0.0.6")
    addrs, _ = resolver(fakedns).addresses(N.parse("[mail.test]:26"))
    assert [(a.name, a.addr, a.port) for a in addrs] == [("mail.test", "127.0.0.6", 26)]
    assert ("mail.test.", "MX") not in fakedns.queries


def test_numeric_next_hop_needs_no_dns(fakedns):
    fakedns.mode = "silent"
    addrs, why = resolver(fakedns).addresses(N.parse("[127.0.0.9]:2525"))
    assert why is None and addrs[0].namaddrport == "127.0.0.9[127.0.0.9]:2525"


def test_nxdomain_is_permanent(fakedns):
    fakedns.add("other.test", "A", "127.0.0.1")
    addrs, why = resolver(fakedns).addresses(N.parse("nowhere.test"))
    assert addrs == [] and why.dsn == "5.4.4"
    assert why.reason == ("Host or domain name not found. Name service error for "
                          "name=nowhere.test type=A: Host not found")


def test_host_without_address_is_permanent(fakedns):
    fakedns.add("mail.test", "MX", "10 mail.test.")
    addrs, why = resolver(fakedns).addresses(N.parse("[mail.test]"))
    assert why.dsn == "5.4.4" and why.reason.endswith(
        "name=mail.test type=A: Host found but no data record of requested type")


@pytest.mark.parametrize("mode", ["silent", "garbage"])
def test_dns_timeout_and_garbage_are_temporary(fakedns, mode):
    fakedns.mode = mode
    addrs, why = resolver(fakedns, timeout=0.5).addresses(N.parse("example.test"))
    assert addrs == [] and why.soft and why.dsn == "4.4.3"
    assert why.reason == ("Host or domain name not found. Name service error for "
                          "name=example.test type=MX: Host not found, try again")


def test_servfail_is_temporary(fakedns):
    fakedns.rcodes["example.test."] = dns.rcode.SERVFAIL
    _, why = resolver(fakedns).addresses(N.parse("example.test"))
    assert why.dsn == "4.4.3"


def test_temporary_failure_of_one_mx_host_dominates(fakedns):
    fakedns.add("example.test", "MX", "10 gone.test.", "20 broken.test.")
    fakedns.add("x.test", "A", "127.0.0.1")
    fakedns.rcodes["broken.test."] = dns.rcode.SERVFAIL
    _, why = resolver(fakedns).addresses(N.parse("example.test"))
    assert why.dsn == "4.4.3" and "name=broken.test" in why.reason


def test_null_mx(fakedns):
    fakedns.add("nullmx.test", "MX", "0 .")
    _, why = resolver(fakedns).addresses(N.parse("nullmx.test"))
    assert (why.dsn, why.reason) == ("5.1.10", "Domain nullmx.test does not accept mail (nullMX)")


def test_cname_does_not_override_servername_by_default(fakedns):
    fakedns.add("example.test", "MX", "10 alias.example.test.")
    fakedns.add("alias.example.test", "CNAME", "real.example.test.")
    fakedns.add("real.example.test", "A", "127.0.0.8")
    addrs, _ = resolver(fakedns).addresses(N.parse("example.test"))
    assert [(a.name, a.addr) for a in addrs] == [("alias.example.test", "127.0.0.8")]
    addrs, _ = resolver(fakedns, cname_overrides=True).addresses(N.parse("example.test"))
    assert [(a.name, a.addr) for a in addrs] == [("real.example.test", "127.0.0.8")]


def test_native_lookup_uses_the_c_library():
    r = N.NexthopResolver(["127.0.0.1:9"], timeout=0.3, host_lookup=("native",),
                   protocols=("ipv4",))
    addrs, why = r.addresses(N.parse("[localhost]:2525"))
    assert why is None and addrs[0].addr == "127.0.0.1" and addrs[0].name == "localhost"


def test_unix_destination():
    r = N.NexthopResolver(["127.0.0.1:9"], timeout=0.3)
    addrs, why = r.addresses(N.parse("unix:/run/lmtp", lmtp=True))
    assert why is None and addrs[0].addr == "/run/lmtp" and addrs[0].family == socket.AF_UNIX


def test_bad_nameserver_setting():
    with pytest.raises(ValueError, match="bad DNS server address"):
        N.NexthopResolver(["not-an-address"])
