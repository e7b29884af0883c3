"""
A stand-in for the API's ``GET /users/``: a real twisted.web server on
127.0.0.1 that pages the users 30 a page as the API does, checks the
X-Api-Key header, counts requests and can be switched into failure modes.
"""

import json
import math

from twisted.internet import reactor as default_reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.web import http, server
from twisted.web.resource import Resource

PAGE_SIZE = 30

# What the server does with an authorized request.
MODES = (
    "ok",  # the page of users
    "error",  # 500 with a JSON error body
    "error_echo",  # 500 with a body that repeats the X-Api-Key header sent
    "garbage",  # 200 with a body that is not JSON
    "wrong_shape",  # 200 with JSON that has no "data" list
    "hang",  # never answers
    "stall_body",  # sends the headers and the start of the body, then stalls
)


class UsersApi:
    """
    The users of the fake API, its request log and its failure mode.

    ``start()`` listens on a free loopback port and ``stop()`` closes every
    connection, hung ones included, so that no test leaves one behind.
    """

    def __init__(self, api_key, reactor=default_reactor):
        self.api_key = api_key
        self.users = []
        self.mode = "ok"
        self.page_requests = []
        self.unauthorized_requests = 0
        self._reactor = reactor
        self._port = None
        self._channels = {}

    @property
    def url(self):
        """
        Base URL of the API, without a trailing slash.
        """
        return f"http://127.0.0.1:{self._port.getHost().port}"

    @property
    def open_connections(self):
        """
        Number of client connections the server still keeps open.
        """
        return len(self._channels)

    def add_user(self, email, apikey, name=""):
        """
        Append a user, as the API lists users by increasing id.
        """
        self.users.append({"email": email, "apikey": apikey, "name": name})

    def set_apikey(self, email, apikey):
        """
        Replace the API key of the user with ``email``.
        """
        for user in self.users:
            if user["email"] == email:
                user["apikey"] = apikey
                return
        raise KeyError(f"no user with email {email!r}")

    def requests_of_page(self, page):
        """
        Count the authorized requests of page ``page``.
        """
        return self.page_requests.count(page)

    def start(self):
        """
        Listen on a free port of 127.0.0.1 and return self.
        """
        site = _QuietSite(_UsersResource(self))
        site.protocol = lambda: _TrackedChannel(self._channels)
        self._port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        return self

    @inlineCallbacks
    def stop(self):
        """
        Stop listening, abort every open connection and wait until each one
        is closed.
        """
        yield self._port.stopListening()

        closing = [channel.closed for channel in self._channels]
        for channel in list(self._channels):
            channel.transport.abortConnection()
        yield gatherResults(closing)

        # Lets the client side of each aborted connection see it closed too.
        yield deferLater(self._reactor, 0.01, lambda: None)

    def render_page(self, request):
        """
        Return the response body for ``request`` in the current mode, or
        NOT_DONE_YET for the modes that keep the request open.
        """
        if request.getHeader(b"x-api-key") != self.api_key.encode():
            self.unauthorized_requests += 1
            request.setResponseCode(http.UNAUTHORIZED)
            return _json({"errors": {"": ["Invalid X-Api-Key."]}})

        try:
            page = int(request.args.get(b"p", [b"1"])[0])
        except ValueError:
            request.setResponseCode(http.BAD_REQUEST)
            return _json({"errors": {"p": ["Not a valid integer."]}})
        self.page_requests.append(page)

        if self.mode == "ok":
            return _json(self._page(page))
        if self.mode == "error":
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            return _json({"errors": {"": ["Internal server error."]}})
        if self.mode == "error_echo":
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            return b"cannot list users for key " + request.getHeader(b"x-api-key")
        if self.mode == "garbage":
            return b"<html><body>502 Bad Gateway</body></html>"
        if self.mode == "wrong_shape":
            return _json({"users": self.users})
        if self.mode == "hang":
            return server.NOT_DONE_YET
        if self.mode == "stall_body":
            request.setHeader(b"content-length", b"100000")
            request.write(b'{"data": [')
            return server.NOT_DONE_YET
        raise ValueError(f"unknown mode {self.mode!r}: expected one of {MODES}")

    def _page(self, page):
        """
        Build page ``page`` the way the API's Flask-SQLAlchemy pagination
        does: ``pages`` is 0 without users, and ``next_page`` is null on the
        last page and beyond it.
        """
        total = len(self.users)
        pages = math.ceil(total / PAGE_SIZE)
        first = (page - 1) * PAGE_SIZE
        rows = []
        for index, user in enumerate(self.users[first : first + PAGE_SIZE], start=first + 1):
            rows.append(
                {
                    "id": index,
                    "email": user["email"],
                    "apikey": user["apikey"],
                    "name": user["name"],
                    "roles": [{"name": "operateur"}],
                    "manager": None,
                    "managed": [],
                }
            )
        return {
            "data": rows,
            "meta": {
                "next_page": page + 1 if page < pages else None,
                "prev_page": page - 1 if page > 1 else None,
                "per_page": PAGE_SIZE,
                "pages": pages,
                "total": total,
            },
        }


def _json(document):
    return json.dumps(document).encode()


class _UsersResource(Resource):
    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self._api = api

    def render_GET(self, request):
        if request.path != b"/users/":
            request.setResponseCode(http.NOT_FOUND)
            return _json({"errors": {"url": ["Not found."]}})
        request.setHeader(b"content-type", b"application/json")
        return self._api.render_page(request)


class _QuietSite(server.Site):
    def log(self, request):
        # No access log: the tests read the log events of the code under test.
        pass


class _TrackedChannel(http.HTTPChannel):
    """
    An HTTP connection that stays in ``channels`` until it is closed, and
    fires ``closed`` then.
    """

    def __init__(self, channels):
        super().__init__()
        self._tracked = channels
        self.closed = Deferred()
        channels[self] = None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._tracked.pop(self, None)
        self.closed.callback(None)
