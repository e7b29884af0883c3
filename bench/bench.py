"""
Measure how many positions a geotaxi server stores per second without loss.

Start a redis-server and a geotaxi server on free loopback ports. Then, for
each offered rate of a rising list, send ``--seconds`` of datagrams with a
new taxi id each and wait until the server has drained. The ``taxi:*`` keys
in Redis count the positions delivered, one key each. Print a table per
run, the median over ``--runs`` runs, and the highest rate stored with less
than 0.1 % loss.

``--auth`` signs every datagram and runs the server with authentication
against an API stand-in (bench/users_api.py). ``--fluent`` runs it with
Fluentd forwarding to a sink that counts records (bench/fluent_sink.py).
``--compare auth,fluent`` runs the baseline and each of these variants in
turn, run after run, and prints their no-loss rates and CPU per position as
ratios to the baseline. See bench/README.md for how to read the figures.

Run it from anywhere with the project's Python: ``python bench/bench.py``.
"""

import argparse
import json
import os
import re
import secrets
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geotaxi import netstat, traffic  # noqa: E402
from geotaxi.options import Options  # noqa: E402
from tests.redisserver import RedisServer, free_port  # noqa: E402

DEFAULT_RATES = "5000,10000,15000,20000,25000,30000,40000,50000"
NO_LOSS_PERCENT = 0.1

# twistd has no "python -m" entry point, so it is run through its run()
# function. The working directory is the repository root, because twistd
# finds the geotaxi plugin in ./twisted/plugins there.
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]

# Keys of the Redis layout other than the one hash per taxi.
INDEX_KEYS = ("geoindex", "geoindex_2", "timestamps", "timestamps_id")

# Counting keys with KEYS blocks Redis, so it runs once per step, after the
# drain. Polls in between use DBSIZE, which is O(1).
COUNT_TAXI_KEYS = "return #redis.call('KEYS', ARGV[1])"

BENCH_FOLDER = Path(__file__).resolve().parent
USERS_API_SCRIPT = BENCH_FOLDER / "users_api.py"
FLUENT_SINK_SCRIPT = BENCH_FOLDER / "fluent_sink.py"

START_TIMEOUT = 30.0
DRAIN_POLL = 0.05
DRAIN_STABLE = 1.0
SETTLE_SECONDS = 1.0
STOP_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Seconds to wait for a helper's reply to SIGUSR1, or for the server's
# counter line after SIGUSR1.
REPLY_TIMEOUT = 5.0

# The server's SIGUSR1 report line, "Counters: received=12 accepted=10 ...".
COUNTERS_LINE = re.compile(r"Counters: ((?:\w+=\d+ ?)+)$", re.MULTILINE)

# 75 operators fill three pages of 30, the last one partly, so that the
# server must follow next_page to find the keys of the last operators.
DEFAULT_OPERATORS = 75
MAX_OPERATORS = 10_000

VARIANT_FEATURES = ("auth", "fluent")


class BenchError(Exception):
    """A failure that ends the benchmark, with what to look at."""


# Reading processes from /proc.


def read_stat(pid):
    """
    Return (ppid, cpu seconds, start time in ticks) of a process from
    /proc/PID/stat, or None once it has exited.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat_file:
            text = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields are counted
    # from the last ")". Field 4 is ppid, 14-15 utime and stime, 22 starttime.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[19])


def process_tree(pid):
    """Return {pid: start time} of a process and of all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))

    tree = {}
    pending = [pid]
    while pending and len(tree) < 10_000:
        current = pending.pop()
        stat = read_stat(current)
        if stat is not None:
            tree[current] = stat[2]
            pending += children.get(current, [])
    return tree


def tree_cpu_seconds(pid):
    """Return the CPU seconds (user and system) used so far by a process and its descendants."""
    total = 0.0
    for member in process_tree(pid):
        stat = read_stat(member)
        if stat is not None:
            total += stat[1]
    return total


# The variants of the server under test.


@dataclass(frozen=True)
class Variant:
    """
    A configuration of the server under test: the baseline has neither
    authentication nor Fluentd forwarding, the others add one or both.
    """

    auth: bool = False
    fluent: bool = False

    @property
    def name(self):
        features = [feature for feature in VARIANT_FEATURES if getattr(self, feature)]
        return "+".join(features) or "baseline"

    @classmethod
    def parse(cls, text):
        """Parse "baseline", "auth", "fluent" or "auth+fluent"."""
        text = text.strip().lower()
        if text == "baseline":
            return cls()
        features = set(text.split("+"))
        unknown = features - set(VARIANT_FEATURES)
        if not text or unknown:
            raise ValueError(f"invalid variant {text!r}: expected baseline, auth, fluent or auth+fluent")
        return cls(auth="auth" in features, fluent="fluent" in features)


def make_operators(count):
    """Return ``count`` operators as the API lists them, each with a new random key."""
    return [
        {"email": f"operator-{number:03d}@bench.invalid", "apikey": secrets.token_hex(20), "name": f"Bench operator {number}"}
        for number in range(1, count + 1)
    ]


# Helper processes: the API stand-in and the Fluentd sink.


class Helper:
    """
    A helper process started and ended by this benchmark. It prints
    ``port N`` on stdout once it listens; its stderr goes to ``log_path``.
    """

    def __init__(self, name, command, log_path, environment):
        self.name = name
        self.command = command
        self.log_path = log_path
        self.environment = environment
        self.process = None
        self.port = None
        self._buffer = b""

    @property
    def pid(self):
        return self.process.pid

    def start(self):
        """Start the process and wait for its port line. Raise BenchError after START_TIMEOUT."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                # Its own session, so that a Ctrl-C reaches only the
                # benchmark, which then ends the helper by its PID.
                start_new_session=True,
            )
        line = self.read_line(START_TIMEOUT)
        name, _, value = line.partition(" ")
        if name != "port" or not value.isdigit():
            raise BenchError(f"the {self.name} printed {line!r} instead of its port; see {self.log_path}")
        self.port = int(value)

    def read_line(self, timeout):
        """Return the next line of the helper's stdout. Raise BenchError when none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        stdout = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"the {self.name} printed nothing within {timeout:g} s; see {self.log_path}")
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(stdout, 4096)
            if not chunk:
                raise BenchError(f"the {self.name} closed its output (exit status {self.process.poll()}); see {self.log_path}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").strip()

    def stop(self):
        """End the process with SIGTERM, or SIGKILL after STOP_TIMEOUT."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"warning: the {self.name} (PID {self.pid}) ignored SIGTERM, killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self.process.stdout.close()
        self.process = None


class FluentSink(Helper):
    """The Forward-protocol sink of bench/fluent_sink.py, which counts the records it receives."""

    def __init__(self, log_folder):
        command = [sys.executable, str(FLUENT_SINK_SCRIPT)]
        super().__init__("Fluentd sink", command, os.path.join(log_folder, "fluent-sink.log"), clean_environment())

    def records(self):
        """Return the number of records received so far, asked with SIGUSR1."""
        os.kill(self.pid, signal.SIGUSR1)
        line = self.read_line(REPLY_TIMEOUT)
        counts = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if not counts.get("records", "").isdigit():
            raise BenchError(f"the {self.name} printed {line!r} instead of its counts; see {self.log_path}")
        return int(counts["records"])


class UsersApi(Helper):
    """The API stand-in of bench/users_api.py, which serves the operators' keys at /users/."""

    def __init__(self, log_folder, operators, api_key):
        users_path = os.path.join(log_folder, "users.json")
        with open(users_path, "w", encoding="utf-8") as users_file:
            json.dump(operators, users_file)
        command = [sys.executable, str(USERS_API_SCRIPT), "--users", users_path]
        environment = dict(clean_environment(), API_KEY=api_key)
        super().__init__("API stand-in", command, os.path.join(log_folder, "users-api.log"), environment)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class Helpers:
    """
    The helpers that the variants need, each started once and shared by
    every run: the API stand-in for authentication, the sink for Fluentd.
    """

    def __init__(self, log_folder, operator_count):
        self.log_folder = log_folder
        self.operators = make_operators(operator_count)
        # The key with which the server lists /users/. It reaches the server
        # and the stand-in through their environment, never a command line.
        self.api_key = secrets.token_hex(20)
        self.users_api = None
        self.sink = None

    def start(self, variants):
        if any(variant.auth for variant in variants):
            self.users_api = UsersApi(self.log_folder, self.operators, self.api_key)
            self.users_api.start()
            print(f"API stand-in: PID {self.users_api.pid}, {self.users_api.url}/users/, {len(self.operators)} operators")
        if any(variant.fluent for variant in variants):
            self.sink = FluentSink(self.log_folder)
            self.sink.start()
            print(f"Fluentd sink: PID {self.sink.pid}, TCP port {self.sink.port}")

    def stop(self):
        """End every helper by its PID, each even when another fails to stop."""
        for helper in (self.users_api, self.sink):
            if helper is not None:
                try:
                    helper.stop()
                except (OSError, subprocess.SubprocessError) as error:
                    print(f"warning: could not stop the {helper.name} (PID {helper.pid}): {error}", file=sys.stderr)

    def server_arguments(self, variant):
        """Return the server options that set up ``variant``."""
        if variant.fluent:
            arguments = ["--fluent-host", "127.0.0.1", "--fluent-port", str(self.sink.port)]
        else:
            arguments = ["--disable-fluent"]
        if variant.auth:
            arguments += ["--auth-enabled", "--api-url", self.users_api.url]
        return arguments

    def server_environment(self, variant):
        environment = clean_environment()
        if variant.auth:
            environment["API_KEY"] = self.api_key
        return environment

    def signing(self, variant, seed):
        """
        Return the generator's arguments that sign datagrams for ``variant``:
        none without authentication, else the key of one operator per seed.
        """
        if not variant.auth:
            return {}
        operator = self.operators[seed % len(self.operators)]
        return {"api_key": operator["apikey"], "operator": operator["email"]}

    def probe_signing(self, variant):
        """
        Return the signing arguments of the start-up probes: the last
        operator's key, on the API's last page, so that a stored probe shows
        that the server followed every page.
        """
        return self.signing(variant, len(self.operators) - 1)


# The server process.


def clean_environment():
    """
    Return this environment without the variables that geotaxi reads as
    options (PORT, REDIS_HOST, AUTH_ENABLED...), which would change the
    server under test behind the benchmark's back.
    """
    options = Options(environ={})
    names = {name for name, *_ in options.optParameters} | {flag[0] for flag in options.optFlags}
    names |= {"fluentd-host", "api-key"}
    variables = {name.upper().replace("-", "_") for name in names}
    return {name: value for name, value in os.environ.items() if name not in variables}


def expected_workers(server_args):
    """Return the --workers/-w value among the server arguments, 1 if absent."""
    for index, argument in enumerate(server_args):
        if argument in ("--workers", "-w") and index + 1 < len(server_args):
            return int(server_args[index + 1])
        if argument.startswith("--workers="):
            return int(argument.split("=", 1)[1])
        if argument.startswith("-w") and argument[2:].isdigit():
            return int(argument[2:])
    return 1


class Server:
    """One geotaxi server process, started and ended by this benchmark."""

    def __init__(self, command, port, log_path, environment):
        self.command = command
        self.port = port
        self.log_path = log_path
        self.environment = environment
        self.process = None
        self.members = {}

    def start(self):
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session, so a Ctrl-C in the terminal reaches only
                # the benchmark, which then ends the server by its PID.
                start_new_session=True,
            )

    @property
    def pid(self):
        return self.process.pid

    def check_running(self):
        if self.process.poll() is not None:
            raise BenchError(f"the server exited with status {self.process.returncode}; {self.log_tail()}")

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log_file:
                tail = log_file.readlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "".join(tail)

    def remember_members(self):
        """Record the PIDs of the server and its workers, to end them all by PID."""
        self.members.update(process_tree(self.pid))

    def wait_ready(self, redis, workers, signing):
        """
        Wait until a probe datagram, signed with ``signing`` (generator
        arguments), is stored in Redis and ``workers`` sockets listen on the
        port. With authentication, a stored probe also shows that the keys
        are loaded. Raise BenchError after START_TIMEOUT.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the server stored no probe position within {START_TIMEOUT:.0f} s; {self.log_tail()}")
            traffic.send_traffic("127.0.0.1", self.port, 1, unique_ids=True, **signing)
            time.sleep(0.2)
            if redis.command("DBSIZE") > 0:
                break

        # Workers that have not bound yet receive nothing, so a probe cannot
        # find them. Their sockets in /proc/net/udp can.
        while len(netstat.udp_sockets(port=self.port)) < workers and time.monotonic() < deadline:
            self.check_running()
            time.sleep(0.25)
        listening = len(netstat.udp_sockets(port=self.port))
        if listening < workers:
            print(f"warning: {listening} socket(s) on port {self.port} for {workers} workers", file=sys.stderr)
        self.remember_members()

    def read_counters(self):
        """
        Send SIGUSR1 and return the counters that the server then logs, as
        {name: value}, or None when no counter line comes within REPLY_TIMEOUT.
        """
        offset = os.path.getsize(self.log_path)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(DRAIN_POLL)
            with open(self.log_path, encoding="utf-8", errors="replace") as log_file:
                log_file.seek(offset)
                match = COUNTERS_LINE.search(log_file.read())
            if match:
                return {name: int(value) for name, value in (item.split("=") for item in match.group(1).split())}
        print(f"warning: the server logged no counters within {REPLY_TIMEOUT:g} s of SIGUSR1", file=sys.stderr)
        return None

    def stop(self):
        """
        End the server with SIGTERM and wait for it to write its backlog;
        send SIGKILL after STOP_TIMEOUT. Then end, by PID, any worker that
        outlived it.
        """
        if self.process is None:
            return
        if self.process.poll() is None:
            self.remember_members()
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"warning: server {self.pid} ignored SIGTERM for {STOP_TIMEOUT:.0f} s, killing it", file=sys.stderr)
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)

        for pid, started in self.members.items():
            stat = read_stat(pid)
            # A matching start time shows that the PID was not reused.
            if pid != self.pid and stat is not None and stat[2] == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process = None


@dataclass
class Sweep:
    """The variant, server process, Redis and shared helpers of one sweep."""

    run: int
    variant: Variant
    server: Server
    redis: RedisServer
    helpers: Helpers
    # Server counters that changed during the steps; None when not read.
    counters: dict = None

    @property
    def sink(self):
        return self.helpers.sink if self.variant.fluent else None


# One step of the sweep.


def count_positions(redis):
    """Return the number of taxi:* keys: one per position, since every taxi id is new."""
    return redis.command("EVAL", COUNT_TAXI_KEYS, 0, "taxi:*")


def wait_drained(redis, server, sent, timeout):
    """
    Wait until the server stops writing: DBSIZE unchanged for DRAIN_STABLE
    seconds with an empty receive queue, or every position written. Return
    the monotonic time of the last change seen.
    """
    last_size = redis.command("DBSIZE")
    last_change = time.monotonic()
    deadline = last_change + timeout
    while time.monotonic() < deadline:
        time.sleep(DRAIN_POLL)
        server.check_running()
        size = redis.command("DBSIZE")
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        if size >= sent + len(INDEX_KEYS):
            return now
        queued = sum(row.rx_queue for row in netstat.udp_sockets(port=server.port))
        if now - last_change >= DRAIN_STABLE and queued == 0:
            return last_change
    print(f"warning: the server was still writing after {timeout:.0f} s of drain", file=sys.stderr)
    return last_change


def wait_forwarded(sink, server, first_count, sent, timeout):
    """
    Wait until the sink has ``sent`` records more than ``first_count``, or
    its count stays unchanged for DRAIN_STABLE seconds. Return (records
    received since ``first_count``, monotonic time of the last change seen,
    or None when the count did not change after the first poll).
    """
    count = sink.records()
    last_change = None
    unchanged_since = time.monotonic()
    deadline = unchanged_since + timeout
    while count - first_count < sent:
        now = time.monotonic()
        if now - unchanged_since >= DRAIN_STABLE:
            break
        if now >= deadline:
            print(f"warning: the Fluentd sink was still receiving after {timeout:.0f} s of drain", file=sys.stderr)
            break
        # Each poll costs the sink a signal and a line on a pipe, so it
        # polls less often than Redis.
        time.sleep(2 * DRAIN_POLL)
        server.check_running()
        latest = sink.records()
        if latest != count:
            count = latest
            last_change = unchanged_since = time.monotonic()
    return count - first_count, last_change


def run_step(rate, sweep, options, seed):
    """Send one rate for ``options.seconds`` and return the figures of the step."""
    server, redis, sink = sweep.server, sweep.redis, sweep.sink
    redis.command("FLUSHDB")
    time.sleep(SETTLE_SECONDS)
    server.check_running()

    server_cpu = tree_cpu_seconds(server.pid)
    redis_cpu = tree_cpu_seconds(redis.process.pid)
    sink_cpu = tree_cpu_seconds(sink.pid) if sink else 0.0
    sink_records = sink.records() if sink else 0
    drops = netstat.socket_drops(port=server.port)
    snmp = netstat.udp_snmp()
    started = time.monotonic()

    report = traffic.send_traffic(
        "127.0.0.1",
        server.port,
        int(rate * options.seconds),
        rate=rate,
        duration=options.seconds,
        unique_ids=True,
        sockets=options.sockets,
        seed=seed,
        **sweep.helpers.signing(sweep.variant, seed),
    )
    last_change = wait_drained(redis, server, report.sent, options.drain_timeout)
    forwarded = None
    if sink:
        forwarded, last_forward = wait_forwarded(sink, server, sink_records, report.sent, options.drain_timeout)
        # Records that arrived before the Redis drain ended are already
        # inside the busy time.
        if last_forward is not None:
            last_change = max(last_change, last_forward)

    # Busy time: from the first datagram to the last write or record seen,
    # and at least the sending time, so that CPU shares are not diluted by
    # the idle end of the drain.
    busy = max(report.seconds, last_change - started)
    server_cpu = tree_cpu_seconds(server.pid) - server_cpu
    redis_cpu = tree_cpu_seconds(redis.process.pid) - redis_cpu
    delivered = count_positions(redis)
    return {
        "offered_rate": rate,
        "sent": report.sent,
        "send_rate": round(report.rate),
        "delivered": delivered,
        "fluent_records": forwarded,
        "loss_percent": 100.0 * (report.sent - delivered) / report.sent if report.sent else 0.0,
        "delivered_rate": round(delivered / busy),
        "server_cpu_percent": 100.0 * server_cpu / busy,
        "server_us_per_position": 1e6 * server_cpu / delivered if delivered else None,
        "redis_cpu_percent": 100.0 * redis_cpu / busy,
        "sink_cpu_percent": 100.0 * (tree_cpu_seconds(sink.pid) - sink_cpu) / busy if sink else None,
        "kernel_drops": netstat.socket_drops(port=server.port) - drops,
        "namespace_rcvbuf_errors": netstat.udp_snmp()["RcvbufErrors"] - snmp["RcvbufErrors"],
        "drain_seconds": max(0.0, last_change - started - report.seconds),
        "send_errors": report.errors,
    }


def wait_sink_connected(sweep):
    """
    Wait until the sink has received a record from this server, the
    forwarded probe, so that the first step does not measure the TCP
    connection to Fluentd. Raise BenchError after START_TIMEOUT.
    """
    sink, server = sweep.sink, sweep.server
    first_count = sink.records()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        server.check_running()
        traffic.send_traffic("127.0.0.1", server.port, 1, unique_ids=True, **sweep.helpers.probe_signing(sweep.variant))
        time.sleep(0.2)
        if sink.records() > first_count:
            return
    raise BenchError(f"the Fluentd sink received no record within {START_TIMEOUT:.0f} s; {server.log_tail()}")


def counters_delta(before, after):
    """Return the counters that changed between two reports, in report order."""
    if before is None or after is None:
        return None
    return {name: value - before.get(name, 0) for name, value in after.items() if value != before.get(name, 0)}


def run_sweep(sweep, rates, options):
    """Start the server, run every rate on it, stop it, and return the steps."""
    server, variant = sweep.server, sweep.variant
    # Another server (--server-command) may end on SIGUSR1, so only
    # geotaxi's counters are read.
    read_counters = not options.server_command
    steps = []
    try:
        server.start()
        server.wait_ready(sweep.redis, expected_workers(options.server_args), sweep.helpers.probe_signing(variant))
        if sweep.sink:
            wait_sink_connected(sweep)
        counters_before = server.read_counters() if read_counters else None

        print(
            f"\nrun {sweep.run + 1}/{options.runs}, {variant.name}: server PID {server.pid}, "
            f"UDP port {server.port}, Redis port {sweep.redis.port}"
        )
        columns = columns_of(variant)
        print(format_header(columns))
        for index, rate in enumerate(rates):
            step = run_step(rate, sweep, options, seed=sweep.run * 1000 + index)
            steps.append(step)
            print(format_row(step, columns), flush=True)
            if options.stop_at_loss and step["loss_percent"] > options.stop_at_loss:
                print(f"loss above {options.stop_at_loss:g} %: higher rates skipped")
                break

        if read_counters:
            sweep.counters = counters_delta(counters_before, server.read_counters())
            if sweep.counters is not None:
                changed = " ".join(f"{name}={value}" for name, value in sweep.counters.items())
                print(f"server counters during the steps: {changed or 'none changed'}")
    finally:
        server.stop()
    return steps


# Output.

COLUMNS = (
    ("offered/s", "offered_rate", "{:>9.0f}"),
    ("sent/s", "send_rate", "{:>8.0f}"),
    ("delivered", "delivered", "{:>9.0f}"),
    ("loss %", "loss_percent", "{:>7.2f}"),
    ("stored/s", "delivered_rate", "{:>8.0f}"),
    ("server CPU %", "server_cpu_percent", "{:>12.0f}"),
    ("µs/pos", "server_us_per_position", "{:>7.1f}"),
    ("kernel drops", "kernel_drops", "{:>12.0f}"),
    ("redis CPU %", "redis_cpu_percent", "{:>11.0f}"),
    ("drain s", "drain_seconds", "{:>7.1f}"),
)

# Shown after "delivered" and at the end of the row when Fluentd is on.
FLUENT_RECORDS_COLUMN = ("fluent recs", "fluent_records", "{:>11.0f}")
SINK_CPU_COLUMN = ("sink CPU %", "sink_cpu_percent", "{:>10.0f}")


def columns_of(variant):
    """Return the table columns of ``variant``: the Fluentd ones only when it forwards."""
    if not variant.fluent:
        return COLUMNS
    return COLUMNS[:3] + (FLUENT_RECORDS_COLUMN,) + COLUMNS[3:] + (SINK_CPU_COLUMN,)


def format_header(columns=COLUMNS):
    widths = [len(spec.format(0)) for _, _, spec in columns]
    return "  ".join(f"{title:>{width}}" for (title, _, _), width in zip(columns, widths))


def format_row(step, columns=COLUMNS):
    cells = []
    for _, key, spec in columns:
        value = step.get(key)
        cells.append(spec.format(value) if value is not None else f"{'-':>{len(spec.format(0))}}")
    row = "  ".join(cells)
    # The step measured less than the offered rate.
    if sender_short(step):
        row += "  (sender short)"
    return row


def median_steps(runs):
    """Return, for each offered rate, the median of every figure over the runs that reached it."""
    by_rate = {}
    for steps in runs:
        for step in steps:
            by_rate.setdefault(step["offered_rate"], []).append(step)

    medians = []
    for rate, steps in by_rate.items():
        median = {"offered_rate": rate, "runs": len(steps)}
        for key in steps[0]:
            values = [step[key] for step in steps if step[key] is not None]
            if key != "offered_rate":
                median[key] = statistics.median(values) if values else None
        medians.append(median)
    return medians


def sender_short(step):
    """Tell whether the generator sent less than 97 % of the offered rate."""
    return step["send_rate"] < 0.97 * step["offered_rate"]


def no_loss(step):
    """Tell whether a step lost less than 0.1 % at a rate the generator did send."""
    return step["loss_percent"] < NO_LOSS_PERCENT and not sender_short(step)


def highest_no_loss_rate(steps):
    """
    Return the highest offered rate stored with less than 0.1 % loss, among
    the steps where the generator did send that rate.
    """
    rates = [step["offered_rate"] for step in steps if no_loss(step)]
    return max(rates) if rates else None


def format_rate(rate):
    return f"{rate:.0f}/s" if rate else "none of the offered rates"


def print_medians(title, medians, columns):
    """Print the median table of a variant and its highest no-loss rate."""
    print(f"\n{title}:\n{format_header(columns)}")
    for step in medians:
        print(format_row(step, columns))
    best = highest_no_loss_rate(medians)
    print(f"highest no-loss rate (<{NO_LOSS_PERCENT:g} % loss): {format_rate(best)}")


# Comparison of variants.


def rates_without_loss(results):
    """Return the set of offered rates at which every run of every variant lost less than 0.1 %."""
    rates = None
    for runs in results.values():
        for steps in runs:
            run_rates = {step["offered_rate"] for step in steps if no_loss(step)}
            rates = run_rates if rates is None else rates & run_rates
    return rates or set()


def median_us_per_position(runs, rate):
    """Return the median server CPU µs per position at ``rate`` over the runs, or None."""
    values = [
        step["server_us_per_position"]
        for steps in runs
        for step in steps
        if step["offered_rate"] == rate and step["server_us_per_position"] is not None
    ]
    return statistics.median(values) if values else None


def compare_variants(results, cpu_rate):
    """
    Return one row per variant: the median over runs of each run's highest
    no-loss rate (0 for a run without one), the median µs per position at
    ``cpu_rate``, and both as ratios to the first variant, the baseline.
    """
    rows = []
    for name, runs in results.items():
        best_rates = [highest_no_loss_rate(steps) or 0 for steps in runs]
        rows.append(
            {
                "variant": name,
                "runs": len(runs),
                "no_loss_rate": statistics.median(best_rates),
                "us_per_position": median_us_per_position(runs, cpu_rate) if cpu_rate else None,
            }
        )

    baseline = rows[0]
    for row in rows:
        for key in ("no_loss_rate", "us_per_position"):
            reference = baseline[key]
            row[f"{key}_ratio"] = row[key] / reference if reference and row[key] is not None else None
    return rows


def print_comparison(rows, cpu_rate, comparable):
    runs = rows[0]["runs"]
    print(f"\ncomparison, median over {runs} run(s) of each variant, ratios to the baseline:")
    if cpu_rate is None:
        print("no offered rate was stored without loss by every run: CPU per position not compared")
    elif not comparable:
        print(f"warning: some runs lost positions at {cpu_rate:.0f}/s, so their µs/pos there is not comparable")

    cpu_title = f"µs/pos at {cpu_rate:.0f}/s" if cpu_rate else "µs/pos"
    print(f"{'variant':<12}  {'no-loss rate':>12}  {'ratio':>5}  {cpu_title:>18}  {'ratio':>5}")
    for row in rows:
        rate = f"{row['no_loss_rate']:.0f}/s" if row["no_loss_rate"] else "none"
        cpu = f"{row['us_per_position']:.1f}" if row["us_per_position"] is not None else "-"
        print(
            f"{row['variant']:<12}  {rate:>12}  {format_ratio(row['no_loss_rate_ratio'])}  "
            f"{cpu:>18}  {format_ratio(row['us_per_position_ratio'])}"
        )


def format_ratio(ratio):
    return f"{ratio:>5.2f}" if ratio is not None else f"{'-':>5}"


# Command line.


def parse_rate(text):
    """Parse a rate such as 5000 or 5k."""
    text = text.strip().lower()
    value = float(text[:-1]) * 1000 if text.endswith("k") else float(text)
    if not 0 < value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: expected 1 to 1,000,000 datagrams per second")
    return value


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Find the highest rate a geotaxi server stores without loss, on loopback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rates",
        default=DEFAULT_RATES,
        help="offered rates in datagrams per second, comma-separated, rising (5k means 5000)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of traffic per rate")
    parser.add_argument("--runs", type=int, default=1, help="repeat the sweep this many times and print the medians")
    parser.add_argument("--server-args", default="", help='extra arguments of the server, e.g. --server-args="--workers 2"')
    parser.add_argument(
        "--server-command",
        help=(
            "command that starts another server instead of geotaxi, with {port} and {redis_port} "
            "placeholders, e.g. to measure the earlier server: "
            '"geotaxi -h 127.0.0.1 -p {port} --redis-port {redis_port} --disable-fluent"'
        ),
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="sign every datagram and run the server with --auth-enabled against an API stand-in (bench/users_api.py)",
    )
    parser.add_argument(
        "--fluent",
        action="store_true",
        help="run the server with Fluentd forwarding to a sink that counts records (bench/fluent_sink.py)",
    )
    parser.add_argument(
        "--compare",
        metavar="VARIANTS",
        help=(
            "run the baseline and these variants (comma-separated: auth, fluent, auth+fluent) "
            "in turn, run after run, and print their ratios to the baseline"
        ),
    )
    parser.add_argument(
        "--cpu-rate",
        type=parse_rate,
        help="offered rate at which --compare compares CPU per position (default: the highest rate no run lost at)",
    )
    parser.add_argument("--operators", type=int, default=DEFAULT_OPERATORS, help="operators served by the API stand-in")
    parser.add_argument("--sockets", type=int, default=16, help="source sockets of the generator, for SO_REUSEPORT workers")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for the server to write its backlog")
    parser.add_argument(
        "--stop-at-loss",
        type=float,
        default=50.0,
        help="skip the higher rates of a run once a step loses more than this percentage (0: never)",
    )
    parser.add_argument("--json", metavar="FILE", help="also save every step, the medians, the server counters and the comparison to this JSON file")
    args = parser.parse_args(argv)

    try:
        args.rate_list = [parse_rate(item) for item in args.rates.split(",") if item.strip()]
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if not args.rate_list:
        parser.error("--rates is empty")
    if not 0 < args.seconds <= 600:
        parser.error(f"invalid --seconds {args.seconds}: expected more than 0 and at most 600")
    if not 1 <= args.runs <= 20:
        parser.error(f"invalid --runs {args.runs}: expected 1 to 20")
    if not 1 <= args.sockets <= traffic.MAX_SOCKETS:
        parser.error(f"invalid --sockets {args.sockets}: expected 1 to {traffic.MAX_SOCKETS}")
    if not 0 < args.drain_timeout <= 600:
        parser.error(f"invalid --drain-timeout {args.drain_timeout}: expected more than 0 and at most 600")
    if not 1 <= args.operators <= MAX_OPERATORS:
        parser.error(f"invalid --operators {args.operators}: expected 1 to {MAX_OPERATORS}")
    if args.server_command and "{port}" not in args.server_command:
        parser.error("--server-command needs a {port} placeholder for the UDP port the benchmark chose")
    args.server_args = shlex.split(args.server_args)

    try:
        args.variants = choose_variants(args)
    except ValueError as error:
        parser.error(str(error))
    if args.server_command and args.variants != [Variant()]:
        # The benchmark cannot take --disable-fluent out of another server's
        # command, so its Fluentd variant would measure the wrong thing.
        parser.error("--auth, --fluent and --compare measure geotaxi only: leave out --server-command")
    if args.cpu_rate and not args.compare:
        parser.error("--cpu-rate applies to --compare only")
    return args


def choose_variants(args):
    """
    Return the variants to run: the baseline and those of --compare, or the
    one set by --auth and --fluent. Raise ValueError on a conflict.
    """
    if not args.compare:
        return [Variant(auth=args.auth, fluent=args.fluent)]
    if args.auth or args.fluent:
        raise ValueError("--compare names its variants itself: leave out --auth and --fluent")

    variants = [Variant()]
    for item in args.compare.split(","):
        variant = Variant.parse(item)
        if variant not in variants:
            variants.append(variant)
    if len(variants) < 2:
        raise ValueError(f"--compare {args.compare!r} names no variant besides the baseline: expected e.g. auth,fluent")
    return variants


def build_server_command(args, port, redis_port, variant_arguments):
    if args.server_command:
        return shlex.split(args.server_command.format(port=port, redis_port=redis_port)) + args.server_args
    return TWISTD + [
        "-n", "--pidfile=", "geotaxi",
        "--host", "127.0.0.1", "--port", str(port),
        "--redis-port", str(redis_port),
    ] + variant_arguments + args.server_args


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_all(args, redis, helpers, log_folder, records):
    """
    Run ``args.runs`` sweeps of every variant, interleaved (baseline, auth,
    fluent, baseline, ...) so that machine noise hits all variants alike.
    Add each variant's server command, and the steps and server counters of
    each sweep as it completes, to ``records[variant name]``.
    """
    for run in range(args.runs):
        for variant in args.variants:
            port = free_port(socket.SOCK_DGRAM)
            command = build_server_command(args, port, redis.port, helpers.server_arguments(variant))
            record = records.setdefault(variant.name, {"server_command": shlex.join(command), "runs": [], "server_counters": []})
            if run == 0:
                print(f"\nserver, {variant.name}: {record['server_command']}")

            log_path = os.path.join(log_folder, f"server-{run + 1}-{variant.name}.log")
            server = Server(command, port, log_path, helpers.server_environment(variant))
            sweep = Sweep(run, variant, server, redis, helpers)
            record["runs"].append(run_sweep(sweep, args.rate_list, args))
            record["server_counters"].append(sweep.counters)


def summarize(args, records):
    """
    Print the median table of each variant and, with --compare, the
    comparison. Return the document that --json saves.
    """
    document = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "seconds": args.seconds,
        "variants": {},
        "comparison": None,
    }
    for variant in args.variants:
        record = records.get(variant.name)
        if record is None or not any(record["runs"]):
            continue
        runs = record["runs"]
        record["median"] = median_steps(runs)
        record["highest_no_loss_rate"] = highest_no_loss_rate(record["median"])
        document["variants"][variant.name] = record

        # With --compare and one run, each table would repeat the run's own.
        if len(runs) > 1:
            print_medians(f"{variant.name}, median of {len(runs)} runs", record["median"], columns_of(variant))
        elif not args.compare:
            print_medians(f"{variant.name}, result", record["median"], columns_of(variant))

    # Ratios need as many runs of every variant as of the baseline, which an
    # interrupted benchmark may not have.
    run_counts = {len(records.get(variant.name, {}).get("runs", [])) for variant in args.variants}
    if args.compare and run_counts != {0} and len(run_counts) == 1:
        # The baseline comes first: compare_variants() divides by its figures.
        results = {variant.name: records[variant.name]["runs"] for variant in args.variants}
        lossless = rates_without_loss(results)
        cpu_rate = args.cpu_rate or (max(lossless) if lossless else None)
        rows = compare_variants(results, cpu_rate)
        print_comparison(rows, cpu_rate, cpu_rate in lossless)
        document["comparison"] = {"cpu_rate": cpu_rate, "rows": rows}
    return document


def main(argv=None):
    args = parse_arguments(argv)
    # SIGTERM ends the benchmark like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, raise_interrupt)

    log_folder = tempfile.mkdtemp(prefix="geotaxi-bench-")
    redis = RedisServer()
    helpers = Helpers(log_folder, args.operators)
    records = {}
    failed = False
    try:
        redis.start()
        redis_version = redis.command("INFO", "server").split("redis_version:")[1].split()[0]
        print(f"Redis {redis_version} on port {redis.port}; {os.cpu_count()} CPUs; logs in {log_folder}")
        variant_names = ", ".join(variant.name for variant in args.variants)
        print(f"{args.seconds:g} s per rate, new taxi id per datagram, {args.runs} run(s) of {variant_names}")
        helpers.start(args.variants)
        run_all(args, redis, helpers, log_folder, records)
    except BenchError as error:
        failed = True
        print(f"bench failed: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted: stopping the server, its helpers and Redis", file=sys.stderr)
    finally:
        helpers.stop()
        redis.cleanup()

    if records:
        document = summarize(args, records)
        if args.json and document["variants"]:
            with open(args.json, "w", encoding="utf-8") as json_file:
                json.dump(document, json_file, indent=2)
            print(f"saved to {args.json}")

    if failed:
        print(f"server and helper logs kept in {log_folder}", file=sys.stderr)
        sys.exit(1)
    for name in os.listdir(log_folder):
        os.remove(os.path.join(log_folder, name))
    os.rmdir(log_folder)


if __name__ == "__main__":
    main()
