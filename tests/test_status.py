"""
Tests for clavitor_twisted.status: the status documents of both roles (on a
fake clock), their Prometheus rendering and terminal description, the
status site over real loopback HTTP, and C{clavitor-repl status} against a
running primary.
"""

import contextlib
import io
import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.http_headers import Headers

from clavitor_twisted import cli, demo, service, status
from clavitor_twisted.config import load_config
from clavitor_twisted.role import Role
from clavitor_twisted.vault import open_vault_for_writes
from clavitor_twisted.audit import AuditLog, AuditRecord
from clavitor_twisted.config import parse_config
from clavitor_twisted.defences import Defences
from clavitor_twisted.sender import SenderStatus
from tests.test_config import BACKUP, document
from tests.test_service import Pop

VAULT_A = "0123456789abcdef"
VAULT_B = "fedcba9876543210"


class _Sender:
    def __init__(self, state):
        self.state = state

    def status(self):
        return self.state


class _Store:
    def __init__(self, backlog):
        self._backlog = backlog

    def backlog(self):
        return succeed(dict(self._backlog))


def sender_status(**changes):
    fields = dict(
        started_at=1000.0,
        last_success=None,
        failures=0,
        retry_at=None,
        held={},
        batches=0,
        entries=0,
        failed_attempts=0,
        refused_attempts=0,
    )
    fields.update(changes)
    return SenderStatus(**fields)


def primary_document(backlog, now=1100.0, **changes):
    clock = Clock()
    clock.advance(now)
    source = status.PrimaryStatus(
        parse_config(document(metrics={})), _Sender(sender_status(**changes)), _Store(backlog), clock
    )
    return source.document()


def record(result, entries=0, auth_failure=False):
    return AuditRecord(
        time=0.0, peer="127.0.0.1", claimed_pop=None, proven_pop=None, entries=entries,
        vaults=0, bytes=0, result=result, status=200, reason="", duration=0.0,
        backup_clock=0.0, request_timestamp=None, auth_failure=auth_failure, fingerprint=None,
    )


def backup_source(clock):
    config = parse_config(document(BACKUP, metrics={}))
    audit = AuditLog(None, clock)
    defences = Defences(config, clock, audit)
    return status.BackupStatus(config, defences, 900.0), defences


def samples(text):
    """
    The samples of a metrics text, by name with labels; every other line
    is a HELP or TYPE comment.
    """
    found = {}
    for line in text.decode("utf-8").splitlines():
        if line.startswith("# "):
            assert line.split(" ")[1] in ("HELP", "TYPE"), line
            continue
        name, value = line.rsplit(" ", 1)
        found[name] = float(value)
    return found


class PrimaryStatusTests(SynchronousTestCase):
    def test_idle(self):
        """
        Nothing dirty: no backlog, no lag, vaults without dirty entries left
        out, never a success yet.
        """
        doc = self.successResultOf(primary_document({VAULT_A: 0}))
        self.assertEqual(doc["backlog"], {})
        self.assertEqual((doc["backlog_entries"], doc["lag_seconds"]), (0, 0.0))
        self.assertEqual((doc["pop_id"], doc["role"], doc["backup_pop"]),
                         ("calgary-01", "primary", "zurich-01"))
        self.assertIsNone(doc["last_success"])
        self.assertIsNone(doc["retry_in"])

    def test_behind(self):
        """
        A backlog: the lag runs from the last success; a pending retry and a
        held-back vault say how long they have to wait.
        """
        doc = self.successResultOf(primary_document(
            {VAULT_A: 3, VAULT_B: 5},
            last_success=1040.0,
            failures=2,
            retry_at=1105.0,
            held={VAULT_B: (1125.0, 3)},
            batches=7,
            entries=700,
        ))
        self.assertEqual(doc["backlog"], {VAULT_A: 3, VAULT_B: 5})
        self.assertEqual(doc["backlog_entries"], 8)
        self.assertEqual(doc["lag_seconds"], 60.0)
        self.assertEqual(doc["retry_in"], 5.0)
        self.assertEqual(doc["held_vaults"], {VAULT_B: {"retry_in": 25.0, "failures": 3}})
        json.dumps(doc)

    def test_lag_before_the_first_success(self):
        doc = self.successResultOf(primary_document({VAULT_A: 1}, now=1030.0))
        self.assertEqual(doc["lag_seconds"], 30.0)

    def test_metrics(self):
        doc = self.successResultOf(primary_document(
            {VAULT_A: 3, VAULT_B: 5}, last_success=1040.0, failures=2, held={VAULT_B: (1125.0, 3)},
            batches=7, entries=700, failed_attempts=4, refused_attempts=1,
        ))
        found = samples(status.metrics_text(doc))
        self.assertEqual(found, {
            'clavitor_repl_info{pop_id="calgary-01",role="primary"}': 1,
            "clavitor_repl_start_time_seconds": 1000.0,
            "clavitor_repl_backlog_entries": 8,
            "clavitor_repl_backlog_vaults": 2,
            "clavitor_repl_lag_seconds": 60.0,
            "clavitor_repl_last_success_timestamp_seconds": 1040.0,
            "clavitor_repl_consecutive_failures": 2,
            "clavitor_repl_held_vaults": 1,
            "clavitor_repl_batches_total": 7,
            "clavitor_repl_entries_replicated_total": 700,
            "clavitor_repl_failed_attempts_total": 4,
            "clavitor_repl_refused_attempts_total": 1,
        })
        self.assertNotIn(VAULT_A, status.metrics_text(doc).decode())

    def test_describe(self):
        doc = self.successResultOf(primary_document(
            {VAULT_A: 3}, last_success=1040.0, held={VAULT_B: (1125.0, 3)}, retry_at=1105.0,
        ))
        self.assertEqual(status.describe(doc), "\n".join([
            "primary calgary-01 -> backup zurich-01, up 100 s",
            "backlog: 3 entries in 1 vaults; lag 60 s",
            "last success: 60 s ago; 0 batches, 0 entries since start",
            "failures in a row: 0; next retry: in 5 s",
            "held back: 1",
            "  {}  retry in 25 s after 3 refusals".format(VAULT_B),
            "backlog by vault:",
            "  {}  3".format(VAULT_A),
        ]))


class BackupStatusTests(SynchronousTestCase):
    def test_counts(self):
        """
        A backup reports what its audit log counted and the size of its
        defences' state; bans count only while in force.
        """
        clock = Clock()
        clock.advance(1000)
        source, defences = backup_source(clock)
        for result, entries, failed in (("applied", 3, False), ("applied", 2, False),
                                        ("unauthenticated", 0, True)):
            defences.audit.record(record(result, entries, failed))
        for _ in range(10):
            defences.bans.record_failure("address:192.0.2.1")
        defences.nonces.check_and_record("a" * 32, 1000)
        doc = self.successResultOf(source.document())
        self.assertEqual(doc["requests"], {"applied": 2, "unauthenticated": 1})
        self.assertEqual((doc["auth_failures"], doc["entries_applied"]), (1, 5))
        self.assertEqual((doc["bans"], doc["nonces"], doc["connections"]), (1, 1, 0))
        self.assertEqual((doc["role"], doc["started_at"], doc["time"]), ("backup", 900.0, 1000.0))
        found = samples(status.metrics_text(doc))
        self.assertEqual(found['clavitor_repl_requests_total{result="applied"}'], 2)
        self.assertEqual(found["clavitor_repl_auth_failures_total"], 1)
        self.assertEqual(found["clavitor_repl_bans"], 1)
        self.assertIn("requests: applied 2, unauthenticated 1", status.describe(doc))

        clock.advance(parse_config(document(BACKUP)).security.ban_duration)
        self.assertEqual(self.successResultOf(source.document())["bans"], 0)

    def test_label_escaping(self):
        """
        A label value cannot break out of its quotes or its line.
        """
        text = status.metrics_text({
            "pop_id": 'a"b\\c\nd', "role": "backup", "started_at": 0, "requests": {},
            "auth_failures": 0, "entries_applied": 0, "bans": 0, "nonces": 0, "connections": 0,
        }).decode()
        self.assertIn('clavitor_repl_info{pop_id="a\\"b\\\\c\\nd",role="backup"} 1\n', text)


class _Raw(Protocol):
    """
    Sends C{request} and keeps what comes back until the server closes.
    """

    def __init__(self, request):
        self.request = request
        self.received = b""
        self.lost = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class _FailingSource:
    def document(self):
        raise RuntimeError("/secret/path")


class StatusSiteTests(TestCase):
    timeout = 30

    def serve(self, source):
        port = reactor.listenTCP(0, status.make_status_site(source), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return "http://127.0.0.1:%d" % (port.getHost().port,)

    @inlineCallbacks
    def get(self, url, method=b"GET"):
        response = yield Agent(reactor).request(method, url.encode(), Headers())
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def test_status_and_metrics(self):
        """
        /status is the JSON document and /metrics its Prometheus text, both
        with nosniff and no-store and without a Server banner.
        """
        clock = Clock()
        clock.advance(1000)
        source, _ = backup_source(clock)
        base = self.serve(source)
        expected = self.successResultOf(source.document())
        for path, media_type, body in (
            ("/status", status.JSON_TYPE, json.dumps(expected).encode()),
            ("/metrics", status.METRICS_TYPE, status.metrics_text(expected)),
        ):
            response, received = yield self.get(base + path)
            self.assertEqual((response.code, received), (200, body))
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"Content-Type"), [media_type])
            self.assertEqual(headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
            self.assertEqual(headers.getRawHeaders(b"Cache-Control"), [b"no-store"])
            self.assertFalse(headers.hasHeader(b"Server"))

    @inlineCallbacks
    def test_request_with_a_body_refused_at_its_headers(self):
        """
        Status and metrics are only read: a request declaring a body (of
        any size, or chunked) gets 413 at once and the connection is
        closed; the body is never read.
        """
        clock = Clock()
        source, _ = backup_source(clock)
        port = reactor.listenTCP(0, status.make_status_site(source), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for framing in (b"Content-Length: 30000000", b"Transfer-Encoding: chunked"):
            client = _Raw(b"POST /status HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n12345")
            yield connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
            )
            yield client.lost
            head, _, body = client.received.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
            self.assertEqual(json.loads(body), {"error": "too_large"})

    @inlineCallbacks
    def raw(self, port, request):
        client = _Raw(request)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        yield client.lost
        return client.received

    @inlineCallbacks
    def test_odd_requests_answered_like_any(self):
        """
        C{OPTIONS *} (which twisted.web answers itself) is a JSON 404 with
        the headers and no banner; bad framing (an HTTP/2 preface) a JSON
        400 with them, not twisted.web's bare one.
        """
        source, _ = backup_source(Clock())
        port = reactor.listenTCP(0, status.make_status_site(source), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for request, code, word in (
            (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404", "not_found"),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"400", "malformed"),
        ):
            received = yield self.raw(port, request)
            head, _, body = received.partition(b"\r\n\r\n")
            self.assertEqual(head.split(b" ")[1], code, head)
            self.assertEqual(json.loads(body), {"error": word})
            self.assertIn(b"X-Content-Type-Options: nosniff", head)
            self.assertNotIn(b"Server:", head)

    @inlineCallbacks
    def test_connections_capped(self):
        """
        At most MAX_STATUS_CONNECTIONS connections at once, even ones kept
        busy a byte at a time: a new one closes the oldest and is served.
        """
        source, _ = backup_source(Clock())
        port = reactor.listenTCP(0, status.make_status_site(source), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        site = port.factory
        held = []
        for _ in range(status.MAX_STATUS_CONNECTIONS):
            client = _Raw(b"G")
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
            held.append(client)
        while site.open_connections < status.MAX_STATUS_CONNECTIONS:
            yield deferLater(reactor, 0.01, lambda: None)
        request = b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        self.assertIn(b" 200 ", (yield self.raw(port, request)))
        yield held[0].lost
        self.assertEqual([c.lost.called for c in held[1:]], [False] * (len(held) - 1))
        self.assertLessEqual(site.open_connections, status.MAX_STATUS_CONNECTIONS)
        for client in held[1:]:
            client.transport.loseConnection()
            yield client.lost

    @inlineCallbacks
    def test_connection_lifetime(self):
        """
        A connection kept busy a byte at a time (never idle) is closed
        STATUS_CONNECTION_SECONDS after it opened.
        """
        clock = Clock()
        source, _ = backup_source(clock)
        port = reactor.listenTCP(
            0, status.make_status_site(source, clock), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = _Raw(b"G")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        while port.factory.open_connections < 1:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertLess(status.STATUS_IDLE_TIMEOUT, status.STATUS_CONNECTION_SECONDS)
        channel = next(iter(port.factory._open))
        for second in range(status.STATUS_CONNECTION_SECONDS - 1):
            client.transport.write(b"E")
            while len(channel._buffer) < second + 2:
                yield deferLater(reactor, 0.005, lambda: None)
            clock.advance(1)
        self.assertFalse(client.lost.called)
        clock.advance(1)
        yield client.lost

    @inlineCallbacks
    def test_refusals(self):
        """
        Another path is a JSON 404, another method a 405; a failure making
        the document is a 500 that keeps its text in the log.
        """
        clock = Clock()
        source, _ = backup_source(clock)
        base = self.serve(source)
        response, body = yield self.get(base + "/")
        self.assertEqual((response.code, json.loads(body)), (404, {"error": "not_found"}))
        self.assertFalse(response.headers.hasHeader(b"Server"))
        response, body = yield self.get(base + "/metrics", b"POST")
        self.assertEqual((response.code, json.loads(body)), (405, {"error": "method"}))

        base = self.serve(_FailingSource())
        response, body = yield self.get(base + "/status")
        self.assertEqual((response.code, json.loads(body)), (500, {"error": "internal"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StatusCommandTests(TestCase):
    """
    C{clavitor-repl status} against a primary built by make_service and
    started in this process (the command runs in a thread: it blocks).
    """

    timeout = 30

    def status_command(self, *args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["status", *args])
        return code, out.getvalue(), err.getvalue()

    @inlineCallbacks
    def test_running_primary(self):
        pop = Pop(self)
        port = demo.free_port()
        document_ = pop.primary(demo.free_port())
        document_["metrics"] = {"port": port}
        path = pop.write("primary.yaml", document_)
        vault = open_vault_for_writes(Role.PRIMARY, pop.primary_dir, VAULT_A)
        self.addCleanup(vault.close)
        vault.put_entry("entry-0", b"data", 1000)
        top = service.make_service(load_config(path), reactor, environ={})
        top.startService()
        self.addCleanup(top.stopService)

        code, out, err = yield deferToThread(self.status_command, path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("primary {} -> backup {}".format(demo.PRIMARY_POP, demo.BACKUP_POP), out)
        self.assertIn("backlog: 1 entries in 1 vaults", out)
        self.assertIn("  {}  1".format(VAULT_A), out)

        code, out, err = yield deferToThread(self.status_command, path, "--json")
        self.assertEqual(json.loads(out)["backlog"], {VAULT_A: 1})

    def test_not_configured_or_not_running(self):
        """
        Without a metrics section, or with no daemon on its port, the
        command says so (naming the keys, not the address) and exits 1.
        """
        pop = Pop(self)
        document_ = pop.primary(9)
        path = pop.write("primary.yaml", document_)
        self.assertEqual(
            self.status_command(path),
            (1, "", "status: metrics: not configured, so the daemon serves no status\n"),
        )
        document_["metrics"] = {"port": demo.free_port()}
        path = pop.write("other.yaml", document_)
        self.assertEqual(
            self.status_command(path),
            (1, "", "status: no status document from metrics.address, metrics.port\n"),
        )

    @inlineCallbacks
    def test_whatever_answers_is_not_trusted(self):
        """
        Something else on the metrics port (another local user's server,
        say) cannot make the command print a traceback, hang or drive the
        terminal: a document of the wrong shape or with non-finite numbers,
        a redirect elsewhere and an answer dribbled past the timeout are
        refused with the keys named, and control characters are printed as
        escapes.
        """
        answers = []

        class Fake(Resource):
            isLeaf = True

            def render_GET(self, request):
                answer = answers.pop(0)
                return answer(request) if callable(answer) else answer

        port = reactor.listenTCP(0, Site(Fake()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pop = Pop(self)
        document_ = pop.primary(9)
        document_["metrics"] = {"port": port.getHost().port}
        path = pop.write("primary.yaml", document_)
        good = self.successResultOf(primary_document({VAULT_A: 1}))
        class Elsewhere(Resource):
            isLeaf = True

            def render_GET(self, request):
                return json.dumps(good).encode()

        other = reactor.listenTCP(0, Site(Elsewhere()), interface="127.0.0.1")
        self.addCleanup(other.stopListening)

        def redirect(request):
            request.redirect(b"http://127.0.0.1:%d/status" % (other.getHost().port,))
            return b""

        dripping = {}

        def drip(request):
            def more():
                request.write(b" ")
                dripping["call"] = reactor.callLater(0.05, more)

            dripping["request"] = request
            more()
            return NOT_DONE_YET

        def stop_dripping():
            dripping["call"].cancel()
            dripping["request"].channel.transport.abortConnection()

        self.patch(cli, "STATUS_TIMEOUT", 1)
        for bad in (b"[1]", b"{}", b"not json", b"[" * 100_000,
                    json.dumps(dict(good, time="soon")).encode(),
                    json.dumps(dict(good, lag_seconds=float("nan"))).encode(),
                    json.dumps(good).encode().replace(b'"failures": 0', b'"failures": 1e999'),
                    redirect, drip):
            answers.append(bad)
            code, out, err = yield deferToThread(self.status_command, path)
            self.assertEqual(
                (code, out, err),
                (1, "", "status: no status document from metrics.address, metrics.port\n"),
            )
        stop_dripping()
        answers.append(json.dumps(dict(good, pop_id="\x1b[2Jevil\nline")).encode())
        code, out, err = yield deferToThread(self.status_command, path)
        self.assertEqual(code, 0)
        self.assertNotIn("\x1b", out)
        self.assertIn("primary \\x1b[2Jevil\\nline -> backup", out)
