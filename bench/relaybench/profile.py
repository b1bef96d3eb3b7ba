"""Where relayd spends its time under load: py-spy samples of a live relayd, summarised.

Takes: a scenario (plain via smtp-source when present, plain-lat, auth), sessions,
message count and size. Emits: py-spy's raw (collapsed) stacks in the work
directory and, on stdout, the functions with the most samples, by own time
and inclusive time. `--gil` samples only the thread holding the GIL (CPU
view); without it, threads waiting in system calls (syncfs, the writer pool)
show up too (wall-clock view).
Untrusted input: none. How it fails: without py-spy (installed on first use
into <work>/pyspy-venv from PyPI) it says so and exits 2.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from relaybench import clients
from relaybench.peers import ROOT, RelaydPeer, free_port, isolation_works
from relaybench.tlsfiles import make_tls_files

_FILE = re.compile(r" \((?:[^)]*/)?([^/)]+)\)")


def py_spy(work: Path) -> Path | None:
    venv = work / "pyspy-venv"
    exe = venv / "bin" / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "py-spy"], check=False)
    return exe if exe.exists() else None


def summarise(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [_FILE.sub(r" (\1)", f) for f in stack.split(";")]
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            incl[frame] += int(n)
    lines = [f"{total} samples"]
    for title, counter in (("own", own), ("inclusive", incl)):
        lines.append(f"-- {title}")
        lines += [f"{n * 100 / max(1, total):5.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile", description="py-spy profile of relayd under load")
    p.add_argument("--scenario", choices=("plain", "plain-lat", "auth"), default="plain")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "profile")
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    spy = py_spy(work)
    if spy is None:
        print("py-spy is not available (pip install py-spy failed)", file=sys.stderr)
        return 2
    tls = make_tls_files(work / "tls")
    sink = clients.Sink(free_port(), python=not clients.SMTP_SINK.exists(), log=work / "sink.log")
    sink.start()
    relay = RelaydPeer(work, port=free_port(), sink_port=sink.port, tls_dir=tls, password="profile-only",
                       isolate=isolation_works(work))
    raw = work / f"relayd-{args.scenario}-x{args.sessions}-{args.size // 1024}k.txt"
    try:
        relay.wipe_queue()
        relay.prepare()
        relay.start()
        assert relay.proc is not None
        cmd = [str(spy), "record", "-p", str(relay.proc.pid), "-o", str(raw), "-f", "raw", "-r", "200", "--nonblocking"]
        recorder = subprocess.Popen(cmd + (["--gil"] if args.gil else []), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        cpu0 = relay.group.cpu_seconds()
        if args.scenario == "plain" and clients.SMTP_SOURCE.exists():
            sub = clients.smtp_source(relay.port, sessions=args.sessions, messages=args.messages,
                                      size=args.size, timeout=600)
        else:
            mode = "auth" if args.scenario == "auth" else "plain"
            sub = clients.loadgen(relay.port, mode=mode, sessions=args.sessions, messages=args.messages,
                                  size=args.size, timeout=600, password="profile-only", cafile=tls / "ca.pem")
        sink.wait_for(sub.accepted, 120)
        cpu = relay.group.cpu_seconds() - cpu0
        recorder.send_signal(2)
        recorder.wait(timeout=60)
    finally:
        relay.close()
        sink.stop()
    print(f"{args.scenario} x{args.sessions} {args.size} B: {sub.accepted} accepted at "
          f"{sub.accepted / sub.seconds:.0f}/s, relayd CPU {cpu / max(1, sub.accepted) * 1000:.2f} s/1k "
          f"({cpu / sub.seconds:.2f} cores); p50/p99 {sub.p50_ms}/{sub.p99_ms} ms")
    print(f"raw stacks: {raw}")
    print(summarise(raw, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
