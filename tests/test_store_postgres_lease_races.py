"""Issue 18 review: races around leases (closing while waiting, give-back racing a renewal
or a re-take in the same process, loss reported twice). On the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers.pgdb import fresh_database
from xmpp_sm_tracker import AccountLeased, StoreError
from xmpp_sm_tracker.stores.postgres import PostgresDatabase, PostgresStore

ALICE = "alice@example.org"


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_dsn) as fresh:
        yield fresh


def hook_transactions(
    database: PostgresDatabase,
    what: str,
    *,
    before: Callable[[], Awaitable[None]] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Make the database's transactions named ``what...`` wait (a slow network) before
    they reach the server or before their answer comes back."""
    real = database.transaction

    async def transaction(name: str, work: Any, **kwargs: Any) -> Any:
        if not name.startswith(what):
            return await real(name, work, **kwargs)
        if before is not None:
            await before()
        result = await real(name, work, **kwargs)
        if after is not None:
            await after()
        return result

    database.transaction = transaction  # type: ignore[method-assign]


async def still_owned(dsn: str, account: str) -> bool:
    """True if another process cannot take ``account`` now."""
    other = PostgresStore(dsn, account=account)
    try:
        await other.open()
    except AccountLeased:
        return True
    finally:
        await other.aclose()
    return False


async def test_closing_a_store_whose_take_over_waits_does_not_hang(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE):
        standby = PostgresStore(dsn, account=ALICE)
        waiting = asyncio.ensure_future(standby.take_over(poll=0.05))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(standby.aclose(), 5)  # the owner lives on: it must not wait
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(waiting, 5)


async def test_closing_a_database_whose_store_waits_for_a_lease_does_not_hang(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE):
        database = PostgresDatabase(dsn)
        standby = database.store(ALICE)
        waiting = asyncio.ensure_future(standby.take_over(poll=0.05))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(database.aclose(), 5)
        with pytest.raises(StoreError, match="closed"):
            await asyncio.wait_for(waiting, 5)
