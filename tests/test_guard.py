"""
Tests for L{clavitor_twisted.guard}.
"""

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.errors import Forbidden, NotReady, RateLimited, StaleRequest
from clavitor_twisted.guard import (
    BanList,
    BodyBudget,
    OpenConnections,
    RefusalDigest,
    ConnectionLimit,
    NonceCache,
    RateLimiter,
)

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


class RateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)

    def refused(self, limiter: RateLimiter, key: str) -> int:
        """
        Assert that C{limiter} refuses C{key}; return the Retry-After.
        """
        refusal = self.assertRaises(RateLimited, limiter.check, key)
        self.assertIsInstance(refusal.retry_after, int)
        self.assertGreaterEqual(refusal.retry_after, 1)
        self.assertEqual(refusal.status, 429)
        return refusal.retry_after

    def test_burst_then_refused(self) -> None:
        """
        60 a minute allows a burst of 60 at one instant, then refuses with
        Retry-After 1 until a second has passed.
        """
        limiter = RateLimiter(self.clock, per_minute=60)
        for _ in range(60):
            limiter.check("pop:a")
        self.assertEqual(self.refused(limiter, "pop:a"), 1)
        self.clock.advance(0.5)
        self.assertEqual(self.refused(limiter, "pop:a"), 1)
        self.clock.advance(0.5)
        limiter.check("pop:a")
        self.assertEqual(self.refused(limiter, "pop:a"), 1)

    def test_refills_to_the_full_burst(self) -> None:
        """
        A drained bucket refills at per_minute a minute, never beyond
        per_minute tokens.
        """
        limiter = RateLimiter(self.clock, per_minute=60)
        for _ in range(60):
            limiter.check("pop:a")
        self.clock.advance(10)
        for _ in range(10):
            limiter.check("pop:a")
        self.refused(limiter, "pop:a")
        self.clock.advance(3600)
        for _ in range(60):
            limiter.check("pop:a")
        self.refused(limiter, "pop:a")

    def test_retry_after_rounds_up(self) -> None:
        """
        Retry-After is the time until the next token, rounded up to whole
        seconds.
        """
        limiter = RateLimiter(self.clock, per_minute=1)
        limiter.check("pop:a")
        self.assertEqual(self.refused(limiter, "pop:a"), 60)
        self.clock.advance(58.5)
        self.assertEqual(self.refused(limiter, "pop:a"), 2)
        self.clock.advance(1)
        self.assertEqual(self.refused(limiter, "pop:a"), 1)
        self.clock.advance(0.5)
        limiter.check("pop:a")

    def test_no_fraction_lost(self) -> None:
        """
        Time is counted exactly, however it is sliced: 7 a minute gives back
        one token after exactly 60/7 seconds, even when checked every
        quarter second in between (each refused check keeps what accrued).
        """
        limiter = RateLimiter(self.clock, per_minute=7)
        for _ in range(7):
            limiter.check("pop:a")
        for _ in range(34):  # 8.5 s < 60/7 s = 8.571... s
            self.clock.advance(0.25)
            self.refused(limiter, "pop:a")
        self.clock.advance(0.07)
        self.refused(limiter, "pop:a")
        self.clock.advance(0.002)
        limiter.check("pop:a")

    def test_keys_independent(self) -> None:
        """
        Draining one key's bucket leaves every other key's alone.
        """
        limiter = RateLimiter(self.clock, per_minute=3)
        for _ in range(3):
            limiter.check("pop:a")
        self.refused(limiter, "pop:a")
        for _ in range(3):
            limiter.check("pop:b")
            limiter.check("address:192.0.2.1")
        self.refused(limiter, "pop:b")
        self.refused(limiter, "address:192.0.2.1")

    def test_flood_of_keys_bounded(self) -> None:
        """
        1,000 distinct keys against a capacity of 100: the limiter never
        tracks more than 100, refuses the keys it has no room for, and still
        serves a key it tracks while that key has tokens.
        """
        limiter = RateLimiter(self.clock, per_minute=60, capacity=100)
        limiter.check("pop:a")
        refused = 0
        for n in range(1000):
            try:
                limiter.check("address:10.0.%d.%d" % divmod(n, 256))
            except RateLimited:
                refused += 1
            self.assertLessEqual(len(limiter), 100)
        self.assertEqual(refused, 901)
        for _ in range(59):
            limiter.check("pop:a")
        self.refused(limiter, "pop:a")

    def test_full_buckets_forgotten(self) -> None:
        """
        A bucket that has refilled completely is forgotten, which makes room
        for new keys; a full limiter's Retry-After is when room is made.
        """
        limiter = RateLimiter(self.clock, per_minute=60, capacity=2)
        for _ in range(60):
            limiter.check("pop:a")
        self.clock.advance(30)
        for _ in range(60):
            limiter.check("pop:b")
        # pop:a is full at 60 s, pop:b at 90 s.
        self.assertEqual(self.refused(limiter, "pop:c"), 30)
        self.clock.advance(29.5)
        self.assertEqual(self.refused(limiter, "pop:c"), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(limiter), 1)
        limiter.check("pop:c")
        self.assertEqual(len(limiter), 2)
        self.assertEqual(self.refused(limiter, "pop:d"), 1)
        self.clock.advance(30)
        self.assertEqual(len(limiter), 0)

    def test_clock_stepping_back(self) -> None:
        """
        A clock that steps back grants no tokens and breaks nothing.
        """
        limiter = RateLimiter(self.clock, per_minute=60)
        for _ in range(60):
            limiter.check("pop:a")
        self.clock.rightNow -= 100
        self.refused(limiter, "pop:a")
        self.clock.advance(1)
        limiter.check("pop:a")
        self.refused(limiter, "pop:a")

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, RateLimiter, self.clock, 0)
        self.assertRaises(ValueError, RateLimiter, self.clock, 60, 0)


class RateLimiterModelTests(SynchronousTestCase):
    """
    The limiter against an exact model: a dictionary of key -> tokens as a
    fraction, dropped once full.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(1, 120),
        st.lists(
            st.tuples(
                st.integers(0, 3_000_000),  # microseconds to advance
                st.integers(0, 4),  # which key
            ),
            max_size=80,
        ),
    )
    def test_matches_model(self, per_minute, steps) -> None:
        # From 0, so that the float sum of the steps stays exact to the
        # microsecond.
        clock = Clock()
        capacity = 3
        limiter = RateLimiter(clock, per_minute, capacity=capacity)
        rate = Fraction(per_minute, 60)  # tokens a second
        model: dict[str, Fraction] = {}
        for advance, which in steps:
            clock.advance(advance / 1_000_000)
            step = Fraction(advance, 1_000_000)
            model = {
                k: min(per_minute, t + step * rate)
                for k, t in model.items()
                if t + step * rate < per_minute
            }
            key = "pop:%d" % (which,)
            if key not in model and len(model) >= capacity:
                # Room is made when the fullest bucket fills.
                wait = min((per_minute - t) / rate for t in model.values())
                refusal = self.assertRaises(RateLimited, limiter.check, key)
                self.assertEqual(refusal.retry_after, max(1, math.ceil(wait)))
            else:
                tokens = model.get(key, Fraction(per_minute))
                if tokens >= 1:
                    limiter.check(key)
                    model[key] = tokens - 1
                else:
                    model[key] = tokens
                    refusal = self.assertRaises(RateLimited, limiter.check, key)
                    wait = (1 - tokens) / rate
                    self.assertEqual(refusal.retry_after, max(1, math.ceil(wait)))
            self.assertEqual(len(limiter), len(model))


class BanListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.bans = BanList(self.clock, threshold=3, duration=100)

    def fail(self, key: str, times: int) -> list[bool]:
        return [self.bans.record_failure(key) for _ in range(times)]

    def test_threshold_bans(self) -> None:
        """
        The threshold-th failure starts a ban, reported once; a banned key
        is refused with L{Forbidden}.
        """
        self.assertEqual(self.fail("pop:a", 2), [False, False])
        self.assertFalse(self.bans.banned("pop:a"))
        self.bans.check("pop:a")
        self.assertTrue(self.bans.record_failure("pop:a"))
        self.assertTrue(self.bans.banned("pop:a"))
        refusal = self.assertRaises(Forbidden, self.bans.check, "pop:a")
        self.assertEqual(refusal.status, 403)
        self.assertIn("banned", refusal.detail)

    def test_ban_lifts_by_itself(self) -> None:
        """
        A ban lasts duration seconds, is not extended by failures during
        it, and leaves no failures behind: the key starts afresh.
        """
        self.fail("pop:a", 3)
        self.clock.advance(50)
        self.assertEqual(self.fail("pop:a", 5), [False] * 5)
        self.clock.advance(49.5)
        self.assertTrue(self.bans.banned("pop:a"))
        self.clock.advance(0.5)
        self.assertFalse(self.bans.banned("pop:a"))
        self.bans.check("pop:a")
        self.assertEqual(len(self.bans), 0)
        self.assertEqual(self.fail("pop:a", 3), [False, False, True])

    def test_old_failures_expire(self) -> None:
        """
        Only failures within the last duration seconds count.
        """
        self.bans.record_failure("pop:a")
        self.clock.advance(50)
        self.bans.record_failure("pop:a")
        self.clock.advance(50)  # the first failure is now duration old
        self.assertFalse(self.bans.record_failure("pop:a"))
        self.clock.advance(20)
        self.assertTrue(self.bans.record_failure("pop:a"))

    def test_success_clears_failures(self) -> None:
        """
        A success forgets the failures, so the threshold counts anew; it
        does not lift a ban.
        """
        self.fail("pop:a", 2)
        self.bans.record_success("pop:a")
        self.assertEqual(self.fail("pop:a", 2), [False, False])
        self.assertTrue(self.bans.record_failure("pop:a"))
        self.bans.record_success("pop:a")
        self.assertTrue(self.bans.banned("pop:a"))

    def test_keys_independent(self) -> None:
        """
        POP A's ban does not touch POP B nor an address.
        """
        self.fail("pop:a", 2)
        self.fail("pop:b", 2)
        self.assertTrue(self.bans.record_failure("pop:a"))
        self.assertFalse(self.bans.banned("pop:b"))
        self.assertFalse(self.bans.banned("address:192.0.2.1"))
        self.bans.check("pop:b")
        self.assertTrue(self.bans.record_failure("pop:b"))
        self.bans.record_success("pop:b")
        self.assertTrue(self.bans.banned("pop:a"))

    def test_expired_state_dropped(self) -> None:
        """
        Failure records and bans are forgotten once they no longer matter.
        """
        self.fail("pop:a", 3)
        self.fail("pop:b", 1)
        self.clock.advance(10)
        self.fail("pop:c", 1)
        self.assertEqual(len(self.bans), 3)
        self.clock.advance(90)
        self.assertEqual(len(self.bans), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.bans), 0)

    def test_full_drops_oldest_failure_record_not_bans(self) -> None:
        """
        At capacity, a new key's failure drops the record of the key that
        failed least recently; bans stay whatever the flood.
        """
        bans = BanList(self.clock, threshold=3, duration=100, capacity=10)
        for key in ("pop:a", "pop:b"):
            for _ in range(3):
                bans.record_failure(key)
        bans.record_failure("pop:c")
        bans.record_failure("pop:c")
        self.clock.advance(1)
        for n in range(1000):
            bans.record_failure("address:10.0.%d.%d" % divmod(n, 256))
            self.assertLessEqual(len(bans), 10)
        self.assertTrue(bans.banned("pop:a"))
        self.assertTrue(bans.banned("pop:b"))
        # pop:c's two failures were dropped: it needs three again.
        self.assertFalse(bans.record_failure("pop:c"))
        self.assertFalse(bans.record_failure("pop:c"))
        self.assertTrue(bans.record_failure("pop:c"))
        self.assertEqual(len(bans), 10)

    def test_full_of_bans(self) -> None:
        """
        When every tracked key is banned, a new key's failure goes
        uncounted and the bans stay.
        """
        bans = BanList(self.clock, threshold=1, duration=100, capacity=2)
        self.assertTrue(bans.record_failure("pop:a"))
        self.assertTrue(bans.record_failure("pop:b"))
        self.assertFalse(bans.record_failure("pop:c"))
        self.assertFalse(bans.banned("pop:c"))
        self.assertTrue(bans.banned("pop:a"))
        self.assertEqual(len(bans), 2)
        self.clock.advance(100)
        self.assertTrue(bans.record_failure("pop:c"))
        self.assertEqual(len(bans), 1)

    def test_clock_stepping_back(self) -> None:
        """
        After the clock steps back, bans and failures are still judged by
        their own times, though expiry keeps them a little longer.
        """
        self.fail("pop:a", 3)  # banned until START + 100
        self.clock.advance(50)
        self.bans.record_failure("pop:b")
        self.clock.rightNow -= 200
        self.fail("pop:c", 3)  # banned until START - 50
        self.clock.advance(160)
        self.assertTrue(self.bans.banned("pop:a"))
        self.assertFalse(self.bans.banned("pop:c"))
        self.bans.check("pop:c")
        self.assertEqual(self.fail("pop:c", 3), [False, False, True])
        self.assertEqual(len(self.bans), 3)

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, BanList, self.clock, 0, 100)
        self.assertRaises(ValueError, BanList, self.clock, 3, 0)
        self.assertRaises(ValueError, BanList, self.clock, 3, 100, 0)


class BanListModelTests(SynchronousTestCase):
    """
    The ban list against a plain model: failure times and ban ends per key.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 60),  # seconds to advance
                st.integers(0, 4),  # which key
                st.sampled_from(["failure", "success", "check"]),
            ),
            max_size=80,
        )
    )
    def test_matches_model(self, steps) -> None:
        clock = Clock()
        clock.advance(START)
        threshold, duration, capacity = 3, 100, 3
        bans = BanList(clock, threshold, duration, capacity=capacity)
        failures: dict[str, list[float]] = {}  # least recently failed first
        ended: dict[str, float] = {}
        for advance, which, action in steps:
            clock.advance(advance)
            now = clock.seconds()
            ended = {k: e for k, e in ended.items() if now < e}
            failures = {
                k: [t for t in ts if t + duration > now]
                for k, ts in failures.items()
                if ts[-1] + duration > now
            }
            key = "pop:%d" % (which,)
            if action == "check":
                if key in ended:
                    self.assertRaises(Forbidden, bans.check, key)
                else:
                    bans.check(key)
            elif action == "success":
                failures.pop(key, None)
                bans.record_success(key)
            else:
                started = False
                if key not in ended:
                    if key not in failures and len(ended) + len(failures) >= capacity:
                        if failures:
                            del failures[next(iter(failures))]
                            failures[key] = []
                    else:
                        failures[key] = failures.pop(key, [])
                    if key in failures:
                        failures[key].append(now)
                        if len(failures[key]) >= threshold:
                            del failures[key]
                            ended[key] = now + duration
                            started = True
                self.assertEqual(bans.record_failure(key), started)
            self.assertEqual(len(bans), len(ended) + len(failures))


class BodyBudgetTests(SynchronousTestCase):
    def test_reserve_up_to_the_limit(self):
        """
        Reservations add up to the limit exactly; one byte more is refused
        (NotReady, 503) and reserves nothing; a release makes room again.
        """
        budget = BodyBudget(100)
        budget.reserve(60, "a")
        budget.reserve(40, "b")
        self.assertRaises(NotReady, budget.reserve, 1, "c")
        self.assertEqual(budget.in_use, 100)
        budget.release(40, "b")
        self.assertRaises(NotReady, budget.reserve, 41, "c")
        budget.reserve(40, "c")
        budget.release(60, "a")
        budget.release(40, "c")
        self.assertEqual(budget.in_use, 0)

    def test_share_per_key(self):
        """
        One key holds at most its share, whatever room is left; the others
        still get theirs, and a key's release gives it room again.
        """
        budget = BodyBudget(100, share=50)
        budget.reserve(30, "pop:calgary-01")
        budget.reserve(20, "pop:calgary-01")
        error = self.assertRaises(NotReady, budget.reserve, 1, "pop:calgary-01")
        self.assertEqual(error.retry_after, 1)
        self.assertIn("pop:calgary-01", error.detail)
        budget.reserve(50, "pop:paris-01")
        self.assertEqual(budget.in_use, 100)
        budget.release(20, "pop:calgary-01")
        budget.reserve(10, "pop:calgary-01")
        self.assertRaises(NotReady, budget.reserve, 11, "pop:calgary-01")

    def test_release_more_than_reserved(self):
        budget = BodyBudget(10)
        budget.reserve(5, "a")
        self.assertRaises(ValueError, budget.release, 6, "a")
        self.assertRaises(ValueError, budget.release, 1, "b")
        self.assertRaises(ValueError, budget.release, -1, "a")
        self.assertEqual(budget.in_use, 5)

    def test_bad_limit(self):
        self.assertRaises(ValueError, BodyBudget, 0)
        self.assertRaises(ValueError, BodyBudget, 10, 0)
        self.assertRaises(ValueError, BodyBudget, 10, 11)


class OpenConnectionsTests(SynchronousTestCase):
    def test_unproven_make_room(self):
        """
        When full, a new connection displaces the oldest one not proven;
        with every open one proven, it is refused; a closed one frees its
        place.
        """
        pool = OpenConnections(2)
        self.assertEqual(pool.open("a"), (True, None))
        self.assertEqual(pool.open("b"), (True, None))
        pool.proven("a")
        self.assertEqual(pool.open("c"), (True, "b"))
        self.assertEqual(pool.open("d"), (True, "c"))
        pool.proven("d")
        self.assertEqual(pool.open("e"), (False, None))
        self.assertEqual(len(pool), 2)
        pool.close("a")
        pool.close("b")
        self.assertEqual(pool.open("e"), (True, None))
        self.assertRaises(ValueError, OpenConnections, 0)


class RefusalDigestTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.told = []
        self.digest = RefusalDigest(
            self.clock,
            60,
            lambda key, count, last: self.told.append((self.clock.seconds(), key, count, last)),
            capacity=2,
        )

    def test_first_told_rest_counted(self):
        """
        The first refusal of a key is told at once; the ones within its
        window are counted and told as one count when the window ends;
        the next refusal starts a new window.
        """
        self.assertTrue(self.digest.refused("a", "first"))
        self.clock.advance(59)
        self.assertEqual([self.digest.refused("a", "n%d" % n) for n in range(5)], [False] * 5)
        self.assertTrue(self.digest.refused("b", "other"))
        self.assertEqual(self.told, [])
        self.clock.advance(1)
        self.assertEqual(self.told, [(60, "a", 5, "n4")])
        self.assertTrue(self.digest.refused("a", "again"))
        self.clock.advance(59)
        self.assertEqual(self.told, [(60, "a", 5, "n4")])
        self.assertEqual(len(self.digest), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.digest), 0)
        self.assertEqual(self.told, [(60, "a", 5, "n4")])

    def test_keys_beyond_capacity_counted_together(self):
        """
        With C{capacity} keys in their windows, refusals of further keys
        are counted under OVERFLOW and never told one by one.
        """
        self.digest.refused("a", "x")
        self.digest.refused("b", "x")
        self.assertEqual([self.digest.refused(k, k) for k in ("c", "d", "e")], [False] * 3)
        self.clock.advance(60)
        self.assertEqual(self.told, [(60, RefusalDigest.OVERFLOW, 3, "e")])
        self.assertEqual(len(self.digest), 0)

    def test_stop_tells_the_counts(self):
        self.digest.refused("a", "x")
        self.digest.refused("a", "y")
        self.digest.refused("b", "z")
        self.digest.stop()
        self.assertEqual(self.told, [(0, "a", 1, "y")])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConnectionLimitTests(SynchronousTestCase):
    def test_per_key(self):
        """
        Each key may hold C{limit} connections; a refused one is not
        counted; a key with none open is forgotten.
        """
        limit = ConnectionLimit(2)
        self.assertTrue(limit.acquire("a"))
        self.assertTrue(limit.acquire("a"))
        self.assertFalse(limit.acquire("a"))
        self.assertTrue(limit.acquire("b"))
        limit.release("a")
        self.assertTrue(limit.acquire("a"))
        self.assertFalse(limit.acquire("a"))
        limit.release("a")
        limit.release("a")
        limit.release("b")
        self.assertEqual(len(limit), 0)

    def test_bad_limit(self):
        self.assertRaises(ValueError, ConnectionLimit, 0)
