"""smtpd/check.py: the one client-network matcher (NetworkList) that mynetworks,
smtpd_forbid_bare_newline_exclusions and smtpd_sasl_exceptions_networks share, and the
restriction lists of each protocol stage."""

import pytest

from postfix_py.lib import maincf
from postfix_py.smtpd.check import Checker, ClientState
from postfix_py.smtpd.session import Session


def config(**values) -> maincf.Config:
    base = {"myhostname": "mail.test.example", "mydestination": "localhost",
            "local_recipient_maps": "",  # restriction tests: any local user
            "mynetworks": "127.0.0.0/8"}
    base.update(values)
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base)


@pytest.mark.parametrize("words,addr,name,hit", [
    ("192.0.2.0/24", "192.0.2.9", "unknown", True),
    ("192.0.2.0/24", "198.51.100.1", "unknown", False),
    ("192.0.2.0/24", "::ffff:192.0.2.9", "unknown", True),         # IPv4-mapped
    ("[2001:db8::]/32", "2001:db8::1", "unknown", True),
    ("[::1]", "::1", "unknown", True),
    ("!192.0.2.9, 192.0.2.0/24", "192.0.2.9", "unknown", False),    # first match decides
    ("!192.0.2.9, 192.0.2.0/24", "192.0.2.10", "unknown", True),
    ("inline:{192.0.2.9=yes}", "192.0.2.9", "unknown", True),
    ("inline:{192.0.2.9=yes}", "192.0.2.8", "unknown", False),
    ("inline:{client.example=yes}", "192.0.2.8", "client.example", True),
    (".example.com", "192.0.2.8", "mx.example.com", True),
    (".example.com", "192.0.2.8", "example.com", False),
    ("example.com", "192.0.2.8", "example.com", True),
    ("example.com", "192.0.2.8", "mx.example.com", False),          # not in parent_domain...
    ("example.com", "192.0.2.8", "unknown", False),
    ("", "192.0.2.8", "unknown", False),
    ("192.0.2.0/24", "not an address", "unknown", False),
])
def test_network_list(words, addr, name, hit):
    checker = Checker(config(smtpd_sasl_exceptions_networks=words))
    assert checker.in_network_list("smtpd_sasl_exceptions_networks", addr, name) is hit


def test_mynetworks_domains_match_subdomains_and_files(tmp_path):
    listed = tmp_path / "nets"
    listed.write_text("# trusted\n198.51.100.0/24\n!203.0.113.5 203.0.113.0/24\n")
    checker = Checker(config(mynetworks=f"example.com, {listed}"))
    assert checker.in_mynetworks("192.0.2.1", "mx.example.com")     # parent_domain_matches...
    assert checker.in_mynetworks("198.51.100.7")
    assert checker.in_mynetworks("203.0.113.6")
    assert not checker.in_mynetworks("203.0.113.5")


def session(cfg, addr="127.0.0.1"):
    return Session(None, cfg, ClientState(name="client.example", addr=addr), "/nonexistent",
                   Checker(cfg))


def test_bare_newline_exclusions_use_the_same_matcher():
    # The session had its own parser: "!127.0.0.1" was skipped and the network matched.
    cfg = config(smtpd_forbid_bare_newline="reject",
                 smtpd_forbid_bare_newline_exclusions="!127.0.0.1, 127.0.0.0/8")
    assert session(cfg, "127.0.0.1").bare_lf == "reject"
    assert session(cfg, "127.0.0.2").bare_lf == "no"
    # $mynetworks (the default) follows mynetworks, tables included
    cfg = config(smtpd_forbid_bare_newline="reject", mynetworks="inline:{192.0.2.9=ok}")
    assert session(cfg, "192.0.2.9").bare_lf == "no"
    assert session(cfg, "127.0.0.1").bare_lf == "reject"


def test_sasl_exceptions_networks_with_a_table():
    cfg = config(smtpd_sasl_exceptions_networks="inline:{192.0.2.9=ok}")
    s = Session(None, cfg, ClientState(name="client.example", addr="192.0.2.9"),
                "/nonexistent", Checker(cfg), sasl=object())
    assert s.sasl_exempt
    s = Session(None, cfg, ClientState(name="client.example", addr="192.0.2.8"),
                "/nonexistent", Checker(cfg), sasl=object())
    assert not s.sasl_exempt


def test_stages_without_delay_reject():
    cfg = config(smtpd_delay_reject="no", smtpd_client_restrictions="reject",
                 smtpd_helo_restrictions="check_helo_access inline:{bad.example=REJECT}",
                 smtpd_sender_restrictions="reject",
                 smtpd_data_restrictions="defer", smtpd_end_of_data_restrictions="reject")
    checker = Checker(cfg)
    state = ClientState(name="client.example", addr="192.0.2.1", helo="bad.example",
                        sender="s@example.org")
    assert str(checker.connect(state)) == \
        "554 5.7.1 <client.example[192.0.2.1]>: Client host rejected: Access denied"
    assert str(checker.helo(state)) == \
        "554 5.7.1 <bad.example>: Helo command rejected: Access denied"
    assert str(checker.mail(state)) == \
        "554 5.7.1 <s@example.org>: Sender address rejected: Access denied"
    # at RCPT only the relay and recipient lists now
    assert checker.rcpt(state, "u@localhost") is None
    assert str(checker.data(state, None)) == \
        "450 4.7.1 <DATA>: Data command rejected: Access denied"
    assert str(checker.end_of_data(state, "u@localhost")) == \
        "554 5.7.1 <END-OF-MESSAGE>: End-of-data rejected: Access denied"


def test_stages_with_delay_reject():
    cfg = config(smtpd_client_restrictions="reject")
    checker = Checker(cfg)
    state = ClientState(name="client.example", addr="192.0.2.1")
    assert checker.connect(state) is None and checker.helo(state) is None
    assert checker.mail(state) is None
    assert str(checker.rcpt(state, "u@localhost")).startswith("554 5.7.1 <client.example")
    assert checker.data(state, None) is None and checker.end_of_data(state, None) is None


def test_client_name_statuses(monkeypatch):
    """smtpd_peer.c's name_status / reverse_name_status, with the C library's answers
    played back (the lookups themselves run in the integration tests)."""
    import socket

    from postfix_py.smtpd import service

    def answers(ptr, forward):
        def getnameinfo(sa, flags):
            if isinstance(ptr, Exception):
                raise ptr
            return ptr, "0"

        def getaddrinfo(name, *args):
            if isinstance(forward, Exception):
                raise forward
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in forward]
        monkeypatch.setattr(service.socket, "getnameinfo", getnameinfo)
        monkeypatch.setattr(service.socket, "getaddrinfo", getaddrinfo)

    answers("mx.example", ["192.0.2.1"])
    assert service.client_name("192.0.2.1", True) == ("mx.example", "ok", "mx.example", "ok")
    assert service.client_name("192.0.2.1", False) == ("unknown", "perm", "unknown", "perm")
    answers("mx.example", ["192.0.2.99"])
    assert service.client_name("192.0.2.1", True) == ("unknown", "forged", "mx.example", "ok")
    answers("mx.example", socket.gaierror(socket.EAI_AGAIN, "again"))
    assert service.client_name("192.0.2.1", True) == ("unknown", "temp", "mx.example", "ok")
    answers(socket.gaierror(socket.EAI_NONAME, "none"), [])
    assert service.client_name("192.0.2.1", True) == ("unknown", "perm", "unknown", "perm")
    answers(socket.gaierror(socket.EAI_AGAIN, "again"), [])
    assert service.client_name("192.0.2.1", True) == ("unknown", "temp", "unknown", "temp")
    answers("192.0.2.7", ["192.0.2.1"])                     # a numeric PTR: refused
    assert service.client_name("192.0.2.1", True)[1] == "perm"


@pytest.mark.parametrize("status,reverse,hostname_reply,reverse_reply", [
    ("temp", "temp", "450 4.7.25", "450 4.7.1"),     # temporary: 450 whatever the code
    ("forged", "ok", "550 5.7.25", None),
    ("perm", "perm", "550 5.7.25", "550 5.7.1"),
    ("ok", "ok", None, None),
])
def test_reject_unknown_client_replies(status, reverse, hostname_reply, reverse_reply):
    checker = Checker(config(unknown_client_reject_code="550", smtpd_client_restrictions=(
        "reject_unknown_client_hostname")))
    state = ClientState(name="unknown", addr="192.0.2.1", name_status=status,
                        reverse_status=reverse)
    got = checker.rcpt(state, "u@localhost")
    if hostname_reply is None:
        assert got is None
    else:
        assert str(got) == (f"{hostname_reply} Client host rejected: cannot find your "
                            f"hostname, [192.0.2.1]")
    checker = Checker(config(unknown_client_reject_code="550", smtpd_client_restrictions=(
        "reject_unknown_reverse_client_hostname")))
    got = checker.rcpt(state, "u@localhost")
    if reverse_reply is None:
        assert got is None
    else:
        assert str(got) == (f"{reverse_reply} Client host rejected: cannot find your "
                            f"reverse hostname, [192.0.2.1]")


@pytest.mark.parametrize("word", ["192.0.2.0/33", "!192.0.2.300/24", "[192.0.2.1", "[nonsense]/8"])
def test_network_list_refuses_bad_net_masks(word):
    from postfix_py.lib.maincf import ConfigError
    with pytest.raises(ConfigError, match="smtpd_sasl_exceptions_networks: bad net/mask"):
        Checker(config(smtpd_sasl_exceptions_networks=word))


def test_access_table_action_naming_a_restriction():
    # a restriction name as the action used to be "unknown action -- ignored"
    checker = Checker(config(
        smtpd_relay_restrictions="permit",
        smtpd_recipient_restrictions="check_recipient_access "
        "inline:{x@elsewhere.example=reject_unauth_destination}, permit"))
    state = ClientState(name="unknown", addr="192.0.2.1")
    assert str(checker.rcpt(state, "x@elsewhere.example")) == \
        "554 5.7.1 <x@elsewhere.example>: Relay access denied"
    assert checker.rcpt(state, "y@elsewhere.example") is None


def test_relay_domains_and_mydestination_with_tables_and_files(tmp_path):
    # Tables and files in these lists were ignored by smtpd (qmgr honoured them): mail
    # qmgr would route was refused with "Relay access denied".
    listed = tmp_path / "relay"
    listed.write_text("# relayed\nfiled.example\n")
    checker = Checker(config(
        mydestination="localhost, inline:{local.example=yes}",
        relay_domains=f"inline:{{table.example=yes}}, {listed}, .dotted.example, plain.example",
        mynetworks="127.0.0.0/8"))
    assert checker.is_local_domain("local.example") and checker.is_local_domain("localhost")
    assert not checker.is_local_domain("sub.local.example")
    for rcpt in ("u@table.example", "u@filed.example", "u@sub.dotted.example",
                 "u@plain.example", "u@sub.plain.example", "u@local.example"):
        assert checker.auth_destination(rcpt), rcpt
    # "u" is u@$myorigin (mail.test.example), not a local domain here: as Postfix, remote
    for rcpt in ("u@dotted.example", "u@elsewhere.example", "u@sub.table.example.net", "u"):
        assert not checker.auth_destination(rcpt), rcpt
    # parent_domain_matches_subdomains decides for bare names, as in qmgr's routing
    checker = Checker(config(relay_domains="plain.example",
                             parent_domain_matches_subdomains="mynetworks"))
    assert checker.auth_destination("u@plain.example")
    assert not checker.auth_destination("u@sub.plain.example")
    state = ClientState(name="unknown", addr="192.0.2.1", sender="s@example.org")
    assert str(checker.rcpt(state, "u@sub.plain.example")) == \
        "454 4.7.1 <u@sub.plain.example>: Relay access denied"


def test_etrn_stage_and_fast_flush_domains():
    """smtpd_etrn_restrictions name the domain; the client list runs first (delay_reject);
    fast_flush_domains follows relay_domains and matches subdomains (parent_domain...)."""
    state = ClientState(name="client.example", addr="192.0.2.1")
    checker = Checker(config(relay_domains="example.com",
                             smtpd_etrn_restrictions="permit_mynetworks, reject"))
    assert str(checker.etrn(state, "example.com")) == \
        "554 5.7.1 <example.com>: Etrn command rejected: Access denied"
    assert checker.etrn(ClientState(name="localhost", addr="127.0.0.1"), "x.org") is None
    assert checker.flush_allowed("example.com") and checker.flush_allowed("a.example.com")
    assert not checker.flush_allowed("example.org")
    checker = Checker(config(smtpd_client_restrictions="reject"))
    assert str(checker.etrn(state, "example.com")).startswith(
        "554 5.7.1 <client.example[192.0.2.1]>: Client host rejected")
    assert not checker.flush_allowed("example.com")            # relay_domains is empty
