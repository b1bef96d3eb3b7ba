"""systemd readiness and watchdog notifications (Type=notify units).

Outside systemd ($NOTIFY_SOCKET unset) every call is a no-op. The watchdog
pings at half of $WATCHDOG_USEC, from the event loop itself, so a wedged loop
stops the pings and systemd restarts relayd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Mapping


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings, or None when systemd asked for no watchdog."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.5, int(usec) / 2_000_000)
    except ValueError:
        return None


async def watchdog_loop(interval: float, environ: Mapping[str, str] | None = None) -> None:
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(interval)
