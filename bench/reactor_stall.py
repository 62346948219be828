"""
How long the backup's reactor stalls while it takes in a large batch: a
backup site runs in this process, a client in another process sends it
signed batches of C{--megabytes} MiB of entry data over loopback mTLS, and a timer
every 5 ms records how late the reactor ran it while each batch was
received, verified, parsed and applied.  Prints one line per batch.

    .venv/bin/python bench/reactor_stall.py [--megabytes 24] [--batches 3]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import yaml
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool

from clavitor_twisted import demo, protocol, receiver, tls
from clavitor_twisted.config import parse_config
from clavitor_twisted.vault import Entry, VaultStore

TICK = 0.005
ENTRY_BYTES = 512 * 1024

# Sends one request (argv[1], a file of raw bytes) over TLS with the client
# certificate, reads the answer's status line, prints it.
CLIENT = """
import socket, ssl, sys
request = open(sys.argv[1], "rb").read()
context = ssl.create_default_context(cafile=sys.argv[2])
context.load_cert_chain(sys.argv[3], sys.argv[4])
context.check_hostname = False
with socket.create_connection(("127.0.0.1", int(sys.argv[5]))) as raw:
    with context.wrap_socket(raw) as tls:
        tls.sendall(request)
        print(tls.recv(200).split(b"\\r\\n")[0].decode())
"""


class Lateness:
    """
    The largest delay of a timer that should fire every TICK seconds.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()
        self._loop = task.LoopingCall(self._tick)

    def start(self) -> None:
        self._loop.start(TICK)

    def reset(self) -> None:
        self.worst = 0.0
        self._last = time.monotonic()

    def _tick(self) -> None:
        now = time.monotonic()
        self.worst = max(self.worst, now - self._last - TICK)
        self._last = now


def signed_request(pki, megabytes: int, seq: int) -> bytes:
    count = max(1, megabytes * 1024 * 1024 // ENTRY_BYTES)
    entries = [
        Entry("%016x" % (seq,), "e%05d" % (i,), 1, 0, False, os.urandom(ENTRY_BYTES))
        for i in range(count)
    ]
    batch = protocol.new_batch(demo.PRIMARY_POP, demo.BACKUP_POP, 1, seq, entries, int(time.time()))
    body = protocol.serialise(batch)
    cert, key = pki.pops[demo.PRIMARY_POP]
    signer = protocol.CertificateSigner(tls.load_identity(cert, key).private_key)
    head = (
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "{}: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n".format(
            protocol.APPLY_PATH.decode(),
            protocol.SIGNATURE_HEADER.decode(),
            signer.sign(body).decode(),
            len(body),
        )
    )
    return head.encode() + body


async def run(args, directory: str) -> None:
    pki = demo.write_pki(directory, (demo.PRIMARY_POP, demo.BACKUP_POP), with_token=False)
    data_dir = os.path.join(directory, "backup-data")
    os.mkdir(data_dir)
    document = demo.backup_config(pki, data_dir, 1, "mtls")
    # Base64 makes the body about 4/3 of the entry data.
    document["security"]["max_request_bytes"] = (args.megabytes * 3 // 2 + 1) * 1024 * 1024
    document["security"]["max_entry_bytes"] = ENTRY_BYTES
    config = parse_config(yaml.safe_dump(document))
    pool = ThreadPool(minthreads=1, maxthreads=4, name="bench-vaults")
    pool.start()
    store = VaultStore(data_dir, pool, reactor)
    site = receiver.make_site(
        config, store, reactor, None, started_at=int(time.time()) - 3600
    )
    cert, key = pki.pops[demo.BACKUP_POP]
    options = tls.server_options(tls.load_identity(cert, key), tls.load_ca(pki.ca), True)
    port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(site)
    lateness = Lateness()
    lateness.start()
    client_cert, client_key = pki.pops[demo.PRIMARY_POP]
    try:
        for seq in range(1, args.batches + 1):
            request_path = os.path.join(directory, "request")
            with open(request_path, "wb") as f:
                f.write(signed_request(pki, args.megabytes, seq))
            size = os.path.getsize(request_path)
            lateness.reset()
            started = time.monotonic()
            status = await deferToThread(
                subprocess.check_output,
                [sys.executable, "-c", CLIENT, request_path, pki.ca, client_cert,
                 client_key, str(port.getHost().port)],
            )
            print(
                "batch of {:.1f} MiB: {} in {:.2f} s; reactor at most {:.0f} ms late".format(
                    size / 1024 / 1024, status.decode().strip(), time.monotonic() - started,
                    lateness.worst * 1000,
                )
            )
    finally:
        await port.stopListening()
        await store.close()
        pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=24)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clavitor-stall-") as directory:
        done = ensureDeferred(run(args, directory))
        done.addErrback(lambda failure: print(failure.getTraceback(), file=sys.stderr))
        done.addBoth(lambda _: reactor.stop())
        reactor.run()


if __name__ == "__main__":
    main()
