"""
The newest accepted timestamp of each (taxi, operator), so that a late or
repeated datagram does not move a taxi backwards.
"""

ACCEPT = None
OUT_OF_ORDER = "out_of_order"
DUPLICATE = "duplicate"


class OrderingFilter:
    """
    Compare each position with the newest one accepted for its member
    (``<taxi>:<operator>``).

    A newest timestamp that lies in the future of the server clock blocks
    nothing but its exact duplicate, so a device whose clock was fast and is
    then corrected is not stuck until the server clock catches up.

    ``expire()`` removes members whose newest timestamp is older than
    ``horizon`` seconds. Positions that old fail the timestamp window anyway,
    so memory is bounded by the number of taxis seen within the window.
    """

    def __init__(self, clock, horizon=3600):
        self._clock = clock
        self.horizon = horizon
        self._newest = {}

    def __len__(self):
        return len(self._newest)

    def check(self, member, timestamp):
        """
        Return ACCEPT and remember ``timestamp``, or return OUT_OF_ORDER or
        DUPLICATE and leave the state as it was.
        """
        newest = self._newest.get(member)
        if newest is not None:
            if timestamp == newest:
                return DUPLICATE
            if timestamp < newest and newest <= self._clock.seconds():
                return OUT_OF_ORDER
        self._newest[member] = timestamp
        return ACCEPT

    def expire(self):
        """
        Forget members whose newest timestamp is older than the horizon, and
        return how many were forgotten.
        """
        if not self.horizon:
            return 0
        oldest = self._clock.seconds() - self.horizon
        stale = [member for member, timestamp in self._newest.items() if timestamp < oldest]
        for member in stale:
            del self._newest[member]
        return len(stale)
