"""
Tests for the HTTP framing of L{clavitor_twisted.receiver}: the body cap while
the body streams in, framing that is malformed or ambiguous, pipelining,
refusals at the headers, the budget of bodies held at once, connections per
address and the per-request deadline (on the site's Clock).
Every request is written byte by byte by the test over a real loopback TLS
connection, and each would apply a valid signed batch if its framing were
accepted.
"""

import dataclasses
import os
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

from clavitor_twisted import pki, protocol, tls
from clavitor_twisted.defences import (
    BODY_BUDGET_REQUESTS,
    BODY_SHARE_REQUESTS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REFUSAL_DIGEST_SECONDS,
    Defences,
)
from clavitor_twisted.vault import list_vault_ids
from tests.test_receiver import (
    ENTRIES,
    MAX_REQUEST_BYTES,
    PARTNER,
    PARTNER_VAULT_ID,
    PRIMARY,
    STRANGER,
    VAULT_ID,
    ReceiverTestCase,
    _Collect,
    _HeldStore,
    chunked,
    http_request,
    parse_responses,
)


class _Holder(_Collect):
    """
    A raw client that sends C{request} and holds the connection open;
    C{ready} fires once its TLS handshake is done (so the server has the
    connection).
    """

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.ready = Deferred()

    def handshakeCompleted(self) -> None:
        self.ready.callback(None)


@inlineCallbacks
def until(predicate):
    """
    Wait, on the real reactor, until C{predicate()} holds (the server
    has read what a client sent).
    """
    while not predicate():
        yield deferLater(reactor, 0.005, lambda: None)


class _AnnouncingAudit:
    """
    Wraps the test's audit log to fire C{recorded} at the first record: the
    moment the server has decided.
    """

    def __init__(self, audit) -> None:
        self._audit = audit
        self.recorded = Deferred()

    def record(self, attempt) -> None:
        self._audit.record(attempt)
        if not self.recorded.called:
            self.recorded.callback(attempt)


class FramingTests(ReceiverTestCase):
    def headers_of(self, body):
        """
        The signed headers of C{body} as (name, value) pairs.
        """
        return [(name, value) for name, values in self.sign(body).items() for value in values]

    def padded(self, size, **changes):
        """
        A valid signed batch whose body is padded with JSON whitespace to
        exactly C{size} bytes: (body, headers).
        """
        body = protocol.serialise(self.batch(**changes))
        body += b" " * (size - len(body))
        self.assertEqual(len(body), size)
        return body, self.headers_of(body)

    def assertClosedAfter(self, client, status, word):
        """
        C{client} got exactly one answer, C{status} with C{word}, telling it
        the connection closes; then it was closed.
        """
        [response] = parse_responses(client.received)
        self.assertRawRefused(response, status, word)
        self.assertEqual(response[1][b"connection"], [b"close"])

    def assertOnlyRecord(self, result, status, bytes_received):
        [record] = self.records()
        self.assertEqual(
            (record["result"], record["status"], record["bytes"]),
            (result, status, bytes_received),
        )
        self.assertEqual(record["peer"], "127.0.0.1")
        return record

    @inlineCallbacks
    def test_declared_length_over_cap_refused_before_the_body(self):
        """
        A Content-Length above max_request_bytes gets 413 as soon as the
        headers are in: the client sends only the headers and still gets
        its answer, and the connection is closed.  (A server waiting for
        the body would leave this test hanging.)
        """
        body, headers = self.padded(MAX_REQUEST_BYTES + 1)
        head = http_request(body, headers)[: -len(body)]
        client = yield self.raw(head)
        self.assertClosedAfter(client, 413, "too_large")
        self.assertNothingApplied()
        record = self.assertOnlyRecord("too_large", 413, 0)
        self.assertIn("declared Content-Length", record["reason"])

    @inlineCallbacks
    def test_declared_length_over_cap_with_expect_continue(self):
        """
        A client that asks for C{100 Continue} before sending a body above
        the cap gets the 413 and nothing else.
        """
        body, headers = self.padded(MAX_REQUEST_BYTES + 1)
        head = http_request(body, headers + [(b"Expect", b"100-continue")])
        client = yield self.raw(head[: -len(body)])
        self.assertNotIn(b"100 Continue", client.received)
        self.assertClosedAfter(client, 413, "too_large")

    @inlineCallbacks
    def test_declared_length_over_cap_with_the_body(self):
        """
        One byte over the cap, the body sent along: 413, nothing applied,
        nothing of the body read as a next request.
        """
        body, headers = self.padded(MAX_REQUEST_BYTES + 1)
        client = yield self.raw(http_request(body, headers))
        self.assertClosedAfter(client, 413, "too_large")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_exactly_the_cap_accepted(self):
        """
        A valid batch of exactly max_request_bytes is applied, with a
        Content-Length and chunked.
        """
        body, headers = self.padded(MAX_REQUEST_BYTES)
        [response] = yield self.pipeline([http_request(body, headers, close=True)])
        self.assertEqual(response[0], 200, response[2])
        self.assertEqual(len(self.stored()[0]), 3)

        body, headers = self.padded(MAX_REQUEST_BYTES, seq=8)
        third = len(body) // 3
        request = http_request(
            chunked(body[:third], body[third : 2 * third], body[2 * third :]),
            headers + [(b"Transfer-Encoding", b"chunked")],
            length=False,
            close=True,
        )
        [response] = yield self.pipeline([request])
        self.assertEqual(response[0], 200, response[2])
        self.assertEqual([r["bytes"] for r in self.records()], [MAX_REQUEST_BYTES] * 2)

    @inlineCallbacks
    def test_chunked_over_cap_cut_off(self):
        """
        A chunked body is cut off at the size line of the chunk that would
        take it past the cap: 413 and the connection closed, though the body
        never ends.  Whatever follows, here more chunks and a valid
        pipelined request, is never read.
        """
        body, headers = self.padded(MAX_REQUEST_BYTES + 1)
        framed = chunked(body[:100], body[100:])
        unfinished = framed[: -len(b"0\r\n\r\n")]
        head = http_request(
            None, headers + [(b"Transfer-Encoding", b"chunked")], length=False
        )
        client = yield self.raw(head + unfinished)
        self.assertClosedAfter(client, 413, "too_large")
        self.assertNothingApplied()
        self.assertOnlyRecord("too_large", 413, 100)

        next_request = self.signed_request(self.batch())
        client = yield self.raw(
            head + unfinished + chunked(b" " * 50_000) + next_request
        )
        self.assertClosedAfter(client, 413, "too_large")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_peer_that_does_not_close_is_aborted(self):
        """
        After a 413 the server closes; a peer that never completes the close
        (it stops reading) is aborted after abortTimeout seconds of the
        site's clock, not kept open.
        """
        announcing = _AnnouncingAudit(self.audit)
        self.audit = announcing
        yield self.serve(self.store)
        body, headers = self.padded(MAX_REQUEST_BYTES + 1)
        client = _Collect(http_request(body, headers)[: -len(body)], deaf=True)
        yield self.connect(client)
        yield announcing.recorded
        [channel] = [p.wrappedProtocol for p in self.factory.protocols]
        closed = self.factory.whenAllLost()
        self.assertNoResult(closed)
        self.clock.advance(channel.abortTimeout)
        yield closed

        client.transport.abortConnection()
        yield client.lost

    def framing_refused(self, request):
        """
        C{request} gets one 400 with the security headers and is closed;
        nothing is applied, and the attempt is audited.
        """
        before = len(self.records())
        client = yield self.raw(request)
        self.assertClosedAfter(client, 400, "malformed")
        self.assertNothingApplied()
        [record] = self.records()[before:]
        self.assertEqual((record["result"], record["status"]), ("malformed", 400))

    def chunked_refused(self, body, framed):
        """
        C{framed} (C{body} in a chunked framing), sent with the headers
        signed for C{body}, is refused like any bad framing.
        """
        request = http_request(
            framed,
            self.headers_of(body) + [(b"Transfer-Encoding", b"chunked")],
            length=False,
        )
        yield from self.framing_refused(request)

    @inlineCallbacks
    def test_bad_content_length(self):
        """
        Content-Length values twisted.web refuses: negative, signed,
        non-numeric, hexadecimal, empty, a list, non-ASCII digits, two
        different values, or the same one twice.
        """
        body = protocol.serialise(self.batch())
        n = b"%d" % (len(body),)
        for values in (
            [b"-1"],
            [b"+" + n],
            [b"abc"],
            [b"0x10"],
            [b""],
            [n + b", " + n],
            ["\u0661".encode("utf-8")],
            [n, b"%d" % (len(body) + 1,)],
            [n, n],
        ):
            headers = self.headers_of(body) + [(b"Content-Length", v) for v in values]
            yield from self.framing_refused(http_request(body, headers, length=False))

    @inlineCallbacks
    def test_folded_headers(self):
        """
        Obsolete line folding is refused wherever it appears: a folded
        Content-Length or Transfer-Encoding could be read two ways.
        """
        body = protocol.serialise(self.batch())
        signed = self.headers_of(body)
        for folded in (
            b"Content-Length:\r\n %d" % (len(body),),
            b"Transfer-Encoding:\r\n\tchunked",
            b"X-Other: a\r\n b",
        ):
            request = http_request(body, signed, length=False)
            head, rest = request.split(b"\r\n\r\n", 1)
            if not folded.startswith(b"Content-Length"):
                head += b"\r\nContent-Length: %d" % (len(body),)
            yield from self.framing_refused(head + b"\r\n" + folded + b"\r\n\r\n" + rest)

    @inlineCallbacks
    def test_host_missing_or_repeated(self):
        body = protocol.serialise(self.batch())
        request = http_request(body, self.headers_of(body))
        yield from self.framing_refused(request.replace(b"Host: 127.0.0.1\r\n", b""))
        yield from self.framing_refused(
            request.replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nHost: a\r\n")
        )

    @inlineCallbacks
    def test_ambiguous_transfer_encoding(self):
        """
        Content-Length together with chunked (either order), a coding other
        than chunked (C{identity}, which twisted.web alone would ignore, or a
        list), chunked twice, and chunked in HTTP/1.0.
        """
        body = protocol.serialise(self.batch())
        n = b"%d" % (len(body),)
        te, cl = b"Transfer-Encoding", b"Content-Length"
        for extra, framed in (
            ([(cl, n), (te, b"chunked")], chunked(body)),
            ([(te, b"chunked"), (cl, n)], chunked(body)),
            ([(te, b"identity"), (cl, n)], body),
            ([(te, b"identity")], b""),
            ([(te, b"gzip, chunked")], chunked(body)),
            ([(te, b"chunked"), (te, b"chunked")], chunked(body)),
        ):
            request = http_request(framed, self.headers_of(body) + extra, length=False)
            yield from self.framing_refused(request)
        request = http_request(
            chunked(body),
            self.headers_of(body) + [(te, b"chunked")],
            length=False,
        ).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        yield from self.framing_refused(request)

    @inlineCallbacks
    def test_malformed_chunks(self):
        """
        A chunk size that is signed, prefixed, not hex or too long, a chunk
        that does not end in CRLF, a bad chunk extension.
        """
        body = protocol.serialise(self.batch())
        size = b"%x" % (len(body),)
        for framed in (
            b"+" + size + b"\r\n" + body + b"\r\n0\r\n\r\n",
            b"0x" + size + b"\r\n" + body + b"\r\n0\r\n\r\n",
            b"zz\r\n" + body + b"\r\n0\r\n\r\n",
            b"0" * 2000 + size + b"\r\n" + body + b"\r\n0\r\n\r\n",
            size + b"\r\n" + body + b"XX0\r\n\r\n",
            size + b";a=\x01\r\n" + body + b"\r\n0\r\n\r\n",
        ):
            yield from self.chunked_refused(body, framed)

    @inlineCallbacks
    def test_chunk_declared_past_the_cap(self):
        """
        A chunk whose declared size would take the body past the cap gets
        413 at its size line, before any of its bytes come: a first chunk
        (one byte over, or 24 hex digits), or a later one.  The client
        never sends the data, so a server waiting for it would leave the
        test hanging.
        """
        body, headers = self.padded(MAX_REQUEST_BYTES)
        head = http_request(
            None, headers + [(b"Transfer-Encoding", b"chunked")], length=False
        )
        for framed, received in (
            (b"%x\r\n" % (MAX_REQUEST_BYTES + 1,), 0),
            (b"f" * 24 + b"\r\n", 0),
            (b"%x;ext=1\r\n" % (MAX_REQUEST_BYTES + 1,), 0),
            (b"64\r\n" + body[:100] + b"\r\n%x\r\n" % (MAX_REQUEST_BYTES - 99,), 100),
        ):
            before = len(self.records())
            client = yield self.raw(head + framed)
            self.assertClosedAfter(client, 413, "too_large")
            self.assertNothingApplied()
            [record] = self.records()[before:]
            self.assertEqual((record["result"], record["bytes"]), ("too_large", received))
            self.assertIn("chunk of", record["reason"])

        # A last chunk that ends exactly at the cap is still accepted.
        request = http_request(
            b"64\r\n" + body[:100] + b"\r\n%x\r\n" % (MAX_REQUEST_BYTES - 100,)
            + body[100:] + b"\r\n0\r\n\r\n",
            headers + [(b"Transfer-Encoding", b"chunked")],
            length=False,
            close=True,
        )
        [response] = yield self.pipeline([request])
        self.assertEqual(response[0], 200, response[2])

    @inlineCallbacks
    def test_chunk_lines_ending_in_bare_lf(self):
        """
        A chunk-size line or a trailer line that ends in a bare LF is
        refused as soon as the LF is in, whether or not a CRLF follows: the
        client sends nothing more, so a server waiting for a CRLF would
        leave the test hanging.
        """
        body = protocol.serialise(self.batch())
        size = b"%x" % (len(body),)
        for framed in (
            size + b"\n",
            size + b"\n" + body + b"\r\n0\r\n\r\n",
            size + b";a=b\n",
            size + b"\r\n" + body + b"\r\n0\n",
            size + b"\r\n" + body + b"\r\n0\r\nX-Trailer: a\n",
            size + b"\r\n" + body + b"\r\n0\r\n\n",
        ):
            yield from self.chunked_refused(body, framed)

    @inlineCallbacks
    def test_trailer_fields_refused(self):
        """
        Trailer fields after the last chunk are refused, well-formed or not
        (a bare CR, CR CR LF, folding, a NUL), as soon as their first byte
        is in: the sender never sends any, and twisted.web would take them
        unchecked.
        """
        body = protocol.serialise(self.batch())
        framed = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        for trailer in (
            b"X-Trailer: a\r\n\r\n",
            b"X-Trailer: a\rb\r\n\r\n",
            b"X-Trailer: a\r\r\n\r\n",
            b"X-Trailer: a\r\n b\r\n\r\n",
            b"X-Trailer: a\x00\r\n\r\n",
            b"X",
            b"\rX",
        ):
            yield from self.chunked_refused(body, framed + trailer)

    @inlineCallbacks
    def test_content_length_of_many_digits(self):
        """
        A Content-Length longer than any cap needs, up to more digits than
        Python converts, is a 400 like any bad framing, audited, with no
        traceback logged (twisted.web alone would drop the connection
        unanswered and log an unhandled error).
        """
        body = protocol.serialise(self.batch())
        for value in (b"1" * 5000, b"0" * 4999 + b"1", b"9" * 19):
            request = http_request(
                body, self.headers_of(body) + [(b"Content-Length", value)], length=False
            )
            yield from self.framing_refused(request)
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_head_lines_ending_in_bare_lf(self):
        """
        A request line or header ending in a bare LF is refused as soon as
        the LF is in: a request written with LF line endings throughout
        (never a CRLF, so a server waiting for one would leave the test
        hanging), and a bare LF within a CRLF line, which would smuggle a
        header to parsers that end lines at LF.  Each is audited, with the
        peer address even before a request line is complete.
        """
        body = protocol.serialise(self.batch())
        good = http_request(body, self.headers_of(body))
        head, rest = good.split(b"\r\n\r\n", 1)
        n = b"Content-Length: %d" % (len(body),)
        for request in (
            head.replace(b"\r\n", b"\n") + b"\n\n" + rest,
            good.replace(b" HTTP/1.1\r\n", b" HTTP/1.1\n", 1),
            good.replace(n, b"X-Other: a\nContent-Length: 0\r\n" + n, 1),
            good.replace(n, b"X-Other: a\rContent-Length: 0\r\n" + n, 1),
            good.replace(b"\r\n\r\n", b"\r\n\n", 1),
        ):
            self.assertNotEqual(request, good)
            yield from self.framing_refused(request)
            self.assertEqual(self.records()[-1]["peer"], "127.0.0.1")

    @inlineCallbacks
    def test_malformed_head(self):
        """
        A bad request line, a header without a colon, with a space before
        the colon, with a NUL, a folded Content-Length, a header line over
        Twisted's MAX_LENGTH (which it would drop without an answer).
        """
        body = protocol.serialise(self.batch())
        good = http_request(body, self.headers_of(body))
        n = b"Content-Length: %d\r\n" % (len(body),)
        for request in (
            good.replace(b"POST /", b"POST  /", 1),
            good.replace(b"Host: 127.0.0.1", b"Host 127.0.0.1", 1),
            good.replace(n, b"Content-Length : %d\r\n" % (len(body),), 1),
            good.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\x00", 1),
            good.replace(n, b"Content-Length: %d\r\n 0\r\n" % (len(body),), 1),
            good.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX-Long: " + b"a" * 17000, 1),
        ):
            self.assertNotEqual(request, good)
            yield from self.framing_refused(request)

    @inlineCallbacks
    def test_star_is_not_special(self):
        """
        C{OPTIONS *} (which twisted.web answers itself) is a JSON 404 like
        any other unknown path, and audited.
        """
        [response] = yield self.pipeline(
            [http_request(method=b"OPTIONS", path=b"*", close=True)]
        )
        self.assertRawRefused(response, 404, "not_found")
        self.assertOnlyRecord("not_found", 404, 0)

    @inlineCallbacks
    def test_pipelined_answered_in_order(self):
        """
        Requests pipelined on one connection are answered in order, though
        the first waits for the vault pool and the next ones are answered at
        once.
        """
        held = _HeldStore(self.store)
        yield self.serve(held)
        later = dataclasses.replace(ENTRIES[0], version=4)
        requests = [
            self.signed_request(self.batch()),
            http_request(method=b"GET"),
            http_request(method=b"GET", path=b"/elsewhere"),
            self.signed_request(self.batch(seq=8, entries=[later])),
            http_request(b"{}", [(b"Content-Type", b"text/plain")], close=True),
        ]
        answered = self.pipeline(requests)
        yield held.reached
        held.release.callback(None)
        responses = yield answered
        self.assertEqual(
            [status for status, _, _ in responses], [200, 405, 404, 200, 415]
        )
        self.assertEqual(
            [r["result"] for r in self.records()],
            ["applied", "method", "not_found", "applied", "media_type"],
        )
        self.assertEqual(self.stored()[0][1].version, 4)

    @inlineCallbacks
    def test_pipelined_after_bad_framing_not_read(self):
        """
        After a framing error nothing more on the connection is read: the
        request before it is answered, the one after it never applied.
        """
        body = protocol.serialise(self.batch())
        other = dataclasses.replace(ENTRIES[0], vault_id="f" * 16)
        responses = yield self.pipeline(
            [
                self.signed_request(self.batch()),
                http_request(body, self.headers_of(body) + [(b"Content-Length", b"-1")]),
                self.signed_request(self.batch(seq=8, entries=[other]), close=True),
            ]
        )
        self.assertEqual(responses[0][0], 200)
        self.assertRawRefused(responses[1], 400, "malformed")
        self.assertEqual(len(responses), 2)
        self.assertEqual(list_vault_ids(self.data_dir), [VAULT_ID])
        self.assertEqual([r["result"] for r in self.records()], ["applied", "malformed"])

    @inlineCallbacks
    def hold(self, count, request=b"", source="127.0.0.1", pop=PRIMARY):
        """
        C{count} connections from C{source} (as C{pop}, in mtls), each
        having sent C{request} and held open (closed at the end of the
        test).
        """
        holders = []
        for _ in range(count):
            holder = _Holder(request)
            yield self.connect(holder, pop=pop, source=source)
            yield holder.ready
            holders.append(holder)
        self.addCleanup(self.release, holders)
        return holders

    @inlineCallbacks
    def release(self, holders):
        for holder in holders:
            holder.transport.loseConnection()
            yield holder.lost
        yield self.factory.whenAllLost()

    @inlineCallbacks
    def test_refused_at_the_headers_without_100_continue(self):
        """
        A banned peer that declares a body and asks for C{100 Continue}
        gets its 403 at once, before sending the body, and no
        C{100 Continue}; the connection is closed, nothing of the body
        read or reserved.
        """
        for _ in range(self.ban_after):
            self.site.defences.bans.record_failure("address:127.0.0.1")
        body, headers = self.padded(MAX_REQUEST_BYTES)
        head = http_request(body, headers + [(b"Expect", b"100-continue")])
        client = yield self.raw(head[: -len(body)])
        self.assertNotIn(b"100 Continue", client.received)
        self.assertClosedAfter(client, 403, "forbidden")
        self.assertOnlyRecord("forbidden", 403, 0)
        self.assertEqual(self.site.defences.bodies.in_use, 0)

    def other_peer(self):
        """
        How a second partner connects: with its own certificate (mtls, where
        the budget share is the POP's), or from another address (bearer).
        """
        if self.method == "mtls":
            return {"pop": PARTNER}
        return {"source": "127.0.0.2"}

    def partner_request(self):
        entries = [dataclasses.replace(e, vault_id=PARTNER_VAULT_ID) for e in ENTRIES]
        batch = self.batch(source_pop=PARTNER, entries=entries)
        return self.signed_request(batch, signer_pop=PARTNER, close=True)

    @inlineCallbacks
    def test_body_budget_across_requests(self):
        """
        Requests from BODY_BUDGET_REQUESTS addresses (bearer mode, where an
        address is a key) holding full bodies use the whole budget: one more
        declaring a body gets 503 at the headers, a chunked one is cut off
        with 503 at its first chunk.  Once they are gone the budget is free
        again and a batch applies.  (In mtls the keys are the authorised
        POPs, each with its own share: the budget cannot run out.)
        """
        budget = self.site.defences.bodies
        self.assertEqual(budget.limit, BODY_BUDGET_REQUESTS * MAX_REQUEST_BYTES)
        self.assertEqual(budget.share, BODY_SHARE_REQUESTS * MAX_REQUEST_BYTES)
        if self.method == "mtls":
            self.assertGreaterEqual(BODY_BUDGET_REQUESTS, len(self.config.authorized_pops))
            return
        body, headers = self.padded(MAX_REQUEST_BYTES)
        head = http_request(body, headers)[: -len(body)]
        holders = []
        for n in range(BODY_BUDGET_REQUESTS):
            holders += yield self.hold(1, head + body[:10], source="127.0.0.%d" % (10 + n,))
        yield until(lambda: budget.in_use == budget.limit)

        small = self.signed_request(self.batch(), close=True)
        client = yield self.raw(small, alone=False, source="127.0.0.3")
        self.assertClosedAfter(client, 503, "unavailable")
        [retry_after] = parse_responses(client.received)[0][1][b"retry-after"]
        self.assertEqual(retry_after, b"1")
        self.assertEqual(self.records()[-1]["bytes"], 0)
        chunked_request = http_request(
            chunked(body[:100]),
            headers + [(b"Transfer-Encoding", b"chunked")],
            length=False,
        )
        client = yield self.raw(chunked_request, alone=False, source="127.0.0.3")
        self.assertClosedAfter(client, 503, "unavailable")
        self.assertEqual(budget.in_use, budget.limit)

        yield self.release(holders)
        self.assertEqual(budget.in_use, 0)
        [response] = yield self.pipeline([small])
        self.assertEqual(response[0], 200, response[2])
        self.assertEqual(budget.in_use, 0)

    def test_budget_has_room_for_every_pop(self):
        """
        With more authorised POPs than BODY_BUDGET_REQUESTS, the budget
        holds one full body for each, so no set of partners stalling
        theirs leaves another without room.
        """
        pops = tuple("pop-%02d" % (n,) for n in range(BODY_BUDGET_REQUESTS + 3))
        config = dataclasses.replace(self.config, authorized_pops=pops)
        budget = Defences(config, self.clock, self.audit).bodies
        self.assertEqual(budget.limit, len(pops) * MAX_REQUEST_BYTES)
        self.assertEqual(budget.share, MAX_REQUEST_BYTES)

    @inlineCallbacks
    def test_one_partner_cannot_take_the_whole_budget(self):
        """
        A partner stalling requests that hold full bodies gets no more than
        its share (503 for its next one); another partner's batch still has
        room and is applied.
        """
        budget = self.site.defences.bodies
        body, headers = self.padded(MAX_REQUEST_BYTES)
        head = http_request(body, headers)[: -len(body)]
        yield self.hold(BODY_SHARE_REQUESTS, head + body[:10])
        yield until(lambda: budget.in_use == budget.share)
        client = yield self.raw(self.signed_request(self.batch(), close=True), alone=False)
        self.assertClosedAfter(client, 503, "unavailable")
        client = yield self.raw(self.partner_request(), alone=False, **self.other_peer())
        [response] = parse_responses(client.received)
        self.assertEqual(response[0], 200, response[2])

    @inlineCallbacks
    def test_connections_per_address(self):
        """
        One address holds at most MAX_CONNECTIONS_PER_ADDRESS connections:
        one more is dropped at once, unanswered; another address is served.
        """
        yield self.hold(MAX_CONNECTIONS_PER_ADDRESS)
        for _ in range(3):
            dropped = yield self.raw(self.signed_request(self.batch()), alone=False)
            self.assertEqual(dropped.received, b"")
        [record] = self.records()
        self.assertEqual(
            (record["result"], record["status"], record["peer"], record["count"]),
            ("too_many_connections", 0, "127.0.0.1", 1),
        )
        client = yield self.raw(
            self.signed_request(self.batch(), close=True), source="127.0.0.2", alone=False
        )
        [response] = parse_responses(client.received)
        self.assertEqual(response[0], 200, response[2])
        self.assertEqual(len(self.stored()[0]), 3)
        self.assertDigested("too_many_connections", 2)

    @inlineCallbacks
    def test_connections_of_all_addresses(self):
        """
        With all max_connections open, a new connection takes the place of
        the oldest one not proven (silent, here; audited); when every open
        connection has proven it comes from a partner (an authorised
        certificate, or a request with the right token, though unfinished),
        the new one is dropped at once, unanswered.
        """
        yield self.serve(self.store, max_connections=2)
        silent = yield self.hold(2, source="127.0.0.2")
        client = yield self.raw(
            self.signed_request(self.batch(), close=True), source="127.0.0.3", alone=False
        )
        [response] = parse_responses(client.received)
        self.assertEqual(response[0], 200, response[2])
        yield silent[0].lost
        self.assertNoResult(silent[1].lost)
        [record] = [r for r in self.records() if r["result"] == "too_many_connections"]
        self.assertEqual(record["peer"], "127.0.0.2")
        self.assertIn("to make room", record["reason"])

        silent[1].transport.loseConnection()
        yield silent[1].lost
        yield until(lambda: not self.factory.protocols)
        unfinished = self.signed_request(self.batch())[:-1]
        talking = yield self.hold(1, unfinished, source="127.0.0.4")
        talking += yield self.hold(1, unfinished, source="127.0.0.6")
        yield until(
            lambda: len(self.factory.protocols) == 2
            and all(p.wrappedProtocol.requests for p in self.factory.protocols)
            and self.site.defences.bodies.in_use > 0
        )
        dropped = yield self.raw(self.signed_request(self.batch()), source="127.0.0.5", alone=False)
        self.assertEqual(dropped.received, b"")
        self.assertEqual([t.lost.called for t in talking], [False, False])
        for holder in talking:
            holder.transport.abortConnection()
            yield holder.lost

    @inlineCallbacks
    def test_unauthorised_certificate_refused_at_its_first_byte(self):
        """
        A certificate from our CA that names no authorised POP (mtls) is
        refused (403) as soon as its first byte comes, not when a request
        it may never finish is in; so is a banned peer (either mode), whose
        refusals are audited once a minute with a count.
        """
        if self.method == "mtls":
            [holder] = yield self.hold(1, b"P", pop=STRANGER)
            yield holder.lost
            [response] = parse_responses(holder.received)
            self.assertRawRefused(response, 403, "forbidden")
            [record] = self.records()
            self.assertEqual((record["result"], record["auth_failure"]), ("forbidden", True))

        for _ in range(self.ban_after):
            self.site.defences.bans.record_failure("address:127.0.0.7")
        before = len(self.records())
        for _ in range(3):
            [holder] = yield self.hold(1, b"P", source="127.0.0.7")
            yield holder.lost
            self.assertRawRefused(parse_responses(holder.received)[0], 403, "forbidden")
        # As fast as a stranger can connect: one record, then a count.
        [record] = self.records()[before:]
        self.assertEqual(record["reason"], "banned: address:127.0.0.7")
        self.clock.advance(REFUSAL_DIGEST_SECONDS)
        [summary] = self.records()[before + 1 :]
        self.assertEqual(
            (summary["result"], summary["status"], summary["count"], summary["peer"]),
            ("forbidden", 403, 2, "127.0.0.7"),
        )
        self.assertIn("the last: banned: address:127.0.0.7", summary["reason"])

    def assertDigested(self, result, count, auth_failure=False):
        """
        When the digest window ends, one record counts the C{count} more
        connections refused as C{result} since the first.
        """
        before = len(self.records())
        self.clock.advance(REFUSAL_DIGEST_SECONDS)
        [summary] = self.records()[before:]
        self.assertEqual(
            (summary["result"], summary["count"], summary["peer"], summary["auth_failure"]),
            (result, count, "127.0.0.1", auth_failure),
        )
        self.assertTrue(
            summary["reason"].startswith(
                "%d more connections refused like this within %d s; the last: "
                % (count, REFUSAL_DIGEST_SECONDS)
            ),
            summary["reason"],
        )

    @inlineCallbacks
    def test_connection_rate_per_address(self):
        """
        Connections beyond connections_per_minute from one address are
        dropped before their TLS handshake, unanswered; one is audited, the
        rest counted; another address is served, and so is this one once
        its bucket has a token again.
        """
        config = dataclasses.replace(
            self.config,
            security=dataclasses.replace(self.config.security, connections_per_minute=3),
        )
        yield self.serve(self.store, config=config)
        request = http_request(method=b"GET", close=True)
        for _ in range(3):
            client = yield self.raw(request, alone=False)
            self.assertEqual(parse_responses(client.received)[0][0], 405)
        for _ in range(4):
            client = _Holder(request)
            yield self.connect(client)
            yield client.lost
            self.assertEqual((client.received, client.ready.called), (b"", False))
        rate_limited = [r for r in self.records() if r["result"] == "connection_rate_limited"]
        self.assertEqual([r["peer"] for r in rate_limited], ["127.0.0.1"])
        client = yield self.raw(request, source="127.0.0.2", alone=False)
        self.assertEqual(parse_responses(client.received)[0][0], 405)
        self.assertDigested("connection_rate_limited", 3)
        client = yield self.raw(request, alone=False)
        self.assertEqual(parse_responses(client.received)[0][0], 405)

    @inlineCallbacks
    def test_tls_refusals_digested(self):
        """
        Handshakes refused (a certificate of another CA) are audited as
        failed authentications, the first at once and the rest counted
        together, so a flood of them writes two lines a minute, and the
        failures are all counted.
        """
        if self.method != "mtls":
            raise SkipTest("bearer mode asks for no client certificate to refuse")
        other_dir = os.path.join(self.pki_dir, "other-ca")
        os.mkdir(other_dir)
        other_key, other_ca = pki.make_ca()
        self.identities["impostor"] = tls.load_identity(
            *pki.write_pop_files(other_dir, other_key, other_ca, PRIMARY)
        )
        for _ in range(5):
            client = yield self.raw(self.signed_request(self.batch()), pop="impostor")
            self.assertEqual(client.received, b"")
        [record] = self.records()
        self.assertEqual(
            (record["result"], record["auth_failure"], record["proven_pop"], record["fingerprint"]),
            ("tls_refused", True, None, None),
        )
        self.assertDigested("tls_refused", 4, auth_failure=True)
        self.assertIn("the last: TLS handshake refused: ", self.records()[-1]["reason"])
        self.assertEqual(self.audit.auth_failures, 5)
        self.assertEqual(self.audit.results["tls_refused"], 5)

    def channel(self):
        [connection] = self.factory.protocols
        return connection.wrappedProtocol

    @inlineCallbacks
    def test_slow_headers_aborted_at_the_request_deadline(self):
        """
        Headers dribbled a line a second never let the connection go idle,
        but request_timeout seconds of the site's clock after the
        connection was made it is aborted, unanswered, and audited as a
        timeout.
        """
        timeout = self.config.replication.request_timeout
        body, headers = self.padded(MAX_REQUEST_BYTES)
        head = http_request(body, headers)[: -len(b"\r\n") - len(body)]
        [holder] = yield self.hold(1, head)
        channel = self.channel()
        yield until(lambda: channel.requests)
        for second in range(timeout - 1):
            self.clock.advance(1)
            holder.transport.write(b"X-Pad-%d: x\r\n" % (second,))
            if second:
                # The line before this one is parsed once this one starts.
                name = b"X-Pad-%d" % (second - 1,)
                yield until(
                    lambda name=name: channel.requests[-1].requestHeaders.hasHeader(name)
                )
        self.assertNoResult(holder.lost)
        self.clock.advance(1)
        yield holder.lost
        self.assertEqual(holder.received, b"")
        self.assertOnlyRecord("timeout", 408, 0)

    @inlineCallbacks
    def test_slow_body_aborted_at_the_request_deadline(self):
        """
        A body trickling in is aborted request_timeout seconds after the
        request's first byte; a request completed in time on the same
        connection started no deadline for the idle time after it.
        """
        timeout = self.config.replication.request_timeout
        [holder] = yield self.hold(1, self.signed_request(self.batch()))
        yield until(lambda: holder.received)
        self.assertEqual(parse_responses(holder.received)[0][0], 200)
        self.clock.advance(timeout - 1)
        body, headers = self.padded(MAX_REQUEST_BYTES, seq=8)
        holder.transport.write(http_request(body, headers)[: -len(body)] + body[:10])
        channel = self.channel()
        yield until(lambda: channel.requests and channel.requests[-1].attempt.bytes == 10)
        self.clock.advance(timeout - 1)
        self.assertNoResult(holder.lost)
        self.clock.advance(1)
        yield holder.lost
        record = self.records()[-1]
        self.assertEqual(
            (record["result"], record["status"], record["bytes"]), ("timeout", 408, 10)
        )

    @inlineCallbacks
    def test_silent_connection_aborted(self):
        """
        A connection that sends nothing is aborted after request_timeout,
        with no request to audit.
        """
        [holder] = yield self.hold(1)
        self.clock.advance(self.config.replication.request_timeout)
        yield holder.lost
        self.assertEqual(self.records(), [])

    @inlineCallbacks
    def test_unfinished_request_line_audited(self):
        """
        A connection that sends part of a request line and stops is aborted
        after request_timeout and audited as a timeout, though no request
        was ever parsed, with what its certificate proves (in mtls).
        """
        [holder] = yield self.hold(1, b"POST /api/repl")
        channel = self.channel()
        yield until(lambda: channel._heard)
        self.clock.advance(self.config.replication.request_timeout)
        yield holder.lost
        record = self.assertOnlyRecord("timeout", 408, 0)
        if self.method == "mtls":
            self.assertEqual(record["proven_pop"], PRIMARY)
            self.assertIsNotNone(record["fingerprint"])
        else:
            self.assertEqual((record["proven_pop"], record["fingerprint"]), (None, None))


class BearerBudgetTests(FramingTests):
    """
    In bearer mode the token is checked at the headers: a request without
    the right one takes no room in the body budget and holds no body, so
    strangers cannot starve the primary.
    """

    method = "bearer"

    @inlineCallbacks
    def test_wrong_token_gets_no_100_continue(self):
        """
        A request whose token is wrong, asking for C{100 Continue}, is not
        asked for its body (which would be thrown away); once the body
        comes anyway, it gets its 401.
        """
        body, headers = self.padded(1000)
        headers = [
            (name, b"Bearer " + b"x" * 64 if name == b"Authorization" else value)
            for name, value in headers
        ] + [(b"Expect", b"100-continue")]
        head = http_request(body, headers, close=True)[: -len(body)]
        [holder] = yield self.hold(1, head)
        channel = self.channel()
        yield until(lambda: channel.requests and channel.requests[-1]._discard)
        self.assertEqual(holder.received, b"")
        holder.transport.write(body)
        yield holder.lost
        self.assertNotIn(b"100 Continue", holder.received)
        [response] = parse_responses(holder.received)
        self.assertRawRefused(response, 401, "unauthenticated")

    @inlineCallbacks
    def test_wrong_token_takes_no_budget(self):
        budget = self.site.defences.bodies
        body, headers = self.padded(MAX_REQUEST_BYTES)
        headers = [
            (name, b"Bearer " + b"x" * 64 if name == b"Authorization" else value)
            for name, value in headers
        ]
        head = http_request(body, headers)[: -len(body)]
        yield self.hold(BODY_BUDGET_REQUESTS + 1, head + body[: len(body) // 2])
        self.assertEqual(budget.in_use, 0)
        client = yield self.raw(self.signed_request(self.batch(), close=True), alone=False)
        [response] = parse_responses(client.received)
        self.assertEqual(response[0], 200, response[2])
