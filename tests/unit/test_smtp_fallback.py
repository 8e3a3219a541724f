"""smtp/service.py smtp_fallback_relay: the fallback next hops follow the request's, and
a hard error left by a fallback relay is a 4.3.5 configuration problem (smtp_connect.c).
The name service is a stand-in that finds nothing; no connection is made."""

from types import SimpleNamespace

from postfix_py.lib import deliver, maincf, msg
from postfix_py.smtp import nexthop, service, session


class NothingFound:
    """A resolver for which every next hop has no address, for good (NXDOMAIN)."""

    def __init__(self):
        self.asked = []

    def addresses(self, dest):
        self.asked.append(dest.text)
        return [], nexthop.Why("5.4.4", f"Host or domain name not found. Name service "
                                        f"error for name={dest.host} type=A: Host not found")


def deliver_once(tmp_path, prefix="smtp", nexthop_text="primary.example", **settings):
    (tmp_path / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    resolver = NothingFound()
    ctx = SimpleNamespace(cfg=maincf.load(str(tmp_path)),
                          state={"prefix": prefix, "resolver": resolver})
    req = deliver.Request(queue_id="4AB12C", queue_file="active/4AB12C", transport=prefix,
                          nexthop=nexthop_text, sender="a@example.org", arrival=0.0,
                          recipients=["x@remote.example"], offsets=[0])
    d = session.Delivery("4AB12C", "a@example.org", [session.Rcpt("x@remote.example", 0)])
    service._deliver(ctx, req, d)
    return resolver.asked, d


def test_without_fallback_a_hard_lookup_error_stays_hard(tmp_path, capsys):
    msg.init_cli("smtp")
    asked, d = deliver_once(tmp_path)
    assert asked == ["primary.example"] and d.why[0] == "5.4.4"
    assert capsys.readouterr().err == ""


def test_fallback_relays_are_tried_in_order_and_never_bounce(tmp_path, capsys):
    msg.init_cli("smtp")
    asked, d = deliver_once(tmp_path, smtp_fallback_relay="[fb1.example]:2525, fb2.example")
    assert asked == ["primary.example", "[fb1.example]:2525", "fb2.example"]
    assert d.why == ("4.3.5", "Host or domain name not found. Name service error for "
                              "name=fb2.example type=A: Host not found")
    assert capsys.readouterr().err == "smtp: warning: smtp_fallback_relay configuration problem\n"
    # Postfix 2.2's name is smtp_fallback_relay's default; lmtp has its own parameter.
    asked, _ = deliver_once(tmp_path, fallback_relay="old.example")
    assert asked == ["primary.example", "old.example"]
    asked, _ = deliver_once(tmp_path, prefix="lmtp", nexthop_text="inet:primary.example",
                            smtp_fallback_relay="fb.example", lmtp_fallback_relay="lfb.example")
    assert asked == ["primary.example", "lfb.example"]
