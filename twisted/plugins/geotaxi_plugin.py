# Discovery imports this file for every twistd run, so it names the service
# and nothing more: txredisapi imports the global reactor when imported, which
# would break "twistd --reactor".
from twisted.application.service import ServiceMaker

geotaxi = ServiceMaker(
    "geotaxi",
    "geotaxi.tap",
    "Receive signed taxi positions over UDP and store them in Redis.",
    "geotaxi",
)
