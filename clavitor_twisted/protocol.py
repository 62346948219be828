# -*- test-case-name: tests.test_protocol -*-
"""
Wire protocol v1: build, serialise, sign, parse and verify a replication
batch.  Nothing here knows about sockets or HTTP.

A batch travels as the body of C{POST /api/replication/apply}, a compact
UTF-8 JSON object; its signature travels beside it in the
C{X-Clavitor-Signature} header, over C{POST\\n/api/replication/apply\\n}
followed by the exact body bytes.  The receiver verifies the signature on
the raw bytes before it parses anything, then parses strictly: a body that
is in any way not what L{serialise} would make is L{Malformed}.

Two kinds of signature exist.  In mtls mode, C{cert=<base64>} is made with
the key of the sender's certificate (ECDSA with SHA-256, Ed25519, or RSA-PSS
with SHA-256) and verified with the key of the certificate the peer
presented in the TLS handshake.  In bearer mode, C{hmac-sha256=<hex>} is
keyed with the shared token; the current and the previous token verify.
"""

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from clavitor_twisted.config import POP_ID_PATTERN
from clavitor_twisted.errors import (
    AuthenticationFailed,
    CertificateError,
    Malformed,
    StaleRequest,
)
from clavitor_twisted.tls import KEY_KEY
from clavitor_twisted.tokens import TokenSet
from clavitor_twisted.vault import (
    ENTRY_ID_PATTERN,
    MAX_VERSION,
    VAULT_ID_PATTERN,
    Entry,
)

PROTOCOL_VERSION = 1
APPLY_PATH = b"/api/replication/apply"
SIGNATURE_HEADER = b"X-Clavitor-Signature"
MAX_ENTRIES_PER_BATCH = 10_000

CERT_PREFIX = b"cert="
HMAC_PREFIX = b"hmac-sha256="

NONCE_PATTERN = re.compile(r"[0-9a-f]{32}")
_HMAC_HEX = re.compile(rb"[0-9a-f]{64}")
# Longer than any integer the format allows (MAX_VERSION has 19 digits), so
# a huge number is refused before Python converts it.
_MAX_INT_CHARS = 20
# Epochs, sequence numbers and times are stored as SQLite integers.
_MAX_INT = MAX_VERSION

_BATCH_KEYS = frozenset(
    ("protocol", "source_pop", "target_pop", "epoch", "seq", "timestamp", "nonce", "entries")
)
_ENTRY_KEYS = frozenset(
    ("vault_id", "entry_id", "version", "updated_at", "deleted", "data")
)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


@dataclass(frozen=True)
class Batch:
    """
    One replication request: the entries, who sends them to whom, and what
    makes the request unique and fresh (C{timestamp}, C{nonce}).
    """

    source_pop: str
    target_pop: str
    epoch: int
    seq: int
    timestamp: int
    nonce: str
    entries: tuple[Entry, ...]
    protocol: int = PROTOCOL_VERSION


def new_batch(
    source_pop: str,
    target_pop: str,
    epoch: int,
    seq: int,
    entries: Sequence[Entry],
    now: int,
) -> Batch:
    """
    A batch stamped C{now} (Unix seconds) with a fresh random nonce.
    """
    return Batch(
        source_pop=source_pop,
        target_pop=target_pop,
        epoch=epoch,
        seq=seq,
        timestamp=now,
        nonce=secrets.token_hex(16),
        entries=tuple(entries),
    )


def serialise(batch: Batch) -> bytes:
    """
    The body of C{batch}: compact JSON, data in standard base64, C{null} for
    a tombstone.  L{parse_batch} gives back an equal batch.
    """
    return json.dumps(
        {
            "protocol": batch.protocol,
            "source_pop": batch.source_pop,
            "target_pop": batch.target_pop,
            "epoch": batch.epoch,
            "seq": batch.seq,
            "timestamp": batch.timestamp,
            "nonce": batch.nonce,
            "entries": [
                {
                    "vault_id": entry.vault_id,
                    "entry_id": entry.entry_id,
                    "version": entry.version,
                    "updated_at": entry.updated_at,
                    "deleted": entry.deleted,
                    "data": None
                    if entry.data is None
                    else base64.b64encode(entry.data).decode("ascii"),
                }
                for entry in batch.entries
            ],
        },
        separators=(",", ":"),
        allow_nan=False,
    ).encode("ascii")


def _object(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise Malformed("duplicate key in a JSON object")
    return result


def _integer(text: str) -> int:
    if len(text) > _MAX_INT_CHARS:
        raise Malformed("integer too long")
    return int(text)


def _not_an_integer(text: str):
    raise Malformed("a number that is not an integer")


# A v1 body has one object per entry and the batch itself, and no string
# in it may hold a brace: counting them (at C speed) refuses a body of many
# tiny objects before the JSON parser builds them all.
_MAX_OBJECTS = MAX_ENTRIES_PER_BATCH + 1


def _decode_json(body: bytes):
    if type(body) is not bytes:
        raise Malformed("body is not bytes")
    if body.count(b"{") > _MAX_OBJECTS:
        raise Malformed("more objects than a batch can hold")
    try:
        return json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_object,
            parse_int=_integer,
            parse_float=_not_an_integer,
            parse_constant=_not_an_integer,
        )
    except RecursionError:
        raise Malformed("JSON nested too deep")
    except ValueError:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors.
        raise Malformed("not UTF-8 JSON")


def _object_with(value, keys: frozenset, what: str) -> dict:
    if type(value) is not dict or value.keys() != keys:
        raise Malformed(what + " is not an object with exactly the v1 keys")
    return value


def _int_in(value, low: int, high: int, what: str) -> int:
    # type(), not isinstance(): True is not an integer here.
    if type(value) is not int or not low <= value <= high:
        raise Malformed(what + " is not an integer in range")
    return value


def _matching(value, pattern: re.Pattern, what: str) -> str:
    if type(value) is not str or pattern.fullmatch(value) is None:
        raise Malformed(what + " is not valid")
    return value


def _strict_base64(text: bytes) -> bytes | None:
    """
    Decode standard base64 with padding; None unless C{text} is exactly
    what encoding the result gives (no whitespace, no stray bits).
    """
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(decoded) != text:
        return None
    return decoded


def _entry_data(value, deleted: bool, max_entry_bytes: int) -> bytes | None:
    if deleted:
        if value is not None:
            raise Malformed("a tombstone carries data")
        return None
    if type(value) is not str:
        raise Malformed("entry data is not a base64 string")
    if len(value) > 4 * -(-max_entry_bytes // 3):
        raise Malformed("entry data too large")
    if not value.isascii():
        raise Malformed("entry data is not base64")
    data = _strict_base64(value.encode("ascii"))
    if data is None:
        raise Malformed("entry data is not base64")
    if len(data) > max_entry_bytes:
        raise Malformed("entry data too large")
    return data


def _entry(value, max_entry_bytes: int) -> Entry:
    value = _object_with(value, _ENTRY_KEYS, "entry")
    deleted = value["deleted"]
    if type(deleted) is not bool:
        raise Malformed("deleted is not a boolean")
    return Entry(
        vault_id=_matching(value["vault_id"], VAULT_ID_PATTERN, "vault_id"),
        entry_id=_matching(value["entry_id"], ENTRY_ID_PATTERN, "entry_id"),
        version=_int_in(value["version"], 1, MAX_VERSION, "version"),
        updated_at=_int_in(value["updated_at"], 0, _MAX_INT, "updated_at"),
        deleted=deleted,
        data=_entry_data(value["data"], deleted, max_entry_bytes),
    )


def parse_batch(body: bytes, max_entry_bytes: int) -> Batch:
    """
    Parse a v1 body, strictly.  Call only after the signature verified.

    @raise Malformed: the body is not exactly a v1 batch: not UTF-8 JSON,
        duplicate, unknown or missing keys, a wrong type (a boolean is not an
        integer, no number may be a float), another protocol, an invalid
        pop id, nonce, vault id or entry id, a number out of range, data
        that is not strict base64 or decodes to more than
        C{max_entry_bytes}, a tombstone with data or a live entry without,
        more than L{MAX_ENTRIES_PER_BATCH} entries, or the same entry twice.
    """
    value = _object_with(_decode_json(body), _BATCH_KEYS, "body")
    protocol = _int_in(value["protocol"], PROTOCOL_VERSION, PROTOCOL_VERSION, "protocol")
    raw_entries = value["entries"]
    if type(raw_entries) is not list:
        raise Malformed("entries is not a list")
    if len(raw_entries) > MAX_ENTRIES_PER_BATCH:
        raise Malformed("too many entries")
    entries = tuple(_entry(entry, max_entry_bytes) for entry in raw_entries)
    if len({(entry.vault_id, entry.entry_id) for entry in entries}) != len(entries):
        raise Malformed("the same entry twice")
    return Batch(
        source_pop=_matching(value["source_pop"], POP_ID_PATTERN, "source_pop"),
        target_pop=_matching(value["target_pop"], POP_ID_PATTERN, "target_pop"),
        epoch=_int_in(value["epoch"], 1, _MAX_INT, "epoch"),
        seq=_int_in(value["seq"], 0, _MAX_INT, "seq"),
        timestamp=_int_in(value["timestamp"], 0, _MAX_INT, "timestamp"),
        nonce=_matching(value["nonce"], NONCE_PATTERN, "nonce"),
        entries=entries,
        protocol=protocol,
    )


def signing_input(body: bytes) -> bytes:
    """
    The bytes a signature covers: method, path and the exact body.
    """
    return b"POST\n" + APPLY_PATH + b"\n" + body


def _signature_value(header: bytes | None, prefix: bytes) -> bytes:
    if header is None:
        raise AuthenticationFailed("no signature header")
    if type(header) is not bytes or not header.startswith(prefix):
        raise AuthenticationFailed("signature header of another kind")
    return header[len(prefix):]


class CertificateSigner:
    """
    Signs bodies with the private key of the POP's certificate (mtls mode).
    """

    def __init__(self, private_key) -> None:
        if not isinstance(
            private_key,
            (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey),
        ):
            raise CertificateError(
                KEY_KEY + ": must be an EC, Ed25519 or RSA key to sign batches",
                "cannot sign with a " + type(private_key).__name__,
            )
        self._key = private_key

    def sign(self, body: bytes) -> bytes:
        """
        The C{X-Clavitor-Signature} value for C{body}: C{cert=<base64>}.
        """
        data = signing_input(body)
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPrivateKey):
            signature = key.sign(data, _PSS, hashes.SHA256())
        else:
            signature = key.sign(data)
        return CERT_PREFIX + base64.b64encode(signature)


def verify_certificate_signature(header: bytes | None, body: bytes, public_key) -> None:
    """
    Check a C{cert=} signature over C{body} with the public key of the
    certificate the peer presented.

    @raise AuthenticationFailed: no header, another kind, not strict
        base64, a key type we do not sign with, or a bad signature.
    """
    signature = _strict_base64(_signature_value(header, CERT_PREFIX))
    if not signature:
        raise AuthenticationFailed("signature is not base64")
    data = signing_input(body)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _PSS, hashes.SHA256())
        else:
            raise AuthenticationFailed("peer key type cannot sign batches")
    except InvalidSignature:
        raise AuthenticationFailed("bad signature")


def _hmac_hex(token: bytes, body: bytes) -> bytes:
    return hmac.new(token, signing_input(body), hashlib.sha256).hexdigest().encode("ascii")


class HmacSigner:
    """
    Signs bodies with the current shared token (bearer mode).  The token is
    fetched for every batch, so a rotated file takes effect at once.
    """

    def __init__(self, token_source) -> None:
        self._token_source = token_source

    def sign(self, body: bytes) -> bytes:
        """
        The C{X-Clavitor-Signature} value for C{body}: C{hmac-sha256=<hex>}.
        """
        return HMAC_PREFIX + _hmac_hex(self._token_source.tokens().current, body)


def verify_hmac_signature(header: bytes | None, body: bytes, tokens: TokenSet) -> None:
    """
    Check an C{hmac-sha256=} signature over C{body} against the current and
    the previous token, each compared in constant time.

    @raise AuthenticationFailed: no header, another kind, not 64 lower-case
        hex digits, or made with neither token.
    """
    value = _signature_value(header, HMAC_PREFIX)
    if _HMAC_HEX.fullmatch(value) is None:
        raise AuthenticationFailed("signature is not 64 hex digits")
    # Compare with every token, not stopping at a match, so the time taken
    # does not tell which token was used.
    matches = [hmac.compare_digest(_hmac_hex(token, body), value) for token in tokens.all()]
    if not any(matches):
        raise AuthenticationFailed("bad signature")


def check_freshness(
    batch: Batch, now: int, max_age: int, clock_skew: int, not_before: int
) -> None:
    """
    Refuse a batch signed more than C{max_age} seconds ago, more than
    C{clock_skew} seconds in the future, or before C{not_before} (the first
    second a request cannot have been accepted by the process before this
    one, so a restart with an empty nonce cache accepts no replay).  The
    boundaries themselves are accepted.

    @raise StaleRequest: outside the window (never counted towards a ban).
    """
    if batch.timestamp < now - max_age:
        raise StaleRequest("timestamp older than max_request_age")
    if batch.timestamp > now + clock_skew:
        raise StaleRequest("timestamp in the future beyond clock_skew")
    if batch.timestamp < not_before:
        raise StaleRequest("timestamp inside the restart window")
