"""
Unit tests of geotaxi.datagram: parse() turns the bytes of one datagram into
a normalised Position or raises Rejected with the reason, a detail for the
log and the offending value.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from geotaxi.datagram import BOM, MAX_DATAGRAM_SIZE, Position, Rejected, parse
from tests.samples import FIELDS, HASH, NOW, OPERATOR



def encode(**fields):
    """
    Return a valid datagram as compact JSON, with ``fields`` replacing the
    defaults. A field given as ``None`` is left out.
    """
    message = dict(FIELDS)
    message.update(fields)
    message = {name: value for name, value in message.items() if value is not None}
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def raw(**texts):
    """
    Return a valid datagram in which each keyword replaces the JSON text of
    one field exactly as given, for what json.dumps cannot write.
    """
    parts = []
    for name, value in FIELDS.items():
        text = texts.pop(name) if name in texts else json.dumps(value)
        parts.append(f'"{name}":{text}')
    for name, text in texts.items():
        parts.append(f'"{name}":{text}')
    return ("{" + ",".join(parts) + "}").encode()


def padded(size):
    """
    Return a valid datagram of exactly ``size`` bytes, filled by an extra field.
    """
    data = encode(padding="")
    return encode(padding="x" * (size - len(data)))


class ParseValidTests(SynchronousTestCase):
    def test_numbers(self):
        """
        JSON numbers are taken as floats and integers.
        """
        position = parse(encode())

        self.assertIsInstance(position, Position)
        self.assertEqual(position.taxi, "taxi-1")
        self.assertEqual(position.operator, OPERATOR)
        self.assertEqual(position.lat, 48.856613)
        self.assertEqual(position.lon, 2.352222)
        self.assertEqual(position.timestamp, NOW)
        self.assertEqual(position.version, 2)
        self.assertEqual(position.status, "free")
        self.assertEqual(position.device, "phone")
        self.assertEqual(position.hash, HASH)

    def test_integer_coordinates(self):
        """
        Integer coordinates become floats, written by repr() as "48.0".
        """
        position = parse(encode(lat=48, lon=2))

        self.assertEqual(position.lat_text, "48.0")
        self.assertEqual(position.lon_text, "2.0")

    def test_strings(self):
        """
        Every numeric field may be a string holding the number.
        """
        position = parse(encode(lat="48.856613", lon="-2.352222", timestamp=str(NOW), version="2"))

        self.assertEqual(position.lat, 48.856613)
        self.assertEqual(position.lon, -2.352222)
        self.assertEqual(position.timestamp, NOW)
        self.assertEqual(position.version, 2)
        self.assertIs(type(position.version), int)

    def test_comma_decimals(self):
        """
        A comma as the decimal point of a coordinate string reads as a dot.
        """
        position = parse(encode(lat="48,856613", lon="2,352222"))

        self.assertEqual(position.lat, 48.856613)
        self.assertEqual(position.lon, 2.352222)
        self.assertEqual(position.lat_text, "48.856613")

    def test_comma_with_exponent(self):
        """
        A comma decimal may carry an exponent, as a dot decimal may.
        """
        position = parse(encode(lat="4,8856613e1"))

        self.assertEqual(position.lat, 48.856613)

    def test_exponents(self):
        """
        Exponents in numbers and strings, any case and sign, are read.
        """
        position = parse(raw(lat="4.885E+1", lon='"2352.222e-3"', timestamp="1.7333184e9"))

        self.assertEqual(position.lat, 48.85)
        self.assertEqual(position.lon, 2.352222)
        self.assertEqual(position.timestamp, NOW)

    def test_repr_of_float(self):
        """
        Coordinates are stored as Python repr(float): "48.850" becomes "48.85".
        """
        position = parse(encode(lat="48.850", lon="2.3500"))

        self.assertEqual(position.lat_text, "48.85")
        self.assertEqual(position.lon_text, "2.35")

    def test_millisecond_timestamp(self):
        """
        A timestamp at or above 10^12 is in milliseconds.
        """
        self.assertEqual(parse(encode(timestamp=NOW * 1000 + 999)).timestamp, NOW)
        self.assertEqual(parse(encode(timestamp=str(NOW * 1000 + 999))).timestamp, NOW)
        self.assertEqual(parse(encode(timestamp=10**12)).timestamp, 10**9)

    def test_below_millisecond_threshold(self):
        """
        A timestamp just below 10^12 stays in seconds.
        """
        position = parse(encode(timestamp=10**12 - 1))

        self.assertEqual(position.timestamp, 10**12 - 1)

    def test_fractional_timestamp(self):
        """
        A fractional part of the timestamp is dropped, not rounded.
        """
        self.assertEqual(parse(encode(timestamp=NOW + 0.9)).timestamp, NOW)
        self.assertEqual(parse(encode(timestamp=f"{NOW}.9")).timestamp, NOW)
        self.assertEqual(parse(encode(timestamp=NOW * 1000 + 999.9)).timestamp, NOW)

    def test_integer_timestamp_type(self):
        """
        The timestamp is an int whatever form it was sent in.
        """
        for timestamp in (NOW, NOW + 0.5, str(NOW), f"{NOW}.5", "1.7333184e9"):
            self.assertIs(type(parse(encode(timestamp=timestamp)).timestamp), int, timestamp)

    def test_bom(self):
        """
        A UTF-8 byte-order mark before the JSON is ignored.
        """
        position = parse(BOM + encode())

        self.assertEqual(position.taxi, "taxi-1")

    def test_extra_fields(self):
        """
        Unknown fields of any type are ignored.
        """
        position = parse(encode(speed=42, azimuth="N", extra={"nested": [1, 2]}, empty=None))

        self.assertEqual(position.taxi, "taxi-1")

    def test_negative_zero(self):
        """
        -0.0 is a valid coordinate and keeps its sign in the stored text.
        """
        position = parse(encode(lat=-0.0, lon="-0"))

        self.assertEqual(position.lat_text, "-0.0")
        self.assertEqual(position.lon_text, "-0.0")

    def test_latitude_bounds(self):
        """
        The Redis GEO limits ±85.05112878 are valid latitudes.
        """
        self.assertEqual(parse(encode(lat=85.05112878)).lat, 85.05112878)
        self.assertEqual(parse(encode(lat=-85.05112878)).lat, -85.05112878)
        self.assertEqual(parse(encode(lat="85,05112878")).lat, 85.05112878)

    def test_longitude_bounds(self):
        """
        ±180 are valid longitudes.
        """
        self.assertEqual(parse(encode(lon=180)).lon, 180.0)
        self.assertEqual(parse(encode(lon=-180.0)).lon, -180.0)
        self.assertEqual(parse(encode(lon="-180")).lon, -180.0)

    def test_unicode_fields(self):
        """
        Non-ASCII characters that are not whitespace are kept verbatim.
        """
        position = parse(encode(taxi="taxi-é", operator="opérateur@example.org"))

        self.assertEqual(position.taxi, "taxi-é")
        self.assertEqual(position.operator, "opérateur@example.org")

    def test_size_limit(self):
        """
        A datagram of exactly the maximum size is parsed.
        """
        data = padded(MAX_DATAGRAM_SIZE)

        self.assertEqual(len(data), 4096)
        self.assertEqual(parse(data).taxi, "taxi-1")

    def test_keeps_message(self):
        """
        The parsed message is kept for the signature check.
        """
        position = parse(encode(lat="48,856613"))

        self.assertEqual(position.message["lat"], "48,856613")


class PositionTests(SynchronousTestCase):
    def test_member(self):
        """
        The member is "<taxi>:<operator>".
        """
        position = parse(encode())

        self.assertEqual(position.member, "taxi-1:operator@example.org")

    def test_value(self):
        """
        The value is "<timestamp> <lat> <lon> <status> <device> <version>".
        """
        position = parse(encode(lat="48,8566130", version="3", timestamp=f"{NOW}.7"))

        self.assertEqual(position.value, f"{NOW} 48.856613 2.352222 free phone 3")

    def test_value_splits_into_six(self):
        """
        The value splits on whitespace into the six fields the API reads.
        """
        fields = parse(encode()).value.split()

        self.assertEqual(len(fields), 6)
        self.assertEqual(int(fields[0]), NOW)
        self.assertEqual(int(fields[5]), 2)

    def test_record(self):
        """
        The Fluentd record has the normalised fields and the hash.
        """
        position = parse(encode(lat="48,856613", timestamp=str(NOW * 1000), version="2"))

        self.assertEqual(position.record(), {
            "taxi": "taxi-1",
            "operator": OPERATOR,
            "lat": 48.856613,
            "lon": 2.352222,
            "timestamp": NOW,
            "version": 2,
            "status": "free",
            "device": "phone",
            "hash": HASH,
        })

    def test_repr(self):
        """
        repr() names the member and the value.
        """
        position = parse(encode())

        self.assertEqual(repr(position), f"<Position taxi-1:{OPERATOR} {position.value}>")


class RejectedTests(SynchronousTestCase):
    def rejection(self, data):
        return self.assertRaises(Rejected, parse, data)

    def test_too_large(self):
        """
        A datagram one byte over 4096 is too_large, with its size as the value.
        """
        rejection = self.rejection(padded(MAX_DATAGRAM_SIZE + 1))

        self.assertEqual(rejection.reason, "too_large")
        self.assertEqual(rejection.detail, "datagram of 4097 bytes, over 4096")
        self.assertEqual(rejection.value, 4097)

    def test_too_large_before_json(self):
        """
        A large datagram is too_large even when it is not JSON.
        """
        rejection = self.rejection(b"\xff" * 65535)

        self.assertEqual(rejection.reason, "too_large")
        self.assertEqual(rejection.value, 65535)

    def test_invalid_utf8(self):
        """
        Bytes that are not UTF-8 are invalid_utf8, with the offset in the detail.
        """
        data = encode(taxi="taxi-@").replace(b"@", b"\xff")
        offset = data.index(b"\xff")
        rejection = self.rejection(data)

        self.assertEqual(rejection.reason, "invalid_utf8")
        self.assertIn("invalid start byte", rejection.detail)
        self.assertIn(f"at byte {offset}", rejection.detail)
        self.assertIn("\\xff", rejection.value)

    def test_utf8_surrogate(self):
        """
        A UTF-8 encoded surrogate is invalid_utf8.
        """
        rejection = self.rejection(encode(taxi="taxi-@").replace(b"@", b"\xed\xa0\x80"))

        self.assertEqual(rejection.reason, "invalid_utf8")

    def test_utf16(self):
        """
        UTF-16 text is invalid_utf8.
        """
        rejection = self.rejection(encode().decode().encode("utf-16"))

        self.assertEqual(rejection.reason, "invalid_utf8")

    def test_excerpt_bounded(self):
        """
        The logged value of a bad datagram is an excerpt, never all of it.
        """
        data = encode(padding="x" * 3000).replace(b'"x', b'"\xff', 1)
        rejection = self.rejection(data)

        self.assertEqual(rejection.reason, "invalid_utf8")
        self.assertLess(len(rejection.value), 200)

    def test_invalid_json(self):
        """
        Syntax errors are invalid_json, with the parser's message as the detail.
        """
        cases = [
            ("empty", b""),
            ("truncated", encode()[:-1]),
            ("trailing garbage", encode() + b"x"),
            ("single quotes", encode().replace(b'"', b"'")),
            ("trailing comma", encode()[:-1] + b",}"),
            ("NaN literal", raw(lat="NaN")),
            ("Infinity literal", raw(lon="Infinity")),
            ("-Infinity literal", raw(lat="-Infinity")),
            ("number overflowing to infinity", raw(lat="1e400")),
            ("lone surrogate escape", raw(taxi='"\\ud800"')),
            ("two BOMs", BOM + BOM + encode()),
        ]
        for case, data in cases:
            rejection = self.rejection(data)
            self.assertEqual(rejection.reason, "invalid_json", case)
            self.assertTrue(rejection.detail.startswith("not JSON: "), case)

    def test_depth_limit(self):
        """
        Nesting deeper than the JSON parser's limit is invalid_json.
        """
        rejection = self.rejection(raw(extra="[" * 1100 + "]" * 1100))

        self.assertEqual(rejection.reason, "invalid_json")
        self.assertIn("depth", rejection.detail)

    def test_deep_field_value(self):
        """
        A field nested 1000 deep, within the parser's limit, is invalid_field.
        """
        data = raw(lat="[" * 1000 + "]" * 1000)
        self.assertLess(len(data), MAX_DATAGRAM_SIZE)

        rejection = self.rejection(data)

        self.assertEqual(rejection.reason, "invalid_field")

    def test_not_an_object(self):
        """
        Valid JSON that is not an object is invalid_json, naming its type.
        """
        cases = [
            (b"[]", "list"),
            (b"42", "int"),
            (b'"taxi"', "str"),
            (b"null", "NoneType"),
            (b"true", "bool"),
        ]
        for data, type_name in cases:
            rejection = self.rejection(data)
            self.assertEqual(rejection.reason, "invalid_json", data)
            self.assertEqual(rejection.detail, f"a JSON {type_name} instead of an object", data)

    def test_missing_fields(self):
        """
        Each missing field is invalid_field, named in the detail.
        """
        for field in FIELDS:
            rejection = self.rejection(encode(**{field: None}))
            self.assertEqual(rejection.reason, "invalid_field", field)
            self.assertIn(f"'{field}' is a required property", rejection.detail, field)
            self.assertIsNone(rejection.value, field)

    def test_invalid_fields(self):
        """
        Each field rule rejects as invalid_field, naming the field and the value.
        """
        cases = [
            ("taxi", ""),
            ("taxi", "t" * 65),
            ("taxi", "taxi 1"),
            ("taxi", "taxi:1"),
            ("taxi", "taxi\t1"),
            ("taxi", "taxi\n"),
            ("taxi", "taxi\u00a0"),
            ("taxi", "taxi\u2028"),
            ("taxi", "taxi\u3000"),
            ("taxi", "taxi\x00"),
            ("taxi", "taxi\x1f"),
            ("taxi", "taxi\x7f"),
            ("taxi", "taxi\x85"),
            ("taxi", "taxi\x9f"),
            ("taxi", 1),
            ("taxi", True),
            ("taxi", ["taxi-1"]),
            ("operator", ""),
            ("operator", "o" * 255),
            ("operator", "operator:1"),
            ("operator", "an operator"),
            ("operator", "operator\x01"),
            ("lat", "nan"),
            ("lat", "NaN"),
            ("lat", "inf"),
            ("lat", "Infinity"),
            ("lat", " 48.85"),
            ("lat", "48.85 "),
            ("lat", "48.85\n"),
            ("lat", "48, 85"),
            ("lat", "4_8"),
            ("lat", "+48.85"),
            ("lat", "048.85"),
            ("lat", ".5"),
            ("lat", "5."),
            ("lat", "0x30"),
            ("lat", ""),
            ("lat", True),
            ("lat", [48.85]),
            ("lat", {"value": 48.85}),
            ("lon", "2.35.1"),
            ("lon", "2,35,1"),
            ("lon", "١٢"),
            ("timestamp", "2024-12-04T13:20:00Z"),
            ("timestamp", "1733318400,5"),
            ("timestamp", f" {NOW}"),
            ("timestamp", "1" * 33),
            ("timestamp", False),
            ("version", -1),
            ("version", 2.5),
            ("version", "2.0"),
            ("version", "v2"),
            ("version", "-1"),
            ("version", ""),
            ("version", 2**31),
            ("version", True),
            ("status", ""),
            ("status", "s" * 33),
            ("status", "not free"),
            ("status", "free\r"),
            ("status", 1),
            ("device", ""),
            ("device", "d" * 33),
            ("device", "a phone"),
            ("device", None),
            ("hash", HASH[:-1]),
            ("hash", HASH + "0"),
            ("hash", "g" * 40),
            ("hash", HASH + "\n"),
            ("hash", 1),
        ]
        for field, value in cases:
            message = dict(FIELDS)
            message[field] = value
            case = f"{field}={value!r}"
            rejection = self.rejection(json.dumps(message).encode())
            self.assertEqual(rejection.reason, "invalid_field", case)
            self.assertTrue(rejection.detail.startswith(f"field {field}: "), case)
            self.assertEqual(rejection.value, value, case)

    def test_out_of_range(self):
        """
        Coordinates just beyond the limits are out_of_range, with the value as sent.
        """
        cases = [
            ("lat", 85.05112879, "lat outside [-85.05112878, 85.05112878]"),
            ("lat", -85.05112879, "lat outside [-85.05112878, 85.05112878]"),
            ("lat", "85,051129", "lat outside [-85.05112878, 85.05112878]"),
            ("lat", 90, "lat outside [-85.05112878, 85.05112878]"),
            ("lat", "1e400", "lat outside [-85.05112878, 85.05112878]"),
            ("lon", 180.00000001, "lon outside [-180.0, 180.0]"),
            ("lon", -180.00000001, "lon outside [-180.0, 180.0]"),
            ("lon", "-1e400", "lon outside [-180.0, 180.0]"),
            ("lon", 10**20, "lon outside [-180.0, 180.0]"),
        ]
        for field, value, detail in cases:
            case = f"{field}={value!r}"
            rejection = self.rejection(encode(**{field: value}))
            self.assertEqual(rejection.reason, "out_of_range", case)
            self.assertEqual(rejection.detail, detail, case)
            self.assertEqual(rejection.value, value, case)

    def test_infinite_timestamp(self):
        """
        A timestamp string that overflows a float is outside the timestamp window.
        """
        rejection = self.rejection(encode(timestamp="1e400"))

        self.assertEqual(rejection.reason, "timestamp_window")
        self.assertEqual(rejection.detail, "timestamp out of the range of a 64-bit integer")

    def test_rejected_args(self):
        """
        Rejected carries the reason as its args, and the detail and the value
        as attributes.
        """
        rejection = Rejected("too_large", "datagram of 5000 bytes, over 4096", 5000)

        self.assertEqual(rejection.args, ("too_large",))
        self.assertEqual(rejection.detail, "datagram of 5000 bytes, over 4096")
        self.assertEqual(rejection.value, 5000)

    def test_explanation_deferred(self):
        """
        A schema failure is explained only when its detail is read.
        """
        rejection = self.rejection(encode(taxi="a b"))

        self.assertIsNotNone(rejection._describe)
        self.assertIn("taxi", rejection.detail)
        self.assertIsNone(rejection._describe)
