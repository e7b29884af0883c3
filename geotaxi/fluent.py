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

Acknowledgements, when ``require_ack_response`` is set (off by default,
because some receivers never send them):

- Each frame gets a third element, the options map
  ``{"chunk": id, "size": count}``, where ``id`` is the base64 of 16 random
  bytes, as the Forward Protocol Specification v1 describes. Fluentd's
  in_forward replies ``{"ack": id}`` after it has passed the frame's events
  to its router (lib/fluent/plugin/in_forward.rb in Fluentd v1).
- A record counts as ``fluent_sent`` only when the ack of its frame arrives.
  At most ``max_unacked_frames`` frames wait for an ack. Beyond that, records
  wait in the deque and overflow as above.
- When the connection is lost, the records of the frames not acknowledged
  go back to the head of the deque in their original order, as many as fit,
  and are sent again after the reconnection. Those that do not fit are
  counted as ``fluent_dropped``, and those sent again as ``fluent_resent``.
  Delivery is at least once: Fluentd gets a record twice when it stored a
  frame whose ack never arrived.
- When a frame has not been acknowledged ``ack_timeout`` seconds after it
  was written, the forwarder aborts the connection, which sends its records
  again as above.

NOTE: in_forward drops a frame larger than its ``chunk_size_limit`` without
an ack. Its records would then be sent again at every ack timeout and never
counted as sent, so ``batch_size`` must keep frames under that limit.
"""

import base64
import collections
import os

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

# Frames that may wait for an ack, and seconds to wait for each. With frames
# of up to DEFAULT_BATCH_SIZE records, 8 frames let through at most 8,000
# records per round trip to Fluentd. Fluentd's out_forward waits 190 s by
# default (ack_response_timeout), a bound sized for TCP connect retries. The
# timeout here starts once the connection is up, and in_forward acks as soon
# as it has handled a frame, so waiting 30 s means that Fluentd is stuck or
# does not read.
DEFAULT_MAX_UNACKED_FRAMES = 8
DEFAULT_ACK_TIMEOUT = 30.0

# Bytes of undecoded responses a connection may hold. An ack is about 40
# bytes, so a longer response means that the peer is not a Forward server.
MAX_RESPONSE_BUFFER_SIZE = 64 * 1024

# A frame written with a chunk option: its packed entries, kept to be sent
# again if the connection is lost, and the reactor time it was written.
_UnackedFrame = collections.namedtuple("_UnackedFrame", ["entries", "written_at"])


class FluentForwarder(Service):
    """
    Send records to one Fluentd in Forward mode, buffering a bounded number of
    them while Fluentd is unreachable or slow.

    Counters: ``fluent_sent`` counts records written to the TCP transport, or
    with ``require_ack_response`` records whose frame Fluentd acknowledged.
    ``fluent_dropped`` counts records dropped because the buffer was full,
    emitted after the service stopped, or neither sent nor acknowledged when
    shutdown ended. ``fluent_errors`` counts failed connection attempts and
    connections lost or aborted while running. ``fluent_resent`` counts
    records written again after a connection was lost before their ack.
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
        require_ack_response=False,
        max_unacked_frames=DEFAULT_MAX_UNACKED_FRAMES,
        ack_timeout=DEFAULT_ACK_TIMEOUT,
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

        ``require_ack_response`` requests an ack of every frame, as Fluentd's
        out_forward option of that name does. Then at most
        ``max_unacked_frames`` frames wait for an ack, so up to
        ``max_unacked_frames * batch_size`` records are held in memory on top
        of ``max_buffer``. ``ack_timeout`` is the number of seconds after
        which a frame without an ack makes the forwarder reconnect.
        """
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if max_unacked_frames < 1:
            raise ValueError(f"max_unacked_frames must be at least 1, got {max_unacked_frames!r}")
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be above 0 seconds, got {ack_timeout!r}")

        self.host = host
        self.port = port
        self.tag = tag
        self.max_buffer = max_buffer
        self.shutdown_timeout = shutdown_timeout
        self.batch_size = batch_size
        self.nanosecond_precision = nanosecond_precision
        self.require_ack_response = require_ack_response
        self.max_unacked_frames = max_unacked_frames
        self.ack_timeout = ack_timeout
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

        # Frames written on the current connection and not yet acknowledged,
        # by chunk id in the order written, and their total record count.
        # Both stay empty unless require_ack_response is set.
        self._unacked = {}
        self._unacked_records = 0
        self._ack_timer = None

        # Number of records at the head of _pending that were put back after
        # a lost connection, so that writing them counts as fluent_resent.
        self._requeued = 0

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
        self._acked_frame_start = self._packer.pack_array_header(3) + self._packer.pack(tag)

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

    @property
    def unacked(self):
        """
        Number of records written and waiting for Fluentd's ack, always 0
        unless ``require_ack_response`` is set.
        """
        return self._unacked_records

    def emit(self, record):
        """
        Queue ``record`` (a flat dict of str, int and float values) for
        Fluentd, or drop and count it when the buffer is full. It only packs
        the record and appends it to a deque, so it does not block.
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
            "Forwarding records to Fluentd at {host}:{port} with tag {tag}"
            " (acks requested: {require_ack_response})",
            host=self.host,
            port=self.port,
            tag=self.tag,
            require_ack_response=self.require_ack_response,
        )
        self._client.startService()

    def stopService(self):
        """
        Flush the buffered records and, with ``require_ack_response``, wait
        for their acks, then close the connection. Give up after
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
                "Fluentd buffer is full at {max_buffer} records (connected: {connected},"
                " awaiting an ack: {unacked}), so new records are dropped until it has room",
                max_buffer=self.max_buffer,
                connected=self.connected,
                unacked=self._unacked_records,
            )
        self._overflow_dropped += 1

    def _schedule_flush(self):
        if self._flush_call is None and self._pending:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self):
        """
        Write buffered records as Forward-mode frames until the buffer is
        empty, the transport pauses us, the frames awaiting an ack reach
        their limit or this turn's frame limit is reached.
        """
        self._flush_call = None
        pending = self._pending
        popleft = pending.popleft
        frames = 0

        while pending and self._writable() and frames < MAX_FRAMES_PER_FLUSH:
            count = min(len(pending), self.batch_size)
            entries = [popleft() for _ in range(count)]
            if self._requeued:
                resent = min(count, self._requeued)
                self._requeued -= resent
                self._counters["fluent_resent"] += resent

            # write() may call pauseProducing() before it returns, which ends
            # this loop.
            if self.require_ack_response:
                self._write_frame_with_chunk(entries)
            else:
                self._write_frame(entries)
            frames += 1

        if self._overflow_dropped and len(pending) < self._capacity:
            self.log.info(
                "Fluentd buffer has room again after {dropped} records were dropped",
                dropped=self._overflow_dropped,
            )
            self._overflow_dropped = 0

        if not pending:
            if not self._unacked:
                self._notify_drained()
        elif self._writable():
            self._schedule_flush()

    def _write_frame(self, entries):
        # The same bytes as packing [tag, [entry, ...]] whole, since each
        # entry is already packed.
        count = len(entries)
        frame = self._frame_start + self._packer.pack_array_header(count) + b"".join(entries)
        self._protocol.transport.write(frame)

        # NOTE: without require_ack_response, "sent" means handed to the
        # transport. Records still in its buffer or in the kernel's are lost
        # uncounted if the connection breaks.
        self._counters["fluent_sent"] += count

    def _write_frame_with_chunk(self, entries):
        """
        Write ``[tag, [entry, ...], {"chunk": id, "size": count}]`` and keep
        the entries until Fluentd acknowledges ``id``.
        """
        count = len(entries)
        chunk = base64.b64encode(os.urandom(16)).decode("ascii")

        # Recorded before write(), so that the frame is known to whatever
        # write() triggers.
        self._unacked[chunk] = _UnackedFrame(entries, self._seconds())
        self._unacked_records += count
        if self._ack_timer is None:
            self._ack_timer = self._reactor.callLater(self.ack_timeout, self._check_ack_timeout)

        packer = self._packer
        frame = b"".join([
            self._acked_frame_start,
            packer.pack_array_header(count),
            *entries,
            packer.pack({"chunk": chunk, "size": count}),
        ])
        self._protocol.transport.write(frame)

    def _writable(self):
        return (
            self._protocol is not None
            and not self._paused
            and not self._closing
            and len(self._unacked) < self.max_unacked_frames
        )

    def _wait_for_drain(self):
        waiter = Deferred()
        if self._pending or self._unacked:
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
            " dropping {count} unsent records and {unacked} records awaiting an ack",
            host=self.host,
            port=self.port,
            timeout=self.shutdown_timeout,
            count=len(self._pending),
            unacked=self._unacked_records,
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
        self._cancel_ack_timer()

        unsent = len(self._pending)
        unacked = self._unacked_records
        self._pending.clear()
        self._requeued = 0
        self._unacked.clear()
        self._unacked_records = 0
        self._capacity = 0
        if unsent or unacked:
            self._counters["fluent_dropped"] += unsent + unacked
        self.log.info(
            "Stopped forwarding to Fluentd at {host}:{port} after dropping {unsent} unsent records"
            " and {unacked} records awaiting an ack",
            host=self.host,
            port=self.port,
            unsent=unsent,
            unacked=unacked,
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
        # A connection that _abort() already detached was counted there.
        if protocol is not self._protocol:
            return
        closing = self._closing
        self._detach()
        if closing:
            return
        self._counters["fluent_errors"] += 1
        self.log.warn(
            "Lost connection to Fluentd at {host}:{port}, reconnecting: {error}",
            host=self.host,
            port=self.port,
            error=reason.getErrorMessage(),
        )
        self._requeue_unacked()

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

    def _detach(self):
        """
        Forget the current connection. Its frames awaiting an ack stay in
        ``_unacked`` for _requeue_unacked() or _finish_stop().
        """
        self._protocol = None
        self._paused = False
        self._cancel_ack_timer()

    def _abort(self):
        """
        Drop the current connection at once, then send again the records it
        left unacknowledged once ClientService has reconnected.
        """
        protocol = self._protocol
        closing = self._closing
        self._detach()
        protocol.transport.abortConnection()
        if not closing:
            self._counters["fluent_errors"] += 1
            self._requeue_unacked()

    def _requeue_unacked(self):
        """
        Put the records of the frames awaiting an ack back at the head of the
        buffer in their original order, oldest first as far as there is
        room, and count the rest as dropped.
        """
        if not self._unacked:
            return
        entries = [entry for frame in self._unacked.values() for entry in frame.entries]
        self._unacked.clear()
        self._unacked_records = 0

        room = max(0, self._capacity - len(self._pending))
        kept = entries[:room]
        dropped = len(entries) - len(kept)
        self._pending.extendleft(reversed(kept))
        self._requeued += len(kept)
        if dropped:
            self._counters["fluent_dropped"] += dropped
        self.log.warn(
            "Queued {count} records that Fluentd at {host}:{port} did not acknowledge"
            " to be sent again after reconnecting, and dropped {dropped} that did not fit in the buffer",
            host=self.host,
            port=self.port,
            count=len(kept),
            dropped=dropped,
        )

    def _ack_received(self, protocol, response):
        """
        Count the records of the frame that ``response`` acknowledges as sent.
        Ignore any other response, and acks of unknown chunk ids.
        """
        if protocol is not self._protocol or not isinstance(response, dict):
            return
        chunk = response.get("ack")
        if not isinstance(chunk, str):
            return
        frame = self._unacked.pop(chunk, None)
        if frame is None:
            return

        count = len(frame.entries)
        self._unacked_records -= count
        self._counters["fluent_sent"] += count
        if not self._unacked:
            self._cancel_ack_timer()
            if not self._pending:
                self._notify_drained()
        self._schedule_flush()

    def _invalid_response(self, protocol, error):
        if protocol is not self._protocol:
            return
        self.log.warn(
            "Invalid response from Fluentd at {host}:{port},"
            " dropping the connection and reconnecting: {error}",
            host=self.host,
            port=self.port,
            error=error,
        )
        self._abort()

    def _check_ack_timeout(self):
        """
        Abort the connection if its oldest frame has waited ``ack_timeout``
        seconds for an ack, or check again when it will have.
        """
        self._ack_timer = None
        if not self._unacked or self._protocol is None:
            return
        oldest = next(iter(self._unacked.values()))
        waited = self._seconds() - oldest.written_at
        if waited < self.ack_timeout:
            self._ack_timer = self._reactor.callLater(self.ack_timeout - waited, self._check_ack_timeout)
            return

        self.log.warn(
            "No ack from Fluentd at {host}:{port} within {timeout} s for a frame of {count}"
            " records, dropping the connection to send {unacked} records again",
            host=self.host,
            port=self.port,
            timeout=self.ack_timeout,
            count=len(oldest.entries),
            unacked=self._unacked_records,
        )
        self._abort()

    def _cancel_ack_timer(self):
        if self._ack_timer is not None and self._ack_timer.active():
            self._ack_timer.cancel()
        self._ack_timer = None

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
        self._unpacker = None
        if forwarder.require_ack_response:
            self._unpacker = msgpack.Unpacker(max_buffer_size=MAX_RESPONSE_BUFFER_SIZE)

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
        """
        Decode Fluentd's ack responses. Without require_ack_response, Fluentd
        sends nothing, and any data is ignored.
        """
        if self._unpacker is None:
            return
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as error:
            self._forwarder._invalid_response(self, error)
            return

        # Each step consumes bytes of the buffer, so the loop ends. The acks
        # decoded before an invalid object still count.
        while True:
            try:
                response = next(self._unpacker)
            except StopIteration:
                return
            except (ValueError, msgpack.UnpackException) as error:
                self._forwarder._invalid_response(self, error)
                return
            self._forwarder._ack_received(self, response)

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
