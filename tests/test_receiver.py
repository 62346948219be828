"""
Tests for L{clavitor_twisted.receiver}: the real site over real loopback TLS
1.3, with certificates from L{clavitor_twisted.pki}, applying into a real
L{VaultStore} on a real thread pool.
"""

import base64
import dataclasses
import json
import os
import sqlite3
from io import BytesIO

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from clavitor_twisted import pki, protocol, tls
from clavitor_twisted.audit import AuditLog, fingerprint
from clavitor_twisted.config import parse_config
from clavitor_twisted.errors import RateLimited
from clavitor_twisted.defences import REFUSAL_DIGEST_SECONDS
from clavitor_twisted.receiver import make_site
from clavitor_twisted.tokens import (
    TokenSet,
    TokenSource,
    generate_token,
    write_token_file,
)
from clavitor_twisted.vault import Entry, Vault, list_vault_ids, vault_path, VaultStore

BACKUP = "zurich-01"
PRIMARY = "calgary-01"
PARTNER = "geneva-01"  # authorised too, with its own certificate
STRANGER = "oslo-01"  # a certificate from our CA, but not authorised
NOW = 1_700_000_000
STARTED_AT = NOW - 60
MAX_AGE = 300
SKEW = 30
MAX_REQUEST_BYTES = 8192
VAULT_ID = "0123456789abcdef"
PARTNER_VAULT_ID = "fedcba9876543210"

CONFIG = """\
pop_id: {backup}
region: europe
role: backup
data_dir: {data_dir}
auth:
  method: {method}
  mtls_cert: {cert}
  mtls_key: {key}
  mtls_ca: {ca}
{token_line}replication:
  max_request_age: {max_age}
security:
  clock_skew: {skew}
  max_request_bytes: {max_request_bytes}
  max_entry_bytes: 1024
  rate_limit_per_minute: {rate_limit}
  ban_after_failures: {ban_after}
  ban_duration: {ban_duration}
listen:
  address: 127.0.0.1
authorized_pops: [{primary}, {partner}]
"""

ENTRIES = (
    Entry(VAULT_ID, "login-1", 3, NOW * 1000, False, b"ciphertext one"),
    Entry(VAULT_ID, "login-2", 1, NOW * 1000, False, b"\x00\xffciphertext two"),
    Entry(VAULT_ID, "gone", 2, NOW * 1000, True, None),
)


AUDIT_FIELDS = {
    "time",
    "peer",
    "claimed_pop",
    "proven_pop",
    "entries",
    "vaults",
    "bytes",
    "result",
    "status",
    "reason",
    "duration",
    "backup_clock",
    "request_timestamp",
    "auth_failure",
    "fingerprint",
    "count",
    "logged_at",
}


@implementer(IHandshakeListener)
class _Collect(Protocol):
    """
    A raw client: send C{request} once connected, keep what comes back.
    With C{deaf}, stop reading once the TLS handshake is done (a peer that
    never acknowledges the server closing).
    """

    def __init__(self, request: bytes, deaf: bool = False) -> None:
        self.request = request
        self.deaf = deaf
        self.received = b""
        self.lost = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def handshakeCompleted(self) -> None:
        if self.deaf:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class _Connections(WrappingFactory):
    """
    The site, wrapped to tell the test when the server side has no
    connection open any more.
    """

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self.waiting: list[Deferred] = []

    def whenAllLost(self) -> Deferred:
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self.waiting.append(d)
        return d

    def unregisterProtocol(self, p) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)


def http_request(
    body=None,
    headers=(),
    method=b"POST",
    path=protocol.APPLY_PATH,
    close=False,
    length=True,
):
    """
    The bytes of one HTTP/1.1 request: C{headers} a sequence of (name,
    value) pairs or a dict of name -> values; Content-Length from the body
    when C{length} (and a body) is given.
    """
    if isinstance(headers, dict):
        headers = [(name, value) for name, values in headers.items() for value in values]
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body is not None and length:
        lines.append(b"Content-Length: %d" % (len(body),))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(*chunks):
    """
    C{chunks} in chunked transfer coding, with the last chunk.
    """
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def parse_responses(data):
    """
    The HTTP/1.1 responses in C{data}, in order, as (status, headers, body):
    headers a dict of lower-case name -> list of values.  Every answer of
    the site has a Content-Length; anything after the last complete
    response is an error.
    """
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError("incomplete response: %r" % (data[:200],))
        status_line, *header_lines = head.split(b"\r\n")
        version, status, _ = status_line.split(b" ", 2)
        if version != b"HTTP/1.1":
            raise AssertionError("not an HTTP/1.1 response: %r" % (status_line,))
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        [length] = headers[b"content-length"]
        body, data = rest[: int(length)], rest[int(length) :]
        responses.append((int(status), headers, body))
    return responses


class _FixedToken:
    """
    A token source that always gives one token, to sign as a sender holding
    that token would.
    """

    def __init__(self, token: bytes) -> None:
        self._tokens = TokenSet(token)

    def tokens(self) -> TokenSet:
        return self._tokens


class _HeldStore:
    """
    A VaultStore whose first apply waits until the test releases it, so
    that a request can be caught while its batch is being applied.
    """

    def __init__(self, store: VaultStore) -> None:
        self._store = store
        self.reached = Deferred()
        self.release = Deferred()

    def apply_batch(self, *args):
        if self.reached.called:
            return self._store.apply_batch(*args)
        self.reached.callback(None)
        return self.release.addCallback(lambda _: self._store.apply_batch(*args))


class _FailingStore:
    """
    A VaultStore whose apply fails with C{error}, as a broken disk or a
    guard further down would.
    """

    def __init__(self, error: Exception) -> None:
        self._error = error

    def apply_batch(self, *args):
        return fail(self._error)


class ReceiverTestCase(TestCase):
    """
    A backup POP serving L{make_site} over loopback TLS, and the means to
    post to it as various POPs.
    """

    method = "mtls"
    # A test left waiting (for an answer the server should have sent) fails
    # well before trial's default of two minutes.
    timeout = 30
    # The config's defaults.
    rate_limit = 60
    ban_after = 10
    ban_duration = 3600

    @inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.pki_dir = os.path.join(base, "pki")
        self.data_dir = os.path.join(base, "data")
        os.makedirs(self.pki_dir)
        os.makedirs(self.data_dir)
        self.ca_key, self.ca_cert = pki.make_ca()
        ca_path = os.path.join(self.pki_dir, "ca.crt")
        pki.write_certificate(ca_path, self.ca_cert)
        self.ca = tls.load_ca(ca_path)
        cert, key = self.pop_files(BACKUP, ips=["127.0.0.1"])
        self.identities = {
            pop: tls.load_identity(*self.pop_files(pop))
            for pop in (PRIMARY, PARTNER, STRANGER)
        }

        token_line = ""
        self.token_source = None
        if self.method == "bearer":
            self.token_path = os.path.join(base, "token")
            self.current, self.previous = generate_token(), generate_token()
            write_token_file(self.token_path, self.current, self.previous)
            token_line = "  token_file: {}\n".format(self.token_path)
        self.config = parse_config(
            CONFIG.format(
                backup=BACKUP,
                primary=PRIMARY,
                partner=PARTNER,
                data_dir=self.data_dir,
                method=self.method,
                cert=cert,
                key=key,
                ca=ca_path,
                token_line=token_line,
                max_age=MAX_AGE,
                skew=SKEW,
                max_request_bytes=MAX_REQUEST_BYTES,
                rate_limit=self.rate_limit,
                ban_after=self.ban_after,
                ban_duration=self.ban_duration,
            )
        )

        self.clock = Clock()
        self.clock.advance(NOW)
        if self.method == "bearer":
            self.token_source = TokenSource(self.token_path, self.clock)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="test-vaults")
        pool.start()
        self.addCleanup(pool.stop)
        self.store = VaultStore(self.data_dir, pool, reactor)
        self.addCleanup(self.store.close)

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

        self.audit_path = os.path.join(base, "audit.log")
        self.audit = AuditLog(self.audit_path, self.clock)
        self.addCleanup(self.audit.close)

        self.port = None
        yield self.serve(self.store)
        self.addCleanup(lambda: self.port.stopListening())

    def pop_files(self, pop_id, ips=()):
        return pki.write_pop_files(
            self.pki_dir, self.ca_key, self.ca_cert, pop_id, ips=ips
        )

    @inlineCallbacks
    def serve(self, store, config=None, own_audit=False, started_at=STARTED_AT, **options):
        """
        Listen on 127.0.0.1 with the backup's site applying into C{store},
        auditing into the test's log, or (C{own_audit}) called as the
        service calls it, without one; C{options} go to make_site.
        """
        if self.port is not None:
            yield self.port.stopListening()
        arguments = (config or self.config, store, self.clock, self.token_source, started_at)
        if own_audit:
            site = make_site(*arguments, **options)
        else:
            site = make_site(*arguments, audit=self.audit, **options)
        self.site = site
        self.factory = _Connections(site)
        options = tls.server_options(
            tls.load_identity(
                self.config.auth.mtls_cert, self.config.auth.mtls_key
            ),
            self.ca,
            require_client_certificate=self.method == "mtls",
        )
        self.port = yield SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(self.factory)

    def batch(self, source_pop=PRIMARY, target_pop=BACKUP, entries=ENTRIES, **changes):
        batch = protocol.new_batch(source_pop, target_pop, 1, 7, entries, now=NOW)
        return dataclasses.replace(batch, **changes)

    def signed(self, batch, signer_pop=PRIMARY):
        """
        The body of C{batch} and its headers, signed the way this mode signs.
        """
        body = protocol.serialise(batch)
        return body, self.sign(body, signer_pop)

    def sign(self, body, signer_pop=PRIMARY):
        """
        The headers for C{body}, signed the way this mode signs.
        """
        if self.method == "mtls":
            signer = protocol.CertificateSigner(self.identities[signer_pop].private_key)
            return {
                b"Content-Type": [b"application/json"],
                protocol.SIGNATURE_HEADER: [signer.sign(body)],
            }
        return self.bearer_headers(body, self.token_source.tokens().current)

    def bearer_headers(self, body, token, hmac_token=None):
        """
        Bearer-mode headers for C{body}: C{token} as bearer, the HMAC keyed
        with C{hmac_token} (by default the same token).
        """
        signer = protocol.HmacSigner(_FixedToken(hmac_token or token))
        return {
            b"Content-Type": [b"application/json"],
            b"Authorization": [b"Bearer " + token],
            protocol.SIGNATURE_HEADER: [signer.sign(body)],
        }

    @inlineCallbacks
    def post(
        self,
        body,
        headers,
        pop=PRIMARY,
        method=b"POST",
        path=protocol.APPLY_PATH,
        chunked=False,
    ):
        """
        Send a request as C{pop} (its certificate presented in mtls mode),
        the body chunked if C{chunked}: C{(response, body)}.
        """
        producer = None if body is None else FileBodyProducer(BytesIO(body))
        if chunked:
            producer.length = UNKNOWN_LENGTH
        identity = self.identities[pop] if self.method == "mtls" else None
        agent = Agent(
            reactor,
            contextFactory=tls.BackupPolicy(self.ca, identity, BACKUP),
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        url = b"https://127.0.0.1:%d%s" % (self.port.getHost().port, path)
        try:
            response = yield agent.request(
                method,
                url,
                Headers(headers),
                producer,
            )
            content = yield readBody(response)
        finally:
            yield self.factory.whenAllLost()
        return response, content

    @inlineCallbacks
    def send(self, batch, pop=PRIMARY, signer_pop=None):
        body, headers = self.signed(batch, signer_pop or pop)
        result = yield self.post(body, headers, pop=pop)
        return result

    def assertSecurityHeaders(self, response):
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
        self.assertEqual(headers.getRawHeaders(b"Cache-Control"), [b"no-store"])
        self.assertIsNone(headers.getRawHeaders(b"Server"))

    def assertRefused(self, result, status, word):
        """
        The answer is C{status} with the body exactly C{{"error": word}} and
        the security headers.
        """
        response, content = result
        self.assertEqual(response.code, status, content)
        self.assertEqual(content, json.dumps({"error": word}, separators=(",", ":")).encode())
        self.assertSecurityHeaders(response)

    def assertApplied(self, result, applied, skipped=0, seq=7):
        response, content = result
        self.assertEqual(response.code, 200, content)
        self.assertSecurityHeaders(response)
        self.assertEqual(
            json.loads(content),
            {
                "applied": applied,
                "skipped": skipped,
                "seq": seq,
                "pop_id": BACKUP,
                "role": "backup",
            },
        )

    def assertNothingApplied(self):
        self.assertEqual(list_vault_ids(self.data_dir), [])

    def stored(self):
        vault = Vault.open(vault_path(self.data_dir, VAULT_ID))
        try:
            return tuple(vault.iter_entries()), vault.get_meta("source_pop")
        finally:
            vault.close()

    def records(self):
        """
        The audit log so far, one JSON object per line.
        """
        with open(self.audit_path, "rb") as f:
            lines = f.read().split(b"\n")
        self.assertEqual(lines[-1], b"", "the last line is not complete")
        records = [json.loads(line) for line in lines[:-1]]
        for record in records:
            self.assertEqual(set(record), AUDIT_FIELDS)
        return records

    def refusals(self):
        return [r for r in self.records() if r["result"] != "applied"]

    def critical_events(self):
        return [e for e in self.events if e["log_level"].name == "critical"]

    @inlineCallbacks
    def raw(self, data, pop=PRIMARY, source="127.0.0.1", alone=True):
        """
        Send C{data} over a TLS connection of its own from C{source} (as
        C{pop} in mtls mode) and wait until it is closed (and, if C{alone},
        until the server has no connection left): the client protocol,
        with what it received.
        """
        client = _Collect(data)
        yield self.connect(client, pop, source)
        yield client.lost
        if alone:
            yield self.factory.whenAllLost()
        return client

    def connect(self, client, pop=PRIMARY, source="127.0.0.1"):
        identity = self.identities[pop] if self.method == "mtls" else None
        port = self.port.getHost().port
        creator = tls.BackupPolicy(self.ca, identity, BACKUP).creatorForNetloc(
            b"127.0.0.1", port
        )
        return connectProtocol(
            wrapClientTLS(
                creator,
                TCP4ClientEndpoint(
                    reactor, "127.0.0.1", port, bindAddress=(source, 0)
                ),
            ),
            client,
        )

    @inlineCallbacks
    def pipeline(self, requests, pop=PRIMARY, source="127.0.0.1"):
        """
        Send C{requests} (bytes each, the last asking to close) in one
        write on one connection: the parsed responses.
        """
        self.assertIn(b"\r\nConnection: close\r\n", requests[-1])
        client = yield self.raw(b"".join(requests), pop, source)
        return parse_responses(client.received)

    def signed_request(self, batch, signer_pop=PRIMARY, close=False, **kwargs):
        body, headers = self.signed(batch, signer_pop)
        return http_request(body, headers, close=close, **kwargs)

    def assertRawRefused(self, response, status, word):
        """
        A parsed raw answer is C{status} with exactly C{{"error": word}}
        and the security headers.
        """
        code, headers, body = response
        self.assertEqual(code, status, body)
        self.assertEqual(body, json.dumps({"error": word}, separators=(",", ":")).encode())
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"x-content-type-options"], [b"nosniff"])
        self.assertEqual(headers[b"cache-control"], [b"no-store"])
        self.assertNotIn(b"server", headers)


class CertificateModeTests(ReceiverTestCase):
    @inlineCallbacks
    def test_valid_batch_applies(self):
        """
        A batch signed by the primary's certificate is applied: 200 with the
        counts, and the backup vault holds the entries, owned by the primary.
        """
        result = yield self.send(self.batch())
        self.assertApplied(result, applied=3)
        entries, owner = self.stored()
        self.assertEqual(entries, tuple(sorted(ENTRIES, key=lambda e: e.entry_id)))
        self.assertEqual(owner, PRIMARY)

    @inlineCallbacks
    def test_source_pop_not_in_certificate(self):
        """
        The primary's valid certificate with another authorised POP as
        source_pop (signed with the primary's own key, so the signature
        verifies) is forbidden and nothing is applied.
        """
        result = yield self.send(self.batch(source_pop=PARTNER), pop=PRIMARY)
        self.assertRefused(result, 403, "forbidden")
        self.assertNothingApplied()
        [refusal] = self.refusals()
        self.assertEqual(refusal["claimed_pop"], PARTNER)
        self.assertEqual(refusal["proven_pop"], PRIMARY)

    @inlineCallbacks
    def test_signed_by_another_pop(self):
        """
        A body signed with another POP's key than the certificate presented
        fails authentication.
        """
        result = yield self.send(self.batch(), pop=PRIMARY, signer_pop=PARTNER)
        self.assertRefused(result, 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_body_changed_after_signing(self):
        """
        One byte changed after signing fails authentication, audited as a
        failed authentication with the POP the certificate proves, charged
        to nothing the body claims, and logged at critical level.
        """
        body, headers = self.signed(self.batch())
        index = body.index(b'"seq":7') + len(b'"seq":')
        changed = body[:index] + b"8" + body[index + 1 :]
        result = yield self.post(changed, headers)
        self.assertRefused(result, 401, "unauthenticated")
        self.assertNothingApplied()
        [refusal] = self.refusals()
        self.assertTrue(refusal["auth_failure"])
        self.assertIsNone(refusal["claimed_pop"])
        self.assertEqual(refusal["proven_pop"], PRIMARY)
        self.assertEqual(refusal["bytes"], len(changed))
        [critical] = self.critical_events()
        self.assertEqual(critical["result"], "unauthenticated")

    @inlineCallbacks
    def test_missing_signature(self):
        body, headers = self.signed(self.batch())
        del headers[protocol.SIGNATURE_HEADER]
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_two_signatures(self):
        body, headers = self.signed(self.batch())
        headers[protocol.SIGNATURE_HEADER] *= 2
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_stale_timestamp(self):
        """
        A correctly signed batch older than max_request_age is refused with
        401, audited with both clocks and not as a failed authentication.
        """
        result = yield self.send(self.batch(timestamp=NOW - MAX_AGE - 1))
        self.assertRefused(result, 401, "unauthenticated")
        self.assertNothingApplied()
        [refusal] = self.refusals()
        self.assertFalse(refusal["auth_failure"])
        self.assertEqual(refusal["request_timestamp"], NOW - MAX_AGE - 1)
        self.assertEqual(refusal["backup_clock"], NOW)
        self.assertEqual(refusal["proven_pop"], PRIMARY)
        self.assertEqual(self.critical_events(), [])

    @inlineCallbacks
    def test_max_request_age_boundary(self):
        """
        A batch exactly max_request_age old is still fresh; one second more
        and it is stale.
        """
        self.clock.advance(MAX_AGE)
        self.assertApplied((yield self.send(self.batch())), applied=3)
        self.clock.advance(1)
        result = yield self.send(self.batch())
        self.assertRefused(result, 401, "unauthenticated")

    @inlineCallbacks
    def test_before_process_start(self):
        """
        A batch signed before the process started is refused even though it
        is younger than max_request_age: a restart reopens no old request.
        """
        result = yield self.send(self.batch(timestamp=STARTED_AT - 1))
        self.assertRefused(result, 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_restart_refuses_what_the_old_process_accepted(self):
        """
        A process restarted in the same second (its start rounded down) first
        answers 503 with Retry-After until its restart window has passed,
        never counting that as a failed authentication; after it, a request
        the old process may have applied (stamped clock_skew ahead) is
        refused as stale, and from started_at + clock_skew + 1 on, requests
        apply.
        """
        ahead = self.signed_request(self.batch(timestamp=NOW + SKEW), close=True)
        [response] = yield self.pipeline([ahead])
        self.assertEqual(response[0], 200)
        self.clock.advance(0.9)
        yield self.serve(self.store, started_at=int(self.clock.seconds()))
        in_start_second = self.signed_request(self.batch(seq=8), close=True)
        replays = [ahead.replace(b"Connection: close\r\n", b"")] * self.ban_after
        responses = yield self.pipeline(replays + [in_start_second])
        for response in responses:
            self.assertRawRefused(response, 503, "unavailable")
            self.assertEqual(response[1][b"retry-after"], [b"%d" % (SKEW + 1)])
        refusals = self.refusals()
        self.assertEqual(len(refusals), self.ban_after + 1)
        self.assertTrue(all(r["reason"].startswith("starting:") for r in refusals))
        self.assertFalse(any(r["auth_failure"] for r in refusals))
        self.clock.advance(SKEW + 0.1)
        [response] = yield self.pipeline([ahead])
        self.assertRawRefused(response, 401, "unauthenticated")
        self.assertEqual(self.refusals()[-1]["reason"], "timestamp inside the restart window")
        last_refused = self.batch(seq=9, timestamp=NOW + SKEW)
        self.assertRefused((yield self.send(last_refused)), 401, "unauthenticated")
        first_fresh = self.batch(seq=9, timestamp=NOW + SKEW + 1)
        self.assertApplied((yield self.send(first_fresh)), applied=0, skipped=3, seq=9)

    @inlineCallbacks
    def test_from_the_future(self):
        result = yield self.send(self.batch(timestamp=NOW + SKEW + 1))
        self.assertRefused(result, 401, "unauthenticated")
        result = yield self.send(self.batch(timestamp=NOW + SKEW))
        self.assertApplied(result, applied=3)

    @inlineCallbacks
    def test_replay_refused(self):
        """
        The identical request sent twice is applied once; the replay is
        refused as stale, even after the entries changed in the meantime.
        """
        body, headers = self.signed(self.batch())
        self.assertApplied((yield self.post(body, headers)), applied=3)
        newer = self.batch(entries=[dataclasses.replace(ENTRIES[0], version=9)])
        self.assertApplied((yield self.send(newer)), applied=1)
        self.clock.advance(MAX_AGE - 1)
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")
        entries, _ = self.stored()
        self.assertEqual(entries[1].entry_id, "login-1")
        self.assertEqual(entries[1].version, 9)

    @inlineCallbacks
    def test_source_not_authorised(self):
        """
        A POP with a valid certificate from our CA, none of whose names is
        in authorized_pops, is forbidden as soon as its headers are in:
        the client sends no body and still gets its answer, the connection
        closed.  Each such request counts as a failed authentication of
        the certificate, which is banned after ban_after of them.
        """
        body, headers = self.signed(self.batch(source_pop=STRANGER), STRANGER)
        head = http_request(body, headers)[: -len(body)]
        for _ in range(self.ban_after):
            client = yield self.raw(head, pop=STRANGER)
            [response] = parse_responses(client.received)
            self.assertRawRefused(response, 403, "forbidden")
            self.assertEqual(response[1][b"connection"], [b"close"])
            # Past the digest window, so each refusal has its own record.
            self.clock.advance(REFUSAL_DIGEST_SECONDS)
        self.assertNothingApplied()
        refusals = self.refusals()
        self.assertEqual(len(refusals), self.ban_after)
        self.assertTrue(all(r["auth_failure"] for r in refusals))
        self.assertEqual({r["bytes"] for r in refusals}, {0})
        self.assertIn("ban starts for", refusals[-1]["reason"])
        client = yield self.raw(http_request(body, headers, close=True), pop=STRANGER)
        self.assertRawRefused(parse_responses(client.received)[0], 403, "forbidden")
        self.assertTrue(self.refusals()[-1]["reason"].startswith("banned: "))

    @inlineCallbacks
    def test_other_authorised_pop(self):
        """
        Another authorised POP, proving itself with its own certificate, may
        replicate.
        """
        result = yield self.send(self.batch(source_pop=PARTNER), pop=PARTNER)
        self.assertApplied(result, applied=3)

    @inlineCallbacks
    def test_vault_of_another_pop(self):
        """
        A vault replicated by the primary cannot be overwritten by the other
        authorised POP: 403 from the store, and the primary's data stays.
        """
        self.assertApplied((yield self.send(self.batch())), applied=3)
        taken = [dataclasses.replace(ENTRIES[0], version=99, data=b"forged")]
        result = yield self.send(
            self.batch(source_pop=PARTNER, entries=taken), pop=PARTNER
        )
        self.assertRefused(result, 403, "forbidden")
        entries, owner = self.stored()
        self.assertEqual(owner, PRIMARY)
        self.assertEqual(entries[1].data, b"ciphertext one")
        refusal = self.records()[-1]
        self.assertEqual(
            (refusal["status"], refusal["claimed_pop"], refusal["proven_pop"]),
            (403, PARTNER, PARTNER),
        )
        self.assertFalse(refusal["auth_failure"])

    @inlineCallbacks
    def test_wrong_target(self):
        result = yield self.send(self.batch(target_pop="geneva-02"))
        self.assertRefused(result, 409, "conflict")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_malformed(self):
        """
        A correctly signed body that is not a v1 batch is malformed.
        """
        body = protocol.serialise(self.batch()).replace(b'"protocol":1', b'"protocol":2')
        signature = protocol.CertificateSigner(
            self.identities[PRIMARY].private_key
        ).sign(body)
        headers = {
            b"Content-Type": [b"application/json"],
            protocol.SIGNATURE_HEADER: [signature],
        }
        self.assertRefused((yield self.post(body, headers)), 400, "malformed")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_get(self):
        result = yield self.post(None, {}, method=b"GET")
        self.assertRefused(result, 405, "method")
        self.assertEqual(result[0].headers.getRawHeaders(b"Allow"), [b"POST"])

    @inlineCallbacks
    def test_text_plain(self):
        body, headers = self.signed(self.batch())
        headers[b"Content-Type"] = [b"text/plain"]
        self.assertRefused((yield self.post(body, headers)), 415, "media_type")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_json_with_charset(self):
        body, headers = self.signed(self.batch())
        headers[b"Content-Type"] = [b"Application/JSON; charset=utf-8"]
        self.assertApplied((yield self.post(body, headers)), applied=3)

    @inlineCallbacks
    def test_too_large(self):
        """
        A body above max_request_bytes is refused with 413 before any
        signature check.
        """
        body = b"{" + b" " * MAX_REQUEST_BYTES + b"}"
        headers = {b"Content-Type": [b"application/json"]}
        self.assertRefused((yield self.post(body, headers)), 413, "too_large")

    @inlineCallbacks
    def test_too_large_chunked(self):
        """
        A chunked body above max_request_bytes is refused too.
        """
        body = b"{" + b" " * MAX_REQUEST_BYTES + b"}"
        headers = {b"Content-Type": [b"application/json"]}
        self.assertRefused(
            (yield self.post(body, headers, chunked=True)), 413, "too_large"
        )

    @inlineCallbacks
    def test_unknown_path(self):
        for path in (
            b"/",
            b"/api/replication/apply/",
            b"/api/replication/applyx",
            b"/api/replication/apply?x=1",
        ):
            result = yield self.post(None, {}, method=b"GET", path=path)
            self.assertRefused(result, 404, "not_found")

    @inlineCallbacks
    def test_client_certificate_from_another_ca(self):
        """
        A client certificate with the primary's subject and names from
        another CA (of the same name) is refused at the handshake: no answer
        at all, nothing applied, one audit record of a failed
        authentication, and no ban charged to the address.
        """
        other_dir = os.path.abspath(self.mktemp())
        os.makedirs(other_dir)
        other_key, other_ca = pki.make_ca()
        self.assertEqual(other_ca.subject, self.ca_cert.subject)
        impostor = tls.load_identity(
            *pki.write_pop_files(other_dir, other_key, other_ca, PRIMARY)
        )
        self.assertEqual(
            impostor.certificate.subject, self.identities[PRIMARY].certificate.subject
        )
        self.identities["impostor"] = impostor
        body, headers = self.signed(self.batch(), signer_pop="impostor")
        error = yield self.assertFailure(
            self.post(body, headers, pop="impostor"), ResponseNeverReceived
        )
        [reason] = error.reasons
        self.assertTrue(reason.check(SSL.Error))
        self.assertIn("unknown ca", str(reason.value))
        self.assertNothingApplied()
        yield self.factory.whenAllLost()
        [record] = self.refusals()
        self.assertEqual(
            (record["result"], record["status"], record["auth_failure"], record["peer"]),
            ("tls_refused", 0, True, "127.0.0.1"),
        )
        self.assertIn("certificate verify failed", record["reason"])
        self.assertEqual(len(self.site.defences.bans), 0)

    @inlineCallbacks
    def test_disconnect_before_answer(self):
        """
        A client that goes away while its batch is applied gets no answer
        written after it left; the batch is still applied, nothing fails.
        """
        held = _HeldStore(self.store)
        yield self.serve(held)
        client = _Collect(self.signed_request(self.batch()))
        yield self.connect(client)
        yield held.reached
        client.transport.abortConnection()
        yield client.lost
        yield self.factory.whenAllLost()
        held.release.callback(None)
        yield held.release
        self.assertEqual(client.received, b"")
        entries, _ = self.stored()
        self.assertEqual(len(entries), 3)
        [record] = self.records()
        self.assertEqual(record["result"], "applied")
        self.assertIn("went away", record["reason"])
        self.assertEqual(self.flushLoggedErrors(), [])

    @inlineCallbacks
    def test_unexpected_error(self):
        """
        An unexpected exception is a 500 with C{{"error": "internal"}}: its
        text (here a path) stays in the log.
        """
        yield self.serve(
            _FailingStore(sqlite3.OperationalError("unable to open /srv/vaults/x.db"))
        )
        result = yield self.send(self.batch())
        self.assertRefused(result, 500, "internal")
        self.assertNotIn(b"/srv", result[1])
        [logged] = self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertIn("/srv/vaults", str(logged.value))

    @inlineCallbacks
    def test_rate_limited(self):
        """
        A refusal raised anywhere in the chain is answered with its status;
        RateLimited also with Retry-After.
        """
        yield self.serve(_FailingStore(RateLimited("too many from calgary-01", 17)))
        result = yield self.send(self.batch())
        self.assertRefused(result, 429, "rate_limited")
        self.assertEqual(result[0].headers.getRawHeaders(b"Retry-After"), [b"17"])

    @inlineCallbacks
    def test_raw_answer_has_no_server_banner(self):
        """
        On the wire, an answer carries no Server header at all.
        """
        client = yield self.raw(
            b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        head, _, content = client.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        self.assertNotIn(b"server:", head.lower())
        self.assertNotIn(b"twisted", client.received.lower())
        self.assertEqual(content, b'{"error":"not_found"}')


class BearerModeTests(ReceiverTestCase):
    method = "bearer"

    @inlineCallbacks
    def test_valid_batch_applies(self):
        result = yield self.send(self.batch())
        self.assertApplied(result, applied=3)
        self.assertEqual(len(self.stored()[0]), 3)

    @inlineCallbacks
    def test_wrong_token(self):
        """
        A bearer token that is neither the current nor the previous one is
        refused, with an HMAC keyed with that token or with the right one;
        no token appears in any log event.
        """
        wrong = generate_token()
        for hmac_token in (wrong, self.current):
            body = protocol.serialise(self.batch())
            headers = self.bearer_headers(body, wrong, hmac_token)
            self.assertRefused(
                (yield self.post(body, headers)), 401, "unauthenticated"
            )
        self.assertNothingApplied()
        logged = repr(self.events).encode()
        for token in (wrong, self.current, self.previous):
            self.assertNotIn(token, logged)

    @inlineCallbacks
    def test_no_token(self):
        body, headers = self.signed(self.batch())
        del headers[b"Authorization"]
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")

    @inlineCallbacks
    def test_not_bearer(self):
        body, headers = self.signed(self.batch())
        headers[b"Authorization"] = [b"Basic " + self.current]
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")

    @inlineCallbacks
    def test_previous_token_works(self):
        """
        During a rotation the previous token still authenticates, as bearer
        and as HMAC key.
        """
        body = protocol.serialise(self.batch())
        headers = self.bearer_headers(body, self.previous)
        self.assertApplied((yield self.post(body, headers)), applied=3)

    @inlineCallbacks
    def test_hmac_keyed_with_the_other_token(self):
        """
        The bearer token and the HMAC key may be the two accepted tokens (a
        sender that reloaded its file between signing and sending).
        """
        body = protocol.serialise(self.batch())
        headers = self.bearer_headers(body, self.previous, hmac_token=self.current)
        self.assertApplied((yield self.post(body, headers)), applied=3)

    @inlineCallbacks
    def test_hmac_keyed_with_a_wrong_token(self):
        """
        A valid bearer token with an HMAC keyed with anything else fails.
        """
        body = protocol.serialise(self.batch())
        headers = self.bearer_headers(body, self.current, hmac_token=generate_token())
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_body_changed_after_signing(self):
        body, headers = self.signed(self.batch())
        changed = body.replace(b'"epoch":1', b'"epoch":2')
        self.assertRefused((yield self.post(changed, headers)), 401, "unauthenticated")
        self.assertNothingApplied()

    @inlineCallbacks
    def test_source_not_authorised(self):
        """
        The token proves no POP: a source outside authorized_pops is
        forbidden even with a valid token, and the audit records it as
        claimed, not proven.
        """
        result = yield self.send(self.batch(source_pop=STRANGER))
        self.assertRefused(result, 403, "forbidden")
        self.assertNothingApplied()
        [record] = self.records()
        self.assertEqual((record["claimed_pop"], record["proven_pop"]), (STRANGER, None))

    @inlineCallbacks
    def test_rotated_file_picked_up(self):
        """
        After the token file is rotated, the new token works and the token
        that fell out of it no longer does.
        """
        newest = generate_token()
        write_token_file(self.token_path, newest, self.current)
        self.clock.advance(1)
        body = protocol.serialise(self.batch())
        headers = self.bearer_headers(body, self.previous)
        self.assertRefused((yield self.post(body, headers)), 401, "unauthenticated")
        body = protocol.serialise(self.batch())
        self.assertApplied((yield self.post(body, self.bearer_headers(body, newest))), applied=3)


class _DefenceTests:
    """
    The guard chain, for both modes: bans, rate limits, the audit log.
    Small limits, so that they are reached in a few requests.
    """

    rate_limit = 10  # a token every 6 seconds
    ban_after = 3
    ban_duration = 600

    @inlineCallbacks
    def test_body_checked_off_the_reactor_thread(self):
        """
        The signature check and the parse of a body run in threads, not on
        the reactor's: a body of max_request_bytes takes a good part of a
        second, and every other connection would wait for it.
        """
        on_reactor = []

        def record_thread(name):
            original = getattr(protocol, name)

            def recorded(*args):
                on_reactor.append((name, isInIOThread()))
                return original(*args)

            self.patch(protocol, name, recorded)

        verify = "verify_certificate_signature" if self.method == "mtls" else "verify_hmac_signature"
        record_thread(verify)
        record_thread("parse_batch")
        result = yield self.send(self.batch())
        self.assertApplied(result, applied=3)
        self.assertEqual(on_reactor, [(verify, False), ("parse_batch", False)])

    def forged(self, batch, close=False):
        """
        A request for C{batch} that fails authentication.
        """
        body, headers = self.forged_parts(batch)
        return http_request(body, headers, close=close)

    def forged_parts(self, batch):
        """
        The body of C{batch} and headers that fail authentication: signed
        with a key no certificate has (mtls), with a token that is not ours
        (bearer).
        """
        body = protocol.serialise(batch)
        if self.method == "mtls":
            signer = protocol.CertificateSigner(ec.generate_private_key(ec.SECP256R1()))
            headers = {
                b"Content-Type": [b"application/json"],
                protocol.SIGNATURE_HEADER: [signer.sign(body)],
            }
        else:
            headers = self.bearer_headers(body, generate_token())
        return body, headers

    def credentials(self, headers):
        """
        The secret parts of C{headers}: the signature value, the bearer
        token.
        """
        [signature] = headers[protocol.SIGNATURE_HEADER]
        found = [signature.split(b"=", 1)[1]]
        for value in headers.get(b"Authorization", []):
            found.append(value.split(b" ", 1)[1])
        return found

    def now(self):
        return int(self.clock.seconds())

    def partner_batch(self, **changes):
        entries = [dataclasses.replace(e, vault_id=PARTNER_VAULT_ID) for e in ENTRIES]
        return self.batch(source_pop=PARTNER, entries=entries, **changes)

    @inlineCallbacks
    def test_flood_leaves_authorised_pop_served(self):
        """
        1,000 requests that fail authentication, pipelined from another
        address: the first ban_after are refused as unauthenticated, the
        next as banned, at once, and the connection closed without reading
        the rest; so is the next flood; each answer audited.  Then the
        primary's batch is applied as usual.
        """
        count = 1000
        flood = [self.forged(self.batch()) for _ in range(count - 1)]
        flood.append(self.forged(self.batch(), close=True))
        expected = [(401, "unauthenticated")] * self.ban_after + [(403, "forbidden")]
        for answers in (expected, expected[-1:]):
            responses = yield self.pipeline(flood, pop=PARTNER, source="127.0.0.2")
            self.assertEqual(
                [(status, json.loads(body)["error"]) for status, _, body in responses],
                answers,
            )
            self.assertEqual(responses[-1][1][b"connection"], [b"close"])
        self.assertApplied((yield self.send(self.batch())), applied=3)
        records = self.records()
        self.assertEqual(len(records), self.ban_after + 3)
        self.assertEqual(sum(r["auth_failure"] for r in records), self.ban_after)
        self.assertEqual(self.audit.auth_failures, self.ban_after)

    @inlineCallbacks
    def test_rate_limit_per_address(self):
        """
        The per-address limit comes before any other check (a GET gets 429,
        not 405) with Retry-After in seconds; a token returns after that
        many seconds of the clock.
        """
        requests = [http_request(method=b"GET") for _ in range(self.rate_limit)]
        requests.append(http_request(method=b"GET", close=True))
        responses = yield self.pipeline(requests)
        statuses = [status for status, _, _ in responses]
        self.assertEqual(statuses, [405] * self.rate_limit + [429])
        self.assertRawRefused(responses[-1], 429, "rate_limited")
        self.assertEqual(responses[-1][1][b"retry-after"], [b"6"])
        self.assertEqual(
            self.records()[-1]["reason"], "rate limit reached by address:127.0.0.1"
        )
        self.clock.advance(5)
        [response] = yield self.pipeline([http_request(method=b"GET", close=True)])
        self.assertEqual(response[0], 429)
        self.clock.advance(1)
        [response] = yield self.pipeline([http_request(method=b"GET", close=True)])
        self.assertEqual(response[0], 405)

    @inlineCallbacks
    def test_stale_never_counts_towards_a_ban(self):
        """
        Correctly signed requests that are too old are refused and audited
        but ban nobody: the next fresh batch applies.
        """
        stale = [
            self.signed_request(self.batch(timestamp=NOW - MAX_AGE - 1))
            for _ in range(self.ban_after + 1)
        ]
        responses = yield self.pipeline(stale + [self.signed_request(self.batch(), close=True)])
        self.assertEqual(
            [status for status, _, _ in responses], [401] * (self.ban_after + 1) + [200]
        )
        self.assertFalse(any(r["auth_failure"] for r in self.records()))

    @inlineCallbacks
    def test_success_clears_failures(self):
        """
        A successful authentication clears the failures counted so far: two
        failures, a success, two more failures ban nobody.
        """
        def valid(close=False):
            return self.signed_request(self.partner_batch(), signer_pop=PARTNER, close=close)

        def forged():
            return self.forged(self.partner_batch())

        requests = [forged(), forged(), valid(), forged(), forged(), valid(close=True)]
        responses = yield self.pipeline(requests, pop=PARTNER, source="127.0.0.2")
        self.assertEqual(
            [status for status, _, _ in responses], [401, 401, 200, 401, 401, 200]
        )

    @inlineCallbacks
    def test_bad_batch_creates_nothing(self):
        """
        Correctly signed batches with vault ids that are not ours (a path,
        upper case, too short) are malformed, and no file or directory is
        created anywhere.
        """
        base = os.path.dirname(self.data_dir)
        before = sorted(os.listdir(base))
        good = protocol.serialise(self.batch())
        for vault_id in (b"../../../escaped", b"0123456789ABCDEF", b"0123"):
            body = good.replace(VAULT_ID.encode(), vault_id)
            self.assertNotEqual(body, good)
            [response] = yield self.pipeline(
                [http_request(body, self.sign(body), close=True)]
            )
            self.assertRawRefused(response, 400, "malformed")
        self.assertEqual(os.listdir(self.data_dir), [])
        self.assertEqual(sorted(os.listdir(base)), before)
        self.assertFalse(os.path.exists(os.path.join(base, "..", "escaped")))

    @inlineCallbacks
    def test_concurrent_identical_requests_apply_once(self):
        """
        The same request on a second connection while the first is being
        applied is refused as a replay (and not as a failed
        authentication); the batch is applied once.
        """
        held = _HeldStore(self.store)
        yield self.serve(held)
        request = self.signed_request(self.batch(), close=True)
        first = _Collect(request)
        yield self.connect(first)
        yield held.reached
        second = yield self.raw(request, alone=False)
        held.release.callback(None)
        yield first.lost
        [replayed] = parse_responses(second.received)
        self.assertRawRefused(replayed, 401, "unauthenticated")
        [applied] = parse_responses(first.received)
        self.assertEqual(json.loads(applied[2])["applied"], 3)
        refusal, success = self.records()
        self.assertEqual(refusal["reason"], "nonce already seen")
        self.assertFalse(refusal["auth_failure"])
        self.assertEqual(success["result"], "applied")

    @inlineCallbacks
    def test_audit_log_reads_back(self):
        """
        Every attempt, whatever its outcome or the point where it was
        refused, is one line of JSON with all the fields; no signature, key
        or token is in the file.
        """
        body, headers = self.signed(self.batch())
        forged_body, forged_headers = self.forged_parts(self.batch())
        over = b" " * (MAX_REQUEST_BYTES + 1)
        requests = [
            http_request(body, headers),
            http_request(forged_body, forged_headers),
            http_request(method=b"GET"),
            http_request(method=b"GET", path=b"/x"),
            http_request(over, [(b"Content-Type", b"application/json")], close=True),
        ]
        responses = yield self.pipeline(requests)
        self.assertEqual(
            [status for status, _, _ in responses], [200, 401, 405, 404, 413]
        )
        [bad] = yield self.pipeline([http_request(method=b"GET\x00", close=True)])
        self.assertEqual(bad[0], 400)
        records = self.records()
        self.assertEqual(
            [r["result"] for r in records],
            ["applied", "unauthenticated", "method", "not_found", "too_large", "malformed"],
        )
        applied = records[0]
        self.assertEqual(
            {k: applied[k] for k in ("time", "backup_clock", "duration")},
            {"time": NOW, "backup_clock": NOW, "duration": 0},
        )
        self.assertEqual(
            {k: applied[k] for k in ("peer", "claimed_pop", "proven_pop", "entries")},
            {"peer": "127.0.0.1", "claimed_pop": PRIMARY, "proven_pop": PRIMARY, "entries": 3},
        )
        self.assertEqual(
            (applied["vaults"], applied["bytes"], applied["request_timestamp"]),
            (1, len(body), NOW),
        )
        self.assertEqual(applied["reason"], "epoch 1 seq 7: applied 3, skipped 0")
        with open(self.audit_path, "rb") as f:
            written = f.read()
        secrets = self.credentials(headers) + self.credentials(forged_headers)
        for secret in secrets + self.secrets():
            self.assertGreaterEqual(len(secret), 32)
            self.assertNotIn(secret[-32:], written)
        return records

    @inlineCallbacks
    def test_audit_log_from_the_config_by_default(self):
        """
        Called as the service calls it, without an audit log, the site
        writes to security.audit_log.
        """
        path = os.path.join(os.path.dirname(self.data_dir), "configured.log")
        config = dataclasses.replace(
            self.config,
            security=dataclasses.replace(self.config.security, audit_log=path),
        )
        yield self.serve(self.store, config=config, own_audit=True)
        self.addCleanup(self.site.defences.audit.close)
        self.assertApplied((yield self.send(self.batch())), applied=3)
        with open(path, "rb") as f:
            [line] = f.read().splitlines()
        self.assertEqual(json.loads(line)["result"], "applied")
        self.assertEqual(self.records(), [])


class CertificateDefenceTests(_DefenceTests, ReceiverTestCase):
    def certificate_key(self, pop):
        der = self.identities[pop].certificate.public_bytes(Encoding.DER)
        return "cert:" + fingerprint(der)

    @inlineCallbacks
    def test_shared_host_name_bans_only_the_failing_certificate(self):
        """
        Certificates that all name the same host (as C{gen-certs --host}
        makes them): an unauthorised one's failures ban that certificate,
        not the name they share, so the authorised ones replicate on, and
        every record names the authorised POPs its certificate proves.
        """
        shared = os.path.join(self.pki_dir, "shared")
        os.makedirs(shared)
        for pop in (PRIMARY, PARTNER, STRANGER):
            self.identities[pop] = tls.load_identity(
                *pki.write_pop_files(
                    shared, self.ca_key, self.ca_cert, pop, hosts=["localhost"]
                )
            )
        forged = http_request(
            *self.forged_parts(self.batch(source_pop=STRANGER)), close=True
        )
        for _ in range(self.ban_after + 1):
            client = yield self.raw(forged, pop=STRANGER)
            self.assertEqual(parse_responses(client.received)[0][0], 403)
            # Past the digest window, so each refusal has its own record.
            self.clock.advance(REFUSAL_DIGEST_SECONDS)
        refusals = self.refusals()
        self.assertTrue(
            refusals[self.ban_after - 1]["reason"].endswith(
                "ban starts for " + self.certificate_key(STRANGER)
            )
        )
        self.assertEqual(
            refusals[-1]["reason"], "banned: " + self.certificate_key(STRANGER)
        )
        self.assertEqual({r["proven_pop"] for r in refusals}, {None})
        self.assertApplied((yield self.send(self.batch(timestamp=self.now()))), applied=3)
        result = yield self.send(self.partner_batch(), pop=PARTNER)
        self.assertApplied(result, applied=3)
        applied = self.records()[-2:]
        self.assertEqual([r["proven_pop"] for r in applied], [PRIMARY, PARTNER])

    def secrets(self):
        """
        The primary's private key, as hex and base64 of its DER.
        """
        der = self.identities[PRIMARY].private_key.private_bytes(
            Encoding.DER, PrivateFormat.PKCS8, NoEncryption()
        )
        return [der.hex().encode(), base64.b64encode(der)]

    @inlineCallbacks
    def test_audit_log_reads_back(self):
        records = yield super().test_audit_log_reads_back()
        der = self.identities[PRIMARY].certificate.public_bytes(Encoding.DER)
        self.assertEqual(
            [r["fingerprint"] for r in records],
            [fingerprint(der)] * len(records),
        )

    @inlineCallbacks
    def test_ban_of_one_pop_leaves_another_replicating(self):
        """
        Failures over the partner's certificate ban the partner (not the
        POP its bodies claim, not the address they share with the primary):
        the partner is refused with 403 before any signature work, with
        that certificate or another one naming it (a rotated one), the
        primary behind the same address replicates on, and the ban lifts by
        itself after ban_duration.
        """
        forged = [self.forged(self.batch()) for _ in range(self.ban_after - 1)]
        forged.append(self.forged(self.batch(), close=True))
        responses = yield self.pipeline(forged, pop=PARTNER)
        self.assertEqual([s for s, _, _ in responses], [401] * self.ban_after)
        self.assertTrue(
            self.records()[-1]["reason"].endswith(
                "ban starts for pop:" + PARTNER
            )
        )
        self.assertApplied((yield self.send(self.batch())), applied=3)

        unsigned = http_request(
            b"{}", [(b"Content-Type", b"application/json")], close=True
        )
        for request in (self.signed_request(self.partner_batch(), signer_pop=PARTNER), unsigned):
            client = yield self.raw(request, pop=PARTNER)
            [response] = parse_responses(client.received)
            self.assertRawRefused(response, 403, "forbidden")
        self.assertEqual(
            self.records()[-1]["reason"], "banned: pop:" + PARTNER
        )
        rotated_dir = os.path.join(self.pki_dir, "rotated")
        os.mkdir(rotated_dir)
        self.identities[PARTNER] = tls.load_identity(
            *pki.write_pop_files(rotated_dir, self.ca_key, self.ca_cert, PARTNER)
        )
        client = yield self.raw(
            self.signed_request(self.partner_batch(), signer_pop=PARTNER), pop=PARTNER
        )
        [response] = parse_responses(client.received)
        self.assertRawRefused(response, 403, "forbidden")
        self.assertEqual(list_vault_ids(self.data_dir), [VAULT_ID])

        later = self.batch(seq=8, timestamp=self.now())
        self.assertApplied((yield self.send(later)), applied=0, skipped=3, seq=8)
        self.clock.advance(self.ban_duration)
        result = yield self.send(
            self.partner_batch(timestamp=self.now()), pop=PARTNER
        )
        self.assertApplied(result, applied=3)

    @inlineCallbacks
    def test_rate_limit_per_pop(self):
        """
        Each POP the certificate proves has its own bucket, whatever the
        address: the primary, drained from one address, is limited from
        another too, where the partner is not.
        """
        requests = [http_request(method=b"GET") for _ in range(self.rate_limit - 1)]
        requests.append(http_request(method=b"GET", close=True))
        yield self.pipeline(requests)
        [response] = yield self.pipeline(
            [http_request(method=b"GET", close=True)], source="127.0.0.3"
        )
        self.assertRawRefused(response, 429, "rate_limited")
        self.assertEqual(
            self.records()[-1]["reason"],
            "rate limit reached by pop:" + PRIMARY,
        )
        [response] = yield self.pipeline(
            [self.signed_request(self.partner_batch(), signer_pop=PARTNER, close=True)],
            pop=PARTNER,
            source="127.0.0.3",
        )
        self.assertEqual(response[0], 200)


class BearerDefenceTests(_DefenceTests, ReceiverTestCase):
    method = "bearer"

    def secrets(self):
        return [self.current, self.previous]

    @inlineCallbacks
    def test_audit_log_reads_back(self):
        """
        No token and no fingerprint of one is recorded.
        """
        records = yield super().test_audit_log_reads_back()
        self.assertEqual({r["fingerprint"] for r in records}, {None})
        with open(self.audit_path, "rb") as f:
            written = f.read()
        for token in (self.current, self.previous):
            self.assertNotIn(fingerprint(token).encode(), written)

    @inlineCallbacks
    def test_ban_by_address(self):
        """
        Without a verified token no POP is proven: failures are charged to
        the address (not to the POP the bodies claim), which is refused even
        with the right token until the ban lifts; the primary from another
        address replicates on.
        """
        forged = [self.forged(self.batch()) for _ in range(self.ban_after - 1)]
        forged.append(self.forged(self.batch(), close=True))
        responses = yield self.pipeline(forged, source="127.0.0.2")
        self.assertEqual([s for s, _, _ in responses], [401] * self.ban_after)
        self.assertTrue(
            self.records()[-1]["reason"].endswith("ban starts for address:127.0.0.2")
        )
        [response] = yield self.pipeline(
            [self.signed_request(self.batch(), close=True)], source="127.0.0.2"
        )
        self.assertRawRefused(response, 403, "forbidden")
        self.assertApplied((yield self.send(self.batch())), applied=3)
        self.clock.advance(self.ban_duration)
        [response] = yield self.pipeline(
            [self.signed_request(self.batch(seq=8, timestamp=self.now()), close=True)],
            source="127.0.0.2",
        )
        self.assertEqual(response[0], 200)

    @inlineCallbacks
    def test_rate_limit_per_pop(self):
        """
        Once the token verified, the POP of the body has its own bucket,
        whatever the address; a body that fails authentication takes
        nothing from the bucket of the POP it claims.
        """
        requests = [self.signed_request(self.batch()) for _ in range(self.rate_limit - 1)]
        requests.append(self.signed_request(self.batch(), close=True))
        responses = yield self.pipeline(requests)
        self.assertEqual([s for s, _, _ in responses], [200] * self.rate_limit)
        responses = yield self.pipeline(
            [
                self.forged(self.batch()),
                self.signed_request(self.batch()),
                self.signed_request(self.partner_batch(), close=True),
            ],
            source="127.0.0.3",
        )
        self.assertEqual([s for s, _, _ in responses], [401, 429, 200])
        self.assertEqual(
            self.records()[-2]["reason"], "rate limit reached by pop:calgary-01"
        )
