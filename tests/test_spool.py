"""The spool keeps its promise: 250 only once on disk, nothing acknowledged is ever lost.

Faults are injected through a `SpoolIO` subclass handed to the constructor;
the crash test kills a real child process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import random
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from relayd.queue.msgid import id_time, is_message_id, new_message_id
from relayd.queue.spool import (
    Spool,
    SpoolCorruptError,
    SpoolEntryMissing,
    SpoolFullError,
    SpoolIO,
    SpoolWriteError,
)
from relayd.queue.spoolformat import MAGIC, format_message
from relayd.values import Envelope, QueueEntry, RecipientState

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

TRICKY_BODY = (
    b"From: a@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n"
    + bytes(range(256))
    + b"\r\n.\r\n..two dots\r\n.\r\nbare\nlf and bare\rcr\r\n"
    + b"\nrelayd-end 00000000\n"  # a fake trailer inside the body must not confuse anything
    + b"last line without newline"
)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def envelope(spool: Spool, *, recipients: tuple[str, ...] = ("to@example.org",), body: bytes = b"x") -> Envelope:
    return Envelope(
        id=spool.new_id(),
        tenant="acme",
        sender="app@example.com",
        recipients=recipients,
        received_at=1_700_000_000.25,
        size=len(body),
        client_ip="127.0.0.1",
        client_helo="app.local",
        header_message_id="<m1@example.com>",
    )


class RecordingIO(SpoolIO):
    """Real I/O that logs each call in order and can fail chosen calls or slow the flush."""

    def __init__(
        self,
        *,
        fail: dict[str, int] | None = None,
        flush_delay: float = 0.0,
        gate: threading.Event | None = None,
    ) -> None:
        super().__init__()
        self.fail = dict(fail or {})
        self.flush_delay = flush_delay
        self.gate = gate
        self.flush_entered = threading.Event()
        self.events: list[tuple[str, str]] = []
        self.names: dict[int, str] = {}
        self._lock = threading.Lock()

    def log(self, kind: str, name: str = "") -> None:
        with self._lock:
            self.events.append((kind, name))

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k, _ in self.events if k == kind)

    def _maybe_fail(self, call: str) -> None:
        if call in self.fail:
            code = self.fail[call]
            raise OSError(code, os.strerror(code))

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        self._maybe_fail("open")
        fd = super().open(path, flags, mode)
        self.names[fd] = Path(path).name
        self.log("open", Path(path).name)
        return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._maybe_fail("write")
        n = super().write(fd, data)
        self.log("write", self.names.get(fd, ""))
        return n

    def fsync(self, fd: int) -> None:
        self._maybe_fail("fsync")
        super().fsync(fd)
        self.log("fsync", self.names.get(fd, ""))

    def syncfs(self, fd: int) -> None:
        self.flush_entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.log("syncfs_start")
        if self.flush_delay:
            time.sleep(self.flush_delay)  # a slow disk, so that requests pile up
        self._maybe_fail("syncfs")
        super().syncfs(fd)
        self.log("syncfs_done")


async def accept_one(spool: Spool, body: bytes = b"hello\r\n", **kw: tuple[str, ...]) -> QueueEntry:
    return await spool.accept(envelope(spool, body=body, **kw), body)


def queue_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "queue").rglob("*") if p.is_file())


# --- ids -------------------------------------------------------------------


def test_message_ids_are_path_safe_unique_and_carry_their_second() -> None:
    ids = [new_message_id(1_700_000_000.9) for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(is_message_id(i) and len(i) == 16 for i in ids)
    assert id_time(ids[0]) == 1_700_000_000.0
    assert sorted(ids) == ids  # one process: later ids sort later
    later = new_message_id(1_700_000_001.0)
    assert later > ids[-1]
    assert new_message_id(5.0, pid=1)[-2:] != new_message_id(5.0, pid=2)[-2:]
    with pytest.raises(ValueError):
        id_time("../../etc/passwd")


def test_path_for_refuses_anything_that_is_not_an_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    for bad in ("../x", "1hT3Xq-000004-2b/..", "", "1hT3Xq-000004-2"):
        with pytest.raises(ValueError):
            spool.path_for(bad)


# --- round trip and format -------------------------------------------------


@pytest.mark.parametrize("mode", ["syncfs", "fsync"])
def test_accepted_message_loads_back_with_identical_bytes(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "spool"

    async def scenario() -> QueueEntry:
        spool = Spool(root, flush_mode=mode)
        await spool.start()
        try:
            return await accept_one(spool, TRICKY_BODY, recipients=("a@example.org", "b@example.org"))
        finally:
            await spool.stop()

    accepted = run(scenario)
    assert all(r.state is RecipientState.PENDING for r in accepted.recipients)
    fresh = Spool(root)
    loaded = fresh.load()
    assert loaded.problems == []
    assert loaded.entries == [accepted]
    assert fresh.read_body(accepted.id) == TRICKY_BODY
    assert fresh.read_entry(accepted.id) == accepted


def test_spool_file_is_inspectable_with_head_and_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = run(lambda: accept_one(spool, b"Subject: hi\r\n\r\nbody\r\n"))
    data = spool.path_for(entry.id).read_bytes()
    lines = data.split(b"\n")
    assert data.startswith(MAGIC)
    assert lines[0] == b"relayd-spool 1"
    assert lines[1].startswith(b'{"id":"' + entry.id.encode() + b'"')
    assert b'"body_size":21' in lines[1] and b'"tenant":"acme"' in lines[1]
    assert lines[-2].startswith(b"relayd-end ") and len(lines[-2]) == len("relayd-end ") + 8
    assert spool.path_for(entry.id).parent.name == entry.id[5]


def test_id_collision_gets_a_fresh_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    env = envelope(spool)
    spool.load()  # creates the layout
    spool.path_for(env.id).write_bytes(b"someone else's file")
    entry = run(lambda: spool.accept(env, b"mine"))
    assert entry.id != env.id
    assert spool.read_body(entry.id) == b"mine"
    assert spool.path_for(env.id).read_bytes() == b"someone else's file"


# --- state records ---------------------------------------------------------


def test_state_records_replay_deferral_freeze_and_delivery(tmp_path: Path) -> None:
    root = tmp_path / "spool"

    async def scenario() -> QueueEntry:
        spool = Spool(root, clock=lambda: 1_700_000_100.0)
        await spool.start()
        try:
            entry = await accept_one(spool, recipients=("a@example.org", "b@example.org"))
            a, b = entry.recipients
            a = a.moved_to(RecipientState.DELIVERED, attempts=1)
            b = b.moved_to(
                RecipientState.DEFERRED,
                attempts=1,
                first_failure=1_700_000_050.0,
                next_attempt=1_700_000_950.5,
                last_error="421 4.7.0 try later",
                last_interval=900.0,
            )
            entry = QueueEntry(entry.envelope, (a, b), frozen=False)
            await spool.update(entry)  # not awaited to disk; stop() flushes it
            entry = QueueEntry(entry.envelope, (a, b), frozen=True)
            await spool.update(entry, durable=True)
            return entry
        finally:
            await spool.stop()

    expected = run(scenario)
    loaded = Spool(root).load()
    assert loaded.problems == []
    assert loaded.entries == [expected]
    assert loaded.entries[0].frozen
    assert loaded.entries[0].next_due() == 1_700_000_950.5


def test_message_with_all_recipients_final_is_completed_at_load(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    async def scenario() -> QueueEntry:
        entry = await accept_one(spool, recipients=("a@example.org", "b@example.org"))
        a, b = entry.recipients
        done = QueueEntry(
            entry.envelope,
            (a.moved_to(RecipientState.DELIVERED), b.moved_to(RecipientState.FAILED, last_error="550 no")),
        )
        await spool.update(done, durable=True)
        return done

    done = run(scenario)
    loaded = Spool(tmp_path / "spool").load()
    assert loaded.entries == []
    assert loaded.completed == [done.id]
    assert queue_files(tmp_path / "spool") == []


def test_torn_last_state_record_is_ignored_and_next_update_still_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = run(lambda: accept_one(spool))
    deferred = QueueEntry(
        entry.envelope, (entry.recipients[0].moved_to(RecipientState.DEFERRED, attempts=1),)
    )
    run(lambda: spool.update(deferred, durable=True))
    with open(spool.path_for(entry.id), "ab") as f:
        f.write(b'{"at":1,"frozen":true,"recipients":[{"addr')  # a crash mid-append
    loaded = Spool(tmp_path / "spool").load()
    assert loaded.entries == [deferred]
    assert loaded.problems == []

    frozen = QueueEntry(deferred.envelope, deferred.recipients, frozen=True)
    run(lambda: spool.update(frozen, durable=True))
    again = Spool(tmp_path / "spool").load()
    assert again.entries == [frozen]
    assert any("damaged state record" in p for p in again.problems)


def test_update_of_a_removed_message_says_it_is_missing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = run(lambda: accept_one(spool))
    assert spool.complete(entry.id) is True
    assert spool.complete(entry.id) is False
    assert spool.read_entry(entry.id) is None
    with pytest.raises(SpoolEntryMissing):
        run(lambda: spool.update(entry))
    with pytest.raises(SpoolEntryMissing):
        spool.read_body(entry.id)


# --- damaged files -----------------------------------------------------------


def test_message_file_cut_before_its_end_marker_is_discarded_as_never_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    good = run(lambda: accept_one(spool, b"fine\r\n"))
    bad = run(lambda: accept_one(spool, b"a body that will be cut short\r\n" * 10))
    path = spool.path_for(bad.id)
    original = path.read_bytes()
    os.truncate(path, len(original) - 30)

    loaded = Spool(root).load()
    assert [e.id for e in loaded.entries] == [good.id]
    assert loaded.discarded == [bad.id]
    assert loaded.problems == []
    assert not path.exists()
    assert loaded.corrupt_files == 0 and list((root / "corrupt").iterdir()) == []


@pytest.mark.parametrize(
    "cut",
    [0, 3, len(b"relayd-spool 1\n") + 5, -1],
    ids=["empty", "inside-format-line", "inside-envelope-line", "last-byte-of-marker"],
)
def test_every_incomplete_file_of_a_stopped_receiver_is_discarded(tmp_path: Path, cut: int) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    entry = run(lambda: accept_one(spool, b"body\r\n"))
    path = spool.path_for(entry.id)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    loaded = Spool(root).load()
    assert loaded.entries == [] and loaded.discarded == [entry.id] and loaded.problems == []
    assert not path.exists() and loaded.corrupt_files == 0


def test_complete_file_with_a_damaged_end_marker_is_set_aside_not_discarded(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    entry = run(lambda: accept_one(spool, b"a body\r\n" * 10))
    path = spool.path_for(entry.id)
    original = path.read_bytes()
    damaged = original.replace(b"\nrelayd-end ", b"\nrelayd-XXX ")
    path.write_bytes(damaged)

    loaded = Spool(root).load()
    assert loaded.entries == [] and loaded.discarded == []
    assert len(loaded.problems) == 1 and entry.id in loaded.problems[0]
    assert "trailer" in loaded.problems[0]
    assert (root / "corrupt" / entry.id).read_bytes() == damaged
    assert "trailer" in (root / "corrupt" / f"{entry.id}.reason").read_text()
    assert loaded.corrupt_files == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"relayd-spool 9\n{}\n", "unsupported spool format"),
        (b"relayd-spool 2\n{}\n" + b"x" * 40 + b"\n", "body size line is missing"),
        (b"relayd-spool 1\n{not json\n", "not valid JSON"),
        (b"relayd-spool 1\n{\"id\":\"x\"}\n", "missing"),
        (b"#!/bin/sh\nrm -rf /\n", "not a relayd spool file"),
    ],
)
def test_unreadable_header_is_set_aside_with_its_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.load()
    message_id = spool.new_id()
    spool.path_for(message_id).write_bytes(content)
    loaded = spool.load()
    assert loaded.entries == []
    assert len(loaded.problems) == 1 and reason in loaded.problems[0]
    assert (root / "corrupt" / message_id).read_bytes() == content
    assert reason in (root / "corrupt" / f"{message_id}.reason").read_text()


def test_read_body_detects_a_flipped_byte_and_set_aside_keeps_the_file(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    entry = run(lambda: accept_one(spool, b"Subject: x\r\n\r\nimportant words\r\n"))
    path = spool.path_for(entry.id)
    data = bytearray(path.read_bytes())
    at = data.index(b"important")
    data[at] ^= 0x20
    path.write_bytes(bytes(data))

    assert [e.id for e in spool.load().entries] == [entry.id]  # load reads no bodies
    with pytest.raises(SpoolCorruptError):
        spool.read_body(entry.id)
    moved = spool.set_aside(entry.id, "checksum mismatch at delivery")
    assert moved == root / "corrupt" / entry.id
    assert moved.read_bytes() == bytes(data)
    assert "checksum mismatch" in (root / "corrupt" / f"{entry.id}.reason").read_text()
    assert spool.load().entries == []


def test_spool_directories_are_0700_and_files_0600(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    spool = Spool(root)
    entry = run(lambda: accept_one(spool))
    for d in (root, root / "queue", root / "corrupt", spool.path_for(entry.id).parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(spool.path_for(entry.id).stat().st_mode) == 0o600
    spool.set_aside(entry.id, "test")
    for f in (root / "corrupt").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


# --- failures while writing and flushing -------------------------------------


@pytest.mark.parametrize(
    "fail, error",
    [
        ({"write": errno.ENOSPC}, SpoolFullError),
        ({"write": errno.EDQUOT}, SpoolFullError),
        ({"open": errno.ENOSPC}, SpoolFullError),
        ({"write": errno.EIO}, SpoolWriteError),
        ({"syncfs": errno.ENOSPC, "fsync": errno.ENOSPC}, SpoolFullError),
        ({"syncfs": errno.EIO, "fsync": errno.EIO}, SpoolWriteError),
    ],
)
def test_spool_errors_refuse_the_message_and_leave_no_file(
    tmp_path: Path, fail: dict[str, int], error: type[Exception]
) -> None:
    root = tmp_path / "spool"

    async def scenario() -> BaseException | None:
        spool = Spool(root, io=RecordingIO(fail=fail))
        await spool.start()
        try:
            await accept_one(spool, TRICKY_BODY)
        except Exception as exc:
            return exc
        finally:
            await spool.stop()
        return None

    raised = run(scenario)
    assert isinstance(raised, error)
    assert raised.smtp_code == (452 if error is SpoolFullError else 451)  # type: ignore[attr-defined]
    assert queue_files(root) == []
    assert Spool(root).load().entries == []


def test_syncfs_failure_on_another_file_is_settled_by_fsync_of_our_files(tmp_path: Path) -> None:
    io = RecordingIO(fail={"syncfs": errno.EIO})
    spool = Spool(tmp_path / "spool", io=io)

    async def scenario() -> QueueEntry:
        await spool.start()
        try:
            return await accept_one(spool)
        finally:
            await spool.stop()

    entry = run(scenario)
    assert spool.read_body(entry.id) == b"hello\r\n"
    assert io.count("fsync") >= 2  # the file and its directory


def test_unavailable_syncfs_falls_back_to_fsync_for_good(tmp_path: Path) -> None:
    io = RecordingIO(fail={"syncfs": errno.ENOSYS})
    spool = Spool(tmp_path / "spool", io=io)

    async def scenario() -> None:
        await spool.start()
        try:
            for _ in range(3):
                await accept_one(spool)
        finally:
            await spool.stop()

    run(scenario)
    assert io.count("syncfs_start") == 1  # tried once, then never again
    assert io.count("fsync") >= 6
    assert len(Spool(tmp_path / "spool").load().entries) == 3


def test_fsync_mode_fsyncs_each_file_and_its_directory(tmp_path: Path) -> None:
    io = RecordingIO()
    spool = Spool(tmp_path / "spool", flush_mode="fsync", io=io)

    async def scenario() -> QueueEntry:
        await spool.start()
        try:
            return await accept_one(spool)
        finally:
            await spool.stop()

    entry = run(scenario)
    assert io.count("syncfs_start") == 0
    fsynced = [name for kind, name in io.events if kind == "fsync"]
    assert entry.id in fsynced
    assert entry.id[5] in fsynced  # the shard directory that got the new name


# --- group commit ------------------------------------------------------------


def test_concurrent_accepts_share_flushes_and_each_returns_after_its_flush(tmp_path: Path) -> None:
    io = RecordingIO(flush_delay=0.01)
    spool = Spool(tmp_path / "spool", io=io)

    async def one(n: int) -> str:
        entry = await accept_one(spool, f"message {n}\r\n".encode())
        io.log("returned", entry.id)
        return entry.id

    async def scenario() -> list[str]:
        await spool.start()
        try:
            return await asyncio.gather(*(one(n) for n in range(50)))
        finally:
            await spool.stop()

    ids = run(scenario)
    flushes = io.count("syncfs_done")
    print(f"\n50 concurrent accepts needed {flushes} syncfs calls")
    assert 1 <= flushes <= 10
    events = io.events
    for message_id in ids:
        last_write = max(i for i, (k, n) in enumerate(events) if k == "write" and n == message_id)
        returned = events.index(("returned", message_id))
        starts = [i for i, (k, _) in enumerate(events) if k == "syncfs_start" and i > last_write]
        assert starts, f"{message_id} was never flushed after it was written"
        done_after = [i for i, (k, _) in enumerate(events) if k == "syncfs_done" and i > starts[0]]
        assert done_after and done_after[0] < returned, f"{message_id} returned before its flush"


def test_accept_cancelled_while_flushing_leaves_no_message(tmp_path: Path) -> None:
    gate = threading.Event()
    io = RecordingIO(gate=gate)
    root = tmp_path / "spool"

    async def scenario() -> tuple[int, bool]:
        spool = Spool(root, io=io)
        await spool.start()
        try:
            task = asyncio.create_task(accept_one(spool))
            while not io.flush_entered.is_set():
                await asyncio.sleep(0.005)
            written = len(queue_files(root))
            task.cancel()
            await asyncio.wait([task])
        finally:
            gate.set()
            await spool.stop()
        return written, task.cancelled()

    written, cancelled = run(scenario)
    assert (written, cancelled) == (1, True)
    assert queue_files(root) == []


def test_complete_waits_for_an_exclusive_lock_held_elsewhere(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    entry = run(lambda: accept_one(spool))
    path = spool.path_for(entry.id)
    holder = os.open(path, os.O_RDONLY)  # another open file description, like another process
    fcntl.flock(holder, fcntl.LOCK_SH)
    worker = threading.Thread(target=spool.complete, args=(entry.id,))
    worker.start()
    time.sleep(0.2)
    assert path.exists(), "removed while a reader held its lock"
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    worker.join(5)
    assert not path.exists()


# --- crash and scale ---------------------------------------------------------


def _read_acks(proc: subprocess.Popen[bytes], want: int, deadline: float) -> list[str]:
    assert proc.stdout is not None
    acks: list[str] = []
    buffer = b""
    fd = proc.stdout.fileno()
    while len(acks) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        acks.extend(line.split()[1].decode() for line in lines if line.startswith(b"ACK "))
    return acks


@pytest.mark.parametrize("round_no", [1, 2, 3])
def test_acknowledged_messages_survive_kill_9(tmp_path: Path, round_no: int) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kill_after = rng.randrange(30, 120)
    root = tmp_path / "spool"
    python = REPO / ".venv" / "bin" / "python"
    proc = subprocess.Popen(
        [str(python if python.exists() else sys.executable), str(REPO / "tests" / "spool_crash_child.py"), str(root)],
        stdout=subprocess.PIPE,
    )
    try:
        acks = _read_acks(proc, kill_after, time.monotonic() + 15)
        time.sleep(rng.random() * 0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.stdout is not None
        rest = proc.stdout.read()  # ACKs already in the pipe were acknowledged too
    finally:
        proc.kill()
        proc.wait(10)
    acks += [line.split()[1].decode() for line in rest.split(b"\n") if line.startswith(b"ACK ")]
    print(f"\nround {round_no} seed {seed}: killed after {len(acks)} acknowledged messages")
    assert len(acks) >= kill_after

    spool = Spool(root)
    loaded = spool.load()
    queued = {e.id for e in loaded.entries}
    missing = [a for a in acks if a not in queued]
    assert not missing, f"acknowledged but lost (seed {seed}): {missing}"
    for message_id in acks:
        body = spool.read_body(message_id)  # raises if the CRC does not match
        assert f"Message-Id: <{message_id}@crash.test>".encode() in body
        assert body.endswith(b"\r\nend\r\n")


def test_load_finds_twenty_thousand_spooled_messages(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.load()
    body = b"Subject: scale\r\n\r\n" + b"y" * 1500 + b"\r\n"
    started = time.perf_counter()
    for _ in range(20_000):
        env = envelope(spool, body=body)
        fd = os.open(spool.path_for(env.id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, format_message(env, body))
        os.close(fd)
    written = time.perf_counter() - started
    started = time.perf_counter()
    loaded = Spool(root).load()
    took = time.perf_counter() - started
    print(f"\nwrote 20,000 spool files in {written:.2f}s; load() took {took:.2f}s")
    assert len(loaded.entries) == 20_000
    assert loaded.problems == []
    assert spool.count_files() == 20_000
