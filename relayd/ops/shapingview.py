"""`relayctl status`'s shaping table: per transport its rate, window counts against limits, next release.

Takes: the `shaping` object of the daemon's `status` answer
(relayd.delivery.shaping.status_wire per transport).
Emits: table lines for a human; `--json` prints the answer itself.
Untrusted input: none beyond the answer's text, which is sanitised.
Fails: TypeError for an answer of the wrong shape (the CLI reports it).
"""

from __future__ import annotations

import time
from typing import Mapping

from relayd.jsonwire import JsonObject, JsonValue, as_object, as_objects
from relayd.ops.queueview import sanitize, table_lines


def _number(value: JsonValue) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def shaping_lines(status: JsonObject) -> list[str]:
    """The table for a whole `status` answer, after a blank line; nothing when no transport is shaped."""
    shaping = {name: as_object(s) for name, s in as_object(status.get("shaping")).items()}
    table = shaping_table(shaping)
    if not table:
        return []
    shared = {str(s["shared"]) for s in shaping.values() if s.get("limits") and isinstance(s.get("shared"), str)}
    notes = [f"Transport caps: {sanitize(text, limit=160)}" for text in sorted(shared)]
    return ["", *table, *notes]


def _cap_cell(cap: JsonObject | None) -> str:
    if cap is None:
        return "-"
    used, limit = cap.get("used"), cap.get("limit")
    return f"{used}/{limit}" if limit is not None else str(used)


def shaping_table(shaping: Mapping[str, JsonObject]) -> list[str]:
    """Per shaped transport: rate, this minute/hour/day against the limits, the next release; pure."""
    headers = ["TRANSPORT", "RATE", "MINUTE", "HOUR", "DAY", "RCPT/DAY", "LIMIT STATE"]
    rows: list[list[str]] = []
    for name in sorted(shaping):
        s = shaping[name]
        caps = {(c.get("span"), c.get("what")): c for c in as_objects(s.get("caps"))}
        if not s.get("limits"):
            continue  # unshaped: its counts are in --json and the metrics
        release = _number(s.get("next_release"))
        state = "open"
        if release is not None and s.get("held"):
            state = (f"held: {sanitize(str(s['held']), limit=120)}; next release "
                     f"{time.strftime('%H:%M:%S', time.gmtime(release))} UTC")
        rows.append([
            sanitize(name), f"{_number(s.get('rate')) or 0.0:.2f}/s",
            _cap_cell(caps.get(("minute", "messages"))), _cap_cell(caps.get(("hour", "messages"))),
            _cap_cell(caps.get(("day", "messages"))), _cap_cell(caps.get(("day", "recipients"))), state,
        ])
    return table_lines(headers, rows) if rows else []
