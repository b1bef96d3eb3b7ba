"""Window counters in Redis, shared by several relayd nodes that send through one provider account.

Takes: `add` / `count` calls of the `relayd.observe.counters.WindowCounters`
seam, `take` (add only if every cap still has room, all or nothing), and
`reserve` / `give_back` (`relayd.observe.claims.SharedClaims`: a transport's
places taken before a send, with its shared pace, and returned when the send
did not happen).
Emits: the counts of all nodes together.
Untrusted input: none (keys come from configured names); replies from the
Redis server are read as integers and nothing else.
How it fails: an unreachable, slow (past `timeout`) or failing server raises
`CounterError`; the caller falls back to its local share. The client
reconnects by itself on the next call, so a server that comes back is used
again without a restart.

One key per counter and window: `<prefix>:<key>:<span>:<window start>`,
expiring an hour after the window ends (the key space of a window is gone
once it is over, and a count is never read from the wrong window). An
increment is INCRBY plus EXPIREAT in one MULTI; `take` is one Lua script, so
two nodes can never both take the last place under a cap: Redis runs scripts
one at a time. So is `reserve`, which also keeps a shared send rate (GCRA on
Redis's clock: one key holding when the next send may go).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relayd.config.quota import RedisSettings
from relayd.observe.claims import Claim, Pace, Reserved, Taken
from relayd.observe.counters import CounterError, Window

_KEEP_AFTER_END = 3600  # seconds a window's keys outlive it (clock skew between nodes)
T = TypeVar("T")

# KEYS: one counter key per claim. ARGV: n, then per claim its cap (-1: none) and expiry.
# Returns {1, counts...} when every claim had room and all were added, {0, counts...} when not.
_TAKE = """
local n = tonumber(ARGV[1])
local counts = {}
local room = 1
for i, key in ipairs(KEYS) do
  counts[i] = tonumber(redis.call('GET', key) or '0')
  local cap = tonumber(ARGV[2 * i])
  if cap >= 0 and counts[i] + n > cap then
    room = 0
  end
end
if room == 1 then
  for i, key in ipairs(KEYS) do
    counts[i] = redis.call('INCRBY', key, n)
    redis.call('EXPIREAT', key, tonumber(ARGV[2 * i + 1]))
  end
end
table.insert(counts, 1, room)
return counts
"""


# KEYS: one counter key per claim, then the pace key when ARGV[2] > 0.
# ARGV: n, pace interval and tolerance (microseconds; 0: no pace), then per claim its cap (-1: none) and expiry.
# The pace is GCRA on Redis's own clock (TIME), so the nodes' clocks do not matter:
# the key holds the theoretical arrival time of the next send.
# Returns {room, wait in microseconds, counts...}; places are taken only when room is 1 and wait 0.
_RESERVE = """
local n = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local claims = #KEYS
if interval > 0 then claims = claims - 1 end
local counts = {}
local room = 1
for i = 1, claims do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local cap = tonumber(ARGV[2 + 2 * i])
  if cap >= 0 and counts[i] + n > cap then
    room = 0
  end
end
local wait = 0
local now = 0
local tat = 0
if interval > 0 then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  tat = tonumber(redis.call('GET', KEYS[#KEYS]) or '0')
  if tat < now then tat = now end
  if tat - tolerance > now then wait = tat - tolerance - now end
end
if room == 1 and wait == 0 then
  for i = 1, claims do
    counts[i] = redis.call('INCRBY', KEYS[i], n)
    redis.call('EXPIREAT', KEYS[i], tonumber(ARGV[3 + 2 * i]))
  end
  if interval > 0 then
    local next_at = tat + interval * n
    redis.call('SET', KEYS[#KEYS], string.format('%.0f', next_at), 'PX', math.floor((next_at - now) / 1000) + 1000)
  end
end
local reply = {room, wait}
for i = 1, claims do reply[i + 2] = counts[i] end
return reply
"""

# KEYS: counter keys. ARGV: n. Takes n back from each key that still exists, never below 0.
_GIVE_BACK = """
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key) or '-1')
  if count > 0 then
    redis.call('DECRBY', key, math.min(count, tonumber(ARGV[1])))
  end
end
return 0
"""
_MICRO = 1_000_000


class RedisCounters:
    """A `WindowCounters` (and claims store) on a Redis server; see the module docstring."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self._client = aioredis.Redis(
            host=settings.host, port=settings.port, db=settings.db,
            socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
            decode_responses=False,
        )
        self._reserve = self._client.register_script(_RESERVE)  # sent once, then called by its digest

    @property
    def where(self) -> str:
        return f"redis {self.settings.host}:{self.settings.port}/{self.settings.db}"

    def _key(self, key: str, window: Window, now: float) -> str:
        return f"{self.settings.key_prefix}:{key}:{window.slot(now)}"

    def _expiry(self, window: Window, now: float) -> int:
        return int(window.end(now)) + _KEEP_AFTER_END

    async def _call(self, work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, self.settings.timeout * 2)
        except (RedisError, OSError, asyncio.TimeoutError) as error:
            raise CounterError(f"{self.where}: {type(error).__name__}: {error}".rstrip(": ")) from None

    async def add(self, key: str, window: Window, n: int, now: float) -> int:
        if n < 0:
            raise ValueError("a count only grows")
        name = self._key(key, window, now)
        pipe = self._client.pipeline(transaction=True)
        pipe.incrby(name, n)
        pipe.expireat(name, self._expiry(window, now))
        replies = await self._call(pipe.execute())
        return int(replies[0])

    async def count(self, key: str, window: Window, now: float) -> int:
        value = await self._call(self._client.get(self._key(key, window, now)))
        return int(value) if value is not None else 0

    async def take(self, claims: Sequence[Claim], n: int, now: float) -> Taken:
        keys = [self._key(c.key, c.window, now) for c in claims]
        args: list[int] = [n]
        for claim in claims:
            args += [claim.cap if claim.cap is not None else -1, self._expiry(claim.window, now)]
        reply = await self._call(self._client.eval(_TAKE, len(keys), *keys, *args))
        if not isinstance(reply, list) or len(reply) != len(claims) + 1:
            raise CounterError(f"{self.where}: unexpected reply to a quota claim")
        return Taken(ok=int(reply[0]) == 1, counts=tuple(int(v) for v in reply[1:]))

    async def reserve(self, claims: Sequence[Claim], pace: Pace | None, now: float) -> Reserved:
        """One place in every claim and one step of the pace, atomically; see `_RESERVE`."""
        keys = [self._key(c.key, c.window, now) for c in claims]
        args: list[int] = [1, 0, 0]
        if pace is not None:
            keys.append(f"{self.settings.key_prefix}:{pace.key}")
            args[1:] = [max(1, round(pace.interval * _MICRO)), max(0, round(pace.tolerance * _MICRO))]
        for claim in claims:
            args += [claim.cap if claim.cap is not None else -1, self._expiry(claim.window, now)]
        reply = await self._call(self._reserve(keys=keys, args=args))
        if not isinstance(reply, list) or len(reply) != len(claims) + 2:
            raise CounterError(f"{self.where}: unexpected reply to a send reservation")
        room, wait = int(reply[0]) == 1, int(reply[1]) / _MICRO
        return Reserved(ok=room and wait <= 0, counts=tuple(int(v) for v in reply[2:]), wait=wait)

    async def give_back(self, claims: Sequence[Claim], n: int, at: float) -> None:
        """Take `n` back from each claim's window as it was at `at` (a send that did not happen)."""
        keys = [self._key(c.key, c.window, at) for c in claims]
        if keys:
            await self._call(self._client.eval(_GIVE_BACK, len(keys), *keys, n))

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError):
            pass
