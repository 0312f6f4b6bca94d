"""The durable default store: one SQLite file (aiosqlite, WAL), private to its owner.

The schema is versioned with ``PRAGMA user_version`` and moved forward by the
functions in :data:`MIGRATIONS`, so version 2 is one more function. A file that is
not a database, holds another schema, or comes from a newer version is refused
with a :class:`StoreError` naming it, and is never written to.

Every write is one explicit transaction on the one connection, so a batch is
all or nothing even if the process dies half way through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiosqlite

from ..core.records import TrackedMessage
from .base import SMState
from .sqlite_file import DatabaseFile, forget_connection, rollback
from .sqlite_schema import (
    IS_FAILED,
    IS_IN_FLIGHT,
    MAX_LIMIT,
    MIGRATIONS,
    NEWEST_FIRST,
    OLDEST_FIRST,
    SCHEMA_VERSION,
    SELECT,
    UPSERT,
    Migration,
    record_of,
    row_of,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SQLiteStore"]

_T = TypeVar("_T")


def _unencodable(records: Sequence[TrackedMessage]) -> str | None:
    """The id of the first record with text UTF-8 cannot encode (a lone surrogate)."""
    for record in records:
        for text in row_of(record):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return record.id
    return None


def _new_future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Queued:
    """One caller's upsert waiting for the batch window to close."""

    records: Sequence[TrackedMessage]
    done: asyncio.Future[None] = field(default_factory=_new_future)

    def settle(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


class SQLiteStore:
    """Records and the SM state in one SQLite file (created with mode 0600).

    Opens lazily (on :meth:`open`, ``async with``, or the first call); use one
    instance per file and event loop. With ``batch_window`` > 0, upserts made within
    that many seconds of each other share one transaction (each caller still gets its
    own all-or-nothing result): it helps many concurrent writers, and only slows down
    a lone one that awaits each call. Any other call first writes the upserts queued
    before it, so what a caller awaited in turn is applied in turn.

    The file must be a regular file of the user running the tracker (not a symbolic
    link); it is made 0600, and only one store at a time may have it open: another
    one, in this process or another, is refused with a :class:`StoreError`.

    ``read_only=True`` (for looking into a file, as the command line does) changes
    nothing on disk: no file, schema, WAL switch or lock is made, every write raises
    :class:`StoreError`, and it may read the file of a tracker that is running.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_window: float = 0.0,
        read_only: bool = False,
    ) -> None:
        if not batch_window >= 0:
            raise ValueError(f"batch_window must be >= 0 seconds, not {batch_window!r}")
        self.path = Path(path)
        self.read_only = read_only
        self._file = DatabaseFile(self.path, read_only=read_only)
        self.batch_window = batch_window
        self._db: aiosqlite.Connection | None = None
        self._closed = False
        # One connection, one transaction at a time: also keeps a reader from seeing
        # another caller's uncommitted batch.
        self._lock = asyncio.Lock()
        self._queue: list[_Queued] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- opening

    async def open(self) -> None:
        """Open (and create or migrate) the database now rather than on first use."""
        async with self._lock:
            await self._connection()

    async def _connection(self) -> aiosqlite.Connection:
        """The open connection; the caller holds ``_lock``."""
        if self._closed:
            raise self._file.error("the store is closed")
        if self._db is None:
            self._db = await self._file.connect()
        return self._db

    # ---------------------------------------------------------------- plumbing

    async def _write(self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        """Run ``work`` in its own transaction, after any batched upserts made before."""
        await self._drain()
        return await self._transaction(what, work)

    async def _transaction(
        self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``work`` committed whole, or rolled back whole.

        A cancelled caller still rolls back (aiosqlite finishes queued statements in
        order), so the connection is never left inside a half-done transaction.
        """
        async with self._lock:
            db = await self._connection()
            if self.read_only:
                raise self._file.error(f"{what} refused: the store was opened read-only")
            try:
                await db.execute("BEGIN IMMEDIATE")
                result = await work(db)
                await db.commit()
            except BaseException as exc:
                await rollback(db)
                if isinstance(exc, sqlite3.Error):
                    raise self._file.error(f"{what} failed (rolled back)", exc) from exc
                raise
        return result

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self._drain()
        async with self._lock:
            db = await self._connection()
            try:
                async with db.execute(sql, params) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as exc:
                raise self._file.error("reading failed", exc) from exc

    async def _records(self, sql: str, params: Sequence[Any] = ()) -> list[TrackedMessage]:
        rows = await self._read(sql, params)
        try:
            return [record_of(row) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._file.error("holds a record this version cannot read", exc) from exc

    # ---------------------------------------------------------------- batching

    async def _drain(self) -> None:
        """Finish batched upserts made before this call, so calls apply in call order."""
        if self._queue:
            self._start_flush()
        if self._flushes:
            # wait() does not cancel the flushes if we are cancelled: others await them.
            await asyncio.wait(set(self._flushes))

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.ensure_future(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[_Queued]) -> None:
        """Write a window's upserts together; if that fails, each alone, for its own result."""
        try:
            if len(batch) > 1:
                try:
                    await self._upsert_now([r for queued in batch for r in queued.records])
                except Exception:
                    pass  # one bad caller must not fail the others: retry one by one
                else:
                    for queued in batch:
                        queued.settle(None)
                    return
            for queued in batch:
                try:
                    await self._upsert_now(queued.records)
                except Exception as exc:
                    queued.settle(exc)
                else:
                    queued.settle(None)
        except BaseException as exc:
            for queued in batch:
                queued.settle(exc)
            raise

    async def _upsert_now(self, records: Sequence[TrackedMessage]) -> None:
        async def work(db: aiosqlite.Connection) -> None:
            # Rows are built lazily inside the transaction, so an exception from any
            # record (or the process dying) leaves none of this batch behind.
            try:
                await db.executemany(UPSERT, (row_of(record) for record in records))
            except UnicodeEncodeError as exc:
                # Its repr quotes the whole text (a body): name the record instead.
                raise self._file.error(
                    f"record {_unencodable(records)!r} holds a lone surrogate, which UTF-8 "
                    "cannot store; nothing of this batch was written"
                ) from exc

        await self._transaction(f"writing {len(records)} records", work)

    # ---------------------------------------------------------------- records

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id in one transaction, all or nothing."""
        if not records:
            await self._drain()
            await self.open()  # still an error on a closed or unusable store
            return
        if self.batch_window <= 0:
            await self._drain()
            await self._upsert_now(records)
            return
        if self._closed or self._db is None:
            await self.open()  # raises on a closed or unusable store
        queued = _Queued(list(records))
        self._queue.append(queued)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.batch_window, self._start_flush
            )
        try:
            await queued.done
        except asyncio.CancelledError:
            if queued in self._queue:  # not started yet: it will not be written
                self._queue.remove(queued)
            raise

    async def get(self, message_id: str) -> TrackedMessage | None:
        """One record by id."""
        found = await self._records(f"{SELECT} WHERE id = ?", (message_id,))
        return found[0] if found else None

    async def counts(self) -> list[tuple[str, str, int]]:
        """(conversation, state value, how many) for every pair present: for inspection."""
        rows = await self._read(
            "SELECT conversation, state, COUNT(*) FROM records "
            "GROUP BY conversation, state ORDER BY conversation, state"
        )
        return [(str(c), str(st), int(n)) for c, st, n in rows]

    async def all_records(self) -> list[TrackedMessage]:
        """Every record, oldest first: for export."""
        return await self._records(f"{SELECT} {OLDEST_FIRST}")

    async def pending(self) -> list[TrackedMessage]:
        """SENT, HIBERNATED and RESENT records, oldest first."""
        return await self._records(f"{SELECT} WHERE {IS_IN_FLIGHT} {OLDEST_FIRST}")

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """FAILED records, oldest first, optionally for one conversation (bare JID)."""
        if conversation is None:
            return await self._records(f"{SELECT} WHERE {IS_FAILED} {OLDEST_FIRST}")
        return await self._records(
            f"{SELECT} WHERE {IS_FAILED} AND conversation = ? {OLDEST_FIRST}",
            (conversation,),
        )

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` records to ``jid`` created before ``before``, oldest first."""
        if limit <= 0:
            await self._read("SELECT 1")  # same errors as any other call
            return []
        bare = jid.split("/", 1)[0]
        if before is None:
            sql = f"{SELECT} WHERE conversation = ? {NEWEST_FIRST} LIMIT ?"
            params: tuple[Any, ...] = (bare, min(limit, MAX_LIMIT))
        else:
            sql = f"{SELECT} WHERE conversation = ? AND created_at < ? {NEWEST_FIRST} LIMIT ?"
            params = (bare, before, min(limit, MAX_LIMIT))
        newest = await self._records(sql, params)
        newest.reverse()
        return newest

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""

        async def work(db: aiosqlite.Connection) -> int:
            cursor = await db.execute("DELETE FROM records WHERE id = ?", (message_id,))
            return cursor.rowcount

        return await self._write("deleting a record", work) > 0

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete FAILED records (all, or one conversation's); how many went."""

        async def work(db: aiosqlite.Connection) -> int:
            if conversation is None:
                cursor = await db.execute(f"DELETE FROM records WHERE {IS_FAILED}")
            else:
                cursor = await db.execute(
                    f"DELETE FROM records WHERE {IS_FAILED} AND conversation = ?",
                    (conversation,),
                )
            return cursor.rowcount

        return await self._write("deleting failed records", work)

    # ---------------------------------------------------------------- SM state

    async def save_sm_state(self, state: SMState | None) -> None:
        """Keep the SM state as JSON text; None deletes it (the session ended cleanly)."""
        if state is None:

            async def forget(db: aiosqlite.Connection) -> None:
                await db.execute("DELETE FROM sm_state")

            await self._write("forgetting the SM state", forget)
            return
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self._file.error("the SM state is not JSON-safe", exc) from exc

        async def keep(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO sm_state (slot, state) VALUES (1, ?) "
                "ON CONFLICT(slot) DO UPDATE SET state = excluded.state",
                (text,),
            )

        await self._write("saving the SM state", keep)

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last (a fresh dict every time), or None."""
        rows = await self._read("SELECT state FROM sm_state WHERE slot = 1")
        if not rows:
            return None
        try:
            state = json.loads(rows[0][0])
        except ValueError as exc:
            raise self._file.error("the saved SM state is not valid JSON", exc) from exc
        if not isinstance(state, dict):
            raise self._file.error("the saved SM state is not a JSON object")
        return state

    async def aclose(self) -> None:
        """Write what is still batched, then close; calling it again is harmless."""
        try:
            await self._drain()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            async with self._lock:
                self._closed = True
                db, self._db = self._db, None
                try:
                    if db is not None:
                        forget_connection(db)
                        await db.close()
                finally:
                    self._file.release()  # only once the connection is closed

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran (by the app, or by the tracker it was attached to
        when that ended)."""
        return self._closed

    def __del__(self) -> None:
        if getattr(self, "_db", None) is not None and not self._closed:  # __init__ may raise
            warnings.warn(
                f"{self!r} was never closed: use 'async with' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )
