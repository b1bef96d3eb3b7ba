"""The sinks relay.yaml may add to the main log, metrics and recent outcomes: a JSON log and webhooks.

Takes: the configuration, a way to read a webhook signing secret from the
credential store, and a callable for operator notices.
Emits: one sink for the daemon's fan-out that hands each event to both, and
their lifecycle (start, stop, reload, reopen on SIGUSR1, close), so the
composition root wires them in a few lines.
Untrusted input: none of its own (see relayd.observe.jsonlog and
relayd.observe.webhooks).
Fails: OSError when a log file or an outbox cannot be opened at start, as the
main log does.
"""

from __future__ import annotations

from pathlib import Path

from relayd.config.model import RelayConfig
from relayd.config.webhookconfig import LogFormat
from relayd.observe import events as ev
from relayd.observe.jsonlog import JsonLog
from relayd.observe.mainlog import MainLog
from relayd.observe.webhooks import Notify, SecretLookup, WebhookSink


def main_log_for(config: RelayConfig) -> MainLog | JsonLog:
    """The sink `log_file` names: Exim-shaped lines, or JSON with `log_format: json`."""
    if config.log_format is LogFormat.JSON:
        return JsonLog(config.log_file)
    return MainLog(config.log_file)


class ExtraSinks:
    """The second (JSON) log file and the webhook endpoints, when configured: one `EventSink`.

    `reconfigure` applies a reloaded configuration: a new JSON log path is
    opened (the old file closed), and changed webhook settings replace the
    webhook sink. The new sink holds the events emitted meanwhile and
    journals them once the old one has closed its outboxes and the new one
    has replayed them, so a reload loses no event and never has two senders
    on one outbox.
    """

    def __init__(self, config: RelayConfig, *, secret: SecretLookup, notify: Notify) -> None:
        self._config = config
        self._secret = secret
        self._notify = notify
        self.json_log = JsonLog(config.json_log_file) if config.json_log_file is not None else None
        self.webhooks = self._webhooks_for(config)

    def _webhooks_for(self, config: RelayConfig) -> WebhookSink | None:
        if not config.webhooks.endpoints:
            return None
        return WebhookSink(config.webhooks, config.webhook_outbox, secret=self._secret, notify=self._notify)

    def emit(self, event: ev.Event) -> None:
        try:
            if self.json_log is not None:
                self.json_log.emit(event)
        finally:
            if self.webhooks is not None:
                self.webhooks.emit(event)

    async def start(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.start()

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()

    async def reconfigure(self, config: RelayConfig) -> None:
        """Apply a reloaded configuration's json_log_file and webhooks (log_format needs a restart)."""
        old_config, self._config = self._config, config
        if config.json_log_file != old_config.json_log_file:
            self._reopen_json_log(config.json_log_file)
        if (config.webhooks, config.webhook_outbox) != (old_config.webhooks, old_config.webhook_outbox):
            old, self.webhooks = self.webhooks, self._webhooks_for(config)
            if old is not None:
                await old.stop()
            if self.webhooks is not None:
                await self._start_reloaded(self.webhooks)

    async def _start_reloaded(self, sink: WebhookSink) -> None:
        try:
            await sink.start()
        except OSError as error:
            self.webhooks = None
            self._notify(f"webhooks stopped: the outboxes cannot be opened ({error}); events are not "
                         "recorded for webhooks until this is fixed and relayd reloaded", "error")

    def _reopen_json_log(self, path: Path | None) -> None:
        try:
            fresh = JsonLog(path) if path is not None else None
        except OSError as error:
            self._notify(f"cannot open json_log_file {path}, keeping the old one: {error}", "error")
            return
        old, self.json_log = self.json_log, fresh
        if old is not None:
            old.close()

    def reopen(self) -> None:
        if self.json_log is not None:
            self.json_log.reopen()

    def close(self) -> None:
        if self.json_log is not None:
            self.json_log.close()
