"""Measuring a server from outside: CPU time, memory, the disk's fsync rate, statistics.

Takes: process ids (a server's main process) or a cgroup that holds all of a
server's processes; a directory on the disk the spools live on.
Emits: plain numbers (CPU seconds, bytes, rates) and small summaries.
Untrusted input: none (reads /proc and /sys of processes this harness started).
How it fails: a process that vanished mid-sample is skipped; when cgroups
cannot be created (a CI container), CPU falls back to /proc of the live
process tree, which misses children that already exited; the result says
which method was used.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_CPUACCT = Path("/sys/fs/cgroup/cpuacct")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values (not 0, which would look like a result)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(round(fraction * len(ordered) + 0.5))))
    return ordered[rank - 1]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class ProcessGroup:
    """All processes of one server: a cpuacct cgroup when possible, else a process tree."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = _CPUACCT / f"relaybench-{name}-{os.getpid()}"
        self.root_pid: int | None = None
        try:
            self.path.mkdir(exist_ok=True)
            self.method = "cgroup"
        except OSError:
            self.method = "proctree"

    def enter_command(self) -> list[str]:
        """A prefix that puts the command's process into the cgroup before it execs."""
        if self.method != "cgroup":
            return []
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def pids(self) -> list[int]:
        if self.method == "cgroup":
            try:
                return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return []
        return _tree(self.root_pid) if self.root_pid else []

    def cpu_seconds(self) -> float:
        """CPU time of every process that ever ran in the group (cgroup), or of the live tree."""
        if self.method == "cgroup":
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        return sum(_proc_cpu(pid) for pid in self.pids())

    def memory_bytes(self) -> int:
        """Summed PSS of the group's processes: shared pages (libraries, Postfix's
        many daemons) are counted once overall, not once per process as RSS would."""
        return sum(_pss(pid) for pid in self.pids())

    def remove(self) -> None:
        if self.method == "cgroup":
            try:
                self.path.rmdir()
            except OSError:
                pass


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / _CLOCK_TICKS


def _pss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples a group's memory every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, group: ProcessGroup, interval: float = 0.5) -> None:
        self.group = group
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self.group.memory_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.group.memory_bytes())


@dataclass(frozen=True)
class FsyncRate:
    append_fsync_per_s: float  # write 4 KiB to one file + fsync, repeated
    create_fsync_per_s: float  # create a file, write 5 KiB, fsync it and its directory (an MTA's 250)
    syncfs_per_s: float  # syncfs(2) after a small write (relayd's group commit)


def fsync_rate(directory: Path, seconds: float = 3.0, max_ops: int = 200000) -> FsyncRate:
    """The disk's raw durable-write rate, the ceiling for one-at-a-time durable 250s."""
    directory.mkdir(parents=True, exist_ok=True)
    return FsyncRate(
        append_fsync_per_s=_loop_rate(seconds, max_ops, _appender(directory)),
        create_fsync_per_s=_loop_rate(seconds, max_ops, _creator(directory)),
        syncfs_per_s=_loop_rate(seconds, max_ops, _syncfser(directory)),
    )


def _loop_rate(seconds: float, max_ops: int, op: "_Op") -> float:
    start = time.perf_counter()
    count = 0
    try:
        while count < max_ops and time.perf_counter() - start < seconds:
            op.step(count)
            count += 1
    finally:
        op.close()
    return count / (time.perf_counter() - start)


class _Op:
    def step(self, i: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _appender(_Op):
    def __init__(self, directory: Path) -> None:
        self.path = directory / "fsync-append.tmp"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def step(self, i: int) -> None:
        os.write(self.fd, b"x" * 4096)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()


class _creator(_Op):
    def __init__(self, directory: Path) -> None:
        self.dir = directory / "fsync-create.tmp"
        self.dir.mkdir(exist_ok=True)
        self.dir_fd = os.open(self.dir, os.O_RDONLY)
        self.names: list[Path] = []

    def step(self, i: int) -> None:
        path = self.dir / f"m{i}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"y" * 5120)
        os.fsync(fd)
        os.close(fd)
        os.fsync(self.dir_fd)
        self.names.append(path)

    def close(self) -> None:
        os.close(self.dir_fd)
        for path in self.names:
            path.unlink()
        self.dir.rmdir()


class _syncfser(_Op):
    def __init__(self, directory: Path) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.path = directory / "syncfs.tmp"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def step(self, i: int) -> None:
        os.write(self.fd, b"z" * 4096)
        if self.libc.syncfs(self.fd) != 0:
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()
