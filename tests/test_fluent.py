"""
Tests of the Fluentd forwarder: unit tests on a fake clock and transport, and
integration tests against a real Forward-protocol receiver on 127.0.0.1.
"""

import base64
import gzip
import time

import msgpack
from fluent.sender import FluentSender
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from geotaxi.counters import Counters
from geotaxi.fluent import TRANSPORT_BUFFER_SIZE, FluentForwarder
from geotaxi.options import Options
from geotaxi.tap import makeService
from tests.fluentreceiver import ForwardProtocol, ForwardReceiver, new_unpacker

TAG = "geotaxi.position"


def make_record(index, padding=""):
    """
    Return a position record as the server emits it, numbered by ``index``.
    """
    record = {
        "taxi": f"taxi-{index}",
        "operator": "operator@example.com",
        "lat": 48.8566,
        "lon": 2.3522,
        "timestamp": 1_700_000_000 + index,
        "version": 2,
        "status": "free",
        "device": "phone",
        "hash": "0123456789abcdef0123456789abcdef01234567",
    }
    if padding:
        record["padding"] = padding
    return record


def taxi_number(record):
    """
    Return N of a record of taxi ``taxi-N``.
    """
    return int(record["taxi"].rpartition("-")[2])


def decode_frames(data):
    """
    Decode every msgpack frame in ``data``.
    """
    unpacker = new_unpacker()
    unpacker.feed(data)
    return list(unpacker)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection attempts the test completes or fails by hand.
    """

    def __init__(self):
        self.attempts = []

    def connect(self, factory):
        """
        Record the attempt and return its pending Deferred.
        """
        attempt = Deferred()
        self.attempts.append((factory, attempt))
        return attempt

    def accept(self):
        """
        Complete the latest attempt with an in-memory transport.
        """
        factory, attempt = self.attempts[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return protocol, transport

    def refuse(self):
        """
        Fail the latest attempt as a refused connection.
        """
        factory, attempt = self.attempts[-1]
        attempt.errback(ConnectionRefusedError("test refusal"))


class FakeConnectionTestCase(TestCase):
    """
    A forwarder on a fake clock, connected through FakeEndpoint.
    """

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.counters = Counters()
        self.log_events = []

    def make_forwarder(self, **options):
        options.setdefault("retry_policy", lambda attempt: 1.0)
        forwarder = FluentForwarder(
            "127.0.0.1", 24224, self.counters, self.clock, endpoint=self.endpoint, **options
        )
        forwarder.log = Logger(observer=self.log_events.append)
        return forwarder

    def connect(self, forwarder):
        forwarder.startService()
        protocol, transport = self.endpoint.accept()
        return protocol, transport

    def warnings(self):
        return [event for event in self.log_events if event["log_level"] == LogLevel.warn]


class ForwarderUnitTests(FakeConnectionTestCase):
    """
    Buffering, framing, flow control and shutdown on a fake clock.
    """

    def test_emit_before_start_buffers(self):
        forwarder = self.make_forwarder()

        for index in range(5):
            forwarder.emit(make_record(index))

        self.assertEqual(forwarder.buffered, 5)
        self.assertFalse(forwarder.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.counters["fluent_sent"], 0)

    def test_overflow_drops_exact_count(self):
        forwarder = self.make_forwarder(max_buffer=10)

        for index in range(25):
            forwarder.emit(make_record(index))

        self.assertEqual(forwarder.buffered, 10)
        self.assertEqual(self.counters["fluent_dropped"], 15)
        self.assertEqual(len(self.warnings()), 1)

    def test_flush_once_per_turn(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)

        for index in range(3):
            forwarder.emit(make_record(index))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(len(frames), 1)
        tag, entries = frames[0]
        self.assertEqual(tag, TAG)
        self.assertEqual([record for _, record in entries], [make_record(index) for index in range(3)])
        self.assertEqual(self.counters["fluent_sent"], 3)
        self.assertEqual(forwarder.buffered, 0)

    def test_buffered_records_sent_on_connect(self):
        forwarder = self.make_forwarder()
        for index in range(4):
            forwarder.emit(make_record(index))

        protocol, transport = self.connect(forwarder)
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(sum(len(entries) for _, entries in frames), 4)
        self.assertTrue(forwarder.connected)
        self.assertEqual(forwarder.buffered, 0)

    def test_entry_bytes_match_fluent_logger(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        self.clock.advance(1_700_000_000.75)
        record = make_record(7)

        forwarder.emit(record)
        self.clock.advance(0)

        # fluent-logger's Message mode is [tag, time, record]; our Forward
        # mode is [tag, [[time, record]]]. The bytes of time and record match.
        message = FluentSender(TAG)._make_packet(None, 1_700_000_000, record)
        header = b"\x93" + msgpack.packb(TAG)
        self.assertTrue(message.startswith(header))
        expected = b"\x92" + msgpack.packb(TAG) + b"\x91\x92" + message[len(header):]
        self.assertEqual(transport.value(), expected)

    def test_nanosecond_precision_sends_event_time(self):
        forwarder = self.make_forwarder(nanosecond_precision=True)
        protocol, transport = self.connect(forwarder)
        self.clock.advance(1_700_000_000.5)

        forwarder.emit(make_record(1))
        self.clock.advance(0)

        [(tag, [(event_time, record)])] = decode_frames(transport.value())
        self.assertEqual(event_time, 1_700_000_000.5)
        self.assertEqual(record, make_record(1))

    def test_batch_size_splits_frames(self):
        forwarder = self.make_forwarder(batch_size=2)
        protocol, transport = self.connect(forwarder)

        for index in range(5):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual([len(entries) for _, entries in frames], [2, 2, 1])
        records = [record for _, entries in frames for _, record in entries]
        self.assertEqual(records, [make_record(index) for index in range(5)])

    def test_paused_transport_holds_records(self):
        forwarder = self.make_forwarder(max_buffer=5)
        protocol, transport = self.connect(forwarder)

        protocol.pauseProducing()
        for index in range(8):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        self.assertEqual(transport.value(), b"")
        self.assertEqual(forwarder.buffered, 5)
        self.assertEqual(self.counters["fluent_dropped"], 3)

        protocol.resumeProducing()
        self.clock.advance(0)

        records = [record for _, entries in decode_frames(transport.value()) for _, record in entries]
        self.assertEqual(records, [make_record(index) for index in range(5)])
        self.assertEqual(self.counters["fluent_sent"], 5)

    def test_refused_connection_counted_and_retried(self):
        forwarder = self.make_forwarder()
        forwarder.startService()

        self.endpoint.refuse()

        self.assertEqual(self.counters["fluent_errors"], 1)
        self.assertFalse(forwarder.connected)
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["host"], "127.0.0.1")
        self.assertEqual(warnings[0]["port"], 24224)
        self.assertIn("test refusal", warnings[0]["error"])

        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_lost_connection_reconnects(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)

        protocol.connectionLost(Failure(ConnectionDone()))
        forwarder.emit(make_record(1))
        self.clock.advance(0)

        self.assertEqual(self.counters["fluent_errors"], 1)
        self.assertFalse(forwarder.connected)
        self.assertEqual(forwarder.buffered, 1)

        self.clock.advance(1.0)
        protocol, transport = self.endpoint.accept()
        self.clock.advance(0)

        [(tag, [(_, record)])] = decode_frames(transport.value())
        self.assertEqual(record, make_record(1))

    def test_stop_flushes_then_closes(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        for index in range(3):
            forwarder.emit(make_record(index))
        stopped = []

        forwarder.stopService().addCallback(stopped.append)
        self.clock.advance(0)

        self.assertEqual(len(decode_frames(transport.value())), 1)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertEqual(stopped, [])

        protocol.connectionLost(Failure(ConnectionDone()))

        self.assertEqual(stopped, [None])
        self.assertEqual(self.counters["fluent_sent"], 3)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(self.counters["fluent_errors"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_unreachable_times_out(self):
        forwarder = self.make_forwarder(shutdown_timeout=3.0)
        forwarder.startService()
        self.endpoint.refuse()
        for index in range(5):
            forwarder.emit(make_record(index))
        stopped = []

        forwarder.stopService().addCallback(stopped.append)
        self.clock.advance(2.9)
        self.assertEqual(stopped, [])

        self.clock.advance(0.1)

        self.assertEqual(stopped, [None])
        self.assertEqual(self.counters["fluent_dropped"], 5)
        self.assertEqual(forwarder.buffered, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_aborts_stuck_connection(self):
        forwarder = self.make_forwarder(shutdown_timeout=2.0)
        protocol, transport = self.connect(forwarder)
        protocol.pauseProducing()
        for index in range(4):
            forwarder.emit(make_record(index))
        stopped = []

        forwarder.stopService().addCallback(stopped.append)
        self.clock.advance(2.0)

        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(stopped, [None])
        self.assertEqual(self.counters["fluent_dropped"], 4)
        self.assertEqual(self.counters["fluent_errors"], 0)

    def test_emit_after_stop_counted_dropped(self):
        forwarder = self.make_forwarder()
        forwarder.startService()
        forwarder.stopService()

        forwarder.emit(make_record(1))
        forwarder.emit(make_record(2))

        self.assertEqual(forwarder.buffered, 0)
        self.assertEqual(self.counters["fluent_dropped"], 2)
        self.assertEqual(len(self.warnings()), 1)

    def test_invalid_bounds_rejected(self):
        with self.assertRaises(ValueError):
            self.make_forwarder(max_buffer=0)
        with self.assertRaises(ValueError):
            self.make_forwarder(batch_size=0)


class AckUnitTests(FakeConnectionTestCase):
    """
    Acknowledged frames (require_ack_response) on a fake clock.
    """

    def make_forwarder(self, **options):
        options.setdefault("require_ack_response", True)
        return super().make_forwarder(**options)

    def ack(self, protocol, frame):
        """
        Deliver Fluentd's ack of ``frame``, a decoded frame with options.
        """
        protocol.dataReceived(msgpack.packb({"ack": frame[2]["chunk"]}))

    def records(self, frames):
        return [record for frame in frames for _, record in frame[1]]

    def assert_accounted(self, forwarder, emitted):
        """
        Check that each of ``emitted`` records is sent, dropped, buffered or
        waiting for an ack.
        """
        total = (
            self.counters["fluent_sent"]
            + self.counters["fluent_dropped"]
            + forwarder.buffered
            + forwarder.unacked
        )
        self.assertEqual(total, emitted)

    def test_frame_carries_chunk_option(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)

        for index in range(3):
            forwarder.emit(make_record(index))
        self.clock.advance(0)
        forwarder.emit(make_record(3))
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(len(frames), 2)
        tag, entries, options = frames[0]
        self.assertEqual(tag, TAG)
        self.assertEqual([record for _, record in entries], [make_record(index) for index in range(3)])
        self.assertEqual(set(options), {"chunk", "size"})
        self.assertEqual(options["size"], 3)
        self.assertEqual(len(base64.b64decode(options["chunk"], validate=True)), 16)
        self.assertNotEqual(frames[1][2]["chunk"], options["chunk"])
        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assertEqual(forwarder.unacked, 4)
        self.assertEqual(forwarder.buffered, 0)

    def test_ack_frame_bytes(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        self.clock.advance(1_700_000_000.75)

        forwarder.emit(make_record(7))
        self.clock.advance(0)

        # [tag, [[time, record]], options]: only the array header and the
        # options differ from a frame without acks.
        [frame] = decode_frames(transport.value())
        entry = msgpack.packb([1_700_000_000, make_record(7)])
        expected_start = b"\x93" + msgpack.packb(TAG) + b"\x91" + entry
        self.assertEqual(transport.value(), expected_start + msgpack.packb(frame[2]))

    def test_ack_counts_sent(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        for index in range(3):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        [frame] = decode_frames(transport.value())
        self.ack(protocol, frame)

        self.assertEqual(self.counters["fluent_sent"], 3)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assert_accounted(forwarder, 3)

    def test_acks_split_across_reads(self):
        forwarder = self.make_forwarder(batch_size=2)
        protocol, transport = self.connect(forwarder)
        for index in range(4):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        acks = b"".join(msgpack.packb({"ack": frame[2]["chunk"]}) for frame in frames)
        protocol.dataReceived(acks[:5])
        self.assertEqual(self.counters["fluent_sent"], 0)
        protocol.dataReceived(acks[5:-3])
        self.assertEqual(self.counters["fluent_sent"], 2)
        protocol.dataReceived(acks[-3:])

        self.assertEqual(self.counters["fluent_sent"], 4)
        self.assertEqual(forwarder.unacked, 0)

    def test_unknown_responses_ignored(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        for index in range(3):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        for response in ({"ack": "bm90IGEgY2h1bms="}, {"ack": 5}, {"ok": True}, ["HELO", {}], None):
            protocol.dataReceived(msgpack.packb(response))

        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assertEqual(forwarder.unacked, 3)
        self.assertTrue(forwarder.connected)
        self.assertFalse(transport.disconnecting)

    def test_invalid_response_aborts_connection(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        for index in range(3):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        # 0xc1 is the one byte that msgpack never uses.
        protocol.dataReceived(b"\xc1")

        self.assertTrue(transport.disconnected)
        self.assertFalse(forwarder.connected)
        self.assertEqual(self.counters["fluent_errors"], 1)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(forwarder.buffered, 3)
        self.assertIn("error", self.warnings()[0])

    def test_unacked_frames_bounded(self):
        forwarder = self.make_forwarder(batch_size=1, max_unacked_frames=2)
        protocol, transport = self.connect(forwarder)

        for index in range(5):
            forwarder.emit(make_record(index))
        self.clock.advance(0)
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(len(frames), 2)
        self.assertEqual(forwarder.buffered, 3)
        self.assertEqual(forwarder.unacked, 2)

        self.ack(protocol, frames[0])
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(self.records(frames), [make_record(index) for index in range(3)])
        self.assertEqual(forwarder.buffered, 2)
        self.assertEqual(self.counters["fluent_sent"], 1)
        self.assert_accounted(forwarder, 5)

    def test_unacked_bound_then_overflow(self):
        forwarder = self.make_forwarder(batch_size=2, max_unacked_frames=1, max_buffer=3)
        protocol, transport = self.connect(forwarder)
        for index in range(2):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        for index in range(2, 7):
            forwarder.emit(make_record(index))
        self.clock.advance(0)

        self.assertEqual(len(decode_frames(transport.value())), 1)
        self.assertEqual(forwarder.unacked, 2)
        self.assertEqual(forwarder.buffered, 3)
        self.assertEqual(self.counters["fluent_dropped"], 2)
        self.assert_accounted(forwarder, 7)

    def test_lost_connection_resends_in_order(self):
        forwarder = self.make_forwarder(batch_size=2)
        protocol, transport = self.connect(forwarder)
        for index in range(4):
            forwarder.emit(make_record(index))
        self.clock.advance(0)
        first, second = decode_frames(transport.value())
        self.ack(protocol, first)

        # Emitted but not yet flushed when the connection is lost.
        forwarder.emit(make_record(4))
        forwarder.emit(make_record(5))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)

        self.assertEqual(self.counters["fluent_sent"], 2)
        self.assertEqual(self.counters["fluent_errors"], 1)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(forwarder.buffered, 4)
        self.assertEqual(self.counters["fluent_resent"], 0)

        self.clock.advance(1.0)
        protocol, transport = self.endpoint.accept()
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(self.records(frames), [make_record(index) for index in range(2, 6)])
        self.assertEqual(self.counters["fluent_resent"], 2)
        for frame in frames:
            self.ack(protocol, frame)
        self.assertEqual(self.counters["fluent_sent"], 6)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assert_accounted(forwarder, 6)

    def test_requeue_beyond_buffer_dropped(self):
        forwarder = self.make_forwarder(batch_size=2, max_buffer=4)
        protocol, transport = self.connect(forwarder)
        for index in range(4):
            forwarder.emit(make_record(index))
        self.clock.advance(0)
        for index in range(4, 7):
            forwarder.emit(make_record(index))

        protocol.connectionLost(Failure(ConnectionDone()))

        # One of the four unacknowledged records fits, the oldest.
        self.assertEqual(self.counters["fluent_dropped"], 3)
        self.assertEqual(forwarder.buffered, 4)
        self.assert_accounted(forwarder, 7)
        requeued = [warning for warning in self.warnings() if "dropped" in warning]
        self.assertEqual(len(requeued), 1)
        self.assertEqual(requeued[0]["count"], 1)
        self.assertEqual(requeued[0]["dropped"], 3)

        self.clock.advance(1.0)
        protocol, transport = self.endpoint.accept()
        self.clock.advance(0)

        frames = decode_frames(transport.value())
        self.assertEqual(self.records(frames), [make_record(index) for index in (0, 4, 5, 6)])
        self.assertEqual(self.counters["fluent_resent"], 1)

    def test_ack_timeout_aborts_connection(self):
        forwarder = self.make_forwarder(ack_timeout=30.0)
        protocol, transport = self.connect(forwarder)
        forwarder.emit(make_record(0))
        forwarder.emit(make_record(1))
        self.clock.advance(0)

        self.clock.advance(29.9)
        self.assertFalse(transport.disconnected)

        self.clock.advance(0.1)

        self.assertTrue(transport.disconnected)
        self.assertFalse(forwarder.connected)
        self.assertEqual(self.counters["fluent_errors"], 1)
        self.assertEqual(forwarder.buffered, 2)
        timeouts = [warning for warning in self.warnings() if "timeout" in warning]
        self.assertEqual(len(timeouts), 1)
        self.assertEqual(timeouts[0]["timeout"], 30.0)

        # The aborted connection's end is not counted a second time.
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.counters["fluent_errors"], 1)

        self.clock.advance(1.0)
        protocol, transport = self.endpoint.accept()
        self.clock.advance(0)

        [frame] = decode_frames(transport.value())
        self.assertEqual(self.records([frame]), [make_record(0), make_record(1)])
        self.assertEqual(self.counters["fluent_resent"], 2)
        self.ack(protocol, frame)
        self.assertEqual(self.counters["fluent_sent"], 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_ack_timeout_counts_from_oldest_frame(self):
        forwarder = self.make_forwarder(ack_timeout=30.0)
        protocol, transport = self.connect(forwarder)
        forwarder.emit(make_record(0))
        self.clock.advance(0)
        self.clock.advance(10)
        forwarder.emit(make_record(1))
        self.clock.advance(0)
        self.clock.advance(10)
        first, second = decode_frames(transport.value())

        self.ack(protocol, first)
        self.clock.advance(19.9)
        self.assertFalse(transport.disconnected)

        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.counters["fluent_sent"], 1)
        self.assertEqual(forwarder.buffered, 1)

    def test_stop_waits_for_acks(self):
        forwarder = self.make_forwarder()
        protocol, transport = self.connect(forwarder)
        for index in range(3):
            forwarder.emit(make_record(index))
        stopped = []

        forwarder.stopService().addCallback(stopped.append)
        self.clock.advance(0)
        self.assertFalse(transport.disconnecting)

        [frame] = decode_frames(transport.value())
        self.ack(protocol, frame)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))

        self.assertEqual(stopped, [None])
        self.assertEqual(self.counters["fluent_sent"], 3)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(self.counters["fluent_errors"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_drops_unacked_after_timeout(self):
        forwarder = self.make_forwarder(shutdown_timeout=2.0, batch_size=2, max_unacked_frames=1)
        protocol, transport = self.connect(forwarder)
        for index in range(5):
            forwarder.emit(make_record(index))
        self.clock.advance(0)
        stopped = []

        forwarder.stopService().addCallback(stopped.append)
        self.clock.advance(2.0)

        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(stopped, [None])
        self.assertEqual(self.counters["fluent_dropped"], 5)
        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assertEqual(self.counters["fluent_errors"], 0)
        self.assertEqual(forwarder.buffered, 0)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acks_off_frame_has_no_options(self):
        forwarder = self.make_forwarder(require_ack_response=False)
        protocol, transport = self.connect(forwarder)
        forwarder.emit(make_record(0))
        self.clock.advance(0)

        [frame] = decode_frames(transport.value())
        protocol.dataReceived(b"\xc1")

        self.assertEqual(len(frame), 2)
        self.assertEqual(self.counters["fluent_sent"], 1)
        self.assertTrue(forwarder.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_invalid_ack_bounds_rejected(self):
        with self.assertRaises(ValueError):
            self.make_forwarder(max_unacked_frames=0)
        with self.assertRaises(ValueError):
            self.make_forwarder(ack_timeout=0)


class AckOptionTests(SynchronousTestCase):
    """
    --fluent-ack and FLUENT_ACK reach the forwarder.
    """

    def build_forwarder(self, arguments=(), environ=None):
        options = Options(environ=environ or {})
        options.parseOptions(list(arguments))
        return makeService(options, reactor=MemoryReactorClock(), handle_signals=False).fluent

    def test_off_by_default(self):
        self.assertFalse(self.build_forwarder().require_ack_response)

    def test_flag_turns_acks_on(self):
        self.assertTrue(self.build_forwarder(["--fluent-ack"]).require_ack_response)

    def test_environment_turns_acks_on(self):
        self.assertTrue(self.build_forwarder(environ={"FLUENT_ACK": "yes"}).require_ack_response)
        self.assertFalse(self.build_forwarder(environ={"FLUENT_ACK": "0"}).require_ack_response)


class ReceiverDecodingTests(TestCase):
    """
    The test receiver decodes every Forward-protocol mode.
    """

    def setUp(self):
        self.receiver = ForwardReceiver(Clock())
        self.protocol = ForwardProtocol(self.receiver)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def test_message_mode_from_fluent_logger(self):
        sender = FluentSender(TAG, nanosecond_precision=True)
        packet = sender._make_packet(None, 1_700_000_000.25, make_record(1))

        # Split in two to check decoding across reads.
        self.protocol.dataReceived(packet[:7])
        self.protocol.dataReceived(packet[7:])

        self.assertEqual(self.receiver.events, [(TAG, 1_700_000_000.25, make_record(1))])
        self.assertEqual(self.receiver.errors, [])

    def test_packed_forward_modes(self):
        entries = msgpack.packb([1, make_record(1)]) + msgpack.packb([2, make_record(2)])

        self.protocol.dataReceived(msgpack.packb([TAG, entries]))
        self.protocol.dataReceived(msgpack.packb([TAG, gzip.compress(entries), {"compressed": "gzip"}]))

        expected = [(TAG, 1, make_record(1)), (TAG, 2, make_record(2))]
        self.assertEqual(self.receiver.events, expected + expected)
        self.assertEqual(self.receiver.frames, 2)

    def test_chunk_option_acked(self):
        self.protocol.dataReceived(msgpack.packb([TAG, [[1, make_record(1)]], {"chunk": "abc"}]))

        self.assertEqual(decode_frames(self.transport.value()), [{"ack": "abc"}])
        self.assertEqual(len(self.receiver.events), 1)

    def test_acks_switched_off(self):
        self.receiver.send_acks = False

        self.protocol.dataReceived(msgpack.packb([TAG, [[1, make_record(1)]], {"chunk": "abc"}]))

        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(len(self.receiver.events), 1)

    def test_drop_after_aborts_without_ack(self):
        self.receiver.drop_after = 3
        frames = []
        for index in range(3):
            entries = [[1, make_record(2 * index)], [1, make_record(2 * index + 1)]]
            frames.append(msgpack.packb([TAG, entries, {"chunk": str(index)}]))

        self.protocol.dataReceived(b"".join(frames))

        # The first frame is acknowledged, the second stored and not, and
        # the third, read after the abort, is lost.
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(decode_frames(self.transport.value()), [{"ack": "0"}])
        records = [record for _, _, record in self.receiver.events]
        self.assertEqual(records, [make_record(index) for index in range(4)])
        self.assertIsNone(self.receiver.drop_after)

    def test_invalid_frame_recorded(self):
        self.protocol.dataReceived(msgpack.packb([1, 2]))
        self.protocol.dataReceived(msgpack.packb([TAG, 1]))

        self.assertEqual(self.receiver.events, [])
        self.assertEqual(len(self.receiver.errors), 2)


def quick_retries(attempt):
    """
    Retry every 0.1 s, so that integration tests see a reconnection soon.
    """
    return 0.1


class ForwarderIntegrationTests(TestCase):
    """
    The forwarder against a real Forward-protocol receiver on 127.0.0.1,
    with the real reactor. Every wait is bounded.
    """

    timeout = 60

    def setUp(self):
        self.counters = Counters()
        self.receiver = ForwardReceiver(reactor).start()
        self.addCleanup(self.stop_receiver)

    def stop_receiver(self):
        self.receiver.reading = True
        return self.receiver.stop()

    def make_forwarder(self, port=None, **options):
        options.setdefault("retry_policy", quick_retries)
        forwarder = FluentForwarder(
            "127.0.0.1", port or self.receiver.port, self.counters, reactor, **options
        )
        self.addCleanup(self.stop_forwarder, forwarder)
        return forwarder

    def stop_forwarder(self, forwarder):
        if forwarder.running:
            return forwarder.stopService()

    @inlineCallbacks
    def wait_until(self, condition, timeout=10.0, description="condition"):
        """
        Poll ``condition`` every 10 ms for at most ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{description} not reached within {timeout} s")
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def refused_port(self):
        """
        Return a loopback port that was just closed, so connecting is refused.
        """
        closed = ForwardReceiver(reactor).start()
        yield closed.stop()
        return closed.port

    @inlineCallbacks
    def test_thousand_records_arrive_in_order(self):
        forwarder = self.make_forwarder()
        forwarder.startService()

        for index in range(1000):
            forwarder.emit(make_record(index))
        events = yield self.receiver.wait_for(1000)

        self.assertEqual(len(events), 1000)
        self.assertEqual({tag for tag, _, _ in events}, {TAG})
        self.assertEqual([record for _, _, record in events], [make_record(index) for index in range(1000)])
        now = time.time()
        for _, event_time, _ in events:
            self.assertIsInstance(event_time, int)
            self.assertLessEqual(abs(event_time - now), 60)
        self.assertEqual(self.counters["fluent_sent"], 1000)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(self.receiver.errors, [])

    @inlineCallbacks
    def test_absent_receiver_emit_never_blocks(self):
        port = yield self.refused_port()
        forwarder = self.make_forwarder(port=port, max_buffer=1000, shutdown_timeout=0.5)
        forwarder.startService()
        yield self.wait_until(lambda: self.counters["fluent_errors"] >= 1, description="a refused connection")

        started = time.perf_counter()
        for index in range(10_000):
            forwarder.emit(make_record(index))
        elapsed = time.perf_counter() - started

        # Only a sanity bound, far above the cost: an emit takes well under
        # 1 µs, and building the record takes longer.
        self.assertLess(elapsed, 1.0)
        self.assertEqual(forwarder.buffered, 1000)
        self.assertEqual(self.counters["fluent_dropped"], 9000)
        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assertFalse(forwarder.connected)

    @inlineCallbacks
    def test_receiver_not_reading_bounds_buffer(self):
        self.receiver.pause_reading()
        forwarder = self.make_forwarder(max_buffer=5000)
        forwarder.startService()
        yield self.wait_until(lambda: forwarder.connected, description="a connection")

        # Records of about 1.2 KB fill the kernel's socket buffers (a few MB
        # on loopback) sooner. Each reactor turn emits one burst of records,
        # as one read of many datagrams would.
        padding = "x" * 1000
        emitted = 0
        deadline = time.monotonic() + 20
        while self.counters["fluent_dropped"] == 0 and emitted < 2_000_000:
            self.assertLess(time.monotonic(), deadline, "no record dropped within 20 s")
            for _ in range(2000):
                forwarder.emit(make_record(emitted, padding))
                emitted += 1
            yield deferLater(reactor, 0, lambda: None)

        # Once dropping, keep emitting for a while: nothing may grow.
        for _ in range(20):
            for _ in range(2000):
                forwarder.emit(make_record(emitted, padding))
                emitted += 1
            yield deferLater(reactor, 0.005, lambda: None)

        sent = self.counters["fluent_sent"]
        dropped = self.counters["fluent_dropped"]
        self.assertLessEqual(forwarder.buffered, 5000)
        self.assertGreater(dropped, 0)
        self.assertEqual(sent + dropped + forwarder.buffered, emitted)

        # The transport pauses us above TRANSPORT_BUFFER_SIZE unsent bytes,
        # after at most one more frame of 1000 records of about 1.2 KB.
        transport = forwarder._protocol.transport
        unsent = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        self.assertLess(unsent, TRANSPORT_BUFFER_SIZE + 1000 * 1300)

        # Every record handed to the socket arrives once Fluentd reads again.
        self.receiver.resume_reading()
        events = yield self.receiver.wait_for(sent, timeout=20)
        self.assertEqual(len(events), sent)
        self.assertEqual(events[0][2], make_record(0, padding))

    @inlineCallbacks
    def test_receiver_restart_resumes(self):
        forwarder = self.make_forwarder()
        forwarder.startService()
        for index in range(10):
            forwarder.emit(make_record(index))
        yield self.receiver.wait_for(10)

        yield self.receiver.stop()
        yield self.wait_until(lambda: not forwarder.connected, description="the disconnection")
        for index in range(10, 20):
            forwarder.emit(make_record(index))
        self.assertEqual(forwarder.buffered, 10)

        self.receiver.start()
        events = yield self.receiver.wait_for(20, timeout=15)

        self.assertEqual([record for _, _, record in events], [make_record(index) for index in range(20)])
        self.assertGreaterEqual(self.counters["fluent_errors"], 1)
        self.assertEqual(self.counters["fluent_dropped"], 0)

    @inlineCallbacks
    def test_stop_unreachable_within_timeout(self):
        port = yield self.refused_port()
        forwarder = self.make_forwarder(port=port, shutdown_timeout=1.0)
        forwarder.startService()
        for index in range(100):
            forwarder.emit(make_record(index))

        started = time.monotonic()
        yield forwarder.stopService()
        elapsed = time.monotonic() - started

        self.assertLess(elapsed, 1.5)
        self.assertEqual(self.counters["fluent_dropped"], 100)
        self.assertEqual(forwarder.buffered, 0)

    @inlineCallbacks
    def test_stop_live_flushes_everything(self):
        forwarder = self.make_forwarder()
        forwarder.startService()
        yield self.wait_until(lambda: forwarder.connected, description="a connection")

        for index in range(5000):
            forwarder.emit(make_record(index))
        yield forwarder.stopService()

        self.assertFalse(forwarder.connected)
        self.assertEqual(self.counters["fluent_sent"], 5000)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        events = yield self.receiver.wait_for(5000)
        self.assertEqual([record for _, _, record in events], [make_record(index) for index in range(5000)])

    def assert_accounted(self, forwarder, emitted):
        """
        Check that each of ``emitted`` records is sent, dropped, buffered or
        waiting for an ack.
        """
        total = (
            self.counters["fluent_sent"]
            + self.counters["fluent_dropped"]
            + forwarder.buffered
            + forwarder.unacked
        )
        self.assertEqual(total, emitted)

    @inlineCallbacks
    def test_acks_count_sent(self):
        forwarder = self.make_forwarder(require_ack_response=True)
        forwarder.startService()

        for index in range(1000):
            forwarder.emit(make_record(index))
        events = yield self.receiver.wait_for(1000)
        yield self.wait_until(
            lambda: self.counters["fluent_sent"] == 1000, description="1000 acknowledged records"
        )

        self.assertEqual([record for _, _, record in events], [make_record(index) for index in range(1000)])
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(forwarder.buffered, 0)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(self.counters["fluent_resent"], 0)
        self.assertEqual(self.receiver.errors, [])

    @inlineCallbacks
    def test_dropped_connection_resends_records(self):
        self.receiver.drop_after = 1500
        forwarder = self.make_forwarder(require_ack_response=True, batch_size=100)
        forwarder.startService()
        yield self.wait_until(lambda: forwarder.connected, description="a connection")

        for index in range(5000):
            forwarder.emit(make_record(index))
        yield self.wait_until(
            lambda: self.counters["fluent_sent"] == 5000, timeout=20, description="5000 acknowledged records"
        )

        # Every record arrived at least once, and the first arrival of each
        # follows the order of emission.
        numbers = [taxi_number(record) for _, _, record in self.receiver.events]
        first_arrivals = list(dict.fromkeys(numbers))
        self.assertEqual(first_arrivals, list(range(5000)))

        duplicates = len(numbers) - 5000
        resent = self.counters["fluent_resent"]
        self.assertGreater(resent, 0)
        self.assertLessEqual(duplicates, resent)
        self.assertGreaterEqual(self.receiver.accepted, 2)
        self.assertGreaterEqual(self.counters["fluent_errors"], 1)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(forwarder.buffered, 0)
        self.assertEqual(forwarder.unacked, 0)
        self.assert_accounted(forwarder, 5000)

    @inlineCallbacks
    def test_receiver_not_acking_bounds_writing(self):
        self.receiver.send_acks = False
        forwarder = self.make_forwarder(
            require_ack_response=True,
            max_unacked_frames=4,
            batch_size=10,
            max_buffer=100,
            ack_timeout=60.0,
            shutdown_timeout=0.5,
        )
        forwarder.startService()
        yield self.wait_until(lambda: forwarder.connected, description="a connection")

        # Ten bursts of 100 records, one per reactor turn. The first flush
        # writes four frames of 10 records, then nothing more is written.
        emit_seconds = 0.0
        for burst in range(10):
            started = time.perf_counter()
            for index in range(burst * 100, burst * 100 + 100):
                forwarder.emit(make_record(index))
            emit_seconds += time.perf_counter() - started
            yield deferLater(reactor, 0.01, lambda: None)
        yield self.wait_until(lambda: len(self.receiver.events) == 40, description="40 records")
        yield deferLater(reactor, 0.2, lambda: None)

        self.assertEqual(self.receiver.frames, 4)
        self.assertEqual(len(self.receiver.events), 40)
        self.assertEqual(forwarder.unacked, 40)
        self.assertEqual(forwarder.buffered, 100)
        self.assertEqual(self.counters["fluent_dropped"], 860)
        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assert_accounted(forwarder, 1000)

        # Only a sanity bound, far above the cost of 1000 emits.
        self.assertLess(emit_seconds, 1.0)

        started = time.monotonic()
        yield forwarder.stopService()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(self.counters["fluent_dropped"], 1000)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(forwarder.buffered, 0)

    @inlineCallbacks
    def test_ack_timeout_reconnects(self):
        self.receiver.send_acks = False
        forwarder = self.make_forwarder(require_ack_response=True, ack_timeout=0.3)
        forwarder.startService()
        yield self.wait_until(lambda: forwarder.connected, description="a connection")

        for index in range(10):
            forwarder.emit(make_record(index))
        yield self.wait_until(lambda: self.receiver.accepted >= 2, description="a second connection")
        self.receiver.send_acks = True
        yield self.wait_until(
            lambda: self.counters["fluent_sent"] == 10, description="10 acknowledged records"
        )

        self.assertGreaterEqual(self.counters["fluent_errors"], 1)
        self.assertGreaterEqual(self.counters["fluent_resent"], 10)
        self.assertGreaterEqual(len(self.receiver.events), 20)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(forwarder.unacked, 0)
        self.assertEqual(forwarder.buffered, 0)
