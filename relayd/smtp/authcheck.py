"""Tenant password checks for the listener: off the event loop, bounded, and shared.

scrypt is slow on purpose (tens of milliseconds and 16 MiB of memory per
check). So:
* checks run on a small dedicated thread pool, never on the event loop, and
  never more than `max_parallel` at once (memory stays bounded when a hundred
  clients log in together);
* identical checks that arrive while one is running wait for that one (a burst
  of reconnects by one application costs one scrypt, not a hundred);
* a success is remembered as a keyed HMAC of the password (memory only), so an
  application's later logins are cheap; a reload clears it.
Unknown logins and tenants without a password hash are checked against a dummy
hash, so they take as long as a wrong password (no user enumeration).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from relayd.config.model import TenantConfig
from relayd.config.passwords import DUMMY_HASH, verify_password


class PasswordChecker:
    def __init__(
        self, *, max_parallel: int = 2, verify: Callable[[str, str], bool] = verify_password
    ) -> None:
        self._verify_hash = verify
        self._key = secrets.token_bytes(32)
        self._ok: dict[str, tuple[str, bytes]] = {}
        self._running: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="scrypt")

    def clear(self) -> None:
        self._ok.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _mac(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode("utf-8"), hashlib.sha256).digest()

    async def check(self, tenant: TenantConfig | None, password: str) -> bool:
        encoded = tenant.password_hash if tenant is not None and tenant.password_hash else None
        mac = self._mac(password)
        if tenant is not None and encoded is not None:
            cached = self._ok.get(tenant.name)
            if cached is not None and cached[0] == encoded and hmac.compare_digest(cached[1], mac):
                return tenant.enabled
        ok = await self._verify(password, encoded or DUMMY_HASH, mac)
        ok = ok and encoded is not None and tenant is not None and tenant.enabled
        if ok and tenant is not None and encoded is not None:
            self._ok[tenant.name] = (encoded, mac)
        return ok

    async def _verify(self, password: str, encoded: str, mac: bytes) -> bool:
        key = (encoded, mac)
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._verify_hash, password, encoded)
        self._running[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            if self._running.get(key) is future:
                del self._running[key]
