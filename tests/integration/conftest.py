"""Fixtures of the integration tests: a real postfix-py instance, ended by pid afterwards."""

import pytest

from pfxinst import Instance


@pytest.fixture
def instance(tmp_path):
    inst = Instance(tmp_path)
    yield inst
    inst.cleanup()
