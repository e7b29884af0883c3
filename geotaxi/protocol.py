"""
The UDP protocol: every datagram is checked, then written, forwarded, or
counted under the reason it was rejected.
"""

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from geotaxi import datagram, signature
from geotaxi.apikeys import FULL, UNAVAILABLE
from geotaxi.ordering import OUT_OF_ORDER, OrderingFilter
from geotaxi.ratelog import RateLimitedLog

log = Logger()


class PositionProtocol(DatagramProtocol):
    """
    Check each datagram against the contract, in the order of its costs:
    size, JSON, schema and ranges, zero position, timestamp window, signature
    (when ``keys`` is given), then ordering per taxi and operator.

    An accepted position goes to ``writer`` and, like an out-of-order one,
    to ``fluent`` (the history). Nothing raised by a datagram reaches the
    reactor: an unexpected error is counted as ``internal_errors`` and logged.
    """

    def __init__(self, clock, counters, writer, fluent=None, keys=None,
                 max_future=600, max_age=3600, verbose=False):
        self.clock = clock
        self.counters = counters
        self.writer = writer
        self.fluent = fluent
        self.keys = keys
        self.max_future = max_future
        self.max_age = max_age
        self.verbose = verbose
        # With no age limit, a day of silence is taken as the end of a trip.
        self.ordering = OrderingFilter(clock, horizon=max_age or 86400)
        self.ratelog = RateLimitedLog(clock, log)

    def datagramReceived(self, data, address):
        self.counters["received"] += 1
        try:
            position = datagram.parse(data)
            self._check_place_and_time(position)
            if self.keys is None:
                self.accept(position)
            else:
                self.authenticate(position, data, address)
        except datagram.Rejected as rejection:
            self._rejected(rejection, address)
        except Exception:
            self._failed(Failure(), address)

    def _check_place_and_time(self, position):
        if position.lat == 0.0 and position.lon == 0.0:
            raise datagram.Rejected("zero_position", "position (0, 0): the device has no GPS fix", (position.lat, position.lon))

        timestamp = position.timestamp
        now = self.clock.seconds()
        if self.max_future and timestamp > now + self.max_future:
            raise datagram.Rejected(
                "timestamp_window",
                f"timestamp {timestamp - now:.0f} s ahead of the server clock, over {self.max_future} s",
                timestamp,
            )
        if self.max_age and timestamp < now - self.max_age:
            raise datagram.Rejected(
                "timestamp_window",
                f"timestamp {now - timestamp:.0f} s behind the server clock, over {self.max_age} s",
                timestamp,
            )

    def authenticate(self, position, data, address):
        """
        Look up the operator's key, then check the signature and accept or
        reject the position. An unknown operator may wait for one reload of
        the keys, shared by every datagram that waits.
        """
        key = self.keys.lookup(position.operator)
        if type(key) is str:
            self.check_signature(position, data, address, key)
        elif key is None:
            self.reject("unknown_operator", address, "no API key for this operator", position.operator)
        elif key is UNAVAILABLE:
            self.reject("auth_unavailable", address, "the operators' keys have not been loaded yet", position.operator)
        elif key is FULL:
            self.reject("auth_backlog_full", address, "too many datagrams wait for the operators' keys", position.operator)
        else:
            key.addCallback(self._key_reloaded, position, data, address)
            key.addErrback(self._failed, address)

    def _key_reloaded(self, key, position, data, address):
        if key is None:
            self.reject("unknown_operator", address, "no API key for this operator after a reload", position.operator)
        else:
            self.check_signature(position, data, address, key)

    def _failed(self, failure, address):
        self.counters["internal_errors"] += 1
        self.ratelog.failure(
            "internal_errors", "Unexpected error on a datagram from {source}", failure, source=_source(address),
        )

    def check_signature(self, position, data, address, key):
        """
        Accept the position if its hash is the signature of its fields with
        ``key``; otherwise count it and the badhash_* sorted sets.
        """
        if data[:3] == datagram.BOM:
            data = data[3:]
        try:
            valid = signature.check(data, position, key)
        except ValueError as error:
            # orjson parses 1024 levels of nesting, the stdlib parser that
            # keeps the text of numbers stops a little earlier.
            self.reject("invalid_json", address, f"not JSON for the signature check: {error}")
            return

        if valid:
            self.accept(position)
            return

        self.reject("bad_signature", address, f"hash does not match the fields and the key of {position.operator}", position.hash)
        self.writer.record_bad_signature(position.operator, position.taxi, address[0])

    def accept(self, position):
        """
        Apply the ordering rule, then queue the position for Redis and Fluentd.
        """
        member = position.taxi + ":" + position.operator
        verdict = self.ordering.check(member, position.timestamp)
        if verdict is not None:
            self.counters[verdict] += 1
            self.ratelog.warn(
                verdict,
                "Not written ({reason}): position of {member} at {timestamp}, not newer than the last one accepted",
                reason=verdict, member=member, timestamp=position.timestamp,
            )
            if verdict == OUT_OF_ORDER and self.fluent is not None:
                self.fluent.emit(position.record())
            return

        self.counters["accepted"] += 1
        self.writer.submit(member, position)
        if self.fluent is not None:
            self.fluent.emit(position.record())
        if self.verbose:
            log.debug("Accepted {position!r}", position=position)

    def reject(self, reason, address, detail, value=None):
        """
        Count a rejected datagram and log it, a few lines a second at most
        for each reason.
        """
        self._rejected(datagram.Rejected(reason, detail, value), address)

    def _rejected(self, rejection, address):
        reason = rejection.reason
        self.counters[reason] += 1
        self.ratelog.warn_lazily(
            reason,
            "Rejected datagram from {source} ({reason}): {detail}; value: {value}",
            lambda: {
                "source": _source(address),
                "reason": reason,
                "detail": rejection.detail,
                "value": _loggable(rejection.value),
            },
        )


def _source(address):
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loggable(value, size=120):
    # repr() escapes control characters, so a datagram cannot write a
    # carriage return or a terminal escape sequence into the log.
    text = repr(value)
    return text if len(text) <= size else text[:size] + "..."
