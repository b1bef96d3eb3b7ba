"""Per tenant and transport: messages and recipients delivered today and this month.

Takes: the delivery events (an `EventSink` in the daemon's fan-out): each
`RecipientDelivered` counts one recipient, and one message for the first
recipient of an upstream transaction.
Emits: counts in the embedded window counters (`tenant:<T>:via:<X>` and
`...:rcpt`, day and month windows in the usage time zone), read back by
`counts` for `relayctl usage` and status.
Untrusted input: none (tenant and transport names come from the config).
How it fails: a count the store cannot write is dropped and reported once
through `on_error` (these counts are shown, never enforced); it never
raises into the fan-out.

These are this node's own deliveries, kept in its own store even when
quotas are shared through Redis: what a node sent through which provider
is that node's fact.
"""

from __future__ import annotations

import asyncio
from datetime import tzinfo
from typing import Callable, Iterable

from relayd.observe import events as ev
from relayd.observe.counters import CounterError, Span, Window, WindowCounters

SPANS = (Span.DAY, Span.MONTH)


def via_key(tenant: str, transport: str) -> str:
    return f"tenant:{tenant}:via:{transport}"


class TransportUsage:
    """See the module docstring."""

    def __init__(
        self, counters: WindowCounters, zone: Callable[[], tzinfo], *, on_error: Callable[[str], None]
    ) -> None:
        self._counters = counters
        self._zone = zone
        self._on_error = on_error
        self._writes: set[asyncio.Task[None]] = set()
        self._failing = False

    def emit(self, event: ev.Event) -> None:
        if not isinstance(event, ev.RecipientDelivered) or not event.transport:
            return
        key = via_key(event.tenant, event.transport)
        additions = [(key + ":rcpt", 1)] + ([(key, 1)] if event.first else [])
        task = asyncio.get_running_loop().create_task(self._write(additions, event.at))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, additions: list[tuple[str, int]], at: float) -> None:
        try:
            for key, n in additions:
                for span in SPANS:
                    await self._counters.add(key, Window(span, self._zone()), n, at)
        except CounterError as error:
            if not self._failing:
                self._failing = True
                self._on_error(f"per-transport usage counts are not recorded: {error}")
            return
        self._failing = False

    async def counts(
        self, pairs: Iterable[tuple[str, str]], now: float
    ) -> dict[tuple[str, str], dict[str, tuple[int, int]]]:
        """Per (tenant, transport): per span ("day", "month") its (messages, recipients)."""
        result: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
        for tenant, transport in pairs:
            key = via_key(tenant, transport)
            spans = {}
            for span in SPANS:
                window = Window(span, self._zone())
                spans[span.value] = (await self._counters.count(key, window, now),
                                     await self._counters.count(key + ":rcpt", window, now))
            result[(tenant, transport)] = spans
        return result

    async def drain(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
