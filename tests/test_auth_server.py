"""
Authentication end to end: a real twisted.web stand-in of the API's /users/,
a real UDP socket, a real Redis, and the whole server with --auth-enabled.
"""

import hashlib
import json
import time

from twisted.internet import defer, reactor, task

from tests.harness import ServerTestCase, encode, position
from tests.redisserver import free_port
from tests.usersapi import UsersApi

API_KEY = "server-api-key"
SIGNED = ("timestamp", "operator", "taxi", "lat", "lon", "device", "status", "version")


def operator(number):
    return f"operator-{number}@example.org"


def key_of(number):
    return f"key-{number}"


def sign(message, key, texts=None):
    """
    Set the hash of ``message``: SHA-1 of the signed fields as written, then
    the key. ``texts`` gives the written form of fields sent as numbers.
    """
    texts = dict(texts or {})
    for name in SIGNED:
        texts.setdefault(name, str(message[name]))
    message["hash"] = hashlib.sha1(("".join(texts[name] for name in SIGNED) + key).encode()).hexdigest()
    return message


def signed_datagram(number, key=None, taxi="taxi-1", **fields):
    message = position(taxi=taxi, operator=operator(number), **fields)
    return encode(sign(message, key if key is not None else key_of(number)))


class AuthServerTestCase(ServerTestCase):
    """
    An API with 75 users over 3 pages, some with an empty or repeated name.
    """

    users = 75
    server_environ = {"API_KEY": API_KEY}

    def prepare(self):
        self.api = UsersApi(API_KEY).start()
        self.addCleanup(self.api.stop)
        for number in range(self.users):
            name = "" if number % 10 == 0 else f"Operator {number % 7}"
            self.api.add_user(operator(number), key_of(number), name)
        self.server_args = ("--auth-enabled", "--api-url", self.api.url, "--auth-refresh", "300")

    @defer.inlineCallbacks
    def start_server(self, *extra):
        yield super().start_server(*extra)
        yield self.wait_for(lambda: self.service.keys.loaded, "the first load of the keys")

    def sleep(self, seconds):
        return task.deferLater(reactor, seconds, lambda: None)


class SignatureTests(AuthServerTestCase):
    """
    Signatures of operators listed on every page of /users/.
    """

    @defer.inlineCallbacks
    def test_operators_of_every_page_accepted(self):
        """
        Operators from pages 1, 2 and 3 are all accepted.
        """
        for number in (0, 29, 30, 59, 60, 74):
            self.send(signed_datagram(number, taxi=f"taxi-{number}"))
        yield self.settle(6)

        self.assertEqual(self.counters["written"], 6)
        for page in (1, 2, 3):
            self.assertGreaterEqual(self.api.requests_of_page(page), 1)

    @defer.inlineCallbacks
    def test_signed_texts_accepted(self):
        """
        Signatures over the fields as written are accepted: a comma decimal,
        trailing zeros, a JSON number and a version as a string.
        """
        now = int(time.time())
        key = key_of(5)
        cases = [
            ("comma", {"lat": "48,856613", "lon": "2,352222"}, None),
            ("zeros", {"lat": "48.8566130", "lon": "2.3522220"}, None),
            ("number", {"lat": 48.85, "lon": 2.35}, None),
            ("exponent", {"lat": 48.85, "lon": 2.35}, {"lat": "4.885e1"}),
            ("version", {"version": "2"}, None),
        ]
        for name, fields, written in cases:
            message = position(taxi=name, operator=operator(5), timestamp=now, **fields)
            sign(message, key, written)
            data = encode(message)
            if written:
                data = data.replace(b"48.85", written["lat"].encode())
            self.send(data)
        yield self.settle(len(cases))

        self.assertEqual(self.counters["bad_signature"], 0)
        self.assertEqual(self.counters["written"], len(cases))

    @defer.inlineCallbacks
    def test_earlier_server_form_accepted(self):
        """
        A hash computed over str(float(lat)) and str(float(lon)), as the
        earlier server did, is accepted.
        """
        message = position(taxi="legacy", operator=operator(7), lat="48.85660", lon="2,35220")
        sign(message, key_of(7), {"lat": "48.8566", "lon": "2.3522"})
        self.send(message)
        yield self.settle(1)

        self.assertEqual(self.counters["written"], 1)

    @defer.inlineCallbacks
    def test_wrong_hash_rejected_and_counted(self):
        """
        A wrong hash is rejected and increments the three badhash_* sorted
        sets by 1 each.
        """
        self.send(signed_datagram(3, key="not-the-key", taxi="cheat"))
        yield self.settle(1)
        yield self.wait_for(lambda: self.redis.command("ZSCORE", "badhash_ips", "127.0.0.1") is not None, "badhash_ips")

        self.assertEqual(self.counters["bad_signature"], 1)
        self.assertEqual(self.counters["written"], 0)
        self.assertEqual(self.redis.command("ZSCORE", "badhash_operators", operator(3)), "1")
        self.assertEqual(self.redis.command("ZSCORE", "badhash_taxis_ids", "cheat"), "1")
        self.assertEqual(self.redis.command("ZSCORE", "badhash_ips", "127.0.0.1"), "1")
        self.assertIsNone(self.redis.command("HGET", "taxi:cheat", operator(3)))

    @defer.inlineCallbacks
    def test_uppercase_hash_accepted(self):
        """
        The hash may be written in upper case.
        """
        message = json.loads(signed_datagram(4))
        message["hash"] = message["hash"].upper()
        self.send(message)
        yield self.settle(1)

        self.assertEqual(self.counters["written"], 1)

    @defer.inlineCallbacks
    def test_unknown_operator_not_counted_as_bad_hash(self):
        """
        An operator the API does not list is rejected as unknown_operator
        and leaves the badhash_* sets alone.
        """
        self.send(signed_datagram(500))
        yield self.settle(1)
        yield self.wait_for(lambda: self.counters["unknown_operator"] == 1, "unknown_operator")

        self.assertEqual(self.counters["bad_signature"], 0)
        self.assertEqual(self.redis.command("EXISTS", "badhash_operators"), 0)


class ReloadTests(AuthServerTestCase):
    """
    Operators added or keys rotated in the API while the server runs.
    """

    @defer.inlineCallbacks
    def test_new_operator_accepted_without_restart(self):
        """
        An operator added to the API after start is accepted at its first
        datagram, through the reload an unknown operator starts.
        """
        self.api.add_user(operator(100), key_of(100))
        self.send(signed_datagram(100, taxi="newcomer"))
        yield self.settle(1)
        yield self.wait_for(lambda: self.counters["written"] == 1, "the newcomer's position")

        self.assertEqual(self.counters["unknown_operator"], 0)

    @defer.inlineCallbacks
    def test_unknown_flood_one_request(self):
        """
        1000 datagrams from an unknown operator within a second cause at
        most one request of the first page.
        """
        before = self.api.requests_of_page(1)
        for number in range(1000):
            self.send(signed_datagram(900, taxi=f"taxi-{number}"))
            if number % 100 == 99:
                yield self.wait_for(lambda n=number: self.counters["received"] > n, "datagrams read")
        yield self.settle(1000)
        yield self.wait_for(lambda: self.counters["unknown_operator"] == 1000, "1000 rejections")

        self.assertLessEqual(self.api.requests_of_page(1) - before, 1)

    @defer.inlineCallbacks
    def test_rotated_key_after_reload(self):
        """
        After the API rotates a key, the new key is accepted and the old one
        rejected once the periodic reload ran.
        """
        yield self.service.stopService()
        yield self.start_server("--auth-refresh", "1")
        self.api.set_apikey(operator(8), "rotated")
        loads = self.api.requests_of_page(1)
        yield self.wait_for(lambda: self.api.requests_of_page(1) > loads + 1, "a periodic reload", timeout=5)

        self.send(signed_datagram(8, key="rotated", taxi="new-key"))
        self.send(signed_datagram(8, taxi="old-key"))
        yield self.settle(2)

        self.assertIsNotNone(self.redis.command("HGET", "taxi:new-key", operator(8)))
        self.assertIsNone(self.redis.command("HGET", "taxi:old-key", operator(8)))
        self.assertEqual(self.counters["bad_signature"], 1)


class ApiFailureTests(AuthServerTestCase):
    """
    The API failing after the first load: traffic keeps flowing with the
    last key set, and each failed reload is logged once.
    """

    timeout = 90

    @defer.inlineCallbacks
    def check_failure(self, mode):
        yield self.service.stopService()
        yield self.start_server("--auth-refresh", "1")
        self.api.mode = mode

        # Send 50 datagrams a second until two reloads failed: a hung API
        # takes the 10 s request timeout to fail each time.
        sent = 0
        deadline = time.monotonic() + 40
        while self.counters["apikey_reload_errors"] < 2 and time.monotonic() < deadline:
            for _ in range(50):
                self.send(signed_datagram(sent % 75, taxi=f"taxi-{sent}"))
                sent += 1
            yield self.sleep(1)
        yield self.settle(sent)

        self.assertEqual(self.counters["written"], sent)
        failures = [line for line in self.log_lines("geotaxi.apikeys") if "failed" in line or "timed out" in line]
        reloads = self.counters["apikey_reload_errors"]
        self.assertGreaterEqual(reloads, 2)
        self.assertLessEqual(len(failures), reloads)
        self.assertTrue(all(API_KEY not in line for line in self.log_lines("geotaxi.apikeys")))

    def test_api_error_500(self):
        """
        The API responding with status 500.
        """
        return self.check_failure("error")

    def test_api_garbage(self):
        """
        The API responding with garbage.
        """
        return self.check_failure("garbage")

    def test_api_hangs(self):
        """
        The API never responding: each reload times out.
        """
        return self.check_failure("hang")


class ApiDownAtStartTests(AuthServerTestCase):
    """
    The API unreachable when the server starts.
    """

    def prepare(self):
        super().prepare()
        self.api_port = free_port()
        self.server_args = ("--auth-enabled", "--api-url", f"http://127.0.0.1:{self.api_port}")

    @defer.inlineCallbacks
    def start_server(self, *extra):
        yield ServerTestCase.start_server(self, *extra)

    @defer.inlineCallbacks
    def test_unavailable_until_api_up(self):
        """
        Datagrams are counted as auth_unavailable until the API responds,
        then accepted.
        """
        self.send(signed_datagram(1, taxi="early"))
        yield self.settle(1)
        self.assertEqual(self.counters["auth_unavailable"], 1)

        yield self.api.stop()
        self.api._port = reactor.listenTCP(self.api_port, self.api._port.factory, interface="127.0.0.1")
        yield self.wait_for(lambda: self.service.keys.loaded, "the keys once the API is up", timeout=10)

        self.send(signed_datagram(1, taxi="late"))
        yield self.settle(2)
        self.assertEqual(self.counters["written"], 1)
        self.assertIsNotNone(self.redis.command("HGET", "taxi:late", operator(1)))
