"""Password checks: one scrypt for a burst of identical logins, same answer for unknown tenants."""

from __future__ import annotations

import asyncio

from relayd.smtp.authcheck import PasswordChecker
from relayd.config.model import TenantConfig
from relayd.config.passwords import hash_password, verify_password

TENANT = TenantConfig("acme", hash_password("right"), ("*@acme.example",), ())


def test_a_burst_of_identical_logins_costs_one_scrypt() -> None:
    calls: list[str] = []

    def counting(password: str, encoded: str) -> bool:
        calls.append(encoded)
        return verify_password(password, encoded)

    async def burst() -> list[bool]:
        checker = PasswordChecker(verify=counting)
        try:
            results = await asyncio.gather(*(checker.check(TENANT, "right") for _ in range(50)))
            again = await checker.check(TENANT, "right")  # remembered: no scrypt at all
            return [*results, again]
        finally:
            checker.close()

    assert asyncio.run(burst()) == [True] * 51
    assert len(calls) == 1


def test_wrong_password_unknown_tenant_and_disabled_tenant_all_fail() -> None:
    async def run() -> list[bool]:
        checker = PasswordChecker()
        try:
            disabled = TenantConfig("off", TENANT.password_hash, TENANT.senders, (), enabled=False)
            return [
                await checker.check(TENANT, "wrong"),
                await checker.check(None, "right"),
                await checker.check(disabled, "right"),
                await checker.check(TenantConfig("nohash", None, (), ()), "anything"),
            ]
        finally:
            checker.close()

    assert asyncio.run(run()) == [False, False, False, False]
