# -*- test-case-name: tests.test_watch -*-
"""
Waking the primary's sender when the vault server writes a vault, instead
of waiting for the next scan: the data directory is watched with inotify
where the platform has it.  The scan every C{replication.scan_interval}
seconds stays, so a missed event (or no inotify at all) only delays a batch.
"""

import os
from typing import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from clavitor_twisted.vault import written_vault_id

# Writes within this many seconds of the first one wake the sender once: a
# transaction writes its WAL in several steps, and a busy vault server
# writes many entries a second.
WAKE_DELAY = 0.05

log = Logger()


class ChangeWatcher(Service):
    """
    Calls C{wake} (at most once per L{WAKE_DELAY}) after a write to, or a
    rename into C{data_dir} of, a vault file or its journal.  (Events the
    kernel's queue dropped are only found by the next scan.)
    """

    name = "watch"

    def __init__(self, data_dir: str, wake: Callable[[], None], reactor) -> None:
        self._data_dir = data_dir
        self._wake = wake
        self._reactor = reactor
        self._notifier = None
        self._pending: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        try:
            from twisted.internet import inotify
        except ImportError as error:  # not Linux
            self._scan_only(error)
            return
        try:
            notifier = inotify.INotify(self._reactor)
        except inotify.INotifyError as error:  # e.g. no instances left
            self._scan_only(error)
            return
        try:
            notifier.watch(
                FilePath(self._data_dir),
                # Every commit write()s the WAL.  Not IN_CREATE or
                # IN_CLOSE_WRITE: our own connections create an empty WAL
                # when they open and close both files when they close.
                mask=inotify.IN_MODIFY | inotify.IN_MOVED_TO,
                callbacks=[lambda _watch, path, _mask: self.file_changed(path)],
            )
        except inotify.INotifyError as error:  # e.g. no watches left
            notifier.loseConnection()
            self._scan_only(error)
            return
        notifier.startReading()
        self._notifier = notifier
        log.info("watching data_dir for vault changes (inotify)")

    @staticmethod
    def _scan_only(error: Exception) -> None:
        log.warn(
            "cannot watch data_dir for changes ({error}): scanning every"
            " replication.scan_interval seconds only",
            error=str(error) or type(error).__name__,
        )

    def stopService(self) -> None:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def file_changed(self, path: FilePath) -> None:
        """
        The file at C{path} was written or renamed into place.
        """
        if written_vault_id(os.fsdecode(path.basename())) is None:
            return
        if self._pending is None or not self._pending.active():
            self._pending = self._reactor.callLater(WAKE_DELAY, self._wake)
