"""local/spawn.py's command attributes and time limit, as Postfix's spawn(8) reads them;
its commands run for real in tests/integration/test_smtpd_policy.py."""

import pwd

import pytest

from postfix_py.lib import maincf, mastercf
from postfix_py.local import spawn


def config(**values):
    return maincf.Config("/nonexistent", "/nonexistent/main.cf",
                         overrides={"mail_owner": "nobody", **values})


def service(attrs: str):
    return mastercf.parse_entry(f"policy unix - n n - 0 spawn {attrs}", "master.cf", 1)


@pytest.mark.parametrize("attrs,error", [
    ("user=root argv=/bin/cat", "request to deliver as root"),
    ("user=nobody argv=/bin/cat", "request to deliver as mail system owner"),
    ("user=daemon:root argv=/bin/cat", "request to use privileged group id 0"),
    ("argv=/bin/cat", "missing user= attribute"),
    ("user=daemon", "missing argv= attribute"),
    ("user=daemon color=blue argv=/bin/cat", "unknown attribute name: color=blue"),
    ("user=no-such-user-here argv=/bin/cat", "unknown user name: no-such-user-here"),
])
def test_bad_attributes_are_refused_as_postfix(attrs, error):
    with pytest.raises(maincf.ConfigError, match=error):
        spawn.attributes(config(), service(attrs))


def test_attributes_and_the_per_service_time_limit():
    daemon = pwd.getpwnam("daemon")
    a = spawn.attributes(config(), service("user=daemon argv=/usr/bin/policyd-spf -v { a b }"))
    assert (a.uid, a.gid) == (daemon.pw_uid, daemon.pw_gid)
    assert a.argv == ["/usr/bin/policyd-spf", "-v", "a b"]
    assert a.time_limit == 1000                                 # $command_time_limit
    assert spawn.attributes(config(policy_time_limit="1h"),
                            service("user=daemon argv=/bin/cat")).time_limit == 3600
    assert spawn.attributes(config(command_time_limit="20s"),
                            service("user=daemon argv=/bin/cat")).time_limit == 20
    with pytest.raises(maincf.ConfigError, match="policy_time_limit"):
        spawn.attributes(config(policy_time_limit="soon"), service("user=daemon argv=/bin/cat"))
