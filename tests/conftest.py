"""Shared fixtures: one test CA, relay files in a temporary directory, fake upstreams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trustme

from tests.relayenv import RelayFiles


@pytest.fixture(scope="session", autouse=True)
def production_event_loop() -> Iterator[None]:
    """In-process relays and asyncio.run() use uvloop, the loop relayd ships with."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    yield
    asyncio.set_event_loop_policy(None)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def relay_files(tmp_path: Path, ca: trustme.CA) -> RelayFiles:
    return RelayFiles(tmp_path / "relay", ca)


@pytest.fixture
def upstreams(ca: trustme.CA) -> Iterator[Callable[..., Any]]:
    """Factory for fake upstream SMTP servers sharing the test CA; all stopped at the end."""
    from tests.fakeupstream import FakeUpstream

    started: list[Any] = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("ca", ca)
        upstream = FakeUpstream(**kwargs)
        upstream.start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.stop()
