"""The last `relayctl transport verify` result of each transport, kept beside the spool.

Takes: a transport name, whether the verification passed, and the step that
decided it (the failing step's detail, or the last step when all passed).
Emits: `<spool_dir>/transport-verify.json`, `{NAME: {"ok": bool, "at": epoch
seconds, "detail": text}}`, written whole through relayd.safeio (temporary
file, fsync, rename), so a reader never sees half a file. `relayctl status`
shows it next to what the daemon knows, so a transport that was never used but
whose password was found wrong says so before the first message fails on it.
Untrusted input: the file itself (anything unreadable, or of the wrong
shape, is ignored: it is a note for the operator, not state relayd acts on).
Fails: `record()` returns a sentence instead of raising when the file cannot
be written (relayctl run without write access to the spool).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

from relayd import safeio

FILE_NAME = "transport-verify.json"
MAX_DETAIL = 300  # characters of a step's detail kept: one upstream reply line
MAX_FILE = 1024 * 1024  # a file larger than this is not ours; ignore it


def path_for(spool_dir: Path) -> Path:
    return spool_dir / FILE_NAME


def read(spool_dir: Path) -> dict[str, dict[str, object]]:
    """Every recorded result by transport name; {} when there is none or it is unreadable."""
    try:
        with open(path_for(spool_dir), "rb") as f:
            data = json.loads(f.read(MAX_FILE + 1)[:MAX_FILE])
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(name): {"ok": entry["ok"], "at": float(entry["at"]), "detail": str(entry.get("detail", ""))}
        for name, entry in data.items()
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool)
        and isinstance(entry.get("at"), (int, float)) and not isinstance(entry.get("at"), bool)
    }


def record(spool_dir: Path, name: str, ok: bool, detail: str, *, now: float | None = None) -> str | None:
    """Store one result (replacing the transport's previous one); None, or why it was not stored."""
    results: Mapping[str, object] = {
        **read(spool_dir),
        name: {"ok": ok, "at": time.time() if now is None else now, "detail": detail[:MAX_DETAIL]},
    }
    target = path_for(spool_dir)
    try:
        data = json.dumps(results, sort_keys=True).encode("utf-8")
        safeio.write_file(target, data, mode=0o644, directory_mode=0o777)
    except OSError as exc:
        return f"the result was not recorded for `relayctl status` ({target}: {exc.strerror or exc})"
    return None
