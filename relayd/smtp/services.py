"""What the listener is handed by the daemon, and what it keeps about one SMTP session.

Takes: nothing from the network itself; `ListenerServices` is the listener's
port to the rest of relayd (config, password check, queue, spool room,
tenant quota, route check, auth guard, events), each a callable or a
Protocol, so the listener never imports a later stage. `SubmissionSession`
is aiosmtpd's session plus who the client is. Untrusted input: the peer's
address and uid, as the kernel reports them. Fails: never; a uid without a
name is shown as the number.
"""

from __future__ import annotations

import asyncio
import pwd
import socket
import struct
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

from aiosmtpd.smtp import Session

from relayd.config.model import RelayConfig, TenantConfig
from relayd.observe.events import EventSink
from relayd.smtp.authguard import AuthGuard
from relayd.smtp.intake import IncomingBody
from relayd.values import Envelope, Route


@dataclass(frozen=True)
class ListenerServices:
    """What the listener needs from the rest of relayd, passed in by the daemon."""

    config: Callable[[], RelayConfig]
    authenticate: Callable[[str, str], Awaitable[Optional[TenantConfig]]]
    accept: Callable[[Envelope, bytes], Awaitable[str]]  # returns the queue id
    new_id: Callable[[], str]
    guard: AuthGuard
    events: EventSink  # relayd.observe.events: the main log and the metrics are sinks
    # The route a tenant's recipient would take, or None: RCPT is refused, not
    # bounced later (relayd.delivery.router.route, a pure function of the config).
    route: Callable[[TenantConfig, str], Route | None]
    clock: Callable[[], float] = time.time
    # Room on the spool for a tenant's new message of a declared size: a 452
    # reply, or None (relayd.queue.spoolroom.SpoolRoom.refusal).
    admit: Callable[[str, int], Optional[str]] = lambda _tenant, _size: None
    # A tenant at its quota with `on_quota: refuse`: the 450 naming the reset,
    # or None (relayd.queue.tenantquota.TenantQuotas.refusal); asked at MAIL,
    # RCPT and DATA, since another session may take the last place meanwhile.
    quota: Callable[[str], Optional[str]] = lambda _tenant: None
    # Opens a message in the queue whose body is written as DATA arrives.
    receive: Callable[[Envelope], Awaitable[IncomingBody]] | None = None


class SubmissionSession(Session):
    """aiosmtpd's session plus who the client is, for relayd's policy."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.tenant_name: str | None = None
        self.auth_mechanism: str | None = None
        # The connection's rejection-log budget (it outlives the session at STARTTLS).
        self.may_log: Callable[[], bool] | None = None
        self.local_uid: int | None = None  # the peer's uid, on a Unix-socket listener
        self.local_user: str = ""  # "uid/name" for the log's U= field


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def describe_uid(uid: int) -> str:
    """``uid/name`` as the log shows a local user (the number alone if it has no name)."""
    try:
        return f"{uid}/{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return str(uid)
