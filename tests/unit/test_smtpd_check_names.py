"""smtpd/check.py's HELO and address syntax restrictions (no DNS), the compile-time checks
of the DNS list restrictions, check_client_access with a cidr: table, and lib/dnsbl.py's
pure helpers: query names, reply patterns, reply templates, server addresses."""

import pytest

from postfix_py.lib import dnsbl, maincf
from postfix_py.lib.maincf import ConfigError
from postfix_py.smtpd.check import Checker, ClientState


def checker(restrictions: str, **values) -> Checker:
    base = {"myhostname": "mail.test.example", "mydestination": "localhost, $myhostname",
            "mynetworks": "10.0.0.0/8", "local_recipient_maps": "",
            "smtpd_recipient_restrictions": restrictions + ", reject_unauth_destination"}
    base.update(values)
    return Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base))


def rcpt(c: Checker, helo="client.example", sender="a@client.example",
         recipient="u@localhost", addr="192.0.2.1"):
    reply = c.rcpt(ClientState(name="unknown", addr=addr, helo=helo, sender=sender),
                   recipient)
    return None if reply is None else str(reply)


@pytest.mark.parametrize("helo,reply", [
    ("client.example", None), ("client.example.", None), ("a_b.example", None),
    ("localhost", None), ("192.0.2.1", None), ("[192.0.2.1]", None), ("[IPv6:::1]", None),
    ("foo..example", "501 5.5.2 <foo..example>: Helo command rejected: Invalid name"),
    ("-x.example", "501 5.5.2 <-x.example>: Helo command rejected: Invalid name"),
    ("a b", "501 5.5.2 <a b>: Helo command rejected: Invalid name"),
    ("x" * 64 + ".example", "501 5.5.2 <" + "x" * 64 + ".example>: Helo command rejected: "
                            "Invalid name"),
    ("[192.0.2]", "501 5.5.2 <[192.0.2]>: Helo command rejected: invalid ip address"),
    ("[::1]", "501 5.5.2 <[::1]>: Helo command rejected: invalid ip address"),
])
def test_reject_invalid_helo_hostname(helo, reply):
    assert rcpt(checker("reject_invalid_helo_hostname"), helo=helo) == reply
    assert rcpt(checker("reject_invalid_hostname"), helo=helo) == reply


@pytest.mark.parametrize("helo,reply", [
    ("client.example", None), ("client.example.", None), ("[192.0.2.1]", None),
    ("localhost", "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified "
                  "hostname"),
    ("localhost.", "504 5.5.2 <localhost.>: Helo command rejected: need fully-qualified "
                   "hostname"),
    ("192.0.2.1", "504 5.5.2 <192.0.2.1>: Helo command rejected: need fully-qualified "
                  "hostname"),
    ("bad..example", "504 5.5.2 <bad..example>: Helo command rejected: need "
                     "fully-qualified hostname"),
    ("[192.0.2.300]", "501 5.5.2 <[192.0.2.300]>: Helo command rejected: invalid ip "
                      "address"),
])
def test_reject_non_fqdn_helo_hostname(helo, reply):
    assert rcpt(checker("reject_non_fqdn_helo_hostname"), helo=helo) == reply


def test_reply_codes_are_configurable():
    c = checker("reject_non_fqdn_helo_hostname", non_fqdn_reject_code="450")
    assert rcpt(c, helo="localhost") == \
        "450 4.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    c = checker("reject_invalid_helo_hostname", invalid_hostname_reject_code="550")
    assert rcpt(c, helo="a..b") == "550 5.5.2 <a..b>: Helo command rejected: Invalid name"


def test_no_helo_is_not_checked():
    assert rcpt(checker("reject_non_fqdn_helo_hostname, reject_invalid_helo_hostname, "
                        "reject_unknown_helo_hostname"), helo=None) is None


@pytest.mark.parametrize("sender,recipient,reply", [
    ("a@client.example", "u@localhost.example", None),
    ("", "u@localhost.example", None),                                   # the null sender
    ("a@[192.0.2.1]", "u@localhost.example", None),
    ("a@client", "u@localhost.example",
     "504 5.5.2 <a@client>: Sender address rejected: need fully-qualified address"),
    ("a", "u@localhost.example",
     "504 5.5.2 <a>: Sender address rejected: need fully-qualified address"),
    ("a@client.example", "u",
     "504 5.5.2 <u>: Recipient address rejected: need fully-qualified address"),
    ("a@client.example", "u@localhost.",
     "504 5.5.2 <u@localhost.>: Recipient address rejected: need fully-qualified address"),
])
def test_reject_non_fqdn_sender_and_recipient(sender, recipient, reply):
    c = checker("reject_non_fqdn_sender, reject_non_fqdn_recipient",
                mydestination="localhost.example, localhost., $myhostname")
    assert rcpt(c, sender=sender, recipient=recipient) == reply


def test_helo_checks_run_at_helo_without_delay_reject():
    c = checker("permit", smtpd_delay_reject="no",
                smtpd_helo_restrictions="reject_non_fqdn_helo_hostname")
    state = ClientState(name="unknown", addr="192.0.2.1", helo="localhost")
    assert str(c.helo(state)) == \
        "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    state.helo = "client.example"
    assert c.helo(state) is None


def test_dns_list_arguments_are_checked_when_compiled(capfd):
    c = checker("reject_rbl_client list.test=127.0.0.[2..4;10]")
    assert c.lists["smtpd_recipient_restrictions"][0][0] == "reject_rbl_client"
    with pytest.raises(ConfigError, match="RBL reply error"):
        checker("reject_rbl_client list.test=127.0.0.256")
    with pytest.raises(ConfigError, match="RBL reply error"):
        checker("reject_rbl_client list.test=127.0.0")
    # without an argument: Postfix's warning, and the restriction is skipped
    c = Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides={
        "smtpd_recipient_restrictions": "reject_unauth_destination, reject_rbl_client"}))
    assert [r for r, _ in c.lists["smtpd_recipient_restrictions"]] == \
        ["reject_unauth_destination"]
    assert "restriction reject_rbl_client requires domain name argument" in \
        capfd.readouterr().err
    with pytest.raises(ConfigError, match="smtpd_dns_nameservers"):
        checker("reject_rbl_client list.test", smtpd_dns_nameservers="not-an-address")


def test_check_client_access_with_a_cidr_table(tmp_path):
    table = tmp_path / "clients.cidr"
    table.write_text("192.0.2.1 OK\n192.0.2.0/24 REJECT go away\n2001:db8::/32 550 5.7.2 "
                     "No v6\n")
    c = checker(f"check_client_access cidr:{table}")
    assert rcpt(c, addr="192.0.2.1") is None
    assert rcpt(c, addr="192.0.2.7") == \
        "554 5.7.1 <unknown[192.0.2.7]>: Client host rejected: go away"
    # A numeric result in Postfix's form (check_table_result): <name>: Class rejected: text
    assert rcpt(c, addr="2001:db8::9") == \
        "550 5.7.2 <unknown[2001:db8::9]>: Client host rejected: No v6"
    assert rcpt(c, addr="198.51.100.1") is None


def test_defer_if_reject():
    c = checker("defer_if_reject", smtpd_relay_restrictions="")
    assert rcpt(c) is None
    assert rcpt(c, recipient="u@elsewhere.test") == \
        "450 4.7.1 <u@elsewhere.test>: Recipient address rejected: defer_if_reject requested"


# --- lib/dnsbl.py ---------------------------------------------------------------------------
def test_query_labels():
    assert dnsbl.reverse_address("192.0.2.1") == "1.2.0.192"
    assert dnsbl.reverse_address("::ffff:192.0.2.1") == "1.2.0.192"
    assert dnsbl.reverse_address("2001:db8::1") == \
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    assert dnsbl.reverse_address("client.example") is None


@pytest.mark.parametrize("pattern,address,hit", [
    ("127.0.0.2", "127.0.0.2", True), ("127.0.0.2", "127.0.0.3", False),
    ("127.0.0.[2..4]", "127.0.0.4", True), ("127.0.0.[2..4]", "127.0.0.5", False),
    ("127.0.[0;1].[2;10..11]", "127.0.1.11", True), ("127.0.[0;1].[2;10..11]",
                                                      "127.0.2.11", False),
])
def test_reply_patterns(pattern, address, hit):
    assert dnsbl.match_reply(dnsbl.parse_reply_pattern(pattern), address) is hit


@pytest.mark.parametrize("bad", ["127.0.0", "127.0.0.2.1", "127.0.0.[4..2]", "127.0.0.[2",
                                 "a.b.c.d", "127.0.0.300"])
def test_bad_reply_patterns(bad):
    with pytest.raises(ValueError):
        dnsbl.parse_reply_pattern(bad)


def test_nameservers():
    assert (dnsbl.nameserver("127.0.0.1").address, dnsbl.nameserver("127.0.0.1").port) == \
        ("127.0.0.1", 53)
    assert dnsbl.nameserver("127.0.0.1:5353").port == 5353
    assert dnsbl.nameserver("[::1]:5353").address == "::1"
    for bad in ("localhost", "127.0.0.1:0", "[::1]x", "1.2.3.4:99999"):
        with pytest.raises(ValueError):
            dnsbl.nameserver(bad)


def test_check_client_access_keys_as_postfix(tmp_path):
    """The name, its parent domains, the address, its parent networks; pattern tables
    see the whole name and address only."""
    def reply(table, name, addr, **values):
        c = checker(f"check_client_access {table}", **values)
        r = c.rcpt(ClientState(name=name, addr=addr), "u@localhost")
        return None if r is None else str(r)
    t = "inline:{{example.com=REJECT by-domain}, {192.0.2=REJECT by-net}}"
    assert reply(t, "mx.example.com", "198.51.100.1").endswith("by-domain")
    assert reply(t, "unknown", "192.0.2.9").endswith("by-net")
    assert reply(t, "unknown", "192.0.3.9") is None
    # without smtpd_access_maps in parent_domain_matches_subdomains: .example.com
    assert reply(t, "mx.example.com", "198.51.100.1",
                 parent_domain_matches_subdomains="") is None
    t = "inline:{{.example.com=REJECT dot}}"
    assert reply(t, "mx.example.com", "198.51.100.1",
                 parent_domain_matches_subdomains="").endswith("dot")
    # the name first, as smtpd_check.c's check_namadr_access
    t = "inline:{{mx.example.com=REJECT name}, 192.0.2.9=OK}"
    assert reply(t, "mx.example.com", "192.0.2.9").endswith("name")
    regexp = tmp_path / "clients.regexp"
    regexp.write_text("/^example\\.com$/ REJECT whole\n/^192\\.0\\.2$/ REJECT part\n")
    assert reply(f"regexp:{regexp}", "mx.example.com", "192.0.2.9") is None
    assert reply(f"regexp:{regexp}", "example.com", "192.0.2.9").endswith("whole")
