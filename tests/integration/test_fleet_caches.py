"""Fleet caches: two postfix-py hosts share smtp_tls_session_cache_database on a real
memcached or redis-server; the second host resumes the TLS session that the first one
created, and a store that goes away costs resumption, never mail."""

import pytest

from fleet import Fleet
from stores import MEMCACHED, REDIS


@pytest.mark.skipif(not (MEMCACHED and REDIS), reason="needs memcached and redis-server")
@pytest.mark.parametrize("kind", ["memcache", "redis"])
def test_second_host_resumes_the_first_hosts_session(kind):
    with Fleet(kind) as f:
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
