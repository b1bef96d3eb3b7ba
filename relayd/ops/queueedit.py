"""Freeze, thaw and remove one queued message on the spool: written once, for two callers.

Takes: a spool (the `SpoolEdits` port: relayd.queue.spool.Spool), a message's
current entry or id, the operator's user name, and where events go.
Emits: the result word relayctl reports ("frozen", "not in queue", ...) and
the `OperatorAction` (plus `MessageCompleted` for a removal) events, which the
main log writes as ``<id> frozen by <user>``.
Untrusted input: none; message ids are checked for the id shape before they
get here.
Fails: a spool file that vanished meanwhile is "not in queue"; any other
spool error reaches the caller.

The callers are the running daemon (relayd.ops.control, which first keeps the
message out of delivery) and relayctl on a stopped relayd's spool
(relayd.ops.cli_queueact, under the spool's daemon lock), so an edit means
the same on disk and in the log either way.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Callable, Protocol

from relayd.observe.events import EventSink, MessageCompleted, OperatorAction
from relayd.queue.spool import SpoolEntryMissing
from relayd.values import QueueEntry


class SpoolEdits(Protocol):
    """What an edit needs of the spool."""

    async def update(self, entry: QueueEntry, *, durable: bool = False) -> None: ...
    def remove(self, id: str) -> bool: ...


def _nothing(_: object) -> None:
    return None


async def write_frozen(spool: SpoolEdits, entry: QueueEntry, frozen: bool) -> QueueEntry | None:
    """The entry with its frozen flag durably changed; None when its file is gone."""
    changed = replace(entry, frozen=frozen)
    try:
        await spool.update(changed, durable=True)
    except SpoolEntryMissing:
        return None
    return changed


async def set_frozen(
    spool: SpoolEdits,
    entry: QueueEntry,
    frozen: bool,
    *,
    user: str,
    events: EventSink,
    written: Callable[[QueueEntry | None], None] = _nothing,
) -> str:
    """Exim's -Mf / -Mt: the flag is written to the spool, so it survives restarts.

    `written` hears the changed entry (None: the file was gone) before the
    event is emitted, so the daemon's index is right when the log says so.
    """
    unchanged, done = ("already frozen", "frozen") if frozen else ("not frozen", "thawed")
    if entry.frozen == frozen:
        return unchanged
    changed = await write_frozen(spool, entry, frozen)
    written(changed)
    if changed is None:
        return "not in queue"
    events.emit(OperatorAction(action="freeze" if frozen else "thaw", user=user, queue_id=entry.envelope.id))
    return done


async def remove(
    spool: SpoolEdits,
    message_id: str,
    *,
    user: str,
    events: EventSink,
    removed: Callable[[str], None] = _nothing,
) -> str:
    """Exim's -Mrm: the message's files go, without a bounce. `removed` hears the id
    once the files are gone (or were already), before any event."""
    gone = await asyncio.to_thread(spool.remove, message_id)
    removed(message_id)
    if not gone:
        return "not in queue"
    events.emit(OperatorAction(action="remove", user=user, queue_id=message_id))
    events.emit(MessageCompleted(queue_id=message_id))
    return "removed"
