# -*- test-case-name: tests.test_receiver -*-
"""
The backup side of replication: C{POST /api/replication/apply}.

A request passes one short chain of checks (DESIGN.md rule 2): method,
media type, size, authentication on the raw bytes, strict parsing, the
identity the credential proves, authorisation, target, freshness and the
nonce; only then is the batch applied, in the vault thread pool.  Any check
that fails raises a L{RequestRefused}; the edge answers its status with
C{{"error": word}} and logs the detail, never showing it to the peer.

Every answer of the site is JSON with C{nosniff} and C{no-store} and without
a C{Server} banner, whichever path produced it.
"""

import hmac
import json
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from clavitor_twisted import protocol, tls
from clavitor_twisted.config import Config
from clavitor_twisted.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    RateLimited,
    RequestRefused,
    TooLarge,
    UnsupportedMediaType,
)
from clavitor_twisted.guard import NonceCache
from clavitor_twisted.tokens import TokenSource
from clavitor_twisted.vault import VaultStore

JSON_MEDIA_TYPE = b"application/json"

# Sent with every answer of the site.
SECURITY_HEADERS = (
    (b"Content-Type", JSON_MEDIA_TYPE),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Cache-Control", b"no-store"),
)

log = Logger()


class _ApiRequest(server.Request):
    """
    A request of the replication API: whatever writes the answer (our
    resources or Twisted itself), it goes out with the security headers and
    without C{Server: TwistedWeb/x}.
    """

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.responseHeaders.removeHeader(b"Server")
            for name, value in SECURITY_HEADERS:
                self.responseHeaders.setRawHeaders(name, [value])
        super().write(data)


def _answer(request: IRequest, status: int, document: dict[str, Any]) -> None:
    body = json.dumps(document, separators=(",", ":")).encode("ascii")
    request.setResponseCode(status)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


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


class Authentication(Protocol):
    """
    How a request proves who sent it.
    """

    def authenticate(self, request: IRequest, body: bytes) -> frozenset[str] | None:
        """
        Verify the credential and the signature over the raw C{body}.

        @return: the POP ids the credential proves, or None when it names no
            POP (a shared token).
        @raise AuthenticationFailed: otherwise.
        """


class CertificateAuthentication:
    """
    C{mtls}: the TLS client certificate (already chained to the CA by the
    handshake) signs the body; its subjectAltName DNS names, never its CN,
    are the POPs it proves.
    """

    def authenticate(self, request: IRequest, body: bytes) -> frozenset[str]:
        certificate = tls.peer_certificate(request.channel.transport)
        if certificate is None:
            raise AuthenticationFailed("no client certificate")
        protocol.verify_certificate_signature(
            _single_header(request, protocol.SIGNATURE_HEADER, AuthenticationFailed),
            body,
            certificate.public_key(),
        )
        return tls.dns_names(certificate)


class TokenAuthentication:
    """
    C{bearer}: the bearer token must be the current or the previous token,
    and the HMAC must be keyed with one of them (not necessarily the same:
    a sender may read its token file between signing and sending).  Every
    token is compared in constant time.
    """

    def __init__(self, token_source: TokenSource) -> None:
        self._token_source = token_source

    def authenticate(self, request: IRequest, body: bytes) -> None:
        presented = self._bearer_token(request)
        tokens = self._token_source.tokens()
        # Compare with every token, not stopping at a match.
        matches = [hmac.compare_digest(presented, token) for token in tokens.all()]
        if not any(matches):
            raise AuthenticationFailed("bearer token matches no token")
        protocol.verify_hmac_signature(
            _single_header(request, protocol.SIGNATURE_HEADER, AuthenticationFailed),
            body,
            tokens,
        )
        return None

    @staticmethod
    def _bearer_token(request: IRequest) -> bytes:
        value = _single_header(request, b"Authorization", AuthenticationFailed)
        if value is None:
            raise AuthenticationFailed("no Authorization header")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise AuthenticationFailed("Authorization is not a bearer token")
        return token


@dataclass
class _Attempt:
    """
    What the log says about one request, filled in as the checks pass.
    """

    peer: str
    claimed_pop: str | None = None
    proven_pop: str | None = None
    entries: int = 0


class ApplyResource(Resource):
    """
    C{POST /api/replication/apply}: check a signed batch and apply it.
    """

    isLeaf = True

    def __init__(
        self,
        config: Config,
        store: VaultStore,
        clock: IReactorTime,
        authentication: Authentication,
        nonces: NonceCache,
        started_at: int,
    ) -> None:
        super().__init__()
        self._config = config
        self._store = store
        self._clock = clock
        self._authentication = authentication
        self._nonces = nonces
        self._started_at = started_at

    def render(self, request: IRequest) -> int:
        attempt = _Attempt(peer=_peer(request))
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        answered = Deferred.fromCoroutine(self._accept(request, attempt))
        answered.addCallbacks(
            lambda document: (200, document, ()),
            self._refused,
            errbackArgs=(attempt,),
        )
        answered.addCallback(self._send, request, attempt, gone)
        return server.NOT_DONE_YET

    async def _accept(self, request: IRequest, attempt: _Attempt) -> dict[str, Any]:
        """
        The chain of checks, then the apply; the 200 document.
        """
        if request.method != b"POST":
            raise MethodNotAllowed("method is not POST")
        self._check_media_type(request)
        body = self._read_body(request)
        proven = self._authentication.authenticate(request, body)
        batch = protocol.parse_batch(body, self._config.security.max_entry_bytes)
        attempt.claimed_pop = batch.source_pop
        attempt.entries = len(batch.entries)
        self._check_identity(batch, proven, attempt)
        protocol.check_freshness(
            batch,
            now=int(self._clock.seconds()),
            max_age=self._config.replication.max_request_age,
            clock_skew=self._config.security.clock_skew,
            not_before=self._started_at,
        )
        self._nonces.check_and_record(batch.nonce, batch.timestamp)
        applied, skipped = await self._store.apply_batch(
            batch.source_pop, batch.epoch, batch.seq, batch.entries
        )
        log.info(
            "applied {applied} entries, skipped {skipped}, from {source_pop}"
            " epoch {epoch} seq {seq}",
            applied=applied,
            skipped=skipped,
            source_pop=batch.source_pop,
            epoch=batch.epoch,
            seq=batch.seq,
            peer=attempt.peer,
        )
        return {
            "applied": applied,
            "skipped": skipped,
            "seq": batch.seq,
            "pop_id": self._config.pop_id,
            "role": self._config.role.value,
        }

    @staticmethod
    def _check_media_type(request: IRequest) -> None:
        value = _single_header(request, b"Content-Type", UnsupportedMediaType)
        media_type = (value or b"").split(b";", 1)[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            raise UnsupportedMediaType("content type is not application/json")

    def _read_body(self, request: IRequest) -> bytes:
        """
        The raw body, refused above C{max_request_bytes} whether it came
        with a Content-Length or chunked.  (twisted.web has buffered it
        already; cutting it off while it streams in is the guard's job.)
        """
        limit = self._config.security.max_request_bytes
        request.content.seek(0)
        body = request.content.read(limit + 1)
        if len(body) > limit:
            raise TooLarge("body above max_request_bytes")
        return body

    def _check_identity(
        self,
        batch: protocol.Batch,
        proven: frozenset[str] | None,
        attempt: _Attempt,
    ) -> None:
        if proven is not None:
            if batch.source_pop not in proven:
                raise Forbidden("source_pop is not a name of the client certificate")
            attempt.proven_pop = batch.source_pop
        if batch.source_pop not in self._config.authorized_pops:
            raise Forbidden("source_pop is not in authorized_pops")
        if batch.target_pop != self._config.pop_id:
            raise Conflict("target_pop is not this POP")

    @staticmethod
    def _refused(
        failure: Failure, attempt: _Attempt
    ) -> tuple[int, dict[str, str], tuple[tuple[bytes, bytes], ...]]:
        """
        Turn a refusal into its answer and log the detail; anything else is
        an internal error whose text stays in the log.
        """
        if not failure.check(RequestRefused):
            log.failure(
                "replication request from {peer} failed",
                failure=failure,
                peer=attempt.peer,
                claimed_pop=attempt.claimed_pop,
            )
            return 500, {"error": "internal"}, ()
        refusal = failure.value
        log.emit(
            LogLevel.error if refusal.counts_as_auth_failure else LogLevel.warn,
            "replication request from {peer} refused: {status} {word}"
            " ({reason!r}), claimed {claimed_pop!r}, proven {proven_pop!r}",
            peer=attempt.peer,
            status=refusal.status,
            word=refusal.word,
            reason=refusal.detail,
            claimed_pop=attempt.claimed_pop,
            proven_pop=attempt.proven_pop,
            entries=attempt.entries,
            auth_failure=refusal.counts_as_auth_failure,
        )
        headers: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(refusal, RateLimited):
            headers = ((b"Retry-After", b"%d" % (refusal.retry_after,)),)
        elif isinstance(refusal, MethodNotAllowed):
            headers = ((b"Allow", b"POST"),)
        return refusal.status, {"error": refusal.word}, headers

    @staticmethod
    def _send(
        answer: tuple[int, dict[str, Any], tuple[tuple[bytes, bytes], ...]],
        request: IRequest,
        attempt: _Attempt,
        gone: list[Failure],
    ) -> None:
        status, document, headers = answer
        if gone:
            log.info(
                "{peer} went away before its {status} answer",
                peer=attempt.peer,
                status=status,
            )
            return
        for name, value in headers:
            request.setHeader(name, value)
        _answer(request, status, document)


class _Routes(Resource):
    """
    The site root: exact paths to resources, a JSON 404 for anything else.
    """

    isLeaf = True

    def __init__(self, routes: dict[bytes, Resource]) -> None:
        super().__init__()
        self._routes = routes

    def render(self, request: IRequest) -> Any:
        resource = self._routes.get(request.path)
        if resource is None:
            log.info(
                "unknown path from {peer}", peer=_peer(request), path=request.path
            )
            _answer(request, 404, {"error": "not_found"})
            return server.NOT_DONE_YET
        return resource.render(request)


def _peer(request: IRequest) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", str(address))


def make_site(
    config: Config,
    store: VaultStore,
    clock: IReactorTime,
    token_source: TokenSource | None,
    started_at: int,
) -> server.Site:
    """
    The backup's HTTP site, to be served over TLS by the service (with a
    client certificate required in C{mtls} mode).
    """
    authentication: Authentication
    if config.auth.method == "bearer":
        if token_source is None:
            raise ValueError("bearer authentication needs a token source")
        authentication = TokenAuthentication(token_source)
    else:
        authentication = CertificateAuthentication()
    nonces = NonceCache(
        clock, config.replication.max_request_age, config.security.clock_skew
    )
    apply = ApplyResource(config, store, clock, authentication, nonces, started_at)
    return server.Site(
        _Routes({protocol.APPLY_PATH: apply}),
        requestFactory=_ApiRequest,
        timeout=config.replication.request_timeout,
        reactor=clock,
    )
