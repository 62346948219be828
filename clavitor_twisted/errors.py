# -*- test-case-name: tests.test_errors -*-
"""
The error types of clavitor-repl.

Every error carries two texts: C{public}, safe to show to a peer or on an
operator's terminal (it names a key or a check, never a path or a secret),
and C{detail}, which goes only to the log.  The edge (the receiver, the CLI,
the service) decides which one to show where.
"""


class ClavitorError(Exception):
    """
    Base of our errors: a public text and a private detail.
    """

    def __init__(self, public: str, detail: str = "") -> None:
        super().__init__(public)
        self.public = public
        self.detail = detail or public


class ConfigError(ClavitorError):
    """
    The configuration is wrong; C{public} names the key.
    """


class TokenError(ClavitorError):
    """
    A token file is missing, unreadable, too open or too weak.
    """


class CertificateError(ClavitorError):
    """
    A certificate, key or CA file cannot be used.
    """


class WriteRefused(ClavitorError):
    """
    An ordinary vault write was attempted where writes are not allowed (a
    backup POP, or a vault file that is a replica).
    """


class RequestRefused(ClavitorError):
    """
    The receiver refuses a replication request.

    C{status} is the HTTP status, C{public} the one word the peer sees,
    C{detail} what the audit log records.  C{counts_as_auth_failure} tells the
    ban list whether this refusal is a failed authentication.
    """

    status = 500
    word = "error"
    counts_as_auth_failure = False
    # Whole seconds after which the peer may try again (Retry-After), if known.
    retry_after: int | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(self.word, detail)


class Malformed(RequestRefused):
    status = 400
    word = "malformed"


class AuthenticationFailed(RequestRefused):
    status = 401
    word = "unauthenticated"
    counts_as_auth_failure = True


class StaleRequest(RequestRefused):
    """
    Correctly signed, but outside the time window or already seen.  Refused
    like a failed authentication, but never counted towards a ban: a partner
    with a skewed clock must not get banned.
    """

    status = 401
    word = "unauthenticated"


class Forbidden(RequestRefused):
    status = 403
    word = "forbidden"


class Conflict(RequestRefused):
    """
    A stale epoch or a request meant for another backup.
    """

    status = 409
    word = "conflict"


class MethodNotAllowed(RequestRefused):
    status = 405
    word = "method"


class UnsupportedMediaType(RequestRefused):
    status = 415
    word = "media_type"


class TooLarge(RequestRefused):
    status = 413
    word = "too_large"


class RateLimited(RequestRefused):
    status = 429
    word = "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotReady(RequestRefused):
    status = 503
    word = "unavailable"

    def __init__(self, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
