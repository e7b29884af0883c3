"""
Every rejection reason, sent as the exact bad datagram over a real UDP socket
to a server writing to a real Redis. Nothing is written, the reason is
counted and logged with the value, and the next good datagram is written.
"""

import json
import time

from twisted.internet import defer

from tests.harness import OPERATOR, ServerTestCase, encode, position

NOW = int(time.time())


def raw(**replacements):
    """
    Return a valid datagram in which each field's JSON text is replaced by the
    given raw text, so that tests can send what json.dumps cannot write.
    """
    message = position()
    for field, text in replacements.items():
        message[field] = f"@{field}@"
    data = encode(message).decode()
    for field, text in replacements.items():
        data = data.replace(f'"@{field}@"', text)
    return data.encode()


GOOD_STRING_FIELDS = {"status": "free", "device": "phone"}

# (case, datagram, reason, text the log line must contain)
CASES = [
    ("latitude 85.06", encode(position(lat=85.06)), "out_of_range", "85.06"),
    ("latitude -85.06 as a string", encode(position(lat="-85.06")), "out_of_range", "-85.06"),
    ("longitude 180.5", encode(position(lon=180.5)), "out_of_range", "180.5"),
    ("NaN literal", raw(lat="NaN"), "invalid_json", "NaN"),
    ("NaN string", encode(position(lat="NaN")), "invalid_field", "NaN"),
    ("nan string", encode(position(lon="nan")), "invalid_field", "nan"),
    ("Infinity literal", raw(lon="Infinity"), "invalid_json", "Infinity"),
    ("-Infinity literal", raw(lat="-Infinity"), "invalid_json", "-Infinity"),
    ("Infinity string", encode(position(lon="Infinity")), "invalid_field", "Infinity"),
    ("inf string", encode(position(lat="inf")), "invalid_field", "inf"),
    ("number overflowing to infinity", raw(lat="1e400"), "invalid_json", "1e400"),
    ("string overflowing to infinity", encode(position(lat="1e400")), "out_of_range", "1e400"),
    ("comma decimal with a space", encode(position(lat="48, 8566")), "invalid_field", "48, 8566"),
    ("comma decimal with a leading space", encode(position(lat=" 48,8566")), "invalid_field", " 48,8566"),
    ("underscore in a number string", encode(position(lon="2_35")), "invalid_field", "2_35"),
    ("zero position", encode(position(lat=0, lon=0)), "zero_position", "0, 0"),
    ("zero position as strings", encode(position(lat="0,0", lon="0.0")), "zero_position", "0, 0"),
    ("ISO timestamp", encode(position(timestamp="2026-12-04T20:00:00Z")), "invalid_field", "2026-12-04T20:00:00Z"),
    ("timestamp 10 years ahead", encode(position(timestamp=NOW + 10 * 365 * 86400)), "timestamp_window", str(NOW + 10 * 365 * 86400)),
    ("timestamp 1024 weeks behind", encode(position(timestamp=NOW - 1024 * 7 * 86400)), "timestamp_window", str(NOW - 1024 * 7 * 86400)),
    ("millisecond timestamp 2 hours behind", encode(position(timestamp=(NOW - 7200) * 1000)), "timestamp_window", str(NOW - 7200)),
    ("version 2.0 as a string", encode(position(version="2.0")), "invalid_field", "2.0"),
    ("version v2", encode(position(version="v2")), "invalid_field", "v2"),
    ("negative version", encode(position(version=-1)), "invalid_field", "-1"),
    ("empty status", encode(position(status="")), "invalid_field", "status"),
    ("status with a space", encode(position(status="not free")), "invalid_field", "not free"),
    ("status with a tab", encode(position(status="free\t")), "invalid_field", "status"),
    ("empty device", encode(position(device="")), "invalid_field", "device"),
    ("device with a space", encode(position(device="my phone")), "invalid_field", "my phone"),
    ("device with a no-break space", encode(position(device="my\u00a0phone")), "invalid_field", "device"),
    ("colon in taxi", encode(position(taxi="taxi:1")), "invalid_field", "taxi:1"),
    ("colon in operator", encode(position(operator="op:erator@example.org")), "invalid_field", "op:erator@example.org"),
    ("newline at the end of taxi", encode(position(taxi="taxi-1\n")), "invalid_field", "taxi"),
    ("taxi of 65 characters", encode(position(taxi="t" * 65)), "invalid_field", "taxi"),
    ("missing hash", encode({k: v for k, v in position().items() if k != "hash"}), "invalid_field", "'hash' is a required property"),
    ("short hash", encode(position(hash="abc")), "invalid_field", "abc"),
    ("boolean latitude", encode(position(lat=True)), "invalid_field", "True"),
    ("null longitude", encode(position(lon=None)), "invalid_field", "lon"),
    ("datagram of 9000 bytes", encode(position(padding="x" * 9000)), "too_large", "bytes"),
    ("4000 levels of nesting", raw(device="[" * 4000 + "]" * 4000), "too_large", "bytes"),
    ("1500 levels of nesting in the device", raw(device="[" * 1500 + "]" * 1500), "invalid_json", "depth"),
    ("500 levels of nesting in the device", raw(device="[" * 500 + "]" * 500), "invalid_field", "device"),
    ("4000 unclosed brackets", b"[" * 4000, "invalid_json", "[[[["),
    ("a JSON array", b"[1, 2]", "invalid_json", "list"),
    ("a JSON string", b'"taxi"', "invalid_json", "str"),
    ("empty datagram", b"", "invalid_json", "b''"),
    ("two byte-order marks", b"\xef\xbb\xbf" + b"\xef\xbb\xbf" + encode(position()), "invalid_json", "not JSON"),
    ("invalid UTF-8", encode(position(device="phone")).replace(b"phone", b"ph\xffne"), "invalid_utf8", "not UTF-8"),
    ("UTF-16 datagram", json.dumps(position()).encode("utf-16"), "invalid_utf8", "not UTF-8"),
]


class RejectionTests(ServerTestCase):
    """
    One test per bad datagram, generated from CASES.
    """

    @defer.inlineCallbacks
    def check_rejected(self, data, reason, logged):
        self.send(data)
        yield self.settle(1)

        self.assertEqual(self.keys(), [])
        self.assertEqual(self.counters[reason], 1)
        self.assertEqual(self.counters["accepted"], 0)
        lines = [line for line in self.log_lines() if f"({reason})" in line]
        self.assertEqual(len(lines), 1, self.log_lines())
        self.assertIn(logged, lines[0])

        self.send(position(taxi="next"))
        yield self.settle(2)
        self.assertEqual(self.counters["written"], 1)
        self.assertIsNotNone(self.redis.command("HGET", "taxi:next", OPERATOR))


def _make_test(data, reason, logged):
    def test(self):
        return self.check_rejected(data, reason, logged)

    return test


for _case, _data, _reason, _logged in CASES:
    _name = "test_" + "".join(c if c.isalnum() else "_" for c in _case.lower())
    _test = _make_test(_data, _reason, _logged)
    _test.__name__ = _name
    _test.__doc__ = f"A datagram with {_case} is rejected as {_reason}."
    setattr(RejectionTests, _name, _test)


class OrderingRejectionTests(ServerTestCase):
    """
    Positions older than, or equal to, the newest one accepted for the same
    taxi and operator.
    """

    @defer.inlineCallbacks
    def test_out_of_order_not_written(self):
        """
        A position older than the one stored is counted and not written.
        """
        self.send(position(timestamp=NOW))
        yield self.settle(1)
        self.send(position(timestamp=NOW - 30, lat=48.0))
        yield self.settle(2)

        self.assertEqual(self.counters["out_of_order"], 1)
        stored = self.redis.command("HGET", "taxi:taxi-1", OPERATOR)
        self.assertEqual(stored.split()[0], str(NOW))
        self.assertTrue(any("(out_of_order)" in line and str(NOW - 30) in line for line in self.log_lines()))

    @defer.inlineCallbacks
    def test_duplicate_not_written(self):
        """
        A position with the same timestamp as the stored one is a duplicate.
        """
        self.send(position(timestamp=NOW))
        yield self.settle(1)
        self.send(position(timestamp=NOW, lat=48.0))
        yield self.settle(2)

        self.assertEqual(self.counters["duplicate"], 1)
        self.assertEqual(self.counters["written"], 1)
        stored = self.redis.command("HGET", "taxi:taxi-1", OPERATOR)
        self.assertEqual(stored.split()[1], "48.856613")

    @defer.inlineCallbacks
    def test_future_newest_does_not_block(self):
        """
        After a position 5 minutes ahead of the server clock, a position at
        the server clock is still written.
        """
        self.send(position(timestamp=NOW + 300))
        yield self.settle(1)
        self.send(position(timestamp=NOW, lat=48.0))
        yield self.settle(2)

        self.assertEqual(self.counters["written"], 2)
        stored = self.redis.command("HGET", "taxi:taxi-1", OPERATOR)
        self.assertEqual(stored.split()[0], str(NOW))

    @defer.inlineCallbacks
    def test_other_operator_not_ordered(self):
        """
        Ordering is per taxi and operator: another operator's older position
        of the same taxi is written.
        """
        self.send(position(timestamp=NOW))
        self.send(position(timestamp=NOW - 30, operator="other@example.org"))
        yield self.settle(2)

        self.assertEqual(self.counters["written"], 2)
        self.assertEqual(self.counters["out_of_order"], 0)
