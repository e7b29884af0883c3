"""
The UDP port: a listening socket with a large receive buffer, and the
kernel's count of datagrams it dropped on that socket before geotaxi read them.
"""

import os
import socket

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from geotaxi.netstat import socket_drops

log = Logger()

# Read with a buffer larger than any datagram, so that an oversized datagram
# is seen whole and rejected as too large instead of arriving truncated.
READ_SIZE = 65535


class UDPListener(service.Service):
    """
    Listen on ``host``:``port`` for ``protocol``.

    ``receive_buffer`` is the SO_RCVBUF to request, in bytes. The kernel
    doubles the request and caps it at net.core.rmem_max, so the size granted
    is read back and logged: with the default 212,992 bytes the kernel holds
    only about 166 small datagrams, because it charges about 1,280 bytes each.
    """

    name = "udp"

    def __init__(self, reactor, host, port, protocol, counters, receive_buffer=4 * 1024 * 1024,
                 drops_interval=5.0):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.protocol = protocol
        self.counters = counters
        self.receive_buffer = receive_buffer
        self.drops_interval = drops_interval
        self.listening_port = None
        self._drops_loop = None
        self._drops_at_start = 0

    def privilegedStartService(self):
        super().privilegedStartService()
        self.listening_port = self.reactor.listenUDP(
            self.port, self.protocol, interface=self.host, maxPacketSize=READ_SIZE,
        )

    def startService(self):
        super().startService()
        if self.listening_port is None:
            self.privilegedStartService()

        sock = self.listening_port.socket
        if self.receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        address = self.listening_port.getHost()
        log.info(
            "Listening for positions on UDP {host}:{port}, receive buffer {granted} bytes",
            host=address.host, port=address.port, granted=granted,
        )
        if self.receive_buffer and granted < self.receive_buffer:
            log.warn(
                "Receive buffer capped at {granted} bytes, under the {requested} requested: "
                "raise net.core.rmem_max to hold more datagrams during bursts",
                granted=granted, requested=self.receive_buffer,
            )

        self._inode = os.fstat(sock.fileno()).st_ino
        self._drops_at_start = self._read_drops()
        self._drops_loop = task.LoopingCall(self.update_kernel_drops)
        self._drops_loop.clock = self.reactor
        self._drops_loop.start(self.drops_interval, now=False)

    def _read_drops(self):
        try:
            return socket_drops(inode=self._inode)
        except OSError:
            return 0

    def update_kernel_drops(self):
        """
        Copy the kernel's drop count of this socket into the counters.
        """
        if self.listening_port is not None:
            self.counters["kernel_drops"] = self._read_drops() - self._drops_at_start

    @property
    def address(self):
        return self.listening_port.getHost()

    def stopService(self):
        super().stopService()
        if self._drops_loop is not None and self._drops_loop.running:
            self._drops_loop.stop()
        if self.listening_port is not None:
            self.update_kernel_drops()
            port, self.listening_port = self.listening_port, None
            return port.stopListening()
