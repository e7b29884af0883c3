"""
The UDP loss report: parsing of /proc samples taken on x86_64 Linux, and the
real /proc files of sockets this test opens on loopback.
"""

import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import time
import unittest

from geotaxi import netstat

SNMP_SAMPLE = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests
Ip: 2 64 6385530 0 0 0 0 0 6385530 6384958
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs
Tcp: 1 200 120000 -1 5732 5609 106 40 0 65873 65692
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 4328419 14 1990572 6319643 1990571 0 1 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 7 0 0 0 0 0 0 0 0
"""

SNMP6_SAMPLE = """\
Ip6InReceives                   	120
Udp6InDatagrams                 	35
Udp6NoPorts                     	2
Udp6InErrors                    	5
Udp6RcvbufErrors                	5
UdpLite6InDatagrams             	9
"""

# Two sockets share port 8080 (SO_REUSEPORT), one on 0.0.0.0:33461 has a
# receive queue. Rows end with trailing spaces, as the kernel writes them.
UDP_SAMPLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            
 1471: 00000000:82B5 00000000:0000 07 00000000:00000500 00:00000000 00000000     0        0 26786 2 00000000dc48e0dc 0         
 8858: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 10928 2 00000000be3ff71e 1520      
 8858: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 10930 2 00000000be3ff71f 7         
"""

UDP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 6131: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 10931 2 00000000b3ec32bd 0
 8858: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 10929 2 00000000f89e19e1 40
"""

LITTLE_ENDIAN = sys.byteorder == "little"


class SampleFiles(unittest.TestCase):
    """Base for tests that read the samples from files, as from /proc."""

    def setUp(self):
        self.folder = tempfile.TemporaryDirectory(prefix="geotaxi-netstat-")
        self.addCleanup(self.folder.cleanup)

    def write(self, name, text):
        path = os.path.join(self.folder.name, name)
        with open(path, "w", encoding="ascii") as sample:
            sample.write(text)
        return path


class SnmpTest(SampleFiles):
    def test_udp_counters(self):
        counters = netstat.udp_snmp(self.write("snmp", SNMP_SAMPLE))
        self.assertEqual(counters["InDatagrams"], 4328419)
        self.assertEqual(counters["NoPorts"], 14)
        self.assertEqual(counters["InErrors"], 1990572)
        self.assertEqual(counters["RcvbufErrors"], 1990571)
        self.assertEqual(counters["InCsumErrors"], 1)
        self.assertEqual(len(counters), 9)

    def test_udplite_not_mixed_in(self):
        counters = netstat.udp_snmp(self.write("snmp", SNMP_SAMPLE))
        self.assertNotEqual(counters["InDatagrams"], 7)

    def test_missing_udp_section(self):
        path = self.write("snmp", SNMP_SAMPLE.split("Udp:")[0])
        with self.assertRaisesRegex(ValueError, "no Udp: counters"):
            netstat.udp_snmp(path)

    def test_udp6_counters(self):
        counters = netstat.udp6_snmp(self.write("snmp6", SNMP6_SAMPLE))
        self.assertEqual(counters, {"InDatagrams": 35, "NoPorts": 2, "InErrors": 5, "RcvbufErrors": 5})

    def test_udp6_missing_file_empty(self):
        self.assertEqual(netstat.udp6_snmp(os.path.join(self.folder.name, "absent")), {})


class UdpTableTest(SampleFiles):
    def test_parse_rows(self):
        rows = netstat.parse_udp_table(UDP_SAMPLE)
        self.assertEqual([row.local_port for row in rows], [33461, 8080, 8080])
        self.assertEqual([row.inode for row in rows], [26786, 10928, 10930])
        self.assertEqual([row.drops for row in rows], [0, 1520, 7])
        self.assertEqual(rows[0].rx_queue, 0x500)

    @unittest.skipUnless(LITTLE_ENDIAN, "the samples were taken on a little-endian machine")
    def test_decode_addresses(self):
        self.assertEqual(netstat.decode_address("0100007F:1F90"), ("127.0.0.1", 8080))
        self.assertEqual(netstat.decode_address("00000000:82B5"), ("0.0.0.0", 33461))
        self.assertEqual(netstat.decode_address("00000000000000000000000001000000:1F90"), ("::1", 8080))
        self.assertEqual(netstat.decode_address("00000000000000000000000000000000:14E9"), ("::", 5353))
        # fe80::1 has bytes fe 80 00 00 in its first word.
        self.assertEqual(netstat.decode_address("000080FE000000000000000001000000:0035"), ("fe80::1", 53))

    def test_header_only_table(self):
        self.assertEqual(netstat.parse_udp_table(UDP_SAMPLE.splitlines()[0] + "\n"), [])

    def test_drops_by_port_sums_ipv4_and_ipv6(self):
        paths = (self.write("udp", UDP_SAMPLE), self.write("udp6", UDP6_SAMPLE))
        self.assertEqual(netstat.socket_drops(port=8080, paths=paths), 1520 + 7 + 40)

    def test_drops_by_inode(self):
        paths = (self.write("udp", UDP_SAMPLE), self.write("udp6", UDP6_SAMPLE))
        self.assertEqual(netstat.socket_drops(inode=10930, paths=paths), 7)
        self.assertEqual(netstat.socket_drops(inode=10929, paths=paths), 40)

    def test_drops_of_unknown_socket_zero(self):
        paths = (self.write("udp", UDP_SAMPLE), os.path.join(self.folder.name, "absent"))
        self.assertEqual(netstat.socket_drops(port=9, paths=paths), 0)
        self.assertEqual(netstat.socket_drops(inode=1, paths=paths), 0)

    def test_drops_needs_port_or_inode(self):
        with self.assertRaises(ValueError):
            netstat.socket_drops()

    def test_changes_line(self):
        before = {"udp": {"InDatagrams": 10, "RcvbufErrors": 1}, "udp6": {}, "sockets": [{"drops": 5, "rx_queue": 0}]}
        after = {"udp": {"InDatagrams": 25, "RcvbufErrors": 4}, "udp6": {}, "sockets": [{"drops": 8, "rx_queue": 2560}]}
        line = netstat.describe_changes(before, after)
        self.assertIn("udp.InDatagrams +15", line)
        self.assertIn("udp.RcvbufErrors +3", line)
        self.assertIn("socket drops +3", line)
        self.assertIn("rx_queue 2560 B", line)


class RealSocketTest(unittest.TestCase):
    """Reads the real /proc files of sockets this test opens on loopback."""

    def setUp(self):
        if not os.path.exists("/proc/net/udp"):
            self.skipTest("needs Linux /proc/net/udp")
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.receiver.close)
        # The smallest buffer the kernel grants, so a few datagrams fill it.
        self.receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self.receiver.bind(("127.0.0.1", 0))
        self.port = self.receiver.getsockname()[1]
        self.inode = netstat.socket_inode(self.receiver.fileno())

    def test_finds_own_socket(self):
        rows = netstat.udp_sockets(inode=self.inode)
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0].local_port, self.port)
        self.assertEqual(rows[0].local_address, "127.0.0.1")
        self.assertEqual(netstat.udp_sockets(port=self.port), rows)
        self.assertEqual(netstat.socket_drops(inode=self.inode), 0)

    def test_counts_real_drops(self):
        snmp_before = netstat.udp_snmp()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(200):
                sender.sendto(b"x" * 200, ("127.0.0.1", self.port))

        drops = netstat.socket_drops(inode=self.inode)
        self.assertGreater(drops, 100)
        self.assertEqual(netstat.socket_drops(port=self.port), drops)
        self.assertGreater(netstat.udp_sockets(inode=self.inode)[0].rx_queue, 0)
        # The namespace-wide counter counts these drops, and maybe others.
        snmp_after = netstat.udp_snmp()
        self.assertGreaterEqual(snmp_after["RcvbufErrors"] - snmp_before["RcvbufErrors"], drops)

    def test_ipv6_socket(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        receiver6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(receiver6.close)
        try:
            receiver6.bind(("::1", 0))
        except OSError as error:
            self.skipTest(f"cannot bind ::1: {error}")
        rows = netstat.udp_sockets(inode=netstat.socket_inode(receiver6.fileno()))
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0].local_address, "::1")
        self.assertEqual(rows[0].local_port, receiver6.getsockname()[1])

    def test_closed_socket_zero(self):
        self.receiver.close()
        self.assertEqual(netstat.socket_drops(inode=self.inode), 0)


class CommandTest(unittest.TestCase):
    def setUp(self):
        if not os.path.exists("/proc/net/udp"):
            self.skipTest("needs Linux /proc/net/udp")
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.receiver.close)
        self.receiver.bind(("127.0.0.1", 0))
        self.port = self.receiver.getsockname()[1]

    def run_main(self, *argv):
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            netstat.main(list(argv))
        return output.getvalue()

    def test_snapshot_lists_port(self):
        output = self.run_main("--port", str(self.port))
        self.assertIn("RcvbufErrors", output)
        self.assertIn("127.0.0.1", output)
        self.assertIn(str(self.port), output)

    def test_json_snapshot(self):
        snapshot = json.loads(self.run_main("--port", str(self.port), "--json"))
        self.assertEqual([row["local_port"] for row in snapshot["sockets"]], [self.port])
        self.assertIn("InDatagrams", snapshot["udp"])

    def test_watch_bounded(self):
        started = time.monotonic()
        output = self.run_main("--port", str(self.port), "--watch", "1")
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("1.0 s", output)
        self.assertIn("total over 1.0 s", output)
        self.assertIn("socket drops +0", output)

    def test_rejects_invalid_options(self):
        for argv in (("--watch", "0"), ("--port", "0"), ("--watch", "1", "--json")):
            with self.subTest(argv=argv):
                with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as raised:
                    netstat.main(list(argv))
                self.assertEqual(raised.exception.code, 2)


if __name__ == "__main__":
    unittest.main()
