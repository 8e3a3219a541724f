"""lib/resolve.py address parsing (trivial-rewrite's rewrite.c and resolve.c) and smtpd's
decisions by the resolved address class: relaying and recipient validation at RCPT.

The expected replies are those of Debian's Postfix 3.7 for the same configuration
(probed with tests/peers.py's PostfixPeer: mydestination includes local.domain,
relay_domains = relay.example, virtual_mailbox_domains = virt.example)."""

import pytest

from postfix_py.lib import maincf, tables
from postfix_py.lib.resolve import AddressResolver, internal_form, quote_local
from postfix_py.smtpd.check import Checker, ClientState


def config(**values) -> maincf.Config:
    base = {"myhostname": "mail.test.example", "mydomain": "test.example",
            "mydestination": "$myhostname, localhost, local.domain",
            "relay_domains": "relay.example", "virtual_mailbox_domains": "virt.example",
            "inet_interfaces": "127.0.0.1", "mynetworks": "127.0.0.2/32",
            "alias_maps": ""}    # not the host's /etc/aliases
    base.update(values)
    return maincf.Config("/nonexistent", "/nonexistent/main.cf", overrides=base)


@pytest.mark.parametrize("address,recipient,addr_class,routed", [
    ("victim%remote.example@local.domain", "victim@remote.example", "default", False),
    ("remote.example!victim@local.domain", "victim@remote.example", "default", False),
    ('"victim@remote.example"@local.domain', "victim@remote.example", "default", False),
    ('"victim%remote.example"@local.domain', "victim@remote.example", "default", False),
    ('"remote.example!victim"@local.domain', "victim@remote.example", "default", False),
    ("a!b!victim@local.domain", "b!victim@a", "default", True),
    ("root%local.domain@local.domain", "root@local.domain", "local", False),
    ("local.domain!root@local.domain", "root@local.domain", "local", False),
    ("carol%relay.example@local.domain", "carol@relay.example", "relay", False),
    ("x%y@relay.example", "x%y@relay.example", "relay", True),
    ("root", "root@mail.test.example", "local", False),
    ("root@[127.0.0.1]", "root@[127.0.0.1]", "local", False),
    ("root@LOCAL.domain.", "root@LOCAL.domain", "local", False),
    ("@a,@b:user@virt.example", "user@virt.example", "virtual", False),
    ("bob@virt.example", "bob@virt.example", "virtual", False),
    ("user@remote.example", "user@remote.example", "default", False),
    ('""@local.domain', "MAILER-DAEMON@local.domain", "local", False),
])
def test_resolve_as_postfix(address, recipient, addr_class, routed):
    route = AddressResolver(config()).resolve(address)
    assert (route.recipient, route.addr_class, route.routed) == (recipient, addr_class,
                                                                 routed)


def test_routing_operators_can_be_turned_off():
    r = AddressResolver(config(allow_percent_hack="no", swap_bangpath="no",
                               resolve_dequoted_address="no"))
    for address in ("victim%remote.example@local.domain", "remote.example!victim@local.domain",
                    '"victim@remote.example"@local.domain'):
        route = r.resolve(address)
        # a local recipient with a strange name: routed, as Postfix flags it anyway
        assert route.addr_class == "local" and route.recipient.endswith("@local.domain")
        assert route.routed
    assert r.resolve("victim%remote.example").recipient == \
        "victim%remote.example@mail.test.example"


def test_append_at_myorigin_and_dot_mydomain():
    r = AddressResolver(config(myorigin="local.domain"))
    assert r.rewrite("root") == "root@local.domain"
    assert r.rewrite("user@host") == "user@host"               # append_dot_mydomain = no
    r = AddressResolver(config(myorigin="local.domain", append_at_myorigin="no",
                               append_dot_mydomain="yes"))
    assert r.rewrite("root") == "root"
    assert r.resolve("root").recipient == "root@mail.test.example"  # resolve's fallback
    assert r.rewrite("user@host") == "user@host.test.example"
    assert r.rewrite("user@[192.0.2.1]") == "user@[192.0.2.1]"


def test_resolve_null_domain():
    assert AddressResolver(config()).resolve("user@").addr_class == "default"
    r = AddressResolver(config(resolve_null_domain="yes"))
    assert r.resolve("user@").recipient == "user@mail.test.example"


def test_quoting_helpers():
    assert quote_local("a b@x") == '"a b"@x'
    assert quote_local("a.b@x") == "a.b@x"
    assert internal_form('"a@b"@c') == "a@b@c"


OUTSIDE = ClientState(name="unknown", addr="127.0.0.1", sender="s@example.org")


@pytest.mark.parametrize("rcpt", ["victim%remote.example@local.domain",
                                  "remote.example!victim@local.domain",
                                  '"victim@remote.example"@local.domain',
                                  "x%y@relay.example", "victim@remote.example"])
def test_relay_tricks_are_refused(rcpt):
    checker = Checker(config(smtpd_relay_restrictions="permit_mynetworks, "
                             "reject_unauth_destination", local_recipient_maps=""))
    assert str(checker.rcpt(OUTSIDE, rcpt)) == f"554 5.7.1 <{rcpt}>: Relay access denied"
    assert not checker.auth_destination(rcpt)


def test_permit_auth_destination():
    checker = Checker(config(smtpd_relay_restrictions="permit_auth_destination, reject",
                             local_recipient_maps=""))
    assert checker.rcpt(OUTSIDE, "root%local.domain@local.domain") is None
    assert str(checker.rcpt(OUTSIDE, "v%remote.example@local.domain")) == \
        "554 5.7.1 <v%remote.example@local.domain>: Recipient address rejected: " \
        "Access denied"


@pytest.mark.parametrize("rcpt,reply", [
    ("root@local.domain", None),
    ("Root@LOCAL.domain", None),
    ("root", None),
    ("root+ext@local.domain", None),
    ("nosuch%local.domain@local.domain", "550 5.1.1 <nosuch%local.domain@local.domain>: "
     "Recipient address rejected: User unknown in local recipient table"),
    ("nosuchuser@local.domain", "550 5.1.1 <nosuchuser@local.domain>: "
     "Recipient address rejected: User unknown in local recipient table"),
    ("bob@virt.example", None),
    ("nob@virt.example", "550 5.1.1 <nob@virt.example>: Recipient address rejected: "
     "User unknown in virtual mailbox table"),
    ("carol@relay.example", None),
    ("nob@relay.example", "550 5.1.1 <nob@relay.example>: Recipient address rejected: "
     "User unknown in relay recipient table"),
])
def test_unlisted_recipient_in_each_class(rcpt, reply):
    checker = Checker(config(mynetworks="127.0.0.0/8", recipient_delimiter="+",
                             virtual_mailbox_maps="inline:{bob@virt.example=bob/}",
                             relay_recipient_maps="inline:{carol@relay.example=x}"))
    got = checker.rcpt(OUTSIDE, rcpt)
    assert (None if got is None else str(got)) == reply


def test_virtual_alias_class(capfd):
    # virtual_alias_domains defaults to $virtual_alias_maps (a domain key lists it)
    cfg = config(smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination",
                 virtual_alias_maps="inline:{alias.example=x, info@alias.example=root, "
                                    "alias@local.domain=root}",
                 virtual_mailbox_domains="alias.example, virt.example",
                 virtual_mailbox_maps="inline:{bob@virt.example=bob/}")
    checker = Checker(cfg)
    assert checker.rcpt(OUTSIDE, "info@alias.example") is None
    assert str(checker.rcpt(OUTSIDE, "nob@alias.example")) == \
        "550 5.1.1 <nob@alias.example>: Recipient address rejected: " \
        "User unknown in virtual alias table"
    assert checker.rcpt(OUTSIDE, "alias@local.domain") is None     # aliased, not a user
    route = AddressResolver(cfg).resolve("nob@alias.example")
    assert (route.transport, route.nexthop, route.addr_class) == (
        "error", "5.1.1 User unknown in virtual alias table", "alias")
    assert "warning: do not list domain alias.example in BOTH virtual_alias_domains " \
           "and virtual_mailbox_domains" in capfd.readouterr().err
    assert str(Checker(config(virtual_alias_domains="alias.example",
                              unknown_virtual_alias_reject_code="450"))
               .unlisted_recipient("x@alias.example")).startswith("450 4.1.1 <x@alias.example>")


def test_unlisted_recipient_switches():
    # empty tables validate nothing; smtpd_reject_unlisted_recipient = no turns it off;
    # the reply codes are configurable
    assert Checker(config(local_recipient_maps="")).unlisted_recipient("x@local.domain") \
        is None
    checker = Checker(config(mynetworks="127.0.0.0/8", smtpd_reject_unlisted_recipient="no"))
    assert checker.rcpt(OUTSIDE, "nosuchuser@local.domain") is None
    checker = Checker(config(unknown_local_recipient_reject_code="450"))
    assert str(checker.unlisted_recipient("nosuchuser@local.domain")).startswith(
        "450 4.1.1 <nosuchuser@local.domain>: Recipient address rejected: User unknown")
    # receive_override_options = no_unknown_recipient_checks (a re-injection service)
    checker = Checker(config(mynetworks="127.0.0.0/8", smtpd_reject_unlisted_sender="yes",
                             receive_override_options="no_unknown_recipient_checks"))
    state = ClientState(name="unknown", addr="127.0.0.1", sender="nosuch@local.domain")
    assert checker.rcpt(state, "nosuchuser@local.domain") is None
    assert checker.unlisted_recipient("nosuchuser@local.domain") is None
    with pytest.raises(maincf.ConfigError, match='unknown receive_override_options value '
                       '"no_such" in "no_milters, no_such"'):
        Checker(config(receive_override_options="no_milters, no_such"))


def test_unix_passwd_table():
    t = tables.open_table("unix:passwd.byname")
    assert t.lookup("ROOT").split(":")[:3:2] == ["root", "0"]   # keys are folded
    assert t.lookup("no-such-user-here") is None
    with pytest.raises(tables.TableError):
        tables.open_table("unix:group.byname")


def test_unlisted_sender_and_the_explicit_restrictions():
    # Postfix's reply for smtpd_reject_unlisted_sender = yes: 5.1.0, "Sender address"
    state = ClientState(name="unknown", addr="127.0.0.1", sender="nosuch@local.domain")
    assert Checker(config(mynetworks="127.0.0.0/8")).rcpt(state, "root@local.domain") is None
    checker = Checker(config(mynetworks="127.0.0.0/8", smtpd_reject_unlisted_sender="yes"))
    assert str(checker.rcpt(state, "root@local.domain")) == \
        "550 5.1.0 <nosuch@local.domain>: Sender address rejected: " \
        "User unknown in local recipient table"
    checker = Checker(config(mynetworks="127.0.0.0/8", smtpd_reject_unlisted_sender="yes",
                             smtpd_delay_reject="no"))
    assert str(checker.mail(state)).startswith("550 5.1.0 <nosuch@local.domain>: Sender")
    state.sender = "someone@example.org"        # the default class has no table
    assert checker.mail(state) is None
    checker = Checker(config(smtpd_reject_unlisted_recipient="no",
                             smtpd_recipient_restrictions="reject_unlisted_recipient"))
    assert str(checker.rcpt(OUTSIDE, "nosuchuser@local.domain")).startswith(
        "550 5.1.1 <nosuchuser@local.domain>: Recipient address rejected: User unknown")


def test_an_alias_table_that_cannot_be_opened_defers_unknown_recipients(capfd):
    # Postfix's surrogate table: smtpd starts, and the lookup fails temporarily (451)
    # rather than reject a recipient that the missing aliases might have listed.
    checker = Checker(config(alias_maps="hash:/nonexistent/aliases"))
    assert "lookups in hash:/nonexistent/aliases fail temporarily" in capfd.readouterr().err
    reply = checker.rcpt(ClientState(name="unknown", addr="127.0.0.2"),
                         "nosuchuser@local.domain")
    assert str(reply) == "451 4.3.0 <nosuchuser@local.domain>: Temporary lookup failure"
