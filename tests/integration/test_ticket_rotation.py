"""Session ticket keys rotate every smtpd_tls_session_cache_timeout (issue 17 part 7), and
a ticket issued before a rotation, by any smtpd worker, still resumes after it.

The client is pyOpenSSL, so that the test can read the key name inside each ticket
(lib/tls.ticket_key_name): that is how it sees a rotation happen."""

import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme
from OpenSSL import SSL

from pfxinst import free_port, wait_for
from postfix_py.lib import tls as T
from postfix_py.lib import tls_session

PERIOD = 6          # smtpd_tls_session_cache_timeout, seconds


def _io(conn, fn, *args):
    """fn(*args) on a pyOpenSSL connection over a socket with a timeout (non-blocking)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return fn(*args)
        except (SSL.WantReadError, SSL.WantWriteError):
            if time.monotonic() > deadline:
                raise TimeoutError(fn.__name__) from None
            select.select([conn], [], [], 0.2)


def _reply(conn) -> bytes:
    data = b""
    while True:
        chunk = _io(conn, conn.recv, 4096) if isinstance(conn, SSL.Connection) else conn.recv(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


def client_context(version=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    if version:
        ctx.set_max_proto_version(version)
    return ctx


def starttls(port: int, ctx: SSL.Context, session=None):
    """One STARTTLS session: (reused, session, ticket key name, smtpd pid in the banner)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        _reply(sock)
        sock.sendall(b"EHLO client.example\r\n")
        _reply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert _reply(sock).startswith(b"220")
        conn = SSL.Connection(ctx, sock)
        if session is not None:
            conn.set_session(session)
        conn.set_connect_state()
        _io(conn, conn.do_handshake)
        _io(conn, conn.sendall, b"EHLO client.example\r\n")     # TLS 1.3: the ticket comes with this
        _reply(conn)
        reused = tls_session.session_reused(conn)
        new = conn.get_session()
        _io(conn, conn.sendall, b"QUIT\r\n")
        _reply(conn)
        try:
            conn.shutdown()
        except SSL.Error:
            pass
        return reused, new, T.ticket_key_name(new)
    finally:
        sock.close()


@pytest.fixture
def rotating(instance, tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(d / "s.pem"))
    d.chmod(0o755)
    instance.port = free_port()
    instance.main.update({
        "smtpd_tls_cert_file": str(d / "s.pem"),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_session_cache_timeout": f"{PERIOD}s",
    })
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd"]
    instance.start()
    return instance


def test_tickets_resume_across_a_key_rotation_on_every_worker(rotating):
    port = rotating.port
    ctx = client_context()
    by_version = {v: client_context(v) for v in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION)}

    # A rotation is seen as a fresh ticket under a new key name.
    first = starttls(port, ctx)[2]
    assert first is not None
    wait_for(lambda: starttls(port, ctx)[2] != first, timeout=PERIOD * 3,
             interval=0.1, what="the first key rotation")
    period1 = starttls(port, ctx)[2]
    # A session lives smtpd_tls_session_cache_timeout from its issue, so the tickets that
    # cross a rotation are those of the end of a period: issue them there.
    time.sleep(PERIOD / 2)

    # A hundred clients, five at a time, TLS 1.2 and 1.3: several smtpd workers issue tickets.
    versions = [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION] * 50
    with ThreadPoolExecutor(5) as pool:
        issued = list(pool.map(lambda v: (v, starttls(port, by_version[v])), versions))
    assert all(name == period1 for _, (_, _, name) in issued), "issued across a rotation"

    wait_for(lambda: starttls(port, ctx)[2] not in (period1, None), timeout=PERIOD * 3,
             interval=0.1, what="the second key rotation")
    # Every worker now serving is of the new key period: its own tickets are new...
    reused, _, name = starttls(port, ctx)
    assert not reused and name != period1
    # ...and it still takes the tickets of the period before.
    with ThreadPoolExecutor(5) as pool:
        again = list(pool.map(lambda item: starttls(port, by_version[item[0]],
                                                    session=item[1][1]), issued))
    resumed = sum(1 for r, _, _ in again if r)
    assert resumed >= 99, f"{resumed}/100 resumed across the rotation (issue 17: 99%)"
    # Resumed under the old key, a client gets a fresh ticket of the old period or the
    # new one; either resumes until that key is dropped.
    workers = {line.split("smtpd[")[1].split("]")[0] for line in rotating.log().splitlines()
               if "postfix-py/smtpd[" in line and "connect from" in line}
    assert len(workers) >= 3, workers

