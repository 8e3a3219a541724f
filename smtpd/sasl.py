"""SASL AUTH for smtpd: mechanisms, the Dovecot auth client, and the built-in passwd-file.

Postfix's smtpd talks to a SASL implementation through its xsasl layer; this module is
that layer. A Backend is made once per worker (pre_init, before the jail); a SaslSession
per client conversation; an exchange is first() then next() until it is done:

    backend = from_config(cfg)                  # None when smtpd_sasl_auth_enable = no
    sess = backend.session(client_addr, server_addr)
    sess.mechanisms(tls) -> ["PLAIN", "LOGIN"], [] (none allowed), or None (the
                              authentication server cannot be reached)
    step = sess.first(mech, initial_response or None, tls)
    while step.status == MORE:                  # step.data: the base64 challenge (334)
        step = sess.next(client_line)
    step.status: DONE (sess.username is the login name), FAIL or TEMP (step.data is the
    reason: Postfix's `535 5.7.8 Error: authentication failed: reason` and
    `454 4.7.0 Temporary authentication failure: reason`)

TYPES (smtpd_sasl_type)
    dovecot   Dovecot's authentication protocol (version 1) over the UNIX socket
              smtpd_sasl_path; a relative path is relative to queue_directory, so the
              usual `private/auth` works inside the chroot jail, as with Postfix. The
              connection is made on first use, as mail_owner, and kept for later
              clients; it is made again once when it breaks. Lines exchanged:
                  -> VERSION 1 0, CPID pid
                  <- VERSION 1 n, MECH name props..., (SPID, CUID, COOKIE), DONE
                  -> AUTH id mech service=smtp nologin lip= rip= [secured] [resp=]
                  <- CONT id challenge | OK id user=... | FAIL id [reason=] [temp] [user=]
                  -> CONT id response
              Mechanisms are those Dovecot announces, minus `private` ones and those
              the security options refuse.
    builtin   postfix-py's own: PLAIN and LOGIN (RFC 4616, draft-murchison-sasl-login)
              checked against a Dovecot-style passwd-file named by smtpd_sasl_path
              (`user:{SCHEME}hash[:...]`, `#` comments). Schemes: SHA512-CRYPT,
              SHA256-CRYPT (crypt(3) `$6$`, `$5$`, computed here with hashlib),
              BLF-CRYPT (bcrypt `$2y$`/`$2b$`/`$2a$`, with the bcrypt package), CRYPT
              (one of those, told by its `$id$`), PLAIN and CLEARTEXT (for tests); a
              hash without `{SCHEME}` is CRYPT, as Dovecot's default. The file is opened
              before the jail; before each check it is looked at again: a file changed in
              place is read again through the open descriptor, a file replaced (renamed
              over) is opened again by name where the name can be reached; otherwise
              (chroot, a file outside the jail) the worker answers AUTH with a temporary
              failure (454) rather than trust the old copy, and exits after its client so
              that the master starts one that reads the new file (Postfix's "has changed
              -- restarting"); a worker also checks the file after each client. A
              failed check waits smtpd_sasl_builtin_failure_delay (as Dovecot's
              auth_failure_delay), and an unknown user costs a hash computation too, so
              that timing does not tell which users exist.

REPLIES AND LOG LINES (Postfix 3.7 with Dovecot, measured)
    235 2.7.0 Authentication successful; 334 challenge; 501 5.5.4 Syntax: AUTH mechanism;
    501 5.7.0 Authentication aborted (`*`); 503 5.5.1 Error: authentication not enabled
    (also before TLS with smtpd_tls_auth_only = yes); 503 5.5.1 Error: already
    authenticated; 503 5.5.1 Error: MAIL transaction in progress; 535 5.7.8 Error:
    authentication failed: REASON (`(reason unavailable)` when there is none, `Invalid
    authentication mechanism`, `Invalid base64 data in initial response`); 454 4.7.0
    Temporary authentication failure: REASON.
    `warning: host[addr]: SASL PLAIN authentication failed: REASON, sasl_username=NAME`,
    `warning: host[addr]: SASL LOGIN authentication aborted`,
    `ID: client=host[addr], sasl_method=PLAIN, sasl_username=NAME[, sasl_sender=ADDR]`.

DEVIATIONS
    STARTTLS forgets a completed AUTH (RFC 3207 4.2); Postfix 3.7 keeps it. When Dovecot
    cannot be reached, AUTH is not announced and answers 454, where Postfix's smtpd
    stops with "fatal: no SASL authentication mechanisms". A response longer than
    smtpd_sasl_response_limit is answered `500 5.5.6 Authentication exchange line is
    too long` (RFC 4954) and not quoted in the log.

SECURITY
    Credentials (the base64 responses, passwords, hashes) are never logged; only the
    mechanism and the login name are. Client responses are bounded by
    smtpd_sasl_response_limit and must be base64 before they go to Dovecot, so that a
    client cannot inject protocol lines (TAB, LF).

CONFIGURATION PARAMETERS
    smtpd_sasl_auth_enable (no), smtpd_sasl_type (dovecot), smtpd_sasl_path (smtpd;
    Postfix's Debian packages use private/auth), smtpd_sasl_service (smtp),
    smtpd_sasl_security_options (noanonymous), smtpd_sasl_tls_security_options
    ($smtpd_sasl_security_options), smtpd_sasl_builtin_failure_delay (2s),
    smtpd_sasl_local_domain (empty; builtin: appended as @realm to login names without
    one, as Cyrus SASL's user_realm; dovecot: ignored with a warning, as Postfix's
    Dovecot client passes no realm).

FUNCTIONS
    from_config(cfg) -> Backend or None; ConfigError for an unknown type or security
        option, or an unreadable passwd-file.
    check_config(cfg): the same checks without opening anything (the master's prepare).
    security_options(words, name) -> set of property names; ConfigError when unknown.
    verify_password(password, stored) -> bool, for one passwd-file hash.
    sha_crypt(password, setting) -> the crypt(3) string of `$5$`/`$6$` settings.
    hash_password(password) -> `{SHA512-CRYPT}$6$salt$hash` with a random salt, for a
        passwd-file line (`postfix-py init` writes its test user with it).
    redact(text) -> client text with everything after an AUTH command cut, for log lines.

SEE ALSO
    smtpd/session.py (auth_cmd), Postfix xsasl_dovecot_server.c, smtpd_sasl_glue.c,
    Dovecot's Authentication Protocol, passwd-file and password schemes documentation.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import socket
import time
from dataclasses import dataclass

from ..lib import msg
from ..lib.msg import printable
from ..lib.maincf import ConfigError
from ..lib.sasl_common import (allowed, hash_password, security_options,  # noqa: F401
                               sha_crypt, verify_password)

DONE, MORE, FAIL, TEMP = "done", "more", "fail", "temp"
REASON_UNAVAILABLE = "(reason unavailable)"
AUTH_TIMEOUT = 10          # seconds per Dovecot read or write, as Postfix's AUTH_TIMEOUT
MAX_LINE = 65536           # longest line accepted from the Dovecot auth server
TYPES = ("dovecot", "builtin")

BUILTIN_MECHS = (("PLAIN", frozenset({"plaintext"})), ("LOGIN", frozenset({"plaintext"})))
_B64 = re.compile(rb"^[A-Za-z0-9+/=]*$")

@dataclass
class Step:
    """One step of an exchange: MORE (data: base64 challenge), DONE, FAIL or TEMP (data:
    the reason)."""
    status: str
    data: str = ""


_AUTH_CMD = re.compile(r"(?im)^[ \t]*auth[ \t]+[^ \t\r\n]*")


def redact(text: str) -> str:
    """Client input for a log line, cut after the mechanism of any AUTH command in it."""
    m = _AUTH_CMD.search(text)
    if m is None:
        return text
    return text[:m.end()] + (" ..." if len(text) > m.end() else "")


def _decode_b64(data: str) -> bytes | None:
    """Strict base64, or None."""
    raw = data.encode("ascii", "replace")
    if not _B64.match(raw):
        return None
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None


# --- the backends -------------------------------------------------------------------------
class Backend:
    """One SASL implementation in one worker (made in pre_init, before the jail)."""

    type = ""

    def __init__(self, cfg):
        self.service = cfg.get("smtpd_sasl_service") or "smtp"
        self.options = security_options(cfg["smtpd_sasl_security_options"],
                                        "smtpd_sasl_security_options")
        self.tls_options = security_options(cfg["smtpd_sasl_tls_security_options"],
                                            "smtpd_sasl_tls_security_options")

    def needs_restart(self) -> bool:
        """Whether this worker should exit after its client (its files have changed)."""
        return False

    def session(self, client_addr: str, server_addr: str) -> "SaslSession":
        """The SASL state of one client conversation."""
        return SaslSession(self, client_addr, server_addr)

    def all_mechanisms(self) -> list[tuple[str, frozenset[str]]] | None:
        """(name, properties) of every mechanism; None when the server is unreachable."""
        raise NotImplementedError

    def close(self) -> None:
        """Release sockets and files."""


class SaslSession:
    """SASL for one client: the allowed mechanisms and one exchange at a time."""

    def __init__(self, backend: Backend, client_addr: str, server_addr: str):
        self.backend = backend
        self.client_addr = client_addr
        self.server_addr = server_addr
        self.username: str | None = None
        self._exchange = None

    def mechanisms(self, tls: bool) -> list[str] | None:
        """Mechanisms this client may use, in the server's order; None: unavailable."""
        mechs = self.backend.all_mechanisms()
        if mechs is None:
            return None
        options = self.backend.tls_options if tls else self.backend.options
        return [name for name, props in mechs if allowed(props, options)]

    def first(self, mech: str, initial: str | None, tls: bool) -> Step:
        """Start an exchange; initial is the client's initial response, as sent ("=" is
        an empty one, RFC 4954; Postfix hands it to Dovecot as it is)."""
        self.username = None
        mechs = self.mechanisms(tls)
        if mechs is None:
            return Step(TEMP, "Can't connect to authentication server")
        mech = mech.upper()
        if mech not in mechs:
            return Step(FAIL, "Invalid authentication mechanism")
        if initial is not None and not _B64.match(initial.encode("ascii", "replace")):
            return Step(FAIL, "Invalid base64 data in initial response")
        if isinstance(self.backend, DovecotBackend):
            self._exchange = _DovecotExchange(self, mech, tls)
        else:
            self._exchange = _BuiltinExchange(self, mech)
        return self._finish(self._exchange.first(initial))

    def next(self, response: str) -> Step:
        """The client's answer to a 334 challenge."""
        if self._exchange is None:
            return Step(FAIL, "no authentication in progress")
        if not _B64.match(response.encode("ascii", "replace")):
            self._exchange = None
            return Step(FAIL, "Invalid base64 data in continued response")
        return self._finish(self._exchange.next(response))

    def _finish(self, step: Step) -> Step:
        if step.status != MORE:
            self.username = self._exchange.username
            self._exchange = None
        return step


# --- Dovecot ------------------------------------------------------------------------------
class DovecotBackend(Backend):
    """A connection to Dovecot's auth server, shared by the clients of one worker."""

    type = "dovecot"

    def __init__(self, cfg, path: str | None = None, timeout: float = AUTH_TIMEOUT,
                 connector=None):
        super().__init__(cfg)
        self.path = path if path is not None else cfg.get("smtpd_sasl_path")
        self.timeout = timeout
        self.connector = connector      # tests: a function returning a connected socket
        self.sock: socket.socket | None = None
        self.buf = b""
        self.mechs: list[tuple[str, frozenset[str]]] | None = None
        self.counter = 0

    def _address(self) -> str:
        path = self.path
        if path.startswith("unix:"):
            path = path[5:]
        return path

    def connect(self) -> bool:
        """Connect and handshake; False (with a warning) when that fails."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if self.connector is None \
            else self.connector()
        sock.settimeout(self.timeout)
        try:
            if self.connector is None:
                sock.connect(self._address())
        except OSError as exc:
            sock.close()
            msg.warn(f"SASL: Connect to {self.path} failed: "
                     f"{exc.strerror or os.strerror(exc.errno or errno.EIO)}")
            return False
        self.sock, self.buf = sock, b""
        try:
            sock.sendall(f"VERSION\t1\t0\nCPID\t{os.getpid()}\n".encode())
            mechs = []
            while True:
                line = self._readline()
                if line is None:
                    msg.warn(f"SASL: Connection to {self.path} lost during the handshake")
                    break
                cmd, _, rest = line.partition("\t")
                if cmd == "VERSION":
                    parts = rest.split("\t")
                    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
                        msg.warn("SASL: Protocol version error")
                        break
                    if parts[0] != "1":
                        msg.warn(f"SASL: Protocol version mismatch ({parts[0]} vs. 1)")
                        break
                elif cmd == "MECH" and rest:
                    name, *props = rest.split("\t")
                    props = frozenset(p.lower() for p in props)
                    if "private" not in props and name:
                        mechs.append((name.upper(), props))
                elif cmd == "DONE":
                    self.mechs = mechs
                    return True
        except OSError as exc:
            msg.warn(f"SASL: Couldn't talk to {self.path}: {exc.strerror or exc}")
        self.close()
        return False

    def _readline(self) -> str | None:
        """One line from the auth server without its LF; None at EOF or when too long."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def all_mechanisms(self):
        if self.sock is None and not self.connect():
            return None
        return self.mechs

    def send(self, line: str) -> bool:
        """Send one request line; False when the connection is gone."""
        if self.sock is None:
            return False
        try:
            self.sock.sendall(line.encode("utf-8", "surrogateescape") + b"\n")
            return True
        except OSError:
            self.close()
            return False

    def reply(self, request_id: int) -> tuple[str, list[str]] | None:
        """The next reply (command, arguments) to request_id; None when the link broke."""
        try:
            while True:
                line = self._readline()
                if line is None:
                    break
                cmd, _, rest = line.partition("\t")
                if cmd not in ("OK", "CONT", "FAIL"):
                    continue
                rid, _, args = rest.partition("\t")
                if not rid.isdigit() or int(rid) != request_id:
                    continue        # an answer to an earlier, abandoned request
                return cmd, args.split("\t") if args else []
        except OSError:
            pass
        self.close()
        return None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.buf, self.mechs = None, b"", None


class _DovecotExchange:
    """One AUTH exchange relayed to Dovecot (xsasl_dovecot_server_first/next)."""

    def __init__(self, session: SaslSession, mech: str, tls: bool):
        self.session = session
        self.backend: DovecotBackend = session.backend   # type: ignore[assignment]
        self.mech = mech
        self.tls = tls
        self.id = 0
        self.username: str | None = None

    def first(self, initial: str | None) -> Step:
        b = self.backend
        s = self.session
        for attempt in range(2):
            if b.sock is None and not b.connect():
                return Step(TEMP, "Can't connect to authentication server")
            b.counter += 1
            self.id = b.counter
            line = (f"AUTH\t{self.id}\t{self.mech}\tservice={b.service}\tnologin"
                    f"\tlip={s.server_addr}\trip={s.client_addr}")
            if self.tls:
                line += "\tsecured"
            if initial is not None:
                line += f"\tresp={initial}"
            if b.send(line):
                break
        else:
            return Step(TEMP, "Can't connect to authentication server")
        return self._handle()

    def next(self, response: str) -> Step:
        if not self.backend.send(f"CONT\t{self.id}\t{response}"):
            return Step(TEMP, "Connection lost to authentication server")
        return self._handle()

    def _handle(self) -> Step:
        got = self.backend.reply(self.id)
        if got is None:
            return Step(TEMP, "Connection lost to authentication server")
        cmd, args = got
        if cmd == "CONT":
            return Step(MORE, args[0] if args else "")
        reason, temp = "", False
        for arg in args:
            if arg.startswith("user="):
                self.username = printable(arg[5:], 1000)
            elif arg.startswith("reason="):
                reason = printable(arg[7:], 200)
            elif arg == "temp":
                temp = True
        if cmd == "OK":
            if not self.username:
                return Step(FAIL, "authentication server returned no user name")
            return Step(DONE)
        return Step(TEMP if temp else FAIL, reason)


# --- builtin ------------------------------------------------------------------------------
class FileChanged(Exception):
    """The passwd-file was replaced and this worker cannot read the new one."""


class PasswdFile:
    """A Dovecot-style passwd-file, opened before the jail and kept current."""

    def __init__(self, path: str, queue_directory: str):
        self.name = path
        # As for the Dovecot socket: relative to queue_directory (the jail's root).
        self.outside = path if os.path.isabs(path) else os.path.join(queue_directory, path)
        self.inside = path             # the same file seen from queue_directory / the jail
        try:
            self.fd = os.open(self.outside, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"open smtpd_sasl_path file {self.outside}: "
                              f"{exc.strerror}") from None
        self.stamp = None
        self.users: dict[str, str] = {}
        self.changed = False           # replaced, and out of reach: restart the worker
        self._load()

    @staticmethod
    def _stamp(st: os.stat_result) -> tuple:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self) -> None:
        st = os.fstat(self.fd)
        chunks, offset = [], 0
        while True:
            data = os.pread(self.fd, 65536, offset)
            if not data:
                break
            chunks.append(data)
            offset += len(data)
        self.users = parse_passwd(b"".join(chunks).decode("utf-8", "surrogateescape"),
                                  self.name)
        self.stamp = self._stamp(st)

    def refresh(self) -> None:
        """Pick up a changed file (in place, replaced by rename, or out of reach)."""
        try:
            # A worker works in queue_directory, which is "/" in the jail.
            st = os.stat(self.inside)
        except OSError:
            st = None
        if st is not None and st.st_ino == self.stamp[1] and st.st_dev == self.stamp[0]:
            if self._stamp(st) != self.stamp:
                self._load()
            return
        if st is not None:
            try:
                fd = os.open(self.inside, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = -1
            if fd >= 0:
                os.close(self.fd)
                self.fd = fd
                msg.info(f"{self.name}: file changed; reading it again")
                self._load()
                return
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            if not self.changed:
                msg.info(f"table {self.name} has changed -- restarting")
            self.changed = True
        elif self._stamp(st) != self.stamp:
            self._load()

    def lookup(self, user: str) -> str | None:
        """The stored password of user, or None; FileChanged when the copy is stale."""
        try:
            self.refresh()
        except OSError as exc:
            msg.warn(f"{self.name}: {exc.strerror}; using the copy read before")
        if self.changed:
            # A removed user or an old password must not work once more: refuse for now.
            raise FileChanged(f"{self.name} has changed")
        return self.users.get(user)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_passwd(text: str, name: str = "passwd-file") -> dict[str, str]:
    """user -> stored password from passwd-file text (`user:password[:...]`)."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        if not sep or not user:
            msg.warn(f"{name}, line {number}: missing ':' -- ignoring this line")
            continue
        users.setdefault(user, rest.split(":", 1)[0])
    return users


class BuiltinBackend(Backend):
    """PLAIN and LOGIN against a passwd-file."""

    type = "builtin"

    def __init__(self, cfg, passwd: PasswdFile | None = None):
        super().__init__(cfg)
        self.failure_delay = cfg["smtpd_sasl_builtin_failure_delay"]
        self.realm = cfg.get("smtpd_sasl_local_domain").strip()
        self.passwd = passwd or PasswdFile(cfg.get("smtpd_sasl_path"),
                                           cfg.get("queue_directory"))

    def needs_restart(self) -> bool:
        if not self.passwd.changed:
            try:
                self.passwd.refresh()
            except OSError:
                pass
        return self.passwd.changed

    def all_mechanisms(self):
        return list(BUILTIN_MECHS)

    def check(self, user: str, password: bytes) -> Step:
        """DONE when user's password matches; FAIL after failure_delay when not; TEMP
        when the passwd-file changed beyond this worker's reach."""
        try:
            stored = self.passwd.lookup(user)
        except FileChanged as exc:
            return Step(TEMP, str(exc))
        ok = verify_password(password, stored if stored is not None else _DUMMY_HASH)
        if ok and stored is not None:
            return Step(DONE)
        if self.failure_delay:
            time.sleep(self.failure_delay)
        return Step(FAIL, "")

    def close(self) -> None:
        self.passwd.close()


_DUMMY_HASH = ("{SHA512-CRYPT}$6$KxUSZdNf1KMBBxzq$JvOWbHN8OLuYGR30PdZ1XnA4r7fkwUdBsGFBGqcvh"
               "9S4eubFRwlVOsObSCnYbNZmsK6g.EXbC8WUiBg4YFSE01")


class _BuiltinExchange:
    """One PLAIN or LOGIN exchange, checked against the passwd-file."""

    def __init__(self, session: SaslSession, mech: str):
        self.backend: BuiltinBackend = session.backend   # type: ignore[assignment]
        self.mech = mech
        self.username: str | None = None
        self.login_user: str | None = None
        self.where = "initial response"

    def first(self, initial: str | None) -> Step:
        if self.mech == "LOGIN":
            if initial in (None, "", "="):     # as Dovecot: an empty one is none
                return Step(MORE, base64.b64encode(b"Username:").decode())
            return self.next(initial)
        if not initial:     # none, or "=" (empty): ask for it, as Dovecot does
            return Step(MORE, "")
        return self.next(initial)

    def next(self, response: str) -> Step:
        data = b"" if response == "=" else _decode_b64(response)
        where, self.where = self.where, "continued response"
        if data is None:
            return Step(FAIL, f"Invalid base64 data in {where}")
        if self.mech == "PLAIN":
            parts = data.split(b"\0")
            if len(parts) != 3:
                return self._fail()     # Dovecot gives no reason for these either
            authzid, authcid, password = parts
            user = self._login_name(authcid)
            if user is None:
                return self._fail()
            self.username = printable(user, 1000)
            if authzid and authzid != authcid:
                return self._fail()    # no master users here
            return self._check(user, password)
        if self.login_user is None:
            user = self._login_name(data)
            if user is None:
                return self._fail()
            self.login_user = user
            self.username = printable(user, 1000)
            return Step(MORE, base64.b64encode(b"Password:").decode())
        return self._check(self.login_user, data)

    def _login_name(self, data: bytes) -> str | None:
        """The login name: smtpd_sasl_local_domain appended when it has no realm (Cyrus
        SASL's user_realm, which Postfix passes): the passwd-file lists user@realm."""
        user = self._text(data)
        if user is not None and self.backend.realm and "@" not in user:
            user = f"{user}@{self.backend.realm}"
        return user

    @staticmethod
    def _text(data: bytes) -> str | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text or any(c in text for c in "\t\n\r:\0") or len(text) > 255:
            return None
        return text

    def _check(self, user: str, password: bytes) -> Step:
        if not password:
            return self._fail()
        return self.backend.check(user, password)

    def _fail(self) -> Step:
        if self.backend.failure_delay:
            time.sleep(self.backend.failure_delay)
        return Step(FAIL, "")


# --- configuration ------------------------------------------------------------------------
def check_config(cfg) -> None:
    """ConfigError when the SASL settings cannot work (nothing is opened)."""
    if not cfg["smtpd_sasl_auth_enable"]:
        return
    kind = cfg.get("smtpd_sasl_type").strip().lower()
    if kind not in TYPES:
        raise ConfigError(f"unsupported SASL server implementation: {kind}")
    security_options(cfg["smtpd_sasl_security_options"], "smtpd_sasl_security_options")
    security_options(cfg["smtpd_sasl_tls_security_options"],
                     "smtpd_sasl_tls_security_options")
    cfg["smtpd_sasl_builtin_failure_delay"]   # ConfigError when malformed
    if not cfg.get("smtpd_sasl_path").strip():
        raise ConfigError("smtpd_sasl_path is empty")
    if kind == "dovecot" and cfg.get("smtpd_sasl_local_domain").strip():
        # Postfix's Dovecot client passes no realm either; say so rather than ignore it.
        msg.warn("smtpd_sasl_local_domain is ignored with smtpd_sasl_type = dovecot "
                 "(Dovecot's auth_default_realm does this)")


def from_config(cfg) -> Backend | None:
    """This worker's SASL backend, or None when AUTH is off; ConfigError when broken."""
    if not cfg["smtpd_sasl_auth_enable"]:
        return None
    check_config(cfg)
    kind = cfg.get("smtpd_sasl_type").strip().lower()
    if kind == "dovecot":
        return DovecotBackend(cfg)
    return BuiltinBackend(cfg)
