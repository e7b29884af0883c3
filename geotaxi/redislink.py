"""
The connection to Redis: one txredisapi connection that reconnects quickly.

One connection and not a pool, because commands on one connection run in
the order they were sent: with several, a retried old batch could land after
a newer one and move a taxi backwards. Redis runs commands on one thread, so
a pool would not write faster.
"""

import txredisapi
from twisted.internet import task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

log = Logger()

# txredisapi reconnects with exponential backoff up to 10 s by default; a
# shorter cap lets writes resume within about a second of Redis returning.
RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 1.0

# How often to check that txredisapi is still trying to connect.
WATCH_INTERVAL = 1.0


class RedisLink:
    """
    A txredisapi connection handler and the factory that keeps it connected.

    txredisapi commands wait for a connection forever while Redis is down, so
    callers put their own timeout on every command. ``timeout`` also makes
    txredisapi drop a connection whose replies stop coming.

    txredisapi 1.6 stops reconnecting for good when AUTH or SELECT fails on a
    new connection, which a frozen or overloaded Redis makes happen with a
    timeout. A watch replaces a factory that gave up with a new one.
    """

    def __init__(self, reactor, host, port, password=None, db=None, timeout=5.0):
        self.reactor = reactor
        self.address = f"{host}:{port}"
        self.host = host
        self.port = port
        self.password = password or None
        # SELECT 0 is what Redis does anyway; skipping it saves a round trip
        # that could fail on each new connection.
        self.db = db or None
        self.timeout = timeout
        self._factory = None
        self._watch = None
        self.redis = None

    # NOTE: Redis Sentinel plugs in here: ask the sentinels for the master's
    # address and reconnect there on failover (txredisapi.Sentinel).

    def _connect(self):
        factory = txredisapi.RedisFactory(
            self.address,
            self.db,
            1,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            password=self.password,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        factory.initialDelay = RECONNECT_INITIAL_DELAY
        factory.maxDelay = RECONNECT_MAX_DELAY
        factory.startConnecting(HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout))
        self._factory = factory
        self.redis = factory.handler

    def start(self):
        log.info("Connecting to Redis at {address}", address=self.address)
        self._connect()
        self._watch = task.LoopingCall(self._check_factory)
        self._watch.clock = self.reactor
        self._watch.start(WATCH_INTERVAL, now=False)

    def _check_factory(self):
        if self._factory.stopped and not self._factory.size:
            log.warn(
                "txredisapi stopped reconnecting to Redis at {address}; starting a new connection",
                address=self.address,
            )
            self._factory.disconnect()
            self._connect()

    def stop(self):
        """
        Close the connection; return a Deferred that fires once it is closed.
        """
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        return self._factory.disconnect()

    @property
    def connected(self):
        return self._factory is not None and self._factory.size > 0
