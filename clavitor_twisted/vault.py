# -*- test-case-name: tests.test_vault -*-
"""
The vault file contract, shared with the vault server (another process).

Each customer vault is one SQLite file, C{<data_dir>/clavitor-<vault_id>.db}.
The schema, the pragmas and the rules below live here and nowhere else:

  - every write through the vault server API raises the entry's version and
    marks it dirty; a vault that is a replica refuses such writes;
  - an entry is marked replicated only if its version is still the one that
    was sent, so a write landing while a batch is in flight stays dirty;
  - applying a batch is idempotent: an incoming entry replaces the local row
    only if its version is higher, one transaction per vault per batch;
  - a delete is a tombstone that keeps its row, so the delete replicates.

L{Vault} is one blocking connection.  L{VaultStore} holds the vaults of one
data directory, one connection per file, and runs all SQLite work on a
thread pool, never on the reactor thread.
"""

import os
import re
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from clavitor_twisted.errors import Conflict, Forbidden, WriteRefused
from clavitor_twisted.role import Role, require_writable

# Always used with fullmatch: "$" would let a trailing newline through.
VAULT_ID_PATTERN = re.compile(r"[0-9a-f]{16,64}")
ENTRY_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_VERSION = 2**63 - 1

_FILE_NAME = re.compile(r"clavitor-(.*)\.db", re.DOTALL)
# The vault file and the journals SQLite writes beside it.
_WRITTEN_FILE_NAME = re.compile(r"clavitor-(.*)\.db(?:-wal|-journal)?", re.DOTALL)

# The schema every vault file has.  The vault server creates the same.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        entry_id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        data BLOB,
        dirty INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX IF NOT EXISTS entries_dirty ON entries (entry_id) WHERE dirty = 1",
    """CREATE TABLE IF NOT EXISTS replication_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
)
_SCHEMA_COLUMNS = {
    "entries": {"entry_id", "version", "updated_at", "deleted", "data", "dirty"},
    "replication_meta": {"key", "value"},
}

# Set on every connection, in this order (busy_timeout first: switching a
# new file to WAL needs the write lock).
PRAGMAS = (
    ("busy_timeout", "5000"),
    ("journal_mode", "WAL"),
    ("synchronous", "FULL"),
    ("foreign_keys", "ON"),
)

_COLUMNS = "entry_id, version, updated_at, deleted, data"

_T = TypeVar("_T")


def is_vault_id(s: object) -> bool:
    """
    Whether C{s} is a vault id: 16 to 64 lower-case hex characters, nothing
    else (not even a trailing newline).
    """
    return isinstance(s, str) and VAULT_ID_PATTERN.fullmatch(s) is not None


def vault_path(data_dir: str, vault_id: str) -> str:
    """
    The file of vault C{vault_id}.  The id is checked before any path is
    built, so an id from the wire can never name another file.

    @raise ValueError: C{vault_id} is not a vault id.
    """
    if not is_vault_id(vault_id):
        raise ValueError("not a vault id")
    return os.path.join(data_dir, "clavitor-" + vault_id + ".db")


def list_vault_ids(data_dir: str) -> list[str]:
    """
    The ids of the vault files in C{data_dir}, sorted.  Only regular files
    named C{clavitor-<vault_id>.db} with a valid id count; anything else
    (WAL and shared-memory files, other names, directories, symlinks) is not a
    vault.
    """
    ids = []
    with os.scandir(data_dir) as found:
        for item in found:
            match = _FILE_NAME.fullmatch(item.name)
            if (
                match is not None
                and is_vault_id(match.group(1))
                and item.is_file(follow_symlinks=False)
            ):
                ids.append(match.group(1))
    return sorted(ids)


def written_vault_id(file_name: str) -> str | None:
    """
    The vault that a write to the file C{file_name} (of a data directory)
    changes: the vault file itself, or its WAL or rollback journal.
    """
    match = _WRITTEN_FILE_NAME.fullmatch(file_name)
    if match is None or not is_vault_id(match.group(1)):
        return None
    return match.group(1)


@dataclass(frozen=True)
class Entry:
    """
    One row of a vault: C{data} is the encrypted entry, opaque here, and
    C{None} for a tombstone (C{deleted}).
    """

    vault_id: str
    entry_id: str
    version: int
    updated_at: int
    deleted: bool
    data: bytes | None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(name + " out of range")


def _check_entry_id(entry_id: object) -> None:
    if not isinstance(entry_id, str) or ENTRY_ID_PATTERN.fullmatch(entry_id) is None:
        raise ValueError("not an entry id")


def _check_entry(entry: Entry) -> None:
    """
    Refuse an entry that cannot be stored as it is: bad ids, a version
    outside 1..L{MAX_VERSION}, a negative time, a tombstone with data or a
    live entry without.

    @raise ValueError: what is wrong (no data in the message).
    """
    if not is_vault_id(entry.vault_id):
        raise ValueError("not a vault id")
    _check_entry_id(entry.entry_id)
    _check_int("version", entry.version, 1, MAX_VERSION)
    _check_int("updated_at", entry.updated_at, 0, MAX_VERSION)
    if type(entry.deleted) is not bool:
        raise ValueError("deleted must be a bool")
    if entry.deleted:
        if entry.data is not None:
            raise ValueError("a tombstone has no data")
    elif type(entry.data) is not bytes:
        raise ValueError("an entry's data must be bytes")


def _connect(path: str) -> sqlite3.Connection:
    """
    A connection to the existing database file C{path} in autocommit mode
    (transactions are explicit), usable from any one thread at a time, with
    the contract's pragmas set.
    """
    connection = sqlite3.connect(
        Path(path).absolute().as_uri() + "?mode=rw",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        for name, value in PRAGMAS:
            connection.execute("PRAGMA " + name + " = " + value)
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        if mode.lower() != "wal":
            raise sqlite3.OperationalError("vault is not in WAL mode")
    except BaseException:
        connection.close()
        raise
    return connection


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """
    One write transaction, taking the write lock at once (waiting up to the
    busy timeout for another writer): committed if the block finishes,
    rolled back if it raises.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _check_schema(connection: sqlite3.Connection) -> None:
    for table, wanted in _SCHEMA_COLUMNS.items():
        found = {
            row[0]
            for row in connection.execute(
                "SELECT name FROM pragma_table_info(?)", (table,)
            )
        }
        if not wanted <= found:
            raise sqlite3.DatabaseError("vault schema missing")


def _create_vault_file(path: str) -> None:
    """
    Make an empty vault at C{path}, mode 0600, unless a file is there.

    The file is built under a temporary name and linked into place, so no
    other process (or L{VaultStore} scan) ever sees a vault file without its
    schema, and a file another process made first is kept.  SQLite gives
    the WAL and shared-memory files the mode of the database file.
    """
    if os.path.lexists(path):
        return
    directory, name = os.path.split(path)
    directory = directory or "."
    fd, temporary = tempfile.mkstemp(prefix="." + name + ".", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        os.close(fd)
        connection = _connect(temporary)
        try:
            with _transaction(connection):
                for statement in SCHEMA:
                    connection.execute(statement)
        finally:
            connection.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        for suffix in ("", "-wal", "-shm"):
            with suppress(FileNotFoundError):
                os.unlink(temporary + suffix)


class Vault:
    """
    One vault file: one SQLite connection, blocking.  Use it from one thread
    at a time (L{VaultStore} guards each with a lock).

    The connection is in autocommit mode and every change runs in an explicit
    C{BEGIN IMMEDIATE} transaction, so another process writing the same file
    at the same time is safe.
    """

    def __init__(self, vault_id: str, connection: sqlite3.Connection) -> None:
        self.vault_id = vault_id
        self._connection = connection

    @classmethod
    def open(cls, path: str, create: bool = False) -> "Vault":
        """
        Open the vault file at C{path}, setting the contract's pragmas.  With
        C{create}, a missing file is made first, complete with the schema
        (mode 0600); without, a missing file is an error and is not created.

        @raise ValueError: the file name is not C{clavitor-<vault_id>.db}.
        @raise sqlite3.Error: the file cannot be opened, is not a database or
            lacks the vault schema.
        @raise OSError: the file cannot be created.
        """
        match = _FILE_NAME.fullmatch(os.path.basename(path))
        if match is None or not is_vault_id(match.group(1)):
            raise ValueError("not a vault file name")
        if create:
            _create_vault_file(path)
        connection = _connect(path)
        try:
            _check_schema(connection)
        except BaseException:
            connection.close()
            raise
        return cls(match.group(1), connection)

    def close(self) -> None:
        self._connection.close()

    # The vault server API.

    def _refuse_if_replica(self) -> None:
        if self.get_meta("source_pop") is not None:
            raise WriteRefused(
                "vault is a replica",
                "write refused: vault " + self.vault_id + " is a replica",
            )

    def _begin_local_write(self, entry_id: str, now_ms: int) -> tuple[int, bool] | None:
        """
        Inside a write transaction: refuse the write on a replica, give a
        primary vault its epoch if it has none, and return the entry's
        current (version, deleted), C{None} for a new entry.
        """
        _check_entry_id(entry_id)
        _check_int("now_ms", now_ms, 0, MAX_VERSION)
        self._refuse_if_replica()
        self._connection.execute(
            "INSERT OR IGNORE INTO replication_meta (key, value) VALUES ('epoch', '1')"
        )
        row = self._connection.execute(
            "SELECT version, deleted FROM entries WHERE entry_id = ?", (entry_id,)
        ).fetchone()
        if row is None:
            return None
        if row[0] >= MAX_VERSION:
            raise WriteRefused("entry version limit reached")
        return row[0], bool(row[1])

    def _store_local(
        self, entry_id: str, version: int, now_ms: int, data: bytes | None
    ) -> None:
        self._connection.execute(
            "INSERT INTO entries (entry_id, version, updated_at, deleted, data, dirty)"
            " VALUES (?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (entry_id) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at, deleted = excluded.deleted,"
            " data = excluded.data, dirty = 1",
            (entry_id, version, now_ms, int(data is None), data),
        )

    def put_entry(self, entry_id: str, data: bytes, now_ms: int) -> int:
        """
        Create or update an entry (a tombstone comes back to life), raising
        its version by one and marking it dirty.

        @return: the new version.
        @raise WriteRefused: this vault is a replica.
        """
        if type(data) is not bytes:
            raise ValueError("an entry's data must be bytes")
        with _transaction(self._connection):
            current = self._begin_local_write(entry_id, now_ms)
            version = 1 if current is None else current[0] + 1
            self._store_local(entry_id, version, now_ms, data)
        return version

    def delete_entry(self, entry_id: str, now_ms: int) -> int:
        """
        Turn a live entry into a tombstone (data removed, row kept so the
        delete replicates), raising its version by one and marking it dirty.

        @return: the new version.
        @raise KeyError: there is no live entry C{entry_id} (none, or a
            tombstone already).
        @raise WriteRefused: this vault is a replica.
        """
        with _transaction(self._connection):
            current = self._begin_local_write(entry_id, now_ms)
            if current is None or current[1]:
                raise KeyError(entry_id)
            version = current[0] + 1
            self._store_local(entry_id, version, now_ms, None)
        return version

    def _entry(self, row: tuple) -> Entry:
        entry_id, version, updated_at, deleted, data = row
        return Entry(self.vault_id, entry_id, version, updated_at, bool(deleted), data)

    def get_entry(self, entry_id: str) -> Entry | None:
        """
        The entry C{entry_id}, a tombstone included, or C{None}.
        """
        row = self._connection.execute(
            "SELECT " + _COLUMNS + " FROM entries WHERE entry_id = ?", (entry_id,)
        ).fetchone()
        return None if row is None else self._entry(row)

    def iter_entries(self) -> Iterator[Entry]:
        """
        Every row, tombstones included, ordered by entry id, read as
        iterated.
        """
        for row in self._connection.execute(
            "SELECT " + _COLUMNS + " FROM entries ORDER BY entry_id"
        ):
            yield self._entry(row)

    # Replication.

    def dirty_entries(self, limit: int, max_bytes: int) -> list[Entry]:
        """
        Up to C{limit} dirty entries in entry id order, read through the
        partial index one row at a time, stopping before the entry whose data
        would take the total over C{max_bytes}.  The first dirty entry is
        returned however large it is, so a big entry cannot block the vault.
        """
        _check_int("limit", limit, 1, MAX_VERSION)
        _check_int("max_bytes", max_bytes, 0, MAX_VERSION)
        found: list[Entry] = []
        total = 0
        cursor = self._connection.execute(
            "SELECT " + _COLUMNS + " FROM entries WHERE dirty = 1"
            " ORDER BY entry_id LIMIT ?",
            (limit,),
        )
        try:
            for row in cursor:
                entry = self._entry(row)
                size = len(entry.data or b"")
                if found and total + size > max_bytes:
                    break
                found.append(entry)
                total += size
        finally:
            cursor.close()
        return found

    def count_dirty(self) -> int:
        (count,) = self._connection.execute(
            "SELECT count(*) FROM entries WHERE dirty = 1"
        ).fetchone()
        return count

    def mark_replicated(self, sent: Iterable[tuple[str, int]]) -> int:
        """
        Clear C{dirty} for each (entry id, version) sent, only where the
        entry still has that version.  An entry written again since it was
        read stays dirty and goes in the next batch.

        @return: how many entries were cleared.
        """
        cleared = 0
        with _transaction(self._connection):
            for entry_id, version in sent:
                cleared += self._connection.execute(
                    "UPDATE entries SET dirty = 0"
                    " WHERE entry_id = ? AND version = ? AND dirty = 1",
                    (entry_id, version),
                ).rowcount
        return cleared

    def _apply_rows(self, entries: Sequence[Entry]) -> tuple[int, int]:
        """
        Inside a write transaction: store each entry whose version is higher
        than the local row's (or that is new), not dirty.
        """
        for entry in entries:
            _check_entry(entry)
            if entry.vault_id != self.vault_id:
                raise ValueError("entry for another vault")
        cursor = self._connection.executemany(
            "INSERT INTO entries (entry_id, version, updated_at, deleted, data, dirty)"
            " VALUES (?, ?, ?, ?, ?, 0)"
            " ON CONFLICT (entry_id) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at, deleted = excluded.deleted,"
            " data = excluded.data, dirty = 0"
            " WHERE excluded.version > entries.version",
            [
                (e.entry_id, e.version, e.updated_at, int(e.deleted), e.data)
                for e in entries
            ],
        )
        applied = max(cursor.rowcount, 0)
        return applied, len(entries) - applied

    def apply(self, entries: Sequence[Entry]) -> tuple[int, int]:
        """
        Apply replicated entries in one transaction: each replaces the local
        row only if its version is higher, so applying the same entries
        twice changes nothing and an older version arriving late is skipped.
        Applied rows are not dirty.

        @return: (applied, skipped).
        @raise ValueError: an entry is invalid or for another vault; nothing
            is applied.
        """
        with _transaction(self._connection):
            return self._apply_rows(entries)

    def _check_source(self, source_pop: str, epoch: int) -> None:
        """
        Refuse a batch from C{source_pop} at C{epoch} into this vault: the
        vault belongs to another POP or is no replica at all (it has entries
        but no owner, so it was written here), or the epoch is older than the
        last one applied.
        """
        owner = self.get_meta("source_pop")
        if owner is None:
            if self._connection.execute("SELECT 1 FROM entries LIMIT 1").fetchone():
                raise Forbidden("vault " + self.vault_id + " is not a replica")
        elif owner != source_pop:
            raise Forbidden(
                "vault " + self.vault_id + " belongs to " + owner
                + ", not " + source_pop
            )
        recorded = self.get_meta("epoch")
        if recorded is not None and epoch < int(recorded):
            raise Conflict(
                "vault " + self.vault_id + " is at epoch " + recorded
                + ", batch has " + str(epoch)
            )

    def _apply_replica(
        self, source_pop: str, epoch: int, seq: int, entries: Sequence[Entry]
    ) -> tuple[int, int]:
        """
        In one transaction: check the source (L{_check_source}), apply the
        entries, and record the owner and the last epoch and seq applied.
        """
        with _transaction(self._connection):
            self._check_source(source_pop, epoch)
            counts = self._apply_rows(entries)
            recorded = self.get_meta("epoch")
            last_seq = self.get_meta("seq")
            if recorded is not None and int(recorded) == epoch and last_seq is not None:
                seq = max(seq, int(last_seq))
            self.set_meta("source_pop", source_pop)
            self.set_meta("epoch", str(epoch))
            self.set_meta("seq", str(seq))
        return counts

    def get_meta(self, key: str) -> str | None:
        row = self._connection.execute(
            "SELECT value FROM replication_meta WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise ValueError("meta values are text")
        self._connection.execute(
            "INSERT INTO replication_meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


# Connections a VaultStore keeps open at once (each holds three files: the
# vault, its WAL and its shared memory); past this, the least recently used
# idle one is closed.
MAX_OPEN_VAULTS = 256

# A file whose modification time is this close to now may be written again
# within the same timestamp tick, unseen: its stamp is not trusted yet.
RACY_SECONDS = 2

_Stamp = tuple[tuple[int, int, int, int] | None, ...]


def _stamp(path: str) -> _Stamp | None:
    """
    What changes whenever the vault file at C{path} is written (every
    commit goes to its WAL first, a checkpoint to the file): device, inode,
    size and modification time of both.  An empty WAL counts as none: our
    own connections create one on opening and remove it on closing, and it
    holds nothing.  C{None} if the vault file is gone.
    """
    parts = []
    for name in (path, path + "-wal"):
        try:
            status = os.stat(name)
        except FileNotFoundError:
            parts.append(None)
            continue
        if status.st_size == 0 and parts:
            parts.append(None)
            continue
        parts.append((status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))
    return None if parts[0] is None else tuple(parts)


def _settled(stamp: _Stamp) -> bool:
    """
    Whether C{stamp} is old enough to stand for the file: a write later in
    the same timestamp tick would leave the same stamp.
    """
    limit = time.time_ns() - RACY_SECONDS * 1_000_000_000
    return all(part is None or part[3] < limit for part in stamp)


class _Slot:
    """
    The one connection this process keeps to one vault file, the lock that
    keeps two pool threads off it, and the identity (device, inode) of the
    file it was opened on.

    C{clean_at} is the stamp of the files when the vault was last read with
    nothing dirty, and C{epoch_at} the stamp and epoch last read: while the
    files keep that stamp, the vault is not opened to ask again.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.vault: Vault | None = None
        self.identity: tuple[int, int] | None = None
        self.clean_at: _Stamp | None = None
        self.epoch_at: tuple[_Stamp, str | None] | None = None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class VaultStore:
    """
    The vaults of one data directory.  One L{Vault} per file per process,
    each used under its own lock; all SQLite work runs on C{threadpool}.

    The directory is listed again on every call, so vault files that appear
    are picked up; a file that was replaced or removed under an open
    connection is reopened or dropped.  A vault that cannot be read while
    scanning is logged and skipped, so one broken file does not stop the
    others from replicating.
    """

    _log = Logger()

    def __init__(
        self,
        data_dir: str,
        threadpool: ThreadPool,
        reactor,
        max_open: int = MAX_OPEN_VAULTS,
    ) -> None:
        self._data_dir = data_dir
        self._threadpool = threadpool
        self._reactor = reactor
        self._max_open = max_open
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        # Vaults with an open connection, least recently used first.
        self._open_ids: OrderedDict[str, None] = OrderedDict()
        self._broken: set[str] = set()
        self._last_start: str | None = None

    def _run(self, function: Callable[..., _T], *args) -> "Deferred[_T]":
        return deferToThreadPool(self._reactor, self._threadpool, function, *args)

    def _slot(self, vault_id: str) -> _Slot:
        with self._lock:
            return self._slots.setdefault(vault_id, _Slot())

    def _open(self, vault_id: str, slot: _Slot, create: bool) -> Vault | None:
        """
        With C{slot.lock} held: the slot's vault, opened (or reopened when
        the file on disk is no longer the one it was opened on).  C{None}
        when the file does not exist and C{create} is false.
        """
        path = vault_path(self._data_dir, vault_id)
        identity = _identity(path)
        if slot.vault is not None and identity != slot.identity:
            self._close_slot(vault_id, slot)
        if slot.vault is None:
            if identity is None and not create:
                return None
            slot.vault = Vault.open(path, create=create)
            slot.identity = identity or _identity(path)
        self._used(vault_id)
        return slot.vault

    def _close_slot(self, vault_id: str, slot: _Slot) -> None:
        """
        With C{slot.lock} held: close its connection.
        """
        slot.vault.close()
        slot.vault = None
        with self._lock:
            self._open_ids.pop(vault_id, None)

    def _used(self, vault_id: str) -> None:
        """
        C{vault_id}'s connection was just used; close the least recently
        used idle connections past C{max_open} (one in use by another
        thread, or by this one in a batch, stays open for now).
        """
        with self._lock:
            self._open_ids[vault_id] = None
            self._open_ids.move_to_end(vault_id)
            excess = len(self._open_ids) - self._max_open
            if excess <= 0:
                return
            candidates = [(v, self._slots.get(v)) for v in self._open_ids if v != vault_id]
        for other_id, other in candidates:
            if other is None:  # being closed by close()
                continue
            if excess <= 0:
                break
            if other.lock.acquire(blocking=False):
                try:
                    if other.vault is not None:
                        self._close_slot(other_id, other)
                        excess -= 1
                finally:
                    other.lock.release()

    def _read(self, vault_id: str, function: Callable[[Vault], _T]) -> _T | None:
        """
        C{function(vault)} under the vault's lock; C{None} if the file is
        gone, or if it cannot be opened or read, which is logged (once until
        it works again) and skipped.
        """
        slot = self._slot(vault_id)
        try:
            with slot.lock:
                vault = self._open(vault_id, slot, create=False)
                result = None if vault is None else function(vault)
        except (sqlite3.Error, OSError) as e:
            with self._lock:
                first = vault_id not in self._broken
                self._broken.add(vault_id)
            if first:
                self._reactor.callFromThread(
                    self._log.error,
                    "vault {vault_id} cannot be read, skipped: {error}",
                    vault_id=vault_id,
                    error=repr(e),
                )
            return None
        with self._lock:
            self._broken.discard(vault_id)
        return result

    def dirty_batch(
        self, max_entries: int, max_bytes: int, exclude: frozenset[str] = frozenset()
    ) -> "Deferred[list[Entry]]":
        """
        Up to C{max_entries} dirty entries with at most C{max_bytes} of data
        (or one larger entry alone), across vaults.  Each batch starts with
        the vault after the one the previous batch started with, so one big
        backlog cannot starve the other vaults; each vault is read with a
        limit, so the backlog stays on disk.

        The vaults in C{exclude} are not read at all (the sender holds back a
        vault the backup refuses); their entries stay dirty.
        """
        return self._run(self._dirty_batch, max_entries, max_bytes, frozenset(exclude))

    def _dirty_batch(
        self, max_entries: int, max_bytes: int, exclude: frozenset[str]
    ) -> list[Entry]:
        _check_int("max_entries", max_entries, 1, MAX_VERSION)
        _check_int("max_bytes", max_bytes, 0, MAX_VERSION)
        ids = list_vault_ids(self._data_dir)
        self._drop_missing(ids)
        with self._lock:
            last = self._last_start
        start = 0 if last is None else next((i for i, v in enumerate(ids) if v > last), 0)
        batch: list[Entry] = []
        size = 0
        first: str | None = None
        for vault_id in ids[start:] + ids[:start]:
            if len(batch) >= max_entries or (batch and size >= max_bytes):
                break
            if vault_id in exclude:
                continue
            found = self._read_unless_clean(
                vault_id,
                lambda vault: vault.dirty_entries(
                    max_entries - len(batch), max(max_bytes - size, 0)
                ),
                [],
            )
            if not found:
                continue
            added = sum(len(e.data or b"") for e in found)
            if batch and size + added > max_bytes:
                # Only the one oversized entry a vault always returns; it
                # goes first in a later batch.
                break
            first = first or vault_id
            batch.extend(found)
            size += added
        if first is not None:
            with self._lock:
                self._last_start = first
        return batch

    def _read_unless_clean(
        self, vault_id: str, function: Callable[[Vault], _T], clean: _T
    ) -> _T | None:
        """
        L{_read} of what the vault has dirty (C{function} returns C{clean}
        when nothing is), unless it was read clean and its files have not
        changed since: then C{clean} without opening it.  C{None} if the
        vault is gone or cannot be read.
        """
        slot = self._slot(vault_id)
        stamp = _stamp(vault_path(self._data_dir, vault_id))
        if stamp is None:
            return None
        if stamp == slot.clean_at:
            return clean
        # The stamp is taken before the read: a write after it changes it.
        found = self._read(vault_id, function)
        slot.clean_at = stamp if found == clean and _settled(stamp) else None
        return found

    def _drop_missing(self, ids: list[str]) -> None:
        """
        Close the connections to vault files that are no longer listed.
        """
        listed = set(ids)
        with self._lock:
            gone = [
                vault_id
                for vault_id, slot in self._slots.items()
                if vault_id not in listed and slot.vault is not None
            ]
        for vault_id in gone:
            # Opening a slot closes its connection when the file is gone.
            self._read(vault_id, lambda vault: None)

    def mark_replicated(self, entries: Sequence[Entry]) -> "Deferred[int]":
        """
        Clear C{dirty} for the entries sent, only where their version is
        still the one sent (see L{Vault.mark_replicated}).

        @return: a Deferred firing with how many entries were cleared.
        """
        return self._run(self._mark_replicated, list(entries))

    def _mark_replicated(self, entries: list[Entry]) -> int:
        cleared = 0
        for vault_id, group in by_vault(entries).items():
            pairs = [(e.entry_id, e.version) for e in group]
            cleared += self._read(vault_id, lambda vault: vault.mark_replicated(pairs)) or 0
        return cleared

    def apply_batch(
        self, source_pop: str, epoch: int, seq: int, entries: Sequence[Entry]
    ) -> "Deferred[tuple[int, int]]":
        """
        Apply a replicated batch from C{source_pop}, creating missing vault
        files.  Every entry is checked, and every touched vault checked for
        ownership (the first POP to replicate a vault owns it) and epoch,
        before anything is written; then each vault is applied in one
        transaction that checks again and records C{source_pop}, C{epoch}
        and C{seq}.

        @return: a Deferred firing with (applied, skipped), or failing with
            L{Forbidden} (another POP owns a vault, or it is no replica),
            L{Conflict} (an epoch older than a vault's) or C{ValueError}
            (an invalid entry).
        """
        return self._run(self._apply_batch, source_pop, epoch, seq, list(entries))

    def _apply_batch(
        self, source_pop: str, epoch: int, seq: int, entries: list[Entry]
    ) -> tuple[int, int]:
        if not isinstance(source_pop, str) or not source_pop:
            raise ValueError("source_pop must be a non-empty string")
        _check_int("epoch", epoch, 0, MAX_VERSION)
        _check_int("seq", seq, 0, MAX_VERSION)
        for entry in entries:
            _check_entry(entry)
        groups = by_vault(entries)
        ids = sorted(groups)
        slots = [self._slot(vault_id) for vault_id in ids]
        applied = skipped = 0
        with ExitStack() as held:
            # In id order, so two batches cannot deadlock.
            for slot in slots:
                held.enter_context(slot.lock)
            for vault_id, slot in zip(ids, slots):
                vault = self._open(vault_id, slot, create=False)
                if vault is not None:
                    vault._check_source(source_pop, epoch)
            for vault_id, slot in zip(ids, slots):
                vault = self._open(vault_id, slot, create=True)
                a, s = vault._apply_replica(source_pop, epoch, seq, groups[vault_id])
                applied += a
                skipped += s
        return applied, skipped

    def primary_epoch(self) -> "Deferred[int]":
        """
        This primary's replication epoch: the highest C{epoch} recorded in
        any vault, 1 if none has one.
        """
        return self._run(self._primary_epoch)

    def _primary_epoch(self) -> int:
        epochs = [1]
        for vault_id in list_vault_ids(self._data_dir):
            recorded = self._vault_epoch(vault_id)
            if recorded is not None:
                epochs.append(int(recorded))
        return max(epochs)

    def _vault_epoch(self, vault_id: str) -> str | None:
        """
        The epoch recorded in a vault, read again only once its files
        have changed.
        """
        slot = self._slot(vault_id)
        stamp = _stamp(vault_path(self._data_dir, vault_id))
        if stamp is not None and slot.epoch_at is not None and slot.epoch_at[0] == stamp:
            return slot.epoch_at[1]
        recorded = self._read(vault_id, lambda vault: vault.get_meta("epoch"))
        slot.epoch_at = (stamp, recorded) if stamp is not None and _settled(stamp) else None
        return recorded

    def backlog(self) -> "Deferred[dict[str, int]]":
        """
        The dirty count of every readable vault, by vault id.
        """
        return self._run(self._backlog)

    def _backlog(self) -> dict[str, int]:
        counts = {}
        for vault_id in list_vault_ids(self._data_dir):
            count = self._read_unless_clean(vault_id, Vault.count_dirty, 0)
            if count is not None:
                counts[vault_id] = count
        return counts

    def close(self) -> "Deferred[None]":
        """
        Close every connection, on the pool, each under its lock.
        """
        return self._run(self._close)

    def _close(self) -> None:
        with self._lock:
            slots = list(self._slots.items())
            self._slots.clear()
        for vault_id, slot in slots:
            with slot.lock:
                if slot.vault is not None:
                    self._close_slot(vault_id, slot)


def by_vault(entries: Iterable[Entry]) -> dict[str, list[Entry]]:
    """
    The entries grouped by vault id, in the order the vaults first appear.
    """
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry.vault_id, []).append(entry)
    return groups


def open_vault_for_writes(role: Role, data_dir: str, vault_id: str) -> Vault:
    """
    Open (creating it if needed) a vault for the vault server's own writes.
    Refused on a backup POP before any file is touched.

    @raise WriteRefused: C{role} is a backup.
    @raise ValueError: C{vault_id} is not a vault id.
    """
    require_writable(role)
    return Vault.open(vault_path(data_dir, vault_id), create=True)
