"""
Tests for L{clavitor_twisted.protocol}: the v1 wire format, both kinds of
signature, and the freshness window.
"""

import base64
import hashlib
import hmac
import json

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.config import POP_ID_PATTERN
from clavitor_twisted.errors import (
    AuthenticationFailed,
    CertificateError,
    Malformed,
    StaleRequest,
)
from clavitor_twisted.protocol import (
    APPLY_PATH,
    MAX_ENTRIES_PER_BATCH,
    NONCE_PATTERN,
    PROTOCOL_VERSION,
    SIGNATURE_HEADER,
    Batch,
    CertificateSigner,
    HmacSigner,
    check_freshness,
    new_batch,
    parse_batch,
    serialise,
    signing_input,
    verify_certificate_signature,
    verify_hmac_signature,
)
from clavitor_twisted.tokens import TokenSet, generate_token
from clavitor_twisted.vault import (
    ENTRY_ID_PATTERN,
    MAX_VERSION,
    VAULT_ID_PATTERN,
    Entry,
)

MAX_ENTRY_BYTES = 64
VAULT = "0123456789abcdef"

EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS = {"ec": EC_KEY, "ed25519": ED25519_KEY, "rsa": RSA_KEY}

TOKEN_A = generate_token()
TOKEN_B = generate_token()

pop_ids = st.from_regex(POP_ID_PATTERN, fullmatch=True)
vault_ids = st.from_regex(VAULT_ID_PATTERN, fullmatch=True)
entry_ids = st.from_regex(ENTRY_ID_PATTERN, fullmatch=True)
numbers = st.integers(0, MAX_VERSION)
versions = st.integers(1, MAX_VERSION)
live_entries = st.builds(
    Entry,
    vault_ids,
    entry_ids,
    versions,
    numbers,
    st.just(False),
    st.binary(max_size=MAX_ENTRY_BYTES),
)
tombstones = st.builds(
    Entry, vault_ids, entry_ids, versions, numbers, st.just(True), st.none()
)
batches = st.builds(
    Batch,
    source_pop=pop_ids,
    target_pop=pop_ids,
    epoch=versions,
    seq=numbers,
    timestamp=numbers,
    nonce=st.from_regex(NONCE_PATTERN, fullmatch=True),
    entries=st.lists(
        st.one_of(live_entries, tombstones),
        max_size=8,
        unique_by=lambda entry: (entry.vault_id, entry.entry_id),
    ).map(tuple),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def entry_object(**changes):
    entry = {
        "vault_id": VAULT,
        "entry_id": "e1",
        "version": 3,
        "updated_at": 1700000000000,
        "deleted": False,
        "data": "c2VjcmV0",
    }
    entry.update(changes)
    return entry


def batch_object(**changes):
    batch = {
        "protocol": 1,
        "source_pop": "calgary-01",
        "target_pop": "zurich-01",
        "epoch": 1,
        "seq": 7,
        "timestamp": 1700000000,
        "nonce": "00112233445566778899aabbccddeeff",
        "entries": [entry_object()],
    }
    batch.update(changes)
    return batch


def body(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def parse(raw: bytes) -> Batch:
    return parse_batch(raw, MAX_ENTRY_BYTES)


def parse_or_malformed(raw: bytes):
    """
    Parse C{raw}; a Malformed is fine, any other exception fails the test.
    """
    try:
        return parse(raw)
    except Malformed:
        return None


class ConstantsTests(SynchronousTestCase):
    def test_wire_constants(self):
        self.assertEqual(PROTOCOL_VERSION, 1)
        self.assertEqual(APPLY_PATH, b"/api/replication/apply")
        self.assertEqual(SIGNATURE_HEADER, b"X-Clavitor-Signature")
        self.assertEqual(MAX_ENTRIES_PER_BATCH, 10_000)

    def test_signing_input(self):
        self.assertEqual(
            signing_input(b'{"a":1}'), b'POST\n/api/replication/apply\n{"a":1}'
        )


class SerialiseTests(SynchronousTestCase):
    def test_known_body(self):
        """
        The exact v1 bytes: compact JSON, keys in a fixed order, data in
        standard base64, null for a tombstone.
        """
        batch = Batch(
            source_pop="calgary-01",
            target_pop="zurich-01",
            epoch=2,
            seq=9,
            timestamp=1700000000,
            nonce="00112233445566778899aabbccddeeff",
            entries=(
                Entry(VAULT, "e1", 3, 1700000000000, False, b"\xfb\xff"),
                Entry(VAULT, "e2", 4, 1700000000001, True, None),
            ),
        )
        self.assertEqual(
            serialise(batch),
            b'{"protocol":1,"source_pop":"calgary-01","target_pop":"zurich-01",'
            b'"epoch":2,"seq":9,"timestamp":1700000000,'
            b'"nonce":"00112233445566778899aabbccddeeff","entries":['
            b'{"vault_id":"0123456789abcdef","entry_id":"e1","version":3,'
            b'"updated_at":1700000000000,"deleted":false,"data":"+/8="},'
            b'{"vault_id":"0123456789abcdef","entry_id":"e2","version":4,'
            b'"updated_at":1700000000001,"deleted":true,"data":null}]}',
        )

    @given(batches)
    def test_round_trip(self, batch):
        """
        Parsing a serialised valid batch gives it back, and serialising is
        canonical: the parsed batch serialises to the same bytes.
        """
        raw = serialise(batch)
        parsed = parse(raw)
        self.assertEqual(parsed, batch)
        self.assertEqual(serialise(parsed), raw)

    def test_new_batch(self):
        entries = [Entry(VAULT, "e1", 1, 0, False, b"x")]
        batch = new_batch("calgary-01", "zurich-01", 3, 4, entries, now=1234)
        self.assertEqual(
            (batch.source_pop, batch.target_pop, batch.epoch, batch.seq),
            ("calgary-01", "zurich-01", 3, 4),
        )
        self.assertEqual(batch.timestamp, 1234)
        self.assertEqual(batch.entries, tuple(entries))
        self.assertEqual(batch.protocol, 1)
        self.assertTrue(NONCE_PATTERN.fullmatch(batch.nonce))
        self.assertEqual(parse(serialise(batch)), batch)

    def test_fresh_nonces(self):
        nonces = {new_batch("a", "b", 1, 1, [], 0).nonce for _ in range(100)}
        self.assertEqual(len(nonces), 100)


class ParseTests(SynchronousTestCase):
    def assertMalformed(self, raw: bytes):
        self.assertRaises(Malformed, parse, raw)

    def test_valid(self):
        batch = parse(body(batch_object()))
        self.assertEqual(batch.entries, (Entry(VAULT, "e1", 3, 1700000000000, False, b"secret"),))
        self.assertEqual(batch.nonce, "00112233445566778899aabbccddeeff")

    def test_not_json(self):
        for raw in (b"", b"{", b"null", b"[]", b'"x"', b"1", b"\xff\xfe", b"{}"):
            self.assertMalformed(raw)

    def test_not_bytes(self):
        self.assertMalformed(body(batch_object()).decode("utf-8"))

    def test_not_utf8(self):
        """
        Only UTF-8: not UTF-16 (which json.loads would detect in bytes), no
        byte order mark, no invalid sequence.
        """
        text = json.dumps(batch_object())
        self.assertMalformed(text.encode("utf-16"))
        self.assertMalformed(b"\xef\xbb\xbf" + text.encode("utf-8"))
        self.assertMalformed(body(batch_object(source_pop="x")).replace(b'"x"', b'"\xc0\xaf"'))

    def test_trailing_data(self):
        self.assertMalformed(body(batch_object()) + b"{}")

    def test_unknown_key(self):
        self.assertMalformed(body(batch_object(signature="abc")))
        self.assertMalformed(body(batch_object(entries=[entry_object(title="x")])))

    def test_missing_key(self):
        for key in batch_object():
            obj = batch_object()
            del obj[key]
            self.assertMalformed(body(obj))
        for key in entry_object():
            entry = entry_object()
            del entry[key]
            self.assertMalformed(body(batch_object(entries=[entry])))

    def test_duplicate_key(self):
        """
        A key given twice is refused, at the top and inside an entry, even
        with the same value both times.
        """
        raw = body(batch_object())
        self.assertMalformed(raw.replace(b'"seq": 7', b'"seq": 7, "seq": 7'))
        self.assertMalformed(raw.replace(b'"version": 3', b'"version": 3, "version": 9'))

    def test_protocol(self):
        for protocol in (0, 2, "1", 1.0, True, None):
            self.assertMalformed(body(batch_object(protocol=protocol)))

    def test_booleans_are_not_integers(self):
        for key in ("epoch", "seq", "timestamp"):
            self.assertMalformed(body(batch_object(**{key: True})))
        for key in ("version", "updated_at"):
            self.assertMalformed(body(batch_object(entries=[entry_object(**{key: True})])))

    def test_no_floats(self):
        """
        A number with a fraction or an exponent is refused even when its
        value is a whole number; so are NaN and the infinities.
        """
        raw = body(batch_object())
        for number in (b"7.0", b"7e0", b"0.7e1", b"NaN", b"Infinity", b"-Infinity"):
            self.assertMalformed(raw.replace(b'"seq": 7', b'"seq": ' + number))

    def test_integer_ranges(self):
        for key, bad in (("epoch", 0), ("seq", -1), ("timestamp", -1), ("seq", MAX_VERSION + 1)):
            self.assertMalformed(body(batch_object(**{key: bad})))
        for key, bad in (("version", 0), ("version", MAX_VERSION + 1), ("updated_at", -1)):
            self.assertMalformed(body(batch_object(entries=[entry_object(**{key: bad})])))
        batch = parse(body(batch_object(epoch=1, seq=MAX_VERSION, entries=[entry_object(version=MAX_VERSION, updated_at=0)])))
        self.assertEqual(batch.entries[0].version, MAX_VERSION)

    def test_huge_integer(self):
        raw = body(batch_object())
        self.assertMalformed(raw.replace(b'"seq": 7', b'"seq": ' + b"9" * 5000))

    def test_pop_ids(self):
        for bad in ("Calgary-01", "calgary_01", "-calgary", "calgary-01\n", "", "a" * 64, 7, None):
            self.assertMalformed(body(batch_object(source_pop=bad)))
            self.assertMalformed(body(batch_object(target_pop=bad)))

    def test_nonce(self):
        for bad in ("00112233445566778899AABBCCDDEEFF", "0" * 31, "0" * 33, "0" * 32 + "\n", "g" * 32, 0):
            self.assertMalformed(body(batch_object(nonce=bad)))

    def test_vault_id(self):
        for bad in ("0123456789ABCDEF", "0" * 15, "0" * 65, "../../etc/passwd", VAULT + "\n", 1):
            self.assertMalformed(body(batch_object(entries=[entry_object(vault_id=bad)])))

    def test_entry_id(self):
        for bad in ("", "a" * 129, "a/b", "a b", "e1\n", "é", 1, None):
            self.assertMalformed(body(batch_object(entries=[entry_object(entry_id=bad)])))

    def test_deleted(self):
        for bad in (0, 1, "false", None):
            self.assertMalformed(body(batch_object(entries=[entry_object(deleted=bad)])))

    def test_tombstone(self):
        batch = parse(body(batch_object(entries=[entry_object(deleted=True, data=None)])))
        self.assertEqual(batch.entries[0].data, None)
        self.assertTrue(batch.entries[0].deleted)
        self.assertMalformed(body(batch_object(entries=[entry_object(deleted=True, data="")])))
        self.assertMalformed(body(batch_object(entries=[entry_object(deleted=True)])))
        self.assertMalformed(body(batch_object(entries=[entry_object(data=None)])))

    def test_empty_data(self):
        batch = parse(body(batch_object(entries=[entry_object(data="")])))
        self.assertEqual(batch.entries[0].data, b"")

    def test_data_strict_base64(self):
        """
        Only canonical standard base64 with padding: no URL alphabet, no
        missing padding, no whitespace, no stray bits, no other types.
        """
        for bad in ("c2VjcmV0\n", " c2VjcmV0", "c2Vj cmV0", "c2VjcmV", "QQ", "QR==", "-_-_", "c2VjcmV0====", "é", 5, [], {}):
            self.assertMalformed(body(batch_object(entries=[entry_object(data=bad)])))

    def test_data_size(self):
        """
        Data may decode to max_entry_bytes, not one byte more.
        """
        at_limit = base64.b64encode(b"x" * MAX_ENTRY_BYTES).decode("ascii")
        over = base64.b64encode(b"x" * (MAX_ENTRY_BYTES + 1)).decode("ascii")
        self.assertEqual(
            parse(body(batch_object(entries=[entry_object(data=at_limit)]))).entries[0].data,
            b"x" * MAX_ENTRY_BYTES,
        )
        self.assertMalformed(body(batch_object(entries=[entry_object(data=over)])))

    def test_entries_type(self):
        for bad in ({}, None, "[]", [[]], [None], [1]):
            self.assertMalformed(body(batch_object(entries=bad)))

    def test_no_entries(self):
        self.assertEqual(parse(body(batch_object(entries=[]))).entries, ())

    def test_too_many_entries(self):
        def entries(n):
            return [entry_object(entry_id="e%d" % i) for i in range(n)]

        self.assertEqual(
            len(parse(body(batch_object(entries=entries(MAX_ENTRIES_PER_BATCH)))).entries),
            MAX_ENTRIES_PER_BATCH,
        )
        self.assertMalformed(body(batch_object(entries=entries(MAX_ENTRIES_PER_BATCH + 1))))

    def test_too_many_objects_refused_before_parsing(self):
        """
        A body with more C{{} than a full batch has objects is refused
        before the JSON parser sees it, even where the braces are inside a
        string (a valid batch has none there).
        """
        entries = [entry_object(entry_id="e%d" % i) for i in range(MAX_ENTRIES_PER_BATCH)]
        full = body(batch_object(entries=entries))
        self.assertEqual(full.count(b"{"), MAX_ENTRIES_PER_BATCH + 1)
        self.assertEqual(len(parse(full).entries), MAX_ENTRIES_PER_BATCH)
        with self.assertRaises(Malformed) as caught:
            parse(b"[" + b"{}," * (MAX_ENTRIES_PER_BATCH + 1) + b"{}]")
        self.assertEqual(caught.exception.detail, "more objects than a batch can hold")
        with self.assertRaises(Malformed) as caught:
            parse(body(batch_object(nonce="{" * (MAX_ENTRIES_PER_BATCH + 1))))
        self.assertEqual(caught.exception.detail, "more objects than a batch can hold")

    def test_same_entry_twice(self):
        """
        One (vault_id, entry_id) once per batch; the same entry id in two
        vaults is fine.
        """
        self.assertMalformed(body(batch_object(entries=[entry_object(), entry_object(version=4)])))
        other_vault = "f" * 16
        batch = parse(body(batch_object(entries=[entry_object(), entry_object(vault_id=other_vault)])))
        self.assertEqual(len(batch.entries), 2)

    def test_deep_nesting(self):
        """
        Nesting deeper than the parser goes is malformed, and the detail
        says so (not that the body is not JSON).
        """
        error = self.assertRaises(Malformed, parse, b"[" * 100_000 + b"]" * 100_000)
        self.assertEqual(error.detail, "JSON nested too deep")
        self.assertMalformed(body(batch_object()).replace(b'"entries": [', b'"entries": [' + b"[" * 100_000))

    @given(st.binary())
    def test_random_bytes(self, raw):
        """
        Whatever the bytes, parsing raises nothing but Malformed.
        """
        parse_or_malformed(raw)

    @given(batches, st.data())
    def test_mutated_bodies(self, batch, data):
        """
        A valid body with one byte replaced, inserted or removed parses or
        is Malformed; nothing else escapes.
        """
        raw = bytearray(serialise(batch))
        index = data.draw(st.integers(0, len(raw) - 1))
        byte = data.draw(st.integers(0, 255))
        action = data.draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "replace":
            raw[index] = byte
        elif action == "insert":
            raw.insert(index, byte)
        else:
            del raw[index]
        parse_or_malformed(bytes(raw))

    @settings(deadline=None)
    @given(
        st.sampled_from(sorted(batch_object())),
        st.sampled_from(sorted(entry_object())),
        json_values,
    )
    def test_any_json_in_a_field(self, key, entry_key, value):
        """
        Any JSON value in any field of the batch or of an entry parses or is
        Malformed; nothing else escapes.
        """
        parse_or_malformed(body(batch_object(**{key: value})))
        parse_or_malformed(body(batch_object(entries=[entry_object(**{entry_key: value})])))


class FixedTokens:
    """
    A token source that always answers the same TokenSet.
    """

    def __init__(self, tokens: TokenSet) -> None:
        self._tokens = tokens

    def tokens(self) -> TokenSet:
        return self._tokens


BODY = body(batch_object())


def flip(raw: bytes, index: int, mask: int = 0x01) -> bytes:
    changed = bytearray(raw)
    changed[index] ^= mask
    return bytes(changed)


class CertificateSignatureTests(SynchronousTestCase):
    def test_round_trip(self):
        for name, key in KEYS.items():
            header = CertificateSigner(key).sign(BODY)
            self.assertTrue(header.startswith(b"cert="), name)
            base64.b64decode(header[5:], validate=True)
            verify_certificate_signature(header, BODY, key.public_key())

    @given(st.sampled_from(sorted(KEYS)), st.data())
    def test_one_byte_changed(self, name, data):
        """
        Changing any one byte of the body after signing breaks the
        signature, for every key type.
        """
        key = KEYS[name]
        header = CertificateSigner(key).sign(BODY)
        index = data.draw(st.integers(0, len(BODY) - 1))
        mask = data.draw(st.integers(1, 255))
        self.assertRaises(
            AuthenticationFailed,
            verify_certificate_signature,
            header,
            flip(BODY, index, mask),
            key.public_key(),
        )

    def test_appended_byte(self):
        header = CertificateSigner(EC_KEY).sign(BODY)
        self.assertRaises(
            AuthenticationFailed,
            verify_certificate_signature,
            header,
            BODY + b" ",
            EC_KEY.public_key(),
        )

    def test_wrong_key(self):
        """
        A signature verifies only with the signer's key: not another key of
        the same type, not a key of another type.
        """
        others = {
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "ed25519": ed25519.Ed25519PrivateKey.generate(),
            "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        }
        for name, key in KEYS.items():
            header = CertificateSigner(key).sign(BODY)
            for other in others.values():
                self.assertRaises(
                    AuthenticationFailed,
                    verify_certificate_signature,
                    header,
                    BODY,
                    other.public_key(),
                )

    def test_covers_method_and_path(self):
        """
        A signature over the bare body, without method and path, does not
        verify.
        """
        header = b"cert=" + base64.b64encode(EC_KEY.sign(BODY, ec.ECDSA(hashes.SHA256())))
        self.assertRaises(
            AuthenticationFailed,
            verify_certificate_signature,
            header,
            BODY,
            EC_KEY.public_key(),
        )

    def test_schemes_pinned(self):
        """
        ECDSA must use SHA-256 and RSA must use PSS: a valid signature made
        another way is refused.
        """
        data = signing_input(BODY)
        for key, signature in (
            (EC_KEY, EC_KEY.sign(data, ec.ECDSA(hashes.SHA384()))),
            (RSA_KEY, RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())),
        ):
            self.assertRaises(
                AuthenticationFailed,
                verify_certificate_signature,
                b"cert=" + base64.b64encode(signature),
                BODY,
                key.public_key(),
            )

    def test_interoperable_schemes(self):
        """
        The signatures are plain ECDSA with SHA-256, Ed25519, and RSA-PSS
        with SHA-256, MGF1-SHA-256 and a 32-byte salt over the signing
        input, so any implementation can check them.
        """
        data = signing_input(BODY)

        def signature(key):
            return base64.b64decode(CertificateSigner(key).sign(BODY)[5:])

        EC_KEY.public_key().verify(signature(EC_KEY), data, ec.ECDSA(hashes.SHA256()))
        ED25519_KEY.public_key().verify(signature(ED25519_KEY), data)
        RSA_KEY.public_key().verify(
            signature(RSA_KEY),
            data,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
        verify_certificate_signature(
            b"cert="
            + base64.b64encode(
                RSA_KEY.sign(
                    data,
                    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                    hashes.SHA256(),
                )
            ),
            BODY,
            RSA_KEY.public_key(),
        )

    def test_missing_or_garbled_header(self):
        good = CertificateSigner(EC_KEY).sign(BODY)
        for header in (
            None,
            b"",
            b"cert=",
            b"cert=!!!!",
            b"Cert=" + good[5:],
            b"cert= " + good[5:],
            good + b"\n",
            good[:-4],
            b"hmac-sha256=" + good[5:],
            good.decode("ascii"),
        ):
            self.assertRaises(
                AuthenticationFailed,
                verify_certificate_signature,
                header,
                BODY,
                EC_KEY.public_key(),
            )

    def test_unsupported_peer_key(self):
        key = ed448.Ed448PrivateKey.generate()
        header = b"cert=" + base64.b64encode(key.sign(signing_input(BODY)))
        self.assertRaises(
            AuthenticationFailed,
            verify_certificate_signature,
            header,
            BODY,
            key.public_key(),
        )

    def test_unsupported_own_key(self):
        error = self.assertRaises(
            CertificateError, CertificateSigner, ed448.Ed448PrivateKey.generate()
        )
        self.assertTrue(error.public.startswith("auth.mtls_key: "))


class HmacSignatureTests(SynchronousTestCase):
    def setUp(self):
        self.tokens = TokenSet(TOKEN_A)
        self.header = HmacSigner(FixedTokens(self.tokens)).sign(BODY)

    def test_known_value(self):
        """
        hmac-sha256= then the lower-case hex HMAC-SHA256 of method, path and
        body, keyed with the current token.
        """
        expected = hmac.new(
            TOKEN_A, b"POST\n/api/replication/apply\n" + BODY, hashlib.sha256
        ).hexdigest()
        self.assertEqual(self.header, b"hmac-sha256=" + expected.encode("ascii"))
        verify_hmac_signature(self.header, BODY, self.tokens)

    def test_signs_with_current_token(self):
        header = HmacSigner(FixedTokens(TokenSet(TOKEN_B, TOKEN_A))).sign(BODY)
        verify_hmac_signature(header, BODY, TokenSet(TOKEN_B))
        self.assertRaises(
            AuthenticationFailed, verify_hmac_signature, header, BODY, TokenSet(TOKEN_A)
        )

    def test_previous_token_accepted(self):
        """
        During a rotation a batch signed with the previous token verifies.
        """
        verify_hmac_signature(self.header, BODY, TokenSet(TOKEN_B, TOKEN_A))

    def test_wrong_token(self):
        self.assertRaises(
            AuthenticationFailed, verify_hmac_signature, self.header, BODY, TokenSet(TOKEN_B)
        )
        self.assertRaises(
            AuthenticationFailed,
            verify_hmac_signature,
            self.header,
            BODY,
            TokenSet(TOKEN_B, generate_token()),
        )

    @given(st.data())
    def test_one_byte_changed(self, data):
        index = data.draw(st.integers(0, len(BODY) - 1))
        mask = data.draw(st.integers(1, 255))
        self.assertRaises(
            AuthenticationFailed,
            verify_hmac_signature,
            self.header,
            flip(BODY, index, mask),
            self.tokens,
        )

    def test_missing_or_garbled_header(self):
        value = self.header[len(b"hmac-sha256="):]
        for header in (
            None,
            b"",
            b"hmac-sha256=",
            b"hmac-sha256=" + value.upper(),
            b"hmac-sha256=" + value[:-1],
            self.header + b"0",
            self.header + b"\n",
            b"HMAC-SHA256=" + value,
            b"cert=" + value,
            b"hmac-sha256=" + base64.b64encode(bytes.fromhex(value.decode("ascii"))),
            self.header.decode("ascii"),
        ):
            self.assertRaises(
                AuthenticationFailed, verify_hmac_signature, header, BODY, self.tokens
            )

    def test_kinds_do_not_mix(self):
        """
        A certificate signature is no HMAC signature.
        """
        header = CertificateSigner(EC_KEY).sign(BODY)
        self.assertRaises(
            AuthenticationFailed, verify_hmac_signature, header, BODY, self.tokens
        )


class FreshnessTests(SynchronousTestCase):
    NOW = 10_000
    MAX_AGE = 300
    SKEW = 30

    def check(self, timestamp, not_before=0):
        batch = new_batch("calgary-01", "zurich-01", 1, 1, [], now=timestamp)
        check_freshness(batch, self.NOW, self.MAX_AGE, self.SKEW, not_before)

    def test_within_window(self):
        self.check(self.NOW)
        self.check(self.NOW - 1)

    def test_exact_boundaries(self):
        self.check(self.NOW - self.MAX_AGE)
        self.check(self.NOW + self.SKEW)
        self.check(self.NOW - 100, not_before=self.NOW - 100)

    def test_too_old(self):
        self.assertRaises(StaleRequest, self.check, self.NOW - self.MAX_AGE - 1)
        self.assertRaises(StaleRequest, self.check, 0)

    def test_too_far_ahead(self):
        self.assertRaises(StaleRequest, self.check, self.NOW + self.SKEW + 1)

    def test_before_process_start(self):
        """
        A request signed before the process started is refused even inside
        max_age, and without the clock skew's allowance.
        """
        self.assertRaises(
            StaleRequest, self.check, self.NOW - 101, not_before=self.NOW - 100
        )
        self.assertRaises(StaleRequest, self.check, self.NOW - 1, not_before=self.NOW)

    def test_not_a_ban(self):
        """
        Staleness is not a failed authentication.
        """
        error = self.assertRaises(StaleRequest, self.check, 0)
        self.assertFalse(error.counts_as_auth_failure)
