"""reject_unknown_sender_domain and reject_unknown_recipient_domain against a real DNS
server: a private dnsmasq on 127.0.0.1, and a UDP port that never answers.

smtpd asks the system resolver (resolv.conf, read before the chroot) or smtpd_dns_nameservers;
these tests give smtpd/check.py's Checker a dnspython resolver aimed at dnsmasq
(Checker(cfg, resolver)): the lookups, the decisions and the replies are the real ones, only
the resolver configuration is the test's. test_smtpd_dnsbl.py has a real-instance test.
"""

import os

import pytest

from peers import DNSMASQ, Dnsmasq, loopback_resolver
from postfix_py.lib import maincf
from postfix_py.lib.dnsbl import DnsLookup
from postfix_py.smtpd.check import Checker, ClientState

pytestmark = pytest.mark.skipif(not DNSMASQ or os.geteuid() != 0,
                                reason="needs dnsmasq and root")


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    """dnsmasq with ok.test (MX), aonly.test (an A record only); other .test names do
    not exist (NXDOMAIN)."""
    with Dnsmasq(["--mx-host=ok.test,mx.ok.test,10", "--host-record=mx.ok.test,127.0.0.1",
                  "--host-record=aonly.test,127.0.0.1"],
                 tmp_path_factory.mktemp("dns") / "dnsmasq.log",
                 ready=lambda r: r.resolve("aonly.test", "A")) as server:
        yield server.port


def checker(port: int, **values) -> Checker:
    base = {"myhostname": "mail.test.example", "mydestination": "localhost",
            "local_recipient_maps": "",  # u@localhost: any local part
            "mynetworks": "127.0.0.0/8",
            "smtpd_sender_restrictions": "reject_unknown_sender_domain",
            "smtpd_recipient_restrictions": "reject_unknown_recipient_domain, "
                                            "permit_mynetworks, reject_unauth_destination"}
    base.update(values)
    assert isinstance(Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf",
                                            overrides=base)).dns,
                      DnsLookup)       # built because a list needs it
    return Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base),
                   loopback_resolver(port))


def rcpt(c: Checker, sender: str, recipient: str = "u@localhost") -> str | None:
    reply = c.rcpt(ClientState(name="localhost", addr="127.0.0.1", sender=sender), recipient)
    return None if reply is None else str(reply)


def test_domains_that_exist_pass(dnsmasq):
    c = checker(dnsmasq)
    assert rcpt(c, "a@ok.test") is None                  # MX
    assert rcpt(c, "a@aonly.test") is None               # no MX, an A record
    assert rcpt(c, "a@ok.test", "b@aonly.test") is None
    assert rcpt(c, "") is None                           # the null sender: not looked up
    assert rcpt(c, "a@[127.0.0.1]") is None              # an address literal: neither
    assert rcpt(c, "a@missing.test", "b@localhost") is not None
    assert rcpt(c, "a@localhost", "b@localhost") is None  # mydestination: not looked up


def test_unknown_domains_are_rejected_with_unknown_address_reject_code(dnsmasq):
    c = checker(dnsmasq)
    assert rcpt(c, "a@missing.test") == \
        "450 4.1.8 <a@missing.test>: Sender address rejected: Domain not found"
    assert rcpt(c, "a@ok.test", "b@missing.test") == \
        "450 4.1.2 <b@missing.test>: Recipient address rejected: Domain not found"
    c = checker(dnsmasq, unknown_address_reject_code="550")
    assert rcpt(c, "a@missing.test") == \
        "550 5.1.8 <a@missing.test>: Sender address rejected: Domain not found"
    assert rcpt(c, "a@ok.test", "b@missing.test") == \
        "550 5.1.2 <b@missing.test>: Recipient address rejected: Domain not found"


def test_without_delay_reject_the_sender_is_checked_at_mail(dnsmasq):
    c = checker(dnsmasq, smtpd_delay_reject="no")
    state = ClientState(name="localhost", addr="127.0.0.1", sender="a@missing.test")
    assert str(c.mail(state)) == \
        "450 4.1.8 <a@missing.test>: Sender address rejected: Domain not found"
    state.sender = "a@ok.test"
    assert c.mail(state) is None


def test_a_dns_timeout_defers_unless_something_rejects(dead_port):
    c = checker(dead_port, unknown_address_reject_code="550")
    # unknown_address_tempfail_action = defer_if_permit: 450 whatever the reject code
    assert rcpt(c, "a@slow.test") == \
        "450 4.1.8 <a@slow.test>: Sender address rejected: Domain not found"
    # ... and a later reject wins over the deferral
    c = checker(dead_port, smtpd_recipient_restrictions="check_recipient_access "
                "inline:{u@localhost=REJECT}, permit_mynetworks, reject_unauth_destination")
    assert rcpt(c, "a@slow.test") == \
        "554 5.7.1 <u@localhost>: Recipient address rejected: Access denied"
