"""relayctl's queue verbs that look (list, count, summary, show); and `mailq`.

Takes: command-line arguments, relay.yaml (for the control socket, spool and
log paths), answers from the running relayd's control socket, or, when relayd
is not running, the spool itself, read under the spool's daemon lock
(relayd.ops.queuesource).
Emits: Exim-shaped text on stdout (`exim -bp`, exiqsumm), `--json` for
scripts, one-line errors on stderr; exit 0 ok, 1 failure, 2 usage.
Untrusted input: message ids typed by the operator (checked for the id shape
before they reach a path or the daemon), filter regexes (compiled, a bad one
is a usage error), and queue contents, which `queueview` sanitises for the
terminal.
Fails: with one `relayctl: sentence` line per problem, never a traceback.

Thin on purpose: filtering, formatting and summaries are pure functions in
`relayd.ops.queueview`; the actions that change messages are in
relayd.ops.cli_queueact; reload, status and send-test in relayd.ops.cli_daemon.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

from relayd.config.model import RelayConfig
from relayd.delivery.router import route
from relayd.jsonwire import JsonObject, JsonValue, as_int, as_list
from relayd.ops.clicommon import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    load_relay_config,
)
from relayd.ops.controlclient import ControlUnavailable, DaemonNotRunning
from relayd.ops.mainlogread import read_log_lines
from relayd.ops.queuesource import (
    all_rows,
    checked,
    checked_id,
    control_client,
    filter_options,
    offline_entries,
    offline_lock,
    queue_filter,
    wire_chunks,
)
from relayd.ops.queueview import (
    QueueFilter,
    backlog_transport,
    listing_lines,
    listing_text,
    printable_block,
    row_to_json,
    sanitize,
    select,
    show_lines,
    split_message,
    summarize,
    summary_lines,
    summary_to_json,
)
from relayd.queue.queuewire import entry_from_json, entry_to_json, row_from_wire
from relayd.queue.spool import Spool, SpoolCorruptError
from relayd.values import QueueEntry

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers

# ------------------------------------------------------------ list / count


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    selection = queue_filter(args)
    out: TextIO = sys.stdout
    now = time.time()
    # 100,000 rows of short-lived containers: the cyclic collector would only
    # walk them again and again for nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _list(args, config, selection, out, now)
    finally:
        if was_enabled:
            gc.enable()


def _list(args: argparse.Namespace, config: RelayConfig, selection: QueueFilter, out: TextIO, now: float) -> int:
    if args.json:
        rows = list(select(all_rows(config), selection, now))
        json.dump([row_to_json(r, now) for r in rows], out, indent=1)
        out.write("\n")
        return EXIT_OK
    for chunk in wire_chunks(config):
        if selection.is_empty:
            try:
                arrays = [as_list(w) for w in chunk]
                text = "".join(f"{w[0]}\n" for w in arrays) if args.ids_only else listing_text(arrays, now)
            except (TypeError, ValueError, IndexError, KeyError):
                raise CliError("relayd sent a malformed queue listing") from None
        else:
            chosen = select((row_from_wire(w) for w in chunk), selection, now)
            if args.ids_only:
                text = "".join(f"{row.id}\n" for row in chosen)
            else:
                text = "".join(line + "\n" for row in chosen for line in listing_lines(row, now))
        out.write(text)
    out.flush()
    return EXIT_OK


def cmd_queue_count(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    selection = queue_filter(args)
    now = time.time()
    if selection.is_empty:
        try:
            reply = control_client(config).request("queue.count")
            count = as_int(checked(reply)["total"])
        except DaemonNotRunning as why:
            count = len(offline_entries(config, why))
        except ControlUnavailable as exc:
            raise CliError(str(exc)) from None
    else:
        count = sum(1 for _ in select(all_rows(config), selection, now))
    if args.json:
        print(json.dumps({"count": count}))
    else:
        print(count)
    return EXIT_OK


def _retry_waits(config: RelayConfig) -> dict[str, float]:
    """Until when the running relayd skips each transport; {} when it is not running."""
    try:
        reply = control_client(config).request("health")
    except ControlUnavailable:
        return {}
    transports = reply.get("transports") if reply.get("ok") else None
    if not isinstance(transports, dict):
        return {}
    waits: dict[str, float] = {}
    for name, entry in transports.items():
        until = entry.get("skipped_until") if isinstance(entry, dict) else None
        if isinstance(until, (int, float)):
            waits[name] = float(until)
    return waits


def cmd_queue_summary(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    selection = queue_filter(args)
    now = time.time()
    waits = _retry_waits(config)

    def holding_transport(tenant_name: str, address: str) -> str | None:
        tenant = config.tenants.get(tenant_name)
        found = route(tenant, address) if tenant is not None else None
        return backlog_transport(found.transports, waits, now) if found is not None else None

    summary = summarize(select(all_rows(config), selection, now), now, holding_transport)
    if args.json:
        print(json.dumps(summary_to_json(summary, now), indent=1))
    else:
        sys.stdout.write("".join(line + "\n" for line in summary_lines(summary, now)))
    return EXIT_OK


# -------------------------------------------------------------------- show


def _show_data(config: RelayConfig, message_id: str, *, body: bool, log: bool) -> JsonObject:
    """What queue.show answers, from relayd or (stopped) from the spool and log file."""
    try:
        return checked(control_client(config).request("queue.show", id=message_id, body=body, log=log))
    except DaemonNotRunning as why:
        return _offline_show(config, message_id, body=body, log=log, why=why)
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None


def _offline_show(
    config: RelayConfig, message_id: str, *, body: bool, log: bool, why: DaemonNotRunning
) -> JsonObject:
    lock = offline_lock(config, exclusive=False, why=why)
    try:
        spool = Spool(config.spool_dir)
        answer: JsonObject = {"message": None, "in_flight": False}
        if log:
            lines: list[JsonValue] = [*read_log_lines(config.log_file, message_id)]
            answer["log"] = lines
        try:
            entry = spool.read_entry(message_id)
            if entry is not None and body:
                answer["body"] = spool.read_body(message_id).decode("utf-8", "surrogateescape")
        except SpoolCorruptError as exc:
            raise CliError(str(exc)) from None
    finally:
        lock.release()
    if entry is None:
        if log:
            return answer
        raise CliError(f"message {message_id} is not in the queue")
    answer["message"] = entry_to_json(entry)
    return answer


def cmd_queue_show(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    message_id = checked_id(args.id)
    want_body = not args.log
    data = _show_data(config, message_id, body=want_body, log=args.log or args.json)
    entry = entry_from_json(data["message"]) if data.get("message") is not None else None
    raw = str(data.get("body", "")).encode("utf-8", "surrogateescape")
    headers, text = split_message(raw)
    now = time.time()
    if args.json:
        out = dict(data)
        out.pop("body", None)
        out["headers"] = headers.decode("utf-8", "replace")
        print(json.dumps(out, indent=1))
        return EXIT_OK
    if args.log:
        return _print_history(message_id, entry, data, now)
    if entry is None:
        raise CliError(f"message {message_id} is not in the queue")
    if args.body:
        _write_raw(text)
    elif args.headers:
        print(printable_block(headers.rstrip(b"\r\n")))
    else:
        lines = show_lines(entry, in_flight=bool(data.get("in_flight")), now=now, waiting_until=_waiting(data), cannot_record=_cannot_record(data))
        lines += ["Headers:"] + ["  " + line for line in printable_block(headers.rstrip(b"\r\n")).split("\n")]
        print("\n".join(lines))
    return EXIT_OK


def _print_history(message_id: str, entry: QueueEntry | None, data: JsonObject, now: float) -> int:
    log = [sanitize(str(line), limit=4096) for line in as_list(data.get("log"))]
    if entry is None and not log:
        raise CliError(f"message {message_id} is not in the queue and the main log does not mention it")
    print("\n".join(log) if log else "(the main log has no lines for this message)")
    if entry is None:
        print(f"Message {message_id} is no longer in the queue.")
    else:
        print("\n".join(show_lines(entry, in_flight=bool(data.get("in_flight")), now=now, waiting_until=_waiting(data), cannot_record=_cannot_record(data))))
    return EXIT_OK


def _cannot_record(data: JsonObject) -> str | None:
    reason = data.get("cannot_record")
    return reason if isinstance(reason, str) else None


def _waiting(data: JsonObject) -> float | None:
    until = data.get("waiting_until")
    return float(until) if isinstance(until, (int, float)) and not isinstance(until, bool) else None


def _write_raw(data: bytes) -> None:
    """A body as stored on a pipe; made printable on a terminal (no escape sequences)."""
    if sys.stdout.isatty():
        print(printable_block(data))
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# ------------------------------------------------------------ registration


def add_queue_commands(subparsers: Subparsers) -> Subparsers:
    """`queue` with its looking verbs (list, count, summary, show); returns the group's
    verbs, to which relayd.ops.cli_queueact adds the actions."""
    filters = filter_options()
    group = subparsers.add_parser(
        "queue", help="look at and steer the queue (mailq, exiqgrep, exim -M...)",
        description="The queue of relayd: through the running daemon, or from the spool when it is stopped.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("list", parents=[filters], help="the queue in exim -bp shape (also: mailq)")
    p.add_argument("-i", "--ids-only", action="store_true", help="only message ids, one per line")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_queue_list)

    p = verbs.add_parser("count", parents=[filters], help="how many messages (exim -bpc)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_queue_count)

    p = verbs.add_parser("summary", parents=[filters], help="by tenant, domain, transport holding the backlog, and age (exiqsumm)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_queue_summary)

    p = verbs.add_parser("show", help="one message: envelope, state, headers (exim -Mvh/-Mvb/-Mvl)")
    p.add_argument("id", help="the message's queue id (as in mailq)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--headers", action="store_true", help="only the header block")
    what.add_argument("--body", action="store_true", help="only the body")
    what.add_argument("--log", action="store_true", help="its main log lines and recipients' state")
    what.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_queue_show)
    return verbs


def mailq_main(argv: list[str] | None = None) -> int:
    """`mailq [--config PATH] [filters] [-i] [--json]`: `relayctl queue list` on its own.

    It builds only its own small parser (not every relayctl group), because
    an operator types it often and expects it at once.
    """
    parser = argparse.ArgumentParser(prog="mailq", parents=[filter_options()],
                                     description="List relayd's queue in exim -bp shape.")
    parser.add_argument("--config", metavar="PATH",
                        help=f"relay.yaml to read (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG})")
    parser.add_argument("-i", "--ids-only", action="store_true", help="only message ids, one per line")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    args.environ, args.stdin = os.environ, sys.stdin
    try:
        return cmd_queue_list(args)
    except CliError as exc:
        for line in exc.message.splitlines() or [exc.message]:
            print(f"mailq: {line}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"mailq: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # a bug; its text could hold anything, so only the type
        print(f"mailq: internal error ({type(exc).__name__}); please report it", file=sys.stderr)
        return EXIT_FAILURE
