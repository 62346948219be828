# -*- test-case-name: tests.test_cli -*-
"""
C{clavitor-repl}: the operator's commands.

  - C{gen-certs}: a development CA and POP certificates;
  - C{gen-token}: a new shared token file, or a rotation of one;
  - C{check-config}: build everything the daemon would build from a config
    file, without starting it;
  - C{status}: ask the running daemon of a config file what it is doing;
  - C{demo}: the local demonstration (L{clavitor_twisted.demo}).

Secrets never appear in arguments, the environment or the output, and what
is printed names keys and checks, never file paths: errors print their
public text only.
"""

import argparse
import ipaddress
import json
import math
import os
import sys
import threading
import urllib.request
from collections.abc import Sequence

from clavitor_twisted import demo, pki, tokens
from clavitor_twisted.config import POP_ID_PATTERN, load_config
from clavitor_twisted.errors import ClavitorError

CA_FILES = ("ca.crt", "ca.key")
# Seconds to wait for the daemon's status, and the most of it read.
STATUS_TIMEOUT = 10
MAX_STATUS_BYTES = 64 * 1024 * 1024


def _pop_id(text: str) -> str:
    if not POP_ID_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError("a POP id is a lower-case DNS label")
    return text


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError("not an IP address") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _fail(command: str, text: str) -> int:
    print("{}: {}".format(command, text), file=sys.stderr)
    return 1


def gen_certs(args: argparse.Namespace) -> int:
    """
    Make every certificate in memory first, then write them, so a bad
    --host makes no file and an existing file is never replaced.
    """
    pops = list(dict.fromkeys(args.pop))
    try:
        ca_key, ca_cert = pki.make_ca()
        made = [
            (pop_id, *pki.make_pop_certificate(ca_key, ca_cert, pop_id, args.host, args.ip))
            for pop_id in pops
        ]
    except ValueError as e:
        return _fail("gen-certs", "--host: {}".format(e))
    names = list(CA_FILES) + [pop_id + suffix for pop_id in pops for suffix in (".crt", ".key")]
    os.makedirs(args.out, mode=0o700, exist_ok=True)
    existing = [name for name in names if os.path.lexists(os.path.join(args.out, name))]
    if existing:
        return _fail("gen-certs", "refusing to overwrite " + ", ".join(existing))
    try:
        pki.write_certificate(os.path.join(args.out, "ca.crt"), ca_cert)
        pki.write_key(os.path.join(args.out, "ca.key"), ca_key)
        for pop_id, key, cert in made:
            pki.write_certificate(os.path.join(args.out, pop_id + ".crt"), cert)
            pki.write_key(os.path.join(args.out, pop_id + ".key"), key)
    except OSError as e:
        return _fail("gen-certs", "cannot write the files: " + (e.strerror or "error"))
    print("ok: wrote " + ", ".join(names))
    print("this is a development CA: keep ca.key off the POPs")
    return 0


def gen_token(args: argparse.Namespace) -> int:
    """
    Write a new token; with --rotate the old current token stays valid as
    the previous one until the next rotation.
    """
    previous = None
    if args.rotate:
        try:
            previous = tokens.load_tokens(args.file).current
        except ClavitorError as e:
            return _fail("gen-token", e.public)
    elif os.path.lexists(args.file):
        return _fail("gen-token", "the token file exists; use --rotate to replace its token")
    try:
        tokens.write_token_file(args.file, tokens.generate_token(), previous)
    except OSError as e:
        return _fail("gen-token", "cannot write the token file: " + (e.strerror or "error"))
    if args.rotate:
        print("ok: token rotated; the previous token stays valid until the next rotation")
    else:
        print("ok: token written (mode 0600)")
    return 0


def check_config(args: argparse.Namespace) -> int:
    """
    Load the config and build the service from it as the daemon would
    (certificates, key, CA and token file included), without starting it.
    """
    from twisted.internet import reactor

    from clavitor_twisted.service import START_UP_ERRORS, make_service

    try:
        config = load_config(args.file)
        make_service(config, reactor)
    except START_UP_ERRORS as e:
        return _fail("check-config", e.public)
    print("ok: {} {}".format(config.role.value, config.pop_id))
    return 0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        # The status is this daemon's: an answer sending us elsewhere is not.
        return None


def _refuse_constant(name: str):
    raise ValueError("not a number: " + name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _fetch_status(url: str) -> dict:
    """
    The status document at C{url}, straight from the loopback address
    (whatever proxy the environment names, and no redirect followed).

    @raise OSError, ValueError, RecursionError: no status document came.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)
    with opener.open(url, timeout=STATUS_TIMEOUT) as answer:
        raw = answer.read(MAX_STATUS_BYTES + 1)
    if len(raw) > MAX_STATUS_BYTES:
        raise ValueError("status document too large")
    document = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    if not isinstance(document, dict):
        raise ValueError("not a status document")
    return document


def show_status(args: argparse.Namespace) -> int:
    """
    Ask the running daemon of a config file for its status, on its
    metrics address, within STATUS_TIMEOUT seconds in all.
    """
    from clavitor_twisted.status import STATUS_PATH, describe

    try:
        config = load_config(args.file)
    except ClavitorError as e:
        return _fail("status", e.public)
    if config.metrics is None:
        return _fail("status", "metrics: not configured, so the daemon serves no status")
    host = config.metrics.address
    if ":" in host:
        host = "[" + host + "]"
    url = "http://{}:{}{}".format(host, config.metrics.port, STATUS_PATH.decode())
    # In a thread, so that a server dribbling its answer cannot hold us
    # past the timeout (the socket's own timeout is per read).
    fetched: list = []
    worker = threading.Thread(target=lambda: fetched.append(_try(_fetch_status, url)), daemon=True)
    worker.start()
    worker.join(STATUS_TIMEOUT)
    document = fetched[0] if fetched else None
    try:
        if not isinstance(document, dict):
            raise ValueError("no status document")
        text = json.dumps(document, indent=2) if args.json else describe(document)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _fail("status", "no status document from metrics.address, metrics.port")
    print(text)
    return 0


def _try(function, *args):
    """
    C{function(*args)}, or None if it raised what a bad answer raises.
    """
    try:
        return function(*args)
    except (OSError, ValueError, RecursionError):
        return None


def run_demo(args: argparse.Namespace) -> int:
    return demo.run(args.entries, args.vaults, args.timeout, args.keep, args.auth)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="clavitor-repl",
        description="Clavitor vault replication: operator commands. "
        "The daemon itself runs as: twistd -n clavitor-repl --config FILE",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certs = commands.add_parser(
        "gen-certs", help="make a development CA and POP certificates"
    )
    certs.add_argument("--out", required=True, metavar="DIR", help="directory for the files")
    certs.add_argument(
        "--pop", required=True, action="append", type=_pop_id, metavar="ID",
        help="a POP to make a certificate for (repeat for more)",
    )
    certs.add_argument(
        "--host", action="append", default=[], metavar="NAME",
        help="a DNS name for every POP certificate (repeatable)",
    )
    certs.add_argument(
        "--ip", action="append", default=[], type=_ip, metavar="ADDR",
        help="an IP address for every POP certificate (repeatable)",
    )
    certs.set_defaults(run=gen_certs)

    token = commands.add_parser("gen-token", help="write a new token file (never printed)")
    token.add_argument("file", metavar="FILE")
    token.add_argument(
        "--rotate", action="store_true",
        help="replace the token in FILE, keeping the old one as the previous token",
    )
    token.set_defaults(run=gen_token)

    check = commands.add_parser("check-config", help="check a replication config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(run=check_config)

    state = commands.add_parser("status", help="what the running daemon of a config is doing")
    state.add_argument("file", metavar="FILE", help="the daemon's config file")
    state.add_argument("--json", action="store_true", help="print the status document")
    state.set_defaults(run=show_status)

    show = commands.add_parser("demo", help="replicate between two local processes")
    show.add_argument("--entries", type=_positive, default=10_000)
    show.add_argument("--vaults", type=_positive, default=3)
    show.add_argument("--timeout", type=_positive, default=180, metavar="SECONDS")
    show.add_argument("--keep", action="store_true", help="keep the temporary directory")
    show.add_argument("--auth", choices=("mtls", "bearer"), default="mtls")
    show.set_defaults(run=run_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
