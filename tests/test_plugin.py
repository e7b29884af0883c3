"""
Tests of the twistd plugin: discovery, a light import, and the service tree
that makeService builds.
"""

import os
import subprocess
import sys

from twisted.application.service import IService, IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from geotaxi import tap
from geotaxi.options import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints which of the heavy modules importing the plugin file loaded.
IMPORT_CHECK = """
import sys
import twisted.plugins.geotaxi_plugin
print("txredisapi" in sys.modules, "twisted.internet.reactor" in sys.modules, "geotaxi.tap" in sys.modules)
"""

# The same after twistd's own discovery of every plugin.
DISCOVERY_CHECK = """
import sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
names = [plugin.tapname for plugin in getPlugins(IServiceMaker)]
print("geotaxi" in names, "txredisapi" in sys.modules, "twisted.internet.reactor" in sys.modules)
"""


def run_python(code):
    """
    Run ``code`` in a new interpreter in the repository folder and return
    its standard output split into words.
    """
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.split()


def find_plugin():
    """
    Return the IServiceMaker plugin named ``geotaxi``, or None.
    """
    for plugin in getPlugins(IServiceMaker):
        if plugin.tapname == "geotaxi":
            return plugin
    return None


def build(arguments=(), environ=None):
    """
    Return the service tree and the memory reactor it was built on.
    """
    options = Options(environ={} if environ is None else environ)
    options.parseOptions(list(arguments))
    reactor = MemoryReactorClock()
    return tap.makeService(options, reactor=reactor), reactor


class DiscoveryTests(SynchronousTestCase):
    """
    twistd finds the plugin by its tapname.
    """

    def test_found(self):
        """
        getPlugins(IServiceMaker) returns a plugin with tapname "geotaxi".
        """
        self.assertIsNotNone(find_plugin())

    def test_describes_itself(self):
        """
        The plugin has a description for ``twistd --help``.
        """
        self.assertTrue(find_plugin().description)

    def test_options_class(self):
        """
        The plugin's options are geotaxi's Options.
        """
        self.assertIs(find_plugin().options, Options)

    def test_import_light(self):
        """
        Importing the plugin file imports neither txredisapi nor the reactor.
        """
        txredisapi, reactor, tap_module = run_python(IMPORT_CHECK)
        self.assertEqual(txredisapi, "False")
        self.assertEqual(reactor, "False")
        self.assertEqual(tap_module, "False")

    def test_discovery_light(self):
        """
        Discovering all plugins finds geotaxi and imports neither
        txredisapi nor the reactor, so ``twistd --reactor`` still works.
        """
        found, txredisapi, reactor = run_python(DISCOVERY_CHECK)
        self.assertEqual(found, "True")
        self.assertEqual(txredisapi, "False")
        self.assertEqual(reactor, "False")


class ServiceTreeTests(SynchronousTestCase):
    """
    makeService builds named services without starting them.
    """

    def test_plugin_builds(self):
        """
        The plugin's makeService returns a stopped service named geotaxi.
        """
        plugin = find_plugin()
        options = plugin.options()
        options.parseOptions(["-p", "0", "--disable-fluent"])
        top = plugin.makeService(options)
        self.assertTrue(IService.providedBy(top))
        self.assertEqual(top.name, "geotaxi")
        self.assertFalse(top.running)

    def test_children(self):
        """
        The tree has the Redis writer, Fluentd, the report and UDP, in that
        order, so that UDP stops first and the writer last.
        """
        top, _ = build()
        self.assertEqual([child.name for child in top], ["redis", "fluent", "report", "udp"])

    def test_named_lookup(self):
        """
        Each child is found by its name.
        """
        top, _ = build()
        self.assertIs(top.getServiceNamed("redis"), top.writer)
        self.assertIs(top.getServiceNamed("fluent"), top.fluent)
        self.assertIs(top.getServiceNamed("udp"), top.udp)
        self.assertIsNotNone(top.getServiceNamed("report"))

    def test_disable_fluent(self):
        """
        --disable-fluent leaves Fluentd out of the tree.
        """
        top, _ = build(["--disable-fluent"])
        self.assertEqual([child.name for child in top], ["redis", "report", "udp"])
        self.assertIsNone(top.fluent)

    def test_disable_fluent_env(self):
        """
        DISABLE_FLUENT=1 leaves Fluentd out of the tree too.
        """
        top, _ = build(environ={"DISABLE_FLUENT": "1"})
        self.assertNotIn("fluent", [child.name for child in top])

    def test_no_keys_by_default(self):
        """
        Without --auth-enabled there is no API-key cache.
        """
        top, _ = build()
        self.assertIsNone(top.keys)
        self.assertIsNone(top.protocol.keys)

    def test_auth_enabled(self):
        """
        --auth-enabled adds the API-key cache before the report and UDP, and
        the protocol checks signatures with it.
        """
        top, _ = build(["--auth-enabled"], environ={"API_KEY": "key"})
        self.assertEqual([child.name for child in top], ["redis", "fluent", "apikeys", "report", "udp"])
        self.assertIs(top.getServiceNamed("apikeys"), top.keys)
        self.assertIs(top.protocol.keys, top.keys)

    def test_not_started(self):
        """
        Building starts no service, opens no socket and schedules no call.
        """
        top, reactor = build()
        self.assertFalse(top.running)
        for child in top:
            self.assertFalse(child.running, child.name)
        # MemoryReactor creates udpPorts on the first listenUDP call.
        self.assertEqual(getattr(reactor, "udpPorts", {}), {})
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_udp_options(self):
        """
        The UDP listener gets the host, port and receive buffer.
        """
        top, _ = build(["-h", "127.0.0.2", "-p", "9000", "--receive-buffer", "65536"])
        self.assertEqual(top.udp.host, "127.0.0.2")
        self.assertEqual(top.udp.port, 9000)
        self.assertEqual(top.udp.receive_buffer, 65536)

    def test_writer_options(self):
        """
        The Redis writer gets the queue size, batch size, timeout and
        shutdown timeout.
        """
        top, _ = build([
            "--queue-size", "50", "--batch-size", "7",
            "--redis-timeout", "2", "--shutdown-timeout", "3",
        ])
        self.assertEqual(top.writer.queue_size, 50)
        self.assertEqual(top.writer.batch_size, 7)
        self.assertEqual(top.writer.timeout, 2)
        self.assertEqual(top.writer.shutdown_timeout, 3)

    def test_redis_address(self):
        """
        The Redis link gets --redis-host and --redis-port.
        """
        top, _ = build(["--redis-host", "redis.internal", "--redis-port", "6380"])
        self.assertEqual(top.writer.link.address, "redis.internal:6380")

    def test_fluent_options(self):
        """
        The Fluentd forwarder gets the host, port, buffer and shutdown timeout.
        """
        top, _ = build([
            "--fluentd-host", "fluentd", "--fluent-port", "24225",
            "--fluent-buffer", "10", "--shutdown-timeout", "4",
        ])
        self.assertEqual(top.fluent.host, "fluentd")
        self.assertEqual(top.fluent.port, 24225)
        self.assertEqual(top.fluent.max_buffer, 10)
        self.assertEqual(top.fluent.shutdown_timeout, 4)

    def test_protocol_wiring(self):
        """
        The UDP listener feeds the protocol, which writes to the writer and
        forwards to Fluentd.
        """
        top, _ = build()
        self.assertIs(top.udp.protocol, top.protocol)
        self.assertIs(top.protocol.writer, top.writer)
        self.assertIs(top.protocol.fluent, top.fluent)

    def test_protocol_options(self):
        """
        The protocol gets the timestamp window and the verbose flag.
        """
        top, _ = build(["--max-future", "30", "--max-age", "60", "-v"])
        self.assertEqual(top.protocol.max_future, 30)
        self.assertEqual(top.protocol.max_age, 60)
        self.assertTrue(top.protocol.verbose)

    def test_shared_counters(self):
        """
        Every part counts into the same Counters.
        """
        top, _ = build()
        self.assertIs(top.writer.counters, top.counters)
        self.assertIs(top.protocol.counters, top.counters)
        self.assertIs(top.udp.counters, top.counters)
        self.assertIs(top.getServiceNamed("report").counters, top.counters)
