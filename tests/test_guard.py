"""
Tests for L{clavitor_twisted.guard}.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.errors import NotReady, StaleRequest
from clavitor_twisted.guard import NonceCache

MAX_AGE = 300
SKEW = 30
START = 1_700_000_000


def nonce(n: int) -> str:
    return "%032x" % (n,)


class NonceCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.cache = NonceCache(self.clock, MAX_AGE, SKEW, capacity=5)

    def test_replay_refused(self) -> None:
        """
        A nonce seen once is refused the second time, even with another
        timestamp; other nonces with the same timestamp pass.
        """
        self.cache.check_and_record(nonce(1), START)
        self.assertRaises(StaleRequest, self.cache.check_and_record, nonce(1), START)
        self.assertRaises(
            StaleRequest, self.cache.check_and_record, nonce(1), START - 1
        )
        self.cache.check_and_record(nonce(2), START)
        self.assertEqual(len(self.cache), 2)

    def test_kept_for_the_whole_window(self) -> None:
        """
        A nonce is remembered until its timestamp + max_age + skew, and
        forgotten right after.
        """
        self.cache.check_and_record(nonce(1), START - 10)
        self.clock.advance(MAX_AGE + SKEW - 10)
        self.assertRaises(
            StaleRequest, self.cache.check_and_record, nonce(1), START - 10
        )
        self.assertEqual(len(self.cache), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.cache), 0)

    def test_forgotten_nonce_can_return(self) -> None:
        """
        Once forgotten, a nonce signed at a fresh time is accepted again: the
        cache only has to cover the window the freshness check allows.
        """
        self.cache.check_and_record(nonce(1), START)
        self.clock.advance(MAX_AGE + SKEW + 1)
        self.cache.check_and_record(nonce(1), START + MAX_AGE + SKEW + 1)
        self.assertEqual(len(self.cache), 1)

    def test_outside_window_refused(self) -> None:
        """
        A timestamp the cache could not remember for its whole window (too
        old) or would have to remember for too long (in the future beyond the
        skew) is refused and not recorded.
        """
        self.assertRaises(
            StaleRequest,
            self.cache.check_and_record,
            nonce(1),
            START - MAX_AGE - SKEW - 1,
        )
        self.assertRaises(
            StaleRequest, self.cache.check_and_record, nonce(2), START + SKEW + 1
        )
        self.assertEqual(len(self.cache), 0)
        self.cache.check_and_record(nonce(3), START - MAX_AGE - SKEW)
        self.cache.check_and_record(nonce(4), START + SKEW)
        self.assertEqual(len(self.cache), 2)

    def test_full_refuses_new(self) -> None:
        """
        A full cache refuses new nonces with L{NotReady} and evicts nothing;
        room returns as old nonces expire.
        """
        for n in range(5):
            self.cache.check_and_record(nonce(n), START + n)
        self.assertRaises(NotReady, self.cache.check_and_record, nonce(9), START)
        for n in range(5):
            self.assertRaises(
                StaleRequest, self.cache.check_and_record, nonce(n), START + n
            )
        self.clock.advance(MAX_AGE + SKEW + 1)
        self.cache.check_and_record(nonce(9), START + MAX_AGE + SKEW + 1)
        self.assertEqual(len(self.cache), 5)

    def test_memory_bounded_by_window(self) -> None:
        """
        10,000 distinct nonces arriving ten a second over 1,000 seconds (more
        than three windows) never leave more in the cache than the window
        needs: the nonces of the last max_age + skew + 1 whole seconds.
        """
        cache = NonceCache(self.clock, MAX_AGE, SKEW)
        per_second = 10
        bound = (MAX_AGE + SKEW + 1) * per_second
        largest = 0
        for n in range(10_000):
            cache.check_and_record(nonce(n), int(self.clock.seconds()))
            largest = max(largest, len(cache))
            self.clock.advance(1 / per_second)
        self.assertLessEqual(largest, bound)
        self.assertGreaterEqual(largest, bound - per_second)


class NonceCacheModelTests(SynchronousTestCase):
    """
    The cache against a plain model: a dictionary of nonce -> expiry.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 200),  # seconds to advance
                st.integers(0, 6),  # which nonce
                st.integers(-400, 40),  # timestamp offset from now
            ),
            max_size=60,
        )
    )
    def test_matches_model(self, steps) -> None:
        clock = Clock()
        clock.advance(START)
        capacity = 4
        cache = NonceCache(clock, MAX_AGE, SKEW, capacity=capacity)
        model: dict[str, int] = {}
        for advance, which, offset in steps:
            clock.advance(advance)
            now = clock.seconds()
            model = {n: e for n, e in model.items() if e >= now}
            timestamp = int(now) + offset
            expiry = timestamp + MAX_AGE + SKEW
            key = nonce(which)
            if expiry < now or timestamp > now + SKEW or key in model:
                expected = StaleRequest
            elif len(model) >= capacity:
                expected = NotReady
            else:
                expected = None
                model[key] = expiry
            if expected is None:
                cache.check_and_record(key, timestamp)
            else:
                self.assertRaises(expected, cache.check_and_record, key, timestamp)
            self.assertEqual(len(cache), len(model))
