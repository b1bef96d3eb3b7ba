"""Whether an address names this machine only: the one answer every stage shares.

Takes: an address as written in relay.yaml or as a socket reports a peer
("127.0.0.1", "::1", "fe80::1%eth0", "::ffff:127.0.0.1", "localhost").
Emits: True for 127.0.0.0/8, ::1, IPv4-mapped loopback and the name localhost.
Untrusted input: peer addresses; anything that is not an address is not loopback.
Fails: never; unparsable text is simply not loopback.
"""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    """True when only processes on this machine can use the address.

    Loopback is where relayd relaxes a rule (plaintext AUTH, per-address limits,
    a transport without TLS), so the answer must be the same everywhere.
    """
    if address.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
