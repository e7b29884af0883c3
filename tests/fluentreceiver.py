"""
A Fluentd Forward-protocol receiver on 127.0.0.1 for tests, since Fluentd
itself is not installed here. It decodes Message, Forward and PackedForward
(optionally gzip-compressed) frames, as Fluentd's in_forward does, and stores
every event as a ``(tag, time, record)`` tuple.
"""

import gzip
import struct

import msgpack
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol


def decode_ext(code, data):
    """
    Convert a Forward-protocol EventTime (ext type 0: 32-bit seconds and
    32-bit nanoseconds, big-endian) to float seconds. Leave other types as is.
    """
    if code == 0 and len(data) == 8:
        seconds, nanoseconds = struct.unpack(">II", data)
        return seconds + nanoseconds / 1e9
    return msgpack.ExtType(code, data)


def new_unpacker():
    """
    Return a streaming msgpack unpacker with the options Fluentd's protocol
    needs: str for strings, EventTime decoded to float seconds.
    """
    return msgpack.Unpacker(raw=False, ext_hook=decode_ext, strict_map_key=False)


class ForwardProtocol(Protocol):
    """
    One client connection: decode frames as they arrive and hand their
    events to the receiver.
    """

    def __init__(self, receiver):
        self._receiver = receiver
        self._unpacker = new_unpacker()
        self.aborted = False

    def connectionMade(self):
        self._receiver.accepted += 1
        self._receiver.connections.append(self)
        if not self._receiver.reading:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        self._unpacker.feed(data)
        for frame in self._unpacker:
            # Frames that follow an abort in the same read are lost, as they
            # would be in the kernel's buffer.
            if self.aborted:
                return
            self._receiver.handle_frame(frame, self)

    def connectionLost(self, reason):
        if self in self._receiver.connections:
            self._receiver.connections.remove(self)
        self._receiver.notify_lost(self)


class ForwardReceiver:
    """
    A listening Forward-protocol server. ``events`` collects what arrived.
    ``stop()`` and ``start()`` may alternate to simulate an outage on the same
    port, and ``pause_reading()`` simulates a Fluentd that accepts but never
    reads.

    ``send_acks`` set to False simulates a receiver that ignores the chunk
    option. ``drop_after`` set to N makes the receiver abort the connection
    once N events have arrived in all, after storing the events of the frame
    that reached N and without acknowledging it. It then returns to None, so
    the receiver drops one connection. ``accepted`` counts the connections
    accepted since the receiver was created.
    """

    def __init__(self, reactor, port=0):
        self.reactor = reactor
        self.port = port
        self.events = []
        self.frames = 0
        self.connections = []
        self.accepted = 0
        self.reading = True
        self.send_acks = True
        self.drop_after = None
        self.errors = []
        self._listening = None
        self._waiters = []
        self._lost_waiters = {}

    def start(self):
        """
        Listen on 127.0.0.1, on the same port as before if there was one.
        """
        factory = Factory.forProtocol(lambda: ForwardProtocol(self))
        self._listening = self.reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self

    def stop(self):
        """
        Stop listening and drop every open connection. Returns a Deferred
        that fires once the port is closed and every connection is gone.
        """
        closing = []
        if self._listening is not None:
            closing.append(self._listening.stopListening())
            self._listening = None
        for connection in list(self.connections):
            lost = Deferred()
            self._lost_waiters.setdefault(connection, []).append(lost)
            closing.append(lost)
            connection.transport.abortConnection()
        return gatherResults(closing)

    def pause_reading(self):
        """
        Stop reading from every connection, present and future.
        """
        self.reading = False
        for connection in self.connections:
            connection.transport.pauseProducing()

    def resume_reading(self):
        """
        Read again from every connection.
        """
        self.reading = True
        for connection in self.connections:
            connection.transport.resumeProducing()

    def handle_frame(self, frame, connection):
        """
        Store the events of one decoded frame, or record why it is invalid.
        """
        try:
            tag, events, options = self._split_frame(frame)
        except (TypeError, ValueError, OSError) as error:
            self.errors.append(f"invalid frame {frame!r:.200}: {error}")
            return

        self.frames += 1
        for time, record in events:
            self.events.append((tag, time, record))

        if self.drop_after is not None and len(self.events) >= self.drop_after:
            self.drop_after = None
            connection.aborted = True
            connection.transport.abortConnection()
            self._fire_waiters()
            return

        # Fluentd replies to a "chunk" option with an ack of the same id.
        if self.send_acks and isinstance(options, dict) and "chunk" in options:
            connection.transport.write(msgpack.packb({"ack": options["chunk"]}))

        self._fire_waiters()

    def wait_for(self, count, timeout=10.0):
        """
        Return a Deferred that fires with the event list once ``count`` events
        have arrived, or fails with TimeoutError after ``timeout`` seconds.
        """
        waiter = Deferred()
        if len(self.events) >= count:
            waiter.callback(self.events)
            return waiter

        def time_out():
            self._waiters.remove(entry)
            waiter.errback(TimeoutError(f"received {len(self.events)} of {count} events within {timeout} s"))

        entry = (count, waiter, self.reactor.callLater(timeout, time_out))
        self._waiters.append(entry)
        return waiter

    def wait_for_connection(self, timeout=10.0):
        """
        Return a Deferred that fires once a client is connected, or fails
        with TimeoutError after ``timeout`` seconds.
        """
        waiter = Deferred()
        deadline = self.reactor.seconds() + timeout

        def check():
            if self.connections:
                waiter.callback(self.connections[-1])
            elif self.reactor.seconds() >= deadline:
                waiter.errback(TimeoutError(f"no client connected within {timeout} s"))
            else:
                self.reactor.callLater(0.01, check)

        check()
        return waiter

    def notify_lost(self, connection):
        """
        Fire the Deferreds waiting for ``connection`` to close.
        """
        for waiter in self._lost_waiters.pop(connection, []):
            waiter.callback(None)

    def _fire_waiters(self):
        for entry in list(self._waiters):
            count, waiter, timer = entry
            if len(self.events) >= count:
                self._waiters.remove(entry)
                timer.cancel()
                waiter.callback(self.events)

    @staticmethod
    def _split_frame(frame):
        """
        Return ``(tag, [(time, record), ...], options)`` of a Message,
        Forward or PackedForward frame.
        """
        if not isinstance(frame, (list, tuple)) or len(frame) < 2 or not isinstance(frame[0], str):
            raise ValueError("expected an array that starts with a string tag")
        tag = frame[0]

        # Forward mode: [tag, [[time, record], ...], options?]
        if isinstance(frame[1], (list, tuple)):
            options = frame[2] if len(frame) > 2 else None
            return tag, [(entry[0], entry[1]) for entry in frame[1]], options

        # PackedForward mode: [tag, bin of concatenated [time, record], options?]
        if isinstance(frame[1], bytes):
            options = frame[2] if len(frame) > 2 else None
            packed = frame[1]
            if isinstance(options, dict) and options.get("compressed") == "gzip":
                packed = gzip.decompress(packed)
            unpacker = new_unpacker()
            unpacker.feed(packed)
            return tag, [(entry[0], entry[1]) for entry in unpacker], options

        # Message mode: [tag, time, record, options?]
        if len(frame) < 3:
            raise ValueError("Message-mode frame is missing its time or record")
        options = frame[3] if len(frame) > 3 else None
        return tag, [(frame[1], frame[2])], options
