"""
The Redis writer: a bounded backlog of accepted positions, written in
batches by one Lua script call per round trip.

Every accepted position ends in exactly one counter, and until then it is
pending or in flight. ``written``: in Redis. ``superseded``: a newer position
of the same taxi and operator replaced it before it was written.
``queue_full``: the backlog was full. ``redis_rejected``: Redis refused that
one write. ``shutdown_dropped``: still queued when the shutdown timeout ended.
"""

from importlib import resources

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from geotaxi.ratelog import RateLimitedLog

SCRIPT = resources.files("geotaxi").joinpath("write_positions.lua").read_bytes()

log = Logger()


class RedisWriter(service.Service):
    """
    Write positions to Redis in batches of at most ``batch_size``, with at
    most ``max_in_flight`` batches waiting for a reply.

    The backlog keeps only the newest pending position of each member
    (``<taxi>:<operator>``) and at most ``queue_size`` members. A new member
    that finds it full is dropped and counted as ``queue_full``. A batch that
    fails or times out goes back to the backlog, behind any newer position of
    the same member, and the writer waits ``retry_interval`` seconds before
    the next try.

    A position waits up to ``batch_delay`` seconds for others to share its
    round trip. Without that wait, at a few thousand datagrams a second each
    position went alone and cost about 120 µs of CPU instead of about 25.
    """

    name = "redis"

    def __init__(self, link, clock, counters, queue_size=100_000, batch_size=1000,
                 max_in_flight=4, timeout=5.0, retry_interval=0.25, shutdown_timeout=10.0,
                 max_bad_signatures=10_000, batch_delay=0.005):
        self.link = link
        self.clock = clock
        self.counters = counters
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.shutdown_timeout = shutdown_timeout
        self.max_bad_signatures = max_bad_signatures
        self.batch_delay = batch_delay

        self._pending = {}
        self._bad_signatures = []
        self._in_flight = 0
        self._in_flight_positions = 0
        self._flush_call = None
        self._retry_at = 0.0
        self._drained = []
        self._closed = False
        self._failing = False
        self._ratelog = RateLimitedLog(clock, log)
        # One line every 5 s while Redis is away is enough to see it.
        self._unreachable_log = RateLimitedLog(clock, log, per_second=0.2, burst=1)

    @property
    def pending(self):
        """
        The number of positions waiting to be sent.
        """
        return len(self._pending)

    @property
    def in_flight(self):
        """
        The number of positions sent whose reply has not come yet.
        """
        return self._in_flight_positions

    def startService(self):
        super().startService()
        self.link.start()

    def submit(self, member, position):
        """
        Queue an accepted position for writing. Return False if it was dropped
        because the backlog is full.
        """
        # The backlog keeps the script's line, a str, and not the Position,
        # because the garbage collector does not track a dict of strings.
        # A backlog of 100,000 objects was rescanned at each collection and
        # slowed the whole server just when it was behind.
        line = f"{position.taxi} {position.operator} {position.lon_text} {position.lat_text} {position.value}\n"
        pending = self._pending
        if member in pending:
            self.counters["superseded"] += 1
        elif len(pending) >= self.queue_size:
            self.counters["queue_full"] += 1
            self._ratelog.warn(
                "queue_full",
                "Redis backlog full ({size} positions): dropped the position of {member}",
                size=len(pending), member=member,
            )
            return False
        pending[member] = line

        if self._flush_call is None:
            self._flush_call = self.clock.callLater(self.batch_delay, self._flush)
        return True

    def record_bad_signature(self, operator, taxi, ip):
        """
        Queue the increments of the badhash_* sorted sets for one datagram.
        """
        if len(self._bad_signatures) >= self.max_bad_signatures:
            self.counters["badhash_dropped"] += 1
            return
        self._bad_signatures.append(f"{operator} {taxi} {ip}\n")
        self._schedule(self.batch_delay)

    def _schedule(self, delay=0):
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(delay, self._flush)

    def _flush(self):
        self._flush_call = None

        if not self._pending and not self._bad_signatures:
            self._check_drained()
            return

        # Sending while Redis is down would only wait for the timeout, so
        # wait for the connection and for the pause after a failure.
        now = self.clock.seconds()
        if now < self._retry_at:
            self._schedule(self._retry_at - now)
            return
        if not self.link.connected:
            self._failing = True
            self.counters["redis_errors"] += 1
            self._unreachable_log.error(
                "redis_unreachable",
                "Redis at {address} is not connected: {count} positions wait in the backlog",
                address=self.link.address, count=len(self._pending),
            )
            self._schedule(self.retry_interval)
            return

        while (self._pending or self._bad_signatures) and self._in_flight < self.max_in_flight:
            self._send(self._take_batch(), self._take_bad_signatures())
            # A call that failed at once set a pause, so stop until it ends.
            if self.clock.seconds() < self._retry_at:
                self._schedule(self._retry_at - self.clock.seconds())
                break

    def _take_batch(self):
        pending = self._pending
        if len(pending) <= self.batch_size:
            self._pending = {}
            return list(pending.items())

        batch = []
        for member in pending:
            batch.append((member, pending[member]))
            if len(batch) == self.batch_size:
                break
        for member, _ in batch:
            del pending[member]
        return batch

    def _take_bad_signatures(self):
        lines, self._bad_signatures = self._bad_signatures, []
        return "".join(lines)

    def _send(self, batch, bad_signatures):
        lines = "".join([line for _, line in batch])
        now = int(self.clock.seconds())

        self._in_flight += 1
        self._in_flight_positions += len(batch)
        d = defer.maybeDeferred(self.link.redis.eval, SCRIPT, [], [now, lines, bad_signatures])
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._written, self._failed, callbackArgs=(batch,), errbackArgs=(batch, bad_signatures))
        d.addBoth(self._sent, len(batch))

    def _written(self, reply, batch):
        if self._closed:
            # Counted as shutdown_dropped when the shutdown timeout passed.
            return
        if self._failing:
            self._failing = False
            log.info("Writing to Redis at {address} again", address=self.link.address)
        written, failed, first_error = int(reply[0]), int(reply[1]), reply[2]
        self.counters["written"] += written
        if failed:
            self.counters["redis_rejected"] += failed
            self._ratelog.error(
                "redis_rejected",
                "Redis refused {failed} of {count} positions: {error}",
                failed=failed, count=len(batch), error=first_error,
            )

    def _failed(self, failure, batch, bad_signatures):
        self.counters["redis_errors"] += 1
        self._ratelog.error(
            "redis_errors",
            "Writing {count} positions to Redis at {address} failed, retrying in {delay} s: {error}",
            count=len(batch), address=self.link.address, delay=self.retry_interval,
            error=failure.getErrorMessage() or failure.type.__name__,
        )
        if self._closed:
            return
        self._failing = True
        self._retry_at = self.clock.seconds() + self.retry_interval
        self._requeue(batch)
        if bad_signatures:
            if len(self._bad_signatures) < self.max_bad_signatures:
                self._bad_signatures.append(bad_signatures)
            else:
                self.counters["badhash_dropped"] += bad_signatures.count("\n")

    def _requeue(self, batch):
        pending = self._pending
        for member, line in batch:
            if member in pending:
                self.counters["superseded"] += 1
            elif len(pending) >= self.queue_size:
                self.counters["queue_full"] += 1
            else:
                pending[member] = line

    def _sent(self, _, count):
        self._in_flight -= 1
        self._in_flight_positions -= count
        if self._pending or self._bad_signatures:
            self._schedule()
        else:
            self._check_drained()

    def _check_drained(self):
        if self._in_flight == 0 and not self._pending and not self._bad_signatures:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self):
        """
        Return a Deferred that fires once nothing is pending or in flight.
        """
        d = defer.Deferred()
        self._drained.append(d)
        self._check_drained()
        return d

    @defer.inlineCallbacks
    def stopService(self):
        """
        Write what is queued, for at most ``shutdown_timeout`` seconds, count
        what is left as ``shutdown_dropped``, and close the connection.
        """
        super().stopService()
        left = self.pending + self.in_flight
        if left:
            log.info("Writing {count} queued positions to Redis before exit", count=left)
            try:
                yield self.drain().addTimeout(self.shutdown_timeout, self.clock)
            except defer.TimeoutError:
                lost = self.pending + self.in_flight
                self.counters["shutdown_dropped"] += lost
                log.error(
                    "Redis did not take {count} positions within {timeout} s of shutdown; they are dropped",
                    count=lost, timeout=self.shutdown_timeout,
                )
        self._closed = True
        self._pending = {}
        self.counters["badhash_dropped"] += sum(lines.count("\n") for lines in self._bad_signatures)
        self._bad_signatures = []
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        yield self.link.stop()
