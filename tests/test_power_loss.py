"""A power cut: the spool on a loop-mounted ext4 whose unsynced writes are lost at "power off".

A kill -9 cannot show a missing fsync: the page cache survives the process.
Here the spool is an ext4 file system on a loop device backed by an image
file. Everything relayd flushed (fsync, syncfs) has been handed to the loop
device and so sits in the image file; what it did not flush is still dirty in
the upper file system's page cache (the journal commits only every 10
minutes, dirty pages are written back after 30 s) and is not. Copying the
image at an instant, while relayd runs, is what the disk would hold if the
power went off then. The copy is mounted (the journal replays, as after a
crash) and every acknowledged message must be there, byte for byte.

The second test is the control: with fsync and syncfs turned into no-ops the
same cut must lose acknowledged mail, or the first test proves nothing.
Needs root, losetup and mkfs.ext4 (skipped with the reason otherwise).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from relayd.queue.spool import Spool, SpoolIO, SpoolEntryMissing
from tests.eventloop import new_test_loop
from tests.relayenv import RelayFiles, RelayThread, TenantSpec, UpstreamSpec, as_submitted, make_message, submit

ACME = ("acme", "acme-relay-password")
MESSAGES = 30


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def loop_mounted(image: Path, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    device = _run("losetup", "-f", "--show", str(image))
    try:
        _run("mount", "-t", "ext4", "-o", ",".join(options or ("defaults",)), device, str(where))
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def new_disk(image: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with image.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))


class NoFlush(SpoolIO):
    """The bug the power-cut test must catch: nothing is ever flushed to the device."""

    def fsync(self, fd: int) -> None:
        pass

    def syncfs(self, fd: int) -> None:
        pass


def cut_power_after_acknowledging(
    files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path, spool_io: SpoolIO | None
) -> tuple[dict[str, bytes], Path]:
    """Accept MESSAGES messages on a loop-mounted spool, copy the disk image at once; returns both."""
    image = tmp_path / "disk.img"
    new_disk(image)
    down = upstreams()
    down.refuse_connections()  # everything stays queued: the disk only gains
    files.write(
        upstreams=[UpstreamSpec("up", down.port, "cred", "u@up.test", "pw")],
        tenants=[TenantSpec("acme", ACME[1], ["*@acme.example"], [(["*"], ["up"])])],
        retry="F,1h,1h",
    )
    with files.config.open("a") as f:
        f.write("spool_limits:\n  min_free: 1M\n")  # the default reserve is larger than this small disk
    acknowledged: dict[str, bytes] = {}
    snapshot = tmp_path / "after-power-cut.img"
    # commit=600: the journal is committed only when relayd asks (fsync, syncfs).
    with loop_mounted(image, files.root / "spool", "commit=600"):
        with RelayThread(files.config, spool_io=spool_io, loop_factory=new_test_loop):
            for n in range(MESSAGES):
                message = make_message("billing@acme.example", ["x@customer.test"], subject=f"cut-{n}")
                acknowledged[submit(files, ACME, "billing@acme.example", ["x@customer.test"], message)] = message
            time.sleep(0.3)  # let the first delivery attempt's state record settle
            shutil.copyfile(image, snapshot)  # the power goes off now
    return acknowledged, snapshot


def surviving(snapshot: Path, where: Path, acknowledged: dict[str, bytes]) -> dict[str, bytes | None]:
    """Each acknowledged id with its body as the disk holds it after the cut (None: lost)."""
    found: dict[str, bytes | None] = {}
    with loop_mounted(snapshot, where):  # mounting replays the journal, as after a crash
        spool = Spool(where)
        loaded = spool.load()
        indexed = {e.id for e in loaded.entries}
        for message_id in acknowledged:
            try:
                found[message_id] = spool.read_body(message_id) if message_id in indexed else None
            except SpoolEntryMissing:
                found[message_id] = None
    return found


def intact(stored: bytes | None, sent: bytes) -> bool:
    """Whether the spool holds what the client sent (plus the trace fields relayd adds)."""
    if stored is None or not stored.startswith(b"Received: "):
        return False
    return as_submitted(stored, sent) == sent


def test_every_acknowledged_message_is_intact_after_a_power_cut(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    acknowledged, snapshot = cut_power_after_acknowledging(relay_files, upstreams, tmp_path, None)
    found = surviving(snapshot, tmp_path / "check", acknowledged)
    lost = [mid for mid, body in found.items() if not intact(body, acknowledged[mid])]
    assert len(acknowledged) == MESSAGES and lost == []


def test_the_power_cut_loses_acknowledged_mail_when_nothing_is_flushed(
    relay_files: RelayFiles, upstreams: Callable[..., Any], tmp_path: Path
) -> None:
    acknowledged, snapshot = cut_power_after_acknowledging(relay_files, upstreams, tmp_path, NoFlush())
    found = surviving(snapshot, tmp_path / "check", acknowledged)
    lost = [mid for mid, body in found.items() if not intact(body, acknowledged[mid])]
    assert len(lost) > MESSAGES // 2, f"only {len(lost)} of {MESSAGES} lost without any flush"
