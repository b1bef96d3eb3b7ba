"""Admission by room on the spool: the free-space reserve, the per-tenant share, a failing disk."""

from __future__ import annotations

from pathlib import Path

from relayd.config.model import SpoolLimits
from relayd.config.loader import load_config
from relayd.queue.spoolroom import DiskRoom, SpoolRoom, default_reserve
from relayd.values import Envelope, QueueEntry, Recipient

MB = 1024 * 1024
HERE = Path(__file__).resolve().parent


class Disk:
    """A file system whose free space the test sets; counts statvfs calls."""

    def __init__(self, free: int, total: int = 1000 * MB, files: int = 100_000) -> None:
        self.free, self.total, self.files, self.calls = free, total, files, 0

    def __call__(self, path: Path) -> DiskRoom:
        self.calls += 1
        return DiskRoom(self.total, self.free, self.files)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def room(disk: Disk, clock: Clock | None = None, limits: SpoolLimits = SpoolLimits(),
         failure: list[str] | None = None) -> SpoolRoom:
    return SpoolRoom(
        Path("/spool"), lambda: limits, lambda: 25 * MB, disk_room=disk, clock=clock or Clock(),
        state_failure=lambda: failure[0] if failure else None,
    )


def queued(message_id: str, tenant: str, size: int) -> QueueEntry:
    return QueueEntry(Envelope(message_id, tenant, "a@x.test", ("b@y.test",), 0.0, size), (Recipient("b@y.test"),))


def test_default_reserve_is_four_maximum_messages_plus_64_mib() -> None:
    assert default_reserve(25 * MB) == 164 * MB
    assert room(Disk(free=164 * MB)).reserve() == 164 * MB


def test_new_mail_is_refused_with_452_under_the_reserve_counting_the_declared_size() -> None:
    disk = Disk(free=200 * MB)
    r = room(disk)
    assert r.refusal("acme") is None
    assert r.refusal("acme", declared_size=40 * MB) == "452 4.3.1 Insufficient system storage; try again later"
    disk.free = 100 * MB
    r2 = room(disk)
    assert r2.refusal("acme") is not None and r2.refusal("acme").startswith("452 4.3.1")  # type: ignore[union-attr]


def test_free_space_is_asked_at_most_once_per_second() -> None:
    disk, clock = Disk(free=500 * MB), Clock()
    r = room(disk, clock)
    for _ in range(1000):
        r.refusal("acme")
    assert disk.calls == 1
    disk.free = 10 * MB
    clock.now = 1.0
    assert r.refusal("acme") is not None and disk.calls == 2


def test_running_out_of_inodes_refuses_like_running_out_of_bytes() -> None:
    assert room(Disk(free=500 * MB, files=10)).refusal("acme") is not None


def test_while_delivery_state_cannot_be_written_every_tenant_gets_452() -> None:
    failure: list[str] = []
    r = room(Disk(free=500 * MB), failure=failure)
    assert r.refusal("acme") is None
    failure.append("ENOSPC")
    assert r.refusal("globex") == "452 4.3.1 Insufficient system storage; try again later"
    failure.clear()
    assert r.refusal("globex") is None


def test_a_tenant_over_its_share_is_refused_alone_until_its_mail_leaves_the_queue() -> None:
    r = room(Disk(free=500 * MB), limits=SpoolLimits(tenant_max_messages=2, tenant_max_bytes=10 * MB))
    r.track(queued("1abcde-000001-00", "acme", 100))
    r.track(queued("1abcde-000001-00", "acme", 100))  # counted once
    assert r.refusal("acme") is None
    r.track(queued("1abcde-000002-00", "acme", 100))
    refused = r.refusal("acme")
    assert refused is not None and refused.startswith("452 4.3.1 Queue share of tenant acme is full")
    assert r.refusal("globex") is None
    r.forget("1abcde-000002-00")
    assert r.refusal("acme") is None
    assert r.refusal("acme", declared_size=10 * MB) is not None  # bytes share: 200 + 10M > 10M


def test_default_tenant_byte_share_is_half_the_file_system() -> None:
    r = room(Disk(free=900 * MB, total=1000 * MB))
    r.track(queued("1abcde-000001-00", "acme", 499 * MB))
    assert r.refusal("acme") is None
    assert r.refusal("acme", declared_size=2 * MB) is not None


def test_example_config_documents_the_spool_limits() -> None:
    config = load_config(HERE.parent / "config" / "relay.yaml", check_files=False)
    assert config.spool_limits == SpoolLimits(min_free=200 * MB, tenant_max_bytes=10 * 1024 * MB,
                                              tenant_max_messages=50_000)


def test_the_emergency_reserve_file_is_made_released_on_a_full_disk_and_put_back_when_there_is_room(
    tmp_path: Path,
) -> None:
    disk = Disk(free=500 * MB)
    r = SpoolRoom(tmp_path, lambda: SpoolLimits(), lambda: 25 * MB, disk_room=disk, clock=Clock(), cache_seconds=0)
    assert r.keep_emergency_reserve()
    assert r.emergency_reserve.stat().st_size == 8 * MB
    assert r.release_emergency_reserve() and not r.emergency_reserve.exists()
    assert not r.release_emergency_reserve()  # only once
    # The released reserve is not room for new mail: it must be put back first.
    disk.free = 164 * MB + 8 * MB
    assert r.refusal("acme") is not None
    assert not r.keep_emergency_reserve() and not r.emergency_reserve.exists()
    disk.free = 164 * MB + 16 * MB
    assert r.refusal("acme") is None
    assert r.keep_emergency_reserve() and r.emergency_reserve.exists()


def test_a_start_without_room_for_the_emergency_reserve_refuses_new_mail_until_there_is(tmp_path: Path) -> None:
    disk = Disk(free=164 * MB + MB)
    r = SpoolRoom(tmp_path, lambda: SpoolLimits(), lambda: 25 * MB, disk_room=disk, clock=Clock(), cache_seconds=0)
    assert not r.keep_emergency_reserve()
    assert r.refusal("acme") is not None
    disk.free = 200 * MB
    assert r.refusal("acme") is None
