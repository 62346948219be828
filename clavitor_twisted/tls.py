# -*- test-case-name: tests.test_tls -*-
"""
TLS 1.3 for both ends of replication, trusting one private CA only.

The backup serves with its POP certificate and, in mtls mode, demands a
client certificate that chains to the CA; the primary verifies the backup's
certificate against the same CA and the host name of C{backup_pop.url}.  The
system trust store is never consulted and there is no way to turn
verification off.  The identity of a peer is the subjectAltName DNS names of
its verified certificate, never its CN: a POP's own certificate must name
its C{pop_id}, and the primary only talks to a backup whose certificate
names C{backup_pop.id} (the host name alone would let any POP certificate
of the same CA that names that host stand in for the backup).

Errors name the config key they concern (C{auth.mtls_cert},
C{auth.mtls_key}, C{auth.mtls_ca}), the only place these files come from;
the path goes to C{detail} only.
"""

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from clavitor_twisted.errors import CertificateError
from clavitor_twisted.files import GROUP_OR_OTHERS, read_guarded

CERT_KEY = "auth.mtls_cert"
KEY_KEY = "auth.mtls_key"
CA_KEY = "auth.mtls_ca"

# No certificate or key file of ours is near this size.
MAX_PEM_BYTES = 1024 * 1024

# The most the client and the server accept below: nothing older than 1.3.
_TLS_MINIMUM = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class PopIdentity:
    """
    A POP's certificate and private key, as cryptography objects (to sign
    with) and as Twisted's C{PrivateCertificate} (to present in TLS).
    """

    certificate: x509.Certificate
    private_key: object
    twisted: ssl.PrivateCertificate


def _read(path: str, config_key: str) -> bytes:
    content, _ = read_guarded(
        path,
        what=config_key,
        error=CertificateError,
        forbidden_mode=0,
        refusal="",
        max_bytes=MAX_PEM_BYTES,
    )
    return content


def _one_certificate(pem: bytes, config_key: str, path: str) -> x509.Certificate:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateError(
            config_key + ": not a PEM certificate", "{}: {}".format(path, e)
        )
    if len(certificates) != 1:
        raise CertificateError(
            config_key + ": must hold exactly one certificate",
            "{} holds {} certificates".format(path, len(certificates)),
        )
    return certificates[0]


def _read_private_key(path: str) -> bytes:
    """
    Read a key file, refusing one that group or others may read or write.
    """
    content, _ = read_guarded(
        path,
        what=KEY_KEY,
        error=CertificateError,
        forbidden_mode=GROUP_OR_OTHERS,
        refusal="group or others have access (chmod 600)",
        max_bytes=MAX_PEM_BYTES,
    )
    return content


def load_identity(cert_path: str, key_path: str) -> PopIdentity:
    """
    Load a POP's certificate and unencrypted PEM key.  CertificateError if a
    file is unreadable or not PEM, the key file is open to group or others,
    or the key is not the certificate's.
    """
    cert = _one_certificate(_read(cert_path, CERT_KEY), CERT_KEY, cert_path)
    try:
        key = serialization.load_pem_private_key(
            _read_private_key(key_path), password=None
        )
    except (ValueError, TypeError) as e:
        raise CertificateError(
            KEY_KEY + ": not an unencrypted PEM private key",
            "{}: {}".format(key_path, e),
        )
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != cert.public_key().public_bytes(
        pem, spki
    ):
        raise CertificateError(
            KEY_KEY + ": does not match " + CERT_KEY,
            "{} is not the key of {}".format(key_path, cert_path),
        )
    twisted = ssl.PrivateCertificate.fromCertificateAndKeyPair(
        ssl.Certificate(crypto.X509.from_cryptography(cert)),
        ssl.KeyPair(crypto.PKey.from_cryptography_key(key)),
    )
    return PopIdentity(certificate=cert, private_key=key, twisted=twisted)


def load_pop_identity(cert_path: str, key_path: str, pop_id: str) -> PopIdentity:
    """
    L{load_identity} for this POP: CertificateError also when the
    certificate is not valid now or its subjectAltName does not name
    C{pop_id} (the peer would refuse it, and only say so in its own log).
    """
    identity = load_identity(cert_path, key_path)
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = identity.certificate
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise CertificateError(
            CERT_KEY + ": not valid now (expired or not yet valid)",
            "{} is valid from {} to {}".format(
                cert_path, certificate.not_valid_before_utc, certificate.not_valid_after_utc
            ),
        )
    if pop_id not in dns_names(certificate):
        raise CertificateError(
            CERT_KEY + ": its subjectAltName DNS names do not include pop_id",
            "{} names {}, not {}".format(cert_path, sorted(dns_names(certificate)), pop_id),
        )
    return identity


def load_ca(ca_path: str) -> ssl.Certificate:
    """
    Load the one CA certificate this POP trusts.  CertificateError unless the
    file holds exactly one certificate and it may sign certificates.
    """
    cert = _one_certificate(_read(ca_path, CA_KEY), CA_KEY, ca_path)
    try:
        constraints = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        constraints = usage = None
    if not (constraints and constraints.ca and usage.key_cert_sign):
        raise CertificateError(
            CA_KEY + ": not a CA certificate",
            "{} lacks CA:TRUE or keyCertSign".format(ca_path),
        )
    return ssl.Certificate(crypto.X509.from_cryptography(cert))


def server_options(
    identity: PopIdentity, ca: ssl.Certificate, require_client_certificate: bool
) -> ssl.CertificateOptions:
    """
    Server TLS options: our certificate, TLS 1.3 only, and, when
    C{require_client_certificate}, a client certificate chaining to C{ca} is
    demanded (the handshake fails without one).  Otherwise no client
    certificate is asked for (bearer mode).
    """
    credentials = dict(
        privateKey=identity.twisted.privateKey.original,
        certificate=identity.twisted.original,
        **_TLS_MINIMUM,
    )
    if require_client_certificate:
        return ssl.CertificateOptions(trustRoot=ca, **credentials)
    return ssl.CertificateOptions(**credentials)


@implementer(IPolicyForHTTPS)
class BackupPolicy:
    """
    The primary's HTTPS policy: the backup's certificate must chain to the CA,
    name the host we connect to (a DNS name or an IP address) and name the
    backup's C{pop_id}; TLS 1.3 only; our client certificate is presented
    when we have one (mtls).
    """

    def __init__(
        self,
        ca: ssl.Certificate,
        client_identity: PopIdentity | None,
        backup_pop_id: str,
    ):
        self._ca = ca
        self._client = client_identity.twisted if client_identity else None
        self._backup_pop_id = backup_pop_id

    def creatorForNetloc(self, hostname: bytes, port: int):
        return _NamingBackup(
            ssl.optionsForClientTLS(
                hostname.decode("ascii"),
                trustRoot=self._ca,
                clientCertificate=self._client,
                # A copy: optionsForClientTLS adds the client key to this dict.
                extraCertificateOptions=dict(_TLS_MINIMUM),
            ),
            self._backup_pop_id,
        )


@implementer(IOpenSSLClientConnectionCreator)
class _NamingBackup:
    """
    Twisted's client options plus one more check: once the handshake is done
    (chain and host name already verified by Twisted), the backup's
    certificate must also name its pop_id, or the connection is aborted as a
    failed verification before any request is sent.
    """

    def __init__(self, creator, backup_pop_id: str) -> None:
        self._creator = creator
        self._backup_pop_id = backup_pop_id

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._creator.clientConnectionForTLS(tlsProtocol)

        def check_names(connection, where: int, _: int) -> None:
            if where & SSL.SSL_CB_HANDSHAKE_DONE:
                try:
                    self._check(connection)
                except BaseException:
                    # Raising inside an OpenSSL callback loses the error;
                    # failing the verification reports it to the protocol.
                    tlsProtocol.failVerification(Failure())

        connection.set_info_callback(check_names)
        return connection

    def _check(self, connection) -> None:
        names = dns_names(connection.get_peer_certificate().to_cryptography())
        if self._backup_pop_id not in names:
            raise VerificationError(
                ["backup certificate does not name {}".format(self._backup_pop_id)]
            )


def peer_certificate(transport) -> x509.Certificate | None:
    """
    The peer's certificate on a TLS transport whose handshake is done, such
    as C{request.channel.transport} in twisted.web.  With L{server_options}
    in mtls mode, and always on the client side, the handshake fails unless
    the certificate verified, so a certificate returned here is verified;
    None when the peer presented none (bearer mode).
    """
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return cert.to_cryptography()


def dns_names(cert: x509.Certificate) -> frozenset[str]:
    """
    The subjectAltName DNS names of C{cert}, lower-case; empty without a SAN.
    The CN is never a name.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(name.lower() for name in san.value.get_values_for_type(x509.DNSName))
