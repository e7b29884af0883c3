"""
Parse and normalise one datagram into a Position, or raise Rejected.

Everything here runs once per datagram, so the happy path avoids exceptions,
regular expressions beyond the schema's, and any work that the writer or the
log could do later.
"""

import math
from decimal import Decimal

import orjson

from geotaxi import schema

MAX_DATAGRAM_SIZE = 4096
BOM = b"\xef\xbb\xbf"

# Redis GEOADD refuses latitudes beyond these (its Web Mercator limit).
MAX_LATITUDE = 85.05112878
MAX_LONGITUDE = 180.0

MILLISECONDS_FROM = 10**12
MAX_TIMESTAMP = 2**63 - 1


class Rejected(Exception):
    """
    A datagram that is not stored, with the counter name of the reason,
    a sentence for the log and the offending value.

    ``describe``, when given, is a function returning ``(detail, value)``,
    called only when they are first read. Explaining a schema failure costs
    about 180 µs, so a flood of bad datagrams must not pay for explanations
    that the rate-limited log then drops.
    """

    def __init__(self, reason, detail=None, value=None, describe=None):
        super().__init__(reason)
        self.reason = reason
        self._detail = detail
        self._value = value
        self._describe = describe

    def _resolve(self):
        if self._describe is not None:
            self._detail, self._value = self._describe()
            self._describe = None

    @property
    def detail(self):
        self._resolve()
        return self._detail

    @property
    def value(self):
        self._resolve()
        return self._value


class Position:
    """
    One validated, normalised position of a taxi.

    ``lat_text`` and ``lon_text`` are Python ``repr(float)``, the form the API
    reads back. ``message`` is the parsed datagram, kept for the signature
    check, which needs the fields as sent.
    """

    __slots__ = (
        "taxi", "operator", "lat", "lon", "lat_text", "lon_text",
        "timestamp", "version", "status", "device", "hash", "message",
    )

    def __init__(self, taxi, operator, lat, lon, timestamp, version, status, device, hash, message=None):
        self.taxi = taxi
        self.operator = operator
        self.lat = lat
        self.lon = lon
        self.lat_text = repr(lat)
        self.lon_text = repr(lon)
        self.timestamp = timestamp
        self.version = version
        self.status = status
        self.device = device
        self.hash = hash
        self.message = message

    @property
    def member(self):
        """
        The ``<taxi>:<operator>`` member of ``geoindex_2`` and ``timestamps``.
        """
        return self.taxi + ":" + self.operator

    @property
    def value(self):
        """
        The value stored in the ``taxi:<taxi>`` hash under the operator.
        """
        return f"{self.timestamp} {self.lat_text} {self.lon_text} {self.status} {self.device} {self.version}"

    def record(self):
        """
        Return the normalised fields and the hash, as sent to Fluentd.
        """
        return {
            "taxi": self.taxi,
            "operator": self.operator,
            "lat": self.lat,
            "lon": self.lon,
            "timestamp": self.timestamp,
            "version": self.version,
            "status": self.status,
            "device": self.device,
            "hash": self.hash,
        }

    def __repr__(self):
        return f"<Position {self.member} {self.value}>"


def decode(data):
    """
    Parse the bytes of a datagram into a JSON object, or raise Rejected.
    """
    if len(data) > MAX_DATAGRAM_SIZE:
        raise Rejected("too_large", f"datagram of {len(data)} bytes, over {MAX_DATAGRAM_SIZE}", len(data))

    if data[:3] == BOM:
        data = data[3:]

    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        # Only now pay for a UTF-8 check, to tell encoding errors from syntax.
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as encoding_error:
            raise Rejected("invalid_utf8", f"not UTF-8: {encoding_error.reason} at byte {encoding_error.start}", _excerpt(data)) from None
        raise Rejected("invalid_json", f"not JSON: {error}", _excerpt(data, error.pos)) from None

    if type(message) is not dict:
        raise Rejected("invalid_json", f"a JSON {type(message).__name__} instead of an object", _excerpt(data))
    return message


def normalise(message):
    """
    Check a JSON object against the schema and the coordinate ranges, and
    return its Position. Raise Rejected with the field and the value.
    """
    try:
        schema.validate(message)
    except schema.ValidationError:
        raise Rejected("invalid_field", describe=lambda: _explain_invalid(message)) from None

    lat = _coordinate(message, "lat", MAX_LATITUDE)
    lon = _coordinate(message, "lon", MAX_LONGITUDE)

    version = message["version"]
    if type(version) is not int:
        version = int(version)

    return Position(
        message["taxi"],
        message["operator"],
        lat,
        lon,
        _timestamp(message["timestamp"]),
        version,
        message["status"],
        message["device"],
        message["hash"],
        message,
    )


def parse(data):
    """
    Return the Position of a datagram, or raise Rejected.
    """
    return normalise(decode(data))


def _explain_invalid(message):
    """
    Return the log sentence and the offending value of a message that the
    schema rejected.
    """
    try:
        field, reason = schema.explain(message)
    except RecursionError:
        # jsonschema's message contains repr() of the value, which recurses
        # on a value nested hundreds of levels deep.
        field, reason = "", "a value nested too deep to describe"
    value = message.get(field) if field and "." not in field else None
    if len(reason) > 200:
        reason = reason[:200] + "..."
    return f"field {field or '(message)'}: {reason}", value


def _coordinate(message, field, limit):
    value = message[field]
    if type(value) is str:
        value = float(value.replace(",", "."))
    else:
        value = float(value)

    # "nan" cannot get through the schema, but a huge exponent gives inf.
    if not -limit <= value <= limit:
        raise Rejected("out_of_range", f"{field} outside [-{limit}, {limit}]", message[field])
    return value


def _timestamp(value):
    if type(value) is str:
        try:
            value = int(value)
        except ValueError:
            # Decimal drops the fraction exactly, where float() could round
            # "1733318400.9999999999" up to the next second. The exponent is
            # checked first: int() of "1e99999999" would build a huge integer.
            exact = Decimal(value)
            if exact.adjusted() > 18:
                raise Rejected("timestamp_window", "timestamp out of the range of a 64-bit integer", value) from None
            value = int(exact)
    if type(value) is float:
        if not math.isfinite(value):
            raise Rejected("timestamp_window", "timestamp is not a finite number", value)
        value = int(value)

    if value >= MILLISECONDS_FROM:
        value //= 1000

    # Far beyond any clock, and beyond the integers the API's readers expect.
    if not -MAX_TIMESTAMP <= value <= MAX_TIMESTAMP:
        raise Rejected("timestamp_window", "timestamp out of the range of a 64-bit integer", value)
    return value


def _excerpt(data, at=0, size=80):
    """
    Return at most ``size`` bytes of a bad datagram around offset ``at``, for
    the log: never the whole of it.
    """
    start = max(0, min(at - size // 2, len(data) - size))
    text = repr(bytes(data[start:start + size]))
    if start > 0:
        text = "..." + text
    if start + size < len(data):
        text = text + "..."
    return text
