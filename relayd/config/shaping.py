"""Per-transport shaping limits: how fast and how much one upstream account may be sent.

Takes: the `max_per_*` keys of a transport in relay.yaml (read by
`relayd.config.loader`) and the provider's published defaults
(`relayd.config.presets`).
Emits: a frozen `Shaping` value per transport; None in a field means "no
limit of that kind".
Untrusted input: none beyond relay.yaml, which the loader bounds with the
limits below.
Fails: never; the loader reports out-of-range values as `relay.yaml:LINE:COL:`.

Every limit counts what the upstream accepted: a message counts once per
transaction it went out in, a recipient once per accepted RCPT. The
minute, hour and day windows are calendar windows (UTC unless a zone is
configured), the way providers reset a daily quota at a fixed hour; the
per-second limit is a token bucket, so it smooths instead of bursting at the
start of each second.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bounds: (minimum, maximum); repeated in config/relay.yaml's comments.
PER_SECOND = (0.001, 10_000.0)  # one message in ~17 minutes up to 10,000/s
PER_MINUTE = (1, 1_000_000)
PER_HOUR = (1, 10_000_000)
PER_DAY = (1, 100_000_000)
RECIPIENTS_PER_DAY = (1, 1_000_000_000)

# The relay.yaml keys, in the order `relayctl config check` shows them.
KEYS = ("max_per_second", "max_per_minute", "max_per_hour", "max_per_day", "max_recipients_per_day")


@dataclass(frozen=True, slots=True)
class Shaping:
    """A transport's send limits; every field None (the default) means unshaped."""

    max_per_second: float | None = None
    max_per_minute: int | None = None
    max_per_hour: int | None = None
    max_per_day: int | None = None
    max_recipients_per_day: int | None = None

    @property
    def is_limited(self) -> bool:
        return (
            self.max_per_second is not None or self.max_per_minute is not None or self.max_per_hour is not None
            or self.max_per_day is not None or self.max_recipients_per_day is not None
        )

    def overridden(
        self, *, max_per_second: float | None = None, max_per_minute: int | None = None,
        max_per_hour: int | None = None, max_per_day: int | None = None,
        max_recipients_per_day: int | None = None,
    ) -> "Shaping":
        """These limits with each given (not None) value replacing the one here; pure."""
        return Shaping(
            max_per_second=self.max_per_second if max_per_second is None else max_per_second,
            max_per_minute=self.max_per_minute if max_per_minute is None else max_per_minute,
            max_per_hour=self.max_per_hour if max_per_hour is None else max_per_hour,
            max_per_day=self.max_per_day if max_per_day is None else max_per_day,
            max_recipients_per_day=(
                self.max_recipients_per_day if max_recipients_per_day is None else max_recipients_per_day
            ),
        )

    def describe(self) -> str:
        """`max_per_second 1, max_per_day 200` or `unshaped`; for config check and status."""
        parts = [f"{key} {_number(getattr(self, key))}" for key in KEYS if getattr(self, key) is not None]
        return ", ".join(parts) if parts else "unshaped"


def _number(value: float | int) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:g}"
    return str(int(value))


UNSHAPED = Shaping()
