"""
Serve the API's ``GET /users/`` on 127.0.0.1, for the benchmark's ``--auth``
mode: the operators' keys that a geotaxi server with ``--auth-enabled``
loads.

It runs the tests' stand-in (tests/usersapi.py), which pages the users 30 a
page at ``?p=N`` with the API's ``data`` and ``meta`` fields and returns 401
to a request without the right ``X-Api-Key`` header. The key it expects
comes from the ``API_KEY`` environment variable, as the server's does. The
users come from a JSON file: a list of ``{"email", "apikey", "name"}``
objects.

Output: ``port N`` on stdout once listening. Logs go to stderr. SIGTERM or
SIGINT ends it.

Run it as ``API_KEY=... python bench/users_api.py --users users.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.usersapi import UsersApi  # noqa: E402


def load_users(path):
    """Read the users file and return its rows. Raise ValueError when a row lacks a field."""
    with open(path, encoding="utf-8") as users_file:
        users = json.load(users_file)
    if not isinstance(users, list):
        raise ValueError(f"{path}: expected a JSON list of users")
    for index, user in enumerate(users):
        if not isinstance(user, dict) or not all(isinstance(user.get(field), str) for field in ("email", "apikey")):
            raise ValueError(f"{path}: user {index} needs an email and an apikey string")
    return users


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve GET /users/ on 127.0.0.1 as the taxi API pages it.")
    parser.add_argument("--users", required=True, help='JSON file: a list of {"email", "apikey", "name"} objects')
    args = parser.parse_args(argv)

    api_key = os.environ.get("API_KEY", "")
    if not api_key:
        parser.error("missing API_KEY: set it to the key that requests must send in X-Api-Key")
    try:
        users = load_users(args.users)
    except (OSError, ValueError) as error:
        parser.error(f"invalid --users file: {error}")

    # Stdout carries only the port line, so that the benchmark can read it.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    api = UsersApi(api_key, reactor=reactor)
    for user in users:
        api.add_user(user["email"], user["apikey"], user.get("name", ""))
    # The stand-in listens on a free port and exposes it only in its URL.
    api.start()
    print(f"port {urlsplit(api.url).port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
