"""
Tests for clavitor_twisted.service and the twistd plugin: the service tree
by role, start-up errors, and a backup and a primary replicating in-process
over real loopback TLS.
"""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys

import yaml

from twisted.application.service import IServiceMaker, IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from clavitor_twisted import demo, service, tls
from clavitor_twisted.audit import AuditLog
from clavitor_twisted.config import parse_config
from clavitor_twisted.role import Role
from clavitor_twisted.vault import Vault, open_vault_for_writes, vault_path

VAULT_ID = "0123456789abcdef"
TWISTD = [sys.executable, *demo.TWISTD]


def services(top):
    """
    Every service of a tree, depth first.
    """
    yield top
    if IServiceCollection.providedBy(top):
        for child in top:
            yield from services(child)


def as_config(document: dict, **listen):
    config = parse_config(yaml.safe_dump(document))
    if listen:
        config = dataclasses.replace(
            config, listen=dataclasses.replace(config.listen, **listen)
        )
    return config


class Pop:
    """
    The files of one test: a CA, both demo POPs' certificates and a data
    directory per POP.
    """

    def __init__(self, case, method="mtls"):
        self.directory = os.path.abspath(case.mktemp())
        os.makedirs(self.directory)
        self.method = method
        self.pki = demo.write_pki(
            self.directory, (demo.PRIMARY_POP, demo.BACKUP_POP), method == "bearer"
        )
        self.primary_dir = os.path.join(self.directory, "primary")
        self.backup_dir = os.path.join(self.directory, "backup")
        os.mkdir(self.primary_dir)
        os.mkdir(self.backup_dir)

    def backup(self, port=1, audit_log=None, **extra):
        document = demo.backup_config(
            self.pki, self.backup_dir, port, self.method, audit_log
        )
        document.update(extra)
        return document

    def primary(self, port, batch_size=2):
        return demo.primary_config(
            self.pki, self.primary_dir, port, self.method, batch_size=batch_size
        )

    def write(self, name, document):
        path = os.path.join(self.directory, name)
        demo.write_config(path, document)
        return path


class ServiceTreeTests(SynchronousTestCase):
    """
    What make_service builds for each role, without starting it.
    """

    def test_backup_never_has_a_sender(self):
        """
        A backup gets the vault pool and the TLS receiver, never a sender,
        even with a backup_pop in its config (which is warned about, like a
        missing audit log file).
        """
        pop = Pop(self)
        document = pop.backup(
            backup_pop={"id": "other-pop", "url": "https://127.0.0.1:9"}
        )
        with capturedLogs() as events:
            top = service.make_service(as_config(document), reactor, environ={})
        tree = list(services(top))
        self.assertFalse([s for s in tree if isinstance(s, service.SenderService)])
        self.assertEqual([s.name for s in top], ["vaults", "audit", "receiver"])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e["key"] for e in warnings], ["backup_pop", "security.audit_log"])

        audited = pop.backup(audit_log=os.path.join(pop.directory, "audit.log"))
        with capturedLogs() as events:
            service.make_service(as_config(audited), reactor, environ={})
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])

    def test_backup_mode_environment_is_ignored(self):
        """
        CLAVITOR_BACKUP_MODE=true in a primary's environment changes nothing:
        it is still a primary with a sender, and a warning is logged.
        """
        pop = Pop(self)
        with capturedLogs() as events:
            top = service.make_service(
                as_config(pop.primary(8443)),
                reactor,
                environ={"CLAVITOR_BACKUP_MODE": "true"},
            )
        self.assertEqual([s.name for s in top], ["vaults", "sender", "watch"])
        self.assertIsInstance(top.getServiceNamed("sender"), service.SenderService)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual([e.get("variable") for e in warnings], ["CLAVITOR_BACKUP_MODE"])

    def test_bearer_rereads_the_token_file(self):
        """
        In bearer mode a timer rereads the token file every
        TOKEN_REFRESH_INTERVAL seconds.
        """
        pop = Pop(self, method="bearer")
        top = service.make_service(as_config(pop.backup()), reactor, environ={})
        self.assertEqual([s.name for s in top], ["vaults", "tokens", "audit", "receiver"])
        timer = top.getServiceNamed("tokens")
        self.assertEqual(timer.step, service.TOKEN_REFRESH_INTERVAL)
        self.assertIs(timer.clock, reactor)


class StartUpErrorTests(SynchronousTestCase):
    """
    A POP that cannot start says why on stderr (public text, no path), logs
    the detail, and exits with status 1.
    """

    def test_config_error(self):
        pop = Pop(self)
        document = pop.backup()
        document["role"] = "secondary"
        path = pop.write("bad.yaml", document)
        stderr = io.StringIO()
        daemon = service.service_from_file(path, reactor, stderr)
        self.assertIn("clavitor-repl: role:", stderr.getvalue())
        self.assertNotIn(pop.directory, stderr.getvalue())
        with capturedLogs() as events:
            exit = self.assertRaises(SystemExit, daemon.privilegedStartService)
        self.assertEqual(exit.code, 1)
        [event] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertIn("role", event["public"])
        self.assertIn(path, event["detail"])

    def test_daemonized(self):
        """
        Daemonized, the start ends with L{service.StartUpFailed} carrying
        the public text, which twistd's waiting parent prints.
        """
        pop = Pop(self)
        path = pop.write("bad.yaml", {"role": "backup"})
        daemon = service.service_from_file(path, reactor, io.StringIO(), daemonizes=True)
        with capturedLogs():
            error = self.assertRaises(service.StartUpFailed, daemon.privilegedStartService)
        self.assertEqual(str(error), daemon.error.public)

    def test_certificate_error(self):
        pop = Pop(self)
        os.remove(pop.pki.pops[demo.BACKUP_POP][0])
        path = pop.write("backup.yaml", pop.backup())
        stderr = io.StringIO()
        daemon = service.service_from_file(path, reactor, stderr)
        self.assertIn("clavitor-repl: auth.mtls_cert", stderr.getvalue())
        self.assertNotIn(pop.directory, stderr.getvalue())
        self.assertRaises(SystemExit, daemon.privilegedStartService)

    def test_data_dir_missing_or_not_a_directory(self):
        """
        A data_dir that is not a directory stops the start instead of
        failing every batch later.
        """
        pop = Pop(self)
        for data_dir in (os.path.join(pop.directory, "nothing"), pop.pki.ca):
            for document in (pop.backup(), pop.primary(1)):
                document["data_dir"] = data_dir
                stderr = io.StringIO()
                service.service_from_file(pop.write("pop.yaml", document), reactor, stderr)
                self.assertEqual(
                    stderr.getvalue(), "clavitor-repl: data_dir: not an existing directory\n"
                )

    def test_own_certificate_must_name_pop_id(self):
        """
        A backup whose certificate is another POP's refuses to start.
        """
        pop = Pop(self)
        document = pop.backup()
        document["auth"]["mtls_cert"], document["auth"]["mtls_key"] = pop.pki.pops[
            demo.PRIMARY_POP
        ]
        stderr = io.StringIO()
        service.service_from_file(pop.write("backup.yaml", document), reactor, stderr)
        self.assertIn("clavitor-repl: auth.mtls_cert: its subjectAltName", stderr.getvalue())

    def test_good_config(self):
        pop = Pop(self)
        path = pop.write("backup.yaml", pop.backup())
        stderr = io.StringIO()
        daemon = service.service_from_file(path, reactor, stderr)
        self.assertEqual(stderr.getvalue(), "")
        self.assertIsNone(daemon.error)
        [child] = list(daemon)
        self.assertIsInstance(child, service.ReplicationService)


class ListenFailureTests(TestCase):
    def test_port_in_use(self):
        """
        A backup whose port is taken ends its start with status 1 and a
        critical log line instead of running without listening.
        """
        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        pop = Pop(self)
        config = as_config(pop.backup(), port=taken.getHost().port)
        stderr = io.StringIO()
        daemon = service.DaemonService(stderr=stderr)
        service.make_service(config, reactor, environ={}).setServiceParent(daemon)
        with capturedLogs() as events:
            exit = self.assertRaises(SystemExit, daemon.privilegedStartService)
        self.assertEqual(exit.code, 1)
        self.assertEqual(
            stderr.getvalue(), "clavitor-repl: cannot listen on listen.address, listen.port\n"
        )
        [event] = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(event["port"], taken.getHost().port)


    def test_status_port_in_use(self):
        """
        A status port that cannot be bound ends the start too, naming the
        metrics keys; the primary is built with the status listener last.
        """
        taken = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        pop = Pop(self)
        document = pop.primary(9)
        document["metrics"] = {"port": taken.getHost().port}
        stderr = io.StringIO()
        daemon = service.DaemonService(stderr=stderr)
        top = service.make_service(as_config(document), reactor, environ={})
        self.assertEqual([s.name for s in top], ["vaults", "sender", "watch", "status"])
        top.setServiceParent(daemon)
        with capturedLogs():
            exit = self.assertRaises(SystemExit, daemon.privilegedStartService)
        self.assertEqual(exit.code, 1)
        self.assertEqual(
            stderr.getvalue(), "clavitor-repl: cannot listen on metrics.address, metrics.port\n"
        )


class AuditServiceTests(SynchronousTestCase):
    def test_sighup_reopens_while_running(self):
        """
        While running, SIGHUP reopens the audit log (logrotate moved it);
        stopping restores the previous handler and closes the log.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "audit.log")
        before = signal.getsignal(signal.SIGHUP)
        audit = service.AuditService(AuditLog(path, reactor), reactor)
        audit.startService()
        self.addCleanup(signal.signal, signal.SIGHUP, before)
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        audit.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        os.rename(path, path + ".1")
        audit.audit_log.reopen()
        self.assertFalse(os.path.exists(path), "a closed log is not reopened")


class PluginTests(SynchronousTestCase):
    def plugin(self):
        [maker] = [
            p for p in getPlugins(IServiceMaker) if p.tapname == "clavitor-repl"
        ]
        return maker

    def test_discovered(self):
        maker = self.plugin()
        self.assertTrue(maker.description)

    def test_config_is_required(self):
        options = self.plugin().options()
        self.assertRaises(usage.UsageError, options.parseOptions, [])

    def test_make_service(self):
        pop = Pop(self)
        path = pop.write("backup.yaml", pop.backup())
        options = self.plugin().options()
        options.parseOptions(["--config", path])
        daemon = self.plugin().makeService(options)
        self.assertIsInstance(daemon, service.DaemonService)
        self.assertIsNone(daemon.error)

    def test_import_is_cheap(self):
        """
        Importing the plugin module (as every plugin scan does) imports none
        of our modules.
        """
        code = (
            "import sys, twisted.plugins.clavitor_repl\n"
            "print(sorted(m for m in sys.modules if m.startswith('clavitor_twisted')))"
        )
        output = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(output.strip(), "[]")

    def twistd_bad_config(self, *twistd_options):
        """
        Run twistd on a config with a plain-HTTP backup URL: C{(pop, config
        path, log path, completed process)}.
        """
        pop = Pop(self)
        document = pop.primary(8443)
        document["backup_pop"]["url"] = "http://127.0.0.1:8443"
        path = pop.write("primary.yaml", document)
        log = os.path.join(pop.directory, "twistd.log")
        result = subprocess.run(
            TWISTD
            + list(twistd_options)
            + ["--logfile=" + log, "clavitor-repl", "--config", path],
            capture_output=True,
            text=True,
            cwd=pop.directory,
            timeout=60,
        )
        return pop, path, log, result

    def test_twistd_exits_without_traceback(self):
        """
        Under twistd a bad config prints the public error, no traceback and
        no path, and the process exits with status 1.
        """
        pop, path, log, result = self.twistd_bad_config("--nodaemon", "--pidfile=")
        self.assertEqual(result.returncode, 1)
        self.assertIn("clavitor-repl: backup_pop.url:", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertNotIn(pop.directory, result.stderr + result.stdout)
        with open(log) as f:
            logged = f.read()
        self.assertIn("cannot start", logged)
        self.assertIn(path, logged)

    def test_twistd_daemon_exits(self):
        """
        Daemonized, twistd's parent process reports the public error and
        exits 1 instead of waiting for ever; the pid file is removed.
        """
        pidfile = os.path.abspath(self.mktemp())
        pop, path, log, result = self.twistd_bad_config("--pidfile=" + pidfile)
        self.assertEqual(result.returncode, 1)
        self.assertIn("clavitor-repl: backup_pop.url:", result.stderr)
        self.assertIn("StartUpFailed: backup_pop.url:", result.stderr)
        self.assertNotIn(pop.directory, result.stderr + result.stdout)
        self.assertFalse(os.path.exists(pidfile))


def rows(data_dir):
    vault = Vault.open(vault_path(data_dir, VAULT_ID))
    try:
        return [(e.entry_id, e.version, e.deleted, e.data) for e in vault.iter_entries()]
    finally:
        vault.close()


class ReplicationTests(TestCase):
    """
    A backup and a primary, built by make_service, in this process over
    real loopback TLS.
    """

    def start(self, config):
        top = service.make_service(config, reactor, environ={})
        top.startService()
        self.addCleanup(top.stopService)
        return top

    @inlineCallbacks
    def start_backup(self, pop, audit_log=None):
        """
        Start the backup with clock_skew 0 and wait out its start second,
        in which it refuses every request (a restart must not reopen what
        the process before it applied): its port.
        """
        document = pop.backup(audit_log=audit_log)
        document["security"]["clock_skew"] = 0
        backup = self.start(as_config(document, port=0))
        started = int(reactor.seconds())
        yield deferLater(reactor, started + 1 - reactor.seconds(), lambda: None)
        return backup.getServiceNamed("receiver").endpoint.port.getHost().port

    @inlineCallbacks
    def replicate(self, primary):
        """
        Drain the primary until nothing is dirty.
        """
        sender = primary.getServiceNamed("sender").sender
        store = primary.getServiceNamed("vaults").store
        for _ in range(50):
            yield sender.drain()
            backlog = yield store.backlog()
            if not any(backlog.values()):
                return
        self.fail("the primary still has dirty entries: {}".format(backlog))

    @inlineCallbacks
    def test_changes_reach_the_backup(self):
        """
        Entries created, updated and deleted on the primary reach the backup
        with the same versions, tombstones and data.
        """
        pop = Pop(self)
        audit_log = os.path.join(pop.directory, "audit.log")
        port = yield self.start_backup(pop, audit_log)
        vault = open_vault_for_writes(Role.PRIMARY, pop.primary_dir, VAULT_ID)
        self.addCleanup(vault.close)
        for i in range(5):
            vault.put_entry("entry-{}".format(i), os.urandom(100), 1000 + i)
        primary = self.start(as_config(pop.primary(port, batch_size=2)))

        yield self.replicate(primary)
        self.assertEqual(rows(pop.backup_dir), rows(pop.primary_dir))
        self.assertEqual(len(rows(pop.backup_dir)), 5)

        vault.put_entry("entry-1", b"changed", 2000)
        vault.delete_entry("entry-3", 2001)
        yield self.replicate(primary)
        replica = {row[0]: row for row in rows(pop.backup_dir)}
        self.assertEqual(replica["entry-1"], ("entry-1", 2, False, b"changed"))
        self.assertEqual(replica["entry-3"], ("entry-3", 2, True, None))
        self.assertEqual(rows(pop.backup_dir), rows(pop.primary_dir))

        with open(audit_log) as f:
            records = [json.loads(line) for line in f]
        self.assertEqual({r["result"] for r in records}, {"applied"})
        self.assertEqual({r["proven_pop"] for r in records}, {demo.PRIMARY_POP})
        self.assertEqual(sum(r["entries"] for r in records), 7)

    @inlineCallbacks
    def test_a_write_wakes_the_sender(self):
        """
        With scans an hour apart, an entry written after the primary's first
        scan still reaches the backup within seconds: the watch on the data
        directory wakes the sender.
        """
        pop = Pop(self)
        port = yield self.start_backup(pop)
        vault = open_vault_for_writes(Role.PRIMARY, pop.primary_dir, VAULT_ID)
        self.addCleanup(vault.close)
        document = pop.primary(port)
        document["replication"]["scan_interval"] = 3600
        primary = self.start(as_config(document))
        yield primary.getServiceNamed("sender").sender.drain()

        vault.put_entry("entry-0", b"written later", 1000)
        for _ in range(100):
            if os.path.exists(vault_path(pop.backup_dir, VAULT_ID)) and rows(pop.backup_dir):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(rows(pop.backup_dir), rows(pop.primary_dir))

    @inlineCallbacks
    def test_stop_waits_for_the_batch_in_flight(self):
        """
        stopService on a primary whose batch is in flight fires only after
        the backup has answered, and the answered entries are marked
        replicated instead of being abandoned.
        """
        pop = Pop(self)
        held = HeldBackup()
        cert, key = pop.pki.pops[demo.BACKUP_POP]
        options = tls.server_options(
            tls.load_identity(cert, key), tls.load_ca(pop.pki.ca), True
        )
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(Site(held))
        self.addCleanup(port.stopListening)

        vault = open_vault_for_writes(Role.PRIMARY, pop.primary_dir, VAULT_ID)
        self.addCleanup(vault.close)
        vault.put_entry("entry-0", b"secret", 1000)
        primary = service.make_service(
            as_config(pop.primary(port.getHost().port)), reactor, environ={}
        )
        primary.startService()
        request = yield held.received

        stopped = primary.stopService()
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertNoResult(stopped)
        self.assertEqual(vault.count_dirty(), 1)

        held.answer(request)
        yield stopped
        self.assertEqual(vault.count_dirty(), 0)


class HeldBackup(Resource):
    """
    A stand-in backup that holds the first batch until the test answers it
    as the real backup would.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.received = Deferred()

    def render_POST(self, request):
        self.received.callback(request)
        return NOT_DONE_YET

    def answer(self, request):
        batch = json.loads(request.content.read())
        request.setHeader(b"Content-Type", b"application/json")
        request.write(
            json.dumps(
                {
                    "applied": len(batch["entries"]),
                    "skipped": 0,
                    "seq": batch["seq"],
                    "pop_id": demo.BACKUP_POP,
                    "role": "backup",
                }
            ).encode()
        )
        request.finish()
