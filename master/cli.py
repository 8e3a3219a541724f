"""The `postfix-py` command: Postfix's verbs and tool names under one entry point.

    postfix-py [-c config_dir] [-v] start | start-fg | stop | abort | reload | status | check
    postfix-py init DIR [--port-base N] [--force]
    postfix-py postconf | postmap | postalias | newaliases | postqueue | postsuper |
               postcat | postlog | sendmail | posttls-finger | tls | tlsrpt ...

A tool verb hands the rest of the command line to the tool's own main(argv), with Postfix's
flags; `-c config_dir` given before the verb is passed on to it. Each verb lives in one
module, named here in one table, and is imported only when it is called.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, function, one-line summary). The function takes argv and returns the
# exit status.
_CONTROL = "postfix_py.master.control"
VERBS = {
    "start": (_CONTROL, "start", "start the mail system in the background"),
    "start-fg": (_CONTROL, "start_fg", "start the mail system in the foreground"),
    "stop": (_CONTROL, "stop", "stop now (-t SECONDS: let clients finish first)"),
    "abort": (_CONTROL, "abort", "stop at once"),
    "reload": (_CONTROL, "reload", "re-read main.cf and master.cf"),
    "status": (_CONTROL, "status", "show whether it runs, and every process"),
    "check": (_CONTROL, "check", "look for configuration and permission problems"),
    "init": ("postfix_py.master.init", "main", "write a self-contained instance on loopback ports"),
    "postconf": ("postfix_py.tools.postconf", "main", "show or edit main.cf and master.cf"),
    "postmap": ("postfix_py.tools.postmap", "main", "build and query lookup tables"),
    "postalias": ("postfix_py.tools.postalias", "main", "build and query alias databases"),
    "newaliases": ("postfix_py.tools.postalias", "newaliases", "build alias_database"),
    "tls": ("postfix_py.tools.postfix_tls", "main", "server keys, certificates and fingerprints"),
    "flush": ("postfix_py.tools.postqueue", "flush", "try to deliver everything in the queue now"),
    "postqueue": ("postfix_py.tools.postqueue", "main", "list (-p) or flush (-f) the queue"),
    "postsuper": ("postfix_py.tools.postsuper", "main", "delete, hold, release, requeue mail"),
    "sendmail": ("postfix_py.tools.sendmail", "main", "submit mail locally"),
    "postcat": ("postfix_py.tools.postcat", "main", "show queue file contents"),
    "postlog": ("postfix_py.tools.postlog", "main", "write to the mail log"),
    "posttls-finger": ("postfix_py.tools.posttls_finger", "main",
                       "probe a server's TLS as the smtp client would"),
    "tlsrpt": ("postfix_py.tools.tlsrpt", "main", "send due TLSRPT reports (RFC 8460), or show them"),
}

USAGE = """usage: postfix-py [-c config_dir] [-v] command [args...]

commands:
""" + "".join(f"  {verb:<15} {summary}\n" for verb, (_, _, summary) in VERBS.items())


def main(argv: list[str] | None = None) -> int:
    """Dispatch `postfix-py [-c dir] [-v] verb args` to the verb's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre: list[str] = []
    while argv and (argv[0] in ("-c", "-v") or argv[0].startswith("-c")):
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
    module_name, function, _ = VERBS[verb]
    handler = getattr(importlib.import_module(module_name), function)
    try:
        return int(handler(pre + rest) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `postfix-py postconf | head`: the reader went away; not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
