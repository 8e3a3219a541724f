"""`postfix-py check` and running as a plain user, as an administrator would try them."""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import POSTFIX_PY
from pfxinst import free_port, greet

ROOT = os.geteuid() == 0


def test_check_of_a_started_instance_is_clean(instance):
    instance.master_lines = [f"127.0.0.1:{free_port()} inet n - y - - python:echo_service"]
    instance.start()
    out = instance.cmd("check")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_check_warns_about_keys_and_the_jail(instance, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not really a key\n")
    os.chmod(key, 0o644)
    instance.main["smtpd_tls_key_file"] = str(key)
    instance.main["smtp_tls_key_file"] = str(tmp_path / "missing.pem")
    instance.master_lines = [f"127.0.0.1:{free_port()} inet n - y - - python:echo_service",
                             f"127.0.0.1:{free_port()} inet n - n - - nosuchprogram"]
    instance.start()
    if ROOT:
        (instance.queue / "etc" / "hosts").write_text("# stale copy\n")
    out = instance.cmd("check")
    assert out.returncode == 1
    assert f"smtpd_tls_key_file = {key}: private key is readable by others (mode 0644)" \
        in out.stderr
    assert "smtp_tls_key_file" in out.stderr and "No such file or directory" in out.stderr
    assert "unknown program: nosuchprogram" in out.stderr
    if ROOT:
        assert f"{instance.queue}/etc/hosts and /etc/hosts differ" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_unknown_mail_owner(instance):
    instance.main["mail_owner"] = "no-such-user-here"
    instance.master_lines = []
    instance.write()
    out = instance.cmd("check")
    assert out.returncode == 1
    assert "mail_owner: unknown user: no-such-user-here" in out.stderr
    out = instance.cmd("start")
    if ROOT:
        assert out.returncode == 1
        assert "mail_owner: unknown user" in out.stderr


@pytest.fixture
def plain_home():
    """A directory a plain user owns, on a path that user can reach (pytest's is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="pfx-plain-", dir="/tmp"))
    os.chmod(top, 0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(top, nobody.pw_uid, nobody.pw_gid)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_an_instance_runs_as_a_plain_user(plain_home):
    """Without root: no chroot, no privilege drop, one warning saying so."""
    home = plain_home
    nobody = pwd.getpwnam("nobody")
    port = free_port()
    (home / "main.cf").write_text(
        f"queue_directory = {home}/queue\ndata_directory = {home}/data\n"
        f"mail_owner = nobody\nmaillog_file = {home}/maillog\ninet_interfaces = 127.0.0.1\n")
    (home / "master.cf").write_text(f"127.0.0.1:{port} inet n - y - - python:echo_service\n")
    as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                 "--clear-groups", POSTFIX_PY, "-c", str(home)]
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "programs"))
    out = subprocess.run(as_nobody + ["start"], capture_output=True, text=True, env=env,
                         timeout=60)
    try:
        assert out.returncode == 0, out.stderr
        f, hello = greet(port)
        assert hello["uids"] == f"{nobody.pw_uid},{nobody.pw_uid},{nobody.pw_uid}"
        assert os.readlink(f"/proc/{hello['pid']}/root") == "/"
        f.write(b"quit\n")
        f.close()
        log = (home / "maillog").read_text()
        assert log.count("not running as root") == 1
    finally:
        stop = subprocess.run(as_nobody + ["stop"], capture_output=True, text=True, env=env,
                              timeout=60)
    assert stop.returncode == 0, stop.stderr
