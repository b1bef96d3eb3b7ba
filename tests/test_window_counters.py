"""Window counters: calendar windows, the in-memory reference and the SQLite store that outlives the process."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from relayd.observe.counters import DAY, HOUR, MINUTE, MONTH, MemoryCounters, Span, Window, WindowCounters
from relayd.observe.countstore import SqliteCounters

NOON = datetime(2026, 12, 1, 12, 30, 15, tzinfo=timezone.utc).timestamp()


def _utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def test_calendar_windows_start_and_end_on_the_boundaries_of_their_zone() -> None:
    assert MINUTE.bounds(NOON) == (_utc(2026, 12, 1, 12, 30), _utc(2026, 12, 1, 12, 31))
    assert HOUR.bounds(NOON) == (_utc(2026, 12, 1, 12), _utc(2026, 12, 1, 13))
    assert DAY.bounds(NOON) == (_utc(2026, 12, 1), _utc(2026, 12, 2))
    assert MONTH.bounds(NOON) == (_utc(2026, 12, 1), _utc(2027, 1, 1))
    berlin = Window(Span.DAY, ZoneInfo("Europe/Berlin"))
    assert berlin.bounds(NOON) == (_utc(2026, 11, 30, 23), _utc(2026, 12, 1, 23))
    # A day with a DST change is 23 hours long, and the window says so.
    spring = datetime(2026, 3, 29, 12, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    start, end = berlin.bounds(spring)
    assert end - start == 23 * 3600


async def _exercise(counters: WindowCounters) -> None:
    assert await counters.count("transport:a", DAY, NOON) == 0
    assert await counters.add("transport:a", DAY, 1, NOON) == 1
    assert await counters.add("transport:a", DAY, 2, NOON + 60) == 3
    assert await counters.add("transport:a", MINUTE, 1, NOON) == 1
    assert await counters.count("transport:a", DAY, NOON) == 3
    assert await counters.count("transport:b", DAY, NOON) == 0
    # The next day starts from nothing; the old day is still its own count.
    tomorrow = NOON + 86400
    assert await counters.count("transport:a", DAY, tomorrow) == 0
    assert await counters.add("transport:a", DAY, 1, tomorrow) == 1
    with pytest.raises(ValueError):
        await counters.add("transport:a", DAY, -1, NOON)


def test_memory_counters_count_per_key_and_window() -> None:
    asyncio.run(_exercise(MemoryCounters()))


def test_sqlite_counters_count_per_key_and_window_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteCounters.in_directory(tmp_path)
    asyncio.run(_exercise(store))
    assert (tmp_path / "counters.sqlite-wal").exists()
    store.close_now()


def _child_adds_then_waits(path: str, ready: "multiprocessing.synchronize.Event") -> None:
    async def main() -> None:
        store = SqliteCounters(Path(path))
        for _ in range(7):
            await store.add("transport:a", DAY, 1, NOON)
        ready.set()
        await asyncio.sleep(60)

    asyncio.run(main())


def test_sqlite_counts_survive_a_kill_9_of_the_process_that_wrote_them(tmp_path: Path) -> None:
    path = tmp_path / "counters.sqlite"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_child_adds_then_waits, args=(str(path), ready))
    child.start()
    try:
        assert ready.wait(30)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(10)
    store = SqliteCounters(path)
    assert store.count_now("transport:a", DAY, NOON) == 7
    store.close_now()


def test_a_file_that_is_not_a_counter_database_is_a_named_error(tmp_path: Path) -> None:
    from relayd.observe.counters import CounterError

    path = tmp_path / "counters.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    store = SqliteCounters(path)
    with pytest.raises(CounterError, match="counters.sqlite: cannot open the counter database"):
        store.open()
    store.close_now()


def test_concurrent_adds_are_committed_together_and_each_gets_its_own_running_total(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteCounters.in_directory(tmp_path)
        totals = await asyncio.gather(*(store.add("transport:a", DAY, 1, NOON) for _ in range(500)))
        assert sorted(totals) == list(range(1, 501))
        assert await store.count("transport:a", DAY, NOON) == 500
        await store.close()

    asyncio.run(main())


def test_an_add_the_store_cannot_write_fails_with_a_counter_error(tmp_path: Path) -> None:
    from relayd.observe.counters import CounterError

    async def main() -> None:
        store = SqliteCounters.in_directory(tmp_path)
        await store.add("transport:a", DAY, 1, NOON)
        await store.close()
        with pytest.raises(CounterError, match="closed"):
            await store.add("transport:a", DAY, 1, NOON)

    asyncio.run(main())
