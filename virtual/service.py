"""virtual - deliver mail for virtual mailbox domains, as Postfix's virtual(8).

SYNOPSIS
    master.cf:  virtual  unix  -  n  n  -  -  virtual

DESCRIPTION
    qmgr sends mail for the domains of virtual_mailbox_domains to virtual_transport
    (default virtual: this agent; lib/resolve.py). virtual takes one lib/deliver.py
    request at a time (lib/delivery_agent.py) and delivers each recipient into the
    mailbox that virtual_mailbox_maps names for it. Every decision uses the full recipient
    address folded to lower case, looked up as Postfix's mail_addr_find() does
    (lib/address.py addr_find): user+ext@domain, user@domain, then @domain (the
    catch-all); regexp: and pcre: tables see the full address only.

    The mailbox is $virtual_mailbox_base/$virtual_mailbox_maps(recipient): a path ending
    in / is a maildir (tmp/, new/, cur/ are created as needed), anything else an mbox file
    (fcntl-locked; postfix-py does not dot-lock, so virtual_mailbox_lock is not a
    parameter here). The message gets Return-Path:, X-Original-To: (the recipient's
    original address, from the request; none with enable_original_recipient = no) and
    Delivered-To: headers (lib/mailbox.py). The mailbox owner is virtual_uid_maps(recipient) and
    virtual_gid_maps(recipient): numeric IDs, typically `static:5000`.

    Outcomes, with Postfix's texts:

        delivered                     sent 2.0.0 "delivered to maildir" or
                                      "delivered to mailbox"
        not in virtual_mailbox_maps   bounced 5.1.1 `unknown user: "user@domain"`
        a table lookup fails          deferred 4.3.5 "mail system configuration error",
                                      warning `table virtual_mailbox_maps: lookup R: ...`
        no uid or gid for the         deferred 4.3.5 "mail system configuration error",
        recipient, or a bad one       warning `recipient R: not found in virtual_uid_maps`
                                      or `recipient R: bad uid N in virtual_uid_maps`
                                      (a uid below virtual_minimum_uid, a gid of 0, or
                                      not a number is bad)
        a path with /../              deferred 4.3.5, warning `recipient R: bad mailbox
                                      path P in virtual_mailbox_maps`
        the mbox is not a regular     bounced 5.3.5 "mail system configuration error",
        file                          warning `recipient R: destination P is not a
                                      regular file`
        the mbox is not owned by the  deferred 4.2.0 "destination P is not owned by
        recipient's uid               recipient" (Postfix's strict_mailbox_ownership)
        the mailbox cannot be written deferred 4.x.x, or bounced 5.2.2 when over quota or
                                      over virtual_mailbox_limit ("maildir delivery
                                      failed: ..." or "delivery failed to mailbox P: ...")
        the queue file cannot be read deferred 4.3.0 "queue file read error"

    virtual_mailbox_limit (bytes, 0: none) is the largest file virtual writes: an mbox
    that would grow past it, or a maildir message larger than it, fails with EFBIG
    (5.2.2), as Postfix's set_file_limit(). It must not be smaller than
    message_size_limit, and a limit with an unlimited message_size_limit is refused:
    `fatal: configuration error: virtual_mailbox_limit is smaller than
    message_size_limit`, `... is limited but message_size_limit is unlimited`.

    Unknown recipients are bounced here; smtpd can reject them at RCPT TO with
    lib/address.py virtual_mailbox_known().

    An address verification probe (the request flag "verify", verify/service.py, or
    "expand", sendmail -bv) goes as far as the mailbox's path and owner: sent 2.0.0
    "delivers to maildir" or "delivers to mailbox", nothing written;
    lib/delivery_agent.py reports the result.

SECURITY
    The process runs as root, unchrooted (master.cf: unprivileged n, chroot n), because
    it delivers with each mailbox owner's rights: every delivery runs in a forked child
    that has read the message as root and then set its groups, gid and uid for good
    before it opens anything under virtual_mailbox_base (lib/mailbox.py run_as). Root
    (uid 0, below virtual_minimum_uid) and gid 0 are refused as owners. The lookup tables
    decide who writes where, so they must be writable by root only. When the process is
    not root, it delivers with its own rights.

CONFIGURATION PARAMETERS
    virtual_mailbox_maps (empty), virtual_mailbox_base (empty; must be an absolute path:
    `fatal: do not specify relative pathname: virtual_mailbox_base = X`),
    virtual_uid_maps (empty), virtual_gid_maps (empty), virtual_minimum_uid (100),
    virtual_mailbox_limit (51200000), message_size_limit (10240000),
    recipient_delimiter (empty), soft_bounce (no), ipc_timeout (3600s),
    enable_original_recipient (yes).

SEE ALSO
    Postfix virtual(8), VIRTUAL_README; lib/resolve.py; lib/mailbox.py;
    lib/address.py; lib/delivery_agent.py.
"""

from __future__ import annotations

import os
import stat

from ..lib import mailbox, msg, server, tables, verify_client
from ..lib.address import addr_find
from ..lib.delivery_agent import RcptResult, decided, read_message, result, serve

CONFIG_ERROR = "mail system configuration error"
MAX_ID = 0xFFFFFFFE            # (uid_t) -1 is special to Postfix's safe_open()


class Agent:
    """The opened tables and settings: made once per process, before serving."""

    def __init__(self, cfg):
        self.base = cfg.get("virtual_mailbox_base")
        if not self.base.startswith("/"):
            raise ValueError(f"do not specify relative pathname: virtual_mailbox_base = "
                             f"{self.base}")
        limit, size = cfg["virtual_mailbox_limit"], cfg["message_size_limit"]
        if limit:
            if not size:
                raise ValueError("configuration error: virtual_mailbox_limit is limited "
                                 "but message_size_limit is unlimited")
            if limit < size:
                raise ValueError("configuration error: virtual_mailbox_limit is smaller "
                                 "than message_size_limit")
        self.limit = limit
        self.minimum_uid = cfg["virtual_minimum_uid"]
        self.delimiters = cfg.get("recipient_delimiter")
        self.maps = {name: [tables.open_table(ref) for ref in cfg[name]]
                     for name in ("virtual_mailbox_maps", "virtual_uid_maps",
                                  "virtual_gid_maps")}

    def find(self, name: str, user: str) -> str | None:
        """The value of user in the tables of parameter name; raises on a table failure."""
        found = addr_find(self.maps[name], user, self.delimiters)
        return None if found is None else found[0]

    def _owner_id(self, name: str, user: str, what: str) -> int | RcptResult:
        """The uid or gid for user, or the deferral that its absence or badness means."""
        try:
            text = self.find(name, user)
        except Exception as exc:        # a table backend error: not "not found"
            msg.warn(f"table {name}: lookup {user}: {exc}")
            return result("deferred", "4.3.5", CONFIG_ERROR)
        if text is None:
            msg.warn(f"recipient {user}: not found in {name}")
            return result("deferred", "4.3.5", CONFIG_ERROR)
        n = int(text) if text.isascii() and text.isdigit() else -1
        bad = (n < 0 or n > MAX_ID
               or (what == "uid" and n < self.minimum_uid) or (what == "gid" and n == 0))
        if bad:
            msg.warn(f"recipient {user}: bad {what} {text} in {name}")
            return result("deferred", "4.3.5", CONFIG_ERROR)
        return n

    def deliver(self, rcpt: str, sender: str, content: bytes,
                verify: bool = False, original: str | None = None) -> RcptResult:
        """Deliver the message to one recipient; with verify (an address verification
        probe) find the mailbox but write nothing, as Postfix's DEL_REQ_TRACE_ONLY.
        original: the recipient's original address for X-Original-To: (None: rcpt;
        "": no such header, enable_original_recipient = no)."""
        user = rcpt.lower()
        try:
            found = self.find("virtual_mailbox_maps", user)
        except Exception as exc:        # a table backend error: not "not found"
            msg.warn(f"table virtual_mailbox_maps: lookup {user}: {exc}")
            return result("deferred", "4.3.5", CONFIG_ERROR)
        if found is None:
            return result("bounced", "5.1.1", f'unknown user: "{user}"')
        path = f"{self.base}/{found}"
        if "/../" in path[len(self.base):]:
            msg.warn(f"recipient {user}: bad mailbox path {found} in virtual_mailbox_maps")
            return result("deferred", "4.3.5", CONFIG_ERROR)
        uid = self._owner_id("virtual_uid_maps", user, "uid")
        if isinstance(uid, RcptResult):
            return uid
        gid = self._owner_id("virtual_gid_maps", user, "gid")
        if isinstance(gid, RcptResult):
            return gid
        if verify:
            return result("sent", "2.0.0", "delivers to maildir" if path.endswith("/")
                          else "delivers to mailbox")
        headers = mailbox.added_headers(sender, rcpt, original)
        if path.endswith("/"):
            work = _maildir_work(path, headers, content)
        else:
            work = _mbox_work(path, uid, rcpt, sender, headers, content)
        kind, dsn, reason = mailbox.run_as(mailbox.Privileges(uid, gid), work,
                                           program="virtual", file_limit=self.limit)
        if path.endswith("/") and kind != "sent" and "Permission denied" in reason:
            msg.warn(f"maildir access problem for UID/GID={uid}/{gid}: {reason}")
            msg.warn("perhaps you need to create the maildirs in advance")
        return result(kind, dsn, reason)

    def close(self) -> None:
        for maps in self.maps.values():
            for table in maps:
                table.close()


def _kind(dsn: str) -> str:
    return "bounced" if dsn.startswith("5") else "deferred"


def _maildir_work(path: str, headers: bytes, content: bytes):
    def work(drop):
        try:
            mailbox.deliver_maildir(path, headers, content)
        except mailbox.MailboxError as exc:
            return [_kind(exc.dsn), exc.dsn, exc.text]
        return ["sent", "2.0.0", "delivered to maildir"]
    return work


def _mbox_work(path: str, uid: int, rcpt: str, sender: str, headers: bytes, content: bytes):
    def work(drop):
        try:
            fd, _ = mailbox.open_mbox(path)
        except OSError as exc:
            dsn = mailbox.mbox_dsn(exc.errno, "4.2.0")
            return [_kind(dsn), dsn, f"delivery failed to mailbox {path}: "
                    f"cannot open file: {exc.strerror}"]
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                msg.warn(f"recipient {rcpt}: destination {path} is not a regular file")
                return ["bounced", "5.3.5", CONFIG_ERROR]
            if os.geteuid() == uid and st.st_uid != uid:
                return ["deferred", "4.2.0", f"destination {path} is not owned by recipient"]
            try:
                mailbox.deliver_mbox(path, sender, headers, content, fd=fd)
            except mailbox.MailboxError as exc:
                return [_kind(exc.dsn), exc.dsn,
                        f"delivery failed to mailbox {path}: {exc.text}"]
        finally:
            os.close(fd)
        return ["sent", "2.0.0", "delivered to mailbox"]
    return work


def deliver_request(request, ctx):
    """Deliver one request: (relay, results)."""
    found = read_message(request, ctx)
    if found is None:
        return "virtual", [result("deferred", "4.3.0", "queue file read error")] * len(
            request.recipients)
    content = found[1]
    agent = ctx.state["agent"]
    verify = verify_client.trace_only(request.flags)
    keep = ctx.cfg["enable_original_recipient"]
    return "virtual", [agent.deliver(rcpt, request.sender, content, verify,
                                     request.original(i) if keep else "")
                       for i, rcpt in enumerate(request.recipients)]


def pre_init(ctx) -> None:
    """Check the settings and open the tables once, before serving."""
    try:
        ctx.state["agent"] = Agent(ctx.cfg)
    except (ValueError, tables.TableError) as exc:
        msg.fatal(str(exc))


def service(conn, ctx) -> None:
    """One connection from qmgr: one request."""
    serve(conn, ctx, decided(deliver_request))


def main(ctx) -> int:
    """Serve delivery requests until the master retires this process."""
    return server.single_server(ctx, service, pre_init=pre_init)
