# -*- test-case-name: tests.test_audit -*-
"""
The audit log of the backup: one JSON object per line for every replication
attempt, applied or refused (DESIGN.md rules 7 and 16).

Whatever a field holds (newlines, braces, quotes, NUL, lone surrogates from
bytes decoded with C{surrogateescape}), a record is one line of printable
ASCII that any strict JSON parser reads, so data cannot forge a line.  A
record names a credential only by its fingerprint.  Authentication failures
also go to the twisted log at critical level, for alerts to key on.  The
file is reopened on SIGHUP, for logrotate.

Use it from the reactor thread only.
"""

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger, LogLevel

from clavitor_twisted.errors import ConfigError

log = Logger()

_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_SURROGATE = re.compile("[\ud800-\udfff]")

# A JSON integer beyond 64 bits is unsafe for most readers (and Python
# refuses to print the very long ones).
_INTEGER_LIMIT = 2**63

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def fingerprint(secret: bytes) -> str:
    """
    Name a credential (a certificate's DER, a token) without revealing it:
    the first 16 hex digits of its SHA-256.
    """
    return hashlib.sha256(secret).hexdigest()[:16]


@dataclass
class AuditRecord:
    """
    One replication attempt, as the receiver saw it.

    C{time} is when it began and C{duration} how long it took (seconds);
    C{backup_clock} is this POP's clock and C{request_timestamp} the one the
    request claims, to make skew visible.  C{result} is the refusal's word
    or C{"applied"}; C{reason} the private detail.  C{count} is how many
    attempts the record stands for: more than 1 only for refused
    connections counted together (see L{clavitor_twisted.guard.RefusalDigest}).
    """

    time: float
    peer: str
    claimed_pop: str | None
    proven_pop: str | None
    entries: int
    vaults: int
    bytes: int
    result: str
    status: int
    reason: str
    duration: float
    backup_clock: float
    request_timestamp: int | None
    auth_failure: bool
    fingerprint: str | None
    count: int = 1


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        # A byte that surrogateescape could not decode: show the byte.
        return "\\x%02x" % (code - 0xDC00,)
    return "\\u%04x" % (code,)


def _json_value(value: Any) -> Any:
    """
    C{value} as something C{json.dumps} writes as valid JSON, never raising.

    Lone surrogates become visible escapes (C{json} would write them as
    C{\\udcxx}, which strict parsers refuse); non-finite floats and
    integers beyond 64 bits become null; anything unexpected its repr.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _SURROGATE.sub(_escape_surrogate, value)
    if isinstance(value, int):
        return int(value) if -_INTEGER_LIMIT <= value < _INTEGER_LIMIT else None
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    return _json_value(repr(value))


def _safe_fingerprint(value: Any) -> Any:
    """
    A fingerprint as given, or a fingerprint of whatever else was given:
    if a caller passes the secret itself by mistake, it is still not
    written down.
    """
    if value is None or (isinstance(value, str) and _FINGERPRINT.fullmatch(value)):
        return value
    if not isinstance(value, bytes):
        value = str(value).encode("utf-8", "surrogatepass")
    return fingerprint(value)


def _fields(attempt: AuditRecord) -> dict[str, Any]:
    fields = {
        field.name: getattr(attempt, field.name)
        for field in dataclasses.fields(AuditRecord)
    }
    fields["fingerprint"] = _safe_fingerprint(fields["fingerprint"])
    return {name: _json_value(value) for name, value in fields.items()}


class AuditLog:
    """
    Writes each L{AuditRecord} as one line to C{path} (if not C{None}) and
    counts the results.

    The file is opened for appending and created with mode 0600 (an
    existing file keeps its mode, the operator's choice).  Each line goes
    to the kernel as it is recorded, in one C{write} unless the kernel takes
    only part, with nothing buffered in the process.  Without a file, or when a write fails, every record goes to
    the twisted log instead; authentication failures always go there too,
    at critical level.  Each line carries C{logged_at}, the clock's time
    when it was written.
    """

    def __init__(self, path: str | None, clock: IReactorTime) -> None:
        """
        @raise ConfigError: the file cannot be opened.
        """
        self._path = path
        self._clock = clock
        self._closed = False
        self._fd: int | None = None
        # A write cut short left part of a line: end it before the next.
        self._partial = False
        # Since start: records by result, failed authentications, and the
        # entries of applied batches (for status and metrics).
        self.results: collections.Counter[str] = collections.Counter()
        self.auth_failures = 0
        self.entries_applied = 0
        if path is not None:
            try:
                self._fd = os.open(path, _OPEN_FLAGS, 0o600)
            except OSError as e:
                raise ConfigError(
                    "security.audit_log: cannot open the file",
                    "cannot open audit log %r: %s" % (path, e),
                )

    def record(self, attempt: AuditRecord) -> None:
        """
        Write C{attempt} down and count it; never raises for what its
        fields hold.
        """
        fields = _fields(attempt)
        fields["logged_at"] = _json_value(self._clock.seconds())
        self.results[fields["result"]] += attempt.count
        if attempt.auth_failure:
            self.auth_failures += attempt.count
        if fields["result"] == "applied":
            self.entries_applied += attempt.entries
        written = self._fd is not None and self._write(fields)
        if attempt.auth_failure:
            self._emit(LogLevel.critical, fields)
        elif not written:
            level = LogLevel.info if fields["result"] == "applied" else LogLevel.warn
            self._emit(level, fields)

    def reopen(self) -> None:
        """
        Open the path again (logrotate has moved the file away).  If that
        fails, keep writing to the file already open and log why.
        """
        if self._path is None or self._closed:
            return
        try:
            fd = os.open(self._path, _OPEN_FLAGS, 0o600)
        except OSError as e:
            log.error(
                "audit log not reopened, still writing to the file it had: {error}",
                error=str(e),
            )
            return
        previous, self._fd = self._fd, fd
        if previous is not None:
            os.close(previous)

    def close(self) -> None:
        """
        Close the file; later records go to the twisted log only.
        """
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, fields: dict[str, Any]) -> bool:
        line = json.dumps(
            fields,
            ensure_ascii=True,
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        ).encode("ascii") + b"\n"
        prefix = b"\n" if self._partial else b""
        view = memoryview(prefix + line)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            written = len(prefix) + len(line) - len(view)
            self._partial = written > len(prefix) or (self._partial and not written)
            log.critical("audit log write failed: {error}", error=str(e))
            return False
        self._partial = False
        return True

    @staticmethod
    def _emit(level: LogLevel, fields: dict[str, Any]) -> None:
        # The fields are those of the file (cleaned, fingerprint only) and
        # reach the text through !r, so no value can start a line.  "time"
        # is renamed: legacy observers take an event's "time" as its own.
        fields = dict(fields, attempt_time=fields["time"])
        del fields["time"]
        log.emit(
            level,
            "replication attempt from {peer!r}: {result!r} ({status!r}),"
            " claimed {claimed_pop!r}, proven {proven_pop!r},"
            " credential {fingerprint!r}, {entries!r} entries: {reason!r}",
            **fields,
        )


def install_reopen_on_sighup(
    audit_log: AuditLog, reactor: IReactorFromThreads
) -> None:
    """
    Reopen C{audit_log} on SIGHUP, from the reactor thread.

    Replaces any SIGHUP handler; call it from the main thread.
    """

    def reopen_soon(signum: int, frame: object) -> None:
        reactor.callFromThread(audit_log.reopen)

    signal.signal(signal.SIGHUP, reopen_soon)
