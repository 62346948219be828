"""
Tests for L{clavitor_twisted.sender}: the backoff ladder and the drain state
machine driven by L{Clock} against an in-memory store and a scripted
backup, holding back a vault the backup refuses, the lost-update guard and
a refused vault against the real L{VaultStore}, and L{HttpsPoster} over
real loopback TLS.
"""

import json
import os
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from clavitor_twisted import pki, protocol, tls
from clavitor_twisted.config import (
    AuthConfig,
    BackupPop,
    Config,
    ReplicationConfig,
    SecurityConfig,
)
from clavitor_twisted.errors import ConfigError, Malformed
from clavitor_twisted.role import Role
from clavitor_twisted.sender import (
    BACKOFF_SECONDS,
    MAX_ANSWER_BYTES,
    Answer,
    Backoff,
    Sender,
    make_sender,
)
from clavitor_twisted.tokens import TokenSet, generate_token
from clavitor_twisted.vault import Entry, Vault, VaultStore, vault_path

VAULT = "0123456789abcdef"
OTHER_VAULT = "fedcba9876543210"
MiB = 1024 * 1024
PRIMARY = "calgary-01"
BACKUP = "zurich-01"


def make_config(
    method="mtls", url="https://zurich-01.example:8443", pki_dir="/etc/clavitor", **replication
):
    """
    A primary's config sending to L{BACKUP} at C{url}.
    """
    host, port = url[len("https://") :].rsplit(":", 1)
    return Config(
        pop_id=PRIMARY,
        region="north-america",
        role=Role.PRIMARY,
        data_dir="/var/lib/clavitor",
        auth=AuthConfig(
            method=method,
            mtls_cert=os.path.join(pki_dir, PRIMARY + ".crt"),
            mtls_key=os.path.join(pki_dir, PRIMARY + ".key"),
            mtls_ca=os.path.join(pki_dir, "ca.crt"),
            token_file="/etc/clavitor/token" if method == "bearer" else None,
        ),
        replication=ReplicationConfig(**replication),
        security=SecurityConfig(),
        backup_pop=BackupPop(BACKUP, url, host, int(port)),
        listen=None,
        authorized_pops=(),
    )


class MemoryStore:
    """
    An in-memory store with the vault contract's version guard.
    """

    def __init__(self):
        self.rows = {}
        self.dirty = set()
        self.epoch = 1
        self.excluded = []

    def write(self, vault_id, entry_id, data=b"secret"):
        key = (vault_id, entry_id)
        old = self.rows.get(key)
        version = 1 if old is None else old.version + 1
        self.rows[key] = Entry(vault_id, entry_id, version, 1000 * version, False, data)
        self.dirty.add(key)

    def fill(self, count):
        for n in range(count):
            self.write(VAULT, "entry-{:05d}".format(n))

    def dirty_batch(self, max_entries, max_bytes, exclude=frozenset()):
        self.excluded.append(exclude)
        keys = sorted(key for key in self.dirty if key[0] not in exclude)
        return succeed([self.rows[key] for key in keys[:max_entries]])

    def dirty_in(self, vault_id):
        return {key for key in self.dirty if key[0] == vault_id}

    def mark_replicated(self, entries):
        cleared = 0
        for entry in entries:
            key = (entry.vault_id, entry.entry_id)
            if key in self.dirty and self.rows[key].version == entry.version:
                self.dirty.discard(key)
                cleared += 1
        return succeed(cleared)

    epoch_reads = 0

    def primary_epoch(self):
        self.epoch_reads += 1
        return succeed(self.epoch)


class ScriptedBackup:
    """
    A poster whose answers come from C{answer(batch)} (an L{Answer} or a
    L{Deferred}); it records every request.  A body the backup's parser
    refuses (an entry over C{max_entry_bytes}) gets the backup's 400.
    """

    def __init__(self, answer, max_entry_bytes=MiB):
        self.answer = answer
        self.max_entry_bytes = max_entry_bytes
        self.requests = []
        self.closed = False

    def __call__(self, body, headers):
        try:
            batch = protocol.parse_batch(body, self.max_entry_bytes)
        except Malformed:
            self.requests.append((body, headers, None))
            return succeed(Answer(400, Headers(), b'{"error": "malformed"}'))
        self.requests.append((body, headers, batch))
        return maybeDeferred(self.answer, batch)

    def vaults(self):
        """
        The set of vault ids each request carried, in order.
        """
        return [
            {entry["vault_id"] for entry in json.loads(body)["entries"]}
            for body, _, _ in self.requests
        ]

    def close(self):
        self.closed = True
        return succeed(None)

    def batches(self):
        return [batch for _, _, batch in self.requests]


def accepted(batch, pop_id=BACKUP, role="backup", **changes):
    document = {
        "applied": len(batch.entries),
        "skipped": 0,
        "seq": batch.seq,
        "pop_id": pop_id,
        "role": role,
    }
    document.update(changes)
    return Answer(200, Headers(), json.dumps(document).encode("utf-8"))


def answering(code, body=b'{"error": "unavailable"}', **headers):
    raw = Headers({name.replace("_", "-").encode(): [value] for name, value in headers.items()})
    return lambda batch: Answer(code, raw, body)


class Held:
    """
    An answer the test gives later: each request gets a pending Deferred.
    """

    def __init__(self):
        self.pending = []
        self.cancelled = []

    def __call__(self, batch):
        d = Deferred(lambda d: self.cancelled.append(batch))
        self.pending.append((batch, d))
        return d

    def accept(self):
        batch, d = self.pending.pop(0)
        d.callback(accepted(batch))


class StaticTokens:
    def __init__(self):
        self.set = TokenSet(generate_token())

    def tokens(self):
        return self.set


_ca_key, _ca_cert = pki.make_ca()
_key, _cert = pki.make_pop_certificate(_ca_key, _ca_cert, PRIMARY)
SIGNER = protocol.CertificateSigner(_key)


class BackoffTests(SynchronousTestCase):
    def test_ladder(self):
        """
        The n-th failure in a row waits the n-th step; the last repeats.
        """
        backoff = Backoff(max_retries=5)
        delays = [backoff.failure() for _ in range(8)]
        self.assertEqual(delays, [1, 5, 25, 125, 625, 625, 625, 625])
        self.assertTrue(all(type(delay) is int for delay in delays))
        self.assertEqual(backoff.failures, 8)
        self.assertEqual(BACKOFF_SECONDS, (1, 5, 25, 125, 625))

    def test_success_resets(self):
        backoff = Backoff(max_retries=5)
        backoff.failure()
        backoff.failure()
        backoff.success()
        self.assertEqual(backoff.failures, 0)
        self.assertEqual(backoff.failure(), 1)

    def test_exhausted_waits_last_step(self):
        """
        From the C{max_retries}-th failure on, the wait is the last step.
        """
        backoff = Backoff(max_retries=2)
        self.assertEqual(backoff.failure(), 1)
        self.assertFalse(backoff.exhausted)
        self.assertEqual(backoff.failure(), 625)
        self.assertTrue(backoff.exhausted)
        self.assertEqual(backoff.failure(), 625)


class _SenderCase(SynchronousTestCase):
    """
    A L{Sender} on a L{Clock} against a L{MemoryStore} and a
    L{ScriptedBackup}, its log events collected.
    """

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.events = []

    def make(self, answer, config=None, token_source=None, signer=SIGNER):
        self.backup = ScriptedBackup(answer)
        sender = Sender(
            config or make_config(), self.store, self.backup, signer, self.clock, token_source
        )
        sender.log = Logger(observer=self.events.append)
        return sender

    def posts(self):
        return len(self.backup.requests)

    def levels(self):
        return [event["log_level"] for event in self.events]

    def assertWaits(self, delay):
        """
        The next post comes exactly C{delay} seconds from now.
        """
        before = self.posts()
        self.clock.advance(delay - 1)
        self.assertEqual(self.posts(), before)
        self.clock.advance(1)
        self.assertEqual(self.posts(), before + 1)


class SenderTests(_SenderCase):
    def test_eight_failures(self):
        """
        Eight failures in a row wait 1, 5, 25, 125, 625, 625, 625, 625 s, and
        the scan ticks in between send nothing.
        """
        self.store.write(VAULT, "e1")
        sender = self.make(answering(503))
        sender.start()
        self.assertEqual(self.posts(), 1)
        for delay in (1, 5, 25, 125, 625, 625, 625, 625):
            self.assertWaits(delay)
        self.assertEqual(self.store.dirty, {(VAULT, "e1")})

    def test_success_resets_ladder(self):
        results = [answering(500), answering(500), accepted, answering(500), accepted]
        self.store.write(VAULT, "e1")
        sender = self.make(lambda batch: results.pop(0)(batch))
        sender.start()
        self.assertWaits(1)
        self.assertWaits(5)
        self.assertEqual(self.store.dirty, set())
        self.store.write(VAULT, "e2")
        sender.wake()
        self.assertEqual(self.posts(), 4)
        self.assertWaits(1)
        self.assertEqual(self.store.dirty, set())

    def test_error_after_max_retries(self):
        """
        After C{max_retries} failures in a row an error is logged, the
        entries stay dirty and retries go on; a later success sends them.
        """
        self.store.write(VAULT, "e1")
        answers = [answering(502)] * 7 + [accepted]
        sender = self.make(lambda batch: answers.pop(0)(batch), make_config(max_retries=3))
        sender.start()
        self.assertEqual(self.levels(), [LogLevel.warn])
        self.assertWaits(1)
        self.assertWaits(5)
        self.assertEqual(self.levels(), [LogLevel.warn, LogLevel.warn, LogLevel.error])
        error = self.events[-1]
        self.assertEqual((error["failures"], error["reason"], error["delay"]), (3, "refused", 625))
        for _ in range(4):
            self.assertWaits(625)
        self.assertEqual(self.levels()[3:], [LogLevel.error] * 4)
        self.assertEqual(self.store.dirty, {(VAULT, "e1")})
        self.assertWaits(625)
        self.assertEqual(self.store.dirty, set())
        self.assertEqual(self.levels()[-1], LogLevel.info)

    def test_retry_after(self):
        """
        A 429 waits its C{Retry-After} (at least 1, at most 3600 s); any
        other value falls back to the ladder.
        """
        cases = [(b"soon", 1), (b"Fri, 31 Dec 1999 23:59:59 GMT", 5), (b"-5", 25),
                 (b"1e3", 125), (b"30", 30), (b" 7 ", 7), (b"99999", 3600), (b"0", 1)]
        answers = [answering(429, retry_after=value) for value, _ in cases]
        self.store.write(VAULT, "e1")
        self.make(lambda batch: answers.pop(0)(batch), make_config(max_retries=100)).start()
        for _, delay in cases:
            self.assertWaits(delay)
        self.assertEqual(self.store.dirty, {(VAULT, "e1")})

    def test_unavailable_retry_after(self):
        """
        A 503 with Retry-After (a backup in its restart window) waits that
        long; without one, the ladder.
        """
        answers = [answering(503, retry_after=b"31"), answering(503), accepted]
        self.store.write(VAULT, "e1")
        self.make(lambda batch: answers.pop(0)(batch)).start()
        self.assertWaits(31)
        self.assertWaits(5)
        self.assertEqual(self.store.dirty, set())

    def test_two_retry_after_headers(self):
        self.store.write(VAULT, "e1")
        self.make(lambda batch: Answer(429, Headers({b"retry-after": [b"30", b"40"]}), b"")).start()
        self.assertWaits(1)

    def test_backlog_back_to_back(self):
        """
        One tick drains a 1,000-entry backlog in ten batches of 100.
        """
        self.store.fill(1000)
        self.make(accepted, make_config(batch_size=100)).start()
        self.assertEqual(self.posts(), 10)
        batches = self.backup.batches()
        self.assertEqual([len(batch.entries) for batch in batches], [100] * 10)
        self.assertEqual([batch.seq for batch in batches], list(range(1, 11)))
        self.assertEqual(self.store.dirty, set())
        sent = [entry.entry_id for batch in batches for entry in batch.entries]
        self.assertEqual(len(set(sent)), 1000)
        # The epoch (a read of every vault) is read once per drain.
        self.assertEqual(self.store.epoch_reads, 1)

    def test_batch_contents(self):
        """
        A batch carries our pop id, the backup's, the store's epoch, and the
        entries as stored, tombstones included.
        """
        self.store.epoch = 7
        self.store.write(VAULT, "e1", b"\x00\xff")
        self.store.rows[(OTHER_VAULT, "gone")] = Entry(OTHER_VAULT, "gone", 3, 5, True, None)
        self.store.dirty.add((OTHER_VAULT, "gone"))
        self.clock.advance(1_700_000_000)
        self.make(accepted).start()
        (body, headers, batch), = self.backup.requests
        self.assertEqual(
            (batch.source_pop, batch.target_pop, batch.epoch, batch.seq, batch.timestamp),
            (PRIMARY, BACKUP, 7, 1, 1_700_000_000),
        )
        self.assertEqual(set(batch.entries), set(self.store.rows.values()))
        self.assertEqual(headers[b"Content-Type"], b"application/json")
        self.assertNotIn(b"Authorization", headers)

    def test_each_attempt_signed_afresh(self):
        """
        A retry is a new batch: new nonce, current timestamp, next seq, and a
        signature over its own body.
        """
        answers = [answering(503), accepted]
        self.store.write(VAULT, "e1")
        self.make(lambda batch: answers.pop(0)(batch)).start()
        self.assertWaits(1)
        (body1, headers1, first), (body2, headers2, second) = self.backup.requests
        self.assertNotEqual(first.nonce, second.nonce)
        self.assertEqual((first.timestamp, second.timestamp), (0, 1))
        self.assertEqual((first.seq, second.seq), (1, 2))
        self.assertEqual(first.entries, second.entries)
        for body, headers in ((body1, headers1), (body2, headers2)):
            protocol.verify_certificate_signature(
                headers[protocol.SIGNATURE_HEADER], body, _cert.public_key()
            )
        self.assertNotEqual(
            headers1[protocol.SIGNATURE_HEADER], headers2[protocol.SIGNATURE_HEADER]
        )

    def test_bearer(self):
        """
        In bearer mode each attempt carries the current token and is signed
        with it; a rotated token is used from the next attempt on, and no
        token reaches the log.
        """
        tokens = StaticTokens()
        first_token = tokens.set.current
        answers = [answering(401), accepted]
        self.store.write(VAULT, "e1")
        sender = self.make(
            lambda batch: answers.pop(0)(batch),
            make_config(method="bearer"),
            token_source=tokens,
            signer=protocol.HmacSigner(tokens),
        )
        sender.start()
        tokens.set = TokenSet(generate_token(), first_token)
        self.assertWaits(1)
        (body1, headers1, _), (body2, headers2, _) = self.backup.requests
        self.assertEqual(headers1[b"Authorization"], b"Bearer " + first_token)
        self.assertEqual(headers2[b"Authorization"], b"Bearer " + tokens.set.current)
        protocol.verify_hmac_signature(
            headers1[protocol.SIGNATURE_HEADER], body1, TokenSet(first_token)
        )
        protocol.verify_hmac_signature(
            headers2[protocol.SIGNATURE_HEADER], body2, TokenSet(tokens.set.current)
        )
        logged = repr(self.events) + "".join(formatEvent(event) for event in self.events)
        for token in tokens.set.all():
            self.assertNotIn(token.decode(), logged)

    def test_bearer_needs_token_source(self):
        self.assertRaises(
            ValueError,
            Sender, make_config(method="bearer"), self.store, ScriptedBackup(accepted),
            SIGNER, self.clock,
        )

    def test_backup_never_sends(self):
        config = replace(make_config(), role=Role.BACKUP)
        self.assertRaises(
            ConfigError, Sender, config, self.store, ScriptedBackup(accepted), SIGNER, self.clock
        )

    def test_nothing_marked_without_valid_200(self):
        """
        Non-200 answers and 200s that are malformed, for another seq, or from
        anything but the configured backup leave every entry dirty.
        """
        bad = [
            ("refused", answering(401)),
            ("refused", answering(502)),
            ("refused", answering(201)),
            ("wrong_backup", lambda batch: accepted(batch, pop_id="geneva-01")),
            ("wrong_backup", lambda batch: accepted(batch, role="primary")),
            ("wrong_backup", lambda batch: accepted(batch, pop_id=None)),
            ("bad_answer", answering(200, b"not json")),
            ("bad_answer", answering(200, b"[" * 60000 + b"]" * 60000)),
            ("bad_answer", answering(200, b"\xff\xfe")),
            ("bad_answer", answering(200, b'["zurich-01"]')),
            ("bad_answer", lambda batch: accepted(batch, seq=batch.seq + 1)),
            ("bad_answer", lambda batch: accepted(batch, applied=True)),
            ("bad_answer", lambda batch: accepted(batch, skipped=-1)),
            ("bad_answer", lambda batch: accepted(batch, applied="3")),
        ]
        self.store.write(VAULT, "e1")
        self.store.write(OTHER_VAULT, "e2")
        answers = [answer for _, answer in bad]
        self.make(lambda batch: answers.pop(0)(batch), make_config(max_retries=100)).start()
        for delay in BACKOFF_SECONDS + (625,) * (len(bad) - len(BACKOFF_SECONDS) - 1):
            self.assertWaits(delay)
        self.assertEqual(self.posts(), len(bad))
        self.assertEqual(self.store.dirty, {(VAULT, "e1"), (OTHER_VAULT, "e2")})
        self.assertEqual([event["reason"] for event in self.events], [r for r, _ in bad])
        for event in self.events:
            expected = LogLevel.critical if event["reason"] == "wrong_backup" else LogLevel.warn
            self.assertEqual(event["log_level"], expected)

    def test_timeout_cancels_hung_post(self):
        """
        A post with no answer after C{request_timeout} is cancelled, logged
        as a timeout and retried on the ladder.
        """
        held = Held()
        self.store.write(VAULT, "e1")
        self.make(held, make_config(request_timeout=30)).start()
        self.clock.advance(29)
        self.assertEqual(held.cancelled, [])
        self.clock.advance(1)
        self.assertEqual(len(held.cancelled), 1)
        self.assertEqual(self.events[-1]["reason"], "timeout")
        self.assertWaits(1)
        self.assertEqual(self.store.dirty, {(VAULT, "e1")})

    def test_tick_during_drain(self):
        """
        Scan ticks while a batch is in flight start nothing.
        """
        held = Held()
        self.store.write(VAULT, "e1")
        self.make(held, make_config(scan_interval=5, request_timeout=60)).start()
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(self.posts(), 1)
        held.accept()
        self.assertEqual(self.store.dirty, set())

    def test_wake_during_scan_rescans(self):
        """
        A wake that arrives while the store is being scanned makes the drain
        scan again instead of ending on a stale empty answer.
        """
        scans = []
        self.store.dirty_batch = lambda n, size, exclude: scans.append(Deferred()) or scans[-1]
        sender = self.make(accepted)
        done = sender.drain()
        sender.wake()
        scans[0].callback([])
        self.assertEqual(len(scans), 2)
        self.assertNoResult(done)
        scans[1].callback([])
        self.assertIsNone(self.successResultOf(done))

    def test_store_failure_backs_off(self):
        """
        A store that fails is retried on the ladder; drain() still succeeds.
        """
        calls = []

        def broken(n, size, exclude):
            calls.append(n)
            return maybeDeferred(lambda: 1 / 0)

        self.store.dirty_batch = broken
        sender = self.make(accepted)
        self.assertIsNone(self.successResultOf(sender.drain()))
        self.assertEqual(self.events[-1]["reason"], "store")
        self.clock.advance(1)
        self.assertEqual(len(calls), 2)

    def test_wake_during_backoff(self):
        self.store.write(VAULT, "e1")
        sender = self.make(answering(503))
        sender.start()
        sender.wake()
        self.assertIsNone(self.successResultOf(sender.drain()))
        self.assertEqual(self.posts(), 1)

    def test_stop_waits_for_batch_in_flight(self):
        """
        stop() fires only after the batch in flight has been answered (and
        marked); no batch starts after it, though a backlog remains.
        """
        held = Held()
        self.store.fill(150)
        sender = self.make(held, make_config(batch_size=100))
        sender.start()
        stopped = sender.stop()
        self.assertNoResult(stopped)
        self.assertFalse(self.backup.closed)
        held.accept()
        self.successResultOf(stopped)
        self.assertTrue(self.backup.closed)
        self.assertEqual(self.posts(), 1)
        self.assertEqual(len(self.store.dirty), 50)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        sender.wake()
        self.assertEqual(self.posts(), 1)

    def test_stop_during_failure(self):
        """
        A batch that fails after stop() schedules no retry.
        """
        held = Held()
        self.store.write(VAULT, "e1")
        sender = self.make(held)
        sender.start()
        stopped = sender.stop()
        batch, d = held.pending.pop()
        d.callback(answering(503)(batch))
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_backoff(self):
        self.store.write(VAULT, "e1")
        sender = self.make(answering(503))
        sender.start()
        self.successResultOf(sender.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10_000)
        self.assertEqual(self.posts(), 1)


def refusal(code):
    return Answer(code, Headers(), b'{"error": "refused"}')


class Poisoned:
    """
    A backup that refuses (with C{code}) any batch holding an entry of a
    vault in C{poisoned}, and accepts the others.
    """

    def __init__(self, *vault_ids, code=400):
        self.poisoned = set(vault_ids)
        self.code = code

    def __call__(self, batch):
        if self.poisoned & {entry.vault_id for entry in batch.entries}:
            return refusal(self.code)
        return accepted(batch)


class HeldVaultTests(_SenderCase):
    """
    A refusal about a batch's content (400, 403, 409, 413) stops only the
    vault it is about; every other failure keeps the global ladder.
    """

    def held_back(self):
        return [event for event in self.events if "held back" in event["log_format"]]

    def test_poisoned_vault_isolated(self):
        """
        A refused batch mixing vaults is sent again one vault per batch, each
        signed afresh; the refused vault is held back (logged at error with
        its id) and the other vault drains fully within the same tick in
        batches that leave the refused one out.
        """
        for n in range(3):
            self.store.write(VAULT, "a%d" % n)
        for n in range(250):
            self.store.write(OTHER_VAULT, "b%03d" % n)
        self.make(Poisoned(VAULT), make_config(batch_size=100)).start()
        self.assertEqual(
            self.backup.vaults(),
            [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}, {OTHER_VAULT}, {OTHER_VAULT}],
        )
        batches = self.backup.batches()
        self.assertEqual([len(batch.entries) for batch in batches], [100, 3, 97, 100, 53])
        self.assertEqual(set(batches[1].entries) | set(batches[2].entries), set(batches[0].entries))
        self.assertEqual([batch.seq for batch in batches], [1, 2, 3, 4, 5])
        self.assertEqual(len({batch.nonce for batch in batches}), 5)
        self.assertEqual(self.store.dirty_in(OTHER_VAULT), set())
        self.assertEqual(len(self.store.dirty_in(VAULT)), 3)
        self.assertEqual(self.store.excluded, [frozenset()] + [frozenset({VAULT})] * 3)
        (error,) = [event for event in self.events if event["log_level"] == LogLevel.error]
        self.assertEqual((error["vault_id"], error["status"], error["delay"]), (VAULT, 400, 1))
        self.assertEqual(
            formatEvent(error),
            "vault {} held back: backup answered 400; its entries stay dirty;"
            " retry in 1 s".format(VAULT),
        )
        self.assertEqual(self.levels().count(LogLevel.warn), 1)
        self.assertFalse(any("reason" in event for event in self.events))

    def test_own_ladder_then_drains(self):
        """
        A held-back vault is retried alone after 1, 5, 25, 125, 625, 625 s
        (the scan ticks between send nothing) while the other vault keeps
        replicating; once the backup accepts it, it drains and is no longer
        left out.
        """
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")
        backup = Poisoned(VAULT)
        sender = self.make(backup, make_config(scan_interval=5))
        sender.start()
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}])
        for step, delay in enumerate((1, 5, 25, 125, 625, 625)):
            self.assertWaits(delay)
            self.assertEqual(self.backup.vaults()[-1], {VAULT})
            self.store.write(OTHER_VAULT, "later-%d" % step)
            sender.wake()
            self.assertEqual(self.backup.vaults()[-1], {OTHER_VAULT})
            self.assertEqual(self.store.dirty_in(OTHER_VAULT), set())
        self.assertEqual(
            [(event["vault_id"], event["delay"]) for event in self.held_back()],
            [(VAULT, delay) for delay in (1, 5, 25, 125, 625, 625, 625)],
        )
        self.assertEqual(self.store.dirty_in(VAULT), {(VAULT, "a1")})
        backup.poisoned.clear()
        self.assertWaits(625)
        self.assertEqual(self.backup.vaults()[-1], {VAULT})
        self.assertEqual(self.store.dirty, set())
        self.assertEqual(
            (self.events[-1]["log_level"], self.events[-1]["vault_id"]), (LogLevel.info, VAULT)
        )
        self.assertEqual(self.store.excluded[-1], frozenset())
        self.store.write(VAULT, "a2")
        self.store.write(OTHER_VAULT, "b2")
        sender.wake()
        self.assertEqual(self.backup.vaults()[-1], {VAULT, OTHER_VAULT})
        self.assertEqual(self.store.dirty, set())

    def test_global_ladder_not_advanced(self):
        """
        Content refusals leave the global ladder alone: the first 502 after
        two of them is failure 1 and waits 1 s.
        """
        self.store.write(VAULT, "a1")
        sender = self.make(Poisoned(VAULT))
        sender.start()
        self.assertWaits(1)
        self.assertEqual(len(self.held_back()), 2)
        self.backup.answer = answering(502)
        self.store.write(OTHER_VAULT, "b1")
        sender.wake()
        self.assertEqual(self.backup.vaults()[-1], {OTHER_VAULT})
        failure = self.events[-1]
        self.assertEqual((failure["reason"], failure["failures"], failure["delay"]), ("refused", 1, 1))
        self.assertWaits(1)
        self.assertEqual(self.events[-1]["failures"], 2)

    def test_single_vault_refusal_holds_at_once(self):
        """
        A batch of one vault refused with 400, 403 or 409 holds that vault
        back at once, with no split; nothing of it is marked.
        """
        for code in (400, 403, 409):
            self.clock, self.store, self.events = Clock(), MemoryStore(), []
            self.store.write(VAULT, "a1")
            self.store.write(VAULT, "a2")
            sender = self.make(answering(code))
            sender.start()
            self.assertEqual(self.backup.vaults(), [{VAULT}])
            (event,) = self.events
            self.assertEqual(
                (event["log_level"], event["vault_id"], event["status"], event["delay"]),
                (LogLevel.error, VAULT, code, 1),
            )
            self.assertWaits(1)
            self.assertWaits(5)
            self.assertEqual(self.store.dirty, {(VAULT, "a1"), (VAULT, "a2")})
            self.successResultOf(sender.stop())

    def test_too_large_for_the_backup_sent_in_halves(self):
        """
        One vault's batch refused with 413 (the backup's cap is below
        max_batch_bytes) is sent again in halves, and halves of those, until
        each part fits: everything drains, nothing is held back, and the
        operator is told to fix the sizes.
        """
        for n in range(5):
            self.store.write(VAULT, "a%d" % n)

        def answer(batch):
            if len(batch.entries) > 2:
                return refusal(413)
            return accepted(batch)

        self.make(answer).start()
        self.assertEqual(
            [len(batch.entries) for batch in self.backup.batches()], [5, 2, 3, 1, 2]
        )
        self.assertEqual(self.store.dirty, set())
        self.assertEqual(self.held_back(), [])
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["count"] for e in warnings], [5, 3])
        self.assertIn("max_batch_bytes", formatEvent(warnings[0]))

    def test_single_entry_too_large_held_back(self):
        """
        One entry the backup refuses as too large holds its vault back (its
        neighbours in the batch still go), and is never split further.
        """
        self.store.write(VAULT, "a0")
        self.store.write(VAULT, "big")
        self.store.write(VAULT, "a2")

        def answer(batch):
            if any(entry.entry_id == "big" for entry in batch.entries):
                return refusal(413)
            return accepted(batch)

        self.make(answer).start()
        self.assertEqual(
            [[e.entry_id for e in batch.entries] for batch in self.backup.batches()],
            [["a0", "a2", "big"], ["a0"], ["a2", "big"], ["a2"], ["big"]],
        )
        self.assertEqual(self.store.dirty, {(VAULT, "big")})
        [held] = self.held_back()
        self.assertEqual((held["vault_id"], held["status"], held["entries"]), (VAULT, 413, 1))

    def test_split_batch_accepted(self):
        """
        A mixed batch refused as a whole (413: too large together) whose
        vaults are accepted alone holds nothing back.
        """
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")

        def answer(batch):
            if len({entry.vault_id for entry in batch.entries}) > 1:
                return refusal(413)
            return accepted(batch)

        self.make(answer).start()
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}])
        self.assertEqual(self.store.dirty, set())
        self.assertEqual(self.held_back(), [])
        self.assertEqual(self.store.excluded[-1], frozenset())

    def test_other_failures_keep_global_ladder(self):
        """
        401, a 5xx but 500, connection failures, a wrong backup and 429 are
        not about the content: the mixed batch is never split, no vault is
        held back, and the waits follow the global ladder.
        """
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")
        answers = [
            answering(401),
            answering(502),
            answering(503),
            lambda batch: fail(ConnectionRefusedError()),
            lambda batch: accepted(batch, pop_id="geneva-01"),
            answering(429),
            accepted,
        ]
        self.make(lambda batch: answers.pop(0)(batch)).start()
        for delay in (1, 5, 25, 125, 625, 625):
            self.assertWaits(delay)
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}] * 7)
        self.assertEqual(
            [event.get("reason") for event in self.events[:-1]],
            ["refused", "refused", "unavailable", "connection", "wrong_backup", "rate_limited"],
        )
        self.assertEqual(self.held_back(), [])
        self.assertEqual(self.store.dirty, set())

    def test_internal_error_of_one_vault_holds_it(self):
        """
        A 500 for a mixed batch (a replica the backup cannot write) sends
        each vault alone; when the others are accepted, only the failing
        vault is held back, on its own ladder, and a 500 for it alone later
        keeps it held instead of stopping every vault.
        """
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")
        sender = self.make(Poisoned(VAULT, code=500))
        sender.start()
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}])
        [held] = self.held_back()
        self.assertEqual((held["vault_id"], held["status"], held["delay"]), (VAULT, 500, 1))
        self.assertEqual(self.store.dirty, {(VAULT, "a1")})
        self.assertWaits(1)
        self.assertEqual(self.backup.vaults()[-1], {VAULT})
        self.assertEqual([e["delay"] for e in self.held_back()], [1, 5])
        self.store.write(OTHER_VAULT, "b2")
        sender.wake()
        self.assertEqual(self.backup.vaults()[-1], {OTHER_VAULT})
        self.assertEqual(self.store.dirty, {(VAULT, "a1")})

    def test_internal_error_of_every_vault_is_global(self):
        """
        When every vault of the split batch gets 500 too, the backup itself
        is failing (its disk, say): no vault is held back, and the whole
        batch waits on the global ladder.
        """
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")
        self.make(answering(500)).start()
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}])
        self.assertEqual(self.held_back(), [])
        failure = self.events[-1]
        self.assertEqual((failure["reason"], failure["error"], failure["delay"]), ("refused", "HTTP 500", 1))
        self.clock.advance(1)
        self.assertEqual(len(self.backup.vaults()), 6)
        self.assertEqual(self.events[-1]["delay"], 5)

    def test_internal_error_of_a_lone_vault_is_global(self):
        """
        A 500 for the one vault that has anything dirty says nothing about
        that vault: it waits on the global ladder, not held back.
        """
        self.store.write(VAULT, "a1")
        self.make(answering(500)).start()
        self.assertEqual(self.held_back(), [])
        self.assertWaits(1)
        self.assertWaits(5)

    def test_forgets_vault_with_nothing_dirty(self):
        """
        A held-back vault past its delay with nothing dirty any more is
        forgotten: its next entries go in mixed batches again.
        """
        self.store.write(VAULT, "a1")
        backup = Poisoned(VAULT)
        sender = self.make(backup)
        sender.start()
        self.store.dirty.clear()
        self.clock.advance(1)
        self.assertEqual(self.posts(), 1)
        backup.poisoned.clear()
        self.store.write(VAULT, "a2")
        self.store.write(OTHER_VAULT, "b1")
        sender.wake()
        self.assertEqual(self.backup.vaults()[1:], [{VAULT, OTHER_VAULT}])

    def test_stop_during_split(self):
        """
        stop() while the split batches go waits for the one in flight and
        sends no other; no timer is left.
        """
        held = Held()
        self.store.write(VAULT, "a1")
        self.store.write(OTHER_VAULT, "b1")
        sender = self.make(held)
        sender.start()
        held.pending.pop(0)[1].callback(refusal(400))
        self.assertEqual(self.backup.vaults(), [{VAULT, OTHER_VAULT}, {VAULT}])
        stopped = sender.stop()
        self.assertNoResult(stopped)
        held.pending.pop(0)[1].callback(refusal(400))
        self.successResultOf(stopped)
        self.assertEqual(self.posts(), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.store.dirty, {(VAULT, "a1"), (OTHER_VAULT, "b1")})

    def test_stop_cancels_held_retry(self):
        """
        stop() cancels a held-back vault's retry; start() brings it back on
        time.
        """
        self.store.write(VAULT, "a1")
        sender = self.make(Poisoned(VAULT), make_config(scan_interval=60))
        sender.start()
        self.assertWaits(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.successResultOf(sender.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2)
        sender.start()
        self.assertEqual(self.posts(), 2)
        self.assertWaits(3)
        self.successResultOf(sender.stop())
        self.clock.advance(10_000)
        self.assertEqual(self.posts(), 3)


class RealStoreTests(TestCase):
    """
    The sender against the real L{VaultStore}: the version guard, and a
    vault the backup refuses.
    """

    timeout = 10

    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-vaults")
        pool.start()
        self.addCleanup(pool.stop)
        self.store = VaultStore(self.data_dir, pool, reactor)
        self.addCleanup(self.store.close)
        self.vault = Vault.open(vault_path(self.data_dir, VAULT), create=True)
        self.addCleanup(self.vault.close)

    @inlineCallbacks
    def test_write_during_flight_stays_dirty(self):
        """
        An entry sent at v1 and changed to v2 before the 200 arrives stays
        dirty, and the next batch sends v2.
        """
        self.vault.put_entry("e1", b"one", now_ms=1)
        posted = []

        def answer(batch):
            d = Deferred()
            posted.append((batch, d))
            arrived.callback(None)
            return d

        backup = ScriptedBackup(answer)
        sender = Sender(make_config(), self.store, backup, SIGNER, Clock())
        sender.log = Logger(observer=lambda event: None)
        arrived = Deferred()
        done = sender.drain()
        yield arrived
        first, reply = posted[0]
        self.assertEqual([(e.entry_id, e.version) for e in first.entries], [("e1", 1)])
        self.vault.put_entry("e1", b"two", now_ms=2)
        arrived = Deferred()
        reply.callback(accepted(first))
        yield arrived
        second, reply = posted[1]
        self.assertEqual([(e.entry_id, e.version, e.data) for e in second.entries],
                         [("e1", 2, b"two")])
        self.assertEqual(self.vault.count_dirty(), 1)
        reply.callback(accepted(second))
        yield done
        self.assertEqual(self.vault.count_dirty(), 0)

    @inlineCallbacks
    def test_oversized_entry_holds_only_its_vault(self):
        """
        The operator's case: an entry of 1.5 MiB (over the backup's 1 MiB
        max_entry_bytes) in one vault; the other vault replicates fully in
        the same drain, the big entry's vault stays dirty and held back, and
        drains alone after its 1 s once the backup takes the entry.
        """
        self.vault.put_entry("big", b"x" * (3 * MiB // 2), now_ms=1)
        self.vault.put_entry("small", b"s", now_ms=1)
        other = Vault.open(vault_path(self.data_dir, OTHER_VAULT), create=True)
        self.addCleanup(other.close)
        for n in range(25):
            other.put_entry("e%02d" % n, b"o", now_ms=1)
        backup = ScriptedBackup(accepted)
        clock = Clock()
        sender = Sender(make_config(batch_size=10), self.store, backup, SIGNER, clock)
        events = []
        sender.log = Logger(observer=events.append)
        yield sender.drain()
        self.assertEqual(other.count_dirty(), 0)
        self.assertEqual(self.vault.count_dirty(), 2)
        self.assertEqual(
            backup.vaults(),
            [{VAULT, OTHER_VAULT}, {VAULT}, {OTHER_VAULT}, {OTHER_VAULT}, {OTHER_VAULT}],
        )
        errors = [event for event in events if event["log_level"] == LogLevel.error]
        self.assertEqual([(e["vault_id"], e["status"]) for e in errors], [(VAULT, 400)])
        backup.max_entry_bytes = 2 * MiB
        clock.advance(1)
        yield sender.drain()
        self.assertEqual(backup.vaults()[-1], {VAULT})
        self.assertEqual(self.vault.count_dirty(), 0)
        self.assertEqual(len(backup.requests), 6)


class _Connections(WrappingFactory):
    """
    The backup's site, wrapped to count connections and to tell the test
    when the server side has none open any more.
    """

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.built = 0
        self.waiting = []

    def buildProtocol(self, addr):
        self.built += 1
        return super().buildProtocol(addr)

    def all_lost(self):
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self.waiting.append(d)
        return d

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)


class RecordingBackup(Resource):
    """
    A stand-in backup: records each request it gets and answers with
    C{respond(request, batch)}, which returns bytes or NOT_DONE_YET.
    """

    isLeaf = True

    def __init__(self, respond):
        super().__init__()
        self.respond = respond
        self.requests = []

    def render_POST(self, request):
        body = request.content.read()
        batch = protocol.parse_batch(body, MiB)
        peer = tls.peer_certificate(request.channel.transport)
        self.requests.append((request.uri, request.requestHeaders, body, batch, peer))
        return self.respond(request, batch)


def valid_answer(request, batch):
    request.setHeader(b"content-type", b"application/json")
    return accepted(batch).body


class HttpsPosterTests(TestCase):
    """
    L{make_sender}'s L{HttpsPoster} against a backup over real loopback TLS.
    """

    timeout = 20

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.ca_key, self.ca_cert = pki.make_ca()
        pki.write_certificate(os.path.join(self.directory, "ca.crt"), self.ca_cert)
        self.primary_cert, _ = pki.write_pop_files(
            self.directory, self.ca_key, self.ca_cert, PRIMARY
        )
        self.store = MemoryStore()
        self.events = []

    @inlineCallbacks
    def serve(self, respond, ips=("127.0.0.1",), hosts=(), ca=None, client_certificate=True):
        """
        Listen on 127.0.0.1 as the backup with a certificate for C{hosts}
        and C{ips}, signed by C{ca} (our CA unless given).
        """
        ca_key, ca_cert = ca or (self.ca_key, self.ca_cert)
        backup_dir = os.path.join(self.directory, "backup-{}".format(len(os.listdir(self.directory))))
        os.makedirs(backup_dir)
        cert_path, key_path = pki.write_pop_files(
            backup_dir, ca_key, ca_cert, BACKUP, hosts=hosts, ips=ips
        )
        self.recorder = RecordingBackup(respond)
        self.connections = _Connections(Site(self.recorder))
        options = tls.server_options(
            tls.load_identity(cert_path, key_path),
            tls.load_ca(os.path.join(self.directory, "ca.crt")),
            require_client_certificate=client_certificate,
        )
        port = yield SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            self.connections
        )
        self.port = port
        self.addCleanup(port.stopListening)
        self.addCleanup(self.connections.all_lost)
        return port.getHost().port

    def sender(self, port, method="mtls", token_source=None, **replication):
        config = make_config(
            method, "https://127.0.0.1:{}".format(port), self.directory, **replication
        )
        sender = make_sender(config, self.store, reactor, token_source)
        sender.log = Logger(observer=self.events.append)
        self.addCleanup(sender.stop)
        return sender

    @inlineCallbacks
    def test_delivers_signed_batches(self):
        """
        Batches go to the apply path as JSON, signed with the primary's key,
        over one persistent connection that presents the primary's
        certificate; after the valid 200s nothing is dirty.
        """
        port = yield self.serve(valid_answer)
        self.store.fill(3)
        yield self.sender(port, batch_size=2).drain()
        self.assertEqual(self.store.dirty, set())
        self.assertEqual(len(self.recorder.requests), 2)
        primary_cert = tls.load_identity(
            self.primary_cert, self.primary_cert[: -len(".crt")] + ".key"
        ).certificate
        for uri, headers, body, batch, peer in self.recorder.requests:
            self.assertEqual(uri, protocol.APPLY_PATH)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertIsNone(headers.getRawHeaders(b"authorization"))
            protocol.verify_certificate_signature(
                headers.getRawHeaders(protocol.SIGNATURE_HEADER)[0], body, primary_cert.public_key()
            )
            self.assertEqual(peer, primary_cert)
        self.assertEqual(self.connections.built, 1)

    @inlineCallbacks
    def test_bearer(self):
        """
        In bearer mode no client certificate is presented and the token
        travels as C{Authorization: Bearer}.
        """
        port = yield self.serve(valid_answer, client_certificate=False)
        tokens = StaticTokens()
        self.store.fill(1)
        yield self.sender(port, "bearer", tokens).drain()
        self.assertEqual(self.store.dirty, set())
        (_, headers, body, _, peer), = self.recorder.requests
        self.assertIsNone(peer)
        self.assertEqual(
            headers.getRawHeaders(b"authorization"), [b"Bearer " + tokens.set.current]
        )
        protocol.verify_hmac_signature(
            headers.getRawHeaders(protocol.SIGNATURE_HEADER)[0], body, tokens.set
        )

    @inlineCallbacks
    def assertSendsNothing(self, port):
        self.store.fill(2)
        yield self.sender(port).drain()
        self.assertEqual(self.recorder.requests, [])
        self.assertEqual(len(self.store.dirty), 2)
        (event,) = self.events
        self.assertEqual((event["reason"], event["delay"]), ("tls", 1))

    def test_backup_names_another_host(self):
        """
        A backup whose certificate (from our CA) names other hosts but not
        the one in backup_pop.url gets no request.
        """
        d = self.serve(valid_answer, ips=(), hosts=("other.example", "localhost"))
        return d.addCallback(self.assertSendsNothing)

    def test_backup_from_another_ca(self):
        """
        A backup with a certificate for the right address from another CA
        gets no request.
        """
        d = self.serve(valid_answer, ca=pki.make_ca("stranger CA"))
        return d.addCallback(self.assertSendsNothing)

    @inlineCallbacks
    def test_connection_refused(self):
        port = yield self.serve(valid_answer)
        yield self.port.stopListening()
        self.store.fill(1)
        yield self.sender(port).drain()
        self.assertEqual(len(self.store.dirty), 1)
        self.assertEqual(self.events[-1]["reason"], "connection")

    @inlineCallbacks
    def test_answer_too_large(self):
        """
        An answer body over the cap is cut off and fails the attempt.
        """
        port = yield self.serve(lambda request, batch: b"x" * (MAX_ANSWER_BYTES + 1))
        self.store.fill(1)
        yield self.sender(port).drain()
        self.assertEqual(len(self.recorder.requests), 1)
        self.assertEqual(len(self.store.dirty), 1)
        self.assertEqual(self.events[-1]["reason"], "answer_too_large")

    @inlineCallbacks
    def test_endless_answer(self):
        """
        An answer that never ends is cut off at the cap, long before
        request_timeout, and its connection closed.
        """

        def endless(request, batch):
            request.write(b"x" * (2 * MAX_ANSWER_BYTES))
            return NOT_DONE_YET

        port = yield self.serve(endless)
        self.store.fill(1)
        yield self.sender(port, request_timeout=3600).drain()
        self.assertEqual(self.events[-1]["reason"], "answer_too_large")
        yield self.connections.all_lost()

    @inlineCallbacks
    def test_answer_at_the_cap(self):
        """
        A 200 of exactly the cap is read and judged on its content (here:
        not the backup's answer).
        """
        prefix, suffix = b'{"pad": "', b'"}'
        body = prefix + b"p" * (MAX_ANSWER_BYTES - len(prefix) - len(suffix)) + suffix
        self.assertEqual(len(body), MAX_ANSWER_BYTES)
        padded = lambda request, batch: body
        port = yield self.serve(padded)
        self.store.fill(1)
        yield self.sender(port).drain()
        self.assertEqual(self.events[-1]["reason"], "wrong_backup")

    @inlineCallbacks
    def test_hung_answer_times_out(self):
        """
        A backup that sends part of its answer and then nothing is cut off
        after request_timeout; the connection is closed.
        """

        def stall(request, batch):
            request.setHeader(b"content-length", b"100")
            request.write(b"{")
            return NOT_DONE_YET

        port = yield self.serve(stall)
        self.store.fill(1)
        yield self.sender(port, request_timeout=1).drain()
        self.assertEqual(self.events[-1]["reason"], "timeout")
        self.assertEqual(len(self.store.dirty), 1)
        yield self.connections.all_lost()
