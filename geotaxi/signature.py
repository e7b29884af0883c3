"""
Signature of a position datagram: the lowercase hex SHA-1 of its signed
fields, taken as sent, followed by the operator's API key.

A JSON number is signed as written in the datagram (``48.850``, ``4.885e1``,
``-0``). A parsed float loses that form, so those fields are read back from
the raw datagram. Everything here runs once per datagram.
"""

import hashlib
import hmac
import json

# The order in which the fields are concatenated, the API key coming last.
SIGNED_FIELDS = ("timestamp", "operator", "taxi", "lat", "lon", "device", "status", "version")

# Keeps every JSON number as its text, so a reparse returns numbers as written.
# The decoder is built once because json.loads() with hooks builds a new one
# per call, which costs more than the parse itself.
_TEXT_DECODER = json.JSONDecoder(parse_float=str, parse_int=str)


def field_texts(datagram, message):
    """
    Return the text of each signed field as sent: a JSON string as decoded,
    a JSON number as written in ``datagram``.

    ``message`` is ``datagram`` parsed by orjson, with the byte-order mark
    already stripped. Integers other than 0 are written as ``str()`` gives
    them. When a signed field is a float or 0 (which may be written ``-0``),
    the datagram is parsed again by the json module, which keeps number texts
    and, like orjson, keeps the last of duplicated keys.

    Raises ``TypeError`` when a signed field is neither a string nor a
    number, and ``ValueError`` when the json module cannot parse a datagram
    that orjson accepted. The json module gives up at a nesting depth of
    about 1,000, while orjson accepts up to 1,023.
    """
    texts = {}
    reparsed = None
    for name in SIGNED_FIELDS:
        value = message[name]
        kind = type(value)

        if kind is str:
            texts[name] = value
        elif kind is int and value != 0:
            texts[name] = str(value)
        elif kind is float or kind is int:
            if reparsed is None:
                reparsed = _reparse(datagram)
            texts[name] = reparsed[name]
        else:
            raise TypeError(f"signed field {name!r} is {kind.__name__}, expected a string or a number")
    return texts


def _reparse(datagram):
    try:
        return _TEXT_DECODER.decode(datagram.decode("utf-8"))
    except RecursionError:
        raise ValueError("datagram is nested too deeply to read its numbers as written") from None


def check(datagram, position, key):
    """
    Return whether the hash of ``position`` is a valid signature of its
    fields with ``key``, in either accepted form. Raise ValueError like
    ``field_texts``.

    The earlier server's form is tried first when it needs no reparse, that
    is when timestamp and version were sent as strings or non-zero integers:
    its lat and lon are ``str(float(...))``, which ``Position`` has already
    computed. Apps that write coordinates as JSON numbers in Python's
    shortest form match it at the cost of one SHA-1; the others pay for the
    reparse of ``field_texts``.
    """
    try:
        received = bytes.fromhex(position.hash)
    except ValueError:
        return False

    message = position.message
    timestamp = message["timestamp"]
    version = message["version"]
    if _as_sent(timestamp) and _as_sent(version):
        texts = {
            "timestamp": timestamp if type(timestamp) is str else str(timestamp),
            "operator": position.operator,
            "taxi": position.taxi,
            "device": position.device,
            "status": position.status,
            "version": version if type(version) is str else str(version),
        }
        if hmac.compare_digest(_digest(texts, position.lat_text, position.lon_text, key), received):
            return True

    return verify(field_texts(datagram, message), key, position.hash)


def _as_sent(value):
    """
    Return whether the text of ``value`` as sent is known without a reparse.
    """
    kind = type(value)
    return kind is str or (kind is int and value != 0)


def compute_signature(texts, key):
    """
    Return the lowercase hex SHA-1 of the signed fields of ``texts``, in
    signature order, followed by ``key``, all encoded as UTF-8.
    """
    return _digest(texts, texts["lat"], texts["lon"], key).hex()


def verify(texts, key, received_hash):
    """
    Check ``received_hash`` (hex, any case) against the signature of
    ``texts`` with ``key``, in constant time.

    The form of the earlier server is accepted too: it signed lat and lon as
    Python ``str(float(x))`` of their dot form, so ``"48,850"`` was signed as
    ``48.85`` and ``"2"`` as ``2.0``.
    """
    try:
        received = bytes.fromhex(received_hash)
    except ValueError:
        return False

    lat = texts["lat"]
    lon = texts["lon"]
    if hmac.compare_digest(_digest(texts, lat, lon, key), received):
        return True

    float_lat = _float_text(lat)
    float_lon = _float_text(lon)
    if float_lat is None or float_lon is None:
        return False
    if float_lat == lat and float_lon == lon:
        # The earlier form is the same text, and it was just rejected.
        return False
    return hmac.compare_digest(_digest(texts, float_lat, float_lon, key), received)


def _digest(texts, lat, lon, key):
    signed = "".join(
        (
            texts["timestamp"],
            texts["operator"],
            texts["taxi"],
            lat,
            lon,
            texts["device"],
            texts["status"],
            texts["version"],
            key,
        )
    )
    return hashlib.sha1(signed.encode("utf-8")).digest()


def _float_text(text):
    """
    Return ``str(float(text))`` with a decimal comma read as a dot, or None
    when ``text`` is not a number.
    """
    try:
        return str(float(text.replace(",", ".")))
    except ValueError:
        return None
