"""Server keys and self-signed certificates, for `postfix-py init` and `postfix-py tls`.

An MTA that offers STARTTLS needs a key and a certificate before its first client. This
module makes them with `cryptography`: an RSA or ECDSA (P-256) key and a self-signed X.509v3
certificate for the names and addresses given, as Postfix's `postfix tls new-server-cert`
does with openssl. Opportunistic TLS (level may) needs nothing more; clients that verify
can pin or trust the certificate itself.

THE CERTIFICATE
    Version 3, serial random, SHA-256 signature, subject and issuer CN = the first name
    (or address), valid from five minutes ago (clock skew) for `days` days (default 365).
    Extensions: subjectAltName with every DNS name and IP address; basicConstraints CA:FALSE
    (critical); keyUsage digitalSignature (and keyEncipherment for RSA, critical);
    extendedKeyUsage serverAuth; subject and authority key identifiers.

FILES
    Keys are PEM PKCS#8 without a passphrase (the daemons read them unattended, as root,
    before they chroot and drop privileges), written with mode 0600 and never readable by
    anyone else, not even for a moment. Certificates are PEM, mode 0644. Every file is
    written atomically: a temporary file in the same directory, fsync, rename, fsync of the
    directory; a reader sees the old file or the new one, never a part.

FUNCTIONS
    new_key(key_type="ecdsa", rsa_bits=2048) -> private key; key_type "rsa" or "ecdsa",
        ValueError otherwise (or for RSA below 2048 bits).
    self_signed(key, dns_names=("localhost",), ip_addresses=(), days=365) -> Certificate;
        ValueError when there is no name or address, or an address is not one.
    key_pem(key) -> bytes; cert_pem(cert) -> bytes.
    new_server_cert(key_type, dns_names, ip_addresses, days, rsa_bits) -> (key_pem, cert_pem).
    write_server_cert(key_path, cert_path, key_type="ecdsa", dns_names=("localhost",),
        ip_addresses=(), days=365, rsa_bits=2048): make both and write them (key first).
    atomic_write(path, data, mode): lib/safeio.py's, for callers that write keys.
"""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .safeio import atomic_write  # noqa: F401  (part of this module's interface)

KEY_TYPES = ("rsa", "ecdsa")
KEY_MODE = 0o600
CERT_MODE = 0o644


def new_key(key_type: str = "ecdsa", rsa_bits: int = 2048):
    """A new private key: ECDSA on P-256, or RSA with rsa_bits bits."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if rsa_bits < 2048:
            raise ValueError(f"RSA key size {rsa_bits} is below 2048 bits")
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise ValueError(f"unsupported key type: {key_type} (use one of {', '.join(KEY_TYPES)})")


def self_signed(key, dns_names=("localhost",), ip_addresses=(), days: int = 365):
    """A self-signed server certificate for key, naming dns_names and ip_addresses."""
    dns_names = list(dns_names)
    addresses = [ipaddress.ip_address(a) for a in ip_addresses]
    if not dns_names and not addresses:
        raise ValueError("a certificate needs at least one DNS name or IP address")
    if days < 1:
        raise ValueError(f"bad certificate lifetime: {days} days")
    common_name = dns_names[0] if dns_names else str(addresses[0])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    public = key.public_key()
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(a) for a in addresses]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=is_rsa, content_commitment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def key_pem(key) -> bytes:
    """The private key as unencrypted PEM (PKCS#8)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def new_server_cert(key_type: str = "ecdsa", dns_names=("localhost",), ip_addresses=(),
                    days: int = 365, rsa_bits: int = 2048) -> tuple[bytes, bytes]:
    """A new key and its self-signed certificate, both as PEM: (key_pem, cert_pem)."""
    key = new_key(key_type, rsa_bits)
    return key_pem(key), cert_pem(self_signed(key, dns_names, ip_addresses, days))


def write_server_cert(key_path: str, cert_path: str, key_type: str = "ecdsa",
                      dns_names=("localhost",), ip_addresses=(), days: int = 365,
                      rsa_bits: int = 2048) -> None:
    """Make a key and self-signed certificate and write them atomically (0600, 0644)."""
    key_data, cert_data = new_server_cert(key_type, dns_names, ip_addresses, days, rsa_bits)
    atomic_write(key_path, key_data, KEY_MODE)
    atomic_write(cert_path, cert_data, CERT_MODE)
