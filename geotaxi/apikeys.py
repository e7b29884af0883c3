"""
The API keys of all operators, loaded from the API's ``GET /users/`` and
kept fresh in memory, so that checking a signed datagram needs no request.
"""

import orjson
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone


class _Sentinel:
    """
    A named result of ApiKeyCache.lookup() that is not a key. It is false,
    so that ``if key:`` never takes it for a key.
    """

    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name

    def __bool__(self):
        return False


# Returned by ApiKeyCache.lookup() while no key set has been loaded yet.
UNAVAILABLE = _Sentinel("UNAVAILABLE")

# Returned by ApiKeyCache.lookup() when max_waiting lookups already wait.
FULL = _Sentinel("FULL")

# Bounds on what one reload may read. The API sends 30 users a page, so
# 10,000 pages are 300,000 operators. One user row lists the accounts it
# manages, so a page of managers can be large, hence the generous size bound.
MAX_PAGES = 10_000
MAX_PAGE_BYTES = 16 * 1024 * 1024


class ReloadError(Exception):
    """
    A failed page request of a reload: the page URL and what went wrong,
    never the API key.
    """

    def __init__(self, url, reason):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class _QuietHTTP11ClientFactory(HTTPConnectionPool._factory):
    # The pool's factory logs "Starting factory" and "Stopping factory" at
    # every connection. HTTPConnectionPool._factory is private, and this
    # relies on its name in Twisted 26.10.
    noisy = False


class ApiKeyCache(Service):
    """
    The key of every operator, by the operator's account email.

    Keys are reloaded every ``refresh`` seconds, and at once, at most every
    ``unknown_reload_interval`` seconds, when an unknown operator is looked
    up. A failed reload keeps the last good key set and is retried after
    ``retry_delay`` seconds, doubling up to ``max_retry_delay``.

    Counters: ``apikey_reloads`` counts the reloads started,
    ``apikey_reload_errors`` the ones that failed.
    """

    name = "apikeys"
    log = Logger()

    def __init__(
        self,
        api_url,
        api_key,
        reactor,
        counters,
        refresh=300.0,
        unknown_reload_interval=30.0,
        request_timeout=10.0,
        max_waiting=10_000,
        pool=None,
        retry_delay=1.0,
        max_retry_delay=60.0,
    ):
        if not api_key:
            raise ValueError("the API key is empty: set API_KEY to the key of an account allowed to list /users/")
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"invalid API URL {api_url!r}: expected http:// or https://")

        self.api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._headers = {
            "X-Api-Key": [api_key],
            # The earlier server sent this header too, so an API that
            # expects it still gets it.
            "X-Version": ["2"],
            "Accept": ["application/json"],
        }
        self._reactor = reactor
        self._counters = counters
        self.refresh = refresh
        self._unknown_reload_interval = unknown_reload_interval
        self._request_timeout = request_timeout
        self._max_waiting = max_waiting
        self._first_retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay

        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool._factory = _QuietHTTP11ClientFactory
        self._pool = pool
        self._client = HTTPClient(Agent(reactor, pool=pool, connectTimeout=request_timeout))

        self._keys = {}
        self.loaded = False
        self.last_success = None
        self._reload = None
        self._reload_call = None
        self._next_retry_delay = retry_delay
        self._last_unknown_reload = None
        self._waiters = []

    @property
    def operators(self):
        """
        Number of operators in the key set in use.
        """
        return len(self._keys)

    @property
    def waiting(self):
        """
        Number of lookups waiting for the reload in progress.
        """
        return len(self._waiters)

    def startService(self):
        super().startService()
        self._start_reload()

    def stopService(self):
        """
        Cancel the next reload and the one in progress, then close the idle
        connections of the pool. Lookups that waited get the keys known now.
        """
        super().stopService()

        if self._reload_call is not None and self._reload_call.active():
            self._reload_call.cancel()
        self._reload_call = None

        if self._reload is not None:
            self._reload.cancel()

        return self._pool.closeCachedConnections()

    def lookup(self, operator):
        """
        Return the key of ``operator`` if it is known.

        Otherwise return UNAVAILABLE while no key set has been loaded yet,
        and FULL when ``max_waiting`` lookups already wait for a reload.
        Return None when the operator is unknown and no reload may start
        now. Else return a Deferred that fires with the key, or None, once
        the reload ends. All lookups that wait share the same reload.
        """
        key = self._keys.get(operator)
        if key is not None:
            return key
        if not self.loaded:
            return UNAVAILABLE

        starting = self._reload is None
        if starting:
            now = self._reactor.seconds()
            last = self._last_unknown_reload
            if not self.running or (last is not None and now - last < self._unknown_reload_interval):
                return None
        if len(self._waiters) >= self._max_waiting:
            return FULL
        if starting:
            self._last_unknown_reload = now
            self.log.info("Reloading the API keys because of unknown operator {operator}", operator=operator)

        # The waiter is registered before the reload starts, because a
        # reload may end at once and fire the waiters it finds.
        waiter = Deferred()
        self._waiters.append((operator, waiter))
        self._start_reload()
        return waiter

    def _start_reload(self):
        if self._reload is not None:
            return

        if self._reload_call is not None and self._reload_call.active():
            self._reload_call.cancel()
        self._reload_call = None

        self._counters["apikey_reloads"] += 1
        reload = self._load_all_pages()
        self._reload = reload
        reload.addBoth(self._reload_ended)

    def _reload_ended(self, result):
        self._reload = None

        if isinstance(result, Failure):
            delay = self._reload_failed(result)
        else:
            keys, url, pages, skipped = result
            self._keys = keys
            self.loaded = True
            self.last_success = self._reactor.seconds()
            self._next_retry_delay = self._first_retry_delay
            delay = self.refresh
            self.log.info(
                "Loaded the API keys of {operators} operators from {url} (pages read: {pages})",
                operators=len(keys),
                url=url,
                pages=pages,
            )
            if skipped:
                self.log.warn(
                    "Ignored {skipped} users without an email or an apikey string from {url}",
                    skipped=skipped,
                    url=url,
                )

        self._release_waiters()

        if self.running and delay is not None:
            self._reload_call = self._reactor.callLater(delay, self._start_reload)
        return None

    def _reload_failed(self, failure):
        """
        Log and count a failed reload, and return the delay before the next
        attempt, or None when the service is stopping.
        """
        # Stopping cancels the reload, and the Agent reports that as
        # ResponseNeverReceived or ResponseFailed, not as CancelledError.
        if not self.running:
            return None

        self._counters["apikey_reload_errors"] += 1
        delay = self._next_retry_delay
        self._next_retry_delay = min(delay * 2, self._max_retry_delay)

        if failure.check(ReloadError):
            self.log.warn(
                "Loading the API keys from {url} failed: {error}. "
                "The last key set ({operators} operators) stays in use, retrying in {delay} s",
                url=failure.value.url,
                error=failure.value.reason,
                operators=len(self._keys),
                delay=delay,
            )
        else:
            self.log.failure(
                "Loading the API keys from {url} failed unexpectedly, retrying in {delay} s",
                failure,
                url=self.api_url,
                delay=delay,
            )
        return delay

    def _release_waiters(self):
        waiters, self._waiters = self._waiters, []
        keys = self._keys
        for operator, waiter in waiters:
            # A caller may have cancelled its Deferred meanwhile.
            if not waiter.called:
                waiter.callback(keys.get(operator))

    @inlineCallbacks
    def _load_all_pages(self):
        """
        Fetch every page of ``/users/`` and return ``(keys, first page URL,
        page count, rows skipped)``. Raises ReloadError on the first page that
        fails, so a partial key set is never used.
        """
        keys = {}
        skipped = 0
        page = 1
        pages_read = 0
        while True:
            url = f"{self.api_url}/users/?p={page}"
            try:
                body = yield self._request_page(url)
            except CancelledError:
                raise
            except Exception as error:
                raise ReloadError(url, self._redact(describe_error(error))) from error

            try:
                rows, page_skipped, next_page = parse_users_page(body, page)
            except ValueError as error:
                raise ReloadError(url, self._redact(str(error))) from error
            keys.update(rows)
            skipped += page_skipped
            pages_read += 1

            if next_page is None:
                break
            if next_page > MAX_PAGES:
                raise ReloadError(url, f"the API announces page {next_page}, more than the {MAX_PAGES} pages allowed")
            page = next_page
        return keys, f"{self.api_url}/users/", pages_read, skipped

    def _request_page(self, url):
        """
        Send ``GET url`` and return a Deferred that fires with the body of a
        200 response. The timeout covers the connection, the headers and the
        body, so a hung API fails the reload instead of blocking it.
        """
        # Redirects are not followed: the X-Api-Key header would go with
        # them to any host, since Twisted strips only the standard
        # credential headers on a redirect.
        requesting = self._client.get(url, headers=self._headers, allow_redirects=False, unbuffered=True)
        requesting.addCallback(_read_ok_body)
        requesting.addTimeout(self._request_timeout, self._reactor, onTimeoutCancel=_timed_out)
        return requesting

    def _redact(self, text):
        return text.replace(self._api_key, "<API_KEY>")


def parse_users_page(body, page):
    """
    Parse one page of ``GET /users/`` and return ``(keys by email, rows
    skipped, next page number or None)``.

    A response without ``meta`` is taken as the only page. ``meta.next_page``
    gives the next page and ``meta.pages`` the last one. Raises ValueError
    when the page is not JSON of the expected shape, or when the next page
    does not come after this one, which would loop.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in the response ({error}): {_excerpt(body)}") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(f'expected an object with a "data" list, got: {_excerpt(body)}')

    keys = {}
    skipped = 0
    for row in document["data"]:
        email = row.get("email") if isinstance(row, dict) else None
        apikey = row.get("apikey") if isinstance(row, dict) else None
        if isinstance(email, str) and email and isinstance(apikey, str) and apikey:
            keys[email] = apikey
        else:
            skipped += 1

    meta = document.get("meta")
    if meta is None:
        return keys, skipped, None
    if not isinstance(meta, dict):
        raise ValueError(f'expected "meta" to be an object, got {type(meta).__name__}')

    pages = meta.get("pages")
    if pages is not None and type(pages) is not int:
        raise ValueError(f"invalid meta.pages {pages!r}: expected an integer")
    if "next_page" in meta:
        next_page = meta["next_page"]
        if next_page is not None and type(next_page) is not int:
            raise ValueError(f"invalid meta.next_page {next_page!r}: expected an integer or null")
    elif pages is not None and page < pages:
        next_page = page + 1
    else:
        next_page = None

    if next_page is None or (pages is not None and page >= pages):
        return keys, skipped, None
    if next_page <= page:
        raise ValueError(f"meta.next_page {next_page} does not come after page {page}")
    return keys, skipped, next_page


def describe_error(error):
    """
    Return a one-line description of a failed HTTP request.
    """
    # ResponseFailed and its relatives of twisted.web wrap a list of Failures.
    reasons = getattr(error, "reasons", None)
    if reasons:
        return ", ".join(f"{reason.type.__name__}: {reason.getErrorMessage()}" for reason in reasons)
    return f"{type(error).__name__}: {error}"


class HTTPStatusError(Exception):
    """
    A response whose status is not 200, with the start of its body.
    """

    def __init__(self, code, phrase, body):
        super().__init__(f"HTTP {code} {phrase}: {_excerpt(body)}")
        self.code = code


def _timed_out(result, timeout):
    # A cancelled Agent request fails with ResponseNeverReceived or
    # ResponseFailed wrapping the CancelledError, which the default
    # conversion of addTimeout() leaves as it is.
    if isinstance(result, Failure):
        raise TimeoutError(f"timed out after {timeout:g} s without a complete response")
    return result


def _read_ok_body(response):
    reading = read_body(response, MAX_PAGE_BYTES)
    if response.code != 200:
        phrase = response.phrase.decode("latin-1")
        reading.addCallback(_raise_status_error, response.code, phrase)
    return reading


def _raise_status_error(body, code, phrase):
    raise HTTPStatusError(code, phrase, body)


def _excerpt(body, length=200):
    text = body[:length].decode("utf-8", "replace")
    return repr(text) + (" ..." if len(body) > length else "")


def read_body(response, max_bytes):
    """
    Return a Deferred that fires with the whole body of ``response``.

    It fails with ValueError when the body exceeds ``max_bytes``. Cancelling
    it closes the connection, which twisted.web.client.readBody does not do
    for Agent responses: their transport has no abortConnection().
    """
    reader = _BodyReader(max_bytes)
    reading = Deferred(reader.cancel)
    reader.finished = reading
    response.deliverBody(reader)
    return reading


class _BodyReader(Protocol):
    def __init__(self, max_bytes):
        self.finished = None
        self._max_bytes = max_bytes
        self._size = 0
        self._chunks = []

    def dataReceived(self, data):
        if self.finished is None:
            return
        self._size += len(data)
        if self._size > self._max_bytes:
            finished, self.finished = self.finished, None
            self._close()
            finished.errback(ValueError(f"response body larger than {self._max_bytes} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason):
        if self.finished is None:
            return
        finished, self.finished = self.finished, None
        if reason.check(ResponseDone):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)

    def cancel(self, reading):
        self.finished = None
        self._close()

    def _close(self):
        # The body transport of twisted.web's HTTP client proxies
        # stopProducing() to the TCP transport, which then closes.
        if self.transport is not None:
            self.transport.stopProducing()
