"""lib/resolve.py address classes: local (mydestination, inet_interfaces), virtual
mailbox, relay and default, their precedence, and transport_maps over each."""

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib.resolve import AddressResolver, ResolveError, Route


def resolver(tmp_path, **settings):
    settings.setdefault("myhostname", "mail.example.com")
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return AddressResolver(maincf.load(str(tmp_path)))


@pytest.fixture
def warnings(monkeypatch):
    seen = []
    monkeypatch.setattr(msg, "warn", seen.append)
    return seen


def test_virtual_mailbox_class_and_transport(tmp_path):
    r = resolver(tmp_path, virtual_mailbox_domains="hosted.example, /dev/null",
                 relay_domains="relay.example", relayhost="[gw.example]")
    route = r.resolve("Ann@Hosted.Example")
    assert route == Route("virtual", "hosted.example")
    assert route.addr_class == "virtual" and not route.local
    # A string list, not a domain list: no subdomain matching; relayhost never applies.
    assert r.resolve("ann@sub.hosted.example") == Route("smtp", "[gw.example]")
    assert r.resolve("ann@sub.hosted.example").addr_class == "default"
    assert r.resolve("x@relay.example").addr_class == "relay"
    assert r.resolve("x@mail.example.com").addr_class == "local"
    r.close()


def test_virtual_transport_nexthop(tmp_path):
    r = resolver(tmp_path, virtual_mailbox_domains="hosted.example",
                 virtual_transport="lmtp:unix:/run/dovecot/lmtp")
    assert r.resolve("ann@hosted.example") == Route("lmtp", "unix:/run/dovecot/lmtp")
    r.close()


def test_virtual_mailbox_domains_defaults_to_the_maps(tmp_path):
    maps = tmp_path / "vmailbox"
    maps.write_text("hosted.example  anything\nann@hosted.example  hosted/ann/\n")
    r = resolver(tmp_path, virtual_mailbox_maps=f"texthash:{maps}")
    assert r.resolve("bob@hosted.example").addr_class == "virtual"
    assert r.resolve("ann@other.example").addr_class == "default"
    r.close()


def test_precedence_and_helpful_warnings(tmp_path, warnings):
    r = resolver(tmp_path, mydestination="$myhostname, both.example",
                 virtual_mailbox_domains="both.example, vr.example",
                 relay_domains="vr.example")
    assert r.resolve("a@both.example") == Route("local", "mail.example.com", True)
    assert r.resolve("a@vr.example") == Route("virtual", "vr.example")
    assert warnings == [
        "do not list domain both.example in BOTH mydestination and virtual_mailbox_domains",
        "do not list domain vr.example in BOTH virtual_mailbox_domains and relay_domains"]
    r.close()


def test_transport_maps_override_the_virtual_class(tmp_path):
    r = resolver(tmp_path, virtual_mailbox_domains="hosted.example",
                 transport_maps="inline:{{ann@hosted.example=error:5.1.1 gone}}")
    assert r.resolve("ann@hosted.example") == Route("error", "5.1.1 gone")
    assert r.resolve("ann@hosted.example").addr_class == "virtual"
    assert r.resolve("bob@hosted.example") == Route("virtual", "hosted.example")
    r.close()


def test_address_literals_of_inet_interfaces_are_local(tmp_path):
    r = resolver(tmp_path, inet_interfaces="127.0.0.1, [::1]")
    assert r.resolve("a@[127.0.0.1]") == Route("local", "mail.example.com", True)
    assert r.resolve("a@[IPv6:::1]").local
    assert not r.resolve("a@[127.0.0.2]").local
    assert not r.resolve("a@[not-an-address]").local
    r.close()
    r = resolver(tmp_path, inet_interfaces="all")
    assert r.resolve("a@[127.0.0.1]").local      # every interface's address
    assert not r.resolve("a@[192.0.2.77]").local
    r.close()
    r = resolver(tmp_path, inet_interfaces="loopback-only")
    assert r.resolve("a@[127.0.0.1]").local
    r.close()


def test_broken_virtual_domain_table_is_an_error(tmp_path):
    with pytest.raises(Exception):
        resolver(tmp_path, virtual_mailbox_domains="bogus:/nowhere")


def test_a_failing_domain_table_is_a_resolver_failure(tmp_path):
    maps = tmp_path / "vdomains"
    maps.write_text("hosted.example  ok\n")
    r = resolver(tmp_path, virtual_mailbox_domains=f"texthash:{maps}")
    assert r.resolve("a@hosted.example").addr_class == "virtual"

    def broken(key):
        raise OSError("backend gone")
    r.virtual_mailbox_domains.tables[0].lookup = broken
    with pytest.raises(ResolveError, match=f"texthash:{maps}: backend gone"):
        r.resolve("a@other.example")
    r.close()
