"""
One valid position datagram's fields, shared by the unit tests.
"""

NOW = 1733318400
OPERATOR = "operator@example.org"
HASH = "0123456789abcdef0123456789abcdef01234567"

FIELDS = {
    "taxi": "taxi-1",
    "operator": OPERATOR,
    "lat": 48.856613,
    "lon": 2.352222,
    "timestamp": NOW,
    "version": 2,
    "status": "free",
    "device": "phone",
    "hash": HASH,
}
