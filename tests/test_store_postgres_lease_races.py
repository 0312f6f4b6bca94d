"""Issue 18 review: races around leases (closing while waiting, give-back racing a renewal
or a re-take in the same process, loss reported twice). On the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.helpers.pgdb import fresh_database
from tests.test_store_contract import record
from tests.test_store_postgres_leases import sql
from xmpp_sm_tracker import AccountLeased, LeaseLost, StoreError
from xmpp_sm_tracker.stores.postgres import PostgresDatabase, PostgresStore
from xmpp_sm_tracker.stores.postgres_schema import LEASES
from xmpp_sm_tracker.testing import FaultProxy

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


class Pause:
    """A hook for :func:`hook_transactions` that holds the transaction until
    :meth:`release`; ``reached`` is set once one got there."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._go_on = asyncio.Event()

    def release(self) -> None:
        self._go_on.set()

    async def __call__(self) -> None:
        self.reached.set()
        await self._go_on.wait()


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


async def test_a_late_give_back_does_not_end_the_lease_the_same_process_took_again(
    dsn: str,
) -> None:
    """Store A of an account closes while store B of the same account (same process)
    opens; A's give-back reaches the server after B's take: B's lease must stay."""
    async with PostgresDatabase(dsn) as database:
        first = database.store(ALICE)
        await first.open()
        taken_again = asyncio.Event()
        hook_transactions(database, "giving back", before=taken_again.wait)
        closing = asyncio.ensure_future(first.aclose())
        await asyncio.sleep(0.05)
        second = database.store(ALICE)
        await second.open()
        taken_again.set()
        await closing
        assert await still_owned(dsn, ALICE), "the old store's give-back ended the new lease"
        await second.upsert([record(1)])


async def test_a_store_closed_while_taking_its_lease_leaves_the_next_store_alone(
    dsn: str,
) -> None:
    """Store A is closed while its take is on the way; store B of the same account opens
    meanwhile. One lease per account in a process: B is told, or B owns it; never two
    stores holding tokens for one account, and never B's lease given back by A."""
    async with PostgresDatabase(dsn) as database:
        first = database.store(ALICE)
        gate, calls = asyncio.Event(), []

        async def first_waits() -> None:
            calls.append(1)
            if len(calls) == 1:
                await gate.wait()

        hook_transactions(database, "taking", before=first_waits)
        opening = asyncio.ensure_future(first.open())
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(first.aclose())
        await asyncio.sleep(0.05)
        second = database.store(ALICE)
        opened = asyncio.ensure_future(second.open())
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(opening, closing, opened, return_exceptions=True)
        if opened.exception() is None:
            await second.upsert([record(1)])
            assert await still_owned(dsn, ALICE)
        else:
            assert isinstance(opened.exception(), StoreError)
            await second.aclose()
            third = database.store(ALICE)
            await third.upsert([record(1)])
            assert await still_owned(dsn, ALICE)


async def test_a_renewal_answered_after_a_re_take_does_not_lose_the_new_lease(dsn: str) -> None:
    """A renewal reaches the server, its answer is late; meanwhile the account's store is
    closed and opened again (a new token): the new store keeps its lease."""
    async with PostgresDatabase(dsn, lease_ttl=0.9) as database:
        first = database.store(ALICE)
        await first.open()
        late = Pause()  # the renewal reached the server; its answer waits
        hook_transactions(database, "renewing", after=late)
        await asyncio.wait_for(late.reached.wait(), 5)
        await first.aclose()
        second = database.store(ALICE)
        told: list[LeaseLost] = []
        second.on_lease_lost(told.append)
        await second.open()
        late.release()
        await asyncio.sleep(0.1)
        assert told == [] and second.lease_lost is None
        await second.upsert([record(1)])


async def test_a_renewal_in_flight_does_not_bring_a_given_back_lease_back(dsn: str) -> None:
    """A renewal sent before a store closed reaches the server after the give-back: the
    account stays free for a standby (a clean close gives it back at once)."""
    async with PostgresDatabase(dsn, lease_ttl=3) as database:
        store = database.store(ALICE)
        await store.open()
        slow = Pause()  # the renewal is sent; it reaches the server after the give-back
        hook_transactions(database, "renewing", before=slow)
        await asyncio.wait_for(slow.reached.wait(), 5)
        await store.aclose()
        slow.release()
        await asyncio.sleep(0.2)  # the renewal has been through
        assert not await still_owned(dsn, ALICE), "the renewal revived a given-back lease"


async def test_a_loss_is_told_once_and_a_late_listener_is_told_too(dsn: str) -> None:
    async with PostgresStore(dsn, account=ALICE, lease_ttl=0.6) as owner:
        told: list[LeaseLost] = []
        owner.on_lease_lost(told.append)
        await owner.upsert([record(1)])
        await sql(dsn, f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
        with pytest.raises(LeaseLost):
            await owner.upsert([record(2)])  # learnt from a write
        await asyncio.sleep(0.6)  # renewals come and find it gone too
        assert len(told) == 1 and owner.lease_lost is told[0]
        late: list[LeaseLost] = []
        owner.on_lease_lost(late.append)  # e.g. tracker.attach() after the loss
        assert late == [told[0]]


async def test_closing_a_fleet_while_the_database_is_unreachable_does_not_take_minutes(
    dsn: str,
) -> None:
    """PostgreSQL gone silent (a partition) at exit: the leases cannot be given back,
    each try waits for command_timeout; one try for all, not one per account."""
    parts = urlsplit(dsn)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        via = urlunsplit(parts._replace(netloc=f"{userinfo}{proxy.host}:{proxy.port}"))
        database = PostgresDatabase(via, connect_timeout=1, command_timeout=2, lease_ttl=60)
        stores = [database.store(f"bot{n}@example.org") for n in range(10)]
        await asyncio.gather(*(store.open() for store in stores))
        proxy.blackhole()
        started = time.monotonic()
        await asyncio.wait_for(database.aclose(), 60)
        took = time.monotonic() - started
        assert took < 8, f"closing took {took:.1f} s"  # was command_timeout per account
        assert all(store.closed for store in stores)


async def test_a_standby_keeps_waiting_through_a_moment_without_the_database(dsn: str) -> None:
    """A standby is for when things go wrong: a database it cannot reach for a moment
    is a reason to keep waiting, not to give up."""
    parts = urlsplit(dsn)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@"
        via = urlunsplit((parts.scheme, f"{userinfo}{proxy.host}:{proxy.port}", parts.path, "", ""))
        owner = PostgresStore(dsn, account=ALICE)
        await owner.open()
        standby = PostgresStore(via, account=ALICE, connect_timeout=1, command_timeout=2)
        waiting = asyncio.ensure_future(standby.take_over(poll=0.1))
        await asyncio.sleep(0.5)
        proxy.blackhole()  # the standby's database is gone for a moment
        await asyncio.sleep(3.0)  # longer than its command_timeout: a try failed
        assert not waiting.done()
        await owner.aclose()  # the owner ends meanwhile
        proxy.heal()
        await asyncio.wait_for(waiting, 15)  # and the standby takes over, not raises
        async with standby:
            await standby.upsert([record(1)])
