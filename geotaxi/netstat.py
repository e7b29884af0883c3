"""
Report UDP loss from the Linux kernel's counters, without net-tools.

Two sources, both plain text under /proc:

- /proc/net/snmp (and /proc/net/snmp6 for IPv6): counters of the whole
  network namespace. ``RcvbufErrors`` counts datagrams dropped because a
  socket's receive buffer was full, ``NoPorts`` datagrams sent to a port
  where nothing listens, ``InErrors`` all datagrams that were not delivered
  (``RcvbufErrors`` and checksum errors included).
- /proc/net/udp and /proc/net/udp6: one line per socket, with its local
  address, its receive queue in bytes, its inode and its ``drops`` column,
  the datagrams this socket lost because its buffer was full.

``socket_drops()`` reads the ``drops`` column of one socket (by inode) or of
every socket bound to a port. The server uses it for its ``kernel_drops``
counter. ``geotaxi-netstat`` prints the counters once, or their changes
every second with ``--watch``.
"""

import argparse
import ipaddress
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

SNMP_PATH = "/proc/net/snmp"
SNMP6_PATH = "/proc/net/snmp6"
UDP_TABLE_PATHS = ("/proc/net/udp", "/proc/net/udp6")

# Counters printed first because they are the ones that show loss.
LOSS_COUNTERS = ("InDatagrams", "RcvbufErrors", "InErrors", "NoPorts", "MemErrors")

# The --watch loop prints one line a second, so this bounds its duration.
MAX_WATCH_SECONDS = 24 * 3600


@dataclass(frozen=True)
class UdpSocket:
    """One line of /proc/net/udp or /proc/net/udp6."""

    local_address: str
    local_port: int
    rx_queue: int
    inode: int
    drops: int


def udp_snmp(path=SNMP_PATH):
    """
    Parse the ``Udp:`` counters of /proc/net/snmp into a dict of name to int.

    The file contains two lines per protocol, a header line of names and a
    line of values. Raise ValueError when the file has no ``Udp:`` pair.
    """
    with open(path, encoding="ascii") as snmp_file:
        udp_lines = [line.split() for line in snmp_file if line.startswith("Udp:")]

    if len(udp_lines) < 2:
        raise ValueError(f"no Udp: counters found in {path}")
    names, values = udp_lines[0][1:], udp_lines[1][1:]
    return dict(zip(names, (int(value) for value in values)))


def udp6_snmp(path=SNMP6_PATH):
    """
    Parse the ``Udp6*`` counters of /proc/net/snmp6 into a dict keyed by the
    same names as ``udp_snmp()`` (``Udp6RcvbufErrors`` becomes ``RcvbufErrors``).
    Return an empty dict when IPv6 is disabled and the file does not exist.
    """
    try:
        with open(path, encoding="ascii") as snmp6_file:
            lines = [line.split() for line in snmp6_file]
    except FileNotFoundError:
        return {}

    counters = {}
    for fields in lines:
        if len(fields) == 2 and fields[0].startswith("Udp6"):
            counters[fields[0].removeprefix("Udp6")] = int(fields[1])
    return counters


def decode_address(hex_address):
    """
    Decode an address of /proc/net/udp{,6} such as ``0100007F:1F90``.

    The kernel prints the address as 32-bit words in host byte order and the
    port as a big-endian number, both in hex. Return (address text, port).
    """
    hex_host, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(hex_port, 16)


def parse_udp_table(text):
    """
    Parse the text of /proc/net/udp or /proc/net/udp6 into UdpSocket rows.

    Columns are read by position because the header does not split like the
    rows ("tx_queue rx_queue" is one ``tx:rx`` column in a row): 1 local
    address, 4 queues, 9 inode, 12 drops.
    """
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 13:
            continue
        address, port = decode_address(fields[1])
        rx_queue = int(fields[4].split(":")[1], 16)
        sockets.append(UdpSocket(address, port, rx_queue, int(fields[9]), int(fields[12])))
    return sockets


def udp_sockets(paths=UDP_TABLE_PATHS, port=None, inode=None):
    """
    Read the UDP sockets of this network namespace, IPv4 and IPv6, keeping
    those bound to ``port`` or with ``inode`` when either is given.
    A missing table (IPv6 disabled, or not Linux) counts as empty.
    """
    sockets = []
    for path in paths:
        try:
            with open(path, encoding="ascii") as table_file:
                sockets += parse_udp_table(table_file.read())
        except FileNotFoundError:
            continue

    if port is not None:
        sockets = [row for row in sockets if row.local_port == port]
    if inode is not None:
        sockets = [row for row in sockets if row.inode == inode]
    return sockets


def socket_inode(fd):
    """Return the inode of a socket, the key of its row in /proc/net/udp."""
    return os.fstat(fd).st_ino


def socket_drops(port=None, inode=None, paths=UDP_TABLE_PATHS):
    """
    Return the datagrams the kernel dropped on UDP sockets because their
    receive buffer was full: on the socket with this inode, or summed over
    every socket bound to this local port (SO_REUSEPORT workers share one).

    Return 0 when no socket matches, for example once the socket is closed
    or where /proc/net/udp does not exist, so that a caller polling its own
    socket gets no error when the socket goes away.
    """
    if port is None and inode is None:
        raise ValueError("socket_drops() needs a port or an inode")
    return sum(row.drops for row in udp_sockets(paths, port=port, inode=inode))


def take_snapshot(port=None):
    """Read every counter the report prints: SNMP totals and per-socket rows."""
    return {
        "time": time.time(),
        "udp": udp_snmp(),
        "udp6": udp6_snmp(),
        "sockets": [asdict(row) for row in udp_sockets(port=port)],
    }


def order_counters(counters):
    """Return the names of ``counters`` with the loss counters first."""
    first = [name for name in LOSS_COUNTERS if name in counters]
    return first + [name for name in counters if name not in first]


def print_snapshot(snapshot, port):
    """Print the SNMP counters and the socket rows of one snapshot."""
    for family in ("udp", "udp6"):
        counters = snapshot[family]
        if not counters:
            continue
        print(f"{family} counters:")
        for name in order_counters(counters):
            print(f"  {name}: {counters[name]}")

    where = f"on port {port}" if port is not None else "in this network namespace"
    if not snapshot["sockets"]:
        print(f"no UDP socket {where}")
        return
    print(f"UDP sockets {where}:")
    print(f"  {'address':<40} {'port':>5} {'rx_queue':>10} {'inode':>10} {'drops':>10}")
    for row in snapshot["sockets"]:
        print(
            f"  {row['local_address']:<40} {row['local_port']:>5} {row['rx_queue']:>10}"
            f" {row['inode']:>10} {row['drops']:>10}"
        )


def describe_changes(before, after):
    """
    Return one line with the changes between two snapshots: the SNMP loss
    counters, the drops summed over the selected sockets, and their current
    receive queue in bytes.
    """
    parts = []
    for family in ("udp", "udp6"):
        for name in LOSS_COUNTERS:
            if name in after[family] and name in before[family]:
                change = after[family][name] - before[family][name]
                parts.append(f"{family}.{name} {change:+d}")

    drops_change = sum(row["drops"] for row in after["sockets"]) - sum(row["drops"] for row in before["sockets"])
    rx_queue = sum(row["rx_queue"] for row in after["sockets"])
    parts.append(f"socket drops {drops_change:+d}")
    parts.append(f"rx_queue {rx_queue} B")
    return ", ".join(parts)


def watch(port, seconds, interval=1.0):
    """
    Print the changes of the counters every ``interval`` seconds, for
    ``seconds`` in all, and then the totals over the whole watch.
    """
    start = take_snapshot(port)
    previous = start
    ticks = max(1, round(seconds / interval))
    origin = time.monotonic()

    for tick in range(1, ticks + 1):
        # Sleep to a fixed schedule, so the slow reads do not add up to drift.
        time.sleep(max(0.0, origin + tick * interval - time.monotonic()))
        current = take_snapshot(port)
        print(f"{tick * interval:6.1f} s  {describe_changes(previous, current)}", flush=True)
        previous = current

    print(f"total over {ticks * interval:.1f} s: {describe_changes(start, previous)}")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        prog="geotaxi-netstat",
        description=(
            "Print the kernel's UDP counters (/proc/net/snmp) and the drops of UDP "
            "sockets (/proc/net/udp, /proc/net/udp6). Datagrams are lost before the "
            "server reads them when RcvbufErrors, InErrors or a socket's drops increase."
        ),
    )
    parser.add_argument("--port", type=int, help="show only the sockets bound to this local UDP port")
    parser.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help=f"print the changes every second for this many seconds (at most {MAX_WATCH_SECONDS})",
    )
    parser.add_argument("--json", action="store_true", help="print one snapshot as JSON instead of text")
    args = parser.parse_args(argv)

    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"invalid --port {args.port}: expected 1 to 65535")
    if args.watch is not None and not 0 < args.watch <= MAX_WATCH_SECONDS:
        parser.error(f"invalid --watch {args.watch}: expected more than 0 and at most {MAX_WATCH_SECONDS} seconds")
    if args.watch is not None and args.json:
        parser.error("--json prints one snapshot and cannot be combined with --watch")
    return args


def main(argv=None):
    """Run the ``geotaxi-netstat`` command."""
    args = parse_arguments(argv)
    try:
        if args.json:
            print(json.dumps(take_snapshot(args.port), indent=2))
        elif args.watch is not None:
            print_snapshot(take_snapshot(args.port), args.port)
            watch(args.port, args.watch)
        else:
            print_snapshot(take_snapshot(args.port), args.port)
    except FileNotFoundError as error:
        sys.exit(f"cannot read the kernel's UDP counters: {error}. geotaxi-netstat needs Linux /proc.")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
