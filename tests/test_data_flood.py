"""A scaled-down run of bench/data_flood.py: idle connections plus 20 MB DATA sessions against real relayd.

The full run (1,000 idle + 100 x 20 MB, RSS under 300 MB) is done by hand
(`.venv/bin/python bench/data_flood.py`); this one keeps the same shape at a
fifth of the size so it fits the suite: 200 idle + 20 x 20 MB, RSS under
120 MB (buffering DATA whole needed about 26 MiB per session, over 500 MB
here), a legitimate client served within 1 s, no watchdog gap over 2 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_idle_connections_and_big_data_sessions_keep_memory_bounded_and_the_relay_responsive(tmp_path: Path) -> None:
    out = tmp_path / "flood.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data_flood.py"), "--idle", "200", "--data-sessions", "20",
         "--rss-limit-mb", "120", "--deadline", "240", "--work", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.exists(), f"the bench wrote no figures: {proc.stdout[-1000:]}{proc.stderr[-2000:]}"
    figures = json.loads(out.read_text())
    assert figures["idle_connections"] == 200 and figures["data_replies"] == {"250": 20}, figures
    assert figures["peak_rss_mb"] < 120, figures
    assert figures["legit_failures"] == 0 and figures["legit_max_s"] < 1.0, figures
    assert figures["watchdog_pings"] > 0 and figures["watchdog_misses"] == 0, figures
    assert proc.returncode == 0, proc.stderr[-2000:]
