"""postfix-py tls: TLS keys, certificates and settings, as Postfix's postfix-tls(1).

    postfix-py [-c config_dir] [-v] tls subcommand [options]

SUBCOMMANDS (Postfix 3.7's, with the same options and messages)
    enable-client [-r randsource]
        Enable opportunistic TLS in the SMTP client (smtp_tls_security_level = may,
        smtp_tls_loglevel = 1, an lmdb session cache) if all client TLS settings are at
        their defaults; otherwise suggest settings and change nothing.
    enable-server [-r randsource] [-a algorithm] [-b bits] [hostname...]
        Create a new private key and self-signed certificate and enable opportunistic TLS
        in the SMTP server (smtpd_tls_cert_file/key_file, or eccert/eckey for ECDSA,
        smtpd_tls_security_level = may, smtpd_tls_received_header = yes,
        smtpd_tls_loglevel = 1) if all server TLS settings are at their defaults;
        otherwise suggest settings and change nothing.
    new-server-key [-a algorithm] [-b bits] [hostname...]
        Create a new key and self-signed certificate under config_directory, named
        key-YYYYMMDD-HHMMSS.pem and cert-YYYYMMDD-HHMMSS.pem (eckey-/eccert- for ECDSA,
        time of day in UTC), without deploying them; print how to deploy them.
    new-server-cert [-a algorithm] [-b bits] [hostname...]
        The same, but copy the currently deployed key of that algorithm (if any) into the
        new key file, so that DANE "3 1 1" records stay valid.
    deploy-server-cert certfile keyfile
        Check that the key matches the certificate and set the smtpd_tls_*_file
        parameters of its algorithm. Relative names are relative to config_directory.
    output-server-csr [-k keyfile] [hostname...]
        Write a certificate signing request for the key to standard output.
    output-server-tlsa [-h hostname] [keyfile...]
        Write DANE TLSA "3 1 1" records for port 25 of hostname.
    all-default-client, all-default-server
        Exit 0 when all client (server) TLS settings are at their defaults, 1 otherwise.
    server-fingerprint [-d digest] [certfile...]     (postfix-py only)
        Print, for each deployed server certificate (or each certfile), the certificate
        and public-key fingerprints in Postfix's format (AB:CD:...), as the other side
        needs them for relay_clientcerts, check_ccert_access or fingerprint-level TLS.
        The digest defaults to smtpd_tls_fingerprint_digest (sha256); md5 and sha1 work
        for tables written as the seed's examples are.

    history [destination]                           (postfix-py only)
        The TLS history that tlsmgr keeps per next hop (smtp_tls_history_database):
        for each outcome, newest first, its time, server, policy level, Postfix's
        status word, protocol, cipher, and the certificate's fingerprint, subject and
        issuer (lib/tls_history.py). Asks the running tlsmgr. Exit 1 when destination
        has no history.
    explain [--connect] destination                 (postfix-py only)
        What the smtp client would do for mail to destination (a domain, or an
        address whose domain is used): transport and next hop, MX hosts and addresses,
        the TLS policy of each (its source and level, match rules), whether a cached
        TLS session exists; with --connect, the handshake as posttls-finger does it and
        whether the policy is met (tools/tls_explain.py).

    algorithm is rsa (the default) or ecdsa; bits is the RSA size (default 2048, at least
    2048) or the EC curve (secp256r1, the default, also called prime256v1 or P-256;
    secp384r1; secp521r1). DSA is not supported, as in Postfix. hostname defaults to
    myhostname; the first one is the certificate's CommonName, all are its DNS names.
    Certificates are self-signed for 100 years. Keys are written with mode 0600,
    certificates 0644, each in one atomic rename; an existing file is never overwritten.

CONFIGURATION PARAMETERS
    config_directory, myhostname, smtpd_tls_cert_file, smtpd_tls_key_file,
    smtpd_tls_eccert_file, smtpd_tls_eckey_file, smtpd_tls_chain_files,
    smtpd_tls_fingerprint_digest, smtpd_tls_security_level, smtpd_tls_loglevel,
    smtpd_tls_received_header, smtp_tls_security_level, smtp_tls_loglevel,
    smtp_tls_session_cache_database, tls_random_source.

DIAGNOSTICS
    Progress and advice on standard error as `postfix-py/postfix-tls: ...`; problems as
    one `fatal: ...` line and exit status 1. Never a traceback.

SEE ALSO
    lib/tls.py (loading and fingerprints), lib/tlsgen.py (keys and certificates),
    lib/tls_history.py, tools/tls_explain.py.
"""

from __future__ import annotations

import datetime
import getopt
import hashlib
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..lib import maincf, msg, tls, tls_history, tlsgen, tlsmgr_client
from ..lib.queue import queue_root
from . import tls_explain

PROGRAM = "postfix-py/postfix-tls"
CERT_DAYS = 36525                       # Postfix's self-signed certificates: 100 years
RSA_BITS = 2048
EC_CURVES = {"secp256r1": ec.SECP256R1, "prime256v1": ec.SECP256R1, "p-256": ec.SECP256R1,
             "secp384r1": ec.SECP384R1, "p-384": ec.SECP384R1,
             "secp521r1": ec.SECP521R1, "p-521": ec.SECP521R1}
ALGORITHMS = ("rsa", "ecdsa")
# algorithm -> (key parameter, certificate parameter, file name prefix)
PARAMS = {"rsa": ("smtpd_tls_key_file", "smtpd_tls_cert_file", ""),
          "ecdsa": ("smtpd_tls_eckey_file", "smtpd_tls_eccert_file", "ec")}
CLIENT_SETTINGS = ("smtp_use_tls", "smtp_enforce_tls", "smtp_tls_enforce_peername",
                   "smtp_tls_security_level", "smtp_tls_cert_file", "smtp_tls_dcert_file",
                   "smtp_tls_eccert_file")
SERVER_SETTINGS = ("smtpd_use_tls", "smtpd_enforce_tls", "smtpd_tls_security_level",
                   "smtpd_tls_cert_file", "smtpd_tls_dcert_file", "smtpd_tls_eccert_file")
COMMANDS = ("enable-client", "enable-server", "new-server-key", "new-server-cert",
            "deploy-server-cert", "output-server-csr", "output-server-tlsa",
            "all-default-client", "all-default-server", "server-fingerprint")


class Usage(Exception):
    """A command line that does not parse; the text is the usage line."""


def _info(text: str) -> None:
    """Log each line of text at info level."""
    for line in text.splitlines():
        msg.info(line)


def _fatal(text: str):
    """Log a fatal line and stop with exit status 1."""
    msg.fatal(text)


# --- configuration ------------------------------------------------------------------------

class Tool:
    """One invocation: the configuration directory and its main.cf."""

    def __init__(self, config_dir: str | None):
        self.config_dir = os.path.abspath(config_dir or maincf.default_config_dir())
        if not os.path.isdir(self.config_dir):
            _fatal(f"no Postfix configuration directory {self.config_dir}!")
        self.main_cf = os.path.join(self.config_dir, "main.cf")
        try:
            if os.path.exists(self.main_cf):
                self.cfg = maincf.load(self.config_dir, warn=msg.warn)
            else:
                self.cfg = maincf.Config(self.config_dir, self.main_cf)
        except maincf.ConfigError as exc:
            _fatal(str(exc))

    def set_in_main_cf(self, name: str) -> str:
        """The expanded value when main.cf sets name to something (postconf -nxh)."""
        entry = self.cfg.entries.get(name)
        if entry is None or not entry.value.strip():
            return ""
        return self.cfg.expand(entry.value).strip()

    def all_default(self, names) -> bool:
        """Whether main.cf leaves every one of names at its default."""
        return not any(self.set_in_main_cf(n) for n in names)

    def path(self, name: str) -> str:
        """A user-given file name, relative to config_directory unless absolute."""
        return name if os.path.isabs(name) else os.path.join(self.config_dir, name)

    def hostname(self, given: str | None = None) -> str:
        """The given name, else myhostname (read from a file if it is a path)."""
        if given:
            return given
        name = self.cfg.get("myhostname").strip()
        if name.startswith("/"):
            try:
                with open(name, encoding="utf-8") as f:
                    name = f.read().strip()
            except OSError as exc:
                _fatal(f"cannot read myhostname from {name}: {exc.strerror}")
        return name

    def edit(self, values: dict[str, str]) -> None:
        """Set parameters in main.cf (postconf -e); fatal on failure."""
        try:
            maincf.edit(self.main_cf, values)
        except OSError as exc:
            _fatal(f"edit {self.main_cf}: {exc.strerror}")


# --- keys and certificates ----------------------------------------------------------------

def _algorithm_bits(algo: str, bits: str | None):
    """The key generator for algorithm and bits; fatal for unsupported values."""
    if algo == "rsa":
        text = bits or str(RSA_BITS)
        if not text.isdigit():
            _fatal(f"invalid RSA key size: {text}")
        size = int(text)
        if size < 2048:
            _fatal(f"RSA key size {size} is below 2048 bits")
        return lambda: tlsgen.new_key("rsa", size)
    if algo == "ecdsa":
        curve = (bits or "secp256r1").lower()
        if curve not in EC_CURVES:
            _fatal(f"unsupported EC curve: {bits} (use secp256r1, secp384r1 or secp521r1)")
        if EC_CURVES[curve] is ec.SECP256R1:
            return lambda: tlsgen.new_key("ecdsa")
        return lambda: ec.generate_private_key(EC_CURVES[curve]())
    _fatal(f"Unsupported private key algorithm: {algo}")


def _key_algorithm(key) -> str | None:
    """rsa or ecdsa for a private key, or None."""
    if isinstance(key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ecdsa"
    return None


def _read_key(path: str):
    """The first private key in path (unencrypted); None when there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    for label, block in tls._pem_blocks(data):
        if label.endswith("PRIVATE KEY"):
            try:
                return tls._load_private_key(label, block, path, path)
            except tls.TLSConfigError as exc:
                _fatal(str(exc).split(": ", 1)[1])
    return None


def _read_cert(path: str):
    """The first certificate in path; fatal when there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        _fatal(f"cannot read certificate file {path}: {exc.strerror}")
    certs = tls._load_certificates(tls._pem_blocks(data), path, path)
    if not certs:
        _fatal(f"no certificate found in file: {path}")
    return certs[0]


def _spki_sha256(public_key) -> str:
    """Hex SHA-256 of a public key's SubjectPublicKeyInfo (DANE 3 1 1)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _now() -> datetime.datetime:
    """The time for new file names (UTC); tests replace it."""
    return datetime.datetime.now(datetime.timezone.utc)


def _new_files(tool: Tool, algo: str) -> tuple[str, str]:
    """Fresh key and certificate file names under config_directory."""
    stamp = _now().strftime("%Y%m%d-%H%M%S")
    prefix = PARAMS[algo][2]
    keyfile = os.path.join(tool.config_dir, f"{prefix}key-{stamp}.pem")
    certfile = os.path.join(tool.config_dir, f"{prefix}cert-{stamp}.pem")
    if os.path.exists(keyfile):
        _fatal(f"New private key file already exists: {keyfile}")
    if os.path.exists(certfile):
        _fatal(f"New certificate file already exists: {certfile}")
    return keyfile, certfile


def _make(tool: Tool, algo: str, bits: str | None, oldkey: str, hostnames: list[str]):
    """Write a new (or copied) key and a self-signed certificate; (certfile, keyfile)."""
    generate = _algorithm_bits(algo, bits)
    keyfile, certfile = _new_files(tool, algo)
    if oldkey:
        key = _read_key(oldkey)
        if key is None:
            _fatal(f"Error copying private key from '{oldkey}' to '{keyfile}'")
        if _key_algorithm(key) != algo:
            _fatal(f"Key algorithm '{_key_algorithm(key)}' of '{oldkey}' is not '{algo}'")
    else:
        key = generate()
    names = [tool.hostname(hostnames[0] if hostnames else None)] + hostnames[1:]
    if not names[0]:
        _fatal("no hostname given and myhostname is empty")
    try:
        cert = tlsgen.self_signed(key, dns_names=names, days=CERT_DAYS)
        tlsgen.atomic_write(keyfile, tlsgen.key_pem(key), tlsgen.KEY_MODE)
        tlsgen.atomic_write(certfile, tlsgen.cert_pem(cert), tlsgen.CERT_MODE)
    except ValueError as exc:
        _fatal(f"error generating self-signed certificate: {exc}")
    except OSError as exc:
        _fatal(f"error writing {keyfile} or {certfile}: {exc.strerror or exc}")
    return certfile, keyfile


def _deploy(tool: Tool, certfile: str, keyfile: str, enable: bool, randsource: str) -> None:
    """Check that key and certificate match, then set their parameters."""
    key = _read_key(keyfile)
    if key is None:
        _fatal(f"no private key found in file: {keyfile}")
    algo = _key_algorithm(key)
    if algo is None:
        _fatal(f"no private key found in file: {keyfile}")
    cert = _read_cert(certfile)
    if _spki_sha256(cert.public_key()) != _spki_sha256(key.public_key()):
        _fatal(f"Certificate in {certfile} does not match key in {keyfile}")
    key_param, cert_param, _ = PARAMS[algo]
    values = {key_param: keyfile, cert_param: certfile}
    if enable:
        values.update({"smtpd_tls_security_level": "may",
                       "smtpd_tls_received_header": "yes",
                       "smtpd_tls_loglevel": "1"})
    if randsource:
        values["tls_random_source"] = randsource
    tool.edit(values)


def _advice(certfile: str, keyfile: str, deploy: str, copied: bool) -> str:
    """Postfix's advice after a new key or certificate."""
    if not deploy:
        text = ("New private key and self-signed certificate created. To deploy run:\n"
                f"  # postfix-py tls deploy-server-cert {certfile} {keyfile}\n")
    else:
        text = ("Enabled opportunistic TLS in the Postfix SMTP server\n" if deploy == "enable"
                else "")
        text += _deployed_text()
    text += ("To generate a CSR run:\n"
             f"  # postfix-py tls output-server-csr -k {keyfile} [<hostname> ...]\n")
    text += (f"Save the signed certificate chain in {certfile}.\n" if deploy else
             f"Save the signed certificate chain in {certfile}, and deploy as above.\n")
    text += ("To generate TLSA records run:\n"
             f"  # postfix-py tls output-server-tlsa [-h <hostname>] {'' if deploy else keyfile}\n")
    if not copied:
        text += ("(If you have DANE TLSA RRs, update them as soon as possible to match\n"
                 "the newly deployed keys).\n" if deploy else
                 "(deploy after updating the DNS and waiting for stale RRs to expire).\n")
    return text


def _deployed_text() -> str:
    """Postfix's words after a deployment."""
    return ("New TLS private key and certificate deployed.\n"
            "Run the command:\n"
            "  # postfix-py reload\n"
            "if you want the new settings to take effect immediately.\n")


def _keyfile_for(tool: Tool, name: str) -> str:
    """A key file argument: rsa/ecdsa mean the deployed key; none means none."""
    if name in PARAMS:
        return tool.set_in_main_cf(PARAMS[name][0])
    if name in ("", "none"):
        return ""
    return tool.path(name)


# --- subcommands --------------------------------------------------------------------------

def _opts(args, spec: str, usage: str):
    """getopt() that turns a bad option into the usage line."""
    try:
        return getopt.getopt(args, spec)
    except getopt.GetoptError:
        raise Usage(usage) from None


def cmd_enable_client(tool: Tool, args) -> int:
    """enable-client [-r randsource]"""
    usage = "usage: postfix-py tls enable-client [-r devrandom]"
    opts, rest = _opts(args, "r:", usage)
    if rest:
        raise Usage(usage)
    rand = dict(opts).get("-r", "")
    if tool.all_default(CLIENT_SETTINGS):
        values = {"smtp_tls_security_level": "may", "smtp_tls_loglevel": "1",
                  "smtp_tls_session_cache_database": "lmdb:${data_directory}/smtp_scache"}
        if rand:
            values["tls_random_source"] = rand
        tool.edit(values)
        _info("Enabled opportunistic TLS in the Postfix SMTP client.\n"
              "Run the command:\n  # postfix-py reload\n"
              "if you want the new settings to take effect immediately.")
    else:
        _info("*** Non-default SMTP client TLS settings detected, no changes made.\n"
              "For opportunistic TLS in the Postfix SMTP client, the below settings\n"
              "are typical:\n"
              "  smtp_tls_security_level = may\n"
              "  smtp_tls_loglevel = 1\n"
              "  smtp_tls_session_cache_database = lmdb:${data_directory}/smtp_scache")
    return 0


def _algo_opts(args, spec: str, cmd: str):
    """(algorithm, bits, randsource, hostnames) from -a, -b, -r and arguments."""
    usage = (f"usage: postfix-py tls {cmd} [-a algorithm] [-b bits ]"
             + (" [-r devrandom]" if "r" in spec else "") + " [hostname ...]")
    opts, rest = _opts(args, spec, usage)
    o = dict(opts)
    algo = o.get("-a", "rsa").lower()
    if algo not in ALGORITHMS:
        _fatal(f"Unsupported private key algorithm: {algo}")
    return algo, o.get("-b"), o.get("-r", ""), rest


def cmd_enable_server(tool: Tool, args) -> int:
    """enable-server [-r randsource] [-a algorithm] [-b bits] [hostname...]"""
    algo, bits, rand, hostnames = _algo_opts(args, "a:b:r:", "enable-server")
    if not tool.all_default(SERVER_SETTINGS):
        _info("*** Non-default SMTP server TLS settings detected, no changes made.\n"
              "For opportunistic TLS in the Postfix SMTP server, the below settings\n"
              "are typical:\n"
              "  smtpd_tls_security_level = may\n"
              "  smtpd_tls_loglevel = 1\n"
              "You can use \"postfix-py tls new-server-cert\" to create a new certificate.\n"
              "Or, \"postfix-py tls new-server-key\" to also force a new private key.")
        return 0
    certfile, keyfile = _make(tool, algo, bits, "", hostnames)
    _deploy(tool, certfile, keyfile, True, rand)
    _info(_advice(certfile, keyfile, "enable", False))
    return 0


def cmd_new_server_key(tool: Tool, args) -> int:
    """new-server-key [-a algorithm] [-b bits] [hostname...]"""
    algo, bits, _, hostnames = _algo_opts(args, "a:b:", "new-server-key")
    certfile, keyfile = _make(tool, algo, bits, "", hostnames)
    _info(_advice(certfile, keyfile, "", False))
    return 0


def cmd_new_server_cert(tool: Tool, args) -> int:
    """new-server-cert [-a algorithm] [-b bits] [hostname...]"""
    algo, bits, _, hostnames = _algo_opts(args, "a:b:", "new-server-cert")
    oldkey = _keyfile_for(tool, algo)
    if oldkey and not os.path.isfile(oldkey):
        msg.warn(f"Key file: {oldkey} not found, creating new keys")
        oldkey = ""
    certfile, keyfile = _make(tool, algo, bits, oldkey, hostnames)
    _info(_advice(certfile, keyfile, "", bool(oldkey)))
    return 0


def cmd_deploy_server_cert(tool: Tool, args) -> int:
    """deploy-server-cert certfile keyfile"""
    if len(args) != 2:
        raise Usage("usage: postfix-py tls deploy-server-cert certfile keyfile")
    certfile, keyfile = tool.path(args[0]), tool.path(args[1])
    _deploy(tool, certfile, keyfile, False, "")
    _info(_deployed_text())
    return 0


def cmd_output_server_csr(tool: Tool, args) -> int:
    """output-server-csr [-k keyfile] [hostname...]"""
    opts, hostnames = _opts(args, "k:", "usage: postfix-py tls output-server-csr "
                                        "[-k keyfile] [hostname ...]")
    given = dict(opts).get("-k")
    keyfile = _keyfile_for(tool, given) if given else (
        _keyfile_for(tool, "rsa") or _keyfile_for(tool, "ecdsa"))
    if not keyfile or not os.access(keyfile, os.R_OK):
        _fatal("No usable keyfile specified or configured")
    key = _read_key(keyfile)
    if key is None:
        _fatal(f"no private key found in file: {keyfile}")
    names = hostnames or [tool.hostname()]
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([]))
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                          critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                 ExtendedKeyUsageOID.CLIENT_AUTH]),
                          critical=False)
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    sys.stdout.write(csr.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    return 0


def cmd_output_server_tlsa(tool: Tool, args) -> int:
    """output-server-tlsa [-h hostname] [keyfile...]"""
    opts, keys = _opts(args, "h:", "usage: postfix-py tls output-server-tlsa "
                                   "[-h hostname] [keyfile ...]")
    host = tool.hostname(dict(opts).get("-h"))
    found = False
    for name in keys or list(ALGORITHMS):
        keyfile = _keyfile_for(tool, name)
        if not keyfile:
            continue
        key = _read_key(keyfile)
        if key is None:
            _fatal(f"no private key found in file: {keyfile}")
        print(f"; {keyfile}")
        print(f"_25._tcp.{host}. IN TLSA 3 1 1 {_spki_sha256(key.public_key())}")
        found = True
    if not found:
        _fatal("No usable keyfiles specified or configured")
    return 0


def cmd_all_default_client(tool: Tool, args) -> int:
    """all-default-client: exit 0 when client TLS settings are defaults."""
    if args:
        raise Usage("usage: postfix-py tls all-default-client")
    return 0 if tool.all_default(CLIENT_SETTINGS) else 1


def cmd_all_default_server(tool: Tool, args) -> int:
    """all-default-server: exit 0 when server TLS settings are defaults."""
    if args:
        raise Usage("usage: postfix-py tls all-default-server")
    return 0 if tool.all_default(SERVER_SETTINGS) else 1


def cmd_server_fingerprint(tool: Tool, args) -> int:
    """server-fingerprint [-d digest] [certfile...]"""
    opts, files = _opts(args, "d:", "usage: postfix-py tls server-fingerprint "
                                    "[-d digest] [certfile ...]")
    digest = dict(opts).get("-d") or tool.cfg.get("smtpd_tls_fingerprint_digest") or "sha256"
    digest = digest.strip().lower()
    if digest not in tls.DIGESTS:
        _fatal(f"unsupported digest: {digest} (use one of {', '.join(tls.DIGESTS)})")
    if files:
        paths = [tool.path(f) for f in files]
    else:
        chain = tool.cfg["smtpd_tls_chain_files"]
        paths = chain or [p for p in (tool.cfg.get(n).strip() for n in
                                      ("smtpd_tls_cert_file", "smtpd_tls_dcert_file",
                                       "smtpd_tls_eccert_file")) if p]
    if not paths:
        _fatal("no server certificate configured (smtpd_tls_cert_file, "
               "smtpd_tls_eccert_file, smtpd_tls_chain_files) and none given")
    for path in paths:
        cert = _read_cert(path)
        print(f"{path}: fingerprint={tls.fingerprint(cert, digest)}, "
              f"pkey_fingerprint={tls.pkey_fingerprint(cert, digest)}")
    return 0


def cmd_history(tool: Tool, args) -> int:
    """`tls history [DOMAIN]`: the TLS history that tlsmgr keeps per next hop."""
    if len(args) > 1 or (args and args[0].startswith("-")):
        raise Usage("usage: postfix-py tls history [destination]")
    if not tool.cfg.get("smtp_tls_history_database").strip():
        _fatal("no TLS history: smtp_tls_history_database is empty")
    client = tlsmgr_client.TlsmgrClient(
        os.path.join(queue_root(tool.cfg), "private", "tlsmgr"), backoff=0)
    try:
        found = client.history_lookup(args[0] if args else None)
    finally:
        client.close()
    if found is None:
        _fatal("no TLS history: tlsmgr does not answer (is postfix-py running?)")
    if args and not found:
        print(f"{args[0]}: no TLS history")
        return 1
    for line in tls_history.format_history(found):
        print(line)
    return 0


def cmd_explain(tool: Tool, args) -> int:
    """`tls explain [--connect] DOMAIN`: tools/tls_explain.py."""
    try:
        return tls_explain.explain(tool.cfg, args)
    except tls_explain.Usage as exc:
        raise Usage(str(exc)) from None


HANDLERS = {
    "enable-client": cmd_enable_client,
    "enable-server": cmd_enable_server,
    "new-server-key": cmd_new_server_key,
    "new-server-cert": cmd_new_server_cert,
    "deploy-server-cert": cmd_deploy_server_cert,
    "output-server-csr": cmd_output_server_csr,
    "output-server-tlsa": cmd_output_server_tlsa,
    "all-default-client": cmd_all_default_client,
    "all-default-server": cmd_all_default_server,
    "server-fingerprint": cmd_server_fingerprint,
    "history": cmd_history,
    "explain": cmd_explain,
}

COMMAND_USAGE = ("usage: postfix-py tls enable-client (or enable-server, new-server-key, "
                 "new-server-cert, deploy-server-cert, output-server-csr, "
                 "output-server-tlsa, all-default-client, all-default-server, "
                 "server-fingerprint, history, explain)")


def main(argv: list[str]) -> int:
    """Run `postfix-py [-c dir] [-v] tls subcommand ...`; returns the exit status."""
    argv = list(argv)
    config_dir = None
    verbose = 0
    while argv and argv[0] in ("-c", "-v"):
        if argv.pop(0) == "-v":
            verbose += 1
        elif argv:
            config_dir = argv.pop(0)
        else:
            argv = ["-c"]
            break
    msg.init_cli(PROGRAM, verbose=verbose)
    try:
        if argv and argv[0] == "-c":
            _fatal("option -c requires a directory")
        if not argv:
            _fatal(COMMAND_USAGE)
        command, args = argv[0], argv[1:]
        if command not in HANDLERS:
            msg.error(f"unknown tls command: '{command}'")
            _fatal(COMMAND_USAGE)
        tool = Tool(config_dir)
        try:
            return HANDLERS[command](tool, args)
        except Usage as exc:
            _fatal(str(exc))
    except msg.FatalError:
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:        # noqa: BLE001 - a tool prints one line, never a traceback
        try:
            msg.fatal(f"internal error: {type(exc).__name__}: {exc}")
        except msg.FatalError:
            return 1
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
