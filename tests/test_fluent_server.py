"""
The whole server with Fluentd forwarding on: real UDP datagrams in on
127.0.0.1, a real redis-server, and a Forward-protocol receiver on 127.0.0.1
that the tests leave out, pause, stop and restart.

Whatever Fluentd does, every position reaches Redis at the offered rate, the
kernel drops no datagram on the server socket, and every record emitted is
sent, still buffered or counted as ``fluent_dropped``.
"""

import os
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.logger import Logger, globalLogPublisher

from geotaxi.netstat import socket_drops
from geotaxi.options import Options
from geotaxi.tap import makeService
from tests.fluentreceiver import ForwardReceiver
from tests.harness import HASH, OPERATOR, ServerTestCase, position
from tests.redisserver import free_port

log = Logger()

TAG = "geotaxi.position"

# Offered load of the outage tests: RATE datagrams a second for DURATION
# seconds, sent every TICK seconds. A late tick catches up with at most
# MAX_BURST datagrams, which fit easily in the server socket's receive buffer.
RATE = 2000
DURATION = 5.0
TOTAL = int(RATE * DURATION)
TICK = 0.01
MAX_BURST = 200

# Positions sent and not yet written that a tick may find: half a second of
# traffic. Redis normally writes each burst before the next tick.
MAX_LAG = RATE // 2

# A buffer small enough that a few seconds of outage overflow it.
FLUENT_BUFFER = 1000
SHUTDOWN_TIMEOUT = 2.0

# Bound of the waits for the forwarder to reconnect. After n failed attempts
# in a row it waits 0.5 * 2**n s (at most 10 s) plus up to 1 s of jitter, so
# after a long outage its next attempt may come 11 s after the receiver returns.
RECONNECT_TIMEOUT = 25.0

# Positions sent after Fluentd comes back, to show that records flow again.
AFTER_RETURN = 200

FIELD_TYPES = {
    "taxi": "str",
    "operator": "str",
    "lat": "float",
    "lon": "float",
    "timestamp": "int",
    "version": "int",
    "status": "str",
    "device": "str",
    "hash": "str",
}


def taxi_number(record):
    """
    Return N of a record of taxi ``taxi-N``.
    """
    return int(record["taxi"].rpartition("-")[2])


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class FluentServerTestCase(ServerTestCase):
    """
    ServerTestCase with Fluentd forwarding on. ``setUp()`` starts no server:
    each test starts its receiver, or none, then ``start_server()`` with the
    receiver's port.
    """

    timeout = 120

    def setUp(self):
        self.redis.command("FLUSHALL")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.client.close)
        self.sent = 0

    def start_receiver(self, port=0):
        """
        Start a Forward receiver on 127.0.0.1, stopped in cleanup.
        """
        receiver = ForwardReceiver(reactor, port).start()
        self.addCleanup(receiver.stop)
        return receiver

    @defer.inlineCallbacks
    def start_server(self, fluent_port, *extra):
        options = Options(environ={})
        options.parseOptions([
            "--host", "127.0.0.1",
            "--port", "0",
            "--redis-port", str(self.redis.port),
            "--fluent-host", "127.0.0.1",
            "--fluent-port", str(fluent_port),
            "--fluent-buffer", str(FLUENT_BUFFER),
            "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
            *extra,
        ])
        self.service = makeService(options, reactor, handle_signals=False)
        self.service.startService()
        self.addCleanup(self.stop_server)
        self.counters = self.service.counters
        self.fluent = self.service.fluent
        self.address = ("127.0.0.1", self.service.udp.address.port)
        self.inode = os.fstat(self.service.udp.listening_port.socket.fileno()).st_ino
        self.kernel_drops_at_start = socket_drops(inode=self.inode)
        yield self.wait_for(lambda: self.service.writer.link.connected, "connection to Redis")

    def send_position(self, **fields):
        """
        Send a valid position of a new taxi, ``taxi-<number sent so far>``.
        """
        self.send(position(taxi=f"taxi-{self.sent}", **fields))
        self.sent += 1

    def send_traffic(self, total, rate=RATE):
        """
        Send ``total`` positions, each of a new taxi, at ``rate`` a second in
        bursts every TICK seconds. Returns a Deferred that fires once all were
        sent, or once three times the planned duration has passed.

        ``self.max_lag`` records the largest number of positions sent and not
        yet written that a tick saw.
        """
        first = self.sent
        start = time.monotonic()
        deadline = start + 3 * total / rate
        self.max_lag = 0

        def tick():
            now = time.monotonic()
            self.max_lag = max(self.max_lag, self.sent - self.counters["written"])
            due = min(total, int(rate * (now - start)) + 1)
            for _ in range(min(due - (self.sent - first), MAX_BURST)):
                self.send_position()
            if self.sent - first >= total or now > deadline:
                loop.stop()

        loop = task.LoopingCall(tick)
        self.addCleanup(lambda: loop.running and loop.stop())
        done = loop.start(TICK)
        done.addCallback(lambda _: time.monotonic() - start)
        return done

    def kernel_drops(self):
        """
        Return the datagrams the kernel dropped on the server socket since
        the server started.
        """
        return socket_drops(inode=self.inode) - self.kernel_drops_at_start

    def stored_positions(self):
        return self.redis.command("ZCARD", "timestamps")

    @defer.inlineCallbacks
    def run_offered_load(self, scenario):
        """
        Send RATE positions a second for DURATION seconds, wait until all are
        written, and check that Redis kept pace and no datagram was lost.
        """
        duration = yield self.send_traffic(TOTAL)
        traffic_end = time.monotonic()
        yield self.settle(self.sent)
        settle_seconds = time.monotonic() - traffic_end

        self.service.udp.update_kernel_drops()
        log.info(
            "{scenario}: sent {sent} in {duration:.2f} s ({offered:.0f}/s), written {written},"
            " written {settle:.2f} s after the last datagram, max lag {lag}, fluent_sent {fluent_sent},"
            " fluent_dropped {dropped}, buffered {buffered}, kernel drops {drops}",
            scenario=scenario, sent=self.sent, duration=duration, offered=self.sent / duration,
            written=self.counters["written"], settle=settle_seconds, lag=self.max_lag,
            fluent_sent=self.counters["fluent_sent"], dropped=self.counters["fluent_dropped"],
            buffered=self.fluent.buffered, drops=self.kernel_drops(),
        )

        # The sender shares the server's reactor, so a blocked reactor shows
        # as a lower offered rate rather than as kernel drops.
        self.assertEqual(self.sent, TOTAL)
        self.assertLess(duration, DURATION + 1.0, "the offered rate fell: the reactor was blocked")
        self.assertEqual(self.counters["written"], self.sent)
        self.assertEqual(self.stored_positions(), self.sent)
        self.assertLess(self.max_lag, MAX_LAG, "Redis writes fell behind the offered rate")
        self.assertLess(settle_seconds, 3.0, "Redis writes fell behind the offered rate")
        self.assertEqual(self.kernel_drops(), 0, "the kernel dropped datagrams on the server socket")
        self.assertEqual(self.counters["kernel_drops"], 0)

    @defer.inlineCallbacks
    def fill_fluent_buffers(self):
        """
        Emit records of taxis ``prefill-N`` straight to the forwarder, 500 a
        reactor turn, until it drops one: every buffer between it and a
        receiver that does not read is then full. Returns the number emitted.
        """
        emitted = 0
        deadline = time.monotonic() + 20
        while self.counters["fluent_dropped"] == 0 and emitted < 200_000 and time.monotonic() < deadline:
            for _ in range(500):
                self.fluent.emit(position(taxi=f"prefill-{emitted}"))
                emitted += 1
            yield sleep(0)

        self.assertGreater(self.counters["fluent_dropped"], 0)
        return emitted

    def assert_records_accounted(self, emitted):
        """
        Check that each of ``emitted`` records was sent, dropped or is still
        buffered.
        """
        sent = self.counters["fluent_sent"]
        dropped = self.counters["fluent_dropped"]
        self.assertEqual(sent + dropped + self.fluent.buffered, emitted)

    @defer.inlineCallbacks
    def check_records_resume(self, receiver):
        """
        Wait until the forwarder is connected again and has sent its buffer,
        then send AFTER_RETURN more positions and wait until the last of them
        reaches ``receiver``.
        """
        yield self.wait_for(lambda: self.fluent.connected, "reconnection to Fluentd", timeout=RECONNECT_TIMEOUT)
        yield self.wait_for(lambda: self.fluent.buffered == 0, "the Fluentd buffer to drain")
        first = self.sent
        for _ in range(AFTER_RETURN):
            self.send_position()
        last = f"taxi-{self.sent - 1}"
        yield self.wait_for(
            lambda: receiver.events and receiver.events[-1][2]["taxi"] == last,
            f"record of {last}",
        )

        arrived = [
            record for _, _, record in receiver.events
            if record["taxi"].startswith("taxi-") and taxi_number(record) >= first
        ]
        self.assertEqual(len(arrived), AFTER_RETURN)


class ForwardingTests(FluentServerTestCase):
    """
    The records a live receiver gets for accepted, out-of-order and rejected
    datagrams.
    """

    @defer.inlineCallbacks
    def setUp(self):
        super().setUp()
        self.receiver = self.start_receiver()
        yield self.start_server(self.receiver.port)
        yield self.receiver.wait_for_connection()

    @defer.inlineCallbacks
    def test_thousand_positions_in_order(self):
        """
        1000 positions in the forms the contract allows arrive as 1000
        records tagged geotaxi.position, in the order sent, with the
        normalised fields and the hash, and no source address.
        """
        now = int(time.time())
        forms = [
            {"lat": 48.856613, "lon": 2.352222, "timestamp": now, "version": 2},
            {"lat": "48,856613", "lon": "2,352222", "timestamp": str(now), "version": "2"},
            {"lat": "4.8856613e1", "lon": "2.352222", "timestamp": now * 1000 + 999, "version": 2},
            {"lat": "48.856613", "lon": 2.352222, "timestamp": now + 0.75, "version": "2"},
        ]
        start = int(time.time())
        for index in range(1000):
            self.send_position(**forms[index % len(forms)])
            if index % 100 == 99:
                yield sleep(TICK)

        events = yield self.receiver.wait_for(1000)
        yield self.settle(1000)
        end = int(time.time()) + 1

        self.assertEqual(len(events), 1000)
        self.assertEqual({tag for tag, _, _ in events}, {TAG})
        records = [record for _, _, record in events]
        self.assertEqual([record["taxi"] for record in records], [f"taxi-{index}" for index in range(1000)])
        for index, record in enumerate(records):
            expected = {
                "taxi": f"taxi-{index}",
                "operator": OPERATOR,
                "lat": 48.856613,
                "lon": 2.352222,
                "timestamp": now,
                "version": 2,
                "status": "free",
                "device": "phone",
                "hash": HASH,
            }
            self.assertEqual(record, expected)
            self.assertEqual({name: type(value).__name__ for name, value in record.items()}, FIELD_TYPES)

        with_address = [record for record in records if any("127.0.0.1" in str(value) for value in record.values())]
        self.assertEqual(with_address, [])
        event_times = [event_time for _, event_time, _ in events]
        self.assertEqual([value for value in event_times if type(value) is not int], [])
        self.assertEqual([value for value in event_times if not start <= value <= end], [])
        self.assertEqual(self.counters["fluent_sent"], 1000)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertEqual(self.stored_positions(), 1000)

    @defer.inlineCallbacks
    def test_out_of_order_forwarded(self):
        """
        A position older than the taxi's last one is forwarded, because
        Fluentd keeps the history, but Redis keeps the newer one.
        """
        now = int(time.time())
        self.send(position(taxi="taxi-late", timestamp=now))
        self.send(position(taxi="taxi-late", timestamp=now - 60, lat=48.8))

        events = yield self.receiver.wait_for(2)
        yield self.settle(2)

        self.assertEqual([record["timestamp"] for _, _, record in events], [now, now - 60])
        self.assertEqual(self.counters["out_of_order"], 1)
        self.assertEqual(self.counters["written"], 1)
        stored = self.redis.command("HGET", "taxi:taxi-late", OPERATOR)
        self.assertEqual(stored, f"{now} 48.856613 2.352222 free phone 2")

    @defer.inlineCallbacks
    def test_rejected_not_forwarded(self):
        """
        Rejected datagrams produce no record: the first record to arrive is
        that of the valid position sent after them.
        """
        now = int(time.time())
        self.send(b"{not json")
        self.send(position(taxi="taxi-zero", lat=0, lon=0))
        self.send(position(taxi="taxi-old", timestamp=now - 7200))
        self.send(position(taxi="taxi:colon"))
        self.send(position(taxi="taxi-valid"))

        # Datagrams are read in the order sent and emit() is synchronous, so a
        # record of a rejected datagram would arrive before that of taxi-valid.
        events = yield self.receiver.wait_for(1)
        yield self.settle(5)

        self.assertEqual([record["taxi"] for _, _, record in events], ["taxi-valid"])
        self.assertEqual(self.counters["invalid_json"], 1)
        self.assertEqual(self.counters["zero_position"], 1)
        self.assertEqual(self.counters["timestamp_window"], 1)
        self.assertEqual(self.counters["invalid_field"], 1)
        self.assertEqual(self.counters["fluent_sent"], 1)


class OutageTests(FluentServerTestCase):
    """
    RATE positions a second for DURATION seconds while Fluentd is absent,
    stalled or restarted, with a buffer of FLUENT_BUFFER records.
    """

    @defer.inlineCallbacks
    def test_receiver_absent(self):
        """
        With nothing listening on the Fluentd port, Redis gets every position,
        the buffer keeps the first FLUENT_BUFFER records and counts the rest
        as dropped, and they all arrive once a receiver listens there.
        """
        port = free_port()
        yield self.start_server(port)

        yield self.run_offered_load("Fluentd absent")

        self.assert_records_accounted(self.sent)
        self.assertEqual(self.counters["fluent_sent"], 0)
        self.assertEqual(self.fluent.buffered, FLUENT_BUFFER)
        self.assertEqual(self.counters["fluent_dropped"], self.sent - FLUENT_BUFFER)
        self.assertGreater(self.counters["fluent_errors"], 0)

        receiver = self.start_receiver(port)
        yield self.check_records_resume(receiver)

        buffered = [record["taxi"] for _, _, record in receiver.events[:FLUENT_BUFFER]]
        self.assertEqual(buffered, [f"taxi-{index}" for index in range(FLUENT_BUFFER)])
        self.assertEqual(len(receiver.events), FLUENT_BUFFER + AFTER_RETURN)

    @defer.inlineCallbacks
    def test_receiver_not_reading(self):
        """
        With a receiver that accepts the connection but never reads, Redis
        gets every position, records beyond the buffer are counted as
        dropped, and all records sent arrive in order once it reads again.

        The kernel's socket buffers and the transport's buffer take more
        records than 5 s of traffic emits. In runs of this test on a 2-vCPU
        VM with Linux's default tcp_wmem maximum (4 MiB), 21,500 to 23,500
        records of about 170 bytes filled them. So records are first emitted
        straight to the forwarder until it drops one, which shows that every
        buffer on the way is full.
        """
        receiver = self.start_receiver()
        receiver.pause_reading()
        yield self.start_server(receiver.port)
        yield receiver.wait_for_connection()

        prefill = yield self.fill_fluent_buffers()
        dropped_before = self.counters["fluent_dropped"]
        sent_before = self.counters["fluent_sent"]

        yield self.run_offered_load("Fluentd not reading")

        self.assert_records_accounted(prefill + self.sent)
        self.assertEqual(self.counters["fluent_sent"], sent_before)
        self.assertEqual(self.counters["fluent_dropped"] - dropped_before, self.sent)
        self.assertEqual(self.fluent.buffered, FLUENT_BUFFER)

        receiver.resume_reading()
        yield self.check_records_resume(receiver)

        self.assertEqual(len(receiver.events), self.counters["fluent_sent"])
        prefilled = [record["taxi"] for _, _, record in receiver.events if record["taxi"].startswith("prefill-")]
        self.assertEqual(prefilled, [f"prefill-{index}" for index in range(sent_before + FLUENT_BUFFER)])

    @defer.inlineCallbacks
    def test_receiver_restarted(self):
        """
        A receiver is stopped for 1.5 s during the traffic, then started again
        on the same port. Redis gets every position, and the records emitted
        while the buffer was full are counted as dropped. Records arrive
        again, in order, over the new connection.
        """
        receiver = self.start_receiver()
        yield self.start_server(receiver.port)
        yield receiver.wait_for_connection()

        traffic = self.run_offered_load("Fluentd restarted")
        yield sleep(1.5)
        yield receiver.stop()
        yield sleep(1.5)
        events_before_restart = len(receiver.events)
        sent_before_restart = self.counters["fluent_sent"]
        receiver.start()
        yield traffic
        log.info(
            "Receiver restarted: {received} of the {sent} records sent before it stopped arrived",
            received=events_before_restart, sent=sent_before_restart,
        )

        yield self.check_records_resume(receiver)

        self.assert_records_accounted(self.sent)
        self.assertGreater(self.counters["fluent_dropped"], 0)
        self.assertLessEqual(events_before_restart, sent_before_restart)

        # Records still in the socket buffers when the receiver went away are
        # lost, but each one written over the new connection arrives.
        sent_after_restart = self.counters["fluent_sent"] - sent_before_restart
        yield self.wait_for(
            lambda: len(receiver.events) - events_before_restart >= sent_after_restart,
            "every record sent over the new connection",
        )
        self.assertEqual(len(receiver.events) - events_before_restart, sent_after_restart)
        self.assertGreater(sent_after_restart, AFTER_RETURN)
        numbers = [taxi_number(record) for _, _, record in receiver.events]
        self.assertEqual(numbers, sorted(set(numbers)))


class ShutdownTests(FluentServerTestCase):
    """
    stopService() while Fluentd cannot take the buffered records.
    """

    @defer.inlineCallbacks
    def check_shutdown(self, count):
        """
        Send ``count`` positions, stop the server as soon as it has read them,
        and check that it stopped within SHUTDOWN_TIMEOUT and wrote them all.
        """
        for _ in range(count):
            self.send_position()
        yield self.wait_for(lambda: self.counters["received"] >= count, f"{count} datagrams")

        start = time.monotonic()
        yield self.service.stopService()
        stop_seconds = time.monotonic() - start
        log.info("Server stopped in {seconds:.3f} s", seconds=stop_seconds)

        # The margin is for a late reactor turn on a busy machine.
        self.assertLess(stop_seconds, SHUTDOWN_TIMEOUT + 0.5)
        self.assertEqual(self.counters["written"], count)
        self.assertEqual(self.stored_positions(), count)
        self.assertEqual(self.counters["shutdown_dropped"], 0)

    @defer.inlineCallbacks
    def test_shutdown_receiver_absent(self):
        """
        With nothing listening on the Fluentd port, shutdown ends within the
        timeout, Redis has every position and the buffered records are
        counted as dropped.
        """
        yield self.start_server(free_port())

        yield self.check_shutdown(500)

        self.assertEqual(self.counters["fluent_dropped"], 500)
        self.assertEqual(self.fluent.buffered, 0)

    @defer.inlineCallbacks
    def test_shutdown_receiver_not_reading(self):
        """
        With a receiver that never reads and a full transport buffer,
        shutdown ends within the timeout and Redis has every position.
        """
        receiver = self.start_receiver()
        receiver.pause_reading()
        yield self.start_server(receiver.port)
        yield receiver.wait_for_connection()

        prefill = yield self.fill_fluent_buffers()

        yield self.check_shutdown(500)

        self.assertEqual(self.fluent.buffered, 0)
        self.assert_records_accounted(prefill + 500)


class AcknowledgedTests(FluentServerTestCase):
    """
    With --fluent-ack, a receiver that drops its connection mid-stream loses
    no record: each reaches it at least once, and the counters add up.
    """

    @defer.inlineCallbacks
    def test_dropped_connection_resent(self):
        """
        The receiver aborts its connection after 3000 records without acking
        the last frame: every position still reaches Redis and every record
        reaches the receiver after the reconnection.
        """
        receiver = self.start_receiver()
        receiver.drop_after = 3000
        yield self.start_server(receiver.port, "--fluent-ack", "--fluent-buffer", "20000")
        yield self.wait_for(lambda: self.fluent.connected, "connection to Fluentd")

        yield self.send_traffic(TOTAL)
        yield self.settle(self.sent)
        yield self.wait_for(
            lambda: self.counters["fluent_sent"] == self.sent,
            "every record acked",
            timeout=RECONNECT_TIMEOUT,
        )

        taxis = {record["taxi"] for _, _, record in receiver.events}
        self.assertEqual(len(taxis), self.sent)
        self.assertEqual(self.counters["written"], self.sent)
        self.assertEqual(self.counters["fluent_dropped"], 0)
        self.assertGreater(self.counters["fluent_resent"], 0)
        self.assertEqual(self.fluent.buffered + self.fluent.unacked, 0)
