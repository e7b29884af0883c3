"""
The service tree of one geotaxi process, built from its options.

twistd imports this module only when it runs the geotaxi plugin, so it may
import txredisapi, which installs the global reactor on import.
"""

import gc
import signal

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from geotaxi.counters import Counters
from geotaxi.options import Options
from geotaxi.protocol import PositionProtocol
from geotaxi.redislink import RedisLink
from geotaxi.report import SignalReport
from geotaxi.udp import UDPListener
from geotaxi.writer import RedisWriter

__all__ = ["Options", "makeService"]

log = Logger()

# How often members not seen within the timestamp window are forgotten.
ORDERING_EXPIRY_INTERVAL = 60.0


class GeotaxiService(service.MultiService):
    """
    The parts of one geotaxi process, with the objects that the manhole and
    the metrics endpoint show: ``counters``, ``writer``, ``protocol``, ``udp``,
    ``fluent`` and ``keys``.
    """

    def __init__(self, reactor, counters, handle_signals=True):
        super().__init__()
        self.handle_signals = handle_signals
        self.setName("geotaxi")
        self.reactor = reactor
        self.counters = counters
        self.fluent = None
        self.keys = None
        self._expiry = None
        self._stopping = False

    def startService(self):
        super().startService()
        self._expiry = task.LoopingCall(self.protocol.ordering.expire)
        self._expiry.clock = self.reactor
        self._expiry.start(ORDERING_EXPIRY_INTERVAL, now=False)

        # Objects made at start-up live as long as the process; freezing them
        # keeps the collector from scanning them again under load.
        self.reactor.callWhenRunning(gc.freeze)
        if self.handle_signals:
            self.reactor.callWhenRunning(self._handle_stop_signals)

    def _handle_stop_signals(self):
        # The reactor's own handlers make twistd end by re-raising the signal,
        # so the exit status would be -15; an orderly stop must exit with 0.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame):
        if self._stopping:
            log.info("Received {signal} again: already stopping", signal=signal.Signals(signum).name)
            return
        self._stopping = True
        log.info(
            "Received {signal}: no longer reading datagrams, writing the backlog, then exiting",
            signal=signal.Signals(signum).name,
        )
        self.reactor.callFromThread(self.reactor.stop)

    def stopService(self):
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        d = super().stopService()
        d.addBoth(self._log_final_counters)
        return d

    def _log_final_counters(self, result):
        log.info("Final counters: {counters}", counters=self.counters.report_line())
        return result


def makeService(config, reactor=None, handle_signals=True):
    """
    Build the geotaxi service tree from parsed Options. Tests that run it
    inside their own process pass ``handle_signals=False``.
    """
    if reactor is None:
        from twisted.internet import reactor

    counters = Counters()
    top = GeotaxiService(reactor, counters, handle_signals)

    # NOTE: --workers, --metrics-port and --sentry-dsn are accepted, so that
    # the earlier server's settings still start, but not acted on yet: this
    # process runs alone, serves no metrics and reports errors to its log.
    for option, value, default in (("workers", config["workers"], 1),
                                   ("metrics-port", config["metrics-port"], None),
                                   ("sentry-dsn", config["sentry-dsn"], None)):
        if value != default:
            log.warn("--{option} is not supported yet and is ignored", option=option)

    link = RedisLink(
        reactor,
        config["redis-host"],
        config["redis-port"],
        password=config["redis-password"],
        db=config["redis-db"],
        timeout=config["redis-timeout"],
    )
    top.writer = RedisWriter(
        link,
        reactor,
        counters,
        queue_size=config["queue-size"],
        batch_size=config["batch-size"],
        timeout=config["redis-timeout"],
        shutdown_timeout=config["shutdown-timeout"],
    )
    top.writer.setServiceParent(top)

    if not config["disable-fluent"]:
        from geotaxi.fluent import FluentForwarder

        top.fluent = FluentForwarder(
            config["fluent-host"],
            config["fluent-port"],
            counters,
            reactor,
            max_buffer=config["fluent-buffer"],
            shutdown_timeout=config["shutdown-timeout"],
            require_ack_response=bool(config["fluent-ack"]),
        )
        top.fluent.setServiceParent(top)

    if config["auth-enabled"]:
        from geotaxi.apikeys import ApiKeyCache

        top.keys = ApiKeyCache(
            config["api-url"],
            config["api-key"],
            reactor,
            counters,
            refresh=config["auth-refresh"],
        )
        top.keys.setServiceParent(top)

    top.protocol = PositionProtocol(
        reactor,
        counters,
        top.writer,
        fluent=top.fluent,
        keys=top.keys,
        max_future=config["max-future"],
        max_age=config["max-age"],
        verbose=bool(config["verbose"]),
    )

    # Added last so that it stops first: no datagram is read once the
    # writer starts draining its backlog.
    top.udp = UDPListener(
        reactor,
        config["host"],
        config["port"],
        top.protocol,
        counters,
        receive_buffer=config["receive-buffer"],
    )
    SignalReport(reactor, counters, top.writer, top.udp).setServiceParent(top)
    top.udp.setServiceParent(top)
    return top
