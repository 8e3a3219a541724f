"""A tiny line-echo service for testing the master and the worker skeleton.

master.cf names it `python:echo_service` (tests put this folder on PYTHONPATH). Each client
gets a greeting line with the worker's pid, uids and clients served, then its lines back,
until it sends `quit`; `sleep N` holds the worker busy for N seconds (a busy worker), `exit N`
makes the worker exit with status N.
"""

import os
import time

from postfix_py.lib import msg, server


def service(conn, ctx):
    """Greet, then echo lines until quit."""
    f = conn.makefile("rwb", buffering=0)
    msg.info(f"connect #{ctx.served + 1}")
    try:
        uids = os.getresuid()
        f.write(f"hello pid={os.getpid()} uids={uids[0]},{uids[1]},{uids[2]} "
                f"served={ctx.served} gen={ctx.generation}\n".encode())
        for line in f:
            text = line.decode().strip()
            msg.info(f"line: {text}")
            if text == "quit":
                f.write(b"bye\n")
                return
            if text.startswith("sleep "):
                time.sleep(float(text.split()[1]))
            if text.startswith("exit "):
                os._exit(int(text.split()[1]))
            f.write(line)
    finally:
        f.close()


def pre_init(ctx):
    if os.environ.get("ECHO_FAIL_AT_START"):
        msg.fatal("told to fail at start")


def main(ctx):
    return server.single_server(ctx, service, pre_init=pre_init)
