"""pickup: local mail submission, the server side of `postfix-py sendmail`.

    pickup    unix  n  -  y  -  -  pickup

DESCRIPTION
    Postfix's local submission goes sendmail -> postdrop (set-gid, writes maildrop/) ->
    pickup -> cleanup. postfix-py has no set-gid program: sendmail, running as the user,
    talks to this daemon over the public socket queue_directory/public/pickup, and the
    daemon, as mail_owner, writes the queue file into incoming/ and wakes qmgr. The
    kernel tells who the user is (SO_PEERCRED): that uid, not anything the client says,
    is what the queue file (attributes submit_uid and submit_user) and the Received:
    header record. Users never touch the queue: its directories stay 0700 mail_owner,
    and nothing in it is world-writable.

    The message goes through the cleanup stage (lib/cleanup.py) in the local rewrite
    context, as Postfix's cleanup treats local mail: addresses without a domain get
    @$myorigin, Bcc: and Resent-Bcc: headers are removed, and Message-Id:, Date: and
    From: (or their Resent- forms when the message has Resent- headers) are added where
    they are missing, after the other headers, in Postfix's format; address rewriting,
    header_checks and body_checks apply as to all mail (a REJECT refuses the submission):

        Received: by $myhostname ($mail_name, from userid UID)
                id QUEUEID; DATE
        Message-Id: <YYYYMMDDHHMMSS.QUEUEID@$myhostname>    (the time in UTC)
        From: Full Name <sender@$myorigin>      (From: MAILER-DAEMON for the null sender)

PROTOCOL
    A connection begins with one lib/attr.py frame from the client:

    request=smtp     The rest of the connection is an SMTP session (sendmail -bs), served
                     by smtpd/session.py as Postfix's stand-alone smtpd: client
                     localhost[127.0.0.1], no restrictions, never STARTTLS or AUTH.
    request=submit   sender (empty for <>), fullname (optional), trace_flags (optional:
                     512, sendmail -bv's report instead of delivery; any other value is
                     refused); then frames rcpt=ADDR,
                     one per recipient; data=BYTES (message content, LF line ends, no
                     dot-stuffing) as many as needed; end=1. The answer is one frame:
                     status=0 queue_id=ID; status=2 reason=TEXT (refused: a bad address,
                     too big, no recipients); status=3 reason=TEXT (try again later).

    The daemon logs `QUEUEID: uid=UID from=<sender>` as Postfix's pickup does; the
    cleanup stage logs `QUEUEID: message-id=<...>`.

SECURITY
    Talks to local users, who are not trusted: every frame is bounded (lib/attr.py),
    addresses are checked as smtpd checks them, message_size_limit and queue_minfree
    apply, and a client that stalls costs smtpd_timeout. Runs as mail_owner, chrooted
    in queue_directory when master.cf says so; /etc/passwd is opened before the jail so
    that uids can be named inside it. A service of another type than unix is refused.

CONFIGURATION PARAMETERS
    myhostname, myorigin, mail_name, message_size_limit (10240000), queue_minfree (0),
    smtpd_timeout (300s), the cleanup parameters of lib/cleanup.py, and for -bs the
    smtpd_* session parameters, with smtpd's lib/server_filters.py ones
    (smtpd_reject_footer, smtpd_reject_footer_maps, smtpd_expansion_filter,
    smtpd_command_filter, smtpd_discard_ehlo_keyword_address_maps,
    smtpd_forbidden_commands), their tables opened before the jail: one that cannot be
    opened is a warning, and each -bs session then gets only `421 4.3.0 HOST Server
    local error`. non_smtpd_milters (empty): the milters of a submission
    (lib/milter.py), which see it come from localhost[127.0.0.1] over ESMTP, as Postfix's
    cleanup emulates it; also for sendmail -bs (Postfix's stand-alone smtpd uses no
    smtpd_milters: its mail goes through postdrop and pickup to cleanup, which applies
    non_smtpd_milters; none with receive_override_options = no_milters). A milter's
    reject or tempfail is the answer to the submission
    (the end-of-DATA reply for -bs), where Postfix's pickup would bounce the message.

FILES
    queue_directory/public/pickup (the socket, 0666), queue_directory/incoming.

SEE ALSO
    tools/sendmail.py, smtpd/session.py, lib/queue.py; Postfix pickup(8), postdrop(1),
    cleanup(8).
"""

from __future__ import annotations

import os
import socket
import struct
import time

from ..lib import attr, cleanup, milter, msg, server, tables, verify_client
from ..lib import server_filters as SF
from ..lib import queue as Q
from ..lib.maincf import ConfigError
from ..lib.smtpio import SmtpStream
from ..smtpd.check import ClientState
from ..smtpd.session import Session, valid_address

MAX_RECIPIENTS = 100000          # per message; Postfix's local submission has no limit
_CRED = struct.Struct("3i")      # struct ucred: pid, uid, gid
STATUS_OK, STATUS_BAD, STATUS_ERROR = attr.STATUS_OK, attr.STATUS_BAD, attr.STATUS_ERROR


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    if conn.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
    except OSError:
        return None
    return uid


class Users:
    """uid -> login name from /etc/passwd, opened before the jail and read on use."""

    def __init__(self, path: str = "/etc/passwd"):
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = -1

    def name(self, uid: int) -> str | None:
        """The first login name with this uid, or None."""
        if self.fd < 0:
            return None
        try:
            data = os.pread(self.fd, 4 << 20, 0)
        except OSError:
            return None
        for line in data.decode("utf-8", "surrogateescape").splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2] == str(uid) and fields[0]:
                return fields[0]
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def received_by(cfg, uid: int, qid: str) -> bytes:
    """The Received: header of a local submission, as Postfix's pickup/cleanup."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S %z (%Z)")
    return (f"Received: by {cfg.get('myhostname')} ({cfg.get('mail_name')}, from userid "
            f"{uid})\n\tid {qid}; {date}\n").encode("utf-8", "surrogateescape")


def local_cleanup(ctx_cfg, settings, queue_root: str, uid: int, user: str | None,
                  fullname: str = "", **kw) -> cleanup.Cleanup:
    """The cleanup stage of a local submission: Postfix's local rewrite context."""
    writer = cleanup.Cleanup(settings, queue_root, local=True, fullname=fullname, **kw)
    try:
        writer.add_attr("submit_uid", str(uid))
        if user:
            writer.add_attr("submit_user", user)
        writer.add_attr("rewrite_context", "local")
    except BaseException:
        writer.abort()
        raise
    return writer


class LocalChecker:
    """Local submissions pass no smtpd restrictions, as Postfix's stand-alone smtpd."""

    def connect(self, client):
        return None

    helo = mail = connect

    def rcpt(self, client, rcpt):
        return None

    data = end_of_data = rcpt

    def in_mynetworks(self, addr, name="unknown") -> bool:
        return True

    def header_rewrite_context(self, client) -> str:
        return "local"          # a local submission, as pickup's

    def in_network_list(self, param, addr, name="unknown") -> bool:
        # never XCLIENT or XFORWARD, as Postfix's stand-alone smtpd: a local user would
        # name another client (and a login) in the queue file and the Received: header
        return param not in ("smtpd_authorized_xclient_hosts",
                             "smtpd_authorized_xforward_hosts")


class LocalSession(Session):
    """`sendmail -bs`: Postfix's stand-alone smtpd, without STARTTLS or AUTH."""

    stand_alone = True      # ETRN: 458, as Postfix's stand-alone mode

    def __init__(self, stream, cfg, queue_root: str, uid: int, user: str | None,
                 stopping=lambda: False, milter_specs: list | None = None):
        self.uid, self.user = uid, user
        self.milter_specs = milter_specs    # non_smtpd_milters, never smtpd_milters
        self.local_milters: milter.Milters | None = None
        super().__init__(stream, cfg, ClientState(name="localhost", addr="127.0.0.1"),
                         queue_root, LocalChecker(), tls=None, stopping=stopping)

    def open_queue_file(self) -> bool:
        try:
            if self.cleanup_settings is None:
                self.cleanup_settings = cleanup.Settings(self.cfg)
            if self.milter_specs:
                self.local_milters = milter.Milters(self.milter_specs, self.cfg, None)
            self.writer = local_cleanup(self.cfg, self.cleanup_settings, self.queue_root,
                                        self.uid, self.user, origin=self.client.client,
                                        proto=self.protocol(), helo=self.helo or "",
                                        milters=self.local_milters)
            w = self.writer
            w.add_attr("client_name", self.client.name)
            w.add_attr("client_address", self.client.addr)
            if self.helo:
                w.add_attr("helo_name", self.helo)
            w.add_attr("protocol", self.protocol())
            w.set_sender(self.sender)
        except OSError as exc:
            self.writer = None
            return self.queue_trouble(exc)
        msg.info(f"{w.id}: uid={self.uid} from=<{self.sender}>")
        return True

    def received_header(self) -> bytes:
        return received_by(self.cfg, self.uid, self.writer.id) + super().received_header()

    def start_content(self) -> OSError | None:
        """non_smtpd_milters see the envelope now, all recipients known, as Postfix's
        cleanup emulates it for mail from pickup; their verdict is the end-of-data reply."""
        ms = self.local_milters
        if ms is not None:
            ms.evaluate = milter.local_macros(self.cfg, self.writer)
            milter.emulate_envelope(ms, self.writer, self.rcpts)
        return super().start_content()

    def reset(self) -> None:
        super().reset()
        ms, self.local_milters = getattr(self, "local_milters", None), None
        if ms is not None:          # one set of milter connections per message
            ms.disc_event()


# --- request=submit -----------------------------------------------------------------------
class _Refused(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _address(value: bytes, what: str, dsn: str) -> str:
    addr = _text(value).strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    if addr and not valid_address(addr):
        raise _Refused(STATUS_BAD, f"{dsn} Bad {what} address syntax")
    return addr


def submit(conn: socket.socket, ctx, uid: int, user: str | None, first: dict) -> None:
    """Serve one request=submit conversation: read the message, queue it, answer.

    A refused message is still read to its end frame, so that the client, which sends
    everything before it reads, always gets the answer.
    """
    cfg = ctx.cfg
    timeout = cfg["smtpd_timeout"]
    limit = cfg["message_size_limit"]
    writer: cleanup.Cleanup | None = None
    problem: _Refused | None = None
    rcpts: list[str] = []
    size = 0
    try:
        sender = _address(first.get("sender", b""), "sender", "5.1.7")
    except _Refused as exc:
        problem, sender = exc, ""
    fullname = _text(first.get("fullname", b""))[:200]
    # sendmail -bv: a report instead of a delivery. A local user may ask for that,
    # never for the verify service's own probes (256), whose results it trusts.
    trace = first.get("trace_flags")
    if trace is not None and problem is None and \
            trace != str(verify_client.TRACE_FLAG_REPORT).encode():
        problem = _Refused(STATUS_BAD, "5.5.4 Error: bad trace_flags")
    try:
        while True:
            frame = attr.read_frame(conn, timeout)
            if len(frame) != 1:
                raise attr.AttrError("one attribute per frame expected")
            if "end" in frame:
                break
            if problem is not None:
                continue
            try:
                if "rcpt" in frame:
                    rcpt = _address(frame["rcpt"], "recipient", "5.1.3")
                    if not rcpt:
                        raise _Refused(STATUS_BAD, "5.1.3 Bad recipient address syntax")
                    if writer is not None:
                        raise _Refused(STATUS_BAD, "5.5.1 Error: recipient after content")
                    if len(rcpts) >= MAX_RECIPIENTS:
                        raise _Refused(STATUS_BAD, "5.5.3 Error: too many recipients")
                    rcpts.append(rcpt)
                elif "data" in frame:
                    data = frame["data"]
                    size += len(data)
                    if limit and size > limit:
                        raise _Refused(STATUS_BAD, "5.3.4 Message size exceeds fixed limit")
                    if writer is None:
                        writer = _open(ctx, uid, user, sender, fullname, rcpts, trace)
                    writer.write(data)
                else:
                    raise attr.AttrError(f"unexpected attribute {next(iter(frame))}")
            except _Refused as exc:
                problem = exc
            except OSError as exc:
                if isinstance(exc, (attr.PeerClosedError, attr.TruncatedFrameError,
                                    TimeoutError)):
                    raise
                msg.warn(f"queue file write error: {exc.strerror or exc}")
                problem = _Refused(STATUS_ERROR, "4.3.0 Error: queue file write error")
            if problem is not None and writer is not None:
                writer.abort()
                writer = None
        if problem is None:
            try:
                if writer is None:
                    writer = _open(ctx, uid, user, sender, fullname, rcpts, trace)
                try:
                    result = writer.finish()
                finally:
                    if writer.milters is not None:
                        writer.milters.disc_event()
                writer = None
                qid = result.queue_id
                if result.reply:        # refused by the cleanup stage, which logged why
                    problem = _Refused(STATUS_ERROR if result.reply[0] == "4"
                                       else STATUS_BAD, result.reply[4:])
            except _Refused as exc:
                problem = exc
            except OSError as exc:
                msg.warn(f"queue file write error: {exc.strerror or exc}")
                problem = _Refused(STATUS_ERROR, "4.3.0 Error: queue file write error")
    except (attr.PeerClosedError, attr.TruncatedFrameError):
        msg.info(f"uid={uid}: lost connection during local submission")
        problem = None
        qid = None
    except TimeoutError:
        msg.info(f"uid={uid}: timeout during local submission")
        problem = None
        qid = None
    except (attr.AttrError, OSError) as exc:
        msg.warn(f"uid={uid}: malformed local submission request: {exc}")
        _answer(conn, {"status": STATUS_BAD, "reason": "5.5.2 Error: malformed request"})
        problem = None
        qid = None
    finally:
        if writer is not None and not writer.closed:
            writer.abort()
            if writer.milters is not None:
                writer.milters.disc_event()
    if problem is not None:
        if writer is not None:
            writer.abort()
        msg.warn(f"uid={uid}: local submission refused: {problem.reason}")
        _answer(conn, {"status": problem.status, "reason": problem.reason})
        return
    if qid is None:
        return
    _answer(conn, {"status": STATUS_OK, "queue_id": qid})
    Q.wake(ctx.queue_root)


def _open(ctx, uid: int, user: str | None, sender: str, fullname: str,
          rcpts: list[str], trace: bytes | None = None) -> cleanup.Cleanup:
    """The queue file of a submission, with its envelope and Received: header (and
    sendmail -bv's trace_flags)."""
    if not rcpts:
        raise _Refused(STATUS_BAD, "5.5.1 Error: no recipients specified")
    try:
        free = Q.free_space(ctx.queue_root)
    except OSError:
        free = None
    if free is not None and free < ctx.cfg["queue_minfree"]:
        msg.warn(f"not enough free space in mail queue: {free} bytes < "
                 f"{ctx.cfg['queue_minfree']} bytes")
        raise _Refused(STATUS_ERROR, "4.3.1 Insufficient system storage")
    specs = ctx.state.get("milters")
    ms = milter.Milters(specs, ctx.cfg, None) if specs else None
    writer = local_cleanup(ctx.cfg, ctx.state["cleanup"], ctx.queue_root, uid, user,
                           fullname, milters=ms)
    try:
        writer.add_attr("protocol", "sendmail")
        if trace is not None:
            writer.add_attr(verify_client.TRACE_FLAGS_ATTR, trace.decode("ascii"))
        writer.set_sender(sender)
        msg.info(f"{writer.id}: uid={uid} from=<{sender}>")
        for rcpt in rcpts:
            writer.add_recipient(rcpt)
        if ms is not None:          # non_smtpd_milters: the envelope stages, emulated
            ms.evaluate = milter.local_macros(ctx.cfg, writer)
            milter.emulate_envelope(ms, writer, rcpts)
        writer.write(received_by(ctx.cfg, uid, writer.id))
    except BaseException:
        writer.abort()
        if ms is not None:
            ms.disc_event()
        raise
    return writer


def _answer(conn: socket.socket, reply: dict) -> None:
    try:
        attr.write_frame(conn, reply, timeout=10)
    except (OSError, attr.AttrError):
        pass


# --- the service --------------------------------------------------------------------------
def pre_init(ctx) -> None:
    """As root, before the jail: open /etc/passwd to name submitting users."""
    if ctx.service.type != "unix":
        msg.fatal(f"service {ctx.service.name}: pickup must be a unix service, "
                  f"not {ctx.service.type}: it trusts the kernel's word on the user")
    ctx.state["users"] = Users()
    try:
        # sendmail -bs: smtpd's reject footers, command filter, EHLO keyword maps and
        # forbidden commands, as Postfix's stand-alone smtpd reads them from main.cf.
        # A table that cannot be opened refuses -bs sessions only (421), not submissions.
        ctx.state["filters"] = SF.ServerFilters(ctx.cfg, "smtpd")
    except tables.TableError as exc:
        msg.warn(f"sendmail -bs sessions are refused: {exc}")
        ctx.state["filters"] = None
    try:
        ctx.state["cleanup"] = cleanup.Settings(ctx.cfg)    # its tables, before the jail
        # receive_override_options = no_milters: none (Postfix's input_transp_cleanup)
        ctx.state["milters"] = [] if "no_milters" in cleanup.receive_overrides(ctx.cfg) \
            else milter.parse(ctx.cfg.get("non_smtpd_milters"), ctx.cfg)
    except ConfigError as exc:
        msg.fatal(str(exc))


def pickup_service(conn: socket.socket, ctx) -> None:
    """One local client: a submission, or an SMTP session for sendmail -bs."""
    uid = peer_uid(conn)
    if uid is None:
        msg.warn("cannot tell the user of a local submission (SO_PEERCRED); refusing it")
        return
    users = ctx.state.get("users")
    user = users.name(uid) if users is not None else None
    try:
        first = attr.read_frame(conn, ctx.cfg["smtpd_timeout"])
    except (attr.PeerClosedError, attr.TruncatedFrameError):
        return      # gone before a request; also the master's wakeup `W` (wakeup column)
    except (OSError, attr.AttrError) as exc:
        msg.warn(f"uid={uid}: bad local submission request: {exc}")
        return
    request = first.get("request", b"")
    if request == b"submit":
        submit(conn, ctx, uid, user, first)
    elif request == b"smtp":
        stream = SmtpStream(conn, ctx.cfg["smtpd_timeout"])
        session = LocalSession(stream, ctx.cfg, ctx.queue_root, uid, user,
                               stopping=lambda: ctx.stopping,
                               milter_specs=ctx.state.get("milters"))
        session.cleanup_settings = ctx.state["cleanup"]
        filters = ctx.state.get("filters")
        if filters is not None:
            session.use_filters(filters)
        else:
            session.hangup = True   # 421 4.3.0 Server local error
        try:
            session.run()
        finally:
            stream.close()
    else:
        msg.warn(f"uid={uid}: unknown local submission request "
                 f"\"{request.decode('latin-1')[:30]}\"")
        _answer(conn, {"status": STATUS_BAD, "reason": "5.5.2 Error: unknown request"})


def on_exit(ctx) -> None:
    users = ctx.state.pop("users", None)
    if users is not None:
        users.close()


def main(ctx) -> int:
    """The pickup program: one local client at a time."""
    return server.single_server(ctx, pickup_service, pre_init=pre_init, on_exit=on_exit)
