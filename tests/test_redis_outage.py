"""
Redis stopped, or frozen, for 5 s while 200 datagrams a second arrive:
the reactor keeps turning, writes resume soon after Redis returns, and every
accepted position is in Redis or counted as dropped.
"""

import time

from twisted.internet import defer, reactor, task

from tests.harness import ServerTestCase, position

RATE = 200
TICK = 0.05


class OutageTests(ServerTestCase):
    """
    A real redis-server stopped and started again under steady traffic.
    """

    server_args = ("--redis-timeout", "1")
    timeout = 120

    def setUp(self):
        self.sent = 0
        self.max_lateness = 0.0
        return super().setUp()

    def send_tick(self):
        for _ in range(int(RATE * TICK)):
            self.send(position(taxi=f"taxi-{self.sent}"))
            self.sent += 1

    def start_traffic(self):
        """
        Send RATE datagrams a second, and measure how late each tick fires:
        a blocked reactor shows as lateness.
        """
        self.last_tick = time.monotonic()

        def tick():
            now = time.monotonic()
            self.max_lateness = max(self.max_lateness, now - self.last_tick - TICK)
            self.last_tick = now
            self.send_tick()

        self.traffic = task.LoopingCall(tick)
        self.traffic.start(TICK)
        self.addCleanup(lambda: self.traffic.running and self.traffic.stop())

    def sleep(self, seconds):
        return task.deferLater(reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def check_outage(self, stop, start):
        self.start_traffic()
        yield self.sleep(2)
        written_before = self.counters["written"]
        self.assertGreater(written_before, 0)

        stop()
        yield self.sleep(5)
        written_during = self.counters["written"]

        start()
        restarted = time.monotonic()
        yield self.wait_for(lambda: self.counters["written"] > written_during + RATE, "writes to resume", timeout=10)
        resumed_after = time.monotonic() - restarted

        yield self.sleep(1)
        self.traffic.stop()
        yield self.settle(self.sent)

        self.assertLess(resumed_after, 2.0)
        self.assertLess(self.max_lateness, 0.5)

        # Every datagram was accepted, and each accepted position is either
        # in Redis or counted as dropped; each taxi id was sent once.
        self.assertEqual(self.counters["accepted"], self.sent)
        dropped = self.counters["queue_full"] + self.counters["superseded"] + self.counters["redis_rejected"]
        self.assertEqual(self.counters["written"] + dropped, self.counters["accepted"])
        stored = self.redis.command("ZCARD", "timestamps")
        self.assertEqual(stored, self.sent - dropped)
        self.assertEqual(self.service.writer.pending, 0)

    def test_redis_stopped(self):
        """
        Redis shut down (saving its data) for 5 s, then started again.
        """
        return self.check_outage(lambda: self.redis.stop(save=True), self.redis.start)

    def test_redis_frozen(self):
        """
        Redis frozen by SIGSTOP for 5 s: its connection stays open and no
        reply comes, so only the command timeout notices.
        """
        return self.check_outage(self.redis.pause, self.redis.resume)
