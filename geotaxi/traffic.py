"""
Generate taxi position datagrams for geotaxi, to test or benchmark a server.

It keeps the options of the earlier geotaxi-python ``scripts/generate-traffic.py``
(``num``, ``--host``, ``--port``, ``-s/--sleep``, ``--api-key``,
``--operator``) and adds a fleet of taxis moving around Paris, a target rate
paced in small bursts, a duration, and the variants a benchmark needs.

Every datagram carries the nine fields with valid values. With ``--api-key``
it is signed as the server checks it: the lowercase hex SHA-1 of
``timestamp operator taxi lat lon device status version`` and the key
concatenated, each field as written in the JSON text. Without a key the hash
is 40 random hex digits, well-formed but matching no operator, as the
earlier script's signature with a random key was.
"""

import argparse
import hashlib
import ipaddress
import json
import math
import os
import random
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass

DEFAULT_OPERATOR = "fake_operator"
DEVICE = "phone"
VERSION = 2
STATUSES = ("free", "occupied", "off")

# Paris inside the ring road, in degrees: taxis bounce off these edges.
PARIS_LAT = (48.816, 48.902)
PARIS_LON = (2.253, 2.415)
METRES_PER_DEGREE_LAT = 111_320.0

# Each position moves a taxi this many metres, in a heading that changes now
# and then, so consecutive positions of a taxi look like a car in a street.
STEP_METRES = (2.0, 15.0)
TURN_PROBABILITY = 0.1
STATUS_CHANGE_PROBABILITY = 0.01

# Bursts last at most this long at the target rate: small enough that the
# offered rate is smooth at the scale of a receive buffer, large enough that
# the sleeps between bursts cost little.
BURST_SECONDS = 0.002
MAX_BURST = 1000

UNSIGNED_HASH_POOL = 256

MAX_TAXIS = 1_000_000
MAX_SOCKETS = 1024

# The same character rules as the server's schema: no whitespace, no ':' and
# no control characters, because the API splits stored values on them.
OPERATOR_PATTERN = re.compile(r"[^\s:\x00-\x1f\x7f]{1,254}")


@dataclass
class TrafficReport:
    """
    Outcome of one run: datagrams sent, wall time, failed sends and the seed
    used. A datagram whose send() failed is not in ``sent``.
    """

    sent: int
    seconds: float
    errors: int = 0
    first_error: str = ""
    seed: int = 0

    @property
    def rate(self):
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class Fleet:
    """
    Taxis moving around Paris, each with a stable id (a UUID drawn from the
    random generator), a position, a heading and a status.
    """

    def __init__(self, size, rng):
        self.rng = rng
        self.ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(size)]
        self.lats = [rng.uniform(*PARIS_LAT) for _ in range(size)]
        self.lons = [rng.uniform(*PARIS_LON) for _ in range(size)]
        self.statuses = [rng.choice(STATUSES) for _ in range(size)]
        self.dlats = [0.0] * size
        self.dlons = [0.0] * size
        for index in range(size):
            self.turn(index)

    def turn(self, index):
        """Give taxi ``index`` a new heading and speed, as a step in degrees."""
        heading = self.rng.uniform(0.0, 2.0 * math.pi)
        metres = self.rng.uniform(*STEP_METRES)
        self.dlats[index] = metres * math.cos(heading) / METRES_PER_DEGREE_LAT
        self.dlons[index] = metres * math.sin(heading) / (METRES_PER_DEGREE_LAT * math.cos(math.radians(self.lats[index])))

    def move(self, index):
        """Move taxi ``index`` one step and return its (lat, lon, status)."""
        # One random draw decides both rare events, which keeps a step cheap.
        draw = self.rng.random()
        if draw < TURN_PROBABILITY:
            self.turn(index)
        elif draw > 1.0 - STATUS_CHANGE_PROBABILITY:
            self.statuses[index] = self.rng.choice(STATUSES)

        lat = self.lats[index] + self.dlats[index]
        if not PARIS_LAT[0] <= lat <= PARIS_LAT[1]:
            self.dlats[index] = -self.dlats[index]
            lat = self.lats[index] + self.dlats[index]
        lon = self.lons[index] + self.dlons[index]
        if not PARIS_LON[0] <= lon <= PARIS_LON[1]:
            self.dlons[index] = -self.dlons[index]
            lon = self.lons[index] + self.dlons[index]

        self.lats[index] = lat
        self.lons[index] = lon
        return lat, lon, self.statuses[index]


def format_coordinate(value):
    """
    Write a coordinate with at most 6 decimals (0.1 m) and no trailing zero,
    which is also ``str(float(text))`` of the result, the text the earlier
    server signed. Paris coordinates are never whole numbers, so the text
    never ends with a bare ".".
    """
    return ("%.6f" % value).rstrip("0")


def signature(timestamp, operator, taxi, lat, lon, device, status, version, key):
    """
    Return the lowercase hex SHA-1 of the fields and the key concatenated,
    each field given as the text written in the datagram.
    """
    text = f"{timestamp}{operator}{taxi}{lat}{lon}{device}{status}{version}{key}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class PositionGenerator:
    """
    Build datagrams for a fleet from a text template, which costs a few
    microseconds each where ``json.dumps`` of a dict would cost more.
    """

    def __init__(
        self,
        taxis=1,
        operator=DEFAULT_OPERATOR,
        api_key=None,
        numbers_as_strings=False,
        unique_ids=False,
        seed=None,
    ):
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "big")
        rng = random.Random(self.seed)
        self.fleet = Fleet(taxis, rng)
        self.operator = operator
        self.api_key = api_key
        self.unique_ids = unique_ids
        self.unique_prefix = f"{rng.getrandbits(48):012x}"
        self.sequence = 0

        # Without a key no hash can match, so random ones from a pool save
        # the SHA-1 of every datagram.
        self.unsigned_hashes = [f"{rng.getrandbits(160):040x}" for _ in range(UNSIGNED_HASH_POOL)]

        # Numbers are written bare or in quotes, and the hash uses the same
        # text. json.dumps escapes the operator should it hold a quote or a
        # backslash, while the hash uses its decoded value.
        quote = '"' if numbers_as_strings else ""
        self.template = (
            f'{{"taxi": "%s", "operator": {json.dumps(operator, ensure_ascii=False)}, '
            f'"lat": {quote}%s{quote}, "lon": {quote}%s{quote}, '
            f'"timestamp": {quote}%s{quote}, "status": "%s", "device": "{DEVICE}", '
            f'"version": {quote}{VERSION}{quote}, "hash": "%s"}}'
        )

    def batch(self, count, timestamp=None):
        """
        Return ``count`` datagrams as bytes, each a new position of the next
        taxi in turn. ``timestamp`` defaults to the clock, in whole seconds.
        """
        if timestamp is None:
            timestamp = int(time.time())
        timestamp_text = str(timestamp)
        fleet = self.fleet
        size = len(fleet.ids)
        operator, api_key, template = self.operator, self.api_key, self.template
        datagrams = []

        for _ in range(count):
            sequence = self.sequence
            self.sequence += 1
            index = sequence % size
            taxi = f"{self.unique_prefix}-{sequence}" if self.unique_ids else fleet.ids[index]

            lat, lon, status = fleet.move(index)
            lat_text = format_coordinate(lat)
            lon_text = format_coordinate(lon)
            if api_key:
                digest = signature(timestamp_text, operator, taxi, lat_text, lon_text, DEVICE, status, VERSION, api_key)
            else:
                digest = self.unsigned_hashes[sequence % UNSIGNED_HASH_POOL]

            datagrams.append((template % (taxi, lat_text, lon_text, timestamp_text, status, digest)).encode("utf-8"))
        return datagrams


def resolve_destination(host, port, allow_remote=False):
    """
    Resolve ``host`` to the (family, address) the datagrams go to. Raise
    ValueError for an address outside loopback unless ``allow_remote``,
    because a load test sent by mistake to a production server would
    overwrite real taxi positions.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve host {host!r}: {error}") from error

    ip = ipaddress.ip_address(address[0].split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback and not allow_remote:
        raise ValueError(
            f"host {host!r} resolves to {ip}, outside loopback: "
            "pass --allow-remote to send traffic to another machine"
        )
    return family, address


def open_sockets(family, address, count):
    """Open ``count`` UDP sockets connected to ``address``, each with its own source port."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.connect(address)
        sockets.append(sock)
    return sockets


def send_traffic(
    host="127.0.0.1",
    port=8080,
    count=None,
    *,
    rate=None,
    sleep=0.0,
    duration=None,
    taxis=1,
    unique_ids=False,
    numbers_as_strings=False,
    api_key=None,
    operator=DEFAULT_OPERATOR,
    seed=None,
    sockets=1,
    allow_remote=False,
):
    """
    Send positions to ``host:port`` and return a TrafficReport.

    Stop after ``count`` datagrams or ``duration`` seconds, whichever comes
    first. At least one of the two is required.

    With ``rate``, send in bursts of at most 2 ms of traffic, on a schedule
    that catches up after a stall, so the average rate stays on target.
    Without it, sleep ``sleep`` seconds after each datagram, or send as fast
    as possible when ``sleep`` is 0.
    Several ``sockets`` spread the datagrams over source ports, which is what
    lets SO_REUSEPORT hand them to several server processes.
    """
    if count is None and duration is None:
        raise ValueError("send_traffic() needs a count or a duration")
    family, address = resolve_destination(host, port, allow_remote)
    generator = PositionGenerator(taxis, operator, api_key, numbers_as_strings, unique_ids, seed)
    connected = open_sockets(family, address, sockets)
    try:
        return _send_loop(generator, connected, count, rate, sleep, duration)
    finally:
        for sock in connected:
            sock.close()


def _send_loop(generator, sockets, count, rate, sleep, duration):
    limit = count if count is not None else math.inf
    max_burst = max(1, min(MAX_BURST, round(rate * BURST_SECONDS))) if rate else MAX_BURST
    senders = [sock.send for sock in sockets]
    report = TrafficReport(sent=0, seconds=0.0, seed=generator.seed)
    # Attempts, failed sends included, so that count bounds the work.
    attempts = 0

    start = time.monotonic()
    deadline = start + duration if duration is not None else math.inf
    while attempts < limit:
        now = time.monotonic()
        if now >= deadline:
            break

        if rate:
            # Datagram k is due at start + k / rate: send every due one.
            burst = min(int((now - start) * rate) + 1 - attempts, max_burst)
            if burst <= 0:
                time.sleep(min(start + attempts / rate, deadline) - now)
                continue
        elif sleep:
            burst = 1
        else:
            burst = max_burst
        burst = int(min(burst, limit - attempts))

        for datagram in generator.batch(burst):
            try:
                senders[attempts % len(senders)](datagram)
            except OSError as error:
                # On a connected socket, an ICMP "port unreachable" for an
                # earlier datagram fails a later send, which then sends
                # nothing (seen on Linux 6). Keep going: a server that starts
                # late still gets the rest.
                report.errors += 1
                report.first_error = report.first_error or f"{type(error).__name__}: {error}"
            attempts += 1

        if sleep and not rate:
            time.sleep(max(0.0, min(sleep, deadline - time.monotonic())))

    report.sent = attempts - report.errors
    report.seconds = time.monotonic() - start
    return report


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        prog="geotaxi-traffic",
        description="Send taxi positions as UDP datagrams to a geotaxi server, to test or benchmark it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "num",
        type=int,
        nargs="?",
        help="number of datagrams to send (default: 1, or no limit when --duration is given)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="geotaxi host")
    parser.add_argument("--port", type=int, default=8080, help="geotaxi UDP port")
    parser.add_argument(
        "-s",
        "--sleep",
        type=float,
        help="seconds to sleep after each datagram, when no --rate is given (default: 0.001, as the earlier script)",
    )
    parser.add_argument("--api-key", help="API key of --operator, to sign datagrams for a server with authentication enabled")
    parser.add_argument(
        "--operator",
        default=DEFAULT_OPERATOR,
        help="operator, the email of the account that owns --api-key when authentication is enabled",
    )
    parser.add_argument(
        "--taxis",
        type=int,
        default=1,
        help=(
            "fleet size: taxis with stable ids moving around Paris, sending in turn. The server "
            "keeps at most one position per taxi and second and counts the others as duplicates."
        ),
    )
    parser.add_argument("--rate", type=float, help="target datagrams per second, sent in bursts of at most 2 ms")
    parser.add_argument("--duration", type=float, help="stop after this many seconds, even if fewer than num were sent")
    parser.add_argument("--unique-ids", action="store_true", help="use a new taxi id in every datagram, as benchmarks do")
    parser.add_argument(
        "--numbers-as-strings",
        action="store_true",
        help="write lat, lon, timestamp and version as JSON strings, as the earlier script did",
    )
    parser.add_argument("--seed", type=int, help="seed of the fleet's ids, positions and moves (default: random)")
    parser.add_argument(
        "--sockets",
        type=int,
        default=1,
        help="send from this many sockets, one source port each, so SO_REUSEPORT spreads them over server workers",
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow a --host outside loopback")
    args = parser.parse_args(argv)

    check_arguments(parser, args)
    return args


def check_arguments(parser, args):
    """Exit with a usage error on an invalid value, naming the option."""
    if args.num is not None and args.num < 1:
        parser.error(f"invalid num {args.num}: expected at least 1")
    if not 0 < args.port < 65536:
        parser.error(f"invalid --port {args.port}: expected 1 to 65535")
    if args.sleep is not None and args.sleep < 0:
        parser.error(f"invalid --sleep {args.sleep}: expected 0 or more seconds")
    if args.sleep is not None and args.rate is not None:
        parser.error("--sleep and --rate both set the pace: pass only one of them")
    if args.rate is not None and not 0 < args.rate < math.inf:
        parser.error(f"invalid --rate {args.rate}: expected a positive number of datagrams per second")
    if args.duration is not None and not 0 < args.duration < math.inf:
        parser.error(f"invalid --duration {args.duration}: expected a positive number of seconds")
    if not 1 <= args.taxis <= MAX_TAXIS:
        parser.error(f"invalid --taxis {args.taxis}: expected 1 to {MAX_TAXIS}")
    if not 1 <= args.sockets <= MAX_SOCKETS:
        parser.error(f"invalid --sockets {args.sockets}: expected 1 to {MAX_SOCKETS}")
    if not OPERATOR_PATTERN.fullmatch(args.operator):
        parser.error(
            f"invalid --operator {args.operator!r}: expected 1 to 254 characters "
            "without whitespace, ':' or control characters"
        )


def warn_duplicates(args, sleep):
    """
    Print a note on stderr when each taxi would send more than one position
    a second, because the server then rejects the extra ones as duplicates.
    """
    expected_rate = args.rate or (1.0 / sleep if sleep else math.inf)
    if not args.unique_ids and expected_rate / args.taxis > 1.0:
        print(
            f"note: {args.taxis} taxi(s) at up to {expected_rate:g} datagrams/s send more than one position "
            "per taxi and second. The server stores one and rejects the others as duplicates. "
            "Use --taxis or --unique-ids to send only new positions.",
            file=sys.stderr,
        )


def main(argv=None):
    """Run the ``geotaxi-traffic`` command."""
    args = parse_arguments(argv)
    # Without num, the earlier script sent one datagram. With --duration,
    # the duration alone bounds the run.
    count = args.num
    if count is None and args.duration is None:
        count = 1

    # The earlier script slept 1 ms after each datagram by default.
    sleep = args.sleep
    if sleep is None:
        sleep = 0.0 if args.rate else 0.001
    if count is None or count > args.taxis:
        warn_duplicates(args, sleep)

    try:
        report = send_traffic(
            args.host,
            args.port,
            count,
            rate=args.rate,
            sleep=sleep,
            duration=args.duration,
            taxis=args.taxis,
            unique_ids=args.unique_ids,
            numbers_as_strings=args.numbers_as_strings,
            api_key=args.api_key,
            operator=args.operator,
            seed=args.seed,
            sockets=args.sockets,
            allow_remote=args.allow_remote,
        )
    except ValueError as error:
        sys.exit(f"geotaxi-traffic: {error}")
    except KeyboardInterrupt:
        sys.exit(130)

    target = f" (target {args.rate:g}/s)" if args.rate else ""
    print(
        f"sent {report.sent} datagrams to {args.host}:{args.port} in {report.seconds:.3f} s: "
        f"{report.rate:.0f}/s{target}, seed {report.seed}"
    )
    if report.errors:
        print(
            f"{report.errors} more datagrams failed to send, the first with {report.first_error}. "
            f"A refused connection means that nothing listens on UDP port {args.port}.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
