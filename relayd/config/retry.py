"""Retry schedules in Exim's notation, and the pure arithmetic of when to try again.

A schedule is a list of rules such as ``F,2h,15m; G,16h,1h,1.5; F,4d,6h``.
Each rule applies until its cutoff, measured from the first failure:

* ``F,<cutoff>,<interval>`` retries at a fixed interval;
* ``G,<cutoff>,<first interval>,<factor>`` starts at the first interval and
  multiplies the previous interval by the factor each time.

Once the time since the first failure is past the last rule's cutoff, the
schedule gives up: the recipient fails and is bounced. That last cutoff is the
message's maximum age in the queue. Times accept Exim's units s, m, h, d, w and
may be combined (``1h30m``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class RetrySyntaxError(ValueError):
    """A retry rule or a duration could not be read; the message says why."""


def parse_duration(text: str) -> float:
    """Seconds in an Exim-style duration such as ``15m``, ``1h30m`` or ``3s``.

    A bare number is taken as seconds.
    """
    s = str(text).strip().lower()
    if not s:
        raise RetrySyntaxError("empty duration")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return float(s)
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise RetrySyntaxError(
            f"'{text}' is not a duration; write a number followed by s, m, h, d or w (e.g. 15m, 4d)"
        )
    return total


@dataclass(frozen=True, slots=True)
class RetryRule:
    kind: str  # "F" (fixed) or "G" (geometric)
    cutoff: float
    interval: float
    factor: float = 1.0

    def __str__(self) -> str:
        base = f"{self.kind},{_fmt(self.cutoff)},{_fmt(self.interval)}"
        return base + (f",{self.factor:g}" if self.kind == "G" else "")


def _fmt(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """An ordered list of retry rules; see the module docstring."""

    rules: tuple[RetryRule, ...]

    @property
    def max_age(self) -> float:
        """Seconds after the first failure past which the schedule gives up."""
        return self.rules[-1].cutoff

    def __str__(self) -> str:
        return "; ".join(str(r) for r in self.rules)

    def next_attempt(
        self, first_failure: float, now: float, last_interval: float | None
    ) -> tuple[float, float] | None:
        """When to try next after a failure at `now`, and the interval used.

        Returns None when the schedule has run out (the caller fails the
        recipient). `last_interval` is the interval chosen after the previous
        failure, which a geometric rule multiplies.
        """
        age = now - first_failure
        for rule in self.rules:
            if age >= rule.cutoff:
                continue
            interval = rule.interval
            # A geometric rule grows from the interval used last time, as long
            # as that interval was already at least this rule's starting one.
            if rule.kind == "G" and last_interval is not None and last_interval >= rule.interval:
                interval = last_interval * rule.factor
            return now + interval, interval
        return None


DEFAULT_RETRY = "F,2h,15m; G,16h,1h,1.5; F,4d,6h"


def parse_retry_schedule(text: str) -> RetrySchedule:
    """Read a schedule such as ``F,2h,15m; G,16h,1h,1.5; F,4d,6h``."""
    rules: list[RetryRule] = []
    parts = [p.strip() for p in str(text).split(";") if p.strip()]
    if not parts:
        raise RetrySyntaxError("a retry schedule needs at least one rule, e.g. F,2h,15m")
    previous_cutoff = 0.0
    for part in parts:
        fields = [f.strip() for f in part.split(",")]
        kind = fields[0].upper()
        if kind == "F" and len(fields) == 3:
            rule = RetryRule("F", parse_duration(fields[1]), parse_duration(fields[2]))
        elif kind == "G" and len(fields) == 4:
            try:
                factor = float(fields[3])
            except ValueError:
                raise RetrySyntaxError(f"'{fields[3]}' in '{part}' is not a number") from None
            if factor <= 1.0:
                raise RetrySyntaxError(f"the factor in '{part}' must be greater than 1")
            rule = RetryRule("G", parse_duration(fields[1]), parse_duration(fields[2]), factor)
        else:
            raise RetrySyntaxError(
                f"'{part}' is not a retry rule; write F,<cutoff>,<interval> or "
                "G,<cutoff>,<first interval>,<factor>"
            )
        if rule.interval <= 0:
            raise RetrySyntaxError(f"the interval in '{part}' must be more than zero")
        if rule.cutoff <= previous_cutoff:
            raise RetrySyntaxError(
                f"cutoffs must grow from rule to rule; '{part}' does not pass the one before it"
            )
        previous_cutoff = rule.cutoff
        rules.append(rule)
    return RetrySchedule(tuple(rules))
