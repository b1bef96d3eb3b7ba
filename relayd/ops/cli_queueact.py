"""relayctl's queue actions: deliver, freeze, thaw, remove, giveup and flush.

Takes: message ids or a selection (relayd.ops.queuesource), `--yes` or a
terminal answer for the destructive ones, relay.yaml.
Emits: the request to the running relayd's control socket, with progress on
stderr; one line per message (or a count by result for many) on stdout;
exit 1 when any message could not be acted on. With relayd stopped, freeze,
thaw and remove are made straight on the spool under its daemon lock, by the
same code the daemon uses (relayd.ops.queueedit), and logged in the main log
the same way.
Untrusted input: message ids (checked for the id shape), the terminal's
answer, and the daemon's replies (their text sanitised for the terminal).
Fails: with one `relayctl: sentence` line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import sys
import time
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

from relayd.config.model import RelayConfig
from relayd.jsonwire import JsonObject, JsonOut, as_int, as_list, as_objects
from relayd.observe.events import EventSink, FanOut
from relayd.observe.mainlog import MainLog
from relayd.ops import queueedit
from relayd.ops.clicommon import EXIT_FAILURE, EXIT_OK, PROG, CliError, UsageError, load_relay_config
from relayd.ops.controlclient import ControlUnavailable, DaemonNotRunning
from relayd.ops.queuesource import (
    all_rows,
    checked,
    checked_id,
    control_client,
    filter_options,
    offline_lock,
    queue_filter,
)
from relayd.ops.queueview import sanitize, select
from relayd.queue.spool import Spool, SpoolCorruptError, SpoolEntryMissing

if TYPE_CHECKING:
    from relayd.ops.clicommon import Subparsers

PER_ID_LINES = 20  # up to this many messages, actions print one line per message

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
    ids = [checked_id(i) for i in args.ids]
    selection = queue_filter(args)
    if selection.is_empty:
        if not ids:
            raise UsageError(
                f"name one or more message ids, or select messages with a filter (e.g. --tenant acme); "
                f"see `{PROG} queue list`"
            )
        return list(dict.fromkeys(ids)), True
    now = time.time()
    chosen = [row.id for row in select(all_rows(config), selection, now)]
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


def _run_action(verb: str, config: RelayConfig, ids: list[str], extra: dict[str, JsonOut]) -> list[JsonObject]:
    """Send the action to relayd, showing progress; DaemonNotRunning when none runs."""
    progress = _Progress(verb, sys.stderr)
    final: JsonObject = {}
    try:
        for message in control_client(config).stream(verb, ids=ids, **extra):
            if "progress" in message and "total" in message:
                progress.update(as_int(message["progress"]), as_int(message["total"]))
            final = message
    finally:
        progress.end()
    return as_objects(checked(final).get("results", []))


def _offline_action(verb: str, config: RelayConfig, ids: list[str], why: DaemonNotRunning) -> list[JsonObject]:
    """freeze, thaw and remove straight on the spool files, relayd being stopped."""
    if verb not in ("freeze", "thaw", "remove"):
        raise CliError(f"{why}; `{PROG} queue {verb}` needs the running daemon")
    lock = offline_lock(config, exclusive=True, why=why)
    try:
        return asyncio.run(_offline_edit(verb, config, ids))
    finally:
        lock.release()


async def _offline_edit(verb: str, config: RelayConfig, ids: list[str]) -> list[JsonObject]:
    spool = Spool(config.spool_dir)
    log = MainLog(config.log_file) if config.log_file is not None else None
    events: EventSink = log if log is not None else FanOut([])
    user = _user_name()
    progress = _Progress(verb, sys.stderr)
    results: list[JsonObject] = []
    try:
        for n, message_id in enumerate(ids, 1):
            try:
                result = await _edit_one(spool, verb, message_id, user, events)
            except SpoolEntryMissing:
                result = "not in queue"
            except SpoolCorruptError:
                result = "damaged, set aside"
            results.append({"id": message_id, "result": result})
            if len(ids) > 1:
                progress.update(n, len(ids))
    finally:
        progress.end()
        if log is not None:
            log.close()
    return results


async def _edit_one(spool: Spool, verb: str, message_id: str, user: str, events: EventSink) -> str:
    """The same edit the daemon makes (relayd.ops.queueedit), logged the same way."""
    entry = spool.read_entry(message_id)
    if entry is None:
        return "not in queue"
    if verb == "remove":
        return await queueedit.remove(spool, message_id, user=user, events=events)
    return await queueedit.set_frozen(spool, entry, verb == "freeze", user=user, events=events)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _report(verb: str, results: Sequence[JsonObject], one_by_one: bool) -> int:
    failed = [r for r in results if r.get("result") not in _OK_RESULTS]
    if one_by_one or len(results) <= PER_ID_LINES:
        for r in results:
            for line in as_list(r.get("log")):
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
        extra: dict[str, JsonOut] = {"wait": args.wait} if args.wait is not None else {}
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
    extra: dict[str, JsonOut] = {"include_frozen": not args.skip_frozen}
    if args.ids or not queue_filter(args).is_empty:
        ids, _ = _targets(args, config)
        if not ids:
            print("flush: no message matched")
            return EXIT_OK
        extra["ids"] = ids
    try:
        progress = _Progress("flush", sys.stderr)
        final: JsonObject = {}
        for message in control_client(config).stream("flush", **extra):
            if "progress" in message:
                progress.update(as_int(message["progress"]), as_int(message["total"]))
            final = message
        progress.end()
    except DaemonNotRunning as why:
        raise CliError(f"{why}; `{PROG} queue flush` needs the running daemon") from None
    except ControlUnavailable as exc:
        raise CliError(str(exc)) from None
    reply = checked(final)
    thawed = f", {reply['thawed']} of them thawed" if reply.get("thawed") else ""
    print(f"{reply['forced']} message(s) forced for delivery now, ignoring retry times{thawed}")
    return EXIT_OK


def add_action_verbs(verbs: Subparsers) -> None:
    """deliver, freeze, thaw, remove, giveup and flush, in the `queue` group."""
    filters = filter_options()
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
