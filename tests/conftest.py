"""Fixtures shared by every test: the real command-line entry point and Postfix's tools."""

import gc
import os
import warnings

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


def pytest_collection_finish(session):
    """Exempt what exists once every test module is imported from the collections below.

    What collection leaves (modules, their tables, the tests) lives to the end; a full
    collection traversed it after every test, ~0.1 s each, minutes over the suite. What a
    test makes is still collected at that test's end."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_own_garbage():
    """Finalize what a test dropped at the end of that test.

    A socket a test forgot to close is found by the garbage collector whenever it next
    runs, and its ResourceWarning (an error under filterwarnings = error) then fails
    whichever later test is running, at random. Collecting at each test's end keeps the
    cost with the test that made it."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
