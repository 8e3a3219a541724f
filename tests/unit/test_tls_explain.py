"""`postfix-py tls explain` (tools/tls_explain.py) without a running instance: transport,
next hop, and the TLS policy of each source, from the smtp client's own resolution; and
lib/tls_history.py's comparisons."""

import pytest

from postfix_py.lib import tls_history
from postfix_py.tools import postfix_tls


@pytest.fixture
def confdir(tmp_path):
    policy = tmp_path / "tls_policy"
    policy.write_text("[127.0.0.1]:2525 verify match=nexthop:mx.policy.test\n"
                      "[127.0.0.3]:2525 fingerprint match=AA:BB:CC connection_reuse=yes\n")
    transport = tmp_path / "transport"
    transport.write_text("policy.test smtp:[127.0.0.1]:2525\n"
                         "global.test smtp:[127.0.0.2]:2525\n"
                         "finger.test smtp:[127.0.0.3]:2525\n"
                         "local.test local:\n"
                         "relay.test relay:[127.0.0.1]:2525\n"
                         "site.test persite:[127.0.0.4]:2525\n"
                         "nosite.test persite:[127.0.0.5]:2525\n")
    per_site = tmp_path / "tls_per_site"
    per_site.write_text("127.0.0.4 MUST_NOPEERMATCH\n")
    (tmp_path / "main.cf").write_text(
        f"queue_directory = {tmp_path}/queue\n"
        f"data_directory = {tmp_path}/data\n"
        "myhostname = mail.example.net\n"
        "smtp_tls_security_level = encrypt\n"
        f"smtp_tls_policy_maps = texthash:{policy}\n"
        f"transport_maps = texthash:{transport}\n")
    (tmp_path / "master.cf").write_text(
        "smtp unix - - y - - smtp\n"
        "relay unix - - y - - smtp -o smtp_tls_security_level=may -o smtp_tls_policy_maps=\n"
        "local unix - n n - - local\n"
        "persite unix - - y - - smtp -o smtp_tls_security_level=may -o smtp_tls_policy_maps="
        f" -o smtp_tls_per_site=texthash:{per_site}\n")
    return tmp_path


def run(confdir, capsys, *args):
    rc = postfix_tls.main(["-c", str(confdir), "explain", *args])
    return rc, capsys.readouterr().out


def test_policy_map_source(confdir, capsys):
    rc, out = run(confdir, capsys, "policy.test")
    assert rc == 0, out
    assert "policy.test: transport smtp, next hop [127.0.0.1]:2525" in out
    assert "global TLS level encrypt" in out
    assert "127.0.0.1[127.0.0.1]:2525" in out
    assert "TLS policy: level=verify, source=policy, match=nexthop:mx.policy.test" in out


def test_global_level_source(confdir, capsys):
    rc, out = run(confdir, capsys, "bob@global.test")
    assert rc == 0, out
    assert "global.test: transport smtp, next hop [127.0.0.2]:2525" in out
    assert "TLS policy: level=encrypt, source=global" in out


def test_fingerprint_rules_and_connection_reuse(confdir, capsys):
    rc, out = run(confdir, capsys, "finger.test")
    assert "TLS policy: level=fingerprint, source=policy, match=AA:BB:CC, " \
           "connection_reuse=yes" in out


def test_service_overrides_and_non_smtp_transports(confdir, capsys):
    rc, out = run(confdir, capsys, "relay.test")
    assert "global TLS level may" in out
    assert "TLS policy: level=may, source=global" in out
    rc, out = run(confdir, capsys, "local.test")
    assert rc == 0 and "program local, not the smtp or lmtp client" in out


def test_per_site_source(confdir, capsys):
    # smtp_tls_per_site (no policy maps): the server host name's entry raises may to
    # encrypt; a server without an entry keeps the global level.
    rc, out = run(confdir, capsys, "site.test")
    assert rc == 0, out
    assert "site.test: transport persite, next hop [127.0.0.4]:2525" in out
    assert "global TLS level may" in out
    assert "TLS policy: level=encrypt, source=per-site" in out
    rc, out = run(confdir, capsys, "nosite.test")
    assert "TLS policy: level=may, source=global" in out


def test_usage(confdir, capsys):
    assert postfix_tls.main(["-c", str(confdir), "explain"]) == 1
    assert postfix_tls.main(["-c", str(confdir), "history", "a", "b"]) == 1


# --- lib/tls_history.py ------------------------------------------------------------------

def rec(server="mx[192.0.2.1]:25", tls=True, status="Verified", fp="AA", issuer="CA1", t=1):
    r = {"t": t, "server": server, "level": "may", "tls": tls, "status": status if tls else ""}
    if tls:
        r.update(protocol="TLSv1.3", cipher="X", fingerprint=fp, subject="mx",
                 issuer=issuer, resumed=False)
    return r


def test_history_changes():
    assert tls_history.changes([], rec()) == ([], [])
    assert tls_history.changes([rec()], rec(t=2)) == ([], [])
    warns, notes = tls_history.changes([rec()], rec(tls=False))
    assert warns and "now plaintext" in warns[0] and "was TLS (Verified TLSv1.3)" in warns[0]
    warns, notes = tls_history.changes([rec()], rec(fp="BB", issuer="CA2", status="Untrusted"))
    assert warns == ['certificate changed: fingerprint AA -> BB, issuer "CA1" -> "CA2", '
                     'Verified -> Untrusted']
    warns, notes = tls_history.changes([rec()], rec(fp="BB"))        # a renewal
    assert not warns and notes == ["certificate changed: fingerprint AA -> BB"]
    warns, _ = tls_history.changes([rec()], rec(status="Trusted"))
    assert warns == ["security status changed: Verified -> Trusted"]
    # Another server of the same next hop is not compared with this one.
    assert tls_history.changes([rec(server="other[192.0.2.2]:25")], rec(tls=False)) == ([], [])


def test_history_report_warns_and_counts_only_the_unexpected(monkeypatch):
    logged, counted = [], []
    monkeypatch.setattr(tls_history.msg, "warn", lambda text: logged.append(("warn", text)))
    monkeypatch.setattr(tls_history.msg, "info", lambda text: logged.append(("info", text)))
    monkeypatch.setattr(tls_history.metrics, "tls_history_change",
                        lambda dest, change: counted.append((dest, change)))
    cases = [(rec(tls=False), "plaintext"),
             (rec(fp="BB", issuer="CA2"), "certificate"),
             (rec(fp="BB", status="Untrusted"), "certificate"),   # same issuer, lower
             (rec(status="Anonymous"), "status")]
    for record, change in cases:
        logged.clear()
        counted.clear()
        tls_history.report("example.com", record, [rec()])
        assert counted == [("example.com", change)]
        assert len(logged) == 1 and logged[0][0] == "warn"
        assert logged[0][1].startswith("TLS history: mx[192.0.2.1]:25 for example.com: ")
    # Routine changes: an info line, no count.
    for record in (rec(fp="BB"), rec(status="Verified", t=5)):
        logged.clear()
        counted.clear()
        tls_history.report("example.com", record, [rec()])
        assert counted == []
        assert all(kind == "info" for kind, _ in logged)
    tls_history.report("example.com", rec(), [rec(tls=False)])     # plaintext -> TLS
    assert counted == [] and logged[-1][0] == "info" and "was plaintext" in logged[-1][1]


def test_history_format():
    lines = tls_history.format_history({"example.com": [rec(t=0), rec(tls=False, t=60)]})
    assert lines[0] == "example.com:"
    assert lines[1].startswith("  1970-01-01 00:01:00 UTC mx[192.0.2.1]:25 level=may plaintext")
    assert "Verified TLSv1.3 X" in lines[2]
    assert 'fingerprint AA subject "mx" issuer "CA1"' in lines[3]
