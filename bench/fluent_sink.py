"""
Receive Fluentd Forward-protocol records on 127.0.0.1 and count them, for
the benchmark's ``--fluent`` mode, since Fluentd itself is not installed.

It decodes Message, Forward and PackedForward frames (PackedForward
optionally gzip-compressed) with ``msgpack.Unpacker``, as Fluentd's
in_forward does, and keeps only counts, so that memory stays flat however
many records arrive. It acks a frame that carries a ``chunk`` option.

Output on stdout, one line each:

- ``port N`` once listening;
- ``records=R frames=F errors=E connections=C`` on SIGUSR1 and at exit.

Run it as ``python bench/fluent_sink.py [--port N]``; SIGTERM or SIGINT
ends it.
"""

import argparse
import asyncio
import gzip
import signal
import sys

import msgpack


class Counts:
    """Records, frames, invalid frames and open connections seen so far."""

    def __init__(self):
        self.records = 0
        self.frames = 0
        self.errors = 0
        self.connections = 0

    def line(self):
        return f"records={self.records} frames={self.frames} errors={self.errors} connections={self.connections}"


def count_packed_entries(packed, options):
    """Count the ``[time, record]`` entries of a PackedForward frame's binary."""
    if isinstance(options, dict) and options.get("compressed") == "gzip":
        packed = gzip.decompress(packed)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(packed)
    return sum(1 for _ in unpacker)


def count_frame_records(frame):
    """
    Return ``(record count, options)`` of a Message, Forward or
    PackedForward frame. Raise ValueError for any other frame.
    """
    if not isinstance(frame, (list, tuple)) or len(frame) < 2 or not isinstance(frame[0], str):
        raise ValueError("expected an array that starts with a string tag")

    # Forward mode: [tag, [[time, record], ...], options?]
    if isinstance(frame[1], (list, tuple)):
        options = frame[2] if len(frame) > 2 else None
        return len(frame[1]), options

    # PackedForward mode: [tag, bin of concatenated [time, record], options?]
    if isinstance(frame[1], bytes):
        options = frame[2] if len(frame) > 2 else None
        return count_packed_entries(frame[1], options), options

    # Message mode: [tag, time, record, options?]
    if len(frame) < 3:
        raise ValueError("Message-mode frame is missing its time or record")
    options = frame[3] if len(frame) > 3 else None
    return 1, options


class ForwardCounter(asyncio.Protocol):
    """One client connection: decode its frames as they arrive and count their records."""

    def __init__(self, counts):
        self.counts = counts
        self.transport = None
        # EventTime (ext type 0) stays an ExtType: only the count matters.
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    def connection_made(self, transport):
        self.transport = transport
        self.counts.connections += 1

    def data_received(self, data):
        self.unpacker.feed(data)
        try:
            for frame in self.unpacker:
                self.handle_frame(frame)
        except (msgpack.UnpackException, ValueError) as error:
            # The stream cannot be resynchronised after invalid msgpack.
            self.counts.errors += 1
            print(f"closing a connection after invalid msgpack: {error}", file=sys.stderr, flush=True)
            self.transport.close()

    def handle_frame(self, frame):
        try:
            records, options = count_frame_records(frame)
        except (ValueError, OSError, EOFError) as error:
            self.counts.errors += 1
            print(f"invalid frame {frame!r:.200}: {error}", file=sys.stderr, flush=True)
            return

        self.counts.frames += 1
        self.counts.records += records
        # Fluentd replies to a "chunk" option with an ack of the same id.
        if isinstance(options, dict) and "chunk" in options:
            self.transport.write(msgpack.packb({"ack": options["chunk"]}))

    def connection_lost(self, error):
        self.counts.connections -= 1


def print_counts(counts):
    print(counts.line(), flush=True)


async def serve(port):
    """Listen on 127.0.0.1, print the port, and count records until SIGTERM or SIGINT."""
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ForwardCounter(counts), "127.0.0.1", port)

    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, print_counts, counts)
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)

    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    await stopping.wait()

    server.close()
    print_counts(counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Count Fluentd Forward-protocol records received on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="TCP port to listen on (0: a free port)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"invalid --port {args.port}: expected 0 to 65535")
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
