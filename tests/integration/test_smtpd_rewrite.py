"""Address resolution in smtpd through the real master: relay tricks with routing
operators (user%remote@local, remote!user@local, "user@remote"@local) are refused from
outside mynetworks, and unknown recipients of every address class get Postfix's 550 at
RCPT and VRFY. The replies are those of Debian's Postfix 3.7 for the same main.cf (probed
with tests/peers.py's PostfixPeer), but for the quoted trick, whose reply Postfix writes
in the internal (dequoted) form: <victim@remote.example@local.domain>."""

import smtplib

import pytest

from pfxinst import free_port, wait_for

TRICKS = ["victim%remote.example@local.domain", "remote.example!victim@local.domain",
          '"victim@remote.example"@local.domain']


@pytest.fixture
def mta(instance):
    instance.port = free_port()
    instance.record_fake_agent()
    instance.main.update({
        "mydestination": "$myhostname, localhost, local.domain",
        "relay_domains": "relay.example",
        "virtual_mailbox_domains": "virt.example",
        "virtual_mailbox_maps": "inline:{bob@virt.example=bob/}",
        "relay_recipient_maps": "inline:{carol@relay.example=x}",
        "local_recipient_maps": "unix:passwd.byname",
        # virtual_alias_domains defaults to $virtual_alias_maps: alias.example is one
        "virtual_alias_maps": "inline:{alias.example=x, info@alias.example=root, "
                              "alias@local.domain=root}",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "mynetworks": "127.0.0.2/32",          # the client (127.0.0.1) is outside
        "smtpd_error_sleep_time": "0s", "smtpd_soft_error_limit": "100",
        "smtpd_hard_error_limit": "100",
        "queue_run_delay": "1s", "ipc_timeout": "5s",
    })
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - n - - smtpd"]
    return instance


def rcpt_replies(port, rcpts, vrfy=()):
    out = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("alice@example.org")
        for r in rcpts:
            code, text = s.rcpt(r)
            out[r] = f"{code} {text.decode()}"
        for v in vrfy:
            code, text = s.verify(v)
            out["VRFY " + v] = f"{code} {text.decode()}"
        code, text = s.data(b"Subject: tricks\r\n\r\nbody\r\n")
        out["DATA"] = code
    return out


def test_relay_tricks_from_outside_are_refused_and_unknown_users_too(mta):
    mta.start()
    got = rcpt_replies(mta.port, TRICKS + [
        "x%y@relay.example", "root@local.domain", "nosuchuser@local.domain",
        "bob@virt.example", "nob@virt.example", "carol@relay.example", "nob@relay.example",
        "info@alias.example", "nob@alias.example", "alias@local.domain"],
        vrfy=["root", "nosuch@local.domain", "victim%remote.example@local.domain"])
    for trick in TRICKS + ["x%y@relay.example"]:
        assert got[trick] == f"554 5.7.1 <{trick}>: Relay access denied"
    assert got["root@local.domain"] == "250 2.1.5 Ok"
    assert got["nosuchuser@local.domain"] == "550 5.1.1 <nosuchuser@local.domain>: " \
        "Recipient address rejected: User unknown in local recipient table"
    assert got["bob@virt.example"] == "250 2.1.5 Ok"
    assert got["nob@virt.example"] == "550 5.1.1 <nob@virt.example>: " \
        "Recipient address rejected: User unknown in virtual mailbox table"
    assert got["carol@relay.example"] == "250 2.1.5 Ok"
    assert got["nob@relay.example"] == "550 5.1.1 <nob@relay.example>: " \
        "Recipient address rejected: User unknown in relay recipient table"
    assert got["info@alias.example"] == "250 2.1.5 Ok"
    assert got["nob@alias.example"] == "550 5.1.1 <nob@alias.example>: " \
        "Recipient address rejected: User unknown in virtual alias table"
    # not an account, but aliased: known, as Postfix's check_rcpt_maps
    assert got["alias@local.domain"] == "250 2.1.5 Ok"
    assert got["VRFY root"] == "252 2.0.0 root"
    assert got["VRFY nosuch@local.domain"] == "550 5.1.1 <nosuch@local.domain>: " \
        "Recipient address rejected: User unknown in local recipient table"
    assert got["VRFY victim%remote.example@local.domain"] == \
        "554 5.7.1 <victim%remote.example@local.domain>: Relay access denied"
    assert got["DATA"] == 250
    # No path queued the remote victim: the one message holds the accepted users.
    (queued,) = [p for p in (mta.queue / "incoming").rglob("*") if p.is_file()]
    data = queued.read_bytes()
    assert b"remote.example" not in data and b"victim" not in data
    assert b"root@local.domain" in data and b"carol@relay.example" in data
    log = mta.log()
    assert "Relay access denied; from=<alice@example.org> " \
           "to=<victim%remote.example@local.domain> proto=ESMTP helo=<client.example>" in log
    assert "Traceback" not in log


def test_relay_tricks_from_mynetworks_go_to_the_remote_destination(mta):
    # From mynetworks Postfix accepts them and relays to the remote domain: the default
    # class (default_transport smtp, next hop remote.example), not local delivery.
    mta.main["mynetworks"] = "127.0.0.0/8"
    mta.master_lines += ["qmgr unix n - n 300 1 qmgr",
                         "smtp unix - - n - - python:fake_agent"]
    mta.start()
    got = rcpt_replies(mta.port, TRICKS)
    assert all(got[t] == "250 2.1.5 Ok" for t in TRICKS), got
    wait_for(lambda: len(mta.record.read_text().splitlines()) == 3, timeout=15,
             what="three deliveries by the smtp transport")
    # Handed over as queued; Postfix's qmgr would hand over the resolved recipient
    # (victim@remote.example, lib/resolve's Route.recipient), which qmgr does not yet use.
    handed = {line.split(" ", 1)[1] for line in mta.record.read_text().splitlines()}
    assert handed == set(TRICKS)
    log = mta.log()
    assert "Traceback" not in log
