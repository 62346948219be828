# -*- test-case-name: tests.test_demo -*-
"""
C{clavitor-repl demo}: a primary and a backup POP, two real twistd
processes on loopback, replicating real vault files.

In a temporary directory it makes a throwaway CA, a certificate per POP (and
a token in bearer mode) and two config files; starts the backup, waits for
it to listen, starts the primary; writes entries (random 1 KB blobs standing
for encrypted data, some updated, some deleted) into the primary's vaults
through the vault library, as the vault server would; and waits until every
backup vault equals its primary vault entry by entry, printing progress.

This is a blocking driver script, not part of the daemon: it sleeps and
polls, and reads the vault files over separate read-only connections.
"""

import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from clavitor_twisted import pki, tokens
from clavitor_twisted.role import Role
from clavitor_twisted.vault import Vault, list_vault_ids, open_vault_for_writes, vault_path

PRIMARY_POP = "demo-primary"
BACKUP_POP = "demo-backup"
LOOPBACK = "127.0.0.1"
ENTRY_BYTES = 1024
# Seconds a process gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 30
# Lines of each process log shown when the demo fails.
LOG_TAIL = 25

TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")


class DemoFailed(Exception):
    """
    The demo did not show a correct replication; the text says why.
    """


@dataclass(frozen=True)
class DemoPki:
    """
    The files of a throwaway trust domain: the CA certificate, each POP's
    C{(certificate, key)} and, in bearer mode, the shared token file.
    """

    ca: str
    pops: dict[str, tuple[str, str]]
    token_file: str | None


def write_pki(directory: str, pop_ids: Sequence[str], with_token: bool) -> DemoPki:
    """
    A new CA and, for each POP, a certificate naming its pop_id and the
    loopback address (the primary checks the backup's certificate against
    the host of C{backup_pop.url}); a token file if C{with_token}.
    """
    ca_key, ca_cert = pki.make_ca("clavitor demo CA")
    ca_path = os.path.join(directory, "ca.crt")
    pki.write_certificate(ca_path, ca_cert)
    pops = {
        pop_id: pki.write_pop_files(directory, ca_key, ca_cert, pop_id, ips=[LOOPBACK])
        for pop_id in pop_ids
    }
    token_file = None
    if with_token:
        token_file = os.path.join(directory, "replication.token")
        tokens.write_token_file(token_file, tokens.generate_token())
    return DemoPki(ca_path, pops, token_file)


def _auth(demo_pki: DemoPki, pop_id: str, method: str) -> dict:
    cert, key = demo_pki.pops[pop_id]
    auth = {"method": method, "mtls_cert": cert, "mtls_key": key, "mtls_ca": demo_pki.ca}
    if method == "bearer":
        auth["token_file"] = demo_pki.token_file
    return auth


def backup_config(
    demo_pki: DemoPki, data_dir: str, port: int, method: str, audit_log: str | None = None
) -> dict:
    """
    The backup's config (as YAML data): listening on loopback C{port},
    accepting the demo primary, auditing to C{audit_log} if given.
    """
    security = {
        "rate_limit_per_minute": 100_000,  # many quick batches while writing
        # Both POPs share this host's clock.  A backup refuses requests
        # signed up to clock_skew after its start (the old process may have
        # applied them), so a small skew keeps that pause short.
        "clock_skew": 1,
    }
    if audit_log is not None:
        security["audit_log"] = audit_log
    return {
        "pop_id": BACKUP_POP,
        "region": "demo",
        "role": "backup",
        "data_dir": data_dir,
        "listen": {"address": LOOPBACK, "port": port},
        "authorized_pops": [PRIMARY_POP],
        "auth": _auth(demo_pki, BACKUP_POP, method),
        "security": security,
    }


def primary_config(
    demo_pki: DemoPki, data_dir: str, backup_port: int, method: str, batch_size: int = 500
) -> dict:
    """
    The primary's config (as YAML data): large batches and a one-second
    scan, sending to the demo backup on loopback C{backup_port}.
    """
    return {
        "pop_id": PRIMARY_POP,
        "region": "demo",
        "role": "primary",
        "data_dir": data_dir,
        "backup_pop": {
            "id": BACKUP_POP,
            "url": "https://{}:{}".format(LOOPBACK, backup_port),
        },
        "auth": _auth(demo_pki, PRIMARY_POP, method),
        "replication": {"batch_size": batch_size, "scan_interval": 1},
    }


def write_config(path: str, config: dict) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def free_port() -> int:
    """
    A loopback TCP port that was free a moment ago.
    """
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _read_only(path: str) -> Vault:
    """
    A separate read-only connection to a vault file, so the demo's checks
    cannot change what they check.
    """
    vault_id = os.path.basename(path)[len("clavitor-") : -len(".db")]
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    return Vault(vault_id, sqlite3.connect(uri, uri=True, check_same_thread=False))


def _rows(data_dir: str, vault_id: str) -> list[tuple] | None:
    """
    Every entry of a vault as C{(entry_id, version, deleted, data)}, or
    C{None} if the file does not exist yet.
    """
    path = vault_path(data_dir, vault_id)
    if not os.path.exists(path):
        return None
    vault = _read_only(path)
    try:
        return [(e.entry_id, e.version, e.deleted, e.data) for e in vault.iter_entries()]
    finally:
        vault.close()


def _count(data_dir: str, counter) -> int:
    total = 0
    for vault_id in list_vault_ids(data_dir):
        vault = _read_only(vault_path(data_dir, vault_id))
        try:
            total += counter(vault)
        finally:
            vault.close()
    return total


def backlog(data_dir: str) -> int:
    """
    Dirty entries waiting on the primary, all vaults together.
    """
    return _count(data_dir, Vault.count_dirty)


def replica_size(data_dir: str) -> int:
    """
    Entry rows (tombstones included) on the backup, all vaults together.
    """
    return _count(data_dir, lambda vault: sum(1 for _ in vault.iter_entries()))


def differences(primary_dir: str, backup_dir: str, vault_ids: Sequence[str]) -> list[str]:
    """
    For each vault whose backup copy differs from the primary, one line
    saying how; empty when every vault is equal entry by entry.
    """
    found = []
    for vault_id in vault_ids:
        primary = _rows(primary_dir, vault_id) or []
        replica = _rows(backup_dir, vault_id)
        if replica is None:
            found.append("vault {}: missing on the backup".format(vault_id))
        elif replica != primary:
            mine, theirs = dict((r[0], r) for r in primary), dict((r[0], r) for r in replica)
            missing = len(mine.keys() - theirs.keys())
            extra = len(theirs.keys() - mine.keys())
            changed = sum(1 for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
            found.append(
                "vault {}: {} missing, {} extra, {} different on the backup".format(
                    vault_id, missing, extra, changed
                )
            )
    return found


class DaemonProcess:
    """
    One C{twistd -n clavitor-repl} process, its log file and its
    stdout/stderr file.
    """

    def __init__(self, name: str, directory: str, config_path: str) -> None:
        self.name = name
        self.log_path = os.path.join(directory, name + ".log")
        self.output_path = os.path.join(directory, name + ".out")
        command = [
            sys.executable,
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "--logfile=" + self.log_path,
            "clavitor-repl",
            "--config",
            config_path,
        ]
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                command,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoFailed("the {} process exited with status {}".format(self.name, code))

    def stop(self) -> int | None:
        """
        SIGTERM, wait, kill if it does not stop in time: the exit status,
        or None if it had to be killed.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode

    def tail(self) -> str:
        lines = []
        for path in (self.output_path, self.log_path):
            try:
                text = Path(path).read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            lines.extend(text.splitlines()[-LOG_TAIL:])
        if not lines:
            # Stopped before it wrote a line (a run that failed early).
            lines = ["(no output)"]
        return "\n".join("  {}| {}".format(self.name, line) for line in lines)


def wait_listening(daemon: DaemonProcess, port: int, deadline: float) -> None:
    while True:
        daemon.check_alive()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DemoFailed("the backup did not start listening in time")
        time.sleep(0.1)


class Demo:
    """
    One run of the demo in C{directory}; L{run} raises L{DemoFailed}.
    """

    def __init__(
        self,
        directory: str,
        entries: int,
        vaults: int,
        timeout: float,
        method: str,
        out: TextIO,
    ) -> None:
        self.directory = directory
        self.entries = entries
        self.vault_count = vaults
        self.timeout = timeout
        self.method = method
        self.out = out
        self.primary_dir = os.path.join(directory, "primary-data")
        self.backup_dir = os.path.join(directory, "backup-data")
        self.daemons: list[DaemonProcess] = []
        self._last_progress = 0.0

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        os.mkdir(self.primary_dir, 0o700)
        os.mkdir(self.backup_dir, 0o700)
        demo_pki = write_pki(self.directory, (PRIMARY_POP, BACKUP_POP), self.method == "bearer")
        port = free_port()
        backup_path = os.path.join(self.directory, "backup.yaml")
        primary_path = os.path.join(self.directory, "primary.yaml")
        audit_log = os.path.join(self.directory, "backup-audit.log")
        write_config(
            backup_path,
            backup_config(demo_pki, self.backup_dir, port, self.method, audit_log),
        )
        write_config(primary_path, primary_config(demo_pki, self.primary_dir, port, self.method))
        self.say("demo: {} auth, backup on {}:{}, files in {}".format(
            self.method, LOOPBACK, port, self.directory))

        backup = DaemonProcess("backup", self.directory, backup_path)
        self.daemons.append(backup)
        wait_listening(backup, port, deadline)
        self.daemons.append(DaemonProcess("primary", self.directory, primary_path))

        started = time.monotonic()
        vault_ids, writes = self.write_entries(deadline)
        written = time.monotonic()
        self.say("wrote {} entries ({} writes) into {} vaults in {:.1f} s".format(
            self.entries, writes, len(vault_ids), written - started))
        self.wait_equal(vault_ids, deadline)
        elapsed = time.monotonic() - started
        self.say(
            "replicated: every backup vault equals its primary vault; "
            "{} entries ({} writes) in {:.1f} s: {:.0f} entries/s, {:.0f} writes/s".format(
                self.entries, writes, elapsed, self.entries / elapsed, writes / elapsed)
        )
        self.stop()

    def progress(self, prefix: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_progress >= 1:
            self._last_progress = now
            self.say("{}primary backlog {:>6} dirty | backup {:>6} entries".format(
                prefix, backlog(self.primary_dir), replica_size(self.backup_dir)))

    def write_entries(self, deadline: float) -> tuple[list[str], int]:
        """
        Create C{entries} entries spread over the vaults, then update a
        tenth and delete a twentieth of them, all while the primary runs.
        """
        vault_ids = sorted(secrets.token_hex(8) for _ in range(self.vault_count))
        vaults = [
            open_vault_for_writes(Role.PRIMARY, self.primary_dir, vault_id)
            for vault_id in vault_ids
        ]
        rng = random.Random()
        names = ["entry-{:06d}".format(i) for i in range(self.entries)]
        plan = [("put", i) for i in range(self.entries)]
        plan += [("put", i) for i in rng.sample(range(self.entries), self.entries // 10)]
        plan += [("delete", i) for i in rng.sample(range(self.entries), self.entries // 20)]
        try:
            for done, (action, i) in enumerate(plan, 1):
                vault = vaults[i % len(vaults)]
                now_ms = time.time_ns() // 1_000_000
                if action == "put":
                    vault.put_entry(names[i], os.urandom(ENTRY_BYTES), now_ms)
                else:
                    vault.delete_entry(names[i], now_ms)
                if done % 100 == 0:
                    self.check(deadline)
                    self.progress("written {:>6}/{} | ".format(done, len(plan)))
        finally:
            for vault in vaults:
                vault.close()
        return vault_ids, len(plan)

    def check(self, deadline: float) -> None:
        for daemon in self.daemons:
            daemon.check_alive()
        if time.monotonic() > deadline:
            raise DemoFailed("timed out after {:.0f} s".format(self.timeout))

    def wait_equal(self, vault_ids: Sequence[str], deadline: float) -> None:
        while True:
            try:
                self.check(deadline)
            except DemoFailed as e:
                diff = differences(self.primary_dir, self.backup_dir, vault_ids)
                raise DemoFailed("; ".join([str(e)] + diff)) from None
            if backlog(self.primary_dir) == 0 and not differences(
                self.primary_dir, self.backup_dir, vault_ids
            ):
                self.progress(force=True)
                return
            self.progress()
            time.sleep(0.2)

    def stop(self) -> None:
        """
        Stop the processes, newest first; a process that does not exit
        cleanly on SIGTERM fails the demo.
        """
        failed = []
        for daemon in reversed(self.daemons):
            code = daemon.stop()
            if code is None:
                failed.append("the {} process had to be killed".format(daemon.name))
            elif code not in (0, -signal.SIGTERM):  # twistd ends by the signal it got
                failed.append("the {} process exited with status {}".format(daemon.name, code))
        if failed:
            raise DemoFailed("; ".join(failed) + " after SIGTERM")
        self.say("both processes stopped")


def run(
    entries: int = 10_000,
    vaults: int = 3,
    timeout: float = 180,
    keep: bool = False,
    method: str = "mtls",
    out: TextIO = sys.stdout,
) -> int:
    """
    Run the demo: 0 if the backup ended equal to the primary, 1 with the
    reason and the tail of both process logs otherwise.  The temporary
    directory is removed unless C{keep} or the demo failed.
    """
    directory = tempfile.mkdtemp(prefix="clavitor-demo-")
    demo = Demo(directory, entries, vaults, timeout, method, out)
    try:
        demo.run()
    except DemoFailed as failure:
        for daemon in demo.daemons:
            daemon.stop()
        demo.say("demo failed: {}".format(failure))
        for daemon in demo.daemons:
            demo.say(daemon.tail())
        demo.say("files kept in {}".format(directory))
        return 1
    finally:
        for daemon in demo.daemons:
            daemon.stop()
    if keep:
        demo.say("files kept in {}".format(directory))
    else:
        shutil.rmtree(directory)
    return 0
