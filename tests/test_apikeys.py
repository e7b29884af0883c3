"""
Tests of geotaxi.apikeys: the reload schedule on a task.Clock with page
requests completed by the test, and the whole cache against a real HTTP
server on 127.0.0.1 (tests/usersapi.py).
"""

import socket

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from geotaxi.apikeys import FULL, MAX_PAGES, UNAVAILABLE, ApiKeyCache, parse_users_page
from geotaxi.counters import Counters
from tests.usersapi import UsersApi

API_KEY = "api-key-of-geotaxi-3b9f41c7"


def capture_log_events(testcase):
    """
    Collect every log event emitted until the end of ``testcase``.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def reload_failures(events):
    """
    Return the events that report a failed reload.
    """
    return [
        event
        for event in events
        if isinstance(event.get("log_source"), ApiKeyCache) and event["log_level"] is LogLevel.warn and "error" in event
    ]


def users_page(users, page=1, pages=1, **meta):
    """
    Encode one page of ``GET /users/`` holding ``users``, a dict of email to
    API key.
    """
    rows = [{"email": email, "apikey": apikey, "name": ""} for email, apikey in users.items()]
    document = {
        "data": rows,
        "meta": {"next_page": page + 1 if page < pages else None, "pages": pages, "total": len(rows)},
    }
    document["meta"].update(meta)
    return orjson.dumps(document)


class AnsweredByTestCache(ApiKeyCache):
    """
    An ApiKeyCache whose page requests stay pending until the test completes
    them through ``requests``, a list of (URL, Deferred). ``cancelled``
    lists the URLs of the requests cancelled.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests = []
        self.cancelled = []

    def _request_page(self, url):
        requesting = Deferred(lambda _: self.cancelled.append(url))
        self.requests.append((url, requesting))
        return requesting

    def respond(self, body):
        """
        Complete the latest request with the response body ``body``.
        """
        self.requests[-1][1].callback(body)

    def fail(self, error):
        """
        Fail the latest request with ``error``.
        """
        self.requests[-1][1].errback(error)


class ReloadScheduleTests(SynchronousTestCase):
    """
    The cache on a task.Clock, with requests completed by the test.
    """

    def make_cache(self, **options):
        clock = Clock()
        counters = Counters()
        cache = AnsweredByTestCache("http://127.0.0.1:9", API_KEY, clock, counters, **options)
        cache.startService()
        self.addCleanup(cache.stopService)
        return cache, clock, counters

    def loaded_cache(self, **options):
        cache, clock, counters = self.make_cache(**options)
        cache.respond(users_page({"known@example.com": "known-key"}))
        return cache, clock, counters

    def test_unavailable_until_first_load(self):
        """
        Lookups return UNAVAILABLE until a load succeeds, then the key.
        """
        cache, clock, counters = self.make_cache()

        self.assertIs(cache.lookup("known@example.com"), UNAVAILABLE)
        self.assertFalse(cache.loaded)
        self.assertIsNone(cache.last_success)

        cache.fail(ConnectionError("refused"))
        self.assertIs(cache.lookup("known@example.com"), UNAVAILABLE)

        clock.advance(1.0)
        cache.respond(users_page({"known@example.com": "known-key"}))

        self.assertEqual(cache.lookup("known@example.com"), "known-key")
        self.assertTrue(cache.loaded)
        self.assertEqual(cache.operators, 1)
        self.assertEqual(cache.last_success, clock.seconds())

    def test_pages_followed(self):
        """
        A reload requests page after page until meta.next_page is null.
        """
        cache, clock, counters = self.make_cache()

        cache.respond(users_page({"a@example.com": "a"}, page=1, pages=3))
        cache.respond(users_page({"b@example.com": "b"}, page=2, pages=3))
        cache.respond(users_page({"c@example.com": "c"}, page=3, pages=3))

        urls = [url for url, _ in cache.requests]
        self.assertEqual(urls, [f"http://127.0.0.1:9/users/?p={page}" for page in (1, 2, 3)])
        self.assertEqual(cache.operators, 3)
        self.assertEqual(cache.lookup("c@example.com"), "c")

    def test_unknown_operator_reload(self):
        """
        An unknown operator starts a reload, and its lookup fires with the
        key loaded.
        """
        cache, clock, counters = self.loaded_cache()

        waiting = cache.lookup("new@example.com")
        self.assertIsInstance(waiting, Deferred)
        self.assertEqual(len(cache.requests), 2)

        cache.respond(users_page({"known@example.com": "known-key", "new@example.com": "new-key"}))

        self.assertEqual(self.successResultOf(waiting), "new-key")
        self.assertEqual(cache.lookup("new@example.com"), "new-key")

    def test_unknown_reload_rate_limited(self):
        """
        Another unknown operator within unknown_reload_interval gets None at
        once and causes no request, later it starts a reload again.
        """
        cache, clock, counters = self.loaded_cache(unknown_reload_interval=30.0)
        waiting = cache.lookup("ghost@example.com")
        cache.respond(users_page({"known@example.com": "known-key"}))
        self.assertIsNone(self.successResultOf(waiting))

        clock.advance(29.0)
        self.assertIsNone(cache.lookup("ghost@example.com"))
        self.assertIsNone(cache.lookup("other@example.com"))
        self.assertEqual(len(cache.requests), 2)

        clock.advance(1.5)
        self.assertIsInstance(cache.lookup("ghost@example.com"), Deferred)
        self.assertEqual(len(cache.requests), 3)

    def test_waiting_lookups_share_reload(self):
        """
        Lookups made while a reload runs wait for it instead of starting
        another.
        """
        cache, clock, counters = self.loaded_cache()

        waiting = [cache.lookup("ghost@example.com") for _ in range(1000)]

        self.assertEqual(len(cache.requests), 2)
        self.assertTrue(all(isinstance(lookup, Deferred) for lookup in waiting))
        self.assertEqual(cache.waiting, 1000)

        cache.respond(users_page({"known@example.com": "known-key", "ghost@example.com": "ghost-key"}))

        self.assertEqual({self.successResultOf(lookup) for lookup in waiting}, {"ghost-key"})
        self.assertEqual(cache.waiting, 0)

    def test_max_waiting(self):
        """
        Once max_waiting lookups wait, the next unknown one returns FULL,
        while a known operator's key is still returned.
        """
        cache, clock, counters = self.loaded_cache(max_waiting=3)

        waiting = [cache.lookup(f"ghost{number}@example.com") for number in range(3)]

        self.assertTrue(all(isinstance(lookup, Deferred) for lookup in waiting))
        self.assertIs(cache.lookup("ghost3@example.com"), FULL)
        self.assertEqual(cache.lookup("known@example.com"), "known-key")

        cache.respond(users_page({"known@example.com": "known-key"}))

        self.assertEqual([self.successResultOf(lookup) for lookup in waiting], [None, None, None])
        self.assertEqual(cache.waiting, 0)

    def test_periodic_reload(self):
        """
        Keys are reloaded every refresh seconds, and a rotated key replaces
        the old one then.
        """
        cache, clock, counters = self.loaded_cache(refresh=300.0)

        clock.advance(299.0)
        self.assertEqual(len(cache.requests), 1)
        clock.advance(1.0)
        self.assertEqual(len(cache.requests), 2)

        cache.respond(users_page({"known@example.com": "rotated-key"}))

        self.assertEqual(cache.lookup("known@example.com"), "rotated-key")
        self.assertEqual(counters["apikey_reloads"], 2)

    def test_backoff(self):
        """
        Failed reloads are retried after 1 s, doubling up to 60 s, and a
        success brings back the refresh period and the first delay.
        """
        cache, clock, counters = self.loaded_cache(refresh=300.0)
        clock.advance(300.0)

        for expected_delay in (1, 2, 4, 8, 16, 32, 60, 60):
            requests = len(cache.requests)
            cache.fail(ConnectionError("refused"))

            clock.advance(expected_delay - 0.01)
            self.assertEqual(len(cache.requests), requests, f"retried before {expected_delay} s")
            clock.advance(0.01)
            self.assertEqual(len(cache.requests), requests + 1, f"not retried after {expected_delay} s")

        cache.respond(users_page({"known@example.com": "known-key"}))
        clock.advance(299.0)
        self.assertEqual(len(cache.requests), 10)
        clock.advance(1.0)
        self.assertEqual(len(cache.requests), 11)

        cache.fail(ConnectionError("refused"))
        clock.advance(1.0)
        self.assertEqual(len(cache.requests), 12)

    def test_failure_keeps_keys_and_logs_once(self):
        """
        A failed reload keeps the last key set, and each failed attempt is
        counted and logged once, whatever the number of lookups.
        """
        events = capture_log_events(self)
        cache, clock, counters = self.loaded_cache()

        for attempt in range(3):
            cache.lookup("ghost@example.com")
            for _ in range(100):
                self.assertEqual(cache.lookup("known@example.com"), "known-key")
                cache.lookup("ghost@example.com")
            cache.fail(ConnectionError("refused"))
            clock.advance(30.0)

        failures = reload_failures(events)
        self.assertEqual(len(failures), 3)
        self.assertEqual(counters["apikey_reload_errors"], 3)
        self.assertEqual(cache.operators, 1)
        self.assertIn("http://127.0.0.1:9/users/?p=1", formatEvent(failures[0]))
        self.assertIn("ConnectionError: refused", formatEvent(failures[0]))

    def test_failed_page_discards_partial_set(self):
        """
        A failure on a later page keeps the whole previous key set.
        """
        cache, clock, counters = self.loaded_cache(refresh=300.0)
        clock.advance(300.0)

        cache.respond(users_page({"new@example.com": "new-key"}, page=1, pages=2))
        cache.fail(ConnectionError("reset"))

        self.assertEqual(cache.lookup("known@example.com"), "known-key")
        self.assertIsInstance(cache.lookup("new@example.com"), Deferred)

    def test_absurd_page_number(self):
        """
        A next page past MAX_PAGES fails the reload instead of following it.
        """
        events = capture_log_events(self)
        cache, clock, counters = self.make_cache()

        cache.respond(users_page({"a@example.com": "a"}, page=1, pages=MAX_PAGES + 5, next_page=MAX_PAGES + 1))

        self.assertEqual(len(cache.requests), 1)
        self.assertFalse(cache.loaded)
        self.assertIn(f"more than the {MAX_PAGES} pages", formatEvent(reload_failures(events)[0]))

    def test_api_key_redacted(self):
        """
        An error text holding the API key is logged with the key replaced.
        """
        events = capture_log_events(self)
        cache, clock, counters = self.make_cache()

        cache.fail(ValueError(f"bad key {API_KEY}"))

        text = formatEvent(reload_failures(events)[0])
        self.assertIn("bad key <API_KEY>", text)
        self.assertNotIn(API_KEY, text)

    def test_stop_cancels_everything(self):
        """
        stopService cancels the request in progress and the next reload,
        releases waiting lookups, and logs no failure.
        """
        events = capture_log_events(self)
        cache, clock, counters = self.loaded_cache()
        waiting = cache.lookup("ghost@example.com")

        stopping = cache.stopService()

        self.successResultOf(stopping)
        self.assertEqual(cache.cancelled, ["http://127.0.0.1:9/users/?p=1"])
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(reload_failures(events), [])
        self.assertEqual(counters["apikey_reload_errors"], 0)
        self.assertIsNone(cache.lookup("other@example.com"))
        self.assertEqual(cache.lookup("known@example.com"), "known-key")

    def test_invalid_settings(self):
        """
        An empty API key or a URL without http(s) is rejected at creation.
        """
        with self.assertRaises(ValueError):
            ApiKeyCache("http://127.0.0.1:9", "", Clock(), Counters())
        with self.assertRaises(ValueError):
            ApiKeyCache("127.0.0.1:9", API_KEY, Clock(), Counters())


class ParseUsersPageTests(SynchronousTestCase):
    def test_keys_by_email(self):
        """
        Keys are taken by email, and empty or duplicate names change nothing.
        """
        body = orjson.dumps(
            {
                "data": [
                    {"email": "a@example.com", "apikey": "a", "name": "Taxi"},
                    {"email": "b@example.com", "apikey": "b", "name": "Taxi"},
                    {"email": "c@example.com", "apikey": "c", "name": ""},
                    {"email": "d@example.com", "apikey": "d", "name": None},
                ],
                "meta": {"next_page": None, "pages": 1},
            }
        )

        keys, skipped, next_page = parse_users_page(body, 1)

        self.assertEqual(keys, {"a@example.com": "a", "b@example.com": "b", "c@example.com": "c", "d@example.com": "d"})
        self.assertEqual(skipped, 0)
        self.assertIsNone(next_page)

    def test_invalid_rows_skipped(self):
        """
        Rows without a non-empty email and apikey string are counted, not used.
        """
        body = orjson.dumps(
            {
                "data": [
                    {"email": "a@example.com", "apikey": "a"},
                    {"email": "b@example.com"},
                    {"email": "", "apikey": "c"},
                    {"email": "d@example.com", "apikey": None},
                    {"email": 5, "apikey": "e"},
                    "f@example.com",
                ]
            }
        )

        keys, skipped, next_page = parse_users_page(body, 1)

        self.assertEqual(keys, {"a@example.com": "a"})
        self.assertEqual(skipped, 5)

    def test_next_page(self):
        """
        The next page comes from meta.next_page, or from meta.pages when
        next_page is absent, and a response without meta is the only page.
        """
        cases = [
            ({"next_page": 2, "pages": 3}, 1, 2),
            ({"next_page": None, "pages": 3}, 3, None),
            ({"pages": 3}, 2, 3),
            ({"pages": 3}, 3, None),
            ({"next_page": 4, "pages": 3}, 3, None),
            ({"pages": 0, "next_page": None}, 1, None),
            (None, 1, None),
        ]
        for meta, page, expected in cases:
            document = {"data": []}
            if meta is not None:
                document["meta"] = meta
            next_page = parse_users_page(orjson.dumps(document), page)[2]
            self.assertEqual(next_page, expected, f"meta {meta} on page {page}")

    def test_invalid_pages_rejected(self):
        """
        Garbage, a wrong shape, or a next page that would loop raise
        ValueError with a readable reason.
        """
        cases = [
            (b"<html>502 Bad Gateway</html>", 1, "invalid JSON"),
            (b"", 1, "invalid JSON"),
            (b'{"users": []}', 1, '"data" list'),
            (b'[{"email": "a", "apikey": "b"}]', 1, '"data" list'),
            (b'{"data": {"email": "a"}}', 1, '"data" list'),
            (b'{"data": [], "meta": []}', 1, '"meta" to be an object'),
            (b'{"data": [], "meta": {"next_page": "2"}}', 1, "meta.next_page"),
            (b'{"data": [], "meta": {"next_page": 2, "pages": "3"}}', 1, "meta.pages"),
            (b'{"data": [], "meta": {"next_page": 2, "pages": 5}}', 2, "does not come after page 2"),
            (b'{"data": [], "meta": {"next_page": 1, "pages": 5}}', 2, "does not come after page 2"),
        ]
        for body, page, reason in cases:
            with self.assertRaises(ValueError) as raised:
                parse_users_page(body, page)
            self.assertIn(reason, str(raised.exception))


class ApiKeyCacheHTTPTests(TestCase):
    """
    The cache against a real HTTP server on 127.0.0.1, with 75 users on
    3 pages.
    """

    timeout = 30

    def setUp(self):
        self.api = UsersApi(API_KEY).start()
        self.addCleanup(self.api.stop)
        for number in range(75):
            # Some names are empty and many are shared, as in the real API.
            name = "" if number % 4 == 0 else f"Taxi company {number % 3}"
            self.api.add_user(f"operator{number}@example.com", f"key-{number}", name=name)
        self.events = capture_log_events(self)

    def start_cache(self, api_key=API_KEY, url=None, **options):
        self.counters = Counters()
        cache = ApiKeyCache(url or self.api.url, api_key, reactor, self.counters, **options)
        cache.startService()
        # Runs before the server stops, since cleanups run last first.
        self.addCleanup(cache.stopService)
        return cache

    @inlineCallbacks
    def wait_until(self, condition, timeout=5.0, description="condition"):
        """
        Wait until ``condition()`` is true, checking every 10 ms for at most
        ``timeout`` seconds.
        """
        deadline = reactor.seconds() + timeout
        while not condition():
            if reactor.seconds() > deadline:
                self.fail(f"{description} still false after {timeout} s")
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def started_cache(self, **options):
        cache = self.start_cache(**options)
        yield self.wait_until(lambda: cache.loaded, description="first load")
        return cache

    def assert_all_keys(self, cache):
        for number in range(75):
            self.assertEqual(cache.lookup(f"operator{number}@example.com"), f"key-{number}")

    @inlineCallbacks
    def test_all_operators_by_email(self):
        """
        All 75 operators on 3 pages are found by email.
        """
        cache = yield self.started_cache()

        self.assertEqual(cache.operators, 75)
        self.assert_all_keys(cache)
        self.assertEqual(self.api.page_requests, [1, 2, 3])
        self.assertEqual(self.api.unauthorized_requests, 0)
        self.assertEqual(self.counters["apikey_reloads"], 1)

    @inlineCallbacks
    def test_operator_added_after_start(self):
        """
        An operator added after the start is found by the reload its first
        datagram starts, and another unknown operator within 30 s causes no
        request.
        """
        cache = yield self.started_cache(unknown_reload_interval=30.0)
        self.api.add_user("late@example.com", "late-key", name="Taxi company 1")

        waiting = cache.lookup("late@example.com")
        self.assertIsInstance(waiting, Deferred)
        key = yield waiting

        self.assertEqual(key, "late-key")
        self.assertEqual(cache.lookup("late@example.com"), "late-key")
        self.assertEqual(self.api.requests_of_page(1), 2)

        requests = len(self.api.page_requests)
        self.assertIsNone(cache.lookup("ghost@example.com"))
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.api.page_requests), requests)

    @inlineCallbacks
    def test_rotated_key(self):
        """
        A rotated key replaces the old one at the next periodic reload.
        """
        cache = yield self.started_cache(refresh=0.3)
        self.api.set_apikey("operator40@example.com", "rotated-key")

        self.assertEqual(cache.lookup("operator40@example.com"), "key-40")
        yield self.wait_until(lambda: cache.lookup("operator40@example.com") == "rotated-key", description="rotated key in use")

        self.assertGreaterEqual(self.counters["apikey_reloads"], 2)
        self.assertEqual(cache.lookup("operator39@example.com"), "key-39")

    @inlineCallbacks
    def test_unknown_flood_one_reload(self):
        """
        1,000 lookups of an unknown operator within one second cause one
        reload, so one request of each page.
        """
        cache = yield self.started_cache()

        started = reactor.seconds()
        lookups = [cache.lookup("ghost@example.com") for _ in range(1000)]
        self.assertLess(reactor.seconds() - started, 1.0)

        waiting = [lookup for lookup in lookups if isinstance(lookup, Deferred)]
        self.assertEqual(len(waiting), 1000)
        for lookup in waiting:
            key = yield lookup
            self.assertIsNone(key)
        yield deferLater(reactor, 0.2, lambda: None)

        self.assertEqual(self.api.requests_of_page(1), 2)
        self.assertEqual(self.api.page_requests, [1, 2, 3, 1, 2, 3])

    @inlineCallbacks
    def check_failure_mode(self, mode, expected_error):
        """
        Put the API in ``mode`` after a first load, and check that the keys
        stay in use and that each attempt logs one failure naming the URL
        and the error. Check too that retries wait for the backoff delay and
        that no connection stays open.
        """
        cache = yield self.started_cache(request_timeout=0.3, retry_delay=0.2, max_retry_delay=0.4)
        self.api.mode = mode
        started = reactor.seconds()

        cache.lookup("ghost@example.com")
        yield self.wait_until(lambda: self.counters["apikey_reload_errors"] >= 3, description="three failed reloads")
        elapsed = reactor.seconds() - started

        self.assert_all_keys(cache)
        self.assertEqual(cache.operators, 75)
        failures = reload_failures(self.events)
        self.assertEqual(len(failures), self.counters["apikey_reload_errors"])
        text = formatEvent(failures[0])
        self.assertIn(f"{self.api.url}/users/?p=1", text)
        self.assertIn(expected_error, text)
        # Three attempts with 0.2 s and 0.4 s between them.
        self.assertGreaterEqual(elapsed, 0.6)
        # The attempt in progress may keep one connection open, and the
        # timed-out ones are closed.
        yield self.wait_until(lambda: self.api.open_connections <= 1, timeout=1.0, description="at most one open connection")

        self.api.mode = "ok"
        self.api.add_user("late@example.com", "late-key")
        yield self.wait_until(lambda: cache.operators == 76, description="reload after recovery")
        self.assertEqual(cache.lookup("late@example.com"), "late-key")

    def test_server_error(self):
        """
        HTTP 500 keeps the key set in use.
        """
        return self.check_failure_mode("error", "HTTP 500 Internal Server Error")

    def test_garbage(self):
        """
        A response that is not JSON keeps the key set in use.
        """
        return self.check_failure_mode("garbage", "invalid JSON")

    def test_wrong_shape(self):
        """
        JSON without a "data" list keeps the key set in use.
        """
        return self.check_failure_mode("wrong_shape", '"data" list')

    def test_hung_api(self):
        """
        An API that never responds times out and keeps the key set in use.
        """
        return self.check_failure_mode("hang", "timed out after 0.3 s")

    def test_stalled_body(self):
        """
        An API that stalls in the middle of the body times out too, and its
        connection is closed.
        """
        return self.check_failure_mode("stall_body", "timed out after 0.3 s")

    @inlineCallbacks
    def test_api_down_at_start(self):
        """
        While the API fails from the start, lookups return UNAVAILABLE, and
        the first successful retry makes the keys available.
        """
        self.api.mode = "error"
        cache = self.start_cache(retry_delay=0.05)

        self.assertIs(cache.lookup("operator1@example.com"), UNAVAILABLE)
        yield self.wait_until(lambda: self.counters["apikey_reload_errors"] >= 2, description="two failed loads")
        self.assertIs(cache.lookup("operator1@example.com"), UNAVAILABLE)
        self.assertFalse(cache.loaded)

        self.api.mode = "ok"
        yield self.wait_until(lambda: cache.loaded, description="load after recovery")
        self.assertEqual(cache.lookup("operator1@example.com"), "key-1")

    @inlineCallbacks
    def test_connection_refused(self):
        """
        An API that refuses connections leaves the keys UNAVAILABLE and is
        logged with the reason.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = "http://127.0.0.1:%d" % probe.getsockname()[1]

        cache = self.start_cache(url=url, retry_delay=10.0)
        yield self.wait_until(lambda: self.counters["apikey_reload_errors"] >= 1, description="failed load")

        self.assertIs(cache.lookup("operator1@example.com"), UNAVAILABLE)
        self.assertIn("refused", formatEvent(reload_failures(self.events)[0]))

    @inlineCallbacks
    def test_wrong_api_key(self):
        """
        A key the API rejects fails the load with HTTP 401.
        """
        cache = self.start_cache(api_key="not-the-key", retry_delay=10.0)
        yield self.wait_until(lambda: self.counters["apikey_reload_errors"] >= 1, description="failed load")

        self.assertIs(cache.lookup("operator1@example.com"), UNAVAILABLE)
        self.assertEqual(self.api.unauthorized_requests, 1)
        self.assertIn("HTTP 401", formatEvent(reload_failures(self.events)[0]))

    @inlineCallbacks
    def test_api_key_never_logged(self):
        """
        No log event contains the API key, not even when the API repeats it in
        an error response.
        """
        cache = yield self.started_cache(request_timeout=0.3, retry_delay=0.05, max_retry_delay=0.05)

        cache.lookup("ghost@example.com")

        # Failed reloads are retried every 0.05 s: wait for a request served
        # in each mode, then for the failure of that attempt.
        for mode in ("error_echo", "garbage", "hang", "error"):
            self.api.mode = mode
            requests = len(self.api.page_requests)
            yield self.wait_until(lambda: len(self.api.page_requests) > requests, description=f"request in {mode} mode")
            errors = self.counters["apikey_reload_errors"]
            yield self.wait_until(lambda: self.counters["apikey_reload_errors"] > errors, description=f"failure in {mode} mode")

        last_success = cache.last_success
        self.api.mode = "ok"
        yield self.wait_until(lambda: cache.last_success != last_success, description="reload after recovery")

        self.assertTrue(any("<API_KEY>" in formatEvent(event) for event in self.events))
        for event in self.events:
            self.assertNotIn(API_KEY, formatEvent(event))
            self.assertNotIn(API_KEY, repr(event))

    @inlineCallbacks
    def test_max_waiting_while_hung(self):
        """
        While a reload hangs, at most max_waiting lookups wait, and they are
        released with None when it times out.
        """
        cache = yield self.started_cache(max_waiting=5, request_timeout=0.3, retry_delay=10.0)
        self.api.mode = "hang"

        lookups = [cache.lookup(f"ghost{number}@example.com") for number in range(7)]

        self.assertTrue(all(isinstance(lookup, Deferred) for lookup in lookups[:5]))
        self.assertEqual(lookups[5:], [FULL, FULL])
        for lookup in lookups[:5]:
            key = yield lookup
            self.assertIsNone(key)
        self.assertEqual(cache.waiting, 0)
        self.assertEqual(cache.lookup("operator3@example.com"), "key-3")

    @inlineCallbacks
    def check_stop_while_hung(self, mode):
        """
        Stop the cache while its request hangs in ``mode``, and check that
        the connection is closed, the waiting lookup released and no failure
        logged.
        """
        cache = yield self.started_cache(request_timeout=5.0)
        self.api.mode = mode
        waiting = cache.lookup("ghost@example.com")
        yield self.wait_until(lambda: self.api.requests_of_page(1) == 2, description="hung request")

        yield cache.stopService()

        key = yield waiting
        self.assertIsNone(key)
        yield self.wait_until(lambda: self.api.open_connections == 0, timeout=1.0, description="no open connection")
        self.assertEqual(reload_failures(self.events), [])
        self.assertEqual(self.counters["apikey_reload_errors"], 0)

    def test_stop_while_waiting_headers(self):
        """
        Stopping while the API has not responded cancels the request.
        """
        return self.check_stop_while_hung("hang")

    def test_stop_while_reading_body(self):
        """
        Stopping in the middle of a stalled body cancels the request.
        """
        return self.check_stop_while_hung("stall_body")
