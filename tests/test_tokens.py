"""
Tests for L{clavitor_twisted.tokens}.
"""

import os
import stat
import string

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.errors import TokenError
from clavitor_twisted.tokens import (
    CHECK_INTERVAL,
    TokenSet,
    TokenSource,
    generate_token,
    load_tokens,
    validate_token,
    write_token_file,
)

# 32 printable bytes, all distinct: the shortest acceptable token.
TOKEN_32 = b"0123456789abcdefghijklmnopqrstuv"
TOKEN_A = b"4f1c8a0e9b7d2f3a6c5e8d1b0a9f7e6c5d4b3a2f1e0d9c8b7a6f5e4d3c2b1a09"
TOKEN_B = b"b7e2d91c0a4f6e8d3b5a7c9e1f0d2b4a6c8e0f1d3b5a7c9e2f4d6b8a0c1e3f5d"
TOKEN_C = b"Zq8Xv2Lm9Np4Rt7Wk3Hs6Jd1Fg5Bc0Ay-Ue_Io.Op~Kl!Mn"


class ValidateTokenTests(SynchronousTestCase):
    def test_32_bytes_accepted(self) -> None:
        """
        A 32-byte token with enough variety is accepted.
        """
        self.assertIsNone(validate_token(TOKEN_32))

    def test_31_bytes_refused(self) -> None:
        """
        One byte short of 32 is refused.
        """
        error = self.assertRaises(TokenError, validate_token, TOKEN_32[:31])
        self.assertEqual(error.public, "token: shorter than 32 bytes")

    @settings(deadline=None)
    @given(st.binary(max_size=31))
    def test_any_short_token_refused(self, token: bytes) -> None:
        """
        Whatever its content, a token under 32 bytes is refused.
        """
        self.assertRaises(TokenError, validate_token, token)

    def test_all_same_byte_refused(self) -> None:
        """
        A token of one repeated byte is refused.
        """
        error = self.assertRaises(TokenError, validate_token, b"a" * 64)
        self.assertEqual(error.public, "token: all one byte")

    def test_repeated_pattern_refused(self) -> None:
        """
        A short pattern repeated, even with 8 distinct bytes, is refused.
        """
        error = self.assertRaises(TokenError, validate_token, b"abcdefgh" * 4)
        self.assertEqual(error.public, "token: a short pattern repeated")

    def test_pasted_twice_refused(self) -> None:
        """
        A token written twice in a row is a pattern too.
        """
        self.assertRaises(TokenError, validate_token, TOKEN_32 + TOKEN_32)

    @settings(deadline=None)
    @given(
        st.lists(st.integers(0x21, 0x7E), min_size=1, max_size=8).map(bytes),
        st.integers(min_value=0, max_value=100),
    )
    def test_any_short_period_refused(self, pattern: bytes, extra: int) -> None:
        """
        Any pattern of at most 8 bytes repeated to 32 bytes or more, even
        cut off mid-pattern, is refused.
        """
        length = 32 + extra
        token = (pattern * (length // len(pattern) + 1))[:length]
        self.assertRaises(TokenError, validate_token, token)

    def test_few_distinct_bytes_refused(self) -> None:
        """
        Fewer than 8 distinct bytes is too little variety for a secret.
        """
        error = self.assertRaises(TokenError, validate_token, b"abcdefg" + b"a" * 30)
        self.assertEqual(error.public, "token: fewer than 8 distinct bytes")

    def test_space_or_control_refused(self) -> None:
        """
        A token travels in an HTTP header: spaces, control characters and
        non-ASCII bytes are refused.
        """
        for bad in (b" ", b"\r", b"\t", b"\x00", b"\x7f", b"\xc3\xa9"):
            self.assertRaises(TokenError, validate_token, TOKEN_A[:40] + bad + TOKEN_A[40:])

    def test_too_long_refused(self) -> None:
        """
        A token longer than 1024 bytes is refused.
        """
        self.assertRaises(TokenError, validate_token, (TOKEN_A + TOKEN_B) * 9)

    def test_not_bytes_refused(self) -> None:
        """
        A token is bytes, not text.
        """
        self.assertRaises(TokenError, validate_token, TOKEN_A.decode("ascii"))

    def test_error_never_contains_token(self) -> None:
        """
        The refusal names the check, not the token.
        """
        token = b"abcdefgh" * 4
        error = self.assertRaises(TokenError, validate_token, token)
        self.assertNotIn("abcdefgh", error.public)
        self.assertNotIn("abcdefgh", error.detail)


class GenerateTokenTests(SynchronousTestCase):
    def test_format(self) -> None:
        """
        A generated token is 64 lower-case hex characters.
        """
        token = generate_token()
        self.assertIsInstance(token, bytes)
        self.assertEqual(len(token), 64)
        self.assertTrue(set(token) <= set(string.hexdigits.lower().encode("ascii")))

    def test_generated_tokens_pass_validation(self) -> None:
        """
        Generated tokens are accepted, a thousand out of a thousand.
        """
        for _ in range(1000):
            self.assertIsNone(validate_token(generate_token()))

    def test_distinct(self) -> None:
        """
        Tokens are random: a hundred are a hundred different ones.
        """
        self.assertEqual(len({generate_token() for _ in range(100)}), 100)


class TokenSetTests(SynchronousTestCase):
    def test_all(self) -> None:
        """
        C{all()} is the current token, then the previous one if any.
        """
        self.assertEqual(TokenSet(TOKEN_A).all(), (TOKEN_A,))
        self.assertEqual(TokenSet(TOKEN_A, TOKEN_B).all(), (TOKEN_A, TOKEN_B))

    def test_repr_hides_tokens(self) -> None:
        """
        The repr of a set shows no token.
        """
        text = repr(TokenSet(TOKEN_A, TOKEN_B))
        self.assertNotIn(TOKEN_A.decode("ascii"), text)
        self.assertNotIn(TOKEN_B.decode("ascii"), text)

    def test_validated(self) -> None:
        """
        A set cannot hold a weak token, current or previous.
        """
        self.assertRaises(TokenError, TokenSet, b"a" * 64)
        self.assertRaises(TokenError, TokenSet, TOKEN_A, b"short")

    def test_previous_same_as_current_refused(self) -> None:
        """
        The previous token must differ from the current one.
        """
        self.assertRaises(TokenError, TokenSet, TOKEN_A, TOKEN_A)

    def test_frozen(self) -> None:
        """
        A set cannot be changed.
        """
        tokens = TokenSet(TOKEN_A)
        self.assertRaises(AttributeError, setattr, tokens, "current", TOKEN_B)


def write_raw(path: str, content: bytes, mode: int = 0o600) -> None:
    """
    Put C{content} at C{path} with C{mode}, replacing any file there (so the
    new file always has a new inode, as a real rotation would).
    """
    temporary = path + ".new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(content)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


class LoadTokensTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "hidden-place.token")

    def load(self, content: bytes, mode: int = 0o600) -> TokenSet:
        write_raw(self.path, content, mode)
        return load_tokens(self.path)

    def refused(self, content: bytes, mode: int = 0o600) -> TokenError:
        write_raw(self.path, content, mode)
        error = self.assertRaises(TokenError, load_tokens, self.path)
        self.assertNotIn(self.directory, error.public)
        self.assertNotIn("hidden-place", error.public)
        for token in (TOKEN_A, TOKEN_B, TOKEN_C):
            self.assertNotIn(token.decode("ascii"), error.public)
            self.assertNotIn(token.decode("ascii"), error.detail)
        return error

    def test_trailing_newline_stripped(self) -> None:
        """
        The line ending is not part of the token.
        """
        tokens = self.load(TOKEN_A + b"\n")
        self.assertEqual(tokens.current, TOKEN_A)
        self.assertIsNone(tokens.previous)

    def test_crlf_stripped(self) -> None:
        """
        A Windows line ending is not part of the token either.
        """
        tokens = self.load(TOKEN_A + b"\r\n" + TOKEN_B + b"\r\n")
        self.assertEqual(tokens.all(), (TOKEN_A, TOKEN_B))

    def test_no_final_newline(self) -> None:
        """
        A file without a final newline is read the same.
        """
        self.assertEqual(self.load(TOKEN_A).current, TOKEN_A)

    def test_previous_token(self) -> None:
        """
        The second line is the previous token, accepted during a rotation.
        """
        tokens = self.load(TOKEN_A + b"\n" + TOKEN_B + b"\n")
        self.assertEqual(tokens.current, TOKEN_A)
        self.assertEqual(tokens.previous, TOKEN_B)

    def test_blank_trailing_lines_ignored(self) -> None:
        """
        Blank lines at the end are ignored.
        """
        tokens = self.load(TOKEN_A + b"\n" + TOKEN_B + b"\n\n\r\n\n")
        self.assertEqual(tokens.all(), (TOKEN_A, TOKEN_B))

    def test_31_byte_token_refused(self) -> None:
        """
        A 31-byte token (32 with its newline) is refused.
        """
        error = self.refused(TOKEN_32[:31] + b"\n")
        self.assertEqual(error.public, "token: shorter than 32 bytes")
        self.assertIn(self.path, error.detail)

    def test_32_byte_token_accepted(self) -> None:
        """
        Exactly 32 bytes are enough.
        """
        self.assertEqual(self.load(TOKEN_32 + b"\n").current, TOKEN_32)

    def test_all_same_byte_refused(self) -> None:
        self.assertEqual(self.refused(b"0" * 64 + b"\n").public, "token: all one byte")

    def test_repeated_pattern_refused(self) -> None:
        self.refused(b"01234567" * 8 + b"\n")

    def test_weak_previous_refused(self) -> None:
        """
        The previous token is held to the same rules.
        """
        self.refused(TOKEN_A + b"\n" + b"x" * 40 + b"\n")

    def test_empty_file_refused(self) -> None:
        self.assertEqual(self.refused(b"").public, "token file: empty")

    def test_only_newlines_refused(self) -> None:
        self.assertEqual(self.refused(b"\n\r\n\n").public, "token file: empty")

    def test_three_tokens_refused(self) -> None:
        """
        More than two tokens is refused.
        """
        error = self.refused(b"\n".join((TOKEN_A, TOKEN_B, TOKEN_C)) + b"\n")
        self.assertEqual(error.public, "token file: more than 2 tokens")

    def test_blank_line_between_refused(self) -> None:
        """
        A blank first line does not make the second line the current token.
        """
        self.refused(b"\n" + TOKEN_A + b"\n")

    def test_spaces_around_token_refused(self) -> None:
        """
        Only the line ending is stripped; other whitespace makes the token
        invalid rather than being silently dropped.
        """
        self.refused(TOKEN_A + b" \n")

    def test_group_readable_refused(self) -> None:
        """
        A file that its group may read is refused.
        """
        error = self.refused(TOKEN_A + b"\n", mode=0o640)
        self.assertIn("group or others", error.public)

    def test_open_modes_refused(self) -> None:
        """
        Any access for group or others is refused.
        """
        for mode in (0o604, 0o620, 0o602, 0o610, 0o601, 0o644, 0o666):
            self.refused(TOKEN_A + b"\n", mode=mode)

    def test_read_only_owner_accepted(self) -> None:
        """
        Mode 0400 is fine.
        """
        self.assertEqual(self.load(TOKEN_A + b"\n", mode=0o400).current, TOKEN_A)

    def test_missing_file_refused(self) -> None:
        """
        A missing file is refused; the public text has neither the path nor
        the OS error, the detail has the path.
        """
        error = self.assertRaises(TokenError, load_tokens, self.path)
        self.assertEqual(error.public, "token file: cannot be read")
        self.assertIn(self.path, error.detail)

    def test_directory_refused(self) -> None:
        error = self.assertRaises(TokenError, load_tokens, self.directory)
        self.assertEqual(error.public, "token file: not a regular file")

    def test_fifo_refused(self) -> None:
        """
        A named pipe is refused without blocking on it.
        """
        os.mkfifo(self.path, 0o600)
        error = self.assertRaises(TokenError, load_tokens, self.path)
        self.assertEqual(error.public, "token file: not a regular file")

    def test_large_file_refused(self) -> None:
        self.refused(TOKEN_A + b"\n" * 5000)


class WriteTokenFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "replication.token")

    def test_round_trip(self) -> None:
        """
        What is written is what is loaded.
        """
        write_token_file(self.path, TOKEN_A, TOKEN_B)
        self.assertEqual(load_tokens(self.path).all(), (TOKEN_A, TOKEN_B))
        with open(self.path, "rb") as stream:
            self.assertEqual(stream.read(), TOKEN_A + b"\n" + TOKEN_B + b"\n")

    def test_mode_0600_whatever_the_umask(self) -> None:
        """
        The file has mode 0600 even under a umask of 0.
        """
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        write_token_file(self.path, TOKEN_A)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_replaces_atomically(self) -> None:
        """
        An existing file is replaced by a new one (a new inode, so a reader
        holding the old file keeps reading the old tokens) and no temporary
        file is left behind.
        """
        write_token_file(self.path, TOKEN_A)
        before = os.stat(self.path).st_ino
        write_token_file(self.path, TOKEN_B, TOKEN_A)
        self.assertNotEqual(os.stat(self.path).st_ino, before)
        self.assertEqual(load_tokens(self.path).all(), (TOKEN_B, TOKEN_A))
        self.assertEqual(os.listdir(self.directory), ["replication.token"])

    def test_weak_token_not_written(self) -> None:
        """
        A weak token is refused before anything touches the disk.
        """
        write_token_file(self.path, TOKEN_A)
        self.assertRaises(TokenError, write_token_file, self.path, b"a" * 64)
        self.assertEqual(load_tokens(self.path).current, TOKEN_A)
        self.assertEqual(os.listdir(self.directory), ["replication.token"])

    def test_missing_directory(self) -> None:
        """
        A directory that does not exist gives a L{TokenError} without the
        path in public.
        """
        path = os.path.join(self.directory, "nowhere", "replication.token")
        error = self.assertRaises(TokenError, write_token_file, path, TOKEN_A)
        self.assertNotIn(self.directory, error.public)


class TokenSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "replication.token")
        self.clock = Clock()
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)
        write_token_file(self.path, TOKEN_A)
        self.source = TokenSource(self.path, self.clock, self.log)

    def errors(self) -> list[dict]:
        return [e for e in self.events if e["log_level"] == LogLevel.error]

    def assertNoTokenLogged(self) -> None:
        for event in self.events:
            text = repr(event) + formatEvent(event)
            for token in (TOKEN_A, TOKEN_B, TOKEN_C):
                self.assertNotIn(token.decode("ascii"), text)

    def test_loads_at_once(self) -> None:
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        self.assertEqual(self.source.loaded_at, 0)

    def test_bad_file_at_start(self) -> None:
        """
        A bad file at construction is a L{TokenError}.
        """
        write_raw(self.path, b"weak\n")
        self.assertRaises(TokenError, TokenSource, self.path, self.clock, self.log)

    def test_refresh_picks_up_rotation(self) -> None:
        """
        A rotated file (new current, old as previous) is loaded by
        L{TokenSource.refresh}.
        """
        self.clock.advance(30)
        write_token_file(self.path, TOKEN_B, TOKEN_A)
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_B, TOKEN_A))
        self.assertEqual(self.source.loaded_at, 30)
        self.assertEqual(self.errors(), [])
        self.assertNoTokenLogged()

    def test_unchanged_file_not_reloaded(self) -> None:
        """
        Refreshing an unchanged file keeps the same set and logs nothing.
        """
        before = self.source.tokens()
        self.source.refresh()
        self.assertIs(self.source.tokens(), before)
        self.assertEqual(self.events, [])

    def test_bad_new_file_keeps_old_tokens(self) -> None:
        """
        A bad new file is logged as an error (without a token or the path
        in the format) and the old tokens stay.
        """
        write_raw(self.path, TOKEN_B[:31] + b"\n")
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        [error] = self.errors()
        self.assertEqual(error["reason"], "token: shorter than 32 bytes")
        self.assertNotIn(self.directory, error["log_format"])
        self.assertNoTokenLogged()

    def test_bad_file_logged_once(self) -> None:
        """
        The same bad file is reported once, not on every refresh.
        """
        write_raw(self.path, b"")
        self.source.refresh()
        self.source.refresh()
        self.assertEqual(len(self.errors()), 1)

    def test_fixed_file_after_bad_one(self) -> None:
        """
        After a bad file, a good one is loaded again.
        """
        write_raw(self.path, b"a" * 64 + b"\n")
        self.source.refresh()
        write_token_file(self.path, TOKEN_C, TOKEN_A)
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_C, TOKEN_A))

    def test_opened_mode_keeps_old_tokens(self) -> None:
        """
        A chmod that opens the file to the group is noticed and refused.
        """
        os.chmod(self.path, 0o640)
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        self.assertEqual(len(self.errors()), 1)

    def test_removed_file_keeps_old_tokens(self) -> None:
        """
        A removed file keeps the old tokens and is logged once.
        """
        os.unlink(self.path)
        self.source.refresh()
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        self.assertEqual(len(self.errors()), 1)
        write_token_file(self.path, TOKEN_B)
        self.source.refresh()
        self.assertEqual(self.source.tokens().all(), (TOKEN_B,))

    def test_tokens_checks_the_file_by_itself(self) -> None:
        """
        L{TokenSource.tokens} looks at the file once L{CHECK_INTERVAL}
        seconds have passed, and not before.
        """
        write_token_file(self.path, TOKEN_B, TOKEN_A)
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        self.clock.advance(CHECK_INTERVAL - 0.5)
        self.assertEqual(self.source.tokens().all(), (TOKEN_A,))
        self.clock.advance(0.5)
        self.assertEqual(self.source.tokens().all(), (TOKEN_B, TOKEN_A))
        self.assertEqual(self.source.loaded_at, CHECK_INTERVAL)
