"""check_policy_service through the real master and smtpd, against real policy servers:
Debian's postgrey (greylisting, over inet:) and postfix-policyd-spf-python (SPF, over a
unix: socket in the chroot jail, run per connection as Postfix's spawn(8) would), and a
server that is down (Postfix's warnings, then smtpd_policy_service_default_action).

policyd-spf asks the system resolver (pyspf and dnspython read /etc/resolv.conf; neither
its configuration file nor the environment names another nameserver), so it runs in a
network namespace of its own, whose /etc/netns/NAME/resolv.conf names a private dnsmasq
on that namespace's loopback. smtpd reaches it through the filesystem: a unix socket is
not bound to a network namespace.
"""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peers import DNSMASQ, Dnsmasq
from pfxinst import PROGRAMS, SmtpClient, free_port, wait_for
from policyserver import PolicyServer

POSTGREY = shutil.which("postgrey", path="/usr/sbin:/usr/bin")
POLICYD_SPF = shutil.which("policyd-spf", path="/usr/bin:/usr/sbin")
IP = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin")
ROOT = os.geteuid() == 0


@pytest.fixture
def mta(instance):
    """An instance with one chrooted smtpd; .port, .queued()."""
    return instance.add_smtpd(smtpd_policy_service_retry_delay="1s")


def rcpt_attempt(port: int, sender: str, rcpt: str, helo: str = "client.test",
                 data: bool = False) -> str:
    """One session up to RCPT (and the message when data and RCPT was accepted)."""
    c = SmtpClient(port)
    try:
        assert c.reply().startswith("220")
        assert c.cmd(f"EHLO {helo}").startswith("250")
        assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{rcpt}>")
        if data and reply.startswith("250"):
            assert c.cmd("DATA").startswith("354")
            reply = c.cmd("Subject: policy\r\n\r\nhello\r\n.")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started, by its pid: SIGTERM, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not POSTGREY or not ROOT, reason="needs postgrey and root")
def test_postgrey_greylists_then_accepts_the_retry(mta, tmp_path):
    dbdir = mta.dir / "postgrey"        # nobody reaches it (tmp_path is 0700)
    dbdir.mkdir()
    shutil.chown(dbdir, "nobody", "nogroup")
    empty = tmp_path / "empty"
    empty.write_text("")
    port = free_port()
    log = open(tmp_path / "postgrey.log", "w")
    proc = subprocess.Popen(
        [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", "--delay=1",
         "--user=nobody", "--group=nogroup", f"--whitelist-clients={empty}",
         f"--whitelist-recipients={empty}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(port), 20, interval=0.2, what="postgrey")
        mta.main["smtpd_recipient_restrictions"] = \
            f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{port}"
        mta.start()
        rcpt = "bob@mail.test.example"
        first = rcpt_attempt(mta.port, "alice@example.org", rcpt)
        assert first == (f"450 4.2.0 <{rcpt}>: Recipient address rejected: Greylisted, see "
                         "http://postgrey.schweikert.ch/help/mail.test.example.html")
        assert (f"NOQUEUE: reject: RCPT from localhost[127.0.0.1]: {first}; "
                f"from=<alice@example.org> to=<{rcpt}> proto=ESMTP helo=<client.test>") \
            in mta.log()
        time.sleep(2.2)         # past --delay
        reply = rcpt_attempt(mta.port, "alice@example.org", rcpt, data=True)
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        (m, content), = mta.queued(text=True)
        # postgrey's PREPEND, above smtpd's own Received: header
        assert content.startswith("X-Greylist: delayed ")
        assert "by postgrey-" in content.splitlines()[0]
        assert content.splitlines()[1].startswith("Received: from client.test")
        assert "warning" not in mta.log()
        pg = (tmp_path / "postgrey.log").read_text()
        assert "action=greylist, reason=new" in pg and "action=pass, reason=triplet found" in pg
    finally:
        stop(proc)
        log.close()


def test_server_down_warns_and_applies_the_default_action(mta):
    port = free_port()                  # nobody listens there
    mta.main["smtpd_recipient_restrictions"] = \
        f"reject_unauth_destination, check_policy_service inet:127.0.0.1:{port}"
    mta.start()
    rcpt = "bob@mail.test.example"
    assert rcpt_attempt(mta.port, "alice@example.org", rcpt) == \
        f"451 4.3.5 <{rcpt}>: Recipient address rejected: Server configuration problem"
    log = mta.log()
    assert log.count(f"warning: connect to 127.0.0.1:{port}: Connection refused") == 2
    assert log.count(f"warning: problem talking to server 127.0.0.1:{port}: "
                     "Connection refused") == 2
    # a default action of the administrator's
    mta.main["smtpd_policy_service_default_action"] = "DUNNO"
    mta.main["smtpd_policy_service_try_limit"] = "1"
    mta.reload()
    wait_for(lambda: "reload" in mta.log(), 10, what="reload")
    assert rcpt_attempt(mta.port, "alice@example.org", rcpt, data=True).startswith(
        "250 2.0.0 Ok: queued as ")


def recorder():
    """A policy server that records each request and answers DUNNO (PREPEND at RCPT)."""
    return PolicyServer(lambda a: ["action=PREPEND X-Policy: seen"
                                   if a["protocol_state"] == "RCPT" else "action=DUNNO"])


def test_every_stage_asks_with_the_session_attributes(mta):
    server = recorder()
    try:
        policy = f"check_policy_service inet:127.0.0.1:{server.port}"
        mta.main.update({"smtpd_delay_reject": "no",
                         "smtpd_client_restrictions": policy,
                         "smtpd_helo_restrictions": policy,
                         "smtpd_sender_restrictions": policy,
                         "smtpd_recipient_restrictions": f"reject_unauth_destination, {policy}",
                         "smtpd_data_restrictions": policy,
                         "smtpd_end_of_data_restrictions": policy,
                         "smtpd_policy_service_policy_context": "test-ctx"})
        # one smtpd process for both sessions: its policy connection is kept
        mta.master_lines = [f"127.0.0.1:{mta.port} inet n - y - 1 smtpd"]
        mta.start()
        rcpt = "bob@mail.test.example"
        for _ in range(2):
            reply = rcpt_attempt(mta.port, "alice@example.org", rcpt, data=True)
            assert reply.startswith("250 2.0.0 Ok: queued as ")
        queued = mta.queued(text=True)
        assert len(queued) == 2
        reqs = server.requests
        assert [r["protocol_state"] for r in reqs] == \
            ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"] * 2
        first, second = reqs[:6], reqs[6:]
        for req in reqs:
            assert req["request"] == "smtpd_access_policy"
            assert (req["client_address"], req["client_name"]) == ("127.0.0.1", "localhost")
            assert req["server_address"] == "127.0.0.1"
            assert req["server_port"] == str(mta.port) and req["client_port"].isdigit()
            assert req["policy_context"] == "test-ctx" and req["mail_version"]
        assert first[0]["helo_name"] == "" and first[1]["helo_name"] == "client.test"
        assert first[2]["sender"] == "alice@example.org" and first[2]["recipient"] == ""
        assert first[3]["recipient"] == rcpt and first[3]["recipient_count"] == "0"
        assert first[4]["recipient_count"] == "1" and first[5]["recipient_count"] == "1"
        assert first[3]["protocol_name"] == "ESMTP"
        # one instance per message, from RCPT to the end of data; a new one for the next
        assert first[2]["instance"] == ""
        assert first[3]["instance"] == first[4]["instance"] == first[5]["instance"] != ""
        assert second[3]["instance"] == second[5]["instance"] != first[3]["instance"]
        ids = {m.queue_id for m, _ in queued}
        assert first[4]["queue_id"] in ids and first[5]["queue_id"] == first[4]["queue_id"]
        assert int(first[5]["size"]) > 0
        # the PREPEND of RCPT time, above Received:
        assert all(content.startswith("X-Policy: seen\nReceived: ") for _, content in queued)
        assert server.connections == 1
    finally:
        server.close()


@pytest.fixture
def spf_namespace(tmp_path):
    """A network namespace with its own resolv.conf and dnsmasq: fail.test and pass.test
    publish SPF records; yields the namespace's name."""
    name = f"pfxpy-spf-{os.getpid()}"
    netns_etc = Path("/etc/netns") / name
    if subprocess.run([IP, "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here")
    procs = []
    dns = None
    try:
        netns_etc.mkdir(parents=True)
        (netns_etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"], check=True)
        dns = Dnsmasq(["--txt-record=fail.test,v=spf1 ip4:192.0.2.1 -all",
                       "--txt-record=pass.test,v=spf1 ip4:127.0.0.1 -all"],
                      tmp_path / "dnsmasq.log", port=53, prefix=(IP, "netns", "exec", name))
        wait_for(lambda: subprocess.run(
            [IP, "netns", "exec", name, sys.executable, "-c",
             "import dns.resolver; dns.resolver.resolve('pass.test', 'TXT')"],
            capture_output=True).returncode == 0, 10, interval=0.2, what="dnsmasq")
        yield name, procs
    finally:
        for proc, log in procs:
            stop(proc)
            log.close()
        if dns is not None:
            dns.close()
        subprocess.run([IP, "netns", "del", name], capture_output=True)
        shutil.rmtree(netns_etc, ignore_errors=True)


@pytest.mark.skipif(not (POLICYD_SPF and DNSMASQ and IP and ROOT),
                    reason="needs policyd-spf, dnsmasq, ip and root")
def test_policyd_spf_over_a_unix_socket_in_the_jail(mta, spf_namespace, tmp_path):
    name, procs = spf_namespace
    conf = tmp_path / "policyd-spf.conf"
    # As Debian's file, but 127.0.0.1 (the tests' only client) is not skipped.
    conf.write_text("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\n"
                    "Mail_From_reject = Fail\nskip_addresses = 192.0.2.255/32\n"
                    "Lookup_Time = 5\n")
    mta.main["smtpd_recipient_restrictions"] = \
        "reject_unauth_destination, check_policy_service unix:private/spf-policy"
    mta.start()
    sock = mta.queue / "private" / "spf-policy"       # the jail's private/spf-policy
    log = open(tmp_path / "spawn.log", "w")
    procs.append((subprocess.Popen(
        [IP, "netns", "exec", name, sys.executable, f"{PROGRAMS}/policy_spawn.py",
         str(sock), POLICYD_SPF, str(conf)], stdout=log, stderr=subprocess.STDOUT), log))
    wait_for(sock.exists, 10, what="the policy socket")
    rcpt = "bob@mail.test.example"
    assert rcpt_attempt(mta.port, "alice@fail.test", rcpt) == (
        f"550 5.7.23 <{rcpt}>: Recipient address rejected: Message rejected due to: SPF "
        "fail - not authorized. Please see http://www.openspf.net/Why?s=mfrom;"
        "id=alice@fail.test;ip=127.0.0.1;r=mail.test.example")
    reply = rcpt_attempt(mta.port, "alice@pass.test", rcpt, data=True)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    (m, content), = mta.queued(text=True)
    assert content.startswith(
        "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=127.0.0.1; "
        "helo=client.test; envelope-from=alice@pass.test; receiver=mail.test.example\n"
        "Received: ")
    assert "warning" not in mta.log()


# A policy server for one client on stdin and stdout, as spawn(8) runs them: it answers
# each request with the uid it runs as, and sleeps through its time limit for one sender.
SPAWNED = """\
import os, sys, time
attrs = {}
for line in sys.stdin:
    if line != "\\n":
        key, _, value = line.rstrip("\\n").partition("=")
        attrs[key] = value
        continue
    if attrs.get("sender") == "sleepy@example.org":
        time.sleep(60)
    print(f"action=REJECT uid {os.getuid()} for {attrs.get('recipient')}\\n", flush=True)
    attrs = {}
"""


@pytest.mark.skipif(not ROOT, reason="needs root (spawn's user=)")
def test_spawn_runs_a_policy_server_per_connection_as_its_user(mta):
    script = mta.dir / "spawned_policy.py"
    script.write_text(SPAWNED)
    script.chmod(0o644)
    mta.main["smtpd_recipient_restrictions"] = \
        "reject_unauth_destination, check_policy_service unix:private/policy"
    mta.main["smtpd_policy_service_try_limit"] = "1"
    mta.master_lines.append(
        "policy unix - n n - 0 spawn -o policy_time_limit=2s"
        f" user=daemon argv=/usr/bin/python3 {script}")
    mta.start()
    rcpt = "bob@mail.test.example"
    uid = pwd.getpwnam("daemon").pw_uid
    assert rcpt_attempt(mta.port, "alice@example.org", rcpt) == \
        f"554 5.7.1 <{rcpt}>: Recipient address rejected: uid {uid} for {rcpt}"
    # policy_time_limit: the command is killed, smtpd applies the default action
    start = time.monotonic()
    assert rcpt_attempt(mta.port, "sleepy@example.org", rcpt) == \
        f"451 4.3.5 <{rcpt}>: Recipient address rejected: Server configuration problem"
    assert time.monotonic() - start < 20
    wait_for(lambda: "killed by signal 9" in mta.log(), 10, what="spawn's warning")
    log = mta.log()
    assert "warning: /usr/bin/python3: process id " in log
    assert ": command time limit exceeded" in log
    assert "warning: command /usr/bin/python3 killed by signal 9" in log

