"""
What lands in Redis for accepted positions: the exact keys and values that
the API reads.
"""

import time

from twisted.internet import defer

from tests.harness import OPERATOR, ServerTestCase, encode, position


class LayoutTests(ServerTestCase):
    """
    Positions sent over a real UDP socket and read back from a real Redis.
    """

    def assert_stored(self, taxi, timestamp, lat, lon, version=2, status="free", device="phone",
                      operator=OPERATOR):
        stored = self.redis.command("HGET", f"taxi:{taxi}", operator)
        self.assertEqual(stored, f"{timestamp} {lat!r} {lon!r} {status} {device} {version}")

        for key, member in (("geoindex", taxi), ("geoindex_2", f"{taxi}:{operator}")):
            [[stored_lon, stored_lat]] = self.redis.command("GEOPOS", key, member)
            self.assertLessEqual(abs(float(stored_lon) - lon), 1e-5)
            self.assertLessEqual(abs(float(stored_lat) - lat), 1e-5)

        now = time.time()
        for key, member in (("timestamps", f"{taxi}:{operator}"), ("timestamps_id", taxi)):
            score = float(self.redis.command("ZSCORE", key, member))
            self.assertEqual(score, int(score))
            self.assertLessEqual(abs(score - now), 5)

    @defer.inlineCallbacks
    def test_numbers_stored(self):
        """
        Fields sent as JSON numbers are stored as the API reads them.
        """
        now = int(time.time())
        self.send(position(taxi="numbers", lat=48.856613, lon=2.352222, timestamp=now, version=2))
        yield self.settle(1)

        self.assert_stored("numbers", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_strings_stored(self):
        """
        Fields sent as JSON strings, with a comma decimal, are stored as the
        same integers and floats.
        """
        now = int(time.time())
        self.send(position(taxi="strings", lat="48,856613", lon="2.3522220", timestamp=str(now), version="2"))
        yield self.settle(1)

        self.assert_stored("strings", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_millisecond_timestamp_stored_in_seconds(self):
        """
        A 13-digit timestamp is milliseconds and is stored in seconds.
        """
        now = int(time.time())
        self.send(position(taxi="ms", timestamp=now * 1000 + 999))
        yield self.settle(1)

        self.assert_stored("ms", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_fractional_timestamp_truncated(self):
        """
        The fractional part of a timestamp, number or string, is dropped.
        """
        now = int(time.time())
        self.send(position(taxi="fraction", timestamp=now + 0.75))
        self.send(position(taxi="fraction-text", timestamp=f"{now}.75"))
        yield self.settle(2)

        self.assert_stored("fraction", now, 48.856613, 2.352222)
        self.assert_stored("fraction-text", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_exponent_coordinates(self):
        """
        Coordinates written with an exponent are stored as Python floats.
        """
        now = int(time.time())
        self.send(encode(position(taxi="exp", timestamp=now)).replace(b"48.856613", b"4.8856613e1"))
        yield self.settle(1)

        self.assert_stored("exp", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_byte_order_mark_ignored(self):
        """
        A UTF-8 byte-order mark before the JSON is ignored.
        """
        now = int(time.time())
        self.send(b"\xef\xbb\xbf" + encode(position(taxi="bom", timestamp=now)))
        yield self.settle(1)

        self.assert_stored("bom", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_extra_fields_ignored(self):
        """
        Unknown fields, nested ones included, are ignored.
        """
        now = int(time.time())
        self.send(position(taxi="extra", timestamp=now, speed=12.5, meta={"a": [1, 2, {"b": None}]}))
        yield self.settle(1)

        self.assert_stored("extra", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_version_as_integral_float(self):
        """
        A version sent as the JSON number 2.0 is an integer for JSON Schema
        and is stored as 2.
        """
        now = int(time.time())
        self.send(position(taxi="v2", timestamp=now, version=2.0))
        yield self.settle(1)

        self.assert_stored("v2", now, 48.856613, 2.352222)

    @defer.inlineCallbacks
    def test_unicode_taxi_and_operator(self):
        """
        Non-ASCII ids without whitespace or ':' are stored verbatim.
        """
        now = int(time.time())
        self.send(position(taxi="taxi-é", operator="opérateur@exemple.fr", timestamp=now))
        yield self.settle(1)

        self.assert_stored("taxi-é", now, 48.856613, 2.352222, operator="opérateur@exemple.fr")

    @defer.inlineCallbacks
    def test_1000_taxis_all_stored(self):
        """
        A fleet of 1000 taxis, half sending numbers and half strings, lands
        whole: every hash value, both geo sets and both timestamp sets.
        """
        now = int(time.time())
        fleet = []
        for number in range(1000):
            lat = round(48.80 + number * 0.0001, 6)
            lon = round(2.25 + number * 0.0002, 6)
            fleet.append((f"fleet-{number}", lat, lon))
            if number % 2:
                self.send(position(taxi=f"fleet-{number}", lat=lat, lon=lon, timestamp=now))
            else:
                self.send(position(taxi=f"fleet-{number}", lat=str(lat).replace(".", ","), lon=str(lon),
                                   timestamp=str(now), version="2"))
            if number % 100 == 99:
                # Stay well under the default receive buffer of the test host.
                yield self.wait_for(lambda n=number: self.counters["received"] > n, "datagrams read")
        yield self.settle(1000)

        self.assertEqual(self.counters["written"], 1000)
        for taxi, lat, lon in fleet:
            self.assert_stored(taxi, now, lat, lon)
        self.assertEqual(self.redis.command("ZCARD", "geoindex"), 1000)
        self.assertEqual(self.redis.command("ZCARD", "geoindex_2"), 1000)
        self.assertEqual(self.redis.command("ZCARD", "timestamps"), 1000)
        self.assertEqual(self.redis.command("ZCARD", "timestamps_id"), 1000)
