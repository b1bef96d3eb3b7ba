"""What per-transport shaping costs on the delivery path, in CPU per message, without the noise of a
shared machine's sockets and disks.

    .venv/bin/python bench/shaping_cost.py [--messages 5000] [--rounds 5]

Runs the real scheduler, delivery walk, gate set (host retry state + shaping)
and hold book over an in-memory spool and a transport that accepts at once,
once with the transport unshaped and once with every limit set far above the
load, alternating, and prints the CPU microseconds per message of each (the
best round) and the difference. The window counts go to an in-memory store
both times: the SQLite writes run on their own thread and are the same with
or without limits.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from types import MappingProxyType

import uvloop

from relayd.config.model import (
    CredentialsConfig, ListenerConfig, RelayConfig, RouteRule, SmtpTransportConfig, TenantConfig,
)
from relayd.config.shaping import UNSHAPED, Shaping
from relayd.delivery.gates import GateSet
from relayd.delivery.holding import HoldBook
from relayd.delivery.shaping import ShapingGate
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.delivery.walk import DeliveryAgent
from relayd.observe.counters import MemoryCounters
from relayd.observe.events import NullSink
from relayd.queue.scheduler import Scheduler
from relayd.values import (
    AttemptOutcome, AttemptResult, Delivery, Envelope, QueueEntry, Recipient, RecipientResult, SmtpReply, Stage,
)

HIGH = Shaping(max_per_second=10_000.0, max_per_minute=1_000_000, max_per_hour=10_000_000,
               max_per_day=100_000_000, max_recipients_per_day=1_000_000_000)


class Accepting:
    name = "sink"

    async def send(self, delivery: Delivery) -> AttemptResult:
        ok = SmtpReply(250, "2.0.0 OK")
        return AttemptResult("sink", tuple(
            RecipientResult(a, AttemptOutcome.DELIVERED, Stage.AFTER_DATA, ok) for a in delivery.recipients))

    async def close(self) -> None:
        pass


class MemorySpool:
    def read_body(self, message_id: str) -> bytes:
        return b"Subject: x\r\n\r\nbody\r\n"

    async def update(self, entry: QueueEntry, *, durable: bool) -> None:
        pass

    def complete(self, message_id: str) -> None:
        pass


async def no_bounce(original: Envelope, dsn: bytes) -> None:
    raise AssertionError("nothing fails here")


def config(shaping: Shaping) -> RelayConfig:
    tenant = TenantConfig("bench", None, ("*@bench.example",), (RouteRule("all", ("*",), ("sink",)),))
    return RelayConfig(
        source=Path("relay.yaml"), hostname="relay.test", spool_dir=Path("/nonexistent"), log_file=None,
        credentials=CredentialsConfig(Path("/nonexistent/c")), listeners=(ListenerConfig(),),
        transports=MappingProxyType({"sink": SmtpTransportConfig("sink", "127.0.0.1", 1, shaping=shaping)}),
        tenants=MappingProxyType({"bench": tenant}),
    )


async def one_round(shaping: Shaping, messages: int) -> float:
    """CPU seconds per message for `messages` deliveries through the real scheduler and walk."""
    relay = config(shaping)
    gate = ShapingGate(relay.transport_shaping, MemoryCounters())
    sink = Accepting()
    agent = DeliveryAgent(
        config=lambda: relay, spool=MemorySpool(), transports=lambda: {"sink": sink},
        gates=GateSet([UpstreamHealth(), gate]), events=NullSink(), enqueue_bounce=no_bounce,
        build_dsn=lambda **_kw: b"",
    )
    holds = HoldBook(hold_until=agent.hold_until, gate_hold=agent.gate_hold, unrecorded=agent.unrecorded,
                     spacing=gate.spacing, config=lambda: relay, events=NullSink())
    scheduler = Scheduler(agent.deliver, max_parallel=20, hold_until=holds.hold_until, lane_of=agent.lane_of)
    now = time.time()
    scheduler.add_all(
        QueueEntry(Envelope(f"1bench-{n:06d}-00", "bench", "a@bench.example", ("r@x.test",), now, 100),
                   (Recipient("r@x.test"),))
        for n in range(messages)
    )
    started = time.process_time()
    while len(scheduler):
        scheduler.start_due()
        await asyncio.sleep(0)
    spent = time.process_time() - started
    await gate.drain()
    return spent / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    best = {"unshaped": float("inf"), "every limit set high": float("inf")}
    for _ in range(args.rounds):
        for label, shaping in (("unshaped", UNSHAPED), ("every limit set high", HIGH)):
            best[label] = min(best[label], uvloop.run(one_round(shaping, args.messages)))
    for label, seconds in best.items():
        print(f"{label:>22}: {seconds * 1e6:8.1f} us CPU per message (best of {args.rounds})")
    base, shaped = best["unshaped"], best["every limit set high"]
    print(f"{'difference':>22}: {(shaped - base) * 1e6:8.1f} us ({(shaped / base - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
