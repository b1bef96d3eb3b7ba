"""Shared fixtures: the test event loop, one test CA, relay files in a temporary directory, fake upstreams."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import pytest
import trustme

from relayd.ops.cli import main as relayctl_main

from tests.eventloop import TEST_LOOP, loop_policy
from tests.relayenv import RelayFiles

# Test modules every test of which starts the real relayd (always on uvloop) or
# only runs other programs: the plain-asyncio pass leaves them out. A test
# elsewhere that starts relayd is skipped there by RelaydProcess itself.
PROCESS_ONLY_MODULES = frozenset({
    "test_auth_throttling", "test_bench_smoke", "test_bounce_loop", "test_daemon_process", "test_data_flood",
    "test_dev_default", "test_fairness_process", "test_install", "test_local_identity", "test_process_hygiene",
    "test_real_clients", "test_syscall_order", "test_systemd", "test_typing",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TEST_LOOP == "uvloop":
        return
    left_out = [item for item in items if item.path.stem in PROCESS_ONLY_MODULES]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item.path.stem not in PROCESS_ONLY_MODULES]


@pytest.fixture(scope="session", autouse=True)
def production_event_loop() -> Iterator[None]:
    """In-process relays and asyncio.run() use uvloop, the loop relayd ships with
    (plain asyncio when RELAYD_TEST_LOOP=asyncio: see tests/eventloop.py)."""
    asyncio.set_event_loop_policy(loop_policy())
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


@pytest.fixture
def relayctl(relay_files: RelayFiles, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run relayctl in-process against the test relay.yaml; returns (status, stdout, stderr).

    `stdin` is text or a file object (a fake terminal, say); `environ` is
    relayctl's whole environment, empty unless given.
    """

    def run(*argv: str, stdin: str | TextIO = "", environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        code = relayctl_main(["--config", str(relay_files.config), *argv],
                             environ={} if environ is None else environ,
                             stdin=io.StringIO(stdin) if isinstance(stdin, str) else stdin)
        out, err = capsys.readouterr()
        return code, out, err

    return run
