"""Two postfix-py instances ("two hosts") that share a TLS session cache on a real store.

    with Fleet("memcache") as f:        # or "redis"
        f.send(0, 3)                    # 3 messages through host 0 (plain SMTP in)
        f.wait_delivered(3)
        f.sink.full, f.sink.resumed     # handshakes the destination saw
        f.store.stop()                  # the store goes away

Both instances relay everything to one TLS destination (tests/tls_sink.py, which counts
full and resumed handshakes) with smtp_tls_security_level = encrypt and
smtp_tls_session_cache_database = KIND:DIR/store.cf (memcache_table(5) shape: the shared
server, ttl, and a backup LMDB file of the host's own). smtp and tlsmgr run chrooted when
the tests run as root. Everything is ended by pid at exit; the directories are removed.

    with Fleet("redis", postscreen=True) as f:
        f.hosts[0].ps_port              # postscreen, in front of an smtpd pass service

With postscreen=True each host also runs postscreen (chrooted when root) on ps_port with
postscreen_cache_map = KIND:DIR/postscreen.cf (the same store, key_format postscreen:%s,
a backup in the host's data_directory, which mail_owner may write), an empty
postscreen_access_list and a greet wait of 1s: a client passes the pregreet test on one host, and the other finds it in the store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from peers import make_cert
from pfxinst import Instance, SmtpClient, free_port, wait_for
from stores import Memcached, Redis
from tls_sink import TlsSink


def _each(instances, method) -> None:
    """method(instance) for every instance at once, in threads; the first error raised."""
    errors = []

    def run(inst):
        try:
            method(inst)
        except BaseException as exc:        # noqa: BLE001 - re-raised below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class Fleet:
    def __init__(self, kind: str, hosts: int = 2, postscreen: bool = False):
        self.kind = kind
        self.postscreen = postscreen
        self.root = Path(tempfile.mkdtemp(prefix="pfx-fleet-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.store = Memcached() if kind == "memcache" else Redis(self.root)
        self.sink = None
        self.hosts: list[Instance] = []
        self.count = hosts

    def __enter__(self) -> "Fleet":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.store.start()
        self.sink = TlsSink(str(make_cert(self.root)))
        chroot = "y" if os.geteuid() == 0 else "n"
        for i in range(self.count):
            d = self.root / f"host{i}"
            d.mkdir()
            os.chmod(d, 0o755)
            (d / "store.cf").write_text(
                f"{self.kind} = inet:127.0.0.1:{self.store.port}\n"
                f"backup = lmdb:{d}/store_backup\nttl = 3600\ntimeout = 1\n")
            inst = Instance(d)
            inst.port = free_port()
            inst.main.update({
                "relayhost": f"[127.0.0.1]:{self.sink.port}", "mydestination": "localhost",
                "smtp_tls_security_level": "encrypt", "smtp_tls_loglevel": "1",
                "smtp_tls_session_cache_database": f"{self.kind}:{d}/store.cf",
            })
            inst.master_lines = [
                f"127.0.0.1:{inst.port} inet n - n - - smtpd",
                "qmgr unix n - n 300 1 qmgr",
                f"smtp unix - - {chroot} - - smtp",
                f"tlsmgr unix - - {chroot} 1000? 1 tlsmgr",
            ]
            if self.postscreen:
                self._add_postscreen(inst, d, chroot)
            self.hosts.append(inst)
        _each(self.hosts, Instance.start)          # the hosts start side by side

    def _add_postscreen(self, inst: Instance, d: Path, chroot: str) -> None:
        (d / "postscreen.cf").write_text(
            f"{self.kind} = inet:127.0.0.1:{self.store.port}\n"
            f"backup = btree:{inst.main['data_directory']}/postscreen_cache\n"
            "key_format = postscreen:%s\nttl = 3600\ntimeout = 1\n")
        inst.ps_port = free_port()
        inst.main.update({"postscreen_cache_map": f"{self.kind}:{d}/postscreen.cf",
                          "postscreen_greet_wait": "1s"})
        # no postscreen_access_list: 127.0.0.1 is in mynetworks (which the relay needs)
        inst.master_lines += [f"127.0.0.1:{inst.ps_port} inet n - {chroot} - 1 postscreen"
                              " -o postscreen_access_list=",
                              f"smtpd pass - - {chroot} - - smtpd"]

    def send(self, host: int, n: int = 1) -> None:
        """n messages into one host, one SMTP session each (they relay to the sink)."""
        for _ in range(n):
            c = SmtpClient(self.hosts[host].port, timeout=30)
            try:
                assert c.reply().startswith("220")
                c.cmd("EHLO client.example")
                assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
                assert c.cmd("RCPT TO:<bob@remote.example>").startswith("250")
                assert c.cmd("DATA").startswith("354")
                assert c.cmd("Subject: fleet\r\n\r\nhello\r\n.").startswith("250")
                c.cmd("QUIT")
            finally:
                c.close()

    def wait_delivered(self, total: int, timeout: float = 60) -> None:
        wait_for(lambda: self.sink.messages >= total, timeout=timeout,
                 what=f"{total} messages at the destination")

    def handshakes(self) -> tuple[int, int]:
        return self.sink.full, self.sink.resumed

    def stop(self) -> None:
        _each(self.hosts, Instance.cleanup)
        if self.sink is not None:
            self.sink.stop()
        self.store.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def resumption_run(kind: str, messages: int) -> dict:
    """The measure of bench/fleet_resumption.py: messages alternate between the two hosts,
    one at a time; then the store is stopped and as many go again. Returns the counts of
    handshakes at the destination for each phase."""
    out = {"store": kind, "messages": messages}
    with Fleet(kind) as f:
        for i in range(messages):
            f.send(i % 2)
            f.wait_delivered(i + 1)
        full, resumed = f.handshakes()
        out.update(shared_full=full, shared_resumed=resumed)
        f.store.stop()
        time.sleep(0.2)
        for i in range(messages):
            f.send(i % 2)
            f.wait_delivered(messages + i + 1)
        full2, resumed2 = f.handshakes()
        out.update(down_full=full2 - full, down_resumed=resumed2 - resumed,
                   delivered=f.sink.messages)
    return out
