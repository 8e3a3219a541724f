"""Delivery status notifications: the bounce message, as Postfix's bounce(8) writes it.

When recipients of a message fail for good (or the message expires in the queue), qmgr
calls notify() with the failed recipients; notify() writes the notification as a new queue
file in incoming/ (lib/queue.py: committed before anyone is told) and returns its queue id.
When a message has waited delay_warning_time with recipients still deferred, qmgr calls
warn() with them: the same report from Postfix's delay template (subject "Delayed Mail
(still being retried)", "THIS IS A WARNING ONLY", Action: delayed, Will-Retry-Until, the
original's headers only). The message is an RFC 3464 multipart/report with Postfix's texts:

    1. text/plain: "This is the mail system at host $myhostname. I'm sorry to have to
       inform you that your message could not be delivered ...", then `<rcpt>: reason` per
       recipient, wrapped at 79 columns (the postmaster copies carry no boilerplate).
    2. message/delivery-status: Reporting-MTA, X-Postfix-Queue-ID, X-Postfix-Sender,
       Arrival-Date; per recipient Final-Recipient, Original-Recipient, Action: failed,
       Status, Remote-MTA and `Diagnostic-Code: smtp; <reply>` when the reason quotes a
       remote server's reply, else `Diagnostic-Code: X-Postfix; <reason>`.
    3. The original message with a Return-Path: header, as message/rfc822; only its
       headers, as text/rfc822-headers, when it is larger than bounce_size_limit and in
       the postmaster copy of an ordinary bounce.

WHO GETS WHAT (bounce_notify_service.c)
    sender not empty            the sender, from <> ("sender non-delivery notification");
                                with notify_classes containing `bounce`, also a headers-only
                                copy to bounce_notice_recipient.
    sender empty (a bounce)     with notify_classes containing `bounce` or `2bounce`, the
                                postmaster (2bounce_notice_recipient), from
                                $double_bounce_sender@$myhostname ("postmaster non-delivery
                                notification"); otherwise nothing: Postfix drops it.
    sender is the double-bounce address (a postmaster notice that failed): nothing, with
                                the warning "ID: undeliverable postmaster notification
                                discarded". So a notification never loops.
    A delay warning (bounce_warn_service.c) goes the same ways, with `delay` in
    notify_classes in place of `bounce`/`2bounce` and delay_notice_recipient as the
    postmaster; the sender's copy, too, carries only the original's headers.

DSN (RFC 3461, as Postfix's bounce daemon)
    The sender's copy of a failure report names only the recipients whose NOTIFY has
    FAILURE (a recipient without NOTIFY counts as FAILURE,DELAY; NOTIFY=NEVER: none), and
    is not sent when no recipient is left; a delay warning, those with DELAY. RET=HDRS
    (queue file attribute dsn_ret) returns the original's headers only. The delivery
    report has Original-Envelope-Id (ENVID) after Reporting-MTA, and Original-Recipient
    is the recipient's ORCPT (else rfc822;address, as Postfix's smtpd records one for
    every recipient). Postmaster copies ignore NOTIFY. A success report (success())
    lists the recipients delivered ("delivered": final delivery here) or relayed to a
    next hop without DSN ("relayed", with Remote-MTA and the server's reply as
    Diagnostic-Code); a next hop that announced DSN got NOTIFY and ORCPT and reports for
    itself, so no notice is sent for it.

FUNCTIONS
    notify(cfg, queue_root, queue_id, envelope, path, entries, now=None) -> list of
        (kind, new id), kind "sender" or "postmaster"; envelope is lib/queue.read()'s
        result for the queue file at path, entries the failed recipients (LogEntry).
        OSError from the queue file system propagates: the caller keeps the message (and
        its bounce log) and tries again later.
    warn(cfg, queue_root, queue_id, envelope, path, entries, now=None) -> the same, for
        a delayed-mail warning about the deferred recipients in entries.
    success(cfg, queue_root, queue_id, envelope, path, entries, now=None) -> the same, for
        the success notice ("Successful Mail Delivery Report") about entries, the
        recipients delivered or relayed with NOTIFY=SUCCESS (qmgr's trace/ID log).
    report(cfg, queue_root, queue_id, envelope, path, entries, now=None) -> the same, for
        sendmail -bv's "Mail Delivery Status Report" ("Enclosed is the mail delivery
        report that you requested."), each entry deliverable or undeliverable.
    wants(envelope, entries, word) -> the entries whose NOTIFY asks for word.
    build(cfg, queue_id, new_id, envelope, path, entries, to, postmaster, headers_only,
        now, delay=False, success=False, verify=False) -> bytes: one notification's
        content.
    double_bounce_address(cfg) -> str.
    line_wrap(text, width=79, indent=4) -> list of lines, as Postfix's line_wrap(3).

CONFIGURATION PARAMETERS
    myhostname, myorigin, mail_name, notify_classes (resource, software), and the
    address rewriting parameters of lib/cleanup.py (notifications pass through it),
    bounce_notice_recipient (postmaster), 2bounce_notice_recipient (postmaster),
    delay_notice_recipient (postmaster), delay_warning_time and maximal_queue_lifetime
    (quoted in the warning, in hours and days);
    read with local defaults until the parameter table declares them:
    bounce_size_limit (50000), double_bounce_sender (double-bounce).

SEE ALSO
    Postfix bounce(8), RFC 3464, RFC 3834 (Auto-Submitted).
"""

from __future__ import annotations

import re
import time

from ..lib import cleanup, deliver, msg
from ..lib import queue as Q
from ..lib.bounce_log import LogEntry
from ..lib.maincf import ConfigError

BOUNDARY_FMT = "{id}.{time}/{host}"
SERVER_REPLY = re.compile(r"^[245]\d\d[ -]")
SMTP_REPLY = re.compile(r"^host (\S+?)\[[^\]]*\](?::\d+)? said: (\d{3}[ -].*?)"
                        r"(?: \(in reply to .*\))?$")

FAILURE_BODY = """\
This is the mail system at host {host}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""

SUCCESS_BODY = """\
This is the mail system at host {host}.

Your message was successfully delivered to the destination(s)
listed below. If the message was delivered to mailbox you will
receive no further notifications. Otherwise you may still receive
notifications of mail delivery errors from other systems.

                   The mail system
"""

VERIFY_BODY = """\
This is the mail system at host {host}.

Enclosed is the mail delivery report that you requested.

                   The mail system
"""

DELAY_BODY = """\
This is the mail system at host {host}.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than {hours} hour(s).
It will be retried until it is {days} day(s) old.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""


def _template_time(cfg, name: str, unit: str, divisor: int) -> int:
    """$name_unit of a template: the parameter in whole units, as bounce_template.c,
    with its warnings when the unit is too large or too small for the value."""
    seconds = int(cfg[name])
    result = seconds // divisor
    key = f"{name}_{unit}"
    if result > 999 and divisor < 86400:
        msg.warn(f'[built-in]: excessive result "{result}" in delay template conversion '
                 f'of parameter "{key}"')
        msg.warn(f'please increase time unit "{unit}" of "{key}" in delay template')
        msg.warn("for instructions see the bounce(5) manual")
    elif result == 0 and seconds and divisor > 1:
        msg.warn(f'[built-in]: zero result in delay template conversion of parameter '
                 f'"{key}"')
        msg.warn(f'please reduce time unit "{unit}" of "{key}" in delay template')
        msg.warn("for instructions see the bounce(5) manual")
    return result


def double_bounce_address(cfg) -> str:
    """The sender of postmaster notices: $double_bounce_sender@$myhostname."""
    return f"{cfg.get('double_bounce_sender')}@{cfg.get('myhostname')}"


def qualify(cfg, address: str) -> str:
    """user -> user@$myorigin, as Postfix's cleanup appends the origin."""
    if "@" in address or not address:
        return address
    return f"{address}@{cfg.get('myorigin') or cfg.get('myhostname')}"


def mail_date(when: float) -> str:
    """An RFC 5322 date in local time, as smtpd's Received: header writes it."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z (%Z)", time.localtime(when))


def line_wrap(text: str, width: int = 79, indent: int = 4) -> list[str]:
    """Break text at spaces into lines of at most width; continuations indented."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        limit = width - (indent if lines else 0)
        if line and len(candidate) > limit:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    return [lines[0]] + [" " * indent + rest for rest in lines[1:]]


def _diagnostic(entry: LogEntry) -> tuple[str | None, str]:
    """(remote MTA or None, Diagnostic-Code value) for one recipient."""
    m = SMTP_REPLY.match(entry.reason)
    if m:
        return m.group(1), f"smtp; {m.group(2)}"
    if entry.action == "relayed" and SERVER_REPLY.match(entry.reason):
        # a next hop's acceptance: its name from the relay, host[addr]:port
        return entry.relay.partition("[")[0] or None, f"smtp; {entry.reason}"
    return None, f"X-Postfix; {entry.reason}"


def wants(envelope, entries: list[LogEntry], word: str) -> list[LogEntry]:
    """The entries whose recipient's DSN NOTIFY asks for word (FAILURE, DELAY, SUCCESS);
    a recipient without NOTIFY counts as FAILURE,DELAY (RFC 3461 section 4.1)."""
    notify = {r.offset: r.notify for r in envelope.recipients}
    out = []
    for e in entries:
        mask = notify.get(e.offset, "")
        if word in mask.split(",") or (not mask and word != "SUCCESS"):
            out.append(e)
    return out


def _original(envelope, path: str, headers_only: bool) -> bytes:
    """The original content, or its header section only."""
    out = bytearray()
    at_line_start = True
    for block in envelope.content(path):
        if not headers_only:
            out += block
            continue
        # Header section: up to the first empty line.
        start = 0
        while start < len(block):
            nl = block.find(b"\n", start)
            end = len(block) if nl < 0 else nl + 1
            line = block[start:end]
            if at_line_start and line in (b"\n", b"\r\n"):
                return bytes(out)
            out += line
            at_line_start = nl >= 0
            start = end
    return bytes(out)


def build(cfg, queue_id: str, new_id: str, envelope, path: str, entries: list[LogEntry],
          to: str, postmaster: bool, headers_only: bool, now: float,
          delay: bool = False, success: bool = False, verify: bool = False) -> bytes:
    """The content of one notification (lines end in LF, as queue files keep them);
    with delay, a delayed-mail warning; with success, a delivery status notification of
    successful deliveries (each entry's action, "delivered" or "relayed"); with success
    and verify, the report of sendmail -bv (actions "deliverable", "undeliverable")."""
    host = cfg.get("myhostname")
    mail_name = cfg.get("mail_name")
    boundary = BOUNDARY_FMT.format(id=queue_id, time=int(now), host=host)
    date = mail_date(now)
    sender = envelope.sender or f"MAILER-DAEMON@{host}"
    limit = cfg["bounce_size_limit"]
    if limit and envelope.size > limit:
        headers_only = True
    if verify:
        subject = "Mail Delivery Status Report"
    elif success:
        subject = "Successful Mail Delivery Report"
    elif delay:
        subject = ("Postmaster Warning: Delayed Mail" if postmaster
                   else "Delayed Mail (still being retried)")
    else:
        subject = ("Postmaster Copy: Undelivered Mail" if postmaster
                   else "Undelivered Mail Returned to Sender")
    out = [
        f"Received: by {host} ({mail_name})",
        f"\tid {new_id}; {date}",
        f"Date: {date}",
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"Subject: {subject}",
        f"To: {to}",
        f"Auto-Submitted: {'auto-generated' if postmaster else 'auto-replied'}",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        f"Message-Id: <{time.strftime('%Y%m%d%H%M%S', time.localtime(now))}.{new_id}@{host}>",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
    ]
    if verify:
        out += VERIFY_BODY.format(host=host).split("\n")[:-1]
    elif success:
        out += SUCCESS_BODY.format(host=host).split("\n")[:-1]
    elif not postmaster and delay:
        out += DELAY_BODY.format(
            host=host, hours=_template_time(cfg, "delay_warning_time", "hours", 3600),
            days=_template_time(cfg, "maximal_queue_lifetime", "days", 86400)
        ).split("\n")[:-1]
    elif not postmaster:
        out += FAILURE_BODY.format(host=host).split("\n")[:-1]
    stored = {r.offset: r for r in envelope.recipients}
    for entry in entries:
        out.append("")
        rcpt = stored.get(entry.offset)
        original = deliver.shown_original(entry.recipient, rcpt.original) if rcpt else ""
        expanded = f" (expanded from <{original}>)" if original else ""
        out += line_wrap(f"<{entry.recipient}>{expanded}: {entry.reason}")
    out += [
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {host}",
    ]
    envid = envelope.attrs.get("dsn_envid", "")
    if envid:
        out.append(f"Original-Envelope-Id: {envid}")
    out += [
        f"X-Postfix-Queue-ID: {queue_id}",
        f"X-Postfix-Sender: rfc822; {sender}",
        f"Arrival-Date: {mail_date(envelope.arrival)}",
    ]
    for entry in entries:
        remote, diagnostic = _diagnostic(entry)
        rcpt = stored.get(entry.offset)
        # the DSN ORCPT, else the original recipient, else the recipient (Postfix's
        # smtpd records an ORCPT for every recipient; ours when given)
        orcpt = rcpt.orcpt if rcpt is not None and rcpt.orcpt else \
            f"rfc822;{rcpt.original}" if rcpt is not None and rcpt.original else \
            f"rfc822;{entry.recipient}"
        action = entry.action if success else "delayed" if delay else "failed"
        out += ["", f"Final-Recipient: rfc822; {entry.recipient}",
                f"Original-Recipient: {orcpt}",
                f"Action: {action}", f"Status: {entry.status}"]
        if remote:
            out.append(f"Remote-MTA: dns; {remote}")
        out += line_wrap(f"Diagnostic-Code: {diagnostic}")     # folded, as Postfix does
        if delay:
            retry_until = envelope.arrival + cfg["maximal_queue_lifetime"]
            out.append(f"Will-Retry-Until: {mail_date(retry_until)}")
    out += [
        "",
        f"--{boundary}",
        ("Content-Description: " + ("Message" if success else "Undelivered Message")
         + (" Headers" if headers_only else "")),
        "Content-Type: " + ("text/rfc822-headers" if headers_only else "message/rfc822"),
        "Content-Transfer-Encoding: 8bit",
        "",
        f"Return-Path: <{sender}>",
    ]
    head = "\n".join(out).encode("utf-8", "surrogateescape") + b"\n"
    original = _original(envelope, path, headers_only)
    if original and not original.endswith(b"\n"):
        original += b"\n"
    return head + original + f"\n--{boundary}--\n".encode()


_cleanup: list = [None, None]       # (cfg, lib/cleanup.Settings) of the running qmgr


def _cleanup_settings(cfg) -> cleanup.Settings:
    """The cleanup stage's settings for this configuration (qmgr runs outside a jail)."""
    if _cleanup[0] is not cfg:
        try:
            _cleanup[:] = [cfg, cleanup.Settings(cfg)]
        except ConfigError as exc:
            raise OSError(f"cleanup: {exc}") from None
    return _cleanup[1]


def _post(cfg, queue_root: str, queue_id: str, envelope, path: str,
          entries: list[LogEntry], env_sender: str, to: str, postmaster: bool,
          headers_only: bool, now: float, delay: bool = False,
          success: bool = False, verify: bool = False) -> str:
    """Write one notification into incoming/, through the cleanup stage (address
    rewriting; no header or body checks, as Postfix's internal mail); its queue id."""
    writer = cleanup.Cleanup(_cleanup_settings(cfg), queue_root, now=now, checks=False)
    try:
        writer.add_attr("notification", "postmaster" if postmaster else "sender")
        writer.set_sender(env_sender)
        writer.add_recipient(to)
        writer.write(build(cfg, queue_id, writer.id, envelope, path, entries, to,
                           postmaster, headers_only, now, delay, success, verify))
        result = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if result.reply:        # a table problem or an alias expansion error: try again later
        raise OSError(f"{result.queue_id}: notification not queued: {result.reply}")
    return result.queue_id


def notify(cfg, queue_root: str, queue_id: str, envelope, path: str,
           entries: list[LogEntry], now: float | None = None) -> list[tuple[str, str]]:
    """Write the notifications a failure calls for; [(kind, new queue id)]."""
    if not entries:
        return []
    now = time.time() if now is None else now
    sender = envelope.sender or ""
    double = double_bounce_address(cfg)
    classes = {c.lower() for c in cfg["notify_classes"]}
    if sender.lower() == double.lower():
        msg.warn(f"{queue_id}: undeliverable postmaster notification discarded")
        return []
    if not sender:
        if not classes & {"bounce", "2bounce"}:
            return []
        to = qualify(cfg, cfg.get("2bounce_notice_recipient"))
        return [("postmaster", _post(cfg, queue_root, queue_id, envelope, path, entries,
                                     double, to, True, False, now))]
    # The sender hears about the recipients whose NOTIFY asks for FAILURE (NEVER: none),
    # with the whole message unless RET=HDRS; the postmaster copy has them all.
    mine = wants(envelope, entries, "FAILURE")
    hdrs = envelope.attrs.get("dsn_ret", "") == "HDRS"
    sent = [("sender", _post(cfg, queue_root, queue_id, envelope, path, mine, "",
                             sender, False, hdrs, now))] if mine else []
    if "bounce" in classes:
        to = qualify(cfg, cfg.get("bounce_notice_recipient"))
        try:
            sent.append(("postmaster", _post(cfg, queue_root, queue_id, envelope, path,
                                             entries, double, to, True, True, now)))
        except OSError:
            msg.warn(f"postmaster notice failed while bouncing to {sender}")
    return sent


def warn(cfg, queue_root: str, queue_id: str, envelope, path: str,
         entries: list[LogEntry], now: float | None = None) -> list[tuple[str, str]]:
    """Write the delayed-mail warnings for deferred recipients; [(kind, new queue id)]."""
    if not entries:
        return []
    now = time.time() if now is None else now
    sender = envelope.sender or ""
    double = double_bounce_address(cfg)
    to_postmaster = "delay" in {c.lower() for c in cfg["notify_classes"]}
    if sender.lower() == double.lower():
        msg.warn(f"{queue_id}: undeliverable postmaster notification discarded")
        return []
    if not sender:
        if not to_postmaster:
            return []
        to = qualify(cfg, cfg.get("delay_notice_recipient"))
        return [("postmaster", _post(cfg, queue_root, queue_id, envelope, path, entries,
                                     double, to, True, False, now, delay=True))]
    mine = wants(envelope, entries, "DELAY")
    sent = [("sender", _post(cfg, queue_root, queue_id, envelope, path, mine, "",
                             sender, False, True, now, delay=True))] if mine else []
    if to_postmaster:
        to = qualify(cfg, cfg.get("delay_notice_recipient"))
        try:
            sent.append(("postmaster", _post(cfg, queue_root, queue_id, envelope, path,
                                             entries, double, to, True, True, now,
                                             delay=True)))
        except OSError:
            msg.warn(f"{queue_id}: postmaster notice failed while warning {sender}")
    return sent


def report(cfg, queue_root: str, queue_id: str, envelope, path: str,
           entries: list[LogEntry], now: float | None = None) -> list[tuple[str, str]]:
    """Write the report that sendmail -bv asked for (Postfix's verify template: "Mail
    Delivery Status Report", each recipient deliverable or undeliverable), to the
    sender as success() does, whatever the recipients' NOTIFY; [(kind, new id)]."""
    return success(cfg, queue_root, queue_id, envelope, path, entries, now, verify=True)


def success(cfg, queue_root: str, queue_id: str, envelope, path: str,
            entries: list[LogEntry], now: float | None = None,
            verify: bool = False) -> list[tuple[str, str]]:
    """Write the delivery status notification for recipients delivered or relayed with
    NOTIFY=SUCCESS (Postfix's bounce_trace_service): to the sender, from <>, with the
    original's headers; [(kind, new queue id)]. As Postfix, a bounce's report goes to
    2bounce_notice_recipient when notify_classes has 2bounce, and none is sent about a
    postmaster notice."""
    if not entries:
        return []
    now = time.time() if now is None else now
    sender = envelope.sender or ""
    double = double_bounce_address(cfg)
    if sender.lower() == double.lower():
        msg.info(f"{queue_id}: not sending trace/success notification for "
                 "double-bounce message")
        return []
    if not sender:
        if "2bounce" not in {c.lower() for c in cfg["notify_classes"]}:
            msg.info(f"{queue_id}: not sending trace/success notification for "
                     "single-bounce message")
            return []
        to, env_sender = qualify(cfg, cfg.get("2bounce_notice_recipient")), double
    else:
        to, env_sender = sender, ""
    return [("sender", _post(cfg, queue_root, queue_id, envelope, path, entries,
                             env_sender, to, False, True, now, success=True,
                             verify=verify))]
