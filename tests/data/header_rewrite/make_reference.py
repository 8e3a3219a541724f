"""Record how Debian's Postfix rewrites address headers: tests/data/header_rewrite/postfix.json.

Run as root on a host with Debian's postfix package (3.7):
    python3 tests/data/header_rewrite/make_reference.py
A private Postfix instance (its own config and queue under a temporary directory, smtpd
on free 127.0.0.1 ports) receives each case of cases.py over SMTP in the settings of
cases.SCENARIOS: the "local" and "remote" header rewrite contexts, each with
trivial-rewrite's defaults and with append_dot_mydomain = yes, swap_bangpath = no,
allow_percent_hack = no (a second trivial-rewrite service), and the local context with
header_address_token_limit = 5 (a cleanup service of its own). virtual(8) delivers into an mbox file; the header section of
each message, without the lines that delivery and smtpd add, is written to postfix.json.
tests/unit/test_header_rewrite.py gives the same cases to lib/cleanup.py and expects
the same bytes.
"""

import json
import os
import pwd
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cases import CASES, MAIN, SCENARIOS, TABLES, strip_added  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="pfref-"))
    root.chmod(0o755)
    etc, queue, mail = root / "etc", root / "queue", root / "mail"
    pw = pwd.getpwnam("postfix")
    for d in (etc, queue, root / "data", mail):
        d.mkdir(parents=True)
    for d in (root / "data", mail):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    for name, text in TABLES.items():
        (root / name).write_text(text)
    main_cf = {
        **{k: v.replace("@DIR@", str(root)) for k, v in MAIN.items()},
        "compatibility_level": "3.6", "queue_directory": queue,
        "data_directory": root / "data", "mail_owner": "postfix", "setgid_group": "postdrop",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "maillog_file": root / "maillog", "maillog_file_prefixes": "/tmp",
        "virtual_mailbox_domains": "sink.test", "virtual_mailbox_base": mail,
        "virtual_mailbox_maps": "static:sink", "virtual_uid_maps": f"static:{pw.pw_uid}",
        "virtual_gid_maps": f"static:{pw.pw_gid}", "mynetworks": "127.0.0.0/8",
        "smtpd_peername_lookup": "no", "smtp_dns_support_level": "disabled",
        "daemon_directory": "/usr/lib/postfix/sbin", "shlib_directory": "/usr/lib/postfix",
        "command_directory": "/usr/sbin", "meta_directory": "/etc/postfix",
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
    ports = {}
    services = []
    for name, (context, rewrite, cleanup) in SCENARIOS.items():
        ports[name] = free_port()
        clients = "static:all" if context == "local" else ""
        opts = " ".join(f"-o {k}={v}" for k, v in rewrite.items())
        services.append(f"rewrite_{name} unix - - n - - trivial-rewrite {opts}")
        services.append(f"cleanup_{name} unix n - n - 0 cleanup "
                        f"-o rewrite_service_name=rewrite_{name} " +
                        " ".join(f"-o {k}={v}" for k, v in cleanup.items()))
        services.append(f"127.0.0.1:{ports[name]} inet n - n - - smtpd "
                        f"-o local_header_rewrite_clients={clients} "
                        f"-o cleanup_service_name=cleanup_{name}")
    services += ["cleanup unix n - n - 0 cleanup", "qmgr unix n - n 300 1 qmgr",
                 "rewrite unix - - n - - trivial-rewrite", "bounce unix - - n - 0 bounce",
                 "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
                 "error unix - - n - - error", "virtual unix - n n - - virtual",
                 "postlog unix-dgram n - n - 1 postlogd", "anvil unix - - n - 1 anvil",
                 "proxymap unix - - n - - proxymap"]
    (etc / "master.cf").write_text("\n".join(services) + "\n")
    subprocess.run(["/usr/sbin/postfix", "-c", str(etc), "start"], check=True)
    try:
        time.sleep(2)
        count = 0
        for name in SCENARIOS:
            with smtplib.SMTP("127.0.0.1", ports[name], timeout=30) as s:
                for case, header in CASES.items():
                    message = f"X-Case: {name}/{case}\n{header}\n\nbody\n"
                    s.sendmail("sender@sink.test", ["sink@sink.test"],
                               message.encode("utf-8"))
                    count += 1
        box = mail / "sink"
        for _ in range(120):
            if box.exists() and box.read_bytes().count(b"\nX-Case: ") >= count:
                break
            time.sleep(0.5)
        text = box.read_bytes().decode("utf-8", "surrogateescape")
    finally:
        pid = int((queue / "pid" / "master.pid").read_text().split()[0])
        os.kill(pid, 15)
    out = {}
    for message in text.split("\nFrom sender@sink.test ")[0:]:
        head = message.split("\n\n", 1)[0]
        lines = head.split("\n")
        case = next(ln for ln in lines if ln.startswith("X-Case: "))[8:]
        out[case] = strip_added(lines[1:])
    (HERE / "postfix.json").write_text(json.dumps(out, indent=1, ensure_ascii=False,
                                                  sort_keys=True) + "\n")
    print(f"{len(out)} messages recorded; maillog in {root / 'maillog'}")


if __name__ == "__main__":
    main()
