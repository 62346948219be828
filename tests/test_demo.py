"""
Tests for clavitor_twisted.demo: a small run of the real demo (two twistd
processes over loopback TLS) in each auth mode, its failure report, and the
comparison it relies on.
"""

import io
import os
import re
import shutil

from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted import demo
from clavitor_twisted.role import Role
from clavitor_twisted.vault import Vault, open_vault_for_writes, vault_path

VAULT_ID = "00112233445566778899aabbccddeeff"


def directory_of(output):
    return re.search(r"files in (\S+)", output).group(1)


class DemoRunTests(SynchronousTestCase):
    def run_demo(self, **options):
        out = io.StringIO()
        code = demo.run(out=out, **options)
        return code, out.getvalue()

    def test_mtls(self):
        code, output = self.run_demo(entries=300, vaults=2, timeout=60)
        self.assertEqual(code, 0, output)
        self.assertIn("every backup vault equals its primary vault", output)
        self.assertIn("entries/s", output)
        self.assertIn("both processes stopped", output)
        self.assertFalse(os.path.exists(directory_of(output)))

    def test_bearer(self):
        code, output = self.run_demo(entries=100, vaults=1, timeout=60, method="bearer")
        self.assertEqual(code, 0, output)
        self.assertIn("bearer auth", output)

    def test_failure_is_reported(self):
        """
        A run that cannot finish in time exits 1 with the reason and the tail
        of the process logs, and keeps its files for a look.
        """
        code, output = self.run_demo(entries=20_000, vaults=1, timeout=1)
        self.assertEqual(code, 1)
        self.assertIn("demo failed: ", output)
        self.assertIn("  backup| ", output)
        directory = directory_of(output)
        self.assertTrue(os.path.isdir(directory))
        self.addCleanup(shutil.rmtree, directory)


class DifferencesTests(SynchronousTestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.primary_dir = os.path.join(base, "primary")
        self.backup_dir = os.path.join(base, "backup")
        os.makedirs(self.primary_dir)
        os.makedirs(self.backup_dir)
        self.vault = open_vault_for_writes(Role.PRIMARY, self.primary_dir, VAULT_ID)
        self.addCleanup(self.vault.close)
        for i in range(3):
            self.vault.put_entry("e{}".format(i), b"data", 1)
        self.vault.delete_entry("e2", 2)

    def copy(self):
        replica = Vault.open(vault_path(self.backup_dir, VAULT_ID), create=True)
        try:
            replica.apply(list(self.vault.iter_entries()))
        finally:
            replica.close()

    def test_missing(self):
        self.assertEqual(
            demo.differences(self.primary_dir, self.backup_dir, [VAULT_ID]),
            ["vault {}: missing on the backup".format(VAULT_ID)],
        )

    def test_equal(self):
        self.copy()
        self.assertEqual(demo.differences(self.primary_dir, self.backup_dir, [VAULT_ID]), [])
        self.assertEqual(demo.replica_size(self.backup_dir), 3)

    def test_changed(self):
        self.copy()
        self.vault.put_entry("e0", b"other", 3)
        self.vault.put_entry("e3", b"new", 3)
        self.assertEqual(
            demo.differences(self.primary_dir, self.backup_dir, [VAULT_ID]),
            ["vault {}: 1 missing, 0 extra, 1 different on the backup".format(VAULT_ID)],
        )
        self.assertEqual(demo.backlog(self.primary_dir), 4)
