"""A store in PostgreSQL (asyncpg), so many accounts and processes can share one database.

Every row is keyed by the account given at construction (a bare JID), so one database
holds any number of accounts without one seeing another's records or SM state. The
schema is versioned in ``sm_tracker_schema_version`` and moved forward by
:data:`~.postgres_schema.MIGRATIONS` under an advisory lock, so two processes starting
at once migrate it once. A database holding tables by our names that are not ours, or
a newer version, is refused with a :class:`StoreError` and left untouched.

Needs the ``postgres`` extra: ``pip install 'xmpp_sm_tracker[postgres]'``.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import unquote, urlsplit

try:
    import asyncpg
except ModuleNotFoundError as exc:  # pragma: no cover - only without the extra
    raise ModuleNotFoundError(
        "PostgresStore needs asyncpg: pip install 'xmpp_sm_tracker[postgres]'", name=exc.name
    ) from exc

from ..core.records import TrackedMessage
from .base import SMState, StoreError
from .postgres_schema import (
    IS_FAILED,
    IS_IN_FLIGHT,
    MIGRATIONS,
    NEWEST_FIRST,
    OLDEST_FIRST,
    RECORDS,
    SCHEMA_VERSION,
    SELECT,
    SM_STATE,
    TABLES,
    UPSERT,
    VERSION_TABLE,
)
from .sqlite_schema import MAX_LIMIT, record_of, row_of

__all__ = ["PostgresStore"]

_T = TypeVar("_T")
# Any int: only our own processes take it, around a migration.
_MIGRATION_LOCK = 0x786D7070_736D7472  # "xmppsmtr"


def _describe(dsn: str) -> tuple[str, str | None]:
    """``host:port/database`` of a DSN for messages, and its password to keep out of them."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port or 5432}{parts.path or '/'}"
        return where, parts.password
    except ValueError:
        return "(a DSN that does not parse)", None


def _row(account: str, record: TrackedMessage) -> tuple[Any, ...]:
    row = row_of(record)
    return (account, *row[:10], bool(row[10]), *row[11:])


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


class PostgresStore:
    """Records and the SM state of one account in a PostgreSQL database.

    ``dsn`` is a ``postgresql://user:password@host:port/database`` URL (asyncpg's, so
    ``?sslmode=...`` and the ``PG*`` environment variables work); ``account`` is the
    bare JID whose rows this store reads and writes. Opens lazily (on :meth:`open`,
    ``async with``, or the first call) one connection that it closes in :meth:`aclose`;
    use one instance per account and event loop. Every write is one transaction, so a
    batch is all or nothing. A statement that takes longer than ``command_timeout``
    seconds (a hung server) is a :class:`StoreError`, and a connection that broke is
    replaced on the next call. The password in ``dsn`` never appears in an error.
    """

    def __init__(
        self,
        dsn: str,
        *,
        account: str,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
    ) -> None:
        if not account or "/" in account or account != account.strip():
            raise ValueError(f"account must be a bare JID, not {account!r}")
        for name, value in (("connect", connect_timeout), ("command", command_timeout)):
            if not value > 0:
                raise ValueError(f"{name}_timeout must be > 0 seconds, not {value!r}")
        self.account = account
        self.server, self._password = _describe(dsn)
        self._dsn = dsn
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None
        self._closed = False
        # One connection, one statement or transaction at a time.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresStore({self.server!r}, account={self.account!r})"

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

    def error(self, what: str, exc: BaseException | None = None) -> StoreError:
        """A StoreError naming the server and account (never the password)."""
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        for secret in filter(None, (self._password, unquote(self._password or ""))):
            detail = detail.replace(secret, "***")
        return StoreError(f"PostgreSQL store {self.server} ({self.account}): {what}{detail}")

    # ---------------------------------------------------------------- opening

    async def open(self) -> None:
        """Connect (and create or migrate the schema) now rather than on first use."""
        async with self._lock:
            await self._connection()

    async def _connection(self) -> asyncpg.Connection:
        """The open connection; the caller holds ``_lock``."""
        if self._closed:
            raise self.error("the store is closed")
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        try:
            conn = await asyncpg.connect(
                self._dsn, timeout=self.connect_timeout, command_timeout=self.command_timeout
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self.error("cannot connect", exc) from exc
        try:
            await self._prepare(conn)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    async def _inspect(self, conn: asyncpg.Connection) -> tuple[int | None, dict[str, set[str]]]:
        """The schema version (None: no version table) and our tables' columns."""
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
            list(TABLES),
        )
        tables: dict[str, set[str]] = {}
        for row in rows:
            tables.setdefault(str(row[0]), set()).add(str(row[1]))
        if VERSION_TABLE not in tables:
            return None, tables
        if tables[VERSION_TABLE] != {"version"}:
            raise self.error(f"the table {VERSION_TABLE} is not ours (left untouched)")
        versions = await conn.fetch(f"SELECT version FROM {VERSION_TABLE}")
        if len(versions) != 1:
            raise self.error(
                f"{VERSION_TABLE} holds {len(versions)} rows, not one (left untouched)"
            )
        return int(versions[0][0]), tables

    def _refuse_foreign(self, version: int | None, tables: dict[str, set[str]]) -> None:
        if version is None:
            if tables:
                raise self.error(
                    f"holds tables named like ours ({', '.join(sorted(tables))}) but no "
                    f"{VERSION_TABLE}: not a tracker schema (left untouched)"
                )
            return
        if version > SCHEMA_VERSION:
            raise self.error(
                f"schema version {version} is newer than the {SCHEMA_VERSION} this version "
                "of xmpp_sm_tracker knows; upgrade it (the database was left untouched)"
            )
        if version < 1:
            raise self.error(f"says schema version {version}, which never existed")
        if version == SCHEMA_VERSION:
            found = {name: frozenset(columns) for name, columns in tables.items()}
            wrong = sorted(name for name, cols in TABLES.items() if found.get(name) != cols)
            if wrong:
                raise self.error(
                    f"says schema version {version} but its {', '.join(wrong)} table(s) "
                    "are not ours (left untouched)"
                )

    async def _prepare(self, conn: asyncpg.Connection) -> None:
        """Refuse foreign schemas; bring ours to the latest version in one transaction."""
        try:
            version, tables = await self._inspect(conn)
            self._refuse_foreign(version, tables)
            if version == SCHEMA_VERSION:
                return
            async with conn.transaction():
                # Another process may be migrating too: one at a time, then look again.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                version, tables = await self._inspect(conn)
                self._refuse_foreign(version, tables)
                for step in range(version or 0, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        await conn.execute(statement)
                    if step == 0:
                        await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1)")
                    else:
                        await conn.execute(f"UPDATE {VERSION_TABLE} SET version = $1", step + 1)
                self._refuse_foreign(*await self._inspect(conn))
        except StoreError:
            raise
        except Exception as exc:
            raise self.error("cannot prepare the schema", exc) from exc

    # ---------------------------------------------------------------- plumbing

    def _drop(self, conn: asyncpg.Connection) -> None:
        """Forget a connection left in an unknown state; the next call makes a new one."""
        if self._conn is conn:
            self._conn = None
        conn.terminate()

    async def _transaction(
        self, what: str, work: Callable[[asyncpg.Connection], Awaitable[_T]]
    ) -> _T:
        """Run ``work`` committed whole, or rolled back whole."""
        async with self._lock:
            conn = await self._connection()
            try:
                async with conn.transaction():
                    return await work(conn)
            except asyncpg.PostgresError as exc:
                if conn.is_closed():  # e.g. the server was shut down
                    self._drop(conn)
                raise self.error(f"{what} failed (rolled back)", exc) from exc
            except StoreError:
                raise  # our own, from ``work``: rolled back by the context manager
            except Exception as exc:
                # The link broke, or the client lost track of it: start afresh next time.
                self._drop(conn)
                raise self.error(f"{what} failed (the connection broke)", exc) from exc
            except BaseException:
                # Cancelled (or worse) mid-transaction: never reuse a connection that may
                # still be inside it; the server rolls back when it goes.
                self._drop(conn)
                raise

    async def _read(self, sql: str, *params: Any) -> list[Any]:
        async with self._lock:
            conn = await self._connection()
            try:
                return list(await conn.fetch(sql, *params))
            except asyncpg.PostgresError as exc:
                if conn.is_closed():
                    self._drop(conn)
                raise self.error("reading failed", exc) from exc
            except Exception as exc:
                self._drop(conn)
                raise self.error("reading failed (the connection broke)", exc) from exc
            except BaseException:
                self._drop(conn)  # cancelled mid-query: do not reuse it
                raise

    async def _records(self, sql: str, *params: Any) -> list[TrackedMessage]:
        rows = await self._read(sql, self.account, *params)
        try:
            return [record_of(tuple(row)) for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self.error("holds a record this version cannot read", exc) from exc

    # ---------------------------------------------------------------- records

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        """Insert or replace records by id in one transaction, all or nothing."""
        if not records:
            await self.open()  # still an error on a closed or unusable store
            return
        rows = [_row(self.account, record) for record in records]

        async def work(conn: asyncpg.Connection) -> None:
            try:
                await conn.executemany(UPSERT, rows)
            except (asyncpg.DataError, UnicodeEncodeError):
                bad = _unencodable(records)
                if bad is None:
                    raise
                # asyncpg's message quotes the whole text (a body): name the record instead.
                raise self.error(
                    f"record {bad!r} holds a lone surrogate, which UTF-8 cannot store; "
                    "nothing of this batch was written"
                ) from None

        await self._transaction(f"writing {len(records)} records", work)

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
        status = await self._transaction(
            what, lambda conn: conn.execute(sql, self.account, *params)
        )
        return int(str(status).rsplit(" ", 1)[-1])  # "DELETE n"

    async def delete(self, message_id: str) -> bool:
        """Delete one record; True if it existed."""
        sql = f"DELETE FROM {RECORDS} WHERE account = $1 AND id = $2"
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
        """Keep the SM state as JSON text; None deletes it (the session ended cleanly)."""
        if state is None:
            sql = f"DELETE FROM {SM_STATE} WHERE account = $1"
            await self._delete(sql, "forgetting the SM state")
            return
        try:
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self.error("the SM state is not JSON-safe", exc) from exc

        async def keep(conn: asyncpg.Connection) -> None:
            await conn.execute(
                f"INSERT INTO {SM_STATE} (account, state) VALUES ($1, $2) "
                "ON CONFLICT (account) DO UPDATE SET state = excluded.state",
                self.account,
                text,
            )

        await self._transaction("saving the SM state", keep)

    async def load_sm_state(self) -> SMState | None:
        """The SM state saved last (a fresh dict every time), or None."""
        rows = await self._read(f"SELECT state FROM {SM_STATE} WHERE account = $1", self.account)
        if not rows:
            return None
        try:
            state = json.loads(rows[0][0])
        except ValueError as exc:
            raise self.error("the saved SM state is not valid JSON", exc) from exc
        if not isinstance(state, dict):
            raise self.error("the saved SM state is not a JSON object")
        return state

    async def aclose(self) -> None:
        """Close the connection; calling it again is harmless."""
        async with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), self.connect_timeout)
                except Exception:
                    conn.terminate()  # closed anyway: the server drops the session
                except BaseException:
                    conn.terminate()
                    raise

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)  # __init__ may raise
        if conn is not None and not self._closed:
            warnings.warn(
                f"{self!r} was never closed: use 'async with' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )
