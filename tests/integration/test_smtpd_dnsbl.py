"""DNS lists and the HELO name in the DNS, against a real DNS server: a private dnsmasq on
127.0.0.1 serving a list zone (list.test, allow.test) and a few host names.

The restrictions run in smtpd/check.py's Checker given a dnspython resolver aimed at
dnsmasq (Checker(cfg, resolver)); the last test runs a real instance whose smtpd asks
dnsmasq through smtpd_dns_nameservers and refuses a listed client (127.0.0.1) with
Postfix's reply and log line.
"""

import os

import pytest

from peers import DNSMASQ, Dnsmasq, loopback_resolver
from pfxinst import SmtpClient, wait_for
from postfix_py.lib import maincf
from postfix_py.smtpd.check import Checker, ClientState

pytestmark = pytest.mark.skipif(not DNSMASQ or os.geteuid() != 0,
                                reason="needs dnsmasq and root")

# The zone: 127.0.0.1 and 127.0.0.2 listed in list.test (127.0.0.2 with two TXT records,
# 127.0.0.1 answering 127.0.0.4), 127.0.0.3 in allow.test; bad.example listed in
# list.test (right-hand side); good.example and its MX host exist.
ZONE = ["--host-record=2.0.0.127.list.test,127.0.0.2",
        "--txt-record=2.0.0.127.list.test,listed for testing",
        "--txt-record=2.0.0.127.list.test,see https://list.test/127.0.0.2",
        "--host-record=1.0.0.127.list.test,127.0.0.4",
        "--txt-record=1.0.0.127.list.test,listed for testing",
        "--host-record=3.0.0.127.allow.test,127.0.0.2",
        "--host-record=bad.example.list.test,127.0.0.2",
        "--txt-record=bad.example.list.test,bad domain",
        "--host-record=good.example,127.0.0.1",
        "--mx-host=mxonly.example,good.example,10",
        f"--host-record={'.'.join('0' * 31 + '1')}.list.test,127.0.0.2"]


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory):
    with Dnsmasq(ZONE, tmp_path_factory.mktemp("dns") / "dnsmasq.log",
                 local=("test", "example"),
                 ready=lambda r: r.resolve("good.example", "A")) as server:
        yield server.port


def checker(port: int, restrictions: str, **values) -> Checker:
    base = {"myhostname": "mail.test.example", "mydestination": "localhost",
            "mynetworks": "10.0.0.0/8",
            "local_recipient_maps": "",     # u@localhost: any local part
            "smtpd_recipient_restrictions": restrictions + ", reject_unauth_destination"}
    base.update(values)
    return Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base),
                   loopback_resolver(port))


def rcpt(c: Checker, addr="127.0.0.2", name="client.example", helo="client.example",
         sender="a@good.example", recipient="u@localhost") -> str | None:
    state = ClientState(name=name, addr=addr, helo=helo, sender=sender, reverse_name=name)
    reply = c.rcpt(state, recipient)
    return None if reply is None else str(reply)


def test_reject_rbl_client_replies_as_postfix_with_the_txt_reason(dnsmasq):
    c = checker(dnsmasq, "reject_rbl_client list.test")
    # two TXT records, joined with " / " in the order the server sent them
    head = "554 5.7.1 Service unavailable; Client host [127.0.0.2] blocked using list.test; "
    assert rcpt(c) in (head + "listed for testing / see https://list.test/127.0.0.2",
                       head + "see https://list.test/127.0.0.2 / listed for testing")
    assert rcpt(c, addr="127.0.0.9") is None              # not listed (NXDOMAIN)
    c = checker(dnsmasq, "reject_rbl_client list.test", maps_rbl_reject_code="450")
    assert rcpt(c, addr="127.0.0.1") == ("450 4.7.1 Service unavailable; Client host "
                                         "[127.0.0.1] blocked using list.test; "
                                         "listed for testing")


def test_reply_filters_select_list_answers(dnsmasq):
    for spec, listed in (("list.test=127.0.0.2", True), ("list.test=127.0.0.4", False),
                         ("list.test=127.0.0.[1..3]", True), ("list.test=127.0.0.[3;4]",
                                                               False)):
        c = checker(dnsmasq, f"reject_rbl_client {spec}")
        reply = rcpt(c)
        assert (reply is not None) == listed, spec
        if listed:
            # $rbl_domain is the domain without the filter
            assert "blocked using list.test;" in reply


def test_ipv6_clients_are_asked_by_nibbles(dnsmasq):
    c = checker(dnsmasq, "reject_rbl_client list.test")
    assert rcpt(c, addr="1000::").startswith("554 5.7.1 Service unavailable; Client host "
                                             "[1000::] blocked using list.test")
    assert rcpt(c, addr="1000::1") is None


def test_rbl_reply_maps_and_default_rbl_reply(dnsmasq):
    # the inline table's value is main.cf text: $$ stands for $, as Postfix says
    c = checker(dnsmasq, "reject_rbl_client list.test",
                rbl_reply_maps="inline:{{list.test=$$rbl_code 5.7.9 Go away $$client_address "
                               "($${rbl_reason?$$rbl_reason})}}")
    assert rcpt(c) in ("554 5.7.9 Go away 127.0.0.2 (listed for testing / "
                       "see https://list.test/127.0.0.2)",
                       "554 5.7.9 Go away 127.0.0.2 (see https://list.test/127.0.0.2 / "
                       "listed for testing)")
    c = checker(dnsmasq, "reject_rbl_client list.test",
                default_rbl_reply="$rbl_code Blocked by $rbl_domain: $rbl_class $rbl_what")
    assert rcpt(c) == "554 5.7.1 Blocked by list.test: Client host 127.0.0.2"


def test_bad_templates_fall_back_with_postfix_warnings(dnsmasq, capfd):
    c = checker(dnsmasq, "reject_rbl_client list.test",
                rbl_reply_maps="inline:{{list.test=$$rbl_code $$no_such_name}}")
    assert rcpt(c).startswith("554 5.7.1 Service unavailable; Client host [127.0.0.2]")
    c = checker(dnsmasq, "reject_rbl_client list.test", default_rbl_reply="blocked")
    assert rcpt(c) == "450 4.7.1 Service unavailable"
    err = capfd.readouterr().err
    assert "bad rbl reply template for domain list.test: $rbl_code $no_such_name" in err
    assert "rbl response code configuration error: blocked" in err


def test_rhsbl_restrictions_ask_the_domain(dnsmasq):
    c = checker(dnsmasq, "reject_rhsbl_sender list.test")
    assert rcpt(c, sender="x@bad.example") == (
        "554 5.7.1 Service unavailable; Sender address [x@bad.example] blocked using "
        "list.test; bad domain")
    assert rcpt(c, sender="") is None                     # the null sender: not asked
    c = checker(dnsmasq, "reject_rhsbl_recipient list.test",
                mydestination="localhost, bad.example")
    assert rcpt(c, recipient="u@bad.example") == (
        "554 5.7.1 Service unavailable; Recipient address [u@bad.example] blocked using "
        "list.test; bad domain")
    c = checker(dnsmasq, "reject_rhsbl_helo list.test")
    assert rcpt(c, helo="bad.example") == (
        "554 5.7.1 Service unavailable; Helo command [bad.example] blocked using "
        "list.test; bad domain")
    assert rcpt(c, helo="[127.0.0.2]") is None            # an address literal: not asked
    c = checker(dnsmasq, "reject_rhsbl_client list.test")
    assert rcpt(c, name="bad.example").startswith(
        "554 5.7.1 Service unavailable; Client host [bad.example] blocked")
    assert rcpt(c, name="unknown") is None
    c = checker(dnsmasq, "reject_rhsbl_reverse_client list.test")
    assert rcpt(c, name="bad.example").startswith(
        "554 5.7.1 Service unavailable; Unverified Client host [bad.example] blocked")


def test_allow_lists_permit_before_a_deny_list(dnsmasq):
    c = checker(dnsmasq, "permit_dnswl_client allow.test, reject_rbl_client list.test")
    assert rcpt(c, addr="127.0.0.2") is not None          # not in allow.test
    c = checker(dnsmasq, "permit_dnswl_client allow.test, reject",
                smtpd_relay_restrictions="")
    assert rcpt(c, addr="127.0.0.3") is None              # allowed
    # ... but never to an unauthorized destination
    assert rcpt(c, addr="127.0.0.3", recipient="u@elsewhere.test") == \
        "554 5.7.1 <u@elsewhere.test>: Recipient address rejected: Access denied"
    c = checker(dnsmasq, "permit_rhswl_client list.test, reject")
    assert rcpt(c, name="bad.example") is None            # its name is in the list
    assert rcpt(c, name="other.example") is not None


def test_an_access_table_can_name_a_dns_list(dnsmasq):
    c = checker(dnsmasq, "check_client_access inline:{{127.0.0.2=reject_rbl_client "
                         "list.test=127.0.0.2}, {127.0.0.1=reject_rbl_client list.test=1.1.1.1}}")
    assert rcpt(c).startswith("554 5.7.1 Service unavailable; Client host [127.0.0.2] "
                              "blocked using list.test;")
    assert rcpt(c, addr="127.0.0.1") is None      # listed, but the filter does not match


def test_a_list_that_does_not_answer_lets_the_client_through(dead_port, capfd):
    c = checker(dead_port, "reject_rbl_client list.test")
    assert rcpt(c) is None
    assert "2.0.0.127.list.test: RBL lookup error:" in capfd.readouterr().err


def test_an_allow_list_that_does_not_answer_turns_a_later_reject_into_450(dead_port):
    c = checker(dead_port, "permit_dnswl_client allow.test, reject",
                smtpd_relay_restrictions="")
    assert rcpt(c) == "450 4.7.1 <127.0.0.2>: Client host rejected: Service unavailable"
    c = checker(dead_port, "permit_dnswl_client allow.test, permit",
                smtpd_relay_restrictions="")
    assert rcpt(c) is None


def test_reject_unknown_helo_hostname(dnsmasq, dead_port):
    c = checker(dnsmasq, "reject_unknown_helo_hostname")
    assert rcpt(c, helo="good.example") is None           # A record
    assert rcpt(c, helo="mxonly.example") is None         # MX record only
    assert rcpt(c, helo="missing.example") == \
        "450 4.7.1 <missing.example>: Helo command rejected: Host not found"
    c = checker(dnsmasq, "reject_unknown_helo_hostname", unknown_hostname_reject_code="550")
    assert rcpt(c, helo="missing.example") == \
        "550 5.7.1 <missing.example>: Helo command rejected: Host not found"
    assert rcpt(c, helo="[127.0.0.1]") is None            # a valid address literal
    assert rcpt(c, helo="[300.0.0.1]") == \
        "501 5.5.2 <[300.0.0.1]>: Helo command rejected: invalid ip address"
    # a DNS that does not answer: 450, whatever the code, unless something rejects
    c = checker(dead_port, "reject_unknown_helo_hostname", unknown_hostname_reject_code="550")
    assert rcpt(c, helo="slow.example") == \
        "450 4.7.1 <slow.example>: Helo command rejected: Host not found"


def test_a_listed_client_is_refused_by_a_real_smtpd(dnsmasq, instance):
    instance.add_smtpd(smtpd_dns_nameservers=f"127.0.0.1:{dnsmasq}",
                       smtpd_client_restrictions="reject_rbl_client list.test")
    instance.start()
    c = SmtpClient(instance.port)
    assert c.reply().startswith("220 ")
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    reply = c.cmd("RCPT TO:<b@localhost>")
    assert reply == ("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
                     "list.test; listed for testing")
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: "NOQUEUE: reject: RCPT" in instance.log(), 10, what="the reject log")
    line = next(ln for ln in instance.log().splitlines() if "NOQUEUE: reject: RCPT" in ln)
    assert line.split("]: ", 1)[1].endswith(
        "]: 554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
        "list.test; listed for testing; from=<a@example.org> to=<b@localhost> "
        "proto=ESMTP helo=<client.example>")
    assert "[127.0.0.1]: 554 5.7.1" in line and "NOQUEUE: reject: RCPT from " in line
