"""The address verify cache shared by a fleet: two postfix-py hosts with
address_verify_map on one real memcached or redis-server (key_format verify:%s, a backup
LMDB file in each host's data_directory). A probe that one host sends answers the other
host's smtpd at once, without a probe of its own. The store going away costs the shared
answers, never mail: each host answers from its backup or a probe of its own, and
sharing resumes when the store is back.
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from pfxinst import Instance, SmtpClient, free_port, wait_for
from sink import Sink
from stores import MEMCACHED, REDIS, Memcached, Redis

pytestmark = pytest.mark.skipif(not (MEMCACHED and REDIS),
                                reason="needs memcached and redis-server")


fleet_store: dict = {}      # kind -> the store of the fleet fixture (stopped by a test)


@pytest.fixture(scope="module", params=["memcache", "redis"])
def fleet(request):
    kind = request.param
    root = Path(tempfile.mkdtemp(prefix="pfx-vfleet-", dir="/tmp"))
    os.chmod(root, 0o755)
    store = Memcached() if kind == "memcache" else Redis(root)
    fleet_store[kind] = store
    sink = Sink()
    hosts = []
    chroot = "y" if os.geteuid() == 0 else "n"
    try:
        store.start()
        for i in range(2):
            d = root / f"host{i}"
            d.mkdir()
            os.chmod(d, 0o755)
            inst = Instance(d)
            (d / "verify.cf").write_text(
                f"{kind} = inet:127.0.0.1:{store.port}\n"
                f"backup = btree:{inst.main['data_directory']}/verify_cache\n"
                "key_format = verify:%s\nttl = 3600\ntimeout = 1\n"
                "store_down_pause = 1\n")
            inst.port = free_port()
            inst.main.update({
                "mydestination": "localhost", "relay_domains": "remote.example",
                "relayhost": f"[127.0.0.1]:{sink.port}", "smtpd_error_sleep_time": "0s",
                "smtpd_recipient_restrictions": "reject_unauth_destination, "
                                                "reject_unverified_recipient",
                "unverified_recipient_reject_code": "550",
                "address_verify_poll_count": "1",
                "address_verify_map": f"{kind}:{d}/verify.cf",
            })
            inst.master_lines = [
                f"127.0.0.1:{inst.port} inet n - {chroot} - - smtpd",
                "qmgr unix n - n 300 1 qmgr",
                f"verify unix - - {chroot} - 1 verify",
                f"relay unix - - {chroot} - - smtp",
            ]
            hosts.append(inst)
        for inst in hosts:
            inst.start()
        for inst in hosts:
            wait_for(lambda: (inst.queue / "private" / "verify").exists(),
                     what="private/verify")
        yield hosts, sink, kind
    finally:
        for inst in hosts:
            inst.cleanup()
        sink.stop()
        store.stop()
        shutil.rmtree(root, ignore_errors=True)


def rcpt(port: int, address: str, data: bool = False) -> str:
    c = SmtpClient(port, timeout=30)
    try:
        assert c.reply().startswith("220")
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
        if data and reply.startswith("250"):
            assert c.cmd("DATA").startswith("354")
            reply = c.cmd("Subject: outage\r\n\r\nhello\r\n.")
        c.cmd("QUIT")
        return reply
    finally:
        c.close()


def probe_lines(inst) -> list[str]:
    return [l for l in inst.log().splitlines()
            if "status=deliverable" in l or "status=undeliverable" in l]


@pytest.mark.parametrize("local, result", [("gone.{kind}+bounce", "undeliverable"),
                                           ("here.{kind}", "deliverable")],
                         ids=["undeliverable", "deliverable"])
def test_second_host_answers_from_the_first_hosts_probe(fleet, local, result):
    (one, two), sink, kind = fleet
    a = local.format(kind=kind) + "@remote.example"     # its own address in each store
    assert rcpt(one.port, a) == (f"450 4.1.1 <{a}>: Recipient address rejected: "
                                 "unverified address: Address verification in progress")
    wait_for(lambda: any(f"to=<{a}>" in l and f"status={result} " in l
                         for l in probe_lines(one)), 20, what=f"host 1's probe: {result}")
    connections = sink.connections
    reply = rcpt(two.port, a)
    if result == "deliverable":
        assert reply == "250 2.1.5 Ok"
    else:
        assert reply.startswith(f"550 5.1.1 <{a}>: Recipient address rejected: undeliverable "
                                "address: host 127.0.0.1[127.0.0.1] said: 550 5.1.1 ")
    assert not any(f"to=<{a}>" in l for l in probe_lines(two))       # no probe of its own
    assert "queue active" not in two.log() and sink.connections == connections
    assert not sink.messages and "warning" not in one.log() + two.log()


def probed(inst, a: str) -> None:
    wait_for(lambda: any(f"to=<{a}>" in l and "status=deliverable " in l
                         for l in probe_lines(inst)), 20, what=f"the probe of {a}")


def test_the_store_going_away_costs_sharing_never_mail(fleet):
    (one, two), sink, kind = fleet
    store = fleet_store[kind]
    before, during, after = (f"{w}.{kind}@remote.example" for w in ("before", "during", "after"))
    IN_PROGRESS = "unverified address: Address verification in progress"
    # shared while the store is up
    assert IN_PROGRESS in rcpt(one.port, before)
    probed(one, before)
    assert rcpt(two.port, before) == "250 2.1.5 Ok"
    store.stop()
    try:
        # host 1 answers from its backup; host 2, which had the answer from the store
        # alone, probes for itself; a new address is probed as without a store
        assert rcpt(one.port, before) == "250 2.1.5 Ok"
        assert IN_PROGRESS in rcpt(two.port, before)
        probed(two, before)
        assert rcpt(two.port, before) == "250 2.1.5 Ok"
        assert IN_PROGRESS in rcpt(one.port, during)
        probed(one, during)
        assert rcpt(one.port, during, data=True).startswith("250 2.0.0 Ok: queued as ")
        wait_for(lambda: any(r == [during] for _, r, _ in sink.messages), 20,
                 what="the message sent during the outage")
    finally:
        store.start()           # the same port
    for inst in (one, two):
        log = inst.log()
        assert "Traceback" not in log and "fatal" not in log and "panic" not in log
    assert f"{kind}:{one.dir}/verify.cf: {kind} server inet:127.0.0.1:{store.port}: " \
        in one.log() and "-- using the backup for 1s" in one.log()
    # sharing resumes once the store is back (after store_down_pause)
    time.sleep(1.1)
    assert IN_PROGRESS in rcpt(one.port, after)
    probed(one, after)
    assert rcpt(two.port, after) == "250 2.1.5 Ok"
    assert not any(f"to=<{after}>" in l for l in probe_lines(two))
