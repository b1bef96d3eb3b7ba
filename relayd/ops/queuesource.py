"""Where relayctl's queue verbs get the queue from, and the options that select from it.

Takes: relay.yaml (control socket and spool paths) and the operator's filter
options and message ids.
Emits: the queue as chunks of compact wire rows (relayd.queue.queuewire) from
the running relayd's control socket or, when it is stopped, read from the
spool under its daemon lock (so a relayd starting meanwhile waits);
`QueueFilter` values from the options.
Untrusted input: the daemon's answers (a malformed listing is a one-line
error), message ids typed by the operator (checked for the id shape before
they reach a path or the daemon), filter regexes and durations (a bad one is
a usage error).
Fails: with `CliError` / `UsageError`, one sentence each.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

from relayd.config.model import RelayConfig
from relayd.config.retry import parse_duration
from relayd.jsonwire import JsonObject, JsonValue
from relayd.ops.clicommon import PROG, CliError, UsageError
from relayd.ops.controlclient import ControlClient, ControlUnavailable, DaemonNotRunning
from relayd.ops.queueview import QueueFilter, QueueRow, compile_address_pattern, sanitize
from relayd.queue.msgid import is_message_id
from relayd.queue.queuewire import row_from_wire, wire_row
from relayd.queue.spool import Spool
from relayd.queue.spoollock import SpoolLock, lock_path
from relayd.values import QueueEntry

OFFLINE_LOCK_WAIT = 5.0  # seconds relayctl waits for another relayctl editing the stopped spool


def control_client(config: RelayConfig) -> ControlClient:
    return ControlClient(config.control_path)


def offline_lock(config: RelayConfig, *, exclusive: bool, why: DaemonNotRunning) -> SpoolLock:
    """The spool's daemon lock for direct access; an error if a relayd holds it."""
    if not (config.spool_dir / "queue").is_dir():
        raise CliError(f"{why}, and there is no spool at {config.spool_dir}")
    lock = SpoolLock.acquire(lock_path(config.spool_dir), exclusive=exclusive, timeout=OFFLINE_LOCK_WAIT)
    if lock is None:
        raise CliError(
            f"{why}, but the spool {config.spool_dir} is locked: relayd is starting or another "
            f"{PROG} is changing it; try again"
        )
    return lock


def offline_entries(config: RelayConfig, why: DaemonNotRunning) -> list[QueueEntry]:
    lock = offline_lock(config, exclusive=True, why=why)  # load() may set damaged files aside
    try:
        return Spool(config.spool_dir).load().entries
    finally:
        lock.release()


def _daemon_chunks(config: RelayConfig) -> Iterator[list[JsonValue]]:
    """Chunks of compact wire rows from the running relayd; DaemonNotRunning if none runs."""
    for message in control_client(config).stream("queue.list"):
        if "rows" in message:
            rows = message["rows"]
            if not isinstance(rows, list):
                raise CliError("relayd sent a malformed queue listing")
            yield rows
        elif message.get("done") and not message.get("ok"):
            raise CliError(str(message.get("error", "relayd refused the request")))
        elif message.get("done"):
            _warn_unrecorded(message.get("unrecorded"))


def _warn_unrecorded(held: object) -> None:
    """On stderr, below the listing: messages whose outcome the spool could not record."""
    if not isinstance(held, dict) or not held:
        return
    for message_id, reason in sorted(held.items()):
        print(f"{PROG}: {sanitize(str(message_id))} held: cannot record delivery state "
              f"({sanitize(str(reason), limit=300)})", file=sys.stderr)


def wire_chunks(config: RelayConfig) -> Iterator[list[JsonValue]]:
    """The queue as chunks of wire rows: from relayd when it runs, else straight from the spool."""
    try:
        chunks = _daemon_chunks(config)
        first = next(chunks, None)
    except DaemonNotRunning as why:
        yield [wire_row(e, False) for e in offline_entries(config, why)]
        return
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    if first is None:
        return
    yield first
    try:
        yield from chunks
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None


def _row_chunks(config: RelayConfig) -> Iterator[list[QueueRow]]:
    for chunk in wire_chunks(config):
        yield [row_from_wire(obj) for obj in chunk]


def all_rows(config: RelayConfig) -> list[QueueRow]:
    return [row for chunk in _row_chunks(config) for row in chunk]


# ----------------------------------------------------------------- filters


def queue_filter(args: argparse.Namespace) -> QueueFilter:
    try:
        return QueueFilter(
            tenant=args.tenant,
            sender=compile_address_pattern(args.sender) if args.sender is not None else None,
            recipient=compile_address_pattern(args.recipient) if args.recipient is not None else None,
            older_than=parse_duration(args.older_than) if args.older_than is not None else None,
            younger_than=parse_duration(args.younger_than) if args.younger_than is not None else None,
            frozen=args.frozen,
            deferred=args.deferred,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def filter_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection (like exiqgrep; all given conditions must hold)")
    g.add_argument("--tenant", metavar="T", help="only messages of this tenant")
    g.add_argument("--from", dest="sender", metavar="REGEX", help="sender matches (case-insensitive search)")
    g.add_argument("--to", dest="recipient", metavar="REGEX", help="some recipient matches")
    g.add_argument("--older-than", metavar="DURATION", help="queued at least this long (30m, 2h, 1d)")
    g.add_argument("--younger-than", metavar="DURATION", help="queued less than this long")
    g.add_argument("--frozen", action="store_true", help="only frozen messages")
    g.add_argument("--deferred", action="store_true", help="only messages with a deferred recipient (not frozen)")
    return p


def checked(reply: JsonObject) -> JsonObject:
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "relayd refused the request"))
    return reply


def checked_id(text: str) -> str:
    if not is_message_id(text):
        raise UsageError(f"'{sanitize(text, 40)}' is not a message id (they look like 1tA2bC-0000aB-x9)")
    return text
