"""Fleet caches: the share of TLS handshakes that two postfix-py hosts resume from a shared store.

    .venv/bin/python bench/fleet_resumption.py                      # markdown on stdout
    .venv/bin/python bench/fleet_resumption.py --messages 40 --write BENCHMARKS.md

Two postfix-py instances ("two hosts", tests/fleet.py) relay to one TLS destination with
smtp_tls_security_level = encrypt and smtp_tls_session_cache_database on a private
memcached, then a private redis-server, both on loopback. --messages messages alternate
between the hosts, one SMTP session each, each delivered before the next is sent; the
destination (tests/tls_sink.py, Python's ssl with session tickets) counts full and
resumed handshakes. Then the store is stopped and as many messages go again: every one
must still be delivered; what each host resumes then comes from its own LMDB backup.

With one shared cache only the very first handshake of the run should be full; with a
cache per host (no sharing) each host pays one full handshake, so two.
--write FILE puts the table between `<!-- fleet:begin -->` and `<!-- fleet:end -->`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))
sys.path.insert(0, str(HERE))
from fleet import resumption_run  # noqa: E402
from report import command_line, machine_description, md_table, write_section  # noqa: E402


def _share(resumed: int, full: int) -> str:
    total = resumed + full
    return f"{100 * resumed / total:.1f} % ({resumed}/{total})" if total else "n/a"


def report(results: list[dict]) -> str:
    rows = [[r["store"], str(r["messages"]),
             _share(r["shared_resumed"], r["shared_full"]),
             _share(r["down_resumed"], r["down_full"]),
             f"{r['delivered']}/{2 * r['messages']}"] for r in results]
    table = md_table(["store", "messages per phase", "resumed, store up",
                      "resumed, store down (backups)", "delivered"], rows)
    return (f"### Fleet TLS session caches\n\nCommand: `{command_line()}`\n\n"
            f"{machine_description()}\n\n{table}\n\n"
            "Two hosts alternate, one message and one SMTP session at a time, to one TLS "
            "destination; the destination counts the handshakes. With the store up, the "
            "second host resumes the sessions the first one stored. With the store stopped, "
            "no message is lost; each host resumes from its own backup LMDB file.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20, help="messages per phase (default 20)")
    p.add_argument("--write", metavar="FILE", help="put the section into FILE")
    opts = p.parse_args(argv)
    results = [resumption_run(kind, opts.messages) for kind in ("memcache", "redis")]
    text = report(results)
    if opts.write:
        write_section(opts.write, "fleet", text)
    print(text)
    return 0 if all(r["delivered"] == 2 * r["messages"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
