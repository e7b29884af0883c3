"""
The ``geotaxi`` command: runs the twistd plugin in the foreground, so that
``geotaxi -p 8080`` and ``twistd -n geotaxi -p 8080`` start the same server.
"""

import sys

from twisted.python import usage
from twisted.scripts.twistd import run

from geotaxi.options import Options


def main(argv=None):
    """
    Run ``twistd --nodaemon --pidfile= geotaxi`` with the given arguments.
    """
    arguments = sys.argv[1:] if argv is None else argv

    # twistd would print its whole help before an invalid option or
    # environment variable; one line naming it is easier to read in a log.
    if "--help" not in arguments:
        try:
            Options().parseOptions(arguments)
        except usage.UsageError as error:
            sys.exit(f"geotaxi: {error}\nRun 'geotaxi --help' for the options.")

    sys.argv = ["geotaxi", "--nodaemon", "--pidfile=", "geotaxi", *arguments]
    run()


if __name__ == "__main__":
    main()
