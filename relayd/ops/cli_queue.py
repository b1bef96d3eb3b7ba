"""relayctl's queue verbs, reload, status and send-test; and `mailq`.

Takes: command-line arguments, relay.yaml (for the control socket, spool and
log paths), answers from the running relayd's control socket, or, when relayd
is not running, the spool itself (read, and for freeze/thaw/remove changed,
under the spool's daemon lock, so a relayd starting meanwhile waits).
Emits: Exim-shaped text on stdout (`exim -bp`, exiqsumm), `--json` for
scripts, progress and one-line errors on stderr; exit 0 ok, 1 failure, 2 usage.
Untrusted input: message ids typed by the operator (checked for the id shape
before they reach a path or the daemon), filter regexes (compiled, a bad one
is a usage error), and queue contents, which `queueview` sanitises for the
terminal. Passwords for send-test come from a no-echo prompt or stdin and are
sent only to relayd's own listener.
Fails: with one `relayctl: sentence` line per problem, never a traceback.

Thin on purpose: filtering, formatting and summaries are pure functions in
`relayd.ops.queueview`; the protocol and every change to a message live in
`relayd.ops.control` and the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import gc
import ipaddress
import json
import os
import pwd
import re
import smtplib
import ssl
import sys
import time
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TextIO

from relayd.ops.usageview import usage_status_lines
from relayd.ops.clicommon import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    UsageError,
    load_relay_config,
    read_password,
)
from relayd.ops.control import read_log_lines
from relayd.ops.controlclient import ControlClient, ControlUnavailable, DaemonNotRunning
from relayd.queue.msgid import is_message_id
from relayd.ops.queueview import (
    QueueFilter,
    backlog_transport,
    QueueRow,
    compile_address_pattern,
    listing_lines,
    listing_text,
    printable_block,
    row_to_json,
    sanitize,
    select,
    show_lines,
    split_message,
    status_lines,
    summarize,
    summary_lines,
    summary_to_json,
)
from relayd.queue.queuewire import entry_from_json, entry_to_json, queue_counts, row_from_wire, wire_row
from relayd.config.retry import parse_duration
from relayd.queue.spoollock import SpoolLock, lock_path

if TYPE_CHECKING:
    from relayd.config.model import RelayConfig, TenantConfig
    from relayd.values import QueueEntry

    from relayd.ops.clicommon import Subparsers

OFFLINE_LOCK_WAIT = 5.0  # seconds relayctl waits for another relayctl editing the stopped spool
PER_ID_LINES = 20  # up to this many messages, actions print one line per message
SEND_TEST_TIMEOUT = 60.0
SEND_TEST_POLL = 0.25
_QUEUE_ID = re.compile(r"id=([0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2})")

# What an action's per-message result means to an operator; results outside
# _OK_RESULTS make the command exit 1.
_SENTENCES = {
    "frozen": "is now frozen",
    "already frozen": "is already frozen",
    "thawed": "is no longer frozen",
    "not frozen": "is not frozen",
    "removed": "has been removed",
    "cancelled and bounced": "delivery cancelled; a bounce goes to the sender",
    "bounce removed": "was a bounce; removed without a further bounce",
    "not in queue": "is not in the queue",
    "busy": "is being delivered right now and that attempt did not end in time; nothing changed, try again",
    "damaged, set aside": "has a damaged spool file; it was moved to corrupt/",
    "completed": "left the queue (every recipient delivered or failed)",
    "deferred": "was tried and is deferred",
    "pending": "was tried; some recipients are still waiting",
    "still waiting": "is still queued; its attempt did not end in time",
}
_OK_RESULTS = frozenset(
    {"frozen", "already frozen", "thawed", "not frozen", "removed", "cancelled and bounced",
     "bounce removed", "completed", "deferred", "pending"}
)


# ------------------------------------------------------------ data sources


def _client(config: RelayConfig) -> ControlClient:
    return ControlClient(config.control_path)


def _offline_lock(config: RelayConfig, *, exclusive: bool, why: DaemonNotRunning) -> SpoolLock:
    """The spool's daemon lock for direct access; an error if a relayd holds it."""
    if not (config.spool_dir / "queue").is_dir():
        raise CliError(f"{why}, and there is no spool at {config.spool_dir}")
    lock = SpoolLock.acquire(lock_path(config.spool_dir), exclusive=exclusive, timeout=OFFLINE_LOCK_WAIT)
    if lock is None:
        raise CliError(
            f"{why}, but the spool {config.spool_dir} is locked: relayd is starting or another "
            f"{PROG} is changing it; try again"
        )
    return lock


def _offline_entries(config: RelayConfig, why: DaemonNotRunning) -> list[QueueEntry]:
    from relayd.queue.spool import Spool

    lock = _offline_lock(config, exclusive=True, why=why)  # load() may set damaged files aside
    try:
        return Spool(config.spool_dir).load().entries
    finally:
        lock.release()


def _daemon_chunks(config: RelayConfig, held: dict[str, str] | None = None) -> Iterator[list[Any]]:
    """Chunks of compact wire rows from the running relayd; DaemonNotRunning if none runs.

    `held` is filled with the messages a transport's limit holds, and why.
    """
    for message in _client(config).stream("queue.list"):
        if isinstance(message.get("held"), dict) and held is not None:
            held.update({str(k): str(v) for k, v in message["held"].items()})
        elif "rows" in message:
            rows = message["rows"]
            if not isinstance(rows, list):
                raise CliError("relayd sent a malformed queue listing")
            yield rows
        elif message.get("done") and not message.get("ok"):
            raise CliError(str(message.get("error", "relayd refused the request")))
        elif message.get("done"):
            _warn_unrecorded(message.get("unrecorded"))


def _warn_unrecorded(held: object) -> None:
    """On stderr, below the listing: messages whose outcome the spool could not record."""
    if not isinstance(held, dict) or not held:
        return
    for message_id, reason in sorted(held.items()):
        print(f"{PROG}: {sanitize(str(message_id))} held: cannot record delivery state "
              f"({sanitize(str(reason), limit=300)})", file=sys.stderr)


def _wire_chunks(config: RelayConfig, held: dict[str, str] | None = None) -> Iterator[list[Any]]:
    """The queue as chunks of wire rows: from relayd when it runs, else straight from the spool."""
    try:
        chunks = _daemon_chunks(config, held)
        first = next(chunks, None)
    except DaemonNotRunning as why:
        yield [wire_row(e, False) for e in _offline_entries(config, why)]
        return
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    if first is None:
        return
    yield first
    try:
        yield from chunks
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None


def _row_chunks(config: RelayConfig) -> Iterator[list[QueueRow]]:
    for chunk in _wire_chunks(config):
        yield [row_from_wire(obj) for obj in chunk]


def _all_rows(config: RelayConfig) -> list[QueueRow]:
    return [row for chunk in _row_chunks(config) for row in chunk]


# ----------------------------------------------------------------- filters


def _selection(args: argparse.Namespace) -> QueueFilter:
    try:
        return QueueFilter(
            tenant=args.tenant,
            sender=compile_address_pattern(args.sender) if args.sender is not None else None,
            recipient=compile_address_pattern(args.recipient) if args.recipient is not None else None,
            older_than=parse_duration(args.older_than) if args.older_than is not None else None,
            younger_than=parse_duration(args.younger_than) if args.younger_than is not None else None,
            frozen=args.frozen,
            deferred=args.deferred,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _filter_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection (like exiqgrep; all given conditions must hold)")
    g.add_argument("--tenant", metavar="T", help="only messages of this tenant")
    g.add_argument("--from", dest="sender", metavar="REGEX", help="sender matches (case-insensitive search)")
    g.add_argument("--to", dest="recipient", metavar="REGEX", help="some recipient matches")
    g.add_argument("--older-than", metavar="DURATION", help="queued at least this long (30m, 2h, 1d)")
    g.add_argument("--younger-than", metavar="DURATION", help="queued less than this long")
    g.add_argument("--frozen", action="store_true", help="only frozen messages")
    g.add_argument("--deferred", action="store_true", help="only messages with a deferred recipient (not frozen)")
    return p


# ------------------------------------------------------------ list / count


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    selection = _selection(args)
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
        rows = list(select(_all_rows(config), selection, now))
        json.dump([row_to_json(r, now) for r in rows], out, indent=1)
        out.write("\n")
        return EXIT_OK
    held: dict[str, str] = {}
    for chunk in _wire_chunks(config, held):
        if selection.is_empty:
            try:
                text = "".join(f"{w[0]}\n" for w in chunk) if args.ids_only else listing_text(chunk, now, held)
            except (TypeError, ValueError, IndexError, KeyError):
                raise CliError("relayd sent a malformed queue listing") from None
        else:
            chosen = select((row_from_wire(w) for w in chunk), selection, now)
            if args.ids_only:
                text = "".join(f"{row.id}\n" for row in chosen)
            else:
                text = "".join(line + "\n" for row in chosen for line in listing_lines(row, now, held.get(row.id)))
        out.write(text)
    out.flush()
    return EXIT_OK


def cmd_queue_count(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    selection = _selection(args)
    now = time.time()
    if selection.is_empty:
        try:
            reply = _client(config).request("queue.count")
            count = int(_checked(reply)["total"])
        except DaemonNotRunning as why:
            count = len(_offline_entries(config, why))
        except ControlUnavailable as exc:
            raise CliError(str(exc)) from None
    else:
        count = sum(1 for _ in select(_all_rows(config), selection, now))
    if args.json:
        print(json.dumps({"count": count}))
    else:
        print(count)
    return EXIT_OK


def _retry_waits(config: RelayConfig) -> dict[str, float]:
    """Until when the running relayd skips each transport; {} when it is not running."""
    try:
        reply = _client(config).request("health")
    except ControlUnavailable:
        return {}
    transports = reply.get("transports") if reply.get("ok") else None
    if not isinstance(transports, dict):
        return {}
    return {name: float(entry["skipped_until"]) for name, entry in transports.items()
            if isinstance(entry, dict) and isinstance(entry.get("skipped_until"), (int, float))}


def cmd_queue_summary(args: argparse.Namespace) -> int:
    from relayd.delivery.router import route

    config = load_relay_config(args)
    selection = _selection(args)
    now = time.time()
    waits = _retry_waits(config)

    def holding_transport(tenant_name: str, address: str) -> str | None:
        tenant = config.tenants.get(tenant_name)
        found = route(tenant, address) if tenant is not None else None
        return backlog_transport(found.transports, waits, now) if found is not None else None

    summary = summarize(select(_all_rows(config), selection, now), now, holding_transport)
    if args.json:
        print(json.dumps(summary_to_json(summary, now), indent=1))
    else:
        sys.stdout.write("".join(line + "\n" for line in summary_lines(summary, now)))
    return EXIT_OK


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise CliError(str(reply.get("error") or "relayd refused the request"))
    return reply


# -------------------------------------------------------------------- show


def _message_id(text: str) -> str:
    if not is_message_id(text):
        raise UsageError(f"'{sanitize(text, 40)}' is not a message id (they look like 1tA2bC-0000aB-x9)")
    return text


def _show_data(config: RelayConfig, message_id: str, *, body: bool, log: bool) -> dict[str, Any]:
    """What queue.show answers, from relayd or (stopped) from the spool and log file."""
    try:
        return _checked(_client(config).request("queue.show", id=message_id, body=body, log=log))
    except DaemonNotRunning as why:
        return _offline_show(config, message_id, body=body, log=log, why=why)
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None


def _offline_show(
    config: RelayConfig, message_id: str, *, body: bool, log: bool, why: DaemonNotRunning
) -> dict[str, Any]:
    from relayd.queue.spool import Spool, SpoolCorruptError

    lock = _offline_lock(config, exclusive=False, why=why)
    try:
        spool = Spool(config.spool_dir)
        answer: dict[str, Any] = {"message": None, "in_flight": False}
        if log:
            answer["log"] = read_log_lines(config.log_file, message_id)
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
    message_id = _message_id(args.id)
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
        lines = show_lines(entry, in_flight=bool(data.get("in_flight")), now=now, waiting_until=_waiting(data), cannot_record=data.get("cannot_record"), held=data.get("held"))
        lines += ["Headers:"] + ["  " + line for line in printable_block(headers.rstrip(b"\r\n")).split("\n")]
        print("\n".join(lines))
    return EXIT_OK


def _print_history(message_id: str, entry: QueueEntry | None, data: dict[str, Any], now: float) -> int:
    log = [sanitize(str(line), limit=4096) for line in data.get("log", [])]
    if entry is None and not log:
        raise CliError(f"message {message_id} is not in the queue and the main log does not mention it")
    print("\n".join(log) if log else "(the main log has no lines for this message)")
    if entry is None:
        print(f"Message {message_id} is no longer in the queue.")
    else:
        print("\n".join(show_lines(entry, in_flight=bool(data.get("in_flight")), now=now, waiting_until=_waiting(data), cannot_record=data.get("cannot_record"), held=data.get("held"))))
    return EXIT_OK


def _waiting(data: dict[str, Any]) -> float | None:
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


# ----------------------------------------------------------------- actions


class _Progress:
    """`verb n/total` on stderr: rewritten in place on a terminal, every tenth otherwise."""

    def __init__(self, verb: str, stream: TextIO) -> None:
        self.verb = verb
        self.stream = stream
        self.tty = stream.isatty()
        self._shown = -1

    def update(self, n: int, total: int) -> None:
        if self.tty:
            self.stream.write(f"\r{self.verb} {n}/{total}")
            self.stream.flush()
            return
        tenth = n * 10 // max(total, 1)
        if tenth != self._shown:
            self._shown = tenth
            self.stream.write(f"{PROG}: {self.verb} {n}/{total}\n")

    def end(self) -> None:
        if self.tty and self._shown != -2:
            self.stream.write("\n")
            self._shown = -2


def _targets(args: argparse.Namespace, config: RelayConfig) -> tuple[list[str], bool]:
    """The message ids to act on, and whether they were named one by one."""
    ids = [_message_id(i) for i in args.ids]
    selection = _selection(args)
    if selection.is_empty:
        if not ids:
            raise UsageError(
                f"name one or more message ids, or select messages with a filter (e.g. --tenant acme); "
                f"see `{PROG} queue list`"
            )
        return list(dict.fromkeys(ids)), True
    now = time.time()
    chosen = [row.id for row in select(_all_rows(config), selection, now)]
    if ids:
        named = set(ids)
        chosen = [i for i in chosen if i in named]
    return chosen, bool(ids)


def _confirm(args: argparse.Namespace, verb: str, count: int) -> None:
    if args.yes:
        return
    stdin: TextIO = args.stdin
    if stdin is None or not stdin.isatty():
        raise UsageError(f"refusing to {verb} {count} message(s) without --yes when stdin is not a terminal")
    sys.stderr.write(f"{verb.capitalize()} {count} message(s)? [y/N] ")
    sys.stderr.flush()
    answer = stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError("nothing done")


def _run_action(verb: str, config: RelayConfig, ids: list[str], extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Send the action to relayd, showing progress; DaemonNotRunning when none runs."""
    progress = _Progress(verb, sys.stderr)
    final: dict[str, Any] = {}
    try:
        for message in _client(config).stream(verb, ids=ids, **extra):
            if "progress" in message and "total" in message:
                progress.update(int(message["progress"]), int(message["total"]))
            final = message
    finally:
        progress.end()
    return list(_checked(final).get("results", []))


def _offline_action(verb: str, config: RelayConfig, ids: list[str], why: DaemonNotRunning) -> list[dict[str, Any]]:
    """freeze, thaw and remove straight on the spool files, relayd being stopped."""
    if verb not in ("freeze", "thaw", "remove"):
        raise CliError(f"{why}; `{PROG} queue {verb}` needs the running daemon")
    lock = _offline_lock(config, exclusive=True, why=why)
    try:
        return asyncio.run(_offline_edit(verb, config, ids))
    finally:
        lock.release()


async def _offline_edit(verb: str, config: RelayConfig, ids: list[str]) -> list[dict[str, Any]]:
    from relayd.observe.mainlog import MainLog
    from relayd.queue.spool import Spool, SpoolCorruptError, SpoolEntryMissing

    spool = Spool(config.spool_dir)
    log = MainLog(config.log_file) if config.log_file is not None else None
    user = _user_name()
    progress = _Progress(verb, sys.stderr)
    results: list[dict[str, Any]] = []
    try:
        for n, message_id in enumerate(ids, 1):
            try:
                result, line = await _edit_one(spool, verb, message_id, user)
            except SpoolEntryMissing:
                result, line = "not in queue", None
            except SpoolCorruptError:
                result, line = "damaged, set aside", None
            if log is not None and line is not None:
                log.info(line)
                if result == "removed":
                    log.completed(message_id)
            results.append({"id": message_id, "result": result})
            if len(ids) > 1:
                progress.update(n, len(ids))
    finally:
        progress.end()
        if log is not None:
            log.close()
    return results


async def _edit_one(spool: Any, verb: str, message_id: str, user: str) -> tuple[str, str | None]:
    entry = spool.read_entry(message_id)
    if entry is None:
        return "not in queue", None
    if verb == "remove":
        if not spool.remove(message_id):
            return "not in queue", None
        return "removed", f"{message_id} removed by {user}"
    frozen = verb == "freeze"
    if entry.frozen == frozen:
        return ("already frozen" if frozen else "not frozen"), None
    await spool.update(replace(entry, frozen=frozen), durable=True)
    return ("frozen" if frozen else "thawed"), f"{message_id} {'frozen' if frozen else 'unfrozen'} by {user}"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _report(verb: str, results: Sequence[dict[str, Any]], one_by_one: bool) -> int:
    failed = [r for r in results if r.get("result") not in _OK_RESULTS]
    if one_by_one or len(results) <= PER_ID_LINES:
        for r in results:
            for line in r.get("log", []):
                print(sanitize(str(line), limit=4096))
            sentence = _SENTENCES.get(str(r.get("result")), sanitize(str(r.get("result"))))
            print(f"Message {r.get('id')} {sentence}")
    else:
        counts: dict[str, int] = {}
        for r in results:
            counts[str(r.get("result"))] = counts.get(str(r.get("result")), 0) + 1
        print(f"{verb}: " + ", ".join(f"{n} {sanitize(k)}" for k, n in sorted(counts.items())))
        for r in failed:
            print(f"Message {r.get('id')} {_SENTENCES.get(str(r.get('result')), 'failed')}", file=sys.stderr)
    if not results:
        print(f"{verb}: no message matched")
    return EXIT_FAILURE if failed else EXIT_OK


def _action(verb: str, *, confirm: bool = False) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        config = load_relay_config(args)
        ids, one_by_one = _targets(args, config)
        if ids and confirm:
            _confirm(args, verb, len(ids))
        if not ids:
            return _report(verb, [], one_by_one)
        extra = {"wait": args.wait} if args.wait is not None else {}
        try:
            results = _run_action(verb, config, ids, extra)
        except DaemonNotRunning as why:
            results = _offline_action(verb, config, ids, why)
        except ControlUnavailable as exc:
            raise CliError(str(exc)) from None
        return _report(verb, results, one_by_one)

    run.__name__ = f"cmd_queue_{verb}"
    return run


def cmd_queue_flush(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    extra: dict[str, Any] = {"include_frozen": not args.skip_frozen}
    if args.ids or not _selection(args).is_empty:
        ids, _ = _targets(args, config)
        if not ids:
            print("flush: no message matched")
            return EXIT_OK
        extra["ids"] = ids
    try:
        progress = _Progress("flush", sys.stderr)
        final: dict[str, Any] = {}
        for message in _client(config).stream("flush", **extra):
            if "progress" in message:
                progress.update(int(message["progress"]), int(message["total"]))
            final = message
        progress.end()
    except DaemonNotRunning as why:
        raise CliError(f"{why}; `{PROG} queue flush` needs the running daemon") from None
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    reply = _checked(final)
    thawed = f", {reply['thawed']} of them thawed" if reply.get("thawed") else ""
    print(f"{reply['forced']} message(s) forced for delivery now, ignoring retry times{thawed}")
    return EXIT_OK


# ---------------------------------------------------------- reload / status


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        config = load_relay_config(args)
    except CliError as exc:  # relayd would refuse it the same way; say where, without asking it
        raise CliError(f"not reloading: relayd would keep its running configuration:\n{exc.message}") from None
    try:
        reply = _client(config).request("reload")
    except ControlUnavailable as exc:
        raise CliError(f"{exc}; nothing to reload") from None
    if not reply.get("ok"):
        problems = reply.get("problems") or str(reply.get("error", "reload failed")).splitlines()
        raise CliError("relayd kept its running configuration:\n" + "\n".join(str(p) for p in problems))
    print(f"relayd reloaded its configuration from {reply.get('config', config.source)}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    try:
        status = _checked(_client(config).request("status"))
    except DaemonNotRunning as why:
        if args.json:
            entries = _offline_entries(config, why)
            counts = queue_counts(entries, (), time.time())
            print(json.dumps({"running": False, "queue": counts}, indent=1))
            return EXIT_FAILURE
        raise CliError(str(why)) from None
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    status.pop("done", None)
    status.pop("ok", None)
    _add_verify_results(config, status)
    if args.json:
        print(json.dumps({"running": True, **status}, indent=1))
    else:
        print("\n".join(status_lines(status, time.time()) + usage_status_lines(status)))
    return EXIT_OK


def _add_verify_results(config: RelayConfig, status: dict[str, Any]) -> None:
    """Each transport's state word and its last `transport verify` result, beside the daemon's view."""
    from relayd.delivery import verifyrecord
    from relayd.ops.queueview import transport_state

    verified = verifyrecord.read(config.spool_dir)
    transports = status.setdefault("transports", {})
    for name in set(config.transports) | set(transports):
        entry = transports.setdefault(name, {})
        entry["state"] = transport_state(entry)
        entry["last_verify"] = verified.get(name)


# --------------------------------------------------------------- send-test


def _default_sender(tenant: TenantConfig, hostname: str) -> str:
    """An address the tenant may use: an exact one, else relayd-test@ its first *@domain,
    else (a tenant that may send as anyone) relayd-test@ relay.yaml's hostname."""
    for pattern in tenant.senders:
        if "*" not in pattern:
            return pattern
    for pattern in tenant.senders:
        if pattern.startswith("*@") and "*" not in pattern[2:]:
            return f"relayd-test@{pattern[2:]}"
    if "*" in tenant.senders or "*@*" in tenant.senders:
        return f"relayd-test@{hostname}"
    raise UsageError(f"tenant {tenant.name} has no concrete sender pattern; give --from ADDRESS")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _connect_host(address: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(address, address)


def _tls_context(config: RelayConfig, host: str) -> ssl.SSLContext:
    """On loopback, trust exactly relayd's own certificate; elsewhere the system CAs."""
    if _is_loopback(host) and config.tls is not None:
        context = ssl.create_default_context(cafile=str(config.tls.cert_file))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        # The listener's own certificate is the only trust anchor, so the name
        # in it (often the public host name, not 127.0.0.1) need not match.
        context.check_hostname = False
        return context
    return ssl.create_default_context()


def _listener_port(config: RelayConfig) -> tuple[str, int]:
    first = config.listeners[0]
    try:
        reply = _client(config).request("status")
        bound = reply.get("listeners") or []
        if reply.get("ok") and bound:
            return _connect_host(str(bound[0]["address"])), int(bound[0]["port"])
    except ControlUnavailable:
        pass
    return _connect_host(first.address), first.port


def _test_message(sender: str, recipient: str, hostname: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = "relayd send-test"
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid("send-test", domain=hostname)
    msg.set_content(f"A test message sent with `{PROG} send-test` through relayd on {hostname}.\n")
    return msg


def _submit(
    config: RelayConfig, tenant: TenantConfig, sender: str, recipient: str, password: str | None,
    source: str | None,
) -> str:
    """Submit one message to the first listener; returns relayd's queue id."""
    from relayd.config.model import TlsMode

    listener = config.listeners[0]
    host, port = _listener_port(config)
    source_address = (source, 0) if source else None
    context = _tls_context(config, host)
    message = _test_message(sender, recipient, config.hostname).as_bytes(
        policy=EmailMessage().policy.clone(linesep="\r\n")
    )
    client: smtplib.SMTP
    if listener.tls is TlsMode.IMPLICIT:
        client = smtplib.SMTP_SSL(host, port, timeout=30, context=context, source_address=source_address)
    else:
        client = smtplib.SMTP(host, port, timeout=30, source_address=source_address)
    with client:
        client.ehlo(config.hostname)
        if listener.tls is TlsMode.STARTTLS:
            client.starttls(context=context)
            client.ehlo(config.hostname)
        if password is not None:
            client.login(tenant.name, password)
        for step, reply in (("MAIL", client.mail(sender)), ("RCPT", client.rcpt(recipient))):
            if reply[0] != 250:
                raise CliError(f"relayd refused {step}: {reply[0]} {sanitize(reply[1].decode('utf-8', 'replace'))}")
        code, text = client.data(message)
    answer = text.decode("utf-8", "replace")
    found = _QUEUE_ID.search(answer)
    if code != 250 or found is None:
        raise CliError(f"relayd refused the message: {code} {sanitize(answer)}")
    return found.group(1)


def _follow(config: RelayConfig, message_id: str, recipient: str, timeout: float) -> tuple[str, str] | None:
    """Ask relayd until the recipient is delivered, deferred or failed (or the message left the queue).

    relayd answers from the events it keeps in memory, never from its log file.
    """
    deadline = time.monotonic() + timeout
    client = _client(config)
    while True:
        try:
            reply = client.request("queue.outcome", id=message_id, recipient=recipient)
        except ControlUnavailable as exc:
            raise CliError(str(exc)) from None
        if not reply.get("ok"):
            raise CliError(f"relayd could not say what became of {message_id}: {reply.get('error', 'no answer')}")
        outcome = reply.get("outcome")
        if isinstance(outcome, str):
            return outcome, str(reply.get("detail", ""))
        if time.monotonic() >= deadline:
            return None
        time.sleep(SEND_TEST_POLL)


def captured_file(config: RelayConfig, tenant: TenantConfig, recipient: str, queue_id: str) -> Path | None:
    """The Maildir file a capture transport on the recipient's route wrote for `queue_id`.

    The capture transport ends each file name with the queue id, so this is a
    glob of new/ and cur/, not a read of every message.
    """
    from relayd.config.model import CaptureTransportConfig
    from relayd.delivery.router import route

    found = route(tenant, recipient)
    for name in found.transports if found is not None else ():
        transport = config.transports.get(name)
        if isinstance(transport, CaptureTransportConfig):
            for sub in ("new", "cur"):
                for path in sorted((transport.maildir / sub).glob(f"*.{queue_id}*")):
                    return path
    return None


def _submit_failure(exc: BaseException) -> str:
    """Why the submission failed, in words: `connection refused`, not `[Errno 111] ...`."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
        if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
            return f"{reason} (is relayd running? `{PROG} status` says)"
        return sanitize(reason)
    return sanitize(str(exc) or type(exc).__name__)


def cmd_send_test(args: argparse.Namespace) -> int:
    config = load_relay_config(args)
    tenant = config.tenants.get(args.tenant)
    if tenant is None:
        raise CliError(f"no tenant named {args.tenant!r} in {config.source}")
    recipient = args.to
    sender = args.sender or _default_sender(tenant, config.hostname)
    host, port = _listener_port(config)
    bound = [a for a in tenant.bind_addresses if _is_loopback(a)] if _is_loopback(host) else []
    source = bound[0] if bound else None
    password = None if source else read_password(args, f"Password of tenant {tenant.name}: ", confirm=False)
    try:
        message_id = _submit(config, tenant, sender, recipient, password, source)
    except smtplib.SMTPAuthenticationError:
        raise CliError(f"relayd refused the login of tenant {tenant.name} (wrong password?)") from None
    except (smtplib.SMTPException, ssl.SSLError, OSError) as exc:
        raise CliError(f"could not submit to relayd at {host}:{port}: {_submit_failure(exc)}") from None
    print(f"queued as {message_id}; following it for up to {args.timeout:g}s")
    found = _follow(config, message_id, recipient, args.timeout)
    if found is None:
        raise CliError(f"no outcome for {message_id} within {args.timeout:g}s; see `{PROG} queue show {message_id} --log`")
    outcome, detail = found
    captured = captured_file(config, tenant, recipient, message_id) if outcome in ("delivered", "completed") \
        else None
    if captured is not None:
        print(f"delivered (captured as {captured})")
        return EXIT_OK
    print(f"{outcome}: {sanitize(detail, limit=2048)}")
    return EXIT_OK if outcome == "delivered" else EXIT_FAILURE


# ------------------------------------------------------------ registration


def add_queue_commands(subparsers: Subparsers) -> None:
    """`queue` with its verbs, plus the top-level `reload`, `status` and `send-test`."""
    filters = _filter_options()
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

    actions = (
        ("deliver", "deliver now, ignoring retry times; thaws frozen ones (exim -M)", False),
        ("freeze", "keep from delivery until thawed (exim -Mf)", False),
        ("thaw", "allow delivery again (exim -Mt)", False),
        ("remove", "delete from the queue without a bounce (exim -Mrm)", True),
        ("giveup", "fail the open recipients now and bounce to the sender (exim -Mg)", True),
    )
    for verb, text, confirm in actions:
        p = verbs.add_parser(verb, parents=[filters], help=text)
        p.add_argument("ids", nargs="*", metavar="ID", help="queue ids (or select with the options below)")
        p.add_argument("--wait", type=float, metavar="SECONDS",
                       help="how long to wait for a delivery attempt already running (default 60)")
        if confirm:
            p.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
        p.set_defaults(func=_action(verb, confirm=confirm))

    p = verbs.add_parser("flush", parents=[filters], help="every message now, ignoring all retry times (exim -qff)")
    p.add_argument("ids", nargs="*", metavar="ID", help="queue ids (default: the whole queue, or the selection)")
    p.add_argument("--skip-frozen", action="store_true", help="leave frozen messages alone (exim -qf)")
    p.set_defaults(func=cmd_queue_flush)

    p = subparsers.add_parser(
        "reload", help="re-read relay.yaml in the running relayd (like SIGHUP)",
        description="Check relay.yaml, then have the running relayd re-read it. All or nothing: on a "
        "problem relayd keeps its running configuration and the problem is printed as FILE:LINE:COL.",
    )
    p.set_defaults(func=cmd_reload)

    p = subparsers.add_parser(
        "status", help="the running relayd: listeners, queue, transports",
        description="The running relayd: its listeners, the queue by state and its oldest message, and per "
        "transport its state (ok, failing, unused, retry wait), last success, last error and last "
        "`relayctl transport verify` result. Exit status 1 when relayd is not running.",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "send-test", help="send a test message through relayd and follow it",
        description="Submit one test message to relayd's first listener as a tenant (with its password, "
        "or from its bound loopback address), then follow it until it is delivered, deferred or failed. "
        "Exit status 0 when delivered (or captured by a capture transport), else 1.",
    )
    p.add_argument("--tenant", required=True, help="the tenant to submit as")
    p.add_argument("--to", required=True, metavar="ADDRESS", help="the recipient of the test message")
    p.add_argument("--from", dest="sender", metavar="ADDRESS", help="default: an allowed sender of the tenant")
    p.add_argument("--password-stdin", action="store_true", help="read the tenant's password as one line of stdin")
    p.add_argument("--timeout", type=float, default=SEND_TEST_TIMEOUT, metavar="SECONDS",
                   help=f"how long to follow the message (default {SEND_TEST_TIMEOUT:g}s)")
    p.set_defaults(func=cmd_send_test)


def mailq_main(argv: list[str] | None = None) -> int:
    """`mailq [--config PATH] [filters] [-i] [--json]`: `relayctl queue list` on its own.

    It builds only its own small parser (not every relayctl group), because
    an operator types it often and expects it at once.
    """
    parser = argparse.ArgumentParser(prog="mailq", parents=[_filter_options()],
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
