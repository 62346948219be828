# -*- test-case-name: tests.test_receiver,tests.test_framing -*-
"""
The backup side of replication: C{POST /api/replication/apply}.

A request passes one short chain of checks (DESIGN.md rule 2), cheapest
first.  As soon as its headers are in, L{ApiRequest} (in
L{clavitor_twisted.framing}) refuses framing it cannot trust (400) or a
declared body above C{max_request_bytes} (413), and asks the L{Defences}
whether the peer address (and, in C{mtls}, what its certificate proves)
is banned (403) or over its rate (429), whether the certificate names an
authorised POP (403), and whether the declared body fits the budget of
bodies held at once (503); any of these is answered at once and the
connection closed, the body never read.  L{ApplyResource} then checks
method, media type, the signature on the raw bytes, the strict parse (both
in a thread), the identity the credential proves (and, in C{bearer}, that
POP's ban and rate), authorisation, target, freshness (refusing, as stale,
anything signed up to C{clock_skew} after the start second, which a
process before this one may have applied) and the nonce; only then is the
batch applied, in the vault thread pool.

Every request ends in exactly one audit record and an answer of
C{{"error": word}} (or the 200 document) with its status: JSON with
C{nosniff} and C{no-store}, without a C{Server} banner, whichever path
produced it, Twisted's own 400 for bad framing included.
"""

import hmac
import math
from typing import Any, Callable, Protocol

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from clavitor_twisted import protocol, tls
from clavitor_twisted.audit import AuditLog, fingerprint
from clavitor_twisted.config import Config
from clavitor_twisted.defences import Attempt, Defences, pop_keys
from clavitor_twisted.errors import (
    AuthenticationFailed,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotReady,
    RequestRefused,
    UnsupportedMediaType,
)
from clavitor_twisted.framing import JSON_MEDIA_TYPE, ApiRequest, ApiSite
from clavitor_twisted.tokens import TokenSource
from clavitor_twisted.vault import VaultStore

log = Logger()


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

    def render(self, request: ApiRequest) -> int:
        answered = Deferred.fromCoroutine(self._accept(request, request.attempt))
        answered.addErrback(self._refused, request)
        return server.NOT_DONE_YET

    async def _accept(self, request: ApiRequest, attempt: Attempt) -> None:
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
        attempt: Attempt,
    ) -> None:
        if proven is not None and batch.source_pop not in proven:
            raise Forbidden("source_pop is not a name of the client certificate")
        if batch.source_pop not in self._config.authorized_pops:
            raise Forbidden("source_pop is not in authorized_pops")
        if proven is None:
            # A verified token vouches for the body, so for its (authorised)
            # source_pop: that POP's ban and rate apply from here.
            attempt.proven_pop = batch.source_pop
            self._defences.check(pop_keys((batch.source_pop,)))
        if batch.target_pop != self._config.pop_id:
            raise Conflict("target_pop is not this POP")

    @staticmethod
    def _refused(failure: Failure, request: ApiRequest) -> None:
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

    def render(self, request: ApiRequest) -> Any:
        # The whole target, query included: nothing else is an endpoint.
        resource = self._routes.get(request.uri)
        if resource is None:
            request.conclude(
                404, {"error": "not_found"}, result="not_found", reason="unknown path"
            )
            return server.NOT_DONE_YET
        return resource.render(request)


def make_site(
    config: Config,
    store: VaultStore,
    clock: IReactorTime,
    token_source: TokenSource | None,
    started_at: int,
    *,
    audit: AuditLog | None = None,
    max_connections: int | None = None,
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
    are its C{defences} attribute.  It holds at most C{max_connections}
    connections open, by default as many as the file limit allows (see
    L{clavitor_twisted.defences.connection_limit_for_files}).

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
    defences = Defences(config, clock, audit, max_connections)
    apply = ApplyResource(config, store, defences, authentication, started_at)
    return ApiSite(
        _Routes({protocol.APPLY_PATH: apply}),
        defences,
        authentication,
        timeout=config.replication.request_timeout,
        reactor=clock,
    )

