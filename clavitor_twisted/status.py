# -*- test-case-name: tests.test_status -*-
"""
What a running POP tells its operator: C{GET /status} (JSON, what
C{clavitor-repl status} prints) and C{GET /metrics} (Prometheus text), over
plain HTTP on C{metrics.address} (loopback only) and C{metrics.port}.

Both are made from one status document, so they never disagree.  Nothing in
it is secret: counts, times, POP ids and the ids of vaults with a backlog.
"""

import json
from io import BytesIO
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from clavitor_twisted.config import Config
from clavitor_twisted.sender import Sender
from clavitor_twisted.vault import VaultStore

STATUS_PATH = b"/status"
METRICS_PATH = b"/metrics"
JSON_TYPE = b"application/json"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

log = Logger()


class StatusSource(Protocol):
    def document(self) -> Deferred[dict[str, Any]]:
        """
        This POP's status now, as JSON data.
        """


def _remaining(moment: float | None, now: float) -> float | None:
    return None if moment is None else max(0.0, moment - now)


class PrimaryStatus:
    """
    A primary: its backlog by vault (read from the vault files, in the vault
    pool), how far behind the backup is, and the sender's state.

    C{lag_seconds} is 0 with nothing dirty, else the time since the last
    batch the backup accepted (or since the start, before the first).
    """

    def __init__(self, config: Config, sender: Sender, store: VaultStore, clock: IReactorTime):
        self._config = config
        self._sender = sender
        self._store = store
        self._clock = clock

    def document(self) -> Deferred[dict[str, Any]]:
        return self._store.backlog().addCallback(self._document)

    def _document(self, backlog: dict[str, int]) -> dict[str, Any]:
        now = self._clock.seconds()
        state = self._sender.status()
        dirty = {vault_id: count for vault_id, count in sorted(backlog.items()) if count}
        last = state.last_success if state.last_success is not None else state.started_at
        return {
            "pop_id": self._config.pop_id,
            "role": self._config.role.value,
            "backup_pop": self._config.backup_pop.id,
            "time": now,
            "started_at": state.started_at,
            "backlog_entries": sum(dirty.values()),
            "backlog": dirty,
            "lag_seconds": now - last if dirty else 0.0,
            "last_success": state.last_success,
            "failures": state.failures,
            "retry_in": _remaining(state.retry_at, now),
            "held_vaults": {
                vault_id: {"retry_in": _remaining(until, now), "failures": failures}
                for vault_id, (until, failures) in sorted(state.held.items())
            },
            "batches": state.batches,
            "entries_replicated": state.entries,
            "failed_attempts": state.failed_attempts,
            "refused_attempts": state.refused_attempts,
        }


class BackupStatus:
    """
    A backup: its requests by result since start (what the audit log
    counted), and the size of its defences' state.
    """

    def __init__(self, config: Config, defences, started_at: float) -> None:
        self._config = config
        self._defences = defences
        self._started_at = started_at

    def document(self) -> Deferred[dict[str, Any]]:
        defences = self._defences
        audit = defences.audit
        return succeed(
            {
                "pop_id": self._config.pop_id,
                "role": self._config.role.value,
                "time": defences.clock.seconds(),
                "started_at": self._started_at,
                "requests": dict(sorted(audit.results.items())),
                "auth_failures": audit.auth_failures,
                "entries_applied": audit.entries_applied,
                "bans": defences.bans.active,
                "nonces": len(defences.nonces),
                "connections": len(defences.connections),
            }
        )


def _label(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def _metric(lines: list[str], name: str, kind: str, text: str, samples) -> None:
    """
    One metric family: C{samples} a number, or a list of (labels, number).
    """
    if not isinstance(samples, list):
        samples = [({}, samples)]
    lines.append("# HELP clavitor_repl_{} {}".format(name, text))
    lines.append("# TYPE clavitor_repl_{} {}".format(name, kind))
    for labels, value in samples:
        rendered = ",".join("{}={}".format(k, _label(v)) for k, v in labels.items())
        lines.append(
            "clavitor_repl_{}{} {}".format(name, "{" + rendered + "}" if rendered else "", value)
        )


def metrics_text(document: dict[str, Any]) -> bytes:
    """
    The Prometheus text exposition of a status document.
    """
    lines: list[str] = []
    _metric(
        lines, "info", "gauge", "The POP this process runs (always 1).",
        [({"pop_id": document["pop_id"], "role": document["role"]}, 1)],
    )
    _metric(lines, "start_time_seconds", "gauge", "When this process started (Unix time).",
            document["started_at"])
    if document["role"] == "primary":
        _metric(lines, "backlog_entries", "gauge", "Dirty entries not yet on the backup.",
                document["backlog_entries"])
        _metric(lines, "backlog_vaults", "gauge", "Vaults with dirty entries.",
                len(document["backlog"]))
        _metric(lines, "lag_seconds", "gauge",
                "0 with nothing dirty, else seconds since the backup last accepted a batch.",
                document["lag_seconds"])
        if document["last_success"] is not None:
            _metric(lines, "last_success_timestamp_seconds", "gauge",
                    "When the backup last accepted a batch (Unix time).", document["last_success"])
        _metric(lines, "consecutive_failures", "gauge",
                "Failed attempts in a row (link, backup or credentials).", document["failures"])
        _metric(lines, "held_vaults", "gauge", "Vaults held back after the backup refused them.",
                len(document["held_vaults"]))
        _metric(lines, "batches_total", "counter", "Batches the backup accepted.",
                document["batches"])
        _metric(lines, "entries_replicated_total", "counter",
                "Entries in batches the backup accepted.", document["entries_replicated"])
        _metric(lines, "failed_attempts_total", "counter",
                "Attempts that failed on the link, the backup or the credentials.",
                document["failed_attempts"])
        _metric(lines, "refused_attempts_total", "counter",
                "Attempts the backup refused for their content (400, 403, 409, 413).",
                document["refused_attempts"])
    else:
        _metric(lines, "requests_total", "counter", "Replication requests by result.",
                [({"result": result}, count) for result, count in document["requests"].items()])
        _metric(lines, "auth_failures_total", "counter", "Failed authentications.",
                document["auth_failures"])
        _metric(lines, "entries_applied_total", "counter", "Entries in applied batches.",
                document["entries_applied"])
        _metric(lines, "bans", "gauge", "Bans in force.", document["bans"])
        _metric(lines, "nonces", "gauge", "Nonces held against replays.", document["nonces"])
        _metric(lines, "connections", "gauge", "Open replication connections.",
                document["connections"])
    return ("\n".join(lines) + "\n").encode("utf-8")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return "{} s".format(seconds)
    if seconds < 7200:
        return "{} min".format(seconds // 60)
    if seconds < 2 * 86400:
        return "{} h {} min".format(seconds // 3600, seconds % 3600 // 60)
    return "{} days {} h".format(seconds // 86400, seconds % 86400 // 3600)


def _printable(value: Any) -> Any:
    """
    C{value} with every string (keys too) stripped of what a terminal
    would obey: control characters become escapes.
    """
    if isinstance(value, str):
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def describe(document: dict[str, Any]) -> str:
    """
    A status document as lines for an operator's terminal.

    @raise KeyError, TypeError, ValueError, AttributeError: C{document} is
        not a status document (whatever answered is not the daemon).
    """
    document = _printable(document)
    now = document["time"]
    up = _duration(now - document["started_at"])
    if document["role"] != "primary":
        requests = document["requests"]
        return "\n".join(
            [
                "backup {}, up {}".format(document["pop_id"], up),
                "requests: "
                + (", ".join("{} {}".format(k, v) for k, v in requests.items()) or "none"),
                "failed authentications: {}; entries applied: {}".format(
                    document["auth_failures"], document["entries_applied"]
                ),
                "bans in force: {}; nonces held: {}; open connections: {}".format(
                    document["bans"], document["nonces"], document["connections"]
                ),
            ]
        )
    last = document["last_success"]
    retry = document["retry_in"]
    lines = [
        "primary {} -> backup {}, up {}".format(document["pop_id"], document["backup_pop"], up),
        "backlog: {} entries in {} vaults; lag {}".format(
            document["backlog_entries"], len(document["backlog"]),
            _duration(document["lag_seconds"]),
        ),
        "last success: {}; {} batches, {} entries since start".format(
            "never" if last is None else _duration(now - last) + " ago",
            document["batches"], document["entries_replicated"],
        ),
        "failures in a row: {}; next retry: {}".format(
            document["failures"], "none" if retry is None else "in " + _duration(retry)
        ),
        "held back: {}".format(len(document["held_vaults"]) or "none"),
    ]
    for vault_id, hold in document["held_vaults"].items():
        lines.append("  {}  retry in {} after {} refusals".format(
            vault_id, _duration(hold["retry_in"]), hold["failures"]))
    if document["backlog"]:
        lines.append("backlog by vault:")
        lines += ["  {}  {}".format(v, n) for v, n in document["backlog"].items()]
    return "\n".join(lines)


_RENDERINGS: dict[bytes, tuple[bytes, Callable[[dict[str, Any]], bytes]]] = {
    STATUS_PATH: (JSON_TYPE, lambda document: json.dumps(document).encode("utf-8")),
    METRICS_PATH: (METRICS_TYPE, metrics_text),
}


class StatusResource(Resource):
    """
    C{GET /status} and C{GET /metrics}; anything else is a JSON 404 or 405.
    """

    isLeaf = True

    def __init__(self, source: StatusSource) -> None:
        super().__init__()
        self._source = source

    def render(self, request: server.Request) -> Any:
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        rendering = _RENDERINGS.get(request.path)
        if rendering is None:
            return self._refuse(request, 404, "not_found")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return self._refuse(request, 405, "method")
        media_type, render = rendering
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        answered = maybeDeferred(self._source.document)
        answered.addCallback(lambda document: (media_type, render(document)))
        answered.addErrback(self._failed, request)
        answered.addCallback(lambda answer: gone or self._answer(request, *answer))
        return server.NOT_DONE_YET

    @staticmethod
    def _refuse(request: server.Request, status: int, word: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON_TYPE)
        return json.dumps({"error": word}).encode("utf-8")

    @staticmethod
    def _answer(request: server.Request, media_type: bytes, body: bytes) -> None:
        request.setHeader(b"Content-Type", media_type)
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: server.Request) -> tuple[bytes, bytes]:
        log.failure("status request failed", failure)
        return JSON_TYPE, self._refuse(request, 500, "internal")


# Scrapers and the status command need one or two; each costs a file.
MAX_STATUS_CONNECTIONS = 16
# Seconds a status connection may stay idle, and stay open at all (a peer
# sending a byte now and then is never idle).
STATUS_IDLE_TIMEOUT = 5
STATUS_CONNECTION_SECONDS = 10


def _refusal(status: bytes, word: str) -> bytes:
    """
    A whole answer that refuses a request and closes the connection.
    """
    body = json.dumps({"error": word}).encode("utf-8")
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"Cache-Control: no-store\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


_BODY_REFUSED = _refusal(b"413 Request Entity Too Large", "too_large")
_FRAMING_REFUSED = _refusal(b"400 Bad Request", "malformed")


class _StatusChannel(http.HTTPChannel):
    """
    Bad framing gets a JSON 400 with the headers of every other answer,
    not twisted.web's bare one.  A connection lives at most
    L{STATUS_CONNECTION_SECONDS}: a scraper's request takes milliseconds.
    """

    _end = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._end = self.callLater(STATUS_CONNECTION_SECONDS, self.transport.abortConnection)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.transport.write(_FRAMING_REFUSED)
        self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        if self._end is not None and self._end.active():
            self._end.cancel()
        self.site.connection_closed(self)
        super().connectionLost(reason)


class _StatusRequest(server.Request):
    """
    A request of the status site.  Status and metrics are only read, so a
    request with a body is answered 413 at its headers and the connection
    closed: no byte of the body is read or kept.
    """

    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)
            return
        self._refused = True
        self.content = BytesIO()
        self.channel.transport.write(_BODY_REFUSED)
        self.channel.transport.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        if not self._refused:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._refused:
            super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Render the one resource, whatever the path (no twisted.web answer
        of its own to C{OPTIONS *}, no banner).
        """
        self.site = self.channel.site
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())


class StatusSite(server.Site):
    """
    The status site: at most L{MAX_STATUS_CONNECTIONS} connections, the
    oldest closed to make room for a new one (so connections held open
    cannot keep a scraper out); no access log (a scraper calls every few
    seconds), no traceback shown, no request body taken.
    """

    displayTracebacks = False
    protocol = _StatusChannel
    requestFactory = _StatusRequest

    def __init__(self, resource: Resource, clock: IReactorTime | None = None) -> None:
        super().__init__(resource, timeout=STATUS_IDLE_TIMEOUT, reactor=clock)
        self._open: dict[_StatusChannel, None] = {}

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def buildProtocol(self, addr):
        if len(self._open) >= MAX_STATUS_CONNECTIONS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abortConnection()
        channel = super().buildProtocol(addr)
        self._open[channel] = None
        return channel

    def connection_closed(self, channel: _StatusChannel) -> None:
        self._open.pop(channel, None)

    def log(self, request: server.Request) -> None:
        pass


def make_status_site(source: StatusSource, clock: IReactorTime | None = None) -> StatusSite:
    """
    The status site of C{source}; its connections' timers run on C{clock}
    (the reactor by default).
    """
    return StatusSite(StatusResource(source), clock)
