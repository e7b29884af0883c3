"""
Unit tests of geotaxi.protocol.PositionProtocol, fed by direct calls to
datagramReceived with a fake clock, in-memory writer and Fluentd doubles, and
the log captured from the global log publisher.
"""

import json

from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from geotaxi.counters import Counters
from geotaxi.protocol import PositionProtocol
from tests.samples import FIELDS, NOW, OPERATOR

MEMBER = "taxi-1:" + OPERATOR
ADDRESS = ("203.0.113.7", 40000)


def encode(**fields):
    """
    Return a valid datagram with ``fields`` replacing the defaults.
    """
    return json.dumps(dict(FIELDS, **fields)).encode()


# (reason, datagram) for every rejection decided before ordering.
REJECTIONS = [
    ("too_large", encode(padding="x" * 4096)),
    ("invalid_utf8", encode(taxi="taxi-@").replace(b"@", b"\xff")),
    ("invalid_json", b'{"taxi": '),
    ("invalid_field", encode(lat="nan")),
    ("out_of_range", encode(lat=85.06)),
    ("zero_position", encode(lat=0, lon=0)),
    ("timestamp_window", encode(timestamp=NOW + 601)),
]


class WriterDouble:
    """
    A writer that records each submitted (member, position).
    """

    def __init__(self):
        self.calls = []

    def submit(self, member, position):
        self.calls.append((member, position))
        return True


class FailingWriter:
    """
    A writer whose submit() raises, as a bug in the writer would.
    """

    def __init__(self):
        self.calls = 0

    def submit(self, member, position):
        self.calls += 1
        raise ValueError("writer bug")


class FluentDouble:
    """
    A Fluentd forwarder that records each emitted record.
    """

    def __init__(self):
        self.records = []

    def emit(self, record):
        self.records.append(record)


class ProtocolTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.counters = Counters()
        self.writer = WriterDouble()
        self.fluent = FluentDouble()
        self.protocol = self.make_protocol()

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def make_protocol(self, **options):
        protocol = PositionProtocol(self.clock, self.counters, self.writer, fluent=self.fluent, **options)
        protocol.makeConnection(FakeDatagramTransport())
        return protocol

    def receive(self, data, address=ADDRESS):
        self.protocol.datagramReceived(data, address)

    def protocol_events(self):
        """
        Return the log events of the protocol module, formatted.
        """
        return [formatEvent(event) for event in self.events if event.get("log_namespace") == "geotaxi.protocol"]


class AcceptTests(ProtocolTestCase):
    def test_accepted(self):
        """
        A valid datagram is counted, written and forwarded.
        """
        self.receive(encode())

        self.assertEqual(self.counters["received"], 1)
        self.assertEqual(self.counters["accepted"], 1)
        self.assertEqual(len(self.writer.calls), 1)
        self.assertEqual(len(self.fluent.records), 1)

    def test_submit_arguments(self):
        """
        The writer gets the member and the normalised position.
        """
        self.receive(encode(lat="48,856613", timestamp=str(NOW * 1000)))

        member, position = self.writer.calls[0]
        self.assertEqual(member, MEMBER)
        self.assertEqual(position.value, f"{NOW} 48.856613 2.352222 free phone 2")

    def test_fluent_record(self):
        """
        Fluentd gets the normalised record with the hash.
        """
        self.receive(encode(lat="48,856613", version="2"))

        self.assertEqual(self.fluent.records[0]["lat"], 48.856613)
        self.assertEqual(self.fluent.records[0]["version"], 2)
        self.assertEqual(self.fluent.records[0]["hash"], FIELDS["hash"])

    def test_without_fluent(self):
        """
        Without a Fluentd forwarder, accepted positions are still written.
        """
        self.protocol = PositionProtocol(self.clock, self.counters, self.writer)

        self.receive(encode())

        self.assertEqual(self.counters["accepted"], 1)
        self.assertEqual(len(self.writer.calls), 1)

    def test_verbose(self):
        """
        With verbose, each accepted position is logged at debug level.
        """
        self.protocol = self.make_protocol(verbose=True)

        self.receive(encode())

        debug = [event for event in self.events if event.get("log_level") == LogLevel.debug]
        self.assertEqual(len(debug), 1)
        self.assertIn(MEMBER, formatEvent(debug[0]))

    def test_quiet(self):
        """
        Without verbose, an accepted position logs nothing.
        """
        self.receive(encode())

        self.assertEqual(self.protocol_events(), [])


class RejectionTests(ProtocolTestCase):
    def test_each_reason_counted(self):
        """
        Each rejection is counted under its reason, once.
        """
        for reason, data in REJECTIONS:
            counters = Counters()
            protocol = PositionProtocol(self.clock, counters, self.writer, fluent=self.fluent)
            protocol.datagramReceived(data, ADDRESS)
            self.assertEqual(counters["received"], 1, reason)
            self.assertEqual(counters[reason], 1, reason)
            self.assertEqual(counters["accepted"], 0, reason)
            self.assertEqual(sum(counters.values()), 2, reason)

    def test_rejected_not_written(self):
        """
        A rejected datagram is neither written nor forwarded.
        """
        for _, data in REJECTIONS:
            self.receive(data)

        self.assertEqual(self.writer.calls, [])
        self.assertEqual(self.fluent.records, [])

    def test_log_line(self):
        """
        A rejection is logged with the source, the reason, the detail and the value.
        """
        self.receive(encode(lat=85.06))

        lines = self.protocol_events()
        self.assertEqual(len(lines), 1)
        self.assertEqual(
            lines[0],
            "Rejected datagram from 203.0.113.7:40000 (out_of_range): "
            "lat outside [-85.05112878, 85.05112878]; value: 85.06",
        )

    def test_log_level(self):
        """
        Rejections are logged as warnings.
        """
        self.receive(b"[]")

        levels = [event["log_level"] for event in self.events if event.get("log_namespace") == "geotaxi.protocol"]
        self.assertEqual(levels, [LogLevel.warn])

    def test_ipv6_source(self):
        """
        An IPv6 source is logged in brackets before the port.
        """
        self.receive(b"[]", ("2001:db8::1", 40000, 0, 0))

        self.assertIn("from [2001:db8::1]:40000 ", self.protocol_events()[0])

    def test_long_value_truncated(self):
        """
        A long offending value is cut to 120 characters in the value part of the log line.
        """
        self.receive(encode(operator="o" * 300))

        value = self.protocol_events()[0].split("; value: ")[-1]
        self.assertEqual(value, "'" + "o" * 119 + "...")

    def test_control_characters_escaped(self):
        """
        Control characters of a rejected value reach the log escaped, so a
        datagram cannot forge a log line or send terminal escapes.
        """
        self.receive(encode(status="a\rFAKE\x1b[2J"))

        line = self.protocol_events()[0]
        self.assertNotIn("\r", line)
        self.assertNotIn("\x1b", line)
        self.assertIn("\\r", line)

    def test_deep_field_value(self):
        """
        A field nested 1000 deep is counted as invalid_field, not as an internal error.
        """
        self.receive(json.dumps(FIELDS).replace("48.856613", "[" * 1000 + "]" * 1000).encode())

        self.assertEqual(self.counters["invalid_field"], 1)
        self.assertEqual(self.counters["internal_errors"], 0)


class ZeroPositionTests(ProtocolTestCase):
    def test_zero_rejected(self):
        """
        Exactly (0, 0), in any form, is rejected as zero_position.
        """
        for lat, lon in [(0, 0), (0.0, -0.0), ("0", "0,0"), ("-0", "0e5")]:
            self.receive(encode(lat=lat, lon=lon))

        self.assertEqual(self.counters["zero_position"], 4)
        self.assertEqual(self.writer.calls, [])

    def test_zero_log_value(self):
        """
        The logged value of a zero position is "0, 0".
        """
        self.receive(encode(lat=0, lon=0))

        self.assertIn("(zero_position)", self.protocol_events()[0])
        self.assertIn("value: (0.0, 0.0)", self.protocol_events()[0])

    def test_one_zero_accepted(self):
        """
        A position on the equator or the prime meridian is accepted.
        """
        self.receive(encode(taxi="taxi-1", lat=0, lon=2.35))
        self.receive(encode(taxi="taxi-2", lat=48.85, lon=0))
        self.receive(encode(taxi="taxi-3", lat=0, lon=0.000001))

        self.assertEqual(self.counters["accepted"], 3)
        self.assertEqual(self.counters["zero_position"], 0)


class TimestampWindowTests(ProtocolTestCase):
    def check(self, timestamp, taxi="taxi-1"):
        """
        Send one position and return the reason it was counted under.
        """
        before = Counters(self.counters)
        self.receive(encode(taxi=taxi, timestamp=timestamp))
        changed = [name for name in self.counters if name != "received" and self.counters[name] != before[name]]
        return changed[0]

    def test_future_bound(self):
        """
        Up to max_future seconds ahead is accepted; one more is rejected.
        """
        self.assertEqual(self.check(NOW + 600, "taxi-1"), "accepted")
        self.assertEqual(self.check(NOW + 601, "taxi-2"), "timestamp_window")

    def test_age_bound(self):
        """
        Up to max_age seconds behind is accepted; one more is rejected.
        """
        self.assertEqual(self.check(NOW - 3600, "taxi-1"), "accepted")
        self.assertEqual(self.check(NOW - 3601, "taxi-2"), "timestamp_window")

    def test_custom_bounds(self):
        """
        max_future and max_age set the bounds.
        """
        self.protocol = self.make_protocol(max_future=10, max_age=20)

        self.assertEqual(self.check(NOW + 10, "taxi-1"), "accepted")
        self.assertEqual(self.check(NOW + 11, "taxi-2"), "timestamp_window")
        self.assertEqual(self.check(NOW - 20, "taxi-3"), "accepted")
        self.assertEqual(self.check(NOW - 21, "taxi-4"), "timestamp_window")

    def test_future_disabled(self):
        """
        max_future=0 accepts any timestamp ahead, and still bounds the age.
        """
        self.protocol = self.make_protocol(max_future=0)

        self.assertEqual(self.check(NOW + 10**8, "taxi-1"), "accepted")
        self.assertEqual(self.check(NOW - 3601, "taxi-2"), "timestamp_window")

    def test_age_disabled(self):
        """
        max_age=0 accepts any timestamp behind, and still bounds the future.
        """
        self.protocol = self.make_protocol(max_age=0)

        self.assertEqual(self.check(NOW - 10**8, "taxi-1"), "accepted")
        self.assertEqual(self.check(0, "taxi-2"), "accepted")
        self.assertEqual(self.check(NOW + 601, "taxi-3"), "timestamp_window")

    def test_milliseconds(self):
        """
        A millisecond timestamp is checked in seconds.
        """
        self.assertEqual(self.check((NOW + 600) * 1000, "taxi-1"), "accepted")
        self.assertEqual(self.check((NOW - 3601) * 1000, "taxi-2"), "timestamp_window")

    def test_follows_clock(self):
        """
        The window moves with the server clock.
        """
        self.clock.advance(3600)

        self.assertEqual(self.check(NOW - 1, "taxi-1"), "timestamp_window")
        self.assertEqual(self.check(NOW + 4200, "taxi-2"), "accepted")

    def test_log_details(self):
        """
        The log line states how far ahead or behind the timestamp is.
        """
        self.receive(encode(taxi="taxi-1", timestamp=NOW + 601))
        self.receive(encode(taxi="taxi-2", timestamp=NOW - 3700))

        lines = self.protocol_events()
        self.assertIn("timestamp 601 s ahead of the server clock, over 600 s", lines[0])
        self.assertIn(f"value: {NOW + 601}", lines[0])
        self.assertIn("timestamp 3700 s behind the server clock, over 3600 s", lines[1])


class OrderingTests(ProtocolTestCase):
    def test_newer_written(self):
        """
        Newer positions of a taxi are all written.
        """
        for offset in (30, 20, 10):
            self.receive(encode(timestamp=NOW - offset))

        self.assertEqual(self.counters["accepted"], 3)
        self.assertEqual(len(self.writer.calls), 3)

    def test_out_of_order(self):
        """
        An older position is counted as out_of_order and not written.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 20))

        self.assertEqual(self.counters["out_of_order"], 1)
        self.assertEqual(self.counters["accepted"], 1)
        self.assertEqual(len(self.writer.calls), 1)

    def test_out_of_order_forwarded(self):
        """
        An out-of-order position still goes to Fluentd, the history.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 20))

        self.assertEqual([record["timestamp"] for record in self.fluent.records], [NOW - 10, NOW - 20])

    def test_duplicate(self):
        """
        An equal timestamp is counted as duplicate, neither written nor forwarded.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 10, lat=48.9))

        self.assertEqual(self.counters["duplicate"], 1)
        self.assertEqual(len(self.writer.calls), 1)
        self.assertEqual(len(self.fluent.records), 1)

    def test_per_operator(self):
        """
        Ordering is per taxi and operator.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 20, operator="other@example.org"))
        self.receive(encode(timestamp=NOW - 20, taxi="taxi-2"))

        self.assertEqual(self.counters["accepted"], 3)

    def test_future_newest_does_not_block(self):
        """
        A newest timestamp ahead of the clock does not block later positions.
        """
        self.receive(encode(timestamp=NOW + 300))
        self.receive(encode(timestamp=NOW - 10))

        self.assertEqual(self.counters["accepted"], 2)

    def test_rejected_not_remembered(self):
        """
        A position rejected by the window does not become the newest.
        """
        self.receive(encode(timestamp=NOW + 601))
        self.receive(encode(timestamp=NOW - 10))

        self.assertEqual(self.counters["accepted"], 1)

    def test_log_line(self):
        """
        An out-of-order position is logged with the member and the timestamp.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 20))

        self.assertEqual(
            self.protocol_events(),
            [f"Not written (out_of_order): position of {MEMBER} at {NOW - 20}, not newer than the last one accepted"],
        )

    def test_horizon_follows_max_age(self):
        """
        The ordering memory lasts as long as the timestamp window.
        """
        self.assertEqual(self.make_protocol(max_age=600).ordering.horizon, 600)
        self.assertEqual(self.make_protocol(max_age=0).ordering.horizon, 86400)


class FloodTests(ProtocolTestCase):
    def test_one_reason(self):
        """
        10,000 bad datagrams of one reason write a handful of log lines.
        """
        for _ in range(10_000):
            self.receive(b'{"taxi": ')

        self.assertEqual(self.counters["invalid_json"], 10_000)
        self.assertLessEqual(len(self.protocol_events()), 5)

    def test_every_reason(self):
        """
        A flood mixing every reason writes a handful of lines per reason.
        """
        for _ in range(1_000):
            for _, data in REJECTIONS:
                self.receive(data)

        for reason, _ in REJECTIONS:
            lines = [line for line in self.protocol_events() if f"({reason})" in line]
            self.assertEqual(self.counters[reason], 1_000, reason)
            self.assertLessEqual(len(lines), 5, reason)

    def test_out_of_order(self):
        """
        A flood of out-of-order positions writes a handful of log lines.
        """
        self.receive(encode(timestamp=NOW - 10))
        for _ in range(10_000):
            self.receive(encode(timestamp=NOW - 20))

        self.assertEqual(self.counters["out_of_order"], 10_000)
        self.assertLessEqual(len(self.protocol_events()), 5)

    def test_suppressed_reported(self):
        """
        After a flood, the next line contains the number of suppressed lines.
        """
        for _ in range(10_000):
            self.receive(b'{"taxi": ')
        self.clock.advance(1)
        self.receive(b'{"taxi": ')

        self.assertIn("(9995 similar lines suppressed)", self.protocol_events()[-1])


class InternalErrorTests(ProtocolTestCase):
    def setUp(self):
        super().setUp()
        self.writer = FailingWriter()
        self.protocol = self.make_protocol()

    def test_counted_not_raised(self):
        """
        An exception in the writer is counted as internal_errors and not raised.
        """
        self.receive(encode())

        self.assertEqual(self.counters["internal_errors"], 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_next_datagram(self):
        """
        The datagram after an internal error is processed.
        """
        self.receive(encode(timestamp=NOW - 10))
        self.receive(encode(timestamp=NOW - 5))

        self.assertEqual(self.writer.calls, 2)
        self.flushLoggedErrors(ValueError)

    def test_flood(self):
        """
        1,000 internal errors write a handful of log lines.
        """
        for offset in range(1_000):
            self.receive(encode(timestamp=NOW - 1_000 + offset))

        self.assertEqual(self.counters["internal_errors"], 1_000)
        self.assertLessEqual(len(self.flushLoggedErrors(ValueError)), 5)
