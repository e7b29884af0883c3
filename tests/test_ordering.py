"""
Unit tests of geotaxi.ordering.OrderingFilter with a fake clock: a position
older than the newest accepted one of its member is out of order, an equal
one is a duplicate, and expire() bounds the memory.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from geotaxi.ordering import ACCEPT, DUPLICATE, OUT_OF_ORDER, OrderingFilter

NOW = 1733318400
MEMBER = "taxi-1:operator@example.org"
OTHER = "taxi-2:operator@example.org"


class OrderingFilterTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.filter = OrderingFilter(self.clock, horizon=3600)

    def test_first_accepted(self):
        """
        The first position of a member is accepted and remembered.
        """
        self.assertIs(self.filter.check(MEMBER, NOW - 10), ACCEPT)
        self.assertEqual(len(self.filter), 1)

    def test_newer_accepted(self):
        """
        A newer position is accepted.
        """
        self.filter.check(MEMBER, NOW - 10)

        self.assertIs(self.filter.check(MEMBER, NOW - 9), ACCEPT)

    def test_older_out_of_order(self):
        """
        An older position is out of order.
        """
        self.filter.check(MEMBER, NOW - 10)

        self.assertEqual(self.filter.check(MEMBER, NOW - 11), OUT_OF_ORDER)

    def test_equal_duplicate(self):
        """
        An equal timestamp is a duplicate.
        """
        self.filter.check(MEMBER, NOW - 10)

        self.assertEqual(self.filter.check(MEMBER, NOW - 10), DUPLICATE)

    def test_rejection_keeps_newest(self):
        """
        A rejected position does not change the newest timestamp.
        """
        self.filter.check(MEMBER, NOW - 10)
        self.filter.check(MEMBER, NOW - 20)
        self.filter.check(MEMBER, NOW - 10)

        self.assertEqual(self.filter.check(MEMBER, NOW - 15), OUT_OF_ORDER)
        self.assertIs(self.filter.check(MEMBER, NOW - 5), ACCEPT)

    def test_members_independent(self):
        """
        Each member has its own newest timestamp.
        """
        self.filter.check(MEMBER, NOW - 10)

        self.assertIs(self.filter.check(OTHER, NOW - 100), ACCEPT)
        self.assertIs(self.filter.check("taxi-1:other@example.org", NOW - 100), ACCEPT)

    def test_future_newest_does_not_block(self):
        """
        A newest timestamp ahead of the server clock does not block older ones.
        """
        self.filter.check(MEMBER, NOW + 300)

        self.assertIs(self.filter.check(MEMBER, NOW - 10), ACCEPT)

    def test_future_newest_replaced(self):
        """
        Once a future newest is replaced, ordering applies from the new one.
        """
        self.filter.check(MEMBER, NOW + 300)
        self.filter.check(MEMBER, NOW - 10)

        self.assertEqual(self.filter.check(MEMBER, NOW - 20), OUT_OF_ORDER)

    def test_future_duplicate(self):
        """
        A future newest still blocks its exact duplicate.
        """
        self.filter.check(MEMBER, NOW + 300)

        self.assertEqual(self.filter.check(MEMBER, NOW + 300), DUPLICATE)

    def test_newest_at_now_blocks(self):
        """
        A newest timestamp equal to the server clock blocks older ones.
        """
        self.filter.check(MEMBER, NOW)

        self.assertEqual(self.filter.check(MEMBER, NOW - 1), OUT_OF_ORDER)

    def test_future_newest_blocks_once_past(self):
        """
        A future newest blocks older positions once the clock has passed it.
        """
        self.filter.check(MEMBER, NOW + 300)
        self.clock.advance(300)

        self.assertEqual(self.filter.check(MEMBER, NOW + 200), OUT_OF_ORDER)


class ExpireTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def test_forgets_stale(self):
        """
        expire() removes members older than the horizon and returns how many.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW - 3601)
        ordering.check(OTHER, NOW - 100)

        self.assertEqual(ordering.expire(), 1)
        self.assertEqual(len(ordering), 1)

    def test_forgotten_member_accepted(self):
        """
        A forgotten member's next position is accepted whatever its timestamp.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW - 3601)
        ordering.expire()

        self.assertIs(ordering.check(MEMBER, NOW - 4000), ACCEPT)

    def test_keeps_recent(self):
        """
        expire() keeps a member whose newest is within the horizon.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW - 100)
        ordering.expire()

        self.assertEqual(ordering.check(MEMBER, NOW - 200), OUT_OF_ORDER)

    def test_horizon_boundary(self):
        """
        A newest exactly at the horizon is kept.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW - 3600)

        self.assertEqual(ordering.expire(), 0)
        self.assertEqual(len(ordering), 1)

    def test_follows_clock(self):
        """
        A member becomes stale as the clock advances.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW - 100)
        self.clock.advance(3501)

        self.assertEqual(ordering.expire(), 1)
        self.assertEqual(len(ordering), 0)

    def test_keeps_future(self):
        """
        expire() keeps a member whose newest is ahead of the clock.
        """
        ordering = OrderingFilter(self.clock, horizon=3600)
        ordering.check(MEMBER, NOW + 300)

        self.assertEqual(ordering.expire(), 0)
        self.assertEqual(len(ordering), 1)

    def test_horizon_zero(self):
        """
        A horizon of 0 disables expiry: every member is kept.
        """
        ordering = OrderingFilter(self.clock, horizon=0)
        ordering.check(MEMBER, 0)
        ordering.check(OTHER, NOW - 10**6)

        self.assertEqual(ordering.expire(), 0)
        self.assertEqual(len(ordering), 2)
        self.assertEqual(ordering.check(MEMBER, -1), OUT_OF_ORDER)
