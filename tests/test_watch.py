"""
Tests for clavitor_twisted.watch: which file changes wake the sender and
how often (on a fake clock), and a real inotify watch on a directory.
"""

import importlib
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clavitor_twisted.role import Role
from clavitor_twisted.vault import Vault, open_vault_for_writes, vault_path, written_vault_id
from clavitor_twisted.watch import WAKE_DELAY, ChangeWatcher

VAULT_ID = "0123456789abcdef"


class FileChangedTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.wakes = []
        self.watcher = ChangeWatcher("/nowhere", lambda: self.wakes.append(self.clock.seconds()), self.clock)

    def changed(self, name):
        self.watcher.file_changed(FilePath(b"/nowhere").child(name))

    def test_vault_files_wake_after_the_delay(self):
        """
        A change to a vault file, its WAL or its rollback journal wakes the
        sender WAKE_DELAY seconds later; changes meanwhile add no wake.
        """
        for name in (b"clavitor-%s.db" % (VAULT_ID.encode(),),
                     b"clavitor-%s.db-wal" % (VAULT_ID.encode(),),
                     b"clavitor-%s.db-journal" % (VAULT_ID.encode(),)):
            self.changed(name)
        self.clock.advance(WAKE_DELAY / 2)
        self.changed(b"clavitor-%s.db-wal" % (VAULT_ID.encode(),))
        self.assertEqual(self.wakes, [])
        self.clock.advance(WAKE_DELAY / 2)
        self.assertEqual(self.wakes, [WAKE_DELAY])
        self.clock.advance(1)
        self.assertEqual(self.wakes, [WAKE_DELAY])

        self.changed(b"clavitor-%s.db-wal" % (VAULT_ID.encode(),))
        self.clock.advance(WAKE_DELAY)
        self.assertEqual(len(self.wakes), 2)

    def test_other_files_do_not_wake(self):
        """
        The shared-memory file (written by readers too, the sender itself
        included), other names and invalid vault ids are not vault writes.
        """
        for name in (b"clavitor-%s.db-shm" % (VAULT_ID.encode(),),
                     b"notes.txt",
                     b"clavitor-XYZ.db",
                     b"clavitor-%s.sqlite" % (VAULT_ID.encode(),),
                     b"\xff.db"):
            self.changed(name)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_a_pending_wake(self):
        self.changed(b"clavitor-%s.db" % (VAULT_ID.encode(),))
        self.watcher.stopService()
        self.clock.advance(WAKE_DELAY)
        self.assertEqual(self.wakes, [])


class InotifyTests(TestCase):
    timeout = 10

    def setUp(self):
        try:
            importlib.import_module("twisted.internet.inotify")
        except ImportError:
            raise self.skipTest("no inotify on this platform")
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)

    @inlineCallbacks
    def test_a_write_wakes(self):
        """
        With a real watch on the directory, appending to a vault's WAL wakes
        the sender.  (The cleanup's stopService closes the watch: trial
        would find it left in the reactor.)
        """
        woken = Deferred()
        watcher = ChangeWatcher(self.directory, lambda: woken.callback(None), reactor)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        with open(os.path.join(self.directory, "clavitor-%s.db-wal" % (VAULT_ID,)), "ab") as f:
            f.write(b"page")
        yield woken

    @inlineCallbacks
    def test_reading_a_vault_is_no_change(self):
        """
        Opening, reading and closing a vault (what the sender itself does to
        clean vaults) reports no change; events come in order, so once a
        later write to another file is seen, none came for the read.
        """
        reader_vault = "ab" * 8
        writer = open_vault_for_writes(Role.PRIMARY, self.directory, reader_vault)
        writer.put_entry("e", b"d", 1)
        writer.close()
        seen = []
        sentinel_seen = Deferred()
        watcher = ChangeWatcher(self.directory, lambda: None, reactor)

        def record(path):
            # What file_changed would wake for: the shared-memory file,
            # which readers write, is not a change.
            if written_vault_id(os.fsdecode(path.basename())) is None:
                return
            seen.append(os.fsdecode(path.basename()))
            if seen[-1].startswith("clavitor-%s" % (VAULT_ID,)) and not sentinel_seen.called:
                sentinel_seen.callback(None)

        watcher.file_changed = record
        watcher.startService()
        self.addCleanup(watcher.stopService)
        vault = Vault.open(vault_path(self.directory, reader_vault))
        vault.count_dirty()
        vault.close()
        with open(os.path.join(self.directory, "clavitor-%s.db-wal" % (VAULT_ID,)), "ab") as f:
            f.write(b"page")
        yield sentinel_seen
        self.assertEqual([name for name in seen if reader_vault in name], [])
