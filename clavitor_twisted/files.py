# -*- test-case-name: tests.test_files -*-
"""
Reading the files an operator hands us: the config file, the token file,
the private key.

The checks are made on the opened descriptor, so they are about exactly the
file that is read, whatever happens to the path meanwhile.  Errors name what
the file is (a config key, "token file"), never its path: the path and the
OS error go in the detail only.
"""

import os
import stat

from clavitor_twisted.errors import ClavitorError

# Mode bits that make a secret file readable or writable beyond its owner.
GROUP_OR_OTHERS = 0o077


def read_guarded(
    path: str,
    *,
    what: str,
    error: type[ClavitorError],
    forbidden_mode: int,
    refusal: str,
    max_bytes: int,
) -> tuple[bytes, os.stat_result]:
    """
    Read a regular file of at most C{max_bytes} whose mode has none of the
    C{forbidden_mode} bits; return its content and its C{fstat}.

    @raise error: C{"<what>: ..."} when the file cannot be opened or read,
        is not a regular file, has a forbidden mode bit (the text then ends
        in C{refusal}), or is too large.
    """
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang us.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise error(what + ": cannot be read", "cannot open {!r}: {}".format(path, e.strerror))
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise error(what + ": not a regular file", "{!r} is not a regular file".format(path))
        if status.st_mode & forbidden_mode:
            raise error(
                what + ": " + refusal,
                "{!r} has mode {:o}".format(path, stat.S_IMODE(status.st_mode)),
            )
        with os.fdopen(descriptor, "rb", closefd=False) as stream:
            content = stream.read(max_bytes + 1)
    except OSError as e:
        raise error(what + ": cannot be read", "cannot read {!r}: {}".format(path, e.strerror))
    finally:
        os.close(descriptor)
    if len(content) > max_bytes:
        raise error(
            "{}: larger than {} bytes".format(what, max_bytes),
            "{!r} is larger than {} bytes".format(path, max_bytes),
        )
    return content, status
