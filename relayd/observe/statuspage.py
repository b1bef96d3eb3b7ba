"""The read-only status page: one server-side HTML document, a little CSS, no script.

Takes: a `relayd.observe.status.StatusSnapshot`.
Emits: the HTML page (`render_page`), or a short page saying the relay is
still loading its queue index.
Untrusted input: transport error texts, failure replies and recipient
addresses come from upstreams and clients; every value goes through
`html.escape`, so a reply carrying markup shows as text.
Fails: never; a missing part (no queue index yet, no tenant usage) is said
in words.

The page refreshes itself every 30 seconds (a meta refresh, not a script).
Times are shown in UTC with their age ("3m ago") so an operator reading the
page on another machine needs no time zone arithmetic.
"""

from __future__ import annotations

import time
from html import escape
from typing import Iterable, Sequence

from relayd.observe.status import (
    QUEUE_STATES,
    FailureLine,
    ListenerStatus,
    QueueGauges,
    SpoolSpace,
    StatusSnapshot,
    TenantUsage,
    TransportStatus,
)

REFRESH_SECONDS = 30

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2329;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
.muted{color:#66707a} table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #d8dde3;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4} .n{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:0 .5em;border-radius:.7em;color:#fff;font-weight:600}
.open{background:#2e7d32} .limited{background:#b26a00} .down{background:#c62828} .reauthorise{background:#6a1b9a}
.bar{width:16em;height:.9em;background:#e3e7eb;border-radius:.45em;overflow:hidden}
.bar span{display:block;height:100%;background:#1565c0} .bar span.high{background:#c62828}
code{font-size:.95em;word-break:break-all}
"""


def render_page(snapshot: StatusSnapshot) -> str:
    """The whole page for `snapshot`."""
    now = snapshot.taken_at
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        f"<title>relayd on {escape(snapshot.hostname)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>relayd on {escape(snapshot.hostname)}</h1>",
        f'<p class="muted">As of {_utc(now)}; this page refreshes every {REFRESH_SECONDS} seconds.</p>',
        *_listeners(snapshot.listeners),
        *_queue(snapshot.queue),
        _spool(snapshot.spool),
        *_transports(snapshot.transports, now),
        *_usage(snapshot.usage),
        *_failures(snapshot.failures, now),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(headers: Sequence[str], rows: Iterable[str], table_id: str) -> list[str]:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return [f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>', *rows, "</tbody></table>"]


def _listeners(listeners: Sequence[ListenerStatus]) -> list[str]:
    rows = (f"<tr><td>{escape(l.name)}</td><td><code>{escape(_where(l))}</code></td><td>{escape(l.tls)}</td></tr>"
            for l in listeners)
    return ["<h2>Listeners</h2>", *_table(("Name", "Address", "TLS"), rows, "listeners")]


def _where(listener: ListenerStatus) -> str:
    if listener.port == 0:
        return listener.address  # a Unix socket's path
    host = f"[{listener.address}]" if ":" in listener.address else listener.address
    return f"{host}:{listener.port}"


def _queue(queue: QueueGauges | None) -> list[str]:
    if queue is None:
        return ["<h2>Queue</h2>", '<p id="queue">The queue index is still loading.</p>']
    rows = [f'<tr><td>{state}</td><td class="n" id="queue-{state}">{queue.by_state.get(state, 0)}</td></tr>'
            for state in QUEUE_STATES]
    rows.append(f'<tr><th>total</th><th class="n" id="queue-total">{queue.total}</th></tr>')
    oldest = "none (the queue is empty)" if queue.oldest_age is None else _duration(queue.oldest_age)
    return ["<h2>Queue</h2>", *_table(("State", "Messages"), rows, "queue"),
            f'<p>Oldest message: <span id="queue-oldest">{escape(oldest)}</span></p>']


def _spool(spool: SpoolSpace) -> str:
    if spool.free_bytes is None:
        return '<p id="spool">Spool: free space unknown (statvfs failed).</p>'
    low = ' class="state down"' if spool.free_bytes < 2 * spool.reserve_bytes else ""
    return (f'<p id="spool">Spool: <span{low}>{_bytes(spool.free_bytes)} free</span>; new mail is refused '
            f"below {_bytes(spool.reserve_bytes)}.</p>")


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _transports(transports: Sequence[TransportStatus], now: float) -> list[str]:
    rows = []
    for t in transports:
        state = f'<span class="state {t.state}">{escape(t.state)}</span>'
        if t.reopens_at is not None:
            state += f"<br>until {_utc(t.reopens_at)} (in {_duration(t.reopens_at - now)})"
        if t.reason:
            state += f"<br><small>{escape(t.reason)}</small>"
        success = _when(t.last_success, now)
        error = "never"
        if t.last_error is not None:
            error = f"{_when(t.last_error_at, now)}<br><code>{escape(t.last_error)}</code>"
        hint = escape(t.hint) if t.hint else ""
        rows.append(f'<tr id="transport-{escape(t.name)}"><td>{escape(t.name)}</td><td>{state}</td>'
                    f"<td>{success}</td><td>{error}</td><td>{hint}</td></tr>")
    return ["<h2>Transports</h2>",
            *_table(("Transport", "State", "Last success", "Last error", "Hint"), rows, "transports")]


def _usage(usage: Sequence[TenantUsage]) -> list[str]:
    if not usage:
        return ["<h2>Tenant usage</h2>", '<p id="usage">No tenant has a quota to show.</p>']
    rows = []
    for u in usage:
        ratio = u.ratio
        if ratio is None:
            bar, of = "", f"{u.used}"
        else:
            width = min(100.0, ratio * 100)
            high = ' class="high"' if ratio >= 0.8 else ""
            bar = f'<div class="bar"><span{high} style="width:{width:.1f}%"></span></div>'
            of = f"{u.used} of {u.limit} ({ratio:.0%})"
        rows.append(f"<tr><td>{escape(u.tenant)}</td><td>{escape(u.window)}</td>"
                    f'<td class="n">{escape(of)}</td><td>{bar}</td></tr>')
    return ["<h2>Tenant usage</h2>", *_table(("Tenant", "Window", "Used", "Quota"), rows, "usage")]


def _failures(failures: Sequence[FailureLine], now: float) -> list[str]:
    if not failures:
        return ["<h2>Recent failures</h2>", '<p id="failures">No failure since relayd started.</p>']
    rows = (f"<tr><td>{_when(f.at, now)}</td><td>{escape(f.kind)}</td><td><code>{escape(f.queue_id)}</code></td>"
            f"<td>{escape(f.transport)}</td><td>{escape(f.recipient)}</td><td><code>{escape(f.text)}</code></td></tr>"
            for f in failures)
    return ["<h2>Recent failures</h2>",
            *_table(("When", "What", "Queue id", "Transport", "Recipient", "Reply or error"), rows, "failures")]


def render_loading(hostname: str) -> str:
    """The page while the daemon's event loop does not answer (busy, or still starting)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="refresh" content="5"><title>relayd on {escape(hostname)}</title></head>'
            f"<body><p>relayd on {escape(hostname)} is busy; this page tries again in 5 seconds.</p></body></html>\n")


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "never"
    return f"{_utc(at)} ({_duration(now - at)} ago)"


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _duration(seconds: float) -> str:
    """A short human duration: 45s, 12m, 3h 5m, 2d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
