"""
Command-line options of the twistd plugin and of the ``geotaxi`` command.

They keep the earlier server's flags, short options and defaults. Every
option can also come from an environment variable named after it in capitals
with ``_`` for ``-``: ``REDIS_HOST`` for ``--redis-host``. The command line
wins over the environment.
"""

import os

from twisted.python import usage

# The write script passes 3 arguments a position to one GEOADD through
# unpack(), and Lua 5.1 in Redis refuses more than about 8,000.
MAX_BATCH_SIZE = 2000

TRUE_WORDS = frozenset(["1", "true", "yes", "on"])
FALSE_WORDS = frozenset(["0", "false", "no", "off", ""])


def parse_bool(text):
    """
    Return the boolean of an environment value, or raise ValueError.
    """
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of 1/true/yes/on or 0/false/no/off/empty, got {text!r}")


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} outside 0-65535")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive integer")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} is not a number above 0")
    return value


def batch_size(text):
    value = positive_int(text)
    if value > MAX_BATCH_SIZE:
        raise ValueError(f"{value} is over {MAX_BATCH_SIZE}, the largest batch the Lua script can unpack")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise ValueError(f"{text} is not a non-negative number")
    return value


def sentinel_addresses(text):
    """
    Parse ``host:port[,host:port...]`` into a list of (host, port).
    """
    addresses = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            raise ValueError(f"expected host:port, got {item!r}")
        addresses.append((host.strip("[]"), port_number(port)))
    return addresses


port_number.coerceDoc = "A port number, 0-65535."
positive_int.coerceDoc = "A positive integer."
non_negative_float.coerceDoc = "Seconds, 0 or more."
positive_float.coerceDoc = "Seconds, above 0."
batch_size.coerceDoc = f"1 to {MAX_BATCH_SIZE}."
non_negative_int.coerceDoc = "0 or more."


class Options(usage.Options):
    """
    Options of ``twistd geotaxi`` and ``geotaxi``.
    """

    synopsis = "[options]"
    longdesc = (
        "Receive signed taxi positions as JSON over UDP, store the latest position "
        "of each taxi in Redis for the API, and forward them to Fluentd. Every option "
        "may also be set by an environment variable: REDIS_HOST for --redis-host, and so on."
    )

    optFlags = [
        ["verbose", "v", "Log every accepted position (debug level)."],
        ["disable-fluent", None, "Do not forward positions to Fluentd."],
        ["fluent-ack", None, "Request an ack of each frame from Fluentd, count records as sent only once acknowledged, and send unacknowledged ones again after reconnecting (Fluentd may get duplicates)."],
        ["auth-enabled", None, "Check each datagram's signature with its operator's API key (needs API_KEY)."],
    ]

    optParameters = [
        ["host", "h", "127.0.0.1", "Address to listen on for UDP datagrams."],
        ["port", "p", 8080, "UDP port to listen on.", port_number],
        ["workers", "w", 1, "Number of processes sharing the UDP port.", positive_int],
        ["redis-host", None, "127.0.0.1", "Redis host."],
        ["redis-port", None, 6379, "Redis port.", port_number],
        ["redis-password", None, None, "Redis password (or REDIS_PASSWORD)."],
        ["redis-db", None, 0, "Redis database number.", int],
        ["redis-sentinel", None, None, "Redis Sentinel addresses, host:port[,host:port...]."],
        ["redis-sentinel-master", None, "mymaster", "Name of the master watched by the sentinels."],
        ["redis-timeout", None, 5.0, "Seconds to wait for each Redis call.", positive_float],
        ["queue-size", None, 100_000, "Positions that may wait for Redis before new ones are dropped.", positive_int],
        ["batch-size", None, 1000, "Positions written to Redis per round trip, at most.", batch_size],
        ["fluent-host", None, "127.0.0.1", "Fluentd host."],
        ["fluent-port", None, 24224, "Fluentd forward port.", port_number],
        ["fluent-buffer", None, 100_000, "Records that may wait for Fluentd before new ones are dropped.", positive_int],
        ["api-url", None, "http://127.0.0.1:5000", "Base URL of the taxi API, for the operators' keys."],
        ["auth-refresh", None, 300.0, "Seconds between reloads of the operators' keys.", non_negative_float],
        ["max-future", None, 600.0, "Reject timestamps more than this many seconds ahead (0: no limit).", non_negative_float],
        ["max-age", None, 3600.0, "Reject timestamps more than this many seconds old (0: no limit).", non_negative_float],
        ["receive-buffer", None, 4 * 1024 * 1024, "SO_RCVBUF to request for the UDP socket, in bytes (0: the system default).", non_negative_int],
        ["shutdown-timeout", None, 10.0, "Seconds to write queued positions on SIGTERM before exiting.", non_negative_float],
        ["sentry-dsn", None, None, "Sentry DSN to report errors to."],
        ["metrics-port", None, None, "TCP port of the /metrics and /health HTTP endpoint, off by default", port_number],
    ]

    def __init__(self, environ=None):
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._environment_errors = []
        self._read_environment()

    def opt_fluentd_host(self, host):
        """
        Alias of --fluent-host.
        """
        self["fluent-host"] = host

    def _read_environment(self):
        coercers = {name: coerce for name, _, _, _, coerce in _parameters(self.optParameters)}
        for name, coerce in coercers.items():
            variable = name.upper().replace("-", "_")
            if variable not in self._environ:
                continue
            text = self._environ[variable]
            try:
                self[name] = coerce(text) if coerce else text
            except ValueError as error:
                self._environment_errors.append(f"invalid {variable}={text!r}: {error}")

        for flag in self.optFlags:
            name = flag[0]
            variable = name.upper().replace("-", "_")
            if variable not in self._environ:
                continue
            try:
                self[name] = 1 if parse_bool(self._environ[variable]) else 0
            except ValueError as error:
                self._environment_errors.append(f"invalid {variable}: {error}")

        if "FLUENTD_HOST" in self._environ and "FLUENT_HOST" not in self._environ:
            self["fluent-host"] = self._environ["FLUENTD_HOST"]

    def postOptions(self):
        if self._environment_errors:
            raise usage.UsageError("; ".join(self._environment_errors))

        if self["redis-sentinel"]:
            try:
                self["redis-sentinel"] = sentinel_addresses(self["redis-sentinel"])
            except ValueError as error:
                raise usage.UsageError(f"invalid --redis-sentinel (REDIS_SENTINEL): {error}") from None
            # Writing to --redis-host instead of the master the sentinels
            # name would store positions where the API does not read them.
            raise usage.UsageError(
                "--redis-sentinel (REDIS_SENTINEL) is not supported yet: "
                "point --redis-host at the Redis master instead"
            )

        if self["auth-enabled"] and not self._environ.get("API_KEY"):
            raise usage.UsageError(
                "--auth-enabled needs the API key in the API_KEY environment variable "
                "(the key that may read the API's /users/ list)"
            )
        self["api-key"] = self._environ.get("API_KEY", "")


def _parameters(parameters):
    for parameter in parameters:
        name, short, default, description = parameter[:4]
        coerce = parameter[4] if len(parameter) > 4 else None
        yield name, short, default, description, coerce
