"""local - deliver mail to local users' mailboxes, as Postfix's local(8).

SYNOPSIS
    master.cf:  local  unix  -  n  n  -  -  local

DESCRIPTION
    local takes one lib/deliver.py request at a time from qmgr (lib/delivery_agent.py) and
    delivers the message to each recipient's mailbox. The recipient's local part, without
    its address extension (recipient_delimiter) and lower-cased, names a UNIX account
    (getpwnam). Where the mail goes, as in Postfix (local/mailbox.c):

        home_mailbox ending in /           maildir  ~user/$home_mailbox
        home_mailbox set                   mbox     ~user/$home_mailbox
        mail_spool_directory ending in /   maildir  $mail_spool_directory/user/
        otherwise                          mbox     $mail_spool_directory/user

    Each delivered copy gets Return-Path:, X-Original-To: and Delivered-To: headers
    (lib/mailbox.py). Outcomes, with Postfix's texts:

        delivered                          sent 2.0.0 "delivered to maildir" or
                                           "delivered to mailbox"
        no such account                    bounced 5.1.1 `unknown user: "name"`
        postmaster or mailer-daemon without an account
                                           sent 2.0.0 "discarded", with the warning
                                           `required alias not found: postmaster`
                                           (Postfix requires these as aliases)
        Delivered-To: already names the recipient
                                           bounced 5.4.6 "mail forwarding loop for R"
        the mailbox cannot be written      deferred 4.2.0 / 4.3.1, or bounced 5.2.2 when
                                           over quota (lib/mailbox.py)
        the queue file cannot be read      deferred 4.3.0 "queue file read error"

    Aliases, .forward files, mailbox_command and file or program destinations are not
    implemented: an account's mailbox is the only destination.

    With `local_delivery_any_user = yes` (a postfix-py extension for self-contained
    instances, default no) a local part without an account that is a safe file name
    (letters, digits, `.`, `_`, `-`; not starting with `.`) is delivered into
    mail_spool_directory under that name as if it were an account of the default_privs
    user: the mailbox is written with that user's uid and gid, and owned by it (the spool
    rule under SECURITY applies). A default_privs that names no account defers such mail (4.3.0
    "local configuration error", with the warning `unknown default_privs user: NAME`).
    default_privs plays no other part here: file and program destinations, for which
    Postfix uses it, are not implemented.

SECURITY
    The process runs as root, unchrooted (master.cf: unprivileged n), because it delivers
    with each recipient's privileges: every delivery runs in a forked child that has read
    the message as root and then set its groups, gid and uid to the recipient's for good
    before it opens anything of the recipient's (Postfix does this with set_eugid). Mail
    for root is written as root, as in Postfix. An mbox in a spool directory that is not
    writable by the user is created as root and given to the user (Postfix's rule); the
    child then drops to the user before writing. When the process is not root (a plain-user
    instance, or unprivileged y), every delivery runs with its own privileges. A mailbox
    opened as root that belongs to someone else, or has more than one link, is refused
    (deferred 4.2.0).

CONFIGURATION PARAMETERS
    mail_spool_directory (/var/mail), home_mailbox (empty), recipient_delimiter (empty),
    soft_bounce (no), ipc_timeout (3600s), default_privs (nobody: only for
    local_delivery_any_user), local_delivery_any_user (no).

FILES
    $mail_spool_directory/user, ~user/$home_mailbox, and their maildir subdirectories.

SEE ALSO
    Postfix local(8); lib/mailbox.py; lib/delivery_agent.py; lib/deliver.py.
"""

from __future__ import annotations

import os
import pwd
import re

from ..lib import mailbox, msg, server
from ..lib import queue as Q
from ..lib.address import split_address, strip_extension
from ..lib.delivery_agent import RcptResult, decided, result, serve
from ..lib.mailbox import Privileges, run_as

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
QUEUE_FILE = re.compile(r"active/[A-Za-z0-9_]{1,64}")
REQUIRED_ALIASES = ("postmaster", "mailer-daemon")


class LocalDelivery:
    """One request's deliveries: the message read once, each recipient in turn."""

    def __init__(self, cfg, sender: str, content: bytes):
        self.cfg = cfg
        self.sender = sender
        self.content = content
        self.seen = mailbox.delivered_to(content)
        self.spool = cfg.get("mail_spool_directory")
        self.home_mailbox = cfg.get("home_mailbox")
        self.delimiters = cfg.get("recipient_delimiter")
        self.any_user = cfg["local_delivery_any_user"]
        self.default_privs = cfg.get("default_privs")

    def deliver(self, rcpt: str) -> RcptResult:
        """Deliver to one recipient."""
        local, _ = split_address(rcpt)
        user = strip_extension(local, self.delimiters).lower()
        if rcpt.lower() in self.seen:
            return result("bounced", "5.4.6", f"mail forwarding loop for {rcpt}")
        try:
            pw = pwd.getpwnam(user) if user else None
        except KeyError:
            pw = None
        except OSError as exc:
            msg.warn(f"error looking up passwd info for {user}: {exc}")
            return result("deferred", "4.0.0", "user lookup error")
        if pw is None:
            if user in REQUIRED_ALIASES:
                msg.warn(f"required alias not found: {user}")
                return result("sent", "2.0.0", "discarded")
            if not (self.any_user and not self.home_mailbox and SAFE_NAME.fullmatch(user)):
                return result("bounced", "5.1.1", f'unknown user: "{user}"')
            try:
                owner = pwd.getpwnam(self.default_privs)
            except KeyError:
                msg.warn(f"unknown default_privs user: {self.default_privs}")
                return result("deferred", "4.3.0", "local configuration error")
            uid, gid, home = owner.pw_uid, owner.pw_gid, None
        else:
            uid, gid, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        headers = mailbox.added_headers(self.sender, rcpt)
        if self.home_mailbox:
            path = os.path.join(home, self.home_mailbox)
            maildir = self.home_mailbox.endswith("/")
            privs = Privileges(uid, gid)
        else:
            path = os.path.join(self.spool, user) + ("/" if self.spool.endswith("/") else "")
            maildir = self.spool.endswith("/")
            privs = self._spool_privileges(uid, gid, maildir)
        if maildir:
            def work(drop):
                mailbox.deliver_maildir(path, headers, self.content)
                return ["sent", "2.0.0", "delivered to maildir"]
        else:
            def work(drop):
                try:
                    fd, created = mailbox.open_mbox(path)
                    if privs.open_as_root:
                        st = os.fstat(fd)
                        if created:
                            os.fchown(fd, uid, gid)
                        elif st.st_uid != uid or st.st_nlink != 1:
                            # Opened as root: never append to someone else's file.
                            os.close(fd)
                            return ["deferred", "4.2.0", f"destination {path} is not owned "
                                    "by recipient" if st.st_uid != uid else
                                    f"destination {path} has {st.st_nlink} hard links"]
                except OSError as exc:
                    return [_kind(mailbox.mbox_dsn(exc.errno, "5.2.0")),
                            mailbox.mbox_dsn(exc.errno, "5.2.0"),
                            f"cannot update mailbox {path} for user {user}. "
                            f"cannot open file: {exc.strerror}"]
                try:
                    drop()
                    mailbox.deliver_mbox(path, self.sender, headers, self.content, fd=fd)
                finally:
                    os.close(fd)
                return ["sent", "2.0.0", "delivered to mailbox"]

        def guarded(drop):
            try:
                return work(drop)
            except mailbox.MailboxError as exc:
                text = exc.text if maildir else \
                    f"cannot update mailbox {path} for user {user}. {exc.text}"
                return [_kind(exc.dsn), exc.dsn, text]
        kind, dsn, reason = run_as(privs, guarded)
        if maildir and kind != "sent" and "Permission denied" in reason:
            msg.warn(f"maildir access problem for UID/GID={uid}/{gid}: {reason}")
        return result(kind, dsn, reason)

    def _spool_privileges(self, uid: int, gid: int, maildir: bool) -> Privileges:
        """Postfix's rule: world-writable spool as the user; group-writable with the
        spool's group; otherwise open as root and hand the file to the user."""
        if maildir:
            return Privileges(uid, gid)
        try:
            st = os.stat(self.spool)
        except OSError:
            return Privileges(uid, gid)
        if st.st_mode & 0o002:
            return Privileges(uid, gid)
        if st.st_mode & 0o020:
            return Privileges(uid, st.st_gid)
        return Privileges(uid, gid, open_as_root=True)


def _kind(dsn: str) -> str:
    return "bounced" if dsn.startswith("5") else "deferred"


def deliver_request(request, ctx):
    """Deliver one request: (relay, results)."""
    n = len(request.recipients)
    if not QUEUE_FILE.fullmatch(request.queue_file):
        msg.warn(f"{request.queue_id}: bad queue file name: {request.queue_file!r}")
        return "local", [result("deferred", "4.3.0", "queue file read error")] * n
    path = os.path.join(ctx.queue_root, request.queue_file)
    try:
        env = Q.read(path)
        content = b"".join(env.content(path))
    except (OSError, Q.QueueFileError) as exc:
        msg.warn(f"{request.queue_id}: read queue file: {exc}")
        return "local", [result("deferred", "4.3.0", "queue file read error")] * n
    job = LocalDelivery(ctx.cfg, request.sender, content)
    return "local", [job.deliver(rcpt) for rcpt in request.recipients]


def service(conn, ctx) -> None:
    """One connection from qmgr: one request."""
    serve(conn, ctx, decided(deliver_request))


def main(ctx) -> int:
    """Serve delivery requests until the master retires this process."""
    return server.single_server(ctx, service)
