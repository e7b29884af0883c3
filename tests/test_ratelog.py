"""
Unit tests of geotaxi.ratelog.RateLimitedLog with a fake clock: a token
bucket per key, and the number of suppressed lines added to the next line.
"""

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from geotaxi.ratelog import RateLimitedLog


class RateLimitedLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.events = []
        self.ratelog = RateLimitedLog(self.clock, Logger(observer=self.events.append), per_second=2.0, burst=5)

    def warn(self, key="invalid_json", count=1):
        """
        Log ``count`` lines under ``key`` and return how many were written.
        """
        return sum(self.ratelog.warn(key, "Rejected {value}", value=i) for i in range(count))

    def test_burst(self):
        """
        A key writes ``burst`` lines at once, then none.
        """
        self.assertEqual(self.warn(count=100), 5)
        self.assertEqual(len(self.events), 5)

    def test_return_value(self):
        """
        warn() returns whether the line was written.
        """
        self.assertTrue(self.warn(count=5))
        self.assertFalse(self.ratelog.warn("invalid_json", "Rejected"))

    def test_refill(self):
        """
        Tokens come back at ``per_second``: one line every half second.
        """
        self.warn(count=5)

        self.clock.advance(0.4)
        self.assertEqual(self.warn(), 0)

        self.clock.advance(0.1)
        self.assertEqual(self.warn(), 1)
        self.assertEqual(self.warn(), 0)

    def test_refill_capped(self):
        """
        A long pause refills at most ``burst`` tokens.
        """
        self.warn(count=5)
        self.clock.advance(3600)

        self.assertEqual(self.warn(count=100), 5)

    def test_keys_independent(self):
        """
        Each key has its own bucket.
        """
        self.warn("invalid_json", count=100)

        self.assertEqual(self.warn("too_large", count=100), 5)
        self.assertEqual(len(self.events), 10)

    def test_suppressed_appended(self):
        """
        The next written line contains the number of lines held back.
        """
        self.warn(count=12)
        self.clock.advance(0.5)
        self.warn()

        event = self.events[-1]
        self.assertEqual(event["suppressed"], 7)
        self.assertEqual(formatEvent(event), "Rejected 0 (7 similar lines suppressed)")

    def test_suppressed_reset(self):
        """
        The suppressed count starts again from 0 after it was written.
        """
        self.warn(count=12)
        self.clock.advance(1)
        self.warn(count=2)

        self.assertEqual(self.events[-2]["suppressed"], 7)
        self.assertEqual(self.events[-1]["suppressed"], 0)
        self.assertEqual(formatEvent(self.events[-1]), "Rejected 1")

    def test_suppressed_per_key(self):
        """
        Lines held back under one key are not reported under another.
        """
        self.warn("invalid_json", count=12)
        self.warn("too_large")

        self.assertEqual(self.events[-1]["suppressed"], 0)

    def test_no_suffix_under_rate(self):
        """
        Lines under the rate carry no suffix.
        """
        self.warn(count=5)

        self.assertEqual([formatEvent(event) for event in self.events], [f"Rejected {i}" for i in range(5)])

    def test_fields(self):
        """
        Keyword fields reach the event as named fields.
        """
        self.ratelog.warn("out_of_order", "{member} at {timestamp}", member="taxi-1:op", timestamp=1733318400)

        self.assertEqual(self.events[0]["member"], "taxi-1:op")
        self.assertEqual(self.events[0]["timestamp"], 1733318400)
        self.assertEqual(formatEvent(self.events[0]), "taxi-1:op at 1733318400")

    def test_warn_level(self):
        """
        warn() logs at warning level.
        """
        self.warn()

        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)

    def test_error_level(self):
        """
        error() logs at error level, limited like warn().
        """
        written = sum(self.ratelog.error("redis_errors", "Writing failed") for _ in range(10))

        self.assertEqual(written, 5)
        self.assertEqual(self.events[0]["log_level"], LogLevel.error)

    def test_error_suppressed_appended(self):
        """
        error() adds the suppressed count to its next line too.
        """
        for _ in range(8):
            self.ratelog.error("redis_errors", "Writing failed")
        self.clock.advance(0.5)
        self.ratelog.error("redis_errors", "Writing failed")

        self.assertEqual(formatEvent(self.events[-1]), "Writing failed (3 similar lines suppressed)")

    def test_shared_bucket(self):
        """
        warn() and error() of one key draw on the same bucket.
        """
        self.warn("redis_errors", count=3)

        self.assertEqual(sum(self.ratelog.error("redis_errors", "Writing failed") for _ in range(10)), 2)

    def test_flood(self):
        """
        A flood of 10,000 lines in ten seconds writes about burst + 2 a second,
        and every line held back is counted in a later line.
        """
        for _ in range(100):
            self.warn(count=100)
            self.clock.advance(0.1)
        flood_lines = len(self.events)
        self.clock.advance(10)
        self.warn()

        self.assertLessEqual(flood_lines, 5 + 2 * 10 + 1)
        self.assertEqual(sum(event["suppressed"] for event in self.events) + len(self.events), 10_001)
