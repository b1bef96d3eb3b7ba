"""The tests' event loop: uvloop by default, the loop relayd ships with; plain
asyncio on request (RELAYD_TEST_LOOP=asyncio), which scripts/test runs as a
second pass over the in-process tests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import uvloop

from tests.conftest import PROCESS_ONLY_MODULES
from tests.eventloop import TEST_LOOP, chosen_loop, new_test_loop, run_on_test_loop
from tests.relayenv import RelayFiles, RelayThread, capture_files

TESTS = Path(__file__).resolve().parent


def test_the_default_test_loop_is_uvloop_and_asyncio_is_only_chosen_by_name() -> None:
    assert chosen_loop({}) == "uvloop"
    assert chosen_loop({"RELAYD_TEST_LOOP": ""}) == "uvloop"
    assert chosen_loop({"RELAYD_TEST_LOOP": "uvloop"}) == "uvloop"
    assert chosen_loop({"RELAYD_TEST_LOOP": "asyncio"}) == "asyncio"
    with pytest.raises(ValueError, match=r"^RELAYD_TEST_LOOP='trio': use one of uvloop, asyncio$"):
        chosen_loop({"RELAYD_TEST_LOOP": "trio"})


def test_this_pass_runs_on_the_loop_its_environment_names() -> None:
    assert TEST_LOOP == chosen_loop(os.environ)
    if "RELAYD_TEST_LOOP" not in os.environ:  # the default pass is the production loop
        assert TEST_LOOP == "uvloop"


def test_asyncio_run_and_the_test_loop_helpers_use_the_chosen_loop() -> None:
    async def probe() -> bool:
        return isinstance(asyncio.get_running_loop(), uvloop.Loop)

    on_uvloop = TEST_LOOP == "uvloop"
    assert asyncio.run(probe()) is on_uvloop
    assert run_on_test_loop(probe()) is on_uvloop
    loop = new_test_loop()
    try:
        assert isinstance(loop, uvloop.Loop) is on_uvloop
    finally:
        loop.close()


def test_in_process_relays_run_on_the_chosen_loop(relay_files: RelayFiles) -> None:
    capture_files(relay_files)
    with RelayThread(relay_files.config) as thread:
        assert isinstance(thread.loop, uvloop.Loop) is (TEST_LOOP == "uvloop")


def test_every_module_left_out_of_the_asyncio_pass_exists() -> None:
    assert {name for name in PROCESS_ONLY_MODULES if not (TESTS / f"{name}.py").exists()} == set()
