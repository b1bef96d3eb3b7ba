"""Ports for the servers tests start, away from the ones the kernel hands out.

A test that reserves a port and binds it later (relayd started as a process,
a fake upstream that stops listening to refuse connections and listens again)
must not find it taken meanwhile. Ports bound to 0 and client sockets come from
Linux's ephemeral range (32768-60999), so these are drawn at random below it,
which also keeps concurrent test runs on one machine apart.
"""

from __future__ import annotations

import random
import socket

RESERVED_PORTS = range(20000, 32000)


def candidate_ports(tries: int = 200) -> list[int]:
    """Random ports from the reserved range, to try in turn."""
    return random.sample(RESERVED_PORTS, tries)


def free_port(host: str = "127.0.0.1") -> int:
    """A port from the reserved range that is free on `host` now."""
    for port in candidate_ports():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 20000 and 32000 on {host}")
