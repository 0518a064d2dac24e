"""Whether a listening address keeps a listener on this machine.

A listener bound to a loopback address is reachable only from this host; any other
bind (``0.0.0.0``, ``::``, a public or private address, a host name) may be reached
from elsewhere, so what it serves needs a credential (the node's ``/metrics`` warns
without one; the admin API refuses a short admin token).
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (in any case) and loopback IP literals: ``127.0.0.0/8``,
    ``::1`` (bracketed or not) and IPv4-mapped ``::ffff:127.x.x.x``. False for any
    other host name (it may resolve anywhere), for the wildcards ``0.0.0.0`` and ``::``
    (every interface), and for anything :mod:`ipaddress` does not read as an address
    (``127.1``, blanks around it): when in doubt, not loopback, the side that asks for
    a credential."""
    if host.lower() == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
