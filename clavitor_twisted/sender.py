# -*- test-case-name: tests.test_sender -*-
"""
The primary's sender: drains dirty vault entries to the backup POP.

A L{LoopingCall} (and L{Sender.wake}) starts a drain; a drain sends freshly
signed batches back to back until no entry is dirty or an attempt fails.  A
failure waits on the integer ladder L{BACKOFF_SECONDS} (or a 429's or 503's
C{Retry-After}) and nothing is ever dropped: entries stay dirty on disk until
a valid C{200} from the configured backup, and are then marked replicated
only where their version is still the one that was sent.

A refusal about what a batch holds (L{CONTENT_REFUSALS}) stops only the
vault it is about: a batch of several vaults is sent again one vault per
batch (one vault's batch too large for the backup, in halves), and a vault
refused on its own is held back, on a ladder of its own, while the other
vaults go on replicating.  A 500 is split the same way, and holds back
the vaults that fail only if the backup accepts others.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import dataclass
from io import BytesIO
from typing import Sequence

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from clavitor_twisted import protocol, tls
from clavitor_twisted.config import BackupPop, Config
from clavitor_twisted.errors import ConfigError
from clavitor_twisted.role import runs_sender
from clavitor_twisted.tokens import TokenSource
from clavitor_twisted.vault import Entry, by_vault

BACKOFF_SECONDS = (1, 5, 25, 125, 625)
# Answers that judge what the batch holds (an entry, a vault's owner or
# epoch, its size), not the link or the credentials.
CONTENT_REFUSALS = frozenset({400, 403, 409, 413})
# The backup could not apply the batch: about one vault (its replica) or
# about the backup as a whole (its disk); see Sender._send_batch.
INTERNAL_ERROR = 500
MAX_RETRY_AFTER = 3600
MAX_ANSWER_BYTES = 64 * 1024

_RETRY_AFTER = re.compile(rb"[0-9]{1,10}")
_COUNT_KEYS = ("applied", "skipped", "seq")


class Backoff:
    """
    Consecutive failures counted on an integer ladder.

    The n-th failure in a row waits C{ladder[n - 1]}; the ladder's last step
    repeats for ever, and from the C{max_retries}-th failure on the wait is
    that last step (the backup is treated as down, polled slowly).
    """

    def __init__(
        self, max_retries: int, ladder: Sequence[int] = BACKOFF_SECONDS
    ) -> None:
        self._max_retries = max_retries
        self._ladder = tuple(ladder)
        self.failures = 0

    @property
    def exhausted(self) -> bool:
        """
        True once C{max_retries} failures in a row have happened.
        """
        return self.failures >= self._max_retries

    def failure(self) -> int:
        """
        Count one more failure; return the seconds to wait before retrying.
        """
        self.failures += 1
        if self.exhausted:
            return self._ladder[-1]
        return self._ladder[min(self.failures, len(self._ladder)) - 1]

    def success(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class Answer:
    """
    The backup's answer to one POST: status, headers and the (capped) body.
    """

    code: int
    headers: Headers
    body: bytes


class AnswerTooLarge(Exception):
    """
    The backup's answer body exceeded L{MAX_ANSWER_BYTES}.
    """


class DirtyStore(typing.Protocol):
    """
    What the sender needs of L{clavitor_twisted.vault.VaultStore}.
    """

    def dirty_batch(
        self, max_entries: int, max_bytes: int, exclude: frozenset[str] = frozenset()
    ) -> Deferred[list[Entry]]: ...

    def mark_replicated(self, entries: Sequence[Entry]) -> Deferred[int]: ...

    def primary_epoch(self) -> Deferred[int]: ...


class Signer(typing.Protocol):
    def sign(self, body: bytes) -> bytes: ...


class Poster(typing.Protocol):
    """
    Sends one signed body to the backup; L{HttpsPoster} is the real one.
    """

    def __call__(self, body: bytes, headers: dict[bytes, bytes]) -> Deferred[Answer]: ...

    def close(self) -> Deferred[None]: ...


@dataclass(frozen=True)
class SenderStatus:
    """
    What the sender can tell an operator (times on the sender's clock).
    """

    started_at: float
    last_success: float | None
    failures: int
    retry_at: float | None
    # vault id -> (end of its hold, failures in a row)
    held: dict[str, tuple[float, int]]
    batches: int
    entries: int
    failed_attempts: int
    refused_attempts: int


class _Hold:
    """
    A vault held back after the backup refused it alone: its own ladder,
    and the clock time until which it is left out of batches.
    """

    def __init__(self, max_retries: int) -> None:
        self.backoff = Backoff(max_retries)
        self.until = 0.0


class Sender:
    """
    The state machine that drains dirty entries to the backup.

    At most one drain runs at a time.  A tick or L{wake} during a drain makes
    it scan once more before it ends; during a backoff wait, or after
    L{stop}, it does nothing.  C{seq} numbers every batch this process puts
    on the wire, retries included, so each signed request is unique.

    Held-back vaults (at most one L{_Hold} per vault) are left out of
    batches until their own delay has passed; then they go alone, each in
    its own batch, until the backup accepts them.  A content refusal never
    moves the global ladder, which is for the backup and the link.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        store: DirtyStore,
        post: Poster,
        signer: Signer,
        clock: IReactorTime,
        token_source: TokenSource | None = None,
    ) -> None:
        if not runs_sender(config.role):
            raise ConfigError("role: a backup never runs a sender")
        if config.backup_pop is None:
            raise ConfigError("backup_pop: required on a primary")
        if config.auth.method == "bearer" and token_source is None:
            raise ValueError("bearer mode needs a token source")
        self._pop_id = config.pop_id
        self._backup = config.backup_pop
        self._replication = config.replication
        self._store = store
        self._post = post
        self._signer = signer
        self._clock = clock
        self._token_source = (
            token_source if config.auth.method == "bearer" else None
        )
        self._backoff = Backoff(config.replication.max_retries)
        self._loop = LoopingCall(self.wake)
        self._loop.clock = clock
        self._seq = 0
        self._epoch = 1
        self._draining = False
        self._again = False
        self._waiters: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self._held: dict[str, _Hold] = {}
        self._held_retry: IDelayedCall | None = None
        self._stopped = False
        self._started_at = clock.seconds()
        self._last_success: float | None = None
        self._batches = self._entries = self._failed_attempts = self._refused_attempts = 0

    def start(self) -> None:
        """
        Scan now and every C{replication.scan_interval} seconds (and when a
        held-back vault's delay passes).
        """
        self._stopped = False
        self._schedule_held_retry()
        self._loop.start(self._replication.scan_interval, now=True).addErrback(
            lambda failure: self.log.failure("replication scan loop died", failure)
        )

    def stop(self) -> Deferred[None]:
        """
        Stop scanning and retrying; fire when the batch in flight (if any) has
        finished and the poster's connections are closed.
        """
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._held_retry is not None:
            self._held_retry.cancel()
            self._held_retry = None
        done = self._when_drained() if self._draining else succeed(None)
        done.addCallback(lambda _: self._post.close())
        return done

    def status(self) -> SenderStatus:
        return SenderStatus(
            started_at=self._started_at,
            last_success=self._last_success,
            failures=self._backoff.failures,
            retry_at=self._retry.getTime() if self._retry is not None else None,
            held={v: (hold.until, hold.backoff.failures) for v, hold in self._held.items()},
            batches=self._batches,
            entries=self._entries,
            failed_attempts=self._failed_attempts,
            refused_attempts=self._refused_attempts,
        )

    def wake(self) -> None:
        """
        Something may have become dirty: drain now, unless a drain runs (it
        scans once more before it ends), a backoff wait is pending or the
        sender is stopped.
        """
        if self._draining:
            self._again = True
        elif not self._stopped and self._retry is None:
            self._draining = True
            self._drain().addErrback(self._crashed).addBoth(self._drained)

    def drain(self) -> Deferred[None]:
        """
        L{wake}, then a L{Deferred} that fires (never fails) when the drain
        has ended: nothing left dirty but in held-back vaults, an attempt
        failed, or L{stop}.
        """
        self.wake()
        return self._when_drained() if self._draining else succeed(None)

    def _when_drained(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _drained(self, _: object) -> None:
        self._draining = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("replication drain failed unexpectedly", failure)
        self._wait(self._backoff.failure())

    @inlineCallbacks
    def _drain(self):
        # Once per drain, not per batch: it reads every vault's meta, and the
        # epoch does not change while a drain runs.
        try:
            self._epoch = yield self._store.primary_epoch()
        except Exception:
            self._failed("store", Failure())
            return
        while not self._stopped:
            self._again = False
            try:
                entries = yield self._store.dirty_batch(
                    self._replication.batch_size,
                    self._replication.max_batch_bytes,
                    self._held_back(),
                )
            except Exception:
                self._failed("store", Failure())
                return
            if not entries:
                self._forget_clean_holds()
                if self._again:
                    continue
                return
            sent = yield self._send_batch(entries)
            if not sent:
                return

    @inlineCallbacks
    def _send_batch(self, entries: Sequence[Entry]):
        """
        Send one batch from the store: the entries of the vaults not held
        back in one request, each held-back vault whose delay has passed in
        a request of its own.  A content refusal or a 500 of several vaults
        sends each of them alone; a 413 of one vault sends its entries in
        halves; any other refusal of one vault, or a 413 of a single entry,
        holds the vault back.  A 500 of one vault is about that vault (a
        replica the backup cannot write, say) only if the backup accepted
        another vault meanwhile or the vault is held back already; else it
        is about the backup, and waits on the global ladder.  Fires with
        True to go on draining, False when a failure has scheduled the
        global retry (or the sender stopped).
        """
        fresh = [e for e in entries if e.vault_id not in self._held]
        attempts = [fresh] if fresh else []
        attempts += [
            group for vault_id, group in by_vault(entries).items() if vault_id in self._held
        ]
        accepted_any = False
        failed_alone: list[Sequence[Entry]] = []
        while attempts:
            if self._stopped:
                return False
            attempt = attempts.pop(0)
            verdict = yield self._send(attempt)
            if verdict is None:
                return False
            vaults = by_vault(attempt)
            if verdict == 200:
                accepted_any = True
                self._release(vaults)
            elif len(vaults) > 1:
                self.log.warn(
                    "backup {backup} refused a batch of {vaults} vaults"
                    " (HTTP {status}); sending each vault alone",
                    backup=self._backup.id,
                    vaults=len(vaults),
                    status=verdict,
                )
                attempts[:0] = vaults.values()
            elif verdict == 413 and len(attempt) > 1:
                # Too large for this backup's cap (its max_request_bytes is
                # below our max_batch_bytes): halves, down to one entry.
                half = len(attempt) // 2
                self.log.warn(
                    "backup {backup} refused {count} entries of vault {vault_id}"
                    " as too large; sending them in halves (keep"
                    " replication.max_batch_bytes within its max_request_bytes)",
                    backup=self._backup.id,
                    count=len(attempt),
                    vault_id=attempt[0].vault_id,
                )
                attempts[:0] = [attempt[:half], attempt[half:]]
            elif verdict == INTERNAL_ERROR and attempt[0].vault_id not in self._held:
                failed_alone.append(attempt)
            else:
                self._hold(attempt[0].vault_id, verdict, len(attempt))
        if failed_alone and not accepted_any:
            self._failed("refused", "HTTP {}".format(INTERNAL_ERROR))
            return False
        for attempt in failed_alone:
            self._hold(attempt[0].vault_id, INTERNAL_ERROR, len(attempt))
        return True

    def _held_back(self) -> frozenset[str]:
        """
        The vaults whose own delay has not passed yet.
        """
        now = self._clock.seconds()
        return frozenset(v for v, hold in self._held.items() if hold.until > now)

    def _hold(self, vault_id: str, status: int, count: int) -> None:
        """
        The backup refused C{vault_id} on its own: leave it out of batches
        for the next step of its ladder.
        """
        hold = self._held.get(vault_id)
        if hold is None:
            hold = self._held[vault_id] = _Hold(self._replication.max_retries)
        delay = hold.backoff.failure()
        hold.until = self._clock.seconds() + delay
        self.log.error(
            "vault {vault_id} held back: backup answered {status};"
            " its entries stay dirty; retry in {delay} s",
            vault_id=vault_id,
            status=status,
            delay=delay,
            failures=hold.backoff.failures,
            entries=count,
            backup=self._backup.id,
        )
        self._schedule_held_retry()

    def _release(self, vaults: typing.Iterable[str]) -> None:
        """
        The backup accepted these vaults: none of them is held back any more.
        """
        for vault_id in vaults:
            if self._held.pop(vault_id, None) is not None:
                self.log.info(
                    "vault {vault_id} accepted by {backup} again; no longer held back",
                    vault_id=vault_id,
                    backup=self._backup.id,
                )

    def _forget_clean_holds(self) -> None:
        """
        After a scan found nothing: a vault past its delay was scanned and
        has nothing dirty, so there is nothing left to hold back.
        """
        now = self._clock.seconds()
        for vault_id in [v for v, hold in self._held.items() if hold.until <= now]:
            del self._held[vault_id]

    def _schedule_held_retry(self) -> None:
        """
        Wake when the earliest held-back vault's delay passes (one timer).
        """
        if self._held_retry is not None:
            self._held_retry.cancel()
            self._held_retry = None
        now = self._clock.seconds()
        pending = [hold.until for hold in self._held.values() if hold.until > now]
        if pending and not self._stopped:
            self._held_retry = self._clock.callLater(min(pending) - now, self._held_due)

    def _held_due(self) -> None:
        self._held_retry = None
        self.wake()

    @inlineCallbacks
    def _send(self, entries: Sequence[Entry]):
        """
        One attempt: sign a new batch, post it, judge the answer, and mark
        the entries replicated after a valid C{200}.  Fires with 200 on
        success, with the status of a content refusal or a 500 (nothing
        scheduled), or with None on any other failure, whose wait is
        already scheduled.
        """
        epoch = self._epoch
        self._seq += 1
        batch = protocol.new_batch(
            self._pop_id,
            self._backup.id,
            epoch,
            self._seq,
            entries,
            int(self._clock.seconds()),
        )
        body = protocol.serialise(batch)
        headers = {
            b"Content-Type": b"application/json",
            protocol.SIGNATURE_HEADER: self._signer.sign(body),
        }
        if self._token_source is not None:
            headers[b"Authorization"] = (
                b"Bearer " + self._token_source.tokens().current
            )
        attempt = maybeDeferred(self._post, body, headers)
        attempt.addTimeout(
            self._replication.request_timeout, self._clock, _timed_out
        )
        try:
            answer = yield attempt
        except Exception:
            failure = Failure()
            self._failed(_failure_reason(failure), failure)
            return None
        if answer.code in CONTENT_REFUSALS:
            self._refused_attempts += 1
            return answer.code
        if answer.code == INTERNAL_ERROR:
            # Judged by the caller: one vault's replica, or the backup.
            return answer.code
        if answer.code in (429, 503):
            # Rate limited, or a backup in its restart window: both say
            # when to come back.
            self._failed(
                "rate_limited" if answer.code == 429 else "unavailable",
                "HTTP {}".format(answer.code),
                _retry_after(answer.headers),
            )
            return None
        if answer.code != 200:
            self._failed("refused", "HTTP {}".format(answer.code))
            return None
        document = _json_object(answer.body)
        if document is None:
            self._failed("bad_answer", "200 whose body is not a JSON object")
            return None
        if document.get("pop_id") != self._backup.id or document.get("role") != "backup":
            self._failed(
                "wrong_backup",
                "200 from pop_id {} with role {}".format(
                    ascii(document.get("pop_id"))[:80],
                    ascii(document.get("role"))[:80],
                ),
                critical=True,
            )
            return None
        counts = {key: document.get(key) for key in _COUNT_KEYS}
        if not all(type(value) is int and value >= 0 for value in counts.values()):
            self._failed("bad_answer", "200 without applied/skipped/seq counts")
            return None
        if counts["seq"] != batch.seq:
            self._failed("bad_answer", "200 for another seq")
            return None
        try:
            marked = yield self._store.mark_replicated(entries)
        except Exception:
            self._failed("store", Failure())
            return None
        self._backoff.success()
        self._last_success = self._clock.seconds()
        self._batches += 1
        self._entries += len(entries)
        self.log.info(
            "replicated {count} entries to {backup} (epoch {epoch} seq {seq}):"
            " {applied} applied, {skipped} skipped, {marked} marked replicated",
            count=len(entries),
            backup=self._backup.id,
            epoch=epoch,
            seq=batch.seq,
            applied=counts["applied"],
            skipped=counts["skipped"],
            marked=marked,
        )
        return 200

    def _failed(
        self,
        reason: str,
        error: Failure | str,
        delay: int | None = None,
        critical: bool = False,
    ) -> None:
        """
        Count a failed attempt, log it and schedule the retry.
        """
        self._failed_attempts += 1
        ladder_delay = self._backoff.failure()
        if delay is None:
            delay = ladder_delay
        if isinstance(error, Failure):
            error = "{}: {}".format(error.type.__name__, error.getErrorMessage())
        fields = dict(
            backup=self._backup.id,
            reason=reason,
            error=error,
            failures=self._backoff.failures,
            delay=delay,
        )
        if critical:
            self.log.critical(
                "replication answer is not from backup {backup} ({error});"
                " check backup_pop in the configuration; entries stay dirty;"
                " retry in {delay} s",
                **fields,
            )
        elif self._backoff.exhausted:
            self.log.error(
                "replication to {backup} has failed {failures} times in a row"
                " ({reason}: {error}); entries stay dirty; retry in {delay} s",
                **fields,
            )
        else:
            self.log.warn(
                "replication to {backup} failed ({reason}: {error});"
                " failure {failures} in a row; retry in {delay} s",
                **fields,
            )
        self._wait(delay)

    def _wait(self, delay: int) -> None:
        if not self._stopped:
            self._retry = self._clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.wake()


def _timed_out(result: object, timeout: float) -> Failure:
    return Failure(defer.TimeoutError("no complete answer within {} s".format(timeout)))


def _failure_reason(failure: Failure) -> str:
    """
    One word for the log: why a request produced no answer.
    """
    if failure.check(defer.TimeoutError):
        return "timeout"
    if failure.check(AnswerTooLarge):
        return "answer_too_large"
    nested = [failure, *getattr(failure.value, "reasons", ())]
    if any(reason.check(SSL.Error, VerificationError) for reason in nested):
        return "tls"
    if failure.check(ConnectError):
        return "connection"
    return "request"


def _retry_after(headers: Headers) -> int | None:
    """
    A single integer C{Retry-After}, at least 1 and capped at
    L{MAX_RETRY_AFTER}; None (use the ladder) for anything else.
    """
    values = headers.getRawHeaders(b"retry-after")
    if values is None or len(values) != 1:
        return None
    value = values[0].strip(b" \t")
    if _RETRY_AFTER.fullmatch(value) is None:
        return None
    return min(max(int(value), 1), MAX_RETRY_AFTER)


def _json_object(body: bytes) -> dict | None:
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return answer if isinstance(answer, dict) else None


class _CappedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes.  A longer one stops
    the connection and fails with L{AnswerTooLarge} once the response has
    ended, so the connection pool has settled before the sender moves on.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._cancelled = False
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._size > self._limit or self._cancelled:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks = []
            self.transport.stopProducing()
        else:
            self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._cancelled:
            return
        if self._size > self._limit:
            self.finished.errback(
                AnswerTooLarge("answer over {} bytes".format(self._limit))
            )
        elif reason.check(ResponseDone):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._cancelled = True
        if self.transport is not None:
            self.transport.stopProducing()


class HttpsPoster:
    """
    POSTs a signed batch to the backup's apply endpoint over TLS 1.3, on one
    persistent connection, verifying the backup with C{policy}.

    C{timeout} bounds the TCP connect; the L{Sender} bounds the whole request.
    """

    def __init__(
        self,
        reactor,
        policy: tls.BackupPolicy,
        backup: BackupPop,
        timeout: int,
    ) -> None:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._pool.retryAutomatically = False
        self._agent = Agent(
            reactor, contextFactory=policy, connectTimeout=timeout, pool=self._pool
        )
        self._url = backup.url.encode("ascii") + protocol.APPLY_PATH

    def __call__(self, body: bytes, headers: dict[bytes, bytes]) -> Deferred[Answer]:
        requested = self._agent.request(
            b"POST",
            self._url,
            Headers({name: [value] for name, value in headers.items()}),
            FileBodyProducer(BytesIO(body)),
        )
        return requested.addCallback(_read_answer)

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


def _read_answer(response: IResponse) -> Deferred[Answer]:
    body = _CappedBody(MAX_ANSWER_BYTES)
    response.deliverBody(body)
    return body.finished.addCallback(
        lambda data: Answer(response.code, response.headers, data)
    )


def make_sender(
    config: Config, store: DirtyStore, reactor, token_source: TokenSource | None
) -> Sender:
    """
    The primary's sender over the real network: in mtls mode it signs with
    the POP's key and presents its certificate; in bearer mode it signs with
    the token (HMAC) and sends it as C{Authorization}.  The backup is always
    verified against C{auth.mtls_ca} and the host of C{backup_pop.url}.
    """
    if config.backup_pop is None:
        raise ConfigError("backup_pop: required on a primary")
    ca = tls.load_ca(config.auth.mtls_ca)
    if config.auth.method == "mtls":
        identity = tls.load_pop_identity(
            config.auth.mtls_cert, config.auth.mtls_key, config.pop_id
        )
        signer = protocol.CertificateSigner(identity.private_key)
        client_identity = identity
    else:
        if token_source is None:
            raise ConfigError("auth.token_file: bearer mode needs the token file")
        signer = protocol.HmacSigner(token_source)
        client_identity = None
    poster = HttpsPoster(
        reactor,
        tls.BackupPolicy(ca, client_identity, config.backup_pop.id),
        config.backup_pop,
        config.replication.request_timeout,
    )
    return Sender(config, store, poster, signer, reactor, token_source)
