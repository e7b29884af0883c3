"""
The connection to Redis: one txredisapi connection that reconnects quickly.

One connection and not a pool, because commands on one connection run in
the order they were sent: with several, a retried old batch could land after
a newer one and move a taxi backwards. Redis runs commands on one thread, so
a pool would not write faster.
"""

import txredisapi
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

log = Logger()

# txredisapi reconnects with exponential backoff up to 10 s by default; a
# shorter cap lets writes resume within about a second of Redis returning.
RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 1.0


class RedisLink:
    """
    A txredisapi connection handler and the factory that keeps it connected.

    txredisapi commands wait for a connection forever while Redis is down, so
    callers put their own timeout on every command; ``reply_timeout`` also
    makes txredisapi drop a connection whose replies stop coming.
    """

    def __init__(self, reactor, host, port, password=None, db=None, timeout=5.0):
        self.address = f"{host}:{port}"
        self._factory = txredisapi.RedisFactory(
            self.address,
            db,
            1,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            password=password or None,
            replyTimeout=timeout,
            convertNumbers=False,
        )
        self._factory.initialDelay = RECONNECT_INITIAL_DELAY
        self._factory.maxDelay = RECONNECT_MAX_DELAY
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        self.redis = self._factory.handler

    # NOTE: Redis Sentinel plugs in here: ask the sentinels for the master's
    # address and reconnect there on failover (txredisapi.Sentinel).

    def start(self):
        log.info("Connecting to Redis at {address}", address=self.address)
        self._factory.startConnecting(self._endpoint)

    def stop(self):
        """
        Close the connection; return a Deferred that fires once it is closed.
        """
        return self._factory.disconnect()

    @property
    def connected(self):
        return self._factory.size > 0
