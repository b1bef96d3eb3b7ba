"""The test run itself: servers started by tests resolve names only on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.skipif(
    os.environ.get("RELAYD_TEST_PRIVATE_DNS") != "1",
    reason="scripts/test runs the suite in a private mount namespace only as root with unshare",
)
def test_servers_started_by_the_tests_see_only_a_loopback_resolver() -> None:
    nameservers = [
        line.split()[1]
        for line in Path("/etc/resolv.conf").read_text().splitlines()
        if line.startswith("nameserver") and len(line.split()) > 1
    ]
    assert nameservers == ["127.0.0.1"]
