"""The durable default store: SQLite files (aiosqlite, WAL), private to their owner.

:class:`SQLiteStore` keeps one account in a file; :class:`SQLiteDatabase` keeps a
fleet of accounts in one file, on one connection, with one view (an
:class:`SQLiteStore` too) per account. Both are the same code: a one-account store is
a database of its own seen through its default account ``''``.

The schema is versioned with ``PRAGMA user_version`` and moved forward by the
functions in :data:`MIGRATIONS`. A file that is not a database, holds another schema,
or comes from a newer version is refused with a :class:`StoreError` naming it, and is
never written to. Every write is one explicit transaction, so a batch is all or
nothing even if the process dies half way through it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiosqlite

from ..core.records import TrackedMessage
from .base import OpenClose, SMState, StoreError
from .sqlite_engine import Engine
from .sqlite_file import DatabaseFile
from .sqlite_schema import (
    IS_FAILED,
    IS_IN_FLIGHT,
    MAX_LIMIT,
    MIGRATIONS,
    NEWEST_FIRST,
    OLDEST_FIRST,
    SCHEMA_VERSION,
    SELECT,
    Migration,
    record_of,
)
from .state_refs import compact_state_text, state_of_saved_text

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "SQLiteDatabase", "SQLiteStore"]

#: The account of a one-account :class:`SQLiteStore` (and of files made before version 2).
_DEFAULT_ACCOUNT: Final = ""


def _bare_jid(account: str) -> str:
    if not account or "/" in account or account != account.strip():
        raise ValueError(f"account must be a bare JID, not {account!r}")
    return account


async def _rowcount(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> int:
    cursor = await db.execute(sql, params)
    return cursor.rowcount


class _OnEngine(OpenClose):
    """What a database and its views share: ``async with`` opens and closes, and the
    engine's settings."""

    _engine: Engine

    @property
    def batch_window(self) -> float:
        """Seconds an upsert waits for others to share its transaction (0: none)."""
        return self._engine.batch_window


class SQLiteDatabase(_OnEngine):
    """Many accounts in one SQLite file: one connection, a view per account.

    ``db.store(account)`` gives the account's :class:`SQLiteStore` (a bare JID; one
    open view per account at a time), which sees only that account's records and SM
    state. Upserts of every view share transactions: those made while one runs (or
    within ``batch_window`` seconds) go in the next, so a fleet writing at once costs
    a few transactions (:attr:`transactions` counts them).

    Opens lazily (on :meth:`open`, ``async with``, or the first call of a view). The
    file follows :class:`SQLiteStore`'s rules: created 0600, ours, one opener at a
    time (a database, or a one-account store, in this process or another). Closing a
    view closes only the view; :meth:`aclose` writes what is batched and closes the
    connection, after which every view raises :class:`StoreError`. ``read_only=True``
    changes nothing on disk and refuses every write.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_window: float = 0.0,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._engine = Engine(DatabaseFile(self.path, read_only=read_only), batch_window)
        self._views: dict[str, SQLiteStore] = {}
        self._label = f"SQLiteDatabase({str(self.path)!r})"

    def __repr__(self) -> str:
        return self._label

    @property
    def transactions(self) -> int:
        """Write transactions committed since it opened: a cheap stat for benchmarks."""
        return self._engine.transactions

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._engine.closed

    async def open(self) -> None:
        """Open (and create or migrate) the file now rather than on first use."""
        await self._engine.open()

    def store(self, account: str) -> SQLiteStore:
        """The store of ``account`` (a bare JID) in this file; opens nothing yet."""
        _bare_jid(account)
        if self.closed:
            raise self._engine.error(f"the database is closed (asked for {account})")
        if account in self._views:
            raise self._engine.error(
                f"a store for {account} is already open in this database; one at a time "
                "(close it first)"
            )
        view = self._views[account] = SQLiteStore._of(self, account)
        return view

    def _let_go(self, view: SQLiteStore) -> None:
        if self._views.get(view.account) is view:
            del self._views[view.account]

    async def accounts(self) -> list[str]:
        """Every account with records or an SM state, sorted (``''``: the records of a
        one-account :class:`SQLiteStore` on this file)."""
        if self.closed:
            raise self._engine.error("the database is closed")
        rows = await self._engine.read(
            "SELECT account FROM records UNION SELECT account FROM sm_state ORDER BY account"
        )
        return [str(account) for (account,) in rows]

    async def aclose(self) -> None:
        """Write what is batched, close the connection and every view; harmless twice."""
        await self._engine.aclose()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)  # __init__ may raise
        if engine is not None and engine.connection is not None and not engine.closed:
            warnings.warn(
                f"{self._label} was never closed: use 'async with' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )


class SQLiteStore(_OnEngine):
    """Records and the SM state of one account in an SQLite file (created mode 0600).

    ``SQLiteStore(path)`` has the file to itself; :meth:`SQLiteDatabase.store` gives
    the view of one account in a shared file. Opens lazily (on :meth:`open`, ``async
    with``, or the first call); use one instance per file and event loop. With
    ``batch_window`` > 0, upserts made within that many seconds of each other share
    one transaction, as do those made while a transaction runs (each caller still gets
    its own all-or-nothing result): it helps many concurrent writers, and only slows
    down a lone one that awaits each call. Any other call first writes the upserts
    queued before it, so what a caller awaited in turn is applied in turn.

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
        database = SQLiteDatabase(path, batch_window=batch_window, read_only=read_only)
        database._label = f"SQLiteStore({str(database.path)!r})"
        self._setup(database, _DEFAULT_ACCOUNT, owns_database=True)

    @classmethod
    def _of(cls, database: SQLiteDatabase, account: str) -> SQLiteStore:
        """The view of ``account`` in a shared database (see :meth:`SQLiteDatabase.store`)."""
        view = cls.__new__(cls)
        view._setup(database, account, owns_database=False)
        return view

    def _setup(self, database: SQLiteDatabase, account: str, *, owns_database: bool) -> None:
        #: The database this store is a view of (its own, for ``SQLiteStore(path)``).
        self.database = database
        #: The account whose rows this store reads and writes (``''``: the file's own).
        self.account = account
        self.path = database.path
        self.read_only = database.read_only
        self._engine = database._engine
        self._owns_database = owns_database
        self._closed = False

    def __repr__(self) -> str:
        if self._owns_database:
            return f"SQLiteStore({str(self.path)!r})"
        return f"SQLiteStore({str(self.path)!r}, account={self.account!r})"

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        """A StoreError naming the file (and the account of a shared one)."""
        return self._engine.error(what if self._owns_database else f"{self.account}: {what}", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise self.error("the store is closed")
        if self._engine.closed:
            raise self.error("the store is closed (its database was closed)")

    async def open(self) -> None:
        """Open (and create or migrate) the database now rather than on first use."""
        self._check_open()
        await self._engine.open()

    # ---------------------------------------------------------------- plumbing

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of ``sql``, whose first parameter is this store's account."""
        self._check_open()
        return await self._engine.read(sql, (self.account, *params))

    async def _records(self, sql: str, params: Sequence[Any] = ()) -> list[TrackedMessage]:
        rows = await self._read(sql, params)
        try:
            return [record_of(row) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error("holds a record this version cannot read", exc) from exc

    async def _write(
        self, what: str, work: Callable[[aiosqlite.Connection], Awaitable[int]]
    ) -> int:
        self._check_open()
        return await self._engine.transaction(what, work)

    async def _delete(self, what: str, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one DELETE for this account in its own transaction; how many rows went."""
        return await self._write(what, lambda db: _rowcount(db, sql, (self.account, *params)))

    # ---------------------------------------------------------------- records

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id in one transaction, all or nothing."""
        self._check_open()
        if not records:
            await self._engine.drain()
            await self._engine.open()  # still an error on an unusable store
            return
        await self._engine.upsert(self.account, records)

    async def get(self, message_id: str) -> TrackedMessage | None:
        """One record by id."""
        found = await self._records(f"{SELECT} AND id = ?", (message_id,))
        return found[0] if found else None

    async def counts(self) -> list[tuple[str, str, int]]:
        """(conversation, state value, how many) for every pair present: for inspection."""
        rows = await self._read(
            "SELECT conversation, state, COUNT(*) FROM records WHERE account = ? "
            "GROUP BY conversation, state ORDER BY conversation, state"
        )
        return [(str(c), str(st), int(n)) for c, st, n in rows]

    async def all_records(self) -> list[TrackedMessage]:
        """Every record, oldest first: for export."""
        return await self._records(f"{SELECT} {OLDEST_FIRST}")

    async def pending(self) -> list[TrackedMessage]:
        """SENT, HIBERNATED and RESENT records, oldest first."""
        return await self._records(f"{SELECT} AND {IS_IN_FLIGHT} {OLDEST_FIRST}")

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """FAILED records, oldest first, optionally for one conversation (bare JID)."""
        if conversation is None:
            return await self._records(f"{SELECT} AND {IS_FAILED} {OLDEST_FIRST}")
        return await self._records(
            f"{SELECT} AND {IS_FAILED} AND conversation = ? {OLDEST_FIRST}", (conversation,)
        )

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` records to ``jid`` created before ``before``, oldest first."""
        if limit <= 0:
            await self._read("SELECT ?")  # same errors as any other call
            return []
        bare = jid.split("/", 1)[0]
        if before is None:
            sql = f"{SELECT} AND conversation = ? {NEWEST_FIRST} LIMIT ?"
            params: tuple[Any, ...] = (bare, min(limit, MAX_LIMIT))
        else:
            sql = f"{SELECT} AND conversation = ? AND created_at < ? {NEWEST_FIRST} LIMIT ?"
            params = (bare, before, min(limit, MAX_LIMIT))
        newest = await self._records(sql, params)
        newest.reverse()
        return newest

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""
        sql = "DELETE FROM records WHERE account = ? AND id = ?"
        deleted = await self._delete("deleting a record", sql, (message_id,)) > 0
        self._engine.forget(self.account, message_id)
        return deleted

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete FAILED records (all, or one conversation's); how many went."""
        sql = f"DELETE FROM records WHERE account = ? AND {IS_FAILED}"
        if conversation is None:
            return await self._delete("deleting failed records", sql)
        sql += " AND conversation = ?"
        return await self._delete("deleting failed records", sql, (conversation,))

    # ---------------------------------------------------------------- SM state

    async def save_sm_state(self, state: SMState | None) -> None:
        """Keep the SM state as JSON text, an unacked message whose row this store
        committed by reference to that row (:mod:`.state_refs`); None deletes it
        (the session ended cleanly)."""
        if state is None:
            sql = "DELETE FROM sm_state WHERE account = ?"
            await self._delete("forgetting the SM state", sql)
            return

        async def keep(db: aiosqlite.Connection) -> int:
            # Under the transaction: the in-flight rows are what the file holds.
            rows = self._engine.in_flight_rows(self.account)
            text = compact_state_text(state, rows, self.error)
            cursor = await db.execute(
                "INSERT INTO sm_state (account, state) VALUES (?, ?) "
                "ON CONFLICT(account) DO UPDATE SET state = excluded.state",
                (self.account, text),
            )
            return cursor.rowcount

        await self._write("saving the SM state", keep)

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last (a fresh dict every time), or None."""
        rows = await self._read("SELECT state FROM sm_state WHERE account = ?")
        return await state_of_saved_text(rows[0][0], self._texts, self.error) if rows else None

    async def _texts(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> the text of those records of ``ids`` that are there."""
        marks = ", ".join(["?"] * len(ids))
        sql = f"SELECT id, xml FROM records WHERE account = ? AND id IN ({marks})"
        return {row[0]: row[1] for row in await self._read(sql, ids)}

    async def aclose(self) -> None:
        """Write what is still batched, then close (the file too, when it is this
        store's own); calling it again is harmless."""
        self._closed = True
        if self._owns_database:
            await self.database.aclose()
            return
        try:
            await self._engine.drain()
        finally:
            self.database._let_go(self)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran (by the app, or by the tracker it was attached to
        when that ended), or its database was closed."""
        return self._closed or self._engine.closed
