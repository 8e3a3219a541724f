"""Fleet caches: two postfix-py hosts share postscreen_cache_map and
smtp_tls_session_cache_database on a real memcached or redis-server. A client that
passed postscreen on one host is let through at once on the other; the second host
resumes the TLS session that the first one created, and a store that goes away costs
resumption, never mail.

One fleet per store for the module: the postscreen test runs first, since the TLS test
ends by stopping the store.
"""

import os
import time

import pytest

from fleet import Fleet
from pfxinst import SmtpClient, wait_for
from stores import MEMCACHED, REDIS

pytestmark = pytest.mark.skipif(not (MEMCACHED and REDIS),
                                reason="needs memcached and redis-server")
ROOT = os.geteuid() == 0                # postscreen runs chrooted, as in test_postscreen.py
BANNER = "mail.test.example ESMTP postfix-py"


@pytest.fixture(scope="module", params=["memcache", "redis"])
def fleet(request):
    with Fleet(request.param, postscreen=ROOT) as f:
        yield f


@pytest.mark.skipif(not ROOT, reason="needs root (postscreen's chroot)")
def test_a_client_passed_by_one_hosts_postscreen_is_pass_old_on_the_other(fleet):
    one, two = fleet.hosts
    c = SmtpClient(one.ps_port, source="127.0.0.1")
    start = time.monotonic()
    assert c.reply() == f"220-{BANNER}\n220 {BANNER}"          # the teaser, then smtpd's
    assert time.monotonic() - start >= 0.9                      # the greet wait
    port = c.sock.getsockname()[1]
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"PASS NEW [127.0.0.1]:{port}" in one.log(), 10, what="PASS NEW")
    c = SmtpClient(two.ps_port, source="127.0.0.1")            # its first visit to host 2
    start = time.monotonic()
    assert c.reply() == f"220 {BANNER}"                         # smtpd's, at once
    assert time.monotonic() - start < 0.9
    port = c.sock.getsockname()[1]
    c.cmd("QUIT")
    c.close()
    wait_for(lambda: f"PASS OLD [127.0.0.1]:{port}" in two.log(), 10, what="PASS OLD")
    log = one.log() + two.log()
    assert "PASS NEW" not in two.log() and "warning" not in log, log
    assert "full cleanup" not in log                            # a store is not walked


def test_second_host_resumes_the_first_hosts_session(fleet):
    f, kind = fleet, fleet.kind
    f.send(0)
    f.wait_delivered(1)
    assert f.handshakes() == (1, 0)
    f.send(1)                       # the other host: its own tlsmgr, the shared store
    f.wait_delivered(2)
    assert f.handshakes() == (1, 1)
    log1 = f.hosts[1].log()
    assert "TLS connection established to 127.0.0.1" in log1
    f.store.stop()
    f.send(1, 2)
    f.send(0)
    f.wait_delivered(5)             # no mail lost while the store is down
    assert sum(f.handshakes()) == 5
    warned = f.hosts[0].log() + f.hosts[1].log()
    assert f"{kind} server inet:127.0.0.1:" in warned and "using the backup" in warned
    assert "status=sent" in f.hosts[1].log() and "status=deferred" not in warned
