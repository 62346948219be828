# -*- test-case-name: tests.test_guard -*-
"""
The backup's defences as small clock-driven objects, with no HTTP in them.

L{NonceCache} refuses a replayed request: it remembers every nonce for as
long as a request carrying it could still pass the freshness check, and no
longer, so its memory is bounded by the traffic of one time window.
L{RateLimiter} caps the requests of one key (a peer address or a POP) per
minute, and L{BanList} refuses a key for a while after repeated failed
authentications (DESIGN.md rule 10).  L{BodyBudget} bounds the request
bodies held in memory at once, across all requests, and
L{ConnectionLimit} the connections open at once from one peer address,
and L{OpenConnections} those of all addresses together.
L{RefusalDigest} keeps a flood of refused connections from writing one
audit line each.

Each holds at most C{capacity} keys and forgets what no longer matters on
its own, lazily, on the next call.  When full, none of them evicts state
that protects the backup (a nonce, a drained bucket, a ban): evicting it is
what a flood of new keys would be sent to achieve.
"""

import heapq
from collections import OrderedDict, deque
from typing import Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from clavitor_twisted.errors import Forbidden, NotReady, RateLimited, StaleRequest

# The rate limiter counts time in whole microseconds and a token as
# _TOKEN units, so that a bucket gains exactly per_minute units per
# microsecond: all its arithmetic is on integers, without drift.
_MICROSECONDS = 1_000_000
_TOKEN = 60 * _MICROSECONDS


class NonceCache:
    """
    The nonces seen inside the replay window.

    A nonce signed at C{timestamp} is kept until C{timestamp + max_age +
    clock_skew} (the last moment the freshness check could accept it, with
    the skew as margin) and then forgotten.  Expiry is lazy: each call first
    drops what has run out, in timestamp order, from a heap.  When the cache
    holds C{capacity} nonces it refuses new ones rather than evicting any: an
    evicted nonce could be replayed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_age: int,
        clock_skew: int,
        capacity: int = 100_000,
    ) -> None:
        self._clock = clock
        self._max_age = max_age
        self._clock_skew = clock_skew
        self._capacity = capacity
        self._expiries: list[tuple[int, str]] = []
        self._nonces: set[str] = set()

    def __len__(self) -> int:
        self._expire()
        return len(self._nonces)

    def check_and_record(self, nonce: str, timestamp: int) -> None:
        """
        Record C{nonce}, signed at C{timestamp} (Unix seconds).

        @raise StaleRequest: the nonce was seen inside the window, or
            C{timestamp} lies outside the window this cache can remember
            (the caller checks freshness first; this keeps the cache sound
            and its memory bounded on its own).
        @raise NotReady: the cache is full.
        """
        now = self._expire()
        expiry = timestamp + self._max_age + self._clock_skew
        if expiry < now or timestamp > now + self._clock_skew:
            raise StaleRequest("nonce timestamp outside the replay window")
        if nonce in self._nonces:
            raise StaleRequest("nonce already seen")
        if len(self._nonces) >= self._capacity:
            raise NotReady("nonce cache full")
        self._nonces.add(nonce)
        heapq.heappush(self._expiries, (expiry, nonce))

    def _expire(self) -> float:
        """
        Forget the nonces whose window has passed; return the current time.
        """
        now = self._clock.seconds()
        while self._expiries and self._expiries[0][0] < now:
            _, nonce = heapq.heappop(self._expiries)
            self._nonces.remove(nonce)
        return now


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class _Bucket:
    """
    The state of one key of a L{RateLimiter}: its level (in token units) at
    time C{at} (in microseconds).
    """

    __slots__ = ("level", "at")

    def __init__(self, level: int, at: int) -> None:
        self.level = level
        self.at = at


class RateLimiter:
    """
    A token bucket per key: C{per_minute} tokens at most, refilled at
    C{per_minute} a minute; each request takes one.

    A bucket that is full again is the same as no bucket, so it is
    forgotten.  A heap holds one entry per tracked key, no later than the
    moment its bucket is full; as that moment passes, the key is dropped or,
    if it took tokens since, pushed back with its new moment (so the work is
    a heap operation per token taken, never a scan).  Every key
    therefore goes within a minute of its last request, and a full limiter
    refuses a new key rather than forget a drained bucket.
    """

    def __init__(
        self, clock: IReactorTime, per_minute: int, capacity: int = 10_000
    ) -> None:
        if per_minute < 1 or capacity < 1:
            raise ValueError("per_minute and capacity must be at least 1")
        self._clock = clock
        self._per_minute = per_minute
        self._size = per_minute * _TOKEN
        self._capacity = capacity
        self._buckets: dict[str, _Bucket] = {}
        self._full_at: list[tuple[int, str]] = []

    def __len__(self) -> int:
        self._expire(self._now())
        return len(self._buckets)

    def check(self, key: str) -> None:
        """
        Take one token from C{key}'s bucket.

        @raise RateLimited: the bucket is empty, or the limiter already
            tracks C{capacity} keys and C{key} is not one of them;
            C{retry_after} is the whole number of seconds (at least 1)
            until a token, or a place, is free.
        """
        now = self._now()
        self._expire(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._capacity:
                raise RateLimited(
                    "rate limiter full", self._seconds(self._earliest_full() - now)
                )
            bucket = self._buckets[key] = _Bucket(self._size, now)
            heapq.heappush(self._full_at, (now, key))
        self._refill(bucket, now)
        if bucket.level < _TOKEN:
            wait = _ceil_div(_TOKEN - bucket.level, self._per_minute)
            raise RateLimited("rate limit reached by " + key, self._seconds(wait))
        bucket.level -= _TOKEN

    def _now(self) -> int:
        return round(self._clock.seconds() * _MICROSECONDS)

    @staticmethod
    def _seconds(microseconds: int) -> int:
        return max(1, _ceil_div(microseconds, _MICROSECONDS))

    def _refill(self, bucket: _Bucket, now: int) -> None:
        # A clock that steps back grants nothing and restarts from there.
        elapsed = max(0, now - bucket.at)
        bucket.level = min(self._size, bucket.level + elapsed * self._per_minute)
        bucket.at = now

    def _full_moment(self, bucket: _Bucket) -> int:
        return bucket.at + _ceil_div(self._size - bucket.level, self._per_minute)

    def _earliest_full(self) -> int:
        """
        The first moment a tracked bucket will be full.

        The heap may hold moments that are too early (a key took tokens
        after it was pushed); correct them from the top until the top is
        exact, and so the earliest.
        """
        while True:
            moment, key = self._full_at[0]
            actual = self._full_moment(self._buckets[key])
            if actual == moment:
                return moment
            heapq.heapreplace(self._full_at, (actual, key))

    def _expire(self, now: int) -> None:
        """
        Forget the keys whose bucket is full at C{now}.
        """
        while self._full_at and self._full_at[0][0] <= now:
            _, key = heapq.heappop(self._full_at)
            bucket = self._buckets[key]
            self._refill(bucket, now)
            if bucket.level == self._size:
                del self._buckets[key]
            else:
                heapq.heappush(self._full_at, (self._full_moment(bucket), key))


class BanList:
    """
    Keys refused for C{duration} seconds after C{threshold} failed
    authentications within C{duration} seconds.

    A ban lifts by itself; a failure during a ban neither extends it nor
    counts towards the next one, and a success clears the failures but never
    lifts a ban.  Expired bans and failures are dropped lazily, oldest
    first.

    At most C{capacity} keys are tracked, bans and failure records together.
    When full, a failure of a new key drops the failure record of the key
    that failed least recently: refusing to count the new key would let a
    flood of keys make every later key unbannable, while the dropped record
    held fewer than C{threshold} failures of a key that has gone quiet.  A
    ban is never dropped early, because that is what the flood would be
    for; if every tracked key is banned, the new failure goes uncounted
    (the credential check still refuses the request) and memory stays
    bounded.
    """

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int,
        duration: int,
        capacity: int = 10_000,
    ) -> None:
        if threshold < 1 or duration < 1 or capacity < 1:
            raise ValueError("threshold, duration and capacity must be at least 1")
        self._clock = clock
        self._threshold = threshold
        self._duration = duration
        self._capacity = capacity
        # key -> end of its ban, in the order the bans started.
        self._bans: OrderedDict[str, float] = OrderedDict()
        # key -> times of its recent failures, least recently failed first.
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._bans) + len(self._failures)

    @property
    def active(self) -> int:
        """
        The bans in force.
        """
        now = self._expire()
        return sum(1 for end in self._bans.values() if now < end)

    def check(self, key: str) -> None:
        """
        @raise Forbidden: C{key} is banned.
        """
        if self.banned(key):
            raise Forbidden("banned: " + key)

    def banned(self, key: str) -> bool:
        now = self._expire()
        end = self._bans.get(key)
        return end is not None and now < end

    def record_failure(self, key: str) -> bool:
        """
        Count one failed authentication of C{key}.

        @return: C{True} if this failure starts a ban of C{key}.
        """
        now = self._expire()
        end = self._bans.get(key)
        if end is not None:
            if now < end:
                return False
            del self._bans[key]
        failures = self._failures.get(key)
        if failures is None:
            if len(self._bans) + len(self._failures) >= self._capacity:
                if not self._failures:
                    return False
                self._failures.popitem(last=False)
            failures = self._failures[key] = deque(maxlen=self._threshold)
        while failures and failures[0] + self._duration <= now:
            failures.popleft()
        failures.append(now)
        self._failures.move_to_end(key)
        if len(failures) < self._threshold:
            return False
        del self._failures[key]
        self._bans[key] = now + self._duration
        return True

    def record_success(self, key: str) -> None:
        """
        Forget C{key}'s failures (not its ban, if it has one).
        """
        self._failures.pop(key, None)

    def _expire(self) -> float:
        """
        Drop the bans that have ended and the failure records whose last
        failure no longer counts; return the current time.

        Both are in time order unless the clock stepped back; then an entry
        stays a little longer than it needs, and every reader compares the
        times itself.
        """
        now = self._clock.seconds()
        while self._bans and next(iter(self._bans.values())) <= now:
            self._bans.popitem(last=False)
        while self._failures:
            last = self._failures[next(iter(self._failures))][-1]
            if last + self._duration > now:
                break
            self._failures.popitem(last=False)
        return now


class BodyBudget:
    """
    The bytes of request bodies that may be held in memory at once, all
    requests together: each request reserves what it will hold before it
    holds it, and releases it when done, so that many requests each within
    C{max_request_bytes} cannot add up to more than C{limit}.  No one key
    (a POP, or a peer address) may hold more than C{share} of it, so one
    partner stalling its requests cannot starve the others.
    """

    def __init__(self, limit: int, share: int | None = None) -> None:
        if limit < 1 or (share is not None and not 1 <= share <= limit):
            raise ValueError("limit must be at least 1, share between 1 and limit")
        self.limit = limit
        self.share = limit if share is None else share
        self.in_use = 0
        self._held: dict[str, int] = {}

    def reserve(self, size: int, key: str) -> None:
        """
        @raise NotReady: C{size} more bytes would exceed the budget, or the
            share of C{key}.
        """
        held = self._held.get(key, 0)
        if self.in_use + size > self.limit or held + size > self.share:
            # Every held body ends within the request deadline; a second is
            # a fair first guess, and keeps the sender off its long ladder.
            raise NotReady(
                "body budget exhausted (all requests, or those of %s)" % (key,),
                retry_after=1,
            )
        self.in_use += size
        self._held[key] = held + size

    def release(self, size: int, key: str) -> None:
        held = self._held.get(key, 0)
        if not 0 <= size <= held:
            raise ValueError("released more than was reserved")
        self.in_use -= size
        if held == size:
            self._held.pop(key, None)
        else:
            self._held[key] = held - size


class OpenConnections:
    """
    All connections open at once, at most C{limit}: the file descriptors
    of the process are finite, and a flood from many addresses must not
    take the ones its vaults and its partners need.  When full, a new
    connection takes the place of the oldest one that has not proven it
    comes from a partner yet (see L{proven}): a partner's request proves
    it within moments of connecting, a flood's never does.  When every
    open connection is proven, the new one is refused.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: set[Hashable] = set()
        # The open connections not proven yet, oldest first.
        self._unproven: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, connection: Hashable) -> tuple[bool, Hashable | None]:
        """
        Count C{connection}: whether it is admitted, and the unproven
        connection it displaces (to be closed by the caller), if any.
        """
        displaced = None
        if len(self._open) >= self.limit:
            if not self._unproven:
                return False, None
            displaced, _ = self._unproven.popitem(last=False)
            self._open.discard(displaced)
        self._open.add(connection)
        self._unproven[connection] = None
        return True, displaced

    def proven(self, connection: Hashable) -> None:
        """
        C{connection} comes from a partner (an authorised certificate, a
        request with the right token): it keeps its place.
        """
        self._unproven.pop(connection, None)

    def close(self, connection: Hashable) -> None:
        self._open.discard(connection)
        self._unproven.pop(connection, None)


class RefusalDigest:
    """
    Refusals of one kind that come as fast as a peer can connect (too
    many connections, connecting too often, a failed TLS handshake): per
    key, the first in a window is told at once, and the ones after it are
    counted and told as one count when the window ends.  A flood costs two
    audit lines a window per key, not one per connection.

    At most C{capacity} keys are tracked; the refusals of any key beyond
    are counted under L{OVERFLOW}, so memory stays bounded.
    """

    OVERFLOW = "*"

    def __init__(
        self,
        clock: IReactorTime,
        window: int,
        tell_count: Callable[[str, int, str], None],
        capacity: int = 10_000,
    ) -> None:
        if window < 1 or capacity < 1:
            raise ValueError("window and capacity must be at least 1")
        self._clock = clock
        self._window = window
        self._tell_count = tell_count
        self._capacity = capacity
        self._counts: dict[str, int] = {}
        # The detail of the last refusal counted, per key.
        self._last: dict[str, str] = {}
        self._flushes: dict[str, IDelayedCall] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def refused(self, key: str, detail: str) -> bool:
        """
        Count one refusal of C{key}: C{True} if it is the first of its
        window and is to be told now.  The count is told with the C{detail}
        of the last refusal counted.
        """
        if key not in self._counts and len(self._counts) >= self._capacity:
            key = self.OVERFLOW
        if key in self._counts:
            self._counts[key] += 1
            self._last[key] = detail
            return False
        # The first refusal of an overflow window is not told alone.
        told = key != self.OVERFLOW
        self._counts[key] = 0 if told else 1
        if not told:
            self._last[key] = detail
        self._flushes[key] = self._clock.callLater(self._window, self._flush, key)
        return told

    def _flush(self, key: str) -> None:
        del self._flushes[key]
        count = self._counts.pop(key)
        last = self._last.pop(key, "")
        if count:
            self._tell_count(key, count, last)

    def stop(self) -> None:
        """
        Tell every count now and cancel the windows (the site is going).
        """
        for key in list(self._flushes):
            self._flushes[key].cancel()
            self._flush(key)


class ConnectionLimit:
    """
    At most C{limit} connections open at once per key (a peer address).
    Only keys with an open connection are tracked, so memory is bounded
    by the connections themselves.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def acquire(self, key: str) -> bool:
        """
        Count one more connection of C{key}: C{False} (nothing counted) if
        it already has C{limit}.
        """
        count = self._open.get(key, 0)
        if count >= self.limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open[key] - 1
        if count:
            self._open[key] = count
        else:
            del self._open[key]
