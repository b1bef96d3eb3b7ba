"""The spool's streaming writer: format 2, locked from creation, linked into the queue only when complete."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import uvloop

from relayd.queue.spool import Spool, SpoolFullError, SpoolIO
from relayd.queue.spoolformat import MAGIC, MAGIC_STREAMED, format_message
from relayd.values import Envelope


def envelope(spool: Spool) -> Envelope:
    return Envelope(id=spool.new_id(), tenant="acme", sender="billing@acme.example",
                    recipients=("a@customer.test", "b@customer.test"), received_at=1_790_000_000.0, size=0,
                    header_message_id="<m@app.test>")


BODY = b"From: billing@acme.example\r\n\r\n" + b"line\r\n" * 50_000


def test_a_streamed_message_is_linked_into_the_queue_complete_and_reads_back(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, bool, bool]:
        spool = Spool(tmp_path / "spool")
        await spool.start()
        try:
            message = await spool.receive(envelope(spool))
            await message.begin(message.envelope)
            for start in range(0, len(BODY), 7777):
                await message.write(BODY[start:start + 7777])
            in_queue_before = spool.path_for(message.id).exists()
            entry = await message.commit()
            return entry.id, in_queue_before, (tmp_path / "spool" / "incoming" / entry.id).exists()
        finally:
            await spool.stop()

    message_id, in_queue_before, left_in_incoming = uvloop.run(scenario())
    assert not in_queue_before and not left_in_incoming
    fresh = Spool(tmp_path / "spool")
    loaded = fresh.load()
    assert [e.id for e in loaded.entries] == [message_id] and loaded.problems == []
    assert loaded.entries[0].envelope.size == len(BODY)
    assert loaded.entries[0].envelope.header_message_id == "<m@app.test>"
    assert fresh.read_body(message_id) == BODY
    assert fresh.path_for(message_id).read_bytes().startswith(MAGIC_STREAMED)


def test_the_writer_holds_the_lock_from_creation_and_abort_removes_the_file(tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, list[str]]:
        spool = Spool(tmp_path / "spool")
        await spool.start()
        try:
            message = await spool.receive(envelope(spool))
            path = tmp_path / "spool" / "incoming" / message.id
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                locked = False
            except BlockingIOError:
                locked = True
            finally:
                os.close(fd)
            await message.begin(message.envelope)
            await message.write(b"x" * 300_000)
            message.abort()
            return locked, os.listdir(tmp_path / "spool" / "incoming")
        finally:
            await spool.stop()

    locked, left = uvloop.run(scenario())
    assert locked and left == []
    assert Spool(tmp_path / "spool").load().entries == []


def test_start_sweeps_what_an_interrupted_reception_left_but_not_a_live_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.load()
    directory = tmp_path / "spool" / "incoming"
    directory.mkdir()
    (directory / "1xYPi4-0001It-VJ").write_bytes(MAGIC_STREAMED + b"{}\nbody ............ crc32 ........\nhal")
    live = directory / "1xYPi4-0001Iu-VJ"
    live.write_bytes(b"")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = spool.sweep_incoming()
    finally:
        os.close(fd)
    assert os.listdir(directory) == [live.name]
    assert removed == ["1xYPi4-0001It-VJ"]


def test_a_format_1_file_still_loads_beside_format_2(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.load()
    env = envelope(spool)
    spool.path_for(env.id).write_bytes(format_message(env, b"old\r\n"))
    loaded = spool.load()
    assert [e.id for e in loaded.entries] == [env.id] and loaded.problems == []
    assert spool.path_for(env.id).read_bytes().startswith(MAGIC)
    assert spool.read_body(env.id) == b"old\r\n"


class FullDisk(SpoolIO):
    """Writes fail with ENOSPC once `budget` bytes were written."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if self.budget <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return super().write(fd, data)


def test_a_full_disk_mid_stream_raises_spool_full_and_leaves_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(tmp_path / "spool", io=FullDisk(1_000_000))
        await spool.start()
        try:
            message = await spool.receive(envelope(spool))
            await message.begin(message.envelope)
            with pytest.raises(SpoolFullError):
                for _ in range(100):
                    await message.write(b"y" * 65536)
            message.abort()
        finally:
            await spool.stop()

    uvloop.run(scenario())
    assert os.listdir(tmp_path / "spool" / "incoming") == []
    assert Spool(tmp_path / "spool").load().entries == []
