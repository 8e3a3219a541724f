"""What the queue and log commands share: Postfix's `prog: fatal: text` exit and the run wrapper.

postcat, postlog, postqueue and postsuper report a fatal error as Postfix's commands do, one
line on standard error and an exit status, never a traceback. fatal() raises Exit, which
run() turns into the status; msg.FatalError (a fatal from lib code) becomes the command's
own status for it.
"""

from __future__ import annotations

import sys

from ..lib import msg


class Exit(Exception):
    """End the command with this status (the message has been printed already)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def fatal(prog: str, text: str, status: int = 1):
    """Print `prog: fatal: text` on standard error and end the command with status."""
    print(f"{prog}: fatal: {text}", file=sys.stderr)
    raise Exit(status)


def run(body, argv: list[str], lib_fatal_status: int = 1, cleanup=None) -> int:
    """Run body(argv) and return its exit status, mapping Exit and msg.FatalError."""
    try:
        return body(list(argv))
    except Exit as exc:
        return exc.status
    except msg.FatalError:
        return lib_fatal_status
    finally:
        if cleanup is not None:
            cleanup()
        msg.close()
