"""Shared by every test: the installed command-line entry point and Debian's Postfix tools."""

import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
POSTFIX_PY = str(BIN / "postfix-py")
TLSMGR = str(BIN / "tlsmgr")
DEBIAN_POSTCONF = shutil.which("postconf", path="/usr/sbin:/usr/bin")
DEBIAN_POSTMAP = shutil.which("postmap", path="/usr/sbin:/usr/bin")


def run(*args, input=None, env=None, check=False, timeout=60):
    """Run the installed `postfix-py` command; returns the CompletedProcess (text mode)."""
    return subprocess.run([POSTFIX_PY, *map(str, args)], input=input, env=env,
                          capture_output=True, text=True, check=check, timeout=timeout)
