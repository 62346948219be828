"""
Tests for L{clavitor_twisted.audit}.
"""

import hashlib
import json
import os
import signal
import stat
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from clavitor_twisted.audit import (
    AuditLog,
    AuditRecord,
    fingerprint,
    install_reopen_on_sighup,
)
from clavitor_twisted.errors import ConfigError
from clavitor_twisted.tokens import generate_token

START = 1_700_000_000

# Text that would forge a line, a field or a format if it got through raw.
HOSTILE = 'x\n{"result": "applied"}\r\x00"\\ {peer} %s \u2028\x1b[31m'

STR_FIELDS = ("peer", "claimed_pop", "proven_pop", "result", "reason", "fingerprint")


def attempt(**fields: Any) -> AuditRecord:
    """
    A refused attempt of an unknown peer, with C{fields} changed.
    """
    record = AuditRecord(
        time=START,
        peer="192.0.2.7",
        claimed_pop="calgary-01",
        proven_pop=None,
        entries=0,
        vaults=0,
        bytes=120,
        result="unauthenticated",
        status=401,
        reason="bad signature",
        duration=0.002,
        backup_clock=START,
        request_timestamp=START - 1,
        auth_failure=True,
        fingerprint=None,
    )
    return replace(record, **fields)


APPLIED = attempt(
    proven_pop="calgary-01",
    entries=3,
    vaults=2,
    result="applied",
    status=200,
    reason="",
    auth_failure=False,
)


def read_lines(path: str) -> list[dict[str, Any]]:
    """
    The records of an audit file, each line parsed on its own by a strict
    reader: ASCII only, no NaN, no lone surrogates.
    """

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    with open(path, "rb") as f:
        content = f.read()
    content.decode("ascii")
    records = []
    for line in content.split(b"\n")[:-1]:
        record = json.loads(line, parse_constant=refuse)
        for value in record.values():
            if isinstance(value, str):
                value.encode("utf-8")
        records.append(record)
    if content:
        assert content.endswith(b"\n")
    return records


class CollectEvents:
    """
    The events of the audit module on the global log publisher.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "clavitor_twisted.audit":
            self.events.append(event)


class AuditFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "replication.log")

    def open_log(self) -> AuditLog:
        audit = AuditLog(self.path, self.clock)
        self.addCleanup(audit.close)
        return audit

    def test_one_line_per_record(self) -> None:
        """
        Each record is one line: one JSON object with every field, sorted
        keys, and logged_at from the clock; hostile text comes back as it
        went in.
        """
        audit = self.open_log()
        audit.record(APPLIED)
        self.clock.advance(2.5)
        audit.record(attempt(peer=HOSTILE, claimed_pop=HOSTILE, reason=HOSTILE))
        first, second = read_lines(self.path)
        self.assertEqual(
            first,
            {
                "time": START,
                "peer": "192.0.2.7",
                "claimed_pop": "calgary-01",
                "proven_pop": "calgary-01",
                "entries": 3,
                "vaults": 2,
                "bytes": 120,
                "result": "applied",
                "status": 200,
                "reason": "",
                "duration": 0.002,
                "backup_clock": START,
                "request_timestamp": START - 1,
                "auth_failure": False,
                "fingerprint": None,
                "count": 1,
                "logged_at": START,
            },
        )
        self.assertEqual(second["peer"], HOSTILE)
        self.assertEqual(second["claimed_pop"], HOSTILE)
        self.assertEqual(second["reason"], HOSTILE)
        self.assertEqual(second["logged_at"], START + 2.5)
        with open(self.path, "rb") as f:
            first_line = f.readline().rstrip(b"\n")
        compact = json.dumps(first, sort_keys=True, separators=(",", ":"))
        self.assertEqual(first_line, compact.encode())

    def test_undecodable_bytes_and_surrogates(self) -> None:
        """
        Bytes decoded with surrogateescape come out as visible \\xNN, other
        lone surrogates as \\uNNNN: valid JSON that strict readers accept.
        """
        audit = self.open_log()
        escaped = b"pop\x80\xff\n".decode("utf-8", "surrogateescape")
        audit.record(attempt(claimed_pop=escaped, reason="a\ud800b\udfffc"))
        (record,) = read_lines(self.path)
        self.assertEqual(record["claimed_pop"], "pop\\x80\\xff\n")
        self.assertEqual(record["reason"], "a\\ud800b\\udfffc")

    def test_odd_numbers(self) -> None:
        """
        Non-finite floats and integers beyond 64 bits are written as null,
        a value of an unexpected type as its repr.
        """
        audit = self.open_log()
        audit.record(
            attempt(
                duration=float("nan"),
                backup_clock=float("inf"),
                request_timestamp=10**5000,
                peer=b"192.0.2.7\n",
            )
        )
        (record,) = read_lines(self.path)
        self.assertIsNone(record["duration"])
        self.assertIsNone(record["backup_clock"])
        self.assertIsNone(record["request_timestamp"])
        self.assertEqual(record["peer"], "b'192.0.2.7\\n'")

    def test_no_secret_written(self) -> None:
        """
        A credential appears only as its fingerprint, even when a caller
        passes the token itself as the fingerprint by mistake.
        """
        token = generate_token()
        self.assertEqual(fingerprint(token), hashlib.sha256(token).hexdigest()[:16])
        audit = self.open_log()
        audit.record(attempt(fingerprint=fingerprint(token)))
        audit.record(attempt(fingerprint=token.decode("ascii")))
        audit.record(attempt(fingerprint=token))
        records = read_lines(self.path)
        self.assertEqual(
            [r["fingerprint"] for r in records], [fingerprint(token)] * 3
        )
        with open(self.path, "rb") as f:
            content = f.read()
        self.assertNotIn(token, content)
        self.assertNotIn(token[:16], content)

    def test_created_0600_and_appended(self) -> None:
        """
        The file is created with mode 0600 whatever the umask, and an
        existing file is appended to, never truncated.
        """
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        audit = self.open_log()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        audit.record(APPLIED)
        audit.close()
        again = self.open_log()
        again.record(attempt())
        self.assertEqual(
            [r["result"] for r in read_lines(self.path)],
            ["applied", "unauthenticated"],
        )

    def test_reopen_after_rotation(self) -> None:
        """
        After logrotate renames the file, reopen() starts a new file (mode
        0600) and the old one keeps its lines.
        """
        audit = self.open_log()
        audit.record(APPLIED)
        audit.record(attempt())
        os.rename(self.path, self.path + ".1")
        audit.record(attempt(reason="late"))
        audit.reopen()
        audit.record(attempt(reason="new"))
        self.assertEqual(
            [r["reason"] for r in read_lines(self.path + ".1")],
            ["", "bad signature", "late"],
        )
        self.assertEqual([r["reason"] for r in read_lines(self.path)], ["new"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_reopen_failure_keeps_writing(self) -> None:
        """
        If the path cannot be opened again, the records still go to the
        file that is open, and the failure is logged.
        """
        collected = CollectEvents(self)
        audit = self.open_log()
        moved = self.directory + ".moved"
        os.rename(self.directory, moved)
        audit.reopen()
        audit.record(APPLIED)
        self.assertEqual(
            [r["result"] for r in read_lines(os.path.join(moved, "replication.log"))],
            ["applied"],
        )
        (event,) = collected.events
        self.assertEqual(event["log_level"], LogLevel.error)

    def test_close(self) -> None:
        """
        After close(), records go to the twisted log and reopen() does not
        bring the file back.
        """
        collected = CollectEvents(self)
        audit = self.open_log()
        audit.close()
        os.remove(self.path)
        audit.reopen()
        audit.record(APPLIED)
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual([e["result"] for e in collected.events], ["applied"])

    def test_unopenable(self) -> None:
        """
        A path that cannot be opened is a L{ConfigError} naming the key,
        with the path only in the detail.
        """
        path = os.path.join(self.directory, "missing", "replication.log")
        error = self.assertRaises(ConfigError, AuditLog, path, self.clock)
        self.assertIn("security.audit_log", error.public)
        self.assertNotIn(self.directory, error.public)
        self.assertIn(path, error.detail)

    def test_write_failure(self) -> None:
        """
        A write that fails (a full disk) is logged at critical level, and
        the record goes to the twisted log instead of being lost.
        """
        if not os.path.exists("/dev/full"):
            raise self.skipTest("needs /dev/full")
        collected = CollectEvents(self)
        audit = AuditLog("/dev/full", self.clock)
        self.addCleanup(audit.close)
        audit.record(APPLIED)
        failed, lost = collected.events
        self.assertEqual(failed["log_level"], LogLevel.critical)
        self.assertIn("write failed", failed["log_format"])
        self.assertEqual(lost["log_level"], LogLevel.info)
        self.assertEqual(lost["result"], "applied")


class AuditTwistedLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.collected = CollectEvents(self)

    def test_auth_failure_critical(self) -> None:
        """
        An authentication failure goes to the twisted log at critical
        level, its data in fields only: no format contains it and the
        rendered text stays on one line.  Other records, already in the
        file, do not.
        """
        path = self.mktemp()
        audit = AuditLog(path, self.clock)
        self.addCleanup(audit.close)
        token = generate_token()
        audit.record(APPLIED)
        audit.record(attempt(result="forbidden", status=403, auth_failure=False))
        audit.record(
            attempt(
                peer=HOSTILE,
                claimed_pop=HOSTILE,
                reason=HOSTILE + "\udc80",
                fingerprint=token.decode("ascii"),
            )
        )
        (event,) = self.collected.events
        self.assertEqual(event["log_level"], LogLevel.critical)
        self.assertTrue(event["auth_failure"])
        self.assertEqual(event["claimed_pop"], HOSTILE)
        self.assertEqual(event["fingerprint"], fingerprint(token))
        self.assertEqual(event["attempt_time"], START)
        # A legacy observer may set "time" to the event's own time.
        self.assertEqual(event.get("time", event["log_time"]), event["log_time"])
        text = formatEvent(event)
        self.assertNotIn("\n", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\u2028", text)
        self.assertNotIn(token.decode("ascii"), text)
        self.assertIn("unauthenticated", text)
        for piece in ("x\n", "{peer} %s", "calgary", "192.0.2"):
            self.assertNotIn(piece, event["log_format"])

    def test_without_file(self) -> None:
        """
        Without a file every record goes to the twisted log: applied at
        info, refused at warn, failed authentication at critical.
        """
        audit = AuditLog(None, self.clock)
        audit.record(APPLIED)
        audit.record(attempt(result="forbidden", status=403, auth_failure=False))
        audit.record(attempt())
        self.assertEqual(
            [e["log_level"] for e in self.collected.events],
            [LogLevel.info, LogLevel.warn, LogLevel.critical],
        )
        audit.reopen()
        audit.close()

    def test_counts(self) -> None:
        """
        Records are counted by result, authentication failures on their
        own as well, and the entries of applied batches.
        """
        audit = AuditLog(None, self.clock)
        forbidden = attempt(result="forbidden", status=403, auth_failure=False)
        for record in (APPLIED, APPLIED, attempt(), forbidden):
            audit.record(record)
        self.assertEqual(audit.results, {"applied": 2, "unauthenticated": 1, "forbidden": 1})
        self.assertEqual(audit.auth_failures, 1)
        self.assertEqual(audit.entries_applied, 2 * APPLIED.entries)


# Any text, lone surrogates included (hypothesis leaves them out of text()).
any_text = st.lists(
    st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr))
).map("".join)
escaped_bytes = st.binary().map(lambda b: b.decode("utf-8", "surrogateescape"))
hostile_text = st.one_of(any_text, escaped_bytes, st.just(HOSTILE))


class AuditPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.audit = AuditLog(self.path, Clock())
        self.addCleanup(self.audit.close)
        self.lines = 0

    @settings(max_examples=300, deadline=None)
    @given(
        st.fixed_dictionaries({name: hostile_text for name in STR_FIELDS}),
        st.floats(),
        st.integers(),
        st.booleans(),
    )
    def test_always_one_parseable_line(self, texts, number, integer, failed) -> None:
        """
        Whatever the str fields hold, and whatever the numbers, a record
        adds exactly one line that a strict reader parses; text without
        lone surrogates comes back unchanged.
        """
        self.audit.record(
            attempt(
                duration=number,
                request_timestamp=integer,
                auth_failure=failed,
                **texts,
            )
        )
        self.lines += 1
        records = read_lines(self.path)
        self.assertEqual(len(records), self.lines)
        record = records[-1]
        for name in ("peer", "claimed_pop", "proven_pop", "result", "reason"):
            value = texts[name]
            if not any(0xD800 <= ord(c) <= 0xDFFF for c in value):
                self.assertEqual(record[name], value)
        self.assertRegex(record["fingerprint"], r"\A[0-9a-f]{16}\Z")


class ObservedAuditLog(AuditLog):
    """
    An audit log that tells when it has been reopened.
    """

    def __init__(self, path: str, clock: Clock) -> None:
        super().__init__(path, clock)
        self.reopened: Deferred[None] = Deferred()

    def reopen(self) -> None:
        super().reopen()
        self.reopened.callback(None)


class SighupTests(TestCase):
    timeout = 30

    def test_sighup_reopens(self) -> None:
        """
        SIGHUP to this process makes the reactor reopen the audit log.
        """
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        path = self.mktemp()
        audit = ObservedAuditLog(path, Clock())
        self.addCleanup(audit.close)
        install_reopen_on_sighup(audit, reactor)
        audit.record(APPLIED)
        os.rename(path, path + ".1")
        os.kill(os.getpid(), signal.SIGHUP)

        def reopened(_: None) -> None:
            audit.record(attempt())
            self.assertEqual(
                [r["result"] for r in read_lines(path + ".1")], ["applied"]
            )
            self.assertEqual(
                [r["result"] for r in read_lines(path)], ["unauthenticated"]
            )

        return audit.reopened.addCallback(reopened)
