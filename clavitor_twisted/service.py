# -*- test-case-name: tests.test_service -*-
"""
The service tree of one POP, built from its config.

L{make_service} gives a L{ReplicationService}: first the vault thread pool,
in bearer mode a timer that rereads the token file, then, by role, either
the backup's audit log and TLS listener or the primary's sender and the
watch on its data directory that wakes it (never both: a backup never runs
a sender, whatever else its config says).  Children start in
that order and stop one after another in reverse order, so the sender's
batch in flight finishes before the vault connections close.

L{service_from_file} is what the twistd plugin calls: a start-up error
becomes its public text on stderr, its detail in the log, and exit status 1
without a traceback.
"""

import os
import signal
from collections.abc import Mapping
from typing import TextIO

from zope.interface import implementer

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from clavitor_twisted import receiver, role, sender, status, tls
from clavitor_twisted.audit import AuditLog, install_reopen_on_sighup
from clavitor_twisted.config import Config, load_config
from clavitor_twisted.errors import CertificateError, ClavitorError, ConfigError, TokenError
from clavitor_twisted.tokens import TokenSource
from clavitor_twisted.vault import VaultStore
from clavitor_twisted.watch import ChangeWatcher

# Seconds between looks at the token file in bearer mode.  TokenSource also
# looks when a token is used; the timer notices (and logs) a changed or
# broken file even while no request comes in.
TOKEN_REFRESH_INTERVAL = 10

# Vault threads: each vault file is used by one thread at a time, so more
# threads than this only queue on the same locks and on the disk.
VAULT_THREADS = 4

# The errors that mean "this POP cannot start as configured".
START_UP_ERRORS = (ConfigError, TokenError, CertificateError)

log = Logger()


class VaultPoolService(Service):
    """
    The vault thread pool and the L{VaultStore} that runs on it.

    Stopping closes every vault connection on the pool and then waits for
    the pool's threads, so work already queued finishes first.
    """

    name = "vaults"

    def __init__(self, data_dir: str, reactor) -> None:
        self.threadpool = ThreadPool(
            minthreads=1, maxthreads=VAULT_THREADS, name="clavitor-vaults"
        )
        self.store = VaultStore(data_dir, self.threadpool, reactor)

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()
        closed = self.store.close()
        closed.addBoth(self._stop_threads)
        return closed

    def _stop_threads(self, result):
        # The pool is idle now (close ran last), so joining is quick.
        self.threadpool.stop()
        return result


class SenderService(Service):
    """
    Runs the primary's L{sender.Sender}; stopping waits for the batch in
    flight instead of abandoning it.
    """

    name = "sender"

    def __init__(self, replication_sender: sender.Sender) -> None:
        self.sender = replication_sender

    def startService(self) -> None:
        super().startService()
        self.sender.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.sender.stop()


class AuditService(Service):
    """
    The backup's audit log: reopened on SIGHUP (for logrotate) while
    running, closed when stopped, which is after the receiver that records
    into it has stopped.
    """

    name = "audit"

    def __init__(self, audit_log: AuditLog, reactor) -> None:
        self.audit_log = audit_log
        self._reactor = reactor
        self._previous_handler = None

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.getsignal(signal.SIGHUP)
        install_reopen_on_sighup(self.audit_log, self._reactor)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous_handler)
        self.audit_log.close()


@implementer(IStreamServerEndpoint)
class ObservedEndpoint:
    """
    A server endpoint that keeps the port it listens on (C{port}) and logs
    the address it bound, which is how a listener on port 0 is found.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, pop_id: str) -> None:
        self._endpoint = endpoint
        self._pop_id = pop_id
        self.port: IListeningPort | None = None

    def listen(self, factory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        log.info(
            "backup {pop_id} listening on {host} port {port}",
            pop_id=self._pop_id,
            host=address.host,
            port=address.port,
        )
        return port


class CannotListen(Exception):
    """
    A listener's port cannot be bound; C{keys} are the config keys to fix.
    """

    def __init__(self, keys: str, error: CannotListenError) -> None:
        super().__init__(keys)
        self.keys = keys
        self.error = error


class Listener(StreamServerEndpointService):
    """
    A named listening port whose failure to bind fails the start (as
    twisted.application.strports does) instead of leaving a POP that does
    not listen, naming the config keys of its address.
    """

    def __init__(self, name: str, endpoint: IStreamServerEndpoint, factory, keys: str) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.setName(name)
        self._keys = keys

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise CannotListen(self._keys, error)


class ReplicationService(MultiService):
    """
    One POP's replication.  Children start in the order they were added
    (the vault pool first) and stop in reverse order, each after the one
    added after it has finished stopping.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        stopped: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            stopped.addBoth(self._stop_child, child)
        return stopped.addErrback(self._stop_failed)

    @staticmethod
    def _stop_child(result, child: IService) -> Deferred[None]:
        if isinstance(result, Failure):
            log.failure("a replication service failed to stop", result)
        return maybeDeferred(child.stopService)

    @staticmethod
    def _stop_failed(failure: Failure) -> None:
        log.failure("a replication service failed to stop", failure)


def _receiver_service(
    config: Config,
    store: VaultStore,
    reactor,
    token_source: TokenSource | None,
    audit_log: AuditLog,
) -> Listener:
    identity = tls.load_pop_identity(config.auth.mtls_cert, config.auth.mtls_key, config.pop_id)
    ca = tls.load_ca(config.auth.mtls_ca)
    options = tls.server_options(
        identity, ca, require_client_certificate=config.auth.method == "mtls"
    )
    site = receiver.make_site(
        config,
        store,
        reactor,
        token_source,
        started_at=int(reactor.seconds()),
        audit=audit_log,
    )
    endpoint = SSL4ServerEndpoint(
        reactor, config.listen.port, options, interface=config.listen.address
    )
    return Listener(
        "receiver", ObservedEndpoint(endpoint, config.pop_id), site, "listen.address, listen.port"
    )


def _status_service(config: Config, source: status.StatusSource, reactor) -> Listener:
    endpoint = TCP4ServerEndpoint(reactor, config.metrics.port, interface=config.metrics.address)
    return Listener(
        "status", endpoint, status.make_status_site(source), "metrics.address, metrics.port"
    )


def make_service(
    config: Config, reactor, environ: Mapping[str, str] | None = None
) -> ReplicationService:
    """
    Build (without starting) the service tree of the POP C{config}
    describes.

    C{environ} (default C{os.environ}) is only looked at to warn about
    variables that are ignored: the role comes from C{config} alone.

    @raise ConfigError, TokenError, CertificateError: the POP cannot start.
    """
    role.warn_about_environment(os.environ if environ is None else environ, log)
    for key in config.ignored_keys:
        log.warn(
            "{key} is ignored: a {role} POP does not use it", key=key, role=config.role.value
        )
    if not os.path.isdir(config.data_dir):
        raise ConfigError(
            "data_dir: not an existing directory",
            "data_dir {!r} is not an existing directory".format(config.data_dir),
        )
    top = ReplicationService()
    vaults = VaultPoolService(config.data_dir, reactor)
    vaults.setServiceParent(top)

    token_source = None
    if config.auth.method == "bearer":
        token_source = TokenSource(config.auth.token_file, reactor, log)
        refresh = TimerService(TOKEN_REFRESH_INTERVAL, token_source.refresh)
        refresh.clock = reactor
        refresh.setName("tokens")
        refresh.setServiceParent(top)

    source: status.StatusSource
    if role.runs_sender(config.role):
        replication_sender = sender.make_sender(config, vaults.store, reactor, token_source)
        SenderService(replication_sender).setServiceParent(top)
        ChangeWatcher(config.data_dir, replication_sender.wake, reactor).setServiceParent(top)
        source = status.PrimaryStatus(config, replication_sender, vaults.store, reactor)
    else:
        if config.security.audit_log is None:
            log.warn(
                "{key} is not set: audit records go to this log only",
                key="security.audit_log",
            )
        audit_log = AuditLog(config.security.audit_log, reactor)
        AuditService(audit_log, reactor).setServiceParent(top)
        listener = _receiver_service(config, vaults.store, reactor, token_source, audit_log)
        listener.setServiceParent(top)
        source = status.BackupStatus(config, listener.factory.defences, reactor.seconds())
    if config.metrics is not None:
        _status_service(config, source, reactor).setServiceParent(top)

    log.info(
        "clavitor-repl {role} {pop_id}: auth {method}",
        role=config.role.value,
        pop_id=config.pop_id,
        method=config.auth.method,
    )
    return top


class StartUpFailed(Exception):
    """
    A daemonized POP cannot start; the text is public.
    """


class DaemonService(MultiService):
    """
    What twistd runs: the replication service, or the start-up error that
    kept it from being built.

    twistd starts logging only after the plugin's makeService has returned,
    so the error's detail is logged here, when the application starts, and
    the start then ends; so does a listening port that cannot be bound.  In
    the foreground (C{--nodaemon}) the process exits with status 1 and no
    traceback.  Daemonized, twistd's waiting parent hears only of an
    L{Exception}, so L{StartUpFailed} is raised: the parent prints its public
    text and exits 1 (a SystemExit would leave it waiting for ever).
    """

    def __init__(
        self,
        error: ClavitorError | None = None,
        daemonizes: bool = False,
        stderr: TextIO | None = None,
    ) -> None:
        super().__init__()
        self.error = error
        self.daemonizes = daemonizes
        self.stderr = stderr

    def privilegedStartService(self) -> None:
        if self.error is not None:
            log.critical(
                "clavitor-repl cannot start: {public} ({detail})",
                public=self.error.public,
                detail=self.error.detail,
            )
            self._end_start(self.error.public)
        try:
            super().privilegedStartService()
        except CannotListen as failed:
            e = failed.error
            log.critical(
                "clavitor-repl cannot listen on {address} port {port}: {reason}",
                address=e.interface,
                port=e.port,
                reason=str(e.socketError),
            )
            public = "cannot listen on " + failed.keys
            if self.stderr is not None and not self.daemonizes:
                self.stderr.write("clavitor-repl: " + public + "\n")
                self.stderr.flush()
            self._end_start(public)

    def _end_start(self, public: str) -> None:
        if self.daemonizes:
            raise StartUpFailed(public)
        raise SystemExit(1)


def service_from_file(
    path: str, reactor, stderr: TextIO, daemonizes: bool = False
) -> DaemonService:
    """
    The daemon for the config file at C{path}.  A start-up error's public
    text goes to C{stderr} now; its detail is logged when twistd starts the
    returned service, which then ends the start (see L{DaemonService}).
    """
    try:
        replication = make_service(load_config(path), reactor)
    except START_UP_ERRORS as error:
        stderr.write("clavitor-repl: " + error.public + "\n")
        stderr.flush()
        return DaemonService(error, daemonizes)
    daemon = DaemonService(daemonizes=daemonizes, stderr=stderr)
    replication.setServiceParent(daemon)
    return daemon
