"""The old home of :class:`~tokenguard.log_throttle.LogThrottle`, re-exported.

``LogThrottle`` moved to :mod:`tokenguard.log_throttle` (the store uses it, and the
store sits below ``observe``). Only ``tokenguard/upstreams/usage.py`` still imports it
from here; once it imports :mod:`tokenguard.log_throttle`, delete this module
(``tests/test_architecture.py`` lists it as the one allowed exception).
"""

from tokenguard.log_throttle import LogThrottle

__all__ = ["LogThrottle"]
