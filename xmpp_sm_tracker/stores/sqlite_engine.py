"""One SQLite connection shared by every account of a file: transactions and batching.

SQLite takes one writer at a time, so many accounts writing at once would queue for
it one transaction each. Here upserts from every account join one queue, and each
transaction writes all that queued while the one before it ran (group commit) or
within ``batch_window`` seconds: 500 accounts writing at once cost a few
transactions, each caller still getting its own all-or-nothing result.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiosqlite

from ..core.records import TrackedMessage
from .base import StoreError
from .sqlite_file import DatabaseFile, forget_connection, rollback
from .sqlite_schema import (
    MOVE_ROWS,
    UPSERT_ROWS,
    bound_row_of,
    move_of,
    only_moved,
    unencodable,
    upsert_runs,
)
from .state_refs import remember_committed

__all__ = ["Engine"]

_T = TypeVar("_T")
#: (account, record) in the order a transaction writes them.
_Rows = list[tuple[str, TrackedMessage]]
#: ``UPDATE ... FROM`` (for :data:`MOVE_ROWS`) came with SQLite 3.33.
_CAN_MOVE = sqlite3.sqlite_version_info >= (3, 33, 0)


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Queued:
    """One caller's upsert waiting for the next transaction."""

    account: str
    records: Sequence[TrackedMessage]
    done: asyncio.Future[None] = field(default_factory=_new_future)

    def settle(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


class Engine:
    """The connection of one file, its transactions, and the upserts waiting for one.

    Opens lazily (the first call); one transaction at a time, and any call first
    writes the upserts queued before it, so what a caller awaited in turn is applied
    in turn, whichever account it is for.
    """

    def __init__(self, file: DatabaseFile, batch_window: float) -> None:
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, not {batch_window!r}")
        self.file = file
        self.batch_window = batch_window
        #: Write transactions committed: the cheap stat a fleet's benchmark reports.
        self.transactions = 0
        self.closed = False
        self._db: aiosqlite.Connection | None = None
        # One connection, one transaction at a time: also keeps a reader from seeing
        # another caller's uncommitted batch.
        self._lock = asyncio.Lock()
        self._queue: list[_Queued] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flush_waiting = False  # a flush task will take the whole queue
        self._flushes: set[asyncio.Task[None]] = set()
        # account -> id -> the in-flight snapshot last committed for it: its next change
        # is most often a move to another state only, written narrowly (MOVE_ROWS).
        self._written: dict[str, dict[str, TrackedMessage]] = {}

    @property
    def connection(self) -> aiosqlite.Connection | None:
        """The open connection, if any (tests look at its settings)."""
        return self._db

    async def open(self) -> None:
        """Open (and create or migrate) the database now rather than on first use."""
        async with self._lock:
            await self._connection()

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection; the caller holds ``_lock``."""
        if self.closed:
            raise self.file.error("the store is closed")
        if self._db is None:
            self._db = await self.file.connect()
        return self._db

    # ---------------------------------------------------------------- transactions

    async def transaction(
        self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``work`` in its own transaction, after the upserts queued before."""
        await self.drain()
        async with self._lock:
            return await self._locked_transaction(what, work)

    async def _locked_transaction(
        self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``work`` committed whole, or rolled back whole; the caller holds ``_lock``.

        A cancelled caller still rolls back (aiosqlite finishes queued statements in
        order), so the connection is never left inside a half-done transaction.
        """
        db = await self._connection()
        if self.file.read_only:
            raise self.file.error(f"{what} refused: the store was opened read-only")
        try:
            await db.execute("BEGIN IMMEDIATE")
            result = await work(db)
            await db.commit()
        except BaseException as exc:
            await rollback(db)
            if isinstance(exc, sqlite3.Error):
                raise self.file.error(f"{what} failed (rolled back)", exc) from exc
            raise
        self.transactions += 1
        return result

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query, after the upserts queued before it."""
        await self.drain()
        async with self._lock:
            db = await self._connection()
            try:
                async with db.execute(sql, params) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as exc:
                raise self.file.error("reading failed", exc) from exc

    # ---------------------------------------------------------------- batched upserts

    async def upsert(self, account: str, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace ``account``'s records in the next shared transaction."""
        if self.closed or self._db is None:
            await self.open()  # raises on a closed or unusable store
        if self.batch_window <= 0 and not (self._queue or self._flushes or self._lock.locked()):
            # Nobody to share with: write in this task (a lone writer's every call).
            async with self._lock:
                await self._upsert_locked([(account, records)])
            return
        queued = _Queued(account, list(records))
        self._queue.append(queued)
        if self._timer is None and not self._flush_waiting:
            if self.batch_window > 0:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.batch_window, self._start_flush)
            else:
                self._start_flush()
        try:
            await queued.done
        except asyncio.CancelledError:
            if queued in self._queue:  # not taken yet: it will not be written
                self._queue.remove(queued)
            raise

    async def drain(self) -> None:
        """Finish the upserts queued before this call, so calls apply in call order."""
        if self._queue:
            self._start_flush()
        if self._flushes:
            # wait() does not cancel the flushes if we are cancelled: others await them.
            await asyncio.wait(set(self._flushes))

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._queue and not self._flush_waiting:
            self._flush_waiting = True
            task = asyncio.ensure_future(self._flush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        """Write all that queued until the lock came free: together if that works, else
        each caller's alone, so one bad caller does not fail the others."""
        try:
            await self._lock.acquire()
        finally:
            self._flush_waiting = False  # taken now, or cancelled: the next call starts one
        try:
            batch, self._queue = self._queue, []
            try:
                if len(batch) > 1:
                    try:
                        await self._upsert_locked([(q.account, q.records) for q in batch])
                    except Exception:
                        pass  # one bad caller must not fail the others: retry one by one
                    else:
                        for queued in batch:
                            queued.settle(None)
                        return
                for queued in batch:
                    try:
                        await self._upsert_locked([(queued.account, queued.records)])
                    except Exception as exc:
                        queued.settle(exc)
                    else:
                        queued.settle(None)
            except BaseException as exc:
                for queued in batch:
                    queued.settle(exc)
                raise
        finally:
            self._lock.release()

    async def _upsert_locked(self, parts: Sequence[tuple[str, Sequence[TrackedMessage]]]) -> None:
        """Write (account, records) parts in one transaction; the caller holds ``_lock``."""
        whole, moves = self._split(parts)

        async def work(db: aiosqlite.Connection) -> None:
            try:
                await _upsert(db, whole)
                if moves and await _move(db, moves) != len(moves):
                    # A row we wrote is gone (deleted since): write those records whole.
                    await _upsert(db, moves)
            except UnicodeEncodeError as exc:
                # Its repr quotes the whole text (a body): name the record instead.
                bad = next(filter(None, (unencodable(recs) for _, recs in parts)), None)
                raise self.file.error(
                    f"record {bad!r} holds a lone surrogate, which UTF-8 cannot store; "
                    "nothing of this batch was written"
                ) from exc

        await self._locked_transaction(f"writing {len(whole) + len(moves)} records", work)
        self._remember(parts)

    def _split(self, parts: Sequence[tuple[str, Sequence[TrackedMessage]]]) -> tuple[_Rows, _Rows]:
        """(records to write whole, records only moved to another state since we wrote
        them). The moves are written after the rest: with each id once in the
        transaction their order does not matter; an id that comes twice makes every
        record of it a whole row, written in order (a later copy wins)."""
        if not _CAN_MOVE or not self._written or not _each_id_once(parts):
            return [(account, record) for account, records in parts for record in records], []
        whole: _Rows = []
        moves: _Rows = []
        for account, records in parts:
            written = self._written.get(account, {})
            for record in records:
                before = written.get(record.id)
                if before is not None and only_moved(before, record):
                    moves.append((account, record))
                else:
                    whole.append((account, record))
        return whole, moves

    def _remember(self, parts: Sequence[tuple[str, Sequence[TrackedMessage]]]) -> None:
        """Keep the in-flight snapshots just committed; forget the settled ones."""
        for account, records in parts:
            remember_committed(self._written.setdefault(account, {}), records)

    def in_flight_rows(self, account: str) -> Mapping[str, TrackedMessage]:
        """id -> the in-flight record last committed for it, of ``account``: read under
        a transaction of this engine, it is what the file holds."""
        return self._written.get(account, {})

    def forget(self, account: str, message_id: str) -> None:
        """The record was deleted: its next upsert writes it whole. (Without this the
        move would find no row, and fall back to that, at the price of a statement.)"""
        written = self._written.get(account)
        if written is not None:
            written.pop(message_id, None)

    # ---------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Write what is still queued, then close; calling it again is harmless."""
        try:
            await self.drain()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            async with self._lock:
                self.closed = True
                self._written.clear()
                db, self._db = self._db, None
                try:
                    if db is not None:
                        forget_connection(db)
                        await db.close()
                finally:
                    self.file.release()  # only once the connection is closed

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        """A StoreError naming the file."""
        return self.file.error(what, exc)


def _each_id_once(parts: Sequence[tuple[str, Sequence[TrackedMessage]]]) -> bool:
    """True when no account has the same id twice among ``parts``."""
    ids: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for account, records in parts:
        ids.setdefault(account, set()).update([record.id for record in records])
        count[account] = count.get(account, 0) + len(records)
    return all(len(ids[account]) == n for account, n in count.items())


async def _upsert(db: aiosqlite.Connection, rows: _Rows) -> None:
    """Insert or replace ``rows`` whole, in order, :data:`ROWS_PER_UPSERT` a statement.

    The rows are built lazily in the worker thread, inside the transaction, so an
    exception from any record (or the process dying) leaves none of the batch behind.
    """
    bound = (bound_row_of(account, record) for account, record in rows)
    for n, runs in upsert_runs(bound, len(rows)):
        await db.executemany(UPSERT_ROWS[n], runs)


async def _move(db: aiosqlite.Connection, rows: _Rows) -> int:
    """Write the new state and time of ``rows``; how many rows changed."""
    bound = (move_of(account, record) for account, record in rows)
    changed = 0
    for n, runs in upsert_runs(bound, len(rows)):
        cursor = await db.executemany(MOVE_ROWS[n], runs)
        changed += cursor.rowcount
    return changed
