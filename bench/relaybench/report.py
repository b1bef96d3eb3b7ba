"""Turning a result into tables: stdout text, the targets check, and bench/RESULTS.md.

Takes: the result dictionary the harness built. Emits: Markdown text (it
reads fine in a terminal). Pure: no I/O here.
"""

from __future__ import annotations

from typing import Any, Iterable

_COLUMNS = [
    ("accepted/s", "accepted_per_s", "{:.0f}"), ("e2e/s", "e2e_per_s", "{:.0f}"),
    ("e2e s", "e2e_s", "{:.1f}"), ("p50 ms", "p50_ms", "{:.1f}"), ("p99 ms", "p99_ms", "{:.1f}"),
    ("CPU s/1k", "cpu_s_per_1k", "{:.2f}"), ("peak MB", "peak_mem_mb", "{:.0f}"),
]


def _fmt(value: Any, pattern: str = "{}") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) or isinstance(value, int):
        return pattern.format(value)
    return str(value)


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _size(size: int) -> str:
    return f"{size // 1024} KB"


def cell_tables(result: dict[str, Any]) -> str:
    parts = []
    cells = result["cells"]
    index = {(c["server"], c["scenario"], c["size"], c["sessions"]): c for c in cells}
    for scenario, what in result["scenarios"].items():
        rows = []
        for c in cells:
            if c["scenario"] != scenario:
                continue
            med = c["median"]
            ratio = "–"
            if c["server"] != "relayd":
                mine = index.get(("relayd", scenario, c["size"], c["sessions"]))
                if mine and mine["median"]["accepted_per_s"] and med["accepted_per_s"]:
                    ratio = f"{mine['median']['accepted_per_s'] / med['accepted_per_s']:.2f}"
            complete = f"{c['complete_runs']}/{len(c['runs'])}"
            rows.append([_size(c["size"]), str(c["sessions"]), c["server"]]
                        + [_fmt(med[k], p) for _, k, p in _COLUMNS] + [ratio, complete])
        headers = ["size", "sess", "server"] + [h for h, _, _ in _COLUMNS] + ["relayd× acc", "runs ok"]
        parts.append(f"### {scenario}: {what}\n\n" + table(headers, rows))
    return "\n\n".join(parts)


def ratio_table(result: dict[str, Any]) -> str:
    rows = [[r["scenario"], _size(r["size"]), str(r["sessions"]), r["peer"],
             _fmt(r["accepted_per_s"], "{:.2f}"), _fmt(r["e2e_per_s"], "{:.2f}"), _fmt(r["p99_ms"], "{:.2f}"),
             _fmt(r["cpu_s_per_1k"], "{:.2f}"), _fmt(r["peak_mem_mb"], "{:.2f}")] for r in result["ratios"]]
    return table(["scenario", "size", "sess", "vs", "accepted", "e2e", "p99 (lower better)",
                  "CPU (lower better)", "mem (lower better)"], rows)


def queue_table(result: dict[str, Any]) -> str:
    rows = []
    for name, q in result["queue"].items():
        if "error" in q:
            rows.append([name, "error: " + q["error"][:120]] + ["–"] * 6)
            continue
        mailq = _fmt(q.get("mailq_s"), "{:.2f}") if q.get("mailq_s") is not None else q.get("mailq", "–")
        startup = _fmt(q["startup_s"], "{:.2f}")
        if q.get("fully_started_s") is not None:
            startup += f" (index loaded {q['fully_started_s']:.2f})"
        rows.append([name, str(q["queued"]), _fmt(q["inject_per_s"], "{:.0f}"), mailq,
                     _fmt(q.get("mailq_listed")), startup,
                     _fmt(q["mem_mb_queued"], "{:.0f}"), _fmt(q["peak_mem_mb_after_start"], "{:.0f}")])
    return table(["server", "queued", "inject/s", "mailq s", "listed", "start-up s (to 220)", "MB queued",
                  "peak MB after start"], rows)


def _median_of(result: dict[str, Any], server: str, scenario: str, size: int, sessions: int, key: str) -> Any:
    for c in result["cells"]:
        if (c["server"], c["scenario"], c["size"], c["sessions"]) == (server, scenario, size, sessions):
            return c["median"].get(key)
    return None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for relayd, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def ratio_target(label: str, scenario: str, size: int, sessions: int, key: str, peer: str,
                     goal: float, higher: bool = True) -> None:
        a = _median_of(result, "relayd", scenario, size, sessions, key)
        b = _median_of(result, peer, scenario, size, sessions, key)
        if a is None or b is None or not b:
            return
        value = a / b
        out.append({"target": label, "value": round(value, 2), "goal": goal,
                    "met": value >= goal if higher else value <= goal})

    for sessions in (20, 100):
        ratio_target(f"plain 5 KB x{sessions}: accepted vs Postfix ≥ 1.2", "plain", 5120, sessions, "accepted_per_s", "postfix", 1.2)
        ratio_target(f"plain 5 KB x{sessions}: accepted vs Exim ≥ 2.0", "plain", 5120, sessions, "accepted_per_s", "exim", 2.0)
        ratio_target(f"plain 100 KB x{sessions}: accepted vs Postfix ≥ 1.0", "plain", 102400, sessions, "accepted_per_s", "postfix", 1.0)
        for size in (5120, 102400):
            ratio_target(f"plain {size // 1024} KB x{sessions}: end-to-end vs Postfix ≥ 1.0", "plain", size, sessions, "e2e_per_s", "postfix", 1.0)
    for scenario in ("plain-lat", "auth"):
        for size in (5120, 102400):
            ratio_target(f"{scenario} {size // 1024} KB x20: p99 latency vs Postfix ≤ 1.0", scenario, size, 20, "p99_ms", "postfix", 1.0, higher=False)
    for size in (5120, 102400):
        ratio_target(f"plain {size // 1024} KB x1: accepted vs Postfix ≥ 1.0", "plain", size, 1, "accepted_per_s", "postfix", 1.0)
    q = result.get("queue", {}).get("relayd")
    if q and "error" not in q:
        n = q["queued"]
        if q.get("mailq_s") is not None:
            out.append({"target": f"mailq with {n} queued < 1 s", "value": q["mailq_s"], "goal": 1.0, "met": q["mailq_s"] < 1.0})
        else:
            out.append({"target": f"mailq with {n} queued < 1 s", "value": None, "goal": 1.0, "met": None})
        # Until the queue is fully known again: relayd answers 220 at once and loads its index behind.
        startup = max(q["startup_s"], q.get("fully_started_s") or 0.0)
        out.append({"target": f"start-up with {n} queued < 3 s (220 and queue index loaded)", "value": startup,
                    "goal": 3.0, "met": startup < 3.0})
        mem = max(q["mem_mb_queued"], q["peak_mem_mb_after_start"])
        out.append({"target": f"memory with {n} queued < 200 MB", "value": mem, "goal": 200, "met": mem < 200})
    return out


def target_table(result: dict[str, Any]) -> str:
    rows = [[t["target"], _fmt(t["value"]), {True: "yes", False: "NO", None: "n/a"}[t["met"]]]
            for t in result["targets"]]
    return table(["relayd target", "measured", "met"], rows)


def header(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    versions = ", ".join(f"{v}" for k, v in result["versions"].items() if k in ("relayd", "postfix", "exim"))
    f = result["fsync"]
    lines = [
        f"relaybench {result['date']}{' (SMOKE: tiny counts, not a measurement)' if result['smoke'] else ''}",
        f"machine: {m['cores']} cores {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Debian {m['debian']}, spool fs {m['filesystem']}",
        f"versions: {versions}; clients: smtp-source (Postfix), bench loadgen (Python {result['versions'].get('python')}, "
        f"uvloop {result['versions'].get('uvloop', '–')}); sink: {s['sink']}",
        f"settings: {s['runs']} runs per cell (medians), ~{s['target_seconds_per_run']:.0f} s per run, "
        f"interleaved; CPU by {s['cpu_accounting']}; DNS isolation {'on' if s['dns_isolation'] else 'off'}; "
        f"elapsed {result['elapsed_s']:.0f} s",
        f"disk: {f['append_fsync_per_s']:.0f} fsync/s (4 KiB append), {f['create_fsync_per_s']:.0f}/s "
        f"(create 5 KiB + fsync file + dir), {f['syncfs_per_s']:.0f} syncfs/s",
    ]
    for again in result.get("remeasured", []):
        if again["cells"] == "all":
            what = "every cell of the matrix"
        else:
            what = ", ".join(f"{c[0]} {c[1]} {c[2] // 1024} KB x{c[3]}" for c in again["cells"])
        if again.get("queue"):
            what += ("; " if what else "") + "queue test of " + ", ".join(again["queue"])
        relayd = again.get("versions", {}).get("relayd", "")
        lines.append(f"re-measured {again['date']} ({relayd.split(',')[0]}): {what}")
    return "\n".join(lines)


def capacity_text(result: dict[str, Any]) -> str:
    cap = result.get("client_capacity") or {}
    if not cap:
        return ""
    rows = [[k, _fmt(v["msgs_per_s"], "{:.0f}"), _fmt(v["client_cpu_s"], "{:.1f}"), str(v["messages"])]
            for k, v in cap.items()]
    return "### client capacity (against servers that do nothing)\n\n" + table(
        ["client -> null server", "msgs/s", "client CPU s", "messages"], rows)


def tuning_text(result: dict[str, Any]) -> str:
    lines = ["### what was tuned per server"]
    for name, items in result["tuning"].items():
        lines.append(f"- **{name}**: " + "; ".join(items))
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    parts = [header(result), cell_tables(result)]
    if result["ratios"]:
        parts.append("### relayd ÷ peer (medians)\n\n" + ratio_table(result))
    if result["queue"]:
        parts.append(f"### queue of {result['settings']['queue_messages']} messages, upstream down\n\n" + queue_table(result))
    if result["targets"]:
        parts.append("### targets\n\n" + target_table(result))
    cap = capacity_text(result)
    if cap:
        parts.append(cap)
    parts.append(tuning_text(result))
    return "\n\n".join(parts)


def results_md(result: dict[str, Any], text: str) -> str:
    return (
        "# relaybench: latest results\n\n"
        "Produced by `bench/run` (see bench/README.md for what each column means). "
        "Regenerate on the target machine; numbers from a noisy shared 2-core VM move by ±10-20 %.\n\n"
        "```\n" + header(result) + "\n```\n\n" + text.split("\n\n", 1)[1] + "\n"
    )
