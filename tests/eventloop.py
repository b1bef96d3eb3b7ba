"""Which event loop the in-process tests run on.

uvloop, the loop relayd ships with, unless RELAYD_TEST_LOOP=asyncio asks for
plain asyncio: scripts/test runs the in-process tests a second time that way,
so code that only works by accident of one loop (an isinstance check on a
transport class, a callback order) shows up. The real `relayd` process
always runs on uvloop, so tests that start it are left out of the asyncio pass.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine, Mapping, TypeVar

import uvloop

LOOPS = ("uvloop", "asyncio")
T = TypeVar("T")


def chosen_loop(environ: Mapping[str, str]) -> str:
    """The loop named by RELAYD_TEST_LOOP; uvloop when it is unset or empty."""
    name = environ.get("RELAYD_TEST_LOOP") or "uvloop"
    if name not in LOOPS:
        raise ValueError(f"RELAYD_TEST_LOOP={name!r}: use one of {', '.join(LOOPS)}")
    return name


TEST_LOOP = chosen_loop(os.environ)


def loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """The policy asyncio.run() and asyncio.new_event_loop() follow during the tests."""
    return uvloop.EventLoopPolicy() if TEST_LOOP == "uvloop" else asyncio.DefaultEventLoopPolicy()


def new_test_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if TEST_LOOP == "uvloop" else asyncio.DefaultEventLoopPolicy().new_event_loop()


def run_on_test_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on the test loop, whatever the policy at the time."""
    with asyncio.Runner(loop_factory=new_test_loop) as runner:
        return runner.run(main)
