"""`postfix-py init DIR`: a self-contained instance on loopback ports, for trying postfix-py.

SYNOPSIS
    postfix-py init DIR [--port-base N] [--syslog-name NAME] [--force]

DESCRIPTION
    Writes everything one postfix-py instance needs into DIR, without touching the host's
    mail system: it listens on 127.0.0.1 only, on high ports, logs to a file, keeps its
    queue and data under DIR, and works without root (the daemons then run as the invoking
    user). Start it with `postfix-py -c DIR start-fg`.

    DIR/main.cf       queue_directory = DIR/queue, data_directory = DIR/data,
                      maillog_file = DIR/maillog, mail_owner = the invoking user (nobody
                      when run as root), myhostname = localhost, mydomain = localdomain,
                      mydestination = $myhostname, localhost.$mydomain,
                      inet_interfaces = 127.0.0.1, mynetworks = 127.0.0.0/8 [::1]/128,
                      server TLS at level may with both certificates below, Received:
                      header TLS details, TLS log level 1, client TLS at level may with
                      its session cache in lmdb:DIR/data/smtp_scache; syslog_name = NAME
                      with --syslog-name.
    DIR/master.cf     the services, chroot off (a non-root user cannot chroot):
                          N      smtp        plain SMTP with STARTTLS
                          N+1    smtps       TLS from the first byte (smtpd_tls_wrappermode)
                          N+2    submission  STARTTLS, then SASL AUTH (user "test")
                          N+9    metrics     Prometheus text format on /metrics
                      N is --port-base (default 2525), 1..65526; then the internal unix
                      services (qmgr, tlsmgr, anvil, showq, verify, smtp, relay, lmtp, error,
                      discard, local, virtual).
    DIR/rsa-key.pem, DIR/rsa-cert.pem        RSA 2048 key (0600) and certificate (0644)
    DIR/ecdsa-key.pem, DIR/ecdsa-cert.pem    ECDSA P-256 key (0600) and certificate (0644)
                      self-signed, subjectAltName DNS:localhost and IP:127.0.0.1, valid
                      for 365 days (lib/tlsgen.py). Keys belong to the invoking user: the
                      daemons read them before they drop privileges.
    DIR/queue (0755), DIR/data (0700, owned by mail_owner)
    DIR/aliases       postmaster, mailer-daemon and abuse, for root (kept when it exists),
                      built into DIR/aliases.db; main.cf's alias_maps and alias_database.

    Files are written atomically. DIR is created (0755) when it does not exist.

OPTIONS
    --port-base N   first of the listening ports (N, N+1, N+2 and N+9).
    --syslog-name NAME
                    log as NAME/smtpd[pid] (main.cf syslog_name; smtps and submission log
                    as NAME/smtps/smtpd and NAME/submission/smtpd). `--syslog-name postfix`
                    makes every log line read as Postfix's, for the tools that parse the
                    mail log (pflogsumm, fail2ban, prometheus-postfix-exporter).
    --force         DIR already holds an instance: overwrite main.cf and master.cf and make
                    new keys and certificates (the queue and data are kept).
    -c DIR given before the verb (`postfix-py -c DIR init`) names DIR; -v is ignored.

EXIT STATUS
    0 done; 1 DIR already holds an instance (main.cf or master.cf exists; nothing is
    changed) or a file could not be written; 2 bad command line.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import sys
import time

from postfix_py.lib import aliases, mastercf, sasl_common as sasl, table_writer, tlsgen

PROG = "postfix-py init"
DEFAULT_PORT_BASE = 2525
METRICS_OFFSET = 9          # the metrics service listens on the port base + 9
CERTS = (  # (key type, key file, certificate file, main.cf key parameter, cert parameter)
    ("rsa", "rsa-key.pem", "rsa-cert.pem", "smtpd_tls_key_file", "smtpd_tls_cert_file"),
    ("ecdsa", "ecdsa-key.pem", "ecdsa-cert.pem", "smtpd_tls_eckey_file",
     "smtpd_tls_eccert_file"),
)
CERT_NAMES, CERT_ADDRESSES, CERT_DAYS = ("localhost",), ("127.0.0.1",), 365
LISTEN_ADDRESS = "127.0.0.1"


class InitError(Exception):
    """init cannot go on; the message says why."""


def port_base(text: str) -> int:
    """Parse --port-base: a number such that base, base+1 and base+2 are TCP ports."""
    digits = text[1:] if text.startswith("-") else text
    if not digits.isascii() or not digits.isdigit():
        raise argparse.ArgumentTypeError(f"invalid port base: '{text}' is not a number")
    value = int(text, 10)
    if not 1 <= value <= 65535 - METRICS_OFFSET:
        raise argparse.ArgumentTypeError(
            f"invalid port base: {value} (it and the port {METRICS_OFFSET} above it must "
            "be in 1..65535)")
    return value


def syslog_name(text: str) -> str:
    """Parse --syslog-name: a syslog tag part, letters, digits and . _ - / only."""
    if not text or len(text) > 64 or text.startswith("/") or text.endswith("/") or any(
            not (c.isascii() and (c.isalnum() or c in "._-/")) for c in text):
        raise argparse.ArgumentTypeError(
            f"invalid syslog name: '{text}': use letters, digits, '.', '_', '-' and '/'")
    return text


def _parser() -> argparse.ArgumentParser:
    """The command-line parser of `postfix-py init`."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Write a self-contained postfix-py instance on loopback "
        "ports into DIR.",
        epilog="Ports: N smtp, N+1 smtps (TLS wrapper mode), N+2 submission (STARTTLS "
        "and SASL AUTH), N+9 metrics (Prometheus). Then: postfix-py -c DIR start-fg")
    p.add_argument("dir", metavar="DIR", nargs="?", help="the instance's directory")
    p.add_argument("--port-base", metavar="N", type=port_base, default=DEFAULT_PORT_BASE,
                   help=f"first of the listening ports: N..N+2, N+9 (default {DEFAULT_PORT_BASE})")
    p.add_argument("--syslog-name", metavar="NAME", type=syslog_name,
                   help="the name before /smtpd[pid] in log lines (default postfix-py; "
                   "postfix for log tools written for Postfix)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing instance's configuration and certificates")
    return p


def _mail_owner() -> str:
    """The invoking user's name, or nobody for root (Postfix refuses a root mail_owner)."""
    if os.geteuid() == 0:
        return "nobody"
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise InitError(f"no user name for uid {os.geteuid()}: "
                        "mail_owner must be a user in the passwd file") from None


def _row(*columns: str) -> str:
    """One master.cf line, columns aligned as postconf -M prints them."""
    out = ""
    for goal, text in zip(mastercf.COLUMN_GOAL, columns):
        if out:
            out += " " * max(1, goal - len(out))
        out += text
    return out


def main_cf(directory: str, owner: str, ports: tuple[int, int, int],
            log_name: str | None = None) -> str:
    """The text of the instance's main.cf."""
    d = directory
    log_name_line = f"syslog_name = {log_name}\n" if log_name else ""
    tls = "\n".join(f"{cp} = {d}/{cf}\n{kp} = {d}/{kf}" for _, kf, cf, kp, cp in CERTS)
    return f"""\
# postfix-py instance written by "{PROG}" on {time.strftime('%Y-%m-%d %H:%M:%S %z')}.
# It listens on {LISTEN_ADDRESS} only: port {ports[0]} smtp, {ports[1]} smtps (TLS wrapper
# mode) and {ports[2]} submission (STARTTLS), both with SASL AUTH for the user "test".
# Start it with:  postfix-py -c {d} start-fg
# Every parameter and its default: postfix-py -c {d} postconf -d

# FILES AND USERS
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = {owner}
maillog_file = {d}/maillog
{log_name_line}
# IDENTITY: a loopback mail host; mail for these domains stays here.
myhostname = localhost
mydomain = localdomain
mydestination = $myhostname, localhost.$mydomain

# NETWORK: only this host may connect, and relay.
inet_interfaces = {LISTEN_ADDRESS}
mynetworks = 127.0.0.0/8 [::1]/128

# TLS, SMTP SERVER: self-signed certificates for localhost and {LISTEN_ADDRESS}
# (new ones: postfix-py init --force, or postfix-py tls new-server-cert).
{tls}
smtpd_tls_security_level = may
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
tls_random_source = dev:/dev/urandom

# TLS, SMTP CLIENT: encrypt when the server offers STARTTLS; cache sessions.
smtp_tls_security_level = may
smtp_tls_loglevel = 1
smtp_tls_session_cache_database = lmdb:${{data_directory}}/smtp_scache

# SASL AUTH (smtps and submission): postfix-py's built-in passwd-file type.
smtpd_sasl_type = builtin
smtpd_sasl_path = {d}/sasl_passwd
smtpd_sasl_authenticated_header = yes

# LOCAL DELIVERY: a maildir per local part under {d}/mail/, no system accounts needed.
mail_spool_directory = {d}/mail/
local_delivery_any_user = yes
# ... so every local part is a recipient: no validation against the system accounts.
local_recipient_maps =

# ALIASES: edit {d}/aliases, then: postfix-py -c {d} newaliases
alias_maps = hash:{d}/aliases
alias_database = hash:{d}/aliases
"""

ALIASES = """\
# Aliases of this instance, aliases(5) format. After a change:
#     postfix-py -c DIR newaliases
postmaster: root
mailer-daemon: postmaster
abuse: postmaster
"""


def master_cf(directory: str, ports: tuple[int, int, int],
              log_name: str | None = None) -> str:
    """The text of the instance's master.cf."""
    log_name = log_name or "postfix-py"
    inet = [f"{LISTEN_ADDRESS}:{p}" for p in (*ports, ports[0] + METRICS_OFFSET)]
    return "\n".join([
        "#",
        f"# postfix-py master.cf written by \"{PROG}\". Format: master(5).",
        "# Chroot is off: it needs root and a prepared jail. After a change:",
        f"# postfix-py -c {directory} reload",
        "#",
        "# " + "=" * 74,
        "# service type  private unpriv  chroot  wakeup  maxproc command + args",
        "#               (yes)   (yes)   (no)    (never) (100)",
        "# " + "=" * 74,
        f"# SMTP with STARTTLS, port {ports[0]}.",
        _row(inet[0], "inet", "n", "-", "n", "-", "-", "smtpd"),
        f"# SMTP over TLS from the first byte (smtps), port {ports[1]}.",
        _row(inet[1], "inet", "n", "-", "n", "-", "-", "smtpd"),
        f"  -o syslog_name={log_name}/smtps",
        "  -o smtpd_tls_wrappermode=yes",
        "  -o smtpd_sasl_auth_enable=yes",
        f"# Mail submission, port {ports[2]}: STARTTLS, then SASL AUTH, before any mail.",
        _row(inet[2], "inet", "n", "-", "n", "-", "-", "smtpd"),
        f"  -o syslog_name={log_name}/submission",
        "  -o smtpd_tls_security_level=encrypt",
        "  -o smtpd_sasl_auth_enable=yes",
        "  -o smtpd_tls_auth_only=yes",
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        _row("pickup", "unix", "n", "-", "n", "-", "-", "pickup"),
        _row("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
        _row("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
        _row("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
        _row("showq", "unix", "n", "-", "n", "-", "-", "showq"),
        _row("verify", "unix", "-", "-", "n", "-", "1", "verify"),
        f"# Prometheus metrics: http://{inet[3]}/metrics",
        _row(inet[3], "inet", "n", "-", "n", "-", "1", "metrics"),
        _row("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
        _row("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
        _row("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
        _row("error", "unix", "-", "-", "n", "-", "-", "error"),
        _row("discard", "unix", "-", "-", "n", "-", "-", "discard"),
        _row("local", "unix", "-", "n", "n", "-", "-", "local"),
        _row("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
    ]) + "\n"


def _sasl_user(directory: str, owner: str) -> str | None:
    """Create sasl_passwd with a user "test" and a fresh password; None when it exists."""
    path = os.path.join(directory, "sasl_passwd")
    if os.path.exists(path):
        return None
    password = secrets.token_urlsafe(12)
    tlsgen.atomic_write(path, f"test:{sasl.hash_password(password)}\n".encode(), 0o600)
    return password


def _directory(path: str, mode: int, owner: str | None = None) -> None:
    """Create path (or keep it) with mode, owned by owner when running as root."""
    os.makedirs(path, mode=mode, exist_ok=True)
    if not os.path.isdir(path):
        raise InitError(f"{path} exists and is not a directory")
    os.chmod(path, mode)
    if owner is not None and os.geteuid() == 0:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def create(directory: str, ports_base: int = DEFAULT_PORT_BASE, force: bool = False,
           out=sys.stdout, log_name: str | None = None) -> None:
    """Write the instance into directory; InitError (or OSError) when it cannot."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InitError(f"{directory} exists and is not a directory")
    existing = [n for n in ("main.cf", "master.cf")
                if os.path.lexists(os.path.join(directory, n))]
    if existing and not force:
        raise InitError(f"{directory} already holds an instance ({existing[0]} exists); "
                        "nothing changed. Use --force to overwrite its configuration "
                        "and certificates")
    owner = _mail_owner()
    ports = (ports_base, ports_base + 1, ports_base + 2)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o755)
        os.chmod(directory, 0o755)
    _directory(os.path.join(directory, "queue"), 0o755)
    _directory(os.path.join(directory, "data"), 0o700, owner)
    for key_type, key_file, cert_file, _, _ in CERTS:
        tlsgen.write_server_cert(os.path.join(directory, key_file),
                                 os.path.join(directory, cert_file), key_type,
                                 CERT_NAMES, CERT_ADDRESSES, CERT_DAYS)
    password = _sasl_user(directory, owner)
    if not os.path.exists(os.path.join(directory, "aliases")):
        tlsgen.atomic_write(os.path.join(directory, "aliases"), ALIASES.encode(), 0o644)
    table_writer.build(f"hash:{directory}/aliases", pairs=aliases.source_pairs)
    _directory(os.path.join(directory, "mail"), 0o755, owner)   # local writes as default_privs
    # main.cf last: its presence is what marks DIR as an instance.
    tlsgen.atomic_write(os.path.join(directory, "master.cf"),
                        master_cf(directory, ports, log_name).encode(), 0o644)
    tlsgen.atomic_write(os.path.join(directory, "main.cf"),
                        main_cf(directory, owner, ports, log_name).encode(), 0o644)
    d = directory
    out.write(
        f"{PROG}: {'rewrote' if existing else 'created'} a postfix-py instance in {d}\n"
        f"  {d}/main.cf             parameters (mail_owner = {owner})\n"
        f"  {d}/master.cf           services on {LISTEN_ADDRESS}: {ports[0]} smtp, "
        f"{ports[1]} smtps, {ports[2]} submission, {ports[0] + METRICS_OFFSET} metrics\n"
        f"  {d}/rsa-key.pem, rsa-cert.pem      RSA 2048 key and self-signed certificate\n"
        f"  {d}/ecdsa-key.pem, ecdsa-cert.pem  ECDSA P-256 key and self-signed "
        "certificate\n"
        f"  {d}/queue               queue_directory\n"
        f"  {d}/data                data_directory\n"
        f"  {d}/maillog             the mail log, once it runs\n"
        f"  {d}/mail/               local mail, a maildir per recipient\n"
        f"  {d}/sasl_passwd         SASL users for smtps and submission\n"
        f"  {d}/aliases             postmaster and other aliases (then: newaliases)\n"
        + (f"SASL user: test, password: {password} (shown once; it is stored hashed)\n"
           f"  swaks --server {LISTEN_ADDRESS}:{ports[2]} --tls --auth-user test "
           f"--auth-password '{password}' --to someone@localhost\n" if password else "")
        + f"Next: postfix-py -c {d} start-fg\n")


def main(argv: list[str]) -> int:
    """Run `postfix-py init`; return the exit status."""
    argv = list(argv)
    config_dir = None
    while argv and argv[0] in ("-c", "-v"):
        if argv.pop(0) == "-c" and argv:
            config_dir = argv.pop(0)
    parser = _parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:       # argparse: usage errors exit 2, --help 0
        return int(exc.code or 0)
    directory = opts.dir
    if directory is None:
        directory = config_dir
    elif config_dir is not None and os.path.abspath(config_dir) != os.path.abspath(directory):
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: -c {config_dir} and DIR {directory} disagree; give one",
              file=sys.stderr)
        return 2
    if directory is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: the instance directory DIR is required", file=sys.stderr)
        return 2
    if opts.port_base < 1024 and os.geteuid() != 0:
        print(f"{PROG}: warning: ports below 1024 need root to listen on", file=sys.stderr)
    try:
        create(directory, opts.port_base, opts.force, log_name=opts.syslog_name)
    except InitError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
