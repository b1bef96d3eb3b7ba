"""The control socket's side of tenant usage: the `usage` request and the usage part of `status`.

Takes: a `usage` request (`tenant` optional); the daemon's usage report
(relayd.queue.usagereport, bound to the live stores).
Emits: the report's JSON; `status` answers gain `tenant_usage`.
Untrusted input: the request's `tenant` argument (a string of bounded
length naming a configured tenant, else an error).
How it fails: a counter store that cannot be read answers an error the
CLI prints, never a traceback.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Collection

from relayd.jsonwire import JsonObject, JsonOutObject
from relayd.observe.counters import CounterError
from relayd.ops.controlserver import ControlError, Handler, Request

UsageReport = Callable[["str | None"], Awaitable[JsonObject]]
_MAX_NAME = 64  # tenant names are at most 64 characters (relay.yaml's name rule)


class UsageControl:
    """See the module docstring."""

    def __init__(
        self, report: UsageReport, status: Callable[[], Awaitable[JsonObject]],
        tenants: Callable[[], Collection[str]],
    ) -> None:
        self._report = report
        self._status = status
        self._tenants = tenants

    def handlers(self, base: dict[str, Handler]) -> dict[str, Handler]:
        """`base` (relayd.ops.control's handlers) with `usage` added and `status` showing usage too."""
        status = base["status"]

        async def status_with_usage(request: Request) -> JsonOutObject:
            answer = dict(await status(request))
            try:
                answer["tenant_usage"] = await self._status()
            except CounterError as error:
                answer["tenant_usage"] = {"error": str(error)}
            return answer

        return {**base, "status": status_with_usage, "usage": self.usage}

    async def usage(self, request: Request) -> JsonOutObject:
        tenant = request.args.get("tenant")
        if tenant is not None:
            if not isinstance(tenant, str) or len(tenant) > _MAX_NAME or tenant not in self._tenants():
                shown = tenant[:_MAX_NAME] if isinstance(tenant, str) else type(tenant).__name__
                raise ControlError(f"no tenant named {shown!r} in the configuration")
        try:
            return await self._report(tenant)
        except CounterError as error:
            raise ControlError(f"cannot read the usage counters: {error}") from None
