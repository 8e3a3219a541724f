"""The address verify cache shared by a fleet: two postfix-py hosts with
address_verify_map on one real memcached or redis-server (key_format verify:%s, a backup
LMDB file in each host's data_directory). A probe that one host sends answers the other
host's smtpd at once, without a probe of its own.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pfxinst import Instance, SmtpClient, free_port, wait_for
from sink import Sink
from stores import MEMCACHED, REDIS, Memcached, Redis

pytestmark = pytest.mark.skipif(not (MEMCACHED and REDIS),
                                reason="needs memcached and redis-server")


@pytest.fixture(scope="module", params=["memcache", "redis"])
def fleet(request):
    kind = request.param
    root = Path(tempfile.mkdtemp(prefix="pfx-vfleet-", dir="/tmp"))
    os.chmod(root, 0o755)
    store = Memcached() if kind == "memcache" else Redis(root)
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
                "key_format = verify:%s\nttl = 3600\ntimeout = 1\n")
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


def rcpt(port: int, address: str) -> str:
    c = SmtpClient(port, timeout=30)
    try:
        assert c.reply().startswith("220")
        c.cmd("EHLO client.example")
        assert c.cmd("MAIL FROM:<>").startswith("250")
        reply = c.cmd(f"RCPT TO:<{address}>")
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
