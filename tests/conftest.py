"""Fixtures shared by every test: the real command-line entry point and Postfix's tools."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Examples stay bounded in CI; the database stays out of the work tree.
settings.register_profile("ci", max_examples=200, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BIN = Path(sys.executable).parent
POSTFIX_PY = str(BIN / "postfix-py")
DEBIAN_POSTCONF = shutil.which("postconf", path="/usr/sbin:/usr/bin")
DEBIAN_POSTMAP = shutil.which("postmap", path="/usr/sbin:/usr/bin")


def run(*args, input=None, env=None, check=False, timeout=60):
    """Run the installed `postfix-py` command; returns the CompletedProcess (text mode)."""
    return subprocess.run([POSTFIX_PY, *map(str, args)], input=input, env=env,
                          capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def postfix_py():
    return run


@pytest.fixture
def debian_postconf():
    if not DEBIAN_POSTCONF:
        pytest.skip("Debian's postfix is not installed")
    return DEBIAN_POSTCONF
