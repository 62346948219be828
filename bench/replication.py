"""
Replication throughput: how fast a primary drains a prepared backlog into
its backup, two real twistd processes over loopback mTLS.

For each batch size it writes the backlog (random 1 KB entries over a few
vaults) before the primary starts, then times from the primary's start until
every backup vault equals its primary vault (the backup's restart window
has passed by then).  Prints one line per run.

    .venv/bin/python bench/replication.py [--entries N] [--vaults N] [--batch-sizes 100,500]
"""

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time

from clavitor_twisted import demo
from clavitor_twisted.role import Role
from clavitor_twisted.vault import open_vault_for_writes


def write_backlog(data_dir: str, entries: int, vaults: int) -> list[str]:
    vault_ids = sorted(secrets.token_hex(8) for _ in range(vaults))
    opened = [open_vault_for_writes(Role.PRIMARY, data_dir, v) for v in vault_ids]
    now_ms = time.time_ns() // 1_000_000
    for i in range(entries):
        opened[i % vaults].put_entry("entry-%07d" % i, os.urandom(demo.ENTRY_BYTES), now_ms)
    for vault in opened:
        vault.close()
    return vault_ids


def drain_seconds(directory: str, entries: int, vaults: int, batch_size: int, timeout: float) -> float:
    primary_dir = os.path.join(directory, "primary-data")
    backup_dir = os.path.join(directory, "backup-data")
    os.mkdir(primary_dir, 0o700)
    os.mkdir(backup_dir, 0o700)
    pki = demo.write_pki(directory, (demo.PRIMARY_POP, demo.BACKUP_POP), with_token=False)
    port = demo.free_port()
    backup_path = os.path.join(directory, "backup.yaml")
    primary_path = os.path.join(directory, "primary.yaml")
    backup_config = demo.backup_config(pki, backup_dir, port, "mtls")
    demo.write_config(backup_path, backup_config)
    demo.write_config(
        primary_path, demo.primary_config(pki, primary_dir, port, "mtls", batch_size)
    )
    vault_ids = write_backlog(primary_dir, entries, vaults)
    daemons = [demo.DaemonProcess("backup", directory, backup_path)]
    try:
        deadline = time.monotonic() + timeout
        demo.wait_listening(daemons[0], port, deadline)
        # Let the backup's restart window pass: this measures draining.
        time.sleep(backup_config["security"]["clock_skew"] + 1)
        started = time.monotonic()
        daemons.append(demo.DaemonProcess("primary", directory, primary_path))
        while demo.backlog(primary_dir) or demo.differences(primary_dir, backup_dir, vault_ids):
            for daemon in daemons:
                daemon.check_alive()
            if time.monotonic() > deadline:
                raise demo.DemoFailed("timed out")
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--vaults", type=int, default=4)
    parser.add_argument("--batch-sizes", default="100,500")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    print("backlog of {} x 1 KB entries in {} vaults, mtls, loopback".format(
        args.entries, args.vaults))
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        directory = tempfile.mkdtemp(prefix="clavitor-bench-")
        try:
            seconds = drain_seconds(directory, args.entries, args.vaults, batch_size, args.timeout)
        finally:
            shutil.rmtree(directory)
        print("batch_size {:>5}: drained in {:6.2f} s = {:7.0f} entries/s (incl. process start)".format(
            batch_size, seconds, args.entries / seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
