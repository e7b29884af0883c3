"""
Forward accepted positions to Fluentd over the Forward protocol (TCP) without
ever blocking the reactor.

Why not fluent-logger's senders (version 0.11.1): ``fluent.sender`` connects
and sends on the calling thread with a 3 s socket timeout, so a slow or absent
Fluentd would stall the reactor. ``fluent.asyncsender`` blocks ``emit()`` once
its queue is full, unless ``queue_circular`` is set, and then it discards the
oldest events, reported only to an optional ``queue_overflow_handler``. Its
sender thread also buffers unsent bytes in memory up to ``bufmax``. Neither
gives a drop count or a bound in records, so this module uses a Twisted TCP
client instead. Entries are packed
with msgpack's default options, as fluent-logger packs them, and the event
time is an integer or fluent-logger's ``EventTime``, so each ``[time, record]``
entry has the same bytes as in fluent-logger's messages.

Design:

- ``emit()`` appends to a deque bounded in record count and schedules one
  flush per reactor turn. When the deque is full, the new record is dropped
  and counted as ``fluent_dropped``.
- A flush packs up to ``batch_size`` records per Forward-mode frame
  ``[tag, [[time, record], ...]]`` and writes frames until the deque is empty
  or the transport pauses us.
- The protocol is a streaming producer of its transport. The transport pauses
  it when more than ``TRANSPORT_BUFFER_SIZE`` bytes wait unsent, for
  example when Fluentd accepts but does not read. Records then wait in the
  deque, so memory stays bounded.
- A ``ClientService`` reconnects with exponential backoff.
"""

import collections

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

import msgpack
from fluent.sender import EventTime

DEFAULT_TAG = "geotaxi.position"

# A frame of 1000 records of about 200 bytes is about 200 KB. Fluentd's
# in_forward has no frame size limit unless chunk_size_limit is set
# (docs.fluentd.org, in_forward).
DEFAULT_BATCH_SIZE = 1000

# Unsent bytes a connection's transport may hold before it pauses us, and the
# bytes it may send per reactor turn. Twisted's defaults (64 KiB and 128 KiB)
# let about 500 records out per turn. In a test on a 2-vCPU VM that emitted
# 1,000 records and spent 30 ms per turn, only 16,000 of 32,000 records/s were
# sent with the defaults, and all of them with 1 MiB.
TRANSPORT_BUFFER_SIZE = 1024 * 1024

# Frames written in one flush before it yields to the reactor, so that a
# large backlog after a reconnection does not hold the reactor for long.
MAX_FRAMES_PER_FLUSH = 16


class FluentForwarder(Service):
    """
    Send records to one Fluentd in Forward mode, buffering a bounded number of
    them while Fluentd is unreachable or slow.

    Counters: ``fluent_sent`` counts records written to the TCP transport,
    ``fluent_dropped`` records dropped because the buffer was full, emitted
    after the service stopped, or still unsent when shutdown ended, and
    ``fluent_errors`` failed connection attempts and connections lost while
    running.
    """

    name = "fluent"
    log = Logger()

    def __init__(
        self,
        host,
        port,
        counters,
        reactor,
        tag=DEFAULT_TAG,
        max_buffer=100_000,
        shutdown_timeout=10.0,
        batch_size=DEFAULT_BATCH_SIZE,
        nanosecond_precision=False,
        connect_timeout=5.0,
        retry_policy=None,
        endpoint=None,
    ):
        """
        Prepare the forwarder. Nothing connects before ``startService()``.

        ``max_buffer`` is the number of records that may wait unsent.
        ``nanosecond_precision`` sends the event time as ``EventTime`` instead
        of integer seconds, as fluent-logger's option of that name does.
        ``connect_timeout`` is the TCP connect timeout in seconds.
        ``retry_policy`` maps the number of failed attempts in a row to the
        delay in seconds before the next one. ``endpoint`` replaces the TCP
        endpoint built from ``host`` and ``port`` (tests use it).
        """
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")

        self.host = host
        self.port = port
        self.tag = tag
        self.max_buffer = max_buffer
        self.shutdown_timeout = shutdown_timeout
        self.batch_size = batch_size
        self.nanosecond_precision = nanosecond_precision
        self._counters = counters
        self._reactor = reactor
        self._seconds = reactor.seconds

        # The number of records that may wait. It drops to 0 once the service
        # has stopped, so that a late emit() is counted as dropped.
        self._capacity = max_buffer
        self._pending = collections.deque()
        self._flush_call = None

        # Number of records dropped since the buffer last had room, so that
        # an overflow logs one line when it starts and one when it ends.
        self._overflow_dropped = 0

        self._protocol = None
        self._paused = False
        self._closing = False
        self._drain_waiters = []
        self._shutdown_call = None

        # msgpack's default options, which fluent-logger also uses when it
        # calls msgpack.packb.
        self._packer = msgpack.Packer()
        self._pack_entry = msgpack.Packer().pack
        self._frame_start = self._packer.pack_array_header(2) + self._packer.pack(tag)

        if endpoint is None:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        # A quiet factory, because the default logs two lines per attempt.
        factory = Factory.forProtocol(lambda: _ForwardProtocol(self))
        factory.noisy = False
        if retry_policy is None:
            retry_policy = backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=2.0)
        self._client = ClientService(
            _FailureReportingEndpoint(endpoint, f"{host}:{port}", self._connection_failed),
            factory,
            retryPolicy=retry_policy,
            clock=reactor,
        )

    @property
    def connected(self):
        """
        True while a TCP connection to Fluentd is open.
        """
        return self._protocol is not None

    @property
    def buffered(self):
        """
        Number of records waiting to be written.
        """
        return len(self._pending)

    def emit(self, record):
        """
        Queue ``record`` (a flat dict of str, int and float values) for
        Fluentd, or drop and count it when the buffer is full. Never blocks.
        """
        pending = self._pending
        if len(pending) >= self._capacity:
            self._drop_on_overflow()
            return

        # Packed at once: a buffer of bytes is invisible to the garbage
        # collector, where 100,000 waiting dicts would be scanned again at
        # every full collection while Fluentd is away.
        seconds = self._seconds()
        time = EventTime(seconds) if self.nanosecond_precision else int(seconds)
        pending.append(self._pack_entry((time, record)))

        # One flush per reactor turn sends everything emitted in that turn
        # in as few frames as possible.
        if self._flush_call is None and self._protocol is not None and not self._paused:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def startService(self):
        """
        Start connecting to Fluentd, retrying with backoff until a connection
        succeeds and again whenever it is lost.
        """
        super().startService()
        self._capacity = self.max_buffer
        self._overflow_dropped = 0
        self._closing = False
        self.log.info(
            "Forwarding records to Fluentd at {host}:{port} with tag {tag}",
            host=self.host,
            port=self.port,
            tag=self.tag,
        )
        self._client.startService()

    def stopService(self):
        """
        Flush the buffered records, then close the connection. Give up after
        ``shutdown_timeout`` seconds and count what is left as dropped.
        Returns a Deferred that never fails.
        """
        super().stopService()
        self._shutdown_call = self._reactor.callLater(self.shutdown_timeout, self._shutdown_timed_out)

        stopped = self._wait_for_drain()
        stopped.addCallback(lambda _: self._close())
        stopped.addErrback(self._log_stop_failure)
        stopped.addCallback(lambda _: self._finish_stop())
        return stopped

    def _drop_on_overflow(self):
        self._counters["fluent_dropped"] += 1
        if self._overflow_dropped == 0 and self._capacity == 0:
            self.log.warn("Dropping records emitted after the Fluentd forwarder stopped")
        elif self._overflow_dropped == 0:
            self.log.warn(
                "Fluentd buffer is full at {max_buffer} records (connected: {connected}),"
                " so new records are dropped until it has room",
                max_buffer=self.max_buffer,
                connected=self.connected,
            )
        self._overflow_dropped += 1

    def _schedule_flush(self):
        if self._flush_call is None and self._pending:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self):
        """
        Write buffered records as Forward-mode frames until the buffer is
        empty, the transport pauses us or this turn's frame limit is reached.
        """
        self._flush_call = None
        pending = self._pending
        pack_array_header = self._packer.pack_array_header
        popleft = pending.popleft
        frames = 0

        while pending and self._writable() and frames < MAX_FRAMES_PER_FLUSH:
            count = min(len(pending), self.batch_size)
            entries = b"".join([popleft() for _ in range(count)])

            # The same bytes as packing [tag, [entry, ...]] whole, since each
            # entry is already packed. write() may call pauseProducing()
            # before it returns, which ends this loop.
            frame = self._frame_start + pack_array_header(count) + entries
            self._protocol.transport.write(frame)

            # NOTE: "sent" means handed to the transport. Records still in
            # its buffer or in the kernel's are lost uncounted if the
            # connection breaks, because Fluentd acks are not requested.
            self._counters["fluent_sent"] += count
            frames += 1

        if self._overflow_dropped and len(pending) < self._capacity:
            self.log.info(
                "Fluentd buffer has room again after {dropped} records were dropped",
                dropped=self._overflow_dropped,
            )
            self._overflow_dropped = 0

        if not pending:
            self._notify_drained()
        elif self._writable():
            self._schedule_flush()

    def _writable(self):
        return self._protocol is not None and not self._paused and not self._closing

    def _wait_for_drain(self):
        waiter = Deferred()
        if self._pending:
            self._drain_waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _notify_drained(self):
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _close(self):
        """
        Stop reconnecting and close the connection once the transport has
        written its buffer.
        """
        self._closing = True
        protocol = self._protocol
        if protocol is not None:
            # A transport with a registered producer never finishes closing.
            protocol.transport.unregisterProducer()
        return self._client.stopService()

    def _shutdown_timed_out(self):
        self._shutdown_call = None
        self.log.warn(
            "Flushing Fluentd at {host}:{port} timed out after {timeout} s,"
            " dropping {count} unsent records",
            host=self.host,
            port=self.port,
            timeout=self.shutdown_timeout,
            count=len(self._pending),
        )

        # Stop waiting for the buffer to drain, then drop the connection and
        # whatever its transport still holds.
        self._notify_drained()
        protocol = self._protocol
        if protocol is not None:
            protocol.transport.abortConnection()

    def _log_stop_failure(self, failure):
        self.log.failure("Failed to stop the Fluentd client cleanly", failure=failure)

    def _finish_stop(self):
        if self._shutdown_call is not None and self._shutdown_call.active():
            self._shutdown_call.cancel()
        self._shutdown_call = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

        unsent = len(self._pending)
        self._pending.clear()
        self._capacity = 0
        if unsent:
            self._counters["fluent_dropped"] += unsent
        self.log.info(
            "Stopped forwarding to Fluentd at {host}:{port} after dropping {unsent} unsent records",
            host=self.host,
            port=self.port,
            unsent=unsent,
        )

    def _connection_made(self, protocol):
        self._protocol = protocol
        self._paused = False
        self.log.info(
            "Connected to Fluentd at {host}:{port} with {count} records waiting",
            host=self.host,
            port=self.port,
            count=len(self._pending),
        )
        self._schedule_flush()

    def _connection_lost(self, protocol, reason):
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._paused = False
        if self._closing:
            return
        self._counters["fluent_errors"] += 1
        self.log.warn(
            "Lost connection to Fluentd at {host}:{port}, reconnecting: {error}",
            host=self.host,
            port=self.port,
            error=reason.getErrorMessage(),
        )

    def _connection_failed(self, failure):
        # A cancelled attempt is our own shutdown, not a failure of Fluentd.
        if failure.check(CancelledError):
            return failure
        self._counters["fluent_errors"] += 1
        self.log.warn(
            "Failed to connect to Fluentd at {host}:{port} with {count} records waiting,"
            " retrying: {error}",
            host=self.host,
            port=self.port,
            error=failure.getErrorMessage(),
            count=len(self._pending),
        )
        return failure

    def _pause(self):
        self._paused = True

    def _resume(self):
        self._paused = False
        self._schedule_flush()


@implementer(IPushProducer)
class _ForwardProtocol(Protocol):
    """
    One connection to Fluentd, registered as a streaming producer of its
    transport so that a full send buffer pauses the forwarder.
    """

    def __init__(self, forwarder):
        self._forwarder = forwarder

    def connectionMade(self):
        # Frames are written whole once per reactor turn, so Nagle's delay
        # would only add latency.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

        # bufferSize and SEND_LIMIT are class attributes of
        # twisted.internet.abstract.FileDescriptor, the base of the POSIX
        # reactors' TCP transports, so setting them here affects only this
        # connection. Other transports keep their own limits.
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = TRANSPORT_BUFFER_SIZE
        if hasattr(self.transport, "SEND_LIMIT"):
            self.transport.SEND_LIMIT = TRANSPORT_BUFFER_SIZE

        self.transport.registerProducer(self, True)
        self._forwarder._connection_made(self)

    def dataReceived(self, data):
        # Fluentd only replies with acks, which this client never requests.
        pass

    def connectionLost(self, reason):
        self._forwarder._connection_lost(self, reason)

    def pauseProducing(self):
        self._forwarder._pause()

    def resumeProducing(self):
        self._forwarder._resume()

    def stopProducing(self):
        # connectionLost() follows and does the cleanup.
        pass


@implementer(IStreamClientEndpoint)
class _FailureReportingEndpoint:
    """
    An endpoint wrapper that reports each failed connection attempt, which
    ClientService only logs at info level.
    """

    def __init__(self, endpoint, address, on_failure):
        self._endpoint = endpoint
        self._address = address
        self._on_failure = on_failure

    def __repr__(self):
        # ClientService logs each scheduled retry with this.
        return f"<Fluentd endpoint {self._address}>"

    def connect(self, factory):
        """
        Connect through the wrapped endpoint and report a failure before
        passing it on.
        """
        return self._endpoint.connect(factory).addErrback(self._on_failure)
