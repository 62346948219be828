"""
Tests for L{clavitor_twisted.files}.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.errors import ClavitorError
from clavitor_twisted.files import GROUP_OR_OTHERS, read_guarded


class Refused(ClavitorError):
    pass


class ReadGuardedTests(SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "secret")

    def read(self, max_bytes=16):
        return read_guarded(
            self.path,
            what="thing",
            error=Refused,
            forbidden_mode=GROUP_OR_OTHERS,
            refusal="too open",
            max_bytes=max_bytes,
        )

    def write(self, content, mode=0o600):
        with open(self.path, "wb") as f:
            f.write(content)
        os.chmod(self.path, mode)

    def refused(self, **kwargs):
        error = self.assertRaises(Refused, self.read, **kwargs)
        self.assertNotIn(self.directory, error.public)
        self.assertIn(self.path, error.detail)
        return error.public

    def test_reads_content_and_status(self):
        self.write(b"x" * 16)
        content, status = self.read()
        self.assertEqual(content, b"x" * 16)
        self.assertEqual(status.st_size, 16)

    def test_missing(self):
        self.assertEqual(self.refused(), "thing: cannot be read")

    def test_not_regular(self):
        os.mkfifo(self.path, 0o600)
        self.assertEqual(self.refused(), "thing: not a regular file")

    def test_forbidden_mode(self):
        for mode in (0o640, 0o604, 0o620, 0o610):
            self.write(b"x", mode)
            self.assertEqual(self.refused(), "thing: too open")

    def test_too_large(self):
        self.write(b"x" * 17)
        self.assertEqual(self.refused(), "thing: larger than 16 bytes")
