"""The `postfix-py` command: Postfix's verbs and tool names under one entry point.

    postfix-py [-c config_dir] [-v] start | start-fg | stop | abort | reload | status | check
    postfix-py init DIR [--port-base N] [--force]
    postfix-py postconf | postmap | postqueue | postsuper | sendmail | posttls-finger | tls ...

A tool verb hands the rest of the command line to the tool's own main(argv), with Postfix's
flags; `-c config_dir` given before the verb is passed on to it. Each verb lives in one
module, named here in one table, and is imported only when it is called.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, one-line summary). The module's main(argv) returns the exit status.
VERBS = {
    "init": ("postfix_py.master.init", "write a self-contained instance on loopback ports"),
    "postconf": ("postfix_py.tools.postconf", "show or edit main.cf and master.cf"),
    "postmap": ("postfix_py.tools.postmap", "build and query lookup tables"),
}

USAGE = """usage: postfix-py [-c config_dir] [-v] command [args...]

commands:
""" + "".join(f"  {verb:<15} {summary}\n" for verb, (_, summary) in VERBS.items())


def main(argv: list[str] | None = None) -> int:
    """Dispatch `postfix-py [-c dir] [-v] verb args` to the verb's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre: list[str] = []
    while argv and argv[0] in ("-c", "-v") or (argv and argv[0].startswith("-c") and len(argv[0]) > 2):
        opt = argv.pop(0)
        if opt == "-c":
            if not argv:
                print("postfix-py: option -c requires a directory", file=sys.stderr)
                return 2
            pre += ["-c", argv.pop(0)]
        elif opt.startswith("-c"):
            pre += ["-c", opt[2:]]
        else:
            pre.append("-v")
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE) if argv else sys.stderr.write(USAGE)
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"postfix-py: unknown command: '{verb}'", file=sys.stderr)
        sys.stderr.write(USAGE)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(pre + rest) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `postfix-py postconf | head`: the reader went away; not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
