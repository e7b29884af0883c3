"""
Counters of every outcome of a datagram, shared by all parts of one process.
"""

from collections import Counter

# Every datagram received ends in exactly one of these, or is still pending
# in the Redis backlog. The report prints them in this order.
REJECTION_REASONS = (
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "invalid_field",
    "out_of_range",
    "zero_position",
    "timestamp_window",
    "auth_unavailable",
    "unknown_operator",
    "bad_signature",
    "auth_backlog_full",
    "out_of_order",
    "duplicate",
)

# Outcomes after a position was accepted: it is written, replaced in the
# backlog by a newer position of the same taxi, refused by Redis, or dropped.
WRITE_OUTCOMES = ("written", "superseded", "queue_full", "redis_rejected", "shutdown_dropped")

OTHER_COUNTERS = (
    "internal_errors",
    "redis_errors",
    "badhash_dropped",
    "apikey_reloads",
    "apikey_reload_errors",
    "fluent_sent",
    "fluent_dropped",
    "fluent_resent",
    "fluent_errors",
    "kernel_drops",
)

ORDER = ("received", "accepted") + REJECTION_REASONS + WRITE_OUTCOMES + OTHER_COUNTERS


class Counters(Counter):
    """
    Named event counts. A missing name reads as 0, so any part of the server
    increments its own names with ``counters["name"] += 1``.
    """

    def snapshot(self):
        """
        Return every known counter, zero ones included, in report order,
        followed by any other name that was incremented.
        """
        values = {name: self[name] for name in ORDER}
        for name in sorted(self):
            values.setdefault(name, self[name])
        return values

    def report_line(self):
        """
        Format all counters on one line, ``name=value`` separated by spaces.
        """
        return " ".join(f"{name}={value}" for name, value in self.snapshot().items())
