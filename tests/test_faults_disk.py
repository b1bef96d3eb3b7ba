"""A full disk against the real relayd process: bounces pending, a restart while still full, space returning."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from relayd.ops.controlclient import ControlClient
from relayd.ops.queueview import status_lines
from tests.eventloop import new_test_loop
from tests.relayenv import RelaydProcess, RelayFiles, submit, wait_until
from tests.test_durability import (
    ACME, GLOBEX, MANY, _spool_file, copies, fill, mail_from_reply, tmpfs, two_routes,
)


def test_a_restart_while_the_disk_is_still_full_sends_nothing_twice_and_the_bounce_goes_out_once(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    spool_dir = relay_files.root / "spool"
    with tmpfs(spool_dir, "4m"):
        up_a, up_b = two_routes(relay_files, upstreams, min_free="64K")
        up_a.reply_to("RCPT", "550 5.1.1 No such user", for_address="gone@customer.test")
        up_b.reply_to("DATA", "250 2.0.0 OK queued", delay=2.0, times=1)  # B answers late, once
        relay = RelaydProcess(relay_files)
        try:
            recipients = ["first@customer.test", "gone@customer.test", *MANY]
            message_id = submit(relay_files, ACME, "billing@acme.example", recipients)
            up_a.wait_for_messages(1)
            wait_until(lambda: b'"delivered"' in _spool_file(spool_dir, message_id), 5, "A's outcome recorded")
            assert (spool_dir / "emergency-reserve").exists()
            filler = fill(spool_dir)
            relay_files.wait_for_log("emergency reserve file", timeout=10)
            relay_files.wait_for_log(f"{message_id} delivery state recorded", timeout=10)
            assert mail_from_reply(relay_files, GLOBEX, "news@globex.example")[0] == 452
            status = ControlClient(spool_dir / "control.sock", timeout=30).request("status")
            assert status["spool"]["unrecorded"] == {}
            assert any("emergency reserve file is used" in line for line in status_lines(status, time.time()))
            relay.stop()  # a restart while the disk is still full
            relay = RelaydProcess(relay_files)
            time.sleep(4)  # queue runs go by on the full disk
            assert mail_from_reply(relay_files, GLOBEX, "news@globex.example")[0] == 452
            filler.unlink()
            relay_files.wait_for_log(f"{message_id} Completed", timeout=20)
            wait_until(lambda: sum(m.mail_from == "" for m in up_b.messages) == 1, 15, "the bounce delivered")
            time.sleep(2)
        finally:
            relay.stop()
    log = relay_files.mainlog()
    assert copies(up_a, "first@customer.test") == 1, log
    assert all(copies(up_b, address) == 1 for address in MANY), [copies(up_b, a) for a in MANY[:3]]
    assert log.count("** gone@customer.test") == 1
    bounces = [m for m in up_b.messages if m.mail_from == ""]
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["billing@acme.example"]


def test_a_flooding_tenant_is_held_to_its_share_others_go_on_and_its_share_frees_after_delivery(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, up_b = two_routes(relay_files, upstreams, min_free="1M")
    with relay_files.config.open("a") as f:
        f.write("  tenant_max_messages: 5\n")
    up_b.refuse_connections()  # acme's mail to B queues up
    with RelaydProcess(relay_files):
        for n in range(5):
            submit(relay_files, ACME, "billing@acme.example", [f"r{n}@elsewhere.test"])
        for _ in range(3):
            code, text = mail_from_reply(relay_files, ACME, "billing@acme.example")
            assert code == 452 and text.startswith(b"4.3.1 Queue share of tenant acme is full")
            submit(relay_files, GLOBEX, "news@globex.example", ["g@customer.test"])
        up_a.wait_for_messages(3)
        up_b.accept_connections()
        wait_until(lambda: len(up_b.messages) == 5, 20, "acme's backlog delivered")
        wait_until(lambda: mail_from_reply(relay_files, ACME, "billing@acme.example")[0] == 250, 10,
                   "acme accepted again once its mail left the queue")
        submit(relay_files, ACME, "billing@acme.example", ["again@elsewhere.test"])
        wait_until(lambda: len(up_b.messages) == 6, 10, "acme's new mail delivered")


def test_a_held_outcome_is_written_at_stop_when_the_disk_works_again_so_a_restart_sends_nothing_twice(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    from tests.relayenv import RelayThread
    from tests.test_durability import BrokenStateWrites

    up_a, up_b = two_routes(relay_files, upstreams)
    io = BrokenStateWrites()
    io.broken.set()
    with RelayThread(relay_files.config, spool_io=io, loop_factory=new_test_loop):
        message_id = submit(relay_files, ACME, "billing@acme.example", ["first@customer.test", "second@elsewhere.test"])
        relay_files.wait_for_log(f"{message_id} cannot record delivery state", timeout=10)
        io.broken.clear()  # the disk works again, and relayd stops before its next try
    assert f"{message_id} stopping with its last delivery outcome unrecorded" not in relay_files.mainlog()
    with RelayThread(relay_files.config, loop_factory=new_test_loop):
        relay_files.wait_for_log(f"{message_id} Completed", timeout=15)
    assert copies(up_a, "first@customer.test") == 1 and copies(up_b, "second@elsewhere.test") == 1
