"""The TLS history per next hop (issue 18 part 3) and `tls explain --connect` (part 4),
against a real TLS sink whose certificate changes under the smtp client; the sender's
metrics service counts the change it warns of.

The sender's tlsmgr keeps the history (smtp_tls_history_database); its smtp client
delivers qmgr's requests to a postfix-py smtpd with STARTTLS; `postfix-py tls history`
and `tls explain` run as an administrator would run them."""

import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from helpers import POSTFIX_PY
from pfxinst import Instance, free_port, wait_for


@pytest.fixture(scope="module")
def base():
    root = Path(tempfile.mkdtemp(prefix="pfx-tlshist-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def issue(path: Path, ca: trustme.CA) -> None:
    tmp = path.with_suffix(".new")
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def sink(base):
    inst = Instance.make(base / "sink")
    inst.ca = trustme.CA()
    inst.cert = base / "sink.pem"
    issue(inst.cert, inst.ca)
    inst.add_smtpd(mydestination="sink.test", smtpd_tls_security_level="may",
                   smtpd_tls_cert_file=str(inst.cert))
    with inst.running():
        yield inst


@pytest.fixture(scope="module")
def sender(base, sink):
    (base / "ca.pem").write_bytes(sink.ca.cert_pem.bytes())
    transport = base / "transport"
    transport.write_text(f"sink.test smtp:[127.0.0.1]:{sink.port}\n")
    policy = base / "tls_policy"
    policy.write_text(f"[127.0.0.1]:{sink.port} verify match=127.0.0.1\n")
    for f in (transport, policy, base / "ca.pem"):
        os.chmod(f, 0o644)
    inst = Instance.make(base / "sender")
    inst.main.update({"mydestination": "", "smtp_tls_security_level": "may",
                      "smtp_tls_loglevel": "1", "smtp_tls_CAfile": str(base / "ca.pem"),
                      "transport_maps": f"texthash:{transport}",
                      "smtp_tls_history_database": "lmdb:${data_directory}/smtp_tls_history",
                      "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache"})
    inst.metrics_port = free_port()
    inst.master_lines = ["tlsmgr unix - - y 1000? 1 tlsmgr",
                         f"127.0.0.1:{inst.metrics_port} inet n - n - 1 metrics",
                         "smtp unix - - y - - smtp",
                         f"verify unix - - y - - smtp -o smtp_tls_policy_maps=texthash:{policy}"]
    with inst.running("verify"):
        yield inst


def deliver_one(inst, nexthop: str, service: str = "smtp"):
    return inst.deliver(service, nexthop, content=b"Subject: history\n\nhello\n").results[0]


def tool(inst, *args):
    return subprocess.run([POSTFIX_PY, "-c", str(inst.dir), "tls", *args],
                          capture_output=True, text=True, env=inst.env, timeout=60)


def history_changes(inst) -> dict:
    """postfix_smtp_tls_history_changes_total from the sender's metrics service:
    {(destination, change): value}."""
    url = f"http://127.0.0.1:{inst.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=20) as answer:
        text = answer.read().decode()
    return {(s.labels["destination"], s.labels["change"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "postfix_smtp_tls_history_changes_total"}


def test_history_and_a_certificate_change(sender, sink):
    nexthop = f"[127.0.0.1]:{sink.port}"
    for _ in range(2):
        assert deliver_one(sender, nexthop).result == "sent"
    assert "TLS history:" not in sender.log()
    assert history_changes(sender) == {}
    first = tool(sender, "history", nexthop)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count(" level=may Trusted TLSv1.3 ") == 2, first.stdout

    # The sink gets a certificate of another CA: the client warns, and keeps both.
    sink.ca = trustme.CA()
    issue(sink.cert, sink.ca)
    mark = len(sink.log())
    sink.reload()
    wait_for(lambda: "reload" in sink.log()[mark:], what="the sink's reload")
    assert deliver_one(sender, nexthop).result == "sent"
    warning = [line for line in sender.log().splitlines() if "TLS history:" in line]
    assert len(warning) == 1, warning
    assert f"warning: TLS history: 127.0.0.1[127.0.0.1]:{sink.port} for {nexthop}: " \
           "certificate changed: fingerprint " in warning[0]
    assert ", Trusted -> Untrusted" in warning[0]
    # The warning is counted, per next hop and kind of change (the smtp worker writes
    # its counts within a second of its delivery).
    counted = wait_for(lambda: history_changes(sender), timeout=10, what="the count")
    assert counted == {(nexthop, "certificate"): 1.0}
    out = tool(sender, "history", nexthop).stdout
    lines = out.splitlines()
    assert lines[0] == f"{nexthop}:"
    assert " level=may Untrusted TLSv1.3 " in lines[1]     # newest first
    assert out.count(" level=may Trusted TLSv1.3 ") == 2
    fingerprints = {line.split()[1] for line in lines if line.startswith("    fingerprint")}
    assert len(fingerprints) == 2
    everything = tool(sender, "history")
    assert everything.returncode == 0 and f"{nexthop}:" in everything.stdout
    assert tool(sender, "history", "nowhere.test").returncode == 1


def test_explain_connect_says_whether_the_policy_is_met(sender, sink):
    issue(sink.cert, sink.ca)           # a fresh certificate of the sink's current CA
    sink.reload()
    # The sender trusts only the first CA: at may the probe meets the policy...
    out = tool(sender, "explain", "--connect", "bob@sink.test")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"sink.test: transport smtp, next hop [127.0.0.1]:{sink.port}" in out.stdout
    assert "TLS policy: level=may, source=global" in out.stdout
    assert "Untrusted TLS connection established to" in out.stdout
    assert "policy met: yes: Untrusted TLSv1.3" in out.stdout
    # ...and the verify transport's policy table entry is not met with this certificate.
    transport = Path(sender.main["transport_maps"].split(":", 1)[1])
    transport.write_text(f"sink.test verify:[127.0.0.1]:{sink.port}\n")
    out = tool(sender, "explain", "--connect", "sink.test")
    assert "TLS policy: level=verify, source=policy, match=127.0.0.1" in out.stdout
    assert "policy met: no: certificate: Untrusted at level verify" in out.stdout
    assert out.returncode == 1
