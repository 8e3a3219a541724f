"""spawn - run an external command for each connection, as Postfix's spawn(8).

SYNOPSIS
    master.cf:  policy  unix  -  n  n  -  0  spawn  user=nobody argv=/usr/bin/policyd-spf
    main.cf:    smtpd_recipient_restrictions = ..., check_policy_service unix:private/policy
                policy_time_limit = 3600

DESCRIPTION
    spawn waits on the service's socket (unix or inet) and, for each connection, runs the
    command of the argv= attribute with its standard input, output and error connected to
    the client, as the user of the user= attribute; it waits for the command to end
    before it takes the next connection (run several processes for several clients: the
    service's process limit). This is how Postfix runs policy servers written for one
    client on standard input and output (postfix-policyd-spf-python, policyd-weight).

COMMAND ATTRIBUTES (master.cf, after the command name)
    user=username or user=username:groupname (required): the rights of the command;
        the group is username's unless one is named. Root, mail_owner, their group ids
        and the id -1 are refused (Postfix's fatal errors: "request to deliver as root",
        "request to deliver as mail system owner", "request to use privileged group id
        0", "request to use mail system owner group id N").
    argv=command ... (required, last): the command and its arguments, executed directly
        (no shell); `{ ... }` groups an argument with white space, as master.cf does.
    Anything else: "unknown attribute name: X"; none of them: "missing user= attribute",
    "missing argv= attribute". These are checked in the master, before the service
    starts, and again by the process.

    The command runs in a new session, in queue_directory, with an environment of only
    TZ, LANG and MAIL_CONFIG (Postfix's export_environment) and PATH=/usr/bin:/bin.

TIME LIMIT
    SERVICE_time_limit, where SERVICE is the first field of the master.cf line
    (policy_time_limit above; default $command_time_limit, 1000s): a command that runs
    longer is logged `COMMAND: process id PID: command time limit exceeded` and its
    whole process group gets SIGKILL. These names exist for every spawn service, so
    they are not in lib/params.py's table; main.cf or `-o` sets them.

DIAGNOSTICS
    An unsuccessful end is logged as Postfix does: `command COMMAND exit status N`,
    `command COMMAND killed by signal N`. A command that cannot be executed is logged
    `spawn_command: execvp COMMAND: REASON` and then as exit status 1 (Postfix's child
    logs the first line, its parent the second).

SECURITY
    spawn keeps root (master.cf unpriv column n) only to start each command as its
    user; it reads nothing from the client. The command never runs as root or as
    mail_owner. Run it without chroot (chroot column n), as the command needs the file
    system.

CONFIGURATION PARAMETERS
    SERVICE_time_limit ($command_time_limit), command_time_limit (1000s), mail_owner,
    queue_directory, max_use, max_idle, daemon_timeout.

SEE ALSO
    lib/policy_client.py (smtpd's side of check_policy_service); Postfix spawn(8),
    spawn_command.c.
"""

from __future__ import annotations

import grp
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass

from ..lib import msg, params, server
from ..lib.maincf import ConfigError

PATH = "/usr/bin:/bin"                  # Postfix's _PATH_DEFPATH
EXPORT = ("TZ", "LANG")                 # export_environment, with MAIL_CONFIG


@dataclass
class Attributes:
    argv: list[str]
    uid: int
    gid: int
    time_limit: int


def attributes(cfg, service) -> Attributes:
    """The command attributes of a spawn service line; ConfigError as Postfix's fatals."""
    user = group = None
    argv = None
    uid = gid = -1
    args = list(service.args)
    for i, word in enumerate(args):
        low = word.lower()
        if low.startswith("user="):
            user, _, group = word[5:].partition(":")
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                raise ConfigError(f"unknown user name: {user}") from None
            uid, gid = pw.pw_uid, pw.pw_gid
            if group:
                try:
                    gid = grp.getgrnam(group).gr_gid
                except KeyError:
                    raise ConfigError(f"unknown group name: {group}") from None
        elif low.startswith("argv="):
            argv = [word[5:]] + args[i + 1:]
            break
        else:
            raise ConfigError(f"unknown attribute name: {word}")
    if user is None:
        raise ConfigError("missing user= attribute")
    if not argv or not argv[0]:
        raise ConfigError("missing argv= attribute")
    try:
        owner = pwd.getpwnam(cfg.get("mail_owner"))
    except KeyError:
        raise ConfigError(f"unknown mail_owner: {cfg.get('mail_owner')}") from None
    if uid == 0:
        raise ConfigError("request to deliver as root")
    if uid == owner.pw_uid:
        raise ConfigError("request to deliver as mail system owner")
    if gid == 0:
        raise ConfigError("request to use privileged group id 0")
    if gid == owner.pw_gid:
        raise ConfigError(f"request to use mail system owner group id {gid}")
    if uid in (-1, 0xFFFFFFFF) or gid in (-1, 0xFFFFFFFF):
        raise ConfigError("user must not have user ID -1")
    return Attributes(argv, uid, gid, time_limit(cfg, service.name))


def time_limit(cfg, service_name: str) -> int:
    """SERVICE_time_limit, else command_time_limit (Postfix's get_mail_conf_time2)."""
    name = f"{service_name}_time_limit"
    if not cfg.is_set(name):
        return cfg["command_time_limit"]
    try:
        return params.convert(params.Param(name, "", params.TIME, "", min=1), cfg.get(name))
    except params.ParamError as exc:
        raise ConfigError(str(exc)) from None


def run(attrs: Attributes, fd: int, env: dict[str, str]) -> None:
    """Run the command on fd, wait for it within the time limit, log a bad end."""
    command = attrs.argv[0]
    os.set_blocking(fd, True)           # the command's stdin and stdout, as Postfix's
    try:
        proc = subprocess.Popen(attrs.argv, stdin=fd, stdout=fd, stderr=fd, env=env,
                                user=attrs.uid, group=attrs.gid, extra_groups=[],
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        msg.warn(f"spawn_command: execvp {command}: {exc.strerror}")
        msg.warn(f"command {command} exit status 1")
        return
    try:
        status = proc.wait(attrs.time_limit)
    except subprocess.TimeoutExpired:
        msg.warn(f"{command}: process id {proc.pid}: command time limit exceeded")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError as exc:
            msg.warn(f"parent: kill: {exc.strerror}")
        status = proc.wait()
    if status > 0:
        msg.warn(f"command {command} exit status {status}")
    elif status < 0:
        msg.warn(f"command {command} killed by signal {-status}")


# --- the program ---------------------------------------------------------------------------
def prepare(cfg, service) -> None:
    """Run in the master: a bad attribute stops the service from starting, and says why."""
    attributes(cfg, service)


def pre_init(ctx) -> None:
    try:
        ctx.state["attrs"] = attributes(ctx.cfg, ctx.service)
    except ConfigError as exc:
        msg.fatal(str(exc))
    env = {name: os.environ[name] for name in EXPORT if name in os.environ}
    env["MAIL_CONFIG"] = ctx.cfg.config_dir
    env["PATH"] = PATH
    ctx.state["env"] = env


def service(conn, ctx) -> None:
    run(ctx.state["attrs"], conn.fileno(), ctx.state["env"])


def main(ctx) -> int:
    return server.single_server(ctx, service, pre_init=pre_init)
