"""
The traffic generator: every datagram is valid and signed as the server
checks it, fleets keep stable ids and move a few metres, pacing keeps the
rate and the bounds, and nothing is sent outside loopback without consent.
Datagrams go only to sockets of this test on 127.0.0.1.
"""

import contextlib
import hashlib
import io
import json
import math
import re
import socket
import threading
import time
import unittest

from geotaxi import traffic
from geotaxi.traffic import PositionGenerator, send_traffic

SIGNED_FIELDS = ("timestamp", "operator", "taxi", "lat", "lon", "device", "status", "version")
FIELDS = set(SIGNED_FIELDS) | {"hash"}

# Reads numbers back as the text written in the datagram, which the
# signature covers.
TEXT_DECODER = json.JSONDecoder(parse_float=str, parse_int=str)

# The schema's rule for taxi, operator, status and device.
NAME_PATTERN = re.compile(r"[^\s:\x00-\x1f\x7f]+")
STATUS_PATTERN = re.compile(r"[^\s\x00-\x1f\x7f]{1,32}")
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def expected_hash(texts, key):
    signed = "".join(texts[name] for name in SIGNED_FIELDS) + key
    return hashlib.sha1(signed.encode("utf-8")).hexdigest()


def distance_metres(lat1, lon1, lat2, lon2):
    """Return the equirectangular distance, exact enough over a few metres."""
    dlat = math.radians(lat2 - lat1)
    dlon = math.radians(lon2 - lon1) * math.cos(math.radians((lat1 + lat2) / 2))
    return 6_371_000 * math.hypot(dlat, dlon)


class SinkTestCase(unittest.TestCase):
    """A UDP socket on 127.0.0.1 that receives what the generator sends."""

    def setUp(self):
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Room for every datagram of a test: the kernel charges about
        # 1,300 bytes per small datagram against this buffer.
        self.sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sink.bind(("127.0.0.1", 0))
        self.sink.settimeout(2.0)
        self.port = self.sink.getsockname()[1]

    def tearDown(self):
        self.sink.close()

    def receive(self, count):
        return [self.sink.recv(65535) for _ in range(count)]

    def assertNothingMore(self):
        self.sink.settimeout(0.1)
        with self.assertRaises(socket.timeout):
            self.sink.recv(65535)


class DatagramTest(unittest.TestCase):
    def check_datagram(self, data, now):
        message = json.loads(data)
        self.assertEqual(set(message), FIELDS)
        self.assertLessEqual(len(data), 4096)

        self.assertRegex(message["taxi"], NAME_PATTERN)
        self.assertLessEqual(len(message["taxi"]), 64)
        self.assertRegex(message["operator"], NAME_PATTERN)
        self.assertIn(message["status"], ("free", "occupied", "off"))
        self.assertRegex(message["status"], STATUS_PATTERN)
        self.assertEqual(message["device"], "phone")
        self.assertEqual(int(message["version"]), 2)
        self.assertRegex(message["hash"], r"\A[0-9a-f]{40}\Z")

        lat, lon = float(message["lat"]), float(message["lon"])
        self.assertTrue(48.8 < lat < 48.95, lat)
        self.assertTrue(2.2 < lon < 2.5, lon)
        self.assertLessEqual(abs(int(message["timestamp"]) - now), 2)
        return message

    def test_nine_valid_fields_as_numbers(self):
        now = int(time.time())
        for data in PositionGenerator(taxis=5, seed=1).batch(50):
            message = self.check_datagram(data, now)
            for name in ("lat", "lon"):
                self.assertIsInstance(message[name], float)
            for name in ("timestamp", "version"):
                self.assertIsInstance(message[name], int)

    def test_nine_valid_fields_as_strings(self):
        now = int(time.time())
        for data in PositionGenerator(taxis=5, seed=1, numbers_as_strings=True).batch(50):
            message = self.check_datagram(data, now)
            for name in ("lat", "lon", "timestamp", "version"):
                self.assertIsInstance(message[name], str)
                self.assertRegex(message[name], JSON_NUMBER)

    def test_signature_matches_formula(self):
        for strings in (False, True):
            generator = PositionGenerator(taxis=3, api_key="secret-key", seed=2, numbers_as_strings=strings)
            for data in generator.batch(30):
                texts = TEXT_DECODER.decode(data.decode())
                self.assertEqual(texts["hash"], expected_hash(texts, "secret-key"))

    def test_signature_matches_earlier_float_form(self):
        # The earlier server signed lat and lon as str(float(text)).
        for data in PositionGenerator(taxis=3, api_key="k", seed=3).batch(200):
            texts = TEXT_DECODER.decode(data.decode())
            self.assertEqual(str(float(texts["lat"])), texts["lat"])
            self.assertEqual(str(float(texts["lon"])), texts["lon"])

    def test_operator_with_quote_signed_decoded(self):
        generator = PositionGenerator(operator='o"b\\x@example.org', api_key="k", seed=4)
        texts = TEXT_DECODER.decode(generator.batch(1)[0].decode())
        self.assertEqual(texts["operator"], 'o"b\\x@example.org')
        self.assertEqual(texts["hash"], expected_hash(texts, "k"))

    def test_unsigned_hash_is_not_a_signature(self):
        for data in PositionGenerator(seed=5).batch(20):
            texts = TEXT_DECODER.decode(data.decode())
            self.assertRegex(texts["hash"], r"\A[0-9a-f]{40}\Z")

    def test_server_parser_accepts_datagrams(self):
        # The server's own parser, with the schema it validates against.
        from geotaxi import datagram

        for strings in (False, True):
            for data in PositionGenerator(taxis=10, seed=6, numbers_as_strings=strings).batch(100):
                position = datagram.parse(data)
                self.assertEqual(position.device, "phone")

    def test_server_verifies_signatures(self):
        from geotaxi import signature

        generator = PositionGenerator(taxis=4, api_key="server-key", seed=7)
        for data in generator.batch(40):
            message = json.loads(data)
            texts = signature.field_texts(data, message)
            self.assertTrue(signature.verify(texts, "server-key", message["hash"]))
            self.assertFalse(signature.verify(texts, "other-key", message["hash"]))


class FleetTest(unittest.TestCase):
    def test_fleet_ids_stable(self):
        messages = [json.loads(data) for data in PositionGenerator(taxis=3, seed=8).batch(30)]
        ids = [message["taxi"] for message in messages]
        self.assertEqual(len(set(ids)), 3)
        for taxi in set(ids):
            self.assertEqual(ids.count(taxi), 10)

    def test_taxis_move_a_few_metres(self):
        messages = [json.loads(data) for data in PositionGenerator(taxis=4, seed=9).batch(2000)]
        previous = {}
        moves = []
        for message in messages:
            here = (message["lat"], message["lon"])
            if message["taxi"] in previous:
                moves.append(distance_metres(*previous[message["taxi"]], *here))
            previous[message["taxi"]] = here
        self.assertEqual(len(moves), 2000 - 4)
        # Rounding to 6 decimals moves a position by up to 0.1 m.
        self.assertGreater(min(moves), 1.5)
        self.assertLess(max(moves), 15.5)

    def test_unique_ids_all_distinct(self):
        ids = [json.loads(data)["taxi"] for data in PositionGenerator(taxis=2, unique_ids=True, seed=10).batch(500)]
        self.assertEqual(len(set(ids)), 500)

    def test_seed_repeats_datagrams(self):
        first = PositionGenerator(taxis=7, seed=11).batch(50, timestamp=1_800_000_000)
        second = PositionGenerator(taxis=7, seed=11).batch(50, timestamp=1_800_000_000)
        other = PositionGenerator(taxis=7, seed=12).batch(50, timestamp=1_800_000_000)
        self.assertEqual(first, second)
        self.assertNotEqual(first, other)


class SendTest(SinkTestCase):
    def test_sends_exact_count(self):
        report = send_traffic("127.0.0.1", self.port, 50, taxis=5, seed=13)
        self.assertEqual(report.sent, 50)
        self.assertEqual(report.errors, 0)
        received = self.receive(50)
        self.assertEqual(len({json.loads(data)["taxi"] for data in received}), 5)
        self.assertNothingMore()

    def test_rate_paces_sending(self):
        started = time.monotonic()
        report = send_traffic("127.0.0.1", self.port, 600, rate=3000, unique_ids=True, seed=14)
        elapsed = time.monotonic() - started
        self.assertEqual(report.sent, 600)
        # 600 datagrams at 3,000/s take 0.2 s; the upper bound leaves room
        # for a loaded test machine.
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertLess(elapsed, 0.6)
        self.assertEqual(len(self.receive(600)), 600)

    def test_rate_spreads_arrivals(self):
        # 400 datagrams at 2,000/s: about half arrive in the first 0.1 s,
        # not all of them at once.
        arrivals = []
        sender = threading.Thread(target=send_traffic, args=("127.0.0.1", self.port, 400), kwargs={"rate": 2000, "seed": 15})
        started = time.monotonic()
        sender.start()
        try:
            for _ in range(400):
                self.sink.recv(65535)
                arrivals.append(time.monotonic() - started)
        finally:
            sender.join(timeout=5)
        early = sum(1 for arrival in arrivals if arrival < 0.1)
        self.assertGreater(early, 120)
        self.assertLess(early, 280)

    def test_duration_bounds_sending(self):
        started = time.monotonic()
        report = send_traffic("127.0.0.1", self.port, None, rate=1000, duration=0.3, seed=16)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 0.6)
        self.assertGreater(report.sent, 240)
        self.assertLessEqual(report.sent, 301)

    def test_sleep_between_datagrams(self):
        started = time.monotonic()
        report = send_traffic("127.0.0.1", self.port, 5, sleep=0.02, seed=17)
        self.assertEqual(report.sent, 5)
        self.assertGreaterEqual(time.monotonic() - started, 0.1)

    def test_several_sockets_several_ports(self):
        send_traffic("127.0.0.1", self.port, 40, sockets=4, seed=18)
        sources = set()
        for _ in range(40):
            _, source = self.sink.recvfrom(65535)
            sources.add(source[1])
        self.assertEqual(len(sources), 4)

    def test_needs_count_or_duration(self):
        with self.assertRaises(ValueError):
            send_traffic("127.0.0.1", self.port, None)

    def test_counts_refused_sends(self):
        # Nothing listens on a closed port, so loopback replies with ICMP port
        # unreachable, which a connected socket raises on a later send.
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        report = send_traffic("127.0.0.1", port, 20, sleep=0.001, seed=19)
        self.assertEqual(report.sent + report.errors, 20)
        self.assertGreater(report.errors, 0)
        self.assertIn("ConnectionRefusedError", report.first_error)


class DestinationTest(unittest.TestCase):
    def test_rejects_non_loopback(self):
        for host in ("192.0.2.1", "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1"):
            with self.subTest(host=host):
                with self.assertRaisesRegex(ValueError, "--allow-remote"):
                    traffic.resolve_destination(host, 8080)

    def test_send_rejects_before_sending(self):
        with self.assertRaisesRegex(ValueError, "outside loopback"):
            send_traffic("192.0.2.1", 8080, 1)

    def test_accepts_loopback(self):
        for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"):
            with self.subTest(host=host):
                family, address = traffic.resolve_destination(host, 8080)
                self.assertEqual(address[1], 8080)

    def test_allow_remote_resolves_only(self):
        # Resolution opens no socket, so the test still sends nothing.
        family, address = traffic.resolve_destination("192.0.2.1", 8080, allow_remote=True)
        self.assertEqual(address, ("192.0.2.1", 8080))


class CommandTest(SinkTestCase):
    def run_main(self, *argv):
        output, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(errors):
            traffic.main(list(argv))
        return output.getvalue(), errors.getvalue()

    def run_failing(self, *argv):
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors), self.assertRaises(SystemExit) as raised:
            traffic.main(list(argv))
        self.assertNotEqual(raised.exception.code, 0)
        return f"{raised.exception.code} {errors.getvalue()}"

    def test_prints_count_and_rate(self):
        output, _ = self.run_main("--port", str(self.port), "20", "--rate", "2000", "--taxis", "20", "--seed", "3")
        self.assertRegex(output, r"sent 20 datagrams to 127\.0\.0\.1:\d+ in [0-9.]+ s: \d+/s \(target 2000/s\), seed 3")
        self.assertEqual(len(self.receive(20)), 20)

    def test_default_sends_one(self):
        output, _ = self.run_main("--port", str(self.port))
        self.assertIn("sent 1 datagrams", output)
        self.receive(1)
        self.assertNothingMore()

    def test_signs_with_api_key(self):
        self.run_main("--port", str(self.port), "3", "--sleep", "0", "--api-key", "k1", "--operator", "op@example.org")
        for data in self.receive(3):
            texts = TEXT_DECODER.decode(data.decode())
            self.assertEqual(texts["operator"], "op@example.org")
            self.assertEqual(texts["hash"], expected_hash(texts, "k1"))

    def test_warns_about_duplicates(self):
        _, errors = self.run_main("--port", str(self.port), "10", "--sleep", "0")
        self.assertIn("duplicates", errors)
        self.receive(10)

    def test_no_warning_one_position_per_taxi(self):
        _, errors = self.run_main("--port", str(self.port), "10", "--taxis", "10", "--sleep", "0")
        self.assertEqual(errors, "")
        self.receive(10)

    def test_rejects_remote_host(self):
        message = self.run_failing("--host", "192.0.2.1", "1")
        self.assertIn("--allow-remote", message)

    def test_rejects_invalid_options(self):
        cases = [
            (("--sleep", "0.1", "--rate", "10"), "only one"),
            (("--operator", "two words"), "--operator"),
            (("--operator", "a:b"), "--operator"),
            (("--taxis", "0"), "--taxis"),
            (("--rate", "0"), "--rate"),
            (("--duration", "-1"), "--duration"),
            (("--port", "70000"), "--port"),
            (("0",), "num"),
        ]
        for argv, expected in cases:
            with self.subTest(argv=argv):
                self.assertIn(expected, self.run_failing("--port", str(self.port), *argv))


if __name__ == "__main__":
    unittest.main()
