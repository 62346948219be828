# -*- test-case-name: tests.test_framing -*-
"""
The HTTP layer of the backup's site, hardened: L{ApiChannel} and
L{ApiRequest} refuse what twisted.web lets through or waits on (folded
headers, bare LF or CR, a missing or repeated C{Host}, a Content-Length of
thousands of digits, chunk sizes past the cap, trailers), cap each body
while it streams in and within the site's budget, drop connections over
the per-address rate or count before any TLS work, and hold each request
to a deadline.  Every refusal is a JSON answer of one word with the
security headers, after which the connection reads nothing more, and
every attempt ends in one audit record (see L{clavitor_twisted.defences}).
"""

import json
from io import BytesIO
from typing import TYPE_CHECKING, Any, Callable

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from clavitor_twisted.defences import (
    MAX_CONNECTIONS_PER_ADDRESS,
    Attempt,
    Defences,
    address_key,
)
from clavitor_twisted.errors import (
    AuthenticationFailed,
    Malformed,
    MethodNotAllowed,
    RateLimited,
    RequestRefused,
    TooLarge,
)

if TYPE_CHECKING:
    from clavitor_twisted.receiver import Authentication

JSON_MEDIA_TYPE = b"application/json"

# twisted.web's table lacks 429.
_REASON_PHRASES = {**http.RESPONSES, 429: b"Too Many Requests"}

# Digits of a Content-Length: the largest max_request_bytes has 10.
_MAX_LENGTH_DIGITS = 18

# Sent with every answer of the site.
SECURITY_HEADERS = (
    (b"Content-Type", JSON_MEDIA_TYPE),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Cache-Control", b"no-store"),
)

log = Logger()


def _refusal_headers(refusal: RequestRefused) -> tuple[tuple[bytes, bytes], ...]:
    if refusal.retry_after is not None:
        return ((b"Retry-After", b"%d" % (refusal.retry_after,)),)
    if isinstance(refusal, MethodNotAllowed):
        return ((b"Allow", b"POST"),)
    return ()


def _document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("ascii")


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


class ApiChannel(http.HTTPChannel):
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
    _secured = False
    # What the client certificate proves, once data came.
    _identity: tuple[frozenset[str], str | None] = (frozenset(), None)
    _any_request = False
    _connected_at = 0.0
    _abort = None
    _counted: str | None = None
    _deadline = None
    _heard = False
    _receiving: "ApiRequest | None" = None

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
        Count the connection against its peer address's rate and cap and
        against all open connections; one over a limit is dropped at once,
        before a byte of it is read (when all connections are taken, the
        oldest unproven one makes room instead, if there is one).
        """
        super().connectionMade()
        defences = self.site.defences
        self._connected_at = defences.clock.seconds()
        peer = self.transport.getPeer()
        address = getattr(peer, "host", str(peer))
        try:
            defences.connection_rates.check(address_key(address))
        except RateLimited as refusal:
            self._drop("connection_rate_limited", refusal.detail)
            return
        if not defences.connections.acquire(address):
            self._drop(
                "too_many_connections",
                "%d connections already open from this address"
                % (MAX_CONNECTIONS_PER_ADDRESS,),
            )
            return
        admitted, displaced = defences.open_connections.open(self)
        if not admitted:
            defences.connections.release(address)
            self._drop(
                "too_many_connections",
                "all %d connections of the backup open and proven"
                % (defences.open_connections.limit,),
            )
            return
        self._counted = address
        self._start_deadline()
        if displaced is not None:
            displaced.displace()

    def _first_data(self) -> bool:
        """
        The first data, so the TLS handshake is done and the certificate
        verified: a banned peer, or a certificate that names no authorised
        POP, is refused now, without waiting for a request (which it could
        leave unfinished, holding a connection); a certificate that does
        proves a partner's connection.  Whether to read on.
        """
        self._secured = True
        # Read once: every attempt of the connection shares it.
        self._identity = self.site.authentication.identify(self.transport)
        attempt = self._bare_attempt()
        defences = self.site.defences
        refusal = defences.connection_refusal(attempt)
        if refusal is not None:
            # As fast as a stranger can connect: audited like the other
            # refused connections, once a minute per address with a count.
            self.refuse_and_close(refusal, attempt, digest=True)
            return False
        if attempt.certified:
            defences.open_connections.proven(self)
        return True

    def credential_proven(self) -> None:
        """
        A request's credential held (the bearer token): a partner's
        connection.
        """
        self.site.defences.open_connections.proven(self)

    def displace(self) -> None:
        """
        The backup is full and this connection has not proven it comes
        from a partner: it makes room for a new one.
        """
        self._closing = True
        self.transport.abortConnection()
        self.site.defences.refused_connection(
            "too_many_connections",
            self._bare_attempt(),
            "closed, not yet proven, to make room: all connections of the backup open",
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
        if not self._secured and not self._first_data():
            return
        self._start_deadline()
        super().dataReceived(data)
        if (
            self.line_mode
            and not self._busyReceiving
            and not self.paused
            and b"\n" in self._buffer
        ):
            self._respondToBadRequestAndDisconnect()

    def request_started(self, request: "ApiRequest") -> None:
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

    def refuse_and_close(
        self, refusal: RequestRefused, attempt: Attempt, digest: bool = False
    ) -> None:
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
        reason = defences.refused(attempt, refusal)
        if digest:
            defences.refused_connection(
                refusal.word, attempt, reason, refusal.counts_as_auth_failure, refusal.status
            )
        else:
            defences.record(
                attempt, refusal.status, refusal.word, reason, refusal.counts_as_auth_failure
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

    def new_attempt(self, started: float) -> Attempt:
        """
        A fresh audit view of this connection: its peer address and, once
        data came (after the TLS handshake, so the certificate verified),
        what its client certificate proves.
        """
        site = self.site
        names, credential = self._identity
        authorised = names & site.defences.authorized_pops
        peer = self.transport.getPeer()
        return Attempt(
            peer=getattr(peer, "host", str(peer)),
            started=started,
            names=names,
            fingerprint=credential,
            certified=site.authentication.certified,
            authorised=authorised,
            # Known whatever becomes of the attempt.
            proven_pop=",".join(sorted(authorised)) or None,
        )

    def _bare_attempt(self) -> Attempt:
        """
        The audit's view of this connection when no request of it is being
        read: since it came.
        """
        return self.new_attempt(self._connected_at)

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

    def _parsed_attempt(self) -> Attempt:
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
            self.site.defences.open_connections.close(self)
            self._counted = None
        super().connectionLost(reason)


class ApiRequest(server.Request):
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

    def __init__(self, channel: ApiChannel, *args, **kwargs) -> None:
        super().__init__(channel, *args, **kwargs)
        self._defences: Defences = channel.site.defences
        self.attempt = channel.new_attempt(self._defences.clock.seconds())
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
            if not self._discard:
                self.channel.credential_proven()
            if self._discard:
                # Its body is thrown away: no "100 Continue" asks for it.
                self.requestHeaders.removeHeader(b"Expect")
            elif length is not None:
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


class ApiSite(server.Site):
    """
    The site with what its channels and requests share: the defences and
    how a connection proves its identity.
    """

    protocol = ApiChannel
    requestFactory = ApiRequest

    def __init__(
        self,
        resource: Resource,
        defences: Defences,
        authentication: "Authentication",
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.defences = defences
        self.authentication = authentication

    def stopFactory(self) -> None:
        self.defences.stop()
        super().stopFactory()



