"""The benchmark harness still runs: `bench/run --smoke` end to end, relayd only, tiny counts.

The numbers are not checked (they belong to bench/RESULTS.md, not to pass/fail);
the shape of the JSON is, so the harness cannot rot silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE_LIMIT = 60.0  # seconds; the whole smoke run must stay well inside CI's budget

CELL_METRICS = {"accepted_per_s", "e2e_per_s", "e2e_s", "p50_ms", "p99_ms", "cpu_s_per_1k", "peak_mem_mb"}
RUN_FIELDS = CELL_METRICS | {"messages", "accepted", "submit_s", "sink_received", "client", "client_cpu_s", "errors"}


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bench")
    out = work / "smoke.json"
    env = dict(os.environ, RELAYBENCH_WORK=str(work / "work"))
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "run"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=SMOKE_LIMIT + 30, env=env, cwd=ROOT,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < SMOKE_LIMIT, f"smoke run took {elapsed:.0f}s"
    result: dict[str, Any] = json.loads(out.read_text())
    result["_stdout"] = proc.stdout
    return result


def test_smoke_run_measures_relayd_in_every_scenario_and_concurrency(smoke_result: dict[str, Any]) -> None:
    cells = smoke_result["cells"]
    seen = {(c["scenario"], c["sessions"]) for c in cells if c["server"] == "relayd"}
    assert seen == {(s, n) for s in ("plain", "plain-lat", "auth") for n in (1, 4)}
    for cell in cells:
        assert set(cell["median"]) >= CELL_METRICS
        assert cell["runs"] and set(cell["runs"][0]) >= RUN_FIELDS
        run = cell["runs"][0]
        assert run["accepted"] == run["messages"], run["errors"]
        assert run["e2e_s"] is not None, "the sink never received every accepted message"
        assert run["accepted_per_s"] > 0 and run["cpu_s_per_1k"] > 0 and run["peak_mem_mb"] > 0


def test_smoke_run_reports_latency_from_the_load_generator(smoke_result: dict[str, Any]) -> None:
    for cell in smoke_result["cells"]:
        median = cell["median"]
        assert median["p50_ms"] is not None and median["p99_ms"] >= median["p50_ms"] > 0


def test_smoke_run_measures_queue_listing_and_startup_with_a_full_queue(smoke_result: dict[str, Any]) -> None:
    queue = smoke_result["queue"]["relayd"]
    assert "error" not in queue, queue
    assert queue["queued"] == smoke_result["settings"]["queue_messages"]
    assert queue["startup_s"] > 0 and queue["peak_mem_mb_after_start"] > 0
    assert "mailq_s" in queue  # a number, or None while relayd has no queue listing
    targets = {t["target"] for t in smoke_result["targets"]}
    assert any(t.startswith("start-up with") for t in targets)


def test_smoke_run_records_machine_disk_versions_and_tuning(smoke_result: dict[str, Any]) -> None:
    assert smoke_result["smoke"] is True
    assert smoke_result["machine"]["cores"] >= 1
    assert set(smoke_result["fsync"]) == {"append_fsync_per_s", "create_fsync_per_s", "syncfs_per_s"}
    assert all(v > 0 for v in smoke_result["fsync"].values())
    assert smoke_result["versions"]["relayd"].startswith("relayd ")
    assert smoke_result["tuning"]["relayd"]
    assert "| relayd |" in smoke_result["_stdout"] or "| 5 KB | 1 | relayd |" in smoke_result["_stdout"]
