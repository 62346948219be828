"""
Tests for L{clavitor_twisted.pki}: the CA and POP certificates carry the
extensions TLS and the receiver rely on, and keys are written private.
"""

import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted import pki


def extension(cert, kind):
    return cert.extensions.get_extension_for_class(kind)


class CATests(SynchronousTestCase):
    def setUp(self):
        self.key, self.cert = pki.make_ca("test CA")

    def test_key(self):
        """
        The CA key is EC P-256 and the certificate holds its public key.
        """
        self.assertIsInstance(self.key, ec.EllipticCurvePrivateKey)
        self.assertEqual(self.key.curve.name, "secp256r1")
        self.assertEqual(self.cert.public_key(), self.key.public_key())

    def test_self_signed(self):
        """
        The CA is self-signed and named as asked.
        """
        self.assertEqual(self.cert.subject, self.cert.issuer)
        self.assertEqual(
            self.cert.subject.rfc4514_string(), "CN=test CA"
        )
        self.cert.verify_directly_issued_by(self.cert)

    def test_basic_constraints(self):
        """
        CA:TRUE with path length 0, critical.
        """
        ext = extension(self.cert, x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.ca)
        self.assertEqual(ext.value.path_length, 0)

    def test_key_usage(self):
        """
        keyCertSign and cRLSign only, critical.
        """
        ext = extension(self.cert, x509.KeyUsage)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.key_cert_sign)
        self.assertTrue(ext.value.crl_sign)
        self.assertFalse(ext.value.digital_signature)
        self.assertFalse(ext.value.key_encipherment)

    def test_subject_key_identifier(self):
        ext = extension(self.cert, x509.SubjectKeyIdentifier)
        self.assertEqual(
            ext.value,
            x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
        )

    def test_default_name(self):
        _, cert = pki.make_ca()
        self.assertEqual(cert.subject.rfc4514_string(), "CN=clavitor dev CA")

    def test_fresh_keys(self):
        """
        Two CAs never share a key.
        """
        other_key, _ = pki.make_ca("test CA")
        self.assertNotEqual(
            other_key.public_key().public_numbers(),
            self.key.public_key().public_numbers(),
        )


class POPCertificateTests(SynchronousTestCase):
    def setUp(self):
        self.ca_key, self.ca_cert = pki.make_ca("test CA")
        self.key, self.cert = pki.make_pop_certificate(
            self.ca_key,
            self.ca_cert,
            "zurich-01",
            hosts=["Zurich-01.Clavitor.AI", "zurich-01"],
            ips=["127.0.0.1", "::1"],
        )

    def test_key(self):
        self.assertIsInstance(self.key, ec.EllipticCurvePrivateKey)
        self.assertEqual(self.key.curve.name, "secp256r1")
        self.assertEqual(self.cert.public_key(), self.key.public_key())

    def test_signed_by_ca(self):
        self.assertEqual(self.cert.issuer, self.ca_cert.subject)
        self.cert.verify_directly_issued_by(self.ca_cert)

    def test_subject_alternative_name(self):
        """
        DNS names: the pop_id first, then the hosts lower-cased, without
        repeats; then the IP addresses.
        """
        san = extension(self.cert, x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName),
            ["zurich-01", "zurich-01.clavitor.ai"],
        )
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_not_a_ca(self):
        ext = extension(self.cert, x509.BasicConstraints)
        self.assertTrue(ext.critical)
        self.assertFalse(ext.value.ca)

    def test_key_usage(self):
        ext = extension(self.cert, x509.KeyUsage)
        self.assertTrue(ext.critical)
        self.assertTrue(ext.value.digital_signature)
        self.assertFalse(ext.value.key_cert_sign)
        self.assertFalse(ext.value.crl_sign)

    def test_extended_key_usage(self):
        ext = extension(self.cert, x509.ExtendedKeyUsage)
        self.assertEqual(
            list(ext.value),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        )

    def test_key_identifiers(self):
        """
        The SKI is the POP key's; the AKI is the CA's SKI.
        """
        self.assertEqual(
            extension(self.cert, x509.SubjectKeyIdentifier).value,
            x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
        )
        self.assertEqual(
            extension(self.cert, x509.AuthorityKeyIdentifier).value.key_identifier,
            extension(self.ca_cert, x509.SubjectKeyIdentifier).value.digest,
        )

    def test_one_year(self):
        lifetime = self.cert.not_valid_after_utc - self.cert.not_valid_before_utc
        self.assertEqual(lifetime, pki.POP_VALIDITY + pki.BACKDATE)
        self.assertEqual(pki.POP_VALIDITY.days, 365)

    def store(self):
        return verification.Store([self.ca_cert])

    def test_verifies_as_server(self):
        """
        A strict RFC 5280 verifier accepts the certificate as a server for
        each of its names and addresses, and for no other name.
        """
        builder = verification.PolicyBuilder().store(self.store())
        for name in (
            x509.DNSName("zurich-01"),
            x509.DNSName("zurich-01.clavitor.ai"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ):
            builder.build_server_verifier(name).verify(self.cert, [])
        self.assertRaises(
            verification.VerificationError,
            builder.build_server_verifier(x509.DNSName("calgary-01")).verify,
            self.cert,
            [],
        )

    def test_verifies_as_client(self):
        """
        A strict verifier accepts the certificate as a TLS client and reports
        the SAN the receiver matches against source_pop.
        """
        verifier = (
            verification.PolicyBuilder().store(self.store()).build_client_verifier()
        )
        verified = verifier.verify(self.cert, [])
        self.assertIn(x509.DNSName("zurich-01"), verified.subjects)

    def test_other_ca_does_not_verify(self):
        """
        A CA with the same name but another key does not vouch for it.
        """
        _, other_ca = pki.make_ca("test CA")
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store([other_ca]))
            .build_client_verifier()
        )
        self.assertRaises(
            verification.VerificationError, verifier.verify, self.cert, []
        )

    def test_bad_pop_id(self):
        for pop_id in ("", "Zurich", "../x", "a.b", "-a", "a" * 64, "zurich-01\n"):
            self.assertRaises(
                ValueError,
                pki.make_pop_certificate,
                self.ca_key,
                self.ca_cert,
                pop_id,
            )

    def test_bad_host(self):
        for host in ("*.clavitor.ai", "a b", "a..b", "host.", "127.0.0.1", "bücher.de"):
            self.assertRaises(
                ValueError,
                pki.make_pop_certificate,
                self.ca_key,
                self.ca_cert,
                "zurich-01",
                hosts=[host],
            )

    def test_bad_ip(self):
        self.assertRaises(
            ValueError,
            pki.make_pop_certificate,
            self.ca_key,
            self.ca_cert,
            "zurich-01",
            ips=["localhost"],
        )


class FileTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.ca_key, self.ca_cert = pki.make_ca("test CA")

    def path(self, name):
        return os.path.join(self.directory, name)

    def test_key_mode_whatever_the_umask(self):
        """
        A key file is 0600 even under a permissive umask, and reads back as
        the same unencrypted key.
        """
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        pki.write_key(self.path("ca.key"), self.ca_key)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("ca.key")).st_mode), 0o600)
        with open(self.path("ca.key"), "rb") as f:
            loaded = serialization.load_pem_private_key(f.read(), password=None)
        self.assertEqual(loaded.public_key(), self.ca_key.public_key())

    def test_key_never_overwritten(self):
        """
        An existing file is left alone: a loose file stays as it was rather
        than getting a key written into it.
        """
        with open(self.path("ca.key"), "wb") as f:
            f.write(b"old")
        os.chmod(self.path("ca.key"), 0o644)
        self.assertRaises(
            FileExistsError, pki.write_key, self.path("ca.key"), self.ca_key
        )
        with open(self.path("ca.key"), "rb") as f:
            self.assertEqual(f.read(), b"old")

    def test_key_not_through_symlink(self):
        target = self.path("target")
        os.symlink(target, self.path("ca.key"))
        self.assertRaises(OSError, pki.write_key, self.path("ca.key"), self.ca_key)
        self.assertFalse(os.path.exists(target))

    def test_certificate(self):
        pki.write_certificate(self.path("ca.crt"), self.ca_cert)
        with open(self.path("ca.crt"), "rb") as f:
            self.assertEqual(x509.load_pem_x509_certificate(f.read()), self.ca_cert)

    def test_pop_files(self):
        """
        write_pop_files writes <pop_id>.crt and <pop_id>.key (0600) with a
        certificate from the CA for that POP.
        """
        cert_path, key_path = pki.write_pop_files(
            self.directory, self.ca_key, self.ca_cert, "calgary-01", ips=["127.0.0.1"]
        )
        self.assertEqual(cert_path, self.path("calgary-01.crt"))
        self.assertEqual(key_path, self.path("calgary-01.key"))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        self.assertEqual(cert.public_key(), key.public_key())
        cert.verify_directly_issued_by(self.ca_cert)
        san = extension(cert, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["calgary-01"])

    def test_pop_files_bad_id(self):
        """
        A pop_id that is not a DNS label never becomes a file name.
        """
        self.assertRaises(
            ValueError,
            pki.write_pop_files,
            self.directory,
            self.ca_key,
            self.ca_cert,
            "../escape",
        )
        self.assertEqual(os.listdir(self.directory), [])
