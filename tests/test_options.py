"""
Unit tests of the command-line options and their environment variables.

Every test passes its own ``environ`` so that the variables of the shell
running the tests never leak into the options.
"""

import io
import sys

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from geotaxi.options import Options, parse_bool, sentinel_addresses


def parse(arguments=(), environ=None):
    """
    Return Options parsed from ``arguments`` with ``environ`` (empty by default).
    """
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(list(arguments))
    return options


def usage_error(arguments=(), environ=None):
    """
    Return the message of the UsageError that parsing raises.
    """
    options = Options(environ={} if environ is None else environ)
    try:
        options.parseOptions(list(arguments))
    except usage.UsageError as error:
        return str(error)
    raise AssertionError(f"no UsageError for {list(arguments)} with {environ}")


class DefaultTests(SynchronousTestCase):
    """
    Defaults are those of the earlier server.
    """

    def setUp(self):
        self.options = parse()

    def test_host(self):
        """
        The UDP host defaults to the loopback address.
        """
        self.assertEqual(self.options["host"], "127.0.0.1")

    def test_port(self):
        """
        The UDP port defaults to 8080, as an integer.
        """
        self.assertEqual(self.options["port"], 8080)

    def test_workers(self):
        """
        One worker process by default.
        """
        self.assertEqual(self.options["workers"], 1)

    def test_redis_address(self):
        """
        Redis defaults to 127.0.0.1:6379, database 0, no password.
        """
        self.assertEqual(self.options["redis-host"], "127.0.0.1")
        self.assertEqual(self.options["redis-port"], 6379)
        self.assertEqual(self.options["redis-db"], 0)
        self.assertIsNone(self.options["redis-password"])

    def test_api_url(self):
        """
        The API defaults to http://127.0.0.1:5000.
        """
        self.assertEqual(self.options["api-url"], "http://127.0.0.1:5000")

    def test_fluent_address(self):
        """
        Fluentd defaults to 127.0.0.1:24224.
        """
        self.assertEqual(self.options["fluent-host"], "127.0.0.1")
        self.assertEqual(self.options["fluent-port"], 24224)

    def test_flags_off(self):
        """
        Verbose, disable-fluent and auth-enabled are off by default.
        """
        self.assertFalse(self.options["verbose"])
        self.assertFalse(self.options["disable-fluent"])
        self.assertFalse(self.options["auth-enabled"])

    def test_sentry_off(self):
        """
        No Sentry DSN and no sentinels by default.
        """
        self.assertIsNone(self.options["sentry-dsn"])
        self.assertIsNone(self.options["redis-sentinel"])

    def test_limits(self):
        """
        Queue size 100000, timestamp window 600 s ahead and 3600 s behind,
        shutdown timeout 10 s and key refresh 300 s.
        """
        self.assertEqual(self.options["queue-size"], 100_000)
        self.assertEqual(self.options["max-future"], 600)
        self.assertEqual(self.options["max-age"], 3600)
        self.assertEqual(self.options["shutdown-timeout"], 10)
        self.assertEqual(self.options["auth-refresh"], 300)

    def test_metrics_off(self):
        """
        The metrics endpoint is off by default.
        """
        self.assertIsNone(self.options["metrics-port"])


class FlagTests(SynchronousTestCase):
    """
    Command-line flags, short and long.
    """

    def test_short_host(self):
        """
        -h sets the host, as in the earlier server.
        """
        self.assertEqual(parse(["-h", "0.0.0.0"])["host"], "0.0.0.0")

    def test_long_host(self):
        """
        --host sets the host.
        """
        self.assertEqual(parse(["--host", "::1"])["host"], "::1")

    def test_short_port(self):
        """
        -p sets the port as an integer.
        """
        self.assertEqual(parse(["-p", "9000"])["port"], 9000)

    def test_long_port(self):
        """
        --port sets the port as an integer.
        """
        self.assertEqual(parse(["--port=9001"])["port"], 9001)

    def test_short_workers(self):
        """
        -w sets the number of workers.
        """
        self.assertEqual(parse(["-w", "4"])["workers"], 4)

    def test_short_verbose(self):
        """
        -v turns verbose logging on.
        """
        self.assertTrue(parse(["-v"])["verbose"])

    def test_long_verbose(self):
        """
        --verbose turns verbose logging on.
        """
        self.assertTrue(parse(["--verbose"])["verbose"])

    def test_redis_flags(self):
        """
        --redis-host, --redis-port, --redis-password and --redis-db set the
        Redis connection.
        """
        options = parse([
            "--redis-host", "redis.internal",
            "--redis-port", "6380",
            "--redis-password", "s3cret",
            "--redis-db", "2",
        ])
        self.assertEqual(options["redis-host"], "redis.internal")
        self.assertEqual(options["redis-port"], 6380)
        self.assertEqual(options["redis-password"], "s3cret")
        self.assertEqual(options["redis-db"], 2)

    def test_fluent_flags(self):
        """
        --fluent-host and --fluent-port set the Fluentd address.
        """
        options = parse(["--fluent-host", "fluentd", "--fluent-port", "24225"])
        self.assertEqual(options["fluent-host"], "fluentd")
        self.assertEqual(options["fluent-port"], 24225)

    def test_fluentd_host_alias(self):
        """
        --fluentd-host is an alias of --fluent-host.
        """
        self.assertEqual(parse(["--fluentd-host", "fluentd"])["fluent-host"], "fluentd")

    def test_disable_fluent(self):
        """
        --disable-fluent turns forwarding off.
        """
        self.assertTrue(parse(["--disable-fluent"])["disable-fluent"])

    def test_api_url(self):
        """
        --api-url sets the API's base URL.
        """
        self.assertEqual(parse(["--api-url", "https://api.example.org"])["api-url"], "https://api.example.org")

    def test_sentry_dsn(self):
        """
        --sentry-dsn sets the Sentry DSN.
        """
        dsn = "https://key@sentry.example.org/1"
        self.assertEqual(parse(["--sentry-dsn", dsn])["sentry-dsn"], dsn)

    def test_invalid_port(self):
        """
        A port that is not a number is a UsageError.
        """
        self.assertRaises(usage.UsageError, parse, ["-p", "http"])

    def test_port_out_of_range(self):
        """
        A port above 65535 is a UsageError.
        """
        self.assertRaises(usage.UsageError, parse, ["-p", "65536"])

    def test_zero_workers(self):
        """
        Zero workers is a UsageError.
        """
        self.assertRaises(usage.UsageError, parse, ["-w", "0"])

    def test_negative_timeout(self):
        """
        A negative shutdown timeout is a UsageError.
        """
        self.assertRaises(usage.UsageError, parse, ["--shutdown-timeout", "-1"])

    def test_help(self):
        """
        --help prints the usage with every flag of the earlier server and
        exits with status 0.
        """
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        with self.assertRaises(SystemExit) as raised:
            parse(["--help"])
        self.assertEqual(raised.exception.code, 0)
        text = output.getvalue()
        for flag in ("-h, --host", "-p, --port", "-w, --workers", "-v, --verbose", "--redis-host",
                     "--redis-port", "--redis-password", "--disable-fluent", "--fluent-host",
                     "--fluent-port", "--auth-enabled", "--api-url", "--sentry-dsn"):
            self.assertIn(flag, text)


class EnvironmentTests(SynchronousTestCase):
    """
    Every option can come from an environment variable.
    """

    def test_host(self):
        """
        HOST sets the host.
        """
        self.assertEqual(parse(environ={"HOST": "0.0.0.0"})["host"], "0.0.0.0")

    def test_port(self):
        """
        PORT sets the port as an integer.
        """
        self.assertEqual(parse(environ={"PORT": "9000"})["port"], 9000)

    def test_workers(self):
        """
        WORKERS sets the number of workers as an integer.
        """
        self.assertEqual(parse(environ={"WORKERS": "3"})["workers"], 3)

    def test_redis_host(self):
        """
        REDIS_HOST sets the Redis host.
        """
        self.assertEqual(parse(environ={"REDIS_HOST": "redis"})["redis-host"], "redis")

    def test_redis_port(self):
        """
        REDIS_PORT sets the Redis port as an integer.
        """
        self.assertEqual(parse(environ={"REDIS_PORT": "6380"})["redis-port"], 6380)

    def test_redis_password(self):
        """
        REDIS_PASSWORD sets the Redis password.
        """
        self.assertEqual(parse(environ={"REDIS_PASSWORD": "s3cret"})["redis-password"], "s3cret")

    def test_fluent_host(self):
        """
        FLUENT_HOST sets the Fluentd host.
        """
        self.assertEqual(parse(environ={"FLUENT_HOST": "fluentd"})["fluent-host"], "fluentd")

    def test_fluentd_host(self):
        """
        FLUENTD_HOST, the alias, sets the Fluentd host too.
        """
        self.assertEqual(parse(environ={"FLUENTD_HOST": "fluentd"})["fluent-host"], "fluentd")

    def test_fluent_host_over_alias(self):
        """
        FLUENT_HOST wins over FLUENTD_HOST when both are set.
        """
        options = parse(environ={"FLUENT_HOST": "primary", "FLUENTD_HOST": "alias"})
        self.assertEqual(options["fluent-host"], "primary")

    def test_fluent_port(self):
        """
        FLUENT_PORT sets the Fluentd port as an integer.
        """
        self.assertEqual(parse(environ={"FLUENT_PORT": "24225"})["fluent-port"], 24225)

    def test_api_url(self):
        """
        API_URL sets the API's base URL.
        """
        self.assertEqual(parse(environ={"API_URL": "https://api.example.org"})["api-url"], "https://api.example.org")

    def test_sentry_dsn(self):
        """
        SENTRY_DSN sets the Sentry DSN.
        """
        dsn = "https://key@sentry.example.org/1"
        self.assertEqual(parse(environ={"SENTRY_DSN": dsn})["sentry-dsn"], dsn)

    def test_disable_fluent(self):
        """
        DISABLE_FLUENT=1 turns forwarding off.
        """
        self.assertTrue(parse(environ={"DISABLE_FLUENT": "1"})["disable-fluent"])

    def test_verbose(self):
        """
        VERBOSE=true turns verbose logging on.
        """
        self.assertTrue(parse(environ={"VERBOSE": "true"})["verbose"])

    def test_auth_enabled(self):
        """
        AUTH_ENABLED=yes turns authentication on, given API_KEY.
        """
        options = parse(environ={"AUTH_ENABLED": "yes", "API_KEY": "key"})
        self.assertTrue(options["auth-enabled"])

    def test_auth_enabled_false(self):
        """
        AUTH_ENABLED=false turns authentication off, where the earlier image
        turned it on.
        """
        self.assertFalse(parse(environ={"AUTH_ENABLED": "false"})["auth-enabled"])

    def test_api_key_stored(self):
        """
        API_KEY is read from the environment into the ``api-key`` option.
        """
        options = parse(["--auth-enabled"], environ={"API_KEY": "key"})
        self.assertEqual(options["api-key"], "key")

    def test_other_options(self):
        """
        Options beyond the earlier server's also come from the environment.
        """
        options = parse(environ={"QUEUE_SIZE": "50", "SHUTDOWN_TIMEOUT": "2.5", "REDIS_DB": "3"})
        self.assertEqual(options["queue-size"], 50)
        self.assertEqual(options["shutdown-timeout"], 2.5)
        self.assertEqual(options["redis-db"], 3)

    def test_unrelated_ignored(self):
        """
        Variables that name no option are ignored.
        """
        options = parse(environ={"HOSTNAME": "box", "PATH": "/usr/bin", "LANG": "C"})
        self.assertEqual(options["host"], "127.0.0.1")


class PrecedenceTests(SynchronousTestCase):
    """
    The command line wins over the environment.
    """

    def test_port(self):
        """
        -p wins over PORT.
        """
        self.assertEqual(parse(["-p", "9000"], environ={"PORT": "7000"})["port"], 9000)

    def test_host(self):
        """
        -h wins over HOST.
        """
        self.assertEqual(parse(["-h", "10.0.0.1"], environ={"HOST": "0.0.0.0"})["host"], "10.0.0.1")

    def test_redis_host(self):
        """
        --redis-host wins over REDIS_HOST.
        """
        options = parse(["--redis-host", "cli"], environ={"REDIS_HOST": "env"})
        self.assertEqual(options["redis-host"], "cli")

    def test_fluent_host_over_fluentd_env(self):
        """
        --fluent-host wins over FLUENTD_HOST.
        """
        options = parse(["--fluent-host", "cli"], environ={"FLUENTD_HOST": "env"})
        self.assertEqual(options["fluent-host"], "cli")

    def test_fluentd_alias_over_env(self):
        """
        --fluentd-host wins over FLUENT_HOST.
        """
        options = parse(["--fluentd-host", "cli"], environ={"FLUENT_HOST": "env"})
        self.assertEqual(options["fluent-host"], "cli")

    def test_flag_over_false(self):
        """
        -v turns verbose logging on even when VERBOSE=false.
        """
        self.assertTrue(parse(["-v"], environ={"VERBOSE": "false"})["verbose"])


class BooleanTests(SynchronousTestCase):
    """
    Boolean environment values.
    """

    def test_true_words(self):
        """
        1, true, yes and on, in any case and with surrounding spaces, are true.
        """
        for text in ("1", "true", "yes", "on", "TRUE", "Yes", "oN", " true "):
            self.assertIs(parse_bool(text), True, text)

    def test_false_words(self):
        """
        0, false, no, off and the empty string, in any case, are false.
        """
        for text in ("0", "false", "no", "off", "", "FALSE", "No", "OFF", " "):
            self.assertIs(parse_bool(text), False, text)

    def test_invalid_words(self):
        """
        Any other value raises ValueError.
        """
        for text in ("2", "y", "n", "enabled", "truee", "-1"):
            self.assertRaises(ValueError, parse_bool, text)

    def test_flags_true(self):
        """
        Each true word turns each boolean variable on.
        """
        for variable, name in (("DISABLE_FLUENT", "disable-fluent"), ("VERBOSE", "verbose")):
            for text in ("1", "TRUE", "yes", "On"):
                self.assertTrue(parse(environ={variable: text})[name], f"{variable}={text}")

    def test_flags_false(self):
        """
        Each false word, the empty value included, leaves each boolean
        variable off.
        """
        for variable, name in (
            ("DISABLE_FLUENT", "disable-fluent"),
            ("VERBOSE", "verbose"),
            ("AUTH_ENABLED", "auth-enabled"),
        ):
            for text in ("0", "False", "NO", "off", ""):
                self.assertFalse(parse(environ={variable: text})[name], f"{variable}={text}")

    def test_auth_enabled_true(self):
        """
        Each true word turns authentication on.
        """
        for text in ("1", "True", "YES", "on"):
            options = parse(environ={"AUTH_ENABLED": text, "API_KEY": "key"})
            self.assertTrue(options["auth-enabled"], f"AUTH_ENABLED={text}")


class InvalidEnvironmentTests(SynchronousTestCase):
    """
    An invalid environment value is a UsageError that names the variable.
    """

    def test_port(self):
        """
        PORT=abc is rejected and the message names PORT.
        """
        self.assertIn("PORT", usage_error(environ={"PORT": "abc"}))

    def test_port_value(self):
        """
        The message shows the invalid value.
        """
        self.assertIn("abc", usage_error(environ={"PORT": "abc"}))

    def test_port_out_of_range(self):
        """
        PORT=70000 is rejected and the message names PORT.
        """
        self.assertIn("PORT", usage_error(environ={"PORT": "70000"}))

    def test_workers(self):
        """
        WORKERS=0 is rejected and the message names WORKERS.
        """
        self.assertIn("WORKERS", usage_error(environ={"WORKERS": "0"}))

    def test_redis_port(self):
        """
        REDIS_PORT=x is rejected and the message names REDIS_PORT.
        """
        self.assertIn("REDIS_PORT", usage_error(environ={"REDIS_PORT": "x"}))

    def test_fluent_port(self):
        """
        FLUENT_PORT=x is rejected and the message names FLUENT_PORT.
        """
        self.assertIn("FLUENT_PORT", usage_error(environ={"FLUENT_PORT": "x"}))

    def test_booleans(self):
        """
        A boolean variable with another word is rejected and the message
        names that variable.
        """
        for variable in ("DISABLE_FLUENT", "VERBOSE", "AUTH_ENABLED"):
            self.assertIn(variable, usage_error(environ={variable: "maybe"}))

    def test_every_error_named(self):
        """
        With several invalid variables, the message names each of them.
        """
        message = usage_error(environ={"PORT": "abc", "VERBOSE": "maybe"})
        self.assertIn("PORT", message)
        self.assertIn("VERBOSE", message)


class AuthenticationTests(SynchronousTestCase):
    """
    --auth-enabled needs the API_KEY environment variable.
    """

    def test_missing_key(self):
        """
        --auth-enabled without API_KEY is a UsageError whose message names API_KEY.
        """
        self.assertIn("API_KEY", usage_error(["--auth-enabled"]))

    def test_empty_key(self):
        """
        An empty API_KEY counts as missing.
        """
        self.assertIn("API_KEY", usage_error(["--auth-enabled"], environ={"API_KEY": ""}))

    def test_missing_key_env(self):
        """
        AUTH_ENABLED=1 without API_KEY is the same UsageError.
        """
        self.assertIn("API_KEY", usage_error(environ={"AUTH_ENABLED": "1"}))

    def test_no_key_flag(self):
        """
        The API key is not a command-line flag.
        """
        self.assertRaises(usage.UsageError, parse, ["--api-key", "key"])

    def test_disabled_no_key(self):
        """
        Without --auth-enabled no API_KEY is needed.
        """
        self.assertEqual(parse()["api-key"], "")


class SentinelTests(SynchronousTestCase):
    """
    --redis-sentinel parses into a list of (host, port).
    """

    def test_one_address(self):
        """
        One host:port gives one pair with an integer port.
        """
        self.assertEqual(sentinel_addresses("sentinel:26379"), [("sentinel", 26379)])

    def test_several_addresses(self):
        """
        Comma-separated addresses give pairs in order, spaces ignored.
        """
        self.assertEqual(
            sentinel_addresses("s1:26379, s2:26380,s3:26381"),
            [("s1", 26379), ("s2", 26380), ("s3", 26381)],
        )

    def test_not_supported_yet(self):
        """
        A valid --redis-sentinel stops start-up, saying it is not supported
        yet, rather than writing to --redis-host.
        """
        self.assertIn("not supported yet", usage_error(["--redis-sentinel", "s1:26379"]))

    def test_ipv6_address(self):
        """
        A bracketed IPv6 address loses its brackets.
        """
        self.assertEqual(sentinel_addresses("[::1]:26379"), [("::1", 26379)])

    def test_from_environment(self):
        """
        REDIS_SENTINEL is read like the flag.
        """
        self.assertIn("REDIS_SENTINEL", usage_error(environ={"REDIS_SENTINEL": "s1:26379,s2:26380"}))

    def test_master_name(self):
        """
        --redis-sentinel-master defaults to mymaster and can be set.
        """
        self.assertEqual(parse()["redis-sentinel-master"], "mymaster")
        self.assertEqual(parse(["--redis-sentinel-master", "geo"])["redis-sentinel-master"], "geo")

    def test_invalid(self):
        """
        An address without a port, with an invalid port or empty is a
        UsageError that names --redis-sentinel.
        """
        for text in ("sentinel", "sentinel:abc", "sentinel:70000", "s1:26379,", ":26379"):
            self.assertIn("--redis-sentinel", usage_error(["--redis-sentinel", text]), text)
