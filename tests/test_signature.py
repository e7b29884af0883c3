"""
Tests of geotaxi.signature: the text of each signed field and the check of
the hash, against signatures computed here by hand.
"""

import hashlib
import json

import orjson
from twisted.trial.unittest import SynchronousTestCase

from geotaxi import datagram, signature
from geotaxi.signature import SIGNED_FIELDS, compute_signature, field_texts, verify

KEY = "operator-api-key"

FIELDS = {
    "timestamp": 1733318400,
    "operator": "operator@example.com",
    "taxi": "taxi-0001",
    "lat": 48.856613,
    "lon": 2.352222,
    "device": "phone",
    "status": "free",
    "version": 2,
}


def datagram_with(**raw):
    """
    Build a datagram from FIELDS, where each keyword replaces the JSON text
    of one field exactly as given, so a test controls how a number is written.
    """
    parts = []
    for name, value in FIELDS.items():
        text = raw.pop(name) if name in raw else json.dumps(value)
        parts.append(f'"{name}": {text}')
    for name, text in raw.items():
        parts.append(f'"{name}": {text}')
    return ("{" + ", ".join(parts) + "}").encode()


def texts_of(datagram):
    return field_texts(datagram, orjson.loads(datagram))


def sha1_of(*parts):
    """
    Compute a signature the way an operator's app does, independently of
    the code under test.
    """
    return hashlib.sha1("".join(parts).encode()).hexdigest()


def signature_with(lat, lon, timestamp="1733318400", version="2", key=KEY):
    return sha1_of(timestamp, "operator@example.com", "taxi-0001", lat, lon, "phone", "free", version, key)


class FieldTextsTests(SynchronousTestCase):
    def test_strings_verbatim(self):
        """
        A JSON string is signed as its decoded value, a comma included.
        """
        texts = texts_of(datagram_with(lat='"48,856613"', lon='"2.3522220"', version='"2"'))

        self.assertEqual(texts["lat"], "48,856613")
        self.assertEqual(texts["lon"], "2.3522220")
        self.assertEqual(texts["version"], "2")
        self.assertEqual(texts["operator"], "operator@example.com")

    def test_numbers_as_written(self):
        """
        A JSON number keeps its written form, which its float would lose.
        """
        cases = [
            ("48.85", "48.85"),
            ("48.850", "48.850"),
            ("4.885e1", "4.885e1"),
            ("4.885E+1", "4.885E+1"),
            ("-0", "-0"),
            ("-0.0", "-0.0"),
            ("48.8566130000000001", "48.8566130000000001"),
        ]
        for written, expected in cases:
            with self.subTest(written=written):
                self.assertEqual(texts_of(datagram_with(lat=written))["lat"], expected, f"lat written {written}")

    def test_integers(self):
        """
        An integer is signed as written, 0 and integers past 64 bits too.
        """
        texts = texts_of(datagram_with(timestamp="1733318400123", version="0"))
        self.assertEqual(texts["timestamp"], "1733318400123")
        self.assertEqual(texts["version"], "0")

        texts = texts_of(datagram_with(timestamp="123456789012345678901234567890"))
        self.assertEqual(texts["timestamp"], "123456789012345678901234567890")

    def test_all_fields(self):
        """
        Every signed field is returned, each as a string.
        """
        texts = texts_of(datagram_with())

        self.assertEqual(tuple(texts), SIGNED_FIELDS)
        self.assertEqual(texts["timestamp"], "1733318400")
        self.assertEqual(texts["lat"], "48.856613")
        self.assertEqual(texts["version"], "2")

    def test_duplicate_key_last_wins(self):
        """
        A duplicated key is read as its last occurrence, as orjson reads it.
        """
        datagram = datagram_with(lat="1.5", extra='{"lat": 7.25}')[:-1] + b', "lat": 48.850}'
        message = orjson.loads(datagram)

        self.assertEqual(message["lat"], 48.85)
        self.assertEqual(field_texts(datagram, message)["lat"], "48.850")

    def test_escaped_key_and_nested_object(self):
        """
        A key spelled with an escape is found, and a nested key of the same
        name is ignored.
        """
        datagram = b'{"extra": {"lat": 1.000}, ' + datagram_with(lat="48.850")[1:].replace(b'"lat"', b'"l\\u0061t"')
        message = orjson.loads(datagram)

        self.assertEqual(field_texts(datagram, message)["lat"], "48.850")

    def test_wrong_type_raises(self):
        """
        A signed field that is neither a string nor a number raises TypeError.
        """
        datagram = datagram_with(status="true")

        with self.assertRaises(TypeError):
            field_texts(datagram, orjson.loads(datagram))

    def test_deep_nesting_raises_value_error(self):
        """
        A datagram too deep for the json module raises ValueError, not
        RecursionError.
        """
        depth = 1010
        datagram = datagram_with(extra="[" * depth + "]" * depth)
        message = orjson.loads(datagram)

        with self.assertRaises(ValueError):
            field_texts(datagram, message)


class SignatureTests(SynchronousTestCase):
    def test_field_order(self):
        """
        The signature concatenates timestamp, operator, taxi, lat, lon,
        device, status, version, then the key, without separators.
        """
        texts = texts_of(datagram_with())

        self.assertEqual(compute_signature(texts, KEY), signature_with("48.856613", "2.352222"))

    def test_lowercase_hex(self):
        """
        The signature is 40 lowercase hex digits.
        """
        signature = compute_signature(texts_of(datagram_with()), KEY)

        self.assertEqual(len(signature), 40)
        self.assertEqual(signature, signature.lower())
        int(signature, 16)

    def test_accepted_forms(self):
        """
        A hash over each field as sent is accepted, whatever its form.
        """
        cases = [
            ("string with a comma", '"48,856613"', signature_with("48,856613", "2.352222")),
            ("string with a trailing zero", '"48.8566130"', signature_with("48.8566130", "2.352222")),
            ("number", "48.85", signature_with("48.85", "2.352222")),
            ("number with an exponent", "4.885e1", signature_with("4.885e1", "2.352222")),
        ]
        for label, written, received in cases:
            with self.subTest(label):
                texts = texts_of(datagram_with(lat=written))
                self.assertTrue(verify(texts, KEY, received), f"{label} rejected")

    def test_version_string_and_number(self):
        """
        The version is signed as "2" whether it is sent as 2 or "2".
        """
        received = signature_with("48.856613", "2.352222", version="2")

        self.assertTrue(verify(texts_of(datagram_with(version="2")), KEY, received))
        self.assertTrue(verify(texts_of(datagram_with(version='"2"')), KEY, received))

    def test_earlier_server_float_form(self):
        """
        The earlier server's form, lat and lon as str(float()) of their dot
        form, is accepted.
        """
        cases = [
            ('"48,850"', '"2,35"', "48.85", "2.35"),
            ('"48.8566130"', "2.352222", "48.856613", "2.352222"),
            ("4.885e1", "2", "48.85", "2.0"),
            ('"2"', '"3"', "2.0", "3.0"),
        ]
        for lat, lon, float_lat, float_lon in cases:
            with self.subTest(lat=lat, lon=lon):
                texts = texts_of(datagram_with(lat=lat, lon=lon))
                received = signature_with(float_lat, float_lon)
                self.assertTrue(verify(texts, KEY, received), f"lat {lat}, lon {lon} signed as {float_lat}, {float_lon} rejected")

    def test_uppercase_hash(self):
        """
        A hash in uppercase hex is accepted.
        """
        texts = texts_of(datagram_with())

        self.assertTrue(verify(texts, KEY, signature_with("48.856613", "2.352222").upper()))

    def test_wrong_hash_rejected(self):
        """
        A hash over other values, another key, or garbage is rejected.
        """
        texts = texts_of(datagram_with(lat="48.850"))
        cases = [
            ("other lat", signature_with("48.851", "2.352222")),
            ("other key", signature_with("48.850", "2.352222", key="other-key")),
            ("swapped lat and lon", signature_with("2.352222", "48.850")),
            ("zeros", "0" * 40),
            ("not hex", "z" * 40),
            ("too short", signature_with("48.850", "2.352222")[:38]),
            ("spaces", " ".join([signature_with("48.850", "2.352222")[:20], "0" * 19])),
            ("empty", ""),
        ]
        for label, received in cases:
            with self.subTest(label):
                self.assertFalse(verify(texts, KEY, received), f"{label} accepted")

    def test_float_form_only_for_lat_and_lon(self):
        """
        The earlier form changes lat and lon only, so a timestamp signed as
        a float is rejected.
        """
        texts = texts_of(datagram_with())

        self.assertFalse(verify(texts, KEY, signature_with("48.856613", "2.352222", timestamp="1733318400.0")))


class CheckTests(SynchronousTestCase):
    """
    signature.check on parsed positions: the form that needs no reparse is
    tried first, then the fields as written.
    """

    def check(self, data):
        return signature.check(data, datagram.parse(data), KEY)

    def message(self, texts, **overrides):
        fields = {
            "timestamp": 1733318400, "operator": "op@example.org", "taxi": "taxi-1",
            "lat": 48.85, "lon": 2.35, "device": "phone", "status": "free", "version": 2,
        }
        fields.update(overrides)
        signed = {name: str(fields[name]) for name in SIGNED_FIELDS}
        signed.update(texts)
        fields["hash"] = sha1_of(*(signed[name] for name in SIGNED_FIELDS), KEY)
        return fields

    def test_shortest_numbers(self):
        """
        Coordinates sent as JSON numbers in their shortest form match.
        """
        self.assertTrue(self.check(orjson.dumps(self.message({}))))

    def test_numbers_as_written(self):
        """
        Coordinates written with trailing zeros match when signed as written.
        """
        data = orjson.dumps(self.message({"lat": "48.850"})).replace(b"48.85", b"48.850")
        self.assertTrue(self.check(data))

    def test_float_timestamp_as_written(self):
        """
        A timestamp sent as a JSON float is signed as written.
        """
        data = orjson.dumps(self.message({"timestamp": "1733318400.50"}, timestamp=1733318400.5))
        data = data.replace(b"1733318400.5", b"1733318400.50")
        self.assertTrue(self.check(data))

    def test_wrong_key(self):
        """
        A hash made with another key does not match.
        """
        data = orjson.dumps(self.message({}))
        self.assertFalse(signature.check(data, datagram.parse(data), "other-key"))
