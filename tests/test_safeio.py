"""relayd.safeio: a crash between any two steps leaves the old file or the new one, whole."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from relayd import safeio


class RecordingOps(safeio.FileOps):
    """The real system calls, with their order recorded and one step able to fail."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_at:
            raise OSError(5, f"injected failure at {name}")

    def open_new(self, path: Path, mode: int) -> int:
        self._step("open")
        return super().open_new(path, mode)

    def fchmod(self, fd: int, mode: int) -> None:
        self._step("fchmod")
        super().fchmod(fd, mode)

    def write(self, fd: int, data: memoryview) -> int:
        self._step("write")
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._step("fsync")
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self.calls.append("close")
        super().close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._step("rename")
        super().replace(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        self._step("link")
        super().link(src, dst)

    def unlink(self, path: Path) -> None:
        self.calls.append("unlink")
        super().unlink(path)

    def fsync_directory(self, directory: Path) -> None:
        self._step("fsync-dir")
        super().fsync_directory(directory)


def _leftovers(directory: Path, keep: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_the_file_is_written_then_synced_then_renamed_then_its_directory_synced(tmp_path: Path) -> None:
    ops = RecordingOps()
    safeio.write_file(tmp_path / "store", b"new", ops=ops)
    assert ops.calls == ["open", "fchmod", "write", "fsync", "close", "rename", "fsync-dir"]
    assert (tmp_path / "store").read_bytes() == b"new"
    assert _leftovers(tmp_path, "store") == []


@pytest.mark.parametrize("step", ["fchmod", "write", "fsync", "rename"])
def test_a_failure_before_the_rename_leaves_the_old_file_whole_and_no_temporary(
    tmp_path: Path, step: str
) -> None:
    target = tmp_path / "store"
    target.write_bytes(b"old contents")
    with pytest.raises(OSError, match=f"injected failure at {step}"):
        safeio.write_file(target, b"new contents", ops=RecordingOps(fail_at=step))
    assert target.read_bytes() == b"old contents"
    assert _leftovers(tmp_path, "store") == []


def test_a_failure_after_the_rename_leaves_the_new_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "store"
    target.write_bytes(b"old contents")
    with pytest.raises(OSError, match="fsync-dir"):
        safeio.write_file(target, b"new contents", ops=RecordingOps(fail_at="fsync-dir"))
    assert target.read_bytes() == b"new contents"
    assert _leftovers(tmp_path, "store") == []


def test_the_mode_is_set_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        safeio.write_file(tmp_path / "public", b"x", mode=0o644)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_a_private_file_is_0600_in_a_new_0700_directory(tmp_path: Path) -> None:
    target = tmp_path / "state" / "credentials"
    safeio.write_private_file(target, b"secret")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700


def test_a_rewrite_replaces_a_wider_mode_with_the_asked_one(tmp_path: Path) -> None:
    target = tmp_path / "store"
    target.write_bytes(b"old")
    target.chmod(0o666)
    safeio.write_private_file(target, b"new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_without_replace_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"the only copy of the key")
    with pytest.raises(FileExistsError):
        safeio.write_file(target, b"another key", replace=False)
    assert target.read_bytes() == b"the only copy of the key"
    assert _leftovers(tmp_path, "key") == []


def test_without_replace_a_new_file_is_linked_into_place(tmp_path: Path) -> None:
    ops = RecordingOps()
    safeio.write_file(tmp_path / "key", b"k", replace=False, ops=ops)
    assert ops.calls[-3:] == ["link", "unlink", "fsync-dir"]
    assert (tmp_path / "key").read_bytes() == b"k"
    assert _leftovers(tmp_path, "key") == []


def test_a_temporary_path_elsewhere_is_renamed_into_the_target_directory(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "new").mkdir()
    safeio.write_file(
        tmp_path / "new" / "m1", b"mail", directory_mode=None, temp_path=tmp_path / "tmp" / "m1"
    )
    assert (tmp_path / "new" / "m1").read_bytes() == b"mail"
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_file_root_rewrites_keeps_its_owner(tmp_path: Path) -> None:
    target = tmp_path / "store"
    target.write_bytes(b"old")
    os.chown(target, 4321, 4322)
    safeio.write_private_file(target, b"new", keep_owner=True)
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_new_file_root_writes_takes_its_directorys_owner(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    os.chown(directory, 4321, 4322)
    safeio.write_private_file(directory / "store", b"new", keep_owner=True)
    st = (directory / "store").stat()
    assert (st.st_uid, st.st_gid) == (4321, 4322)
