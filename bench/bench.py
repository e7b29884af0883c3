"""
Measure how many positions a geotaxi server stores per second without loss.

Start a redis-server and a geotaxi server on free loopback ports. Then, for
each offered rate of a rising list, send ``--seconds`` of datagrams with a
new taxi id each and wait until the server has drained. The ``taxi:*`` keys
in Redis count the positions delivered, one key each. Print a table per
run, the median over ``--runs`` runs, and the highest rate stored with less
than 0.1 % loss. See bench/README.md for how to read the figures.

Run it from anywhere with the project's Python: ``python bench/bench.py``.
"""

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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

START_TIMEOUT = 30.0
DRAIN_POLL = 0.05
DRAIN_STABLE = 1.0
SETTLE_SECONDS = 1.0
STOP_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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

    def __init__(self, command, port, log_path):
        self.command = command
        self.port = port
        self.log_path = log_path
        self.process = None
        self.members = {}

    def start(self):
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=clean_environment(),
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

    def wait_ready(self, redis, workers):
        """
        Wait until a probe datagram is stored in Redis and ``workers``
        sockets listen on the port. Raise BenchError after START_TIMEOUT.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self.check_running()
            if time.monotonic() > deadline:
                raise BenchError(f"the server stored no probe position within {START_TIMEOUT:.0f} s; {self.log_tail()}")
            traffic.send_traffic("127.0.0.1", self.port, 1, unique_ids=True)
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


def run_step(rate, seconds, server, redis, redis_pid, options, seed):
    """Send one rate for ``seconds`` and return the figures of the step."""
    redis.command("FLUSHDB")
    time.sleep(SETTLE_SECONDS)
    server.check_running()

    server_cpu = tree_cpu_seconds(server.pid)
    redis_cpu = tree_cpu_seconds(redis_pid)
    drops = netstat.socket_drops(port=server.port)
    snmp = netstat.udp_snmp()
    started = time.monotonic()

    report = traffic.send_traffic(
        "127.0.0.1",
        server.port,
        int(rate * seconds),
        rate=rate,
        duration=seconds,
        unique_ids=True,
        sockets=options.sockets,
        seed=seed,
    )
    last_change = wait_drained(redis, server, report.sent, options.drain_timeout)

    # Busy time: from the first datagram to the last write seen, and at
    # least the sending time, so that CPU shares are not diluted by the
    # idle end of the drain.
    busy = max(report.seconds, last_change - started)
    server_cpu = tree_cpu_seconds(server.pid) - server_cpu
    redis_cpu = tree_cpu_seconds(redis_pid) - redis_cpu
    delivered = count_positions(redis)
    return {
        "offered_rate": rate,
        "sent": report.sent,
        "send_rate": round(report.rate),
        "delivered": delivered,
        "loss_percent": 100.0 * (report.sent - delivered) / report.sent if report.sent else 0.0,
        "delivered_rate": round(delivered / busy),
        "server_cpu_percent": 100.0 * server_cpu / busy,
        "server_us_per_position": 1e6 * server_cpu / delivered if delivered else None,
        "redis_cpu_percent": 100.0 * redis_cpu / busy,
        "kernel_drops": netstat.socket_drops(port=server.port) - drops,
        "namespace_rcvbuf_errors": netstat.udp_snmp()["RcvbufErrors"] - snmp["RcvbufErrors"],
        "drain_seconds": max(0.0, last_change - started - report.seconds),
        "send_errors": report.errors,
    }


def run_sweep(run, rates, options, server, redis):
    """Start the server, run every rate on it, stop it, and return the steps."""
    steps = []
    try:
        server.start()
        server.wait_ready(redis, expected_workers(options.server_args))
        print(f"\nrun {run + 1}/{options.runs}: server PID {server.pid}, UDP port {server.port}, Redis port {redis.port}")
        print(format_header())
        for index, rate in enumerate(rates):
            step = run_step(rate, options.seconds, server, redis, redis.process.pid, options, seed=run * 1000 + index)
            steps.append(step)
            print(format_row(step), flush=True)
            if options.stop_at_loss and step["loss_percent"] > options.stop_at_loss:
                print(f"loss above {options.stop_at_loss:g} %: higher rates skipped")
                break
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


def format_header():
    widths = [len(spec.format(0)) for _, _, spec in COLUMNS]
    return "  ".join(f"{title:>{width}}" for (title, _, _), width in zip(COLUMNS, widths))


def format_row(step):
    cells = []
    for _, key, spec in COLUMNS:
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


def highest_no_loss_rate(steps):
    """
    Return the highest offered rate stored with less than 0.1 % loss, among
    the steps where the generator did send that rate.
    """
    rates = [
        step["offered_rate"]
        for step in steps
        if step["loss_percent"] < NO_LOSS_PERCENT and not sender_short(step)
    ]
    return max(rates) if rates else None


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
    parser.add_argument("--sockets", type=int, default=16, help="source sockets of the generator, for SO_REUSEPORT workers")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to wait for the server to write its backlog")
    parser.add_argument(
        "--stop-at-loss",
        type=float,
        default=50.0,
        help="skip the higher rates of a run once a step loses more than this percentage (0: never)",
    )
    parser.add_argument("--json", metavar="FILE", help="also save every step and the medians to this JSON file")
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
    if args.server_command and "{port}" not in args.server_command:
        parser.error("--server-command needs a {port} placeholder for the UDP port the benchmark chose")
    args.server_args = shlex.split(args.server_args)
    return args


def build_server_command(args, port, redis_port):
    if args.server_command:
        return shlex.split(args.server_command.format(port=port, redis_port=redis_port)) + args.server_args
    return TWISTD + [
        "-n", "--pidfile=", "geotaxi",
        "--host", "127.0.0.1", "--port", str(port),
        "--redis-port", str(redis_port),
        "--disable-fluent",
    ] + args.server_args


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_arguments(argv)
    # SIGTERM ends the benchmark like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, raise_interrupt)

    log_folder = tempfile.mkdtemp(prefix="geotaxi-bench-")
    redis = RedisServer()
    runs = []
    failed = False
    try:
        redis.start()
        redis_version = redis.command("INFO", "server").split("redis_version:")[1].split()[0]
        print(f"Redis {redis_version} on port {redis.port}; {os.cpu_count()} CPUs; logs in {log_folder}")
        print(f"{args.seconds:g} s per rate, new taxi id per datagram, {args.runs} run(s)")

        for run in range(args.runs):
            port = free_port(socket.SOCK_DGRAM)
            command = build_server_command(args, port, redis.port)
            if run == 0:
                print("server: " + shlex.join(command))
            log_path = os.path.join(log_folder, f"server-{run + 1}.log")
            runs.append(run_sweep(run, args.rate_list, args, Server(command, port, log_path), redis))
    except BenchError as error:
        failed = True
        print(f"bench failed: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted: stopping the server and Redis", file=sys.stderr)
    finally:
        redis.cleanup()

    if runs and any(runs):
        medians = median_steps(runs)
        title = f"median of {len(runs)} runs" if len(runs) > 1 else "result"
        print(f"\n{title}:\n{format_header()}")
        for step in medians:
            print(format_row(step))
        best = highest_no_loss_rate(medians)
        print(f"highest no-loss rate (<{NO_LOSS_PERCENT:g} % loss): {f'{best:.0f}/s' if best else 'none of the offered rates'}")

        if args.json:
            with open(args.json, "w", encoding="utf-8") as json_file:
                json.dump(
                    {
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "cpus": os.cpu_count(),
                        "python": sys.version.split()[0],
                        "server_command": shlex.join(build_server_command(args, 0, 0)),
                        "seconds": args.seconds,
                        "runs": runs,
                        "median": medians,
                        "highest_no_loss_rate": best,
                    },
                    json_file,
                    indent=2,
                )
            print(f"saved to {args.json}")

    if failed:
        print(f"server logs kept in {log_folder}", file=sys.stderr)
        sys.exit(1)
    for name in os.listdir(log_folder):
        os.remove(os.path.join(log_folder, name))
    os.rmdir(log_folder)


if __name__ == "__main__":
    main()
