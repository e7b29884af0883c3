"""
geotaxi: the UDP ingest server of the open taxi API.

Operators' apps send each taxi's position as a signed JSON datagram. geotaxi
checks it, stores the latest position of each taxi in Redis in the layout the
API reads, and forwards every accepted position to Fluentd.
"""

__version__ = "1.0.0"
