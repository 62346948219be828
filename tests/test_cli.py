"""
Tests for clavitor_twisted.cli: the operator commands print no secret and
no path, refuse to overwrite, and make what they say.
"""

import io
import ipaddress
import os
import stat
import sys

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted import cli, demo, tokens


class CommandTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def run_cli(self, *argv):
        """
        Run the command: C{(exit status, stdout, stderr)}.
        """
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def assertNoPath(self, *texts):
        for text in texts:
            self.assertNotIn(self.directory, text)


class CheckConfigTests(CommandTestCase):
    def write_configs(self, method="mtls"):
        pki = demo.write_pki(
            self.directory, (demo.PRIMARY_POP, demo.BACKUP_POP), method == "bearer"
        )
        data = os.path.join(self.directory, "data")
        os.mkdir(data)
        primary = os.path.join(self.directory, "primary.yaml")
        backup = os.path.join(self.directory, "backup.yaml")
        demo.write_config(primary, demo.primary_config(pki, data, 8443, method))
        demo.write_config(backup, demo.backup_config(pki, data, 8443, method))
        return pki, primary, backup

    def test_good(self):
        _, primary, backup = self.write_configs()
        self.assertEqual(self.run_cli("check-config", primary), (0, "ok: primary demo-primary\n", ""))
        self.assertEqual(self.run_cli("check-config", backup), (0, "ok: backup demo-backup\n", ""))

    def test_bad_value(self):
        _, primary, _ = self.write_configs()
        with open(primary, "a") as f:
            f.write("unknown_key: 1\n")
        code, out, err = self.run_cli("check-config", primary)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("unknown_key", err)
        self.assertNoPath(err)

    def test_missing_file(self):
        code, out, err = self.run_cli("check-config", os.path.join(self.directory, "none.yaml"))
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("check-config: "))
        self.assertNoPath(err)

    def test_unusable_key(self):
        """
        check-config loads the material too: a key file readable by others
        is refused, naming the key, not the file.
        """
        pki, _, backup = self.write_configs()
        os.chmod(pki.pops[demo.BACKUP_POP][1], 0o644)
        code, out, err = self.run_cli("check-config", backup)
        self.assertEqual(code, 1)
        self.assertIn("auth.mtls_key", err)
        self.assertNoPath(err)

    def test_bad_token_file(self):
        pki, primary, _ = self.write_configs(method="bearer")
        os.chmod(pki.token_file, 0o640)
        code, out, err = self.run_cli("check-config", primary)
        self.assertEqual(code, 1)
        self.assertNoPath(err)


class GenTokenTests(CommandTestCase):
    def test_new_token(self):
        path = os.path.join(self.directory, "replication.token")
        code, out, err = self.run_cli("gen-token", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        token_set = tokens.load_tokens(path)
        self.assertIsNone(token_set.previous)
        self.assertNotIn(token_set.current.decode(), out)
        self.assertNoPath(out)

    def test_refuses_to_overwrite(self):
        path = os.path.join(self.directory, "replication.token")
        self.run_cli("gen-token", path)
        before = tokens.load_tokens(path)
        code, out, err = self.run_cli("gen-token", path)
        self.assertEqual(code, 1)
        self.assertIn("--rotate", err)
        self.assertNoPath(err)
        self.assertEqual(tokens.load_tokens(path).all(), before.all())

    def test_rotate(self):
        """
        --rotate writes a new current token and keeps the old one as the
        previous; neither is printed.
        """
        path = os.path.join(self.directory, "replication.token")
        self.run_cli("gen-token", path)
        old = tokens.load_tokens(path).current
        code, out, err = self.run_cli("gen-token", path, "--rotate")
        self.assertEqual((code, err), (0, ""))
        rotated = tokens.load_tokens(path)
        self.assertEqual(rotated.previous, old)
        self.assertNotEqual(rotated.current, old)
        for token in rotated.all():
            self.assertNotIn(token.decode(), out)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_rotate_without_file(self):
        path = os.path.join(self.directory, "none.token")
        code, out, err = self.run_cli("gen-token", path, "--rotate")
        self.assertEqual(code, 1)
        self.assertNoPath(err)
        self.assertFalse(os.path.exists(path))


def load_certificate(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


class GenCertsTests(CommandTestCase):
    def test_certificates(self):
        """
        A CA and, per POP, a certificate whose SAN holds the POP id, every
        --host and every --ip, usable as TLS server and client; keys 0600.
        """
        out_dir = os.path.join(self.directory, "pki")
        code, out, err = self.run_cli(
            "gen-certs", "--out", out_dir, "--pop", "calgary-01", "--pop", "zurich-01",
            "--host", "repl.example.com", "--ip", "127.0.0.1", "--ip", "::1",
        )
        self.assertEqual((code, err), (0, ""))
        self.assertNoPath(out)
        ca = load_certificate(os.path.join(out_dir, "ca.crt"))
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        for pop_id in ("calgary-01", "zurich-01"):
            cert = load_certificate(os.path.join(out_dir, pop_id + ".crt"))
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.assertEqual(
                san.get_values_for_type(x509.DNSName), [pop_id, "repl.example.com"]
            )
            self.assertEqual(
                san.get_values_for_type(x509.IPAddress),
                [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
            )
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            self.assertEqual(
                set(usage), {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
            )
            self.assertTrue(cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature)
            self.assertEqual(cert.issuer, ca.subject)
            cert.verify_directly_issued_by(ca)
        for name in ("ca.key", "calgary-01.key", "zurich-01.key"):
            mode = stat.S_IMODE(os.stat(os.path.join(out_dir, name)).st_mode)
            self.assertEqual(mode, 0o600)

    def test_refuses_to_overwrite(self):
        out_dir = os.path.join(self.directory, "pki")
        self.run_cli("gen-certs", "--out", out_dir, "--pop", "calgary-01")
        with open(os.path.join(out_dir, "ca.crt"), "rb") as f:
            before = f.read()
        code, out, err = self.run_cli("gen-certs", "--out", out_dir, "--pop", "zurich-01")
        self.assertEqual(code, 1)
        self.assertIn("refusing to overwrite ca.crt, ca.key", err)
        self.assertNoPath(err)
        self.assertFalse(os.path.exists(os.path.join(out_dir, "zurich-01.key")))
        with open(os.path.join(out_dir, "ca.crt"), "rb") as f:
            self.assertEqual(f.read(), before)

    def test_bad_host_writes_nothing(self):
        out_dir = os.path.join(self.directory, "pki")
        code, out, err = self.run_cli(
            "gen-certs", "--out", out_dir, "--pop", "calgary-01", "--host", "not a host"
        )
        self.assertEqual(code, 1)
        self.assertIn("--host", err)
        self.assertFalse(os.path.exists(out_dir) and os.listdir(out_dir))

    def test_bad_pop_id(self):
        self.patch(sys, "stderr", io.StringIO())
        error = self.assertRaises(
            SystemExit, cli.main, ["gen-certs", "--out", self.directory, "--pop", "Bad_Pop"]
        )
        self.assertEqual(error.code, 2)

