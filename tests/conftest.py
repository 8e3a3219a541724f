"""Fixtures shared by every test: the real command-line entry point and Postfix's tools."""

import os

import pytest
from hypothesis import settings

from helpers import DEBIAN_POSTCONF, run

# Examples stay bounded in CI; the database stays out of the work tree.
settings.register_profile("ci", max_examples=200, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def postfix_py():
    return run


@pytest.fixture
def debian_postconf():
    if not DEBIAN_POSTCONF:
        pytest.skip("Debian's postfix is not installed")
    return DEBIAN_POSTCONF
