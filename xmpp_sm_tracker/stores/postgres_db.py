"""One PostgreSQL database shared by any number of accounts: a pool, the schema, leases.

A fleet of clients in one process shares one :class:`PostgresDatabase` (one pool of
connections) and takes a :class:`~.postgres.PostgresStore` per account from it with
:meth:`PostgresDatabase.store`. The schema is prepared once per database, under an
advisory lock, so processes starting together migrate it once; a database holding tables
by our names that are not ours, or a newer version, is refused and left untouched.

Needs the ``postgres`` extra: ``pip install 'xmpp_sm_tracker[postgres]'``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

try:
    import asyncpg
except ModuleNotFoundError as exc:  # pragma: no cover - only without the extra
    raise ModuleNotFoundError(
        "PostgreSQL stores need asyncpg: pip install 'xmpp_sm_tracker[postgres]'", name=exc.name
    ) from exc

from .base import OpenClose, StoreError
from .postgres_batch import UpsertBatcher
from .postgres_lease import LeaseKeeper
from .postgres_schema import MIGRATIONS, SCHEMA_VERSION, TABLES, VERSION_TABLE

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = ["PostgresDatabase", "describe_dsn", "masked"]

_T = TypeVar("_T")
# Any int: only our own processes take it, around a migration.
_MIGRATION_LOCK = 0x786D7070_736D7472  # "xmppsmtr"


def describe_dsn(dsn: str) -> tuple[str, str | None]:
    """``host:port/database`` of a DSN for messages, and its password to keep out of them."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        where = f"{host}:{parts.port or 5432}{parts.path or '/'}"
        return where, parts.password
    except ValueError:
        return "(a DSN that does not parse)", None


def masked(text: str, password: str | None) -> str:
    """``text`` with the DSN's password (as written, and URL-decoded) replaced by ***."""
    for secret in filter(None, (password, unquote(password or ""))):
        text = text.replace(secret, "***")
    return text


class PostgresDatabase(OpenClose):
    """A pool of connections to one database, shared by the stores of many accounts.

    ``dsn`` is a ``postgresql://user:password@host:port/database`` URL (asyncpg's, so
    ``?sslmode=...`` and the ``PG*`` environment variables work). Opens on :meth:`open`,
    ``async with`` or a store's first call; :meth:`aclose` releases every lease it holds
    and closes the pool. ``lease_ttl`` is how long an account stays ours after the last
    renewal (renewed every third of it while this process lives): a process killed
    outright loses its accounts that long after, and a standby may take them over.
    ``owner`` names this process in the lease table (host, pid and a random part by
    default); give your own only if it is unique per process: two processes under one
    name would take each other's live leases. A statement that takes longer than
    ``command_timeout`` seconds (a hung server) is a :class:`StoreError`; a broken
    connection is replaced on the next call.
    The password in ``dsn`` never appears in an error.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        lease_ttl: float = 30.0,
        owner: str | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("command_timeout", command_timeout),
            ("lease_ttl", lease_ttl),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, not {value!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections!r}")
        self.server, self._password = describe_dsn(dsn)
        self._dsn = dsn
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.leases = LeaseKeeper(self, self.owner, lease_ttl)
        #: Record writes of all this database's stores, one transaction per loop turn.
        self.batcher = UpsertBatcher(self)
        #: Transactions committed, for the fleet benchmark's "transactions per second".
        self.transactions = 0
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = self._closing = False
        self._accounts: dict[str, PostgresStore] = {}

    def __repr__(self) -> str:
        return f"PostgresDatabase({self.server!r})"

    def error(
        self, what: str, exc: BaseException | None = None, *, account: str | None = None
    ) -> StoreError:
        """A StoreError naming the server and the account (never the password)."""
        where = f"PostgreSQL store {self.server} ({account})" if account else None
        where = where or f"PostgreSQL {self.server}"
        return self.hide_password(StoreError(f"{where}: {what}"), exc)

    def hide_password(self, error: StoreError, exc: BaseException | None) -> StoreError:
        """``error`` with the cause's text appended, the DSN's password masked."""
        if exc is None:
            return error
        detail = masked(f" ({type(exc).__name__}: {exc})", self._password)
        return type(error)(f"{error}{detail}")

    # ---------------------------------------------------------------- accounts

    def store(self, account: str, *, read_only: bool = False) -> PostgresStore:
        """The store of one account (a bare JID) in this database.

        A writable store takes the account's lease on first use (:class:`AccountLeased`
        if another process holds it; :meth:`~.postgres.PostgresStore.take_over` waits
        for it); ``read_only=True`` takes none and refuses writes (for looking in).
        Closing the store releases its lease; closing the database closes the pool.
        """
        from .postgres import PostgresStore

        return PostgresStore(account=account, database=self, read_only=read_only)

    def claim(self, store: PostgresStore) -> None:
        """Register a writable store; one per account per database."""
        if self._closing:
            raise self.error("the database is closed")
        held = self._accounts.get(store.account)
        if held is not None and held is not store and not held.closed:
            raise self.error(f"{store.account} already has an open store in this database")
        self._accounts[store.account] = store

    def release(self, store: PostgresStore) -> None:
        """Forget a closed store."""
        if self._accounts.get(store.account) is store:
            del self._accounts[store.account]

    # ---------------------------------------------------------------- the pool

    async def open(self, *, account: str | None = None) -> None:
        """Connect (and create or migrate the schema) now rather than on first use;
        errors name ``account``, the store that asked."""
        await self._ready(account)

    async def _ready(self, account: str | None = None) -> asyncpg.Pool:
        if self._closed:
            raise self.error("the database is closed", account=account)
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._closed:
                raise self.error("the database is closed", account=account)
            if self._pool is None:
                try:
                    pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=1,
                        max_size=self.max_connections,
                        timeout=self.connect_timeout,
                        command_timeout=self.command_timeout,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    raise self.error("cannot connect", exc, account=account) from exc
                try:
                    async with pool.acquire() as conn:
                        await self._prepare(conn, account)
                except BaseException:
                    pool.terminate()
                    raise
                self._pool = pool
            return self._pool

    async def _inspect(
        self, conn: asyncpg.Connection, account: str | None
    ) -> tuple[int | None, dict[str, set[str]]]:
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
            raise self.error(
                f"the table {VERSION_TABLE} is not ours (left untouched)", account=account
            )
        versions = await conn.fetch(f"SELECT version FROM {VERSION_TABLE}")
        if len(versions) != 1:
            raise self.error(
                f"{VERSION_TABLE} holds {len(versions)} rows, not one (left untouched)",
                account=account,
            )
        return int(versions[0][0]), tables

    def _refuse_foreign(
        self, version: int | None, tables: dict[str, set[str]], account: str | None
    ) -> None:
        if version is None:
            if tables:
                raise self.error(
                    f"holds tables named like ours ({', '.join(sorted(tables))}) but no "
                    f"{VERSION_TABLE}: not a tracker schema (left untouched)",
                    account=account,
                )
            return
        if version > SCHEMA_VERSION:
            raise self.error(
                f"schema version {version} is newer than the {SCHEMA_VERSION} this version "
                "of xmpp_sm_tracker knows; upgrade it (the database was left untouched)",
                account=account,
            )
        if version < 1:
            raise self.error(f"says schema version {version}, which never existed", account=account)
        if version == SCHEMA_VERSION:
            found = {name: frozenset(columns) for name, columns in tables.items()}
            wrong = sorted(name for name, cols in TABLES.items() if found.get(name) != cols)
            if wrong:
                raise self.error(
                    f"says schema version {version} but its {', '.join(wrong)} table(s) "
                    "are not ours (left untouched)",
                    account=account,
                )

    async def _prepare(self, conn: asyncpg.Connection, account: str | None) -> None:
        """Refuse foreign schemas; bring ours to the latest version in one transaction."""
        try:
            version, tables = await self._inspect(conn, account)
            self._refuse_foreign(version, tables, account)
            if version == SCHEMA_VERSION:
                return
            async with conn.transaction():
                # Another process may be migrating too: one at a time, then look again.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                version, tables = await self._inspect(conn, account)
                self._refuse_foreign(version, tables, account)
                for step in range(version or 0, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        await conn.execute(statement)
                    if step == 0:
                        await conn.execute(f"INSERT INTO {VERSION_TABLE} VALUES (1)")
                    else:
                        await conn.execute(f"UPDATE {VERSION_TABLE} SET version = $1", step + 1)
                self._refuse_foreign(*await self._inspect(conn, account), account)
        except StoreError:
            raise
        except Exception as exc:
            raise self.error("cannot prepare the schema", exc, account=account) from exc

    async def transaction(
        self,
        what: str,
        work: Callable[[asyncpg.Connection], Awaitable[_T]],
        *,
        account: str | None = None,
    ) -> _T:
        """Run ``work`` on a pooled connection, committed whole or rolled back whole.

        A connection left in an unknown state (broken link, timeout, cancellation) is
        terminated, and the pool makes a new one for the next call.
        """
        pool = await self._ready()
        try:
            conn = await pool.acquire(timeout=self.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self.error(f"{what} failed (no connection)", exc, account=account) from exc
        try:
            async with conn.transaction():
                result = await work(conn)
            self.transactions += 1
            return result
        except asyncpg.PostgresError as exc:
            raise self.error(f"{what} failed (rolled back)", exc, account=account) from exc
        except StoreError:
            raise  # our own, from ``work``: rolled back by the context manager
        except Exception as exc:
            conn.terminate()
            raise self.error(f"{what} failed (the connection broke)", exc, account=account) from exc
        except BaseException:
            # Cancelled (or worse) mid-transaction: never reuse a connection that may
            # still be inside it; the server rolls back when it goes.
            conn.terminate()
            raise
        finally:
            await pool.release(conn)

    async def read(self, sql: str, *params: Any, account: str | None = None) -> list[Any]:
        """The rows of one query, read in a transaction of its own."""
        return await self.transaction(
            "reading", lambda conn: conn.fetch(sql, *params), account=account
        )

    # ---------------------------------------------------------------- closing

    async def aclose(self) -> None:
        """Release this process's leases and close the pool; calling it again is harmless."""
        if self._closing:
            return
        self._closing = True  # no new stores; the leases still go back through the pool
        await self.leases.aclose()  # all at once: one round trip, not one per store
        for store in list(self._accounts.values()):
            await store.aclose()
        await self.leases.aclose()  # a take that was on its way when closing began
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self.connect_timeout)
            except Exception:
                pool.terminate()  # closed anyway: the server drops the sessions
            except BaseException:
                pool.terminate()
                raise

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None and not self._closed:
            warnings.warn(
                f"{self!r} was never closed: use 'async with' or aclose()",
                ResourceWarning,
                stacklevel=2,
            )
