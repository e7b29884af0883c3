"""
End-to-end tests of the ``geotaxi`` command and of ``twistd -n geotaxi``:
real processes, a real redis-server on a free loopback port and real UDP
datagrams to 127.0.0.1.

Every wait polls with a deadline, and every process a test starts is ended
by its PID in the test's cleanup.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from geotaxi.options import Options
from tests.redisserver import RedisServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GEOTAXI = [sys.executable, "-m", "geotaxi.cli"]
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "geotaxi"]

# Seconds to wait for a server to listen, for a position to reach Redis and
# for a log line. They are generous because CI machines may be slow.
START_TIMEOUT = 30.0
WRITE_TIMEOUT = 10.0
LOG_TIMEOUT = 10.0

# --shutdown-timeout given to the servers, and the extra seconds allowed for
# the interpreter to exit after it.
SHUTDOWN_TIMEOUT = 8.0
EXIT_MARGIN = 5.0

POLL_INTERVAL = 0.05

# How long CLIENT PAUSE delays Redis commands, so that a position stays queued
# while a test sends signals. It must stay under the 5 s socket timeout of
# RedisServer.command, which waits for the pause to end.
PAUSE_MILLISECONDS = 3000

LISTENING = re.compile(r"Listening for positions on UDP 127\.0\.0\.1:(\d+)")
QUEUE_SIZE = re.compile(r"Queue size: (\d+)")
COUNTERS = re.compile(r"Counters: (.*)")


def clean_environment():
    """
    Return this process's environment without the variables that geotaxi
    reads, so that the shell running the tests cannot change the servers.
    """
    options = Options(environ={})
    names = {parameter[0] for parameter in options.optParameters}
    names |= {flag[0] for flag in options.optFlags}
    variables = {name.upper().replace("-", "_") for name in names}
    variables |= {"FLUENTD_HOST", "API_KEY"}

    environment = {key: value for key, value in os.environ.items() if key not in variables}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def make_datagram(taxi="t1", **fields):
    """
    Return a valid datagram with all nine fields, stamped now.
    """
    message = {
        "taxi": taxi,
        "operator": "op@example.org",
        "lat": 48.85,
        "lon": 2.35,
        "timestamp": int(time.time()),
        "version": 2,
        "status": "free",
        "device": "phone",
        "hash": "0123456789abcdef0123456789abcdef01234567",
    }
    message.update(fields)
    return json.dumps(message).encode()


def send_datagram(port, data):
    """
    Send one UDP datagram to 127.0.0.1:``port``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(data, ("127.0.0.1", port))


def parse_counters(line):
    """
    Return the ``name=value`` pairs of a counters line as a dict of ints.
    """
    counters = {}
    for pair in line.split():
        name, _, value = pair.partition("=")
        counters[name] = int(value)
    return counters


class ServerProcess:
    """
    One server process whose standard output and error go to a log file.
    """

    def __init__(self, command, folder, environment):
        self.log_path = os.path.join(folder, f"server-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.process.pid

    def output(self):
        """
        Return everything the process has written so far.
        """
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def wait_for_log(self, pattern, timeout=LOG_TIMEOUT, after=0):
        """
        Return the first match of ``pattern`` in the output past offset
        ``after``, or None when the deadline passes or the process exits first.
        """
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.output(), after)
            if match is not None:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                return pattern.search(self.output(), after)
            time.sleep(POLL_INTERVAL)

    def send_signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout):
        """
        Return the exit status, or None if the process still runs after
        ``timeout`` seconds.
        """
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def end(self):
        """
        Kill the process by its PID if it still runs, and close the log.
        """
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


class ProcessTestCase(SynchronousTestCase):
    """
    A redis-server for each test, and helpers to start geotaxi processes.
    """

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="geotaxi-process-")
        self.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.environment = clean_environment()

    def run_command(self, arguments, environment=None, timeout=START_TIMEOUT):
        """
        Run a command to completion and return its exit status and output.
        """
        server = self.start_process(arguments, environment)
        status = server.wait(timeout)
        self.assertIsNotNone(status, f"{arguments} still runs after {timeout} s:\n{server.output()}")
        return status, server.output()

    def start_process(self, command, environment=None):
        """
        Start ``command`` and end it by its PID in cleanup.
        """
        server = ServerProcess(command, self.folder, self.environment if environment is None else environment)
        self.addCleanup(server.end)
        return server

    def start_server(self, launcher=GEOTAXI, extra=(), attempts=3):
        """
        Start a server on a free UDP port and wait until it listens.

        A port found free may be taken before the server binds it, so a
        server that exits with "Address already in use" is started again on
        another port, up to ``attempts`` times.
        """
        for _ in range(attempts):
            port = free_port(socket.SOCK_DGRAM)
            command = [
                *launcher,
                "-p", str(port),
                "--redis-port", str(self.redis.port),
                "--disable-fluent",
                "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
                *extra,
            ]
            server = self.start_process(command)
            match = server.wait_for_log(LISTENING, timeout=START_TIMEOUT)
            if match is not None:
                self.assertEqual(int(match.group(1)), port)
                return server, port
            server.end()
            if "Address already in use" not in server.output():
                break
        self.fail(f"the server did not listen within {START_TIMEOUT} s:\n{server.output()}")

    def wait_for_position(self, taxi="t1", operator="op@example.org", timeout=WRITE_TIMEOUT):
        """
        Poll Redis for the stored value of ``taxi`` for ``operator`` and
        return it, or None if it does not appear before the deadline.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.redis.command("HGET", f"taxi:{taxi}", operator)
            if value is not None or time.monotonic() > deadline:
                return value
            time.sleep(POLL_INTERVAL)

    def report(self, server):
        """
        Send SIGUSR1 and return the queue size and the counters it logs.
        """
        offset = len(server.output())
        server.send_signal(signal.SIGUSR1)
        queue = server.wait_for_log(QUEUE_SIZE, after=offset)
        self.assertIsNotNone(queue, f"no 'Queue size' line after SIGUSR1:\n{server.output()}")
        counters = server.wait_for_log(COUNTERS, after=queue.end())
        self.assertIsNotNone(counters, f"no 'Counters' line after SIGUSR1:\n{server.output()}")
        return int(queue.group(1)), parse_counters(counters.group(1))

    def report_until_received(self, server, count, timeout=LOG_TIMEOUT):
        """
        Send SIGUSR1 until the counters show ``count`` datagrams received,
        and return the last queue size and counters.
        """
        deadline = time.monotonic() + timeout
        while True:
            queue_size, counters = self.report(server)
            if counters["received"] >= count or time.monotonic() > deadline:
                return queue_size, counters
            time.sleep(POLL_INTERVAL)


class HelpTests(ProcessTestCase):
    """
    ``geotaxi --help`` prints the flags and exits.
    """

    def test_exit_status(self):
        """
        geotaxi --help exits with status 0.
        """
        status, _ = self.run_command([*GEOTAXI, "--help"])
        self.assertEqual(status, 0)

    def test_lists_flags(self):
        """
        geotaxi --help lists the earlier server's flags.
        """
        _, output = self.run_command([*GEOTAXI, "--help"])
        for flag in ("-h, --host", "-p, --port", "-w, --workers", "-v, --verbose", "--redis-host",
                     "--redis-port", "--redis-password", "--disable-fluent", "--fluent-host",
                     "--fluent-port", "--auth-enabled", "--api-url", "--sentry-dsn"):
            self.assertIn(flag, output)


class StartTests(ProcessTestCase):
    """
    Both launchers start a server that writes datagrams to Redis.
    """

    def test_geotaxi_command(self):
        """
        geotaxi -p P writes a datagram sent to P into Redis.
        """
        _, port = self.start_server(GEOTAXI)
        timestamp = int(time.time())
        send_datagram(port, make_datagram(timestamp=timestamp))
        self.assertEqual(self.wait_for_position(), f"{timestamp} 48.85 2.35 free phone 2")

    def test_twistd_plugin(self):
        """
        twistd -n geotaxi -p P writes a datagram sent to P into Redis.
        """
        _, port = self.start_server(TWISTD)
        timestamp = int(time.time())
        send_datagram(port, make_datagram(timestamp=timestamp))
        self.assertEqual(self.wait_for_position(), f"{timestamp} 48.85 2.35 free phone 2")

    def test_geo_indexes(self):
        """
        The position is also in geoindex, geoindex_2 and both timestamps sets.
        """
        _, port = self.start_server()
        send_datagram(port, make_datagram())
        self.assertIsNotNone(self.wait_for_position())
        self.assertIsNotNone(self.redis.command("GEOPOS", "geoindex", "t1")[0])
        self.assertIsNotNone(self.redis.command("GEOPOS", "geoindex_2", "t1:op@example.org")[0])
        self.assertIsNotNone(self.redis.command("ZSCORE", "timestamps", "t1:op@example.org"))
        self.assertIsNotNone(self.redis.command("ZSCORE", "timestamps_id", "t1"))

    def test_environment_port(self):
        """
        PORT in the environment sets the UDP port of the geotaxi command.
        """
        port = free_port(socket.SOCK_DGRAM)
        environment = dict(self.environment, PORT=str(port), REDIS_PORT=str(self.redis.port), DISABLE_FLUENT="1")
        server = self.start_process(GEOTAXI, environment)
        match = server.wait_for_log(LISTENING, timeout=START_TIMEOUT)
        self.assertIsNotNone(match, server.output())
        self.assertEqual(int(match.group(1)), port)


class ReportTests(ProcessTestCase):
    """
    SIGUSR1 logs the queue size and the counters.
    """

    def test_after_write(self):
        """
        After one datagram is written, SIGUSR1 logs "Queue size: 0" and
        counters with received, accepted and written at 1.
        """
        server, port = self.start_server()
        send_datagram(port, make_datagram())
        self.assertIsNotNone(self.wait_for_position())

        queue_size, counters = self.report(server)
        self.assertEqual(queue_size, 0)
        self.assertEqual(counters["received"], 1)
        self.assertEqual(counters["accepted"], 1)
        self.assertEqual(counters["written"], 1)

    def test_rejection_counted(self):
        """
        A datagram that is not JSON is counted as received and invalid_json,
        not accepted.
        """
        server, port = self.start_server()
        send_datagram(port, b"not json")
        send_datagram(port, make_datagram())
        self.assertIsNotNone(self.wait_for_position())

        _, counters = self.report(server)
        self.assertEqual(counters["received"], 2)
        self.assertEqual(counters["invalid_json"], 1)
        self.assertEqual(counters["accepted"], 1)

    def test_keeps_running(self):
        """
        The server keeps running and writing after SIGUSR1.
        """
        server, port = self.start_server(TWISTD)
        self.report(server)
        self.assertIsNone(server.process.poll())

        send_datagram(port, make_datagram())
        self.assertIsNotNone(self.wait_for_position())

    def test_queued_while_paused(self):
        """
        While CLIENT PAUSE delays Redis commands, SIGUSR1 counts the waiting
        position in the queue size.
        """
        server, port = self.start_server()
        self.redis.command("CLIENT", "PAUSE", str(PAUSE_MILLISECONDS))
        send_datagram(port, make_datagram())

        queue_size, counters = self.report_until_received(server, 1)
        self.assertEqual(queue_size, 1)
        self.assertEqual(counters["written"], 0)
        self.assertIsNotNone(self.wait_for_position())

class StopTests(ProcessTestCase):
    """
    SIGTERM and SIGINT write what is queued and exit with status 0.
    """

    def stop_with_queue(self, signum, launcher=GEOTAXI):
        """
        Pause Redis commands, queue one position, send ``signum``, and return
        the server, its exit status and the seconds it took to exit.
        """
        server, port = self.start_server(launcher)
        self.redis.command("CLIENT", "PAUSE", str(PAUSE_MILLISECONDS))
        send_datagram(port, make_datagram())

        # The position must be in the queue before the signal.
        queue_size, _ = self.report_until_received(server, 1)
        self.assertEqual(queue_size, 1)

        started = time.monotonic()
        server.send_signal(signum)
        status = server.wait(SHUTDOWN_TIMEOUT + EXIT_MARGIN)
        return server, status, time.monotonic() - started

    def test_sigterm_status(self):
        """
        SIGTERM makes the server exit with status 0.
        """
        _, status, _ = self.stop_with_queue(signal.SIGTERM)
        self.assertEqual(status, 0)

    def test_sigterm_writes_queue(self):
        """
        SIGTERM writes the queued position to Redis before exiting.
        """
        server, status, _ = self.stop_with_queue(signal.SIGTERM)
        self.assertIsNotNone(status, server.output())
        self.assertIn("Writing 1 queued positions", server.output())
        self.assertIsNotNone(self.redis.command("HGET", "taxi:t1", "op@example.org"))

    def test_sigterm_in_time(self):
        """
        SIGTERM makes the server exit within the shutdown timeout.
        """
        _, _, elapsed = self.stop_with_queue(signal.SIGTERM)
        self.assertLess(elapsed, SHUTDOWN_TIMEOUT)

    def test_sigint(self):
        """
        SIGINT writes the queued position and exits with status 0.
        """
        server, status, elapsed = self.stop_with_queue(signal.SIGINT)
        self.assertEqual(status, 0, server.output())
        self.assertLess(elapsed, SHUTDOWN_TIMEOUT)
        self.assertIsNotNone(self.redis.command("HGET", "taxi:t1", "op@example.org"))

    def test_twistd_sigterm(self):
        """
        twistd -n geotaxi also writes the queue on SIGTERM and exits with 0.
        """
        server, status, _ = self.stop_with_queue(signal.SIGTERM, TWISTD)
        self.assertEqual(status, 0, server.output())
        self.assertIsNotNone(self.redis.command("HGET", "taxi:t1", "op@example.org"))

    def test_idle_sigterm(self):
        """
        An idle server exits with status 0 on SIGTERM.
        """
        server, _ = self.start_server()
        server.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(SHUTDOWN_TIMEOUT + EXIT_MARGIN), 0)

    def test_redis_down(self):
        """
        With Redis down, SIGTERM gives up after --shutdown-timeout, logs
        the positions it drops and still exits with status 0.
        """
        server, port = self.start_server(extra=["--shutdown-timeout", "1"])
        self.redis.stop()
        send_datagram(port, make_datagram())
        queue_size, _ = self.report_until_received(server, 1)
        self.assertEqual(queue_size, 1)

        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        status = server.wait(1 + EXIT_MARGIN)
        self.assertEqual(status, 0, server.output())
        self.assertLess(time.monotonic() - started, 1 + EXIT_MARGIN)
        self.assertIn("did not take 1 positions", server.output())


class StartupErrorTests(ProcessTestCase):
    """
    An invalid configuration stops start-up with a message and a non-zero
    status.
    """

    def test_invalid_port_env(self):
        """
        PORT=abc fails with a message naming PORT and a non-zero status.
        """
        environment = dict(self.environment, PORT="abc")
        status, output = self.run_command([*GEOTAXI, "--disable-fluent"], environment)
        self.assertNotEqual(status, 0)
        self.assertIn("PORT", output)
        self.assertIn("abc", output)

    def test_invalid_port_twistd(self):
        """
        twistd -n geotaxi also fails on PORT=abc, naming PORT.
        """
        environment = dict(self.environment, PORT="abc")
        status, output = self.run_command([*TWISTD, "--disable-fluent"], environment)
        self.assertNotEqual(status, 0)
        self.assertIn("invalid PORT", output)

    def test_invalid_boolean_env(self):
        """
        AUTH_ENABLED=maybe fails with a message naming AUTH_ENABLED.
        """
        environment = dict(self.environment, AUTH_ENABLED="maybe")
        status, output = self.run_command([*GEOTAXI, "--disable-fluent"], environment)
        self.assertNotEqual(status, 0)
        self.assertIn("AUTH_ENABLED", output)

    def test_auth_without_key(self):
        """
        --auth-enabled without API_KEY fails with a message naming API_KEY.
        """
        status, output = self.run_command([*GEOTAXI, "--disable-fluent", "--auth-enabled"])
        self.assertNotEqual(status, 0)
        self.assertIn("API_KEY", output)

    def test_no_listening(self):
        """
        A failed start-up never listens.
        """
        environment = dict(self.environment, PORT="abc")
        _, output = self.run_command([*GEOTAXI, "--disable-fluent"], environment)
        self.assertIsNone(LISTENING.search(output))
