"""The metrics service: after a delivery run with STARTTLS on both sides, /metrics shows the
connections, the TLS handshakes full and resumed, the deliveries and the queue; and the
JSON event log (tls_event_log) has one object per handshake and per delivery, and a
failed legacy handshake logs what the client offered."""

import base64
import json
import os
import ssl
import urllib.error
import urllib.request

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from pfxinst import SmtpClient, free_port, wait_for
from postfix_py.lib import sasl_common
from tls_sink import TlsSink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot, privilege drop)")


def _plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _send(port, ctx, session=None, rcpt="bob@remote.example", auth=False):
    c = SmtpClient(port)
    assert c.reply().startswith("220")
    c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS").startswith("220")
    c.wrap(ctx, session=session)
    c.cmd("EHLO client.example")
    if auth:
        assert c.cmd("AUTH PLAIN " + _plain("alice", "wrong")).startswith("535")
        assert c.cmd("AUTH PLAIN " + _plain("alice", "secret")).startswith("235")
        assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        assert c.cmd("RCPT TO:<nofqdn>").startswith("504")
        assert c.cmd("RSET").startswith("250")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert c.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    assert c.cmd("Subject: metrics\r\n\r\nhello\r\n.").startswith("250")
    c.cmd("QUIT")
    session = c.sock.session
    reused = c.sock.session_reused
    c.sock = c.sock.unwrap()
    c.close()
    return session, reused


def _samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _total(samples, name, **match):
    return sum(v for labels, v in samples.get(name, [])
               if all(labels.get(k) == w for k, w in match.items()))


@pytest.fixture
def setup(instance):
    d = instance.dir
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    os.chmod(d / "server.pem", 0o600)
    (d / "passwd").write_text(f"alice:{sasl_common.hash_password('secret')}\n")
    os.chmod(d / "passwd", 0o644)
    sink = TlsSink(str(d / "server.pem"))
    instance.port, instance.metrics_port = free_port(), free_port()
    instance.main.update({
        "relayhost": f"[127.0.0.1]:{sink.port}", "mydestination": "localhost",
        "smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(d / "server.pem"),
        "smtpd_tls_key_file": str(d / "server.pem"),
        "smtp_tls_security_level": "encrypt", "smtp_tls_CAfile": str(d / "ca.pem"),
        "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache",
        "tls_event_log": str(d / "tls-events.json"),
        "smtpd_tls_loglevel": "1", "smtp_tls_loglevel": "1",
        "smtpd_sasl_type": "builtin", "smtpd_sasl_path": str(d / "passwd"),
        "smtpd_sasl_auth_enable": "yes", "smtpd_sasl_builtin_failure_delay": "0s",
        "smtpd_error_sleep_time": "0s",
        "smtpd_recipient_restrictions": "reject_non_fqdn_recipient",
    })
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - y - - smtpd",
        f"127.0.0.1:{instance.metrics_port} inet n - n - 1 metrics",
        "qmgr unix n - n 300 1 qmgr",
        "smtp unix - - y - 1 smtp",
        "tlsmgr unix - - y 1000? 1 tlsmgr",
        "showq unix n - n - - showq",
    ]
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.check_hostname = False
    try:
        instance.start()
        yield instance, sink, ctx
    finally:
        sink.stop()


def test_metrics_after_delivery_run(setup):
    instance, sink, ctx = setup
    session, reused = _send(instance.port, ctx)
    assert not reused
    resumed = 0
    for n in range(3):
        _, again = _send(instance.port, ctx, session=session, auth=n == 0)
        resumed += again
        wait_for(lambda: sink.messages >= 1, timeout=30, what="first delivery")
    _send(instance.port, ctx, session=session, rcpt="defer@remote.example")
    wait_for(lambda: instance.log().count("status=sent") >= 4, timeout=60, what="deliveries")
    wait_for(lambda: "status=deferred" in instance.log(), timeout=60, what="a deferral")
    assert resumed >= 1 and sink.resumed >= 1

    url = f"http://127.0.0.1:{instance.metrics_port}/metrics"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=20)

    def scrape():
        with urllib.request.urlopen(url, timeout=20) as answer:
            assert answer.status == 200
            return _samples(answer.read().decode())

    # A worker writes its counts at most once a second; an idle one (as every worker is
    # now, max_idle being 100 s) within a second of its last client.
    def counted():
        samples = scrape()
        last_smtp = _total(samples, "postfix_deliveries_total", status="deferred") >= 1
        last_smtpd = _total(samples, "postfix_smtpd_commands_total", command="quit",
                            result="ok") >= 5
        return samples if last_smtp and last_smtpd else None
    samples = wait_for(counted, timeout=10, what="the last clients' counts")
    assert _total(samples, "postfix_smtpd_connects_total") >= 5
    assert _total(samples, "postfix_smtpd_tls_connections_total", session="full") >= 1
    assert _total(samples, "postfix_smtpd_tls_connections_total", session="resumed") >= 1
    assert _total(samples, "postfix_smtp_tls_connections_total", session="full") >= 1
    assert _total(samples, "postfix_smtp_tls_connections_total", session="resumed") >= 1
    assert _total(samples, "postfix_smtp_tls_destination_outcomes_total",
                  level="encrypt", session="resumed") >= 1
    assert _total(samples, "postfix_deliveries_total", transport="smtp", status="sent",
                  dsn_class="2") >= 4
    assert _total(samples, "postfix_deliveries_total", status="deferred", dsn_class="4") >= 1
    assert _total(samples, "postfix_smtp_delivery_delay_seconds_count",
                  stage="transmission") >= 4
    assert _total(samples, "postfix_smtpd_messages_processed_total") >= 5
    assert _total(samples, "postfix_smtpd_messages_processed_total", sasl_method="PLAIN") == 1
    assert _total(samples, "postfix_smtpd_sasl_authentication_failures_total",
                  method="PLAIN") == 1
    assert _total(samples, "postfix_smtpd_sasl_authentication_successes_total",
                  method="PLAIN") == 1
    assert _total(samples, "postfix_smtpd_messages_rejected_total", code="504",
                  stage="RCPT") == 1
    assert _total(samples, "postfix_smtpd_restriction_rejects_total",
                  restriction="reject_non_fqdn_recipient", code="504") == 1
    assert _total(samples, "postfix_smtpd_commands_total", command="starttls",
                  result="ok") >= 5
    assert _total(samples, "postfix_queue_messages", queue="deferred") == 1
    assert _total(samples, "postfix_showq_message_size_bytes_count", queue="deferred") == 1
    assert _total(samples, "postfix_queue_oldest_age_seconds", queue="deferred") > 0
    assert _total(samples, "postfix_tlsmgr_cache_entries", cache="smtp") >= 1
    assert _total(samples, "postfix_tlsmgr_cache_hits_total", cache="smtp") >= 1
    assert _total(samples, "postfix_processes", program="smtpd") >= 1
    assert _total(samples, "postfix_process_uss_bytes", program="smtpd") > 0

    # The JSON event log: one valid object per handshake and per delivery (each object is
    # written just after its log line: compare once both are complete).
    def complete():
        log = instance.log()
        events = [json.loads(line) for line in
                  (instance.dir / "tls-events.json").read_text().splitlines()]
        counts = (log.count("TLS connection established from"),
                  log.count("TLS connection established to"), log.count(", status="))
        found = tuple(sum(1 for e in events if test(e)) for test in (
            lambda e: e["event"] == "tls" and e["role"] == "server",
            lambda e: e["event"] == "tls" and e["role"] == "client",
            lambda e: e["event"] == "delivery"))
        return events if found == counts else None
    events = wait_for(complete, timeout=10, what="one event per handshake and delivery")
    tls_server = [e for e in events if e["event"] == "tls" and e["role"] == "server"]
    tls_client = [e for e in events if e["event"] == "tls" and e["role"] == "client"]
    deliveries = [e for e in events if e["event"] == "delivery"]
    assert len(tls_server) >= 5 and len(tls_client) >= 5 and len(deliveries) >= 5
    assert any(e["resumed"] for e in tls_server) and any(e["resumed"] for e in tls_client)
    assert {e["status"] for e in deliveries} == {"sent", "deferred"}


def test_failed_legacy_handshake_logs_the_offer(setup):
    instance, sink, _ = setup
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    legacy.check_hostname, legacy.verify_mode = False, ssl.CERT_NONE
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    legacy.set_ciphers("AES128-SHA:@SECLEVEL=0")
    instance.main["smtpd_tls_exclude_ciphers"] = "AES128-SHA"
    instance.reload()
    c = SmtpClient(instance.port)
    assert c.reply().startswith("220")
    c.cmd("EHLO legacy.example")
    assert c.cmd("STARTTLS").startswith("220")
    with pytest.raises(ssl.SSLError):
        c.wrap(legacy)
    c.close()
    line = wait_for(lambda: [l for l in instance.log().splitlines()
                             if "client offered:" in l], timeout=10, what="the offer line")[0]
    assert "protocols=TLSv1.2" in line and "ciphers=AES128-SHA sni=none" in line
    def failures():
        events = [json.loads(l) for l in
                  (instance.dir / "tls-events.json").read_text().splitlines()]
        return [e for e in events if e["event"] == "tls_failure"]
    wait_for(failures, timeout=10, what="the tls_failure event")   # written after the log line
    assert len(failures()) == 1 and failures()[0]["offer"]["ciphers"] == ["AES128-SHA"]
    assert failures()[0]["reason"] == "no shared cipher"
