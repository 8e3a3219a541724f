"""The TLS parameters of issue 13 against a running smtpd, with openssl s_client:

* smtpd_tls_protocols = >=TLSv1 (the default) serves TLS 1.0 to 1.3, as Debian's Postfix 3.7
  on the same host does, and a narrower list refuses what it leaves out;
* server resumption is by ticket only: a TLS 1.2 client with -no_ticket is never resumed,
  with tickets it is; `postfix-py check` and `tlsmgr status` say so when
  smtpd_tls_session_cache_database is set;
* tls_fast_shutdown_enable = no makes smtpd wait for the client's close_notify.
"""

import json
import os
import shutil
import socket
import ssl
import subprocess
import time

import pytest
import trustme

from helpers import TLSMGR
from pfxinst import free_port, wait_for

OPENSSL = shutil.which("openssl")
ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not OPENSSL, reason="openssl is not installed")

CACHE_WARNING = ("smtpd_tls_session_cache_database is set but postfix-py resumes TLS server "
                 "sessions with session tickets only; clients without ticket support are "
                 "not resumed")


@pytest.fixture
def tlsmta(instance, tmp_path):
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    instance.port = free_port()
    instance.main.update({
        "mydestination": "localhost",
        "smtpd_tls_cert_file": str(pem),
        "smtpd_tls_security_level": "may",
    })
    instance.master_lines = [f"127.0.0.1:{instance.port} inet n - y - - smtpd"]
    return instance


def s_client(port, *args, session_out=None, session_in=None):
    """One openssl s_client STARTTLS session: (protocol or None, reused)."""
    argv = [OPENSSL, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
            "-cipher", "DEFAULT:@SECLEVEL=0", *args]
    if session_out:
        argv += ["-sess_out", str(session_out)]
    if session_in:
        argv += ["-sess_in", str(session_in)]
    out = subprocess.run(argv, input="QUIT\n", capture_output=True, text=True, timeout=30)
    protocol = None
    for line in out.stdout.splitlines():
        if line.startswith(("New, TLSv1.3,", "Reused, TLSv1.3,")) and protocol is None:
            # s_client may end before it prints a TLS 1.3 session (the ticket comes later).
            protocol = "TLSv1.3"
        if line.strip().startswith("Protocol  :"):
            # The New/Reused line names the cipher's version (TLSv1.0 for a TLS 1.1 session).
            protocol = line.split(":", 1)[1].strip()
    ok = "Cipher is (NONE)" not in out.stdout and protocol is not None
    return (protocol if ok else None), "\nReused, " in out.stdout


def test_default_protocols_are_all_served(tlsmta):
    tlsmta.start()
    served = {flag: s_client(tlsmta.port, flag)[0]
              for flag in ("-tls1", "-tls1_1", "-tls1_2", "-tls1_3")}
    assert served == {"-tls1": "TLSv1", "-tls1_1": "TLSv1.1", "-tls1_2": "TLSv1.2",
                      "-tls1_3": "TLSv1.3"}


def test_a_narrower_protocol_list_refuses_the_rest(tlsmta):
    tlsmta.main["smtpd_tls_protocols"] = "!SSLv2, !SSLv3, !TLSv1, !TLSv1.3"
    tlsmta.start()
    served = {flag: s_client(tlsmta.port, flag)[0]
              for flag in ("-tls1", "-tls1_1", "-tls1_2", "-tls1_3")}
    assert served == {"-tls1": None, "-tls1_1": "TLSv1.1", "-tls1_2": "TLSv1.2",
                      "-tls1_3": None}


@pytest.mark.parametrize("tickets,resumed", [(True, True), (False, False)])
def test_tls12_resumption_is_by_ticket_only(tlsmta, tmp_path, tickets, resumed):
    tlsmta.main["smtpd_tls_session_cache_database"] = "btree:${data_directory}/smtpd_scache"
    tlsmta.start()
    flags = ["-tls1_2"] + ([] if tickets else ["-no_ticket"])
    sess = tmp_path / "session.pem"
    first = s_client(tlsmta.port, *flags, session_out=sess)
    assert first == ("TLSv1.2", False)
    second = s_client(tlsmta.port, *flags, session_in=sess)
    assert second == ("TLSv1.2", resumed)


def test_check_and_tlsmgr_status_say_how_the_server_resumes(tlsmta):
    tlsmta.main["smtpd_tls_session_cache_database"] = "lmdb:${data_directory}/smtpd_scache"
    tlsmta.master_lines.append("tlsmgr unix - - y 1000? 1 tlsmgr")
    tlsmta.start()
    out = tlsmta.cmd("check")
    assert f"warning: {CACHE_WARNING}" in out.stderr
    status = subprocess.run([TLSMGR, "-c", str(tlsmta.dir), "status"],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert "server resumption: session tickets shared by all smtpd workers" in status.stdout
    assert "clients without ticket support are not resumed" in status.stdout
    report = json.loads(subprocess.run([TLSMGR, "-c", str(tlsmta.dir), "status", "--json"],
                                       capture_output=True, text=True, timeout=30).stdout)
    assert "no session-id resumption" in report["server_resumption"]


def test_check_is_quiet_without_the_smtpd_session_cache(tlsmta):
    tlsmta.start()
    assert "smtpd_tls_session_cache_database" not in tlsmta.cmd("check").stderr


def _quit_over_tls(port):
    """STARTTLS, QUIT, read smtpd's close_notify without answering it: the seconds from
    the 221 reply until smtpd closes the TCP connection."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"EHLO x\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    raw.sendall(b"STARTTLS\r\n")
    assert f.readline().startswith(b"220")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(raw)
    tls.sendall(b"QUIT\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        reply += tls.recv(100)
    assert reply.startswith(b"221")
    start = time.monotonic()
    assert tls.recv(100) == b""                 # smtpd's close_notify
    # The TLS layer is done; the socket's own end of file is smtpd's close().
    plain = socket.socket(fileno=os.dup(tls.fileno()))
    plain.settimeout(10)
    try:
        assert plain.recv(100) == b""
    finally:
        plain.close()
        tls.close()
    return time.monotonic() - start


@pytest.mark.parametrize("setting,waits", [("yes", False), ("no", True)])
def test_fast_shutdown(tlsmta, setting, waits):
    tlsmta.main["tls_fast_shutdown_enable"] = setting
    tlsmta.start()
    took = _quit_over_tls(tlsmta.port)
    # smtpd's close timeout is 2 seconds: without fast shutdown it waits that long for a
    # close_notify that this client never sends.
    assert (took >= 1.5) is waits, took
    wait_for(lambda: "disconnect from" in tlsmta.log(), what="the disconnect line")
