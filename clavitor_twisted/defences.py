# -*- test-case-name: tests.test_receiver,tests.test_framing -*-
"""
What the backup knows about each attempt and the guards it checks them
against: L{Attempt}, filled in as a request goes, and L{Defences}, the
guard objects of one site (bans, rates, nonces, the body budget, the
connection limits) with the few calls the receiver makes to them, and
the audit records they end in.

A failed authentication is charged to what the TLS client certificate
proves (the authorised POPs it names, else the certificate by
fingerprint: names such as a common host name may be shared by several
certificates), or else to the peer address (never to an unverified claim),
so one POP's failures never ban another.
"""

import resource
from dataclasses import dataclass
from functools import partial
from typing import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from clavitor_twisted import protocol
from clavitor_twisted.audit import AuditLog, AuditRecord
from clavitor_twisted.config import Config
from clavitor_twisted.errors import Forbidden, RequestRefused
from clavitor_twisted.guard import (
    BanList,
    BodyBudget,
    ConnectionLimit,
    NonceCache,
    OpenConnections,
    RateLimiter,
    RefusalDigest,
)

# Connections one peer address may hold open at once: a partner needs one or
# two, and each costs a TLS session and a request in memory.
MAX_CONNECTIONS_PER_ADDRESS = 16

# The request bodies all requests together may hold in memory at once, in
# units of max_request_bytes: this many, or one per authorised POP if there
# are more, so each can always send one while the others stall theirs.
BODY_BUDGET_REQUESTS = 4

# What the requests of one POP (or one peer address) may hold: a primary
# sends one batch at a time.
BODY_SHARE_REQUESTS = 1

# Connections refused before any request, as audited: (result, status,
# whether it counts as a failed authentication).  Each kind is audited once
# per address per REFUSAL_DIGEST_SECONDS, then counted.
CONNECTION_REFUSALS = (
    ("too_many_connections", 0, False),
    ("connection_rate_limited", 0, False),
    ("tls_refused", 0, True),
    # At the first byte: a banned peer, an unauthorised certificate.
    ("forbidden", 403, False),
    ("forbidden", 403, True),
)
REFUSAL_DIGEST_SECONDS = 60

log = Logger()


def connection_limit_for_files() -> int:
    """
    How many connections the site may hold open: a quarter of the
    process's file limit (the rest is for vault files, logs and the vault
    pool), between 64 and 4096.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 4 * 4096
    return max(64, min(4096, soft // 4))


class _UnauthorisedCertificate(Forbidden):
    """
    A client certificate none of whose names is an authorised POP: it
    proves the peer is not a partner, so it counts as a failed
    authentication of that certificate.
    """

    counts_as_auth_failure = True


def address_key(address: str) -> str:
    return "address:" + address


def pop_keys(pops: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted("pop:" + pop for pop in pops))



@dataclass
class Attempt:
    """
    What the audit log says about one request, filled in as it goes.

    C{names} are the POPs the connection itself proves (the TLS client
    certificate's names in C{mtls}, where C{certified}), known before any
    request is read.
    """

    peer: str
    started: float
    names: frozenset[str]
    fingerprint: str | None
    certified: bool
    # The names that are authorised POPs.
    authorised: frozenset[str] = frozenset()
    claimed_pop: str | None = None
    proven_pop: str | None = None
    entries: int = 0
    vaults: int = 0
    bytes: int = 0
    request_timestamp: int | None = None

    @property
    def credential_keys(self) -> tuple[str, ...]:
        """
        What the client certificate proves: the authorised POPs it names
        (every certificate of a POP, a rotated one too, shares that POP's
        ban and rate), else the certificate itself by fingerprint, never
        other names, which other certificates may share (a common host
        name).
        """
        if not self.certified or self.fingerprint is None:
            return ()
        if self.authorised:
            return pop_keys(self.authorised)
        return ("cert:" + self.fingerprint,)

    @property
    def admission_keys(self) -> tuple[str, ...]:
        """
        What is checked for bans and rate as soon as the headers are in.
        """
        return (address_key(self.peer),) + self.credential_keys

    @property
    def charged_keys(self) -> tuple[str, ...]:
        """
        Who a failed authentication is charged to: what the certificate
        proves, else the peer address.
        """
        return self.credential_keys or (address_key(self.peer),)

    @property
    def budget_key(self) -> str:
        """
        Whose share of the body budget the request's body takes.
        """
        return self.charged_keys[0]

    def describe(self, batch: protocol.Batch) -> None:
        self.claimed_pop = batch.source_pop
        self.entries = len(batch.entries)
        self.vaults = len({entry.vault_id for entry in batch.entries})
        self.request_timestamp = batch.timestamp


class Defences:
    """
    The guard objects and the audit log of one site, and the few calls the
    receiver makes to them.
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        audit: AuditLog,
        max_connections: int | None = None,
    ) -> None:
        security = config.security
        self.max_request_bytes = security.max_request_bytes
        self.request_timeout = config.replication.request_timeout
        self.authorized_pops = frozenset(config.authorized_pops)
        self.bodies = BodyBudget(
            max(BODY_BUDGET_REQUESTS, len(self.authorized_pops)) * security.max_request_bytes,
            BODY_SHARE_REQUESTS * security.max_request_bytes,
        )
        self.connections = ConnectionLimit(MAX_CONNECTIONS_PER_ADDRESS)
        self.open_connections = OpenConnections(
            connection_limit_for_files() if max_connections is None else max_connections
        )
        self.clock = clock
        self.audit = audit
        self.bans = BanList(clock, security.ban_after_failures, security.ban_duration)
        self.rates = RateLimiter(clock, security.rate_limit_per_minute)
        self.nonces = NonceCache(
            clock, config.replication.max_request_age, security.clock_skew
        )
        # Connections per minute from one address, checked before the TLS
        # handshake: the most expensive thing a stranger can make us do.
        self.connection_rates = RateLimiter(clock, security.connections_per_minute)
        self._digests = {
            kind: RefusalDigest(clock, REFUSAL_DIGEST_SECONDS, partial(self._tell_count, *kind))
            for kind in CONNECTION_REFUSALS
        }

    def refused_connection(
        self,
        result: str,
        attempt: Attempt,
        reason: str,
        auth_failure: bool = False,
        status: int = 0,
    ) -> None:
        """
        Audit a connection refused before any request (its kind one of
        L{CONNECTION_REFUSALS}), unless its address had one refused like it
        within the window: that one is counted, and told with the others
        when the window ends.
        """
        if self._digests[result, status, auth_failure].refused(attempt.peer, reason):
            self.record(attempt, status, result, reason, auth_failure)

    def _tell_count(
        self, result: str, status: int, auth_failure: bool, address: str, count: int, last: str
    ) -> None:
        now = self.clock.seconds()
        attempt = Attempt(
            peer=address, started=now, names=frozenset(), fingerprint=None, certified=False
        )
        self.record(
            attempt,
            status,
            result,
            "%d more connections refused like this within %d s; the last: %s"
            % (count, REFUSAL_DIGEST_SECONDS, last),
            auth_failure=auth_failure,
            count=count,
        )

    def stop(self) -> None:
        """
        The site stops listening: audit what the digests still count.
        """
        for digest in self._digests.values():
            digest.stop()

    def admit(self, attempt: Attempt) -> None:
        """
        What the headers alone decide: bans, a certificate that names no
        authorised POP (before its body is read, let alone parsed), rates.

        @raise Forbidden: a key of C{attempt} is banned, or its certificate
            names no authorised POP.
        @raise RateLimited: a key of C{attempt} is over its rate.
        """
        self.check(attempt.admission_keys)
        refusal = self.certificate_refusal(attempt)
        if refusal is not None:
            raise refusal

    def connection_refusal(self, attempt: Attempt) -> RequestRefused | None:
        """
        What a connection's first data decides, before any request is
        parsed: a banned address or certificate, or a certificate that
        names no authorised POP; None if neither.
        """
        try:
            for key in attempt.admission_keys:
                self.bans.check(key)
        except Forbidden as refusal:
            return refusal
        return self.certificate_refusal(attempt)

    def certificate_refusal(self, attempt: Attempt) -> RequestRefused | None:
        """
        The refusal of a client certificate that names no authorised POP
        (it proves the peer is no partner), or None.
        """
        if attempt.certified and not attempt.authorised:
            return _UnauthorisedCertificate(
                "no name of the client certificate is in authorized_pops"
            )
        return None

    def check(self, keys: tuple[str, ...]) -> None:
        """
        @raise Forbidden: one of C{keys} is banned.
        @raise RateLimited: one of C{keys} is over its rate.
        """
        for key in keys:
            self.bans.check(key)
        for key in keys:
            self.rates.check(key)

    def authenticated(self, attempt: Attempt) -> None:
        for key in attempt.charged_keys:
            self.bans.record_success(key)

    def refused(self, attempt: Attempt, refusal: RequestRefused) -> str:
        """
        Count C{refusal} if it is a failed authentication: the reason to
        record, with the keys it starts a ban of.
        """
        if not refusal.counts_as_auth_failure:
            return refusal.detail
        banned = [key for key in attempt.charged_keys if self.bans.record_failure(key)]
        for key in banned:
            log.warn("banned {key} after failed authentications", key=key)
        if banned:
            return refusal.detail + "; ban starts for " + ", ".join(banned)
        return refusal.detail

    def record(
        self,
        attempt: Attempt,
        status: int,
        result: str,
        reason: str,
        auth_failure: bool = False,
        count: int = 1,
    ) -> None:
        now = self.clock.seconds()
        self.audit.record(
            AuditRecord(
                time=attempt.started,
                peer=attempt.peer,
                claimed_pop=attempt.claimed_pop,
                proven_pop=attempt.proven_pop,
                entries=attempt.entries,
                vaults=attempt.vaults,
                bytes=attempt.bytes,
                result=result,
                status=status,
                reason=reason,
                duration=now - attempt.started,
                backup_clock=now,
                request_timestamp=attempt.request_timestamp,
                auth_failure=auth_failure,
                fingerprint=attempt.fingerprint,
                count=count,
            )
        )

