"""A Postfix administrator's master.cf dropped in as it is: Debian's Postfix 3.7 stock file
(tests/data/debian-postfix-3.7-master.cf, a copy of /usr/share/postfix/master.cf.dist)
starts, reloads and checks; the services postfix-py has no program or transport for are
warned about by name and skipped, never fatal."""

import json
import re
import time
from pathlib import Path

from pfxinst import SmtpClient, free_port, wait_for

DEBIAN = Path(__file__).resolve().parents[1] / "data" / "debian-postfix-3.7-master.cf"

# service/type -> why postfix-py skips it
SKIPPED = {f"{name}/unix": f"unknown program: {prog}" for name, prog in (
    ("cleanup", "cleanup"), ("rewrite", "trivial-rewrite"), ("bounce", "bounce"),
    ("defer", "bounce"), ("trace", "bounce"), ("flush", "flush"),
    ("proxymap", "proxymap"), ("proxywrite", "proxymap"),
    ("scache", "scache"),
    ("maildrop", "pipe"), ("uucp", "pipe"), ("ifmail", "pipe"), ("bsmtp", "pipe"),
    ("scalemail-backend", "pipe"), ("mailman", "pipe"))}
SKIPPED["postlog/unix-dgram"] = "transport type unix-dgram is not supported"
RUN = ["pickup", "qmgr", "tlsmgr", "smtp", "relay", "error", "retry", "discard", "local",
       "virtual", "lmtp", "anvil", "showq", "verify"]


def debian_master_cf(port: int) -> str:
    """Debian's file with the smtp inet service on a free loopback port instead of 25."""
    text = DEBIAN.read_text()
    line = "smtp      inet  n       -       y       -       -       smtpd\n"
    assert text.count(line) == 1
    return text.replace(line, f"{port}      inet  n       -       y       -       -       smtpd\n")


def skip_lines(text: str) -> dict:
    found = re.findall(r"master\.cf, line \d+: service (\S+): (.*?); service skipped", text)
    return dict(found)


def test_debian_master_cf_starts_with_warnings(instance):
    port = free_port()
    instance.main["mydestination"] = "$myhostname, localhost"
    instance.write()
    (instance.dir / "master.cf").write_text(debian_master_cf(port))
    instance.write = lambda: None          # keep Debian's file through start and reload

    out = instance.cmd("check")
    assert out.returncode == 0, out.stderr
    assert skip_lines(out.stderr) == SKIPPED
    assert "Traceback" not in out.stderr

    instance.start()
    assert skip_lines(instance.log()) == SKIPPED
    c = SmtpClient(port)
    assert c.reply() == "220 mail.test.example ESMTP postfix-py"
    assert c.cmd("EHLO client.example").startswith("250-mail.test.example")
    assert c.cmd("QUIT").startswith("221 ")
    c.close()
    status = json.loads(instance.cmd("status", "--json").stdout)
    services = {s["service"] for s in status["services"]}
    assert services == {str(port)} | set(RUN)

    instance.reload()
    wait_for(lambda: "reload -- version" in instance.log(), what="the reload")
    assert skip_lines(instance.log().split("reload -- version")[0].split(
        "daemon started")[1]) == SKIPPED
    time.sleep(1)       # pickup's and qmgr's first wakeups of the new generation
    log = instance.log()
    assert "fatal" not in log and "Traceback" not in log and "uncaught exception" not in log
    assert "exit status" not in log and "throttling" not in log


def test_start_says_what_it_skips_on_standard_error(instance):
    port = free_port()
    instance.write()
    (instance.dir / "master.cf").write_text(debian_master_cf(port))
    instance.write = lambda: None
    out = instance.start()
    assert skip_lines(out.stderr) == SKIPPED
    assert "postfix-py/postfix-script: warning: " in out.stderr
