"""local - deliver mail to local recipients, as Postfix's local(8).

SYNOPSIS
    master.cf:  local  unix  -  n  n  -  -  local

DESCRIPTION
    local takes one lib/deliver.py request at a time from qmgr (lib/delivery_agent.py) and
    delivers the message for each recipient, in Postfix's order (local/recipient.c):

     1. A Delivered-To: header that already names the address: bounced 5.4.6 "mail
        forwarding loop for ADDR". An address written \\user goes to user's mailbox
        directly (no alias, no .forward).
     2. alias_maps: the lower-cased local part (user+ext) is looked up, then without its
        extension (user), in each table in turn. Each destination of the value (aliases(5),
        lib/aliases.py) is delivered in turn:
            /file/name      appended, mbox style (a name ending in / is a maildir)
            |command        run, the message on its standard input (local/command.py)
            :include:/file  the file's destinations, each delivered in turn
            ~/file          a file in the home directory of the user whose rights apply
            address         a local address (no domain, or a literal mydestination
                            domain) is delivered here, from step 1 (an alias that names
                            itself goes to the mailbox); any other is forwarded
        When alias_maps also has owner-NAME, owner-NAME@$myorigin becomes the sender of
        the expansion (Return-Path of its files, SENDER of its commands, the sender of
        the forwarded copy) and its local addresses are forwarded, as in Postfix; bounces
        of its file and command deliveries still go to the original sender (qmgr bounces
        the recipient). An unreadable table defers: 4.3.0 "alias database unavailable" (warning
        `TABLE: lookup of 'NAME' failed`). More than 100 levels: bounced 5.4.6 "alias
        database loop for NAME" or "recipient nesting limit exceeded".
     3. .forward: the first file of forward_path that exists (expanded with $user, $home,
        $local, $extension, $recipient_delimiter, $domain, $recipient, $shell; an entry
        with an undefined name is skipped) is read with the user's rights; its
        destinations are delivered as an alias's. A file that is not regular, is owned
        by neither the user nor root, or is world writable is ignored with Postfix's
        warning (`file F has bad owner uid N`, `file F is world writable`), and the mail
        goes to the mailbox. Local addresses named in a .forward or :include: file other
        than the user's own are forwarded, as in Postfix.
     4. The mailbox: mailbox_command when set (run as the user, or as default_privs for
        root, $name expanded as for forward_path), else as Postfix's local/mailbox.c:
            home_mailbox ending in /           maildir  ~user/$home_mailbox
            home_mailbox set                   mbox     ~user/$home_mailbox
            mail_spool_directory ending in /   maildir  $mail_spool_directory/user/
            otherwise                          mbox     $mail_spool_directory/user

    FORWARDING. The forwarded addresses of one recipient become one new queue file (the
    original sender, a Delivered-To: header naming the recipient, then the message),
    written into incoming/ as mail_owner, and qmgr is woken; the recipient is logged
    `status=sent (forwarded as NEWID)`. (Postfix hands them to cleanup, which postfix-py
    does not have yet; qmgr resolves them as any other message.) The copies keep the
    recipient's DSN NOTIFY without SUCCESS (NEVER when it was SUCCESS alone) and its
    ORCPT, and the message's ENVID and RET; for a list with an owner- alias only NOTIFY
    (Postfix's forward.c and alias.c).

    DSN. A recipient delivered through an alias or .forward gets the DSN action
    "expanded" with the text `alias expanded` (a list with an owner- alias: "delivered"),
    so that a NOTIFY=SUCCESS sender gets one success notice for it, and none for the
    addresses it expanded to, as Postfix's local(8); the log line shows the last
    delivery's own text. (Postfix also reports "expanded" for an alias whose members
    then fail in part; here a recipient has one result, and a deferral or bounce wins.)

    RESULTS. Each recipient of the request gets one result: deferred if a destination
    was deferred, else bounced if one was bounced, else sent; its other successful
    destinations are logged on lines of their own. Each line names the address that
    was delivered at that level of the expansion (the local user an alias names; the
    alias itself for its files, commands and forwarded copies) and, when that differs,
    the original recipient: `to=<nobody@host>, orig_to=<postmaster@host>`, as Postfix's
    local. Texts, as Postfix's:

        mailbox                            sent 2.0.0 "delivered to maildir" or
                                           "delivered to mailbox"
        file                               sent 2.0.0 "delivered to file: PATH"; bounced
                                           5.7.1 "file is executable"; "cannot append
                                           message to file PATH: ..."
        command                            sent 2.0.0 "delivered to command: CMD"; exit
                                           codes as local/command.py
        |command or /file where not allowed bounced 5.7.1 "mail to command is
                                           restricted" / "mail to file is restricted"
        no such account                    bounced 5.1.1 `unknown user: "name"`
        postmaster or mailer-daemon without alias or account
                                           sent 2.0.0 "discarded", with the warning
                                           `required alias not found: postmaster`
        bad :include: file                 bounced 5.3.5 "mail system configuration error"
        the mailbox cannot be written      deferred 4.2.0 / 4.3.1, or bounced 5.2.2 when
                                           over quota (lib/mailbox.py)
        the queue file cannot be read      deferred 4.3.0 "queue file read error"

    PROBES. An address verification probe (the request flag "verify",
    verify/service.py, or "expand", sendmail -bv) finds where the mail would go and stops there, with Postfix's
    texts: sent 2.0.0 "aliased to VALUE", "forward via file: PATH", "delivers to
    mailbox" (or maildir), "delivers to file: PATH", "delivers to command: CMD",
    "forwards to ADDRS"; an unknown user bounces as above. Nothing is written, run or
    forwarded; lib/delivery_agent.py reports the result to the verify service.

    Each delivered copy gets Return-Path:, X-Original-To: (the recipient's original
    address from the request: as the client gave it, before canonical_maps,
    virtual_alias_maps and alias or .forward expansion; none with
    enable_original_recipient = no) and Delivered-To: (the recipient qmgr gave, its
    local part quoted when it must be; Postfix's frozen_delivered_to) headers
    (lib/mailbox.py); a copy forwarded through the queue gets it lower-cased and
    unquoted, as Postfix's forward.c writes it; a command or
    file also gets the `From ` line first, and the ORIGINAL_RECIPIENT variable. Copies
    forwarded through the queue keep the original address (Postfix's orig_rcpt).

    With `local_delivery_any_user = yes` (a postfix-py extension for self-contained
    instances, default no) a local part without an account that is a safe file name
    (letters, digits, `.`, `_`, `-`; not starting with `.`) is delivered into
    mail_spool_directory under that name as if it were an account of the default_privs
    user: the mailbox is written with that user's uid and gid, and owned by it (the spool
    rule under SECURITY applies). A default_privs that names no account defers such mail
    (4.3.0 "local configuration error", with the warning `unknown default_privs user:
    NAME`).

SECURITY
    The process runs as root, unchrooted (master.cf: unprivileged n), because it delivers
    with each recipient's privileges: every mailbox, file and command delivery, and every
    read of a .forward or :include: file, runs in a forked child (a command in its own
    process group) that has set its groups, gid and uid for good before it opens
    anything (Postfix does this with set_eugid). Whose rights: for an alias, the owner
    of the alias database file, or default_privs when root owns it; for a .forward
    file, the user; for an :include: file in a root-owned alias, the include file's
    owner (unless root); files and commands never run as root (default_privs instead).
    Mail for root's mailbox is written as root, as in Postfix. An mbox in a spool
    directory that is not writable by the user is created as root and given to the user
    (Postfix's rule); the child then drops to the user before writing. When the process
    is not root (a plain-user instance, or unprivileged y), everything runs with its own
    privileges. A mailbox opened as root that belongs to someone else, or has more than
    one link, is refused (deferred 4.2.0). .forward and :include: files are read up to
    1 MB.

CONFIGURATION PARAMETERS
    alias_maps (hash:/etc/aliases), forward_path ($home/.forward${recipient_delimiter}
    ${extension}, $home/.forward), allow_mail_to_commands (alias, forward),
    allow_mail_to_files (alias, forward), command_time_limit (1000s), mailbox_command
    (empty), mail_spool_directory (/var/mail), home_mailbox (empty), recipient_delimiter
    (empty), default_privs (nobody), myorigin and mydestination (for addresses that
    aliases name), mail_owner (owner of forwarded queue files), soft_bounce (no),
    ipc_timeout (3600s), local_delivery_any_user (no), enable_original_recipient (yes).

LIMITS
    Not implemented: expand_owner_alias, propagate_unmatched_extensions,
    local_command_shell (commands always run with /bin/sh -c), command_execution_directory
    (commands run in /), export_environment (TZ and LANG are passed, PATH is
    /usr/bin:/bin), mailbox_transport, fallback_transport, luser_relay,
    mailbox_delivery_lock (fcntl only, no dotlock).
    mydestination entries that are tables are not consulted for addresses that aliases
    name (those are forwarded through qmgr, which resolves them). When one destination
    of a recipient is deferred, the whole recipient is, and its other destinations get
    the message again at the next try, as with Postfix.

FILES
    $mail_spool_directory/user, ~user/$home_mailbox, and their maildir subdirectories;
    the alias databases (postfix-py postalias, newaliases); ~user/.forward.

SEE ALSO
    Postfix local(8), aliases(5); lib/mailbox.py; local/command.py; lib/aliases.py;
    tools/postalias.py; lib/delivery_agent.py; lib/deliver.py.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import time

from ..lib import aliases, deliver, mailbox, maincf, msg, params, server, tables
from ..lib import queue as Q
from ..lib.address import split_address, strip_extension
from ..lib.delivery_agent import RcptResult, read_message, result, serve
from ..lib.mailbox import Privileges, become, run_as
from . import command as command_mod

SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
REQUIRED_ALIASES = ("postmaster", "mailer-daemon")
EXPANSION_TYPES = frozenset({"alias", "forward", "include"})
MAX_LEVEL = 100                    # Postfix's recursion limit (aliases, includes, recipients)
READ_LIMIT = 1 << 20               # a .forward or :include: file larger than this is cut
_ALIAS_TABLES: dict[str, tables.Table] = {}


def _alias_table(ref: str, cfg) -> tables.Table:
    """alias_maps tables, opened once per process (they follow rebuilds by themselves)."""
    table = _ALIAS_TABLES.get(ref)
    if table is None:
        table = _ALIAS_TABLES[ref] = tables.open_table(ref, cfg)
    return table


def _table_owner(ref: str) -> int | None:
    """uid of the file behind a table (0 for tables without a file); None when unknown."""
    type_, name = tables.split_ref(ref)
    path = tables.db_path(type_, name) or (name if type_ in ("texthash", "regexp", "pcre")
                                            else None)
    if path is None:
        return 0
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _local_expand(cfg, text: str, attrs: dict[str, str], undefined_ok=False) -> str | None:
    """$name and ${name?text} with local(8)'s attributes; None for bad syntax, or (unless
    undefined_ok: it expands to nothing) a name that has no value."""
    scope = maincf.Config(cfg.config_dir, cfg.path, cfg.entries, {**cfg.overrides, **attrs})
    undefined: set = set()
    try:
        out = scope.expand(text, 0, undefined)
    except maincf.ConfigError:
        return None
    return None if undefined and not undefined_ok else out


def read_as(path: str, usr) -> str | OSError:
    """A .forward or :include: file's text, opened with usr's rights (a pwd entry)."""
    if usr is None or os.geteuid() != 0:
        try:
            with open(path, "rb") as f:
                return f.read(READ_LIMIT).decode("utf-8", "surrogateescape")
        except OSError as exc:
            return exc
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            become(usr.pw_uid, usr.pw_gid)
            try:
                with open(path, "rb") as f:
                    data = b"+" + f.read(READ_LIMIT)
            except OSError as exc:
                data = b"-" + str(exc.errno).encode() + b" " + (exc.strerror or "").encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    if data[:1] == b"+":
        return data[1:].decode("utf-8", "surrogateescape")
    code, _, text = data[1:].decode("utf-8", "replace").partition(" ")
    return OSError(int(code) if code.isdigit() else 5, text or "read error")


class State:
    """Where one destination came from (Postfix's LOCAL_STATE and USER_ATTR, in short)."""

    def __init__(self, level=0, exp_type=None, exp_from=None, usr=None, owner=None,
                 sender=None):
        self.level, self.exp_type, self.exp_from = level, exp_type, exp_from
        self.usr, self.owner = usr, owner        # usr: a pwd entry whose rights apply
        self.sender = sender                     # an owner- alias's, else None

    def deeper(self, **kw) -> "State":
        new = State(self.level + 1, self.exp_type, self.exp_from, self.usr, self.owner,
                    self.sender)
        for name, value in kw.items():
            setattr(new, name, value)
        return new


class LocalDelivery:
    """One request's deliveries: the message read once, each recipient in turn."""

    def __init__(self, cfg, sender: str, content: bytes, request=None, queue_root=None,
                 envid: str = "", ret: str = ""):
        self.cfg = cfg
        self.sender = sender
        self.content = content
        self.envid, self.ret = envid, ret       # the message's DSN ENVID and RET
        self.notify = self.orcpt = ""           # the recipient's DSN NOTIFY and ORCPT
        # the recipient's original address (X-Original-To:, forwarded copies), "" with
        # enable_original_recipient = no
        self.keep_original = cfg["enable_original_recipient"]
        self.original = ""
        self.request = request
        self.queue_root = queue_root
        self.seen = mailbox.delivered_to(content)
        self.spool = cfg.get("mail_spool_directory")
        self.home_mailbox = cfg.get("home_mailbox")
        self.delimiters = cfg.get("recipient_delimiter")
        self.any_user = cfg["local_delivery_any_user"]
        self.default_privs = cfg.get("default_privs")
        self.alias_maps = cfg["alias_maps"]
        self.cmd_mask = set(cfg["allow_mail_to_commands"])
        self.file_mask = set(cfg["allow_mail_to_files"])
        self.bad_mask = [(name, word) for name, words in
                         (("allow_mail_to_commands", self.cmd_mask),
                          ("allow_mail_to_files", self.file_mask))
                         for word in sorted(words - EXPANSION_TYPES)]
        self.myorigin = cfg.get("myorigin").lower()
        self.local_domains = {d.lower().rstrip(".") for d in cfg["mydestination"]
                              if ":" not in d and "/" not in d}
        self.started = time.time()
        # an address verification probe: each kind of destination is found, not used
        # (Postfix's DEL_REQ_TRACE_ONLY: "delivers to mailbox", "aliased to ...")
        self.verify = False

    # --- one recipient of the request ---------------------------------------------------
    def deliver(self, rcpt: str, notify: str = "", orcpt: str = "",
                original: str = "") -> RcptResult:
        """Deliver to one recipient (and whatever its aliases and .forward name);
        notify and orcpt: its DSN NOTIFY and ORCPT, passed on to forwarded copies;
        original: its original address ("": rcpt itself), which every copy keeps."""
        self.rcpt = rcpt
        self.notify, self.orcpt = notify, orcpt
        self.original = (original or rcpt) if self.keep_original else ""
        for name, word in self.bad_mask:
            # Postfix's local dies (fatal) on this; the mail waits for a fixed main.cf.
            msg.warn(f'unknown {name} value "{word}" in "{self.cfg.get(name)}"')
            return result("deferred", "4.3.5", "mail system configuration error")
        # (kind, dsn, reason, address): the address delivered to at that level of
        # the expansion (Postfix logs it as to=, with the original as orig_to=)
        self.outcomes: list[tuple[str, str, str, str]] = []
        self.at = self.logged = rcpt
        self.indirect: list[tuple[str, str]] = []      # (sender, address)
        self.been_here: set = set()
        # the DSN action of the outermost alias or .forward expansion: "expanded", or
        # "delivered" for a list with an owner- alias (Postfix's alias.c, dotforward.c)
        self.expansion: str | None = None
        self._recipient(rcpt, State())
        for sender in dict.fromkeys(s for s, _ in self.indirect):
            self.outcomes.append((*self._forward(sender, [a for s, a in self.indirect
                                                          if s == sender]), rcpt))
        if not self.outcomes:
            return result("sent", "2.0.0", "delivered")
        final = next((o for o in self.outcomes if o[0] == "deferred"), None) or \
            next((o for o in self.outcomes if o[0] == "bounced"), None) or self.outcomes[-1]
        if self.request is not None:
            for o in self.outcomes:
                if o is not final and o[0] == "sent":
                    deliver.log_delivery(self.request.queue_id, o[3], "local",
                                         self.request.arrival, self.started, o[1], o[0],
                                         o[2], orig=self.original)
        self.logged = final[3]
        return result(*final[:3])

    def _sender(self, st: State) -> str:
        return self.sender if st.sender is None else st.sender

    def _out(self, kind: str, dsn: str, reason: str, at: str = "") -> bool:
        self.outcomes.append((kind, dsn, reason, at or self.at))
        return True

    def _recipient(self, addr: str, st: State) -> None:
        """Postfix's deliver_recipient and deliver_switch."""
        outer, self.at = self.at, addr
        try:
            self._switch(addr, st)
        finally:
            self.at = outer

    def _switch(self, addr: str, st: State) -> None:
        st = st.deeper()
        if st.level > MAX_LEVEL:
            msg.warn(f"recipient nesting limit exceeded for {addr}")
            self._out("bounced", "5.4.6", "recipient nesting limit exceeded")
            return
        if ("recipient", st.level, addr.lower()) in self.been_here:
            return
        self.been_here.add(("recipient", st.level, addr.lower()))
        if mailbox.delivered_key(addr) in self.seen:
            self._out("bounced", "5.4.6", f"mail forwarding loop for {addr}")
            return
        local, domain = split_address(addr)
        if local.startswith("\\"):
            local, addr = local[1:], addr[1:]
            self._mailbox(addr, local.lower(), st)
            return
        local = local.lower()
        user = strip_extension(local, self.delimiters)
        if not user:
            self._out("bounced", "5.1.3", f'null username in "{addr}"')
            return
        if self._alias(addr, local, st):
            return
        if user != local and self._alias(addr, user, st):
            return
        if st.owner is not None and st.owner != user or st.exp_type == "include":
            self.indirect.append((self._sender(st), addr))
            return
        if self._dotforward(addr, local, user, st):
            return
        self._mailbox(addr, local, st)

    # --- aliases ------------------------------------------------------------------------
    def _alias(self, addr: str, name: str, st: State) -> bool:
        """Postfix's deliver_alias: True when name is an alias (whatever came of it)."""
        if st.exp_from is not None and st.exp_from == name:
            return False
        st = st.deeper()
        if st.level > MAX_LEVEL:
            msg.warn(f"alias database loop for {name}")
            return self._out("bounced", "5.4.6", f"alias database loop for {name}")
        for ref in self.alias_maps:
            value = self._lookup(ref, name)
            if value is False:
                return self._out("deferred", "4.3.0", "alias database unavailable")
            if value is None:
                continue
            owner = _table_owner(ref)
            usr = None
            if owner is None:
                msg.warn(f"deliver_alias: no owner UID for alias database {ref}")
                return self._out("deferred", "4.3.0", "mail system configuration error")
            if owner != 0:
                try:
                    usr = pwd.getpwuid(owner)
                except KeyError:
                    msg.warn(f"cannot find alias database owner for {ref}")
                    return self._out("deferred", "4.3.0", "cannot find alias database owner")
            dests = aliases.destinations(value)
            if not dests:
                msg.warn(f"no recipient in alias lookup result for {name}")
                return self._out("deferred", "4.3.0", "alias database unavailable")
            if self.verify:
                return self._out("sent", "2.0.0", f"aliased to {value}")
            sub = st.deeper(exp_type="alias", exp_from=name, usr=usr)
            # An owner-NAME alias receives the errors: it becomes the sender, and
            # local members are forwarded under it (Postfix's owner attribute).
            for owner_ref in self.alias_maps:
                found = self._lookup(owner_ref, f"owner-{name}")
                if found is False:
                    return self._out("deferred", "4.3.0", "alias database unavailable")
                if found is not None:
                    sub.owner = sub.sender = f"owner-{name}@{self.myorigin}"
                    break
            if self.expansion is None:
                self.expansion = "delivered" if sub.sender is not None else "expanded"
            for dest in dests:
                self._token(addr, dest, sub)
            return True
        return False

    def _lookup(self, ref: str, name: str):
        """name's value in the alias table ref; None when absent, False on error."""
        try:
            return _alias_table(ref, self.cfg).lookup(name)
        except tables.TableError as exc:
            msg.warn(f"{exc}")
            msg.warn(f"{ref}: lookup of '{name}' failed")
            return False

    def _token(self, addr: str, dest: str, st: State) -> None:
        """Postfix's deliver_token: a file, a command, an include file or an address."""
        if dest.startswith("/"):
            self._file(addr, dest, st)
        elif dest.startswith("~/"):
            if st.usr is None:
                msg.warn(f"{dest}: no home directory for this user")
                self._out("bounced", "5.3.5", "mail system configuration error")
            else:
                self._file(addr, st.usr.pw_dir.rstrip("/") + dest[1:], st)
        elif dest.startswith("|"):
            if st.exp_type not in self.cmd_mask:
                self._out("bounced", "5.7.1", "mail to command is restricted")
            else:
                self._command(addr, dest[1:], st)
        elif dest[:9].lower() == ":include:":
            self._include(addr, dest[9:], st)
        else:
            qualified = dest if "@" in dest else f"{dest}@{self.myorigin}"
            _, domain = split_address(qualified)
            if domain in self.local_domains or dest.startswith("\\"):
                self._recipient(qualified if not dest.startswith("\\") else dest, st)
            else:
                self.indirect.append((self._sender(st), qualified))

    def _include(self, addr: str, path: str, st: State) -> None:
        st = st.deeper()
        if st.level > MAX_LEVEL:
            msg.warn(f":include: nesting limit exceeded for {path}")
            self._out("bounced", "5.4.6", ":include: nesting limit exceeded")
            return
        uid = st.usr.pw_uid if st.usr else 0
        if ("include", uid, path) in self.been_here:
            return
        self.been_here.add(("include", uid, path))
        bad = "mail system configuration error"
        if not path.startswith("/"):
            msg.warn(f":include:{path} uses a relative path")
            self._out("bounced", "5.3.5", bad)
            return
        try:
            info = os.stat(path)
        except OSError as exc:
            msg.warn(f"unable to lookup :include: file {path}: {exc.strerror}")
            self._out("bounced", "5.3.5", bad)
            return
        if not stat.S_ISREG(info.st_mode):
            msg.warn(f":include: file {path} is not a regular file")
            self._out("bounced", "5.3.5", bad)
            return
        if info.st_mode & 0o002:
            msg.warn(f":include: file {path} is world writable")
            self._out("bounced", "5.3.5", bad)
            return
        usr = st.usr
        if uid == 0:
            try:
                owner = pwd.getpwuid(info.st_uid)
            except KeyError:
                msg.warn(f"cannot find username for uid {info.st_uid}")
                msg.warn(f"{path}: cannot find :include: file owner username")
                self._out("deferred", "4.3.5", bad)
                return
            if owner.pw_uid != 0:
                usr = owner
        text = read_as(path, usr)
        if isinstance(text, OSError):
            msg.warn(f"cannot open include file {path}: {text.strerror}")
            self._out("bounced", "5.3.5", bad)
            return
        sub = st.deeper(exp_type="include", usr=usr,
                        owner=st.owner if st.owner is not None else addr)
        for dest in aliases.token_lines(text):
            self._token(addr, dest, sub)

    # --- .forward -----------------------------------------------------------------------
    def _dotforward(self, addr: str, local: str, user: str, st: State) -> bool:
        """Postfix's deliver_dotforward: True when a .forward file took the mail."""
        forward_path = self.cfg.raw("forward_path") or ""
        if not forward_path.strip():
            return False
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return False
        found = None
        for entry in params.split_list(forward_path):
            path = _local_expand(self.cfg, entry, self._attrs(addr, local, user, pw))
            if path is None:
                continue
            try:
                found = (path, os.lstat(path))
                break
            except OSError:
                continue
        if found is None:
            return False
        path, info = found
        if ("forward", path) in self.been_here:
            return ("forward-done", path) in self.been_here
        self.been_here.add(("forward", path))
        if self.verify:
            self.been_here.add(("forward-done", path))
            return self._out("sent", "2.0.0", f"forward via file: {path}")
        if not stat.S_ISREG(info.st_mode):
            msg.warn(f"file {path} is not a regular file")
            return False
        if info.st_uid != 0 and info.st_uid != pw.pw_uid:
            msg.warn(f"file {path} has bad owner uid {info.st_uid}")
            return False
        if info.st_mode & 0o002:
            msg.warn(f"file {path} is world writable")
            return False
        text = read_as(path, pw)
        if isinstance(text, OSError):
            msg.warn(f"cannot open file {path}: {text.strerror}")
            return False
        dests = aliases.token_lines(text)
        if not dests:
            return False
        self.been_here.add(("forward-done", path))
        sub = st.deeper(exp_type="forward", usr=pw, owner=user, exp_from=local)
        if self.expansion is None:
            self.expansion = "expanded"
        for dest in dests:
            self._token(addr, dest, sub)
        return True

    def _attrs(self, addr: str, local: str, user: str, pw=None) -> dict[str, str]:
        """Postfix's local_expand attributes (only those with a value)."""
        _, domain = split_address(addr)
        ext = local[len(user) + 1:] if local != user else ""
        attrs = {"user": user, "local": local, "domain": domain, "recipient": addr,
                 "extension": ext, "recipient_delimiter": local[len(user)] if ext else "",
                 "home": pw.pw_dir if pw else "", "shell": pw.pw_shell if pw else ""}
        return {k: v for k, v in attrs.items() if v}

    # --- files and commands ---------------------------------------------------------------
    def _rights(self, st: State) -> tuple[int, int] | None:
        """uid and gid for a file or command: never root (default_privs instead)."""
        uid, gid = (st.usr.pw_uid, st.usr.pw_gid) if st.usr else (0, 0)
        if uid == 0 or gid == 0:
            try:
                nobody = pwd.getpwnam(self.default_privs)
            except KeyError:
                msg.warn(f"unknown default_privs user: {self.default_privs}")
                return None
            uid = uid or nobody.pw_uid
            gid = gid or nobody.pw_gid
        return uid, gid

    def _file(self, addr: str, path: str, st: State) -> None:
        """Postfix's deliver_file: append to /file/name (mbox) or /dir/ (maildir)."""
        if st.exp_type not in self.file_mask:
            self._out("bounced", "5.7.1", "mail to file is restricted")
            return
        rights = self._rights(st)
        if rights is None:
            self._out("deferred", "4.3.0", "local configuration error")
            return
        if ("file", rights[0], path) in self.been_here:
            return
        self.been_here.add(("file", rights[0], path))
        if self.verify:
            self._out("sent", "2.0.0", f"delivers to file: {path}")
            return
        sender, content = self._sender(st), self.content
        headers = mailbox.added_headers(sender, self.rcpt, self.original)

        def work(drop):
            try:
                if path.endswith("/"):
                    mailbox.deliver_maildir(path, headers, content)
                    return ["sent", "2.0.0", "delivered to maildir"]
                try:
                    fd, _ = mailbox.open_mbox(path)
                except OSError as exc:
                    return [_kind(mailbox.mbox_dsn(exc.errno, "5.2.0")),
                            mailbox.mbox_dsn(exc.errno, "5.2.0"),
                            f"cannot append message to file {path}: "
                            f"cannot open file: {exc.strerror}"]
                try:
                    info = os.fstat(fd)
                    if stat.S_ISREG(info.st_mode):
                        if info.st_mode & 0o111:
                            return ["bounced", "5.7.1", "file is executable"]
                        mailbox.deliver_mbox(path, sender, headers, content, fd=fd)
                    else:               # /dev/null and friends: the message as is
                        mailbox.write_all(fd, headers + content)
                finally:
                    os.close(fd)
                return ["sent", "2.0.0", f"delivered to file: {path}"]
            except mailbox.MailboxError as exc:
                return [_kind(exc.dsn), exc.dsn,
                        f"cannot append message to file {path}: {exc.text}"]
            except OSError as exc:
                return [_kind(mailbox.mbox_dsn(exc.errno, "5.2.0")),
                        mailbox.mbox_dsn(exc.errno, "5.2.0"),
                        f"cannot append message to file {path}: {exc.strerror}"]
        self._out(*run_as(Privileges(*rights), work))

    def _command(self, addr: str, command: str, st: State, mailbox_command=False) -> None:
        """Postfix's deliver_command: pipe the message into command."""
        rights = self._rights(st)
        if rights is None:
            self._out("deferred", "4.3.0", "local configuration error")
            return
        if ("command", rights[0], command) in self.been_here:
            return
        self.been_here.add(("command", rights[0], command))
        if self.verify:
            self._out("sent", "2.0.0", f"delivers to command: {command}")
            return
        local, _ = split_address(addr)
        local = local.lower()
        user = strip_extension(local, self.delimiters)
        attrs = self._attrs(addr, local, user, st.usr)
        env = {"PATH": "/usr/bin:/bin", "LOGNAME": user, "USER": user,
               "SENDER": self._sender(st), "RECIPIENT": addr, "LOCAL": local,
               "MAIL_CONFIG": self.cfg.config_dir}
        for name in ("home", "shell", "domain", "extension"):
            if name in attrs:
                env[name.upper()] = attrs[name]
        env["ORIGINAL_RECIPIENT"] = self.original or self.rcpt
        for name in ("TZ", "LANG"):
            if name in os.environ:
                env[name] = os.environ[name]
        stamp = time.strftime("%a %b %e %H:%M:%S %Y")
        sender = self._sender(st)
        data = (f"From {sender or 'MAILER-DAEMON'}  {stamp}\n".encode(
            "utf-8", "surrogateescape") + mailbox.added_headers(sender, self.rcpt,
                                                                self.original)
            + self.content)
        self._out(*command_mod.run(command, data, rights[0], rights[1], env,
                                   self.cfg["command_time_limit"]))

    # --- forwarding through the queue -------------------------------------------------------
    def _forward(self, sender: str, rcpts: list[str]) -> tuple[str, str, str]:
        """Postfix's forward_finish: one new queue file per sender for the forwarded."""
        if self.verify:
            return "sent", "2.0.0", f"forwards to {', '.join(dict.fromkeys(rcpts))}"
        if self.queue_root is None:
            return "deferred", "4.3.0", "mail system internal error"
        rcpts = list(dict.fromkeys(rcpts))
        writer = None
        try:
            writer = Q.QueueWriter(self.queue_root)
            if os.geteuid() == 0:
                owner = pwd.getpwnam(self.cfg.get("mail_owner"))
                os.fchown(writer.fd, owner.pw_uid, owner.pw_gid)
            # DSN as Postfix's forward.c: NOTIFY without SUCCESS (the expansion itself
            # reports it), and for a list with an owner- alias (the sender replaced) no
            # ENVID, RET or ORCPT of the original
            listed = sender != self.sender
            if self.ret and not listed:
                writer.add_attr("dsn_ret", self.ret)
            if self.envid and not listed:
                writer.add_attr("dsn_envid", self.envid)
            writer.set_sender(sender)
            notify = ",".join(w for w in self.notify.split(",") if w and w != "SUCCESS")
            notify = notify or ("NEVER" if self.notify else "")
            for r in rcpts:
                writer.add_recipient(r, notify, "" if listed else self.orcpt,
                                     self.original)
            writer.write(f"Delivered-To: {self.rcpt.lower()}\n".encode(
                "utf-8", "surrogateescape"))
            writer.write(self.content)
            qid = writer.commit()
        except (OSError, KeyError) as exc:
            if writer is not None:
                writer.abort()
            msg.warn(f"cannot forward mail: {exc}")
            return "deferred", "4.3.0", "mail system internal error"
        Q.wake(self.queue_root)
        return "sent", "2.0.0", f"forwarded as {qid}"

    # --- the mailbox --------------------------------------------------------------------
    def _mailbox(self, rcpt: str, local: str, st: State) -> None:
        """Deliver to the account's mailbox (Postfix's deliver_mailbox)."""
        if ("mailbox", local) in self.been_here:
            return
        self.been_here.add(("mailbox", local))
        self._out(*self._mailbox_result(rcpt, local, st))

    def _mailbox_result(self, rcpt: str, local: str, st: State):
        user = strip_extension(local, self.delimiters).lower()
        try:
            pw = pwd.getpwnam(user) if user else None
        except KeyError:
            pw = None
        except OSError as exc:
            msg.warn(f"error looking up passwd info for {user}: {exc}")
            return "deferred", "4.0.0", "user lookup error"
        if pw is None:
            if user in REQUIRED_ALIASES:
                msg.warn(f"required alias not found: {user}")
                return "sent", "2.0.0", "discarded"
            if not (self.any_user and not self.home_mailbox and SAFE_NAME.fullmatch(user)):
                return "bounced", "5.1.1", f'unknown user: "{user}"'
            try:
                owner = pwd.getpwnam(self.default_privs)
            except KeyError:
                msg.warn(f"unknown default_privs user: {self.default_privs}")
                return "deferred", "4.3.0", "local configuration error"
            uid, gid, home = owner.pw_uid, owner.pw_gid, None
        else:
            uid, gid, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
            command = self.cfg.raw("mailbox_command") or ""
            if command.strip():
                expanded = _local_expand(self.cfg, command,
                                         self._attrs(rcpt, local, user, pw), True)
                if expanded is None:
                    msg.warn(f"bad parameter value syntax for mailbox_command: {command}")
                    return "deferred", "4.3.5", "mail system configuration error"
                before = len(self.outcomes)
                self._command(rcpt, expanded, st.deeper(usr=pw))
                return self.outcomes.pop() if len(self.outcomes) > before else \
                    ("sent", "2.0.0", f"delivered to command: {expanded}")
        if self.verify:
            maildir = (self.home_mailbox or self.spool).endswith("/")
            return "sent", "2.0.0", f"delivers to {'maildir' if maildir else 'mailbox'}"
        sender = self._sender(st)
        headers = mailbox.added_headers(sender, self.rcpt, self.original)
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
                    mailbox.deliver_mbox(path, sender, headers, self.content, fd=fd)
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
        return kind, dsn, reason

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


def deliver_request(request, ctx, report) -> str:
    """Deliver one request, each recipient recorded in report; the relay.

    A recipient delivered through an alias or .forward expansion is recorded with the
    DSN action "expanded" ("delivered" for a list with an owner- alias) and the text
    `alias expanded`, as Postfix's local(8) reports it to a NOTIFY=SUCCESS sender; the
    log line keeps the delivery's own text. The expansion's own deliveries and
    forwarded copies carry no SUCCESS (Postfix clears it), so they add no notice."""
    found = read_message(request, ctx)
    if found is None:
        for i in range(len(request.recipients)):
            report.record(i, "deferred", "4.3.0", "queue file read error", "local")
        return "local"
    envelope, content = found
    stored = {r.offset: r for r in envelope.recipients}
    attrs = envelope.attrs
    job = LocalDelivery(ctx.cfg, request.sender, content, request, ctx.queue_root,
                        attrs.get("dsn_envid", ""), attrs.get("dsn_ret", ""))
    job.verify = report.trace_only
    for i, rcpt in enumerate(request.recipients):
        offset = request.offsets[i] if i < len(request.offsets) else None
        dsn = stored.get(offset)
        r = job.deliver(rcpt, dsn.notify if dsn else "", dsn.orcpt if dsn else "",
                        request.original(i))
        if r.result == "sent" and job.expansion:
            report.record(i, r.result, r.dsn, r.reason, "local", action=job.expansion,
                          dsn_text="alias expanded", to=job.logged, orig=job.original)
        else:
            report.record(i, r.result, r.dsn, r.reason, "local", to=job.logged,
                          orig=job.original)
    return "local"


def service(conn, ctx) -> None:
    """One connection from qmgr: one request."""
    serve(conn, ctx, deliver_request)


def main(ctx) -> int:
    """Serve delivery requests until the master retires this process."""
    return server.single_server(ctx, service)
