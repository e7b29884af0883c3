"""
The ``geotaxi`` command: runs the twistd plugin in the foreground, so that
``geotaxi -p 8080`` and ``twistd -n geotaxi -p 8080`` start the same server.
"""

import sys

from twisted.scripts.twistd import run


def main(argv=None):
    """
    Run ``twistd --nodaemon --pidfile= geotaxi`` with the given arguments.
    """
    arguments = sys.argv[1:] if argv is None else argv
    sys.argv = ["geotaxi", "--nodaemon", "--pidfile=", "geotaxi", *arguments]
    run()


if __name__ == "__main__":
    main()
