"""tlsmgr as the master runs it: chrooted, as mail_owner, answering smtpd and `tlsmgr status`."""

import json
import os
import pwd
import smtplib
import ssl
import stat
import subprocess

import psutil
import pytest
import trustme

from helpers import TLSMGR
from pfxinst import free_port, wait_for

ROOT = os.geteuid() == 0


@pytest.fixture
def tls_instance(instance, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    instance.port = free_port()
    instance.main.update({
        "smtpd_tls_cert_file": str(pem), "smtpd_tls_security_level": "may",
        "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
        "smtpd_tls_session_cache_database": "lmdb:${data_directory}/smtpd_scache",
        "mydestination": "localhost"})
    instance.master_lines = [
        f"127.0.0.1:{instance.port} inet n - y - - smtpd",
        "tlsmgr unix - - y 1000? 1 tlsmgr",
    ]
    return instance


def tlsmgr_status(instance):
    out = subprocess.run([TLSMGR, "-c", str(instance.dir), "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not ROOT, reason="chroot and privilege drop need root")
def test_tlsmgr_under_the_master(tls_instance):
    inst = tls_instance
    inst.start()
    # smtpd asks tlsmgr for a seed when it starts: the first client starts both.
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", inst.port, timeout=10) as s:
        s.starttls(context=ctx)
        assert s.noop()[0] == 250
    status = wait_for(lambda: (lambda st: st if st["prng"]["bytes_served"] > 0 else None)(
        tlsmgr_status(inst)), what="a seed served to smtpd")
    pid = status["pid"]
    proc = psutil.Process(pid)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert proc.uids() == (nobody, nobody, nobody)
    assert os.readlink(f"/proc/{pid}/root") == str(inst.queue)
    assert " ".join(proc.cmdline()).strip() == "postfix-py/tlsmgr -n tlsmgr -t unix"
    caches = status["caches"]
    data = inst.dir / "data"
    assert caches["smtp"]["enabled"] and caches["smtpd"]["enabled"]
    assert caches["smtp"]["file"] == str(data / "smtp_scache.lmdb")
    assert not caches["lmtp"]["enabled"]              # lmtp_tls_session_cache_database unset
    for c in (caches["smtp"], caches["smtpd"]):
        st = os.stat(c["file"])
        assert st.st_uid == nobody and not st.st_mode & 0o077, c["file"]
    # The exchange file is written at exit, as mail_owner, mode 0600.
    out = inst.cmd("stop")
    assert out.returncode == 0, out.stderr
    exch = data / "prng_exch"
    st = os.stat(exch)
    assert st.st_uid == nobody and stat.S_IMODE(st.st_mode) == 0o600
    assert "warning" not in "\n".join(l for l in inst.log().splitlines() if "tlsmgr" in l)


def test_tlsmgr_status_when_not_running(tls_instance):
    tls_instance.write()
    out = subprocess.run([TLSMGR, "-c", str(tls_instance.dir), "status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr
