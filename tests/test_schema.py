"""
Unit tests of geotaxi.schema: the schema document is valid JSON Schema, the
compiled fastjsonschema validator and jsonschema's validator accept and
reject the same messages, and explain() names the offending field.
"""

import jsonschema
from twisted.trial.unittest import SynchronousTestCase

from geotaxi import schema

VALID = {
    "taxi": "taxi-1",
    "operator": "operator@example.org",
    "lat": 48.856613,
    "lon": 2.352222,
    "timestamp": 1733318400,
    "version": 2,
    "status": "free",
    "device": "phone",
    "hash": "0123456789abcdef0123456789abcdef01234567",
}

ACCEPT = True
REJECT = False

STRING_FIELDS = ("taxi", "operator", "status", "device")
NUMBER_FIELDS = ("lat", "lon", "timestamp")

# (field, value, expected) for one field replaced in VALID.
FIELD_CASES = [
    # Lengths at the bounds.
    ("taxi", "t", ACCEPT),
    ("taxi", "t" * 64, ACCEPT),
    ("taxi", "t" * 65, REJECT),
    ("taxi", "", REJECT),
    ("operator", "o" * 254, ACCEPT),
    ("operator", "o" * 255, REJECT),
    ("operator", "", REJECT),
    ("status", "s" * 32, ACCEPT),
    ("status", "s" * 33, REJECT),
    ("status", "", REJECT),
    ("device", "d" * 32, ACCEPT),
    ("device", "d" * 33, REJECT),
    ("device", "", REJECT),
    # Characters: ':' is rejected in the member parts only.
    ("taxi", "taxi:1", REJECT),
    ("operator", "operator:1", REJECT),
    ("status", "status:1", ACCEPT),
    ("device", "device:1", ACCEPT),
    ("taxi", "taxi-é", ACCEPT),
    ("taxi", "taxi\u200b", ACCEPT),
    # Trailing newline, which Python's $ alone would let through.
    ("taxi", "taxi-1\n", REJECT),
    ("operator", "operator@example.org\n", REJECT),
    ("status", "free\n", REJECT),
    ("device", "phone\n", REJECT),
    ("hash", VALID["hash"] + "\n", REJECT),
    ("lat", "48.85\n", REJECT),
    ("timestamp", "1733318400\n", REJECT),
    ("version", "2\n", REJECT),
    # Numbers as strings.
    ("lat", "48.5", ACCEPT),
    ("lat", "-48.5", ACCEPT),
    ("lat", "48,5", ACCEPT),
    ("lat", "48", ACCEPT),
    ("lat", "0", ACCEPT),
    ("lat", "-0", ACCEPT),
    ("lat", "1e5", ACCEPT),
    ("lat", "1E+5", ACCEPT),
    ("lat", "1e-5", ACCEPT),
    ("lat", "1,5e3", ACCEPT),
    ("lat", "048.5", REJECT),
    ("lat", "+48.5", REJECT),
    ("lat", ".5", REJECT),
    ("lat", "5.", REJECT),
    ("lat", "5,", REJECT),
    ("lat", "1e", REJECT),
    ("lat", "e5", REJECT),
    ("lat", "--1", REJECT),
    ("lat", "48.5.1", REJECT),
    ("lat", "4_8", REJECT),
    ("lat", "0x30", REJECT),
    ("lat", "nan", REJECT),
    ("lat", "NaN", REJECT),
    ("lat", "inf", REJECT),
    ("lat", "Infinity", REJECT),
    ("lat", " 48.5", REJECT),
    ("lat", "48.5 ", REJECT),
    ("lat", "48, 5", REJECT),
    ("lat", "١٢", REJECT),
    ("lat", "１２", REJECT),
    ("lat", "", REJECT),
    ("lat", "1" * 64, ACCEPT),
    ("lat", "1" * 65, REJECT),
    ("lon", "-180", ACCEPT),
    ("lon", "2,35", ACCEPT),
    ("timestamp", "1733318400", ACCEPT),
    ("timestamp", "1733318400.5", ACCEPT),
    ("timestamp", "1.7333184e9", ACCEPT),
    ("timestamp", "1733318400,5", REJECT),
    ("timestamp", "1" * 32, ACCEPT),
    ("timestamp", "1" * 33, REJECT),
    ("timestamp", "2024-12-04T13:20:00Z", REJECT),
    # Numbers.
    ("lat", -0.0, ACCEPT),
    ("lat", 1.5, ACCEPT),
    ("lat", 10**30, ACCEPT),
    ("lat", 2**64, ACCEPT),
    ("timestamp", 1733318400.5, ACCEPT),
    ("timestamp", -1, ACCEPT),
    # Version: a non-negative integer, as a number or a string of digits.
    ("version", 0, ACCEPT),
    ("version", 2, ACCEPT),
    ("version", 2.0, ACCEPT),
    ("version", "2", ACCEPT),
    ("version", "2.0", REJECT),
    ("version", 2.5, REJECT),
    ("version", -1, REJECT),
    ("version", "-1", REJECT),
    ("version", "02", ACCEPT),
    ("version", 999999999, ACCEPT),
    ("version", 1000000000, REJECT),
    ("version", 10**20, REJECT),
    ("version", "9" * 9, ACCEPT),
    ("version", "1" * 10, REJECT),
    ("version", "v2", REJECT),
    ("version", " 2", REJECT),
    ("version", "", REJECT),
    # Hash: 40 hex digits in any case.
    ("hash", "0123456789ABCDEF0123456789abcdef01234567", ACCEPT),
    ("hash", "0" * 39, REJECT),
    ("hash", "0" * 41, REJECT),
    ("hash", "g" * 40, REJECT),
    ("hash", " " + "0" * 39, REJECT),
]

# Unicode whitespace and control characters, rejected in every string field.
SEPARATORS = [
    " ", "\t", "\n", "\r", "\x0b", "\x0c",
    "\u00a0", "\u1680", "\u2000", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000",
]
CONTROLS = [chr(code) for code in range(0x00, 0x20)] + [chr(code) for code in range(0x7F, 0xA0)]
for _field in STRING_FIELDS:
    for _char in SEPARATORS + CONTROLS:
        FIELD_CASES.append((_field, f"a{_char}b", REJECT))

# Types that no field takes.
for _field in VALID:
    for _value in (True, False, None, {"nested": 1}, [1]):
        FIELD_CASES.append((_field, _value, REJECT))
for _field in STRING_FIELDS + ("hash",):
    FIELD_CASES.append((_field, 1, REJECT))
    FIELD_CASES.append((_field, 1.5, REJECT))


def message_cases():
    """
    Return (case, message, expected) for whole messages: the field table,
    each missing field, extra fields and messages that are not objects.
    """
    cases = []
    for field, value, expected in FIELD_CASES:
        message = dict(VALID)
        message[field] = value
        cases.append((f"{field}={value!r}", message, expected))

    for field in VALID:
        message = dict(VALID)
        del message[field]
        cases.append((f"without {field}", message, REJECT))

    cases.append(("valid", dict(VALID), ACCEPT))
    cases.append(("extra fields", dict(VALID, speed=42, extra={"a": [None, True]}), ACCEPT))
    cases.append(("extra field with whitespace", dict(VALID, note="a b\n"), ACCEPT))
    cases.append(("empty object", {}, REJECT))
    cases.append(("list", [VALID], REJECT))
    cases.append(("string", "taxi-1", REJECT))
    cases.append(("null", None, REJECT))
    return cases


def fast_accepts(message):
    try:
        schema.validate(message)
    except schema.ValidationError:
        return False
    return True


class SchemaDocumentTests(SynchronousTestCase):
    def test_metaschema(self):
        """
        The schema document is valid against the 2020-12 metaschema.
        """
        jsonschema.Draft202012Validator.check_schema(schema.SCHEMA)

    def test_draft(self):
        """
        The document declares draft 2020-12, the draft of the explainer.
        """
        self.assertIs(jsonschema.validators.validator_for(schema.SCHEMA), jsonschema.Draft202012Validator)

    def test_all_fields_required(self):
        """
        The nine fields of a datagram are required.
        """
        self.assertEqual(sorted(schema.SCHEMA["required"]), sorted(VALID))

    def test_extra_fields_allowed(self):
        """
        The schema does not forbid unknown fields.
        """
        self.assertNotIn("additionalProperties", schema.SCHEMA)


class ValidatorAgreementTests(SynchronousTestCase):
    def test_table_size(self):
        """
        The table covers at least 60 messages.
        """
        self.assertGreaterEqual(len(message_cases()), 60)

    def test_validators_agree(self):
        """
        fastjsonschema and jsonschema accept and reject the same messages.
        """
        explainer = jsonschema.Draft202012Validator(schema.SCHEMA)
        disagreements = []
        for case, message, _ in message_cases():
            fast = fast_accepts(message)
            full = explainer.is_valid(message)
            if fast != full:
                disagreements.append(f"{case}: fastjsonschema {fast}, jsonschema {full}")

        self.assertEqual(disagreements, [])

    def test_expected_verdicts(self):
        """
        The compiled validator accepts and rejects each message as the field rules require.
        """
        wrong = []
        for case, message, expected in message_cases():
            if fast_accepts(message) != expected:
                wrong.append(f"{case}: expected {'accept' if expected else 'reject'}")

        self.assertEqual(wrong, [])


class ExplainTests(SynchronousTestCase):
    def test_names_field(self):
        """
        explain() names the field of every single-field rejection.
        """
        wrong = []
        for field, value, expected in FIELD_CASES:
            if expected is ACCEPT:
                continue
            message = dict(VALID)
            message[field] = value
            named, _ = schema.explain(message)
            if named != field:
                wrong.append(f"{field}={value!r}: explain() named {named!r}")

        self.assertEqual(wrong, [])

    def test_reason_sentence(self):
        """
        The reason is jsonschema's sentence, which quotes the value.
        """
        field, reason = schema.explain(dict(VALID, lat="nan"))

        self.assertEqual(field, "lat")
        self.assertIn("'nan'", reason)

    def test_missing_field(self):
        """
        A missing field is reported on the message, with the field in the sentence.
        """
        message = dict(VALID)
        del message["hash"]

        field, reason = schema.explain(message)

        self.assertEqual(field, "")
        self.assertEqual(reason, "'hash' is a required property")

    def test_valid_message(self):
        """
        explain() returns no field for a message that jsonschema accepts.
        """
        field, reason = schema.explain(dict(VALID))

        self.assertEqual(field, "")
        self.assertEqual(reason, "rejected by the compiled validator")
