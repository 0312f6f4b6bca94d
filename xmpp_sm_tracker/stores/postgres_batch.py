"""Record writes of many accounts in one transaction per event-loop turn.

A fleet's stores each write a small batch every turn (their StoreWriter's); one
transaction per store per turn would cost a round trip each. The upserts queued in one
turn share one transaction instead: one lease check for all their accounts, one
``executemany`` for all their rows. An account whose lease is gone is left out (its
caller gets :class:`LeaseLost`); if the shared write fails, each caller's upsert runs
again alone, so each still gets its own all-or-nothing result and its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from .base import LeaseLost, StoreError
from .postgres_schema import LEASES, UPSERT

if TYPE_CHECKING:
    from .postgres_db import PostgresDatabase

__all__ = ["UpsertBatcher"]

# The accounts of the batch whose lease is still ours, held until the transaction ends.
_FENCE_MANY = f"""
SELECT lease.account FROM {LEASES} AS lease
JOIN unnest($2::text[], $3::bigint[]) AS mine (account, token)
    ON lease.account = mine.account AND lease.token = mine.token
WHERE lease.owner = $1
FOR SHARE OF lease
"""


@dataclass
class _Upsert:
    account: str
    token: int
    rows: Sequence[tuple[Any, ...]]
    alone: Callable[[], Awaitable[None]]
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class UpsertBatcher:
    """Queues upserts and writes each turn's in one transaction, one batch at a time."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self._queue: list[_Upsert] = []
        self._task: asyncio.Task[None] | None = None

    async def upsert(
        self,
        account: str,
        token: int,
        rows: Sequence[tuple[Any, ...]],
        alone: Callable[[], Awaitable[None]],
    ) -> None:
        """Write ``rows`` with the turn's other upserts; ``alone`` writes them on their
        own (with their own errors) if the shared write fails."""
        item = _Upsert(account, token, rows, alone)
        self._queue.append(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(item.done)

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the rest of this turn's upserts join
            while self._queue:
                batch, self._queue = self._queue, []
                await self._write(batch)
        finally:
            self._task = None
            for item in self._queue:  # cancelled: nobody waits for ever
                if not item.done.done():
                    item.done.set_exception(StoreError("the write was cancelled"))

    async def _write(self, batch: list[_Upsert]) -> None:
        if len(batch) == 1:  # nothing to share
            await self._one(batch[0])
            return
        owner = self.database.owner

        async def work(conn: asyncpg.Connection) -> set[str]:
            found = await conn.fetch(
                _FENCE_MANY,
                owner,
                [item.account for item in batch],
                [item.token for item in batch],
            )
            ours = {str(row[0]) for row in found}
            await conn.executemany(
                UPSERT, [row for item in batch if item.account in ours for row in item.rows]
            )
            return ours

        try:
            ours = await self.database.transaction(f"writing {len(batch)} batches", work)
        except StoreError:
            for item in batch:  # each alone: its own result, its own error
                await self._one(item)
            return
        for item in batch:
            if item.done.done():
                continue
            if item.account in ours:
                item.done.set_result(None)
            else:
                item.done.set_exception(
                    LeaseLost(f"{item.account}: another process owns the account now")
                )

    @staticmethod
    async def _one(item: _Upsert) -> None:
        try:
            await item.alone()
        except BaseException as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not item.done.done():
                item.done.set_result(None)
