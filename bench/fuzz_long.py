"""Long fuzzing runs, by hand: the properties of the CI fuzz tests with many more examples.

    python bench/fuzz_long.py                         # every target, 20,000 examples each
    python bench/fuzz_long.py --examples 100000 --only smtpd,queue
    python bench/fuzz_long.py --minutes 60            # fresh seeds until the hour is up
    python bench/fuzz_long.py --integration           # also random bytes to a real smtpd

The targets are the CI tests themselves, so a long run checks exactly what CI checks:

    smtpd     tests/unit/test_fuzz_smtpd.py     SMTP commands and DATA into a Session
    address   tests/unit/test_fuzz_address.py   paths, addresses, next hops, headers
    config    tests/unit/test_fuzz_config.py    main.cf and master.cf readers
    tables    tests/unit/test_fuzz_tables.py    texthash, regexp, pcre, inline, static, hash
    queue     tests/unit/test_fuzz_queue.py     queue files: random, bit-flipped, hostile
    attr      tests/unit/test_attr_fuzz.py      IPC frames (its own example counts)
    tlsmgr    tests/integration/test_tlsmgr_daemon.py -k generated_frames  (with --integration)
    real      tests/integration/test_smtpd_random_input.py   a real smtpd over TCP (with --integration)

Hypothesis runs with a "long" profile (max_examples from --examples, no deadline) and keeps
its example database in --db (default /tmp/postfix-py-fuzz-db), so a failure found once is
replayed first the next time, and its shrunk example is printed with a reproduction blob.
Exit status: pytest's (0 when every property held). Needs the test extras (pytest,
hypothesis, trustme) from the repository's virtual environment.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIT = {
    "smtpd": "tests/unit/test_fuzz_smtpd.py",
    "address": "tests/unit/test_fuzz_address.py",
    "config": "tests/unit/test_fuzz_config.py",
    "tables": "tests/unit/test_fuzz_tables.py",
    "queue": "tests/unit/test_fuzz_queue.py",
    "attr": "tests/unit/test_attr_fuzz.py",
}
INTEGRATION = {
    "tlsmgr": "tests/integration/test_tlsmgr_daemon.py::test_generated_frames_never_kill_it",
    "real": "tests/integration/test_smtpd_random_input.py",
}


class LongProfile:
    """A pytest plugin: after tests/conftest.py has loaded "ci", load the long profile."""

    def __init__(self, examples: int, db: str, seed: int | None):
        self.examples, self.db, self.seed = examples, db, seed

    def pytest_configure(self, config):
        from hypothesis import HealthCheck, settings
        from hypothesis.database import DirectoryBasedExampleDatabase
        settings.register_profile(
            "long", max_examples=self.examples, deadline=None, print_blob=True,
            database=DirectoryBasedExampleDatabase(self.db),
            suppress_health_check=list(HealthCheck))
        settings.load_profile("long")


def run_once(targets: list[str], examples: int, db: str, seed: int | None,
             extra: list[str]) -> int:
    import pytest
    args = ["-q", "-p", "no:cacheprovider", f"--basetemp=/tmp/postfix-py-fuzz-{os.getpid()}",
            *targets, *extra]
    if seed is not None:
        args.append(f"--hypothesis-seed={seed}")
    return int(pytest.main(args, plugins=[LongProfile(examples, db, seed)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=20000,
                   help="examples per property (default 20000)")
    p.add_argument("--only", default="",
                   help="comma-separated targets: " + ", ".join([*UNIT, *INTEGRATION]))
    p.add_argument("--integration", action="store_true",
                   help="add the targets that run real processes (tlsmgr, real)")
    p.add_argument("--minutes", type=float, default=0,
                   help="repeat with fresh seeds until this much time has passed")
    p.add_argument("--seed", type=int, help="hypothesis seed of the (first) run")
    p.add_argument("--db", default="/tmp/postfix-py-fuzz-db",
                   help="hypothesis example database directory")
    p.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -x, -k NAME)")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or \
        [*UNIT, *(INTEGRATION if a.integration else {})]
    unknown = [n for n in names if n not in UNIT and n not in INTEGRATION]
    if unknown:
        p.error(f"unknown target: {', '.join(unknown)}")
    os.chdir(REPO)
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "integration")]
    targets = [UNIT.get(n) or INTEGRATION[n] for n in names]
    deadline = time.monotonic() + a.minutes * 60
    seed, runs = a.seed, 0
    while True:
        runs += 1
        print(f"fuzz_long: run {runs}: {', '.join(names)}, {a.examples} examples each, "
              f"seed {seed if seed is not None else 'random'}", flush=True)
        status = run_once(targets, a.examples, a.db, seed, a.pytest_args)
        if status != 0 or time.monotonic() >= deadline:
            return status
        seed = random.randrange(1 << 32)


if __name__ == "__main__":
    sys.exit(main())
