# -*- test-case-name: tests.test_receiver,tests.test_framing -*-
"""
The backup side of replication: C{POST /api/replication/apply}.

A request passes one short chain of checks (DESIGN.md rule 2), cheapest
first.  As soon as its headers are in, L{_ApiRequest} refuses framing it
cannot trust (400) or a declared body above C{max_request_bytes} (413), and
asks the L{Defences} whether the peer address (and, in C{mtls}, its
certificate, by fingerprint) is banned (403) or over its rate (429),
whether the certificate names an authorised POP (403), and whether the
declared body fits the budget of bodies held at once (503); any of these
is answered at once and the connection closed, the body never read.  A
body that streams past the cap or the budget is cut off likewise (413,
503).  A peer address holds at most L{MAX_CONNECTIONS_PER_ADDRESS}
connections at once.  L{ApplyResource} then checks method,
media type, the signature on the raw bytes, the strict parse, the identity
the credential proves (and, in C{bearer}, that POP's ban and rate),
authorisation, target, freshness (refusing, as stale, anything signed up
to C{clock_skew} after the start second, which a process before this one
may have applied) and the nonce; only then is the batch
applied, in the vault thread pool.

A failed authentication is charged to the TLS client certificate (its
fingerprint: names such as a common host name may be shared by several
certificates), or else to the peer address (never to an unverified claim),
so one POP's failures never ban another.  Every request ends in exactly one audit record
and an answer of C{{"error": word}} (or the 200 document) with its status:
JSON with C{nosniff} and C{no-store}, without a C{Server} banner, whichever
path produced it, Twisted's own 400 for bad framing included.
"""

import hmac
import json
import math
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import Any, Callable, Iterable, Protocol

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from clavitor_twisted import protocol, tls
from clavitor_twisted.audit import AuditLog, AuditRecord, fingerprint
from clavitor_twisted.config import Config
from clavitor_twisted.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    Malformed,
    MethodNotAllowed,
    NotReady,
    RateLimited,
    RequestRefused,
    TooLarge,
    UnsupportedMediaType,
)
from clavitor_twisted.guard import (
    BanList,
    BodyBudget,
    ConnectionLimit,
    NonceCache,
    RateLimiter,
    RefusalDigest,
)
from clavitor_twisted.tokens import TokenSource
from clavitor_twisted.vault import VaultStore

JSON_MEDIA_TYPE = b"application/json"

# twisted.web's table lacks 429.
_REASON_PHRASES = {**http.RESPONSES, 429: b"Too Many Requests"}

# Connections one peer address may hold open at once: a partner needs one or
# two, and each costs a TLS session and a request in memory.
MAX_CONNECTIONS_PER_ADDRESS = 16

# The request bodies all requests together may hold in memory at once, in
# units of max_request_bytes.
BODY_BUDGET_REQUESTS = 4

# Connections refused before any request, by the result word audited; True
# for those that count as failed authentications.  Each is audited once per
# address per REFUSAL_DIGEST_SECONDS, then counted.
CONNECTION_REFUSALS = {
    "too_many_connections": False,
    "connection_rate_limited": False,
    "tls_refused": True,
}
REFUSAL_DIGEST_SECONDS = 60

# Of that, what the requests of one POP (or one peer address) may hold.
BODY_SHARE_REQUESTS = 2

# Digits of a Content-Length: the largest max_request_bytes has 10.
_MAX_LENGTH_DIGITS = 18

# Sent with every answer of the site.
SECURITY_HEADERS = (
    (b"Content-Type", JSON_MEDIA_TYPE),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Cache-Control", b"no-store"),
)

log = Logger()


class _UnauthorisedCertificate(Forbidden):
    """
    A client certificate none of whose names is an authorised POP: it
    proves the peer is not a partner, so it counts as a failed
    authentication of that certificate.
    """

    counts_as_auth_failure = True


def _refusal_headers(refusal: RequestRefused) -> tuple[tuple[bytes, bytes], ...]:
    if refusal.retry_after is not None:
        return ((b"Retry-After", b"%d" % (refusal.retry_after,)),)
    if isinstance(refusal, MethodNotAllowed):
        return ((b"Allow", b"POST"),)
    return ()


def _document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def _address_key(address: str) -> str:
    return "address:" + address


def _pop_keys(pops: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted("pop:" + pop for pop in pops))


@dataclass
class _Attempt:
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
            return _pop_keys(self.authorised)
        return ("cert:" + self.fingerprint,)

    @property
    def admission_keys(self) -> tuple[str, ...]:
        """
        What is checked for bans and rate as soon as the headers are in.
        """
        return (_address_key(self.peer),) + self.credential_keys

    @property
    def charged_keys(self) -> tuple[str, ...]:
        """
        Who a failed authentication is charged to: what the certificate
        proves, else the peer address.
        """
        return self.credential_keys or (_address_key(self.peer),)

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

    def __init__(self, config: Config, clock: IReactorTime, audit: AuditLog) -> None:
        security = config.security
        self.max_request_bytes = security.max_request_bytes
        self.request_timeout = config.replication.request_timeout
        self.authorized_pops = frozenset(config.authorized_pops)
        self.bodies = BodyBudget(
            BODY_BUDGET_REQUESTS * security.max_request_bytes,
            BODY_SHARE_REQUESTS * security.max_request_bytes,
        )
        self.connections = ConnectionLimit(MAX_CONNECTIONS_PER_ADDRESS)
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
            result: RefusalDigest(
                clock, REFUSAL_DIGEST_SECONDS, partial(self._tell_count, result)
            )
            for result in CONNECTION_REFUSALS
        }

    def refused_connection(
        self, result: str, attempt: _Attempt, reason: str, auth_failure: bool = False
    ) -> None:
        """
        Audit a connection refused before any request (C{result} one of
        L{CONNECTION_REFUSALS}), unless its address had one refused like it
        within the window: that one is counted, and told with the others
        when the window ends.
        """
        if self._digests[result].refused(attempt.peer):
            self.record(attempt, 0, result, reason, auth_failure)

    def _tell_count(self, result: str, address: str, count: int) -> None:
        now = self.clock.seconds()
        attempt = _Attempt(
            peer=address, started=now, names=frozenset(), fingerprint=None, certified=False
        )
        self.record(
            attempt,
            0,
            result,
            "%d more connections refused like this within %d s"
            % (count, REFUSAL_DIGEST_SECONDS),
            auth_failure=CONNECTION_REFUSALS[result],
            count=count,
        )

    def stop(self) -> None:
        """
        The site stops listening: audit what the digests still count.
        """
        for digest in self._digests.values():
            digest.stop()

    def admit(self, attempt: _Attempt) -> None:
        """
        What the headers alone decide: bans, a certificate that names no
        authorised POP (before its body is read, let alone parsed), rates.

        @raise Forbidden: a key of C{attempt} is banned, or its certificate
            names no authorised POP.
        @raise RateLimited: a key of C{attempt} is over its rate.
        """
        self.check(attempt.admission_keys)
        if attempt.certified and not attempt.names & self.authorized_pops:
            raise _UnauthorisedCertificate(
                "no name of the client certificate is in authorized_pops"
            )

    def check(self, keys: tuple[str, ...]) -> None:
        """
        @raise Forbidden: one of C{keys} is banned.
        @raise RateLimited: one of C{keys} is over its rate.
        """
        for key in keys:
            self.bans.check(key)
        for key in keys:
            self.rates.check(key)

    def authenticated(self, attempt: _Attempt) -> None:
        for key in attempt.charged_keys:
            self.bans.record_success(key)

    def refused(self, attempt: _Attempt, refusal: RequestRefused) -> str:
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
        attempt: _Attempt,
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


def _single_header(
    request: IRequest, name: bytes, refusal: type[RequestRefused]
) -> bytes | None:
    """
    The one value of header C{name}, None if absent; C{refusal} if repeated
    (two signatures or two media types are never honest).
    """
    values = request.requestHeaders.getRawHeaders(name)
    if values is None:
        return None
    if len(values) != 1:
        raise refusal("header %s sent more than once" % (name.decode("ascii"),))
    return values[0]


SignatureCheck = Callable[[bytes], "frozenset[str] | None"]
"""
Verifies the signature over a raw body: the POP ids the credential proves,
or None when it names no POP (a shared token); raises
L{AuthenticationFailed} otherwise.
"""


class Authentication(Protocol):
    """
    How a request proves who sent it.
    """

    certified: bool
    """
    Whether the connection's names are proven (by a client certificate).
    """

    def identify(self, transport: ITransport) -> tuple[frozenset[str], str | None]:
        """
        What the connection proves before any request: the POP ids and the
        fingerprint of the credential (never the credential itself).
        """

    def check_credential(self, request: IRequest) -> None:
        """
        What the headers alone can prove, before any body is read or held.

        @raise AuthenticationFailed: the credential is wrong.
        """

    def signature_check(self, request: IRequest) -> SignatureCheck:
        """
        Take from C{request}, on the reactor thread, what its signature is
        checked against: a check of the raw body that touches nothing of
        Twisted's, so it can run in a thread.

        @raise AuthenticationFailed: the credential is missing or wrong.
        """


class CertificateAuthentication:
    """
    C{mtls}: the TLS client certificate (already chained to the CA by the
    handshake) signs the body; its subjectAltName DNS names, never its CN,
    are the POPs it proves.
    """

    certified = True

    def identify(self, transport: ITransport) -> tuple[frozenset[str], str | None]:
        certificate = tls.peer_certificate(transport)
        if certificate is None:
            return frozenset(), None
        return (
            tls.dns_names(certificate),
            fingerprint(certificate.public_bytes(Encoding.DER)),
        )

    def check_credential(self, request: IRequest) -> None:
        """
        Nothing more to check: the handshake verified the certificate.
        """

    def signature_check(self, request: IRequest) -> SignatureCheck:
        certificate = tls.peer_certificate(request.channel.transport)
        if certificate is None:
            raise AuthenticationFailed("no client certificate")
        header = _single_header(request, protocol.SIGNATURE_HEADER, AuthenticationFailed)
        public_key = certificate.public_key()
        names = tls.dns_names(certificate)

        def check(body: bytes) -> frozenset[str]:
            protocol.verify_certificate_signature(header, body, public_key)
            return names

        return check


class TokenAuthentication:
    """
    C{bearer}: the bearer token must be the current or the previous token,
    and the HMAC must be keyed with one of them (not necessarily the same:
    a sender may read its token file between signing and sending).  Every
    token is compared in constant time.  The connection proves nothing, and
    no fingerprint of a token is recorded.
    """

    certified = False

    def __init__(self, token_source: TokenSource) -> None:
        self._token_source = token_source

    def identify(self, transport: ITransport) -> tuple[frozenset[str], str | None]:
        return frozenset(), None

    def check_credential(self, request: IRequest) -> None:
        """
        The bearer token, checked at the headers: without it, nobody gets a
        body read, let alone held in memory.
        """
        presented = self._bearer_token(request)
        # Compare with every token, not stopping at a match.
        matches = [
            hmac.compare_digest(presented, token)
            for token in self._token_source.tokens().all()
        ]
        if not any(matches):
            raise AuthenticationFailed("bearer token matches no token")

    def signature_check(self, request: IRequest) -> SignatureCheck:
        self.check_credential(request)
        header = _single_header(request, protocol.SIGNATURE_HEADER, AuthenticationFailed)
        tokens = self._token_source.tokens()

        def check(body: bytes) -> None:
            protocol.verify_hmac_signature(header, body, tokens)

        return check

    @staticmethod
    def _bearer_token(request: IRequest) -> bytes:
        value = _single_header(request, b"Authorization", AuthenticationFailed)
        if value is None:
            raise AuthenticationFailed("no Authorization header")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise AuthenticationFailed("Authorization is not a bearer token")
        return token


class _StrictChunkedDecoder(http._ChunkedTransferDecoder):
    """
    twisted.web's chunked decoder, refusing at once what it would wait on
    until the request deadline: a chunk-size line ending in a bare LF (it
    waits for a CRLF that never comes), and a chunk declared larger than
    the body may still grow (it waits for the bytes).  Trailer fields are
    refused too: the sender never sends any, and twisted.web does not check
    their framing (a bare CR, folding, a NUL).

    C{announced} is told each chunk's declared size before its data.
    """

    def __init__(
        self,
        data_received: Callable[[bytes], None],
        finished: Callable[[bytes], None],
        announced: Callable[[int], None],
    ) -> None:
        super().__init__(data_received, finished)
        self._announced = announced

    def _refuse_bare_lf(self) -> None:
        # Every LF before _start was seen by an earlier call; the first LF
        # after it ends the chunk-size line.
        end = self._buffer.find(b"\n", self._start)
        if end != -1 and self._buffer[end - 1 : end] != b"\r":
            raise http._MalformedChunkedDataError("chunk line ends in a bare LF")

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        self._refuse_bare_lf()
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        self._announced(self.length)
        return True

    def _dataReceived_TRAILER(self) -> bool:
        if not b"\r\n".startswith(self._buffer[:2]):
            raise http._MalformedChunkedDataError("trailer fields after the last chunk")
        return super()._dataReceived_TRAILER()


class _ApiChannel(http.HTTPChannel):
    """
    HTTP/1.1 (no HTTP/2) whose refusals of bad framing are JSON answers
    with the security headers, after which it reads nothing more.

    Besides the site's idle timeout, each request has a deadline: from
    its first byte (from the connection for the first request) until its
    headers and body are in, at most C{request_timeout} seconds, or the
    connection is aborted.  A peer sending a byte now and then keeps a
    connection from going idle, not from ending.
    """

    _closing = False
    _any_request = False
    _connected_at = 0.0
    _abort = None
    _counted: str | None = None
    _deadline = None
    _heard = False
    _receiving: "_ApiRequest | None" = None

    def lineReceived(self, line: bytes) -> None:
        """
        A line starting with a space or tab (obsolete header folding) is
        refused, as RFC 9112 allows: a folded Content-Length or
        Transfer-Encoding reads differently to different parsers.  So is a
        line holding a CR or LF: a bare LF ends a line for some parsers
        (it would smuggle a header past twisted.web, which splits on CRLF
        only).
        """
        if line[:1] in (b" ", b"\t") or b"\n" in line or b"\r" in line:
            self._respondToBadRequestAndDisconnect()
            return
        super().lineReceived(line)

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        """
        Also refused: a Content-Length longer than any cap could need
        (twisted.web would raise converting 5000 digits, unanswered).
        """
        if header == b"Content-Length" and len(data) > _MAX_LENGTH_DIGITS:
            return self._failChooseTransferDecoder()
        proceed = super()._maybeChooseTransferDecoder(header, data)
        decoder = self._transferDecoder
        if proceed and type(decoder) is http._ChunkedTransferDecoder:
            self._transferDecoder = _StrictChunkedDecoder(
                decoder.dataCallback,
                decoder.finishCallback,
                self.requests[-1].chunk_announced,
            )
        return proceed

    def connectionMade(self) -> None:
        """
        Count the connection against its peer address; one over the limit
        is dropped at once, before a byte of it is read.
        """
        super().connectionMade()
        defences = self.site.defences
        self._connected_at = defences.clock.seconds()
        peer = self.transport.getPeer()
        address = getattr(peer, "host", str(peer))
        try:
            defences.connection_rates.check(_address_key(address))
        except RateLimited as refusal:
            self._drop("connection_rate_limited", refusal.detail)
            return
        if defences.connections.acquire(address):
            self._counted = address
            self._start_deadline()
            return
        self._drop(
            "too_many_connections",
            "%d connections already open from this address" % (MAX_CONNECTIONS_PER_ADDRESS,),
        )

    def _drop(self, result: str, reason: str) -> None:
        """
        Drop the connection just made, before its TLS handshake.
        """
        self._closing = True
        self.transport.abortConnection()
        self.site.defences.refused_connection(result, self._bare_attempt(), reason)

    def dataReceived(self, data: bytes) -> None:
        """
        Besides the deadline: what is left unparsed of a request's head
        after all complete lines were taken is part of one line, so an LF
        in it is a bare LF (a peer ending lines that way would otherwise
        wait out the deadline, or fill MAX_LENGTH, for a CRLF).
        """
        if self._closing:
            return
        self._heard = True
        self._start_deadline()
        super().dataReceived(data)
        if (
            self.line_mode
            and not self._busyReceiving
            and not self.paused
            and b"\n" in self._buffer
        ):
            self._respondToBadRequestAndDisconnect()

    def request_started(self, request: "_ApiRequest") -> None:
        self._any_request = True
        self._receiving = request
        self._start_deadline()

    def request_received(self) -> None:
        """
        The request being received is complete: no deadline until the
        next one starts.
        """
        self._receiving = None
        self._heard = False
        self._cancel_deadline()

    def _start_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(
                self.site.defences.request_timeout, self._timed_out
            )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        self._closing = True
        log.warn(
            "aborted a connection from {peer}: request not complete within {timeout} s",
            peer=self._counted,
            timeout=self.site.defences.request_timeout,
        )
        if self._receiving is not None:
            attempt = self._receiving.attempt
        elif self._heard:
            # Not even a request line yet.
            attempt = self._bare_attempt()
        else:
            attempt = None
        if attempt is not None:
            self.site.defences.record(
                attempt,
                http.REQUEST_TIMEOUT,
                "timeout",
                "request not complete within request_timeout",
            )
        self.transport.abortConnection()

    def refuse_and_close(self, refusal: RequestRefused, attempt: _Attempt) -> None:
        """
        Answer C{refusal} now, whatever of the request is still to come,
        then close; if the peer does not let the connection close, abort it
        after C{abortTimeout}, as Twisted does for a timed-out client.
        """
        if self._closing:
            return
        self._closing = True
        self._cancel_deadline()
        body = _document({"error": refusal.word})
        headers = Headers()
        for name, value in SECURITY_HEADERS:
            headers.addRawHeader(name, value)
        headers.addRawHeader(b"Content-Length", b"%d" % (len(body),))
        headers.addRawHeader(b"Connection", b"close")
        for name, value in _refusal_headers(refusal):
            headers.addRawHeader(name, value)
        self.writeHeaders(
            b"HTTP/1.1",
            b"%d" % (refusal.status,),
            _REASON_PHRASES.get(refusal.status, b"Refused"),
            headers,
        )
        self.write(body)
        self.loseConnection()
        self._abort = self.callLater(self.abortTimeout, self.forceAbortClient)
        defences = self.site.defences
        defences.record(
            attempt,
            refusal.status,
            refusal.word,
            defences.refused(attempt, refusal),
            refusal.counts_as_auth_failure,
        )

    def _audit_refused_handshake(self, reason: Failure) -> None:
        """
        A peer refused at the TLS handshake (no client certificate, another
        CA, an expired one) made an attempt too: audit it as a failed
        authentication (critical, for alerts).  It proves no identity, so it
        is charged to no ban: that would let a stranger behind a partner's
        address get the partner banned.
        """
        self.site.defences.refused_connection(
            "tls_refused",
            self._bare_attempt(),
            "TLS handshake refused: " + reason.getErrorMessage(),
            auth_failure=True,
        )

    def _bare_attempt(self) -> _Attempt:
        """
        The audit's view of this connection when no request of it is being
        read: its peer address and when it came, nothing proven.
        """
        peer = self.transport.getPeer()
        return _Attempt(
            peer=getattr(peer, "host", str(peer)),
            started=self._connected_at,
            names=frozenset(),
            fingerprint=None,
            certified=False,
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A request or header line over C{MAX_LENGTH}: a JSON 400 like any
        framing refusal, where Twisted would close without a word.
        """
        self.refuse_and_close(
            Malformed("request or header line longer than %d bytes" % (self.MAX_LENGTH,)),
            self._parsed_attempt(),
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's single hook for every framing error it detects (request
        # line, headers, Content-Length, Transfer-Encoding, chunks), and
        # ours for the line endings it does not.
        self.refuse_and_close(
            Malformed("HTTP framing refused: bad request line, header or chunk"),
            self._parsed_attempt(),
        )

    def _parsed_attempt(self) -> _Attempt:
        """
        The attempt whose head or body is being parsed: the last request,
        or the bare connection before a request line is complete.  (Lines
        are parsed only once the requests before are answered.)
        """
        return self.requests[-1].attempt if self.requests else self._bare_attempt()

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(SSL.Error) and not self._any_request:
            self._audit_refused_handshake(reason)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._cancel_deadline()
        if self._counted is not None:
            self.site.defences.connections.release(self._counted)
            self._counted = None
        super().connectionLost(reason)


class _ApiRequest(server.Request):
    """
    A request of the replication API.

    The body is kept in memory, never more than C{max_request_bytes} of
    it, and only what the site's L{BodyBudget} has room for: a declared
    length is reserved whole at the headers, a chunked body as it comes,
    and released when the request is done.  A refusal decided on the
    headers alone (framing, size, ban, rate, unauthorised certificate, no
    room in the budget) is answered at once, without reading the body or
    sending C{100 Continue}, and the connection closed; the resources never
    see the request.
    """

    def __init__(self, channel: _ApiChannel, *args, **kwargs) -> None:
        super().__init__(channel, *args, **kwargs)
        self._defences: Defences = channel.site.defences
        authentication = channel.site.authentication
        names, credential = authentication.identify(self.transport)
        authorised = names & self._defences.authorized_pops
        self.attempt = _Attempt(
            peer=_peer(self),
            started=self._defences.clock.seconds(),
            names=names,
            fingerprint=credential,
            certified=authentication.certified,
            authorised=authorised,
            # Known whatever becomes of the request.
            proven_pop=",".join(sorted(authorised)) or None,
        )
        self._cut_off = False
        self._gone = False
        self._chunked = False
        self._discard = False
        self._reserved = 0
        finished = self.notifyFinish()
        finished.addErrback(self._went_away)
        finished.addBoth(lambda _: self._release_body())
        channel.request_started(self)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self._chunked = length is None
        try:
            self._check_framing(length)
            self._defences.admit(self.attempt)
            self._discard = not self._credential_holds()
            if length is not None and not self._discard:
                self._defences.bodies.reserve(length, self.attempt.budget_key)
                self._reserved = length
        except RequestRefused as refusal:
            self._cut(refusal)

    def _check_framing(self, length: int | None) -> None:
        """
        What twisted.web lets through but we do not: a Host header missing
        or repeated (RFC 9112), a Transfer-Encoding other than one
        C{chunked} (it ignores C{identity}), and a declared body above the
        cap.
        """
        hosts = self.requestHeaders.getRawHeaders(b"Host")
        if hosts is None or len(hosts) != 1:
            raise Malformed("Host header missing or repeated")
        encodings = self.requestHeaders.getRawHeaders(b"Transfer-Encoding")
        if encodings is not None and [e.lower() for e in encodings] != [b"chunked"]:
            raise Malformed("Transfer-Encoding other than chunked")
        if length is not None and length > self._defences.max_request_bytes:
            raise TooLarge("declared Content-Length %d above max_request_bytes" % (length,))

    def _credential_holds(self) -> bool:
        """
        Whether the credential the headers carry is right (a bearer token).
        A request without one is still answered in turn (its 401 comes
        from the resource, counted like any failed authentication), but its
        body is neither held nor given room in the budget.
        """
        try:
            self.channel.site.authentication.check_credential(self)
        except AuthenticationFailed:
            return False
        return True

    def handleContentChunk(self, data: bytes) -> None:
        if self._cut_off:
            return
        self.attempt.bytes += len(data)
        try:
            # Chunks are refused at their size line already (chunk_announced);
            # this holds the cap whatever decoder delivers the body.
            if self.attempt.bytes > self._defences.max_request_bytes:
                raise TooLarge("chunked body passed max_request_bytes")
            if self._discard:
                return
            if self._chunked:
                self._defences.bodies.reserve(len(data), self.attempt.budget_key)
                self._reserved += len(data)
        except RequestRefused as refusal:
            self._cut(refusal)
        else:
            self.content.write(data)

    def chunk_announced(self, size: int) -> None:
        """
        A chunk of C{size} bytes is declared: one that would take the body
        past the cap is refused now, not once the bytes have come.
        """
        if not self._cut_off and self.attempt.bytes + size > self._defences.max_request_bytes:
            self._cut(TooLarge("chunk of %d bytes declared past max_request_bytes" % (size,)))

    def _release_body(self) -> None:
        self._defences.bodies.release(self._reserved, self.attempt.budget_key)
        self._reserved = 0

    def _cut(self, refusal: RequestRefused) -> None:
        self._cut_off = True
        self.content = BytesIO()
        self._release_body()
        # No "100 Continue" after the answer.
        self.requestHeaders.removeHeader(b"Expect")
        self.channel.refuse_and_close(refusal, self.attempt)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._cut_off:
            return
        self.channel.request_received()
        if version != b"HTTP/1.1" and self.requestHeaders.hasHeader(
            b"Transfer-Encoding"
        ):
            # RFC 9112 6.1: such framing is faulty.
            self._cut(Malformed("Transfer-Encoding in a request before HTTP/1.1"))
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Render the site's single resource (no traversal, no special case
        for C{*}).
        """
        self.site = self.channel.site
        self.setHeader(b"Date", http.datetimeToString(self._defences.clock.seconds()))
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            for name, value in SECURITY_HEADERS:
                self.responseHeaders.setRawHeaders(name, [value])
        super().write(data)

    def conclude(
        self,
        status: int,
        document: dict[str, Any],
        *,
        result: str,
        reason: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        auth_failure: bool = False,
    ) -> None:
        """
        Audit and answer (unless the peer has gone): every request that is
        not cut off ends here, once.  The record comes first: finishing
        lets the channel go on to a pipelined request at once.
        """
        if self._gone:
            reason += "; the peer went away before the answer"
        self._defences.record(self.attempt, status, result, reason, auth_failure)
        if self._gone:
            return
        for name, value in headers:
            self.setHeader(name, value)
        body = _document(document)
        self.setResponseCode(status)
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(body)
        self.finish()

    def refuse(self, refusal: RequestRefused) -> None:
        self.conclude(
            refusal.status,
            {"error": refusal.word},
            result=refusal.word,
            reason=self._defences.refused(self.attempt, refusal),
            headers=_refusal_headers(refusal),
            auth_failure=refusal.counts_as_auth_failure,
        )

    def processingFailed(self, reason: Failure) -> None:
        """
        An unexpected error: its text (a path, perhaps) stays in the log.
        """
        log.failure(
            "replication request from {peer} failed",
            failure=reason,
            peer=self.attempt.peer,
            claimed_pop=self.attempt.claimed_pop,
        )
        self.conclude(
            500,
            {"error": "internal"},
            result="internal",
            reason="internal error: " + reason.type.__name__,
        )

    def _went_away(self, reason: Failure) -> None:
        self._gone = True


class ApplyResource(Resource):
    """
    C{POST /api/replication/apply}: check a signed batch and apply it.
    """

    isLeaf = True

    def __init__(
        self,
        config: Config,
        store: VaultStore,
        defences: Defences,
        authentication: Authentication,
        started_at: int,
    ) -> None:
        super().__init__()
        self._config = config
        self._store = store
        self._defences = defences
        self._authentication = authentication
        # The process before this one may have accepted (and its nonce cache
        # forgotten with it) any timestamp up to its last second plus the
        # skew, and that last second may be our start second: only what is
        # signed after started_at + clock_skew cannot have been applied.
        self._not_before = started_at + config.security.clock_skew + 1

    def _refuse_while_starting(self) -> None:
        """
        Until the restart window has passed, any fresh request would be
        refused as stale; say 503 and when to come back instead, so the
        sender waits just that long.
        """
        wait = self._not_before - self._defences.clock.seconds()
        if wait > 0:
            raise NotReady(
                "starting: requests signed before second {} may have been applied"
                " by the previous process".format(self._not_before),
                retry_after=math.ceil(wait),
            )

    def render(self, request: _ApiRequest) -> int:
        answered = Deferred.fromCoroutine(self._accept(request, request.attempt))
        answered.addErrback(self._refused, request)
        return server.NOT_DONE_YET

    async def _accept(self, request: _ApiRequest, attempt: _Attempt) -> None:
        """
        The chain of checks, then the apply and the 200.
        """
        if request.method != b"POST":
            raise MethodNotAllowed("method is not POST")
        self._check_media_type(request)
        self._refuse_while_starting()
        body = request.content.getvalue()
        # A body of max_request_bytes takes a good part of a second to
        # verify and parse: in threads, so the reactor serves others meanwhile.
        check = self._authentication.signature_check(request)
        proven = await deferToThread(check, body)
        self._defences.authenticated(attempt)
        batch = await deferToThread(
            protocol.parse_batch, body, self._config.security.max_entry_bytes
        )
        attempt.describe(batch)
        self._check_identity(batch, proven, attempt)
        protocol.check_freshness(
            batch,
            now=int(self._defences.clock.seconds()),
            max_age=self._config.replication.max_request_age,
            clock_skew=self._config.security.clock_skew,
            not_before=self._not_before,
        )
        self._defences.nonces.check_and_record(batch.nonce, batch.timestamp)
        applied, skipped = await self._store.apply_batch(
            batch.source_pop, batch.epoch, batch.seq, batch.entries
        )
        request.conclude(
            200,
            {
                "applied": applied,
                "skipped": skipped,
                "seq": batch.seq,
                "pop_id": self._config.pop_id,
                "role": self._config.role.value,
            },
            result="applied",
            reason="epoch %d seq %d: applied %d, skipped %d"
            % (batch.epoch, batch.seq, applied, skipped),
        )

    @staticmethod
    def _check_media_type(request: IRequest) -> None:
        value = _single_header(request, b"Content-Type", UnsupportedMediaType)
        media_type = (value or b"").split(b";", 1)[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise UnsupportedMediaType("content type is not application/json")

    def _check_identity(
        self,
        batch: protocol.Batch,
        proven: frozenset[str] | None,
        attempt: _Attempt,
    ) -> None:
        if proven is None:
            # A verified token vouches for the body, so for its source_pop:
            # that POP's ban and rate apply from here.
            attempt.proven_pop = batch.source_pop
            self._defences.check(_pop_keys((batch.source_pop,)))
        elif batch.source_pop not in proven:
            raise Forbidden("source_pop is not a name of the client certificate")
        if batch.source_pop not in self._config.authorized_pops:
            raise Forbidden("source_pop is not in authorized_pops")
        if batch.target_pop != self._config.pop_id:
            raise Conflict("target_pop is not this POP")

    @staticmethod
    def _refused(failure: Failure, request: _ApiRequest) -> None:
        if failure.check(RequestRefused):
            request.refuse(failure.value)
        else:
            request.processingFailed(failure)


class _Routes(Resource):
    """
    The site root: exact paths to resources, a JSON 404 for anything else.
    """

    isLeaf = True

    def __init__(self, routes: dict[bytes, Resource]) -> None:
        super().__init__()
        self._routes = routes

    def render(self, request: _ApiRequest) -> Any:
        # The whole target, query included: nothing else is an endpoint.
        resource = self._routes.get(request.uri)
        if resource is None:
            request.conclude(
                404, {"error": "not_found"}, result="not_found", reason="unknown path"
            )
            return server.NOT_DONE_YET
        return resource.render(request)


class _ApiSite(server.Site):
    """
    The site with what its channels and requests share: the defences and
    how a connection proves its identity.
    """

    protocol = _ApiChannel
    requestFactory = _ApiRequest

    def __init__(
        self,
        resource: Resource,
        defences: Defences,
        authentication: Authentication,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.defences = defences
        self.authentication = authentication

    def stopFactory(self) -> None:
        self.defences.stop()
        super().stopFactory()


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", str(address))


def make_site(
    config: Config,
    store: VaultStore,
    clock: IReactorTime,
    token_source: TokenSource | None,
    started_at: int,
    *,
    audit: AuditLog | None = None,
) -> server.Site:
    """
    The backup's HTTP site, to be served over TLS by the service (with a
    client certificate required in C{mtls} mode).

    C{started_at} is the start time in whole seconds, rounded down: a
    request signed up to C{security.clock_skew} seconds after it is refused
    as stale, since the process before this one may have applied it.

    Every attempt is recorded in C{audit}; by default an L{AuditLog} of
    C{security.audit_log} opened here, so that the configured file is
    written whoever builds the site.  A caller that must reopen it on
    SIGHUP and close it on stop passes its own.  The site's L{Defences}
    are its C{defences} attribute.

    @raise ConfigError: the audit log cannot be opened.
    """
    authentication: Authentication
    if config.auth.method == "bearer":
        if token_source is None:
            raise ValueError("bearer authentication needs a token source")
        authentication = TokenAuthentication(token_source)
    else:
        authentication = CertificateAuthentication()
    if audit is None:
        audit = AuditLog(config.security.audit_log, clock)
    defences = Defences(config, clock, audit)
    apply = ApplyResource(config, store, defences, authentication, started_at)
    return _ApiSite(
        _Routes({protocol.APPLY_PATH: apply}),
        defences,
        authentication,
        timeout=config.replication.request_timeout,
        reactor=clock,
    )
