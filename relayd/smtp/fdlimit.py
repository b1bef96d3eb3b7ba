"""The open-file limit relayd needs for its configured connection limits.

Takes: the configuration, and the process's RLIMIT_NOFILE (injectable).
Emits: the soft limit raised to what the configuration needs, or a
`DescriptorLimitError` that says how many descriptors are needed, where that
number comes from, and what to change.
Untrusted input: none.
How it fails: with `DescriptorLimitError` at start-up, before any socket is
opened, rather than dropping clients at the thousandth connection (each client
connection, upstream connection and spool file is a descriptor; Linux's
default soft limit is 1024).

Under systemd the unit's LimitNOFILE= sets both limits; relayd does not need
the setrlimit call there (the unit's SystemCallFilter forbids it anyway).
"""

from __future__ import annotations

import resource
from typing import Callable

from relayd.config.model import RelayConfig, SmtpTransportConfig

# Spool files being written, the log, the control socket and its clients,
# listening sockets, the metrics server, Python's own files.
RESERVED_DESCRIPTORS = 128


class DescriptorLimitError(Exception):
    """The configured limits need more open files than the process may have."""


def needed_descriptors(config: RelayConfig) -> int:
    """Client connections on every listener, upstream connections, and a reserve."""
    clients = sum(listener.max_connections for listener in config.listeners)
    upstream = sum(
        t.max_connections for t in config.transports.values() if isinstance(t, SmtpTransportConfig)
    )
    return clients + upstream + RESERVED_DESCRIPTORS


def ensure_descriptor_limit(
    config: RelayConfig,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """Raise the soft RLIMIT_NOFILE to what `config` needs; returns the limit in force."""
    needed = needed_descriptors(config)
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise DescriptorLimitError(_explain(config, needed, f"the hard limit is {hard}"))
    try:
        setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (OSError, ValueError) as error:
        raise DescriptorLimitError(
            _explain(config, needed, f"the soft limit is {soft} and raising it failed: {error}")
        ) from None
    return needed


def _explain(config: RelayConfig, needed: int, problem: str) -> str:
    listeners = ", ".join(f"{l.name} {l.max_connections}" for l in config.listeners)
    return (
        f"{config.source}: the listeners' max_connections ({listeners}) plus upstream "
        f"connections and {RESERVED_DESCRIPTORS} reserved need {needed} open files, but {problem}; "
        f"raise LimitNOFILE= in the systemd unit (or ulimit -n), or lower max_connections"
    )
