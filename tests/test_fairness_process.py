"""Fairness through a real relayd process (uvloop): a slow backlog delays neither another tenant nor another upstream."""

from __future__ import annotations

import time
from typing import Any, Callable

from tests.relayenv import RelaydProcess, RelayFiles, TenantSpec, UpstreamSpec, connect, make_message, submit

ACME = ("acme", "acme-relay-password")
GLOBEX = ("globex", "globex-relay-password")
BACKLOG = 150
SLOW_DATA_REPLY = 3.0  # seconds the slow upstream takes to answer each message


def test_another_tenants_message_and_another_upstreams_mail_pass_a_150_message_slow_backlog(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    slow = upstreams(users={"acme@slow.test": "slow-password"})
    fast = upstreams(users={"shared@fast.test": "fast-password"})
    slow.reply_to("DATA", "250 2.0.0 OK queued, slowly", delay=SLOW_DATA_REPLY)
    relay_files.write(
        upstreams=[
            UpstreamSpec("slowmail", slow.port, "slow", "acme@slow.test", "slow-password"),
            UpstreamSpec("fastmail", fast.port, "fast", "shared@fast.test", "fast-password"),
        ],
        tenants=[
            TenantSpec("acme", ACME[1], ["*@acme.example"], [(["fast.test"], ["fastmail"]), (["*"], ["slowmail"])]),
            TenantSpec("globex", GLOBEX[1], ["*@globex.example"], [(["*"], ["fastmail"])]),
        ],
    )
    with RelaydProcess(relay_files):
        with connect(relay_files, login=ACME) as client:
            for i in range(BACKLOG):
                to = [f"customer{i}@slow-provider.test"]
                client.sendmail("news@acme.example", to, make_message("news@acme.example", to, f"news {i}"))
        submit(relay_files, GLOBEX, "billing@globex.example", ["client@customer.test"])
        globex_queued = time.monotonic()
        (globex_msg,) = fast.wait_for_messages(1, timeout=2.0)
        globex_wait = time.monotonic() - globex_queued
        submit(relay_files, ACME, "ceo@acme.example", ["partner@fast.test"])
        acme_queued = time.monotonic()
        fast.wait_for_messages(2, timeout=2.0)
        acme_fast_wait = time.monotonic() - acme_queued
        slow_in_progress = slow.live_connections
    assert globex_msg.mail_from == "billing@globex.example"
    assert globex_wait < 2.0 and acme_fast_wait < 2.0
    assert len(slow.received) < BACKLOG  # the backlog really was still there
    assert slow_in_progress <= 10  # transport max_parallel default: half of delivery.max_parallel
