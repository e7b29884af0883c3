"""
Unit tests of geotaxi.writer.RedisWriter with a fake clock and a Redis link
double whose eval() returns Deferreds that each test fires by hand.
"""

import random

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from geotaxi.counters import Counters
from geotaxi.datagram import Position
from geotaxi.writer import SCRIPT, RedisWriter

NOW = 1733318400
OPERATOR = "operator@example.org"
HASH = "0123456789abcdef0123456789abcdef01234567"


def position(taxi="taxi-1", timestamp=NOW, operator=OPERATOR):
    return Position(taxi, operator, 48.856613, 2.352222, timestamp, 2, "free", "phone", HASH)


def member(taxi="taxi-1", operator=OPERATOR):
    return f"{taxi}:{operator}"


class EvalCall:
    """
    One eval() sent to the Redis double, with the Deferred of its reply.
    """

    def __init__(self, script, keys, args):
        self.script = script
        self.keys = keys
        self.args = args
        self.deferred = defer.Deferred()

    @property
    def lines(self):
        """
        The position lines of the batch.
        """
        return self.args[1].splitlines()

    @property
    def members(self):
        """
        The ``<taxi>:<operator>`` of each position line, in order.
        """
        return [":".join(line.split(" ")[:2]) for line in self.lines]

    @property
    def timestamps(self):
        """
        The position timestamp of each line, in order.
        """
        return [int(line.split(" ")[4]) for line in self.lines]

    def succeed(self, failed=0, error=""):
        """
        Reply as the script does: written, failed and the first error.
        """
        self.deferred.callback([len(self.lines) - failed, failed, error])

    def fail(self, error=None):
        self.deferred.errback(error or ConnectionError("Connection lost"))


class RedisDouble:
    """
    A txredisapi handler double that records each eval().
    """

    def __init__(self):
        self.calls = []

    def eval(self, script, keys, args):
        call = EvalCall(script, keys, args)
        self.calls.append(call)
        return call.deferred

    def outstanding(self):
        """
        Return the calls that have no reply yet, oldest first.
        """
        return [call for call in self.calls if not call.deferred.called]


class LinkDouble:
    """
    A RedisLink double: connected until a test sets ``connected`` to False,
    and stopped at once unless a test sets ``stopped`` to a Deferred of its own.
    """

    def __init__(self):
        self.connected = True
        self.address = "127.0.0.1:6379"
        self.redis = RedisDouble()
        self.started = 0
        self.stop_calls = 0
        self.stopped = None

    def start(self):
        self.started += 1

    def stop(self):
        self.stop_calls += 1
        if self.stopped is not None:
            return self.stopped
        return defer.succeed(None)


class WriterTestCase(SynchronousTestCase):
    def setUp(self):
        self.reset()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def reset(self):
        """
        Start again with a new clock, counters and link.
        """
        self.clock = Clock()
        self.clock.advance(NOW)
        self.counters = Counters()
        self.link = LinkDouble()
        self.accepted = 0

    def make_writer(self, **options):
        self.writer = RedisWriter(self.link, self.clock, self.counters, **options)
        return self.writer

    def flush(self):
        """
        Advance the clock by the writer's batch delay, when a flush is due.
        """
        self.clock.advance(self.writer.batch_delay)

    def submit(self, *taxis, timestamp=NOW):
        """
        Submit one position for each taxi, and count it as accepted.
        """
        results = []
        for taxi in taxis:
            self.accepted += 1
            results.append(self.writer.submit(member(taxi), position(taxi, timestamp)))
        return results

    @property
    def calls(self):
        return self.link.redis.calls

    def unaccounted(self):
        """
        Return the accepted positions that no counter, the backlog or the
        in-flight batches account for: 0 when nothing is lost silently.
        """
        ended = sum(self.counters[name] for name in (
            "written", "superseded", "queue_full", "redis_rejected", "shutdown_dropped",
        ))
        return self.accepted - ended - self.writer.pending - self.writer.in_flight

    def writer_events(self, level=None):
        return [
            formatEvent(event) for event in self.events
            if event.get("log_namespace") == "geotaxi.writer" and level in (None, event.get("log_level"))
        ]


class BatchTests(WriterTestCase):
    def test_one_eval_per_delay(self):
        """
        Many submits within batch_delay make one eval, sent once batch_delay has passed since the first.
        """
        self.make_writer(batch_delay=0.005)
        self.submit(*[f"taxi-{i}" for i in range(50)])
        self.clock.advance(0.004)
        self.submit(*[f"taxi-{i}" for i in range(50, 100)])

        self.assertEqual(self.calls, [])
        self.clock.advance(0.002)
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(len(self.calls[0].lines), 100)

    def test_zero_delay(self):
        """
        With batch_delay 0, the submits of one reactor turn go on the next turn.
        """
        self.make_writer(batch_delay=0)
        self.submit(*[f"taxi-{i}" for i in range(100)])

        self.assertEqual(self.calls, [])
        self.clock.advance(0)
        self.assertEqual(len(self.calls), 1)

    def test_eval_arguments(self):
        """
        The script gets no keys, the server time and one line per position.
        """
        self.make_writer()
        self.clock.advance(0.7)
        self.submit("taxi-1")
        self.flush()

        call = self.calls[0]
        self.assertEqual(call.script, SCRIPT)
        self.assertEqual(call.keys, [])
        self.assertEqual(call.args[0], NOW)
        self.assertEqual(call.args[1], f"taxi-1 {OPERATOR} 2.352222 48.856613 {NOW} 48.856613 2.352222 free phone 2\n")
        self.assertEqual(call.args[2], "")

    def test_batch_size(self):
        """
        A batch has at most batch_size positions, in the order submitted.
        """
        self.make_writer(batch_size=10, max_in_flight=5)
        self.submit(*[f"taxi-{i}" for i in range(25)])
        self.flush()

        self.assertEqual([len(call.lines) for call in self.calls], [10, 10, 5])
        self.assertEqual(self.calls[2].members[-1], member("taxi-24"))

    def test_max_in_flight(self):
        """
        At most max_in_flight batches wait for a reply.
        """
        self.make_writer(batch_size=10, max_in_flight=2)
        self.submit(*[f"taxi-{i}" for i in range(50)])
        self.flush()

        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.writer.pending, 30)
        self.assertEqual(self.writer.in_flight, 20)

    def test_reply_frees_slot(self):
        """
        A reply lets the next batch go on the next turn.
        """
        self.make_writer(batch_size=10, max_in_flight=2)
        self.submit(*[f"taxi-{i}" for i in range(50)])
        self.flush()

        self.calls[0].succeed()
        self.clock.advance(0)

        self.assertEqual(len(self.calls), 3)
        self.assertEqual(self.counters["written"], 10)
        self.assertEqual(self.writer.in_flight, 20)

    def test_submits_while_in_flight(self):
        """
        Positions submitted while a batch is in flight go in a later batch.
        """
        self.make_writer(max_in_flight=1)
        self.submit("taxi-1")
        self.flush()
        self.submit("taxi-2", "taxi-3")
        self.flush()

        self.assertEqual(len(self.calls), 1)
        self.calls[0].succeed()
        self.flush()
        self.assertEqual(self.calls[1].members, [member("taxi-2"), member("taxi-3")])

    def test_start_service(self):
        """
        startService() starts the link.
        """
        self.make_writer().startService()

        self.assertEqual(self.link.started, 1)


class BacklogTests(WriterTestCase):
    def test_newest_per_member(self):
        """
        A newer position of a pending member replaces it and is counted as superseded.
        """
        self.make_writer()
        self.submit("taxi-1", timestamp=NOW - 2)
        self.submit("taxi-1", timestamp=NOW - 1)
        self.submit("taxi-2")
        self.flush()

        self.assertEqual(self.counters["superseded"], 1)
        self.assertEqual(self.calls[0].members, [member("taxi-1"), member("taxi-2")])
        self.assertEqual(self.calls[0].timestamps, [NOW - 1, NOW])

    def test_operators_distinct(self):
        """
        The same taxi under two operators is two members.
        """
        self.make_writer()
        self.writer.submit(member("taxi-1"), position("taxi-1"))
        self.writer.submit(member("taxi-1", "other@example.org"), position("taxi-1", operator="other@example.org"))

        self.assertEqual(self.writer.pending, 2)
        self.assertEqual(self.counters["superseded"], 0)

    def test_queue_full(self):
        """
        A new member that finds queue_size members pending is dropped and counted.
        """
        self.make_writer(queue_size=3)
        results = self.submit("taxi-1", "taxi-2", "taxi-3", "taxi-4")

        self.assertEqual(results, [True, True, True, False])
        self.assertEqual(self.counters["queue_full"], 1)
        self.assertEqual(self.writer.pending, 3)

    def test_full_queue_supersedes(self):
        """
        A full backlog still takes a newer position of a pending member.
        """
        self.make_writer(queue_size=2)
        self.submit("taxi-1", "taxi-2")
        result = self.submit("taxi-1", timestamp=NOW + 1)

        self.assertEqual(result, [True])
        self.assertEqual(self.counters["superseded"], 1)
        self.assertEqual(self.counters["queue_full"], 0)

    def test_queue_full_logged(self):
        """
        Drops are logged at most a few times, with the member.
        """
        self.make_writer(queue_size=1)
        self.submit(*[f"taxi-{i}" for i in range(1000)])

        lines = self.writer_events()
        self.assertEqual(self.counters["queue_full"], 999)
        self.assertLessEqual(len(lines), 5)
        self.assertIn(f"dropped the position of {member('taxi-1')}", lines[0])

    def test_in_flight_not_in_queue(self):
        """
        Positions in flight leave room in the backlog.
        """
        self.make_writer(queue_size=2)
        self.submit("taxi-1", "taxi-2")
        self.flush()

        self.assertEqual(self.submit("taxi-3", "taxi-4"), [True, True])


class FailureTests(WriterTestCase):
    def test_retry_after_interval(self):
        """
        A failed batch is sent again after retry_interval, not before.
        """
        self.make_writer(retry_interval=0.25)
        self.submit("taxi-1")
        self.flush()
        self.calls[0].fail()

        self.clock.advance(0.24)
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.calls[1].members, [member("taxi-1")])

    def test_failure_counted(self):
        """
        A failed batch counts one redis_errors and goes back to the backlog.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2")
        self.flush()
        self.calls[0].fail()

        self.assertEqual(self.counters["redis_errors"], 1)
        self.assertEqual(self.writer.pending, 2)
        self.assertEqual(self.writer.in_flight, 0)

    def test_failure_logged(self):
        """
        A failed batch is logged as an error with the count, the address and the error.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2")
        self.flush()
        self.calls[0].fail(ConnectionError("Connection lost"))

        self.assertEqual(
            self.writer_events(LogLevel.error),
            ["Writing 2 positions to Redis at 127.0.0.1:6379 failed, retrying in 0.25 s: Connection lost"],
        )

    def test_requeued_behind_newer(self):
        """
        A failed position yields to a newer one of its member that arrived meanwhile.
        """
        self.make_writer(max_in_flight=1)
        self.submit("taxi-1", "taxi-2", timestamp=NOW - 10)
        self.flush()
        self.submit("taxi-1", "taxi-3", timestamp=NOW - 5)

        self.calls[0].fail()
        self.clock.advance(self.writer.retry_interval)

        self.assertEqual(self.counters["superseded"], 1)
        self.assertEqual(self.calls[1].members, [member("taxi-1"), member("taxi-3"), member("taxi-2")])
        self.assertEqual(self.calls[1].timestamps, [NOW - 5, NOW - 5, NOW - 10])

    def test_requeue_into_full_queue(self):
        """
        Failed positions that find the backlog full are counted as queue_full.
        """
        self.make_writer(queue_size=2, max_in_flight=1)
        self.submit("taxi-1", "taxi-2")
        self.flush()
        self.submit("taxi-3", "taxi-4")

        self.calls[0].fail()

        self.assertEqual(self.counters["queue_full"], 2)
        self.assertEqual(self.unaccounted(), 0)

    def test_timeout(self):
        """
        No reply within timeout seconds counts redis_errors and requeues the batch.
        """
        self.make_writer(timeout=5.0)
        self.submit("taxi-1")
        self.flush()

        self.clock.advance(4.9)
        self.assertEqual(self.counters["redis_errors"], 0)
        self.clock.advance(0.1)
        self.assertEqual(self.counters["redis_errors"], 1)
        self.assertEqual(self.writer.pending, 1)
        self.assertEqual(self.writer.in_flight, 0)

    def test_retry_after_timeout(self):
        """
        A timed-out batch is sent again after retry_interval.
        """
        self.make_writer(timeout=5.0, retry_interval=0.25)
        self.submit("taxi-1")
        self.flush()
        self.clock.advance(5.0)
        self.clock.advance(0.25)

        self.assertEqual(len(self.calls), 2)
        self.assertTrue(self.calls[0].deferred.called)

    def test_synchronous_failure(self):
        """
        An eval() that raises at once is retried after retry_interval, not in a loop.
        """
        self.make_writer(retry_interval=0.25)
        raised = []

        def eval_raising(script, keys, args):
            # Bounded so that a retry loop ends the test instead of hanging it.
            if len(raised) < 50:
                raised.append(args)
                raise ConnectionError("Not connected")
            return defer.Deferred()

        self.link.redis.eval = eval_raising
        self.submit("taxi-1")
        self.flush()

        self.assertEqual(len(raised), 1)
        self.assertEqual(self.counters["redis_errors"], 1)

    def test_disconnected(self):
        """
        Nothing is sent while disconnected; the backlog is sent once connected.
        """
        self.make_writer(retry_interval=0.25)
        self.link.connected = False
        self.submit("taxi-1")
        self.clock.pump([0, 1, 1, 1])

        self.assertEqual(self.calls, [])
        self.link.connected = True
        self.clock.advance(0.25)
        self.assertEqual(len(self.calls), 1)

    def test_disconnected_logged(self):
        """
        Waiting for the connection counts redis_errors and logs one line every few seconds.
        """
        self.make_writer()
        self.link.connected = False
        self.submit("taxi-1")
        self.clock.pump([0] + [0.25] * 240)

        lines = self.writer_events(LogLevel.error)
        self.assertGreater(self.counters["redis_errors"], 0)
        self.assertEqual(self.writer.pending, 1)
        self.assertGreater(len(lines), 0)
        self.assertLessEqual(len(lines), 60 // 5 + 1)
        self.assertIn("Redis at 127.0.0.1:6379 is not connected: 1 positions wait in the backlog", lines[0])


class ReplyTests(WriterTestCase):
    def test_written(self):
        """
        The written count of the reply is added to written.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2", "taxi-3")
        self.flush()
        self.calls[0].succeed()

        self.assertEqual(self.counters["written"], 3)
        self.assertEqual(self.writer.in_flight, 0)

    def test_redis_rejected(self):
        """
        Positions that Redis rejected are counted as redis_rejected, not retried.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2", "taxi-3")
        self.flush()
        self.calls[0].succeed(failed=1, error="WRONGTYPE Operation against a key holding the wrong kind of value")
        self.clock.advance(1)

        self.assertEqual(self.counters["written"], 2)
        self.assertEqual(self.counters["redis_rejected"], 1)
        self.assertEqual(self.writer.pending, 0)
        self.assertEqual(len(self.calls), 1)

    def test_redis_rejected_logged(self):
        """
        A refusal is logged as an error with Redis's first error.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2", "taxi-3")
        self.flush()
        self.calls[0].succeed(failed=1, error="WRONGTYPE Operation against a key holding the wrong kind of value")

        self.assertEqual(
            self.writer_events(LogLevel.error),
            ["Redis refused 1 of 3 positions: WRONGTYPE Operation against a key holding the wrong kind of value"],
        )

    def test_reply_as_strings(self):
        """
        Counts in the reply may come as strings or bytes.
        """
        self.make_writer()
        self.submit("taxi-1", "taxi-2")
        self.flush()
        self.calls[0].deferred.callback([b"1", "1", b"ERR"])

        self.assertEqual(self.counters["written"], 1)
        self.assertEqual(self.counters["redis_rejected"], 1)


class BadSignatureTests(WriterTestCase):
    def test_lines_sent(self):
        """
        Bad signatures go to the script as "<operator> <taxi> <ip>" lines.
        """
        self.make_writer()
        self.writer.record_bad_signature(OPERATOR, "taxi-1", "203.0.113.7")
        self.writer.record_bad_signature(OPERATOR, "taxi-2", "2001:db8::1")
        self.flush()

        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.calls[0].args[1], "")
        self.assertEqual(self.calls[0].args[2], f"{OPERATOR} taxi-1 203.0.113.7\n{OPERATOR} taxi-2 2001:db8::1\n")

    def test_with_positions(self):
        """
        Bad signatures share the batch of pending positions.
        """
        self.make_writer()
        self.submit("taxi-1")
        self.writer.record_bad_signature(OPERATOR, "taxi-2", "203.0.113.7")
        self.flush()

        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.calls[0].members, [member("taxi-1")])
        self.assertEqual(self.calls[0].args[2], f"{OPERATOR} taxi-2 203.0.113.7\n")

    def test_resent_after_failure(self):
        """
        Bad signatures of a failed batch are sent again.
        """
        self.make_writer()
        self.writer.record_bad_signature(OPERATOR, "taxi-1", "203.0.113.7")
        self.flush()
        self.calls[0].fail()
        self.clock.advance(self.writer.retry_interval)

        self.assertEqual(len(self.calls), 2)
        self.assertEqual(self.calls[1].args[2], f"{OPERATOR} taxi-1 203.0.113.7\n")

    def test_bounded(self):
        """
        Bad signatures beyond max_bad_signatures are dropped and counted.
        """
        self.make_writer(max_bad_signatures=3)
        for i in range(5):
            self.writer.record_bad_signature(OPERATOR, f"taxi-{i}", "203.0.113.7")

        self.assertEqual(self.counters["badhash_dropped"], 2)
        self.flush()
        self.assertEqual(len(self.calls[0].args[2].splitlines()), 3)


class DrainTests(WriterTestCase):
    def test_idle(self):
        """
        drain() fires at once when nothing is pending or in flight.
        """
        self.make_writer()

        self.assertIsNone(self.successResultOf(self.writer.drain()))

    def test_after_reply(self):
        """
        drain() fires once the last batch gets its reply.
        """
        self.make_writer(batch_size=1)
        self.submit("taxi-1", "taxi-2")
        drained = self.writer.drain()
        self.flush()
        self.calls[0].succeed()
        self.assertNoResult(drained)

        self.calls[1].succeed()

        self.assertIsNone(self.successResultOf(drained))

    def test_waits_for_retry(self):
        """
        drain() waits through a failure until the retried batch is written.
        """
        self.make_writer()
        self.submit("taxi-1")
        drained = self.writer.drain()
        self.flush()
        self.calls[0].fail()
        self.assertNoResult(drained)

        self.clock.advance(self.writer.retry_interval)
        self.calls[1].succeed()

        self.assertIsNone(self.successResultOf(drained))

    def test_waits_for_bad_signatures(self):
        """
        drain() waits for pending bad-signature lines too.
        """
        self.make_writer()
        self.writer.record_bad_signature(OPERATOR, "taxi-1", "203.0.113.7")
        drained = self.writer.drain()
        self.assertNoResult(drained)

        self.flush()
        self.calls[0].succeed()

        self.assertIsNone(self.successResultOf(drained))


class StopServiceTests(WriterTestCase):
    def test_idle(self):
        """
        Stopping an idle writer stops the link and drops nothing.
        """
        self.make_writer().startService()

        self.successResultOf(self.writer.stopService())

        self.assertEqual(self.link.stop_calls, 1)
        self.assertEqual(self.counters["shutdown_dropped"], 0)

    def test_writes_queue(self):
        """
        stopService() writes what is queued before it stops the link.
        """
        self.make_writer().startService()
        self.submit("taxi-1", "taxi-2")
        stopped = self.writer.stopService()
        self.flush()
        self.assertNoResult(stopped)
        self.assertEqual(self.link.stop_calls, 0)

        self.calls[0].succeed()

        self.successResultOf(stopped)
        self.assertEqual(self.counters["written"], 2)
        self.assertEqual(self.counters["shutdown_dropped"], 0)
        self.assertEqual(self.link.stop_calls, 1)

    def test_shutdown_timeout(self):
        """
        What is not written within shutdown_timeout is counted as shutdown_dropped.
        """
        self.make_writer(shutdown_timeout=10.0).startService()
        self.link.connected = False
        self.submit("taxi-1", "taxi-2", "taxi-3")
        stopped = self.writer.stopService()

        self.clock.advance(9.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)

        self.successResultOf(stopped)
        self.assertEqual(self.counters["shutdown_dropped"], 3)
        self.assertEqual(self.writer.pending, 0)
        self.assertEqual(self.link.stop_calls, 1)

    def test_in_flight_dropped(self):
        """
        Positions still in flight at the shutdown timeout are counted as shutdown_dropped.
        """
        self.make_writer(shutdown_timeout=10.0, timeout=60.0).startService()
        self.submit("taxi-1", "taxi-2")
        self.flush()
        stopped = self.writer.stopService()
        self.clock.advance(10.0)

        self.successResultOf(stopped)
        self.assertEqual(self.counters["shutdown_dropped"], 2)

    def test_late_reply_not_double_counted(self):
        """
        A reply that arrives after the shutdown timeout does not count its
        positions a second time.
        """
        self.make_writer(shutdown_timeout=10.0, timeout=60.0).startService()
        self.link.stopped = defer.Deferred()
        self.submit("taxi-1", "taxi-2")
        self.flush()
        self.writer.stopService()
        self.clock.advance(10.0)

        self.calls[0].succeed()

        self.assertEqual(self.unaccounted(), 0)

    def test_late_failure(self):
        """
        A batch that fails after the shutdown timeout is not requeued.
        """
        self.make_writer(shutdown_timeout=10.0, timeout=60.0).startService()
        self.link.stopped = defer.Deferred()
        self.submit("taxi-1")
        self.flush()
        self.writer.stopService()
        self.clock.advance(10.0)

        self.calls[0].fail(ConnectionDone())

        self.assertEqual(self.writer.pending, 0)
        self.assertEqual(self.writer.in_flight, 0)
        self.assertEqual(self.counters["shutdown_dropped"], 1)

    def test_no_timers_left(self):
        """
        After the shutdown timeout, the writer leaves no timer running.
        """
        self.make_writer(shutdown_timeout=10.0).startService()
        self.link.connected = False
        self.submit("taxi-1")
        self.writer.stopService()
        self.clock.advance(10.0)

        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_for_link(self):
        """
        stopService() fires once the link has closed.
        """
        self.make_writer().startService()
        self.link.stopped = defer.Deferred()
        stopped = self.writer.stopService()
        self.assertNoResult(stopped)

        self.link.stopped.callback(None)

        self.successResultOf(stopped)


class InvariantTests(WriterTestCase):
    """
    accepted == written + superseded + queue_full + redis_rejected
    + shutdown_dropped + pending + in_flight, through random traffic.
    """

    TAXIS = [f"taxi-{i}" for i in range(30)]

    def stop_link(self):
        """
        Close the link as RedisLink does: unanswered calls fail.
        """
        for call in self.link.redis.outstanding():
            call.fail(ConnectionDone())
        return defer.succeed(None)

    def run_traffic(self, seed, steps=2000):
        """
        Apply ``steps`` random events and return the first step, if any,
        after which the invariant did not hold.
        """
        rng = random.Random(seed)
        self.make_writer(queue_size=20, batch_size=7, max_in_flight=2, timeout=5.0, retry_interval=0.25)
        self.writer.startService()

        for step in range(steps):
            event = rng.random()
            if event < 0.5:
                self.submit(rng.choice(self.TAXIS), timestamp=NOW + step)
            elif event < 0.65:
                self.clock.advance(rng.choice([0, 0.005, 0.005, 0.1, 0.3, 1.0, 6.0]))
            elif event < 0.95:
                outstanding = self.link.redis.outstanding()
                if outstanding:
                    call = outstanding[0]
                    outcome = rng.random()
                    if outcome < 0.6:
                        call.succeed()
                    elif outcome < 0.8 and call.lines:
                        call.succeed(failed=rng.randint(1, len(call.lines)), error="ERR")
                    else:
                        call.fail()
            else:
                self.link.connected = not self.link.connected

            if self.unaccounted() != 0:
                return step
        return None

    def test_random_traffic(self):
        """
        The invariant is true after every step of random traffic.
        """
        for seed in range(5):
            self.reset()
            self.assertIsNone(self.run_traffic(seed), f"seed {seed}")

    def test_after_drain(self):
        """
        Once connected and every batch replied to, each accepted position is in one final counter.
        """
        for seed in range(5):
            self.reset()
            self.run_traffic(seed)
            self.link.connected = True
            for _ in range(1000):
                self.clock.advance(1)
                for call in self.link.redis.outstanding():
                    call.succeed()
                if not self.writer.pending and not self.writer.in_flight:
                    break

            self.assertEqual(self.writer.pending, 0, f"seed {seed}")
            self.assertEqual(self.writer.in_flight, 0, f"seed {seed}")
            self.assertEqual(self.unaccounted(), 0, f"seed {seed}")

    def test_after_shutdown(self):
        """
        A shutdown during random traffic leaves every position counted once.
        """
        for seed in range(5):
            self.reset()
            self.run_traffic(seed)
            self.link.stop = self.stop_link
            self.link.connected = False
            stopped = self.writer.stopService()
            self.clock.advance(self.writer.shutdown_timeout)

            self.successResultOf(stopped)
            self.assertEqual(self.writer.pending, 0, f"seed {seed}")
            self.assertEqual(self.writer.in_flight, 0, f"seed {seed}")
            self.assertEqual(self.unaccounted(), 0, f"seed {seed}")
