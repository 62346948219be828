# -*- test-case-name: tests.test_pki -*-
"""
A development certificate authority and POP certificates.

Every POP has one EC P-256 key and one certificate whose subjectAltName DNS
names hold its pop_id (the name the receiver checks against the batch's
C{source_pop}) and, optionally, its public host names and IP addresses (the
names the primary checks against C{backup_pop.url}).  The certificate serves
both ways, so it carries serverAuth and clientAuth.  The CA may sign POP
certificates and nothing below them (path length 0).

Key files are created with mode 0600 and never overwrite an existing file,
so a development run cannot clobber a real key or leave one readable for a
moment.
"""

import datetime
import ipaddress
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clavitor_twisted.config import POP_ID_PATTERN

CA_VALIDITY = datetime.timedelta(days=3650)
POP_VALIDITY = datetime.timedelta(days=365)
# Certificates start to be valid a little in the past, so a peer whose clock
# is slightly behind does not refuse a certificate made a moment ago.
BACKDATE = datetime.timedelta(hours=1)


def _key_usage(digital_signature=False, key_cert_sign=False, crl_sign=False):
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(builder, lifetime):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)


def make_ca(name: str = "clavitor dev CA"):
    """
    Make a self-signed CA: C{(private_key, certificate)}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    cert = _validity(builder, CA_VALIDITY).sign(key, hashes.SHA256())
    return key, cert


def _host_name(host: str) -> str:
    """
    A host name for a DNS SAN, lower-case; ValueError unless it is dot
    separated DNS labels (no wildcard, no IP address, no trailing dot).
    """
    name = host.lower()
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError("an IP address belongs in ips, not hosts")
    if len(name) > 253 or not all(
        POP_ID_PATTERN.fullmatch(label) for label in name.split(".")
    ):
        raise ValueError("not a DNS host name")
    return name


def make_pop_certificate(
    ca_key,
    ca_cert: x509.Certificate,
    pop_id: str,
    hosts: Sequence[str] = (),
    ips: Sequence[str] = (),
):
    """
    Make a POP's key and certificate, signed by the CA:
    C{(private_key, certificate)}.

    The SAN holds DNS C{pop_id}, then C{hosts}, then IP C{ips}.  ValueError
    on a pop_id, host or address that is not one.
    """
    if not POP_ID_PATTERN.fullmatch(pop_id):
        raise ValueError("pop_id is not a DNS label")
    names = [pop_id]
    for host in hosts:
        name = _host_name(host)
        if name not in names:
            names.append(name)
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(name) for name in names] + [
        x509.IPAddress(address) for address in addresses
    ]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pop_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
    )
    cert = _validity(builder, POP_VALIDITY).sign(ca_key, hashes.SHA256())
    return key, cert


def _write_new(path: str, data: bytes, mode: int) -> None:
    """
    Create C{path} with C{mode} (FileExistsError if it exists) and write
    C{data}.  The mode is set at creation, so the file is never more open.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_key(path: str, key) -> None:
    """
    Write an unencrypted PEM (PKCS#8) private key to a new file, mode 0600.
    """
    _write_new(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )


def write_certificate(path: str, cert: x509.Certificate) -> None:
    """
    Write a PEM certificate to a new file, mode 0644 (it is public).
    """
    _write_new(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_pop_files(directory: str, ca_key, ca_cert, pop_id, hosts=(), ips=()):
    """
    Make a POP certificate and write C{<pop_id>.key} and C{<pop_id>.crt}
    into C{directory}: C{(cert_path, key_path)}.
    """
    key, cert = make_pop_certificate(ca_key, ca_cert, pop_id, hosts, ips)
    cert_path = os.path.join(directory, pop_id + ".crt")
    key_path = os.path.join(directory, pop_id + ".key")
    write_key(key_path, key)
    write_certificate(cert_path, cert)
    return cert_path, key_path
