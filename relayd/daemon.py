"""The composition root: builds every stage from the config and wires them together.

listener -> spool -> scheduler -> router -> transport -> outcome. Each stage
is handed what it needs here and nowhere else; no stage reaches for a global.
Also here: signals (SIGTERM stops cleanly, SIGHUP reloads all-or-nothing),
systemd readiness, the control socket relayctl talks to (relayd.ops.control),
the spool's daemon lock, and the `relayd` command line.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from typing import Callable, Mapping

from relayd import hardening, replies, sdnotify
from relayd.smtp.authcheck import PasswordChecker
from relayd.smtp.authguard import AuthGuard
from relayd.config.model import RelayConfig, SmtpTransportConfig, TenantConfig
from relayd.config.loader import ConfigError, load_config
from relayd.ops.control import QueueControl
from relayd.ops.controlserver import ControlServer
from relayd.config.credentials import (
    CredentialError, CredentialStore, StoreKeyMismatch, UpstreamCredential,
)
from relayd.delivery.walk import DeliveryAgent
from relayd.delivery.dsn import build_dsn
from relayd.delivery.router import route
from relayd.smtp.fdlimit import DescriptorLimitError, ensure_descriptor_limit
from relayd.delivery.gates import GateSet
from relayd.delivery.oauthsources import STATE_FILE, OAuthSources
from relayd.smtp.listener import ListenerServices, SubmissionRefused, SubmissionServer
from relayd.observe import events as ev
from relayd.observe.extrasinks import ExtraSinks, main_log_for
from relayd.observe.failures import RecentFailures
from relayd.observe.metrics import RelayMetrics, loop_reader
from relayd.observe.outcomes import RecentOutcomes
from relayd.ops.statussource import ObserveListener, RelayPresent, start_observe_listener, status_login
from relayd.delivery.holding import HoldBook
from relayd.delivery.quotaexpiry import QuotaHeldQueue
from relayd.delivery.shaping import ShapingGate, status_wire
from relayd.jsonwire import JsonOutObject
from relayd.observe.counters import CounterError
from relayd.observe.countstore import SqliteCounters
from relayd.observe.oauthmetrics import OAuthCollector
from relayd.observe.shapingmetrics import ShapingCollector
from relayd.ops.usagecontrol import UsageControl
from relayd.queue.usage import TenantUsageService
from relayd.queue.scheduler import Scheduler
from relayd.queue.spool import IncomingMessage, Spool, SpoolError, SpoolIO, SpoolFullError, SpoolWriteError
from relayd.runtime import (
    build_parser, fix_malloc_mmap_threshold, harden_process, install_signals, make_server_tls_context,
    open_credentials, prepare_dev_config, run_event_loop, shared_caps,
)
from relayd.queue.spoollock import SpoolInUse, SpoolLock, lock_path
from relayd.queue.spoolroom import SpoolRoom
from relayd.delivery.transport import CredentialLike, Transport, build_transports
from relayd.delivery.upstreamhealth import UpstreamHealth
from relayd.delivery.providergate import ProviderLimits
from relayd.delivery.providerreplies import ReplyClass
from relayd.values import Envelope, QueueEntry

_INDEX_BATCH = 5000  # queued messages indexed between two turns of the event loop


class QueuedBody:
    """A message streaming into the spool, as the listener sees it (`relayd.smtp.intake.IncomingBody`).

    Spool errors become the SMTP reply (`SubmissionRefused`), logged once;
    `commit` also logs the arrival and schedules the message.
    """

    def __init__(self, message: IncomingMessage, relay: "Relay") -> None:
        self._message = message
        self._relay = relay

    @property
    def id(self) -> str:
        return self._message.id

    async def begin(self, envelope: Envelope) -> None:
        try:
            await self._message.begin(envelope)
        except SpoolError as error:
            raise self._relay._refusal(error) from None

    async def write(self, data: bytes) -> None:
        try:
            await self._message.write(data)
        except SpoolError as error:
            raise self._relay._refusal(error) from None

    async def commit(self) -> str:
        try:
            entry = await self._message.commit()
        except SpoolError as error:
            raise self._relay._refusal(error) from None
        self._relay.queued(entry)
        return entry.id

    def abort(self) -> None:
        self._message.abort()


class Relay:
    """A running relayd: owns every stage and their lifecycles."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        environ: Mapping[str, str] | None = None,
        spool_io: SpoolIO | None = None,
        provider_wait: Callable[[ReplyClass], float] = ReplyClass.wait,
    ) -> None:
        self.config = config
        self.environ = dict(os.environ if environ is None else environ)
        self.log = main_log_for(config)
        self.metrics = RelayMetrics()
        self.outcomes = RecentOutcomes()
        self.extra_sinks = ExtraSinks(config, secret=self._webhook_secret,
                                      notify=lambda text, level: self.events.emit(ev.Notice(text=text, level=level)))
        self.failures = RecentFailures()
        # The fan-out every stage emits into.
        self.events = ev.FanOut([self.log, self.metrics, self.outcomes, self.extra_sinks, self.failures])
        self.health = UpstreamHealth()
        self.provider_limits = ProviderLimits()  # quota and throttling replies close a transport
        self.counters = SqliteCounters.in_directory(config.spool_dir)
        self.usage = TenantUsageService(
            config=lambda: self.config, counters=self.counters, events=self.events, registry=self.metrics.registry,
            queue=QuotaHeldQueue(lambda: self.scheduler, lambda: self.agent, lambda: self.config),
        )
        self.shaping = ShapingGate(lambda name: self.config.transport_shaping(name), self.counters, on_error=self.warn,
                                   shared=shared_caps(self.usage.shared, lambda: self.config, self.warn))
        for sink in (self.usage.deliveries, self.usage.metrics):
            self.events.add(sink)
        self.passwords = PasswordChecker()
        self.room = SpoolRoom(
            config.spool_dir, lambda: self.config.spool_limits,
            lambda: max(listener.max_message_size for listener in self.config.listeners),
            state_failure=lambda: self.agent.state_write_failure(), log=self.warn)
        self.spool = Spool(config.spool_dir, io=spool_io, on_removed=self.room.forget)
        self.credentials = open_credentials(config, self.environ)
        self.oauth = OAuthSources(config.spool_dir / STATE_FILE, self.events,
                                  lambda name: self.config.retry_for(name))
        self.status_login = status_login(config, self.credentials)
        self.transports: dict[str, Transport] = self._build_transports(config)
        self.gates = GateSet([self.health, self.oauth.gate, self.provider_limits, self.shaping],
                             reserving=[self.shaping] if self.usage.shared is not None else [])
        self.agent = DeliveryAgent(
            config=lambda: self.config,
            spool=self.spool,
            transports=lambda: self.transports,
            gates=self.gates,
            events=self.events,
            enqueue_bounce=self.enqueue_bounce,
            build_dsn=build_dsn,
            is_forced=lambda message_id: self.scheduler.is_forced(message_id),
            release_room=self.room.release_emergency_reserve,
            keep_room=self.room.keep_emergency_reserve,
            provider_wait=provider_wait,
        )
        self.holds = HoldBook(
            hold_until=self.agent.hold_until, gate_hold=self.agent.gate_hold, unrecorded=self.agent.unrecorded,
            spacing=self.shaping.spacing, config=lambda: self.config, events=self.events,
        )
        self.scheduler = Scheduler(
            self.agent.deliver,
            max_parallel=config.delivery.max_parallel,
            sweep_interval=config.delivery.queue_run_interval,
            on_error=lambda message_id, error: self.events.emit(ev.Notice(
                text=f"{message_id} delivery error: {type(error).__name__}: {error}", level="error"
            )),
            hold_until=lambda entry: self.usage.quotas.held_until(entry.id) or self.holds.hold_until(entry),
            lane_of=self.agent.lane_of,
            transport_limit=lambda name: self.config.transport_max_parallel(name),
        )
        self.guard = AuthGuard()  # one for every listener; each brings its own limits
        self.server = SubmissionServer(
            ListenerServices(
                config=lambda: self.config,
                authenticate=self.authenticate,
                accept=self.accept,
                new_id=self.spool.new_id,
                admit=lambda tenant, size: self.room.refusal(tenant, size), quota=self.usage.quotas.refusal,
                guard=self.guard,
                events=self.events,
                route=route,
                receive=self.receive,
            ),
            make_server_tls_context(config),
        )
        self.control = ControlServer(
            config.control_path,
            UsageControl(self.usage.report, self.usage.status, lambda: self.config.tenants).handlers(QueueControl(
                config=lambda: self.config,
                scheduler=self.scheduler,
                spool=self.spool,
                agent=self.agent,
                health=self.health,
                provider_limits=self.provider_limits.snapshot,
                events=self.events,
                outcomes=self.outcomes,
                reload=self.reload_report,
                listeners=lambda: self.server.bound,
                spool_room=self.room.status,
                shaping=self.shaping_status,
                hold_reasons=lambda: {**self.holds.reasons(), **self.usage.quotas.hold_reasons()},
            ).handlers()),
            log_error=lambda text: self.events.emit(ev.Notice(text=text, level="error")),
            ready=self.wait_index_loaded,
        )
        self._spool_lock: SpoolLock | None = None
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.index_loaded: asyncio.Task[None] | None = None
        self._observe: ObserveListener | None = None
        self.present = RelayPresent(
            config=lambda: self.config, listeners=lambda: self.server.bound, scheduler=self.scheduler,
            gates=self.gates, health=self.health, room=self.room, failures=self.failures,
            index_ready=lambda: self.index_loaded is not None and self.index_loaded.done(),
            usage=self.usage.page_usage,
        )

    def warn(self, text: str) -> None:
        """A warning for the operator, through the event fan-out."""
        self.events.emit(ev.Notice(text=text, level="warning"))

    # -- construction helpers --------------------------------------------------

    def _lookup_credential(self, name: str) -> CredentialLike | None:
        return self.oauth.lookup(name, self.credentials)

    def _webhook_secret(self, name: str) -> bytes | None:
        credential = self.credentials.get(name) if self.credentials is not None else None
        return credential.password.reveal().encode("utf-8") if isinstance(credential, UpstreamCredential) else None

    def _build_transports(self, config: RelayConfig) -> dict[str, Transport]:
        self.oauth.rebuild(config.transports, self.credentials)
        return build_transports(
            config.transports, credentials=self._lookup_credential, helo_name=config.hostname
        )

    # -- services handed to the listener -----------------------------------------

    async def authenticate(self, login: str, password: str) -> TenantConfig | None:
        tenant = self.config.tenants.get(login)
        return tenant if await self.passwords.check(tenant, password) else None

    async def accept(self, envelope: Envelope, body: bytes) -> str:
        await self._charge(envelope.id, envelope, abort=lambda: None)
        try:
            entry = await self.spool.accept(envelope, body)
        except SpoolFullError as error:
            self.events.emit(ev.SpoolRefusedMessage(full=True, error=str(error)))
            raise SubmissionRefused(replies.SPOOL_FULL) from None
        except SpoolWriteError as error:
            self.events.emit(ev.SpoolRefusedMessage(full=False, error=str(error)))
            raise SubmissionRefused(replies.SPOOL_ERROR) from None
        self.queued(entry)
        return entry.id

    async def receive(self, envelope: Envelope) -> "QueuedBody":
        """Open a message in the queue for the listener to stream DATA into."""
        try:
            message = await self.spool.receive(envelope)
        except SpoolError as error:
            raise self._refusal(error) from None
        await self._charge(message.id, envelope, abort=message.abort)
        return QueuedBody(message, self)

    async def _charge(self, queue_id: str, envelope: Envelope, *, abort: Callable[[], None]) -> None:
        """Count the message against its tenant's quota; over a `refuse` quota it is dropped with a 450."""
        reply = await self.usage.quotas.charge(queue_id, envelope.tenant, len(envelope.recipients))
        if reply is not None:
            abort()
            self.events.emit(ev.SmtpRefused(
                client_ip=envelope.client_ip, stage="DATA", reply=reply, detail=f"A={envelope.tenant} quota",
            ))
            raise SubmissionRefused(reply)

    def _refusal(self, error: SpoolError) -> SubmissionRefused:
        """Log a spool failure while taking a message; the reply the client gets."""
        if isinstance(error, SpoolFullError):
            self.events.emit(ev.SpoolRefusedMessage(full=True, error=str(error)))
            return SubmissionRefused(replies.SPOOL_FULL)
        self.events.emit(ev.SpoolRefusedMessage(full=False, error=str(error)))
        return SubmissionRefused(replies.SPOOL_ERROR)

    def queued(self, entry: QueueEntry) -> None:
        """A new message is durable: count it against its tenant's share, log it, schedule it."""
        self.room.track(entry)
        self.events.emit(ev.MessageArrived(entry=entry))
        self.scheduler.add(entry)

    async def enqueue_bounce(self, original: Envelope, dsn: bytes) -> None:
        bounce = Envelope(
            id=self.spool.new_id(),
            tenant=original.tenant,
            sender="",
            recipients=(original.sender,),
            received_at=time.time(),
            size=len(dsn),
            bounce_of=original.id,
            protocol="local",
        )
        entry = await self.spool.accept(bounce, dsn)
        self.room.track(entry)
        self.events.emit(ev.BounceCreated(
            queue_id=original.id, bounce_id=entry.id, tenant=original.tenant, sender=original.sender, size=len(dsn),
        ))
        self.scheduler.add(entry)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        # relayctl edits the spool directly only while it holds this lock, and
        # a second relayd on the same spool would deliver everything twice.
        where = lock_path(self.config.spool_dir)
        self._spool_lock = await asyncio.to_thread(SpoolLock.acquire, where, exclusive=True, timeout=5.0)
        if self._spool_lock is None:
            raise SpoolInUse(f"spool {self.config.spool_dir} is in use by another relayd or relayctl ({where} is locked)")
        try:
            await self._start_stages()
        except BaseException:
            self._spool_lock.release()
            self._spool_lock = None
            raise

    async def _start_stages(self) -> None:
        loop = asyncio.get_running_loop()
        await self.spool.start()
        await asyncio.to_thread(self.counters.open)
        await self.shaping.load(self.config.transports, time.time())
        await self.usage.start()
        for message_id in await asyncio.to_thread(self.spool.sweep_incoming):
            self.events.emit(ev.IncompleteDiscarded(queue_id=message_id))
        await asyncio.to_thread(self.room.keep_emergency_reserve)
        await self.extra_sinks.start()
        await self.server.start(self.config.listeners)
        await self.control.start()
        self._tasks.append(loop.create_task(self.scheduler.run()))
        self._tasks.append(loop.create_task(self.room.keep_emergency_reserve_in_place()))
        for collector in (ShapingCollector(loop_reader(loop, self.shaping_status)),
                          OAuthCollector(loop_reader(loop, self.oauth.token_lives))):
            self.metrics.registry.register(collector)
        self.usage.metrics.read_with(loop_reader(loop, self.usage.snapshot))
        if self.config.metrics.port is not None:
            self._observe = start_observe_listener(self.present, self.metrics, loop, self.status_login)
        listening = ", ".join(f"{name}={addr}:{port}" for name, addr, port in self.server.bound)
        self.events.emit(ev.DaemonStarted(listening=listening))
        self.index_loaded = loop.create_task(self._load_index())
        self._tasks.append(self.index_loaded)
        sdnotify.notify("READY=1\nSTATUS=accepting mail", self.environ)
        interval = sdnotify.watchdog_interval(self.environ)
        if interval is not None:
            self._tasks.append(loop.create_task(sdnotify.watchdog_loop(interval, self.environ)))

    def shaping_status(self) -> dict[str, JsonOutObject]:
        """Per transport: rate, window counts against limits, next release (status, metrics)."""
        return {s.transport: status_wire(s) for s in self.shaping.status(sorted(self.config.transports), time.time())}

    async def wait_index_loaded(self) -> None:
        if self.index_loaded is not None:
            await asyncio.shield(self.index_loaded)

    async def _load_index(self) -> None:
        """Rebuild the in-memory index from the spool while mail is already accepted.

        Reading 100,000 message headers takes seconds; applications should not
        wait for that, and nothing about accepting a new message depends on it.
        """
        started = time.monotonic()
        loaded = await asyncio.to_thread(self.spool.load)
        for problem in loaded.problems:
            self.warn(f"spool: {problem}")
        for message_id in loaded.discarded:
            self.events.emit(ev.IncompleteDiscarded(queue_id=message_id))
        for entry in loaded.entries:
            self.room.track(entry)
        added = 0
        # Indexing routes every message to its lane: in batches, so the
        # listeners keep answering while 100,000 queued messages are indexed.
        for start in range(0, len(loaded.entries), _INDEX_BATCH):
            added += self.scheduler.add_loaded(loaded.entries[start : start + _INDEX_BATCH])
            await asyncio.sleep(0)
        # The index lives as long as the process: keep the cyclic collector
        # from walking 100,000 queued entries on every full collection.
        gc.freeze()
        self.usage.start_releases()
        self.events.emit(ev.Notice(text=f"queue index loaded: {added} message(s) in {time.monotonic() - started:.2f}s"))

    async def stop(self) -> None:
        sdnotify.notify("STOPPING=1", self.environ)
        self.events.emit(ev.DaemonStopping())
        self.server.stop_accepting()
        await self.control.stop()
        await self.server.drain(self.config.delivery.shutdown_grace)
        await self.scheduler.stop(self.config.delivery.shutdown_grace)
        await self.agent.record_unrecorded()
        await self.shaping.drain()
        await self.usage.stop()
        await self.counters.close()
        for message_id, reason in self.agent.unrecorded().items():
            self.events.emit(ev.Notice(
                text=f"{message_id} stopping with its last delivery outcome unrecorded ({reason}); "
                "recipients it delivered may be sent again after the restart", level="error",
            ))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in self.transports.values():
            await transport.close()
        await self.extra_sinks.stop()
        await self.spool.stop()
        if self._observe is not None:
            self._observe.stop()
        self.passwords.close()
        await self.oauth.state_file.close()
        self.events.emit(ev.DaemonStopped())
        self.log.close()
        self.extra_sinks.close()
        if self._spool_lock is not None:
            self._spool_lock.release()
            self._spool_lock = None
        self._stopped.set()

    async def reload(self) -> bool:
        """Re-read the YAML; on any error keep running on the old config. True if it took."""
        return not await self.reload_report()

    async def reload_report(self) -> list[str]:
        """`reload`, returning the problems (``relay.yaml:LINE:COL: sentence`` lines).

        Empty when the new configuration took; the control socket's `reload`
        sends these lines to relayctl.
        """
        try:
            new = load_config(self.config.source)
            credentials = self._reopen_credentials(new)
            login = status_login(new, credentials)
        except ConfigError as error:
            problems = str(error).splitlines()
        except CredentialError as error:
            problems = [str(error)]
        except OSError as error:
            problems = [f"{self.config.source}: {error.strerror or error}"]
        else:
            problems = []
        if problems:
            for line in problems:
                self.events.emit(ev.Notice(text=f"reload failed, keeping the running configuration: {line}", level="error"))
            return problems
        if new.listeners != self.config.listeners or new.tls != self.config.tls:
            self.warn("listener or TLS changes take effect at the next restart")
        if new.log_format != self.config.log_format:
            self.warn("a new log_format takes effect at the next restart")
        if new.control_path != self.config.control_path:
            self.warn("a new control_socket path takes effect at the next restart")
        old_transports = self.transports
        self.credentials = credentials
        self.config = new
        self.status_login = login
        if self._observe is not None:
            self._observe.app.auth = login
        self.transports = self._build_transports(new)
        self.passwords.clear()
        for transport in old_transports.values():
            await transport.close()
        await self.shaping.load(new.transports, time.time())
        await self.usage.quotas.load()
        self.scheduler.gate_opened()  # a raised or removed limit releases what it held
        await self.extra_sinks.reconfigure(new)
        self.events.emit(ev.ConfigReloaded(source=str(new.source)))
        sdnotify.notify("READY=1\nSTATUS=configuration reloaded", self.environ)
        return []

    def _reopen_credentials(self, new: RelayConfig) -> CredentialStore | None:
        """The store for a reload; after a key rotation, the credentials already held.

        `relayctl secret rotate-key` re-encrypts the store under a new master
        key, but relayd got its key at start (systemd hands LoadCredential=
        files over only then, and $RELAYD_MASTER_KEY is gone from the
        environment): it cannot open the new store until restarted. The
        credentials it decrypted before are still the same logins, so a
        reload keeps them, unless the new configuration needs one it does
        not have; the log and the error say to restart relayd.
        """
        try:
            return open_credentials(new, self.environ)
        except StoreKeyMismatch as error:
            held = self.credentials
            if held is None or new.credentials.store != self.config.credentials.store:
                raise
            restart = (
                f"the store was re-encrypted with master key {error.store_key_id} "
                "(relayctl secret rotate-key), which relayd only reads at start: restart relayd "
                "(systemctl restart relayd)"
            )
            missing = sorted(_credential_names(new) - set(held.names()))
            if missing:
                raise StoreKeyMismatch(
                    f"{error}; credential(s) {', '.join(missing)} are not among those relayd holds "
                    f"and {restart} to load them", store_key_id=error.store_key_id,
                ) from None
            self.warn(
                f"{new.credentials.store}: {restart} to use the new key; until then the "
                f"{len(held.names())} credential(s) loaded before stay in use"
            )
            return held

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): open the log files again; a failure keeps the old ones."""
        try:
            self.log.reopen()
            self.extra_sinks.reopen()
        except OSError as error:
            self.events.emit(ev.Notice(text=f"cannot reopen a log file, keeping the old one: {error}", level="error"))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _credential_names(config: RelayConfig) -> set[str]:
    names = {
        t.credential for t in config.transports.values()
        if isinstance(t, SmtpTransportConfig) and t.credential is not None
    } | {endpoint.credential for endpoint in config.webhooks.endpoints}
    return names | ({config.metrics.status_auth} if config.metrics.status_auth else set())


async def serve(config: RelayConfig, environ: Mapping[str, str] | None = None) -> int:
    relay = Relay(config, environ=environ)
    loop = asyncio.get_running_loop()
    install_signals(relay, loop)
    await relay.start()
    relay.events.emit(ev.Notice(text=hardening.describe()))
    if config.pid_file is not None:
        config.pid_file.write_text(f"{os.getpid()}\n")
    try:
        await relay.wait_stopped()
    finally:
        # Stopped cleanly: a repeated SIGTERM/SIGINT while the event loop and
        # its threads wind down must not turn a clean exit into a kill.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        if config.pid_file is not None:
            config.pid_file.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    environ = harden_process()
    args = build_parser().parse_args(argv)
    fix_malloc_mmap_threshold()
    if args.command == "dev":
        prepared = prepare_dev_config(args)
        if isinstance(prepared, int):
            return prepared
        config = prepared
    else:
        config_path = args.config
        try:
            config = load_config(config_path)
        except ConfigError as error:
            print(str(error), file=sys.stderr)
            return 78  # EX_CONFIG
        except OSError as error:
            print(f"relayd: cannot read {config_path}: {error.strerror}", file=sys.stderr)
            return 78
    try:
        ensure_descriptor_limit(config)
    except DescriptorLimitError as error:
        print(f"relayd: {error}", file=sys.stderr)
        return 78
    try:
        return run_event_loop(serve(config, environ))
    except (CredentialError, CounterError) as error:
        print(f"relayd: {error}", file=sys.stderr)
        return 78
    except OSError as error:
        print(f"relayd: {error}", file=sys.stderr)
        return 71  # EX_OSERR
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
