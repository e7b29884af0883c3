"""
The SIGUSR1 report: ``kill -USR1 <pid>`` logs the backlog size, in the
earlier server's words, and every counter on one line.
"""

import signal

from twisted.application import service
from twisted.logger import Logger

log = Logger()


class SignalReport(service.Service):
    """
    Log ``Queue size: <n>`` and the counters when the process gets SIGUSR1.
    """

    name = "report"

    def __init__(self, reactor, counters, writer, udp=None):
        self.reactor = reactor
        self.counters = counters
        self.writer = writer
        self.udp = udp
        self._previous_handler = None

    def startService(self):
        super().startService()
        self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)

    def stopService(self):
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, frame):
        # A signal handler may run between any two bytecodes of the reactor
        # thread, so the report itself runs in the next reactor turn.
        self.reactor.callFromThread(self.report)

    def report(self):
        """
        Log the backlog size and all counters.
        """
        if self.udp is not None:
            self.udp.update_kernel_drops()
        log.info("Queue size: {size}", size=self.writer.pending + self.writer.in_flight)
        log.info("Counters: {counters}", counters=self.counters.report_line())
