"""The sinks relay.yaml may add to the main log, metrics and recent outcomes: a JSON log and webhooks.

Takes: the configuration, a way to read a webhook signing secret from the
credential store, and a callable for operator notices.
Emits: the sinks to add to the daemon's fan-out, and their lifecycle (start,
stop, reopen on SIGUSR1, close) as one object, so the composition root wires
them in a few lines.
Untrusted input: none of its own (see relayd.observe.jsonlog and
relayd.observe.webhooks).
Fails: OSError when a log file or an outbox cannot be opened at start, as the
main log does.
"""

from __future__ import annotations

from relayd.config.model import RelayConfig
from relayd.config.webhookconfig import LogFormat
from relayd.observe.events import EventSink
from relayd.observe.jsonlog import JsonLog
from relayd.observe.mainlog import MainLog
from relayd.observe.webhooks import Notify, SecretLookup, WebhookSink


def main_log_for(config: RelayConfig) -> MainLog | JsonLog:
    """The sink `log_file` names: Exim-shaped lines, or JSON with `log_format: json`."""
    if config.log_format is LogFormat.JSON:
        return JsonLog(config.log_file)
    return MainLog(config.log_file)


class ExtraSinks:
    """The second (JSON) log file and the webhook endpoints, when configured."""

    def __init__(self, config: RelayConfig, *, secret: SecretLookup, notify: Notify) -> None:
        self.json_log = JsonLog(config.json_log_file) if config.json_log_file is not None else None
        self.webhooks: WebhookSink | None = None
        if config.webhooks.endpoints:
            self.webhooks = WebhookSink(config.webhooks, config.webhook_outbox, secret=secret, notify=notify)

    def sinks(self) -> list[EventSink]:
        return [sink for sink in (self.json_log, self.webhooks) if sink is not None]

    async def start(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.start()

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()

    def reopen(self) -> None:
        if self.json_log is not None:
            self.json_log.reopen()

    def close(self) -> None:
        if self.json_log is not None:
            self.json_log.close()
