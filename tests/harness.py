"""
An in-process geotaxi server against a real redis-server, fed by a real UDP
socket on 127.0.0.1, for integration tests.
"""

import json
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from geotaxi.options import Options
from geotaxi.tap import makeService
from tests.redisserver import RedisServer

OPERATOR = "operator@example.org"
HASH = "0123456789abcdef0123456789abcdef01234567"


def position(taxi="taxi-1", **fields):
    """
    Return a valid datagram's fields, with ``fields`` replacing defaults.
    """
    message = {
        "taxi": taxi,
        "operator": OPERATOR,
        "lat": 48.856613,
        "lon": 2.352222,
        "timestamp": int(time.time()),
        "version": 2,
        "status": "free",
        "device": "phone",
        "hash": HASH,
    }
    message.update(fields)
    return message


def encode(message):
    return json.dumps(message, separators=(",", ":")).encode()


class ServerTestCase(unittest.TestCase):
    """
    Start one redis-server for the class and one geotaxi service per test.
    ``server_args`` adds command-line options, ``server_environ`` is the
    environment the options read.
    """

    server_args = ()
    server_environ = {}
    timeout = 60

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisServer().start()

    @classmethod
    def tearDownClass(cls):
        cls.redis.cleanup()

    @defer.inlineCallbacks
    def setUp(self):
        self.redis.command("FLUSHALL")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

        yield self.prepare()
        yield self.start_server()
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.client.close)

    def prepare(self):
        """
        Start what the server needs before it starts; subclasses override it.
        """

    @defer.inlineCallbacks
    def start_server(self, *extra):
        options = Options(environ=dict(self.server_environ))
        options.parseOptions([
            "--host", "127.0.0.1",
            "--port", "0",
            "--redis-port", str(self.redis.port),
            "--disable-fluent",
            *self.server_args,
            *extra,
        ])
        self.service = makeService(options, reactor, handle_signals=False)
        self.service.startService()
        self.addCleanup(self.stop_server)
        self.counters = self.service.counters
        self.address = ("127.0.0.1", self.service.udp.address.port)
        yield self.wait_for(lambda: self.service.writer.link.connected, "connection to Redis")

    def stop_server(self):
        if self.service.running:
            return self.service.stopService()

    def send(self, data):
        if not isinstance(data, bytes):
            data = encode(data)
        self.client.sendto(data, self.address)

    @defer.inlineCallbacks
    def wait_for(self, predicate, what, timeout=10.0):
        """
        Poll ``predicate`` every 10 ms until it is true; fail after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout} s waiting for {what}")
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def settle(self, received):
        """
        Wait until ``received`` datagrams were read and the writer is idle.
        """
        yield self.wait_for(lambda: self.counters["received"] >= received, f"{received} datagrams")
        yield self.service.writer.drain()

    def keys(self):
        return sorted(self.redis.command("KEYS", "*"))

    def log_lines(self, namespace="geotaxi.protocol"):
        from twisted.logger import formatEvent

        return [formatEvent(event) for event in self.events if event.get("log_namespace") == namespace]
