"""
A real redis-server on a loopback port chosen at run time, for tests and
benchmarks. It runs without persistence in a temporary folder and is ended
by the PID it was started with.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port(kind=socket.SOCK_STREAM):
    """
    Return a loopback port that is free now. Another process may still take
    it before it is used, so callers retry on a failed start.
    """
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """
    One redis-server process on 127.0.0.1. ``stop()`` and ``start()`` may be
    called several times to simulate an outage on the same port.
    """

    def __init__(self, port=None, password=None):
        self.port = port or free_port()
        self.password = password
        self.folder = tempfile.mkdtemp(prefix="geotaxi-redis-")
        self.process = None

    def start(self, timeout=10.0):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it with 'apt-get install -y redis-server'")
        command = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.folder,
            "--logfile", os.path.join(self.folder, "redis.log"),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.folder}/redis.log")
            if self.ping():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout} s")

    def ping(self):
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def command(self, *args):
        """
        Send one command over a new connection and return the decoded reply.
        A blocking client keeps test assertions independent of the reactor.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
            if self.password:
                connection.sendall(_encode(("AUTH", self.password)))
                _read_reply(connection.makefile("rb"))
            connection.sendall(_encode(args))
            return _read_reply(connection.makefile("rb"))

    def stop(self, save=False):
        """
        End the server. With ``save``, it first writes its data to disk, and
        ``start()`` loads it again, as a restart of a persistent Redis would.
        """
        if self.process is not None and self.process.poll() is None:
            if save:
                try:
                    self.command("SHUTDOWN", "SAVE")
                except (ConnectionError, OSError):
                    pass
            else:
                self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def pause(self):
        """
        Freeze the server with SIGSTOP: connections stay open and no reply comes.
        """
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _encode(args):
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream):
    line = stream.readline()
    if not line:
        raise ConnectionError("connection closed by redis-server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)[:-2]
        return data.decode()
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [_read_reply(stream) for _ in range(count)]
    raise ValueError(f"unexpected reply from redis-server: {line!r}")
