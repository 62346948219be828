# -*- test-case-name: tests.test_guard -*-
"""
The backup's defences as small clock-driven objects, with no HTTP in them.

L{NonceCache} refuses a replayed request: it remembers every nonce for as
long as a request carrying it could still pass the freshness check, and no
longer, so its memory is bounded by the traffic of one time window.
"""

import heapq

from twisted.internet.interfaces import IReactorTime

from clavitor_twisted.errors import NotReady, StaleRequest


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
