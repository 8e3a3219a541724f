"""Our TLS log line and Received: text against a real Postfix 3.7 doing the same handshake.

A private Postfix instance (its own config, queue and data directories under /tmp, loopback
only, a maillog_file) receives one message over STARTTLS from swaks with a client
certificate and holds it; our ServerTLS, built from the same certificates, takes a
handshake from openssl s_client with the same client certificate (both clients use the
system OpenSSL). The summary lines and the Received: header's TLS lines must be equal.
The instance is stopped by the pid in its pid file. Skipped without root, postfix, swaks
or openssl.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import trustme

from postfix_py.lib import maincf, tls

POSTFIX = shutil.which("postfix", path="/usr/sbin:/usr/bin")
POSTCAT = shutil.which("postcat", path="/usr/sbin:/usr/bin")
SWAKS = shutil.which("swaks")
OPENSSL = shutil.which("openssl")

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not (POSTFIX and POSTCAT and SWAKS and OPENSSL),
                       reason="needs Debian's postfix, swaks and openssl"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix instance needs root"),
]

MASTER_CF = """\
{port} inet n - n - - smtpd -o smtpd_tls_ask_ccert=yes
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup():
    top = tempfile.mkdtemp(prefix="pfx-interop-", dir="/tmp")
    os.chmod(top, 0o755)        # postfix's own processes must reach the queue
    conf, queue, data, certs = (os.path.join(top, n) for n in ("conf", "queue", "data", "certs"))
    for d in (conf, queue, data, certs):
        os.mkdir(d, 0o755)
    shutil.chown(data, "postfix")
    ca = trustme.CA()
    server = ca.issue_cert("mx.example.test", common_name="mx.example.test")
    client = ca.issue_cert("client.example.test", common_name="client.example.test")
    files = {"ca": os.path.join(certs, "ca.pem"), "server": os.path.join(certs, "server.pem"),
             "client": os.path.join(certs, "client.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    server.private_key_and_cert_chain_pem.write_to_path(files["server"])
    client.private_key_and_cert_chain_pem.write_to_path(files["client"])
    for path in files.values():
        os.chmod(path, 0o644)
    port = _free_port()
    maillog = os.path.join(top, "maillog")
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mx.example.test
mydestination = mx.example.test
local_recipient_maps =
alias_maps =
maillog_file = {maillog}
maillog_file_prefixes = /tmp
smtpd_tls_chain_files = {files['server']}
smtpd_tls_CAfile = {files['ca']}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
""" + "smtpd_recipient_restrictions = check_recipient_access "
                "inline:{{hold@mx.example.test=HOLD}}, permit\n")
    with open(os.path.join(conf, "master.cf"), "w") as f:
        f.write(MASTER_CF.format(port=port))
    started = subprocess.run([POSTFIX, "-c", conf, "start"], capture_output=True, text=True,
                             timeout=60)
    pidfile = os.path.join(queue, "pid", "master.pid")
    try:
        if started.returncode != 0 or not os.path.exists(pidfile):
            pytest.skip(f"private Postfix did not start: {started.stderr.strip()}")
        yield {"conf": conf, "queue": queue, "port": port, "maillog": maillog, **files}
    finally:
        try:
            with open(pidfile) as f:
                pid = int(f.read().split()[0])
            os.kill(pid, signal.SIGTERM)        # this instance's master, by its pid
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)
        except (OSError, ValueError):
            pass
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix_result(setup):
    """Postfix's summary line and Received: TLS lines for one swaks delivery."""
    r = subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(setup["port"]),
                        "--to", "hold@mx.example.test", "--from", "a@client.example.test",
                        "--helo", "client.example.test", "--tls",
                        "--tls-cert", setup["client"], "--tls-key", setup["client"]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = queue_id = None
    for _ in range(100):
        with open(setup["maillog"]) as f:
            log = f.read()
        m = re.search(r"smtpd\[\d+\]: (\S+ TLS connection established from .*)", log)
        q = re.search(r"smtpd\[\d+\]: ([0-9A-F]+): client=", log)
        if m and q and os.listdir(os.path.join(setup["queue"], "hold")):
            summary, queue_id = m.group(1), q.group(1)
            break
        time.sleep(0.05)
    assert summary and queue_id, log
    headers = subprocess.run([POSTCAT, "-c", setup["conf"], "-hq", queue_id],
                             capture_output=True, text=True, timeout=30).stdout
    lines = headers.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Received: "))
    received = []
    for line in lines[start + 1:]:
        if line.startswith("\tby "):
            break
        received.append(line)
    return summary, received


def test_summary_and_received_match_postfix(setup, postfix_result):
    cfg = maincf.Config(setup["conf"], os.path.join(setup["conf"], "main.cf"),
                        overrides={"smtpd_tls_chain_files": setup["server"],
                                   "smtpd_tls_CAfile": setup["ca"],
                                   "smtpd_tls_ask_ccert": "yes"})
    server = tls.server_tls(cfg, warn=lambda t: None)
    listener = socket.create_server(("127.0.0.1", 0))
    result = {}

    def serve():
        sock, _ = listener.accept()
        conn = server.connection(sock, "localhost[127.0.0.1]")
        try:
            tls.handshake(conn, 10)
            result["info"] = server.info(conn)
            conn.sendall(b"220 ok\r\n")
            tls.shutdown(conn, 2)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
        finally:
            sock.close()
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        subprocess.run([OPENSSL, "s_client", "-connect",
                        "127.0.0.1:%d" % listener.getsockname()[1],
                        "-cert", setup["client"], "-key", setup["client"]],
                       input="", capture_output=True, text=True, timeout=30)
    finally:
        thread.join(30)
        listener.close()
    assert "error" not in result, result.get("error")
    summary, received = postfix_result
    assert tls.summary_line(result["info"]) == summary
    assert tls.received_lines(result["info"], ask_ccert=True) == received
