"""postscreen in front of smtpd, through the real master: one instance for the module.

    127.0.0.1:P   inet n - y - 1 postscreen          (the screen)
    127.0.0.1:Q   inet n - y - 1 postscreen -o postscreen_upstream_proxy_protocol=haproxy
    127.0.0.1:R   inet n - y - 1 postscreen -o postscreen_pipelining_enable=yes ...
    smtpd         pass - - y - - smtpd                (the clients it lets through)

    127.0.0.1:T/E inet n - y - 1 postscreen -o postscreen_tls_security_level=may/encrypt
                                                  (STARTTLS in postscreen's engine)

A private dnsmasq serves the DNS lists: 127.0.0.2 is in list.test (weight 2, at the
threshold of 2), 127.0.0.3 in list.test with an answer that its =filter refuses, and
127.0.0.7 in allow.test (weight -5, below the allowlist threshold). A cidr: access list
denies 127.0.0.5 and allows 127.0.0.6. Clients connect from those loopback addresses.
The log lines and replies are Postfix's.
"""

import glob
import shutil
import subprocess
import os
import pwd
import socket
import ssl
import struct
import time

import pytest
import trustme

from peers import DNSMASQ, Dnsmasq
from pfxinst import Instance, SmtpClient, free_port, wait_for
from postfix_py.lib import queue as Q

pytestmark = pytest.mark.skipif(not DNSMASQ or os.geteuid() != 0,
                                reason="needs dnsmasq and root")

ZONE = ["--host-record=2.0.0.127.list.test,127.0.0.2",
        "--host-record=3.0.0.127.list.test,127.0.0.9",
        "--host-record=7.0.0.127.allow.test,127.0.0.2",
        "--host-record=probe.test,127.0.0.1"]
BANNER = "mail.test.example ESMTP postfix-py"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def ps(tmp_path_factory):
    import tempfile
    from pathlib import Path
    dns = Dnsmasq(ZONE, tmp_path_factory.mktemp("dns") / "dnsmasq.log",
                  local=("test", "example"), ready=lambda r: r.resolve("probe.test", "A"))
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root)
    (root / "access.cidr").write_text("127.0.0.5 reject\n127.0.0.6 permit\n")
    (root / "passwd").write_text("alice:{PLAIN}secret\n")
    inst.port, inst.proxy_port, inst.deep_port = free_port(), free_port(), free_port()
    inst.nosmtpd_port, inst.hidden_port = free_port(), free_port()
    inst.tls_port, inst.enc_port, inst.veto_port = free_port(), free_port(), free_port()
    ca = trustme.CA()
    ca.issue_cert("mail.test.example").private_key_and_cert_chain_pem.write_to_path(
        str(root / "server.pem"))
    (root / "dnsbl_reply").write_text("list.test public-list.example\n")
    inst.main.update({
        "mydestination": "$myhostname, localhost",
        "mynetworks": "10.0.0.0/8",
        "smtpd_peername_lookup": "no",
        "smtpd_dns_nameservers": f"127.0.0.1:{dns.port}",
        "postscreen_greet_wait": "2s",
        "postscreen_greet_action": "drop",
        "postscreen_access_list": f"permit_mynetworks, cidr:{root}/access.cidr",
        "postscreen_denylist_action": "drop",
        "postscreen_dnsbl_sites": "list.test=127.0.0.[1..4]*2, allow.test*-5",
        "postscreen_dnsbl_threshold": "2",
        "postscreen_dnsbl_allowlist_threshold": "-1",
        "postscreen_dnsbl_action": "enforce",
        "postscreen_dnsbl_timeout": "3s",
        "smtpd_tls_cert_file": f"{root}/server.pem",
        "smtpd_tls_loglevel": "1",
    })
    # postscreen's engine at once for every client (no cache, no pregreet, no DNSBL wait),
    # with the pipelining test on and TLS
    tls_service = (" inet n - y - 1 postscreen -o postscreen_cache_map="
                   " -o postscreen_greet_banner= -o postscreen_dnsbl_sites="
                   " -o postscreen_pipelining_enable=yes -o postscreen_tls_security_level=")
    inst.master_lines = [
        f"127.0.0.1:{inst.port} inet n - y - 1 postscreen",
        f"127.0.0.1:{inst.proxy_port} inet n - y - 1 postscreen"
        " -o postscreen_upstream_proxy_protocol=haproxy"
        " -o postscreen_cache_map=btree:$data_directory/postscreen_cache_lb"
        " -o postscreen_client_connection_count_limit=1 -o postscreen_pre_queue_limit=2",
        f"127.0.0.1:{inst.deep_port} inet n - y - 1 postscreen"
        " -o postscreen_cache_map=btree:$data_directory/postscreen_cache_deep"
        " -o postscreen_pipelining_enable=yes -o postscreen_non_smtp_command_enable=yes"
        " -o postscreen_bare_newline_enable=yes -o postscreen_cache_cleanup_interval=2s",
        f"127.0.0.1:{inst.nosmtpd_port} inet n - y - 1 postscreen"
        " -o postscreen_cache_map= -o smtpd_service_name=nosuchsmtpd",
        f"127.0.0.1:{inst.tls_port}{tls_service}may",
        f"127.0.0.1:{inst.enc_port}{tls_service}encrypt -o postscreen_command_time_limit=3s"
        " -o postscreen_helo_required=yes",
        f"127.0.0.1:{inst.veto_port} inet n - y - 1 postscreen -o postscreen_cache_map="
        " -o postscreen_greet_banner= -o postscreen_dnsbl_sites="
        " -o postscreen_allowlist_interfaces=192.0.2.25",
        f"127.0.0.1:{inst.hidden_port} inet n - y - 1 postscreen -o postscreen_cache_map="
        f" -o postscreen_dnsbl_reply_map=texthash:{root}/dnsbl_reply",
        "smtpd pass - - y - - smtpd -o smtpd_per_request_deadline=yes"
        " -o smtpd_timeout=3s -o smtpd_sasl_auth_enable=yes -o smtpd_sasl_type=builtin"
        f" -o smtpd_sasl_path={root}/passwd -o smtpd_sasl_builtin_failure_delay=0s",
    ]
    try:
        inst.start()
        yield inst
    finally:
        inst.cleanup()
        dns.close()


def lines_for(ps, addr: str) -> list[str]:
    """The postscreen and smtpd log lines that name a client address."""
    return [line.split(": ", 1)[1] for line in ps.log().splitlines()
            if f"[{addr}]" in line and ": " in line]


def teaser(c: SmtpClient) -> str:
    """The first line alone (SmtpClient.reply() would wait for the whole reply)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.sock.recv(1)
        assert chunk, data
        data += chunk
    return data.decode()


def send_mail(c: SmtpClient, subject: str) -> str:
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<a@client.example>").startswith("250")
    assert c.cmd("RCPT TO:<u@localhost>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    reply = c.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.")
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert c.cmd("QUIT").startswith("221")
    return reply.rsplit(" ", 1)[1]


def queued_text(ps, queue_id: str) -> str:
    paths = glob.glob(str(ps.queue / "*" / queue_id))
    assert paths, queue_id
    m = Q.read(paths[0])
    return b"".join(m.content(paths[0])).decode()


def test_new_client_passes_the_tests_then_the_cache_lets_it_straight_through(ps):
    c = SmtpClient(ps.port, source="127.0.0.1")
    start = time.monotonic()
    # the teaser, then (after postscreen_greet_wait) smtpd's own greeting
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    assert time.monotonic() - start >= 1.9
    port = c.sock.getsockname()[1]
    send_mail(c, "first")
    c.close()
    c = SmtpClient(ps.port, source="127.0.0.1")
    assert c.reply() == f"220 {BANNER}"           # no teaser, no wait: PASS OLD
    port2 = c.sock.getsockname()[1]
    queue_id = send_mail(c, "second")
    c.close()
    wait_for(lambda: f"{queue_id}: client=" in ps.log(), 10, what="smtpd's log")
    log = lines_for(ps, "127.0.0.1")
    assert f"CONNECT from [127.0.0.1]:{port} to [127.0.0.1]:{ps.port}" in log
    assert f"PASS NEW [127.0.0.1]:{port}" in log
    assert f"CONNECT from [127.0.0.1]:{port2} to [127.0.0.1]:{ps.port}" in log
    assert f"PASS OLD [127.0.0.1]:{port2}" in log
    assert f"{queue_id}: client=unknown[127.0.0.1]" in log
    # the cache entry: pregreet and dnsbl passed (expiry times), the other tests off
    stamps = None
    import lmdb
    path = ps.dir / "data" / "postscreen_cache.db"
    assert path.stat().st_uid == pwd.getpwnam("nobody").pw_uid      # mail_owner's
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        stamps = txn.get(b"127.0.0.1").decode().split(";")
    env.close()
    now = time.time()
    assert now + 86400 - 60 < int(stamps[0]) <= now + 86400     # postscreen_greet_ttl 1d
    assert now < int(stamps[1]) <= now + 3600                    # within the DNSBL TTLs
    assert stamps[2:] == ["1", "1", "1"]


def test_dnsbl_listed_client_is_refused_with_postfix_replies_and_log(ps):
    c = SmtpClient(ps.port, source="127.0.0.2")
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"   # postscreen's own engine now
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    reject = "550 5.7.1 Service unavailable; client [127.0.0.2] blocked using list.test"
    assert c.cmd("RCPT TO:<u@localhost>") == reject
    assert c.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.2]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.2")
    assert log == [
        f"CONNECT from [127.0.0.2]:{port} to [127.0.0.1]:{ps.port}",
        f"DNSBL rank 2 for [127.0.0.2]:{port}",
        f"NOQUEUE: reject: RCPT from [127.0.0.2]:{port}: {reject}; "
        "from=<a@client.example>, to=<u@localhost>, proto=ESMTP, helo=<client.example>",
        f"DATA without valid RCPT from [127.0.0.2]:{port}",
        f"DISCONNECT [127.0.0.2]:{port}"]
    assert not any("smtpd[" in line and "127.0.0.2" in line
                   for line in ps.log().splitlines())


def test_dnsbl_reply_map_shows_the_public_name_of_the_list(ps):
    """postscreen_dnsbl_reply_map: the 550 names what the map gives for list.test."""
    c = SmtpClient(ps.hidden_port, source="127.0.0.2")
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    reject = ("550 5.7.1 Service unavailable; client [127.0.0.2] blocked using "
              "public-list.example")
    assert c.cmd("RCPT TO:<u@localhost>") == reject
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.2]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.2")
    assert f"DNSBL rank 2 for [127.0.0.2]:{port}" in log
    assert f"NOQUEUE: reject: RCPT from [127.0.0.2]:{port}: {reject}; " \
        "from=<a@client.example>, to=<u@localhost>, proto=ESMTP, helo=<client.example>" in log
    assert not any("list.test" in line for line in log if f":{port}" in line)


def test_a_server_address_outside_the_allowlist_interfaces_vetoes_the_pass(ps):
    """postscreen_allowlist_interfaces (a backup MX): the client is refused with 450 at
    RCPT and passes nothing, whatever it does."""
    c = SmtpClient(ps.veto_port, source="127.0.0.22")
    assert c.reply() == f"220 {BANNER}"            # postscreen's engine
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.22]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert lines_for(ps, "127.0.0.22") == [
        f"CONNECT from [127.0.0.22]:{port} to [127.0.0.1]:{ps.veto_port}",
        f"ALLOWLIST VETO [127.0.0.22]:{port}",
        f"NOQUEUE: reject: RCPT from [127.0.0.22]:{port}: 450 4.3.2 Service currently "
        "unavailable; from=<a@client.example>, to=<u@localhost>, proto=ESMTP, "
        "helo=<client.example>",
        f"DISCONNECT [127.0.0.22]:{port}"]


def test_a_reply_filter_and_an_allow_list_weight_pass_clients(ps):
    # 127.0.0.3: listed with 127.0.0.9, which list.test=127.0.0.[1..4] does not match
    c = SmtpClient(ps.port, source="127.0.0.3")
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    c.cmd("QUIT")
    c.close()
    # 127.0.0.7: allow.test*-5 is below the allowlist threshold: no greet wait
    c = SmtpClient(ps.port, source="127.0.0.7")
    start = time.monotonic()
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    assert time.monotonic() - start < 1.9          # before postscreen_greet_wait ends
    port = c.sock.getsockname()[1]
    c.cmd("QUIT")
    c.close()
    assert any(line.startswith("PASS NEW [127.0.0.3]:") for line in lines_for(ps, "127.0.0.3"))
    assert f"PASS NEW [127.0.0.7]:{port}" in lines_for(ps, "127.0.0.7")


def test_pregreeting_client_is_dropped(ps):
    c = SmtpClient(ps.port, source="127.0.0.8")
    port = c.sock.getsockname()[1]
    assert teaser(c) == f"220-{BANNER}\r\n"    # the teaser; the client then talks early
    c.send(b"HELO x\r\n")
    assert c.reply() == "521 5.5.1 Protocol error"
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.8]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.8")
    assert log[0] == f"CONNECT from [127.0.0.8]:{port} to [127.0.0.1]:{ps.port}"
    assert log[1].startswith(f"PREGREET 8 after 0")
    assert log[1].endswith(f" from [127.0.0.8]:{port}: HELO x\\r\\n")
    assert log[2] == f"DISCONNECT [127.0.0.8]:{port}"


def test_access_list_denies_and_allows(ps):
    c = SmtpClient(ps.port, source="127.0.0.5")
    port = c.sock.getsockname()[1]
    assert c.reply() == "521 5.3.2 Service currently unavailable"
    assert c.reply() == "<EOF>"
    c.close()
    c = SmtpClient(ps.port, source="127.0.0.6")
    port6 = c.sock.getsockname()[1]
    assert c.reply() == f"220 {BANNER}"         # straight to smtpd: no teaser, no wait
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.5]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert lines_for(ps, "127.0.0.5") == [
        f"CONNECT from [127.0.0.5]:{port} to [127.0.0.1]:{ps.port}",
        f"DENYLISTED [127.0.0.5]:{port}", f"DISCONNECT [127.0.0.5]:{port}"]
    assert f"ALLOWLISTED [127.0.0.6]:{port6}" in lines_for(ps, "127.0.0.6")


def test_behind_proxy_v2_log_and_received_header_show_the_original_client(ps):
    body = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.1") + \
        struct.pack("!HH", 4242, 25)
    header = V2_SIG + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    c = SmtpClient(ps.proxy_port)
    c.send(header)
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    queue_id = send_mail(c, "proxied")
    c.close()
    wait_for(lambda: f"{queue_id}: client=" in ps.log(), 10, what="smtpd's log")
    log = lines_for(ps, "192.0.2.7")
    assert "CONNECT from [192.0.2.7]:4242 to [198.51.100.1]:25" in log
    assert "PASS NEW [192.0.2.7]:4242" in log
    assert "connect from unknown[192.0.2.7]" in log
    assert f"{queue_id}: client=unknown[192.0.2.7]" in log
    text = queued_text(ps, queue_id)
    assert "Received: from client.example (unknown [192.0.2.7])" in text


def v2_header(client: str, port: int) -> bytes:
    body = socket.inet_aton(client) + socket.inet_aton("198.51.100.1") + \
        struct.pack("!HH", port, 25)
    return V2_SIG + struct.pack("!BBH", 0x21, 0x11, len(body)) + body


def test_connection_count_limit_per_client(ps):
    """postscreen_client_connection_count_limit = 1 (on the balancer's service): a
    second connection of a client that is still being screened gets 421."""
    first = SmtpClient(ps.proxy_port)
    first.send(v2_header("192.0.2.50", 5001))
    assert teaser(first) == f"220-{BANNER}\r\n"      # in the greet wait
    second = SmtpClient(ps.proxy_port)
    second.send(v2_header("192.0.2.50", 5002))
    assert second.reply() == "421 4.7.0 Error: too many connections"
    second.close()
    first.close()
    wait_for(lambda: "DISCONNECT [192.0.2.50]:5002" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "192.0.2.50")
    assert "NOQUEUE: reject: CONNECT from [192.0.2.50]:5002: too many connections" in log


def test_pre_queue_limit(ps):
    """postscreen_pre_queue_limit = 2 (on the balancer's service): with one client in
    the greet wait, the next one makes two in screening and gets 421."""
    first = SmtpClient(ps.proxy_port)
    first.send(v2_header("192.0.2.60", 6001))
    assert teaser(first) == f"220-{BANNER}\r\n"
    second = SmtpClient(ps.proxy_port)
    second.send(v2_header("192.0.2.61", 6002))
    assert second.reply() == "421 4.3.2 All screening ports are busy"
    second.close()
    first.close()
    wait_for(lambda: "DISCONNECT [192.0.2.61]:6002" in ps.log(), 10, what="DISCONNECT")
    assert "reject: connect from [192.0.2.61]:6002: all screening ports busy" in \
        lines_for(ps, "192.0.2.61")


def test_bad_proxy_header_is_refused(ps):
    c = SmtpClient(ps.proxy_port)
    c.send(b"PROXY TCP9 nonsense\r\n")
    assert c.reply() == "421 4.3.2 No system resources"
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: "haproxy read: bad or missing protocol type" in ps.log(), 10,
             what="the warning")


def test_trickling_client_costs_no_smtpd_process(ps):
    """A slowloris client (one byte a second) is held by postscreen, not by smtpd: it
    pregreets, is dropped, and no smtpd process ever serves it."""
    c = SmtpClient(ps.port, source="127.0.0.9")
    port = c.sock.getsockname()[1]
    assert teaser(c) == f"220-{BANNER}\r\n"
    for ch in b"EHLO":
        c.send(bytes([ch]))
        time.sleep(1.0)
        if f"PREGREET" in "".join(lines_for(ps, "127.0.0.9")):
            break
    assert c.reply().startswith("521 5.5.1 Protocol error")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.9]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert lines_for(ps, "127.0.0.9")[1].startswith(f"PREGREET 1 after ")
    assert not any("smtpd[" in line for line in ps.log().splitlines()
                   if "127.0.0.9" in line)


def test_trickling_data_is_cut_off_by_the_request_deadline(ps):
    """Past postscreen (allowlisted), a client that trickles DATA in whole short lines
    would keep an smtpd process for ever with a timeout per line; with
    smtpd_per_request_deadline = yes the whole content has smtpd_timeout (3s here),
    extended by 1 s per smtpd_min_data_rate (500) bytes."""
    c = SmtpClient(ps.port, source="127.0.0.6")
    assert c.reply() == f"220 {BANNER}"
    assert c.cmd("EHLO client.example").startswith("250-")
    assert c.cmd("MAIL FROM:<a@client.example>").startswith("250")
    assert c.cmd("RCPT TO:<u@localhost>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    start = time.monotonic()
    c.sock.settimeout(0.3)
    reply = ""
    while time.monotonic() - start < 15 and not reply:
        try:
            c.send(b"x\r\n")          # a whole line every 0.3 s: 10 bytes a second
            reply = c.reply()
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            continue
    elapsed = time.monotonic() - start
    assert reply.startswith("421 4.4.2 mail.test.example Error: timeout exceeded"), reply
    assert 2.5 < elapsed < 9, elapsed           # 3 s, and some slack for a busy host
    c.close()
    wait_for(lambda: "timeout after DATA" in ps.log(), 10, what="smtpd's timeout log")
    assert any(line.startswith("timeout after DATA (") and
               line.endswith("from unknown[127.0.0.6]") for line in lines_for(ps, "127.0.0.6"))


def deep_client(ps, source: str) -> tuple[SmtpClient, int]:
    """A client of the service with the tests after the greeting, past the greet wait:
    postscreen's own engine greets it."""
    c = SmtpClient(ps.deep_port, source=source)
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    return c, c.sock.getsockname()[1]


def test_deep_tests_pass_then_the_client_is_let_through_next_time(ps):
    c, port = deep_client(ps, "127.0.0.10")
    ehlo = c.cmd("EHLO client.example")
    assert ehlo.startswith("250-mail.test.example") and "PIPELINING" not in ehlo
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.10]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert lines_for(ps, "127.0.0.10") == [
        f"CONNECT from [127.0.0.10]:{port} to [127.0.0.1]:{ps.deep_port}",
        f"NOQUEUE: reject: RCPT from [127.0.0.10]:{port}: 450 4.3.2 Service currently "
        "unavailable; from=<a@client.example>, to=<u@localhost>, proto=ESMTP, "
        "helo=<client.example>",
        f"PASS NEW [127.0.0.10]:{port}", f"DISCONNECT [127.0.0.10]:{port}"]
    c = SmtpClient(ps.deep_port, source="127.0.0.10")
    assert c.reply() == f"220 {BANNER}"            # smtpd's, at once
    port = c.sock.getsockname()[1]
    c.cmd("QUIT")
    c.close()
    assert f"PASS OLD [127.0.0.10]:{port}" in lines_for(ps, "127.0.0.10")


def test_the_cache_is_cleaned_up_in_the_event_loop(ps):
    """postscreen_cache_cleanup_interval = 2s on the deep tests' service: the walk runs
    in postscreen's event loop, logs Postfix's line, and clients are still served."""
    wait_for(lambda: "postscreen_cache_deep full cleanup: retained=" in ps.log(), 10,
             what="the cleanup line")
    c, _ = deep_client(ps, "127.0.0.23")
    c.cmd("QUIT")
    c.close()


def test_non_smtp_command_is_dropped(ps):
    c, port = deep_client(ps, "127.0.0.11")
    c.send(b"GET / HTTP/1.0\r\n")
    assert c.reply() == "521 5.7.0 Error: I can break rules, too. Goodbye."
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.11]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert f"NON-SMTP COMMAND from [127.0.0.11]:{port} after CONNECT: GET / HTTP/1.0" in \
        lines_for(ps, "127.0.0.11")


def test_pipelining_client_is_refused_at_rcpt(ps):
    c, port = deep_client(ps, "127.0.0.12")
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert c.reply().startswith("250-mail.test.example")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "550 5.5.1 Protocol error"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.12]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.12")
    assert f"COMMAND PIPELINING from [127.0.0.12]:{port} after EHLO: " \
        "MAIL FROM:<a@client.example>\\r\\n" in log
    assert not any(line.startswith("PASS") for line in log)


def test_bare_newline_is_noted_and_ignored(ps):
    c, port = deep_client(ps, "127.0.0.13")
    c.send(b"EHLO client.example\n")
    assert c.reply().startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.13]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.13")
    assert f"BARE NEWLINE from [127.0.0.13]:{port} after EHLO client.example" in log
    assert f"PASS NEW [127.0.0.13]:{port}" in log      # ignore: passed, for the least TTL


def test_reload_retires_the_old_postscreen(ps):
    """After a reload the old generation's postscreen takes no new client and exits
    once its own are done; the new one serves (and shares the cache file safely)."""
    def screens():
        return sorted(p.pid for p in ps.workers()
                      if "postscreen" in " ".join(p.cmdline() or []))
    c = SmtpClient(ps.port, source="127.0.0.6")
    assert c.reply() == f"220 {BANNER}"
    c.cmd("QUIT")
    c.close()
    before = set(screens())
    assert before
    ps.reload()
    wait_for(lambda: not before & set(screens()), 15, what="the old postscreen to exit")
    c = SmtpClient(ps.port, source="127.0.0.1")    # the cache still knows it: PASS OLD
    assert c.reply() == f"220 {BANNER}"
    port = c.sock.getsockname()[1]
    c.cmd("QUIT")
    c.close()
    assert f"PASS OLD [127.0.0.1]:{port}" in lines_for(ps, "127.0.0.1")


def test_sasl_auth_behind_postscreen(ps):
    """smtpd behind postscreen offers and checks AUTH as it does on its own port (the
    server address that postscreen passes is what the SASL backend is told)."""
    import base64
    c = SmtpClient(ps.port, source="127.0.0.6")
    assert c.reply() == f"220 {BANNER}"
    assert "250-AUTH PLAIN LOGIN" in c.cmd("EHLO client.example")
    token = base64.b64encode(b"\0alice\0secret").decode()
    assert c.cmd(f"AUTH PLAIN {token}") == "235 2.7.0 Authentication successful"
    c.cmd("QUIT")
    c.close()


def test_failed_hand_off_after_the_teaser_gets_421_at_the_first_command(ps):
    """No smtpd to hand to (smtpd_service_name names nothing): after the 220- teaser a
    bare 421 would not parse, so postscreen's engine greets, then answers 421."""
    c = SmtpClient(ps.nosmtpd_port, source="127.0.0.1")
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO client.example") == "421 4.3.2 No system resources"
    assert c.reply() == "<EOF>"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.1]:{port}" in ps.log(), 10, what="DISCONNECT")
    assert "warning: cannot connect to service private/nosuchsmtpd: No such file or " \
        "directory" in ps.log()


# --- STARTTLS in postscreen's engine ---------------------------------------------------------

def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_starttls_then_the_engine_goes_on_over_tls_to_its_rcpt_reply(ps):
    c = SmtpClient(ps.tls_port, source="127.0.0.14")
    assert c.reply() == f"220 {BANNER}"            # postscreen's engine: the deep test
    port = c.sock.getsockname()[1]
    ehlo = c.cmd("EHLO client.example").split("\n")
    assert ehlo[0] == "250-mail.test.example"
    assert "250-STARTTLS" in ehlo and ehlo.index("250-STARTTLS") == ehlo.index("250-ETRN") + 1
    assert c.cmd("STARTTLS extra") == "501 5.5.4 Syntax: STARTTLS"
    c.starttls(tls_context())
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    ehlo = c.cmd("EHLO client.example")
    assert ehlo.startswith("250-mail.test.example") and "STARTTLS" not in ehlo
    assert c.cmd("STARTTLS") == "554 5.5.1 Error: TLS already active"
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.14]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.14")
    assert log[0] == f"CONNECT from [127.0.0.14]:{port} to [127.0.0.1]:{ps.tls_port}"
    assert log[1].startswith(f"Anonymous TLS connection established from "
                             f"[127.0.0.14]:{port}: TLSv1.")
    assert log[2:] == [
        f"NOQUEUE: reject: RCPT from [127.0.0.14]:{port}: 450 4.3.2 Service currently "
        "unavailable; from=<a@client.example>, to=<u@localhost>, proto=ESMTP, "
        "helo=<client.example>",
        f"PASS NEW [127.0.0.14]:{port}", f"DISCONNECT [127.0.0.14]:{port}"]


def test_no_starttls_where_postscreen_tls_is_off(ps):
    c, port = deep_client(ps, "127.0.0.15")
    assert "STARTTLS" not in c.cmd("EHLO client.example")
    assert c.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"
    c.cmd("QUIT")
    c.close()


def test_encrypt_refuses_mail_before_starttls(ps):
    c = SmtpClient(ps.enc_port, source="127.0.0.16")
    assert c.reply() == f"220 {BANNER}"
    assert "250-STARTTLS" in c.cmd("EHLO client.example")
    must = "530 5.7.0 Must issue a STARTTLS command first"
    assert c.cmd("MAIL FROM:<a@client.example>") == must
    assert c.cmd("RCPT TO:<u@localhost>") == must
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("XYZZY") == "502 5.5.2 Error: command not recognized"
    c.starttls(tls_context())
    # TLS starts the session over: postscreen_helo_required wants a new EHLO
    assert c.cmd("MAIL FROM:<a@client.example>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    c.cmd("QUIT")
    c.close()


def test_a_bad_handshake_ends_that_client_alone(ps):
    """One client answers 220 Ready with garbage, another stalls in its handshake (the
    time limit ends it); a third, meanwhile, completes its session over TLS."""
    bad = SmtpClient(ps.enc_port, source="127.0.0.17")
    assert bad.reply() == f"220 {BANNER}"
    bad_port = bad.sock.getsockname()[1]
    stall = SmtpClient(ps.enc_port, source="127.0.0.18")
    assert stall.reply() == f"220 {BANNER}"
    stall_port = stall.sock.getsockname()[1]
    assert stall.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert bad.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    bad.send(b"this is not a ClientHello\r\n" * 4)
    closed(bad)                                     # (a TLS alert, then the end)
    bad.close()
    good = SmtpClient(ps.enc_port, source="127.0.0.19")
    assert good.reply() == f"220 {BANNER}"
    good.starttls(tls_context())
    assert c_ok(good)
    good.close()
    closed(stall)                                   # postscreen_command_time_limit = 3s
    stall.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.18]:{stall_port}" in ps.log(), 10,
             what="DISCONNECT")
    log = lines_for(ps, "127.0.0.17")
    failed = [line for line in log if line.startswith(f"SSL_accept error from "
                                                       f"[127.0.0.17]:{bad_port}: ")]
    assert failed and "timeout" not in failed[0], log
    assert any(line.startswith(f"HANGUP after ") and line.endswith(
        f" from [127.0.0.17]:{bad_port} in tests after SMTP handshake") for line in log)
    assert f"DISCONNECT [127.0.0.17]:{bad_port}" in log
    assert f"SSL_accept error from [127.0.0.18]:{stall_port}: timeout" in \
        lines_for(ps, "127.0.0.18")
    assert any(line.startswith("Anonymous TLS connection established from [127.0.0.19]:")
               for line in lines_for(ps, "127.0.0.19"))


def closed(c: SmtpClient) -> None:
    """Read until postscreen closes the connection (an EOF, or a reset for input that
    it left unread); a timeout fails."""
    try:
        while c.sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


def c_ok(c: SmtpClient) -> bool:
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("MAIL FROM:<a@client.example>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "450 4.3.2 Service currently unavailable"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    return True


def test_the_pipelining_test_goes_on_over_tls(ps):
    """Commands sent together inside TLS (one record) are seen as pipelined."""
    c = SmtpClient(ps.tls_port, source="127.0.0.20")
    assert c.reply() == f"220 {BANNER}"
    port = c.sock.getsockname()[1]
    c.starttls(tls_context())
    c.send(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert c.reply().startswith("250-mail.test.example")
    assert c.reply() == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<u@localhost>") == "550 5.5.1 Protocol error"
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"DISCONNECT [127.0.0.20]:{port}" in ps.log(), 10, what="DISCONNECT")
    log = lines_for(ps, "127.0.0.20")
    assert f"COMMAND PIPELINING from [127.0.0.20]:{port} after EHLO: " \
        "MAIL FROM:<a@client.example>\\r\\n" in log
    assert not any(line.startswith("PASS") for line in log)


@pytest.mark.skipif(not shutil.which("swaks"), reason="needs swaks")
def test_swaks_tls_through_postscreen_engine(ps):
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{ps.enc_port}", "--local-interface", "127.0.0.21",
         "--tls", "--from", "a@client.example", "--to", "u@localhost", "--helo",
         "client.example", "--timeout", "10"],
        capture_output=True, text=True, timeout=30).stdout
    assert "<-  220 2.0.0 Ready to start TLS" in out, out
    assert "=== TLS started with cipher TLSv1." in out, out
    assert "<~* 450 4.3.2 Service currently unavailable" in out, out     # ~: in TLS


def test_postscreen_tls_ticket_keys_rotate_with_a_new_generation(instance, tmp_path):
    """Every smtpd_tls_session_cache_timeout the master rebuilds postscreen's contexts
    (new ticket keys), as smtpd's, and a new postscreen takes the next clients."""
    ca = trustme.CA()
    ca.issue_cert("mail.test.example").private_key_and_cert_chain_pem.write_to_path(
        str(instance.dir / "server.pem"))
    port = free_port()
    instance.main.update({"smtpd_tls_cert_file": f"{instance.dir}/server.pem",
                          "smtpd_tls_session_cache_timeout": "2s",
                          "postscreen_tls_security_level": "may",
                          "postscreen_greet_banner": "", "postscreen_cache_map": "",
                          "postscreen_pipelining_enable": "yes", "postscreen_access_list": ""})
    instance.master_lines = [f"127.0.0.1:{port} inet n - y - 1 postscreen",
                             "smtpd pass - - y - - smtpd"]
    instance.start()

    def session() -> set[int]:
        c = SmtpClient(port)
        assert c.reply().startswith("220 ")
        c.starttls(tls_context())
        assert c_ok(c)
        c.close()
        screens = {p.pid for p in instance.workers()
                   if "postscreen" in " ".join(p.cmdline() or [])}
        assert screens
        return screens
    first = session()
    time.sleep(3)
    assert session() - first                    # a postscreen of the next key period
    assert "session ticket keys" not in instance.log()
