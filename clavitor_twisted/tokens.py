# -*- test-case-name: tests.test_tokens -*-
"""
The shared-secret token file of C{auth.method: bearer} (DESIGN.md rule 5).

The file holds one token per line: the current token first and, during a
rotation, the previous one second.  The line ending (C{\\n} or C{\\r\\n}) is not
part of a token and blank trailing lines are ignored.  A token is at least 32
printable ASCII bytes without spaces (it travels in an C{Authorization}
header), has at least 8 distinct bytes and is not a repeated pattern.  The
file must be a regular file that neither group nor others may read or write.

L{TokenSource} keeps the tokens in memory and picks up a changed file
without a restart; a bad new file keeps the old tokens and is logged.
Tokens are bytes, never logged, never part of an error, and only ever
compared with C{hmac.compare_digest}.
"""

import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .errors import TokenError
from .files import GROUP_OR_OTHERS, read_guarded

MIN_TOKEN_BYTES = 32
MAX_TOKEN_BYTES = 1024
MIN_DISTINCT_BYTES = 8
MAX_TOKENS = 2
MAX_TOKEN_FILE_BYTES = 4096

# How often TokenSource.tokens() looks at the file by itself, in seconds.
CHECK_INTERVAL = 1


def validate_token(token: bytes) -> None:
    """
    Refuse a token that is too short, too long, not printable ASCII, all one
    byte, made of too few distinct bytes, or a pattern repeated at least
    twice.

    @raise TokenError: naming the check that failed, never the token.
    """
    if not isinstance(token, bytes):
        raise TokenError("token: must be bytes")
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenError("token: shorter than 32 bytes")
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError("token: longer than 1024 bytes")
    if not all(0x21 <= byte <= 0x7E for byte in token):
        raise TokenError(
            "token: only printable ASCII without spaces or control characters"
        )
    distinct = len(set(token))
    if distinct == 1:
        raise TokenError("token: all one byte")
    if distinct < MIN_DISTINCT_BYTES:
        raise TokenError("token: fewer than 8 distinct bytes")
    for period in range(1, len(token) // 2 + 1):
        # Constant time, like every comparison touching a secret.
        if hmac.compare_digest(token[period:], token[:-period]):
            raise TokenError("token: a short pattern repeated")


@dataclass(frozen=True, eq=False)
class TokenSet:
    """
    The accepted tokens: the current one and, during a rotation, the previous
    one.  Both are validated on construction.  The tokens never appear in
    C{repr}, and a set has no value equality: tokens are compared only with
    C{hmac.compare_digest}.
    """

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate_token(self.current)
        if self.previous is not None:
            validate_token(self.previous)
            if hmac.compare_digest(self.current, self.previous):
                raise TokenError("tokens: the previous token is the current one")

    def all(self) -> tuple[bytes, ...]:
        """
        The current token, then the previous one if there is one.
        """
        if self.previous is None:
            return (self.current,)
        return (self.current, self.previous)


def generate_token() -> bytes:
    """
    A new token: 32 random bytes as 64 lower-case hex characters.

    A draw that fails L{validate_token} (odds far below 1 in 10**18) is
    thrown away, so every generated token is accepted by L{load_tokens}.
    """
    while True:
        token = secrets.token_hex(32).encode("ascii")
        try:
            validate_token(token)
        except TokenError:
            continue
        return token


def write_token_file(path: str, current: bytes, previous: bytes | None = None) -> None:
    """
    Write a token file atomically with mode 0600.

    The tokens go into a temporary file created with mode 0600 in the same
    directory, are synced to disk and then renamed over C{path}, so a reader
    sees the old file or the new one, never a partial or an open one.

    @raise TokenError: if a token is not acceptable or the file cannot be
        written.
    """
    tokens = TokenSet(current, previous)
    content = b"".join(token + b"\n" for token in tokens.all())
    directory = os.path.dirname(os.path.abspath(path))
    try:
        # mkstemp creates the file with O_EXCL and mode 0600.
        descriptor, temporary = tempfile.mkstemp(prefix=".token-", dir=directory)
    except OSError as error:
        raise TokenError(
            "token file: cannot be written",
            "cannot create a temporary file in {!r}: {}".format(directory, error.strerror),
        )
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise TokenError(
            "token file: cannot be written",
            "cannot write {!r}: {}".format(path, error.strerror),
        )
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """
    Make a rename in C{directory} durable; where a directory cannot be
    opened for syncing the rename stands without it.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _stamp(status: os.stat_result) -> tuple[int, ...]:
    """
    What identifies one version of a file.  Replacing the file (as
    L{write_token_file} does) or chmodding it always changes the stamp; an
    in-place rewrite to the same size within one file-timestamp tick may
    not, and is then picked up at the next change.
    """
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
        status.st_mode,
    )


def _read(path: str) -> tuple[TokenSet, tuple[int, ...]]:
    """
    Read and check a token file; return its tokens and the stamp of exactly
    the file that was read.
    """
    content, status = read_guarded(
        path,
        what="token file",
        error=TokenError,
        forbidden_mode=GROUP_OR_OTHERS,
        refusal="readable or writable by group or others (use mode 0600)",
        max_bytes=MAX_TOKEN_FILE_BYTES,
    )
    try:
        return _parse(content), _stamp(status)
    except TokenError as error:
        raise TokenError(error.public, "token file {!r}: {}".format(path, error.public))


def _parse(content: bytes) -> TokenSet:
    """
    The tokens of a token file's content.
    """
    lines = content.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise TokenError("token file: empty")
    if len(lines) > MAX_TOKENS:
        raise TokenError("token file: more than 2 tokens")
    if b"" in lines:
        raise TokenError("token file: blank line before a token")
    return TokenSet(*lines)


def load_tokens(path: str) -> TokenSet:
    """
    Read and check the token file at C{path}.

    @raise TokenError: on any problem; the public text names neither the
        path nor a token (the path is in C{detail}).
    """
    tokens, _ = _read(path)
    return tokens


class TokenSource:
    """
    The tokens of one token file, reloaded when the file changes.

    The file is loaded at construction (L{TokenError} if it is bad).
    L{refresh} stats the file and reloads it when its inode, size, mtime,
    ctime or mode changed; a bad new file keeps the old tokens and logs an
    error (once per change of the file).  L{tokens} calls L{refresh} by
    itself at most once every L{CHECK_INTERVAL} seconds of C{clock}, so a
    rotated file is picked up without anyone scheduling reloads.

    @ivar loaded_at: C{clock.seconds()} when the current tokens were loaded.
    """

    def __init__(self, path: str, clock: IReactorTime, log: Logger | None = None) -> None:
        self._path = path
        self._clock = clock
        self._log = log if log is not None else Logger()
        self._tokens, self._stamp = _read(path)
        self.loaded_at = clock.seconds()
        self._checked_at = self.loaded_at

    def tokens(self) -> TokenSet:
        """
        The current token set, after looking at the file if it has not been
        looked at for L{CHECK_INTERVAL} seconds.
        """
        if self._clock.seconds() - self._checked_at >= CHECK_INTERVAL:
            self.refresh()
        return self._tokens

    def refresh(self) -> None:
        """
        Stat the file now and reload it if it changed.
        """
        self._checked_at = self._clock.seconds()
        try:
            stamp = _stamp(os.stat(self._path))
        except OSError as error:
            self._keep_old(
                TokenError(
                    "token file: cannot be read",
                    "cannot stat token file {!r}: {}".format(self._path, error.strerror),
                ),
                ("unreadable", error.errno),
            )
            return
        if stamp == self._stamp:
            return
        try:
            tokens, stamp = _read(self._path)
        except TokenError as error:
            self._keep_old(error, stamp)
            return
        self._tokens, self._stamp = tokens, stamp
        self.loaded_at = self._checked_at
        self._log.info("token file reloaded: {count} token(s)", count=len(tokens.all()))

    def _keep_old(self, error: TokenError, stamp: tuple) -> None:
        """
        Keep the tokens after a failed reload, logging it once per version of
        the file (C{stamp}) so a bad file does not flood the log.
        """
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._log.error(
            "token file reload failed, keeping the previous tokens: {reason}",
            reason=error.public,
            detail=error.detail,
        )
