"""
Tests for L{clavitor_twisted.vault}: the vault file contract, on real SQLite
files, and the thread-pooled L{VaultStore} on a real reactor and thread pool.
"""

import os
import sqlite3
import stat
import time
import contextlib
from unittest import SkipTest

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clavitor_twisted.errors import Conflict, Forbidden, WriteRefused
from clavitor_twisted.role import Role
from clavitor_twisted.vault import (
    ENTRY_ID_PATTERN,
    MAX_VERSION,
    VAULT_ID_PATTERN,
    Entry,
    Vault,
    VaultStore,
    is_vault_id,
    list_vault_ids,
    open_vault_for_writes,
    vault_path,
    written_vault_id,
)

HEX = "0123456789abcdef"
VAULT_A = "a" * 16
VAULT_B = "b" * 16
VAULT_C = "c" * 16


def make_data_dir(testcase) -> str:
    path = testcase.mktemp()
    os.mkdir(path)
    return path


def open_vault(testcase, data_dir: str, vault_id: str, create: bool = True) -> Vault:
    """
    A connection standing for the vault server's (another process), closed
    after the test.
    """
    vault = Vault.open(vault_path(data_dir, vault_id), create=create)
    testcase.addCleanup(vault.close)
    return vault


def entry(vault_id, entry_id, version, data=b"x", deleted=False, updated_at=1000):
    return Entry(vault_id, entry_id, version, updated_at, deleted, None if deleted else data)


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class VaultIdTests(SynchronousTestCase):
    """
    Vault ids are checked before any path is built from them.
    """

    @given(
        st.one_of(
            st.text(),
            st.text(alphabet=HEX + "ABCDEFg./\n\x00", max_size=70),
        )
    )
    def test_is_vault_id(self, candidate):
        """
        A vault id is 16 to 64 lower-case hex characters, and nothing else.
        """
        expected = 16 <= len(candidate) <= 64 and all(c in HEX for c in candidate)
        self.assertEqual(is_vault_id(candidate), expected)

    @given(st.text(alphabet=HEX, min_size=16, max_size=64))
    def test_vault_path_stays_in_data_dir(self, vault_id):
        path = vault_path("/srv/clavitor", vault_id)
        self.assertEqual(os.path.dirname(path), "/srv/clavitor")
        self.assertEqual(os.path.basename(path), "clavitor-" + vault_id + ".db")

    @given(st.text().filter(lambda s: not (16 <= len(s) <= 64 and set(s) <= set(HEX))))
    def test_vault_path_refuses_other_strings(self, candidate):
        self.assertRaises(ValueError, vault_path, "/srv/clavitor", candidate)

    def test_vault_path_refuses(self):
        """
        Path tricks, wrong case, wrong length, a trailing newline (which C{$}
        alone would let through) and non-strings are refused.
        """
        for bad in (
            "../" + VAULT_A,
            VAULT_A + "/../" + VAULT_B,
            "../../etc/passwd",
            "/" + VAULT_A,
            VAULT_A.upper(),
            "a" * 15,
            "a" * 65,
            VAULT_A + "\n",
            "",
            VAULT_A.encode("ascii"),
            None,
        ):
            self.assertFalse(is_vault_id(bad), bad)
            self.assertRaises(ValueError, vault_path, "/srv/clavitor", bad)

    def test_patterns(self):
        """
        The published patterns accept exactly the contract's ids, with no
        trailing newline slipping through.
        """
        self.assertIsNotNone(VAULT_ID_PATTERN.fullmatch("0" * 16))
        self.assertIsNone(VAULT_ID_PATTERN.fullmatch("0" * 16 + "\n"))
        self.assertIsNone(VAULT_ID_PATTERN.fullmatch("0" * 65))
        self.assertIsNotNone(ENTRY_ID_PATTERN.fullmatch("a" * 128))
        self.assertIsNone(ENTRY_ID_PATTERN.fullmatch("a\n"))
        self.assertIsNone(ENTRY_ID_PATTERN.fullmatch("a" * 129))
        self.assertEqual(MAX_VERSION, 2**63 - 1)


class ListVaultIdsTests(SynchronousTestCase):
    def test_only_vault_files(self):
        data_dir = make_data_dir(self)
        long_id = "0123456789abcdef" * 4
        for name in (
            "clavitor-" + VAULT_B + ".db",
            "clavitor-" + long_id + ".db",
            "clavitor-XYZ.db",
            "clavitor-" + VAULT_A.upper() + ".db",
            "clavitor-" + "a" * 15 + ".db",
            "clavitor-" + "a" * 65 + ".db",
            "clavitor-" + VAULT_B + ".db-wal",
            "clavitor-" + VAULT_B + ".db-shm",
            "clavitor-" + VAULT_B + ".db.bak",
            "clavitor-" + VAULT_C + ".sqlite",
            "x-clavitor-" + VAULT_C + ".db",
            "other.db",
            "notes.txt",
        ):
            open(os.path.join(data_dir, name), "wb").close()
        os.mkdir(os.path.join(data_dir, "clavitor-" + VAULT_C + ".db"))
        os.symlink(
            "clavitor-" + VAULT_B + ".db",
            os.path.join(data_dir, "clavitor-" + VAULT_A + ".db"),
        )
        self.assertEqual(list_vault_ids(data_dir), sorted([VAULT_B, long_id]))

    def test_empty(self):
        self.assertEqual(list_vault_ids(make_data_dir(self)), [])

    def test_written_vault_id(self):
        """
        A write to a vault file or to the journals SQLite keeps beside it
        changes that vault; the shared-memory file and other names do not.
        """
        for suffix in ("", "-wal", "-journal"):
            self.assertEqual(written_vault_id("clavitor-" + VAULT_A + ".db" + suffix), VAULT_A)
        for name in (
            "clavitor-" + VAULT_A + ".db-shm",
            "clavitor-" + VAULT_A + ".db-wal-x",
            "clavitor-" + VAULT_A.upper() + ".db",
            "clavitor-../" + VAULT_A + ".db",
            "x-clavitor-" + VAULT_A + ".db",
            "notes.txt",
        ):
            self.assertIsNone(written_vault_id(name), name)


class OpenTests(SynchronousTestCase):
    def setUp(self):
        self.data_dir = make_data_dir(self)
        self.path = vault_path(self.data_dir, VAULT_A)

    def test_pragmas(self):
        """
        Every connection gets the contract's pragmas, an existing file too.
        """
        open_vault(self, self.data_dir, VAULT_A).close()
        vault = open_vault(self, self.data_dir, VAULT_A, create=False)
        found = {
            name: vault._connection.execute("PRAGMA " + name).fetchone()[0]
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
        self.assertEqual(
            found,
            {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 5000, "foreign_keys": 1},
        )
        self.assertEqual(vault.vault_id, VAULT_A)

    def test_new_files_private(self):
        """
        A new vault file, and the WAL and shared-memory files SQLite makes
        beside it, are readable by the owner only, whatever the umask.
        """
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        vault = open_vault(self, self.data_dir, VAULT_A)
        vault.put_entry("e", b"secret", 1)
        for suffix in ("", "-wal", "-shm"):
            self.assertEqual(mode(self.path + suffix), 0o600, suffix)
        self.assertEqual(
            sorted(os.listdir(self.data_dir)),
            [os.path.basename(self.path) + suffix for suffix in ("", "-shm", "-wal")],
        )

    def test_create_keeps_existing_file(self):
        """
        C{create} never replaces a file that is there, even one that is not
        a vault.
        """
        with open(self.path, "wb") as f:
            f.write(b"not a database at all, " * 100)
        self.assertRaises(sqlite3.DatabaseError, Vault.open, self.path, create=True)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"not a database at all, " * 100)

    def test_schema(self):
        """
        The file has the contract's tables, columns and partial dirty index.
        """
        open_vault(self, self.data_dir, VAULT_A)
        plain = sqlite3.connect(self.path)
        self.addCleanup(plain.close)
        columns = {
            table: [
                (name, kind, notnull, default, pk)
                for _, name, kind, notnull, default, pk in plain.execute(
                    "SELECT * FROM pragma_table_info(?)", (table,)
                )
            ]
            for table in ("entries", "replication_meta")
        }
        self.assertEqual(
            columns["entries"],
            [
                ("entry_id", "TEXT", 0, None, 1),
                ("version", "INTEGER", 1, None, 0),
                ("updated_at", "INTEGER", 1, None, 0),
                ("deleted", "INTEGER", 1, "0", 0),
                ("data", "BLOB", 0, None, 0),
                ("dirty", "INTEGER", 1, "0", 0),
            ],
        )
        self.assertEqual(
            columns["replication_meta"],
            [("key", "TEXT", 0, None, 1), ("value", "TEXT", 1, None, 0)],
        )
        (index,) = plain.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchone()
        self.assertIn("WHERE dirty = 1", index)

    def test_dirty_query_uses_index(self):
        """
        Dirty entries are found through the partial index, not a table scan.
        """
        vault = open_vault(self, self.data_dir, VAULT_A)
        plan = vault._connection.execute(
            "EXPLAIN QUERY PLAN SELECT entry_id FROM entries WHERE dirty = 1"
            " ORDER BY entry_id LIMIT 10"
        ).fetchall()
        self.assertIn("USING INDEX entries_dirty", plan[0][3])

    def test_missing_file_not_created(self):
        self.assertRaises(sqlite3.OperationalError, Vault.open, self.path)
        self.assertFalse(os.path.exists(self.path))

    def test_refuses_other_names(self):
        for name in ("other.db", "clavitor-XYZ.db", "clavitor-" + VAULT_A + ".db.bak"):
            self.assertRaises(
                ValueError, Vault.open, os.path.join(self.data_dir, name), create=True
            )
        self.assertEqual(os.listdir(self.data_dir), [])

    def test_refuses_garbage(self):
        with open(self.path, "wb") as f:
            f.write(b"not a database at all, " * 100)
        self.assertRaises(sqlite3.DatabaseError, Vault.open, self.path)

    def test_refuses_other_schema(self):
        """
        A database without the vault schema is not a vault.
        """
        plain = sqlite3.connect(self.path)
        plain.execute("CREATE TABLE entries (entry_id TEXT PRIMARY KEY)")
        plain.commit()
        plain.close()
        self.assertRaises(sqlite3.DatabaseError, Vault.open, self.path)


class WriteTests(SynchronousTestCase):
    """
    The vault server API: every write raises the version and marks dirty.
    """

    def setUp(self):
        self.data_dir = make_data_dir(self)
        self.vault = open_vault(self, self.data_dir, VAULT_A)

    def test_put(self):
        self.assertEqual(self.vault.put_entry("e1", b"one", 100), 1)
        self.assertEqual(self.vault.put_entry("e1", b"two", 200), 2)
        self.assertEqual(
            self.vault.get_entry("e1"), Entry(VAULT_A, "e1", 2, 200, False, b"two")
        )
        self.assertEqual(self.vault.count_dirty(), 1)
        self.assertIsNone(self.vault.get_entry("e2"))

    def test_primary_epoch_set(self):
        """
        The first write gives a primary vault epoch 1; an existing epoch is
        kept.
        """
        self.assertIsNone(self.vault.get_meta("epoch"))
        self.vault.put_entry("e1", b"one", 100)
        self.assertEqual(self.vault.get_meta("epoch"), "1")
        self.vault.set_meta("epoch", "7")
        self.vault.put_entry("e1", b"two", 100)
        self.assertEqual(self.vault.get_meta("epoch"), "7")

    def test_write_after_replication_dirty_again(self):
        self.vault.put_entry("e1", b"one", 100)
        self.assertEqual(self.vault.mark_replicated([("e1", 1)]), 1)
        self.assertEqual(self.vault.count_dirty(), 0)
        self.vault.put_entry("e1", b"two", 200)
        self.assertEqual(self.vault.dirty_entries(10, 1000)[0].version, 2)

    def test_delete_keeps_tombstone(self):
        self.vault.put_entry("e1", b"one", 100)
        self.vault.mark_replicated([("e1", 1)])
        self.assertEqual(self.vault.delete_entry("e1", 300), 2)
        tombstone = Entry(VAULT_A, "e1", 2, 300, True, None)
        self.assertEqual(self.vault.get_entry("e1"), tombstone)
        self.assertEqual(list(self.vault.iter_entries()), [tombstone])
        self.assertEqual(self.vault.dirty_entries(10, 1000), [tombstone])

    def test_delete_missing(self):
        self.assertRaises(KeyError, self.vault.delete_entry, "nothing", 1)
        self.vault.put_entry("e1", b"one", 100)
        self.vault.delete_entry("e1", 200)
        self.assertRaises(KeyError, self.vault.delete_entry, "e1", 300)
        self.assertEqual(self.vault.get_entry("e1").version, 2)

    def test_put_revives_tombstone(self):
        self.vault.put_entry("e1", b"one", 100)
        self.vault.delete_entry("e1", 200)
        self.assertEqual(self.vault.put_entry("e1", b"again", 300), 3)
        self.assertEqual(
            self.vault.get_entry("e1"), Entry(VAULT_A, "e1", 3, 300, False, b"again")
        )

    def test_refused_on_replica(self):
        """
        A vault that is a replica refuses the vault server's writes and is
        left as it was.
        """
        self.vault.apply([entry(VAULT_A, "e1", 4, b"replicated")])
        self.vault.set_meta("source_pop", "calgary-01")
        self.assertRaises(WriteRefused, self.vault.put_entry, "e1", b"local", 1)
        self.assertRaises(WriteRefused, self.vault.put_entry, "e2", b"local", 1)
        self.assertRaises(WriteRefused, self.vault.delete_entry, "e1", 1)
        self.assertEqual(
            list(self.vault.iter_entries()), [entry(VAULT_A, "e1", 4, b"replicated")]
        )
        self.assertEqual(self.vault.count_dirty(), 0)
        self.assertIsNone(self.vault.get_meta("epoch"))

    def test_invalid_writes(self):
        for bad in ("", "a/b", "x" * 129, "é", "e\n"):
            self.assertRaises(ValueError, self.vault.put_entry, bad, b"d", 1)
        self.assertRaises(ValueError, self.vault.put_entry, "e", "text", 1)
        self.assertRaises(ValueError, self.vault.put_entry, "e", b"d", -1)
        self.assertRaises(ValueError, self.vault.put_entry, "e", b"d", True)
        self.assertEqual(list(self.vault.iter_entries()), [])

    def test_version_limit(self):
        self.vault.apply([entry(VAULT_A, "e1", MAX_VERSION)])
        self.assertRaises(WriteRefused, self.vault.put_entry, "e1", b"d", 1)
        self.assertEqual(self.vault.get_entry("e1").version, MAX_VERSION)

    def test_meta(self):
        self.assertIsNone(self.vault.get_meta("seq"))
        self.vault.set_meta("seq", "3")
        self.vault.set_meta("seq", "4")
        self.assertEqual(self.vault.get_meta("seq"), "4")
        self.assertRaises(ValueError, self.vault.set_meta, "seq", 5)


class ReplicationTests(SynchronousTestCase):
    """
    Reading dirty entries, marking them replicated, applying them.
    """

    def setUp(self):
        self.data_dir = make_data_dir(self)
        self.vault = open_vault(self, self.data_dir, VAULT_A)

    def test_lost_update(self):
        """
        An entry read into a batch at version 1, written again by the vault
        server (another connection, standing for another process) before the
        batch is acknowledged, stays dirty, and the next batch carries
        version 2.
        """
        self.vault.put_entry("e1", b"one", 100)
        (sent,) = self.vault.dirty_entries(100, 1 << 20)
        self.assertEqual(sent.version, 1)

        server = open_vault(self, self.data_dir, VAULT_A, create=False)
        self.assertEqual(server.put_entry("e1", b"two", 200), 2)

        self.assertEqual(self.vault.mark_replicated([(sent.entry_id, sent.version)]), 0)
        self.assertEqual(self.vault.count_dirty(), 1)
        self.assertEqual(
            self.vault.dirty_entries(100, 1 << 20),
            [Entry(VAULT_A, "e1", 2, 200, False, b"two")],
        )
        self.assertEqual(self.vault.mark_replicated([("e1", 2)]), 1)
        self.assertEqual(self.vault.dirty_entries(100, 1 << 20), [])

    def test_mark_replicated_counts(self):
        for name in ("e1", "e2", "e3"):
            self.vault.put_entry(name, b"d", 1)
        self.assertEqual(
            self.vault.mark_replicated([("e1", 1), ("e2", 1), ("e3", 9), ("nope", 1)]), 2
        )
        self.assertEqual(self.vault.mark_replicated([("e1", 1)]), 0)
        self.assertEqual([e.entry_id for e in self.vault.dirty_entries(10, 100)], ["e3"])

    def test_dirty_entries_limit(self):
        for name in ("e5", "e3", "e1", "e4", "e2"):
            self.vault.put_entry(name, b"d", 1)
        self.vault.mark_replicated([("e2", 1)])
        self.assertEqual(
            [e.entry_id for e in self.vault.dirty_entries(2, 1000)], ["e1", "e3"]
        )
        self.assertEqual(
            [e.entry_id for e in self.vault.dirty_entries(10, 1000)],
            ["e1", "e3", "e4", "e5"],
        )
        self.assertRaises(ValueError, self.vault.dirty_entries, 0, 1000)

    def test_dirty_entries_max_bytes(self):
        """
        Entries are added while their data fits in C{max_bytes}; the first
        is returned even when it alone is larger.
        """
        for name in ("e1", "e2", "e3"):
            self.vault.put_entry(name, b"x" * 10, 1)
        self.assertEqual(len(self.vault.dirty_entries(10, 30)), 3)
        self.assertEqual(len(self.vault.dirty_entries(10, 29)), 2)
        self.assertEqual(len(self.vault.dirty_entries(10, 20)), 2)
        self.assertEqual(len(self.vault.dirty_entries(10, 5)), 1)
        self.assertEqual(len(self.vault.dirty_entries(10, 0)), 1)

    def test_dirty_entries_tombstones_have_no_size(self):
        for name in ("e1", "e2", "e3"):
            self.vault.put_entry(name, b"x" * 10, 1)
            self.vault.delete_entry(name, 2)
        self.assertEqual(len(self.vault.dirty_entries(10, 0)), 3)

    def test_apply(self):
        batch = [entry(VAULT_A, "e1", 3, b"three"), entry(VAULT_A, "e2", 1, b"one")]
        self.assertEqual(self.vault.apply(batch), (2, 0))
        self.assertEqual(list(self.vault.iter_entries()), batch)
        self.assertEqual(self.vault.count_dirty(), 0)

    def test_apply_twice_changes_nothing(self):
        batch = [
            entry(VAULT_A, "e1", 3, b"three"),
            entry(VAULT_A, "e2", 1, b"one"),
            entry(VAULT_A, "e3", 2, deleted=True),
        ]
        self.assertEqual(self.vault.apply(batch), (3, 0))
        before = list(self.vault.iter_entries())
        self.assertEqual(self.vault.apply(batch), (0, 3))
        self.assertEqual(list(self.vault.iter_entries()), before)

    def test_older_version_skipped(self):
        self.vault.apply([entry(VAULT_A, "e1", 5, b"five", updated_at=500)])
        self.assertEqual(
            self.vault.apply(
                [
                    entry(VAULT_A, "e1", 4, b"four", updated_at=900),
                    entry(VAULT_A, "e1", 5, b"other five", updated_at=900),
                ]
            ),
            (0, 2),
        )
        self.assertEqual(
            self.vault.get_entry("e1"), Entry(VAULT_A, "e1", 5, 500, False, b"five")
        )
        self.assertEqual(self.vault.apply([entry(VAULT_A, "e1", 6, b"six")]), (1, 0))
        self.assertEqual(self.vault.get_entry("e1").data, b"six")

    def test_tombstone_replicates_and_stays(self):
        """
        A tombstone replaces the entry (data gone, row kept); a lower version
        arriving later does not bring the entry back.
        """
        self.vault.apply([entry(VAULT_A, "e1", 1, b"one")])
        self.assertEqual(self.vault.apply([entry(VAULT_A, "e1", 2, deleted=True)]), (1, 0))
        tombstone = Entry(VAULT_A, "e1", 2, 1000, True, None)
        self.assertEqual(self.vault.get_entry("e1"), tombstone)
        self.assertEqual(self.vault.apply([entry(VAULT_A, "e1", 1, b"one")]), (0, 1))
        self.assertEqual(list(self.vault.iter_entries()), [tombstone])

    def test_tombstone_for_unknown_entry(self):
        self.assertEqual(self.vault.apply([entry(VAULT_A, "e9", 3, deleted=True)]), (1, 0))
        self.assertTrue(self.vault.get_entry("e9").deleted)

    def test_apply_all_or_nothing(self):
        """
        An invalid entry anywhere in a batch leaves the vault untouched.
        """
        good = entry(VAULT_A, "e1", 1)
        for bad in (
            entry(VAULT_B, "e2", 1),
            entry(VAULT_A, "../e2", 1),
            entry(VAULT_A, "e2", 0),
            entry(VAULT_A, "e2", MAX_VERSION + 1),
            entry(VAULT_A, "e2", True),
            entry(VAULT_A, "e2", 1, updated_at=-1),
            Entry(VAULT_A, "e2", 1, 1, True, b"data"),
            Entry(VAULT_A, "e2", 1, 1, False, None),
            Entry(VAULT_A, "e2", 1, 1, 0, None),
        ):
            self.assertRaises(ValueError, self.vault.apply, [good, bad])
            self.assertEqual(list(self.vault.iter_entries()), [])

    def test_apply_does_not_touch_dirty_flag_of_skipped(self):
        """
        A skipped entry keeps its row as it was, dirty flag included.
        """
        self.vault.put_entry("e1", b"local", 1)
        self.vault.put_entry("e1", b"local", 1)
        self.assertEqual(self.vault.apply([entry(VAULT_A, "e1", 1)]), (0, 1))
        self.assertEqual(self.vault.count_dirty(), 1)


class OpenForWritesTests(SynchronousTestCase):
    def setUp(self):
        self.data_dir = make_data_dir(self)

    def test_backup_refused(self):
        self.assertRaises(
            WriteRefused, open_vault_for_writes, Role.BACKUP, self.data_dir, VAULT_A
        )
        self.assertEqual(os.listdir(self.data_dir), [])

    def test_primary(self):
        vault = open_vault_for_writes(Role.PRIMARY, self.data_dir, VAULT_A)
        self.addCleanup(vault.close)
        self.assertEqual(vault.put_entry("e1", b"d", 1), 1)
        self.assertEqual(list_vault_ids(self.data_dir), [VAULT_A])
        self.assertEqual(mode(vault_path(self.data_dir, VAULT_A)), 0o600)

    def test_bad_id(self):
        self.assertRaises(
            ValueError, open_vault_for_writes, Role.PRIMARY, self.data_dir, "../" + VAULT_A
        )
        self.assertEqual(os.listdir(self.data_dir), [])


class VaultStoreTests(TestCase):
    """
    L{VaultStore} on a real thread pool and the real reactor.
    """

    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-vault")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.data_dir = make_data_dir(self)
        self.store = VaultStore(self.data_dir, self.pool, reactor)
        self.addCleanup(self.store.close)

    def write(self, vault_id, *names, data=b"d"):
        vault = open_vault(self, self.data_dir, vault_id)
        for name in names:
            vault.put_entry(name, data, 1)
        return vault

    def capture_errors(self):
        events = []

        def observe(event):
            if event.get("log_level") == LogLevel.error:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    @inlineCallbacks
    def test_dirty_batch_round_robin(self):
        """
        Each batch starts with the vault after the one the previous batch
        started with, so every vault gets a turn.
        """
        for vault_id in (VAULT_A, VAULT_B, VAULT_C):
            self.write(vault_id, "e1", "e2", "e3")
        starts = []
        for _ in range(4):
            batch = yield self.store.dirty_batch(2, 1 << 20)
            self.assertEqual(len(batch), 2)
            self.assertEqual(len({e.vault_id for e in batch}), 1)
            starts.append(batch[0].vault_id)
        self.assertEqual(starts, [VAULT_A, VAULT_B, VAULT_C, VAULT_A])

    @inlineCallbacks
    def test_dirty_batch_fills_across_vaults(self):
        for vault_id in (VAULT_A, VAULT_B, VAULT_C):
            self.write(vault_id, "e1", "e2", "e3")
        batch = yield self.store.dirty_batch(4, 1 << 20)
        self.assertEqual(
            [(e.vault_id, e.entry_id) for e in batch],
            [(VAULT_A, "e1"), (VAULT_A, "e2"), (VAULT_A, "e3"), (VAULT_B, "e1")],
        )
        batch = yield self.store.dirty_batch(4, 1 << 20)
        self.assertEqual([e.vault_id for e in batch], [VAULT_B] * 3 + [VAULT_C])

    @inlineCallbacks
    def test_drain(self):
        """
        Marking each batch replicated drains every vault, every entry once.
        """
        expected = set()
        for vault_id in (VAULT_A, VAULT_B, VAULT_C):
            names = ["e%d" % i for i in range(7)]
            self.write(vault_id, *names)
            expected |= {(vault_id, name) for name in names}
        seen = []
        while True:
            batch = yield self.store.dirty_batch(5, 1 << 20)
            if not batch:
                break
            cleared = yield self.store.mark_replicated(batch)
            self.assertEqual(cleared, len(batch))
            seen.extend((e.vault_id, e.entry_id) for e in batch)
        self.assertEqual(sorted(seen), sorted(expected))
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_A: 0, VAULT_B: 0, VAULT_C: 0})

    @inlineCallbacks
    def test_dirty_batch_max_bytes(self):
        """
        A batch stops before the data would exceed C{max_bytes}, across
        vaults; an entry larger than that goes alone.
        """
        self.write(VAULT_A, "e1", data=b"x" * 60)
        self.write(VAULT_B, "e1", data=b"x" * 60)
        self.write(VAULT_C, "e1", data=b"x" * 200)
        batch = yield self.store.dirty_batch(10, 100)
        self.assertEqual([e.vault_id for e in batch], [VAULT_A])
        batch = yield self.store.dirty_batch(10, 100)
        self.assertEqual([e.vault_id for e in batch], [VAULT_B])
        batch = yield self.store.dirty_batch(10, 100)
        self.assertEqual([e.vault_id for e in batch], [VAULT_C])
        batch = yield self.store.dirty_batch(10, 120)
        self.assertEqual([e.vault_id for e in batch], [VAULT_A, VAULT_B])

    @inlineCallbacks
    def test_dirty_batch_bad_arguments(self):
        yield self.assertFailure(self.store.dirty_batch(0, 100), ValueError)

    @inlineCallbacks
    def test_dirty_batch_exclude(self):
        """
        Excluded vaults give nothing and keep their entries dirty; the others
        still take turns; once no longer excluded, a vault's entries come.
        """
        for vault_id in (VAULT_A, VAULT_B, VAULT_C):
            self.write(vault_id, "e1", "e2", "e3")
        starts = []
        for _ in range(4):
            batch = yield self.store.dirty_batch(2, 1 << 20, exclude=frozenset({VAULT_A}))
            self.assertEqual(len(batch), 2)
            self.assertNotIn(VAULT_A, {e.vault_id for e in batch})
            starts.append(batch[0].vault_id)
        self.assertEqual(starts, [VAULT_B, VAULT_C, VAULT_B, VAULT_C])
        batch = yield self.store.dirty_batch(10, 1 << 20, exclude=frozenset({VAULT_A, VAULT_B}))
        self.assertEqual([(e.vault_id, e.entry_id) for e in batch],
                         [(VAULT_C, "e1"), (VAULT_C, "e2"), (VAULT_C, "e3")])
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_A: 3, VAULT_B: 3, VAULT_C: 3})
        batch = yield self.store.dirty_batch(10, 1 << 20, exclude=frozenset({VAULT_B, VAULT_C}))
        self.assertEqual([e.vault_id for e in batch], [VAULT_A] * 3)
        batch = yield self.store.dirty_batch(10, 1 << 20, exclude=frozenset({"f" * 16}))
        self.assertEqual(len(batch), 9)

    @inlineCallbacks
    def test_excluded_vault_not_read(self):
        """
        An excluded vault is not even opened: a broken one logs nothing.
        """
        errors = self.capture_errors()
        with open(vault_path(self.data_dir, VAULT_A), "wb") as f:
            f.write(b"garbage " * 1000)
        self.write(VAULT_B, "e1")
        batch = yield self.store.dirty_batch(10, 1000, exclude=frozenset({VAULT_A}))
        self.assertEqual([e.vault_id for e in batch], [VAULT_B])
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_new_vault_picked_up(self):
        batch = yield self.store.dirty_batch(10, 1000)
        self.assertEqual(batch, [])
        self.write(VAULT_B, "e1")
        batch = yield self.store.dirty_batch(10, 1000)
        self.assertEqual([(e.vault_id, e.entry_id) for e in batch], [(VAULT_B, "e1")])

    @inlineCallbacks
    def test_replaced_vault_file_reopened(self):
        """
        A vault file removed and made again under the store's open
        connection is read from the new file, not the removed one.
        """
        old = self.write(VAULT_A, "old")
        batch = yield self.store.dirty_batch(10, 1000)
        self.assertEqual([e.entry_id for e in batch], ["old"])
        old.close()
        path = vault_path(self.data_dir, VAULT_A)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {})
        self.write(VAULT_A, "new")
        batch = yield self.store.dirty_batch(10, 1000)
        self.assertEqual([e.entry_id for e in batch], ["new"])

    @inlineCallbacks
    def test_broken_vault_skipped_and_logged(self):
        """
        A vault file that cannot be opened is logged once and skipped; the
        others still replicate.
        """
        errors = self.capture_errors()
        with open(vault_path(self.data_dir, VAULT_A), "wb") as f:
            f.write(b"garbage " * 1000)
        self.write(VAULT_B, "e1")
        batch = yield self.store.dirty_batch(10, 1000)
        self.assertEqual([e.vault_id for e in batch], [VAULT_B])
        self.assertEqual([e["vault_id"] for e in errors], [VAULT_A])
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_B: 1})
        self.assertEqual(len(errors), 1)
        self.assertNotIn(self.data_dir, errors[0]["log_format"])

    @inlineCallbacks
    def test_lost_update(self):
        """
        Through the store: an entry in flight at version 1 is written again
        by the vault server; acknowledging version 1 leaves it dirty and the
        next batch holds version 2.
        """
        self.write(VAULT_A, "e1")
        (sent,) = yield self.store.dirty_batch(10, 1000)
        self.assertEqual(sent.version, 1)
        server = open_vault(self, self.data_dir, VAULT_A, create=False)
        server.put_entry("e1", b"newer", 2)
        cleared = yield self.store.mark_replicated([sent])
        self.assertEqual(cleared, 0)
        (again,) = yield self.store.dirty_batch(10, 1000)
        self.assertEqual((again.version, again.data), (2, b"newer"))
        cleared = yield self.store.mark_replicated([again])
        self.assertEqual(cleared, 1)
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_A: 0})

    @inlineCallbacks
    def test_backlog(self):
        self.write(VAULT_A, "e1", "e2")
        vault = self.write(VAULT_B, "e1")
        vault.mark_replicated([("e1", 1)])
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_A: 2, VAULT_B: 0})

    @inlineCallbacks
    def test_primary_epoch(self):
        epoch = yield self.store.primary_epoch()
        self.assertEqual(epoch, 1)
        self.write(VAULT_A, "e1")
        epoch = yield self.store.primary_epoch()
        self.assertEqual(epoch, 1)
        self.write(VAULT_B, "e1").set_meta("epoch", "4")
        self.write(VAULT_C, "e1")
        epoch = yield self.store.primary_epoch()
        self.assertEqual(epoch, 4)

    @inlineCallbacks
    def test_concurrent_use(self):
        """
        Many calls at once on the pool's threads share each connection
        safely: each call's transaction runs alone on its connection.
        """
        names = ["e%d" % i for i in range(10)]
        self.write(VAULT_A, *names)
        sent = [entry(VAULT_A, name, 1) for name in names]
        # Long transactions (mostly entries that do not exist), to overlap.
        padding = [entry(VAULT_A, "p%d" % i, 1) for i in range(2000)]
        calls = []
        for i in range(30):
            calls.append(self.store.mark_replicated(padding + sent[i % 10 : i % 10 + 1]))
            calls.append(self.store.dirty_batch(3, 1 << 20))
            calls.append(self.store.backlog())
        results = yield gatherResults(calls, consumeErrors=True)
        self.assertEqual(sum(results[0::3]), 10)
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {VAULT_A: 0})


def files_open_in(directory):
    """
    How many file descriptors of this process are open on files in
    C{directory} (Linux).
    """
    count = 0
    directory = os.path.realpath(directory)
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.path.dirname(os.readlink(os.path.join("/proc/self/fd", fd))) == directory:
                count += 1
    return count


def age(data_dir, vault_id, seconds=60):
    """
    Date a vault's files C{seconds} back, as if last written then.
    """
    path = vault_path(data_dir, vault_id)
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            when = time.time() - seconds
            os.utime(name, (when, when))


class OpenConnectionsTests(TestCase):
    """
    A store keeps at most C{max_open} connections, and does not open a
    vault it has seen clean whose files have not changed since.
    """

    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="test-vault")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.data_dir = make_data_dir(self)
        self.ids = ["%016x" % (n,) for n in range(1, 9)]
        for vault_id in self.ids:
            vault = open_vault_for_writes(Role.PRIMARY, self.data_dir, vault_id)
            vault.put_entry("e", b"d", 1)
            vault.close()
        self.store = VaultStore(self.data_dir, self.pool, reactor, max_open=3)
        self.addCleanup(self.store.close)
        self.reads = []
        original = Vault.dirty_entries

        def counted(vault, *args):
            self.reads.append(vault.vault_id)
            return original(vault, *args)

        self.patch(Vault, "dirty_entries", counted)

    @inlineCallbacks
    def drain(self):
        while True:
            batch = yield self.store.dirty_batch(100, 1 << 20)
            if not batch:
                return
            yield self.store.mark_replicated(batch)

    @inlineCallbacks
    def test_at_most_max_open(self):
        """
        Reading eight vaults, then a backlog and an epoch of all of them,
        leaves at most three connections (three files each) open.
        """
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("no /proc/self/fd to count open files")
        yield self.drain()
        yield self.store.backlog()
        yield self.store.primary_epoch()
        self.assertLessEqual(files_open_in(self.data_dir), 3 * 3)
        self.assertGreater(files_open_in(self.data_dir), 0)

    @inlineCallbacks
    def test_clean_vaults_not_read_again(self):
        """
        A vault read with nothing dirty, whose files were last written a
        while ago, is not read again until a write changes its files; then
        the write is found.
        """
        yield self.drain()
        for vault_id in self.ids:
            age(self.data_dir, vault_id)
        batch = yield self.store.dirty_batch(100, 1 << 20)
        self.assertEqual(batch, [])
        self.reads.clear()
        batch = yield self.store.dirty_batch(100, 1 << 20)
        self.assertEqual((batch, self.reads), ([], []))
        backlog = yield self.store.backlog()
        self.assertEqual(backlog, {vault_id: 0 for vault_id in self.ids})

        vault = open_vault_for_writes(Role.PRIMARY, self.data_dir, self.ids[5])
        vault.put_entry("later", b"d", 2)
        vault.close()
        batch = yield self.store.dirty_batch(100, 1 << 20)
        self.assertEqual([(e.vault_id, e.entry_id) for e in batch], [(self.ids[5], "later")])
        self.assertEqual(self.reads, [self.ids[5]])

    @inlineCallbacks
    def test_recently_written_vaults_read_again(self):
        """
        Files written within RACY_SECONDS may be written again within the
        same timestamp tick, leaving the same stamp: such a clean vault is
        read on every scan until its stamp has settled.
        """
        yield self.drain()
        self.reads.clear()
        for _ in range(2):
            batch = yield self.store.dirty_batch(100, 1 << 20)
            self.assertEqual(batch, [])
        self.assertEqual(len(self.reads), 2 * len(self.ids))

    @inlineCallbacks
    def test_epoch_read_again_after_a_change(self):
        yield self.drain()
        for vault_id in self.ids:
            age(self.data_dir, vault_id)
        epoch = yield self.store.primary_epoch()
        self.assertEqual(epoch, 1)
        vault = open_vault_for_writes(Role.PRIMARY, self.data_dir, self.ids[2])
        vault.set_meta("epoch", "4")
        vault.close()
        epoch = yield self.store.primary_epoch()
        self.assertEqual(epoch, 4)


class ApplyBatchTests(TestCase):
    """
    L{VaultStore.apply_batch}: the backup side.
    """

    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-vault-apply")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.data_dir = make_data_dir(self)
        self.store = VaultStore(self.data_dir, self.pool, reactor)
        self.addCleanup(self.store.close)

    def contents(self, vault_id):
        """
        Every row and the replication meta of a vault, read with a
        connection of its own; C{None} if the file does not exist.
        """
        path = vault_path(self.data_dir, vault_id)
        if not os.path.exists(path):
            return None
        vault = Vault.open(path)
        try:
            meta = {k: vault.get_meta(k) for k in ("source_pop", "epoch", "seq")}
            return list(vault.iter_entries()), vault.count_dirty(), meta
        finally:
            vault.close()

    @inlineCallbacks
    def test_creates_vaults_and_records(self):
        batch = [
            entry(VAULT_A, "e1", 1, b"one"),
            entry(VAULT_A, "e2", 2, deleted=True),
            entry(VAULT_B, "e1", 7, b"seven"),
        ]
        counts = yield self.store.apply_batch("calgary-01", 3, 9, batch)
        self.assertEqual(counts, (3, 0))
        self.assertEqual(list_vault_ids(self.data_dir), [VAULT_A, VAULT_B])
        meta = {"source_pop": "calgary-01", "epoch": "3", "seq": "9"}
        self.assertEqual(self.contents(VAULT_A), (batch[:2], 0, meta))
        self.assertEqual(self.contents(VAULT_B), (batch[2:], 0, meta))
        for vault_id in (VAULT_A, VAULT_B):
            self.assertEqual(mode(vault_path(self.data_dir, vault_id)), 0o600)

    @inlineCallbacks
    def test_same_batch_twice(self):
        batch = [entry(VAULT_A, "e1", 1), entry(VAULT_B, "e1", 2)]
        counts = yield self.store.apply_batch("calgary-01", 1, 1, batch)
        self.assertEqual(counts, (2, 0))
        before = [self.contents(VAULT_A), self.contents(VAULT_B)]
        counts = yield self.store.apply_batch("calgary-01", 1, 1, batch)
        self.assertEqual(counts, (0, 2))
        self.assertEqual([self.contents(VAULT_A), self.contents(VAULT_B)], before)

    @inlineCallbacks
    def test_epoch_and_seq_recorded(self):
        """
        A later epoch is recorded with its seq; a batch of the same epoch
        with a lower seq (a retry arriving late) does not move seq back.
        """
        yield self.store.apply_batch("calgary-01", 1, 5, [entry(VAULT_A, "e1", 1)])
        yield self.store.apply_batch("calgary-01", 1, 4, [entry(VAULT_A, "e2", 1)])
        self.assertEqual(self.contents(VAULT_A)[2]["seq"], "5")
        yield self.store.apply_batch("calgary-01", 2, 1, [entry(VAULT_A, "e3", 1)])
        self.assertEqual(
            self.contents(VAULT_A)[2],
            {"source_pop": "calgary-01", "epoch": "2", "seq": "1"},
        )

    @inlineCallbacks
    def test_other_owner_forbidden_nothing_written(self):
        """
        A batch touching a vault another POP owns is refused before any
        vault is written, even the ones it could have written.
        """
        yield self.store.apply_batch("zurich-02", 1, 1, [entry(VAULT_B, "e1", 1)])
        owned = self.contents(VAULT_B)
        batch = [entry(VAULT_A, "e1", 1), entry(VAULT_B, "e1", 5), entry(VAULT_C, "e1", 1)]
        yield self.assertFailure(
            self.store.apply_batch("calgary-01", 1, 2, batch), Forbidden
        )
        self.assertIsNone(self.contents(VAULT_A))
        self.assertIsNone(self.contents(VAULT_C))
        self.assertEqual(self.contents(VAULT_B), owned)

    @inlineCallbacks
    def test_stale_epoch_conflict_nothing_written(self):
        yield self.store.apply_batch("calgary-01", 1, 1, [entry(VAULT_A, "e1", 1)])
        yield self.store.apply_batch("calgary-01", 5, 1, [entry(VAULT_C, "e1", 1)])
        before = [self.contents(VAULT_A), self.contents(VAULT_C)]
        batch = [entry(VAULT_A, "e1", 2), entry(VAULT_B, "e1", 1), entry(VAULT_C, "e1", 2)]
        yield self.assertFailure(
            self.store.apply_batch("calgary-01", 3, 2, batch), Conflict
        )
        self.assertEqual([self.contents(VAULT_A), self.contents(VAULT_C)], before)
        self.assertIsNone(self.contents(VAULT_B))

    @inlineCallbacks
    def test_local_vault_forbidden(self):
        """
        A vault with entries but no owner was written here, not replicated:
        a batch does not overwrite it.
        """
        local = open_vault(self, self.data_dir, VAULT_A)
        local.put_entry("e1", b"local", 1)
        before = self.contents(VAULT_A)
        yield self.assertFailure(
            self.store.apply_batch("calgary-01", 1, 1, [entry(VAULT_A, "e1", 9)]),
            Forbidden,
        )
        self.assertEqual(self.contents(VAULT_A), before)

    @inlineCallbacks
    def test_empty_vault_claimed(self):
        open_vault(self, self.data_dir, VAULT_A)
        counts = yield self.store.apply_batch("calgary-01", 1, 1, [entry(VAULT_A, "e1", 1)])
        self.assertEqual(counts, (1, 0))
        self.assertEqual(self.contents(VAULT_A)[2]["source_pop"], "calgary-01")

    @inlineCallbacks
    def test_replica_refuses_local_writes(self):
        yield self.store.apply_batch("calgary-01", 1, 1, [entry(VAULT_A, "e1", 1)])
        server = open_vault(self, self.data_dir, VAULT_A, create=False)
        self.assertRaises(WriteRefused, server.put_entry, "e1", b"local", 2)

    @inlineCallbacks
    def test_invalid_entry_nothing_written(self):
        batch = [entry(VAULT_A, "e1", 1), entry("../" + VAULT_B, "e1", 1)]
        yield self.assertFailure(self.store.apply_batch("calgary-01", 1, 1, batch), ValueError)
        batch = [entry(VAULT_A, "e1", 1), entry(VAULT_B, "e1", 0)]
        yield self.assertFailure(self.store.apply_batch("calgary-01", 1, 1, batch), ValueError)
        self.assertEqual(os.listdir(self.data_dir), [])

    @inlineCallbacks
    def test_concurrent_sources(self):
        """
        POPs racing for the same new vault, through two stores (standing for
        two processes): exactly one owns it, the others are refused, and the
        vault holds the owner's entry.
        """
        other = VaultStore(self.data_dir, self.pool, reactor)
        self.addCleanup(other.close)
        calls = [
            store.apply_batch(pop, 1, 1, [entry(VAULT_A, "e1", 1, pop.encode())])
            .addCallbacks(lambda _, pop=pop: pop, lambda f: f.trap(Forbidden) and None)
            for store, pop in [(self.store, "calgary-01"), (other, "denver-01")] * 10
        ]
        results = yield gatherResults(calls)
        (only,), _, meta = self.contents(VAULT_A)
        self.assertEqual({pop for pop in results if pop}, {meta["source_pop"]})
        self.assertEqual(results.count(None), 10)
        self.assertEqual(only.data.decode(), meta["source_pop"])
