"""A store in PostgreSQL (asyncpg), so many accounts and processes can share one database.

Every row is keyed by the account given at construction (a bare JID), so one database
holds any number of accounts without one seeing another's records or SM state. One
process owns an account at a time (a lease, :mod:`.postgres_lease`); a standby takes it
over when the owner dies. The schema and the pool live in :class:`.PostgresDatabase`.

Needs the ``postgres`` extra: ``pip install 'xmpp_sm_tracker[postgres]'``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from ..core.records import TrackedMessage
from .base import (
    AccountLeased,
    LeaseLost,
    OpenClose,
    SMState,
    StoreError,
)
from .postgres_db import PostgresDatabase
from .postgres_lease import FENCE
from .postgres_schema import (
    IS_FAILED,
    IS_IN_FLIGHT,
    NEWEST_FIRST,
    OLDEST_FIRST,
    RECORDS,
    SELECT,
    SM_STATE,
    UPSERT,
)
from .sqlite_schema import MAX_LIMIT, record_of, row_of, unencodable
from .state_refs import compact_state_text, remember_committed, state_of_saved_text

__all__ = ["AccountLeased", "LeaseLost", "PostgresDatabase", "PostgresStore"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)


def _row(account: str, record: TrackedMessage) -> tuple[Any, ...]:
    row = row_of(record)
    return (account, *row[:10], bool(row[10]), *row[11:])


class PostgresStore(OpenClose):
    """Records and the SM state of one account in a PostgreSQL database.

    ``PostgresStore(dsn, account=...)`` opens a database of its own (a small pool it
    closes in :meth:`aclose`); a fleet takes its stores from one shared
    :class:`PostgresDatabase` with ``database.store(account)`` instead. ``account`` is the
    bare JID whose rows this store reads and writes. Opens lazily (on :meth:`open`,
    ``async with``, or the first call); use one store per account and event loop.

    A writable store takes the account's lease when it opens: if another live process
    owns the account, :class:`AccountLeased` says who and for how long; a standby calls
    :meth:`take_over` to wait for the lease to be given back or to lapse. Losing the
    lease later (renewal failed, another took over) makes every write raise
    :class:`LeaseLost` and calls the ``on_lease_lost`` listeners (the tracker stops its
    stream). ``read_only=True`` takes no lease and refuses every write. Every write is
    one transaction, so a batch is all or nothing.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        account: str,
        database: PostgresDatabase | None = None,
        read_only: bool = False,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        lease_ttl: float = 30.0,
    ) -> None:
        if not account or "/" in account or account != account.strip():
            raise ValueError(f"account must be a bare JID, not {account!r}")
        if (dsn is None) == (database is None):
            raise ValueError("give a DSN or a PostgresDatabase, not both")
        self.account = account
        self.read_only = read_only
        self._own_database = database is None
        if database is None:
            assert dsn is not None
            database = PostgresDatabase(
                dsn,
                max_connections=2,
                connect_timeout=connect_timeout,
                command_timeout=command_timeout,
                lease_ttl=lease_ttl,
            )
        self.database = database
        self._closed = False
        self._token: int | None = None
        self._lost: LeaseLost | None = None
        self._listeners: list[Callable[[LeaseLost], None]] = []
        self._opening = asyncio.Lock()
        self._stop_waiting = asyncio.Event()  # set by aclose: a take_over waits no more
        #: id -> the in-flight record this store last committed for it: the SM state
        #: it saves points at those rows rather than repeating their text.
        self._committed: dict[str, TrackedMessage] = {}
        if not read_only:
            database.claim(self)

    @property
    def server(self) -> str:
        """``host:port/database``, for messages."""
        return self.database.server

    def __repr__(self) -> str:
        return f"PostgresStore({self.server!r}, account={self.account!r})"

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        """A StoreError naming the server and account (never the password)."""
        return self.database.error(what, exc, account=self.account)

    # ---------------------------------------------------------------- opening, leases

    async def open(self) -> None:
        """Connect (migrating the schema) and take the account's lease, now rather than on
        first use. :class:`AccountLeased` if another live process owns the account."""
        await self._ready(wait=None)

    async def take_over(self, *, poll: float = 0.5, timeout: float | None = None) -> None:
        """Open as a standby: wait until the owner gives the lease back or it lapses (the
        owner died), then take it. Load the SM state and attach after this returns."""
        await asyncio.wait_for(self._ready(wait=poll), timeout)

    async def _ready(self, wait: float | None) -> None:
        if self._closed:
            raise self.error("the store is closed")
        if self._lost is not None:
            raise self._lost
        if self.read_only or self._token is not None:
            await self.database.open(account=self.account)
            return
        async with self._opening:
            if self._token is not None:
                return
            await self.database.open(account=self.account)
            leases = self.database.leases
            if wait is None:
                self._token = await leases.take(self.account, self._lease_lost)
            else:
                self._token = await leases.wait_and_take(
                    self.account, self._lease_lost, wait, self._stop_waiting
                )
            if self._closed:  # closed while it took the lease: aclose gives it back
                raise self.error("the store is closed")

    def on_lease_lost(self, listener: Callable[[LeaseLost], None]) -> None:
        """Call ``listener(error)`` if this store loses its account's lease (at once if it
        has lost it already)."""
        self._listeners.append(listener)
        if self._lost is not None:
            self._tell(listener, self._lost)

    def _lease_lost(self, error: LeaseLost) -> None:
        """The lease is gone (learnt from a renewal or a refused write): said once."""
        if self._lost is not None:
            return
        self._lost = error
        token, self._token = self._token, None
        if token is not None:  # learnt from a write: the keeper stops renewing it
            self.database.leases.forget(self.account, token)
        for listener in list(self._listeners):
            self._tell(listener, error)

    @staticmethod
    def _tell(listener: Callable[[LeaseLost], None], error: LeaseLost) -> None:
        try:
            listener(error)
        except Exception:
            log.exception("a lease-lost listener failed")

    @property
    def lease_lost(self) -> LeaseLost | None:
        """Why this store lost its lease, or None while it has it (or never needed one)."""
        return self._lost

    # ---------------------------------------------------------------- plumbing

    async def _write(self, what: str, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        """Run ``work`` in a transaction that first checks the lease is still ours."""
        if self.read_only:
            raise self.error(f"{what}: the store is read-only")
        await self._ready(wait=None)
        token, owner = self._token, self.database.owner

        async def fenced(conn: asyncpg.Connection) -> _T:
            if await conn.fetchval(FENCE, self.account, owner, token) is None:
                raise self._refused(what)
            return await work(conn)

        try:
            return await self.database.transaction(what, fenced, account=self.account)
        except LeaseLost as exc:
            self._lease_lost(exc)
            raise

    def _refused(self, what: str) -> LeaseLost:
        return LeaseLost(
            f"PostgreSQL store {self.server} ({self.account}): {what} refused: "
            "another process owns the account now"
        )

    async def _read(self, sql: str, *params: Any) -> list[Any]:
        await self._ready(wait=None)
        return await self.database.read(sql, *params, account=self.account)

    async def _records(self, sql: str, *params: Any) -> list[TrackedMessage]:
        rows = await self._read(sql, self.account, *params)
        try:
            return [record_of(tuple(row)) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error("holds a record this version cannot read", exc) from exc

    # ---------------------------------------------------------------- records

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id in one transaction, all or nothing."""
        what = f"writing {len(records)} records"
        if self.read_only:
            raise self.error(f"{what}: the store is read-only")
        await self._ready(wait=None)  # an error on a closed or unusable store, even for none
        if not records:
            return
        rows = [_row(self.account, record) for record in records]

        async def work(conn: asyncpg.Connection) -> None:
            try:
                await conn.executemany(UPSERT, rows)
            except (asyncpg.DataError, UnicodeEncodeError):
                bad = unencodable(records)
                if bad is None:
                    raise
                # asyncpg's message quotes the whole text (a body): name the record instead.
                raise self.error(
                    f"record {bad!r} holds a lone surrogate, which UTF-8 cannot store; "
                    "nothing of this batch was written"
                ) from None

        assert self._token is not None
        try:
            await self.database.batcher.upsert(
                self.account, self._token, rows, lambda: self._write(what, work)
            )
        except LeaseLost as exc:
            if self._lost is not None:
                raise
            error = self._refused(what)
            self._lease_lost(error)
            raise error from exc
        remember_committed(self._committed, records)

    async def get(self, message_id: str) -> TrackedMessage | None:
        """One record by id."""
        found = await self._records(f"{SELECT} AND id = $2", message_id)
        return found[0] if found else None

    async def pending(self) -> list[TrackedMessage]:
        """SENT, HIBERNATED and RESENT records, oldest first."""
        return await self._records(f"{SELECT} AND {IS_IN_FLIGHT} {OLDEST_FIRST}")

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """FAILED records, oldest first, optionally for one conversation (bare JID)."""
        if conversation is None:
            return await self._records(f"{SELECT} AND {IS_FAILED} {OLDEST_FIRST}")
        return await self._records(
            f"{SELECT} AND {IS_FAILED} AND conversation = $2 {OLDEST_FIRST}", conversation
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
            newest = await self._records(
                f"{SELECT} AND conversation = $2 {NEWEST_FIRST} LIMIT $3",
                bare,
                min(limit, MAX_LIMIT),
            )
        else:
            newest = await self._records(
                f"{SELECT} AND conversation = $2 AND created_at < $3 {NEWEST_FIRST} LIMIT $4",
                bare,
                float(before),
                min(limit, MAX_LIMIT),
            )
        newest.reverse()
        return newest

    async def _delete(self, sql: str, what: str, *params: Any) -> int:
        """Run one DELETE for this account in its own transaction; how many rows went."""
        status = await self._write(what, lambda conn: conn.execute(sql, self.account, *params))
        return int(str(status).rsplit(" ", 1)[-1])  # "DELETE n"

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""
        sql = f"DELETE FROM {RECORDS} WHERE account = $1 AND id = $2"
        self._committed.pop(message_id, None)  # a saved state may no longer point at it
        return await self._delete(sql, "deleting a record", message_id) > 0

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete FAILED records (all, or one conversation's); how many went."""
        sql = f"DELETE FROM {RECORDS} WHERE account = $1 AND {IS_FAILED}"
        if conversation is None:
            return await self._delete(sql, "deleting failed records")
        sql += " AND conversation = $2"
        return await self._delete(sql, "deleting failed records", conversation)

    # ---------------------------------------------------------------- SM state

    async def save_sm_state(self, state: SMState | None) -> None:
        """Keep the SM state as JSON text, an unacked message whose row this store
        committed by reference to that row (:mod:`.state_refs`); None deletes it (the
        session ended cleanly)."""
        if state is None:
            sql = f"DELETE FROM {SM_STATE} WHERE account = $1"
            await self._delete(sql, "forgetting the SM state")
            return
        text = compact_state_text(state, self._committed, self.error)

        async def keep(conn: asyncpg.Connection) -> None:
            await conn.execute(
                f"INSERT INTO {SM_STATE} (account, state) VALUES ($1, $2) "
                "ON CONFLICT (account) DO UPDATE SET state = excluded.state",
                self.account,
                text,
            )

        await self._write("saving the SM state", keep)

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last (a fresh dict every time), or None."""
        rows = await self._read(f"SELECT state FROM {SM_STATE} WHERE account = $1", self.account)
        return await state_of_saved_text(rows[0][0], self._texts, self.error) if rows else None

    async def _texts(self, ids: Sequence[str]) -> dict[str, str]:
        """id -> the text of those records of ``ids`` that are there."""
        sql = f"SELECT id, xml FROM {RECORDS} WHERE account = $1 AND id = ANY($2::text[])"
        return {str(i): str(xml) for i, xml in await self._read(sql, self.account, list(ids))}

    async def aclose(self) -> None:
        """Give the lease back (a standby may take over at once) and, for a store that
        opened its own database, close it; calling it again is harmless."""
        if self._closed:
            return
        self._closed = True
        self._stop_waiting.set()
        async with self._opening:
            token, self._token = self._token, None
            if token is not None:
                await self.database.leases.give_back(self.account, token)
        self.database.release(self)
        if self._own_database:
            await self.database.aclose()

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed
