"""Durability under a full disk, hung routes and killed receivers, on the production event loop.

A real tmpfs spool is filled while a delivery is in progress; relayd runs
in-process on uvloop or as the real `relayd` process; upstreams are real SMTP
servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from relayd.ops.cli_queue import mailq_main
from relayd.ops.controlclient import ControlClient
from relayd.ops.queueview import status_lines
from relayd.queue.spool import Spool, SpoolIO
from relayd.values import Envelope
from tests.eventloop import new_test_loop, run_on_test_loop
from tests.relayenv import (
    RelaydProcess, RelayFiles, RelayThread, TenantSpec, UpstreamSpec, connect, make_message, submit, wait_until,
)

ACME = ("acme", "acme-relay-password")
GLOBEX = ("globex", "globex-relay-password")
# Enough recipients that one state record needs more than a 4 KiB page: on a
# full tmpfs even the slack at the end of the file's last page cannot take it.
MANY = [f"recipient-number-{n:02d}-with-a-long-local-part@partner-b.test" for n in range(30)]


def need_root_mounts() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    need_root_mounts()
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC; returns it (delete it to free the space)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for size in (4096, 512, 1):  # whatever slack is left
            while True:
                try:
                    os.write(fd, chunk[:size])
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def two_routes(files: RelayFiles, upstreams: Callable[..., Any], *, min_free: str | None = None) -> tuple[Any, Any]:
    """acme: *@customer.test via upstream A, everything else via upstream B."""
    up_a = upstreams(users={"a@up.test": "pw-a"})
    up_b = upstreams(users={"b@up.test": "pw-b"})
    files.write(
        upstreams=[
            UpstreamSpec("up_a", up_a.port, "cred-a", "a@up.test", "pw-a"),
            UpstreamSpec("up_b", up_b.port, "cred-b", "b@up.test", "pw-b"),
        ],
        tenants=[
            TenantSpec("acme", ACME[1], ["*@acme.example"], [(["customer.test"], ["up_a"]), (["*"], ["up_b"])]),
            TenantSpec("globex", GLOBEX[1], ["*@globex.example"], [(["*"], ["up_a"])]),
        ],
    )
    if min_free is not None:
        with files.config.open("a") as f:
            f.write(f"spool_limits:\n  min_free: {min_free}\n")
    return up_a, up_b


def mail_from_reply(files: RelayFiles, login: tuple[str, str], sender: str) -> tuple[int, bytes]:
    with connect(files, login=login) as client:
        return client.mail(sender)


def copies(upstream: Any, address: str) -> int:
    return sum(address in m.rcpt_tos for m in upstream.messages)


# --- a full disk mid-delivery ------------------------------------------------------


def test_a_disk_filled_mid_delivery_sends_nothing_twice_loses_nothing_and_answers_452_until_space_returns(
    relay_files: RelayFiles, upstreams: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    spool_dir = relay_files.root / "spool"
    with tmpfs(spool_dir, "4m"):
        up_a, up_b = two_routes(relay_files, upstreams, min_free="64K")
        up_b.reply_to("DATA", "250 2.0.0 OK queued", delay=2.0, times=1)  # B answers late, once
        up_b.reply_to("RCPT", "451 4.3.0 Try this one later", for_address=MANY[-1], times=1)
        relay = RelayThread(relay_files.config, loop_factory=new_test_loop)
        with relay:
            recipients = ["first@customer.test", *MANY]
            message_id = submit(relay_files, ACME, "billing@acme.example", recipients)
            up_a.wait_for_messages(1)
            # A's recipient is on disk as delivered; B has the message and
            # answers in 2 s. Now the disk fills up, emergency reserve and all.
            wait_until(lambda: b'"delivered"' in _spool_file(spool_dir, message_id), 5, "A's outcome recorded")
            (spool_dir / "emergency-reserve").unlink()
            filler = fill(spool_dir)
            relay_files.wait_for_log(f"{message_id} cannot record delivery state", timeout=10)
            assert len(up_b.wait_for_messages(1)) == 1
            code, text = mail_from_reply(relay_files, GLOBEX, "news@globex.example")
            assert (code, text[:5]) == (452, b"4.3.1")
            control = ControlClient(spool_dir / "control.sock", timeout=30)
            status = control.request("status")
            assert message_id in status["spool"]["unrecorded"]
            assert "No space left" in status["spool"]["state_write_failure"]
            assert any("cannot record delivery state" in line for line in status_lines(status, time.time()))
            shown = control.request("queue.show", id=message_id)
            assert "No space left" in shown["cannot_record"]
            capsys.readouterr()
            assert mailq_main(["--config", str(relay_files.config)]) == 0
            listed = capsys.readouterr()
            assert message_id in listed.out
            assert f"{message_id} held: cannot record delivery state" in listed.err
            # Several retry intervals and queue runs go by: nothing is sent again.
            time.sleep(7)
            assert copies(up_a, "first@customer.test") == 1 and len(up_b.messages) == 1
            assert copies(up_b, MANY[-1]) == 0
            assert (mail_from_reply(relay_files, GLOBEX, "news@globex.example"))[0] == 452

            filler.unlink()
            relay_files.wait_for_log(f"{message_id} delivery state recorded", timeout=15)
            relay_files.wait_for_log(f"{message_id} Completed", timeout=5)
            wait_until(lambda: mail_from_reply(relay_files, GLOBEX, "news@globex.example")[0] == 250, 5,
                       "new mail accepted again")
            after = submit(relay_files, GLOBEX, "news@globex.example", ["later@customer.test"])
            wait_until(lambda: copies(up_a, "later@customer.test") == 1, 10, "new mail delivered")
        # A restart finds nothing left to send.
        with RelayThread(relay_files.config, loop_factory=new_test_loop):
            time.sleep(2)
    assert copies(up_a, "first@customer.test") == 1
    assert all(copies(up_b, address) == 1 for address in MANY)
    assert after


class BrokenStateWrites(SpoolIO):
    """A disk whose writes of delivery state fail with EIO while `broken` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = threading.Event()

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.broken.is_set() and bytes(data[:6]) == b'{"at":':
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().write(fd, data)


def test_an_io_error_recording_state_holds_the_message_without_resending_then_resumes(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, up_b = two_routes(relay_files, upstreams)
    up_b.reply_to("RCPT", "451 4.3.0 Try later", times=1)
    io = BrokenStateWrites()
    io.broken.set()
    with RelayThread(relay_files.config, spool_io=io, loop_factory=new_test_loop):
        message_id = submit(relay_files, ACME, "billing@acme.example", ["first@customer.test", "second@elsewhere.test"])
        relay_files.wait_for_log(f"{message_id} cannot record delivery state", timeout=10)
        assert "Input/output error" in relay_files.mainlog()
        assert mail_from_reply(relay_files, GLOBEX, "news@globex.example")[0] == 452
        time.sleep(6)  # past the retry interval and B's retry time: still nothing goes out
        assert copies(up_a, "first@customer.test") == 1 and up_b.messages == []
        io.broken.clear()
        relay_files.wait_for_log(f"{message_id} delivery state recorded", timeout=10)
        wait_until(lambda: copies(up_b, "second@elsewhere.test") == 1, 10, "B delivered once the state is on disk")
        relay_files.wait_for_log(f"{message_id} Completed", timeout=5)
        assert mail_from_reply(relay_files, GLOBEX, "news@globex.example")[0] == 250
    assert copies(up_a, "first@customer.test") == 1 and copies(up_b, "second@elsewhere.test") == 1


class NoRoomForNewFiles(SpoolIO):
    """A disk that takes appends but has no room for a new message file (a bounce) while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = threading.Event()

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        if self.full.is_set() and flags & os.O_EXCL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().open(path, flags, mode)


def test_a_bounce_that_cannot_be_queued_holds_the_message_and_nothing_is_sent_twice(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, up_b = two_routes(relay_files, upstreams)
    up_b.reply_to("RCPT", "550 5.1.1 No such user", for_address="gone@elsewhere.test", delay=1.0)
    io = NoRoomForNewFiles()
    with RelayThread(relay_files.config, spool_io=io, loop_factory=new_test_loop):
        message_id = submit(relay_files, ACME, "billing@acme.example", ["first@customer.test", "gone@elsewhere.test"])
        io.full.set()
        relay_files.wait_for_log(f"{message_id} cannot record delivery state", timeout=10)
        time.sleep(6)  # retry interval and queue runs go by
        log = relay_files.mainlog()
        assert log.count("** gone@elsewhere.test") == 1 and copies(up_a, "first@customer.test") == 1
        assert up_b.messages == []  # no bounce yet: it could not be queued
        io.full.clear()
        relay_files.wait_for_log(f"{message_id} delivery state recorded", timeout=10)
        relay_files.wait_for_log(f"{message_id} Completed", timeout=5)
        (bounce,) = up_b.wait_for_messages(1)
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["billing@acme.example"]
    assert relay_files.mainlog().count("** gone@elsewhere.test") == 1
    assert copies(up_a, "first@customer.test") == 1


def test_under_the_free_space_reserve_mail_from_and_data_get_452_and_other_work_goes_on(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    spool_dir = relay_files.root / "spool"
    with tmpfs(spool_dir, "8m"):
        up_a, _up_b = two_routes(relay_files, upstreams, min_free="2M")
        with RelayThread(relay_files.config, loop_factory=new_test_loop):
            with connect(relay_files, login=ACME) as client:
                assert client.mail("billing@acme.example")[0] == 250
                assert client.rcpt("x@customer.test")[0] == 250
                ballast = spool_dir / "ballast"
                ballast.write_bytes(b"\0" * (7 * 1024 * 1024))  # leaves under 2M free
                time.sleep(1.2)  # statvfs is cached for one second
                code, text = client.docmd("DATA")
                assert (code, text[:5]) == (452, b"4.3.1")
            assert mail_from_reply(relay_files, ACME, "billing@acme.example")[0] == 452
            ballast.unlink()
            time.sleep(1.2)
            submit(relay_files, ACME, "billing@acme.example", ["x@customer.test"])
            up_a.wait_for_messages(1)
    log = relay_files.mainlog()
    assert "under the reserve of 2097152 bytes" in log


def test_one_tenant_over_its_queue_share_is_refused_and_the_others_are_not(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, up_b = two_routes(relay_files, upstreams, min_free="1M")
    with relay_files.config.open("a") as f:
        f.write("  tenant_max_messages: 3\n")
    up_b.refuse_connections()  # acme's mail to B queues up
    with RelayThread(relay_files.config, loop_factory=new_test_loop):
        for n in range(3):
            submit(relay_files, ACME, "billing@acme.example", [f"r{n}@elsewhere.test"])
        code, text = mail_from_reply(relay_files, ACME, "billing@acme.example")
        assert code == 452 and text.startswith(b"4.3.1 Queue share of tenant acme is full")
        submit(relay_files, GLOBEX, "news@globex.example", ["g@customer.test"])
        up_a.wait_for_messages(1)


def _spool_file(spool_dir: Path, message_id: str) -> bytes:
    path = spool_dir / "queue" / message_id[5] / message_id
    return path.read_bytes() if path.exists() else b""


# --- each route group's outcome is committed at once -----------------------------------


def test_a_recipient_delivered_before_a_later_route_hangs_is_not_sent_again_after_kill_9(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, up_b = two_routes(relay_files, upstreams)
    up_b.drop_at("MAIL", delay=8.0, times=1)  # route B hangs, then the connection drops
    with RelaydProcess(relay_files) as relayd:
        submit(relay_files, ACME, "billing@acme.example", ["first@customer.test", "second@elsewhere.test"])
        up_a.wait_for_messages(1)
        relay_files.wait_for_log("=> first@customer.test", timeout=5)
        time.sleep(0.5)  # B is still hanging
        relayd.kill()
    with RelaydProcess(relay_files):
        wait_until(lambda: copies(up_b, "second@elsewhere.test") == 1, 20, "B delivered after restart")
        relay_files.wait_for_log("Completed", timeout=5)
        time.sleep(1)
    assert copies(up_a, "first@customer.test") == 1


# --- the start-up scan and live writers ------------------------------------------------


class StallAfterCreate(SpoolIO):
    """Holds the writer for `stall` seconds right after it created a message file (whole or streamed)."""

    def __init__(self, stall: float) -> None:
        super().__init__()
        self.stall = stall
        self.created = threading.Event()

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        fd = super().open(path, flags, mode)
        being_written = path.parent.parent.name == "queue" or path.parent.name == "incoming"
        if flags & os.O_EXCL and being_written and not self.created.is_set():
            self.created.set()
            time.sleep(self.stall)
        return fd


def test_a_scan_while_a_writer_is_stalled_for_two_seconds_leaves_its_file_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    io = StallAfterCreate(2.0)
    body = b"Subject: x\r\n\r\nhello\r\n"

    async def main() -> tuple[Any, Any]:
        spool = Spool(root, io=io)
        await spool.start()
        spool.load()
        env = Envelope(spool.new_id(), "acme", "a@acme.example", ("b@x.test",), time.time(), len(body))
        writing = asyncio.ensure_future(spool.accept(env, body))
        await asyncio.to_thread(io.created.wait, 5)
        second = await asyncio.to_thread(spool.load)
        entry = await writing
        await spool.stop()
        return second, entry

    second, entry = run_on_test_loop(main())
    assert second.entries == [] and second.problems == [] and second.discarded == []
    assert list((root / "corrupt").iterdir()) == []
    assert Spool(root).read_body(entry.id) == body


def test_a_message_whose_writer_stalls_during_a_second_scan_is_delivered_after_its_250(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, _up_b = two_routes(relay_files, upstreams)
    io = StallAfterCreate(2.0)
    with RelayThread(relay_files.config, spool_io=io, loop_factory=new_test_loop) as relay:
        replies: list[str] = []
        sender = threading.Thread(
            target=lambda: replies.append(submit(relay_files, ACME, "billing@acme.example", ["x@customer.test"]))
        )
        sender.start()
        assert io.created.wait(10)
        second = relay.relay.spool.load()  # a second scan while the writer of a message is stalled
        sender.join(20)
        assert replies, "no 250"
        (got,) = up_a.wait_for_messages(1)
    assert got.rcpt_tos == ["x@customer.test"]
    assert second.problems == [] and second.discarded == []
    assert list((relay_files.root / "spool" / "corrupt").iterdir()) == []


def test_at_start_incomplete_files_are_removed_with_a_log_line_and_damaged_ones_set_aside(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, _up_b = two_routes(relay_files, upstreams)
    spool = Spool(relay_files.root / "spool")
    body = b"Subject: x\r\n\r\nhello\r\n"

    async def accept(n: int) -> str:
        env = Envelope(spool.new_id(), "acme", "a@acme.example", (f"r{n}@customer.test",), time.time(), len(body))
        return (await spool.accept(env, body)).id

    ids = [asyncio.run(accept(n)) for n in range(4)]
    cut_empty, cut_header, cut_body, damaged = (spool.path_for(i) for i in ids)
    cut_empty.write_bytes(b"")
    cut_header.write_bytes(cut_header.read_bytes()[:20])
    cut_body.write_bytes(cut_body.read_bytes()[:-25])
    damaged.write_bytes(damaged.read_bytes().replace(b"relayd-end ", b"relayd-enX "))
    with RelaydProcess(relay_files):
        relay_files.wait_for_log("queue index loaded", timeout=10)
    log = relay_files.mainlog()
    for gone in ids[:3]:
        assert f"{gone} incomplete message from a stopped receiver discarded" in log
        assert not spool.path_for(gone).exists()
    assert f"queue/{damaged.parent.name}/{ids[3]}: trailer missing or damaged" in log
    corrupt = relay_files.root / "spool" / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == [ids[3], f"{ids[3]}.reason"]
    assert up_a.messages == []


def test_repeated_kill_9_under_load_leaves_corrupt_empty_and_loses_no_acknowledged_message(
    relay_files: RelayFiles, upstreams: Callable[..., Any]
) -> None:
    up_a, _up_b = two_routes(relay_files, upstreams)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    # Large bodies keep each file open for a while, so kills land mid-write.
    filler = ("x" * 998 + "\n") * 256

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                with connect(relay_files, login=ACME, timeout=5) as smtp:
                    while not stop.is_set():
                        i += 1
                        token = f"soak-{n}-{i}"
                        message = make_message("billing@acme.example", ["x@customer.test"], subject=token, body=filler)
                        smtp.sendmail("billing@acme.example", ["x@customer.test"], message)
                        with lock:
                            acknowledged.append(token)
            except Exception:
                time.sleep(0.05)  # relayd is down or was killed mid-session: nothing was acknowledged

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    relayd = RelaydProcess(relay_files)
    for w in workers:
        w.start()
    try:
        for kill in range(10):
            time.sleep(1.0 + 0.2 * (kill % 4))
            relayd.kill()
            relayd = RelaydProcess(relay_files)
    finally:
        stop.set()
        for w in workers:
            w.join(15)
    try:
        tokens = set(acknowledged)
        assert len(tokens) >= 30, f"only {len(tokens)} messages acknowledged under load"

        def delivered() -> set[str]:
            return {_subject(m.data) for m in up_a.messages}

        wait_until(lambda: tokens <= delivered(), 60, "every acknowledged message delivered")
    finally:
        relayd.stop()
    corrupt = relay_files.root / "spool" / "corrupt"
    assert list(corrupt.iterdir()) == []


def _subject(data: bytes) -> str:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"subject: "):
            return line[9:].decode()
    return ""
