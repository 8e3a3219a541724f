"""Record the Delivered-To: and X-Original-To: headers that Debian's Postfix 3.7 writes:
tests/data/delivered_to/postfix.json.

Run as root on a host with Debian's postfix package (3.7):
    python3 tests/data/delivered_to/make_reference.py
A private Postfix instance (its own config and queue under a temporary directory, smtpd
on a free 127.0.0.1 port) receives one message for each recipient of RECIPIENTS in each domain of DOMAINS:
virtual(8) delivers those of sink.test into one mbox file (virtual_mailbox_maps =
static:sink), local(8) those of local.test to a file through an alias (postalias; every
local part is an alias of the same file). The two lines of each message are recorded, by
agent and recipient.
"""

import json
import os
import pwd
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Local parts as the SMTP client writes them (RFC 5321 quoted where they must be).
RECIPIENTS = ['"john doe"', '"a,b"', "John.Doe", '"x\\"y"', '"dot..dot"', '"semi;colon"',
              "plain", "Ann+X"]
# The domains, as the SMTP client writes them: virtual(8)'s, then local(8)'s.
DOMAINS = ("sink.test", "Sink.TEST", "local.test", "Local.TEST")


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
    (root / "local").mkdir()
    os.chmod(root / "local", 0o1777)        # alias file deliveries run as default_privs
    box = root / "local" / "file"
    box.touch()
    os.chmod(box, 0o666)
    (etc / "aliases").write_text("".join(
        f"{r.lower()}: {box}\n" for r in RECIPIENTS))
    port = free_port()
    main_cf = {
        "compatibility_level": "3.6", "queue_directory": queue,
        "data_directory": root / "data", "mail_owner": "postfix", "setgid_group": "postdrop",
        "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
        "maillog_file": root / "maillog", "maillog_file_prefixes": "/tmp",
        "myhostname": "mx.test.example", "mydestination": "local.test",
        "alias_maps": f"hash:{etc}/aliases", "alias_database": f"hash:{etc}/aliases",
        "local_recipient_maps": "$alias_maps",
        "virtual_mailbox_domains": "sink.test", "virtual_mailbox_base": mail,
        "virtual_mailbox_maps": "static:sink", "virtual_uid_maps": f"static:{pw.pw_uid}",
        "virtual_gid_maps": f"static:{pw.pw_gid}", "mynetworks": "127.0.0.0/8",
        "smtpd_peername_lookup": "no", "smtp_dns_support_level": "disabled",
        "daemon_directory": "/usr/lib/postfix/sbin", "shlib_directory": "/usr/lib/postfix",
        "command_directory": "/usr/sbin", "meta_directory": "/etc/postfix",
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
    services = [f"127.0.0.1:{port} inet n - n - - smtpd",
                "cleanup unix n - n - 0 cleanup", "qmgr unix n - n 300 1 qmgr",
                "rewrite unix - - n - - trivial-rewrite", "bounce unix - - n - 0 bounce",
                "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
                "error unix - - n - - error", "virtual unix - n n - - virtual",
                "local unix - n n - - local",
                "postlog unix-dgram n - n - 1 postlogd", "anvil unix - - n - 1 anvil",
                "proxymap unix - - n - - proxymap"]
    (etc / "master.cf").write_text("\n".join(services) + "\n")
    subprocess.run(["/usr/sbin/postalias", "-c", str(etc), f"hash:{etc}/aliases"],
                   check=True)
    subprocess.run(["/usr/sbin/postfix", "-c", str(etc), "start"], check=True)
    try:
        time.sleep(2)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for domain in DOMAINS:
                for local in RECIPIENTS:
                    rcpt = f"{local}@{domain}"
                    s.sendmail("sender@example.org", [rcpt],
                               f"X-Case: {rcpt}\n\nbody\n".encode())
        boxes = {"virtual": mail / "sink", "local": box}
        for _ in range(120):
            if all(b.exists() and b.read_bytes().count(b"\nX-Case: ") >= 2 * len(RECIPIENTS)
                   for b in boxes.values()):
                break
            time.sleep(0.5)
        out = {}
        for agent, path in boxes.items():
            for message in path.read_text().split("From sender@example.org ")[1:]:
                head = message.split("\n\n", 1)[0]
                lines = [ln for ln in head.split("\n") if ln.startswith(
                    ("X-Case: ", "Delivered-To: ", "X-Original-To: "))]
                case = next(ln for ln in lines if ln.startswith("X-Case: "))[8:]
                out[f"{agent} {case}"] = [ln for ln in lines if not ln.startswith("X-Case")]
    finally:
        pid = int((queue / "pid" / "master.pid").read_text().split()[0])
        os.kill(pid, 15)
    (HERE / "postfix.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} messages recorded; maillog in {root / 'maillog'}")


if __name__ == "__main__":
    main()
