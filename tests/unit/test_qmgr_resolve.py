"""lib/resolve.py: mydestination, relay_domains, relayhost, transport_maps precedence."""

import pytest

from postfix_py.lib import maincf
from postfix_py.lib.address import split_address, strip_extension
from postfix_py.lib.resolve import AddressResolver, Route, parse_spec, probe_routing_differs


def resolver(tmp_path, **settings):
    settings.setdefault("myhostname", "mail.example.com")
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return AddressResolver(maincf.load(str(tmp_path)))


def test_helpers():
    assert split_address("User@Example.COM.") == ("User", "example.com")
    assert split_address('"a@b"@example.com') == ('"a@b"', "example.com")
    assert split_address("postmaster") == ("postmaster", "")
    assert parse_spec("smtp:[gw.example]:587") == ("smtp", "[gw.example]:587")
    assert parse_spec(":gw.example") == ("", "gw.example")
    assert parse_spec("relay") == ("relay", "")
    assert strip_extension("user+ext-more", "+-") == "user"
    assert strip_extension("+user", "+") == "+user"


def test_default_routes(tmp_path):
    r = resolver(tmp_path, relay_domains="relay.example")
    assert r.resolve("bob@mail.example.com") == Route("local", "mail.example.com", True)
    assert r.resolve("bob@localhost") == Route("local", "mail.example.com", True)
    assert r.resolve("postmaster") == Route("local", "mail.example.com", True)
    assert r.resolve("bob@relay.example") == Route("relay", "relay.example")
    assert r.resolve("bob@sub.relay.example") == Route("relay", "sub.relay.example")
    assert r.resolve("bob@Remote.Example") == Route("smtp", "remote.example")
    r.close()


def test_relayhost_and_transport_nexthops(tmp_path):
    r = resolver(tmp_path, relayhost="[gw.example]:587", relay_domains="relay.example",
                 default_transport="smtp", relay_transport="relay:[relay-gw.example]")
    assert r.resolve("bob@remote.example") == Route("smtp", "[gw.example]:587")
    assert r.resolve("bob@relay.example") == Route("relay", "[relay-gw.example]")
    r.close()


def test_transport_maps_search_order_and_fields(tmp_path):
    table = ("inline:{bob+x@remote.example=slow:, alice@remote.example=:[alice-gw], "
             "remote.example=fast, {.sub.example=error:5.1.2 gone}, other.example=:, "
             "bob@mail.example.com=smtp:[mailhub]}")
    r = resolver(tmp_path, transport_maps=table, recipient_delimiter="+",
                 relayhost="[gw.example]")
    assert r.resolve("bob+x@remote.example") == Route("slow", "remote.example")
    assert r.resolve("alice@remote.example") == Route("smtp", "[alice-gw]")
    assert r.resolve("carol@remote.example") == Route("fast", "remote.example")
    assert r.resolve("bob+y@remote.example") == Route("fast", "remote.example")
    assert r.resolve("x@a.sub.example") == Route("error", "5.1.2 gone")
    assert r.resolve("x@sub.example") == Route("smtp", "[gw.example]")   # .sub: not itself
    assert r.resolve("x@other.example") == Route("smtp", "[gw.example]")  # ":" changes nothing
    assert r.resolve("bob@mail.example.com") == Route("smtp", "[mailhub]")
    assert r.resolve("carol@mail.example.com").local
    r.close()


def test_wildcard_and_regexp_tables(tmp_path):
    rx = tmp_path / "transport.re"
    rx.write_text("/^bounce@/ error:no thanks\n")
    r = resolver(tmp_path, transport_maps=f"regexp:{rx}, inline:{{*=discard:}}")
    assert r.resolve("bounce@anything.example") == Route("error", "no thanks")
    assert r.resolve("x@y.example") == Route("discard", "y.example")
    r.close()


def test_missing_table_is_an_error(tmp_path):
    with pytest.raises(Exception):
        resolver(tmp_path, transport_maps="bogus:/nowhere")


def test_sender_dependent_relayhost_and_default_transport(tmp_path, capsys):
    from postfix_py.lib import msg
    msg.init_cli("qmgr")
    (tmp_path / "relay.re").write_text("/^re@pattern\\.example$/ [re-gw]\n")
    relays = ("inline:{alice@a.example=[alice-gw]:587, @a.example=[a-gw], "
              "dunno@a.example=DUNNO, bob@mail.example.com=[bob-gw], "
              "<>=[null-gw], empty@a.example=}")
    r = resolver(tmp_path, relayhost="[global-gw]", relay_domains="relay.example",
                 recipient_delimiter="+",
                 sender_dependent_relayhost_maps=f"{relays}, regexp:{tmp_path}/relay.re",
                 sender_dependent_default_transport_maps=(
                     "inline:{@b.example=slow, carol@b.example=fast:[carol-gw], "
                     "dunno@b.example=dunno}"))
    rcpt = "x@remote.example"
    assert r.resolve(rcpt) == Route("smtp", "[global-gw]")          # no sender: global
    assert r.resolve(rcpt, "alice@a.example") == Route("smtp", "[alice-gw]:587")
    assert r.resolve(rcpt, "alice+tag@A.example") == Route("smtp", "[alice-gw]:587")
    assert r.resolve(rcpt, "zed@a.example") == Route("smtp", "[a-gw]")     # @domain
    # DUNNO stops the search: not @a.example, the global relayhost.
    assert r.resolve(rcpt, "dunno@a.example") == Route("smtp", "[global-gw]")
    assert r.resolve(rcpt, "other@c.example") == Route("smtp", "[global-gw]")
    assert r.resolve(rcpt, "") == Route("smtp", "[null-gw]")               # the <> key
    assert r.resolve(rcpt, "bob@mail.example.com") == Route("smtp", "[bob-gw]")
    assert r.resolve(rcpt, "re@pattern.example") == Route("smtp", "[re-gw]")
    # The relay class keeps relay_transport but takes the sender's relayhost.
    assert r.resolve("x@relay.example", "alice@a.example") == Route("relay", "[alice-gw]:587")
    # The default class takes the sender's transport; its own next hop wins.
    assert r.resolve(rcpt, "dan@b.example") == Route("slow", "[global-gw]")
    assert r.resolve(rcpt, "carol@b.example") == Route("fast", "[carol-gw]")
    assert r.resolve(rcpt, "dunno@b.example") == Route("smtp", "[global-gw]")
    assert r.resolve("x@relay.example", "dan@b.example") == Route("relay", "[global-gw]")
    # Local mail is not affected at all.
    assert r.resolve("bob@mail.example.com", "alice@a.example").local
    assert r.resolve(rcpt, "empty@a.example") == Route("smtp", "[global-gw]")
    assert ("sender_dependent_relayhost_maps: ignoring null lookup result for "
            "empty@a.example") in capsys.readouterr().err
    r.close()


def test_probes_are_routed_by_the_address_verify_parameters(tmp_path):
    """trivial-rewrite's verify class: each address_verify_* parameter replaces the one
    it defaults to, for probes only."""
    settings = dict(
        myhostname="mail.example.com", relay_domains="relay.example",
        virtual_mailbox_domains="virt.example", relayhost="[gw.example]",
        transport_maps="inline:{special.example=smtp:[normal-special.example]}",
        address_verify_relayhost="[probe-gw.example]:2525",
        address_verify_transport_maps="inline:{special.example=smtp:[probe-special.example]}",
        address_verify_default_transport="probe-smtp",
        address_verify_local_transport="probe-local",
        address_verify_virtual_transport="probe-virtual",
        address_verify_relay_transport="probe-relay",
        address_verify_sender_dependent_relayhost_maps="inline:{@sender.example=[sdr.example]}",
        address_verify_sender_dependent_default_transport_maps=(
            "inline:{@sender.example=sdt}"))
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    cfg = maincf.load(str(tmp_path))
    normal, probe = AddressResolver(cfg), AddressResolver(cfg, probe=True)
    try:
        assert probe_routing_differs(cfg)
        assert normal.resolve("a@remote.example") == Route("smtp", "[gw.example]")
        assert probe.resolve("a@remote.example") == Route("probe-smtp",
                                                          "[probe-gw.example]:2525")
        assert probe.resolve("a@relay.example") == Route("probe-relay",
                                                         "[probe-gw.example]:2525")
        assert probe.resolve("a@mail.example.com").transport == "probe-local"
        assert probe.resolve("a@virt.example").transport == "probe-virtual"
        assert normal.resolve("a@special.example") == Route("smtp", "[normal-special.example]")
        assert probe.resolve("a@special.example") == Route("smtp", "[probe-special.example]")
        assert normal.resolve("a@remote.example", "s@sender.example") == \
            Route("smtp", "[gw.example]")
        assert probe.resolve("a@remote.example", "s@sender.example") == \
            Route("sdt", "[sdr.example]")
    finally:
        normal.close()
        probe.close()


def test_probe_routing_defaults_to_the_normal_routing(tmp_path):
    (tmp_path / "main.cf").write_text(
        "myhostname = mail.example.com\nrelayhost = [gw.example]\n"
        "transport_maps = inline:{x.example=smtp:[y.example]}\n")
    cfg = maincf.load(str(tmp_path))
    assert not probe_routing_differs(cfg)
    probe = AddressResolver(cfg, probe=True)
    assert probe.resolve("a@remote.example") == Route("smtp", "[gw.example]")
    assert probe.resolve("a@x.example") == Route("smtp", "[y.example]")
    probe.close()
