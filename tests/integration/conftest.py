"""Fixtures of the integration tests: a real postfix-py instance, ended by pid afterwards."""

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from pfxinst import Instance


@pytest.fixture
def instance(request):
    """An instance in a directory of its own under /tmp.

    pytest's tmp_path is 0700: mail_owner could not reach data_directory through it, as it
    can in a real installation. The directory is kept when the test fails, for its maillog.
    """
    root = Path(tempfile.mkdtemp(prefix="pfx-test-", dir="/tmp"))
    os.chmod(root, 0o755)
    inst = Instance(root)
    yield inst
    inst.cleanup()
    failed = getattr(request.node, "rep_call", None)
    if failed is None or not failed.failed:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"instance kept for inspection: {root}")


@pytest.fixture
def dead_port():
    """A UDP port on 127.0.0.1 that takes queries and never answers (a DNS server that
    is down without refusing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
