"""Issue 18 review: the LeaseKeeper's deadline, against a stand-in database whose
renewals fail slowly or hang (a network partition), so the timing is the keeper's own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from xmpp_sm_tracker import LeaseLost, StoreError
from xmpp_sm_tracker.stores.postgres_lease import LeaseKeeper

TTL = 0.6


class Renewals:
    """Takes succeed at once; each renewal runs ``renew()`` instead of a statement."""

    def __init__(self, renew: Callable[[], Awaitable[Any]]) -> None:
        self.renew = renew
        self.renewals = 0

    async def transaction(self, what: str, work: Any, **_: Any) -> Any:
        if what.startswith("taking"):
            return [(1,)]
        if what.startswith("renewing"):
            self.renewals += 1
            return await self.renew()
        return None

    async def read(self, *_: Any, **__: Any) -> list[Any]:
        return []


async def lost_after(renew: Callable[[], Awaitable[Any]]) -> float:
    """Seconds from the take to the lease-lost callback."""
    keeper = LeaseKeeper(Renewals(renew), "me", TTL)  # type: ignore[arg-type]
    lost: asyncio.Future[LeaseLost] = asyncio.get_running_loop().create_future()
    taken = time.monotonic()
    await keeper.take("alice@example.org", lost.set_result)
    try:
        await asyncio.wait_for(lost, 5 * TTL)
        return time.monotonic() - taken
    finally:
        await keeper.aclose()


async def test_renewals_that_fail_slowly_still_let_go_by_the_deadline() -> None:
    """Each renewal fails after half the lease (a refused connection, slowly): the owner
    must give up by the deadline, not at the next attempt after it."""

    async def fail_slowly() -> None:
        await asyncio.sleep(TTL / 2)
        raise StoreError("no connection")

    assert await lost_after(fail_slowly) <= TTL + 0.1


async def test_a_hung_renewal_that_is_slow_to_cancel_lets_go_at_the_deadline() -> None:
    """A renewal hangs (a partition) and its cancellation hangs too (the cancel request
    cannot reach the server): the owner still lets go at its deadline."""

    async def hang() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(TTL))

    assert await lost_after(hang) <= TTL + 0.1


async def test_renewals_that_work_keep_the_lease() -> None:
    async def fine() -> list[tuple[str, int]]:
        return [("alice@example.org", 1)]

    database = Renewals(fine)
    keeper = LeaseKeeper(database, "me", TTL)  # type: ignore[arg-type]
    told: list[LeaseLost] = []
    await keeper.take("alice@example.org", told.append)
    await asyncio.sleep(3 * TTL)
    assert told == [] and database.renewals >= 6
    await keeper.aclose()
