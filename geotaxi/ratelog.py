"""
Rate-limited logging, so that a flood of bad datagrams costs a few log lines
a second and not one line per datagram.
"""

from twisted.logger import Logger


class RateLimitedLog:
    """
    A token bucket per key: at most ``burst`` lines at once per key, refilled
    at ``per_second`` lines a second. Lines that were held back are counted and
    their number is added to the next line that is written for that key.
    """

    def __init__(self, clock, log=None, per_second=2.0, burst=5):
        self._clock = clock
        self._log = log if log is not None else Logger()
        self._per_second = per_second
        self._burst = burst
        self._buckets = {}

    def _allow(self, key):
        now = self._clock.seconds()
        tokens, updated, suppressed = self._buckets.get(key, (self._burst, now, 0))
        tokens = min(self._burst, tokens + (now - updated) * self._per_second)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now, 0)
            return True, suppressed
        self._buckets[key] = (tokens, now, suppressed + 1)
        return False, suppressed

    def warn_lazily(self, key, format, make_fields):
        """
        Log ``format`` at warning level unless ``key`` is over its rate,
        with the named fields that ``make_fields()`` returns. It is called
        only for lines that are written, so fields that are costly to build
        cost nothing under a flood.
        """
        allowed, suppressed = self._allow(key)
        if not allowed:
            return False
        if suppressed:
            format = format + " ({suppressed} similar lines suppressed)"
        self._log.warn(format, suppressed=suppressed, **make_fields())
        return True

    def warn(self, key, format, **fields):
        """
        Log ``format`` at warning level unless ``key`` is over its rate.
        ``fields`` go to the event as named fields, and ``suppressed`` is
        the number of lines of this key held back since the last one written.
        """
        allowed, suppressed = self._allow(key)
        if not allowed:
            return False
        if suppressed:
            format = format + " ({suppressed} similar lines suppressed)"
        self._log.warn(format, suppressed=suppressed, **fields)
        return True

    def failure(self, key, format, failure, **fields):
        """
        Log ``format`` with ``failure`` and its traceback, at critical level,
        unless ``key`` is over its rate.
        """
        allowed, suppressed = self._allow(key)
        if not allowed:
            return False
        if suppressed:
            format = format + " ({suppressed} similar lines suppressed)"
        self._log.failure(format, failure, suppressed=suppressed, **fields)
        return True

    def error(self, key, format, **fields):
        """
        Log ``format`` at error level unless ``key`` is over its rate.
        """
        allowed, suppressed = self._allow(key)
        if not allowed:
            return False
        if suppressed:
            format = format + " ({suppressed} similar lines suppressed)"
        self._log.error(format, suppressed=suppressed, **fields)
        return True
