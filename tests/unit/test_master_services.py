"""master/services.py: unix listener sockets made without root races, the services the
master skips, and Postfix's rule for the process-limit warning."""

import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from postfix_py.lib import maincf, mastercf
from postfix_py.master import services as S

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the privilege switch needs root")


@pytest.fixture
def queue():
    """A queue directory as the master lays it out: private/ and public/ of mail_owner."""
    root = Path(tempfile.mkdtemp(prefix="pfx-sock-", dir="/tmp"))
    os.chmod(root, 0o755)
    owner = pwd.getpwnam("nobody")
    for sub, mode in (("private", 0o700), ("public", 0o755)):
        (root / sub).mkdir()
        os.chown(root / sub, owner.pw_uid, owner.pw_gid)
        os.chmod(root / sub, mode)
    (root / "main.cf").write_text(f"queue_directory = {root}\nmail_owner = nobody\n")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def service(line: str):
    return mastercf.parse(line + "\n", "master.cf")[0]


@needs_root
def test_sockets_are_mail_owners_with_postfix_modes(queue):
    cfg = maincf.load(str(queue))
    nobody = pwd.getpwnam("nobody")
    socks = S.open_listeners(service("echo unix - - n - 1 python:echo_service"), cfg, True)
    socks += S.open_listeners(service("pub unix n - n - 1 python:echo_service"), cfg, True)
    try:
        for path, mode in ((queue / "private" / "echo", 0o600), (queue / "public" / "pub", 0o666)):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == mode, path
            assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert os.geteuid() == 0 and os.getegid() == 0      # the master is root again
        assert os.umask(0o022) == 0o022                       # and its umask is back
    finally:
        for s in socks:
            s.close()


@needs_root
def test_a_planted_symlink_is_replaced_not_followed(queue):
    target = queue / "target"
    target.write_text("precious\n")
    os.chmod(target, 0o640)
    (queue / "private" / "echo").symlink_to(target)
    socks = S.open_listeners(service("echo unix - - n - 1 python:echo_service"),
                             maincf.load(str(queue)), True)
    for s in socks:
        s.close()
    assert stat.S_ISSOCK(os.lstat(queue / "private" / "echo").st_mode)
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 0)
    assert target.read_text() == "precious\n"


@needs_root
def test_a_symlink_swapped_in_after_bind_is_never_followed(queue, monkeypatch):
    """mail_owner replaces the fresh socket with a symlink before the master's next step."""
    target = queue / "target"
    target.write_text("precious\n")
    os.chmod(target, 0o640)
    real_socket = socket.socket

    class Racing(real_socket):
        def bind(self, address):
            super().bind(address)
            if isinstance(address, str):
                os.unlink(address)
                os.symlink(target, address)

    monkeypatch.setattr(socket, "socket", Racing)
    for svc in ("echo unix - - n - 1 python:echo_service",
                "pub unix n - n - 1 python:echo_service"):
        for s in S.open_listeners(service(svc), maincf.load(str(queue)), True):
            s.close()
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 0)


def test_services_postfix_py_does_not_have_are_skipped():
    text = ("smtp inet n - y - - smtpd\n"
            "cleanup unix n - y - 0 cleanup\n"
            "postlog unix-dgram n - n - 1 postlogd\n"
            "mailman unix - n n - - pipe\n  flags=FRX user=list argv=/bin/true\n"
            "site unix - - n - - python:some.module\n"
            "relay unix - - y - - smtp\n")
    said = []
    kept = S.runnable(mastercf.parse(text, "master.cf"), said.append)
    assert [s.key for s in kept] == ["smtp/inet", "site/unix", "relay/unix"]
    assert said == [
        "master.cf, line 2: service cleanup/unix: unknown program: cleanup; service skipped",
        "master.cf, line 3: service postlog/unix-dgram: transport type unix-dgram is not "
        "supported; service skipped",
        "master.cf, line 4: service mailman/unix: unknown program: pipe; service skipped"]


def _state(line: str, listeners, maxproc: int):
    svc = service(line)
    return S.ServiceState(svc=svc, cfg=None, generation=1, program=svc.command,
                          listeners=listeners, maxproc=maxproc)


@pytest.mark.parametrize("bind, maxproc, warned", [
    ("127.0.0.1", 100, False),      # loopback only: Postfix's MASTER_FLAG_LOCAL_ONLY
    ("0.0.0.0", 100, True),         # remote clients reach it
    ("0.0.0.0", 1, False),          # a single-process service: no stress flag
])
def test_process_limit_warning_follows_postfix(bind, maxproc, warned):
    sock = socket.socket()
    try:
        sock.bind((bind, 0))        # bound, never listening: nobody can connect
        state = _state(f"{sock.getsockname()[1]} inet n - n - - smtpd", [sock], maxproc)
        assert S.stress_warned(state) is warned
    finally:
        sock.close()


def test_no_process_limit_warning_for_unix_services():
    # pickup: `pickup unix n - y 60 1 pickup`; a unix service with many processes too.
    assert not S.stress_warned(_state("pickup unix n - y 60 1 pickup", [], 1))
    assert not S.stress_warned(_state("smtp unix - - y - - smtp", [], 100))

