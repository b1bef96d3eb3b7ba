"""The type gate: `mypy --strict relayd` is clean, so every seam stays checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_finds_no_error_in_relayd() -> None:
    # mypy and types-PyYAML come with the test extra; a missing mypy fails here too.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "relayd"],
        capture_output=True, text=True, cwd=ROOT, timeout=170,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found"), result.stdout
