"""cleanup: the stage through which every message enters the queue, as Postfix's cleanup(8).

DESCRIPTION
    smtpd, pickup (sendmail) and qmgr's notifications write a new message through a
    Cleanup, which wraps lib/queue.QueueWriter: the envelope and the content go in, the
    addresses are rewritten, the headers and the body are inspected on the way through,
    and finish() either commits the queue file (into incoming/, or hold/) or says why
    not. What it does, in Postfix's order:

    * Every envelope address, whatever its origin, first goes through trivial-rewrite's
      rules in the "local" context (lib/resolve.Rewriter: user -> user@$myorigin,
      site!user and user%domain -> user@site/domain, ...), as Postfix's
      cleanup_rewrite_internal; a sender that becomes MAILER-DAEMON@$myorigin is <>.
      A canonical map's result is looked up again, at most 10 times, until an address
      maps to itself (Postfix's cleanup_map11).
    * Envelope sender: sender_canonical_maps, then canonical_maps (each when
      envelope_sender is in its *_canonical_classes), masquerade_domains (when
      envelope_sender is in masquerade_classes); sender_bcc_maps.
    * Envelope recipients: recipient_canonical_maps, canonical_maps, masquerade_domains
      (envelope_recipient in the classes), recipient_bcc_maps; then virtual_alias_maps,
      recursively: an address that expands to itself is kept, an expansion past
      virtual_alias_expansion_limit addresses or virtual_alias_recursion_limit levels
      defers the message (`451 4.6.0 Alias expansion error`). always_bcc is added at the
      end. Duplicate recipients are written once. Lookup keys are Postfix's: user+ext@domain,
      user@domain, then user+ext and user when the domain is $myorigin or in
      $mydestination, then @domain; an unmatched extension is propagated to the result,
      a result `@otherdomain` keeps the local part, a result without @ gets @$myorigin.
    * Headers: one logical header (with its continuation lines) at a time; the obsolete
      "Name :" becomes "Name:" before anything looks at it (Postfix's mime_state). A
      header takes its continuation lines, and the rest of an over-long line, only
      while it is shorter than header_size_limit; the excess is dropped and the mail
      accepted. Received: headers are counted: at hopcount_limit the message is
      refused (`554 5.4.0 Error: too many hops`). Message-Id: is logged (`ID:
      message-id=...`). header_checks decides per header. A missing Message-Id:,
      Date: and From: (their Resent- forms when the message has Resent- headers) are
      added after the last header when the message has a header rewrite context
      (below: local, or remote with remote_header_rewrite_domain set), or with
      always_add_missing_headers = yes, as Postfix's cleanup_header_done_callback;
      `ID: message-id=<>` is logged for a message that ends up without one.
    * Header addresses (Postfix's cleanup_rewrite_sender/recip), in the message's
      rewrite context: "local" for pickup and for SMTP clients that match
      local_header_rewrite_clients (smtpd/check.py; default permit_inet_interfaces),
      else "remote", where header addresses are left alone unless
      remote_header_rewrite_domain is set. The value of From, Sender, Reply-To,
      Errors-To, Return-Path, Resent-From, Resent-Sender, Mail-Followup-To,
      Disposition-Notification-To, Return-Receipt-To (header_sender) and To, Cc, Bcc,
      Apparently-To, Resent-To, Resent-Cc, Resent-Bcc, Resent-Reply-To
      (header_recipient) is parsed as Postfix does (lib/tok822.py; at most
      header_address_token_limit tokens). Each address goes through trivial-rewrite's
      rules in the context (lib/resolve.Rewriter, the rules of envelope addresses too:
      site!user and user%domain, then @$myorigin or @$remote_header_rewrite_domain,
      .$mydomain or .$remote_header_rewrite_domain with append_dot_mydomain), then the
      canonical maps whose *_canonical_classes name the header class, then masquerading
      when masquerade_classes does. A header in which an address changed is generated
      again from the parse tree and folded as Postfix's cleanup_fold_header (addresses
      joined while a line stays under 70 bytes, continuation lines with a tab), which
      also normalizes its spacing and moves comments after their address, byte for byte
      as Postfix 3.7 (tests/data/header_rewrite); a header that did not change is kept
      as it came. header_checks see the header before. Then message_drop_headers
      (default bcc, content-length, resent-bcc, return-path) are removed from the
      primary header section of all mail.
    * MIME (when mime_header_checks, nested_header_checks (both default to
      $header_checks) or body_checks is set): the body's structure is followed from
      the Content-Type boundaries (at most 100 levels): the headers of each multipart
      part go through
      mime_header_checks, those of an attached message (message/rfc822) through
      nested_header_checks, and Content-*/MIME-Version headers anywhere, the primary
      ones included, through mime_header_checks, as Postfix's header classes.
    * Body: body_checks line by line, over the first body_checks_size_limit bytes, on
      body text only: the headers of multipart parts and attached messages go to
      mime_header_checks and nested_header_checks instead (boundary lines are body
      text, as in Postfix). Without body_checks the body goes to the queue file in
      bulk, untouched.
    * receive_override_options (Postfix's input_transp): no_address_mappings leaves out
      the canonical, virtual alias and bcc maps, always_bcc and masquerading;
      no_header_body_checks the header, MIME header and body checks (content_filter
      still applies); no_milters and no_unknown_recipient_checks are smtpd's and
      pickup's (smtpd/milters.py, smtpd/check.py, pickup/service.py), through
      receive_overrides(cfg). FILTER_README's re-injection service sets them.
    * Content filter: content_filter (a transport:destination), or the last FILTER
      action of the checks, becomes the queue file attribute content_filter; qmgr then
      sends every recipient to that transport and destination instead of resolving
      them (lib/resolve.py is bypassed, as Postfix's qmgr does). The filter
      re-injects the message through a service with -o content_filter= (FILTER_README).
    * Actions of header_checks and body_checks (header_checks(5)): REJECT [text],
      DISCARD [text], HOLD [text], WARN, INFO, FILTER transport:destination,
      REDIRECT user@domain, BCC user@domain,
      PREPEND text, REPLACE text, IGNORE, STRIP, PASS, DUNNO, OK; logged as Postfix does:
      `ID: reject: header Subject: x from host[addr]; from=<s> to=<r> proto=ESMTP
      helo=<h>: 5.7.1 text`.

WHY IN-PROCESS
    In Postfix cleanup(8) is a daemon that smtpd and pickup stream each message to.
    postfix-py runs it as a library in the receiving process instead: the promise that
    a message is on disk (fsync) before `250 Ok: queued as ID` stays one write and one
    fsync in one process, and a message costs no extra process hop and no second copy
    over a socket. The privilege model is unchanged: smtpd and pickup already run as
    mail_owner and own the queue file. The hot path of a message without maps or checks
    is a few attribute tests per header line and one method call per body block: in a
    loop of 4 KB messages with 18 header lines (fsync left out), the stage costs about
    7 us per message and 1 us per header line more than QueueWriter alone; smtpd, which
    now reads the header lines in bulk too, went from 135-156 to 143-186 us of user CPU
    per message (a noisy shared machine), next to milliseconds for the fsync.

FUNCTIONS
    Settings(cfg): the parameters, with every table opened (call before a chroot);
        ConfigError for a bad class name or a table that cannot be opened.
    receive_overrides(cfg) -> frozenset of receive_override_options words; ConfigError
        for an unknown one (Postfix: `unknown receive_override_options value "x" in
        "..."`).
    Cleanup(settings, queue_root, local=False, origin="local", proto="", helo="",
        fullname="", now=None, checks=True, header_rewrite=None): one new queue file;
        header_rewrite is the rewrite context, "local" or "remote" (default: "local"
        with local, else "remote"); checks=False for
        internally generated mail (notifications), which Postfix does not inspect
        (internal_mail_filter_classes is empty). add_attr(name, value),
        set_sender(addr), add_recipient(addr), write(data) (content in pieces of any
        size, LF line ends), in_header (still in the header section), finish() -> Result,
        abort(). OSError from the queue file system propagates.
    Cleanup(..., milters=lib.milter.Milters): the content and the sender wait in memory
        (at most message_size_limit bytes) until finish(), which gives the message to the
        milters (Postfix's own first Received: header hidden), applies their edits (headers,
        body, sender, recipients, which are rewritten as any others), then writes it;
        milter_apply(event, reply) takes a milter's verdict (reject, tempfail, discard,
        hold) with Postfix's `milter-reject: END-OF-MESSAGE from ...` log line.
    Result: status "queued", "held", "discarded", "rejected" or "deferred"; queue_id;
        reply (the SMTP reply for rejected and deferred: `550 5.7.1 text` ...).

CONFIGURATION PARAMETERS
    header_size_limit (102400), hopcount_limit (50), always_add_missing_headers (no),
    canonical_maps, sender_canonical_maps, recipient_canonical_maps (empty),
    canonical_classes (envelope_sender, envelope_recipient, header_sender,
    header_recipient), sender_canonical_classes (envelope_sender, header_sender),
    recipient_canonical_classes (envelope_recipient, header_recipient),
    remote_header_rewrite_domain (empty), header_address_token_limit (10240),
    message_drop_headers (bcc, content-length, resent-bcc, return-path),
    append_at_myorigin (yes), append_dot_mydomain (no), swap_bangpath (yes),
    allow_percent_hack (yes), mydomain, virtual_alias_maps ($virtual_maps: empty),
    virtual_alias_expansion_limit (1000), virtual_alias_recursion_limit (1000),
    masquerade_domains (empty), masquerade_classes (envelope_sender, header_sender,
    header_recipient),
    masquerade_exceptions (empty), always_bcc, sender_bcc_maps, recipient_bcc_maps (empty),
    content_filter (empty), receive_override_options (empty),
    header_checks, body_checks (empty), mime_header_checks, nested_header_checks
    ($header_checks), body_checks_size_limit (51200), myhostname,
    myorigin, mydestination, recipient_delimiter.

SEE ALSO
    lib/queue.py, lib/tok822.py, lib/resolve.py, smtpd/session.py, pickup/service.py,
    qmgr/bounce.py; Postfix cleanup(8),
    header_checks(5), canonical(5), virtual(5).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from . import milter, msg, params, tables
from . import queue as Q
from . import tok822
from .domains import DomainList
from .resolve import LOCAL, REMOTE, Rewriter, canonical
from .tok822 import quote_822_local, unquote_822_local
from .maincf import ConfigError

ENVELOPE_SENDER, ENVELOPE_RECIPIENT = "envelope_sender", "envelope_recipient"
HEADER_SENDER, HEADER_RECIPIENT = "header_sender", "header_recipient"
FILTER_ATTR = "content_filter"    # the queue file attribute qmgr routes by
CLASSES = (ENVELOPE_SENDER, ENVELOPE_RECIPIENT, HEADER_SENDER, HEADER_RECIPIENT)
_HEADER = re.compile(rb"([!-9;-~]+)[ \t]*:")   # match() anchors, also at a pos

_NOTABLE = frozenset(b"rRmM")     # first letters of Received, Message-Id, Resent-
_MISSING_NOTABLE = frozenset(b"dDfF")   # and of Date, From: when missing ones are added
# Postfix's header_opts.c: headers with sender (HDR_OPT_SENDER) and recipient
# (HDR_OPT_RECIP) addresses
SENDER_HEADERS = frozenset((
    "disposition-notification-to", "errors-to", "from", "mail-followup-to", "reply-to",
    "resent-from", "resent-sender", "return-path", "return-receipt-to", "sender"))
RECIPIENT_HEADERS = frozenset((
    "apparently-to", "bcc", "cc", "resent-bcc", "resent-cc", "resent-reply-to",
    "resent-to", "to"))
_ADDRESS_NOTABLE = frozenset(ord(c) for h in SENDER_HEADERS | RECIPIENT_HEADERS
                             for c in (h[0], h[0].upper()))
MAP11_RECURSION = 10            # canonical maps: lookups of one address (Postfix's)
# A header value of plain addresses, which the header address fast path looks into:
# items "local@domain" or "phrase <local@domain>" (atoms and quoted strings without @,
# backslash or newline in the phrase), separated by commas; no comment, group, route,
# literal or quoted local part.
_ADDR_RE = r'([^\s"()<>\[\]\\,;:@]+)@([^\s"()<>\[\]\\,;:@]+)'
_ITEM_RE = rf'\s*(?:{_ADDR_RE}|(?:[^\s"()<>\[\]\\,;:@]+|"[^"\\\n@]*"|\s+)*<{_ADDR_RE}>)\s*'
_PLAIN_LIST = re.compile(rf"{_ITEM_RE}(?:,{_ITEM_RE})*")
_PLAIN_ADDRESS = re.compile(_ADDR_RE)
PARTIAL_LIMIT = 4096            # body_checks: an endless line is checked in parts

# Postfix's cleanup_stat_detail: (SMTP code, DSN, text)
DEFER = (451, "4.7.1", "service unavailable")
HOPS = (554, "5.4.0", "too many hops")
CONT = (550, "5.7.1", "message content rejected")
WRITE = (451, "4.3.0", "queue file write error")


def _normal(line, m) -> bytes:
    """A header line whose name _HEADER matched, with white space between the name
    and its colon removed (Postfix's mime_state normalizes "name :" to "name:")."""
    return line[:m.end(1)] + line[m.end() - 1:]


OVERRIDES = ("no_unknown_recipient_checks", "no_address_mappings", "no_header_body_checks",
             "no_milters")


def receive_overrides(cfg) -> frozenset[str]:
    """receive_override_options as a set (Postfix's input_transp_mask); ConfigError
    for an unknown word."""
    text = cfg.get("receive_override_options")
    words = frozenset(w.lower() for w in cfg["receive_override_options"])
    bad = sorted(words - set(OVERRIDES))
    if bad:
        raise ConfigError(f'unknown receive_override_options value "{bad[0]}" in '
                          f'"{text}"')
    return words


def _classes(cfg, name: str) -> set[str]:
    words = {w.lower() for w in cfg[name]}
    bad = sorted(words - set(CLASSES))
    if bad:
        raise ConfigError(f"{name}: unknown address class \"{bad[0]}\" (expected: "
                          f"{', '.join(CLASSES)})")
    return words


class Settings:
    """Everything a Cleanup needs from main.cf, read once per process, tables opened."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.hostname = cfg.get("myhostname")
        self.origin = cfg.get("myorigin") or self.hostname
        self.header_limit = cfg["header_size_limit"]
        # a header line is taken in pieces of line_length_limit, as Postfix reads it
        self.line_limit = cfg["line_length_limit"]
        self.hop_limit = cfg["hopcount_limit"]
        self.always_add = cfg["always_add_missing_headers"]
        self.delimiters = cfg.get("recipient_delimiter")
        self.expansion_limit = cfg["virtual_alias_expansion_limit"]
        self.recursion_limit = cfg["virtual_alias_recursion_limit"]
        self.keep_original = cfg["enable_original_recipient"]
        self.body_limit = cfg["body_checks_size_limit"]
        self.milter_limit = cfg["message_size_limit"] or (1 << 30)
        self._tables: dict[str, tables.Table] = {}
        # receive_override_options: no_address_mappings leaves out the canonical,
        # virtual alias and bcc maps, always_bcc and masquerading (Postfix's MAP_OK and
        # BCC_OK), no_header_body_checks the header and body checks
        overrides = receive_overrides(cfg)
        mappings = "no_address_mappings" not in overrides
        checks = "no_header_body_checks" not in overrides
        canon = self._maps(cfg, "canonical_maps") if mappings else None
        send = self._maps(cfg, "sender_canonical_maps") if mappings else None
        rcpt = self._maps(cfg, "recipient_canonical_maps") if mappings else None
        classes = _classes(cfg, "canonical_classes")
        send_classes = _classes(cfg, "sender_canonical_classes")
        rcpt_classes = _classes(cfg, "recipient_canonical_classes")
        # the canonical maps, in Postfix's order, for each envelope address class
        self.sender_canonical = [m for m, ok in (
            (send, ENVELOPE_SENDER in send_classes),
            (canon, ENVELOPE_SENDER in classes)) if m and ok]
        self.recipient_canonical = [m for m, ok in (
            (rcpt, ENVELOPE_RECIPIENT in rcpt_classes),
            (canon, ENVELOPE_RECIPIENT in classes)) if m and ok]
        self.virtual = self._maps(cfg, "virtual_alias_maps") if mappings else None
        self.masq_domains = [w.lower() for w in cfg["masquerade_domains"]] if mappings \
            else []
        masq_classes = _classes(cfg, "masquerade_classes")
        self.masq_sender = bool(self.masq_domains) and ENVELOPE_SENDER in masq_classes
        self.masq_rcpt = bool(self.masq_domains) and ENVELOPE_RECIPIENT in masq_classes
        self.masq_exceptions = {w.lower() for w in cfg["masquerade_exceptions"]}
        # header address rewriting: the same maps, for the header classes
        self.header_canonical = {
            HEADER_SENDER: [m for m, ok in ((send, HEADER_SENDER in send_classes),
                                            (canon, HEADER_SENDER in classes)) if m and ok],
            HEADER_RECIPIENT: [m for m, ok in ((rcpt, HEADER_RECIPIENT in rcpt_classes),
                                               (canon, HEADER_RECIPIENT in classes))
                               if m and ok]}
        self.header_masq = {c: bool(self.masq_domains) and c in masq_classes
                            for c in (HEADER_SENDER, HEADER_RECIPIENT)}
        self.remote_rewrite_domain = cfg.get("remote_header_rewrite_domain").strip()
        self.token_limit = cfg["header_address_token_limit"]
        self.drop_headers = frozenset(w.lower() for w in cfg["message_drop_headers"])
        # first letters of the headers that are dropped: they leave the hot path
        self.drop_notable = frozenset(ord(c) for h in self.drop_headers if h.isascii()
                                      for c in (h[:1].lower() + h[:1].upper()))
        # trivial-rewrite's rules, for envelope and header addresses
        self.rewriter = Rewriter(cfg)
        self.append_dot_mydomain = cfg["append_dot_mydomain"]
        self.mailer_daemon = self.rewriter.rewrite("MAILER-DAEMON", LOCAL).lower()
        self.always_bcc = cfg.get("always_bcc").strip() if mappings else ""
        self.content_filter = cfg.get("content_filter").strip()
        self.sender_bcc = self._maps(cfg, "sender_bcc_maps") if mappings else None
        self.recipient_bcc = self._maps(cfg, "recipient_bcc_maps") if mappings else None
        self.header_checks = self._maps(cfg, "header_checks") if checks else None
        self.mime_header_checks = self._maps(cfg, "mime_header_checks") if checks else None
        self.nested_header_checks = self._maps(cfg, "nested_header_checks") if checks \
            else None
        self.body_checks = self._maps(cfg, "body_checks") if checks else None
        self.milter_header_checks = self._maps(cfg, "milter_header_checks")
        self.rewrites_recipients = bool(self.recipient_canonical or self.virtual
                                        or self.masq_rcpt or self.recipient_bcc)
        needs_local = self.sender_canonical or self.recipient_canonical or self.virtual \
            or self.sender_bcc or self.recipient_bcc or any(self.header_canonical.values())
        try:
            self.mydestination = DomainList.for_param(cfg, "mydestination", self._open) \
                if needs_local else None
        except (OSError, tables.TableError) as exc:
            raise ConfigError(f"mydestination: {exc}") from None

    def _open(self, ref: str) -> tables.Table:
        if ref not in self._tables:
            try:
                self._tables[ref] = tables.open_table(ref, self.cfg)
            except tables.TableError as exc:
                raise ConfigError(str(exc)) from None
        return self._tables[ref]

    def _maps(self, cfg, name: str):
        refs = cfg[name]
        return Maps(name, [self._open(r) for r in refs]) if refs else None

    def is_local_domain(self, domain: str) -> bool:
        """Whether user-only lookup keys apply: $myorigin or $mydestination."""
        if domain == self.origin.lower():
            return True
        return self.mydestination is not None and self.mydestination.match(domain)


class Maps:
    """A parameter's list of tables, searched in order, as Postfix's maps_find."""

    def __init__(self, title: str, tables_: list):
        self.title = title
        self.tables = tables_

    def find(self, key: str) -> str | None:
        """The first table's result; tables.TableError when a table cannot be read."""
        for table in self.tables:
            try:
                found = table.lookup(key)
            except tables.TableError:
                raise
            except Exception as exc:    # noqa: BLE001 - a backend error is not "not found"
                raise tables.TableError(f"{self.title}: {exc}") from None
            if found is not None:
                return found
        return None


class LookupProblem(Exception):
    """A table could not be read: the message is not accepted now (451 4.3.0)."""


def addr_map(settings: Settings, maps: Maps, address: str) -> list[str] | None:
    """Postfix's mail_addr_map: the addresses an address maps to, or None (no match)."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    base, ext = local, ""
    for c in settings.delimiters:
        cut = local.find(c)
        if cut > 0 and (not ext or cut < len(base)):
            base, ext = local[:cut], local[cut:]
    keys = []
    if domain:
        keys.append((f"{local}@{domain}", ""))
        if ext:
            keys.append((f"{base}@{domain}", ext))
        if settings.is_local_domain(domain.lower()):
            keys.append((local, ""))
            if ext:
                keys.append((base, ext))
        keys.append((f"@{domain}", ""))       # no extension propagated, as Postfix
    else:
        keys.append((local, ""))
        if ext:
            keys.append((base, ext))
    for key, unmatched in keys:
        try:
            found = maps.find(key)
        except tables.TableError as exc:
            raise LookupProblem(f"{maps.title}: {exc}") from None
        if found is None:
            continue
        if found.startswith("@"):
            return [f"{base if unmatched else local}{found}"]
        out = []
        for word in params.split_list(found):
            word = word.strip("<>")
            if not word:
                continue
            if "@" not in word:
                word = f"{word}@{settings.origin}"
            if unmatched:
                user, _, dom = word.rpartition("@")
                word = f"{user}{unmatched}@{dom}"
            out.append(word)
        return out or None
    return None


def masquerade(settings: Settings, address: str) -> str:
    """Postfix's cleanup_masquerade_external: user@host.example.com -> user@example.com."""
    local, at, domain = address.rpartition("@")
    if not at or local.lower() in settings.masq_exceptions:
        return address
    domain = domain.lower()
    for masq in settings.masq_domains:
        truncate = True
        while masq.startswith("!"):
            masq, truncate = masq[1:], not truncate
        if not masq:
            continue
        if masq == domain:
            break
        if domain.endswith("." + masq):
            return f"{local}@{masq}" if truncate else address
    return address


@dataclass
class Result:
    status: str                     # queued, held, discarded, rejected, deferred
    queue_id: str
    reply: str = ""                 # the SMTP reply for rejected and deferred


class Cleanup:
    """One new message on its way into the queue (see the manual page above)."""

    def __init__(self, settings: Settings, queue_root: str, local: bool = False,
                 origin: str = "local", proto: str = "", helo: str = "",
                 fullname: str = "", now: float | None = None, checks: bool = True,
                 milters=None, header_rewrite: str | None = None):
        self.s = settings
        self.queue_root = queue_root
        self.w = Q.QueueWriter(queue_root, now)
        self.id = self.w.id
        # milters (lib/milter.py): the content and the sender wait in memory for their
        # end-of-message edits; the queue file gets them at finish()
        self.milters = milters
        self._write = self.w.write if milters is None else self._hold
        self._held = bytearray()
        self.milter_reply: str | None = None
        self._log_prefix = ""               # "milter-header-" in milter_header_checks
        self._prepends: list[str] | None = None     # their PREPEND results
        self.arrival = time.time() if now is None else now
        self.local = local                  # local submission: Postfix's local context
        self.origin = origin                # "host[addr]" for log lines, "local"
        self.proto, self.helo = proto, helo
        self.fullname = fullname
        self.sender: str | None = None
        self.rcpts: list[str] = []          # as given; rewritten at finish()
        self.dsn: dict[str, tuple[str, str]] = {}   # given recipient -> (NOTIFY, ORCPT)
        self.first_rcpt: str | None = None
        self.bcc: list[str] = []
        # content state
        self.in_header = True
        self._at_start = True               # the next byte begins a line
        self._partial = b""                 # a header line not yet complete
        self._hdr = bytearray()             # the logical header being gathered
        self._hdr_len = 0
        self._hout = bytearray()            # header section output, not yet written
        self._hdr_dropping = False          # the rest of an over-long line goes
        self._seen: set[str] = set()
        self._resent = False
        self.hops = 0
        self._checking = checks             # header and body checks (still) apply
        # MIME structure is followed for mime_header_checks, nested_header_checks, and
        # for body_checks, which see body text only (Postfix's mime_state.c)
        self._mime = MimeState() if checks and (
            settings.mime_header_checks or settings.nested_header_checks
            or settings.body_checks) else None
        self._checking_headers = checks and (settings.header_checks is not None
                                             or self._mime is not None)
        self._bodybuf: bytearray | None = None      # _body's output while it runs
        # Header address rewriting (Postfix's hdr_rewrite_context): "local" qualifies
        # with $myorigin, "remote" with remote_header_rewrite_domain, and when that is
        # empty, header addresses are not touched.
        context = header_rewrite or (LOCAL if local else REMOTE)
        self._hdr_context = context if context == LOCAL or settings.remote_rewrite_domain \
            else None
        # Missing headers are added wherever there is a header rewrite context (the
        # local one, or the remote one with remote_header_rewrite_domain), or with
        # always_add_missing_headers: Postfix's cleanup_header_done_callback.
        self._add_missing = self._hdr_context is not None or settings.always_add
        # every header name matters with header_checks; otherwise only those whose first
        # letter is notable (the address headers include Date: and From:'s letters)
        self._every_header = self._checking_headers
        self._notable = settings.drop_notable | (
            _NOTABLE | _ADDRESS_NOTABLE if self._hdr_context else
            _NOTABLE | _MISSING_NOTABLE if self._add_missing else _NOTABLE)
        self._body_checks = settings.body_checks if checks else None
        self._body_lines = self._body_checks is not None or self._mime is not None
        self._body_partial = b""
        self._body_seen = 0
        self._last_byte = b"\n"
        # outcome
        self.errors: set[tuple] = set()
        self.reason: str | None = None      # of a REJECT (or a deferral)
        self.discard = self.hold = False
        self.redirect: str | None = None
        # content_filter, or a FILTER action's transport:destination (checks only: as
        # Postfix, internal mail such as notifications is not filtered)
        self.filter = settings.content_filter if checks else ""
        self.closed = False

    # --- envelope ------------------------------------------------------------------------
    def add_attr(self, name: str, value: str) -> None:
        self.w.add_attr(name, value)

    def _qualify(self, addr: str) -> str:
        """An envelope address in its canonical form: trivial-rewrite's rules in the
        "local" context (Postfix's cleanup_rewrite_internal), for every origin."""
        if not addr or canonical(addr):
            return addr             # the rules and the quoting leave it as it is
        return unquote_822_local(self.s.rewriter.rewrite(quote_822_local(addr), LOCAL))

    def _canonical(self, addr: str, maps_list) -> str:
        """The address through each of the canonical maps, as Postfix's
        cleanup_map11_internal: a result is looked up again, until it maps to itself or
        MAP11_RECURSION lookups were made."""
        for maps in maps_list:
            for _ in range(MAP11_RECURSION):
                found = self._lookup(maps, addr)
                if not found:
                    break
                if len(found) > 1:
                    msg.warn(f"{self.id}: multi-valued {maps.title} entry for {addr}")
                same = found[0].lower() == addr.lower()
                addr = found[0]
                if same:
                    break
            else:
                msg.warn(f"{self.id}: unreasonable {maps.title} map nesting for {addr} "
                         "-- message not accepted, try again later")
        return addr

    def _lookup(self, maps: Maps, addr: str) -> list[str] | None:
        try:
            return addr_map(self.s, maps, addr)
        except LookupProblem:
            msg.warn(f"{self.id}: {maps.title} map lookup problem for {addr} -- "
                     "message not accepted, try again later")
            self.errors.add(WRITE)
            return None

    def set_sender(self, sender: str) -> None:
        """Record the envelope sender ("" for <>), rewritten."""
        addr = self._qualify(sender)
        if addr and addr.lower() == self.s.mailer_daemon:
            addr = ""           # mailer-daemon@$myorigin is the null sender (Postfix)
        if addr:
            addr = self._canonical(addr, self.s.sender_canonical)
            if self.s.masq_sender:
                addr = masquerade(self.s, addr)
            if self.s.sender_bcc is not None:
                self.bcc += self._lookup(self.s.sender_bcc, addr) or []
        self.sender = addr
        if self.milters is None:
            self.w.set_sender(addr)

    def add_recipient(self, rcpt: str, notify: str = "", orcpt: str = "") -> None:
        """Remember one envelope recipient, with its DSN NOTIFY and ORCPT; it is rewritten
        and written at finish()."""
        if self.first_rcpt is None:
            self.first_rcpt = self._qualify(rcpt)
        self.rcpts.append(rcpt)
        if notify or orcpt:
            self.dsn.setdefault(rcpt, (notify, orcpt))

    def _rewrite_recipient(self, rcpt: str) -> str:
        addr = self._qualify(rcpt)
        if addr:
            addr = self._canonical(addr, self.s.recipient_canonical)
            if self.s.masq_rcpt:
                addr = masquerade(self.s, addr)
            if self.s.recipient_bcc is not None:
                self.bcc += self._lookup(self.s.recipient_bcc, addr) or []
        return addr

    def _expand(self, addr: str) -> list[str]:
        """virtual_alias_maps, recursively, as Postfix's cleanup_map1n_internal."""
        maps = self.s.virtual
        if maps is None:
            return [addr]
        out, been = [addr], set()
        arg = 0
        while arg < len(out):
            if len(out) > self.s.expansion_limit:
                msg.warn(f"{self.id}: unreasonable virtual_alias_maps map expansion size "
                         f"for {addr} -- message not accepted, try again later")
                return self._defer_expansion(addr)
            count = 0
            while True:
                current = out[arg]
                if current.lower() in been:
                    break
                if count >= self.s.recursion_limit:
                    msg.warn(f"{self.id}: unreasonable virtual_alias_maps map nesting "
                             f"for {addr} -- message not accepted, try again later")
                    return self._defer_expansion(addr)
                try:
                    found = addr_map(self.s, maps, current)
                except LookupProblem:
                    msg.warn(f"{self.id}: virtual_alias_maps map lookup problem for "
                             f"{addr} -- message not accepted, try again later")
                    self.errors.add(WRITE)
                    self.reason = self.reason or "4.6.0 Alias expansion error"
                    return [addr]
                if not found:
                    break
                out[arg] = found[0]
                out.extend(found[1:])
                for result in found:
                    if result.lower() == current.lower():   # may expand into itself once
                        been.add(current.lower())
                count += 1
            arg += 1
        return out

    def _defer_expansion(self, addr: str) -> list[str]:
        self.errors.add(DEFER)
        self.reason = "4.6.0 Alias expansion error"
        return [addr]

    # --- content -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Append content (pieces of any size, LF line ends): headers are taken one
        logical header at a time; the body passes in bulk unless body_checks is set."""
        if not data:
            return
        if not self.in_header:
            self._last_byte = data[-1:]
            if not self._body_lines:
                if not (self.discard or self.errors):
                    self._write(data)
            else:
                self._body(data)
            return
        buf = self._partial + data if self._partial else data
        self._partial = b""
        start, end = 0, len(buf)
        hdr, limit, header = self._hdr, self.s.header_limit, _HEADER.match
        piece = self.s.line_limit       # a line is taken in pieces of this, as Postfix
        while start < end and self.in_header:
            nl = buf.find(b"\n", start)
            if nl < 0:
                rest = buf[start:]
                if self._at_start:
                    if len(rest) < piece:
                        self._partial = rest        # its name is not known yet
                        return
                    self._header_piece(rest[:piece], True, False)
                    self._at_start = False
                    rest = rest[piece:]
                    if not self.in_header:
                        self.write(rest)            # the body begins
                        return
                if rest:
                    self._header_piece(rest, False, False)
                return
            if self._at_start and nl - start > piece:
                self._header_piece(buf[start:start + piece], True, False)
                self._at_start = False
                start += piece
                if not self.in_header:
                    break
            if self._at_start and start < nl:
                # the common cases inline (the hot path): a whole header line, or a
                # whole continuation line; _header_piece takes the rest
                c = buf[start]
                if c == 32 or c == 9:
                    if hdr:
                        if self._hdr_len < limit:
                            hdr += b"\n"
                            hdr += buf[start:nl]
                            self._hdr_len += nl - start + 1
                            self._hdr_dropping = False
                        else:
                            self._hdr_dropping = True
                        start = nl + 1
                        continue
                elif m := header(buf, start):
                    if hdr:
                        if hdr[0] in self._notable or self._every_header:
                            self._flush_header()
                        else:                           # _flush_header's hot path
                            hout = self._hout
                            hout += hdr
                            hout += b"\n"
                            hdr.clear()
                            self._hdr_len = 0
                    if m.end() - m.end(1) == 1:
                        hdr += buf[start:nl]
                    else:                               # "name :" -> "name:"
                        hdr += buf[start:m.end(1)] + buf[m.end() - 1:nl]
                    self._hdr_len = nl - start
                    self._hdr_dropping = False
                    start = nl + 1
                    continue
            self._header_piece(buf[start:nl], self._at_start, True)
            self._at_start = True
            start = nl + 1
        if start < end:
            self.write(buf[start:])                 # the body begins

    def _header_piece(self, piece: bytes, at_start: bool, term: bool) -> None:
        """One line, or part of one, of the header section (without its LF)."""
        nl = b"\n" if term else b""
        if at_start:
            if term and not piece:
                self._end_of_header(b"\n")
                return
            if piece[:1] in (b" ", b"\t") and self._hdr:
                if self._hdr_len < self.s.header_limit:         # a continuation line
                    self._hdr += b"\n" + piece
                    self._hdr_len += len(piece) + 1
                    self._hdr_dropping = False
                else:
                    self._hdr_dropping = True
                return
            if m := _HEADER.match(piece):
                self._flush_header()
                self._hdr += _normal(piece, m)
                self._hdr_len = len(piece)
                self._hdr_dropping = False
                return
            self._end_of_header(piece + nl)         # not a header: the body begins
            return
        # the rest of an over-long line: kept while the header is within the limit
        if self._hdr_dropping or self._hdr_len >= self.s.header_limit:
            self._hdr_dropping = True
            return
        self._hdr += piece
        self._hdr_len += len(piece)

    def _end_of_header(self, first_body: bytes) -> None:
        """The header section is over: add what is missing, then the body begins."""
        self._flush_header()
        self._hout += self._missing_headers()
        self.in_header = False
        if self._mime is not None:
            self._mime.end_headers()
        if first_body == b"\n":                     # the empty line: not body text
            self._hout += first_body
            first_body = b""
        self._out(self._hout)
        self._hout = bytearray()
        self.write(first_body)

    def _flush_header(self) -> None:
        """Process the gathered logical header and write it out (or not)."""
        raw = self._hdr
        if not raw:
            return
        self._hdr_len = 0
        if raw[0] not in self._notable and not self._every_header:
            self._hout += raw               # the hot path: a header nobody looks into
            self._hout += b"\n"             # (_end_of_header drops it after an error)
            raw.clear()
            return
        name = raw[:raw.find(b":")].decode("latin-1").strip().lower()
        self._seen.add(name)
        if name.startswith("resent-"):
            self._resent = True
        if name == "received":
            self.hops += 1
            if self.hops >= self.s.hop_limit and HOPS not in self.errors:
                msg.warn(f"{self.id}: message rejected: hopcount exceeded")
                self.errors.add(HOPS)
        elif name in ("message-id", "resent-message-id"):
            value = raw.decode("utf-8", "surrogateescape").split(":", 1)[1].strip()
            msg.info_as("cleanup", f"{self.id}: {name}={value[:200]}")
        keep = True
        if self._mime is not None and name == "content-type":
            self._mime.content_type(raw)
        maps = (self.s.mime_header_checks if name in MIME_HEADERS else
                self.s.header_checks) if self._checking_headers else None
        if maps is not None:
            text = raw.decode("utf-8", "surrogateescape")
            result = self._check(maps, "header", text)
            if result is None:
                keep = False
            elif result is not text:
                raw = bytearray(result.encode("utf-8", "surrogateescape"))
                name = raw[:raw.find(b":")].decode("latin-1").strip().lower()
        if name in self.s.drop_headers:
            keep = False                # message_drop_headers, after header_checks
        if keep and self._hdr_context and (name in SENDER_HEADERS
                                          or name in RECIPIENT_HEADERS):
            raw = self._rewrite_header(raw, HEADER_SENDER if name in SENDER_HEADERS
                                       else HEADER_RECIPIENT)
        if keep:
            self._out(raw)
            self._out(b"\n")
        self._hdr.clear()

    def _rewrite_header(self, raw: bytearray, kind: str) -> bytearray:
        """A sender or recipient header with its addresses rewritten as Postfix's
        cleanup_rewrite_sender/recip: the value parsed (lib/tok822.py, at most
        header_address_token_limit tokens), each address through trivial-rewrite's
        rules in the header's context, the header class's canonical maps and
        masquerading; a header in which an address changed is generated again from the
        parse tree and folded, one that did not change is kept as it came."""
        s = self.s
        maps, masq = s.header_canonical[kind], s.header_masq[kind]
        text = raw.decode("latin-1")
        name_len = len(text[:text.find(":")].rstrip())
        value = text[name_len + 1:]
        if not maps and not masq and self._unchanged(value):
            return raw                  # one plain qualified address (fast path)
        tree = tok822.parse(value, s.token_limit)
        changed = False
        for node in tok822.addresses(tree):
            changed |= self._rewrite_node(node, maps, masq)
        if not changed:
            return raw
        out = text[:name_len] + ": " + tok822.externalize(tree, tok822.STR_HEAD)
        lines = tok822.fold_header(out, s.header_limit)
        return bytearray("\n".join(lines).encode("latin-1"))

    def _unchanged(self, value: str) -> bool:
        """Whether the rewrite rules leave a header value alone without parsing it: a
        list of plain addresses (local@domain, "Name" <local@domain>) each qualified,
        with a dot-string local part, no final dot, a dot in the domain when
        append_dot_mydomain is on, and fewer characters than the token limit."""
        if len(value) >= self.s.token_limit or not _PLAIN_LIST.fullmatch(value):
            return False
        dot = self.s.append_dot_mydomain
        for local, domain in _PLAIN_ADDRESS.findall(value):
            if not tok822.is_dot_string(local) or domain.endswith(".") \
                    or dot and "." not in domain:
                return False
        return True

    def _rewrite_node(self, node, maps, masq: bool) -> bool:
        """One address node of a header: rewritten, mapped, masqueraded; whether it
        changed (each step as Postfix compares: the external forms)."""
        s = self.s
        addr = tok822.from_bytes(tok822.externalize(node.head))
        new = s.rewriter.rewrite(addr, self._hdr_context)
        changed = new != addr
        if maps or masq:
            internal = unquote_822_local(new)
            result = self._canonical(internal, maps) if maps else internal
            if masq:
                result = masquerade(s, result)
            if result != internal:
                new, changed = quote_822_local(result), True
        tok822.set_address(node, tok822.to_bytes(new))
        return changed

    def _out(self, data) -> None:
        """Content out; the header section is gathered and written in one piece."""
        if self.discard or self.errors:
            return
        if self._bodybuf is not None:       # in order with the lines _body gathers
            self._bodybuf += data
            return
        if self.in_header:
            self._hout += data
            if len(self._hout) >= Q.BLOCK:
                self._write(self._hout)
                self._hout.clear()
        else:
            self._write(data)

    def _missing_headers(self) -> bytes:
        """The (Resent-)Message-Id:, Date: and From: the message lacks, as Postfix adds."""
        seen = self._seen
        if not self._add_missing:
            if "message-id" not in seen:
                msg.info_as("cleanup", f"{self.id}: message-id=<>")
            return b""
        prefix = "Resent-" if self._resent else ""
        lines = []
        if prefix.lower() + "message-id" not in seen:
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(self.arrival))
            mid = f"{stamp}.{self.id}@{self.s.hostname}"
            lines.append(f"{prefix}Message-Id: <{mid}>")
            msg.info_as("cleanup", f"{self.id}: {prefix.lower()}message-id=<{mid}>")
            if not prefix:
                seen.add("message-id")
        if "message-id" not in seen:
            msg.info_as("cleanup", f"{self.id}: message-id=<>")
        if prefix.lower() + "date" not in seen:
            lines.append(f"{prefix}Date: " + time.strftime(
                "%a, %d %b %Y %H:%M:%S %z (%Z)", time.localtime(self.arrival)))
        if prefix.lower() + "from" not in seen:
            sender = self.sender or "MAILER-DAEMON"
            if self.sender and self.fullname.strip():
                lines.append(f"{prefix}From: {phrase(self.fullname)} <{sender}>")
            else:
                lines.append(f"{prefix}From: {sender}")
        return "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")

    def _body(self, data: bytes) -> None:
        """The body one line at a time: the MIME structure (part and attached message
        headers, for mime_header_checks and nested_header_checks), and body_checks over
        the first body_checks_size_limit bytes."""
        lines = (self._body_partial + data).split(b"\n")
        self._body_partial = lines.pop()
        ends = [b"\n"] * len(lines)
        if len(self._body_partial) > PARTIAL_LIMIT:     # an endless line: checked in parts
            lines.append(self._body_partial)
            ends.append(b"")
            self._body_partial = b""
        out = self._bodybuf = bytearray()       # PREPEND text goes here too, in order
        try:
            for line, end in zip(lines, ends):
                if self._mime is not None and self._mime_line(line, end, out):
                    continue
                if self._body_checks is not None and self._checking \
                        and self._body_seen < self.s.body_limit:
                    self._body_seen += len(line) + 1
                    text = line.decode("utf-8", "surrogateescape")
                    result = self._check(self._body_checks, "body", text)
                    if result is None:
                        continue
                    if result is not text:
                        line = result.encode("utf-8", "surrogateescape")
                out += line + end
        finally:
            self._bodybuf = None
        if out:
            self._out(bytes(out))

    def _mime_line(self, line: bytes, end: bytes, out: bytearray) -> bool:
        """Follow the MIME structure; True when line was a part or attached message
        header line (handled here), False for body text (boundaries included)."""
        m = self._mime
        if m.state != MimeState.BODY:
            if end and line[:1] in (b" ", b"\t") and m.pending:
                if len(m.pending) < self.s.header_limit:
                    m.pending += b"\n" + line
                return True
            self._mime_flush(out)
            if end and not line:                # the header block ends
                out += b"\n"
                m.end_headers()
                return True
            if end and (h := _HEADER.match(line)):
                m.pending = bytearray(_normal(line, h))
                return True
            m.state = MimeState.BODY            # not a header: the part's body begins
        if line[:2] == b"--" and m.boundaries:
            m.boundary_line(line)
        return False

    def _mime_flush(self, out: bytearray) -> None:
        """Check the gathered part or attached message header, and write it out (or not):
        mime_header_checks for part headers and any MIME header, nested_header_checks for
        the other headers of an attached message (Postfix's header classes)."""
        m = self._mime
        raw, m.pending = m.pending, bytearray()
        if not raw:
            return
        name = raw[:raw.find(b":")].decode("latin-1").strip().lower()
        if name == "content-type":
            m.ctype = bytes(raw)
        maps = self.s.mime_header_checks if m.state == MimeState.PART or \
            name in MIME_HEADERS else self.s.nested_header_checks
        if maps is not None and self._checking:
            text = raw.decode("utf-8", "surrogateescape")
            result = self._check(maps, "header", text)
            if result is None:
                return
            if result is not text:
                raw = bytearray(result.encode("utf-8", "surrogateescape"))
        out += raw + b"\n"

    # --- header_checks and body_checks ---------------------------------------------------
    def _check(self, maps: Maps, context: str, text: str):
        """Look text up; the text to write (the same object when unchanged), or None."""
        try:
            value = maps.find(text)
        except tables.TableError:
            msg.warn(f"{self.id}: {maps.title} map lookup problem -- "
                     "message not accepted, try again later")
            self.errors.add(WRITE)
            return text
        if value is None:
            return text
        return self._act(maps.title, context, text, value)

    def _stop_checks(self) -> None:
        """No more header or body checks for this message (REJECT, DISCARD, ...)."""
        self._checking = self._checking_headers = False
        self._every_header = False

    def _envelope_tail(self) -> str:
        """` from=<s> to=<r> proto=P helo=<h>` of Postfix's cleanup reject/hold lines."""
        parts = []
        if self.sender is not None:
            parts.append(f" from=<{self.sender}>")
        if self.first_rcpt is not None:
            parts.append(f" to=<{self.first_rcpt}>")
        if self.proto:
            parts.append(f" proto={self.proto}")
        if self.helo:
            parts.append(f" helo=<{self.helo}>")
        return "".join(parts)

    def _log(self, action: str, context: str, text: str, detail: str) -> None:
        parts = [f"{self.id}: {self._log_prefix}{action}: {context} {text[:200]} from "
                 f"{self.origin};"]
        parts.append(self._envelope_tail())
        if detail:
            parts.append(f": {detail[:1000]}")
        msg.info_as("cleanup", "".join(parts))

    def _act(self, title: str, context: str, text: str, value: str):
        command, _, arg = value.strip().partition(" ")
        arg = arg.strip()
        action = command.upper()
        if action == "REJECT":
            reason = arg or f"{CONT[1]} {CONT[2]}"
            if not re.match(r"^[45]\.\d{1,3}\.\d{1,3}\b", reason):
                reason = f"5.7.1 {reason}"
            self.reason = reason
            self.errors.add(DEFER if reason[0] == "4" else CONT)
            self._stop_checks()
            self._log("reject", context, text, reason)
        elif action == "WARN":
            self._log("warning", context, text, arg)
        elif action == "INFO":
            self._log("info", context, text, arg)
        elif action == "FILTER":
            if ":" not in arg:
                msg.warn(f"bad FILTER action \"{arg}\" in {title} map -- need "
                         "\"transport:destination\"")
            else:
                self.filter = arg
                self._log("filter", context, text, arg)
        elif action == "PASS":
            self._log("pass", context, text, arg)
            self._stop_checks()
        elif action == "DISCARD":
            self._log("discard", context, text, arg)
            self.discard = True
            self._stop_checks()
        elif action == "HOLD":
            if not (self.hold or self.discard):
                self._log("hold", context, text, arg)
                self.hold = True
        elif action == "PREPEND":
            if not arg:
                msg.warn(f"PREPEND action without text in {title} map")
            elif context == "header" and not _HEADER.match(arg.encode("utf-8", "replace")):
                msg.warn(f"bad PREPEND header text \"{arg}\" in {title} map -- "
                         "need \"headername: headervalue\"")
            else:
                self._log("prepend", context, text, arg)
                if self._prepends is not None:
                    self._prepends.append(arg)
                else:
                    self._out(arg.encode("utf-8", "surrogateescape") + b"\n")
        elif action == "REPLACE":
            if not arg:
                msg.warn(f"REPLACE action without text in {title} map")
            elif context == "header" and not _HEADER.match(arg.encode("utf-8", "replace")):
                msg.warn(f"bad REPLACE header text \"{arg}\" in {title} map -- "
                         "need \"headername: headervalue\"")
            else:
                self._log("replace", context, text, arg)
                return arg
        elif action == "REDIRECT":
            if "@" not in arg:
                msg.warn(f"bad REDIRECT target \"{arg}\" in {title} map -- "
                         "need user@domain")
            else:
                self.redirect = arg
                self._log("redirect", context, text, arg)
                self._stop_checks()
        elif action == "BCC":
            if "@" not in arg:
                msg.warn(f"bad BCC address \"{arg}\" in {title} map -- need user@domain")
            else:
                self.bcc.append(arg)
                self._log("bcc", context, text, arg)
        elif action == "STRIP":
            self._log("strip", context, text, arg)
            return None
        elif action == "IGNORE":
            return None
        elif action not in ("DUNNO", "OK"):
            msg.warn(f"unknown command in {title} map: {value}")
        return text

    # --- milters (lib/milter.py), as Postfix's cleanup_milter.c ----------------------------
    def _hold(self, data) -> None:
        """Content for the milters: kept until finish(), within message_size_limit."""
        if len(self._held) + len(data) > self.s.milter_limit:
            if WRITE not in self.errors:
                msg.warn(f"{self.id}: message too large for the milters")
                self.errors.add(WRITE)
            return
        self._held += data

    def _run_milters(self) -> None:
        """The message to the milters, their edits applied, then content and sender to the
        queue file; a reject, discard or hold is logged as Postfix's cleanup does."""
        from_milters = None
        if not (self.errors or self.discard):
            message = milter.Message(bytes(self._held), self)
            from_milters = self.milters.message(message)
            if from_milters is None or from_milters[:1] in ("H",):
                self._held = bytearray(message.content())
        if from_milters is not None:
            self.milter_apply("END-OF-MESSAGE", from_milters)
        if not (self.errors or self.discard):
            self.w.set_sender(self.sender or "")
            self.w.write(bytes(self._held))
        self._held = bytearray()

    def milter_apply(self, event: str, reply: str) -> None:
        """A milter's verdict on the message (cleanup_milter_apply)."""
        if reply[0] == "H":
            if self.hold:
                return
            self.hold = True
            action, text = "milter-hold", reply[1:] or "milter triggers HOLD action"
        elif reply[0] == "D":
            if self.discard:
                return
            self.discard = True
            action, text = "milter-discard", "milter triggers DISCARD action"
        else:
            if reply[0] == "S":
                reply = "421 4.7.0 Server closing connection"
            self.milter_reply = reply
            self.errors.add(DEFER if reply[0] == "4" else CONT)
            action, text = "milter-reject", reply[4:]
        parts = [f"{self.id}: {action}: {event} from {self.origin}: {text};"]
        parts.append(self._envelope_tail())
        msg.info_as("cleanup", "".join(parts))

    def milter_header_check(self, name: str, value: str) -> list[str]:
        """milter_header_checks on a header that a milter adds or changes: the header
        lines to write in its place (PREPEND results first; none after IGNORE or STRIP)."""
        text = f"{name}:{value}"
        maps = self.s.milter_header_checks
        if maps is None or self.errors or self.discard:
            return [text]
        self._log_prefix, self._prepends = "milter-header-", []
        try:
            result = self._check(maps, "header", text)
            return self._prepends + ([] if result is None else [result])
        finally:
            self._log_prefix, self._prepends = "", None

    def milter_chg_from(self, sender: str, args: str) -> None:
        msg.verbose(1, f"{self.id}: milter change sender: <{sender}> {args}")
        self.sender = sender

    def milter_add_rcpt(self, rcpt: str, args: str) -> None:
        notify = orcpt = ""
        for word in args.split():
            key, _, value = word.partition("=")
            if key.upper() == "NOTIFY":
                notify = value.upper()
            elif key.upper() == "ORCPT":
                orcpt = value
        self.add_recipient(rcpt, notify, orcpt)

    def milter_del_rcpt(self, rcpt: str) -> None:
        self.rcpts = [r for r in self.rcpts if r != rcpt]

    # --- the end ---------------------------------------------------------------------------
    def finish(self) -> Result:
        """End the content, write the recipients, and commit (or not); a Result."""
        if self.in_header:
            if self._partial:
                piece, self._partial = self._partial, b""
                self._header_piece(piece, self._at_start, True)
            self._end_of_header(b"")
        if self._body_partial:
            tail, self._body_partial = self._body_partial, b""
            self._body(tail + b"\n")
        if self._mime is not None and self._mime.pending:  # the content ended in a header
            out = self._bodybuf = bytearray()
            try:
                self._mime_flush(out)
            finally:
                self._bodybuf = None
            self._out(bytes(out))
        elif self._last_byte != b"\n":
            self._out(b"\n")
        if self.milters is not None:
            self._run_milters()
        rcpts = self._recipients()
        for bad in (DEFER, HOPS, CONT, WRITE):        # the most severe, as smtpd.c
            if bad in self.errors:
                self.abort()
                if self.milter_reply and bad in (DEFER, CONT):
                    reply = self.milter_reply
                elif bad in (DEFER, CONT) and self.reason:
                    reply = f"{bad[0]} {self.reason}"
                else:
                    reply = f"{bad[0]} {bad[1]} Error: {bad[2]}"
                return Result("deferred" if bad[0] < 500 else "rejected", self.id, reply)
        if self.discard:
            self.abort()
            return Result("discarded", self.id)
        if self.filter:
            self.w.add_attr(FILTER_ATTR, self.filter)
        for rcpt, notify, orcpt, original in rcpts:
            self.w.add_recipient(rcpt, notify, orcpt, original)
        if self.hold:
            self.w.dir = os.path.join(self.queue_root, "hold")  # the commit renames there
        self.w.commit()
        self.closed = True
        return Result("held" if self.hold else "queued", self.id)

    def _recipients(self) -> list[tuple[str, str, str, str]]:
        """The envelope recipients to write, each with its DSN NOTIFY and ORCPT and its
        original address (as the client gave it; "" when that is the recipient itself
        or enable_original_recipient = no): rewritten, expanded, Bcc added. A recipient
        that rewriting or expansion changed keeps its NOTIFY and the client's ORCPT (a
        notice or the smtp client uses the original address when there is none). As
        Postfix's cleanup_out_recipient,
        duplicates are dropped per original address: two addresses given that end in
        one mailbox each keep their copy (their X-Original-To: differ), unless
        enable_original_recipient = no."""
        if self.redirect is not None:
            return [(self.redirect, "", "", "")]
        s = self.s
        if not (s.rewrites_recipients or s.always_bcc or self.bcc) and \
                all(self._qualify(r) == r for r in self.rcpts):
            return [(r, *self.dsn.get(r, ("", "")), "") for r in dict.fromkeys(self.rcpts)]
        given = [(self._rewrite_recipient(r), r) for r in self.rcpts]
        bcc = self.bcc + ([self._qualify(s.always_bcc)] if s.always_bcc else [])
        keep = s.keep_original
        out: dict[tuple[str, str], tuple[str, str]] = {}
        for rcpt, original in given + [(b, None) for b in bcc]:
            notify, orcpt = self.dsn.get(original, ("", "")) if original else ("", "")
            for addr in self._expand(rcpt):
                kept = original if keep and original and original != addr else ""
                if (addr, kept) not in out:
                    out[addr, kept] = (notify, orcpt)
        return [(addr, n, o, kept) for (addr, kept), (n, o) in out.items()]

    def abort(self) -> None:
        """Throw the queue file away."""
        if not self.closed:
            self.w.abort()
            self.closed = True


MIME_HEADERS = frozenset((       # Postfix's HDR_OPT_MIME: mime_header_checks at any level
    "content-description", "content-disposition", "content-id",
    "content-transfer-encoding", "content-type", "mime-version"))
MIME_NESTING_LIMIT = 100          # multipart levels followed (Postfix's mime_nesting_limit)
_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\n]{1,200})"|([^\s;"]{1,200}))', re.I)


class MimeState:
    """Where the body is in the MIME structure: body text, the headers of a multipart
    part, or the headers of an attached message (message/rfc822)."""

    BODY, PART, NESTED = 0, 1, 2

    def __init__(self):
        self.state = self.BODY
        self.boundaries: list[bytes] = []
        self.pending = bytearray()          # the logical header being gathered
        self.ctype = b""                    # Content-Type of the current header block

    def content_type(self, raw) -> None:
        """The primary header's Content-Type."""
        self.ctype = bytes(raw)

    def end_headers(self) -> None:
        """A header block ended: a multipart's boundary is followed; after the headers
        of a message/rfc822 part come those of the attached message."""
        value = self.ctype.partition(b":")[2]
        self.ctype = b""
        kind = value.split(b";", 1)[0].strip().lower()
        m = _BOUNDARY.search(value)
        if kind.startswith(b"multipart/") and m and \
                len(self.boundaries) < MIME_NESTING_LIMIT:
            self.boundaries.append(m.group(1) or m.group(2))
            self.state = self.BODY
        elif kind in (b"message/rfc822", b"message/global"):
            self.state = self.NESTED
        else:
            self.state = self.BODY

    def boundary_line(self, line: bytes) -> None:
        """A --boundary line starts the next part; --boundary-- closes its multipart."""
        text = line[2:].rstrip(b" \t\r")
        for i in range(len(self.boundaries) - 1, -1, -1):
            b = self.boundaries[i]
            if text == b:
                del self.boundaries[i + 1:]
                self.state, self.ctype = self.PART, b""
                return
            if text == b + b"--":
                del self.boundaries[i:]
                self.state = self.BODY
                return


_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~\- \x80-\U0010ffff]*$")


def phrase(name: str) -> str:
    """A display name for a From: header, quoted when it needs to be (RFC 5322)."""
    name = " ".join("".join(c if c >= " " and c != "\x7f" else " " for c in name).split())
    if _ATEXT.match(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
