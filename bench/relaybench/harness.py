"""The benchmark: relayd, Postfix and Exim side by side, interleaved, on this machine.

Takes: command-line options (see `bench/run --help`). Emits: a table on
stdout, a JSON file (bench/results/<stamp>.json and latest.json) and, after a
full run, bench/RESULTS.md. Untrusted input: none. How it fails: a server that
cannot start stops the run with its log tail; a run that does not finish in
its time limit is recorded with what it achieved, never retried silently.

Per run: the sink's count and the server's CPU time are read, the client
submits N messages, the time to the last 250 gives accepted msgs/s, the
time until the sink holds every accepted message gives end-to-end msgs/s,
CPU seconds are the server's cgroup's (every process it forked), memory is
the peak of its processes' summed PSS sampled every 0.5 s. Runs of one cell
are interleaved across servers (A B C, B C A, C A B, ...), medians reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from relaybench import clients, report
from relaybench.measure import PeakSampler, fsync_rate, median
from relaybench.peers import ROOT, EximPeer, Peer, PeerError, PostfixPeer, RelaydPeer, free_port, isolation_works
from relaybench.tlsfiles import make_tls_files

SCENARIOS = {
    # name: (client, mode, what it shows)
    "plain": ("smtp-source", "plain", "smtp-source, no TLS, no AUTH (client bound to 127.0.0.1)"),
    "plain-lat": ("loadgen", "plain", "bench loadgen, no TLS, no AUTH: submission latency"),
    "auth": ("loadgen", "auth", "bench loadgen from 127.0.0.3: STARTTLS + AUTH PLAIN per session"),
}
PEERS: dict[str, type[Peer]] = {"relayd": RelaydPeer, "postfix": PostfixPeer, "exim": EximPeer}
_PROBE_MESSAGES = 30  # per unrecorded probe run (at least 3 per session)
_MIN_MESSAGES, _MAX_MESSAGES = 50, 60000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description="relayd vs Postfix vs Exim, interleaved")
    p.add_argument("--smoke", action="store_true",
                   help="tiny CI run: relayd only, Python client and sink, no installs, < 60 s")
    p.add_argument("--no-install", action="store_true", help="skip bench/install.sh")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--servers", default="relayd,postfix,exim")
    p.add_argument("--scenarios", default="plain,plain-lat,auth", help='comma-separated; "none": queue test only')
    p.add_argument("--sizes", default="5120,102400", help="message payload sizes in bytes")
    p.add_argument("--sessions", default="1,20,100", help="concurrent sessions")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=12.0, help="target seconds of submission per run")
    p.add_argument("--queue", type=int, default=100000, help="messages queued for the mailq/start-up test (0: skip)")
    p.add_argument("--json", type=Path, default=None, help="where to write the JSON (default bench/results/)")
    p.add_argument("--no-results-md", action="store_true", help="do not rewrite bench/RESULTS.md")
    p.add_argument("--render", type=Path, default=None,
                   help="no run: print the tables of an earlier result (JSON) and rewrite bench/RESULTS.md")
    p.add_argument("--merge-into", type=Path, default=None,
                   help="re-measure some cells: replace them in this earlier full result (JSON), "
                        "recompute ratios and targets, and write the merged result")
    args = p.parse_args(argv)
    if args.smoke:
        args.servers, args.sizes, args.sessions = "relayd", "5120", "1,4"
        args.runs, args.queue, args.no_results_md = 1, 200, True
        args.work = Path(os.environ.get("RELAYBENCH_WORK", "/tmp/relaybench-smoke-%d" % os.getpid()))
    return args


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so the servers this run started are stopped on the way out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)
    args = parse_args(argv)
    if args.render is not None:
        return render_only(args)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not args.no_install:
        subprocess.run(["bash", str(ROOT / "bench" / "install.sh"), str(args.work)], check=True)
    bench = Bench(args)
    try:
        result = bench.run()
    finally:
        bench.close()
        if args.smoke and not os.environ.get("RELAYBENCH_WORK"):
            shutil.rmtree(args.work, ignore_errors=True)
    if args.merge_into is not None:
        result = merge_into(json.loads(args.merge_into.read_text()), result)
    text = report.render(result)
    print(text)
    out = args.json or ROOT / "bench" / "results" / f"{result['stamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.json is None:
        (out.parent / "latest.json").write_text(json.dumps(result, indent=1))
    print(f"JSON: {out}")
    if not args.no_results_md:
        (ROOT / "bench" / "RESULTS.md").write_text(report.results_md(result, text))
        print(f"table: {ROOT / 'bench' / 'RESULTS.md'}")
    return 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.smoke = args.smoke
        self.work = args.work
        self.password = secrets.token_urlsafe(18)
        self.tls = make_tls_files(self.work / "tls")
        self.isolate = isolation_works(self.work)
        self.python_sink = self.smoke or not clients.have_postfix_tools()
        self.peers: dict[str, Peer] = {}
        self.sinks: dict[str, clients.Sink] = {}
        self.rates: dict[tuple[str, str, int, int], float] = {}
        self.log_lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # -- set-up ------------------------------------------------------------------

    def start_servers(self) -> None:
        for name in self.args.servers.split(","):
            sink = clients.Sink(free_port(), python=self.python_sink, log=self.work / f"sink-{name}.log")
            sink.start()
            self.sinks[name] = sink
            peer = PEERS[name](self.work, port=free_port(), sink_port=sink.port, tls_dir=self.tls,
                               password=self.password, isolate=self.isolate)
            peer.wipe_queue()
            peer.prepare()
            peer.start()
            self.peers[name] = peer
            self.say(f"started {name} on 127.0.0.1:{peer.port} -> sink 127.0.0.1:{sink.port}")

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        for sink in self.sinks.values():
            sink.stop()

    # -- the whole run -----------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.say(f"work dir {self.work}; DNS isolation: {'on' if self.isolate else 'unavailable'}")
        fsync = fsync_rate(self.work / "fsync", seconds=0.3 if self.smoke else 3.0)
        self.start_servers()
        versions = {name: peer.version() for name, peer in self.peers.items()} | client_versions()
        capacity = {} if self.smoke or self.args.merge_into else self.client_capacity()
        cells = self.matrix()
        queue = self.queue_tests() if self.args.queue > 0 else {}
        result: dict[str, Any] = {
            "stamp": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": self.smoke,
            "elapsed_s": round(time.time() - started, 1),
            "machine": machine_facts(self.work),
            "versions": versions,  # taken when the servers started: the code that was measured
            "settings": {
                "servers": list(self.peers), "scenarios": self.scenario_names(),
                "sizes": self.sizes(), "sessions": self.sessions(), "runs": self.args.runs,
                "target_seconds_per_run": self.args.duration, "queue_messages": self.args.queue,
                "sink": "relaybench.sink (Python)" if self.python_sink else "Postfix smtp-sink",
                "dns_isolation": self.isolate,
                "cpu_accounting": next(iter(self.peers.values())).group.method if self.peers else None,
            },
            "scenarios": {k: self.describe(k) for k in self.scenario_names()},
            "tuning": {name: peer.tuning for name, peer in self.peers.items()},
            "fsync": asdict(fsync),
            "client_capacity": capacity,
            "cells": cells,
            "ratios": ratios(cells),
            "queue": queue,
        }
        result["targets"] = report.targets(result)
        return result

    def describe(self, scenario: str) -> str:
        client, mode, what = SCENARIOS[scenario]
        if client == "smtp-source" and (self.smoke or not clients.SMTP_SOURCE.exists()):
            return what.replace("smtp-source", "bench loadgen (smtp-source not used in this run)")
        return what

    def scenario_names(self) -> list[str]:
        return [s for s in self.args.scenarios.split(",") if s and s != "none"]

    def sizes(self) -> list[int]:
        return [int(x) for x in self.args.sizes.split(",")]

    def sessions(self) -> list[int]:
        return [int(x) for x in self.args.sessions.split(",")]

    def matrix(self) -> list[dict[str, Any]]:
        cells: list[dict[str, Any]] = []
        names = list(self.peers)
        for scenario in self.scenario_names():
            for size in self.sizes():
                for sessions in self.sessions():
                    if not self.smoke:
                        for name in names:
                            self.probe(name, scenario, size, sessions)
                    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
                    for i in range(self.args.runs):
                        order = names[i % len(names):] + names[:i % len(names)]
                        for name in order:
                            runs[name].append(self.one_run(name, scenario, size, sessions))
                    for name in names:
                        cells.append(summarise(name, scenario, size, sessions, runs[name]))
        return cells

    def probe(self, name: str, scenario: str, size: int, sessions: int) -> None:
        """A short unrecorded run at the cell's concurrency: warms the server up and measures
        the rate that sizes the recorded runs (servers scale very differently with sessions)."""
        self.one_run(name, scenario, size, sessions, count=max(_PROBE_MESSAGES, 3 * sessions), label="probe ")

    def message_count(self, name: str, scenario: str, size: int, sessions: int) -> int:
        if self.smoke:
            return 20 if scenario != "auth" else 12
        rate = self.rates.get((name, scenario, size, sessions), 100.0)
        return int(min(_MAX_MESSAGES, max(_MIN_MESSAGES, rate * self.args.duration)))

    def submit(self, port: int, scenario: str, size: int, sessions: int, count: int,
               timeout: float) -> clients.Submission:
        client, mode, _ = SCENARIOS[scenario]
        if client == "smtp-source" and not self.smoke and clients.SMTP_SOURCE.exists():
            return clients.smtp_source(port, sessions=sessions, messages=count, size=size, timeout=timeout)
        return clients.loadgen(port, mode=mode, sessions=sessions, messages=count, size=size, timeout=timeout,
                               password=self.password, cafile=self.tls / "ca.pem")

    def one_run(self, name: str, scenario: str, size: int, sessions: int, *, count: int | None = None,
                label: str = "") -> dict[str, Any]:
        peer, sink = self.peers[name], self.sinks[name]
        count = count or self.message_count(name, scenario, size, sessions)
        limit = max(60.0, self.args.duration * 4)
        baseline = sink.settle()  # stragglers of an earlier run must not count for this one
        cpu0 = peer.group.cpu_seconds()
        with PeakSampler(peer.group) as sampler:
            sub = self.submit(peer.port, scenario, size, sessions, count, limit)
            done = sink.wait_for(baseline + sub.accepted, max(30.0, sub.seconds * 5))
        cpu = peer.group.cpu_seconds() - cpu0
        accepted_rate = sub.accepted / sub.seconds if sub.accepted else 0.0
        run = {
            "messages": count, "accepted": sub.accepted, "submit_s": round(sub.seconds, 3),
            "accepted_per_s": round(accepted_rate, 1),
            "e2e_s": round(done - sub.start, 3) if done else None,
            "e2e_per_s": round(sub.accepted / (done - sub.start), 1) if done and sub.accepted else None,
            "sink_received": sink.count - baseline,
            "p50_ms": sub.p50_ms, "p99_ms": sub.p99_ms,
            "cpu_s_per_1k": round(cpu / sub.accepted * 1000, 3) if sub.accepted else None,
            "peak_mem_mb": round(sampler.peak / 1e6, 1),
            "client": sub.client, "client_cpu_s": sub.client_cpu_s, "errors": sub.errors,
        }
        if accepted_rate:
            self.rates[(name, scenario, size, sessions)] = accepted_rate
        self.say(f"{label}{scenario:9} {size // 1024:>3}K x{sessions:<3} {name:7} "
                 f"{run['accepted']}/{count} in {run['submit_s']}s = {run['accepted_per_s']}/s, "
                 f"e2e {run['e2e_per_s']}/s, p99 {run['p99_ms']} ms, cpu/1k {run['cpu_s_per_1k']}, "
                 f"mem {run['peak_mem_mb']} MB {'ERR ' + str(sub.errors)[:150] if sub.errors else ''}")
        return run

    # -- is the client the bottleneck? -------------------------------------------

    def client_capacity(self) -> dict[str, Any]:
        """Each client against a server that does nothing, at 20 sessions, 5 KB."""
        out: dict[str, Any] = {}
        sink = clients.Sink(free_port(), python=False, log=self.work / "capacity-sink.log")
        sink.start()
        try:
            n = int(max(2000, 1000 * self.args.duration))
            sub = clients.smtp_source(sink.port, sessions=20, messages=n, size=5120, timeout=120)
            out["smtp-source -> smtp-sink, plain, 20 sessions, 5 KB"] = {
                "msgs_per_s": round(sub.accepted / sub.seconds, 1), "client_cpu_s": sub.client_cpu_s,
                "messages": sub.accepted}
        finally:
            sink.stop()
        for mode, procs in (("plain", 1), ("auth", 2)):
            sink = clients.Sink(free_port(), python=True, log=self.work / "capacity-pysink.log",
                                tls_dir=self.tls if mode == "auth" else None, procs=procs)
            sink.start()
            try:
                n = int(max(1000, 400 * self.args.duration))
                sub = clients.loadgen(sink.port, mode=mode, sessions=20, messages=n, size=5120, timeout=120,
                                      password=self.password, cafile=self.tls / "ca.pem")
                out[f"loadgen -> Python null server ({procs} proc), {mode}, 20 sessions, 5 KB"] = {
                    "msgs_per_s": round(sub.accepted / sub.seconds, 1), "client_cpu_s": sub.client_cpu_s,
                    "messages": sub.accepted, "note": "lower bound: client and null server share 2 cores"}
            finally:
                sink.stop()
        for key, value in out.items():
            self.say(f"capacity: {key}: {value['msgs_per_s']}/s")
        return out

    # -- 100k queued: mailq and start-up -----------------------------------------

    def queue_tests(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, peer in self.peers.items():
            try:
                out[name] = self.queue_test(name, peer)
            except (PeerError, subprocess.SubprocessError, OSError) as error:
                out[name] = {"error": str(error)[:500]}
            self.say(f"queue {name}: {out[name]}")
        return out

    def queue_test(self, name: str, peer: Peer) -> dict[str, Any]:
        n = self.args.queue
        self.sinks[name].stop()  # the upstream is down from here on
        peer.stop()  # a fresh process with an empty queue: memory is the queue's, not the earlier runs'
        peer.wipe_queue()
        if isinstance(peer, EximPeer):
            peer.queue_only = True
        peer.start()
        with PeakSampler(peer.group) as sampler:
            if self.smoke or not clients.SMTP_SOURCE.exists():
                sub = clients.loadgen(peer.port, mode="plain", sessions=4, messages=n, size=1024, timeout=300,
                                      password=self.password, cafile=None)
            else:
                sub = clients.smtp_source(peer.port, sessions=20, messages=n, size=1024, timeout=1800,
                                          reuse_connection=True)
        result: dict[str, Any] = {
            "queued": sub.accepted, "inject_s": round(sub.seconds, 1),
            "inject_per_s": round(sub.accepted / sub.seconds, 1),
            "peak_mem_mb_while_queueing": round(sampler.peak / 1e6, 1), "errors": sub.errors,
        }
        time.sleep(1 if self.smoke else 5)
        result["mem_mb_queued"] = round(peer.group.memory_bytes() / 1e6, 1)
        result.update(self.time_mailq(peer))
        peer.stop()
        mark = peer.log_mark()
        with PeakSampler(peer.group, interval=0.2) as sampler:
            started = time.perf_counter()
            result["startup_s"] = round(peer.start(timeout=300), 3)  # until it answers 220
            index = peer.wait_fully_started(mark, timeout=600)
            if index is not None:  # relayd: the queue index is loaded in the background
                result["index_loaded_s"] = index
                result["fully_started_s"] = round(time.perf_counter() - started, 3)
            time.sleep(1 if self.smoke else 5)
        result["peak_mem_mb_after_start"] = round(sampler.peak / 1e6, 1)
        peer.stop()
        peer.wipe_queue()
        return result

    def time_mailq(self, peer: Peer) -> dict[str, Any]:
        cmd = peer.queue_list_command()
        if cmd is None:
            return {"mailq_s": None, "mailq": "not available yet (no .venv/bin/mailq)"}
        times, listed, rc = [], 0, 0
        for _ in range(3):
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, timeout=600, env=peer.env())
            times.append(time.perf_counter() - start)
            rc = out.returncode
            listed = count_listed(out.stdout)
        return {"mailq_s": round(median(times) or 0.0, 3), "mailq_listed": listed, "mailq_rc": rc,
                "mailq": " ".join(Path(cmd[0]).name.split()) + " " + " ".join(c for c in cmd[1:] if c.startswith("-"))}


def render_only(args: argparse.Namespace) -> int:
    result = json.loads(args.render.read_text())
    result["ratios"] = ratios(result["cells"])
    result["targets"] = report.targets(result)
    text = report.render(result)
    print(text)
    if not args.no_results_md:
        (ROOT / "bench" / "RESULTS.md").write_text(report.results_md(result, text))
    return 0


def merge_into(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`base` with the cells `new` measured replaced by `new`'s, noted under "remeasured"."""
    def key(c: dict[str, Any]) -> tuple[str, str, int, int]:
        return (c["server"], c["scenario"], c["size"], c["sessions"])

    fresh = {key(c): c for c in new["cells"]}
    everything = all(key(c) in fresh for c in base["cells"])
    base["cells"] = [fresh.pop(key(c), c) for c in base["cells"]] + list(fresh.values())
    base.setdefault("remeasured", []).append({
        "date": new["date"], "cells": "all" if everything else [list(key(c)) for c in new["cells"]],
        "queue": sorted(new.get("queue", {})), "tuning": new["tuning"], "versions": new["versions"]})
    if everything:  # the tables now show the new run's servers: say so in the header
        base["versions"] = new["versions"] | {k: v for k, v in base["versions"].items() if k not in new["versions"]}
    base["tuning"] = new["tuning"] | {k: v for k, v in base["tuning"].items() if k not in new["tuning"]}
    base["queue"] = base.get("queue", {}) | new.get("queue", {})
    base["ratios"] = ratios(base["cells"])
    base["targets"] = report.targets(base)
    base["stamp"] = new["stamp"]
    return base


_QUEUE_ID = re.compile(rb"^\s*(?:\d+[smhd]\s+\S+\s+)?([0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}"
                       rb"|[0-9A-F]{6,}\*?!?|[0-9A-Za-z]{12,})\b", re.M)


def count_listed(stdout: bytes) -> int:
    """Messages in a queue listing: Postfix's summary line if present, else lines starting with an id."""
    m = re.search(rb"in (\d+) Requests?\.", stdout)
    if m:
        return int(m.group(1))
    return len(_QUEUE_ID.findall(stdout))


def summarise(name: str, scenario: str, size: int, sessions: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("accepted_per_s", "e2e_per_s", "e2e_s", "p50_ms", "p99_ms", "cpu_s_per_1k", "peak_mem_mb", "submit_s")
    med = {k: median([r[k] for r in runs]) for k in keys}
    return {"server": name, "scenario": scenario, "size": size, "sessions": sessions,
            "median": {k: (round(v, 3) if v is not None else None) for k, v in med.items()},
            "complete_runs": sum(1 for r in runs if r["e2e_s"] is not None and r["accepted"] == r["messages"]),
            "runs": runs}


def ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """relayd / peer for each cell: > 1 is better for throughput, < 1 better for latency and CPU."""
    index = {(c["server"], c["scenario"], c["size"], c["sessions"]): c["median"] for c in cells}
    out = []
    for (server, scenario, size, sessions), med in index.items():
        if server != "relayd":
            continue
        for peer in ("postfix", "exim"):
            other = index.get((peer, scenario, size, sessions))
            if other is None:
                continue
            row: dict[str, Any] = {"scenario": scenario, "size": size, "sessions": sessions, "peer": peer}
            for key in ("accepted_per_s", "e2e_per_s", "p99_ms", "cpu_s_per_1k", "peak_mem_mb"):
                a, b = med.get(key), other.get(key)
                row[key] = round(a / b, 2) if a and b else None
            out.append(row)
    return out


def machine_facts(work: Path) -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    fs = subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True, text=True).stdout
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else ""
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(int(mem) / 1024 / 1024, 1),
            "kernel": platform.release(), "debian": debian,
            "filesystem": " ".join(fs.split()[2:]) if fs else "", "hostname_hash": None}


def client_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        import aiosmtpd, uvloop  # noqa: E401

        out["aiosmtpd"] = aiosmtpd.__version__
        out["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    raise SystemExit(main())
